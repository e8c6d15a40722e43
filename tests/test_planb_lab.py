"""planb-transport on the lab, run exactly as PlanB's exec transport runs it.

PlanB's part is played here as PlanB's source does it (planb/storage/zfs.py,
planb/transport_exec, planb/tasks.py): the fileset's dataset made with
canmount=noauto (and its own raw key, PlanB's per-dataset keys), mounted with
data/ in it, the transport_command split with shlex and run without a shell in
data/, with PlanB's environment only; after a successful run, rotation of the
children and the sizes PlanB reads; then unmounted and the key unloaded.

The module adds two guests of its own to the demo cluster (400 planb-vm, two
zvols on pve1; 401 planb-ct, a container filesystem on pve2) and removes them,
their snapshots and its datasets at the end.
"""
import json
import re
import shlex
import signal
import time
from pathlib import Path

import pytest

from lab.cluster import FIXTURE, set_fixture, tool
from lab.lab import RemoteCommandError
from test_planb import planb_reads

pytestmark = pytest.mark.lab

POOL = 'tank/planb'             # PlanB's POOLNAME
MOUNTPOINT = '/planb'
HOSTGROUP = 'demo'
GUID = '5f3e0c1a-9b7d-4e2f-8a6c-0d1e2f3a4b5c'
OTHER_GUID = '0a0a0a0a-0000-4000-8000-000000000000'
KEYS = '/var/lib/planb-keys'    # where PlanB keeps the per-dataset keys
VM_DISKS = ['rpool/data/vm-400-disk-0', 'rpool/data/vm-400-disk-1']
VM_CHILDREN = ['local_x2dzfs-vm_x2d400_x2ddisk_x2d0', 'local_x2dzfs-vm_x2d400_x2ddisk_x2d1']
CT_DISK = 'rpool/data/subvol-401-disk-0'
RUNNER = '/tmp/planb-exec-transport.py'
SUDO_CHOWN = '/etc/sudoers.d/planb-chown'

# PlanB's exec transport (planb/transport_exec/models.py), as a script run on
# backup as planb: the worker's PATH, HOME, PWD, SHELL and USER plus PlanB's
# own variables, the command split by shlex and run without a shell, in
# data/. With stop_after, it sends a signal to the command (to it alone, not
# its children) once the decompressor here has passed that many bytes on to
# pv, whose rate limit holds the rest back: mid-transfer. (pv's own counters
# in /proc/PID/io stay 0: it splices.) The signal: SIGTERM as PlanB's queue
# stops, or SIGKILL as its task timeout kills (the kill in
# common/subprocess2.py). After a SIGKILL it watches the receive the tool
# left until it ends: `overlaps` counts the times the lock of `locked` was
# free while a zfs recv still ran (the lock is tried first, so a free lock
# and a receive seen after it were both so at the same moment).
EXEC_TRANSPORT = r'''
import fcntl, json, os, re, shlex, signal, subprocess, sys, time
spec = json.load(sys.stdin)
env = {key: os.environ[key] for key in ('PATH', 'HOME', 'PWD', 'SHELL', 'USER')
       if key in os.environ}
env.update(spec['env'])
os.chdir(env['planb_storage_destination'])
proc = subprocess.Popen(shlex.split(spec['command']), env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)

def passed_on():
    # The command's children, thread by thread (a few files: a scan of all of
    # /proc takes seconds in a busy emulated VM, longer than a transfer).
    for task in os.listdir('/proc/%d/task' % proc.pid) if proc.poll() is None else ():
        try:
            with open('/proc/%d/task/%s/children' % (proc.pid, task)) as pids:
                for pid in pids.read().split():
                    with open('/proc/%s/comm' % pid) as comm:
                        if comm.read().strip() == 'zstd':
                            with open('/proc/%s/io' % pid) as io:
                                return int(re.search(r'wchar: (\d+)', io.read()).group(1))
        except OSError:
            continue
    return 0

def receiving():
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/cmdline' % pid, 'rb') as cmdline:
                if cmdline.read().split(b'\0')[:2] == [b'zfs', b'recv']:
                    return True
        except OSError:
            continue
    return False

def lock_is_free(path):
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

watched = dict(samples=0, overlaps=0)
if spec.get('stop_after'):
    while proc.poll() is None and passed_on() < spec['stop_after']:
        time.sleep(0.1)
    proc.send_signal(spec.get('signal', signal.SIGTERM))
    while spec.get('locked'):
        free = lock_is_free(spec['locked'])
        if not receiving():
            break
        watched['samples'] += 1
        watched['overlaps'] += free
out, err = proc.communicate()
json.dump(dict(code=proc.returncode, stdout=out.decode(), stderr=err.decode(), **watched),
          sys.stdout)
'''


