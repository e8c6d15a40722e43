"""A node that lies, on the lab: nothing it sends can mount, run, rename or
age out anything on the backup host (README.rst, Security: What a node can
do to the backup host).

The tool pulls from planb@pve1 with sync-filesystem into tank/enc/hostile, as
test_sync_filesystem_lab does. To play a hostile node without depending on how
the tool reaches it (a sudo rule, or the gate), `zfs` itself lies on pve1: for
a test, /usr/sbin/zfs is a script that answers some requests its own way and
passes the rest to the real zfs. Each test checks that nothing changed on the
backup host but what the node may change: the backup of its own volume.
"""
import calendar
import contextlib
import itertools
import shlex
import subprocess
import time

import pytest

from lab.cluster import tool
from planb_pvesync import (
    RECEIPT_TIME, Snapshot, parse_keep_schedule, snapshot_name, thin_snapshots)

pytestmark = pytest.mark.lab

SRC_ROOT = 'rpool/hostile'
DST_ROOT = 'tank/enc/hostile'
ZFS = '/usr/sbin/zfs'
SCHEDULE = 'all:2d,daily:2w,weekly:3m,monthly:1y'

_names = itertools.count(1)


@pytest.fixture(scope='module')
def hostile(lab):
    """The lab with this module's roots on both sides, removed at the end."""
    lab.pve1.zfs('create -o mountpoint=none ' + SRC_ROOT)
    lab.backup.zfs('create -o mountpoint=none ' + DST_ROOT)
    yield lab
    lab.pve1.run('zfs destroy -r ' + SRC_ROOT, check=False)
    lab.backup.run('zfs destroy -r ' + DST_ROOT, check=False)


@contextlib.contextmanager
def lying_zfs(lab, lies):
    """zfs on pve1 as a bash script that runs `lies` first (with "$real" the
    real zfs), then the real zfs for whatever `lies` did not answer."""
    script = '#!/bin/bash\nreal={}.real\n{}\nexec "$real" "$@"\n'.format(ZFS, lies)
    lab.pve1.run('cp -a {0} {0}.real && cat > {0}.lie && chmod 755 {0}.lie && mv {0}.lie {0}'
                 .format(ZFS), input=script)
    try:
        yield
    finally:
        lab.pve1.run('mv {0}.real {0}'.format(ZFS))


def new_zvol(lab, mib=1, options=''):
    zvol = '{}/vm-{}-disk-0'.format(SRC_ROOT, 800 + next(_names))
    lab.pve1.zfs('create -V {}M -o volmode=dev {} {}'.format(mib, options, zvol))
    lab.pve1.write_random(zvol, mib)
    return zvol


def new_filesystem(lab, options='', mountpoint=None):
    """A filesystem with a cron line in it, not mounted on pve1 after; with
    `mountpoint`, set to mount there (canmount=on) wherever it lands."""
    fs = '{}/subvol-{}-disk-0'.format(SRC_ROOT, 800 + next(_names))
    lab.pve1.run('zfs create -o canmount=noauto -o mountpoint=/mnt/{0} {1} {0} && zfs mount {0} '
                 '&& echo "* * * * * root touch /tmp/pwned" > /mnt/{0}/pwned && zfs umount {0}'
                 .format(fs, options))
    if mountpoint:
        lab.pve1.zfs('set mountpoint={} canmount=on {}'.format(mountpoint, fs))
    return fs


def destination(src):
    return '{}/{}'.format(DST_ROOT, src.rsplit('/', 1)[1])


def sync(lab, src, dst, *options, check=0):
    return tool(lab, 'sync-filesystem', *options, 'planb@pve1:' + src, dst, check=check)


def prop(host, dataset, name):
    return host.zfs('get -H -o value {} {}'.format(name, shlex.quote(dataset)))


def exists(host, dataset):
    return host.run('zfs list ' + shlex.quote(dataset), check=False).returncode == 0


def snapshots(host, dataset):
    out = host.zfs('list -H -p -o name,guid,creation -t snapshot -s createtxg ' + dataset)
    return [(name.split('@', 1)[1], int(guid), int(creation))
            for name, guid, creation in (line.split('\t') for line in out.splitlines())]


