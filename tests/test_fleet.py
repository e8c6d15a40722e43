"""Fleet pieces that are pure: guest selection, transfer lanes, renames,
status judgements, the Prometheus text and the retention settings."""
from types import SimpleNamespace

import pytest
from hypothesis import given, strategies as st

from planb_pvesync import (
    ConfigError, Dataset, GuestSelection, KeepRule, PveCluster, PveGuest, Snapshot,
    SyncJob, UsageError, backup_status, bookmark_changes, format_status, guest_renames,
    newest_common_guid, parse_config, prometheus_text, select_guests, source_newer_bytes, transfer_lanes)

GUESTS = (
    PveGuest(100, 'qemu', 'base-tmpl', 'pve1', 'stopped', template=True, pool='acme'),
    PveGuest(101, 'qemu', 'web', 'pve1', 'running', pool='acme', tags=('prod',)),
    PveGuest(102, 'lxc', 'db', 'pve2', 'running', tags=('prod', 'db')),
    PveGuest(103, 'qemu', None, 'pve2', 'stopped'),
)
CLUSTER = PveCluster('demo', {}, {}, GUESTS)


def chosen(**selection):
    return [g.vmid for g in select_guests(CLUSTER, GuestSelection(**selection))]


@pytest.mark.parametrize('selection, vmids', [
    ({}, [100, 101, 102, 103]),                             # a listing shows all
    ({'all': True}, [101, 102, 103]),                       # no templates
    ({'all': True, 'templates': True}, [100, 101, 102, 103]),
    ({'names': ('100',)}, [100]),                           # named: even a template
    ({'pools': ('acme',)}, [101]),
    ({'tags': ('prod',)}, [101, 102]),
    ({'tags': ('db',), 'names': ('web',)}, [101, 102]),
    ({'all': True, 'exclude': ('db', '103')}, [101]),
    ({'all': True, 'exclude': ('gone',)}, [101, 102, 103]),  # a warning only
])
def test_select_guests(selection, vmids):
    assert chosen(**selection) == vmids


@pytest.mark.parametrize('selection, message', [
    ({'names': ('nosuch',)}, "no guest 'nosuch' in cluster demo"),
    ({'pools': ('nosuch',)}, "no guest in cluster demo has pool 'nosuch'"),
    ({'tags': ('nosuch',)}, "no guest in cluster demo has tag 'nosuch'"),
])
def test_select_guests_refuses_what_matches_nothing(selection, message):
    with pytest.raises(UsageError, match=message):
        chosen(**selection)


def job(host, n):
    return SyncJob(src_host=SimpleNamespace(name=host), src='ds%d' % n, dst='%s/%d' % (host, n))


@given(st.lists(st.sampled_from('abc'), max_size=12), st.integers(1, 3))
def test_lanes_hold_every_job_once_and_one_host_each(hosts, per_node):
    jobs = [job(host, n) for n, host in enumerate(hosts)]
    lanes = transfer_lanes(jobs, per_node)
    assert sorted(j.dst for lane in lanes for j in lane) == sorted(j.dst for j in jobs)
    assert all(len({j.src_host.name for j in lane}) == 1 for lane in lanes)
    for host in set(hosts):
        assert sum(lane[0].src_host.name == host for lane in lanes) == min(
            per_node, hosts.count(host))


def test_lanes_start_with_one_lane_of_every_host():
    lanes = transfer_lanes([job('a', 1), job('a', 2), job('b', 3)], 1)
    assert [[j.dst for j in lane] for lane in lanes] == [['a/1', 'a/2'], ['b/3']]


def backup(name, vmid, cluster='demo', snaps=()):
    return Dataset(name, 'volume', snapshots=snaps,
                   recorded={'cluster': cluster, 'vmid': str(vmid)})


def test_renamed_guest_is_found_by_its_vmid():
    found = {d.name: d for d in (
        Dataset('tank/b', 'filesystem'), Dataset('tank/b/web-old', 'filesystem'),
        backup('tank/b/web-old/local-zfs--vm-101-disk-0', 101),
        backup('tank/b/db/local-zfs--vm-102-disk-0', 102),
        backup('tank/b/other/local-zfs--vm-101-disk-0', 101, cluster='other'))}
    renames = guest_renames(found, 'tank/b', 'demo', GUESTS[1:3])
    assert [(old, new, g.vmid) for old, new, g in renames] == [
        ('tank/b/web-old', 'tank/b/web', 101)]


def test_no_rename_when_the_new_name_exists_or_the_old_is_shared():
    found = {d.name: d for d in (
        backup('tank/b/web-old/local-zfs--vm-101-disk-0', 101),
        backup('tank/b/web-old/local-zfs--vm-999-disk-0', 999),
        backup('tank/b/db/x', 102), backup('tank/b/db-old/y', 102))}
    assert guest_renames(found, 'tank/b', 'demo', GUESTS[1:3]) == []


def snap(name, guid, txg, creation=0, written=0, bookmark=False):
    return Snapshot(name, guid=guid, createtxg=txg, creation=creation, written=written,
                    bookmark=bookmark)


