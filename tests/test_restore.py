"""Restore, the pure parts: finding a guest's backups and restore points,
naming the restored volumes, rewriting the kept config, the privileges asked."""
import dataclasses
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from planb_pvesync import (
    Dataset, GuestBackup, PveGuest, PveStorage, Snapshot, UsageError,
    choose_partition, choose_restore_point, empty_template_tarball, find_guest_backup,
    kept_config, next_free_name, parse_kept_config, plan_restore, restore_points,
    restore_mark, restore_privileges, restore_states, restored_config, restored_volume_name,
    subvolume_props)

FIXTURE = json.loads((Path(__file__).parent / 'fixtures' / 'cluster.json').read_text())
CONFIGS = {g['vmid']: g['config'] for g in FIXTURE['guests']}
ROOT = 'tank/enc'
STORAGES = {
    'local-zfs': PveStorage('local-zfs', 'zfspool', True, None, 'rpool/data', None,
                            frozenset({'images', 'rootdir'})),
    'fast-zfs': PveStorage('fast-zfs', 'zfspool', True, None, 'rpool/fast',
                           frozenset({'pve2'}), frozenset({'images'})),
    'local': PveStorage('local', 'dir', True, '/var/lib/vz', None, None,
                        frozenset({'iso', 'vztmpl'})),
}
S1 = Snapshot('planb-20261126T013000Z', guid=11, createtxg=10, creation=1764120600)
S2 = Snapshot('planb-20261127T013000Z', guid=12, createtxg=20, creation=1764207000)


def backed_up(label, vmid, volume, kind='volume', snaps=(S1, S2), storage='local-zfs',
              cluster='demo'):
    name = '{}/{}/{}--{}'.format(ROOT, label, storage, volume.rsplit('/', 1)[-1])
    return Dataset(name, kind, snapshots=tuple(snaps), recorded={
        'cluster': cluster, 'vmid': str(vmid), 'storage': storage, 'volume': volume,
        'node': 'pve1'})


def kept(vmid, node='pve1'):
    guest = next(g for g in FIXTURE['guests'] if g['vmid'] == vmid)
    return {'cluster': 'demo', 'vmid': vmid, 'type': guest['type'], 'node': node,
            'config': guest['config']}


VM = GuestBackup(106, 'acme-wp', (
    backed_up('acme-wp', 106, 'vm-106-disk-0'), backed_up('acme-wp', 106, 'vm-106-disk-2'),
    backed_up('acme-wp', 106, 'vm-106-disk-3', snaps=(S2,))))
CT = GuestBackup(200, 'ct-web', (
    backed_up('ct-web', 200, 'subvol-200-disk-0', 'filesystem'),
    backed_up('ct-web', 200, 'subvol-200-disk-1', 'filesystem')))


def point(backup, snap=S2):
    return restore_points(backup, {})[[S1, S2].index(snap)]


# ==============================================================================
# The config kept with each snapshot
# ==============================================================================

def test_kept_config_is_compact_json_without_the_digest():
    guest = PveGuest(106, 'qemu', 'acme-wp', 'pve1', 'running',
                     config=dict(CONFIGS[106], digest='abc'))
    text = kept_config('demo', guest)
    assert ' ' not in text.replace('prod;web', '') and 'digest' not in text
    assert parse_kept_config(text) == kept(106)


def test_a_config_too_large_loses_its_description_then_is_not_kept():
    config = dict(CONFIGS[106], description='x' * 8000)
    guest = PveGuest(106, 'qemu', 'acme-wp', 'pve1', 'running', config=config)
    assert 'description' not in parse_kept_config(kept_config('demo', guest))['config']
    huge = dataclasses.replace(guest, config=dict(config, args='y' * 9000))
    assert kept_config('demo', huge) is None


def test_parse_kept_config_refuses_other_text():
    with pytest.raises(ValueError):
        parse_kept_config('{"type": "vz"}')


# ==============================================================================
# Finding the backups and their restore points
# ==============================================================================

FOUND = {d.name: d for d in VM.volumes + CT.volumes + (
    backed_up('web', 300, 'vm-300-disk-0'), backed_up('old', 106, 'vm-106-disk-0',
                                                      cluster='other'))}


@pytest.mark.parametrize('word', ['106', 'acme-wp'])
def test_a_guest_is_found_by_vmid_or_name_in_its_cluster(word):
    assert find_guest_backup(FOUND, ROOT, 'demo', word) == VM