def planb_name(when):
    """The snapshot name PlanB gives a run at `when` (get_snapshot_name)."""
    return 'planb-' + time.strftime('%Y%m%dT%H%MZ', time.gmtime(when))


def is_rotated_by_planb(name):
    """Whether PlanB's rotation takes a snapshot for one of its runs: named
    PREFIX-YYYYMMDDTHHMMZ with its (default) prefix; any other name is a
    manual snapshot to PlanB, kept for ever."""
    return bool(re.fullmatch(r'planb-\d{8}T\d{4}Z', name))


class Fileset:
    """One PlanB fileset on backup, and what PlanB does with it."""

    def __init__(self, lab, name, vmid, keys):
        self.lab, self.host, self.name = lab, lab.backup, name
        self.dataset = '{}/{}-{}'.format(POOL, HOSTGROUP, name)
        self.mountpoint = '{}/{}-{}'.format(MOUNTPOINT, HOSTGROUP, name)
        self.quoted = shlex.quote(self.dataset)     # a friendly name may hold a space
        self.command = 'planb-pvesync -p {} planb-transport {}'.format(HOSTGROUP, vmid)
        self.keys = keys

    def create(self):
        """As ZfsStorage.zfs_create and ZfsDataset.ensure_exists do."""
        options = '-o canmount=noauto'
        if self.keys:
            key = '{}/{}/_key.bin'.format(KEYS, self.dataset)
            self.host.run('mkdir -p -m 700 {0} && head -c 32 /dev/urandom > {1} && '
                          'chmod 600 {1}'.format(shlex.quote(str(Path(key).parent)), key))
            options += ' -o encryption=on -o keyformat=raw -o keylocation=file://' + key
        self.host.zfs('create {} {}'.format(options, self.quoted))
        self.mount()
        self.host.run('sudo -n chown planb ' + shlex.quote(self.mountpoint), user='planb')
        self.host.run('mkdir -m 700 {}/data'.format(shlex.quote(self.mountpoint)), user='planb')
        self.unmount()

    def mount(self):
        if self.keys:
            self.host.run('zfs load-key {} 2>/dev/null; true'.format(self.quoted))
        self.host.zfs('mount ' + self.quoted)

    def unmount(self):
        self.host.zfs('unmount ' + self.quoted)
        if self.keys:
            self.host.zfs('unload-key ' + self.quoted)

    def transport(self, target, extra='', stop_after=None, **stop):
        """The exec transport, with the fileset mounted, as PlanB runs it;
        `stop`: signal= and locked= (see EXEC_TRANSPORT)."""
        spec = dict(command=self.command + extra, stop_after=stop_after, **stop, env=dict(
            planb_guid=GUID, planb_fileset_id='7', planb_fileset_friendly_name=self.name,
            planb_snapshot_target=target, planb_storage_name=self.dataset,
            planb_storage_destination=self.mountpoint + '/data'))
        done = self.host.run('python3 ' + RUNNER, user='planb', input=json.dumps(spec))
        return json.loads(done.stdout)

    def children(self):
        return self.host.zfs('list -H -o name -r -t filesystem,volume ' +
                             self.quoted).splitlines()[1:]

    def snapshots(self, dataset):
        return [line.split('@')[1] for line in self.host.zfs(
            'list -H -o name -s createtxg -t snapshot -d 1 ' + shlex.quote(dataset)
        ).splitlines()]

    def keep(self, prefix):
        """PlanB's "Enqueue + keep" after a good run (tasks.py): a snapshot
        PREFIX-YYYYMMDDTHHMMZ of the fileset's own dataset, made after the
        transport; returns its name."""
        name = prefix + planb_name(time.time())[len('planb'):]
        self.host.zfs('snapshot {}@{}'.format(self.quoted, name))
        return name

    def rotate(self):
        """PlanB's rotation of the children (planb:contains=filesystems), at
        its most thorough: of the snapshots it takes for its own runs only
        the newest stays (its schedules keep more). Returns what went."""
        destroyed = []
        for child in self.children():
            own = [s for s in self.snapshots(child) if is_rotated_by_planb(s)]
            for name in sorted(own, key=lambda s: s.rpartition('-')[2])[:-1]:
                self.host.zfs('destroy ' + shlex.quote('{}@{}'.format(child, name)))
                destroyed.append('{}@{}'.format(child, name))
        return destroyed

    def sizes(self, target):
        """What PlanB records after a run: the dataset's used, and each child's
        referenced at the run's snapshot (0 where that fails), by the name
        PlanB shows for it."""
        used = int(self.host.zfs('get -H -p -o value used ' + self.quoted))
        listing = {}
        for child in self.children():
            done = self.host.run('zfs get -H -p -o value referenced ' + shlex.quote(
                '{}@{}'.format(child, target)), check=False)
            listing[planb_reads(child.rpartition('/')[2])] = (
                int(done.stdout) if done.returncode == 0 else 0)
        return used, listing