A, B, C = snap('a', 1, 10, 1000, 5), snap('b', 2, 20, 2000, 7), snap('c', 3, 30, 3000, 11)
NOW = 3000 + 7200


def source(*snaps, written=3):
    return Dataset('rpool/data/vm-101-disk-0', 'volume', written=written, snapshots=snaps)


def test_source_newer_bytes_counts_what_came_after_the_backups_newest():
    assert source_newer_bytes(source(A, B, C), B) == 11 + 3
    assert source_newer_bytes(source(snap('b', 2, 20, bookmark=True), C), B) == 11 + 3
    assert source_newer_bytes(source(C), A) is None
    assert newest_common_guid(source(A, B, C), backup('x', 1, snaps=(A, B))) == 2
    assert newest_common_guid(source(C), backup('x', 1, snaps=(A, B))) is None


@pytest.mark.parametrize('snaps, warn, crit, state, reasons', [
    ((A, C), None, None, 'ok', ()),
    ((A, C), 1800, 3 * 3600, 'warning', ('older than 30 min',)),
    ((A, C), 1800, 3600, 'critical', ('older than 60 min',)),
    ((), None, 3600, 'critical', ('no snapshot',)),
    (None, None, None, 'critical', ('no backup',)),
])
def test_backup_status(snaps, warn, crit, state, reasons):
    dst = None if snaps is None else backup('tank/b/web/d', 101, snaps=snaps)
    row = backup_status(101, 'web', 'tank/b/web/d', dst, source(A, B, C), NOW, warn, crit)
    assert (row.state, row.reasons) == (state, reasons)
    assert row.source_newer == (3 if snaps else None)


def test_prometheus_text_escapes_labels_and_leaves_out_unknowns():
    row = backup_status(101, 'we"b\\', 'tank/b/d', None, None, NOW, None, 3600)
    text = prometheus_text('demo', [row], NOW)
    labels = 'cluster="demo",vmid="101",guest="we\\"b\\\\",dataset="tank/b/d"'
    assert 'planb_pvesync_backup_state{%s} 2\n' % labels in text
    assert 'planb_pvesync_backup_timestamp_seconds{' not in text
    assert '# TYPE planb_pvesync_source_newer_bytes gauge' in text
    assert text.endswith('planb_pvesync_status_timestamp_seconds %d\n' % NOW)


RC = '[pve:c]\napi=https://u@pve:p@h\n'


def test_retention_from_the_config():
    cluster = parse_config(RC + 'keep_source=5\nkeep_destination=all:2d,daily:2w\n',
                           'rc').clusters['c']
    assert cluster.keep_source == 5
    assert cluster.keep_destination == (KeepRule('all', 2 * 86400),
                                        KeepRule('daily', 14 * 86400))
    everything = parse_config(RC + 'keep_source=all\nkeep_destination=all\n', 'rc')
    assert (everything.clusters['c'].keep_source, everything.clusters['c'].keep_destination) \
        == (None, ())
    assert parse_config(RC, 'rc').clusters['c'].keep_source == 2


@pytest.mark.parametrize('line, message', [
    ('keep_source=0', r"rc: \[pve:c\]: keep_source: '0' is no count"),
    ('keep_destination=daly:2w', r"rc: \[pve:c\]: keep_destination: bad keep rule 'daly:2w'"),
])
def test_bad_retention_in_the_config(line, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(RC + line + '\n', 'rc')


def test_bookmark_changes():
    own = [snap('planb-20261101T000000Z', 7, 70, bookmark=True),
           snap('planb-20261102T000000Z', 8, 80)]
    foreign = [snap('mine', 5, 50, bookmark=True)]
    src = source(*foreign, *own)
    assert bookmark_changes(src, 8, 'planb') == (own[1], [own[0]])
    marked = source(*foreign, *own, snap('planb-20261102T000000Z', 8, 80, bookmark=True))
    assert bookmark_changes(marked, 8, 'planb') == (None, [own[0]])
    assert bookmark_changes(src, 7, 'planb') == (None, [])      # only its bookmark: keep
    assert bookmark_changes(src, 99, 'planb') == (None, [])
    assert bookmark_changes(src, None, 'planb') == (None, [])


def test_format_status_puts_the_verdict_first():
    ok = backup_status(101, 'web', 'tank/b/web/local-zfs--vm-101-disk-0',
                       backup('x', 101, snaps=(A, C)), source(A, B, C), NOW, None, 86400)
    missing = backup_status(102, 'db', 'tank/b/db/local-zfs--vm-102-disk-0', None, None,
                            NOW, None, 86400)
    assert format_status([ok, missing], NOW) == [
        'CRITICAL: 2 volume(s): 1 ok, 0 warning, 1 critical',
        'VMID  GUEST  VOLUME                    NEWEST  AGE    USED  SOURCE NEWER  STATE',
        '101   web    local-zfs--vm-101-disk-0  c       2.0 h  0 B   3 B           ok',
        '102   db     local-zfs--vm-102-disk-0  -       -      -     ?             critical: no backup']
