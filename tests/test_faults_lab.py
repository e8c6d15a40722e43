"""Faults on the lab, and the scenarios of the peers' own test suites that
apply to a pull tool, each with the peer test it comes from in its docstring.

The tool runs on `backup` as `planb` and pulls from `planb@pve1` with
sync-filesystem, as test_sync_filesystem_lab does, from sources under
rpool/faults into tank/enc/faults (and an encryption root of this module's
own). Every test checks both sides: the snapshots by name and guid, the data
by checksum. Where our answer differs from a peer's, README.rst says so
(When things go wrong).

Covered elsewhere: resuming a cut transfer and aborting a stale token
(syncoid 006_reset_resume_state2, zfs-autobackup test_initial_resume and
test_initial_resumeabort; test_incremental_resumeabort takes the same path)
and replacing a destination that shares nothing (syncoid 003_force_delete)
in test_sync_filesystem_lab; a raw send keeping its own key (zfs-autobackup
test_encryption) there too. Not ported, as they test what a pull tool of
whole volumes does not do: syncoid 007/009 (recordsize and properties: we
record the origin, not the source's properties), 010 (snapshot filters),
011 (faked clocks: we order by createtxg, never by time), 014 and zrepl's
IdempotentBookmark (bookmark names carry a timestamp, and one bookmark per
base guid is kept); zfs-autobackup's clones, destroy-missing, thinner,
scaling and mount tests, test_abort_unwanted_resume (a partial transfer is
always wanted); zrepl's holds, replication cursors and step holds (we keep
no holds), placeholders, property replication, send-stream internals and
ReceiveForce* (we never receive with -F).
"""
import itertools
import shlex
import subprocess
import time

import pytest

from lab.cluster import tool

pytestmark = pytest.mark.lab

SRC_ROOT = 'rpool/faults'
DST_ROOT = 'tank/enc/faults'
KEYED_ROOT = 'tank/faults-key'      # an encryption root of our own, to lock
KEY_FILE = '/root/faults.key'       # the key of an encrypted source
KEYED_ROOT_KEY = '/root/faults-root.key'

_names = itertools.count(1)


@pytest.fixture(scope='module')
def faults(lab):
    """The lab with this module's roots on both sides, removed at the end."""
    lab.pve1.zfs('create -o mountpoint=none ' + SRC_ROOT)
    lab.backup.zfs('create -o mountpoint=none ' + DST_ROOT)
    yield lab
    lab.pve1.run('zfs destroy -r ' + SRC_ROOT, check=False)
    lab.backup.run('zfs destroy -r {}; zfs destroy -r {}'.format(DST_ROOT, KEYED_ROOT),
                   check=False)


def new_zvol(lab, mib=2, name=None, parent=SRC_ROOT):
    zvol = '{}/{}'.format(parent, name or 'v{}'.format(next(_names)))
    lab.pve1.zfs(shlex.join(['create', '-V', '{}M'.format(mib), '-o', 'volmode=dev', zvol]))
    lab.pve1.write_random(device(zvol), mib)
    return zvol


def destination(src, root=DST_ROOT):
    return '{}/{}'.format(root, src.rsplit('/', 1)[1])


def sync(lab, src, dst, *options, check=0):
    return tool(lab, 'sync-filesystem', *options, 'planb@pve1:' + src, dst, check=check)


def snapshots(host, dataset):
    """[(name, guid)] of the dataset's snapshots, oldest first."""
    out = host.zfs('list -H -p -o name,guid -t snapshot -s createtxg ' + shlex.quote(dataset))
    return [(name.split('@', 1)[1], int(guid))
            for name, guid in (line.split('\t') for line in out.splitlines())]


def names(host, dataset):
    return [name for name, _ in snapshots(host, dataset)]


def bookmarks(host, dataset):
    out = host.zfs('list -H -o name -t bookmark ' + shlex.quote(dataset))
    return [line.split('#', 1)[1] for line in out.splitlines()]


