"""ShareSchedule and ShareSampler: every sample exactly once, each rank exactly its share.

Ranks are simulated in one process: one sampler per rank, built with ``rank=`` and ``world_size=``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import pairwise, zip_longest
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from autoaccum.data import ShareSampler, ShareSchedule, split_by_shares


def make_samplers(n, schedules, **kw):
    """One sampler per rank; ``schedules`` is one shared schedule or one per rank."""
    if isinstance(schedules, ShareSchedule):
        schedules = [schedules] * schedules.world_size
    world = len(schedules)
    return [ShareSampler(n, s, rank=r, world_size=world, **kw) for r, s in enumerate(schedules)]


def epoch_batches(samplers):
    """Each rank's batches for one epoch (ranks read one after another)."""
    return [list(s) for s in samplers]


def assert_exact_cover(per_rank: Sequence[Sequence[list[int]]], n: int) -> None:
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == list(range(n)), "every sample exactly once across ranks"


def expected_share_at(initial, changes, step):
    """Reference: the shares of ``step`` given ``changes`` = [(from_step, shares), ...] in call
    order (increasing from_step)."""
    shares = list(initial)
    for start, new in changes:
        if start <= step:
            shares = list(new)
    return shares


def simulate(n, initial, calls, *, lookahead, prefetch, epochs=1, shared=False, seed=0):
    """A distributed training loop, step by step, with DataLoader-like read-ahead.

    ``calls`` maps an optimizer step ``k`` to new shares: at step ``k`` every rank schedules them
    from ``k + lookahead`` on. Each rank's sampler runs ``prefetch`` batches ahead of training. At
    every step the "optimizer" of each rank reads its shares too. Returns per epoch, per step, the
    batches of all ranks, and checks every step against a reference schedule.
    """
    world = len(initial)
    if shared:
        schedules = [ShareSchedule(initial)] * world
    else:
        schedules = [ShareSchedule(initial) for _ in range(world)]
    samplers = make_samplers(n, schedules, seed=seed)
    target = sum(initial)
    spe = -(-n // target)
    changes = []
    out = []
    step = 0
    for _ in range(epochs):
        iters = [iter(s) for s in samplers]
        buffers: list[deque] = [deque() for _ in range(world)]

        def refill(upto, iters=iters, buffers=buffers):
            for it, buf in zip(iters, buffers, strict=True):
                while len(buf) < upto:
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    buf.append(nxt)

        epoch_steps = []
        for _ in range(spe):
            if step in calls:
                changes.append((step + lookahead, calls[step]))
                for sched in {id(s): s for s in schedules}.values():
                    sched.set_from(step + lookahead, calls[step])
            refill(prefetch + 1)
            expected = expected_share_at(initial, changes, step)
            for sched in schedules:  # the optimizer of each rank reads its share of this step
                assert list(sched.shares_for(step)) == expected
            batches = [buf.popleft() if buf else [] for buf in buffers]
            epoch_steps.append((step, expected, batches))
            step += 1
        refill(1)
        assert all(not buf for buf in buffers), "a rank produced more batches than steps"
        out.append(epoch_steps)
    return out


def check_simulation(n, initial, epochs_out, seed=0):
    """Every epoch: steps cover the epoch's order contiguously, in rank order, with the shares."""
    target = sum(initial)
    for e, epoch_steps in enumerate(epochs_out):
        g = torch.Generator().manual_seed(seed + e)
        order = torch.randperm(n, generator=g).tolist()
        pos = 0
        for i, (_step, shares, batches) in enumerate(epoch_steps):
            size = min(target, n - i * target)
            lengths = [len(b) for b in batches]
            if size == target:
                assert lengths == shares
            else:
                assert lengths == split_by_shares(size, shares)
            flat = [idx for b in batches for idx in b]
            assert flat == order[pos : pos + size]
            pos += size
        assert pos == n
        assert_exact_cover([[b for _, _, bs in epoch_steps for b in bs]], n)


# ------------------------------------------------------------------ ShareSchedule


def test_schedule_basics_and_set_from():
    s = ShareSchedule([3, 5])
    assert (s.target, s.world_size, s.last_read) == (8, 2, -1)
    assert s.shares_for(0) == (3, 5)
    assert s.last_read == 0
    s.set_from(4, [6, 2])
    assert [s.shares_for(k) for k in (1, 3, 4, 9)] == [(3, 5), (3, 5), (6, 2), (6, 2)]
    assert s.last_read == 9
    s.set_from(12, [1, 7])
    s.set_from(11, [2, 6])  # a later call overrides from its step on
    assert [s.shares_for(k) for k in (10, 11, 12, 100)] == [(6, 2), (2, 6), (2, 6), (2, 6)]


def test_equal_schedule():
    assert ShareSchedule.equal(10, 3).shares_for(0) == (4, 3, 3)
    with pytest.raises(ValueError, match=r"target of 2 samples.*3 ranks"):
        ShareSchedule.equal(2, 3)


def test_set_from_an_already_read_step_raises_and_changes_nothing():
    s = ShareSchedule([4, 4])
    s.shares_for(7)  # a sampler prefetched up to step 7
    before = s.state_dict()
    for step in (0, 5, 7):
        with pytest.raises(RuntimeError, match=r"step 7.*further ahead.*> 7"):
            s.set_from(step, [6, 2])
    assert s.state_dict() == before
    s.set_from(8, [6, 2])
    assert s.shares_for(7) == (4, 4) and s.shares_for(8) == (6, 2)


@pytest.mark.parametrize(
    ("shares", "error", "pattern"),
    [
        ([4, 4, 0], ValueError, r"at least 1 sample, got 0 for rank 2 in \[4, 4, 0\]"),
        ([5, -1, 4], ValueError, r"got -1 for rank 1"),
        ([6, 6], ValueError, r"\[6, 6\] are for 2 ranks; expected 3"),
        ([3, 3, 3], ValueError, r"\[3, 3, 3\] sum to 9; expected 8"),
        ([], ValueError, "empty"),
        ([2.5, 2.5, 3], TypeError, r"must be ints, got float 2.5 for rank 0"),
        ([True, 3, 4], TypeError, "bool"),
        ("332", TypeError, "sequence of per-rank sample counts"),
    ],
)
def test_set_from_bad_shares_name_given_and_expected(shares, error, pattern):
    s = ShareSchedule([3, 3, 2])
    before = s.state_dict()
    with pytest.raises(error, match=pattern):
        s.set_from(1, shares)
    assert s.state_dict() == before


@pytest.mark.parametrize(
    ("initial", "error", "pattern"),
    [
        ([], ValueError, "empty"),
        ([2, 0], ValueError, r"got 0 for rank 1 in \[2, 0\]"),
        (4, TypeError, "sequence"),
        ([1.0], TypeError, "float"),
    ],
)
def test_schedule_bad_initial(initial, error, pattern):
    with pytest.raises(error, match=pattern):
        ShareSchedule(initial)


def test_bad_steps():
    s = ShareSchedule([2])
    with pytest.raises(ValueError, match=r"step must be >= 0.*got -1"):
        s.shares_for(-1)
    with pytest.raises(TypeError, match="int"):
        s.set_from(1.0, [2])  # type: ignore[arg-type]


def test_state_dict_round_trip_is_plain_python():
    s = ShareSchedule([3, 5])
    s.shares_for(2)
    s.set_from(5, [4, 4])
    sd = s.state_dict()
    assert sd == {"entries": [[0, [3, 5]], [5, [4, 4]]], "last_read": 2}
    t = ShareSchedule([3, 5])
    t.load_state_dict(sd)
    assert t.state_dict() == sd
    assert [t.shares_for(k) for k in (4, 5)] == [(3, 5), (4, 4)]
    with pytest.raises(RuntimeError):
        t.set_from(5, [1, 7])  # last_read came with the state: step 5 was read


@pytest.mark.parametrize(
    ("state", "pattern"),
    [
        ({"entries": [[0, [4, 4, 0]]], "last_read": -1}, "at least 1 sample"),
        ({"entries": [[0, [2, 2]]], "last_read": -1}, r"total 4\); expected world size 2 and "
                                                        r"total 8"),
        ({"entries": [[0, [4, 2, 2]]], "last_read": -1}, "world size 3"),
        ({"entries": [[3, [4, 4]], [1, [2, 6]]], "last_read": -1}, "increasing steps"),
        ({"entries": []}, r"'entries' \(a list\) and 'last_read'"),
        ({"entries": [], "last_read": -1}, "no entries"),
    ],
)
def test_load_state_dict_rejects_bad_state_and_changes_nothing(state, pattern):
    s = ShareSchedule([3, 5])
    before = s.state_dict()
    with pytest.raises(ValueError, match=pattern):
        s.load_state_dict(state)
    assert s.state_dict() == before


def test_history_is_bounded_and_keeps_what_the_slowest_reader_needs():
    s = ShareSchedule([4, 4])
    changes = []
    for k in range(0, 200, 10):  # every 10 steps; the optimizer at k, a sampler 6 steps ahead
        for step in range(k, k + 10):
            assert list(s.shares_for(step)) == expected_share_at([4, 4], changes, step)
            assert list(s.shares_for(step + 6)) == expected_share_at([4, 4], changes, step + 6)
        new = [1 + k % 7, 7 - k % 7]
        s.set_from(k + 18, new)  # scheduled further ahead than the interval
        changes.append((k + 18, new))
    assert len(s.state_dict()["entries"]) <= 3
    for step in (200, 206, 207, 208, 500):
        assert list(s.shares_for(step)) == expected_share_at([4, 4], changes, step)
    with pytest.raises(RuntimeError, match="no longer kept"):
        s.shares_for(0)


def test_shares_changing_every_step_with_reader_behind_a_change():
    # Lookahead > interval: when set_from runs, a change lies between the optimizer and the
    # sampler; the entry the optimizer still needs must survive.
    s = ShareSchedule([5, 5])
    s.shares_for(0)
    s.set_from(3, [6, 4])
    s.shares_for(0)
    s.shares_for(4)  # sampler ran past the change at 3
    s.set_from(6, [7, 3])
    assert s.shares_for(1) == (5, 5)  # the optimizer, still at step 1
    assert s.shares_for(3) == (6, 4)


def test_split_by_shares_examples():
    assert split_by_shares(5, [3, 1]) == [4, 1]
    assert split_by_shares(1, [1, 1, 1]) == [1, 0, 0]
    assert split_by_shares(0, [2, 3]) == [0, 0]
    assert split_by_shares(3, [1, 2, 3, 4]) == [0, 1, 1, 1]


@given(st.integers(0, 500), st.lists(st.integers(1, 60), min_size=1, max_size=6))
def test_split_by_shares_is_a_fair_partition(n, shares):
    parts = split_by_shares(n, shares)
    assert sum(parts) == n and all(p >= 0 for p in parts)
    total = sum(shares)
    for p, s in zip(parts, shares, strict=True):
        assert abs(p - n * s / total) < 1


# ------------------------------------------------------------------ ShareSampler


@pytest.mark.parametrize(
    ("n", "initial"),
    [(64, [8, 8]), (64, [4, 4, 4, 4]), (60, [5, 11]), (61, [2, 7, 1, 6]), (5, [4, 4]), (7, [7])],
)
def test_each_rank_gets_its_share_and_every_sample_once(n, initial):
    samplers = make_samplers(n, ShareSchedule(initial))
    per_rank = epoch_batches(samplers)
    assert_exact_cover(per_rank, n)
    target = sum(initial)
    full, rest = divmod(n, target)
    last = split_by_shares(rest, initial)
    for r, batches in enumerate(per_rank):
        assert len(samplers[r]) == full + (rest > 0)
        expected = [initial[r]] * full + ([last[r]] if last[r] else [])
        assert [len(b) for b in batches] == expected


def test_steps_are_contiguous_slices_of_the_shared_permutation():
    per_rank = epoch_batches(make_samplers(20, ShareSchedule([2, 3, 1]), seed=7))
    order = torch.randperm(20, generator=torch.Generator().manual_seed(7)).tolist()
    # T = 6: three full steps, then 2 samples split over [2, 3, 1] as [1, 1, 0].
    assert [len(b) for b in per_rank] == [4, 4, 3]
    for i in range(3):
        lo = 6 * i
        assert per_rank[0][i] == order[lo : lo + 2]
        assert per_rank[1][i] == order[lo + 2 : lo + 5]
        assert per_rank[2][i] == order[lo + 5 : lo + 6]
    assert per_rank[0][3] == order[18:19] and per_rank[1][3] == order[19:20]


def test_partial_last_step_split_in_proportion_and_empty_parts_skipped():
    # N % T = 2 over shares [1, 6, 1]: proportional parts [0, 2, 0]; ranks 0 and 2 skip the step.
    samplers = make_samplers(18, ShareSchedule([1, 6, 1]))
    per_rank = epoch_batches(samplers)
    assert [len(b) for b in per_rank] == [2, 3, 2]
    assert [len(b) for b in per_rank[1]] == [6, 6, 2]
    assert all(len(s) == 3 for s in samplers)
    assert_exact_cover(per_rank, 18)


def test_shares_change_mid_epoch_shared_schedule():
    sched = ShareSchedule([4, 4])
    samplers = make_samplers(80, sched)
    iters = [iter(s) for s in samplers]
    steps = []
    for k in range(10):
        if k == 2:
            sched.set_from(4, [6, 2])
        if k == 5:
            sched.set_from(7, [1, 7])
        steps.append([next(it) for it in iters])
    assert [[len(b) for b in step] for step in steps] == (
        [[4, 4]] * 4 + [[6, 2]] * 3 + [[1, 7]] * 3
    )
    assert all(next(it, None) is None for it in iters)
    assert_exact_cover([[b for step in steps for b in step]], 80)


@pytest.mark.parametrize("shared", [False, True])
def test_shares_change_mid_epoch_with_prefetching_ranks(shared):
    calls = {0: [3, 2, 5], 3: [1, 1, 8], 6: [4, 4, 2], 7: [2, 6, 2]}
    out = simulate(97, [4, 3, 3], calls, lookahead=3, prefetch=2, epochs=2, shared=shared)
    check_simulation(97, [4, 3, 3], out)


def test_per_rank_schedules_with_identical_updates_match_a_shared_one():
    calls = {1: [2, 8], 4: [9, 1], 9: [5, 5]}
    own = simulate(55, [5, 5], calls, lookahead=2, prefetch=1, epochs=3)
    shared = simulate(55, [5, 5], calls, lookahead=2, prefetch=1, epochs=3, shared=True)
    assert own == shared


def test_prefetching_past_a_change_point_is_refused():
    sched = ShareSchedule([4, 4])
    it = iter(ShareSampler(64, sched, rank=0, world_size=2))
    for _ in range(5):
        next(it)  # steps 0..4 cut with [4, 4]
    with pytest.raises(RuntimeError, match="data up to step 4"):
        sched.set_from(3, [6, 2])
    sched.set_from(5, [6, 2])
    assert len(next(it)) == 6


def test_determinism_and_epochs():
    def batches(epoch, seed=0):
        s = make_samplers(50, ShareSchedule([3, 4]), seed=seed)
        for x in s:
            x.set_epoch(epoch)
        return epoch_batches(s)

    assert batches(0) == batches(0)
    assert batches(3, seed=5) == batches(3, seed=5)
    assert batches(0) != batches(1)
    assert batches(0) != batches(0, seed=1)
    # The order is torch.randperm from seed + epoch, the same on every rank.
    steps = zip_longest(*batches(2, seed=3), fillvalue=[])
    flat = [i for step in steps for b in step for i in b]
    assert flat == torch.randperm(50, generator=torch.Generator().manual_seed(5)).tolist()


def test_no_shuffle_is_in_order():
    per_rank = epoch_batches(make_samplers(10, ShareSchedule([1, 2]), shuffle=False))
    # the last step's 1 sample over shares [1, 2] goes to rank 1 (the larger remainder)
    assert per_rank == [[[0], [3], [6]], [[1, 2], [4, 5], [7, 8], [9]]]


def test_epochs_advance_and_global_steps_follow_on():
    sched = ShareSchedule([2, 2])
    sampler = ShareSampler(10, sched, rank=0, world_size=2, start_step=100)
    assert len(sampler) == 3 and sampler.global_step(0) == 100
    e0 = list(sampler)
    assert sched.last_read == 102 and sampler.epoch == 1
    e1 = list(sampler)  # no set_epoch: the next epoch, steps 103..105
    assert sched.last_read == 105 and e0 != e1
    sampler.set_epoch(5)
    assert sampler.global_step(1) == 100 + 5 * 3 + 1
    sched.set_from(116, [3, 1])
    assert [len(b) for b in sampler] == [2, 3, 2]  # step 116 has [3, 1]; last step 2 of [3, 1]
    assert sampler.epoch == 6
    sched.set_from(125, [2, 2])  # the lowest step read since the last change is 115: keeps all
    list(sampler)  # steps 118..120
    sched.set_from(130, [1, 3])  # every reader is past step 116: the entry before it is dropped
    sampler.set_epoch(1)
    with pytest.raises(RuntimeError, match="no longer kept"):
        list(sampler)  # going back to an epoch whose steps the schedule has dropped


def test_an_iterator_that_is_never_used_consumes_no_epoch():
    sampler = ShareSampler(8, ShareSchedule([4]), world_size=1, rank=0)
    iter(sampler)  # the DataLoader makes and drops such iterators (worker processes)
    first = list(sampler)
    assert sampler.epoch == 1
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_schedule_from_an_object_with_share_schedule():
    opt = SimpleNamespace(share_schedule=ShareSchedule([3, 1]))
    sampler = ShareSampler(8, opt, rank=1, world_size=2)
    assert [len(b) for b in sampler] == [1, 1]
    opt.share_schedule = ShareSchedule([1, 3])  # replaced (e.g. on load): read afresh
    assert [len(b) for b in sampler] == [3, 3]
    with pytest.raises(TypeError, match="share_schedule"):
        ShareSampler(8, SimpleNamespace(share_schedule=None), rank=0, world_size=2)
    with pytest.raises(TypeError, match="ShareSchedule"):
        ShareSampler(8, [3, 1], rank=0, world_size=2)


def test_sampler_defaults_without_a_process_group():
    sampler = ShareSampler(list(range(9)), ShareSchedule([4]))
    assert (sampler.rank, sampler.world_size) == (0, 1)
    assert [len(b) for b in sampler] == [4, 4, 1]


def test_sampler_bad_input_names_given_and_expected():
    sched = ShareSchedule([2, 2, 4])
    with pytest.raises(ValueError, match="world_size is 2 but the schedule has shares for 3 ranks"):
        ShareSampler(10, sched, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"world_size is 1 but .* 3 ranks"):
        ShareSampler(10, sched)  # no process group: world size 1
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\), got 3"):
        ShareSampler(10, sched, rank=3, world_size=3)
    with pytest.raises(ValueError, match="got -1"):
        ShareSampler(-1, sched, rank=0, world_size=3)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        ShareSampler(10, sched, rank=0, world_size=3, start_step=-2)


