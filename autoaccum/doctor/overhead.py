"""Check 4, overhead: an optimizer step through AutoAccumOptimizer against the hand-written loop.

Two copies of the same model (same initial weights), the same device-resident batches, the same
micro-batch size. ``autoaccum``: ``AutoAccumOptimizer(AdamW, target_batch_size=T,
micro_batch_size=M)`` with its default memory backend (CUDA memory on a GPU, none on the CPU),
one ``opt.step(loss_fn, batch)`` per step. ``hand``: the loop a careful user writes: per
micro-batch ``(loss * M / T).backward()`` (token mode: ``loss_sum.backward()``, then the gradients
divided by the step's item count), then ``step()`` and ``zero_grad(set_to_none=True)``.

After warm-up the two alternate (A B B A ...). A sample is one optimizer step timed with CUDA
events on a GPU; on the CPU, three steps in this process's CPU time (one thread, so that other
processes on a shared machine do not count). The garbage collector is paused while timing. The
figure is the median over pairs of the ratio autoaccum / hand; it passes at most
:data:`MAX_RATIO`.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..optimizer import AutoAccumOptimizer
from .harness import adamw, indices
from .platform import Platform
from .result import CheckResult, judged
from .workloads import Workload, overhead_workload

NAME, TITLE = "overhead", "Overhead against a hand-written loop"
# A GPU run is model-bound; on the CPU a small model leaves Python's per-micro-batch cost visible
# and a shared machine adds noise.
MAX_RATIO = {"cuda": 1.10, "simulated": 1.30}
MICRO_BATCHES = 8
WARMUP = 3
CPU_STEPS_PER_SAMPLE = 3  # CPU timings of one 20 ms step scatter by +-15%; three average it


def check_overhead(
    platform: Platform, quick: bool, workload: Workload | None = None
) -> CheckResult:
    """Run the overhead check (see the module docstring)."""
    workload = workload or overhead_workload(platform.kind == "cuda")
    pairs = 15 if quick else 40
    target = workload.target
    micro = max(1, target // MICRO_BATCHES)
    device = platform.device
    batches = [indices(i * target, target).to(device) for i in range(4)]

    auto_model = workload.model(device)
    auto = AutoAccumOptimizer(adamw(auto_model), target_batch_size=target, micro_batch_size=micro)
    hand_model = workload.model(device)
    hand = adamw(hand_model)

    def auto_step(batch: torch.Tensor) -> None:
        auto.step(lambda idx: workload.loss(auto_model, idx), batch)

    def hand_step(batch: torch.Tensor) -> None:
        parts = batch.split(micro)
        if workload.token:
            total: Any = 0
            for part in parts:
                loss_sum, items = workload.loss(hand_model, part)
                loss_sum.backward()
                total = total + items
            for p in hand_model.parameters():
                if p.grad is not None:
                    p.grad.div_(total)
        else:
            for part in parts:
                (workload.loss(hand_model, part) * (part.shape[0] / target)).backward()
        hand.step()
        hand.zero_grad(set_to_none=True)

    auto_s, hand_s = _alternate(platform, auto_step, hand_step, batches, pairs)
    ratios = [a / h for a, h in zip(auto_s, hand_s) if h > 0]
    median = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [median] * 3
    limit = MAX_RATIO.get(platform.kind, MAX_RATIO["simulated"])
    figures = {
        "workload": workload.name,
        "target": target,
        "micro_batch": micro,
        "pairs": len(ratios),
        "hand_ms": statistics.median(hand_s) * 1e3,
        "autoaccum_ms": statistics.median(auto_s) * 1e3,
        "median_ratio": median,
        "ratio_q1": quartiles[0],
        "ratio_q3": quartiles[2],
        "max_ratio": limit,
    }
    backend = "CUDA memory backend, CUDA events" if platform.kind == "cuda" else (
        "no memory backend (CPU), process CPU time, 1 thread")
    notes = [f"{workload.name}: {workload.summary}; AdamW; {backend}"]
    if median > limit:
        notes.append(f"autoaccum's step takes {median:.3f}x the hand-written loop's "
                     f"(> {limit})")
    return judged(NAME, TITLE, median <= limit, figures=figures, notes=notes)


def _alternate(
    platform: Platform,
    a: Callable[[torch.Tensor], None],
    b: Callable[[torch.Tensor], None],
    batches: list[torch.Tensor],
    pairs: int,
) -> tuple[list[float], list[float]]:
    """Per-step seconds of ``a`` and ``b``, run A B B A ... after :data:`WARMUP` steps each."""
    timed = platform.timed if platform.kind == "cuda" else _cpu_timed
    repeat = 1 if platform.kind == "cuda" else CPU_STEPS_PER_SAMPLE
    threads = torch.get_num_threads()
    gc_was_enabled = gc.isenabled()
    if platform.kind != "cuda":
        torch.set_num_threads(1)
    try:
        for i in range(WARMUP):
            a(batches[i % len(batches)])
            b(batches[i % len(batches)])
        platform.synchronize()
        gc.collect()
        gc.disable()
        a_s: list[float] = []
        b_s: list[float] = []
        for i in range(pairs):
            batch = batches[i % len(batches)]
            order = ((a, a_s), (b, b_s)) if i % 2 == 0 else ((b, b_s), (a, a_s))
            for fn, out in order:
                out.append(timed(functools.partial(_repeat, fn, batch, repeat)) / repeat)
    finally:
        if gc_was_enabled:
            gc.enable()
        torch.set_num_threads(threads)
    return a_s, b_s


def _repeat(fn: Callable[[torch.Tensor], None], batch: torch.Tensor, n: int) -> None:
    for _ in range(n):
        fn(batch)


def _cpu_timed(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start
