"""Running workloads through AutoAccumOptimizer for the checks: sizing, pinned trial runs, and the
search for the largest micro-batch that really runs.

Only the public API of :class:`~autoaccum.AutoAccumOptimizer` is used. The search does not trust
the planner: it runs fresh model copies at pinned micro-batch sizes and watches for OOMs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..oom import is_oom
from ..optimizer import AutoAccumOptimizer, StepOutOfMemoryError
from .platform import Platform
from .workloads import Workload

HUGE = 1 << 50  # capacity of a simulated device that never runs out


class Abort(Exception):
    """Raised from a ``loss_fn`` to stop a trial run once its answer is known."""


def indices(start: int, n: int) -> torch.Tensor:
    """The host batch of samples ``start .. start + n - 1``."""
    return torch.arange(start, start + n, dtype=torch.int64)


def adamw(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def mean_loss(workload: Workload, out: Any) -> torch.Tensor:
    """The micro-batch's mean loss from what ``workload.loss`` returned (token mode: sum/items)."""
    if workload.token:
        loss_sum, items = out
        return loss_sum / items  # type: ignore[no-any-return]
    return out  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Sizing:
    """How big a run is: ``target`` samples per step; ``capacity`` bytes of a simulated device
    (0 on a real one); the measured line ``fixed + per_sample * b`` of a micro-batch's peak above
    parameters and gradients; ``fits``: the micro-batch size that line says fits with AdamW state
    resident (the search finds the real one)."""

    target: int
    capacity: int
    fixed_bytes: float
    per_sample_bytes: float
    resident_bytes: int
    fits: float


def measure_line(platform: Platform, workload: Workload) -> tuple[float, float, int, int]:
    """``(fixed, per_sample, parameter bytes, largest parameter's bytes)``: the line through a
    micro-batch's peak above the parameters and their (already allocated) gradients, from plain
    forward/backward passes at ``probe`` and ``2 * probe`` samples on a fresh model."""
    peaks, pbytes, largest = _line_peaks(platform, workload)
    platform.cleanup()  # (the model is gone with _line_peaks's frame)
    per_sample = max(1.0, (peaks[1] - peaks[0]) / workload.probe)
    fixed = max(0.0, peaks[0] - per_sample * workload.probe)
    return fixed, per_sample, pbytes, largest


def _line_peaks(platform: Platform, workload: Workload) -> tuple[list[int], int, int]:
    model = workload.model(platform.device)
    meter = platform.memory(HUGE)
    params = list(model.parameters())

    def run(b: int) -> None:
        resident = [*params, *(p.grad for p in params if p.grad is not None)]
        with meter.active(resident):
            out = workload.loss(model, indices(0, b).to(platform.device))
            mean_loss(workload, out).backward()

    run(workload.probe)  # gradients allocated, kernels chosen
    peaks = []
    for b in (workload.probe, 2 * workload.probe):
        platform.synchronize()
        meter.start()
        base = meter.allocated_bytes()
        run(b)
        platform.synchronize()
        peaks.append(meter.high_water() - base)
    largest = max(p.numel() * p.element_size() for p in params)
    return peaks, param_bytes(model), largest


def size_run(platform: Platform, workload: Workload, micro_batches: float) -> Sizing | None:
    """A target (GPU: from the free memory) or a capacity (simulated: for ``workload.target``)
    such that about ``micro_batches`` micro-batches of the largest size that fits make a step.
    None when not even one sample fits on the device."""
    fixed, per_sample, pbytes, largest = measure_line(platform, workload)
    # Parameters, gradients and AdamW's two state buffers. AdamW's step temporaries: one
    # parameter's worth at a time on the CPU (for-loop implementation), all of them at once on a
    # GPU (foreach).
    resident = 4 * pbytes
    if platform.kind == "simulated":
        temps = largest
        fits = workload.target / micro_batches
        capacity = int(resident + temps + fixed + per_sample * fits)
        return Sizing(workload.target, capacity, fixed, per_sample, resident, fits)
    temps = pbytes
    free = platform.free_bytes(platform.memory(0))
    fits = (free * (1 - platform.slack) - resident - temps - fixed) / per_sample
    if fits < 1:
        return None
    target = max(2, round(fits * micro_batches))
    if target > 64:
        target -= target % 8
    return Sizing(target, 0, fixed, per_sample, resident, fits)


def runs_clean(platform: Platform, workload: Workload, sizing: Sizing, size: int) -> bool:
    """Whether micro-batches of ``size`` run with no OOM: two steps (the second with AdamW state
    resident) of two micro-batches of ``size`` each, or of one micro-batch when ``size`` is the
    whole target (a one-pass step needs less: no gradient to add into). Stops at the first OOM."""
    ok = _attempt(platform, workload, sizing, size)
    platform.cleanup()
    return ok


def _attempt(platform: Platform, workload: Workload, sizing: Sizing, size: int) -> bool:
    target = sizing.target if size >= sizing.target else 2 * size
    model = workload.model(platform.device)
    opt = AutoAccumOptimizer(adamw(model), target_batch_size=target,
                             micro_batch_size=min(size, target),
                             memory=platform.memory(sizing.capacity))

    def loss_fn(idx: torch.Tensor) -> Any:
        if opt.oom_events:
            raise Abort  # the answer is known: skip the (halved) rest of the step
        return workload.loss(model, idx)

    try:
        for step in range(2):
            opt.step(loss_fn, indices(step * target, target))
        platform.synchronize()
    except (Abort, StepOutOfMemoryError):
        return False
    except Exception as exc:
        if is_oom(exc):
            return False
        raise
    return opt.oom_events == 0


@dataclass(frozen=True)
class Largest:
    """The search's answer: ``size`` is the largest micro-batch of a balanced split of the
    target that ran (None: not even one sample); ``failed`` the next larger such size, which ran
    out of memory (None: the whole target ran as one micro-batch); ``trials`` the sizes tried."""

    size: int | None
    failed: int | None
    trials: tuple[tuple[int, bool], ...]


def largest_runnable(target: int, runs: Callable[[int], bool]) -> Largest:
    """Search the sizes ``ceil(target / k)`` (the largest micro-batch of a balanced split into k)
    for the largest one for which ``runs(size)`` is True, assuming a smaller micro-batch never
    needs more memory: doubling k until a size runs, then bisection. Each size runs at most once.
    """
    known: dict[int, bool] = {}
    order: list[tuple[int, bool]] = []

    def fits(k: int) -> bool:
        size = -(-target // k)
        if size not in known:
            known[size] = runs(size)
            order.append((size, known[size]))
        return known[size]

    if fits(1):
        return Largest(target, None, tuple(order))
    lo, hi = 1, 2  # fits(lo) is False
    while not fits(hi):
        if hi >= target:
            return Largest(None, 1, tuple(order))
        lo, hi = hi, min(target, hi * 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return Largest(-(-target // hi), -(-target // lo), tuple(order))


def relative(a: float | None, b: float | None) -> float | None:
    """``a / b - 1``, or None when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b - 1.0
