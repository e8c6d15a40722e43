#!/usr/bin/env python3
"""make demo: planb-pvesync doing its main job on the lab, no Proxmox needed.

Boots the lab, serves the demo cluster from the PVE API double on pve1, lists
it, backs up a guest to the backup host, changes the guest's disk and backs it
up again incrementally, backs up the cluster, shows the status, and brings the
guest back from its first restore point as a new guest on the other node,
printing each command and what it says, then the restored guest's config and
its disk's checksum beside the one it had. The VMs stop at the end; the lab's
files stay in PLANB_DEMO_DIR (default /var/tmp/planb-pvesync-demo) and the VM
image in its cache (PLANB_LAB_CACHE, default /var/cache/planb-pvesync-lab)
until `make clean`.
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.cluster import DOUBLE_DIR, setup_demo_cluster  # noqa: E402
from lab.lab import Lab  # noqa: E402

REPO = Path(__file__).resolve().parent.parent.parent
STATE_DIR = os.environ.get('PLANB_DEMO_DIR', '/var/tmp/planb-pvesync-demo')
IMAGE_CACHE = os.environ.get('PLANB_LAB_CACHE', '/var/cache/planb-pvesync-lab')
SYNC = 'planb-pvesync sync-pve-guest -g 106 --sync-zfs-root tank/enc'
BOOT_DISK = 'rpool/data/vm-106-disk-0'
STARTED = time.monotonic()


def step(text):
    print('\n=== ' + text, flush=True)


def stage(text):
    """One line for a stage of setting up, with the time since the start."""
    print('demo: {} ({:.0f}s)'.format(text, time.monotonic() - STARTED), flush=True)


def show(host, cmd, user='planb'):
    print('{}@{}$ {}'.format(user, host.name, cmd), flush=True)
    done = host.run(cmd, user=user, check=False)
    print(done.stdout + done.stderr, end='', flush=True)
    if done.returncode:
        raise SystemExit('demo: that failed (exit {})'.format(done.returncode))
    return done.stdout


def cluster_config(lab, vmid):
    """The config the cluster has for guest `vmid`: what qm config shows on
    a PVE node, here from the API double's record of the cluster on pve1."""
    data = json.loads(lab.pve1.run('cat {}/cluster.json'.format(DOUBLE_DIR)).stdout)
    guest = next(g for g in data['guests'] if g['vmid'] == vmid)
    return guest['node'], guest['config']


def main():
    stage('booting the lab: pve1 and pve2 play PVE nodes (pool rpool, rpool/data), '
          'backup plays the backup host (pool tank, encrypted tank/enc); the first '
          'time, this builds the VM image (about 5 minutes)')
    lab = Lab(STATE_DIR)
    lab.start()
    stage('installing planb-pvesync on the VMs')
    lab.install_tool(REPO)
    stage('making the demo cluster: its guests\' disks on pve1 and pve2, the API double on pve1')
    setup_demo_cluster(lab)
    stage('ready')
    backup = lab.backup

    step('planb on backup knows the cluster from ~/.proxmoxrc: the API double on '
         'pve1:8006, its certificate pinned')
    show(backup, 'cat ~/.proxmoxrc')
    show(backup, 'planb-pvesync list-pve-hosts')
    show(backup, 'planb-pvesync list-pve-guests')

    step('Back up guest 106 (acme-wp): one snapshot of its disks, then a full copy of each')
    show(backup, SYNC)
    show(backup, 'zfs list -r -t all -o name,used,encryptionroot tank/enc/acme-wp')
    first_sum = lab.pve1.sha256('/dev/zvol/' + BOOT_DISK)

    step('The guest writes 2 MiB to its boot disk on pve1')
    lab.pve1.write_random(BOOT_DISK, 2, offset_mib=1)
    print('root@pve1$ dd if=/dev/urandom of=/dev/zvol/{} bs=1M count=2 seek=1'.format(BOOT_DISK),
          flush=True)

    step('Back up again: only what changed since the last snapshot is sent')
    show(backup, SYNC)

    step('The boot disk on pve1 and its backup on backup are the same')
    show(lab.pve1, 'sha256sum /dev/zvol/' + BOOT_DISK, user='root')
    show(backup, 'sha256sum /dev/zvol/tank/enc/acme-wp/local-zfs--vm-106-disk-0',
         user='root')
    show(backup, 'zfs get -o property,value planb-pvesync:node,planb-pvesync:vmid,'
         'planb-pvesync:volume tank/enc/acme-wp/local-zfs--vm-106-disk-0')
    step('The whole cluster, as cron runs it: every guest but templates (120 is on the '
         'offline pve3), the two nodes side by side, only the summary')
    show(backup, 'planb-pvesync -q sync-pve-guest --all --exclude 120 -j 2 '
         '--sync-zfs-root tank/enc')

    step('How old is each backup? With --max-age it is a Nagios check (exit 0, 1 or 2)')
    show(backup, 'planb-pvesync status --all --exclude 120 --sync-zfs-root tank/enc '
         '--max-age 26')
    step("Restore: acme-wp's restore points, each with the guest's config kept beside it")
    show(backup, 'planb-pvesync list-restore-points -g acme-wp --sync-zfs-root tank/enc')
    first = backup.run('zfs list -H -o name -t snapshot -s createtxg '
                       'tank/enc/acme-wp/local-zfs--vm-106-disk-0', user='planb'
                       ).stdout.split()[0].split('@')[1]
    step('Bring acme-wp back from its first restore point, onto pve2 as guest 9106, with a '
         'restore user that may create guests (the backup user may not)')
    backup.run('sed s/planb@pve:planbpass/restore@pve:restorepass/ ~/.proxmoxrc '
               '> ~/.proxmoxrc-restore && chmod 600 ~/.proxmoxrc-restore', user='planb')
    show(backup, 'planb-pvesync -f ~/.proxmoxrc-restore restore-pve-guest -g acme-wp '
         '--sync-zfs-root tank/enc --at {} --node pve2 --vmid 9106'.format(first))
    show(lab.pve2, 'zfs list -o name,used rpool/data/vm-9106-disk-0 rpool/data/vm-9106-disk-2 '
         'rpool/data/vm-9106-disk-3', user='root')

    step('The cluster has guest 9106 now, its config recreated from the one kept with '
         'the restore point: its disks renamed, no MAC address, so that PVE makes new ones '
         '(the API double\'s record, as qm config 9106 shows it on a node)')
    node, config = cluster_config(lab, 9106)
    print('node: ' + node)
    for key, value in config.items():
        print('{}: {}'.format(key, value))
    show(backup, 'planb-pvesync list-pve-guests -g 9106')

    step('Its boot disk is the same as the guest\'s was at that restore point, before '
         'the 2 MiB were written')
    restored_sum = show(lab.pve2, 'sha256sum /dev/zvol/rpool/data/vm-9106-disk-0',
                        user='root').split()[0]
    print('at the first backup, on pve1: {}  /dev/zvol/{}'.format(first_sum, BOOT_DISK))
    print('the same' if restored_sum == first_sum else 'NOT THE SAME', flush=True)
    if restored_sum != first_sum:
        raise SystemExit('demo: the restored disk differs from the backed-up one')

    step('Done in {:.0f} s; stopping the lab.'.format(time.monotonic() - STARTED))
    print('The demo leaves the lab in {} and the VM image in {} (about 1.1 GiB); '
          'make clean removes both, and the venv .venv.'.format(STATE_DIR, IMAGE_CACHE))


if __name__ == '__main__':
    main()
