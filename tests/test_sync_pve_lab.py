"""sync-pve-guest on the lab: the API double on pve1:8006 describes the demo
cluster, whose disks are real datasets on pve1 and pve2; the tool runs on
backup as planb, as it would from cron on a real backup host."""
import re
import shlex
import time
from pathlib import Path

import pytest

from lab.cluster import double_requests, tool

pytestmark = pytest.mark.lab

ROOT = 'tank/enc/pve'


@pytest.fixture(scope='module')
def cluster(demo):
    demo.backup.zfs('create -o mountpoint=none ' + ROOT)
    return demo


def datasets(host, parent):
    out = host.zfs('list -H -o name -r ' + parent)
    return out.splitlines()[1:]


def same(lab, node, src, dst):
    return lab[node].sha256('/dev/zvol/' + src) == lab.backup.sha256('/dev/zvol/' + dst)


def prop(host, dataset, name):
    return host.zfs('get -H -o value {} {}'.format(name, shlex.quote(dataset)))


def test_listing_on_the_lab_matches_the_listing_on_loopback(cluster):
    done = tool(cluster, 'list-pve-guests', check=0)
    expected = Path(__file__).parent / 'expected' / 'list-pve-guests.txt'
    assert done.stdout == expected.read_text()


def test_guest_full_then_incremental_then_nothing_new(cluster):
    disks = 'rpool/data/vm-106-disk-0 rpool/data/vm-106-disk-2 rpool/data/vm-106-disk-3'
    # Other tests' runs left snapshots on the guest's disks: this test counts the new ones.
    left = set(cluster.pve1.zfs('list -H -o name -t snapshot ' + disks).splitlines())
    sync = ['-p', 'demo', 'sync-pve-guest', '-g', '106', '--sync-zfs-root', ROOT]
    first = tool(cluster, *sync, check=0)
    guest = ROOT + '/acme-wp'
    synced = ['local-zfs--vm-106-disk-0', 'local-zfs--vm-106-disk-2',
              'local-zfs--vm-106-disk-3']    # boot disk, EFI vars, TPM state
    assert datasets(cluster.backup, guest) == [guest + '/' + name for name in synced]
    assert '3 synced' in first.stdout
    for name in synced:
        src = 'rpool/data/' + name.split('--')[1]
        assert same(cluster, 'pve1', src, guest + '/' + name)
    dst = guest + '/local-zfs--vm-106-disk-0'
    assert {key: prop(cluster.backup, dst, 'planb-pvesync:' + key)
            for key in ('cluster', 'node', 'storage', 'volume', 'vmid')} == {
        'cluster': 'demo', 'node': 'pve1', 'storage': 'local-zfs',
        'volume': 'vm-106-disk-0', 'vmid': '106'}
    assert prop(cluster.backup, guest, 'mountpoint') == 'none'
    # One snapshot for all the guest's disks, from one zfs snapshot.
    snaps = set(cluster.pve1.zfs('list -H -o name -t snapshot ' + disks).splitlines()) - left
    assert len(snaps) == 3
    assert len({line.split('@')[1] for line in snaps}) == 1

    cluster.pve1.write_random('rpool/data/vm-106-disk-0', 2, offset_mib=2)
    time.sleep(1)
    second = tool(cluster, *sync, check=0)
    assert second.stdout.count('incremental @planb-') == 3
    assert same(cluster, 'pve1', 'rpool/data/vm-106-disk-0', dst)
    time.sleep(1)
    third = tool(cluster, *sync, check=0)
    assert '3 synced' in third.stdout
    # The first run's stream also carried the snapshots other runs had left on the disk.
    received = {line.split('@')[1] for line in
                cluster.backup.zfs('list -H -t snapshot -o name ' + dst).splitlines()}
    assert len(received - {line.split('@')[1] for line in left}) == 3


def test_two_guests_on_two_nodes_with_the_same_pool_name(cluster):
    tool(cluster, 'sync-pve-guest', '-g', 'linked-clone', '-g', '107',
         '--sync-zfs-root', ROOT, check=0)
    clone = ROOT + '/linked-clone/local-zfs--vm-101-disk-0'
    legacy = ROOT + '/legacy-db/local-zfs--vm-107-disk-0'
    assert same(cluster, 'pve1', 'rpool/data/vm-101-disk-0', clone)
    assert same(cluster, 'pve2', 'rpool/data/vm-107-disk-0', legacy)
    assert same(cluster, 'pve2', 'rpool/fast/vm-107-disk-1',
                ROOT + '/legacy-db/fast-zfs--vm-107-disk-1')
    assert prop(cluster.backup, legacy, 'planb-pvesync:node') == 'pve2'


def test_container_filesystems_are_not_mounted(cluster):
    done = tool(cluster, 'sync-pve-guest', '-g', 'ct-web', '--sync-zfs-root', ROOT, check=0)
    guest = ROOT + '/ct-web'
    assert datasets(cluster.backup, guest) == [
        guest + '/local-zfs--subvol-200-disk-0', guest + '/local-zfs--subvol-200-disk-1']
    assert '2 synced' in done.stdout
    for dataset in datasets(cluster.backup, guest):
        assert prop(cluster.backup, dataset, 'mounted') == 'no'
    assert cluster.backup.run('test -e /data || test -e /rpool', check=False).returncode != 0


def test_fsfreeze_through_the_guest_agent(cluster):
    tool(cluster, 'sync-pve-guest', '-g', '106', '--fsfreeze', '--sync-zfs-root', ROOT,
         check=0)
    calls = [line for line in double_requests(cluster).splitlines() if 'fsfreeze' in line]
    assert calls[-2:] == ['POST /nodes/pve1/qemu/106/agent/fsfreeze-freeze',
                          'POST /nodes/pve1/qemu/106/agent/fsfreeze-thaw']


def test_dry_run_prints_the_plan_and_changes_nothing(cluster):
    before = cluster.pve2.zfs('list -H -t snapshot -o name -r rpool')
    cluster.backup.zfs('create -o mountpoint=none {}/dry'.format(ROOT))
    done = tool(cluster, 'sync-pve-guest', '-n', '-g', '107', '--sync-zfs-root',
                ROOT + '/dry', check=0)
    assert re.search(r"would run on planb@10\.99\.2\.1: sudo -n zfs snapshot "
                     r"rpool/data/vm-107-disk-0@planb-\S+ rpool/fast/vm-107-disk-1@planb-",
                     done.stdout)
    assert 'tank/enc/pve/dry/legacy-db/local-zfs--vm-107-disk-0: full' in done.stdout
    assert cluster.pve2.zfs('list -H -t snapshot -o name -r rpool') == before
    assert cluster.backup.zfs('list -H -o name -r {}/dry'.format(ROOT)) == ROOT + '/dry'


def test_a_missing_root_stops_the_run_before_anything_changes(cluster):
    done = tool(cluster, 'sync-pve-guest', '-g', '107', '--sync-zfs-root', 'tank/ecn', check=2)
    assert done.stderr == ('planb-pvesync: error: --sync-zfs-root tank/ecn does not exist '
                           'here; create it, for example: zfs create -o mountpoint=none '
                           'tank/ecn\n')


def test_offline_node_guest_fails_alone(cluster):
    done = tool(cluster, 'sync-pve-guest', '-g', '120', '-g', '107',
                '--sync-zfs-root', ROOT, check=1)
    assert '120 (120): volumes unknown: node pve3 is offline' in done.stderr
    assert '2 synced, 0 up to date, 0 failed' in done.stdout
