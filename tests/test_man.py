"""The man page: man/build.py builds it (docutils' warnings are errors), and
man -l renders it without a complaint, with every section and every command."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import planb_pvesync

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ('SYNOPSIS', 'DESCRIPTION', 'COMMANDS', 'OPTIONS', 'CONFIGURATION', 'EXIT STATUS',
            'DIAGNOSTICS', 'FILES', 'EXAMPLES', 'SEE ALSO')


@pytest.fixture(scope='module')
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp('man') / 'planb-pvesync.8'
    done = subprocess.run([sys.executable, str(REPO / 'man' / 'build.py'), str(out)],
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, '')
    return out


@pytest.fixture(scope='module')
def rendered(page):
    if shutil.which('man') is None:
        (pytest.fail if os.environ.get('CI') == 'true' else pytest.skip)(
            'man renders the page: apt-get install man-db')
    env = dict(os.environ, MANWIDTH='100', MANROFFOPT='-ww', LC_ALL='C.UTF-8')
    done = subprocess.run(['man', '-l', str(page)], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stderr) == (0, '')
    return done.stdout


def test_it_names_itself_in_section_8(page):
    head = next(line for line in page.read_text().splitlines() if line.startswith('.TH '))
    # docutils 0.19 (Debian 12's, which the install uses) writes PLANB-PVESYNC 8,
    # newer ones "planb-pvesync" "8".
    assert [word.strip('"').lower() for word in head.split()[1:3]] == ['planb-pvesync', '8']
    assert planb_pvesync.__version__ in head


def test_man_renders_every_section(rendered):
    lines = rendered.splitlines()
    assert [s for s in SECTIONS if s not in lines] == []


def test_every_command_with_its_synopsis_and_options(rendered):
    text = ' '.join(rendered.split())
    for name, command in planb_pvesync.COMMANDS.items():
        usage = ' '.join(filter(None, ['planb-pvesync', name, command.synopsis, '[OPTIONS]']))
        assert usage in text
    for option in ('--snapshot-prefix PREFIX', '--keep-destination SCHEDULE|all',
                   '--max-age HOURS', '--partition N', '--template-storage STORAGE'):
        assert option in text


def test_readme_parts_are_in_it(rendered):
    text = ' '.join(rendered.split())
    assert 'One [pve:NAME] section per cluster' in text           # CONFIGURATION
    assert 'stopped by SIGTERM' in text                            # EXIT STATUS
    assert 'api= has a colon where the @ before the host belongs' in text    # DIAGNOSTICS
    assert '/etc/cron.d/planb-pvesync' in text                     # EXAMPLES
