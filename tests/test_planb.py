"""PlanB's environment turned into the engine's jobs and options (pure), and
the source retention of a PlanB install: only its own snapshots."""
import datetime
import re

import pytest
from hypothesis import given, strategies as st

from planb_pvesync import (
    Dataset, PLANB_SNAPSHOT, PlanbFileset, PveVolume, Snapshot, SyncOptions, UsageError,
    bookmark_changes, parse_keep_schedule, planb_child, planb_escape, planb_fileset,
    planb_kept_snapshots, planb_sync_options, prune_source)

GUID = '1d6f3c4e-5a7b-4c8d-9e0f-123456789abc'
OTHER = '99999999-5a7b-4c8d-9e0f-123456789abc'
ENV = {'planb_guid': GUID, 'planb_storage_name': 'tank/planb/demo-acme-wp',
       'planb_snapshot_target': 'planb-20261126T0130Z',
       'planb_storage_destination': '/tank/planb/demo-acme-wp/data',
       'planb_fileset_id': '7', 'PATH': '/usr/bin:/bin'}


def test_planb_environment():
    assert planb_fileset(ENV) == PlanbFileset(
        GUID, 'tank/planb/demo-acme-wp', 'planb-20261126T0130Z',
        '/tank/planb/demo-acme-wp/data')
    # PLANB_PREFIX may be empty: the name is the time alone.
    assert planb_fileset(dict(ENV, planb_snapshot_target='20261126T0130Z')).snapshot == \
        '20261126T0130Z'


@pytest.mark.parametrize('key, value', [
    ('planb_guid', 'a b'), ('planb_guid', "x';reboot"), ('planb_storage_name', 'tank'),
    ('planb_storage_name', 'tank/x@snap'), ('planb_storage_name', '/tank/x'),
    ('planb_snapshot_target', 'planb-20261126T013000Z'),      # seconds: "manual" to PlanB
    ('planb_snapshot_target', 'planb-2026-11-26'),
])
def test_planb_environment_that_planb_does_not_make(key, value):
    with pytest.raises(UsageError, match=re.escape('{}={!r} is not what PlanB sets'.format(
            key, value))):
        planb_fileset(dict(ENV, **{key: value}))


def planb_reads(child):
    """How PlanB shows a child dataset in its size listing: '-' is '/', and
    _xHH is the byte HH (as systemd-unescape reads \\xHH)."""
    return '/'.join(re.sub(rb'_x([0-9a-f]{2})', lambda m: bytes([int(m.group(1), 16)]),
                           part.encode()).decode()
                    for part in child.split('-'))


@pytest.mark.parametrize('text, child', [
    ('local-zfs/vm-106-disk-0', 'local_x2dzfs-vm_x2d106_x2ddisk_x2d0'),
    ('fast_zfs/subvol-200-disk-1', 'fast_x5fzfs-subvol_x2d200_x2ddisk_x2d1'),
    ('.dot/a.b:c', '_x2edot-a.b:c'),
])
def test_planb_escape(text, child):
    assert planb_escape(text) == child
    assert planb_reads(child) == text


@given(st.text(st.characters(min_codepoint=33, max_codepoint=0x2fff), min_size=1)
       .filter(lambda t: '/' not in t),
       st.text(st.characters(min_codepoint=33, max_codepoint=0x2fff), min_size=1)
       .filter(lambda t: '/' not in t))
def test_planb_escape_gives_a_dataset_name_planb_reads_back(storage, volume):
    child = planb_escape(storage + '/' + volume)
    assert re.fullmatch(r'[A-Za-z0-9_.:-]+', child) and not child.startswith('.')
    assert planb_reads(child) == storage + '/' + volume


def test_volumes_go_into_children_of_the_fileset():
    volume = PveVolume('scsi0', 'local-zfs', 'base-100-disk-0/vm-101-disk-0', 'zfspool',
                       'rpool/data/vm-101-disk-0')
    assert planb_child(planb_fileset(ENV), volume) == \
        'tank/planb/demo-acme-wp/local_x2dzfs-vm_x2d101_x2ddisk_x2d0'


def test_snapshot_names_planb_makes_are_the_ones_it_rotates():
    name = 'planb-' + datetime.datetime(2026, 11, 26, 1, 30).strftime('%Y%m%dT%H%MZ')
    assert PLANB_SNAPSHOT.fullmatch(name) and PLANB_SNAPSHOT.fullmatch(name[6:])
    assert not PLANB_SNAPSHOT.fullmatch('planb-20261126T013000Z')
    assert not PLANB_SNAPSHOT.fullmatch('daily-2026-11-26')


def test_planb_decides_the_snapshot_and_the_retention():
    given_opts = SyncOptions(snapshot_prefix='nightly', make_snapshot=False,
                             snapshot_reuse_age=3600, keep_source=5, thin_foreign=True,
                             keep_destination=parse_keep_schedule('all:1d'))
    opts = planb_sync_options(planb_fileset(ENV), given_opts)
    assert (opts.snapshot_name, opts.owner, opts.snapshot_prefix, opts.make_snapshot) == (
        'planb-20261126T0130Z', GUID, 'planb', True)
    assert (opts.snapshot_reuse_age, opts.keep_destination, opts.thin_foreign, opts.wait) == (
        0, (), False, True)
    assert opts.keep_source == 5 and opts.transfer == given_opts.transfer


