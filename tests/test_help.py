"""What each command's --help offers, and the options checked when they are
given: every command shows the options it takes, each with a description, and
no other; an option of another command, before or after the command's name,
is refused as such; a bad value of --bwlimit, --mbuffer or --snapshot-prefix
stops the run before it starts."""
import re
from pathlib import Path

import pytest

import planb_pvesync

README = Path(__file__).resolve().parent.parent / 'README.rst'
PRE_COMMAND = {'-f', '-p', '-g', '--sync-zfs-root', '-v', '--debug', '-q'}
CONFIG, VERBOSE = {'-f', '-p'}, {'-v', '--debug'}
SELECTION = {'-g', '--all', '--pool', '--tag', '--exclude', '--include-templates'}
TRANSFER = {'-n', '--compress', '--mbuffer', '--bwlimit', '--progress', '--lock-dir'}
SYNC = TRANSFER | {'--no-intermediates', '--rollback', '--destroy-diverged', '--keep-source',
                   '--json'}
PLANB_DECIDES = {'--snapshot-prefix', '--no-snapshot', '--snapshot-reuse-age', '--wait',
                 '--keep-destination', '--thin-foreign-snapshots'}
JOBS = {'-j', '--jobs-per-node'}
# Each command's options, by the first name of each (-h left out).
TAKES = {
    'list-pve-hosts': CONFIG | VERBOSE | {'--json'},
    'list-pve-filestores': CONFIG | VERBOSE | {'--json'},
    'list-pve-guests': CONFIG | VERBOSE | SELECTION | {'--json'},
    'sync-pve-guest': CONFIG | VERBOSE | SELECTION | SYNC | PLANB_DECIDES | JOBS | {
        '--sync-zfs-root', '-q', '--fsfreeze'},
    'status': CONFIG | VERBOSE | SELECTION | {'--sync-zfs-root', '-q', '--json', '--max-age',
                                              '--warn-age', '--prometheus-file'},
    'sync-filesystem': VERBOSE | SYNC | PLANB_DECIDES | {'-q'},
    'list-planb-filesets': CONFIG | VERBOSE | SELECTION | {'--json'},
    'planb-transport': CONFIG | VERBOSE | SYNC | JOBS | {'-q', '--fsfreeze'},
    'list-restore-points': CONFIG | VERBOSE | {'-g', '--sync-zfs-root', '--json'},
    'restore-pve-guest': CONFIG | VERBOSE | TRANSFER | {
        '-g', '--sync-zfs-root', '--at', '--volume', '--node', '--storage', '--vmid',
        '--keep-macs', '--start', '--disks-only', '--template-storage'},
    'mount-restore-point': CONFIG | VERBOSE | {'-g', '--sync-zfs-root', '--at', '--volume',
                                               '--partition'},
    'unmount-restore-point': VERBOSE | {'--sync-zfs-root', '--all'},
}


