"""The sync planner: snapshot lists in, a plan out. Pure, so tested exhaustively."""
import pytest
from hypothesis import given, strategies as st

from planb_pvesync import (
    Dataset, ResumeStep, RollbackStep, SendStep, Snapshot, TokenSends, ZFS_LIST_PROPS,
    is_zfs_name, learn_guids, parse_receipts, parse_zfs_list, plan_sync, with_receipts)


def snap(name, guid, txg, bookmark=False, written=10):
    return Snapshot(name, guid=guid, createtxg=txg, written=written, size=100,
                    bookmark=bookmark)


S1, S2, S3, S4 = (snap('s%d' % i, 1000 + i, 10 * i) for i in range(1, 5))


def src(*snaps, encrypted=False):
    return Dataset('rpool/data/vm-100-disk-0', 'volume', snapshots=snaps,
                   encrypted=encrypted)


def dst(*snaps, written=0, token=None):
    return Dataset('tank/enc/g/local-zfs--vm-100-disk-0', 'volume', written=written,
                   resume_token=token, snapshots=snaps)


def test_first_run_sends_the_oldest_whole_then_the_rest_with_intermediates():
    plan = plan_sync(src(S1, S2, S3), None)
    assert plan.action == 'full'
    assert plan.steps == (SendStep(S1, estimate=100),
                          SendStep(S3, base=S1, intermediates=True, estimate=20))


def test_first_run_without_intermediates_sends_only_the_newest():
    plan = plan_sync(src(S1, S2, S3), None, intermediates=False)
    assert plan.steps == (SendStep(S3, estimate=100),)


def test_incremental_from_the_newest_common_snapshot():
    plan = plan_sync(src(S1, S2, S3, S4), dst(S1, S2))
    assert plan.action == 'incremental'
    assert plan.steps == (SendStep(S4, base=S2, intermediates=True, estimate=20),)
    assert plan_sync(src(S1, S2, S3, S4), dst(S1, S2), intermediates=False).steps == (
        SendStep(S4, base=S2, intermediates=False, estimate=20),)


def test_up_to_date():
    assert plan_sync(src(S1, S2), dst(S1, S2)).action == 'up-to-date'


def test_matching_is_by_guid_not_by_name():
    impostor = snap('s2', 999, 20)
    plan = plan_sync(src(S1, S2, S3), dst(impostor))
    assert plan.action == 'diverged'
    assert 'shares no snapshot' in plan.problem and '--destroy-diverged' in plan.problem


def test_snapshot_names_on_the_two_sides_may_differ():
    renamed = snap('renamed', S2.guid, 7)
    assert plan_sync(src(S1, S2, S3), dst(renamed)).steps == (
        SendStep(S3, base=S2, intermediates=True, estimate=10),)


def test_no_common_snapshot_is_replaced_only_when_asked():
    other = snap('x', 1, 1)
    assert plan_sync(src(S1, S2), dst(other)).action == 'diverged'
    plan = plan_sync(src(S1, S2), dst(other), destroy_diverged=True)
    assert plan.action == 'full' and plan.steps[0] == SendStep(S1, estimate=100)


def test_destination_without_snapshots_is_diverged():
    plan = plan_sync(src(S1), dst())
    assert plan.action == 'diverged' and 'has no snapshot' in plan.problem


def test_changed_destination_needs_rollback():
    plan = plan_sync(src(S1, S2, S3), dst(S1, S2, written=4096))
    assert plan.action == 'diverged'
    assert '4096 bytes written' in plan.problem and '--rollback' in plan.problem
    plan = plan_sync(src(S1, S2, S3), dst(S1, S2, written=4096), rollback=True)
    assert plan.steps == (RollbackStep(S2),
                          SendStep(S3, base=S2, intermediates=True, estimate=10))


def test_common_snapshot_deleted_on_source_is_diverged_unless_rollback():
    plan = plan_sync(src(S1, S3), dst(S1, S2))
    assert plan.action == 'diverged'
    assert '@s2' in plan.problem and 'continue from @s1' in plan.problem
    plan = plan_sync(src(S1, S3), dst(S1, S2), rollback=True)
    assert plan.steps[0] == RollbackStep(S1)


