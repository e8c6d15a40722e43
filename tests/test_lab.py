"""Acceptance test of the VM lab itself: real ssh | zstd | zfs recv pulls between the VMs."""
import pytest

ZVOL = 'rpool/data/vm-100-disk-0'
NODES = ('pve1', 'pve2')


def target(node):
    return f'tank/enc/{node}--vm-100-disk-0'


def pull(lab, node, snapshot, since=None):
    """As planb on backup, pull a (full or incremental) send of ZVOL from node."""
    incremental = f'-i @{since} ' if since else ''
    lab.backup.run(f"set -o pipefail; ssh planb@{node} 'sudo zfs send {incremental}{ZVOL}@{snapshot} | zstd'"
                   f' | zstd -d | sudo zfs recv {target(node)}', user='planb')


@pytest.fixture
def source_zvols(lab):
    for node in NODES:
        lab[node].zfs(f'create -V 4M -o volmode=dev {ZVOL}')
    yield
    for node in NODES:
        lab[node].zfs(f'destroy -r {ZVOL}')
        lab.backup.run(f'zfs destroy -r {target(node)} 2>/dev/null || true')


def snapshot_with_data(lab, node, snapshot, mib, offset_mib=0):
    lab[node].write_random(ZVOL, mib, seed=f'{node}@{snapshot}', offset_mib=offset_mib)
    lab[node].zfs(f'snapshot {ZVOL}@{snapshot}')
    return lab[node].sha256(f'/dev/zvol/{ZVOL}')


def test_pull_full_then_incremental_into_encrypted_pool(lab, source_zvols):
    sums = {node: snapshot_with_data(lab, node, 's1', 4) for node in NODES}
    assert sums['pve1'] != sums['pve2']
    for node in NODES:
        pull(lab, node, 's1')
        assert lab.backup.sha256(f'/dev/zvol/{target(node)}') == sums[node]
        assert lab.backup.zfs(f'get -H -o value encryptionroot {target(node)}') == 'tank/enc'

    for node in NODES:
        changed = snapshot_with_data(lab, node, 's2', 1, offset_mib=2)
        assert changed != sums[node]
        pull(lab, node, 's2', since='s1')
        assert lab.backup.sha256(f'/dev/zvol/{target(node)}') == changed
        assert lab.backup.zfs(f'list -H -o name -t snapshot {target(node)}').split() == [
            f'{target(node)}@s1', f'{target(node)}@s2']


def test_planb_may_sudo_only_zfs(lab):
    assert lab.backup.run('sudo -n zfs list -H -o name tank', user='planb').stdout.strip() == 'tank'
    denied = lab.backup.run('sudo -n true', user='planb', check=False)
    assert denied.returncode != 0