def test_empty_dataset():
    sampler = ShareSampler(0, ShareSchedule([2]))
    assert len(sampler) == 0 and list(sampler) == []


def test_dataloader_loads_exactly_the_sampled_indices():
    n = 43
    x = torch.arange(n) * 10
    ds = TensorDataset(x, torch.arange(n))
    sched = ShareSchedule([5, 3])
    samplers = make_samplers(ds, sched, seed=11)
    loaders = [DataLoader(ds, batch_sampler=s, num_workers=0) for s in samplers]
    assert [len(dl) for dl in loaders] == [6, 6]
    idx_batches = [list(s) for s in make_samplers(ds, ShareSchedule([5, 3]), seed=11)]
    loaded = []
    for r, dl in enumerate(loaders):
        got = list(dl)
        assert len(got) == len(idx_batches[r])
        for (xb, ib), idx in zip(got, idx_batches[r], strict=True):
            assert ib.tolist() == idx
            assert xb.tolist() == [10 * i for i in idx]
            loaded += idx
    assert sorted(loaded) == list(range(n))


def test_dataloader_with_workers_prefetches_ahead_and_still_covers():
    n = 40
    ds = TensorDataset(torch.arange(n))
    sched = ShareSchedule([4])
    sampler = ShareSampler(ds, sched, rank=0, world_size=1)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    first = next(it)[0]
    assert len(first) == 4
    assert sched.last_read >= 4  # the loader read ahead: changes must be scheduled beyond it
    with pytest.raises(RuntimeError):
        sched.set_from(sched.last_read, [4])
    rest = [b[0] for b in it]
    assert sorted(torch.cat([first, *rest]).tolist()) == list(range(n))


