"""Check 3, OOM recovery: a squeeze made real in the middle of a step.

Two runs of the same fp32 model (SGD, so that an update is proportional to its gradient), the same
data and the same pinned micro-batch, three steps each. In the squeezed run, at the second
micro-batch of step 2, a ballast tensor takes memory away (on a GPU: device memory through the
real allocator, as another process would take it; simulated: bytes the device counts) until that
micro-batch is a quarter of its per-sample bytes short: the pinned size cannot run, half of it
can. The check passes when the micro-batch's OOM is caught (the step completes and
``opt.oom_events`` rises), the bytes allocated after the step, the ballast dropped, are those of
before it (the failed micro-batch's tensors were really released), the parameters after the
squeezed step and after the next one match the unsqueezed run within fp32 rounding, and the next,
unsqueezed step runs without a new OOM. The recovery's cost is the squeezed step's wall time less
the unsqueezed run's same step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..optimizer import AutoAccumOptimizer
from .harness import indices, measure_line
from .platform import Platform
from .result import CheckResult, judged
from .workloads import Workload, recovery_workload

NAME, TITLE = "recovery", "OOM recovery"
SQUEEZE_STEP = 1  # the step (from 0) whose second micro-batch meets the ballast
SQUEEZE = 0.25  # of the pinned micro-batch's per-sample bytes taken beyond what it needs
MAX_DEVIATION = 1e-4  # max |squeezed - reference| / max |reference update|, per compared step
BASELINE_TOLERANCE = 64 * 1024  # bytes: the step's returned scalar loss and allocator rounding
CUDA_MICRO_BATCH_BYTES = 2 << 30  # what the pinned micro-batch needs on a GPU (about)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (restored after): fp32 results that differ between
    splits by rounding only."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def check_recovery(
    platform: Platform, quick: bool, workload: Workload | None = None
) -> CheckResult:
    """Run the recovery check (see the module docstring)."""
    workload = workload or recovery_workload(platform.kind == "cuda")
    with exact_fp32():
        fixed, per_sample, pbytes, largest_param = measure_line(platform, workload)
        if platform.kind == "simulated":
            micro = max(2, workload.target // 4)
            capacity = int(2 * pbytes + largest_param + 1.5 * (fixed + per_sample * micro))
        else:
            free = platform.free_bytes(platform.memory(0))
            usable = min(CUDA_MICRO_BATCH_BYTES, (free * (1 - platform.slack) - 3 * pbytes) / 2)
            micro = int((usable - fixed) / per_sample)
            capacity = 0
        if micro < 2:
            return CheckResult(NAME, TITLE, "skip",
                               notes=["a micro-batch of 2 samples does not fit; nothing to halve"])
        target = 4 * micro
        short = int(SQUEEZE * per_sample * micro)
        reference = _run(platform, workload, target, micro, capacity, squeeze=None)
        platform.cleanup()
        squeezed = _run(platform, workload, target, micro, capacity, squeeze=short)
        platform.cleanup()
    return judge(workload, target, micro, reference, squeezed)


def judge(
    workload: Workload, target: int, micro: int, reference: dict[str, Any],
    squeezed: dict[str, Any],
) -> CheckResult:
    """The verdict from the two runs' records (a pure function, tested on its own)."""
    complete = not squeezed["error"] and not reference["error"]
    deviations: list[float | None] = [
        _deviation(squeezed["params"][s], reference["params"][s], reference["params"][s - 1])
        if complete else None
        for s in (SQUEEZE_STEP + 1, SQUEEZE_STEP + 2)
    ]
    squeezed_s = _at(squeezed["seconds"], SQUEEZE_STEP)
    unsqueezed_s = _at(reference["seconds"], SQUEEZE_STEP)
    recovery_s = None if squeezed_s is None or unsqueezed_s is None else squeezed_s - unsqueezed_s
    problems = []
    if squeezed["error"]:
        problems.append(f"the squeezed run raised {squeezed['error']}")
    if reference["error"]:
        problems.append(f"the reference run raised {reference['error']}")
    if complete:
        leftover = squeezed["allocated_after"] - squeezed["allocated_before"]
        if squeezed["ooms_in_squeeze"] < 1:
            problems.append("the ballast did not cause an OOM (nothing was recovered from)")
        if squeezed["ooms_after"]:
            problems.append(f"{squeezed['ooms_after']} OOM(s) in the step after the squeeze")
        if abs(leftover) > BASELINE_TOLERANCE:
            problems.append(f"allocated bytes after the squeezed step differ from before it by "
                            f"{leftover} bytes: the failed micro-batch was not released")
        if any(d is None or d > MAX_DEVIATION for d in deviations):
            problems.append(f"parameters differ from the unsqueezed run by {deviations} of the "
                            f"update (> {MAX_DEVIATION})")
    figures = {
        "workload": workload.name,
        "target": target,
        "micro_batch": micro,
        "micro_batch_need_bytes": squeezed.get("need"),
        "ballast_bytes": squeezed.get("ballast"),
        "free_after_ballast_bytes": squeezed.get("free_after_ballast"),
        "ooms_caught": squeezed.get("ooms_in_squeeze"),
        "micro_batch_after": squeezed.get("micro_after"),
        "allocated_before_bytes": squeezed.get("allocated_before"),
        "allocated_after_bytes": squeezed.get("allocated_after"),
        "reserved_before_bytes": squeezed.get("reserved_before"),
        "reserved_after_bytes": squeezed.get("reserved_after"),
        "deviation_squeezed_step": deviations[0],
        "deviation_next_step": deviations[1],
        "squeezed_step_s": squeezed_s,
        "unsqueezed_step_s": unsqueezed_s,
        "recovery_s": recovery_s,
    }
    notes = [f"{workload.name}: {workload.summary}; SGD, TF32 off", *problems]
    notes.append(
        "deviation = max |squeezed - unsqueezed| / max |unsqueezed update| over the parameters "
        f"after the step (pass: <= {MAX_DEVIATION}); allocated after = with the ballast "
        "dropped (pass: within 64 KiB of before); recovery_s = squeezed step - unsqueezed "
        "step (ballast allocation, OOM, release, halved replay)."
    )
    return judged(NAME, TITLE, not problems, figures=figures, notes=notes)