def backup_host_state(lab):
    """What must not change: the mounts, /etc/cron.d, the datasets outside
    this module's root; and what a `zfs mount -a` would add."""
    backup = lab.backup
    mounts = backup.run('findmnt -rn -o TARGET,SOURCE | sort').stdout
    cron = backup.run('ls -la /etc/cron.d').stdout
    others = backup.zfs('list -H -o name -t all')
    return mounts, cron, '\n'.join(n for n in others.splitlines()
                                   if not n.startswith(DST_ROOT + '/'))


def assert_mount_all_mounts_nothing(lab, before):
    lab.backup.run('zfs mount -a', check=False)
    assert backup_host_state(lab) == before
    assert lab.backup.run('test -e /tmp/pwned', check=False).returncode != 0


def test_a_filesystem_sent_for_a_volume_is_destroyed_and_mounts_nothing(hostile):
    lab = hostile
    evil = new_filesystem(lab, '-o setuid=on -o exec=on -o devices=on', '/etc/cron.d')
    lab.pve1.zfs('snapshot {}@s'.format(evil))
    src = new_zvol(lab)
    dst = destination(src)
    before = backup_host_state(lab)
    lie = 'case "${{@: -1}}" in {}@*) exec "$real" send -p {}@s;; esac'.format(src, evil)
    with lying_zfs(lab, lie):
        done = sync(lab, src, dst, check=1)
    assert ('planb@pve1 sent a filesystem for {}, which its listing says is a volume; it was '
            'undone here'.format(src)) in done.stderr
    assert not exists(lab.backup, dst)
    assert_mount_all_mounts_nothing(lab, before)


def test_a_volume_sent_for_a_filesystem_is_refused_before_it_lands(hostile):
    lab = hostile
    src, zvol = new_filesystem(lab), new_zvol(lab)
    lab.pve1.zfs('snapshot {}@s'.format(zvol))
    dst = destination(src)
    before = backup_host_state(lab)
    lie = 'case "${{@: -1}}" in {}@*) exec "$real" send {}@s;; esac'.format(src, zvol)
    with lying_zfs(lab, lie):
        done = sync(lab, src, dst, check=1)
    assert ('planb@pve1 sent a stream that is no filesystem, though its listing says {} is '
            "one: zfs recv refused it (property 'canmount' does not apply to datasets of this "
            'type), and nothing of it was kept'.format(src)) in done.stderr
    assert not exists(lab.backup, dst)
    assert backup_host_state(lab) == before


def test_a_filesystem_that_brings_its_own_mountpoint_and_setuid_keeps_neither(hostile):
    lab = hostile
    src = new_filesystem(lab, '-o setuid=on -o exec=on -o devices=on -o sharenfs=on '
                              '-o refreservation=64M -o planb-pvesync:vmid=106', '/etc/cron.d')
    dst = destination(src)
    before = backup_host_state(lab)
    lie = '[ "$1" = send ] && exec "$real" send -p "${@:2}"'
    with lying_zfs(lab, lie):
        sync(lab, src, dst)
    props = lab.backup.zfs('get -H -o property,value,source mountpoint,canmount,setuid,exec,'
                           'devices,sharenfs,refreservation,mounted,planb-pvesync:vmid ' + dst)
    assert [line.split('\t') for line in props.splitlines()] == [
        ['mountpoint', 'none', 'inherited from ' + DST_ROOT], ['canmount', 'noauto', 'local'],
        ['setuid', 'off', 'local'], ['exec', 'off', 'local'], ['devices', 'off', 'local'],
        ['sharenfs', 'off', 'default'], ['refreservation', 'none', 'default'],
        ['mounted', 'no', '-'], ['planb-pvesync:vmid', '-', '-']]
    assert_mount_all_mounts_nothing(lab, before)


