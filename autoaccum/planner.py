"""Pure planning functions: split samples, fit a memory model, choose micro-batch sizes.

Nothing here touches a device or a model: every decision the optimizer makes about sizes is a
function of numbers, so it can be property-tested without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch


def split_shape(n: int, limit: int | None) -> tuple[int, int, int]:
    """``(k, base, extra)`` of :func:`balanced_split`: ``k`` micro-batches, the first ``extra``
    of ``base + 1`` samples and the rest of ``base`` (``(0, 0, 0)`` for no sample)."""
    if n == 0:
        return 0, 0, 0
    k = 1 if limit is None or limit >= n else -(-n // limit)
    base, extra = divmod(n, k)
    return k, base, extra


def balanced_split(n: int, limit: int | None) -> list[int]:
    """Cut ``n`` samples into the fewest micro-batches of at most ``limit``, sizes within one.

    ``balanced_split(100, 32) == [25, 25, 25, 25]``: at most two distinct shapes reach the model, so
    ``torch.compile`` and cuDNN autotuning stay warm. ``limit=None`` means one micro-batch.
    """
    if n < 0:
        raise ValueError(f"cannot split a negative number of samples ({n})")
    if n == 0:
        return []
    if limit is None or limit >= n:
        return [n]
    if limit < 1:
        raise ValueError(f"micro-batch limit must be >= 1, got {limit}")
    k, base, extra = split_shape(n, limit)
    return [base + 1] * extra + [base] * (k - extra)


def first_split(n: int, limit: int | None) -> int:
    """The first size of ``balanced_split(n, limit)``; taking it repeatedly yields that split."""
    if limit is None or limit >= n:
        return n
    return -(-n // -(-n // limit))


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of one micro-batch of ``b`` samples above the resident baseline:
    ``fixed_bytes + per_sample_bytes * b``."""

    fixed_bytes: float
    per_sample_bytes: float

    def peak(self, b: int) -> float:
        return self.fixed_bytes + self.per_sample_bytes * b


def fit_memory_model(probes: Sequence[tuple[int, int]]) -> MemoryModel:
    """Fit ``peak(b) = fixed + per_sample * b`` to ``(b, peak_bytes_above_baseline)`` probes.

    One probe (or probes of one size) gives ``fixed = 0``: all of its cost is charged per sample,
    which over-estimates and so errs towards smaller micro-batches. A fit whose slope or intercept
    comes out negative (noise, allocator rounding) falls back to that same pessimistic model.
    """
    if not probes:
        raise ValueError("need at least one probe to fit a memory model")
    if any(b < 1 for b, _ in probes):
        raise ValueError(f"probe sizes must be >= 1, got {[b for b, _ in probes]}")
    pessimistic = MemoryModel(0.0, max(max(p, 0) / b for b, p in probes))
    sizes = {b for b, _ in probes}
    if len(sizes) < 2:
        return pessimistic
    n = len(probes)
    mean_b = sum(b for b, _ in probes) / n
    mean_p = sum(p for _, p in probes) / n
    var = sum((b - mean_b) ** 2 for b, _ in probes)
    cov = sum((b - mean_b) * (p - mean_p) for b, p in probes)
    slope = cov / var
    intercept = mean_p - slope * mean_b
    if slope <= 0 or intercept < 0:
        return pessimistic
    return MemoryModel(intercept, slope)


