"""Restore on the lab: a VM and a container backed up twice, then brought back
from their first restore point as new guests on the other node; clashes,
an interrupted restore, and files read back from a mounted restore point.

The module has guests of its own (310, a VM on pve1 whose disk holds an ext4
partition, and 320, a container on pve2), its own root and snapshot prefix;
it removes what it made at the end.
"""
import json
import re
import shlex
import time

import pytest

from lab.cluster import DOUBLE_DIR, FIXTURE, set_fixture, tool

pytestmark = pytest.mark.lab

ROOT = 'tank/enc/restore'
PREFIX = 'rp'
RESTORE_RC = '~/.proxmoxrc-restore'
VM_DISKS = {'vm-310-disk-0': 16, 'vm-310-disk-1': 1, 'vm-310-disk-3': 6}   # MiB
VM = {'vmid': 310, 'type': 'qemu', 'node': 'pve1', 'status': 'running', 'config': {
    'name': 'restore-vm', 'boot': 'order=scsi0;net0', 'bios': 'ovmf', 'cores': 1,
    'memory': '512', 'ostype': 'l26', 'scsihw': 'virtio-scsi-single',
    'vmgenid': '2b5c8f0e-9d7a-4a51-8f7e-0c6f3d2a9b11', 'args': '-no-hpet',
    'ciuser': 'admin', 'cipassword': '**********',     # as PVE answers it, masked
    'scsi0': 'local-zfs:vm-310-disk-0,iothread=1,size=16M',
    'efidisk0': 'local-zfs:vm-310-disk-1,efitype=4m,size=1M',
    'scsi1': 'local-zfs:vm-310-disk-3,size=6M',
    'virtio1': 'local-zfs:vm-310-disk-2,backup=0,size=1M',
    'net0': 'virtio=BC:24:11:00:03:10,bridge=vmbr0'}}
CT = {'vmid': 320, 'type': 'lxc', 'node': 'pve2', 'status': 'running', 'config': {
    'hostname': 'restore-ct', 'arch': 'amd64', 'ostype': 'debian', 'cores': 1,
    'memory': 256, 'swap': 0, 'unprivileged': 1,
    'rootfs': 'local-zfs:subvol-320-disk-0,size=64M',
    'mp0': 'local-zfs:subvol-320-disk-1,mp=/data,backup=1,size=32M',
    'net0': 'name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:03:20,ip=dhcp,type=veth'}}
SUID_ID = '/rpool/data/subvol-320-disk-0/suid-id'
# One MBR partition, type Linux, from sector 2048 to the end of a 16 MiB disk.
MBR = ("import struct,sys; f=open(sys.argv[1],'r+b'); f.seek(446); "
       "f.write(struct.pack('<B3sB3sII',0,bytes(3),0x83,bytes(3),2048,32768-2048)); "
       "f.seek(510); f.write(bytes([0x55,0xaa]))")


def fixture():
    data = json.loads(FIXTURE.read_text())
    data['guests'] += [VM, CT]
    return data


def sh(host, script, **kw):
    return host.run('set -e; ' + script, **kw).stdout


def partition(disk):
    return '/dev/zvol/rpool/data/{}-part1'.format(disk)


def write_vm_file(lab, text):
    """Write /hello in the ext4 partition of VM 310's first disk."""
    sh(lab.pve1, 'mkdir -p /mnt/vm310 && mount {} /mnt/vm310 && echo {} >> /mnt/vm310/hello '
                 '&& umount /mnt/vm310'.format(partition('vm-310-disk-0'), shlex.quote(text)))


def tree_hash(host, path):
    """One hash of a directory tree: names, types, modes, owners, sizes, contents."""
    return sh(host, 'cd {} && (find . -printf "%p %y %m %U:%G %s %l\\n" | LC_ALL=C sort; '
                    'find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum) '
                    '| sha256sum'.format(shlex.quote(path))).split()[0]


