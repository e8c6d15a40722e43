#!/usr/bin/env python3
"""make demo: planb-pvesync doing its main job on the lab, no Proxmox needed.

Boots the lab, serves the demo cluster from the PVE API double on pve1, lists
it, backs up a guest to the backup host, changes the guest's disk and backs it
up again incrementally, backs up the cluster, shows the status, and brings the
guest back from its first restore point as a new guest on the other node,
printing each command and what it says. The VMs stop at the end.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.cluster import setup_demo_cluster  # noqa: E402
from lab.lab import Lab  # noqa: E402

REPO = Path(__file__).resolve().parent.parent.parent
STATE_DIR = '/var/tmp/planb-pvesync-demo'
SYNC = 'planb-pvesync sync-pve-guest -g 106 --sync-zfs-root tank/enc'


def step(text):
    print('\n=== ' + text, flush=True)


def show(host, cmd, user='planb'):
    print('{}@{}$ {}'.format(user, host.name, cmd), flush=True)
    done = host.run(cmd, user=user, check=False)
    print(done.stdout + done.stderr, end='', flush=True)
    if done.returncode:
        raise SystemExit('demo: that failed (exit {})'.format(done.returncode))


def main():
    lab = Lab(STATE_DIR)
    step('Booting the lab: pve1 and pve2 play PVE nodes (pool rpool, rpool/data), '
         'backup plays the backup host (pool tank, encrypted tank/enc). '
         'The first time, this builds the VM image (about 5 minutes).')
    lab.start()
    lab.install_tool(REPO)
    setup_demo_cluster(lab)
    backup = lab.backup

    step('planb on backup knows the cluster from ~/.proxmoxrc: the API double on '
         'pve1:8006, its certificate pinned')
    show(backup, 'cat ~/.proxmoxrc')
    show(backup, 'planb-pvesync list-pve-hosts')
    show(backup, 'planb-pvesync list-pve-guests')

    step('Back up guest 106 (acme-wp): one snapshot of its disks, then a full copy of each')
    show(backup, SYNC)
    show(backup, 'zfs list -r -t all -o name,used,encryptionroot tank/enc/acme-wp')

    step('The guest writes 2 MiB to its boot disk on pve1')
    lab.pve1.write_random('rpool/data/vm-106-disk-0', 2, offset_mib=1)
    print('root@pve1$ dd if=/dev/urandom of=/dev/zvol/rpool/data/vm-106-disk-0 bs=1M '
          'count=2 seek=1', flush=True)

    step('Back up again: only what changed since the last snapshot is sent')
    show(backup, SYNC)

    step('The boot disk on pve1 and its backup on backup are the same')
    show(lab.pve1, 'sha256sum /dev/zvol/rpool/data/vm-106-disk-0', user='root')
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
    step('Done; stopping the lab.')


if __name__ == '__main__':
    main()