def test_sixty_forged_snapshot_names_age_out_no_genuine_backup(hostile):
    """Backups of sixty days, one a day; then 60 snapshots under the tool's
    names for those days, made on the node today: the keep schedule keeps of
    the genuine backups what it keeps without them, and keeps every forged
    one."""
    lab = hostile
    src = new_zvol(lab)
    dst = destination(src)
    now = int(lab.pve1.run('date +%s').stdout)
    days = [now - k * 86400 - 43200 for k in range(60, 0, -1)]    # half a day off now's hour
    # The genuine ones, each made on its day (pve1's clock goes back for it),
    # and received on its day: a receipt a minute after it.
    lab.pve1.run('set -e; start=$(date +%s); up=$(cut -d. -f1 /proc/uptime); ' + '; '.join(
        'date -s @{} >/dev/null; zfs snapshot {}@{}'.format(when, src, snapshot_name('planb', when))
        for when in days) + '; date -s @$((start + $(cut -d. -f1 /proc/uptime) - up)) >/dev/null')
    send = subprocess.Popen(lab.pve1.ssh_argv() + ['zfs send -R {}@{}'.format(
        src, snapshot_name('planb', days[-1]))], stdout=subprocess.PIPE)
    subprocess.run(lab.backup.ssh_argv() + ['zfs recv -u ' + dst], stdin=send.stdout, check=True)
    assert send.wait() == 0
    receipts = ''.join('zfs.sync.set_prop("{}@{}", "planb-pvesync:received", "{}")\n'.format(
        dst, snapshot_name('planb', when), time.strftime(RECEIPT_TIME, time.gmtime(when + 60)))
        for when in days)      # one channel program, not 60 commands
    lab.backup.run('cat > /tmp/receipts.lua && zfs program tank /tmp/receipts.lua', input=receipts)
    genuine = snapshots(lab.backup, dst)
    forged = [snapshot_name('planb', now - now % 86400 - k * 86400) for k in range(1, 61)]
    lab.pve1.run('; '.join('zfs snapshot {}@{}'.format(src, name) for name in forged))
    done = sync(lab, src, dst, '--keep-destination', SCHEDULE)
    assert ('{}: 60 snapshot(s) kept and not counted by --keep-destination'.format(dst)
            in done.stderr)
    after = snapshots(lab.backup, dst)
    names = [name for name, _, _ in after]
    assert set(forged) <= set(names)
    newest, guid, created = after[-1]
    alone = thin_snapshots(
        [Snapshot(name, g, txg, creation=creation, received=when + 60)
         for txg, (when, (name, g, creation)) in enumerate(zip(days, genuine))]
        + [Snapshot(newest, guid, 1000, creation=created, received=now)],
        parse_keep_schedule(SCHEDULE), now, 'planb')
    assert 20 < len(alone) < 50
    assert [name for name, _, _ in genuine if name in names] == [
        name for name, _, _ in genuine if name not in {s.name for s in alone}]
    receipt = lab.backup.zfs('get -H -p -s local -o value planb-pvesync:received {}@{}'.format(
        dst, forged[0]))
    assert abs(calendar.timegm(time.strptime(receipt, RECEIPT_TIME)) - now) < 3600


def test_a_partial_receive_of_another_dataset_is_resumed_by_no_lie(hostile):
    """The node sends another of its datasets in place of the volume, cut
    off; then says the partial receive is the volume's own, and answers the
    resume with a stream that does not continue it: ZFS takes it for no
    resume (and the tool never forces a receive with -F). A node that tells
    the truth about the token sees it refused (test_faults_lab)."""
    lab = hostile
    src, other = new_zvol(lab), new_zvol(lab, mib=4)
    lab.pve1.zfs('snapshot {}@s'.format(other))
    dst = destination(src)
    cut = ('[ "$1" = send ] && [ "$2" != -n ] && '
           '{{ "$real" send {}@s | head -c 1000000; exit 0; }}'.format(other))
    with lying_zfs(lab, cut):
        sync(lab, src, dst, check=1)
    token = prop(lab.backup, dst, 'receive_resume_token')
    assert token != '-'
    (ours, guid, _), = snapshots(lab.pve1, src)
    before = backup_host_state(lab)
    lie = ('if [ "$1 $2" = "send -n" ]; then "$real" "$@" | sed -e "s|toname = {0}@s|toname = '
           '{1}@{2}|" -e "s|toguid = .*|toguid = {3:#x}|"; exit; fi; '
           '[ "$1 $2" = "send -t" ] && exec "$real" send {1}@{2}').format(other, src, ours, guid)
    with lying_zfs(lab, lie):
        done = sync(lab, src, dst, check=1)
    assert ("zfs recv failed (exit 1): cannot receive new filesystem stream: destination "
            "'{}' exists must specify -F to overwrite it".format(dst)) in done.stderr
    assert prop(lab.backup, dst, 'receive_resume_token') == token
    assert snapshots(lab.backup, dst) == []
    assert backup_host_state(lab) == before


