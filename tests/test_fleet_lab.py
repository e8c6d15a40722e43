"""A whole cluster from cron, on the lab: --all with --jobs, a migrated and a
renamed guest, retention on both sides, status for monitors and -q.

These tests snapshot with the prefix 'fleet' into their own root, and add
three guests of their own (300 mover, 301 old-name, 302 keeper); at the end
they remove what they made, so the other modules see the demo cluster as it was.
"""
import calendar
import json
import shlex
import subprocess
import time

import pytest

from lab.cluster import FIXTURE, set_fixture, tool

pytestmark = pytest.mark.lab

ROOT = 'tank/enc/fleet'
PREFIX = 'fleet'
OWN_GUESTS = {  # vmid: (name, node, MiB)
    300: ('mover', 'pve1', 4), 301: ('old-name', 'pve1', 2), 302: ('keeper', 'pve2', 2)}


def fixture(changes=None):
    """The demo cluster plus this module's guests; changes: vmid -> {key: value}."""
    data = json.loads(FIXTURE.read_text())
    for vmid, (name, node, mib) in OWN_GUESTS.items():
        guest = {'vmid': vmid, 'type': 'qemu', 'node': node, 'status': 'running',
                 'config': {'name': name, 'scsi0': 'local-zfs:vm-{}-disk-0,size={}M'.format(
                     vmid, mib)}}
        for key, value in (changes or {}).get(vmid, {}).items():
            (guest['config'] if key == 'name' else guest)[key] = value
        data['guests'].append(guest)
    return data


@pytest.fixture(scope='module')
def fleet(demo):
    demo.backup.zfs('create -o mountpoint=none ' + ROOT)
    for vmid, (_, node, mib) in OWN_GUESTS.items():
        disk = 'rpool/data/vm-{}-disk-0'.format(vmid)
        demo[node].zfs('create -V {}M -o volmode=dev {}'.format(mib, disk))
        demo[node].write_random(disk, mib)
    set_fixture(demo, fixture())
    yield demo
    set_fixture(demo, json.loads(FIXTURE.read_text()))
    for node in ('pve1', 'pve2'):
        demo[node].run('zfs destroy -r rpool/data/vm-300-disk-0; zfs destroy -r '
                       'rpool/data/vm-301-disk-0; zfs destroy -r rpool/data/vm-302-disk-0; '
                       'zfs list -H -o name -t snapshot -r rpool | grep "@{}-" | '
                       'xargs -rn1 zfs destroy'.format(PREFIX), check=False)


def sync(lab, *args, check=0):
    return tool(lab, '-p', 'demo', 'sync-pve-guest', '--sync-zfs-root', ROOT,
                '--snapshot-prefix', PREFIX, *args, check=check)


def snapshots(host, dataset):
    return [line.split('@')[1] for line in host.zfs(
        'list -H -o name -t snapshot -s createtxg ' + shlex.quote(dataset)).splitlines()]


def same(lab, node, src, dst):
    return lab[node].sha256('/dev/zvol/' + src) == lab.backup.sha256('/dev/zvol/' + dst)


def seconds(iso):
    return calendar.timegm(time.strptime(iso[:19], '%Y-%m-%dT%H:%M:%S')) + float(iso[19:-1])


def test_all_with_two_jobs_backs_up_both_nodes_at_once(fleet):
    done = sync(fleet, '--all', '--jobs', '2', '--json', '-v', check=1)
    rows = json.loads(done.stdout)
    assert sorted(r['dataset'][len(ROOT) + 1:] for r in rows) == [
        'acme-wp/local-zfs--vm-106-disk-0', 'acme-wp/local-zfs--vm-106-disk-2',
        'acme-wp/local-zfs--vm-106-disk-3', 'ct-web/local-zfs--subvol-200-disk-0',
        'ct-web/local-zfs--subvol-200-disk-1', 'keeper/local-zfs--vm-302-disk-0',
        'legacy-db/fast-zfs--vm-107-disk-1', 'legacy-db/local-zfs--vm-107-disk-0',
        'linked-clone/local-zfs--vm-101-disk-0', 'mover/local-zfs--vm-300-disk-0',
        'old-name/local-zfs--vm-301-disk-0']
    assert {r['status'] for r in rows} == {'synced'}
    # The template is left out; the guest on the offline node fails alone.
    assert '120 (120): volumes unknown: node pve3 is offline' in done.stderr
    # Login, resources, storage, status, and a config per guest on a live node.
    assert 'discovery: 11 API calls for 8 guest(s)' in done.stderr

    spans = {}
    for row in rows:
        spans.setdefault(row['source_host'], []).append(
            (seconds(row['started']), seconds(row['finished'])))
    pve1, pve2 = sorted(spans['planb@10.99.1.1']), sorted(spans['planb@10.99.2.1'])
    # One transfer at a time per node ...
    for node in (pve1, pve2):
        assert all(later[0] >= earlier[1] for earlier, later in zip(node, node[1:]))
    # ... and both nodes at the same time.
    assert pve1[0][0] < pve2[-1][1] and pve2[0][0] < pve1[-1][1]
    assert max(pve1[0][0], pve2[0][0]) < min(pve1[0][1], pve2[0][1])


def test_all_twice_sends_only_what_is_new(fleet):
    done = sync(fleet, '--all', '--exclude', '120', '--jobs', '2')
    assert '11 synced' in done.stdout and 'full' not in done.stdout