def snap(name, txg, owner=None, bookmark=False):
    return Snapshot(name, guid=txg, createtxg=txg, owner=owner, bookmark=bookmark)


def test_a_planb_install_prunes_only_its_own_snapshots():
    mine = [snap('planb-2026112{}T0130Z'.format(day), day, GUID) for day in range(1, 5)]
    others = [snap('planb-20261121T0200Z', 11, OTHER),     # another PlanB's
              snap('planb-20261121T020000Z', 12),          # planb-pvesync's, from cron
              snap('planb-20261121T0300Z', 13),            # PlanB's name, no owner
              snap('manual', 14, OTHER)]
    snaps = sorted(others + mine, key=lambda s: s.createtxg)
    assert prune_source(snaps, 2, 'planb', owner=GUID) == [mine[0], mine[1]]
    assert prune_source(snaps, 1, 'planb', protect={mine[2].guid}, owner=GUID) == [
        mine[0], mine[1]]
    # Without an owner the names decide, as from cron: only the one with seconds.
    assert prune_source(snaps, 1, 'planb') == []
    assert prune_source(snaps + [snap('planb-20261126T020000Z', 20)], 1, 'planb') == [
        others[1]]


def test_a_planb_install_drops_only_the_bookmarks_of_its_own_snapshots():
    """A bookmark holds no user property: it is this PlanB's when it marks one
    of this PlanB's snapshots."""
    mine = [snap('planb-2026112{}T0130Z'.format(day), day, GUID) for day in range(1, 4)]
    theirs = snap('planb-20261121T0200Z', 11, OTHER)
    marks = [snap(s.name, s.guid, bookmark=True) for s in (mine[0], mine[1], theirs)]
    lost = snap('planb-20261120T0130Z', 9, bookmark=True)  # its snapshot is gone
    src = Dataset('rpool/data/vm-106-disk-0', 'volume', snapshots=tuple(sorted(
        mine + [theirs, lost] + marks, key=lambda s: (s.createtxg, s.bookmark))))
    assert bookmark_changes(src, mine[2].guid, 'planb', GUID) == (mine[2], marks[:2])
    assert bookmark_changes(src, mine[1].guid, 'planb', GUID) == (None, marks[:1])


def volume(name, *snapshots, written=0, root=None):
    return Dataset(name, 'volume', written=written, encryption_root=root,
                   snapshots=tuple(Snapshot(n, guid=txg, createtxg=txg) for n, txg in snapshots))


def test_the_run_after_an_enqueue_and_keep_takes_its_snapshot_on_the_disks():
    """PlanB took @keep-... of the fileset's dataset after the run that
    brought @planb-...0100Z (a later txg); the disks are as they were then."""
    fileset = planb_fileset(ENV)
    kept = volume(fileset.dataset, ('keep-20261126T0135Z', 30), ('old-20250101T0000Z', 3))
    disks = [volume(fileset.dataset + '/d0', ('planb-20261126T0100Z', 20)),
             volume(fileset.dataset + '/d1', ('planb-20261126T0100Z', 21))]
    found = {d.name: d for d in [kept, *disks]}
    assert planb_kept_snapshots(found, fileset) == (
        [fileset.dataset + '/d0@keep-20261126T0135Z',
         fileset.dataset + '/d1@keep-20261126T0135Z'], [])
    # Once the disks received again (or took it), it is past: nothing to take.
    later = dict(found, **{disks[0].name: volume(disks[0].name, ('planb-20261126T0100Z', 20),
                                                 ('planb-20261127T0100Z', 40))})
    assert planb_kept_snapshots(later, fileset) == ([], [])
    # A raw disk (its own encryption root) or one changed since cannot take it.
    odd = dict(found, **{disks[0].name: volume(disks[0].name, ('planb-20261126T0100Z', 20),
                                               root=disks[0].name),
                         disks[1].name: volume(disks[1].name, ('planb-20261126T0100Z', 21),
                                               written=4096)})
    specs, notes = planb_kept_snapshots(odd, fileset)
    assert specs == [] and len(notes) == 2
    assert notes[0] == ('{0}/d0 cannot take @keep-20261126T0135Z of {0}: it is received raw, '
                        'and ZFS receives a raw stream only onto the snapshot it starts from; '
                        'restore its @planb-20261126T0100Z instead'.format(fileset.dataset))
    assert 'it was changed after its newest snapshot' in notes[1]
    # The first run: no disk yet.
    assert planb_kept_snapshots({kept.name: kept}, fileset) == ([], [])


def test_a_planb_dataset_name_may_hold_a_space():
    assert planb_fileset(dict(ENV, planb_storage_name='tank/planb/demo-my guest')).dataset == \
        'tank/planb/demo-my guest'