def _at(values: list[float], i: int) -> float | None:
    return values[i] if i < len(values) else None


def _deviation(
    got: list[torch.Tensor], want: list[torch.Tensor], before: list[torch.Tensor]
) -> float | None:
    update = max(float((w - b).abs().max()) for w, b in zip(want, before))
    if update == 0.0:
        return None
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / update


def _run(
    platform: Platform, workload: Workload, target: int, micro: int, capacity: int,
    squeeze: int | None,
) -> dict[str, Any]:
    """Three steps at a pinned micro-batch; with ``squeeze`` (bytes), at step
    :data:`SQUEEZE_STEP` a ballast that leaves the micro-batch ``squeeze`` bytes short. Returns
    plain records (CPU parameter copies, numbers); every device tensor it made is dropped when it
    returns."""
    model = workload.model(platform.device)
    meter = platform.memory(capacity)
    opt = AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                             target_batch_size=target, micro_batch_size=micro, memory=meter)
    out: dict[str, Any] = {"params": [_snapshot(model)], "seconds": [], "error": None}
    ballast: list[torch.Tensor] = []
    calls = [0]
    step_no = [0]

    def loss_fn(idx: torch.Tensor) -> Any:
        calls[0] += 1
        if calls[0] == 2 and step_no[0] == 0:
            out["allocated_at_second"] = meter.allocated_bytes()
        if squeeze is not None and calls[0] == 2 and step_no[0] == SQUEEZE_STEP and not ballast:
            out["ballast"] = max(0, platform.free_bytes(meter) - (out["need"] - squeeze))
            ballast.append(platform.ballast(meter, out["ballast"]))
            out["free_after_ballast"] = platform.free_bytes(meter)
        return workload.loss(model, idx)

    try:
        for step in range(3):
            step_no[0], calls[0] = step, 0
            if step == SQUEEZE_STEP:
                platform.cleanup()
                out["allocated_before"] = meter.allocated_bytes()
                out["reserved_before"] = meter.reserved_bytes()
                ooms = opt.oom_events
            if step == SQUEEZE_STEP + 1:
                ooms = opt.oom_events
            platform.synchronize()
            meter.start()
            started = time.perf_counter()
            opt.step(loss_fn, indices(step * target, target))
            platform.synchronize()
            out["seconds"].append(time.perf_counter() - started)
            if step == 0:
                out["need"] = meter.high_water() - out["allocated_at_second"]
            if step == SQUEEZE_STEP:
                ballast.clear()
                platform.cleanup()
                out["allocated_after"] = meter.allocated_bytes()
                out["reserved_after"] = meter.reserved_bytes()
                out["ooms_in_squeeze"] = opt.oom_events - ooms
                out["micro_after"] = opt.plan.micro_batch_size
            if step == SQUEEZE_STEP + 1:
                out["ooms_after"] = opt.oom_events - ooms
            out["params"].append(_snapshot(model))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().to("cpu", copy=True) for p in model.parameters()]