def test_snapshots_made_on_the_destination_without_changes_are_received_past():
    mine = snap('before-upgrade', 77, 25, written=0)
    plan = plan_sync(src(S1, S2, S3), dst(S1, S2, mine))
    assert plan.action == 'incremental'
    assert plan.steps == (SendStep(S3, base=S2, intermediates=True, estimate=10),)
    assert plan_sync(src(S1, S2), dst(S1, S2, mine)).action == 'up-to-date'


def test_snapshots_made_on_the_destination_with_changes_need_rollback():
    mine = snap('mine', 77, 25, written=4096)
    plan = plan_sync(src(S1, S2, S3), dst(S1, S2, mine))
    assert plan.action == 'diverged'
    assert '(@mine), and 4096 bytes were written after @s2' in plan.problem
    assert '--rollback' in plan.problem
    assert plan_sync(src(S1, S2, S3), dst(S1, S2, mine), rollback=True).steps[0] == (
        RollbackStep(S2))


def test_a_raw_stream_is_not_received_past_a_snapshot_made_on_the_destination():
    mine = snap('mine', 77, 25, written=0)
    plan = plan_sync(src(S1, S2, S3, encrypted=True), dst(S1, S2, mine))
    assert plan.action == 'diverged'
    assert 'sent raw' in plan.problem and 'zfs destroy {}@mine'.format(
        dst().name) in plan.problem
    plan = plan_sync(src(S1, S2, S3, encrypted=True), dst(S1, S2, mine), rollback=True)
    assert plan.steps[0] == RollbackStep(S2)


def test_a_name_used_again_with_another_guid_is_refused_before_sending():
    again = snap('s3', 9999, 25, written=0)     # @s3 on the destination is another one
    plan = plan_sync(src(S1, S2, S3, S4), dst(S1, S2, again))
    assert plan.action == 'diverged' and plan.steps == ()
    assert plan.problem == (
        '{0}@s3 is another snapshot than the source\'s @s3: their guids differ (9999 '
        'here, 1003 on the source), so the name was used again; nothing was sent; '
        'rename one of them, for example: zfs rename {0}@s3 {0}@s3-old'.format(dst().name))
    # Sent without intermediates, @s3 stays behind on the source: no clash.
    assert plan_sync(src(S1, S2, S3, S4), dst(S1, S2, again),
                     intermediates=False).action == 'incremental'


def test_a_clash_before_the_base_counts_too():
    old, new = snap('dup', 9999, 5), snap('dup', 8888, 15)     # destroyed, made again
    plan = plan_sync(src(S1, new, S2), dst(old, S1), rollback=True)
    assert plan.action == 'diverged' and '(9999 here, 8888 on the source)' in plan.problem
    # --rollback destroys a clash after the base: nothing is left to refuse.
    plan = plan_sync(src(S1, S2, S3), dst(S1, snap('s2', 9999, 20)), rollback=True)
    assert plan.steps[0] == RollbackStep(S1)


def test_a_bookmark_keeps_the_chain_when_the_snapshot_is_gone():
    bm2 = snap('s2', S2.guid, S2.createtxg, bookmark=True)
    plan = plan_sync(src(S1, bm2, S3, S4), dst(S1, S2))
    assert plan.action == 'incremental'
    assert plan.steps == (SendStep(S3, base=bm2, estimate=10),
                          SendStep(S4, base=S3, intermediates=True, estimate=10))
    plan = plan_sync(src(S1, bm2, S3), dst(S1, S2))
    assert plan.steps == (SendStep(S3, base=bm2, estimate=10),)


def test_a_snapshot_is_preferred_over_its_bookmark():
    bm2 = snap('s2', S2.guid, S2.createtxg, bookmark=True)
    plan = plan_sync(src(S1, S2, bm2, S3), dst(S1, S2))
    assert plan.steps == (SendStep(S3, base=S2, intermediates=True, estimate=10),)


def test_resume_token_comes_first():
    plan = plan_sync(src(S1, S2), dst(S1, token='1-abc-def'))
    assert plan.action == 'resume' and plan.steps == (ResumeStep('1-abc-def'),)