def test_a_vmid_wins_over_a_name():
    found = dict(FOUND)
    named = backed_up('300', 301, 'vm-301-disk-0')
    found[named.name] = named
    assert find_guest_backup(found, ROOT, 'demo', '300').vmid == 300


def test_a_missing_guest_and_an_ambiguous_name_are_one_line():
    with pytest.raises(UsageError, match=r"no backup of guest 'nope' of cluster demo in "
                                         r"tank/enc; see what there is: zfs list"):
        find_guest_backup(FOUND, ROOT, 'demo', 'nope')
    found = dict(FOUND)
    twin = backed_up('web', 301, 'vm-301-disk-0')
    found[twin.name] = twin
    with pytest.raises(UsageError, match=r"several guests are called 'web': vmid 300, 301"):
        find_guest_backup(found, ROOT, 'demo', 'web')


def test_restore_points_are_every_snapshot_with_the_volumes_that_have_it():
    points = restore_points(VM, {S2.name: '{}'})
    assert [(p.name, p.config, len(p.volumes)) for p in points] == [
        (S1.name, None, 2), (S2.name, '{}', 3)]
    assert choose_restore_point(points, None, 'acme-wp') == points[-1]
    assert choose_restore_point(points, '@' + S1.name, 'acme-wp') == points[0]
    with pytest.raises(UsageError, match='acme-wp has no restore point @x; list them: '
                                         'planb-pvesync list-restore-points -g acme-wp'):
        choose_restore_point(points, 'x', 'acme-wp')


# ==============================================================================
# Names and plans
# ==============================================================================

@pytest.mark.parametrize('name, filesystem, new', [
    ('vm-106-disk-0', False, 'vm-9106-disk-0'),
    ('base-100-disk-0', False, 'vm-9106-disk-0'),
    ('subvol-200-disk-1', True, 'subvol-9106-disk-1'),
    ('basevol-200-disk-1', True, 'subvol-9106-disk-1'),
    ('vm-106-cloudinit', False, 'vm-9106-cloudinit'),
    ('mydisk', False, 'vm-9106-mydisk'),
])
def test_restored_volume_names(name, filesystem, new):
    assert restored_volume_name(name, 9106, filesystem) == new


def test_next_free_name():
    assert next_free_name('vm-106-disk-0', {'vm-106-disk-0', 'vm-106-disk-1'}) == 'vm-106-disk-2'
    assert next_free_name('vm-106-disk-3', {'vm-106-disk-0'}) == 'vm-106-disk-3'


def test_plan_restore_of_a_vm():
    volumes, dropped = plan_restore(kept(106), VM, point(VM), 9106, STORAGES, 'pve2')
    assert [(v.key, v.volid, v.dataset, v.options) for v in volumes] == [
        ('scsi0', 'local-zfs:vm-9106-disk-0', 'rpool/data/vm-9106-disk-0', 'iothread=1,size=8M'),
        ('efidisk0', 'local-zfs:vm-9106-disk-2', 'rpool/data/vm-9106-disk-2',
         'efitype=4m,size=1M'),
        ('tpmstate0', 'local-zfs:vm-9106-disk-3', 'rpool/data/vm-9106-disk-3',
         'size=4M,version=v2.0')]
    assert dropped == {'virtio1': 'not backed up: backup=0', 'unused0': 'not backed up: unused'}


def test_plan_restore_of_an_older_point_and_of_chosen_volumes():
    volumes, dropped = plan_restore(kept(106), VM, point(VM, S1), 9106, STORAGES, 'pve2')
    assert [v.key for v in volumes] == ['scsi0', 'efidisk0']
    assert dropped['tpmstate0'] == 'not in restore point @' + S1.name
    volumes, dropped = plan_restore(kept(106), VM, point(VM), 9106, STORAGES, 'pve2',
                                    wanted=['vm-106-disk-2'])
    assert [v.key for v in volumes] == ['efidisk0']
    assert dropped['scsi0'] == 'not asked for (--volume)'
    with pytest.raises(UsageError, match='acme-wp has no volume sata9 at @'):
        plan_restore(kept(106), VM, point(VM), 9106, STORAGES, 'pve2', wanted=['sata9'])


def test_plan_restore_without_a_kept_config_takes_every_volume():
    volumes, dropped = plan_restore(None, VM, point(VM), 106, STORAGES, 'pve1')
    assert [(v.key, v.volume) for v in volumes] == [
        (None, 'vm-106-disk-0'), (None, 'vm-106-disk-2'), (None, 'vm-106-disk-3')]
    assert dropped == {}


