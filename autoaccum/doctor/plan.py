"""Check 2, plan accuracy: what autoaccum plans for built-in workloads, against what really runs.

Per workload: size the run (GPU: a target of several micro-batches of what fits in free memory;
simulated: a device capacity for the workload's target), let ``AutoAccumOptimizer`` plan from
memory until its micro-batch stops changing, then measure one more step at the plan: the peak
allocated during its micro-batches (before the inner optimizer step) and the reserved peak,
against the plan's prediction ``baseline + gradients + memory_model.peak(b)``. Then search, on
fresh model copies at pinned sizes, for the largest micro-batch that really runs.

A workload passes when the measured step had no OOM, the plan is at least
:data:`MIN_FRACTION` of the largest size that runs, and (when the policy has a memory model) the
predicted activation peak is within :data:`MAX_PREDICTION_ERROR` of the measured one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..optimizer import AutoAccumOptimizer
from .harness import (
    Sizing,
    adamw,
    indices,
    largest_runnable,
    param_bytes,
    relative,
    runs_clean,
    size_run,
)
from .platform import Platform
from .result import CheckResult, judged
from .workloads import Workload, plan_workloads

NAME, TITLE = "plan", "Plan accuracy"
MIN_FRACTION = 0.7  # planned / largest runnable micro-batch
MAX_PREDICTION_ERROR = 0.2  # |predicted - measured| / measured, of the peak above the baseline
MICRO_BATCHES = {"simulated": 4.5, "cuda": 3.0}  # micro-batches of the largest size per step


def check_plan(
    platform: Platform, quick: bool, workloads: list[Workload] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> CheckResult:
    """Run the plan-accuracy check on every workload (default: :func:`plan_workloads`)."""
    if workloads is None:
        workloads = plan_workloads(platform.kind == "cuda", quick)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    ok = True
    for workload in workloads:
        progress(f"plan accuracy: {workload.name}")
        try:
            row, row_notes = plan_one(platform, workload, quick)
        except Exception as exc:
            row = {"workload": workload.name, "status": "FAIL"}
            row_notes = [f"{workload.name}: {type(exc).__name__}: {exc}"]
        finally:
            platform.cleanup()
        ok = ok and row["status"] != "FAIL"
        rows.append(row)
        notes += row_notes
    notes.append(
        "predicted = allocated before the step + gradients + policy.memory_model.peak(planned); "
        "measured = highest allocated during the step's micro-batches (before the inner "
        "optimizer step); error = (predicted - measured) / (measured - allocated before the "
        "step). largest = largest micro-batch of a balanced split of the target "
        "that ran two steps without OOM on a fresh model (pinned sizes; next_size_oom = the next "
        f"larger size, which ran out of memory). Pass: no OOM at the plan, fraction >= "
        f"{MIN_FRACTION}, |error| <= {MAX_PREDICTION_ERROR}."
    )
    for workload in workloads:
        notes.append(f"{workload.name}: {workload.summary}")
    return judged(NAME, TITLE, ok, rows=rows, notes=notes)


def plan_one(
    platform: Platform, workload: Workload, quick: bool
) -> tuple[dict[str, Any], list[str]]:
    """One workload's row and notes."""
    notes: list[str] = []
    started = time.perf_counter()
    sizing = size_run(platform, workload, MICRO_BATCHES.get(platform.kind, 4.0))
    if sizing is None:
        skipped: dict[str, Any] = {"workload": workload.name, "status": "SKIP"}
        return skipped, [f"{workload.name}: not even one sample fits on this device; skipped"]
    measured = _planned_run(platform, workload, sizing, steps_max=6 if quick else 8)
    platform.cleanup()
    largest = largest_runnable(
        sizing.target, lambda size: runs_clean(platform, workload, sizing, size)
    )
    planned = measured["planned"]
    fraction = planned / largest.size if largest.size else None
    above = measured["measured_bytes"] - measured["baseline_bytes"]
    predicted_above = (
        None if measured["predicted_bytes"] is None
        else measured["predicted_bytes"] - measured["baseline_bytes"]
    )
    error = relative(predicted_above, above) if above > 0 else None
    problems = []
    if measured["ooms_at_plan"]:
        problems.append(f"{measured['ooms_at_plan']} OOM(s) in the step measured at the plan")
    if largest.size is None:
        problems.append("no micro-batch size ran in the search")
    elif fraction is not None and fraction < MIN_FRACTION:
        problems.append(f"plan {planned} is {fraction:.2f} of the largest runnable "
                        f"{largest.size} (< {MIN_FRACTION})")
    if error is not None and abs(error) > MAX_PREDICTION_ERROR:
        problems.append(f"predicted peak off by {error:+.0%} (> {MAX_PREDICTION_ERROR:.0%})")
    if not measured["settled"]:
        notes.append(f"{workload.name}: the plan was still changing after "
                     f"{measured['steps']} steps: {measured['sizes']}")
    notes += [f"{workload.name}: {p}" for p in problems]
    row: dict[str, Any] = {
        "workload": workload.name,
        "target": sizing.target,
        "capacity_bytes": sizing.capacity or None,
        "planned": planned,
        "micro_batches": measured["accumulation_steps"],
        "settle_steps": measured["steps"],
        "ooms_settling": measured["ooms_settling"],
        "predicted_bytes": measured["predicted_bytes"],
        "measured_bytes": measured["measured_bytes"],
        "prediction_error": error,
        "reserved_bytes": measured["reserved_bytes"],
        "largest": largest.size,
        "next_size_oom": largest.failed,
        "fraction": fraction,
        "search_trials": len(largest.trials),
        "wall_s": time.perf_counter() - started,
        "status": "FAIL" if problems else "PASS",
    }
    return row, notes