def fixture_with_own_guests():
    data = json.loads(FIXTURE.read_text())
    data['guests'] += [
        {'vmid': 400, 'type': 'qemu', 'node': 'pve1', 'status': 'running', 'config': {
            'name': 'planb-vm', 'bios': 'ovmf', 'scsi0': 'local-zfs:vm-400-disk-0,size=4M',
            'efidisk0': 'local-zfs:vm-400-disk-1,efitype=4m,size=1M'}},
        {'vmid': 401, 'type': 'lxc', 'node': 'pve2', 'status': 'running', 'config': {
            'hostname': 'planb-ct', 'rootfs': 'local-zfs:subvol-401-disk-0,size=8M'}}]
    return data


@pytest.fixture(scope='module')
def planb(demo):
    for disk, mib in zip(VM_DISKS, (4, 1)):
        demo.pve1.zfs('create -V {}M -o volmode=dev {}'.format(mib, disk))
        demo.pve1.write_random(disk, mib)
    demo.pve2.zfs('create ' + CT_DISK)
    demo.pve2.run('head -c 300000 /dev/urandom > /{}/data.bin'.format(CT_DISK))
    set_fixture(demo, fixture_with_own_guests())
    demo.backup.zfs('create -o mountpoint={} {}'.format(MOUNTPOINT, POOL))
    demo.backup.run('cat > ' + RUNNER, input=EXEC_TRANSPORT)
    # PlanB's install (its README): its user may run zfs and chown with sudo.
    demo.backup.run('echo "planb ALL=(root) NOPASSWD: /bin/chown" > {0} && chmod 440 {0}'
                    .format(SUDO_CHOWN))
    yield demo
    demo.backup.run('rm -f ' + SUDO_CHOWN)
    set_fixture(demo, json.loads(FIXTURE.read_text()))
    demo.pve1.run('zfs destroy -r {}; zfs destroy -r {}'.format(*VM_DISKS), check=False)
    demo.pve2.run('zfs destroy -r ' + CT_DISK, check=False)
    demo.backup.run('zfs destroy -r {}; rm -rf {} {}'.format(POOL, KEYS, RUNNER), check=False)


@pytest.fixture(scope='module')
def vm(planb):
    fileset = Fileset(planb, 'planb-vm', 400, keys=True)
    fileset.create()
    return fileset


def assert_ends(host, pattern):
    """No process on `host` matches `pattern`, now or soon: the remote end
    of a cut ssh session ends when it next writes."""
    deadline = time.monotonic() + 60    # a guard against a hang, no timing
    while True:
        left = host.run('pgrep -a -f ' + shlex.quote(pattern), check=False).stdout
        if not left:
            return
        assert time.monotonic() < deadline, '{} still runs:\n{}'.format(host.name, left)
        time.sleep(0.5)