def prop(host, dataset, name):
    return host.zfs('get -H -o value {} {}'.format(name, shlex.quote(dataset)))


def device(zvol):
    """The zvol's name as udev links it under /dev/zvol: spaces become +."""
    return zvol.replace(' ', '+')


def assert_in_sync(lab, src, dst):
    """The backup has the source's newest snapshot, every snapshot both sides
    name is the same one (by guid), and the data is the same on both sides."""
    on_source, on_backup = snapshots(lab.pve1, src), dict(snapshots(lab.backup, dst))
    assert on_source[-1][0] in on_backup
    assert all(on_backup[name] == guid for name, guid in on_source if name in on_backup)
    assert (lab.pve1.sha256('/dev/zvol/' + device(src)) ==
            lab.backup.sha256('/dev/zvol/' + device(dst)))


def changed(lab, src, mib=1):
    """New data on the source, and a second later: snapshot names are per second."""
    lab.pve1.write_random(src, mib)
    time.sleep(1)


def test_snapshots_made_on_the_backup_are_received_past_unless_they_hold_changes(faults):
    """Issue 12 (`zfs snapshot -r tank@before-upgrade` on the backup host), and
    zfs-autobackup tests/test_zfsautobackup32.py test_invalid_common_snapshot
    (a snapshot only the target has is kept) and
    test_invalid_common_snapshot_with_data (zfs-autobackup needs
    --destroy-incompatible there; here --rollback, and only then)."""
    src = new_zvol(faults)
    dst = destination(src)
    sync(faults, src, dst)
    faults.backup.zfs('snapshot {}@before-upgrade'.format(dst))
    changed(faults, src)
    done = sync(faults, src, dst)
    assert 'incremental @planb-' in done.stdout
    first, mine, second = names(faults.backup, dst)
    assert mine == 'before-upgrade'
    assert_in_sync(faults, src, dst)

    faults.backup.write_random(dst, 1)                # someone used the backup
    faults.backup.zfs('snapshot {}@mine'.format(dst))
    before = snapshots(faults.backup, dst)
    changed(faults, src)
    done = sync(faults, src, dst, check=1)
    assert '(@mine), and' in done.stderr and 'bytes were written after @' + second in done.stderr
    assert '--rollback' in done.stderr
    assert snapshots(faults.backup, dst) == before
    done = sync(faults, src, dst, '--rollback')
    assert 'rolled back to @' + second in done.stdout
    assert names(faults.backup, dst)[:3] == [first, mine, second]
    assert 'mine' not in names(faults.backup, dst)
    assert_in_sync(faults, src, dst)


def test_a_raw_stream_is_not_received_past_a_snapshot_made_on_the_backup(faults):
    """zfs-autobackup tests/test_externalfailures.py test_raw_invalid_snapshot:
    ZFS receives a raw (encrypted) stream only onto the snapshot it starts
    from. zfs-autobackup destroys the target's snapshot with
    --destroy-incompatible; here the message says so, and the user does it."""
    parent = '{}/secret{}'.format(SRC_ROOT, next(_names))
    faults.pve1.run('head -c 32 /dev/urandom > ' + KEY_FILE)
    faults.pve1.zfs('create -o encryption=aes-256-gcm -o keyformat=raw -o keylocation=file://{} '
                  '{}'.format(KEY_FILE, parent))
    src = new_zvol(faults, parent=parent)
    dst = destination(src)
    sync(faults, src, dst)
    faults.backup.zfs('snapshot {}@mine'.format(dst))
    changed(faults, src)
    done = sync(faults, src, dst, check=1)
    assert 'sent raw' in done.stderr and '(zfs destroy {}@mine)'.format(dst) in done.stderr
    faults.backup.zfs('destroy {}@mine'.format(dst))
    sync(faults, src, dst)
    key = faults.pve1.run('base64 -w0 ' + KEY_FILE).stdout
    faults.backup.run('echo {} | base64 -d > {} && zfs load-key -L file://{} {}'.format(
        key, KEY_FILE, KEY_FILE, dst))
    assert_in_sync(faults, src, dst)