@pytest.mark.parametrize('storage, node, message', [
    ('local', 'pve1', 'storage local is no ZFS pool storage on node pve1; choose one'),
    ('fast-zfs', 'pve1', 'storage fast-zfs is no ZFS pool storage on node pve1'),
    ('gone', 'pve1', 'storage gone is no ZFS pool storage'),
])
def test_plan_restore_needs_a_zfs_storage_on_the_node(storage, node, message):
    with pytest.raises(UsageError, match=message):
        plan_restore(kept(106), VM, point(VM), 9106, STORAGES, node, storage=storage)


def test_a_container_needs_a_storage_for_container_volumes():
    with pytest.raises(UsageError, match=r'storage fast-zfs holds no rootdir \(content=images\)'):
        plan_restore(kept(200), CT, point(CT), 9200, STORAGES, 'pve2', storage='fast-zfs')


def test_restore_states():
    volumes, _ = plan_restore(kept(106), VM, point(VM), 9106, STORAGES, 'pve2')
    mark = {'restored-from': restore_mark(volumes[0], S2.name)}
    assert mark == {'restored-from': 'tank/enc/acme-wp/local-zfs--vm-106-disk-0@' + S2.name}
    existing = {
        'rpool/data/vm-9106-disk-0': Dataset('rpool/data/vm-9106-disk-0', 'volume',
                                             snapshots=(S2,), recorded=mark),
        'rpool/data/vm-9106-disk-2': Dataset('rpool/data/vm-9106-disk-2', 'volume',
                                             resume_token='1-abc'),
    }
    assert restore_states(volumes, S2.name, existing) == {
        'rpool/data/vm-9106-disk-0': 'done', 'rpool/data/vm-9106-disk-2': 'resume',
        'rpool/data/vm-9106-disk-3': 'full'}
    # Another point; the same snapshot without this restore's mark (a live disk
    # whose source keeps the tool's snapshots); this restore's, but changed since.
    for other in (Dataset('rpool/data/vm-9106-disk-0', 'volume', snapshots=(S1,), recorded=mark),
                  Dataset('rpool/data/vm-9106-disk-0', 'volume', snapshots=(S2,)),
                  Dataset('rpool/data/vm-9106-disk-0', 'volume', snapshots=(S2,), recorded=mark,
                          written=4096)):
        assert restore_states(volumes[:1], S2.name, {other.name: other}) == {
            'rpool/data/vm-9106-disk-0': 'exists'}


# ==============================================================================
# The config of the restored guest
# ==============================================================================

def test_restored_config_of_a_vm():
    volumes, dropped = plan_restore(kept(106), VM, point(VM), 9106, STORAGES, 'pve2')
    config, notes = restored_config(kept(106), volumes, dropped)
    assert config == {
        'name': 'acme-wp', 'tags': 'prod;web', 'agent': '1', 'bios': 'ovmf', 'machine': 'q35',
        'boot': 'order=scsi0;ide2', 'scsi0': 'local-zfs:vm-9106-disk-0,iothread=1,size=8M',
        'efidisk0': 'local-zfs:vm-9106-disk-2,efitype=4m,size=1M',
        'tpmstate0': 'local-zfs:vm-9106-disk-3,size=4M,version=v2.0',
        'ide2': 'none,media=cdrom', 'ide0': 'local-zfs:cloudinit,media=cdrom',
        'scsihw': 'virtio-scsi-pci', 'cores': '2', 'memory': '2048', 'ostype': 'l26',
        'net0': 'virtio,bridge=vmbr0'}
    assert notes == ['virtio1: local-zfs:vm-106-disk-1, left out (not backed up: backup=0)',
                     'unused0: local-zfs:vm-106-disk-4, left out (not backed up: unused)']