def mounted_in(fileset):
    """What is mounted at the fileset's mountpoint or below it."""
    raw = fileset.host.run('findmnt -rn -o TARGET').stdout.split()
    mounts = [line.replace(r'\x20', ' ') for line in raw]     # how -r writes a space
    return [m for m in mounts if (m + '/').startswith(fileset.mountpoint + '/')]


def synced(lab, fileset):
    return [lab.pve1.sha256('/dev/zvol/' + disk) for disk in VM_DISKS] == [
        lab.backup.sha256('/dev/zvol/{}/{}'.format(fileset.dataset, child))
        for child in VM_CHILDREN]


def test_two_runs_as_planb_runs_them(vm):
    lab, now = vm.lab, time.time()
    first, second = planb_name(now - 3 * 3600), planb_name(now - 2 * 3600)

    vm.mount()
    done = vm.transport(first)
    assert done['code'] == 0, done
    assert vm.children() == ['{}/{}'.format(vm.dataset, c) for c in VM_CHILDREN]
    assert done['stdout'].count(': full @' + first) == 2
    assert 'planb-transport: 2 volume(s): 2 synced, 0 up to date, 0 failed' in done['stdout']
    assert synced(lab, vm)
    assert vm.host.zfs('get -H -o value planb:contains ' + vm.dataset) == 'filesystems'
    # The children take the fileset's key; nothing of them is mounted, data/ is
    # left alone; the source snapshot is PlanB's name, marked as this PlanB's.
    assert {vm.host.zfs('get -H -o value encryptionroot ' + c)
            for c in vm.children()} == {vm.dataset}
    assert mounted_in(vm) == [vm.mountpoint]
    assert vm.host.run('ls -A {}/data'.format(vm.mountpoint)).stdout == ''
    assert lab.pve1.zfs('get -H -o value planb:owner {}@{}'.format(VM_DISKS[0], first)) == GUID
    assert vm.rotate() == []
    used, listing = vm.sizes(first)
    assert set(listing) == {'local-zfs/vm-400-disk-0', 'local-zfs/vm-400-disk-1'}
    assert listing['local-zfs/vm-400-disk-0'] >= 4 << 20 and listing['local-zfs/vm-400-disk-1'] > 0
    assert used >= sum(listing.values())
    vm.unmount()

    lab.pve1.write_random(VM_DISKS[0], 1, offset_mib=1)
    vm.mount()
    done = vm.transport(second)
    assert done['code'] == 0, done
    assert 'incremental @{}..@{}'.format(first, second) in done['stdout']
    assert 'full' not in done['stdout']
    assert synced(lab, vm)
    assert vm.rotate() == ['{}/{}@{}'.format(vm.dataset, c, first) for c in VM_CHILDREN]
    assert [vm.snapshots(c) for c in vm.children()] == [[second], [second]]
    used, listing = vm.sizes(second)
    assert listing['local-zfs/vm-400-disk-0'] >= 4 << 20 and used >= sum(listing.values())

    # PlanB runs the fileset again within the same minute: the snapshot it
    # names exists already; it is sent, not made again.
    before = lab.pve1.zfs('list -H -o name -t snapshot ' + VM_DISKS[0])
    done = vm.transport(second)
    assert done['code'] == 0, done
    assert '2 up to date' in done['stdout']
    assert lab.pve1.zfs('list -H -o name -t snapshot ' + VM_DISKS[0]) == before
    vm.unmount()
    assert mounted_in(vm) == []


