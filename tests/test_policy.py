"""The micro-batch state machine, driven directly with numbers."""

from __future__ import annotations

import pytest

from autoaccum.policy import MicroBatchPolicy, OutOfMemoryForOneSample

MIB = 2**20
PER_SAMPLE = 4096


def planned(cap=1024, budget=2 * MIB, **kw):
    """Probed on an exact line: 4096 bytes per sample, nothing fixed."""
    policy = MicroBatchPolicy(cap, pinned=None, planning=True, grow_after=3, **kw)
    assert policy.probing
    policy.record_probe(16, 16 * PER_SAMPLE, budget)
    policy.record_probe(64, 64 * PER_SAMPLE, budget)
    assert not policy.probing
    return policy


def run_step(policy, budget=2 * MIB, oom=False, thrash=False):
    """One step at the current limit on the exact line; an OOM when it does not fit."""
    size = policy.limit
    if oom or size * PER_SAMPLE > budget:
        policy.on_oom(size, budget, "test")
        return size, True
    policy.end_of_step(size, size * PER_SAMPLE, budget, had_oom=False, thrash=thrash)
    return size, False


def test_plan_is_safe_then_one_verified_step_reaches_the_largest_runnable_size():
    policy = planned()
    # 2 MiB * 0.9 / 4096 = 460 samples fit with the margin: a step of 1024 runs 342s at most.
    # 512 (2 x 512) fits exactly: worth one trial step.
    assert policy.trial == 512 and policy.limit == 512 and not policy.settled
    assert run_step(policy) == (512, False)
    assert policy.limit == 512 and policy.trial is None and policy.settled
    for _ in range(5):  # settled: stays, no more trials, no OOM
        assert run_step(policy) == (512, False)


def test_a_failed_trial_goes_back_one_size_and_is_not_retried_on_the_same_memory():
    policy = planned()
    assert policy.trial == 512
    policy.on_oom(512, 2 * MIB, "the line under-estimated")
    assert policy.limit == 342 and policy.trial is None and policy.settled
    policy.observe_start(2 * MIB)
    policy.observe_start(int(2.05 * MIB))  # a wobble, not "more memory"
    for _ in range(10):
        assert run_step(policy) == (342, False)
    assert policy.limit == 342
    policy.observe_start(3 * MIB)  # memory rose: the failed size fits now, with the margin
    assert policy.limit == 512 and policy.trial is None


def test_a_measured_peak_above_the_budget_refuses_the_trial():
    policy = planned()
    # The trial step ran, but its peak came out over budget (the line was wrong): not adopted.
    policy.end_of_step(512, 2.5 * MIB, 2 * MIB, had_oom=False)
    assert policy.limit == 342


def test_a_trial_the_step_could_not_run_stays_pending():
    policy = planned()
    policy.end_of_step(300, 300 * PER_SAMPLE, 2 * MIB, had_oom=False)  # a short flush step
    assert policy.trial == 512


def test_a_trial_that_loader_batches_never_run_is_given_up_after_two_steps(caplog):
    """Calls of 128 samples in steps of 1024 are cut on their own: a trial of 512 runs as
    micro-batches of 128. Two steps that did not run it settle the plan instead of re-trying
    (and re-logging) it on every step."""
    policy = planned()
    assert policy.trial == 512
    with caplog.at_level("INFO", logger="autoaccum"):
        for _ in range(2):
            policy.end_of_step(128, 128 * PER_SAMPLE, 2 * MIB, had_oom=False)
        assert policy.trial is None and policy.settled and policy.limit == 342
        for _ in range(5):  # settled: nothing more is tried or logged
            policy.end_of_step(128, 128 * PER_SAMPLE, 2 * MIB, had_oom=False)
    trying = [r for r in caplog.records if "trying micro-batch" in r.getMessage()]
    assert len(trying) == 1 and policy.trial is None and policy.settled
    policy.set_cap(2048)  # a new share: sizes are judged afresh
    assert policy.trial is not None


def test_allocator_thrash_steps_down_one_runnable_size():
    policy = planned()
    run_step(policy)
    assert policy.limit == 512
    run_step(policy, thrash=True)
    assert policy.limit == 342  # the next size a step of 1024 runs, not 256


def test_a_brief_spike_halves_then_grows_back_once_memory_returns():
    policy = planned()
    run_step(policy)  # 512 adopted
    assert policy.on_oom(512, budget=1 * MIB, context="spike") == 256
    for _ in range(3):
        run_step(policy, budget=1 * MIB)
    # After 3 clean steps, a binary search towards the failed size over the sizes a step runs:
    # 342, which does not fit 1 MiB: back to 256.
    assert policy.trial == 342
    assert run_step(policy, budget=1 * MIB) == (342, True)
    assert policy.limit == 256
    policy.observe_start(2 * MIB)  # the other process let go: 512 was measured to fit 2 MiB
    assert policy.limit == 512 and policy.trial is None


def test_halving_to_zero_raises():
    policy = MicroBatchPolicy(8, pinned=1, planning=False)
    with pytest.raises(OutOfMemoryForOneSample):
        policy.on_oom(1, budget=None, context="one sample")


def test_state_round_trips():
    policy = planned()
    policy.on_oom(512, 2 * MIB, "")
    other = MicroBatchPolicy(1024, pinned=None, planning=True)
    other.load_state_dict(policy.state_dict())
    assert other.limit == policy.limit and not other.probing
    assert other.state_dict() == policy.state_dict()


def test_a_larger_share_is_planned_for_without_probing_again():
    policy = planned(cap=256, budget=4 * MIB)  # 256 fits whole: one micro-batch
    assert policy.limit == 256
    policy.set_cap(400)  # "auto" shares gave this rank more samples
    assert not policy.probing
    assert policy.limit == 400  # 4 MiB * 0.9 / 4096 = 921 samples fit: still one micro-batch
    policy.set_cap(3000)
    # 921 fit with the margin (a step of 3000 runs 4 x 750), 1024 exactly: 3 x 1000 is worth a
    # trial step, with 750 to fall back to.
    assert policy.trial == policy.limit == 1000 and policy.fallback == 750


def test_the_first_probe_fits_a_large_model_on_a_small_device():
    # 40 MiB of parameters, 50 MiB budget: 1/64 of the target would be 16 samples.
    policy = MicroBatchPolicy(1024, pinned=None, planning=True, param_bytes=40 * MIB)
    assert policy.probe_size(50 * MIB) == 2
    policy = MicroBatchPolicy(1024, pinned=None, planning=True, param_bytes=10_000)
    assert policy.probe_size(50 * MIB) == 16


def test_shares_change_only_for_a_real_gain():
    from autoaccum.planner import proportional_shares, step_time

    rates = [3000.0, 1500.0]
    good = proportional_shares(512, rates)
    assert step_time(good, rates) < 0.97 * step_time([256, 256], rates)
    assert not step_time(good, rates) < 0.97 * step_time([good[0] - 2, good[1] + 2], rates)