def fingerprints(lab):
    """What the sources hold now: sha256 of the VM's disks, tree hashes of the CT's."""
    prints = {disk: lab.pve1.sha256('/dev/zvol/rpool/data/' + disk) for disk in VM_DISKS}
    for disk in ('subvol-320-disk-0', 'subvol-320-disk-1'):
        prints[disk] = tree_hash(lab.pve2, '/rpool/data/' + disk)
    return prints


def sync(lab):
    return tool(lab, 'sync-pve-guest', '-g', '310', '-g', '320', '--sync-zfs-root', ROOT,
                '--snapshot-prefix', PREFIX, check=0)


def restore(lab, *args, check=None):
    return tool(lab, '-f', RESTORE_RC, 'restore-pve-guest', '--sync-zfs-root', ROOT, *args,
                check=check)


def guid_lists(lab):
    return {host: lab[host].zfs('list -H -p -o name,guid -t snapshot,bookmark -r ' + dataset)
            for host, dataset in (('backup', ROOT), ('pve1', 'rpool/data'),
                                  ('pve2', 'rpool/data'))}


def double_guest(lab, vmid):
    data = json.loads(lab.pve1.run('cat {}/cluster.json'.format(DOUBLE_DIR)).stdout)
    return next((g for g in data['guests'] if g['vmid'] == vmid), None)


@pytest.fixture(scope='module')
def restored(demo):
    """Two backups of 310 and 320 with a change between them; yields the
    lab, the first restore point and the sources' fingerprints at it."""
    lab = demo
    lab.backup.zfs('create -o mountpoint=none ' + ROOT)
    for disk, mib in VM_DISKS.items():
        lab.pve1.zfs('create -V {}M rpool/data/{}'.format(mib, disk))
    lab.pve1.write_random('rpool/data/vm-310-disk-1', 1)
    lab.pve1.write_random('rpool/data/vm-310-disk-3', 6)
    sh(lab.pve1, 'udevadm settle; python3 -c {} /dev/zvol/rpool/data/vm-310-disk-0; '
                 'blockdev --rereadpt /dev/zvol/rpool/data/vm-310-disk-0; udevadm settle; '
                 'mkfs.ext4 -q {}'.format(shlex.quote(MBR), partition('vm-310-disk-0')))
    write_vm_file(lab, 'first')
    for disk in ('subvol-320-disk-0', 'subvol-320-disk-1'):
        sh(lab.pve2, 'zfs create rpool/data/{0} && mkdir -p /rpool/data/{0}/etc && echo first '
                     '> /rpool/data/{0}/etc/hello && chown -R 100000:100000 /rpool/data/{0}'
                     .format(disk))
    # What a guest (or a node that forges its stream) may hold: a setuid-root program.
    sh(lab.pve2, 'cp /usr/bin/id {0} && chown root:root {0} && chmod 4755 {0}'.format(SUID_ID))
    set_fixture(lab, fixture())
    rc = lab.backup.run('cat ~/.proxmoxrc', user='planb').stdout.replace(
        'planb@pve:planbpass', 'restore@pve:restorepass')
    lab.backup.run('umask 077 && cat > ' + RESTORE_RC, user='planb', input=rc)
    first = fingerprints(lab)
    sync(lab)
    write_vm_file(lab, 'second')
    sh(lab.pve2, 'echo second >> /rpool/data/subvol-320-disk-0/etc/hello')
    time.sleep(1)
    sync(lab)
    points = json.loads(tool(lab, 'list-restore-points', '-g', '310', '--sync-zfs-root', ROOT,
                             '--json', check=0).stdout)
    yield lab, points[0]['name'], first
    set_fixture(lab, json.loads(FIXTURE.read_text()))
    for node in ('pve1', 'pve2'):
        lab[node].run('for d in $(zfs list -H -o name -r rpool/data | grep -E '
                      '"/(vm|subvol)-(9?3[0-9]{2})-"); do zfs destroy -r "$d"; done',
                      check=False)
    lab.backup.run('zfs destroy -r ' + ROOT, check=False)