def test_sigterm_mid_transfer_then_the_next_run_resumes(vm):
    lab, now = vm.lab, time.time()
    third, fourth = planb_name(now - 3600), planb_name(now)
    # Another PlanB's snapshot and one of planb-pvesync from cron: not ours.
    foreign = ['planb-20200101T0000Z', 'planb-20200101T000000Z']
    lab.pve1.zfs('snapshot -o planb:owner={} {}@{}'.format(OTHER_GUID, VM_DISKS[0], foreign[0]))
    lab.pve1.zfs('snapshot {}@{}'.format(VM_DISKS[0], foreign[1]))
    lab.pve1.write_random(VM_DISKS[0], 4)
    vm.mount()

    done = vm.transport(third, extra=' --bwlimit 256K', stop_after=512 << 10)
    assert done['code'] == 143, done
    assert done['stderr'].splitlines()[-1] == (
        'planb-pvesync: error: stopped by SIGTERM; a transfer it cut short resumes on '
        'the next run')
    child = '{}/{}'.format(vm.dataset, VM_CHILDREN[0])
    assert vm.host.zfs('get -H -o value receive_resume_token ' + child) != '-'
    # Nothing of the run keeps running, here or on the node.
    assert_ends(vm.host, 'planb_pvesync|zfs recv|zstd|pv -q|planb-pvesync-ssh')
    assert_ends(lab.pve1, 'zfs send|zstd')

    done = vm.transport(fourth)
    assert done['code'] == 0, done
    assert 'resumed a partial receive' in done['stdout']
    assert synced(lab, vm)
    # The source keeps this PlanB's newest two, the others' snapshots, and a
    # bookmark of the base only.
    assert [line.split('@')[1] for line in lab.pve1.zfs(
        'list -H -o name -s createtxg -t snapshot ' + VM_DISKS[0]).splitlines()] == [
            *foreign, third, fourth]
    assert lab.pve1.zfs('list -H -o name -t bookmark ' + VM_DISKS[0]) == \
        '{}#{}'.format(VM_DISKS[0], fourth)
    used, listing = vm.sizes(fourth)
    assert min(listing.values()) > 0
    vm.unmount()


def test_sigkill_mid_transfer_as_planbs_timeout_then_the_next_run_resumes(vm):
    lab, now = vm.lab, time.time()
    killed, next_run = planb_name(now + 3600), planb_name(now + 2 * 3600)
    lab.pve1.write_random(VM_DISKS[0], 4)
    uid = vm.host.run('id -u', user='planb').stdout.strip()
    child = '{}/{}'.format(vm.dataset, VM_CHILDREN[0])
    lock = '/run/lock/planb-pvesync-{}/{}.lock'.format(uid, child.replace('/', '%'))
    vm.mount()

    done = vm.transport(killed, extra=' --bwlimit 256K', stop_after=512 << 10,
                        signal=signal.SIGKILL, locked=lock)
    assert done['code'] == -signal.SIGKILL, done
    assert done['overlaps'] == 0, done      # never a receive without its lock
    # No stage of the run is left, here or on the node, but the idle ssh
    # master (its title: "ssh: /tmp/planb-pvesync-ssh-.../... [mux]"), which
    # goes by itself; what the receive got is kept.
    assert_ends(vm.host, r'planb_pvesync|zfs recv|zstd|pv -q|setpriv|timeout|ControlPath=')
    assert_ends(lab.pve1, 'zfs send|zstd')
    assert vm.host.zfs('get -H -o value receive_resume_token ' + child) != '-'

    done = vm.transport(next_run)
    assert done['code'] == 0, done
    assert 'resumed a partial receive' in done['stdout']
    assert synced(lab, vm)
    vm.unmount()


def test_enqueue_and_keep_gives_the_disks_the_kept_snapshot(vm):
    """PlanB's "Enqueue + keep" snapshots the fileset's own dataset after the
    run (it holds no disk); the next run takes that name on the disks, which
    are as they were then, and PlanB keeps it for ever (not its run's name)."""
    lab, now = vm.lab, time.time()
    kept_run, after = planb_name(now + 3 * 3600), planb_name(now + 4 * 3600)
    lab.pve1.write_random(VM_DISKS[1], 1)
    vm.mount()
    assert vm.transport(kept_run)['code'] == 0
    vm.rotate()
    kept = vm.keep('before-upgrade')
    vm.unmount()
    lab.pve1.write_random(VM_DISKS[1], 1)
    vm.mount()
    done = vm.transport(after)
    assert done['code'] == 0, done
    assert '{}: took @{} on its disks, as PlanB took it of the dataset alone'.format(
        vm.dataset, kept) in done['stdout']
    for child in vm.children():
        assert vm.snapshots(child)[-3:] == [kept_run, kept, after]
        # @kept holds what @kept_run holds: nothing was written between them.
        assert vm.host.zfs('get -H -p -o value written {}@{}'.format(child, kept)) == '0'
    vm.rotate()
    assert all(kept in vm.snapshots(child) for child in vm.children())
    points = json.loads(tool(lab, 'list-restore-points', '-g', 'demo-planb-vm',
                             '--sync-zfs-root', POOL, '--json', check=0).stdout)
    assert {p['name']: p['config'] for p in points}[kept] is True
    vm.unmount()