def test_a_snapshot_name_used_again_is_refused_before_anything_is_sent(faults):
    """syncoid tests/syncoid/008_force_delete_snapshot (a snapshot destroyed
    and made again under its name on the source; syncoid --force-delete
    destroys the target's) and zfs-autobackup tests/test_zfsautobackup32.py
    test_invalid_common_snapshot (names alike, guids not). Here nothing is
    destroyed: the message names the snapshot, both guids and the fix."""
    src = new_zvol(faults)
    dst = destination(src)
    faults.pve1.zfs('snapshot {}@dup'.format(src))
    sync(faults, src, dst)
    (_, old), = [s for s in snapshots(faults.backup, dst) if s[0] == 'dup']
    faults.pve1.zfs('destroy {0}@dup'.format(src))
    changed(faults, src)
    faults.pve1.zfs('snapshot {}@dup'.format(src))
    new = dict(snapshots(faults.pve1, src))['dup']
    before = snapshots(faults.backup, dst)
    done = sync(faults, src, dst, check=1)
    assert ("{0}@dup is another snapshot than the source's @dup: their guids differ "
            "({1} here, {2} on the source)".format(dst, old, new)) in done.stderr
    assert 'zfs rename {0}@dup {0}@dup-old'.format(dst) in done.stderr
    assert snapshots(faults.backup, dst) == before
    assert prop(faults.backup, dst, 'receive_resume_token') == '-'
    faults.backup.zfs('rename {0}@dup {0}@dup-old'.format(dst))
    sync(faults, src, dst)
    on_backup = dict(snapshots(faults.backup, dst))
    assert (on_backup['dup-old'], on_backup['dup']) == (old, new)
    assert_in_sync(faults, src, dst)


def test_out_of_space_then_a_locked_key_then_resume(faults):
    """zfs-autobackup tests/test_externalfailures.py generate_resume and
    test_incremental_resume (the target runs out of space mid-stream; the
    next run resumes), tests/test_encryption.py test_resume_encrypt_with_no_key
    (the target's key is unloaded before that run: it fails; loaded, it
    resumes), and issue 12: after a reboot of the backup host its pool's key
    is not loaded, and the run stops before it makes any snapshot."""
    faults.backup.run('head -c 32 /dev/urandom > {0} && zfs create -o encryption=aes-256-gcm '
                    '-o keyformat=raw -o keylocation=file://{0} -o mountpoint=none {1}'
                    .format(KEYED_ROOT_KEY, KEYED_ROOT))
    src = new_zvol(faults, mib=4)
    dst = destination(src, KEYED_ROOT)
    sync(faults, src, dst)
    free = int(faults.backup.zfs('get -H -p -o value available ' + KEYED_ROOT))
    faults.backup.zfs('create -o mountpoint=none -o refreservation={} tank/faults-hog'.format(
        free - (2 << 20)))
    try:
        changed(faults, src, mib=4)
        done = sync(faults, src, dst, check=1)
    finally:
        faults.backup.zfs('destroy tank/faults-hog')
    assert ('FAILED: zfs recv failed (exit 1): cannot receive incremental stream: '
            'out of space') in done.stderr
    assert 'zfs send -t' not in done.stderr
    assert prop(faults.backup, dst, 'receive_resume_token') != '-'

    faults.backup.zfs('unload-key ' + KEYED_ROOT)
    on_source = snapshots(faults.pve1, src)
    time.sleep(1)
    done = sync(faults, src, dst, check=3)
    assert done.stderr.splitlines() == [
        'planb-pvesync: error: {0}: encryption key not loaded (was this host restarted?), '
        'so no backup can be received there; nothing was done; load it: zfs load-key {0}'
        .format(KEYED_ROOT)]
    assert snapshots(faults.pve1, src) == on_source
    faults.backup.zfs('load-key ' + KEYED_ROOT)
    done = sync(faults, src, dst)
    assert 'resumed a partial receive' in done.stdout
    assert_in_sync(faults, src, dst)