def test_restore_points_list_the_kept_config_and_the_volumes(restored):
    lab, first, _ = restored
    done = tool(lab, 'list-restore-points', '-g', 'restore-vm', '--sync-zfs-root', ROOT, check=0)
    lines = done.stdout.splitlines()
    assert lines[0] == 'restore-vm (vmid 310): 3 volume(s), 2 restore point(s)'
    assert lines[1].split() == ['RESTORE', 'POINT', 'CREATED', '(UTC)', 'CONFIG', 'VOLUMES']
    assert lines[2].split()[0] == first
    assert [line.split()[3:] for line in lines[2:]] == [['yes', 'scsi0', 'efidisk0', 'scsi1']] * 2
    kept = json.loads(lab.backup.zfs('get -H -o value planb-pvesync:config {}/restore-vm/'
                                     'local-zfs--vm-310-disk-0@{}'.format(ROOT, first)))
    assert kept == {'cluster': 'demo', 'vmid': 310, 'type': 'qemu', 'node': 'pve1',
                    'config': VM['config']}


def test_a_vm_and_a_container_come_back_as_new_guests_on_the_other_node(restored):
    lab, first, prints = restored
    before = guid_lists(lab)
    vm = restore(lab, '-g', '310', '--at', first, '--node', 'pve2', '--vmid', '9310', check=0)
    ct = restore(lab, '-g', 'restore-ct', '--at', first, '--node', 'pve1', '--vmid', '9320',
                 '--start', check=0)
    assert 'virtio1: local-zfs:vm-310-disk-2, left out (not backed up: backup=0)' in vm.stdout
    # The restore user has exactly the README's role: what PVE lets only root@pam
    # set, and a value PVE showed masked, stay out (the double refuses the first).
    assert 'args: left out, only root@pam may set it' in vm.stdout
    assert 'cipassword: left out, PVE shows it masked; set it anew' in vm.stdout
    assert re.search(r'^restore-pve-guest: restore-vm \(310\) @{} -> pve2 as qemu 9310: 3 '
                     r'volume\(s\), \S+ \S+ in \S+ s$'.format(first), vm.stdout, re.M)
    assert 'created lxc 9320 (restore-ct) on pve1, started' in ct.stdout
    for disk in VM_DISKS:
        assert lab.pve2.sha256('/dev/zvol/rpool/data/' + disk.replace('310', '9310')) == \
            prints[disk]
    for disk in ('subvol-320-disk-0', 'subvol-320-disk-1'):
        new = '/rpool/data/' + disk.replace('320', '9320')
        assert tree_hash(lab.pve1, new) == prints[disk]
        assert lab.pve1.zfs('get -H -o value refquota,acltype,mounted rpool/data/' +
                            disk.replace('320', '9320')).split() == [
            '64M' if disk.endswith('0') else '32M', 'posix', 'yes']
    config = dict(VM['config'], scsi0='local-zfs:vm-9310-disk-0,iothread=1,size=16M',
                  efidisk0='local-zfs:vm-9310-disk-1,efitype=4m,size=1M',
                  scsi1='local-zfs:vm-9310-disk-3,size=6M', net0='virtio,bridge=vmbr0')
    for key in ('virtio1', 'vmgenid', 'args', 'cipassword'):    # PVE makes a new vmgenid
        del config[key]
    assert double_guest(lab, 9310) == {'vmid': 9310, 'type': 'qemu', 'node': 'pve2',
                                       'status': 'stopped', 'config': config}
    container = double_guest(lab, 9320)
    assert container['status'] == 'running' and container['node'] == 'pve1'
    assert container['config'] == dict(
        CT['config'], rootfs='local-zfs:subvol-9320-disk-0,size=64M',
        mp0='local-zfs:subvol-9320-disk-1,mp=/data,backup=1,size=32M',
        net0='name=eth0,bridge=vmbr0,ip=dhcp,type=veth')
    after = guid_lists(lab)
    assert after['backup'] == before['backup']
    for node in ('pve1', 'pve2'):     # the sources as they were, the restored ones added
        assert set(before[node].splitlines()) <= set(after[node].splitlines())
    assert lab.pve1.run('mount {} /mnt/vm310 -o ro && cat /mnt/vm310/hello; umount /mnt/vm310'
                        .format(partition('vm-310-disk-0'))).stdout == 'first\nsecond\n'