def _planned_run(
    platform: Platform, workload: Workload, sizing: Sizing, steps_max: int
) -> dict[str, Any]:
    """Planned run on a fresh model: steps until the plan holds for two steps, then one
    measured step. Everything it allocated is dropped before it returns."""
    model = workload.model(platform.device)
    meter = platform.memory(sizing.capacity)
    opt = AutoAccumOptimizer(adamw(model), target_batch_size=sizing.target, memory=meter)
    grad_bytes = param_bytes(model)
    target = sizing.target

    def loss_fn(idx: torch.Tensor) -> Any:
        return workload.loss(model, idx)

    sizes: list[int] = []  # per step: its largest micro-batch
    limits: list[int | None] = []  # per step: the plan's limit after it
    settled = False
    step = 0
    while step < steps_max and not settled:
        opt.step(loss_fn, indices(step * target, target))
        step += 1
        sizes.append(opt.history[-1].micro_batch_size)
        limits.append(opt.plan.micro_batch_size)
        settled = (step >= 2 and sizes[-1] == sizes[-2] and limits[-1] == limits[-2]
                   and opt.history[-1].oom_events == 0)
    ooms_settling = opt.oom_events
    before_inner_step: list[int] = []
    handle = opt.register_step_pre_hook(
        lambda *_: before_inner_step.append(meter.high_water())
    )
    platform.synchronize()
    meter.start()
    baseline = meter.allocated_bytes()
    platform.timed(lambda: opt.step(loss_fn, indices(step * target, target)))
    handle.remove()
    record = opt.history[-1]
    planned = record.micro_batch_size
    model_fit = opt.policy.memory_model
    predicted = (
        None if model_fit is None else int(baseline + grad_bytes + model_fit.peak(planned))
    )
    return {
        "planned": planned,
        "limit": opt.plan.micro_batch_size,
        "accumulation_steps": record.accumulation_steps,
        "steps": step,
        "sizes": sizes,
        "settled": settled,
        "ooms_settling": ooms_settling,
        "ooms_at_plan": opt.oom_events - ooms_settling,
        "baseline_bytes": baseline,
        "grad_bytes": grad_bytes,
        "predicted_bytes": predicted,
        "measured_bytes": before_inner_step[-1] if before_inner_step else meter.high_water(),
        "reserved_bytes": meter.high_water_reserved(),
    }

