"""Retention: what a keep schedule destroys on the backup, what the source prunes."""
import calendar
import dataclasses

import pytest
from hypothesis import given, strategies as st

from planb_pvesync import (
    KEEP_PERIODS, KeepRule, Snapshot, format_keep_schedule, parse_keep_schedule,
    prune_source, retention_ages, snapshot_name, thin_snapshots, tool_snapshot_time)

H, DAY = 3600, 86400
NOW = calendar.timegm((2024, 6, 15, 12, 0, 0))     # a Saturday


def tool(when, txg=None):
    """The tool's snapshot taken at `when`; its createtxg (and guid) follow the clock."""
    txg = when if txg is None else txg
    return Snapshot(snapshot_name('planb', when), guid=txg, createtxg=txg, creation=when)


@pytest.mark.parametrize('text, rules', [
    ('all:2d', (KeepRule('all', 2 * DAY),)),
    ('monthly:1y, all:36h,daily:2w', (
        KeepRule('all', 36 * H), KeepRule('daily', 14 * DAY), KeepRule('monthly', 365 * DAY))),
    ('yearly:10y,weekly:3m,hourly:1w', (
        KeepRule('hourly', 7 * DAY), KeepRule('weekly', 90 * DAY), KeepRule('yearly', 3650 * DAY))),
])
def test_parse_keep_schedule(text, rules):
    assert parse_keep_schedule(text) == rules


@pytest.mark.parametrize('text, bad', [
    ('daly:2w', "'daly:2w'"), ('all:2d,daily', "'daily'"), ('all:2', "'all:2'"),
    ('all:0d', "'all:0d'"), ('all:-1d', "'all:-1d'"), ('all:2s', "'all:2s'"),
    ('Daily:2d', "'Daily:2d'"), ('all:2 d', "'all:2 d'"), ('all:2d,', "''"),
    ('daily:2w,daily:4w', 'repeats period daily'), ('', 'empty'), (' ', 'empty'),
])
def test_parse_keep_schedule_names_the_bad_part(text, bad):
    with pytest.raises(ValueError) as error:
        parse_keep_schedule(text)
    assert bad in str(error.value) and '\n' not in str(error.value)


def test_a_bad_rule_shows_the_right_form():
    with pytest.raises(ValueError) as error:
        parse_keep_schedule('all:2d,daly:2w')
    assert str(error.value) == (
        "bad keep rule 'daly:2w': PERIOD:AGE with PERIOD all, hourly, daily, weekly, "
        "monthly or yearly and AGE like 36h, 14d, 8w, 6m, 2y "
        "(e.g. all:2d,daily:2w,weekly:3m,monthly:1y)")


def test_format_keep_schedule_takes_the_largest_whole_unit():
    rules = parse_keep_schedule('monthly:365d,all:48h,weekly:12w,daily:14d,hourly:36h')
    assert format_keep_schedule(rules) == 'all:2d,hourly:36h,daily:2w,weekly:12w,monthly:1y'


schedules = st.dictionaries(
    st.sampled_from(KEEP_PERIODS), st.tuples(st.integers(1, 40), st.sampled_from('hdwmy')),
    min_size=1).map(lambda rules: ','.join(
        '{}:{}{}'.format(period, count, unit) for period, (count, unit) in rules.items()))


@given(schedules)
def test_format_keep_schedule_round_trips(text):
    rules = parse_keep_schedule(text)
    assert parse_keep_schedule(format_keep_schedule(rules)) == rules


@pytest.mark.parametrize('name, prefix, when', [
    ('planb-20240615T120000Z', 'planb', NOW),
    ('planb-19700101T000000Z', 'planb', 0),
    ('a.b-20240615T120000Z', 'a.b', NOW),
    ('axb-20240615T120000Z', 'a.b', None),          # the prefix is no pattern
    ('planb-20240615T120000Z', 'plan', None),
    ('planb-x-20240615T120000Z', 'planb', None),
    ('planb-20240615T120000', 'planb', None),
    ('planb-20240615T120000Z.1', 'planb', None),
    ('planb-20241315T120000Z', 'planb', None),      # month 13
    ('planb-20230229T120000Z', 'planb', None),
    ('planb-20240615T240000Z', 'planb', None),
    ('autosnap_2024-06-15_12:00:00_daily', 'planb', None),
    ('__replicate_100-0_1718452800__', 'planb', None),
])
def test_tool_snapshot_time(name, prefix, when):
    assert tool_snapshot_time(name, prefix) == when


@given(st.integers(0, 2 ** 32), st.from_regex(r'[A-Za-z0-9_.:+-]{1,12}', fullmatch=True))
def test_tool_snapshot_time_reads_snapshot_name(when, prefix):
    assert tool_snapshot_time(snapshot_name(prefix, when), prefix) == when