def test_a_taken_vmid_or_dataset_stops_the_restore_before_anything_is_sent(restored):
    lab, first, _ = restored
    taken = restore(lab, '-g', '310', '--node', 'pve2', '--vmid', '320', check=2)
    assert taken.stderr == ('planb-pvesync: error: vmid 320 is taken (restore-ct on pve2); '
                            'choose a free one with --vmid, or leave it out to take the next '
                            'free one\n')
    lab.pve2.zfs('create -V 1M rpool/data/vm-9311-disk-1')
    clash = restore(lab, '-g', '310', '--node', 'pve2', '--vmid', '9311', check=2)
    assert clash.stderr == ('planb-pvesync: error: planb@10.99.2.1 already has '
                            'rpool/data/vm-9311-disk-1; nothing was sent: restore as another '
                            '--vmid, to another --storage, or remove it\n')
    assert lab.pve2.zfs('list -H -o name -r rpool/data').count('9311') == 1
    assert double_guest(lab, 9311) is None
    readonly = tool(lab, 'restore-pve-guest', '-g', '310', '--node', 'pve2', '--vmid', '9312',
                    '--sync-zfs-root', ROOT, check=3)
    assert 'planb@pve may not create the guest: it lacks ' in readonly.stderr
    assert 'VM.Allocate on /vms/9312' in readonly.stderr
    assert '9312' not in lab.pve2.zfs('list -H -o name -r rpool/data')


def test_an_interrupted_restore_resumes(restored):
    lab, first, prints = restored
    args = ['-f', RESTORE_RC, 'restore-pve-guest', '--sync-zfs-root', ROOT, '-g', '310',
            '--at', first, '--node', 'pve2', '--vmid', '9313', '--compress', 'none',
            '--bwlimit', '384K']    # zstd -T0 would hold back megabytes: none, to cut mid-stream
    lab.backup.run('nohup planb-pvesync {} >/tmp/restore.log 2>&1 </dev/null &'.format(
        shlex.join(args)), user='planb')
    until(lambda: lab.pve2.run('pgrep -f "zfs recv .*vm-9313-disk-3"',
                               check=False).returncode == 0)
    time.sleep(7)      # past a txg sync (5 s): a receive cut off before keeps nothing
    lab.backup.run('pkill -u planb -x ssh')
    until(lambda: lab.backup.run('pgrep -f restore-pve-guest', check=False).returncode != 0)
    assert 'run the same command again to resume' in lab.backup.run('cat /tmp/restore.log').stdout
    assert double_guest(lab, 9313) is None
    token = lab.pve2.zfs('get -H -o value receive_resume_token rpool/data/vm-9313-disk-3')
    assert token not in ('', '-')
    done = restore(lab, *args[3:-4], check=0)
    assert 'rpool/data/vm-9313-disk-0: restored already' in done.stdout
    assert 'rpool/data/vm-9313-disk-3: resumed a partial receive' in done.stdout
    assert lab.pve2.sha256('/dev/zvol/rpool/data/vm-9313-disk-3') == prints['vm-310-disk-3']
    assert double_guest(lab, 9313)['config']['scsi1'] == 'local-zfs:vm-9313-disk-3,size=6M'