def test_restored_config_keeps_macs_when_asked_and_renews_the_generation_id():
    config = dict(CONFIGS[107], vmgenid='c2f4e0a1-0d2a-4a6f-9a5e-5d1f0c7c8e11',
                  net1='virtio=BC:24:11:3A:10:08,bridge=vmbr1,macaddr=BC:24:11:3A:10:08',
                  lock='backup', meta='creation-qemu=9.0.2,ctime=1700000000',
                  ide1='local:iso/debian-12.iso,media=cdrom')
    vm = {'type': 'qemu', 'vmid': 107, 'node': 'pve2', 'config': config}
    assert restored_config(vm, [], {}, keep_macs=True)[0]['net0'] == \
        'e1000=BC:24:11:3A:10:07,bridge=vmbr0'
    new, notes = restored_config(vm, [], {})
    assert (new['net0'], new['net1']) == ('e1000,bridge=vmbr0', 'virtio,bridge=vmbr1')
    assert 'vmgenid' not in new         # only root@pam may set it; PVE makes a new one
    assert 'lock' not in new and 'meta' not in new
    assert 'bootdisk' not in new        # virtio0 did not come back
    assert new['ide1'] == 'none,media=cdrom'
    assert 'ide1: local:iso/debian-12.iso not inserted' in notes


def test_restored_config_of_a_container():
    volumes, dropped = plan_restore(kept(200, 'pve2'), CT, point(CT), 9200, STORAGES, 'pve1')
    config, notes = restored_config(kept(200, 'pve2'), volumes, dropped)
    assert config == {
        'hostname': 'ct-web', 'arch': 'amd64', 'ostype': 'debian',
        'rootfs': 'local-zfs:subvol-9200-disk-0,size=64M',
        'mp0': 'local-zfs:subvol-9200-disk-1,mp=/data,backup=1,size=32M',
        'cores': '1', 'memory': '512', 'swap': '512', 'unprivileged': '1',
        'net0': 'name=eth0,bridge=vmbr0,ip=dhcp,type=veth'}
    assert notes == [
        'mp1: /srv/host, left out (only root@pam may create a bind mount; add it by hand)',
        'mp2: local-zfs:subvol-200-disk-2, left out (not backed up: no backup=1)']


def test_a_privileged_container_stays_privileged_and_root_only_keys_are_left_out():
    config = {'hostname': 'old', 'rootfs': 'local-zfs:subvol-200-disk-0,size=8M',
              'lxc': [['lxc.cgroup2.devices.allow', 'c 10:200 rwm']], 'dev0': '/dev/net/tun',
              'template': 1}
    new, notes = restored_config({'type': 'lxc', 'vmid': 200, 'node': 'pve2', 'config': config},
                                 [], {})
    assert new == {'hostname': 'old', 'unprivileged': '0'}
    assert notes == ['rootfs: local-zfs:subvol-200-disk-0, left out (not backed up)',
                     'lxc: left out, only root@pam may set it',
                     'dev0: left out, only root@pam may set it',
                     'restored as a guest, not as a template']


def test_only_config_keys_others_than_root_may_set_come_back():
    """As qemu-server's check_vm_modify_config_perm judges a create call by a
    user other than root@pam; and never a create parameter or a masked value."""
    config = {'name': 'vm', 'args': '-cpu host', 'hookscript': 'local:snippets/x.pl',
              'affinity': '0-3', 'hugepages': '2', 'vmgenid': 'c2f4e0a1', 'cores': '2',
              'serial0': 'socket', 'serial1': '/dev/ttyS0', 'usb0': 'host=spice',
              'usb1': 'host=1234:5678', 'hostpci0': 'mapping=gpu', 'hostpci1': '0000:01:00.0',
              'cipassword': '**********', 'ciuser': 'admin', 'ipconfig0': 'ip=dhcp',
              'archive': 'local:backup/x.vma.zst', 'start': '1', 'pool': 'prod',
              'startup': 'order=1', 'tags': 'a;b', 'Bad.Key': 'x'}
    vm = {'type': 'qemu', 'vmid': 107, 'node': 'pve2', 'config': config}
    new, notes = restored_config(vm, [], {})
    assert new == {'name': 'vm', 'cores': '2', 'serial0': 'socket', 'usb0': 'host=spice',
                   'hostpci0': 'mapping=gpu', 'ciuser': 'admin', 'ipconfig0': 'ip=dhcp',
                   'startup': 'order=1', 'tags': 'a;b'}
    assert notes == [
        'args: left out, only root@pam may set it',
        'hookscript: left out, only root@pam may set it',
        'affinity: left out, only root@pam may set it',
        'hugepages: left out, only root@pam may set it',
        'serial1: left out, only root@pam may set it',
        'usb1: left out, only root@pam may set it',
        'hostpci1: left out, only root@pam may set it',
        'cipassword: left out, PVE shows it masked; set it anew',
        'archive: left out, not a config key', 'start: left out, not a config key',
        'pool: left out, not a config key', 'Bad.Key: left out, not a config key']
    needs = restore_privileges('qemu', 9107, new, (), None, start=False)
    assert needs['/'] == {'Sys.Modify'} and needs['/mapping/pci/gpu'] == {'Mapping.Use'}