# ------------------------------------------------------------------ property test


@st.composite
def share_vectors(draw, world, target):
    if world == 1:
        return [target]
    cuts = sorted(draw(st.sets(st.integers(1, target - 1), min_size=world - 1, max_size=world - 1)))
    bounds = [0, *cuts, target]
    return [b - a for a, b in pairwise(bounds)]


@st.composite
def scenarios(draw):
    world = draw(st.integers(1, 4))
    target = draw(st.integers(world, 24))
    n = draw(st.integers(0, 130))
    epochs = draw(st.integers(1, 3))
    total_steps = epochs * -(-n // target)
    prefetch = draw(st.integers(0, 3))
    lookahead = draw(st.integers(prefetch + 1, prefetch + 4))
    call_steps = draw(st.sets(st.integers(0, max(total_steps, 1)), max_size=6))
    calls = {k: draw(share_vectors(world, target)) for k in sorted(call_steps)}
    initial = draw(share_vectors(world, target))
    shared = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return n, initial, calls, lookahead, prefetch, epochs, shared, seed


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_property_exact_cover_with_changing_shares(scenario):
    n, initial, calls, lookahead, prefetch, epochs, shared, seed = scenario
    out = simulate(n, initial, calls, lookahead=lookahead, prefetch=prefetch, epochs=epochs,
                   shared=shared, seed=seed)
    check_simulation(n, initial, out, seed=seed)