def choose_micro_batch(
    model: MemoryModel,
    free_bytes: int,
    reserve_bytes: int,
    margin: float,
    cap: int,
    single_pass_saving: float = 0.0,
) -> int:
    """The largest ``b`` in ``[1, cap]`` with ``model.peak(b) <= (free - reserve) * (1 - margin)``.

    ``reserve_bytes`` is memory that will be taken before the next micro-batch runs (optimizer
    state the inner optimizer has not allocated yet). ``single_pass_saving`` is what a step of one
    micro-batch (``b == cap``) does not need: without earlier micro-batches there is no gradient to
    add into, so backward allocates no temporary gradient. Returns 1 when even one sample does not
    fit: the caller finds out by running it.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    budget = (free_bytes - reserve_bytes) * (1 - margin)
    if model.per_sample_bytes <= 0 or model.peak(cap) - single_pass_saving <= budget:
        return cap
    b = math.floor((budget - model.fixed_bytes) / model.per_sample_bytes)
    return max(1, min(cap, b))


def refine_memory_model(points: Mapping[int, float]) -> MemoryModel:
    """A memory model from measured ``{size: peak above the resident baseline}`` points, accurate
    near the largest size measured, where the plan operates.

    The line passes through the largest point, with the slope of the secant to the point nearest
    half its size (at least half a range away, so allocator rounding cannot tilt it). Peaks of
    real models are convex in the micro-batch size (attention, allocator block rounding), and a
    secant through the top half under-estimates the peak beyond its end far less than a fit through
    small probes. One point, or a secant that comes out flat or with a negative intercept, gives
    the model that charges everything per sample.
    """
    if not points:
        raise ValueError("need at least one measured point to fit a memory model")
    top = max(points)
    peak_top = max(float(points[top]), 0.0)
    pessimistic = MemoryModel(0.0, peak_top / top)
    lower = [b for b in points if b <= top / 2] or [b for b in points if b < top]
    if not lower:
        return pessimistic
    low = min(lower, key=lambda b: abs(b - top / 2))
    slope = (peak_top - float(points[low])) / (top - low)
    intercept = peak_top - slope * top
    if slope <= 0 or intercept < 0:
        return pessimistic
    return MemoryModel(intercept, slope)


def first_probe_size(cap: int, budget_bytes: int | None, param_bytes: int) -> int:
    """Size of the first probe micro-batch: small enough to fit wherever one sample fits.

    At most 1/64 of the cap, and at most what fits if one sample's activations took 8 times the
    parameters' bytes (so a model that is large for its device starts with 2 samples); never under
    2 where the cap allows (BatchNorm cannot train on one sample whose feature map is 1x1).
    """
    size = cap // 64
    if budget_bytes is not None and param_bytes > 0:
        size = min(size, max(budget_bytes, 0) // (8 * param_bytes))
    return min(cap, max(2, size))


def next_probe_size(first: tuple[int, int] | None, free_bytes: int, cap: int) -> int:
    """Size of the second probe micro-batch (the first comes from :func:`first_probe_size`).

    It takes half of what the first probe's pessimistic model says fits, so it lands near the
    operating point and the fit extrapolates only a short way; it is always a different size from
    the first, and never under 2 where the cap allows (BatchNorm).
    """
    if first is None:
        return min(cap, max(2, cap // 64))
    b1 = first[0]
    low = min(2, cap)
    guess = choose_micro_batch(fit_memory_model([first]), free_bytes, 0, 0.0, cap) // 2
    b2 = max(low, min(cap, guess))
    if b2 == b1:
        b2 = b1 + 1 if b1 < cap else max(low, b1 - 1)
    return b2


def achievable_sizes_desc(cap: int, start: int) -> Iterator[int]:
    """The micro-batch sizes a balanced split of ``cap`` can run (``ceil(cap / k)``), from the
    largest that is ``<= start`` downwards to 1."""
    if start < 1:
        return
    k = -(-cap // min(start, cap))
    while True:
        size = -(-cap // k)
        yield size
        if size == 1:
            return
        k = -(-cap // (size - 1))  # the fewest micro-batches whose size is below this one


def one_size_down(size: int, cap: int) -> int:
    """The next smaller micro-batch size a balanced split of ``cap`` runs (1 stays 1)."""
    sizes = achievable_sizes_desc(cap, size - 1)
    return next(sizes, 1)


@dataclass(frozen=True)
class SizeChoice:
    """What :func:`choose_sizes` decided: run ``limit``; verify ``trial`` (larger) in one step."""

    limit: int
    trial: int | None


def choose_sizes(
    model: MemoryModel,
    observed: Mapping[int, float],
    budget: float,
    cap: int,
    *,
    margin: float,
    final_margin: float = 0.0,
    single_pass_saving: float = 0.0,
    ceiling: int | None = None,
) -> SizeChoice:
    """The micro-batch limit for an activation ``budget`` (bytes one micro-batch may add above the
    resident baseline), and a larger size worth one verified step.

    Only sizes a balanced split of ``cap`` runs are considered. A size *fits* when it, or a larger
    size, was measured (``observed``: size -> measured peak) at ``<= budget * (1 - final_margin)``,
    or when the model predicts ``<= budget * (1 - margin)``. A size is worth a *trial* when it was
    not measured and the model predicts ``<= budget * (1 - final_margin)`` (for ``cap`` itself, a
    step of one micro-batch, less ``single_pass_saving``): the trial step measures it, and an OOM
    there costs one retry of that step. Sizes ``>= ceiling`` (failed at this free memory), and
    sizes at or above one measured over budget, are never chosen. ``limit`` is at least 1.
    """
    if not (0 <= final_margin <= margin < 1):
        raise ValueError(f"need 0 <= final_margin <= margin < 1, got {final_margin}, {margin}")
    top = cap if ceiling is None else min(cap, ceiling - 1)
    tight = budget * (1 - final_margin)
    safe = budget * (1 - margin)
    measured_fit = max((b for b, p in observed.items() if p <= tight), default=0)
    trial = None
    if top == cap:  # one micro-batch per step: no gradient to add into, its own case
        # It peaks at least what a smaller accumulating size measured, less the saving.
        floor = max((p - single_pass_saving for b, p in observed.items() if b < cap), default=0)
        predicted = max(model.peak(cap), floor)
        if measured_fit >= cap or (cap not in observed and predicted <= safe):
            return SizeChoice(cap, None)
        if cap not in observed and max(predicted - single_pass_saving, floor) <= tight:
            trial = cap
        top = cap - 1
    too_big = min((b for b, p in observed.items() if p > tight and b < cap), default=None)
    if too_big is not None:  # a peak grows with the micro-batch: nothing larger fits either
        top = min(top, too_big - 1)
    measured_fit = min(measured_fit, top)
    if model.per_sample_bytes > 0:
        reach = (tight - model.fixed_bytes) / model.per_sample_bytes
        top = min(top, max(measured_fit, math.floor(reach)))
    for b in achievable_sizes_desc(cap, top):
        if b <= measured_fit:
            return SizeChoice(b, trial)
        if b in observed:
            continue  # measured, and too large
        predicted = model.peak(b)
        if predicted <= safe:
            return SizeChoice(b, trial)
        if trial is None and predicted <= tight:
            trial = b
    return SizeChoice(1, trial if trial != 1 else None)


def halve(size: int) -> int:
    """The micro-batch size after an OOM at ``size`` (0 when ``size`` is already 1)."""
    return size // 2


def grow_candidate(current: int, failed: int | None, cap: int) -> int:
    """The next size to try after a run of clean steps at ``current``.

    Binary search between the current size and the smallest size that failed, over the sizes a
    balanced split of ``cap`` samples can produce (``ceil(cap / k)``): a limit between two of them
    would run the same micro-batches as the smaller one and prove nothing. Without a failure there
    is nothing to grow back to (the planner already chose the largest size that fits). Returns
    ``current`` when no such size lies strictly between the two.
    """
    if failed is None:
        return current
    upper = min(failed, cap + 1)
    mid = (current + upper) // 2
    if mid <= current:
        return current
    size = -(-cap // -(-cap // mid))  # the largest achievable size <= mid
    if size <= current:
        k = -(-cap // current) - 1  # the most micro-batches whose size still exceeds current
        if k < 1:
            return current
        size = -(-cap // k)
    return size if size < upper else current


def achievable_at_least(size: int, cap: int) -> int:
    """The smallest micro-batch size a balanced split of ``cap`` runs that is ``>= size``."""
    if size <= 1:
        return 1
    if size >= cap:
        return cap
    k = -(-cap // (size - 1)) - 1  # the most micro-batches whose size is still >= size
    return -(-cap // k)


def free_moved(before: int, now: int, tolerance: float) -> bool:
    """Whether free memory moved by more than ``tolerance`` (a fraction of ``before``)."""
    return abs(now - before) > tolerance * max(before, 1)


# Optimizer-state buffers per parameter, each the size of the parameter. Unknown optimizers are
# charged two (as Adam), which errs towards smaller micro-batches.
_STATE_BUFFERS: dict[str, int] = {
    "Adam": 2,
    "AdamW": 2,
    "NAdam": 2,
    "RAdam": 2,
    "Adamax": 2,
    "Adadelta": 2,
    "Adagrad": 1,
    "Rprop": 2,
    "ASGD": 2,
    "LBFGS": 2,
    "Adafactor": 1,
}


def state_buffers_per_param(optimizer: torch.optim.Optimizer) -> int:
    """How many parameter-sized buffers of state ``optimizer`` keeps per parameter."""
    name = type(optimizer).__name__
    defaults = optimizer.defaults
    if name == "SGD":
        return 1 if defaults.get("momentum", 0) else 0
    if name == "RMSprop":
        return 1 + bool(defaults.get("momentum", 0)) + bool(defaults.get("centered", False))
    buffers = _STATE_BUFFERS.get(name, 2)
    if defaults.get("amsgrad", False):
        buffers += 1
    return buffers


def step_temporaries(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> int:
    """Bytes the inner optimizer's step allocates for itself beyond its state (a lower bound).

    Measured on torch's Adam/AdamW/SGD: the foreach implementations build one temporary per
    parameter at once (the whole parameter list's worth), the for-loop ones one parameter's worth
    at a time (Adam: two), the fused ones none. Unknown optimizers are charged nothing, so that
    the check this feeds never refuses a run that could work.
    """
    if not params:
        return 0
    name = type(optimizer).__name__
    defaults = optimizer.defaults
    total = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() * p.element_size() for p in params)
    if defaults.get("fused"):
        return 0
    foreach = defaults.get("foreach")
    if foreach is None:
        foreach = all(p.device.type == "cuda" for p in params) and not defaults.get(
            "differentiable", False)
    if name in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax"):
        return total if foreach else 2 * largest
    if name == "SGD":
        if not defaults.get("weight_decay", 0):
            return 0
        return total if foreach else largest
    return 0


def equal_shares(target: int, world_size: int) -> list[int]:
    """``target`` samples over ``world_size`` ranks, the remainder going to the first ranks."""
    base, extra = divmod(target, world_size)
    return [base + (r < extra) for r in range(world_size)]


def proportional_shares(target: int, rates: Sequence[float], minimum: int = 1) -> list[int]:
    """Shares proportional to each rank's throughput (samples/s), so all finish together.

    Rounded by largest remainder; each rank keeps at least ``minimum`` samples (it must still run
    a micro-batch to take part in the step). The result sums to ``target``.
    """
    world = len(rates)
    if world * minimum > target:
        raise ValueError(f"a target of {target} cannot give {world} ranks {minimum} sample(s) each")
    if any(not math.isfinite(r) or r <= 0 for r in rates):
        return equal_shares(target, world)
    free = target - world * minimum
    total = sum(rates)
    ideal = [free * r / total for r in rates]
    shares = [math.floor(x) for x in ideal]
    by_remainder = sorted(range(world), key=lambda i: ideal[i] - shares[i], reverse=True)
    for i in by_remainder[: free - sum(shares)]:
        shares[i] += 1
    return [s + minimum for s in shares]


def step_time(shares: Sequence[int], rates: Sequence[float]) -> float:
    """Predicted time of a step: the slowest rank's share over its throughput."""
    return max(s / r if r > 0 else math.inf for s, r in zip(shares, rates))


def check_shares(shares: Sequence[int], target: int, world_size: int) -> list[int]:
    """Validate an explicit list of per-rank sample counts."""
    shares = list(shares)
    if len(shares) != world_size:
        raise ValueError(f"shares has {len(shares)} entries for {world_size} ranks: {shares}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shares):
        raise ValueError(f"shares must be positive ints (every rank runs at least one sample), "
                         f"got {shares}")
    if sum(shares) != target:
        raise ValueError(f"shares {shares} sum to {sum(shares)}; expected target_batch_size="
                         f"{target}")
    return shares
