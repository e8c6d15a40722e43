"""Installing, scheduling and uninstalling as README.rst says. The commands
of its Install section run as root on this machine, then the installed
command runs as user planb against the PVE API double, and its man page
opens; the units of contrib/systemd are checked with systemd-analyze; last,
the commands of its Uninstall section run, and leave nothing behind.

That changes the machine (Debian packages, /opt/planb-pvesync,
/usr/local/bin/planb-pvesync, the man page, the user planb), so it runs in CI
(CI=true, where a skip is a failure) and elsewhere only with
PLANB_TEST_INSTALL=1. Checking the units' command lines needs none of it and
always runs."""
import grp
import os
import pwd
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

import planb_pvesync
from pve_double import PveDouble

HERE = Path(__file__).parent
REPO = HERE.parent
FIXTURE = HERE / 'fixtures' / 'cluster.json'
UNITS = REPO / 'contrib' / 'systemd'
EXAMPLE_CONF = REPO / 'contrib' / 'planb-pvesync.conf'
INSTALLED = '/usr/local/bin/planb-pvesync'
# What root's shell has on a fresh Debian machine: no pyenv, no virtualenv.
ROOT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
USER = 'planb'
UPGRADE_MARK = '# a change that the upgrade commands must install\n'


def readme_blocks(section):
    """The literal blocks (the indented text after '::') of a README section."""
    text = (REPO / 'README.rst').read_text()
    match = re.search(r'^{}\n-+\n(.*?)(?=^\S[^\n]*\n-+\n|\Z)'.format(re.escape(section)),
                      text, re.M | re.S)
    lines, blocks = match.group(1).splitlines(), []
    for i, line in enumerate(lines):
        if line.endswith('::'):
            block = []
            for following in lines[i + 1:]:
                if following.strip() and not following.startswith(' '):
                    break
                block.append(following)
            blocks.append(textwrap.dedent('\n'.join(block)).strip() + '\n')
    return blocks


def install_commands():
    return next(b for b in readme_blocks('Install') if 'python3 -m venv' in b)


def upgrade_commands():
    return next(b for b in readme_blocks('Install') if b.startswith('git pull'))


def uninstall_commands():
    return next(b for b in readme_blocks('Uninstall') if 'rm -rf /opt/planb-pvesync' in b)


# Where an install of the tool leaves anything (the Debian packages aside).
INSTALL_ROOTS = ('/etc', '/opt', '/usr/local', '/var/lib', '/run/lock')


def traces():
    """What of planb-pvesync and its user is on this machine."""
    found = subprocess.run(['find', *INSTALL_ROOTS, '-xdev', '-iname', '*planb*'],
                           capture_output=True, text=True).stdout.split()
    users = [name for name in (USER,) if name in {u.pw_name for u in pwd.getpwall()}]
    groups = [name for name in (USER,) if name in {g.gr_name for g in grp.getgrall()}]
    return sorted(found), users, groups


