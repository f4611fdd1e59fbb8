"""Sharded training through AutoAccumOptimizer on two gloo ranks (tests/fsdp_workers.py): FSDP2
(``fully_shard``, both modes) and ZeRO-1 exact against one process with unequal shares, OOMs on one
rank recovered exactly, failures that end every rank with a clear error and leave FSDP usable,
per-rank checkpoints, memory counted in local shards, and the configurations that are refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.fsdp_workers import (
    checkpoint,
    reference_clipped,
    refusals,
    train,
    uneven_speed,
    zero1_checkpoint,
)
from tests.helpers import assert_params_close, make_data, reference_params, sgd

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

MODES = ["gather_once", "per_micro"]
SHARES, MICROS = [5, 11], [2, 4]
N = 52  # 3 full steps of 16, then a flush of 4 samples (all on rank 0)
TIMEOUT = 60.0


def _run(fn: Any, *args: Any) -> dict[int, Any]:
    results = run_ranks(fn, 2, *args, timeout=TIMEOUT)
    failed = {r: v for r, (status, v) in results.items() if status != "ok"}
    assert not failed, failed
    return {r: v for r, (_, v) in results.items()}


def _exact(out: dict[int, Any], token: bool = False, expected: Any = None) -> None:
    expected = expected or reference_params(make_data(N), sum(SHARES), token, sgd)
    for rank, result in out.items():
        assert result["error"] is None, (rank, result["error"])
        assert_params_close(result["params"], expected)


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("token", [False, True])
def test_fsdp_is_exact_with_unequal_shares_and_micro_batches(mode: str, token: bool) -> None:
    # token mode runs every micro-batch through the full path, mean mode through the fast path
    out = _run(train, mode, SHARES, MICROS, token, N, None, None, not token)
    _exact(out, token)
    assert out[0]["sizes"] == [2, 2, 2, 2] and out[1]["sizes"] == [4, 4, 4, 0]
    assert out[1]["accumulation"][:3] == [3, 3, 3]  # 11 samples at 4: its own count
    if mode == "gather_once":  # per step: one all-gather and one reduce-scatter per unit
        assert out[0]["all_gathers"] == 2 * 4 + 2  # (+ the eval forward after training)
        assert out[0]["reduce_scatters"] == 2 * 4
    else:  # FSDP's own schedule: gathers per micro-batch, the same on both ranks
        assert out[0]["all_gathers"] == out[1]["all_gathers"] > 2 * 4 * 3


def test_fsdp_clips_the_global_norm_exactly() -> None:
    out = _run(train, "gather_once", SHARES, MICROS, False, N, None, None, True, 0.5)
    _exact(out, expected=reference_clipped(N, sum(SHARES), 0.5))
    assert float(out[0]["grad_norm"]) == float(out[1]["grad_norm"]) > 0


# --------------------------------------------------------------------------------- OOM recovery
@pytest.mark.parametrize("mode", MODES)
def test_fsdp_ooms_in_forward_last_backward_and_a_grow_back_trial_are_recovered(mode: str
                                                                                ) -> None:
    # Shares 4 and 12. Rank 0: an OOM in its 2nd forward. Rank 1 (3 micro-batches of 4): in the
    # backward of its 3rd micro-batch, the last of step 0, which halves it to 2; then in every
    # forward of more than 2 samples from step 1 on: the grow-back trial of 3 (after one clean
    # step) fails and goes back to 2.
    faults = {0: {"forward": {2}}, 1: {"backward": {3}, "cap": (1, 2)}}
    out = _run(train, mode, [4, 12], MICROS, False, N, faults)
    _exact(out)
    assert out[0]["oom_events"] == 1
    assert out[1]["oom_events"] == 2 and out[1]["sizes"][:3] == [2, 2, 2]


@pytest.mark.parametrize("mode", MODES)
def test_fsdp_one_sample_that_does_not_fit(mode: str) -> None:
    if mode == "gather_once":  # not next to the gathered parameters: every rank falls back
        out = _run(train, mode, SHARES, MICROS, False, N, {1: {"gathered": True}})
        _exact(out)
        assert out[0]["mode"] == out[1]["mode"] == "per_micro"
        assert out[0]["fallbacks"] == out[1]["fallbacks"] == 1
    else:  # nowhere: the job ends on every rank
        out = _run(train, mode, SHARES, MICROS, False, N, {1: {"always": True}})
        assert out[1]["error"].startswith("OutOfMemoryError") and "1 sample" in out[1]["error"]
        assert out[0]["error"].startswith("PeerFailedError") and "rank 1" in out[0]["error"]


# ------------------------------------------------------------------------------------ failures
@pytest.mark.parametrize("mode", MODES)
def test_fsdp_a_bug_on_one_rank_ends_every_rank_and_fsdp_stays_usable(mode: str) -> None:
    out = _run(train, mode, SHARES, MICROS, False, N, {1: {"error": {5}}})
    assert out[1]["error"].startswith("ValueError: injected bug")
    assert out[0]["error"].startswith("PeerFailedError")
    assert "rank 1" in out[0]["error"] and "ValueError" in out[0]["error"]
    # (each worker ran a barrier and an FSDP eval forward after the error: no hang)


def test_fsdp_inner_step_oom_ends_every_rank() -> None:
    out = _run(train, "gather_once", SHARES, MICROS, False, N, {1: {"inner_step": 1}})
    assert out[1]["error"].startswith("StepOutOfMemoryError")
    assert out[0]["error"].startswith("PeerFailedError") and "rank 1" in out[0]["error"]
    assert out[0]["steps"] == out[1]["steps"] == 1


# --------------------------------------------------------------------- memory, checkpoints
def test_fsdp_mixed_fleet_plans_per_rank_and_counts_local_shards() -> None:
    # rank 1 has 5 KiB of simulated memory, a few samples next to the gathered parameters: it
    # plans smaller micro-batches than rank 0 (1 MiB)
    out = _run(train, "gather_once", [8, 8], [None, None], False, 48, None, [1.0, 0.005])
    _exact(out, expected=reference_params(make_data(48), 16, False, sgd))
    assert out[0]["sizes"][-1] > out[1]["sizes"][-1]
    for result in out.values():
        # between steps the device holds the local shards and momentum, not the whole model
        assert result["local_param_bytes"] < result["global_param_bytes"]
        assert result["resident"][-1] < 2 * result["global_param_bytes"]


@pytest.mark.parametrize("mode", MODES)
def test_fsdp_per_rank_checkpoints_resume_exactly(mode: str) -> None:
    out = _run(checkpoint, mode)
    for result in out.values():
        assert result["steps"] == 4
        for key in ("resumed at call 2", "resumed at call 5"):  # between steps; inside one
            for a, b in zip(result["straight"], result[key], strict=True):
                assert torch.equal(a, b), key


# --------------------------------------------------------------------------- what is refused
def test_unsupported_configurations_are_refused_naming_what_is_supported() -> None:
    out = _run(refusals)[0]
    assert out["plain"] == out["ddp"] == "replicated"
    assert out["fsdp"] == "fsdp"
    assert "not managed by fully_shard" in out["fsdp without model="]
    assert "plain tensors next to fully_shard" in out["partial sharding"]
    assert "tensor parallelism" in out["tensor parallel"]
    assert "HSDP" in out["hsdp"]
    assert "mixed DDP and FSDP" in out["ddp around fsdp"]
    assert "grad_scaler" in out["fsdp with grad_scaler"]
    for key in ("fsdp without model=", "partial sharding", "tensor parallel", "hsdp",
                "ddp around fsdp"):
        assert out[key].startswith("refused") and "supports" in out[key]
    assert "different points of the step" in out["protocol"]


# ----------------------------------------------------------------------------------------- ZeRO-1
def test_zero1_is_exact_reserves_its_shard_and_resumes_from_a_per_rank_checkpoint() -> None:
    out = _run(zero1_checkpoint)
    expected = reference_params(make_data(48), 16, False, sgd)
    reserved = [out[r]["reserved"] for r in (0, 1)]
    assert min(reserved) > 0 and sum(reserved) == out[0]["all_params"]  # momentum: 1 buffer
    for rank, result in out.items():
        assert result["shard"] == {"rank": rank, "world_size": 2}
        assert "rank 1 of 2" in result["wrong rank"] or "rank 0 of 2" in result["wrong rank"]
        assert_params_close(result["params"], expected)
        assert_params_close(result["resumed"], expected)


# ------------------------------------------------------------------------- measured throughput
@pytest.mark.parametrize("mode", MODES)
def test_fsdp_compute_seconds_exclude_waiting_for_a_slower_rank(mode: str) -> None:
    # Rank 1 sleeps 4x as long per sample. per_micro: the ranks meet at every unit's all-gather
    # inside each micro-batch, so the fast rank waits there for the slow one. The seconds each
    # rank reports (what "auto" shares divide by) must be its own compute, not the peer's.
    sleep = [0.003, 0.012]
    out = _run(uneven_speed, mode, sleep, 5)

    def median(values: list[float]) -> float:
        return sorted(values[1:])[(len(values) - 1) // 2]  # the first step warms up

    fast, slow = (median(out[r]["compute"]) for r in (0, 1))
    assert fast < 0.5 * slow, (out[0]["compute"], out[1]["compute"])
    for r in (0, 1):  # the wait left out, but never the rank's own compute (its sleep)
        assert min(out[r]["compute"]) > 0.9 * out[r]["sleep"], out[r]
    # Both wait for the collectives' transfers; the fast rank also for the difference.
    difference = 8 * (sleep[1] - sleep[0])
    extra = median(out[0]["wait"]) - median(out[1]["wait"])
    assert 0.6 * difference < extra < 1.5 * difference, (out[0]["wait"], out[1]["wait"])