def test_guest_migrated_to_another_node_continues_incrementally(fleet):
    disk = 'rpool/data/vm-300-disk-0'
    newest = snapshots(fleet.pve1, disk)[-1]
    # As PVE migrates a guest with local ZFS disks: zfs send -R to the new
    # node, the disk removed from the old one, the guest's config moved.
    send = subprocess.Popen(fleet.pve1.ssh_argv() + ['zfs send -R {}@{}'.format(disk, newest)],
                            stdout=subprocess.PIPE)
    subprocess.run(fleet.pve2.ssh_argv() + ['zfs recv -u ' + disk], stdin=send.stdout,
                   check=True)
    assert send.wait() == 0
    fleet.pve1.zfs('destroy -r ' + disk)
    set_fixture(fleet, fixture({300: {'node': 'pve2'}}))
    fleet.pve2.write_random(disk, 1, offset_mib=1)

    done = sync(fleet, '-g', 'mover')
    dst = ROOT + '/mover/local-zfs--vm-300-disk-0'
    assert 'incremental @{}..@{}-'.format(newest, PREFIX) in done.stdout
    assert 'node was pve1, now pve2' in done.stdout
    assert same(fleet, 'pve2', disk, dst)
    assert fleet.backup.zfs('get -H -o value planb-pvesync:node ' + dst) == 'pve2'


def test_guest_renamed_in_pve_keeps_its_backups(fleet):
    set_fixture(fleet, fixture({300: {'node': 'pve2'}, 301: {'name': 'new-name'}}))
    done = sync(fleet, '-g', '301')
    assert ('renamed {0}/old-name to {0}/new-name: guest 301 is called new-name now'
            .format(ROOT)) in done.stderr
    assert 'incremental' in done.stdout and 'full' not in done.stdout
    assert fleet.backup.run('zfs list {}/old-name'.format(ROOT), check=False).returncode == 1
    assert same(fleet, 'pve1', 'rpool/data/vm-301-disk-0',
                ROOT + '/new-name/local-zfs--vm-301-disk-0')


def test_quiet_run_prints_only_its_summary(fleet):
    done = sync(fleet, '-q', '-g', '301')
    assert done.stderr == ''
    assert done.stdout.count('\n') == 1 and done.stdout.startswith('sync-pve-guest: 1 volume(s)')


def test_retention_on_both_sides(fleet):
    disk, dst = 'rpool/data/vm-302-disk-0', ROOT + '/keeper/local-zfs--vm-302-disk-0'
    now = time.time()
    day = time.strftime('%Y%m%d', time.gmtime(now - 10 * 86400))
    old = ['{}-{}'.format(PREFIX, time.strftime('%Y%m%dT120000Z', time.gmtime(now - 40 * 86400))),
           '{}-{}T120000Z'.format(PREFIX, day), '{}-{}T120100Z'.format(PREFIX, day)]
    recent = '{}-{}'.format(PREFIX, time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now - 7200)))
    for name in old + ['manual', recent]:      # oldest first, as if made over time
        fleet.pve2.zfs('snapshot {}@{}'.format(disk, name))
    before = snapshots(fleet.pve2, disk)
    keep = ['--keep-destination', 'all:1d,daily:30d']

    plan = sync(fleet, '-g', 'keeper', '-n', *keep)
    kept_on_source = before[-1:]    # and this run's new snapshot: --keep-source 2
    doomed_on_source = [s for s in before if s.startswith(PREFIX) and s not in kept_on_source]
    assert 'then on planb@10.99.2.1: sudo -n zfs destroy {}@{}\n'.format(
        disk, ','.join(doomed_on_source)) in plan.stdout
    assert snapshots(fleet.pve2, disk) == before

    done = sync(fleet, '-g', 'keeper', '--json', *keep)
    new = json.loads(done.stdout)[0]['detail'].split('@')[-1]
    # The source: the newest two of the tool's, the foreign one, and a
    # bookmark of the newest.
    assert snapshots(fleet.pve2, disk) == ['manual', recent, new]
    assert fleet.pve2.zfs('list -H -o name -t bookmark ' + disk) == disk + '#' + new
    # The backup ages its snapshots by the receipt it wrote, not by the names
    # the node gave them (README: Retention): all came in this run, so all are
    # of the last day and kept, the one named 40 days ago too.
    on_backup = snapshots(fleet.backup, dst)
    assert [s for s in on_backup if s in old + ['manual', recent, new]] == [
        *old, 'manual', recent, new]


def test_status_for_monitors(fleet):
    guests = ['-g', '300', '-g', '301', '-g', '302']
    status = ['-p', 'demo', 'status', '--sync-zfs-root', ROOT]
    ok = tool(fleet, *status, *guests, '--max-age', '24', '--json', check=0)
    rows = json.loads(ok.stdout)
    assert [(r['guest'], r['state']) for r in rows] == [
        ('mover', 'ok'), ('new-name', 'ok'), ('keeper', 'ok')]
    assert all(r['newest'].startswith(PREFIX + '-') and r['used'] > 0 for r in rows)

    time.sleep(4)
    stale = tool(fleet, *status, *guests, '--max-age', '0.001',
                 '--prometheus-file', '/tmp/planb.prom', check=2)
    assert stale.stdout.startswith('CRITICAL: 3 volume(s): 0 ok, 0 warning, 3 critical')
    assert 'critical: older than 4 s' in stale.stdout
    metrics = fleet.backup.run('cat /tmp/planb.prom').stdout
    assert ('planb_pvesync_backup_state{cluster="demo",vmid="302",guest="keeper",'
            'dataset="tank/enc/fleet/keeper/local-zfs--vm-302-disk-0"} 2') in metrics

    never = tool(fleet, '-p', 'demo', 'status', '--sync-zfs-root', ROOT + '-none',
                 '-g', '107', '--warn-age', '1', check=2)
    assert 'critical: no backup' in never.stdout
