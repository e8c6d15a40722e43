"""The walls a new admin meets first on the backup host, on the lab: no sudo
rule for planb yet, no OpenZFS yet. Either way the run cannot start: exit 3,
one line that names the host and the fix, and nothing done on the nodes."""
import pytest

from lab.cluster import tool

SYNC = ('sync-pve-guest', '-g', '106', '--sync-zfs-root', 'tank/enc')
SUDOERS = '/etc/sudoers.d/planb'        # where build-image put the rule
ZFS = '/usr/sbin/zfs'


def source_snapshots(lab):
    return lab.pve1.zfs('list -H -o name -t snapshot,bookmark -r rpool/data')


@pytest.fixture
def moved_away(demo):
    """moved_away(path): that file is gone from backup until the test ends."""
    moved = []

    def move(path):
        demo.backup.run('mv {0} {0}.away'.format(path))
        moved.append(path)
    yield move
    for path in moved:
        demo.backup.run('mv {0}.away {0}'.format(path))


def test_no_sudo_rule_here(demo, moved_away):
    before = source_snapshots(demo)
    moved_away(SUDOERS)
    done = tool(demo, *SYNC)
    assert (done.returncode, done.stdout) == (3, '')
    assert done.stderr == (
        'planb-pvesync: error: planb may not run zfs with sudo on this host (backup): '
        'sudo: a password is required; add the line "planb ALL=(root) NOPASSWD: {}" in '
        '/etc/sudoers.d/planb-pvesync (visudo -f /etc/sudoers.d/planb-pvesync); nothing '
        'was done\n'.format(ZFS))
    assert source_snapshots(demo) == before


def test_no_zfs_here(demo, moved_away):
    before = source_snapshots(demo)
    moved_away(ZFS)
    done = tool(demo, *SYNC)
    assert (done.returncode, done.stdout) == (3, '')
    assert done.stderr.startswith(
        'planb-pvesync: error: zfs is not installed on this host (backup), where the '
        'backups are kept; install OpenZFS')
    assert done.stderr.count('\n') == 1
    assert source_snapshots(demo) == before