def git(cwd, *args):
    return subprocess.run(['git', '-c', 'user.name=test', '-c', 'user.email=test@localhost',
                           *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def clone_of_this_tree(tmp):
    """(origin, checkout): a repository of this working tree as it is, uncommitted
    changes included, and a git clone of it, as a user has."""
    origin, checkout = tmp / 'origin', tmp / 'planb-pvesync'
    names = git(REPO, 'ls-files', '-z', '--cached', '--others', '--exclude-standard')
    for name in filter(None, names.split('\0')):
        if (REPO / name).is_file():         # not deleted in the working tree
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, origin / name)
    git(origin, 'init', '-q')
    git(origin, 'add', '-A')
    git(origin, 'commit', '-q', '-m', 'this working tree')
    git(tmp, 'clone', '-q', str(origin), str(checkout))
    return origin, checkout


def run_as_root(commands, cwd):
    """Run README lines as root would paste them, stopping at the first that
    fails; apt-get's question is answered yes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('VIRTUAL_ENV', 'PYTHONPATH', 'PYTHONHOME')}
    env.update(PATH=ROOT_PATH, HOME='/root')
    result = subprocess.run(['bash', '-e', '-x', '-c', commands], cwd=cwd, env=env,
                            input='y\n', capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def as_planb(command):
    """(exit status, stdout, stderr) of `command` in a login shell of planb."""
    result = subprocess.run(['runuser', '-l', USER, '-c', command],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
    """(origin, checkout) after the README's install commands ran in the checkout."""
    in_ci = os.environ.get('CI') == 'true'
    if not in_ci and os.environ.get('PLANB_TEST_INSTALL') != '1':
        pytest.skip('installs into this machine (packages, /opt, /usr/local/bin, user '
                    'planb): runs in CI or with PLANB_TEST_INSTALL=1')
    if os.geteuid() != 0:
        (pytest.fail if in_ci else pytest.skip)('the install commands run as root')
    origin, checkout = clone_of_this_tree(tmp_path_factory.mktemp('install'))
    before = traces()
    run_as_root(install_commands(), checkout)
    return origin, checkout, before


@pytest.fixture
def planb_rc(checkout):
    """Write ~planb/.proxmoxrc for the API double; removed afterwards."""
    path = Path(pwd.getpwnam(USER).pw_dir) / '.proxmoxrc'
    if path.exists():
        pytest.fail('{} exists; the test does not overwrite it'.format(path))

    def write(text):
        path.write_text(text)
        path.chmod(0o600)
        shutil.chown(path, USER, USER)
    yield write
    path.unlink(missing_ok=True)


def test_planb_has_the_command(checkout):
    version = re.search(r"^__version__ = '(.+)'",
                        (checkout[1] / 'planb_pvesync.py').read_text(), re.M).group(1)
    assert as_planb('command -v planb-pvesync') == (0, INSTALLED + '\n', '')
    assert as_planb('planb-pvesync --version') == (0, 'planb-pvesync {}\n'.format(version), '')
    code, out, err = as_planb('planb-pvesync --help')
    assert (code, err) == (0, '') and 'sync-pve-guest' in out


def test_proxmoxer_is_new_enough_and_requests_comes_from_the_system(checkout):
    code, out, err = as_planb(
        "/opt/planb-pvesync/bin/python3 -c 'import proxmoxer, requests; "
        "print(proxmoxer.__version__, requests.__file__)'")
    assert (code, err) == (0, '')
    proxmoxer_version, requests_file = out.split()
    assert int(proxmoxer_version.split('.')[0]) >= 2
    assert not requests_file.startswith('/opt/planb-pvesync/')


def test_planb_lists_the_guests_of_the_double(checkout, planb_rc):
    with PveDouble(FIXTURE) as pve:
        planb_rc('[pve:demo]\napi=https://planb@pve:planbpass@127.0.0.1:{}\n'
                 'fingerprint={}\nssh_user=planb\n'.format(pve.port, pve.fingerprint))
        code, out, err = as_planb('planb-pvesync list-pve-guests')
    assert (code, err) == (0, '')
    assert out == (HERE / 'expected' / 'list-pve-guests.txt').read_text()


@pytest.mark.parametrize('unit', ['planb-pvesync-sync@demo.service',
                                  'planb-pvesync-sync@demo.timer',
                                  'planb-pvesync-status@demo.service',
                                  'planb-pvesync-status@demo.timer'])
def test_systemd_accepts_the_units(checkout, unit):
    """With the command installed, as the services expect it; not a word of
    complaint (systemd-analyze exits 0 after some)."""
    result = subprocess.run(['systemd-analyze', 'verify', str(UNITS / unit)],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, '')


def test_the_man_page_opens(checkout):
    code, out, err = as_planb('MANPAGER=cat MANWIDTH=80 man planb-pvesync')
    assert (code, err) == (0, '')
    for heading in ('SYNOPSIS', 'COMMANDS', 'OPTIONS', 'CONFIGURATION', 'EXIT STATUS',
                    'DIAGNOSTICS', 'FILES', 'EXAMPLES'):
        assert '\n' + heading + '\n' in out
    assert 'planb-pvesync sync-pve-guest -g VMID|NAME' in out


def test_upgrade_installs_what_git_pull_brings(checkout):
    origin, clone, _ = checkout
    with open(origin / 'planb_pvesync.py', 'a') as fp:
        fp.write(UPGRADE_MARK)
    git(origin, 'commit', '-q', '-a', '-m', 'a change, the version unchanged')
    run_as_root(upgrade_commands(), clone)
    code, module, err = as_planb(
        "/opt/planb-pvesync/bin/python3 -c 'import planb_pvesync; print(planb_pvesync.__file__)'")
    assert (code, err) == (0, '')
    assert Path(module.strip()).read_text().endswith(UPGRADE_MARK)


def exec_start(unit, instance, env):
    """The argv systemd runs for a unit's ExecStart=: %i replaced, ${VAR} one
    word, $VAR split at white space."""
    line = next(line for line in unit.read_text().splitlines()
                if line.startswith('ExecStart='))
    argv = []
    for word in line[len('ExecStart='):].replace('%i', instance).split():
        if re.fullmatch(r'\$\w+', word):
            argv += env.get(word[1:], '').split()
        else:
            argv.append(re.sub(r'\$\{(\w+)\}', lambda m: env.get(m.group(1), ''), word))
    return argv


@pytest.mark.parametrize('service, command', [('planb-pvesync-sync@.service', 'sync-pve-guest'),
                                              ('planb-pvesync-status@.service', 'status')])
def test_services_run_the_installed_command_with_options_it_takes(service, command):
    env = dict(line.split('=', 1) for line in EXAMPLE_CONF.read_text().splitlines()
               if line and not line.startswith('#'))
    argv = exec_start(UNITS / service, 'demo', env)
    assert argv[0] == INSTALLED
    args = planb_pvesync.build_parser().parse_args(argv[1:])
    assert (args.command, args.sync_zfs_root) == (command, 'tank/enc')


def test_uninstall_leaves_nothing_behind(checkout):
    """Last in this file: after it, nothing is installed. (The backups, which
    the README's uninstall leaves, are on ZFS, which this machine has not.)"""
    _, clone, before = checkout
    assert traces() != before
    run_as_root(uninstall_commands(), clone)
    assert traces() == before