def test_a_disk_back_beside_its_live_guest_takes_the_next_free_number(restored):
    """--disks-only into the vmid of a guest that still exists: its live disk
    has the restore point's snapshot too (the source keeps the tool's
    snapshots), and is no restored disk for that."""
    lab, first, prints = restored
    live = {disk: lab.pve1.sha256('/dev/zvol/rpool/data/' + disk) for disk in VM_DISKS}
    for _ in range(2):      # the second time, it finds what the first restored
        done = restore(lab, '-g', '310', '--at', first, '--disks-only', '--volume', 'scsi1',
                       check=0)
        assert 'restored the disks as local-zfs:vm-310-disk-4; attach them with qm set' in \
            done.stdout
    assert 'rpool/data/vm-310-disk-4: restored already' in done.stdout
    assert lab.pve1.sha256('/dev/zvol/rpool/data/vm-310-disk-4') == prints['vm-310-disk-3']
    assert {disk: lab.pve1.sha256('/dev/zvol/rpool/data/' + disk) for disk in VM_DISKS} == live
    assert lab.pve1.zfs('get -H -o value planb-pvesync:restored-from rpool/data/vm-310-disk-4') \
        == '{}/restore-vm/local-zfs--vm-310-disk-3@{}'.format(ROOT, first)
    assert double_guest(lab, 310) == VM


def until(check, timeout=120):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.5)


def test_files_come_back_from_a_mounted_restore_point(restored):
    lab, first, _ = restored
    mount = ['-f', '/home/planb/.proxmoxrc', 'mount-restore-point', '--sync-zfs-root', ROOT,
             '--at', first]
    vm = lab.backup.run('planb-pvesync {} -g 310 /mnt/r310'.format(shlex.join(mount)))
    assert 'mounted partition 1 ext4 of {}/restore-vm/local-zfs--vm-310-disk-0 @{} read-only ' \
           'at /mnt/r310/scsi0 (in /mnt/r310, which only you may enter)'.format(
               ROOT, first) in vm.stdout
    assert lab.backup.run('cat /mnt/r310/scsi0/hello').stdout == 'first\n'
    ct = tool(lab, *mount, '-g', '320', '--volume', 'rootfs', '/tmp/r320', check=0)
    assert 'mounted its file system' in ct.stdout
    assert lab.backup.run('cat /tmp/r320/rootfs/etc/hello').stdout == 'first\n'
    assert lab.backup.run('touch /tmp/r320/rootfs/x', check=False).returncode != 0  # read-only
    # The guest's setuid-root program runs as root for no one: not for the one
    # who mounted it (noexec, nosuid), and no one else gets to it (0700).
    suid = '/tmp/r320/rootfs/suid-id'
    for where in ('/mnt/r310/scsi0', '/tmp/r320/rootfs'):
        assert {'ro', 'nosuid', 'nodev', 'noexec'} <= set(lab.backup.run(
            'findmnt -n -o OPTIONS ' + where).stdout.strip().split(','))
    assert lab.backup.run('stat -c %a:%U /tmp/r320').stdout == '700:planb\n'
    mine = lab.backup.run(suid + ' -u', user='planb', check=False)
    others = lab.backup.run('setpriv --reuid nobody --regid nogroup --clear-groups {} -u'
                            .format(suid), check=False)
    for done in (mine, others):
        assert done.returncode != 0 and 'Permission denied' in done.stderr, done
    sync(lab)      # a mounted restore point does not stop the next backup
    tool(lab, 'unmount-restore-point', '--sync-zfs-root', ROOT, '/tmp/r320', check=0)
    lab.backup.run('planb-pvesync unmount-restore-point --sync-zfs-root {} /mnt/r310'.format(ROOT))
    assert lab.backup.zfs('list -H -o name -r {}/_restore'.format(ROOT)) == ROOT + '/_restore'
    assert '/mnt/r310' not in lab.backup.run('cat /proc/mounts').stdout
    assert '/tmp/r320' not in lab.backup.run('cat /proc/mounts').stdout
    assert lab.backup.zfs('list -H -o clones -t snapshot -r ' + ROOT).split() == ['-'] * len(
        lab.backup.zfs('list -H -o name -t snapshot -r ' + ROOT).split())
    sync(lab)
