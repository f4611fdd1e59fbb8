"""From the first batch to a settled plan: autoaccum against two OOM-driven baselines, on CPU.

    python benchmarks/planning.py            # full run (~2-3 min on 2 busy cores)
    python benchmarks/planning.py --quick    # smoke run (~20 s; prints, writes no file)

The full run writes benchmarks/results/planning.md. Most of its time is Accelerate's retries: each
OOM costs it a gc.collect() (0.1-0.3 s here). torch runs with one intra-op thread (see main()).

Every policy trains the same model (same initial weights, same data) on its own fresh
``autoaccum.SimulatedDevice(capacity_bytes=C)``: a CPU stand-in GPU that counts live tensor storages
and raises ``torch.OutOfMemoryError`` at the allocation that passes ``C``. Each optimizer step is
exactly ``target`` samples (gradient accumulation over micro-batches); the loader batch is the
whole step, on the CPU (not counted by the device, for any policy).

Policies:

* ``autoaccum``: ``AutoAccumOptimizer(AdamW, target_batch_size=T, memory=device)``, planned
  micro-batch (``micro_batch_size=None``). ``autoaccum m=0.05`` is the same with
  ``opt.policy.margin = 0.05`` set right after construction (default margin: 0.10).
* ``accelerate``: the real ``accelerate.utils.find_executable_batch_size(starting_batch_size=T)``
  around the training loop (its documented ``inner_training_loop`` use): on OOM it shrinks the
  batch size by 0.9 and calls the whole function again. The function accumulates
  ``ceil(T / batch_size)`` micro-batches (``x.split(batch_size)``) per step, so the effective batch
  stays ``T`` (Accelerate itself has no effective-batch bookkeeping).
* ``halving``: Composer-style ``device_train_microbatch_size="auto"``: start at the full batch,
  halve on OOM, re-run the step that failed, never grow.

The baselines run forward, backward and the optimizer step inside
``device.active(params + grads + optimizer state)``, so the device accounts for them exactly as it
does for autoaccum (which enters ``active`` with the same tensors itself).

Measured, from the first batch to the settled plan:

* trial micro-steps: forward/backward passes run before the plan settled. autoaccum: its probe
  micro-batches plus every micro-batch that ran out of memory. Baselines: every micro-batch
  attempted before the first one that succeeded at the final size (that one not included).
* OOMs: out-of-memory errors caught in that window.
* wasted samples: samples whose forward/backward was thrown away. autoaccum: the OOMed
  micro-batches and the replays after a backward OOM (its probes are real samples of the step).
  Baselines: every micro-batch of an attempt that failed (for ``accelerate`` that includes the
  steps its restart re-runs).
* time to settle: wall time from the first batch to the end of the backward of the first
  micro-batch run under the settled plan (autoaccum: the first non-trial micro-batch after the
  last trial one; baselines: the first success at the final size). Median over repetitions;
  the counts are deterministic (checked across repetitions).
* final micro-batch: the largest micro-batch actually run with the settled plan
  (``max(opt.plan.micro_batch_sizes)`` for autoaccum) against the largest that fits: the largest
  ``max(balanced_split(T, M))`` over pinned ``micro_batch_size=M`` for which autoaccum runs two full
  steps without an OOM (a search over the sizes a balanced split can run). The baselines split
  by ``x.split(size)``, which can run sizes a balanced split cannot, so their fraction may pass 1.

When is a plan settled: autoaccum after the first step (second or later) that started with no
probe pending and ran with no OOM and no change of the limit; baselines after two full steps
(the second one runs with the AdamW state resident, as every later step does). One more step is
run after that (not timed, not counted) and any OOM or size change in it is reported.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoaccum  # noqa: E402
from autoaccum.planner import balanced_split  # noqa: E402

MIB = 2**20
SETTLE_STEPS_MAX = 8  # autoaccum: give up (and say so) if the plan has not settled by then


# ------------------------------------------------------------------------------ models and data
def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    return nn.Sequential(  # "cnn": 3x8x8 inputs
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def make_batches(kind: str, target: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        shape = (target, 64) if kind == "mlp" else (target, 3, 8, 8)
        out.append((torch.randn(shape, generator=g), torch.randint(0, 10, (target,), generator=g)))
    return out


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class Case:
    kind: str
    capacity: int  # bytes
    target: int

    @property
    def label(self) -> str:
        return f"{self.kind} T={self.target}"


# ------------------------------------------------------------------------------ bookkeeping
@dataclass
class MicroStep:
    size: int
    start: float
    attempt: int = 0  # baselines: which attempt (a step try, or a whole-function call)
    config: int = 0  # baselines: the micro-batch size the attempt was configured for
    probe: bool = False  # autoaccum: a probe micro-batch
    ooms_before: int = 0  # autoaccum: opt.oom_events when it started
    end: float | None = None  # end of its backward (None: it ran out of memory)
    oom: bool = False


@dataclass
class Outcome:
    trials: int
    ooms: int
    wasted: int
    settle_s: float
    final: int
    trace: str  # the trial micro-steps, compactly
    later: str = ""  # what the one extra step after settling did, if anything surprising
    notes: list[str] = field(default_factory=list)
    memory_model: tuple[float, float] | None = None  # autoaccum: (fixed, per-sample) bytes
    planned_free: int | None = None  # autoaccum: free - reserve bytes the plan was made for
    probes: tuple[tuple[int, int], ...] = ()  # autoaccum: (size, peak above resident)

    def counts(self) -> tuple[Any, ...]:
        return (self.trials, self.ooms, self.wasted, self.final, self.trace, self.later)


def _trace(steps: list[MicroStep]) -> str:
    parts = []
    for s in steps:
        tag = "p" if s.probe else ""
        if s.oom:
            tag += "!"
        parts.append(f"{s.size}{tag}")
    if len(parts) > 24:
        parts = [*parts[:10], f"... ({len(parts) - 20} more) ...", *parts[-10:]]
    return " ".join(parts) if parts else "-"


# ------------------------------------------------------------------------------ autoaccum
def run_autoaccum(case: Case, batches: list[Any], margin: float | None = None) -> Outcome:
    model = make_model(case.kind)
    device = autoaccum.SimulatedDevice(capacity_bytes=case.capacity)
    opt = autoaccum.AutoAccumOptimizer(
        make_optimizer(model), target_batch_size=case.target, memory=device
    )
    if margin is not None:
        opt.policy.margin = margin
    calls: list[MicroStep] = []

    def loss_fn(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls.append(MicroStep(
            size=b[0].shape[0], start=time.perf_counter(), probe=opt.policy.probing,
            ooms_before=opt.oom_events,
        ))
        return loss_of(model, *b)

    def backward_done(_: torch.Tensor) -> None:
        calls[-1].end = time.perf_counter()  # the last parameter's gradient ends the backward

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(backward_done)

    gc.collect()
    t0 = time.perf_counter()
    steps, settled = 0, False
    while steps < SETTLE_STEPS_MAX and not settled:
        was_probing, limit, ooms = opt.policy.probing, opt.policy.limit, opt.oom_events
        opt.step(loss_fn, batches[steps])
        settled = (
            steps >= 1 and not was_probing and opt.oom_events == ooms and opt.policy.limit == limit
        )
        steps += 1
    window = len(calls)
    ooms_window = opt.oom_events
    policy_state = opt.policy.state_dict()
    final = max(opt.plan.micro_batch_sizes)
    if final != max(balanced_split(case.target, opt.policy.limit)):
        raise AssertionError(f"plan runs {opt.plan} but the limit is {opt.policy.limit}")
    # One more step, not counted: does the settled plan hold?
    limit = opt.policy.limit
    opt.step(loss_fn, batches[steps])
    later = []
    if opt.oom_events != ooms_window:
        later.append(f"{opt.oom_events - ooms_window} OOM")
    if opt.policy.limit != limit:
        later.append(f"limit {limit} -> {opt.policy.limit}")

    for i, c in enumerate(calls[:window]):
        after = calls[i + 1].ooms_before if i + 1 < len(calls) else opt.oom_events
        c.oom = after > c.ooms_before
    trials = [c for c in calls[:window] if c.probe or c.oom]
    last_trial = max(i for i, c in enumerate(calls[:window]) if c.probe or c.oom)
    first_planned = next(c for c in calls[last_trial + 1:] if c.end is not None)
    assert first_planned.end is not None
    notes = [] if settled else [f"not settled after {SETTLE_STEPS_MAX} steps"]
    return Outcome(
        trials=len(trials),
        ooms=ooms_window,
        wasted=sum(c.size for c in calls[:window]) - steps * case.target,
        settle_s=first_planned.end - t0,
        final=final,
        trace=_trace(trials),
        later=", ".join(later),
        notes=notes,
        memory_model=policy_state["model"],
        planned_free=policy_state["planned_free"],
        probes=tuple(tuple(p) for p in policy_state["probes"]),
    )


# ------------------------------------------------------------------------------ baselines
class _Recorder:
    def __init__(self) -> None:
        self.steps: list[MicroStep] = []
        self.failed_attempts: set[int] = set()
        self.attempt = 0


def _resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = list(model.parameters())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for st in optimizer.state.values() for v in st.values()
                if isinstance(v, torch.Tensor)]
    return tensors


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, device: autoaccum.SimulatedDevice,
    batch: tuple[torch.Tensor, torch.Tensor], size: int, rec: _Recorder,
) -> None:
    """One optimizer step over ``batch`` in micro-batches of ``size`` (plain accumulation)."""
    x, y = batch
    n = x.shape[0]
    with device.active(_resident(model, optimizer)):
        for xb, yb in zip(x.split(size), y.split(size)):
            ms = MicroStep(xb.shape[0], time.perf_counter(), rec.attempt, size)
            rec.steps.append(ms)
            loss = loss_of(model, xb, yb) * (xb.shape[0] / n)
            loss.backward()
            ms.end = time.perf_counter()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _try_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, device: autoaccum.SimulatedDevice,
    batch: tuple[torch.Tensor, torch.Tensor], size: int, rec: _Recorder,
) -> str | None:
    """``_train_step``; on OOM: the error message, with the failed frames already gone."""
    try:
        _train_step(model, optimizer, device, batch, size, rec)
    except torch.OutOfMemoryError as exc:
        message = str(exc)
    else:
        return None
    rec.steps[-1].oom = rec.steps[-1].end is None
    optimizer.zero_grad(set_to_none=True)  # the step's partial gradient is thrown away
    return message


def _baseline_outcome(rec: _Recorder, t0: float, final: int, notes: list[str]) -> Outcome:
    steps = rec.steps
    first = next(
        i for i, s in enumerate(steps)
        if s.config == final and s.end is not None and s.attempt not in rec.failed_attempts
    )
    end = steps[first].end
    assert end is not None
    return Outcome(
        trials=first,
        ooms=len(rec.failed_attempts),
        wasted=sum(s.size for s in steps if s.attempt in rec.failed_attempts),
        settle_s=end - t0,
        final=final,
        trace=_trace(steps[:first]),
        notes=notes,
    )


def run_halving(case: Case, batches: list[Any]) -> Outcome:
    model = make_model(case.kind)
    optimizer = make_optimizer(model)
    device = autoaccum.SimulatedDevice(capacity_bytes=case.capacity)
    rec = _Recorder()
    size = case.target
    gc.collect()
    t0 = time.perf_counter()
    for i in range(2):
        while True:
            rec.attempt += 1
            if _try_step(model, optimizer, device, batches[i], size, rec) is None:
                break
            rec.failed_attempts.add(rec.attempt)
            # Composer: zero_grad(set_to_none=True) and torch.cuda.empty_cache(), no gc.collect
            if size == 1:
                raise RuntimeError(f"{case}: one sample does not fit")
            size //= 2
    out = _baseline_outcome(rec, t0, size, [])
    rec.attempt += 1
    if _try_step(model, optimizer, device, batches[2], size, rec) is not None:
        out.later = "1 OOM"
    return out


def _accelerate_oom_shim() -> tuple[bool, list[str]]:
    """Does Accelerate recognise the simulated OOM? Returns (needs_shim, notes)."""
    from accelerate.utils import is_cuda_available
    from accelerate.utils.memory import should_reduce_batch_size

    device = autoaccum.SimulatedDevice(capacity_bytes=0)
    error: BaseException | None = None
    try:
        with device.active():
            torch.ones(8)
    except torch.OutOfMemoryError as exc:
        error = exc
    assert error is not None
    needs = not should_reduce_batch_size(error)  # type: ignore[arg-type]
    notes = []
    if needs:
        notes.append(
            "accelerate.utils.memory.should_reduce_batch_size rejects the simulated OOM (its "
            "message reads 'CUDA out of memory (simulated). Tried ...' and Accelerate looks for "
            "' out of memory.'), so the accelerate run re-raises each simulated OOM as "
            "torch.OutOfMemoryError with the message a real CUDA OOM has ('CUDA out of memory. "
            "Tried ...'), outside the except block."
        )
    else:
        notes.append("accelerate.utils.memory.should_reduce_batch_size accepts the simulated OOM.")
    notes.append(
        "accelerate's clear_device_cache calls torch.cuda.empty_cache only when CUDA is available "
        f"(here: {is_cuda_available()}), so nothing of Accelerate was monkeypatched; its "
        "gc.collect() runs (and is timed) as in real use."
    )
    return needs, notes


def run_accelerate(case: Case, batches: list[Any], shim: bool) -> Outcome:
    from accelerate.utils import find_executable_batch_size

    model = make_model(case.kind)
    optimizer = make_optimizer(model)
    device = autoaccum.SimulatedDevice(capacity_bytes=case.capacity)
    rec = _Recorder()
    used: list[int] = []

    @find_executable_batch_size(starting_batch_size=case.target)
    def inner_training_loop(batch_size: int) -> None:
        rec.attempt += 1
        used.append(batch_size)
        for i in range(2):
            message = _try_step(model, optimizer, device, batches[i], batch_size, rec)
            if message is not None:
                rec.failed_attempts.add(rec.attempt)
                if shim:
                    message = message.replace(
                        "CUDA out of memory (simulated).", "CUDA out of memory."
                    )
                raise torch.OutOfMemoryError(message)

    gc.collect()
    t0 = time.perf_counter()
    inner_training_loop()
    out = _baseline_outcome(rec, t0, used[-1], [])
    rec.attempt += 1
    if _try_step(model, optimizer, device, batches[2], used[-1], rec) is not None:
        out.later = "1 OOM"
    return out


# ------------------------------------------------------------------------------ reference
class _Abort(Exception):
    pass


def runs_clean(case: Case, batches: list[Any], micro: int) -> bool:
    """Whether autoaccum with ``micro_batch_size=micro`` runs two full steps with no OOM."""
    model = make_model(case.kind)
    device = autoaccum.SimulatedDevice(capacity_bytes=case.capacity)
    opt = autoaccum.AutoAccumOptimizer(
        make_optimizer(model), target_batch_size=case.target, memory=device,
        micro_batch_size=micro,
    )

    def loss_fn(b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if opt.oom_events:
            raise _Abort  # the answer is known; skip the rest of the (halved) step
        return loss_of(model, *b)

    try:
        for i in range(2):
            opt.step(loss_fn, batches[i])
    except _Abort:
        return False
    return opt.oom_events == 0


def largest_that_fits(case: Case, batches: list[Any]) -> int:
    """The largest micro-batch a balanced split of ``target`` can run without an OOM.

    Searches the micro-batch count k (size ``ceil(T / k)``): doubling until it fits, then
    bisection, assuming that a smaller micro-batch never needs more memory.
    """
    t = case.target

    def fits(k: int) -> bool:
        return runs_clean(case, batches, -(-t // k))

    if fits(1):
        return t
    lo, hi = 1, 2  # fits(lo) is False
    while not fits(hi):
        lo, hi = hi, min(t, hi * 2)
        if lo == t:
            raise RuntimeError(f"{case}: even one sample does not fit")
    while hi - lo > 1:  # fits(hi), not fits(lo)
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return max(balanced_split(t, -(-t // hi)))


# ------------------------------------------------------------------------------ driver
POLICIES = ("autoaccum", "autoaccum m=0.05", "accelerate", "halving")


def run_policy(policy: str, case: Case, batches: list[Any], shim: bool) -> Outcome:
    if policy == "autoaccum":
        return run_autoaccum(case, batches)
    if policy == "autoaccum m=0.05":
        return run_autoaccum(case, batches, margin=0.05)
    if policy == "accelerate":
        return run_accelerate(case, batches, shim)
    return run_halving(case, batches)


@dataclass
class Row:
    case: Case
    policy: str
    outcome: Outcome
    times_ms: list[float]
    largest: int
    consistent: bool


def bench_case(case: Case, reps: int, shim: bool, log: Callable[[str], None]) -> list[Row]:
    batches = make_batches(case.kind, case.target, SETTLE_STEPS_MAX + 1)
    t = time.perf_counter()
    largest = largest_that_fits(case, batches)
    log(f"  {case.label} {case.capacity / MIB:g} MiB: largest that fits {largest} "
        f"({time.perf_counter() - t:.1f} s search)")
    outcomes: dict[str, list[Outcome]] = {p: [] for p in POLICIES}
    for _ in range(reps):  # policies interleaved, so slow phases of the machine hit all alike
        for policy in POLICIES:
            outcomes[policy].append(run_policy(policy, case, batches, shim))
    rows = []
    for policy in POLICIES:
        outs = outcomes[policy]
        rows.append(Row(
            case, policy, outs[0], [o.settle_s * 1e3 for o in outs], largest,
            consistent=all(o.counts() == outs[0].counts() for o in outs),
        ))
    return rows


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("mlp", 3 * MIB, 1024), Case("cnn", 4 * MIB, 1024)]
    # 2.625 MiB (MLP): the capacity where the planned 342 passes a 5% margin on the fitted
    # memory model although its true peak does not fit (see the notes of the report).
    out = [Case("mlp", int(c * MIB), 1024) for c in (2, 2.625, 3, 4)]
    out += [Case("cnn", c * MIB, 1024) for c in (3, 4, 6)]
    out += [Case("mlp", 2 * MIB, 512), Case("cnn", 4 * MIB, 512)]
    return out


def render(rows: list[Row]) -> str:
    head = (
        "| model | capacity | policy | trial micro-steps | OOMs | wasted samples "
        "| time to settle (ms) | final micro-batch | largest that fits | fraction |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        o = r.outcome
        flag = "" if r.consistent else " (varies)"
        later = f" (then {o.later})" if o.later else ""
        lines.append(
            f"| {r.case.label} | {r.case.capacity / MIB:g} MiB | {r.policy} | {o.trials}{flag} "
            f"| {o.ooms} | {o.wasted} | {statistics.median(r.times_ms):.0f} "
            f"| {o.final}{later} | {r.largest} | {o.final / r.largest:.2f} |"
        )
    return "\n".join(lines)


def render_traces(rows: list[Row]) -> str:
    lines = [
        "Trial micro-steps in order (size; p = autoaccum probe, ! = ran out of memory; baselines "
        "list every micro-batch before the first success at the final size):",
        "",
    ]
    for r in rows:
        lines.append(
            f"- {r.case.label} {r.case.capacity / MIB:g} MiB, {r.policy}: {r.outcome.trace}"
        )
    lines += [
        "",
        "autoaccum's memory model at the settled plan (peak of a micro-batch of b samples above "
        "the resident bytes = fixed + per-sample * b, fitted to the probes), the free memory it "
        "planned for (free - optimizer state still to come), and the largest margin under which "
        "the plan would have chosen the largest size that fits (model.peak(largest) <= "
        "(1 - margin) * free):",
        "",
    ]
    for r in rows:
        o = r.outcome
        if r.policy != "autoaccum" or o.memory_model is None or not o.planned_free:
            continue
        fixed, slope = o.memory_model
        need = 1 - (fixed + slope * r.largest) / o.planned_free
        probes = ", ".join(f"{b}: {p / 1024:.0f} KiB" for b, p in o.probes)
        lines.append(
            f"- {r.case.label} {r.case.capacity / MIB:g} MiB: probes {probes or '-'}; "
            f"fixed {fixed / 1024:.1f} KiB + {slope:.0f} B/sample; planned for "
            f"{o.planned_free / 1024:.0f} KiB; largest {r.largest} needs margin <= {need:.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two cases, one repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per policy")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="report file (default: benchmarks/results/planning.md; --quick writes none)",
    )
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    logging.getLogger("autoaccum").setLevel(logging.ERROR)  # one warning per OOM otherwise
    # One intra-op thread: with two, a busy machine stalls the parallel regions for whole
    # scheduler slices (one 341-sample MLP micro-step took 2 ms or 200 ms).
    torch.set_num_threads(1)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    shim, notes = _accelerate_oom_shim()
    gc_ms = []
    for _ in range(5):
        t = time.perf_counter()
        gc.collect()
        gc_ms.append((time.perf_counter() - t) * 1e3)
    notes.append(
        f"One gc.collect() in this process (torch and accelerate imported) takes "
        f"{statistics.median(gc_ms):.0f} ms (median of 5). After an OOM autoaccum collects once "
        "(in the backend's release), Accelerate once (plus once per "
        "call of the decorated function), the Composer-style halving not at all (it only "
        "empties the CUDA cache): on a small model this dominates the time to settle."
    )
    if not args.quick:
        notes.append(
            "mlp 2.625 MiB was picked on purpose: the capacity at which the fitted line (two small "
            "probes) says 342 fits under a 5% margin while its true peak does not; the peak of "
            "this MLP is convex in b (another phase of backward takes over at large b), so a "
            "line through small probes under-estimates far from them."
        )
    rows: list[Row] = []
    for case in cases(args.quick):
        rows.extend(bench_case(case, reps, shim, log))
    elapsed = time.perf_counter() - started

    import accelerate

    command = "python benchmarks/planning.py" + (" --quick" if args.quick else "")
    if args.reps:
        command += f" --reps {args.reps}"
    report = "\n".join([
        "# From the first batch to a settled plan",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}  ",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, accelerate {accelerate.__version__}, "
        f"autoaccum {autoaccum.__version__}  ",
        f"Repetitions: {reps} (time: median; counts identical across repetitions unless marked "
        f"'varies'); run took {elapsed:.0f} s.",
        "",
        "Each row: a fresh model and a fresh `SimulatedDevice(capacity_bytes=capacity)`, AdamW, "
        "steps of exactly T samples. Definitions are in the docstring of "
        "`benchmarks/planning.py`. 'largest that fits' is the largest micro-batch a balanced split "
        "of T can run for two full steps without an OOM; the baselines split with "
        "`x.split(size)`, which can run other sizes, so their fraction can pass 1.00. "
        "'(then ...)' marks an OOM or plan change in the one extra step after settling.",
        "",
        render(rows),
        "",
        render_traces(rows),
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in notes],
        "",
    ])
    print(report)
    out = args.out or (None if args.quick else ROOT / "benchmarks/results/planning.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        log(f"written to {out}")


if __name__ == "__main__":
    main()