def test_pve_transient_snapshots_are_no_base():
    replicate = snap('__replicate_100-0_1700000000__', 50, 35)
    vzdump = snap('vzdump', 51, 36)
    plan = plan_sync(src(S1, S2, replicate, vzdump), dst(S1))
    assert plan.steps == (SendStep(S2, base=S1, intermediates=True, estimate=10),)


def test_nothing_to_send():
    plan = plan_sync(src(), None)
    assert plan.action == 'diverged' and 'no snapshot' in plan.problem


def test_parse_zfs_list():
    def row(*fields, recorded=('-',) * 7, owner='-'):
        return '\t'.join(fields + recorded + (owner,)) + '\n'
    text = (row('rpool/data/vm-1-disk-0', 'volume', '1', '5', '1700000000', '4096',
                '8388608', '9000000', 'off', '-', '-', '-', '-')
            + row('rpool/data/vm-1-disk-0@my snap:1', 'snapshot', '11', '6', '1700000001',
                  '512', '8388608', '512', '-', '-', '-', '-', 'tank/enc/_restore/x',
                  owner='1d6f3c4e-5a7b')
            + row('rpool/data/vm-1-disk-0#my snap:1', 'bookmark', '11', '6', '1700000001',
                  '-', '-', '-', '-', '-', '-', '-', '-')
            + row('tank/enc/x', 'filesystem', '2', '9', '1700000000', '0', '0', '0',
                  'aes-256-gcm', 'unavailable', 'tank/enc', '1-ab-cd-ef', '-',
                  recorded=('demo', 'pve1', '-', '-', '106', '-', '-')))
    found = parse_zfs_list(text)
    vol = found['rpool/data/vm-1-disk-0']
    assert (vol.type, vol.written, vol.used, vol.encrypted, vol.resume_token) == (
        'volume', 4096, 9000000, False, None)
    assert [(s.name, s.guid, s.bookmark, s.ref, s.cloned, s.owner) for s in vol.snapshots] == [
        ('my snap:1', 11, False, '@my snap:1', True, '1d6f3c4e-5a7b'),
        ('my snap:1', 11, True, '#my snap:1', False, None)]
    assert vol.recorded == {}
    fs = found['tank/enc/x']
    assert fs.encrypted and fs.resume_token == '1-ab-cd-ef' and fs.snapshots == ()
    assert (fs.encryption_root, vol.encryption_root) == ('tank/enc', None)
    assert (fs.key_loaded, vol.key_loaded) == (False, True)
    assert fs.recorded == {'cluster': 'demo', 'node': 'pve1', 'vmid': '106'}


def listed(name, kind='volume', guid='1', txg='5'):
    fields = [name, kind, guid, txg] + ['-'] * (len(ZFS_LIST_PROPS) - 4)
    return '\t'.join(fields)


@pytest.mark.parametrize('line', [
    listed('rpool/data/vm-1-disk-0\trpool/ROOT'),              # a column too many
    listed('rpool/data/vm-1-disk-0')[:-2],                      # one too few
    listed('rpool/data/vm-1-disk-0', 'zvol'),
    listed('rpool/data/vm-1-disk-0@s', 'volume'),              # a snapshot as a volume
    listed('rpool/data/vm-1-disk-0', 'snapshot'),
    listed('rpool/data/vm-1-disk-0#b', 'snapshot'),
    listed('rpool/data/../vm-1-disk-0'), listed('rpool//x'), listed('/rpool/x'),
    listed('rpool/data/vm-1-disk-0@a@b', 'snapshot'), listed('rpool/x,y'),
    listed('rpool/data/vm-1-disk-0', guid='0x10'), listed('rpool/x', txg='-'),
    listed('rpool/' + 'x' * 300),
])
def test_a_listing_zfs_would_not_print_is_refused(line):
    good = listed('rpool/data/vm-2-disk-0')
    assert list(parse_zfs_list(good + '\n')) == ['rpool/data/vm-2-disk-0']
    with pytest.raises(ValueError, match="a line that is no zfs list of ZFS's"):
        parse_zfs_list(good + '\n' + line + '\n')