def test_a_node_that_deletes_its_own_snapshots_erases_nothing_here_unasked(hostile):
    lab = hostile
    src = new_zvol(lab)
    dst = destination(src)
    first, second = (snapshot_name('planb', time.time() - age) for age in (120, 60))
    lab.pve1.zfs('snapshot {}@{}'.format(src, first))
    lab.pve1.write_random(src, 1)
    lab.pve1.zfs('snapshot {}@{}'.format(src, second))
    sync(lab, src, dst, '--no-snapshot')
    lab.pve1.run('zfs destroy {0}@{1} && zfs destroy {0}#{1}'.format(src, second))
    lab.pve1.write_random(src, 1)
    done = sync(lab, src, dst, check=1)
    assert 'pass --rollback' in done.stderr
    assert [name for name, _, _ in snapshots(lab.backup, dst)] == [first, second]
    done = sync(lab, src, dst, '--rollback')
    warning = ('{}: --rollback destroys 1 backup(s) that planb@pve1 sent here and no longer '
               'shares with it (@{}): a node that deleted its own snapshots erases their '
               'history here with this flag; run it by hand, never from cron'.format(dst, second))
    assert done.stderr.index(warning) < done.stderr.index('rolled back to @' + first)


PERMISSIONS = 'create,destroy,mount,receive,rollback,rename,send,userprop,canmount,volmode'


def test_by_delegation_the_sync_runs_without_sudo_and_a_stream_sets_no_mountpoint(hostile):
    """zfs allow on a backup root instead of the sudo rule, which is gone for
    the test: the sync, its receipts and retention run as planb alone, and a
    stream's mountpoint and setuid are refused by ZFS itself."""
    lab = hostile
    root = DST_ROOT + '/delegated'
    lab.backup.zfs('create -o mountpoint=none -o setuid=off -o exec=off -o devices=off ' + root)
    lab.backup.zfs('allow -u planb {} {}'.format(PERMISSIONS, root))
    src = new_filesystem(lab, '-o setuid=on -o exec=on', '/etc/cron.d')
    dst = '{}/guest/{}'.format(root, src.rsplit('/', 1)[1])
    before = backup_host_state(lab)
    lab.backup.run('mv /etc/sudoers.d/planb /root/planb.sudoers')
    try:
        lie = '[ "$1" = send ] && exec "$real" send -p "${@:2}"'
        with lying_zfs(lab, lie):
            sync(lab, src, dst)
            (first, _, _), = snapshots(lab.backup, dst)
            lab.backup.zfs('set planb-pvesync:received=2020-01-01T00:00:00Z {}@{}'.format(
                dst, first))
            time.sleep(1)
            done = sync(lab, src, dst, '--keep-destination', 'all:1d')
    finally:
        lab.backup.run('mv /root/planb.sudoers /etc/sudoers.d/planb')
    assert 'destroyed {}@{}'.format(dst, first) in done.stdout
    assert 'sudo' not in done.stdout + done.stderr
    assert [prop(lab.backup, dst, p) for p in ('mountpoint', 'setuid', 'exec', 'mounted')] == [
        'none', 'off', 'off', 'no']
    assert prop(lab.backup, dst.rpartition('/')[0], 'canmount') == 'off'
    (second, _, _), = snapshots(lab.backup, dst)
    assert lab.backup.zfs('get -H -s local -o value planb-pvesync:received-from {}@{}'.format(
        dst, second)) == 'planb@pve1'
    assert_mount_all_mounts_nothing(lab, before)