def help_text(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        planb_pvesync.main(list(argv))
    assert exc.value.code == 0
    return capsys.readouterr().out


def options_in_help(text):
    """{first option name: its description} of a --help text."""
    section = text.split('\noptions:\n', 1)[1].split('\n\n', 1)[0]
    options, name = {}, None
    for line in section.splitlines():
        if line.startswith('  -'):
            invocation, _, description = line[2:].partition('  ')
            name = invocation.split()[0].rstrip(',')
            options[name] = description.strip()
        else:                       # the description goes on, or starts here
            options[name] = (options[name] + ' ' + line.strip()).strip()
    del options['-h']
    return options


def test_every_command_is_in_the_table():
    assert set(TAKES) == set(planb_pvesync.COMMANDS)


@pytest.mark.parametrize('command', sorted(TAKES))
def test_help_shows_what_the_command_takes_each_described(capsys, command):
    options = options_in_help(help_text(capsys, command, '--help'))
    assert set(options) == TAKES[command]
    assert [name for name, text in options.items() if not text] == []


def test_main_help_shows_the_options_that_may_stand_before_the_command(capsys):
    options = options_in_help(help_text(capsys, '--help'))
    assert set(options) == PRE_COMMAND | {'--version'}
    assert options['-f'] == 'the config file (default: ~/.proxmoxrc)'


@pytest.mark.parametrize('argv, option', [
    (['-g', '106', 'list-pve-hosts'], '-g/--pve-guest'),
    (['list-pve-filestores', '--sync-zfs-root', 'tank/enc'], '--sync-zfs-root'),
    (['--sync-zfs-root=tank/enc', 'list-pve-filestores'], '--sync-zfs-root'),
    (['sync-filesystem', '-g', '106', 'pve1:rpool/x', 'tank/x'], '-g/--pve-guest'),
    (['-p', 'demo', 'sync-filesystem', 'pve1:rpool/x', 'tank/x'], '-p/--pve-cluster'),
    (['-q', 'list-pve-guests'], '-q/--quiet'),
])
def test_an_option_of_other_commands_is_refused_as_such(capsys, argv, option):
    with pytest.raises(SystemExit) as exc:
        planb_pvesync.main(argv)
    err = capsys.readouterr().err
    command = next(word for word in argv if word in planb_pvesync.COMMANDS)
    assert exc.value.code == 2
    assert err == 'planb-pvesync {0}: error: {1} is not an option of {0} (see planb-pvesync ' \
                  '{0} --help)\n'.format(command, option)


def test_sync_filesystem_takes_no_jobs(capsys):
    with pytest.raises(SystemExit) as exc:
        planb_pvesync.main(['sync-filesystem', '-j', '2', 'pve1:rpool/x', 'tank/x'])
    assert exc.value.code == 2 and 'unrecognized arguments: -j' in capsys.readouterr().err


@pytest.mark.parametrize('option, value, says', [
    ('--bwlimit', 'fast', "argument --bwlimit: 'fast' is no rate"),
    ('--bwlimit', '1.5M', "argument --bwlimit: '1.5M' is no rate"),
    ('--bwlimit', '0', "argument --bwlimit: '0' is no rate"),
    ('--mbuffer', 'big', "argument --mbuffer: 'big' is no buffer size"),
    ('--snapshot-prefix', 'a b', "argument --snapshot-prefix: 'a b' is no snapshot prefix"),
    ('--snapshot-prefix', 'x@y', "argument --snapshot-prefix: 'x@y' is no snapshot prefix"),
    ('--snapshot-prefix', '-x', "argument --snapshot-prefix: '-x' is no snapshot prefix"),
])
def test_bad_values_stop_the_run_before_it_starts(capsys, option, value, says):
    """Refused by the parser: no config read, no API call, no zfs list."""
    with pytest.raises(SystemExit) as exc:
        planb_pvesync.main(['-f', '/nonexistent', 'sync-pve-guest', '--all', '--sync-zfs-root',
                            'tank/enc', option + '=' + value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and says in err and err.count('\n') == 1


@pytest.mark.parametrize('option, value', [
    ('--bwlimit', '50M'), ('--bwlimit', '512k'), ('--bwlimit', '1000000'),
    ('--mbuffer', '256M'), ('--mbuffer', '1G'), ('--mbuffer', '5%'),
    ('--snapshot-prefix', 'nightly'), ('--snapshot-prefix', 'site_b.x:y-2'),
])
def test_good_values_pass(option, value):
    args = planb_pvesync.build_parser().parse_args(['sync-filesystem', option, value, 'a/b', 'c/d'])
    assert getattr(args, option[2:].replace('-', '_')) == value


@pytest.mark.parametrize('command', sorted(TAKES))
def test_synopsis_names_only_what_the_command_takes(command):
    synopsis = planb_pvesync.COMMANDS[command].synopsis
    named = set(re.findall(r'(?<![\w-])(--?[a-z][-a-z]*)', synopsis))
    assert named <= TAKES[command]
    parser = planb_pvesync.build_parser().commands[command]
    positionals = [a.metavar for a in parser.added if not a.option_strings]
    assert all(re.search(r'\b{}\b'.format(name), synopsis) for name in positionals)


def test_readme_gives_each_command_with_its_synopsis():
    """The terms of README.rst's Commands section are the commands' usage
    lines, so that they cannot drift apart."""
    text = README.read_text()
    section = re.search(r'^Commands\n-+\n(.*?)^\S[^\n]*\n-+\n', text, re.M | re.S).group(1)
    terms = re.findall(r'^``([a-z][a-z-]*)((?: [^`]+)?)``.*\n    ', section, re.M)
    assert {name: synopsis.strip() for name, synopsis in terms} == {
        name: command.synopsis for name, command in planb_pvesync.COMMANDS.items()}
