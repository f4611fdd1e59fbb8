"""Multi-process gloo tests: exactness across unequal shares, OOM on one rank, no hangs."""

from __future__ import annotations

import pytest
import torch

from tests import dist_workers
from tests.dist_harness import run_ranks
from tests.helpers import assert_params_close, make_data, reference_params, sgd


def check_exact(results, n, target, token):
    expected = reference_params(make_data(n), target, token, sgd)
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank} failed:\n{value}"
        assert_params_close(value["params"], expected)
    return [v for _, (_, v) in sorted(results.items())]


@pytest.mark.parametrize("token", [False, True])
def test_unequal_shares_match_a_single_process_reference(token):
    # 3 ranks with shares 3/5/8 and different micro-batch sizes; 52 samples = 3 full steps + 4.
    n, target = 52, 16
    results = run_ranks(dist_workers.exactness, 3, [3, 5, 8], [1, 2, 3], token, n, target, {},
                        False)
    values = check_exact(results, n, target, token)
    assert all(v["steps"] == 4 for v in values)


def test_ddp_model_with_unequal_shares():
    n, target = 40, 12
    results = run_ranks(dist_workers.exactness, 2, [4, 8], [3, 3], False, n, target, {}, True)
    check_exact(results, n, target, False)


@pytest.mark.parametrize("zero1", [False, True], ids=["ddp", "zero1"])
def test_oom_on_one_rank_in_forward_and_in_its_last_backward(zero1):
    # Rank 0: forward OOM on its 2nd micro-batch. Rank 1 (micro 4, share 12 -> 3 micro-batches
    # per step): OOM in the backward of its last micro-batch of the first step, the moment a
    # DDP-synchronized step would have been all-reducing. ZeRO-1: the same, with each rank
    # stepping its partition and the parameters broadcast after every rank confirmed.
    n, target = 48, 16
    faults = {0: {"forward": {2}}, 1: {"backward": {3}}}
    results = run_ranks(dist_workers.exactness, 2, [4, 12], [2, 4], False, n, target, faults,
                        True, zero1)
    values = check_exact(results, n, target, False)
    assert [v["oom_events"] for v in values] == [1, 1]


def test_a_rank_that_cannot_fit_one_sample_stops_every_rank():
    results = run_ranks(dist_workers.cannot_fit_one_sample, 2, timeout=60)
    assert results[1][0] == "error" and "1 sample does not fit" in results[1][1]
    assert results[0][0] == "error"
    assert "PeerFailedError" in results[0][1] and "rank 1" in results[0][1]
    assert "1 sample does not fit" in results[0][1]


def test_the_reduction_bucket_is_budgeted_before_the_first_step():
    results = run_ranks(dist_workers.bucket_is_budgeted, 2, timeout=60)
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank} failed:\n{value}"
        assert value["error"] is not None, f"rank {rank} trained on a device that cannot step"
        assert "gradient reduction's bucket" in value["error"]
        assert value["forwards"] == 0 and all(value["grads"])


def test_auto_shares_move_toward_the_speed_ratio_and_the_sampler_covers_every_sample():
    steps = 14
    results = run_ranks(dist_workers.auto_shares, 2, [1.0, 3.0], steps, timeout=120)
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank} failed:\n{value}"
    r0, r1 = results[0][1], results[1][1]
    assert r0["history"] == r1["history"]  # every rank computed the same shares
    first, last = r0["history"][0], r0["history"][-1]
    assert first == [48, 48]
    # Rank 1 is 3x slower: its share must have moved well toward 96/4 = 24.
    assert last[1] < 38 and last[0] + last[1] == 96, r0["history"]
    seen = sorted(r0["seen"] + r1["seen"])
    assert seen == list(range(96 * steps))  # every sample exactly once, while shares changed
    assert r0["steps"] == r1["steps"] == steps


def test_single_process_shares_validation():
    model = torch.nn.Linear(2, 2)
    import autoaccum

    with pytest.raises(ValueError, match="sum to 7; expected target_batch_size=8"):
        autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8, shares=[7])
    with pytest.raises(ValueError, match="shares must be 'equal', 'auto'"):
        autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8, shares="fast")


