"""sync-filesystem on the lab: real OpenZFS on pve1 and backup, real ssh and sudo.

The tool runs on `backup` as `planb` and pulls from `planb@pve1`, as a
deployment would. Each test uses datasets of its own, so the tests share one
lab without stepping on each other.
"""
import itertools
import re
import shlex
import time

import pytest

from lab.cluster import tool

pytestmark = pytest.mark.lab

_names = itertools.count(1)


def new_zvol(host, mib=8, parent='rpool/data'):
    name = '{}/vm-{}-disk-0'.format(parent, 900 + next(_names))
    host.zfs('create -V {}M -o volmode=dev {}'.format(mib, name))
    host.write_random(name, mib)
    return name


def new_destination():
    return 'tank/enc/fs/t{}'.format(next(_names))


def snapshots(host, dataset):
    out = host.zfs('list -H -o name -t snapshot -s createtxg ' + shlex.quote(dataset))
    return [line.split('@', 1)[1] for line in out.splitlines()]


def bookmarks(host, dataset):
    out = host.zfs('list -H -o name -t bookmark ' + shlex.quote(dataset))
    return [line.split('#', 1)[1] for line in out.splitlines()]


def assert_same_volume(lab, src, dst):
    assert lab.pve1.sha256('/dev/zvol/' + src) == lab.backup.sha256('/dev/zvol/' + dst)


def prop(host, dataset, name):
    return host.zfs('get -H -o value {} {}'.format(name, shlex.quote(dataset)))