def test_container_features_other_than_nesting_are_root_s():
    ct = {'hostname': 'c', 'unprivileged': 1, 'features': 'nesting=1', 'hookscript': 'x'}
    new, notes = restored_config({'type': 'lxc', 'vmid': 1, 'node': 'n', 'config': ct}, [], {})
    assert new == {'hostname': 'c', 'unprivileged': '1', 'features': 'nesting=1'}
    assert notes == ['hookscript: left out, only root@pam may set it']
    for config in (dict(ct, features='nesting=1,keyctl=1'), dict(ct, unprivileged=0)):
        new, _ = restored_config({'type': 'lxc', 'vmid': 1, 'node': 'n', 'config': config},
                                 [], {})
        assert 'features' not in new


def test_subvolume_props_as_pve_makes_them():
    assert subvolume_props('mp=/data,backup=1,size=32M') == {
        'acltype': 'posixacl', 'xattr': 'sa', 'refquota': '32M'}
    assert subvolume_props('') == {'acltype': 'posixacl', 'xattr': 'sa'}


def test_restore_privileges():
    config = {'net0': 'virtio,bridge=vmbr0', 'unprivileged': '0'}
    needs = restore_privileges('lxc', 9200, config, {'local-zfs'}, 'local', start=True)
    assert needs['/vms/9200'] >= {'VM.Allocate', 'VM.Config.Disk', 'VM.PowerMgmt'}
    assert {path: privs for path, privs in needs.items() if path != '/vms/9200'} == {
        '/storage/local-zfs': {'Datastore.AllocateSpace'},
        '/storage/local': {'Datastore.AllocateTemplate'},
        '/': {'Sys.Modify'}, '/sdn/zones/localnetwork/vmbr0': {'SDN.Use'}}
    assert 'VM.PowerMgmt' not in restore_privileges('qemu', 9, {}, (), None, False)['/vms/9']


def test_the_empty_template_is_an_empty_tar_archive():
    with tarfile.open(fileobj=io.BytesIO(empty_template_tarball()), mode='r:gz') as tar:
        assert tar.getmembers() == []


# ==============================================================================
# Which partition a file-level restore mounts
# ==============================================================================

DISK = '/dev/zvol/tank/enc/_restore/x'


def test_the_one_partition_with_a_file_system_is_mounted():
    parts = [(DISK + '-part1', 'vfat'), (DISK + '-part2', 'ext4'), (DISK + '-part3', 'swap')]
    with pytest.raises(UsageError, match=r'has 2 partitions with a file system to mount '
                                         r'\(1 vfat, 2 ext4, 3 swap\); choose one with '
                                         r'--partition N'):
        choose_partition(parts, None, 'vm-1-disk-0')
    assert choose_partition(parts, 2, 'vm-1-disk-0') == (DISK + '-part2', 'ext4')
    assert choose_partition(parts[1:], None, 'x') == (DISK + '-part2', 'ext4')
    assert choose_partition([(DISK, 'xfs')], None, 'x') == (DISK, 'xfs')


@pytest.mark.parametrize('number, message', [
    (7, r'x has no partition 7 \(it has: 1 LVM2_member\)'),
    (1, r'partition 1 of x holds LVM2_member, which cannot be mounted here; activate LVM by '
        r'hand \(vgchange -ay\)'),
])
def test_partitions_that_cannot_be_mounted(number, message):
    with pytest.raises(UsageError, match=message):
        choose_partition([(DISK + '-part1', 'LVM2_member')], number, 'x')


def test_the_restore_user_of_the_lab_has_exactly_the_readme_s_role():
    """The lab restores as restore@pve: its privileges are the role README.rst
    gives, neither more nor less, so the restore tests meet what that role
    meets on a real cluster."""
    readme = (Path(__file__).parent.parent / 'README.rst').read_text()
    role = re.search(r'pveum role add PlanbRestore -privs "([^"]*)"', readme).group(1)
    user = next(u for u in FIXTURE['users'] if u['userid'] == 'restore@pve')
    assert set(user['privileges']) == set(role.replace('\\', ' ').split())