def test_a_compressor_that_dies_mid_stream_is_named_first(faults):
    """Issue 12 (a compressor dies: the message showed zfs recv's hint to
    resume instead of the cause), zrepl internal/platformtest/tests/
    sendStream.go SendStreamCloseAfterBlockedOnPipeWrite (a pipeline whose
    reader is gone ends; nothing hangs), and syncoid tests/syncoid/
    005_reset_resume_state (the transfer's processes killed mid-stream; the
    next run carries on; syncoid's --no-resume is not ours: we always resume)."""
    src = new_zvol(faults, mib=8)
    dst = destination(src)
    log = '/tmp/faults-compressor.log'
    faults.backup.run('nohup planb-pvesync sync-filesystem --bwlimit 1M {} {} >{} 2>&1 '
                    '</dev/null &'.format(shlex.quote('planb@pve1:' + src), dst, log),
                    user='planb')
    wait_until(lambda: faults.pve1.run('pgrep -u planb -x zstd', check=False).returncode == 0
               and faults.backup.run('pgrep -f "zfs recv -s"', check=False).returncode == 0)
    time.sleep(1)
    faults.pve1.run('pkill -KILL -u planb -x zstd')
    wait_until(lambda: faults.backup.run('pgrep -f "planb_pvesync[.]main"',
                                       check=False).returncode != 0)
    said = faults.backup.run('cat ' + log).stdout
    failed, = [line for line in said.splitlines() if 'FAILED' in line]
    assert 'FAILED: pve1: zfs send | zstd failed (exit 137): bash: line 1: ' in failed
    assert 'Killed | zstd -3' in failed and failed.endswith(
        '; then zstd failed (exit 1), zfs recv failed (exit 1)')
    assert 'zfs send -t' not in said
    done = sync(faults, src, dst)
    assert 'resumed a partial receive' in done.stdout
    assert_in_sync(faults, src, dst)


def test_bookmarks_as_bases_with_odd_names(faults):
    """syncoid tests/syncoid/001_bookmark_replication_intermediate,
    002_bookmark_replication_no_intermediate, 004_bookmark_replication_edge_case
    and 013_bookmark_replication_0_named, and zrepl internal/platformtest/tests/
    replication.go ReplicationIncrementalIsPossibleIfCommonSnapshotIsDestroyed:
    the common snapshot is destroyed on the source and its bookmark (the
    tool's own, made after each sync) serves as the base, with every
    intermediate snapshot or with the newest only."""
    src = new_zvol(faults)
    dst = destination(src)
    faults.pve1.zfs('snapshot {}@0'.format(src))
    sync(faults, src, dst, '--no-snapshot')
    assert bookmarks(faults.pve1, src) == ['0']
    faults.pve1.zfs('destroy {}@0'.format(src))
    for name in ('1', '2', '3'):
        faults.pve1.write_random(src, 1)
        faults.pve1.zfs('snapshot {}@{}'.format(src, name))
    done = sync(faults, src, dst, '--no-snapshot')
    assert 'incremental #0..@1, incremental @1..@3' in done.stdout
    assert names(faults.backup, dst) == ['0', '1', '2', '3']
    assert '3' in bookmarks(faults.pve1, src)
    assert_in_sync(faults, src, dst)

    faults.pve1.zfs('destroy {}@3'.format(src))
    for name in ('4', '5'):
        faults.pve1.write_random(src, 1)
        faults.pve1.zfs('snapshot {}@{}'.format(src, name))
    done = sync(faults, src, dst, '--no-snapshot', '--no-intermediates')
    assert 'incremental #3..@5' in done.stdout
    assert names(faults.backup, dst) == ['0', '1', '2', '3', '5']
    assert_in_sync(faults, src, dst)