def test_a_schedule_over_400_days():
    days = [tool(NOW - 12 * H - k * DAY) for k in range(400)]      # at midnight
    hours = [tool(NOW - H // 2 - k * H) for k in range(72)]         # at half past
    rules = parse_keep_schedule('all:2d,daily:2w,weekly:3m,monthly:1y')
    doomed = thin_snapshots(days + hours, rules, NOW, 'planb')
    kept = {s.name for s in days + hours} - {s.name for s in doomed}
    assert {n for n in kept if n.endswith('3000Z')} == {
        s.name for s in hours if s.creation >= NOW - 2 * DAY}
    monthly = (['20230617'] + ['2023%02d01' % m for m in range(7, 13)]
               + ['2024%02d01' % m for m in range(1, 7)])
    weekly = (['20240318', '20240325'] + ['202404%02d' % d for d in (1, 8, 15, 22, 29)]
              + ['202405%02d' % d for d in (6, 13, 20, 27)] + ['20240603', '20240610'])
    daily = ['202406%02d' % d for d in range(2, 16)]
    assert sorted(n[6:14] for n in kept if n.endswith('T000000Z')) == sorted(
        set(monthly + weekly + daily))


def test_a_rule_keeps_snapshots_exactly_max_age_old():
    edge, newest = tool(NOW - 2 * DAY), tool(NOW)
    rules = parse_keep_schedule('all:2d')
    assert thin_snapshots([edge, newest], rules, NOW, 'planb') == []
    assert thin_snapshots([edge, newest], rules, NOW + 1, 'planb') == [edge]


def test_the_newest_future_protected_and_cloned_snapshots_stay():
    old, protected = tool(NOW - 9 * DAY), tool(NOW - 8 * DAY)
    mounted = dataclasses.replace(tool(NOW - 7 * DAY), cloned=True)   # a restore point
    today, future = tool(NOW - H), tool(NOW + H)                    # one day, one bucket
    newest = tool(NOW - 10 * DAY, txg=NOW + 5 * DAY)                # the clock went back
    bookmark = Snapshot(old.name, old.guid, old.createtxg, bookmark=True)
    snaps = [bookmark, old, protected, mounted, today, future, newest]
    assert thin_snapshots(snaps, parse_keep_schedule('daily:1w'), NOW, 'planb',
                          protect={protected.guid}) == [old]


def test_foreign_snapshots_are_thinned_only_when_asked_and_by_creation():
    manual = Snapshot('manual', guid=1, createtxg=1, creation=NOW - 30 * DAY)
    other_prefix = Snapshot(snapshot_name('other', NOW), guid=2, createtxg=2,
                            creation=NOW - 30 * DAY)
    snaps, rules = [manual, other_prefix, tool(NOW - H)], parse_keep_schedule('all:1w')
    assert thin_snapshots(snaps, rules, NOW, 'planb') == []
    assert thin_snapshots(snaps, rules, NOW, 'planb', foreign=True) == [manual, other_prefix]


def received(when, txg, name_time=None, creation=None, receipt=True):
    """A snapshot this host received at `when`: named by the tool at
    `name_time`, made on the node at `creation` (both `when` unless said)."""
    name_time = when if name_time is None else name_time
    return Snapshot(snapshot_name('planb', name_time), guid=txg, createtxg=txg,
                    creation=when if creation is None else creation,
                    received=when if receipt else None)


SCHEDULE = parse_keep_schedule('all:2d,daily:2w,weekly:3m,monthly:1y')


def nightly(nights, receipt=True):
    """A backup at 01:30 UTC on each of the last `nights` nights, and one today."""
    return [received(NOW - 10.5 * H - k * DAY, txg=1000 - k, receipt=receipt)
            for k in range(nights, -1, -1)]


def forged(count, txg=2000, receipt=True):
    """`count` snapshots made today under names of the tool dated at midnight
    of the days before, as a node that wants real backups aged out makes them."""
    return [received(NOW - H, txg=txg + k, name_time=NOW - 12 * H - k * DAY, receipt=receipt)
            for k in range(1, count + 1)]


@pytest.mark.parametrize('receipts', [True, False])
def test_forged_names_age_out_no_genuine_backup(receipts):
    genuine, fake = nightly(60, receipts), forged(60, receipt=receipts)
    newest = received(NOW - 30, txg=3000, receipt=receipts)
    alone = thin_snapshots(genuine + [newest], SCHEDULE, NOW, 'planb')
    assert len(alone) > 20 and newest not in alone
    doomed = thin_snapshots(genuine + fake + [newest], SCHEDULE, NOW, 'planb')
    assert doomed == alone          # the same genuine ones, and no forged one
    times, doubtful = retention_ages(genuine + fake + [newest], 'planb')
    assert set(doubtful) == set(fake) and set(times) == set(genuine + [newest])
    assert doubtful[fake[0]] == ('its name says 2024-06-14 00:00:00 UTC, but it was made '
                                 '2024-06-15 11:00:00 UTC')


def test_a_backup_is_aged_by_its_receipt_not_by_its_name_or_creation():
    # Named and made 40 days ago (the node's clock, or a crafted stream), received now.
    late = received(NOW - 40 * DAY, txg=10)
    late = dataclasses.replace(late, received=NOW - H)
    assert thin_snapshots([late, received(NOW, txg=11)], parse_keep_schedule('all:2d'),
                          NOW, 'planb') == []
    assert retention_ages([late], 'planb')[0] == {late: NOW - H}


def test_backups_from_before_receipts_age_by_name_and_later_ones_without_count_not():
    legacy = received(NOW - 30 * DAY, txg=10, receipt=False)
    first = received(NOW - 20 * DAY, txg=20)
    unrecorded = received(NOW - 10 * DAY, txg=30, receipt=False)   # a receive cut off before it
    newest = received(NOW, txg=40)
    times, doubtful = retention_ages([legacy, first, unrecorded, newest], 'planb')
    assert times == {legacy: NOW - 30 * DAY, first: NOW - 20 * DAY, newest: NOW}
    assert doubtful == {unrecorded: 'it has no receipt (planb-pvesync:received)'}
    assert thin_snapshots([legacy, first, unrecorded, newest], parse_keep_schedule('all:1w'),
                          NOW, 'planb') == [legacy, first]


def test_foreign_snapshots_count_by_receipt_or_before_receipts_by_creation():
    manual = Snapshot('manual', guid=1, createtxg=1, creation=NOW - 30 * DAY)
    theirs = Snapshot('autosnap', guid=2, createtxg=2, creation=NOW - 30 * DAY,
                      received=NOW - 3 * DAY)
    mine = received(NOW, txg=3)
    assert retention_ages([manual, theirs, mine], 'planb') == ({mine: NOW}, {})
    assert retention_ages([manual, theirs, mine], 'planb', foreign=True) == (
        {manual: NOW - 30 * DAY, theirs: NOW - 3 * DAY, mine: NOW}, {})


def test_prune_source_keeps_the_newest_own_snapshots():
    a, b, c, d = (tool(NOW - k * DAY) for k in (4, 3, 2, 1))
    others = [Snapshot('manual', 1, 5), Snapshot(b.name, b.guid, b.createtxg, bookmark=True),
              Snapshot('__replicate_100-0_1718452800__', 2, 6), Snapshot('vzdump', 3, 7),
              Snapshot(snapshot_name('other', NOW), 4, 8)]
    snaps = others + [d, c, b, a]
    assert prune_source(snaps, 2, 'planb') == [a, b]
    assert prune_source(snaps, 1, 'planb', protect={b.guid}) == [a, c]
    assert prune_source(snaps + [dataclasses.replace(tool(NOW - 5 * DAY), cloned=True)],
                        2, 'planb') == [a, b]
    assert prune_source(snaps, 4, 'planb') == prune_source(snaps, 9, 'planb') == []
    transient = [Snapshot(snapshot_name('__x', NOW - k * DAY), k, k) for k in (1, 2)]
    assert prune_source(transient, 1, '__x') == []                  # PVE's, by name
    with pytest.raises(ValueError, match='not 0'):
        prune_source(snaps, 0, 'planb')


# Property tests over histories in createtxg order: the tool's snapshots,
# others', PVE's and bookmarks, most of them taken lately.

ages = st.one_of(st.integers(-DAY, 3 * DAY), st.integers(0, 60 * DAY),
                 st.integers(0, 3 * 365 * DAY))
kinds = st.sampled_from(['tool', 'tool', 'tool', 'foreign', 'transient', 'bookmark'])


@st.composite
def histories(draw):
    snaps = []
    for txg, (age, kind) in enumerate(draw(st.lists(st.tuples(ages, kinds), max_size=40)), 1):
        name = {'foreign': 'manual%d' % txg, 'transient': '__replicate_%d__' % txg}.get(
            kind, snapshot_name('planb', NOW - age))
        snaps.append(Snapshot(name, guid=txg, createtxg=txg, creation=NOW - age,
                              bookmark=kind == 'bookmark'))
    return snaps


def some_guids(data, snaps):
    return data.draw(st.sets(st.sampled_from([s.guid for s in snaps]))) if snaps else set()


@given(histories(), schedules, st.booleans(), st.data())
def test_thinning_destroys_only_what_it_may_and_is_stable(snaps, text, foreign, data):
    rules, protect = parse_keep_schedule(text), some_guids(data, snaps)
    doomed = thin_snapshots(snaps, rules, NOW, 'planb', protect, foreign)
    assert all(s in snaps and not s.bookmark and s.guid not in protect for s in doomed)
    assert [s.createtxg for s in doomed] == sorted({s.createtxg for s in doomed})
    assert foreign or all(s.name.startswith('planb-') for s in doomed)
    assert [s for s in snaps if not s.bookmark][-1:] == [
        s for s in snaps if not s.bookmark and s not in doomed][-1:]
    survivors = [s for s in snaps if s not in doomed]
    assert thin_snapshots(survivors, rules, NOW, 'planb', protect, foreign) == []


@given(histories(), st.integers(1, 5), st.data())
def test_pruning_keeps_the_newest_own_snapshots(snaps, keep, data):
    protect = some_guids(data, snaps)
    doomed = prune_source(snaps, keep, 'planb', protect)
    own = [s for s in snaps if not s.bookmark and s.name.startswith('planb-')]
    older = own[:max(0, len(own) - keep)]
    assert len(doomed) == len(older) - len([s for s in older if s.guid in protect])
    assert set(doomed) <= set(older) and not set(doomed) & set(own[-keep:])