@pytest.mark.parametrize('name, marks, ok', [
    ('rpool', '', True), ('rpool/data/vm 1:a.b_c-d', '', True), ('rpool/x@daily 1', '@#', True),
    ('rpool/x#b', '@#', True), ('rpool/x@s', '', False), ('1pool/x', '', False),
    ('rpool/x/', '', False), ('rpool/./x', '', False), ('rpool/x@..', '@#', False),
    ('rpool/x\ny', '', False), ('rpool/x%recv', '', False), ('', '', False),
])
def test_is_zfs_name(name, marks, ok):
    assert is_zfs_name(name, marks) == ok


def test_receipts_are_read_as_this_host_set_them():
    receipts = parse_receipts('tank/enc/g/v@a\t2024-06-15T12:00:00Z\n'
                              'tank/enc/g/v@b\tyesterday\n')
    assert receipts == {'tank/enc/g/v@a': 1718452800}
    dataset = Dataset('tank/enc/g/v', 'volume', snapshots=(
        snap('a', 1, 1), snap('b', 2, 2), snap('a', 1, 1, bookmark=True)))
    assert [s.received for s in with_receipts(dataset, receipts).snapshots] == [
        1718452800, None, None]


def test_a_resume_token_is_of_a_dataset_by_name_and_by_guid():
    backup = Dataset('tank/enc/g/v', 'volume', snapshots=(snap('a', 11, 1), snap('b', 12, 2)))
    assert TokenSends('tank/enc/g/v', 12, 100).is_of(backup)
    assert TokenSends(None, 11, 100).is_of(backup)
    assert not TokenSends('tank/enc/g/v', 99, 100).is_of(backup)     # another's, by guid
    assert not TokenSends('tank/enc/h/w', 12, 100).is_of(backup)
    assert not TokenSends('tank/enc/g/v', None, 100).is_of(backup)


# A property test: whatever the source's history and whichever prefix of it
# the destination got in earlier runs, the plan brings the destination to the
# source's newest snapshot, each incremental starting where the destination is.

histories = st.integers(min_value=1, max_value=12).map(
    lambda n: [snap('s%d' % i, 5000 + i, 10 * i) for i in range(n)])


@given(histories, st.data(), st.booleans())
def test_plans_always_reach_the_newest_snapshot(history, data, intermediates):
    received = data.draw(st.integers(min_value=0, max_value=len(history)))
    kept = sorted(data.draw(st.sets(st.integers(0, len(history) - 1))) | {len(history) - 1})
    source = src(*[history[i] for i in kept])
    destination = dst(*history[:received]) if received else None
    plan = plan_sync(source, destination, intermediates=intermediates)
    if destination and not any(s in source.snapshots for s in destination.snapshots):
        assert plan.action == 'diverged'
        return
    if destination and destination.snapshots[-1] not in source.snapshots:
        assert plan.action == 'diverged' and '--rollback' in plan.problem
        return
    have = list(destination.snapshots) if destination else []
    for step in plan.steps:
        if step.base is None:
            assert not have
            have = [step.snapshot]
        else:
            assert have[-1].guid == step.base.guid
            later = [s for s in source.snapshots
                     if step.base.createtxg < s.createtxg <= step.snapshot.createtxg]
            have += later if step.intermediates else [step.snapshot]
    assert have[-1] == source.snapshots[-1]
    if intermediates:
        start = have.index(destination.snapshots[-1]) if destination else 0
        assert [s for s in source.snapshots if s.createtxg >= have[start].createtxg] == have[start:]


def test_a_new_snapshot_learns_its_guid_from_the_destination():
    new = Snapshot('planb-new', guid=0, createtxg=2 ** 63)
    received = snap('planb-new', 4242, 77)
    source = learn_guids(src(S1, new), dst(S1, received))
    assert [s.guid for s in source.snapshots] == [S1.guid, 4242]
    assert plan_sync(source, dst(S1, received)).action == 'up-to-date'
    assert learn_guids(src(S1, new), None).snapshots == (S1, new)
