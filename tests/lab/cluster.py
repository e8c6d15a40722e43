"""The demo cluster on the lab, as a PVE cluster would look to the tool.

The PVE API double serves tests/fixtures/cluster.json on pve1:8006; the disks
its guests name exist as datasets on pve1 and pve2; planb on backup has a
~/.proxmoxrc that pins the double's certificate and logs in as planb@pve.
"""
import json
import re
import shlex
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
FIXTURE = TESTS / 'fixtures' / 'cluster.json'
DOUBLE_DIR = '/opt/pve-double'
DOUBLE_LOG = '/var/log/pve-double.log'

# The datasets behind the default fixture's ZFS volumes: (dataset, MiB);
# MiB None is a filesystem (an LXC subvol). pve3 is offline: it has none.
DEMO_DATASETS = {
    'pve1': [('rpool/data/base-100-disk-0', 8), ('rpool/data/vm-106-disk-0', 8),
             ('rpool/data/vm-106-disk-1', 4), ('rpool/data/vm-106-disk-2', 1),
             ('rpool/data/vm-106-disk-3', 4), ('rpool/data/vm-106-disk-4', 1)],
    'pve2': [('rpool/data/vm-107-disk-0', 8), ('rpool/fast/vm-107-disk-1', 4),
             ('rpool/data/subvol-200-disk-0', None), ('rpool/data/subvol-200-disk-1', None),
             ('rpool/data/subvol-200-disk-2', None)],
}


def create_demo_datasets(lab):
    """Create and fill the fixture's disks; vm-101-disk-0 is a linked clone of
    the template's disk, as PVE makes it."""
    for node, datasets in DEMO_DATASETS.items():
        host = lab[node]
        host.zfs('create -p -o mountpoint=/rpool/fast rpool/fast')
        for dataset, mib in datasets:
            if mib is None:
                host.zfs('create ' + dataset)
                host.run('head -c 200000 /dev/urandom > /{0}/data.bin && '
                         'echo {1} > /{0}/hostname'.format(dataset, node))
            else:
                host.zfs('create -V {}M -o volmode=dev {}'.format(mib, dataset))
                host.write_random(dataset, mib)
    lab.pve1.zfs('snapshot rpool/data/base-100-disk-0@__base__ && zfs clone '
                 'rpool/data/base-100-disk-0@__base__ rpool/data/vm-101-disk-0')


def start_pve_double(lab, fixture=FIXTURE) -> str:
    """Serve `fixture` on pve1:8006 (restarting the double); returns its fingerprint."""
    pve1 = lab.pve1
    pve1.run('mkdir -p {0} && pkill -f pve_double.py; rm -f {1}'.format(DOUBLE_DIR, DOUBLE_LOG),
             check=False)
    pve1.put(TESTS / 'pve_double.py', DOUBLE_DIR + '/pve_double.py')
    set_fixture(lab, json.loads(Path(fixture).read_text()))
    pve1.run('nohup python3 {0}/pve_double.py --fixture {0}/cluster.json --bind 0.0.0.0 '
             '--port 8006 --cert-dir {0}/cert --log-calls >{1} 2>&1 </dev/null &'.format(
                 DOUBLE_DIR, DOUBLE_LOG))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r'^ready \S+ fingerprint=(\S+)',
                          pve1.run('cat ' + DOUBLE_LOG, check=False).stdout, re.M)
        if match:
            return match.group(1)
        time.sleep(0.5)
    raise RuntimeError('the PVE API double did not start on pve1:\n' +
                       pve1.run('cat ' + DOUBLE_LOG, check=False).stdout)


def set_fixture(lab, data):
    """Replace the double's fixture at once (a migration, a new disk, ...)."""
    lab.pve1.run('cat > {0}/cluster.json.new && mv {0}/cluster.json.new {0}/cluster.json'
                 .format(DOUBLE_DIR), input=json.dumps(data, indent=1))


def double_requests(lab) -> str:
    """What the double on pve1 logged: one line per request."""
    return lab.pve1.run('cat ' + DOUBLE_LOG).stdout


def write_proxmoxrc(lab, fingerprint, login='api=https://planb@pve:planbpass@pve1:8006'):
    rc = '[pve:demo]\n{}\nfingerprint={}\nssh_user=planb\n'.format(login, fingerprint)
    lab.backup.run('umask 077 && cat > ~/.proxmoxrc', user='planb', input=rc)


def setup_demo_cluster(lab) -> str:
    """All of the above; returns the double's certificate fingerprint."""
    create_demo_datasets(lab)
    fingerprint = start_pve_double(lab)
    write_proxmoxrc(lab, fingerprint)
    return fingerprint


def tool(lab, *args, check=None):
    """planb-pvesync ARGS on backup as planb; `check` is the expected exit status."""
    done = lab.backup.run('planb-pvesync ' + shlex.join(args), user='planb', check=False)
    if check is not None:
        assert done.returncode == check, 'exit {}\nstdout: {}\nstderr: {}'.format(
            done.returncode, done.stdout, done.stderr)
    return done
