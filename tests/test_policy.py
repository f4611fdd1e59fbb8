"""The micro-batch state machine, driven directly with numbers."""

from __future__ import annotations

import pytest

from autoaccum.policy import MicroBatchPolicy, OutOfMemoryForOneSample

MIB = 2**20


def planned(cap=1024, per_sample=4096, free=2 * MIB):
    policy = MicroBatchPolicy(cap, pinned=None, planning=True, grow_after=3)
    assert policy.probing
    policy.record_probe(16, 16 * per_sample, free, 0)
    policy.record_probe(64, 64 * per_sample, free, 0)
    assert not policy.probing
    return policy


def clean_steps(policy, n, free):
    for _ in range(n):
        policy.end_of_step(free, had_oom=False)


def test_plan_is_the_largest_run_size_within_the_margin():
    policy = planned()
    # (2 MiB * 0.9) / 4096 = 460 samples fit; a step of 1024 runs 342s (3 micro-batches) at most.
    assert policy.limit == 342


def test_a_brief_spike_grows_back_to_the_size_that_failed_once_memory_returns():
    policy = planned()
    # The second micro-batch of a step (341 samples, under the 342 limit) runs out of memory
    # while another process holds memory.
    assert policy.on_oom(341, free_bytes=1 * MIB, context="spike") == 171
    clean_steps(policy, 3, free=1 * MIB)
    assert policy.limit == 256  # binary search between 171 and the failure
    clean_steps(policy, 1, free=1 * MIB)  # the trial ran a whole step: adopted
    clean_steps(policy, 3, free=1 * MIB)
    assert policy.limit == 256  # nothing a step of 1024 runs lies between 256 and 341
    clean_steps(policy, 1, free=2 * MIB)  # the other process let go
    assert policy.limit == 342  # a size a step really runs, not 341 (which would run 256s)


def test_the_failed_size_is_kept_while_memory_only_wobbles():
    policy = planned()
    policy.on_oom(342, free_bytes=1 * MIB, context="")
    policy.observe_free(1 * MIB + 4, reserve=0)  # 4 bytes more is not "memory rose"
    clean_steps(policy, 10, free=1 * MIB + 4)
    assert policy.limit < 342


def test_halving_to_zero_raises():
    policy = MicroBatchPolicy(8, pinned=1, planning=False)
    with pytest.raises(OutOfMemoryForOneSample):
        policy.on_oom(1, free_bytes=None, context="one sample")


def test_state_round_trips():
    policy = planned()
    policy.on_oom(342, free_bytes=MIB, context="")
    other = MicroBatchPolicy(1024, pinned=None, planning=True)
    other.load_state_dict(policy.state_dict())
    assert other.limit == policy.limit and not other.probing


def test_a_larger_share_is_planned_for_without_probing_again():
    policy = planned(cap=256, free=4 * MIB)  # 256 fits whole: one micro-batch
    assert policy.limit == 256
    policy.set_cap(400)  # "auto" shares gave this rank more samples
    assert not policy.probing
    assert policy.limit == 400  # (4 MiB * 0.9) / 4096 = 921 samples fit: still one micro-batch
    policy.set_cap(3000)
    assert policy.limit == 750  # 921 fit; a step of 3000 runs 4 x 750


def test_shares_change_only_for_a_real_gain():
    from autoaccum.planner import proportional_shares, step_time

    rates = [3000.0, 1500.0]
    good = proportional_shares(512, rates)
    assert step_time(good, rates) < 0.97 * step_time([256, 256], rates)
    assert not step_time(good, rates) < 0.97 * step_time([good[0] - 2, good[1] + 2], rates)