def test_sharded_fsdp2_style_parameters_are_refused_with_a_clear_error():
    results = run_ranks(dist_workers.sharded_parameters_are_refused, 2, timeout=60)
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank} failed:\n{value}"
        assert "DTensor" in value and "FSDP2" in value


def test_ddp_in_a_one_process_job_recovers_from_an_oom_in_its_last_backward():
    results = run_ranks(dist_workers.ddp_world_of_one_recovers_from_a_last_backward_oom, 1,
                        timeout=60)
    values = check_exact(results, 32, 16, False)
    assert values[0]["oom_events"] == 1 and values[0]["steps"] == 2


@pytest.mark.parametrize("zero1", [False, True], ids=["ddp", "zero1"])
@pytest.mark.parametrize("where", ["inner step", "reduction"])
def test_a_failure_after_the_agreement_ends_every_rank_and_never_hangs(where, zero1):
    results = run_ranks(dist_workers.failure_after_the_agreement, 2, where, zero1, timeout=60)
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank} hung or crashed:\n{value}"
    failing, peer = results[1][1]["error"], results[0][1]["error"]
    if where == "inner step":
        assert failing.startswith("StepOutOfMemoryError")
    else:
        assert "injected failure copying into the bucket" in failing
    assert peer.startswith("PeerFailedError") and "rank 1" in peer
    assert "reload a checkpoint" in peer  # the step may have diverged the ranks


def test_a_checkpoint_mid_step_restores_that_steps_share(tmp_path):
    results = run_ranks(dist_workers.resume_mid_step_after_shares_changed, 2, str(tmp_path),
                        timeout=90)
    values = check_exact(results, 48, 16, False)
    assert all(v["steps"] == 3 for v in values)


def test_share_changes_land_after_what_many_loader_workers_already_read():
    results = run_ranks(dist_workers.auto_shares_with_many_loader_workers, 2, 6, timeout=180)
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank} failed:\n{value}"
    r0, r1 = results[0][1], results[1][1]
    assert sorted(r0["seen"] + r1["seen"]) == list(range(32 * 30))
    assert r0["steps"] == r1["steps"] == 30
    assert r0["shares"] == r1["shares"] and r0["shares"] != [16, 16]  # shares did move


@pytest.mark.parametrize(("planned", "zero1"), [(False, False), (True, False), (True, True)],
                         ids=["pinned", "probed", "probed-zero1"])
def test_a_parameter_no_rank_reached_is_left_none_and_not_stepped(planned, zero1):
    """Issue 28 across ranks: the unused head and, in step 1, the unrouted expert end the step
    with .grad None on every rank, as in the plain loop (and DDP with find_unused_parameters);
    an expert only one rank reached is reduced. AdamW's per-parameter step counts match."""
    n, target = 24, 8
    results = run_ranks(dist_workers.unused_parameters, 2, n, target, planned, zero1)
    model = dist_workers.Routed()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    data, seen = dist_workers.routed_data(n), []
    opt.register_step_pre_hook(lambda *_: seen.append([p.grad is not None for p in params]))
    for start in range(0, n, target):
        opt.zero_grad()
        from tests.helpers import mean_loss_fn, slice_data

        mean_loss_fn(model)(slice_data(data, start, start + target)).backward()
        opt.step()
    steps = [float(opt.state[p]["step"]) if p in opt.state else 0.0 for p in params]
    assert seen[0][0] is False and seen[0][-1] is False and seen[1][-1] is True  # the setup
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank} failed:\n{value}"
        if not zero1:  # ZeRO-1's local optimizer sees its partition only
            assert value["grads"] == seen, rank
            assert value["steps"] == steps, rank
        assert_params_close(value["params"], [p.detach() for p in params])


@pytest.mark.parametrize("calls_per_step", [1, 2], ids=["between-steps", "mid-step"])
def test_gradients_written_outside_opt_step_on_one_rank_never_reach_any_step(calls_per_step):
    """Issue 32 on 2 ranks: each rank's foreign backward (different on each) is discarded, or
    its step's samples are replayed; the ranks stay exact and in agreement."""
    n, target = 48, 16
    results = run_ranks(dist_workers.foreign_gradients, 2, [4, 12], n, target, calls_per_step)
    check_exact(results, n, target, False)