def test_a_dataset_name_with_a_space_a_container_and_a_mounted_restore_point(planb):
    """A fileset whose friendly name has a space; its container filesystem is
    never mounted in the fileset; a restore point mounted from it holds its
    snapshot, which PlanB's rotation then cannot destroy: the tool says so
    when it mounts it, and once unmounted the rotation goes through."""
    ct = Fileset(planb, 'planb ct', 401, keys=False)
    ct.create()
    child = ct.dataset + '/local_x2dzfs-subvol_x2d401_x2ddisk_x2d0'
    first, second = planb_name(time.time() - 3600), planb_name(time.time())
    for target in (first, second):
        ct.mount()
        done = ct.transport(target)
        assert done['code'] == 0, done
        assert ct.children() == [child]
        assert ct.host.zfs('get -H -o value mounted,canmount ' + shlex.quote(child)) == \
            'no\nnoauto'
        assert mounted_in(ct) == [ct.mountpoint]
        ct.unmount()
        planb.pve2.run('head -c 100000 /dev/urandom >> /{}/data.bin'.format(CT_DISK))
    assert mounted_in(ct) == []
    mount = tool(planb, 'mount-restore-point', '-g', 'demo-planb ct', '--sync-zfs-root', POOL,
                 '--at', first, '/tmp/planb-ct', check=0)
    assert mount.stderr == (
        'planb-pvesync: warning: PlanB rotates @{}: while it is mounted its rotation cannot '
        'destroy it (a clone depends on it), and that run reads as failed in PlanB, though '
        'its backup is made; unmount it as soon as you are done\n'.format(first))
    with pytest.raises(RemoteCommandError, match='has dependent clones'):
        ct.rotate()
    tool(planb, 'unmount-restore-point', '--sync-zfs-root', POOL, '/tmp/planb-ct', check=0)
    assert ct.rotate() == ['{}@{}'.format(child, first)]


def test_the_pool_check_names_what_planb_needs(planb):
    """list-planb-filesets --sync-zfs-root PlanB's POOLNAME checks what PlanB
    needs to make a fileset's dataset there: a mountpoint, and chown by sudo."""
    refused = tool(planb, 'list-planb-filesets', '--sync-zfs-root', 'tank/enc', check=2)
    assert refused.stderr == (
        "planb-pvesync: error: PlanB's pool tank/enc has mountpoint=none, but PlanB mounts "
        'the dataset of each new fileset and chowns its mountpoint; give PlanB a dataset with '
        'a mountpoint, for example: zfs create -o mountpoint=/srv/backups tank/enc/planb (and '
        'POOLNAME tank/enc/planb)\n')
    planb.backup.run('mv {0} {0}.off'.format(SUDO_CHOWN))
    try:
        refused = tool(planb, 'list-planb-filesets', '--sync-zfs-root', POOL, check=2)
    finally:
        planb.backup.run('mv {0}.off {0}'.format(SUDO_CHOWN))
    assert refused.stderr == (
        'planb-pvesync: error: this user may not run chown with sudo, which PlanB does on the '
        'mountpoint of each new fileset: add it to the sudo rule\n')
    listed = tool(planb, 'list-planb-filesets', '--sync-zfs-root', POOL, '-g', '400', check=0)
    assert listed.stdout.startswith('demo/planb-vm(vmid=400;2 volume(s);')
