"""Command building (pure) and the pipeline runner (real local processes)."""
import fcntl
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planb_pvesync import (
    CommandError, Dataset, DatasetLock, LocalHost, LockError, MissingPrograms, NotSetUp,
    ResumeStep, SendStep, Snapshot, SshHost, SshSettings, Stage, SyncJob, TransferOptions,
    build_transfer, delegated_permissions, ending_with_tool, lock_directory, pipeline_text,
    receive_options, recv_args, remote_command, run_pipeline, send_args, setup_problem,
    transfer_programs)

REPO = Path(__file__).resolve().parent.parent
HOSTILE = ["rpool/data/vm 1@my snap:1", "it's", 'a;b', '$(reboot)', '`x`', 'tab\there']


def test_remote_command_survives_a_shell_word_for_word():
    text = remote_command([['printf', '%s\\n', *HOSTILE]])
    out = subprocess.run(['sh', '-c', text], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [w for word in HOSTILE for w in word.splitlines()]


def test_remote_pipe_fails_when_its_first_command_fails():
    text = remote_command([['sh', '-c', 'echo data; exit 7'], ['cat']])
    assert text.startswith('bash -o pipefail -c ')
    done = subprocess.run(['sh', '-c', text], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (7, 'data\n')


def test_remote_pipe_keeps_hostile_words():
    text = remote_command([['printf', '%s\\n', *HOSTILE], ['cat']])
    out = subprocess.run(['sh', '-c', text], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [w for word in HOSTILE for w in word.splitlines()]


SRC = Dataset('rpool/data/vm-100-disk-0', 'volume')
S1 = Snapshot('my snap:1', guid=1, createtxg=1)
S2 = Snapshot('planb-20261126T010000Z', guid=2, createtxg=2)


def test_send_args():
    assert send_args(SendStep(S1), SRC, raw=False) == [
        'send', '-L', '-c', 'rpool/data/vm-100-disk-0@my snap:1']
    assert send_args(SendStep(S2, base=S1, intermediates=True), SRC, raw=False)[-3:] == [
        '-I', 'rpool/data/vm-100-disk-0@my snap:1', 'rpool/data/vm-100-disk-0@' + S2.name]
    bookmark = Snapshot('b', guid=1, createtxg=1, bookmark=True)
    assert send_args(SendStep(S2, base=bookmark), SRC, raw=False)[-3:-1] == [
        '-i', 'rpool/data/vm-100-disk-0#b']
    assert send_args(SendStep(S1), SRC, raw=True)[:2] == ['send', '-w']
    assert send_args(ResumeStep('1-a-b-c'), SRC, raw=True) == ['send', '-t', '1-a-b-c']


def test_recv_args_never_mount_unless_asked():
    assert recv_args('tank/enc/g/x', {'canmount': 'noauto', 'planb-pvesync:vmid': '106'},
                     excludes=['mountpoint', 'planb-pvesync:source']) == [
        'recv', '-s', '-u', '-v', '-o', 'canmount=noauto',
        '-o', 'planb-pvesync:vmid=106', '-x', 'mountpoint', '-x', 'planb-pvesync:source',
        'tank/enc/g/x']
    assert recv_args('rpool/data/subvol-9-disk-0', {'refquota': '64M'}, mount=True) == [
        'recv', '-s', '-v', '-o', 'refquota=64M', 'rpool/data/subvol-9-disk-0']


ORIGIN_EXCLUDES = ['planb-pvesync:cluster', 'planb-pvesync:node', 'planb-pvesync:storage',
                   'planb-pvesync:volume', 'planb-pvesync:source',
                   'planb-pvesync:restored-from']


def test_a_backup_takes_from_the_stream_nothing_that_could_mount_run_or_reserve():
    job = SyncJob(LocalHost(), 'rpool/data/subvol-200-disk-0', 'tank/enc/ct/x',
                  props=(('vmid', '200'),))
    props, excludes = receive_options(job, Dataset(job.src, 'filesystem'), here=True)
    assert props == {'canmount': 'noauto', 'setuid': 'off', 'exec': 'off', 'devices': 'off',
                     'planb-pvesync:vmid': '200'}
    assert excludes == ['mountpoint', 'sharenfs', 'sharesmb', 'reservation',
                        'refreservation'] + ORIGIN_EXCLUDES
    props, excludes = receive_options(job, Dataset(job.src, 'volume'), here=True)
    assert props == {'volmode': 'dev', 'planb-pvesync:vmid': '200'}
    assert excludes == ['mountpoint', 'reservation', 'refreservation'] + ORIGIN_EXCLUDES


def test_by_delegation_only_what_the_user_may_set_is_excluded():
    job = SyncJob(LocalHost(), 'pool/fs', 'tank/enc/fs', props=(('source', 'h:pool/fs'),))
    props, excludes = receive_options(job, Dataset(job.src, 'filesystem'), here=True,
                                      may_set={'receive', 'canmount', 'reservation'})
    assert props == {'canmount': 'noauto', 'planb-pvesync:source': 'h:pool/fs'}
    assert excludes == ['reservation'] + [
        'planb-pvesync:' + key for key in ('cluster', 'node', 'storage', 'volume', 'vmid',
                                              'restored-from')]


def test_a_restore_sets_what_it_asks_and_leaves_the_rest_to_the_gate():
    restore = SyncJob(LocalHost(), 'tank/enc/ct/x', 'rpool/data/subvol-9-disk-0',
                      receive_props=(('refquota', '64M'),), mount=True)
    assert receive_options(restore, Dataset(restore.src, 'filesystem'), here=False) == (
        {'refquota': '64M'}, [])


ALLOWED = """\
---- Permissions on tank/enc/backups ---------------------------------
Local permissions:
\tuser planb snapshot
Local+Descendent permissions:
\tuser planb create,destroy,mount,receive
\tgroup backup rename
\teveryone send
\tuser planbx rollback
---- Permissions on tank/enc ------------------------------------------
Descendent permissions:
\tuser planb userprop
Create time permissions:
\tdestroy
Permission sets:
\t@backup canmount,volmode
"""


def test_delegated_permissions_on_a_dataset_and_its_ancestors_below_it():
    assert delegated_permissions(ALLOWED, 'planb', {'planb', 'backup'}) == {
        'create', 'destroy', 'mount', 'receive', 'rename', 'send', 'userprop'}
    assert delegated_permissions(ALLOWED, 'other', {'other'}) == {'send'}
    assert delegated_permissions('', 'planb', {'planb'}) == set()


def remote(user='planb'):
    return SshHost('10.99.1.1', SshSettings(user=user, port=2222), '/tmp/ctl')


def test_pull_pipeline_from_a_remote_node():
    stages = build_transfer(remote(), LocalHost(), ['send', '-L', 'a@b'],
                            ['recv', '-s', 'tank/x'], TransferOptions(), 'tank/x', 0)
    assert [s.name for s in stages] == ['10.99.1.1: zfs send | zstd', 'zstd', 'zfs recv']
    ssh = stages[0].argv
    assert ssh[:1] == ['ssh'] and 'BatchMode=yes' in ssh and 'planb@10.99.1.1' in ssh
    assert ssh[ssh.index('-p') + 1] == '2222'
    assert ssh[-2:] == ['--', "bash -o pipefail -c 'sudo -n zfs send -L a@b | "
                        "zstd -3 -T0 -q -c'"]
    assert stages[1].argv == ['zstd', '-d', '-q', '-c']


def test_options_change_the_stages():
    opts = TransferOptions(compress='none', mbuffer='256M', progress=True)
    stages = build_transfer(remote('root'), LocalHost(), ['send', 'a@b'],
                            ['recv', 'tank/x'], opts, 'tank/x', 12345)
    assert stages[0].argv[-1] == 'zfs send a@b'          # root: no sudo, no pipe
    assert [s.name for s in stages[1:]] == ['mbuffer', 'pv', 'zfs recv']
    assert stages[2].argv[-2:] == ['-s', '12345'] and stages[2].show_stderr


def test_push_pipeline_to_a_remote_node():
    opts = TransferOptions(mbuffer='64M', bwlimit='10M')
    stages = build_transfer(LocalHost(), remote(), ['send', 'tank/x@s'],
                            ['recv', 'rpool/data/vm-9-disk-0'], opts, 'vm-9-disk-0', 0)
    assert [s.name for s in stages] == [
        'zfs send', 'pv', 'zstd', '10.99.1.1: zstd | mbuffer | zfs recv']
    assert stages[-1].argv[-1] == (
        "bash -o pipefail -c 'zstd -d -q -c | mbuffer -q -s 128k -m 64M | "
        "sudo -n zfs recv rpool/data/vm-9-disk-0'")


def remote_text(host, cmd, needs):
    """What `host` would send to the node's shell for `cmd` with `needs`."""
    stage, = host.stages([cmd], needs)
    return stage.argv[-1]


def test_a_remote_command_first_names_every_program_missing_there():
    host = SshHost('pve1', SshSettings(user='planb'), '/tmp')
    text = remote_text(host, ['echo', 'listing'], ['sh', 'nosuch-a', 'nosuch-b'])
    done = subprocess.run(['sh', '-c', text], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (127, '')
    assert done.stderr == 'planb-pvesync: not installed: nosuch-a nosuch-b\n'
    done = subprocess.run(['sh', '-c', remote_text(host, ['echo', 'listing'], ['sh'])],
                          capture_output=True, text=True, check=True)
    assert done.stdout == 'listing\n'


def test_a_local_command_needing_a_missing_program_does_not_start():
    with pytest.raises(MissingPrograms, match='not installed: nosuch-a'):
        LocalHost().run(['true'], needs=['sh', 'nosuch-a'])
    assert LocalHost().run(['echo', 'ok'], needs=['sh']) == 'ok\n'


def test_each_side_checks_the_programs_it_runs():
    opts = TransferOptions(mbuffer='64M', progress=True)
    node, here = remote(), LocalHost()
    assert [(h.name, p) for h, p in transfer_programs(opts, node, here)] == [
        ('planb@10.99.1.1', ['zstd']), ('localhost', ['zstd', 'mbuffer', 'pv'])]
    assert [(h.name, p) for h, p in transfer_programs(opts, here, node)] == [
        ('localhost', ['zstd', 'pv']), ('planb@10.99.1.1', ['zstd', 'mbuffer'])]


def test_a_local_source_is_not_compressed():
    stages = build_transfer(LocalHost(), LocalHost(), ['send', 'a@b'], ['recv', 'x'],
                            TransferOptions(), 'x', 0)
    assert [s.name for s in stages] == ['zfs send', 'zfs recv']


def test_pipeline_text_is_pasteable():
    stages = [Stage('a', ['echo', "it's"]), Stage('b', ['tr', 'a-z', 'A-Z'])]
    assert pipeline_text(stages) == "echo 'it'\"'\"'s' | tr a-z A-Z"
    out = subprocess.run(['sh', '-c', pipeline_text(stages)], capture_output=True,
                         text=True, check=True)
    assert out.stdout == "IT'S\n"


def test_run_pipeline_passes_data_between_processes():
    out = run_pipeline([Stage('seq', ['seq', '100000']), Stage('wc', ['wc', '-l'])],
                       capture=True)
    assert out.strip() == '100000'


def test_run_pipeline_names_the_stage_that_failed_first_in_its_own_words():
    with pytest.raises(CommandError) as exc:
        run_pipeline([Stage('pve1: zfs send', ['sh', '-c', 'echo boom >&2; exit 3']),
                      Stage('zstd', ['sh', '-c', 'cat >/dev/null; echo truncated >&2; exit 1']),
                      Stage('zfs recv', ['cat'])])
    assert str(exc.value) == 'pve1: zfs send failed (exit 3): boom; then zstd failed (exit 1)'
    assert exc.value.stderr == 'boom\ntruncated'


def test_a_receive_failure_is_told_without_the_warnings_of_properties_excluded_on_purpose():
    said = ("Warning: tank/enc/v1: property 'mountpoint' does not apply to datasets of this "
            "type\ncannot receive incremental stream: out of space")
    with pytest.raises(CommandError) as exc:
        run_pipeline([Stage('zfs recv', ['sh', '-c', 'printf "%s\\n" "$0" >&2; exit 1', said])])
    assert str(exc.value) == ('zfs recv failed (exit 1): cannot receive incremental stream: '
                              'out of space')


def test_the_receiver_failing_while_the_sender_still_sends_is_the_cause():
    """zrepl's ReplicationReceiverErrorWhileStillSending: the receiving end
    gives up mid-stream; the stages before it then fail on the closed pipe,
    and a stage that ignores SIGPIPE (as ssh does) fails with an exit status
    of its own. The message still starts with the receiver, in its words,
    not with zfs recv's hint on resuming by hand."""
    recv = ('head -c 100000 >/dev/null; printf "%s\\n" "cannot receive new filesystem '
            'stream: out of" "space" "Partially received snapshot is saved." '
            '"A resuming stream can be generated on the sending system by running:" '
            '"    zfs send -t 1-abc" >&2; exit 1')
    for relay in ('cat; exit 255', 'cat 2>/dev/null; sleep 0.2; exit 255'):
        with pytest.raises(CommandError) as exc:
            run_pipeline([Stage('pve1: zfs send | zstd', ['yes']),
                          Stage('relay', ['sh', '-c', 'trap "" PIPE; ' + relay]),
                          Stage('zfs recv', ['sh', '-c', recv])])
        assert str(exc.value) == ('zfs recv failed (exit 1): cannot receive new filesystem '
                                  'stream: out of space; then relay failed (exit 255)')


@pytest.mark.parametrize('said, code', [
    ('bash: line 1: 1186 Killed | zstd -3 -T0 -q -c', 137),
    ('client_loop: send disconnect: Broken pipe', 255)])
def test_a_stage_that_only_saw_its_input_end_is_not_the_cause(said, code):
    """The source end closes its output, then takes a moment to report why
    (as ssh does with a remote command's exit status, or a link that broke);
    the decompressor reading from it ends first, but only says its input
    ended."""
    with pytest.raises(CommandError) as exc:
        run_pipeline([Stage('pve1: zfs send | zstd', ['sh', '-c', 'exec >&-; sleep 0.3; echo '
                                                      '"$0" >&2; exit $1', said, str(code)]),
                      Stage('zstd', ['sh', '-c', 'cat >/dev/null; echo "zstd: /*stdin*\\: '
                                     'unexpected end of file" >&2; exit 1'])])
    assert str(exc.value) == ('pve1: zfs send | zstd failed (exit {}): {}; then zstd failed '
                              '(exit 1)'.format(code, said))


def test_a_stage_killed_by_a_signal_says_so():
    with pytest.raises(CommandError, match=r'^sleep failed \(killed by SIGKILL\): no error'):
        run_pipeline([Stage('sleep', ['sh', '-c', 'kill -KILL $$'])])


def test_a_broken_pipe_is_not_the_cause():
    with pytest.raises(CommandError) as exc:
        run_pipeline([Stage('yes', ['yes']), Stage('head', ['sh', '-c', 'exit 4'])])
    assert str(exc.value) == 'head failed (exit 4): no error output'


def test_run_pipeline_missing_program():
    with pytest.raises(CommandError, match='nope failed .exit 127.: '
                       '/nonexistent/program: No such file or directory'):
        run_pipeline([Stage('seq', ['seq', '10']), Stage('nope', ['/nonexistent/program'])])


# A run with pipelines in the main thread and in two worker threads (as --jobs
# makes), stopped by a signal sent to it alone, not to its children.
STOPPED_RUN = '''
import sys, threading
import planb_pvesync as p

stages = [p.Stage('sleep', ['sleep', '300']), p.Stage('cat', ['cat'])]

def lane():
    try:
        p.run_pipeline(stages)
    except p.Stopped:
        print('lane stopped', flush=True)

with p.handle_stop_signals():
    lanes = [threading.Thread(target=lane) for _ in range(2)]
    try:
        for thread in lanes:
            thread.start()
        p.run_pipeline(stages)
    except p.Stopped as exc:
        for thread in lanes:
            thread.join()
        sys.exit(p.EXIT_STOPPED + exc.signum)
'''


def processes(**match):
    """{pid: command} of the processes whose /proc/PID/stat fields match,
    e.g. ppid=123 or session=123."""
    fields = ('state', 'ppid', 'pgrp', 'session')
    found = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/{}/stat'.format(pid)) as stat:
                name, rest = stat.read().rsplit(')', 1)
        except OSError:
            continue
        values = dict(zip(fields, rest.split()))
        if all(values[key] == str(value) for key, value in match.items()):
            found[int(pid)] = name.split('(', 1)[1]
    return found


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_ends_the_pipelines_of_every_thread(signum):
    run = subprocess.Popen([sys.executable, '-c', STOPPED_RUN], stdout=subprocess.PIPE,
                           text=True, start_new_session=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 60        # a guard against a hang, no timing
    while list(processes(ppid=run.pid).values()).count('sleep') < 3:
        assert run.poll() is None and time.monotonic() < deadline, 'no three pipelines'
        time.sleep(0.05)
    os.kill(run.pid, signum)
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 128 + signum
    assert out.count('lane stopped') == 2     # two threads print: lines may interleave
    assert processes(session=run.pid) == {}


@pytest.mark.parametrize('failure, says', [
    (('zfs list', 1, 'sudo: a password is required'),
     'planb may not run zfs with sudo on this host (backup): sudo: a password is required; '
     'add the line "planb ALL=(root) NOPASSWD: /usr/sbin/zfs" in '
     '/etc/sudoers.d/planb-pvesync (visudo -f /etc/sudoers.d/planb-pvesync); nothing was done'),
    (('zfs list', 1, 'Sorry, try again.\nsudo: planb is not in the sudoers file.'),
     'planb may not run zfs with sudo on this host (backup): sudo: planb is not in the'),
    (('zfs list', 127, 'zfs: No such file or directory'),
     'zfs is not installed on this host (backup), where the backups are kept; install OpenZFS'),
    (('zfs list', 1, 'sudo: zfs: command not found'),
     'zfs is not installed on this host (backup)'),
    (('zfs list', 127, 'sudo: No such file or directory'),
     'sudo is not installed on this host (backup); install it (apt-get install sudo), then '
     'add the line "planb ALL=(root) NOPASSWD: /usr/sbin/zfs"'),
])
def test_a_host_without_zfs_or_its_sudo_rule_is_named_with_the_fix(failure, says):
    assert says in setup_problem(failure, 'planb', 'backup', '/usr/sbin/zfs')


@pytest.mark.parametrize('err', ['sudo: a password is required',
                                 'sudo: No such file or directory'])
def test_sudo_refusing_a_zfs_that_is_not_there_is_no_zfs(err):
    """sudo -n says a password is required for a program it does not find."""
    assert setup_problem(('zfs list', 1, err), 'planb', 'backup', None).startswith(
        'zfs is not installed on this host (backup)')


@pytest.mark.parametrize('err', ["cannot open 'tank/x': dataset does not exist",
                                 'internal error: out of memory', ''])
def test_other_failures_are_no_setup_problem(err):
    assert setup_problem(('zfs list', 1, err), 'planb', 'backup', '/usr/sbin/zfs') is None


def test_a_local_zfs_list_without_zfs_cannot_start(monkeypatch):
    """This machine has no zfs: as root the exec fails, as anyone else sudo
    -n refuses or finds none; either way NotSetUp, exit 3."""
    monkeypatch.setenv('PATH', '/nonexistent')
    host = LocalHost()
    host.sudo = []
    with pytest.raises(NotSetUp) as exc:
        host.run(host.zfs('list', '-H', 'tank'))
    assert exc.value.exit_code == 3 and 'zfs is not installed on this host' in str(exc.value)


# A run killed with SIGKILL, as PlanB's task timeout kills it: a pipeline in a
# worker thread, and one in the main thread whose stage shrugs off a SIGTERM
# until told to go (as a receive still writing what it got would), both with
# the lock of their dataset.
KILLED_RUN = '''
import sys, threading
import planb_pvesync as p

lock = p.DatasetLock(sys.argv[1], 'tank/enc/x')
assert lock.acquire(wait=False)

def lane():
    with p.RUNNING.holding([lock.fd]):
        p.run_pipeline([p.Stage('tail', ['tail', '-f', '/dev/null']), p.Stage('cat', ['cat'])])

threading.Thread(target=lane).start()
with p.RUNNING.holding([lock.fd]):
    p.run_pipeline([p.Stage('slow', ['sh', '-c', 'trap "" TERM; echo started; '
                                     'while [ ! -e "$0" ]; do sleep 0.1; done', sys.argv[2]])])
'''


def lock_is_free(path):
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def test_a_killed_run_ends_its_stages_and_keeps_the_lock_until_the_last_is_gone(tmp_path):
    locks, release = tmp_path / 'locks', tmp_path / 'release'
    locks.mkdir(mode=0o700)
    run = subprocess.Popen([sys.executable, '-c', KILLED_RUN, str(locks), str(release)],
                           start_new_session=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 60        # a guard against a hang, no timing

    def wait_for(condition, what):
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    wait_for(lambda: {'tail', 'cat', 'sh'} <= set(processes(session=run.pid).values()),
             'no stages')
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    wait_for(lambda: not {'tail', 'cat'} & set(processes(session=run.pid).values()),
             'a stage outlived the run')
    assert 'sh' in processes(session=run.pid).values()
    lock = locks / 'tank%enc%x.lock'
    assert not lock_is_free(lock)       # the shell still holds it
    release.touch()
    wait_for(lambda: processes(session=run.pid) == {}, 'a stage outlived the run')
    assert lock_is_free(lock)


def test_the_lock_directory_is_the_user_s_own_with_mode_0700(tmp_path):
    made = lock_directory(str(tmp_path / 'locks'))
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    os.chmod(made, 0o755)
    with pytest.raises(LockError, match=r'may be used by others \(mode 755\), so it cannot '
                                        r'hold the locks; chmod 700 '):
        lock_directory(made)


def test_a_lock_file_that_is_a_link_is_neither_followed_nor_used(tmp_path):
    locks = lock_directory(str(tmp_path / 'locks'))
    victim = tmp_path / 'victim'
    victim.write_text('keep me\n')
    lock = DatasetLock(locks, 'tank/enc/x')
    os.symlink(victim, lock.path)
    with pytest.raises(LockError, match='is a symbolic link, which a lock never follows'):
        lock.acquire(wait=False)
    os.unlink(lock.path)
    os.link(victim, lock.path)
    with pytest.raises(LockError, match='is not a plain file of your own'):
        lock.acquire(wait=False)
    assert victim.read_text() == 'keep me\n'


def test_a_stage_ends_with_the_tool_and_sudo_passes_the_signal_on():
    assert ending_with_tool(['zstd', '-d']) == ['setpriv', '--pdeathsig', 'TERM', '--',
                                                'zstd', '-d']
    assert ending_with_tool(['sudo', '-n', 'zfs', 'recv', 'x'])[4:] == [
        'timeout', '--foreground', '0', 'sudo', '-n', 'zfs', 'recv', 'x']
