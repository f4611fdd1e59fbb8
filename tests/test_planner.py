"""Property tests of the pure planning functions."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from autoaccum import planner


@given(st.integers(0, 5000), st.one_of(st.none(), st.integers(1, 600)))
def test_balanced_split_is_fewest_and_within_one(n, limit):
    sizes = planner.balanced_split(n, limit)
    assert sum(sizes) == n
    if n == 0:
        assert sizes == []
        return
    assert max(sizes) - min(sizes) <= 1
    if limit is None:
        assert sizes == [n]
    else:
        assert max(sizes) <= limit
        assert len(sizes) == -(-n // limit)  # no split with fewer micro-batches exists


def test_balanced_split_example_from_the_issue():
    assert planner.balanced_split(100, 32) == [25, 25, 25, 25]


@given(st.integers(1, 3000), st.integers(1, 400))
def test_taking_first_split_repeatedly_gives_the_balanced_split(n, limit):
    taken, left = [], n
    while left:
        taken.append(planner.first_split(left, limit))
        left -= taken[-1]
    assert taken == planner.balanced_split(n, limit)


@given(
    st.integers(0, 10**9), st.integers(1, 10**7),
    st.lists(st.integers(1, 4096), min_size=2, max_size=4),
)
def test_fit_recovers_an_exact_line(fixed, per_sample, sizes):
    probes = [(b, fixed + per_sample * b) for b in sizes]
    model = planner.fit_memory_model(probes)
    if len(set(sizes)) < 2:
        assert model.fixed_bytes == 0
        assert model.per_sample_bytes >= per_sample
        return
    for b in (1, 10, 1000):
        assert abs(model.peak(b) - (fixed + per_sample * b)) <= 1e-6 * (fixed + per_sample * b) + 2


@given(st.lists(st.tuples(st.integers(1, 512), st.integers(0, 10**10)), min_size=1, max_size=5))
def test_fit_never_under_charges_a_probe(probes):
    """The model is either the least-squares line or the pessimistic one; the pessimistic one
    covers every probe."""
    model = planner.fit_memory_model(probes)
    assert model.per_sample_bytes >= 0 and model.fixed_bytes >= 0
    if model.fixed_bytes == 0:
        assert all(model.peak(b) >= p - 1e-6 * p for b, p in probes)


@given(
    st.floats(0, 1e8), st.floats(1, 1e7), st.integers(0, 10**11), st.integers(0, 10**9),
    st.floats(0, 0.5), st.integers(1, 10000),
)
def test_choice_is_the_largest_that_fits(fixed, per_sample, free, reserve, margin, cap):
    model = planner.MemoryModel(fixed, per_sample)
    b = planner.choose_micro_batch(model, free, reserve, margin, cap)
    budget = (free - reserve) * (1 - margin)
    assert 1 <= b <= cap
    if b > 1:
        assert model.peak(b) <= budget * (1 + 1e-12)
    if b < cap:
        assert model.peak(b + 1) > budget * (1 - 1e-12)


@given(st.integers(1, 5000), st.one_of(st.none(), st.integers(2, 6000)), st.integers(1, 5000))
def test_grow_candidate_is_an_achievable_size_between_current_and_failed(current, failed, cap):
    c = planner.grow_candidate(current, failed, cap)
    if c == current:
        # Converged: no balanced split of cap has a micro-batch size strictly in between.
        upper = cap + 1 if failed is None else min(failed, cap + 1)
        if failed is not None:
            sizes = {-(-cap // k) for k in range(1, cap + 1)}
            assert not any(current < s < upper for s in sizes)
        return
    assert failed is not None and current < c < failed and c <= cap
    assert max(planner.balanced_split(cap, c)) == c  # a limit of c really runs size c


@given(st.integers(1, 10**6))
def test_halve(size):
    assert planner.halve(size) == size // 2


@given(st.integers(1, 4096), st.integers(1, 10**6), st.integers(0, 10**10))
def test_second_probe_differs_from_the_first_and_fits_the_cap(cap, peak, free):
    first = planner.next_probe_size(None, free, cap)
    assert 1 <= first <= cap
    second = planner.next_probe_size((first, peak), free, cap)
    assert min(2, cap) <= second <= cap  # never 1 sample where 2 are possible (BatchNorm)
    # A first probe of the whole cap already plans (no second probe): at a cap of 2 the two
    # may coincide.
    assert second != first or cap <= 2


def test_state_buffers_per_known_optimizer():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert planner.state_buffers_per_param(torch.optim.AdamW(p)) == 2
    assert planner.state_buffers_per_param(torch.optim.Adam(p, amsgrad=True)) == 3
    assert planner.state_buffers_per_param(torch.optim.SGD(p, lr=0.1)) == 0
    assert planner.state_buffers_per_param(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == 1

    class Custom(torch.optim.SGD):
        pass

    assert planner.state_buffers_per_param(Custom(p, lr=0.1)) == 2  # unknown: as Adam


def test_free_moved():
    assert not planner.free_moved(1000, 1050, 0.1)
    assert planner.free_moved(1000, 850, 0.1)
    assert planner.free_moved(1000, 1200, 0.1)


@given(st.integers(1, 5000), st.integers(1, 8))
def test_equal_shares_sum_and_differ_by_at_most_one(target, world):
    shares = planner.equal_shares(target, world)
    assert sum(shares) == target and len(shares) == world
    assert max(shares) - min(shares) <= 1 and shares == sorted(shares, reverse=True)


@given(st.integers(8, 5000), st.lists(st.floats(0.1, 1000), min_size=1, max_size=8))
def test_proportional_shares_follow_the_rates(target, rates):
    if len(rates) > target:
        return
    shares = planner.proportional_shares(target, rates)
    assert sum(shares) == target and min(shares) >= 1
    free = target - len(rates)
    for s, r in zip(shares, rates):
        assert abs((s - 1) - free * r / sum(rates)) < 1.0 + 1e-9  # rounding moves at most one


def test_check_shares_names_the_problem():
    import pytest

    with pytest.raises(ValueError, match="sum to 9; expected target_batch_size=10"):
        planner.check_shares([4, 5], 10, 2)
    with pytest.raises(ValueError, match="3 entries for 2 ranks"):
        planner.check_shares([4, 5, 1], 10, 2)
    with pytest.raises(ValueError, match="positive ints"):
        planner.check_shares([10, 0], 10, 2)


@given(st.integers(1, 3000), st.integers(1, 3000))
def test_achievable_at_least_is_the_smallest_run_size_not_below(size, cap):
    a = planner.achievable_at_least(size, cap)
    runs = {-(-cap // k) for k in range(1, cap + 1)}
    assert a in runs
    assert a >= min(size, cap)
    assert not any(min(size, cap) <= r < a for r in runs)


@given(
    st.integers(2, 2048), st.floats(0, 1e6), st.floats(1, 1e5), st.floats(1e3, 1e9),
    st.floats(0, 0.3), st.dictionaries(st.integers(1, 2048), st.floats(0, 1e9), max_size=4),
)
def test_choose_sizes_never_plans_a_size_measured_over_budget(cap, fixed, per, budget, margin,
                                                             observed):
    observed = {b: p for b, p in observed.items() if b <= cap}
    model = planner.MemoryModel(fixed, per)
    choice = planner.choose_sizes(model, observed, budget, cap, margin=margin)
    assert max(planner.balanced_split(cap, choice.limit)) == choice.limit  # a size a step runs
    over = [b for b, p in observed.items() if p > budget]
    below_cap = [b for b in over if b < cap]
    if below_cap and choice.limit != cap:  # accumulating sizes: peaks grow with the size
        assert choice.limit < min(below_cap) or choice.limit == 1
    if cap in over:  # the whole share, measured over budget, is never planned nor tried
        assert choice.limit != cap and choice.trial != cap
    if choice.trial is not None:
        assert choice.trial > choice.limit and choice.trial not in observed


@given(st.integers(1, 512), st.integers(1, 512), st.floats(1e3, 1e8), st.floats(0, 0.3))
def test_a_share_below_a_size_measured_within_budget_runs_in_one_micro_batch(cap, extra, budget,
                                                                            margin):
    """"auto" shares can shrink a rank's share below a size it already ran: the whole share then
    fits in one micro-batch (a larger accumulating micro-batch fitted), whatever the line says."""
    measured = cap + extra
    observed = {measured: budget * 0.5}
    pessimistic = planner.MemoryModel(budget, budget)  # predicts nothing fits
    choice = planner.choose_sizes(pessimistic, observed, budget, cap, margin=margin)
    assert choice.limit == cap


def test_the_shrunk_share_case_from_the_sharded_benchmark():
    choice = planner.choose_sizes(
        planner.MemoryModel(263180.0, 7168.0),
        {2: 277516, 9: 327692, 117: 1101844, 128: 130984, 91: 93096},
        952283, 91, margin=0.1, final_margin=0.0, single_pass_saving=1587232)
    assert choice == planner.SizeChoice(91, None)


def test_micro_batch_sizes_is_the_balanced_split_without_building_it():
    from autoaccum.records import MicroBatchSizes

    for n in range(0, 40):
        for limit in (None, 1, 2, 3, 7, 16, 39, 100):
            lazy = MicroBatchSizes(n, limit)
            assert lazy == tuple(planner.balanced_split(n, limit))
            assert len(lazy) == len(planner.balanced_split(n, limit))
    huge = MicroBatchSizes(10**9 + 1, 1000)
    assert len(huge) == 10**6 + 1
    assert huge[0] == 1000 and huge[-1] == 999