def test_full_then_incremental_then_nothing_new(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    first = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    assert re.search(r'full @planb-\d{8}T\d{6}Z', first.stdout)
    assert 'sync-filesystem: 1 volume(s): 1 synced' in first.stdout
    assert_same_volume(lab, src, dst)
    assert prop(lab.backup, dst, 'encryptionroot') == 'tank/enc'
    assert prop(lab.backup, dst, 'planb-pvesync:source') == 'planb@pve1:' + src
    assert prop(lab.backup, dst.rpartition('/')[0], 'mountpoint') == 'none'

    lab.pve1.write_random(src, 2, offset_mib=3)
    time.sleep(1)       # snapshot names have a resolution of one second
    second = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    assert 'incremental @planb-' in second.stdout
    assert_same_volume(lab, src, dst)

    time.sleep(1)
    third = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    assert 'incremental @planb-' in third.stdout     # a fresh snapshot, nothing new in it
    on_backup = snapshots(lab.backup, dst)
    assert len(on_backup) == 3
    assert snapshots(lab.pve1, src) == on_backup[1:]    # the source keeps 2 by default
    assert 'destroyed planb@pve1:{}@{}'.format(src, on_backup[0]) in third.stdout


def test_intermediate_and_foreign_snapshots_with_hostile_names(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    lab.pve1.zfs(shlex.join(['snapshot', src + '@daily 2026-11-25 01:00']))
    lab.pve1.write_random(src, 1)
    lab.pve1.zfs(shlex.join(['snapshot', src + '@before upgrade: v2.1']))
    tool(lab, 'sync-filesystem', '--snapshot-prefix', 'nightly.x:y',
         'planb@pve1:' + src, dst, check=0)
    names = snapshots(lab.backup, dst)
    assert names[:2] == ['daily 2026-11-25 01:00', 'before upgrade: v2.1']
    assert re.fullmatch(r'nightly\.x:y-\d{8}T\d{6}Z', names[2])
    assert snapshots(lab.pve1, src) == names    # foreign snapshots stay on the source
    assert_same_volume(lab, src, dst)


def test_newest_only(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    lab.pve1.zfs('snapshot {}@old'.format(src))
    tool(lab, 'sync-filesystem', '--no-intermediates', 'planb@pve1:' + src, dst, check=0)
    assert len(snapshots(lab.backup, dst)) == 1 and snapshots(lab.backup, dst) != ['old']


def test_dry_run_changes_nothing(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    done = tool(lab, 'sync-filesystem', '-n', 'planb@pve1:' + src, dst, check=0)
    assert 'would run on planb@pve1: sudo -n zfs snapshot' in done.stdout
    assert '| zstd -d -q -c | sudo -n zfs recv -s -u -v' in done.stdout
    assert snapshots(lab.pve1, src) == []
    assert lab.backup.run('zfs list ' + dst, check=False).returncode != 0


def test_filesystem_is_never_mounted_on_the_backup_host(lab):
    src, dst = 'rpool/data/subvol-{}-disk-0'.format(900 + next(_names)), new_destination()
    lab.pve1.zfs('create ' + src)
    lab.pve1.run('head -c 300000 /dev/urandom > /{0}/data.bin && mkdir /{0}/etc && '
                 'echo hello > /{0}/etc/motd'.format(src))
    tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    assert prop(lab.backup, dst, 'mounted') == 'no'
    assert prop(lab.backup, dst, 'canmount') == 'noauto'
    snap = snapshots(lab.backup, dst)[-1]
    lab.backup.zfs('clone -o mountpoint=/mnt/check {}@{} tank/check'.format(dst, snap))
    try:
        assert (lab.backup.sha256('/mnt/check/data.bin') ==
                lab.pve1.sha256('/{}/data.bin'.format(src)))
    finally:
        lab.backup.zfs('destroy tank/check')


def test_encrypted_source_is_sent_raw(lab):
    parent = 'rpool/data/secret{}'.format(next(_names))
    lab.pve1.run('head -c 32 /dev/urandom > /root/secret.key')
    lab.pve1.zfs('create -o encryption=aes-256-gcm -o keyformat=raw '
                 '-o keylocation=file:///root/secret.key ' + parent)
    src, dst = new_zvol(lab.pve1, parent=parent), new_destination()
    tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    assert prop(lab.backup, dst, 'encryptionroot') == dst      # its own key, not tank/enc's
    assert prop(lab.backup, dst, 'keystatus') == 'unavailable'
    key = lab.pve1.run('base64 -w0 /root/secret.key').stdout
    lab.backup.run('echo {} | base64 -d > /root/secret.key && zfs load-key -L '
                   'file:///root/secret.key {}'.format(key, dst))
    assert_same_volume(lab, src, dst)


def test_missing_compressor_stops_before_any_data_moves(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    done = tool(lab, 'sync-filesystem', '--compress', 'qlzip1', 'planb@pve1:' + src, dst,
                check=1)
    assert 'not installed: qlzip1 on planb@pve1, qlzcat1 on localhost' in done.stderr
    assert lab.backup.run('zfs list ' + dst, check=False).returncode != 0


def test_diverged_destination_is_left_alone_without_a_flag(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    lab.backup.write_random(dst, 1)                  # someone wrote to the backup
    before = snapshots(lab.backup, dst)
    done = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=1)
    assert 'was changed after its newest snapshot' in done.stderr
    assert '--rollback' in done.stderr
    assert snapshots(lab.backup, dst) == before
    tool(lab, 'sync-filesystem', '--rollback', 'planb@pve1:' + src, dst, check=0)
    assert_same_volume(lab, src, dst)


def test_unrelated_destination_is_replaced_only_when_asked(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    lab.backup.zfs('create -p -o mountpoint=none ' + dst.rpartition('/')[0])
    lab.backup.zfs('create -V 8M {0} && zfs snapshot {0}@mine'.format(dst))
    done = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=1)
    assert 'shares no snapshot with the source' in done.stderr
    assert snapshots(lab.backup, dst) == ['mine']
    tool(lab, 'sync-filesystem', '--destroy-diverged', 'planb@pve1:' + src, dst, check=0)
    assert_same_volume(lab, src, dst)


def test_the_tool_bookmarks_the_base_so_a_lost_snapshot_breaks_no_chain(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    (common,) = snapshots(lab.pve1, src)
    assert bookmarks(lab.pve1, src) == [common]
    lab.pve1.zfs('destroy {}@{}'.format(src, common))     # an admin tidying up
    lab.pve1.write_random(src, 1)
    time.sleep(1)
    done = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    assert 'incremental #' + common in done.stdout
    assert_same_volume(lab, src, dst)
    (newest,) = snapshots(lab.pve1, src)
    assert bookmarks(lab.pve1, src) == [newest]          # the old one is gone


def test_common_snapshot_and_bookmark_deleted_on_the_source(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    lab.pve1.write_random(src, 1)       # the second snapshot holds a change
    time.sleep(1)
    tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    first, second = snapshots(lab.pve1, src)
    lab.pve1.zfs('destroy {0}@{1} && zfs destroy {0}#{1}'.format(src, second))
    time.sleep(1)
    done = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=1)
    assert 'continue from @' + first in done.stderr
    assert snapshots(lab.backup, dst) == [first, second]     # nothing destroyed
    time.sleep(1)
    tool(lab, 'sync-filesystem', '--rollback', 'planb@pve1:' + src, dst, check=0)
    assert_same_volume(lab, src, dst)


def start_in_background(lab, args, log):
    lab.backup.run('nohup planb-pvesync {} >{} 2>&1 </dev/null &'.format(
        shlex.join(args), log), user='planb')


def wait_until(check, timeout=120, step=0.5):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(step)


def running(lab, pattern):
    return lab.backup.run('pgrep -f {}'.format(shlex.quote(pattern)),
                          check=False).returncode == 0


def interrupt_transfer(lab, src, dst):
    """Start a slow sync and kill its ssh half-way; a resume token remains."""
    args = ['sync-filesystem', '--bwlimit', '2M', 'planb@pve1:' + src, dst]
    start_in_background(lab, args, '/tmp/interrupted.log')
    wait_until(lambda: running(lab, 'zfs recv -s'))
    time.sleep(3)
    lab.backup.run('pkill -u planb -x ssh', user='root')
    wait_until(lambda: not running(lab, 'planb_pvesync[.]main'))
    log = lab.backup.run('cat /tmp/interrupted.log').stdout
    assert 'FAILED' in log
    token = prop(lab.backup, dst, 'receive_resume_token')
    assert token not in ('', '-')
    return log


def sent_bytes(stdout):
    match = re.search(r'; ([\d.]+) (B|KiB|MiB) in', stdout)
    return float(match.group(1)) * {'B': 1, 'KiB': 1 << 10, 'MiB': 1 << 20}[match.group(2)]


def test_interrupted_transfer_resumes(lab):
    src, dst = new_zvol(lab.pve1, mib=24), new_destination()
    interrupt_transfer(lab, src, dst)
    done = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    assert 'resumed a partial receive' in done.stdout
    assert 0 < sent_bytes(done.stdout) < 24 << 20   # only the rest of the stream
    assert_same_volume(lab, src, dst)


def test_stale_resume_token_is_aborted(lab):
    src, dst = new_zvol(lab.pve1, mib=24), new_destination()
    interrupt_transfer(lab, src, dst)
    for snap in snapshots(lab.pve1, src):
        lab.pve1.zfs('destroy {}@{}'.format(src, snap))
    time.sleep(1)
    done = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    assert 'aborted a resumable receive' in done.stderr
    assert_same_volume(lab, src, dst)


def test_second_run_skips_a_locked_volume_or_waits(lab):
    src, dst = new_zvol(lab.pve1), new_destination()
    lock = '/run/lock/planb-pvesync/{}.lock'.format(dst.replace('/', '%'))
    lab.backup.run('mkdir -p /run/lock/planb-pvesync && touch {0}'.format(shlex.quote(lock)),
                   user='planb')
    lab.backup.run('nohup flock {} sleep 8 >/dev/null 2>&1 &'.format(shlex.quote(lock)),
                   user='planb')
    wait_until(lambda: running(lab, 'sleep 8'))
    done = tool(lab, 'sync-filesystem', 'planb@pve1:' + src, dst, check=0)
    assert 'is syncing it now; skipped' in done.stderr
    assert '1 skipped' in done.stdout
    assert lab.backup.run('zfs list ' + dst, check=False).returncode != 0
    done = tool(lab, 'sync-filesystem', '--wait', 'planb@pve1:' + src, dst, check=0)
    assert '1 synced' in done.stdout
    assert_same_volume(lab, src, dst)