def test_creation_order_spaces_and_a_start_from_another_tool(faults):
    """zrepl internal/platformtest/tests/replication.go ReplicationInitialAll
    (snapshots named 3, 2, 1 in that order of creation: the order is ZFS's,
    not the names'), the dataset "foo bar" of zrepl's tests, zfs-autobackup
    tests/test_zfsautobackup.py test_migrate (go on from a snapshot another
    tool sent) and tests/test_zfsautobackup31.py test_exclude_unchanged (a
    rerun with nothing new succeeds and sends nothing)."""
    src = new_zvol(faults, name='foo bar {}'.format(next(_names)))
    dst = destination(src)
    for name in ('3', '2', '1'):
        faults.pve1.write_random(device(src), 1)
        faults.pve1.zfs(shlex.join(['snapshot', src + '@' + name]))
    send = subprocess.Popen(faults.pve1.ssh_argv() + [shlex.join(['zfs', 'send', src + '@3'])],
                            stdout=subprocess.PIPE)
    subprocess.run(faults.backup.ssh_argv() + [shlex.join(['zfs', 'recv', '-u', dst])],
                   stdin=send.stdout, check=True)
    assert send.wait() == 0
    done = sync(faults, src, dst, '--no-snapshot')
    assert 'incremental @3..@1' in done.stdout
    assert names(faults.backup, dst) == ['3', '2', '1']
    assert_in_sync(faults, src, dst)
    done = sync(faults, src, dst, '--no-snapshot')
    assert 'up to date, at @1' in done.stdout
    assert '0 B in' in done.stdout


def test_retention_keeps_the_base_across_failed_runs(faults):
    """zfs-autobackup tests/test_zfsautobackup.py test_keep0 (keeping no
    snapshots never removes the common one) and tests/test_regressions.py
    test_keepsource0target10queuedsend (no thinning before the transfer that
    needs the snapshots): a run that fails prunes nothing on the source."""
    src = new_zvol(faults)
    dst = destination(src)
    sync(faults, src, dst, '--keep-source', '1')
    (base, _), = snapshots(faults.pve1, src)
    faults.backup.write_random(dst, 1)
    changed(faults, src)
    sync(faults, src, dst, '--keep-source', '1', check=1)
    assert names(faults.pve1, src)[0] == base and len(names(faults.pve1, src)) == 2
    time.sleep(1)
    sync(faults, src, dst, '--keep-source', '1', '--rollback')
    (newest, _), = snapshots(faults.pve1, src)
    assert bookmarks(faults.pve1, src) == [newest]
    assert names(faults.backup, dst)[0] == base and names(faults.backup, dst)[-1] == newest
    assert_in_sync(faults, src, dst)


def test_a_partial_receive_of_another_dataset_is_not_resumed(faults):
    """zrepl internal/platformtest/tests/sendArgsValidation.go
    SendArgsValidationResumeTokenDifferentFilesystemForbidden: the resume
    token on the destination names what the source would send; one for
    another dataset is refused, and nothing is sent or aborted."""
    other, src = new_zvol(faults, mib=4), new_zvol(faults)
    dst = destination(src)
    faults.pve1.zfs('snapshot {}@s'.format(other))
    send = subprocess.Popen(faults.pve1.ssh_argv() + ['zfs send {}@s | head -c 1000000'.format(
        other)], stdout=subprocess.PIPE)
    subprocess.run(faults.backup.ssh_argv() + ['zfs recv -s -u ' + dst], stdin=send.stdout,
                   capture_output=True)
    send.wait()
    token = prop(faults.backup, dst, 'receive_resume_token')
    assert token != '-'
    done = sync(faults, src, dst, check=1)
    assert ('it holds a partial receive of {}, not of its source {}, so it is not resumed'
            .format(other, src)) in done.stderr
    assert 'zfs recv -A ' + dst in done.stderr
    assert prop(faults.backup, dst, 'receive_resume_token') == token


def wait_until(check, timeout=120, step=0.5):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(step)
