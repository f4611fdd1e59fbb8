"""Overhead of AutoAccumOptimizer against the hand-written accumulation loop, on CPU.

    python benchmarks/overhead.py            # full run (~2 min on 2 busy cores)
    python benchmarks/overhead.py --quick    # smoke run (< 60 s)

For each case the same model (two copies with identical initial weights), the same data and the same
micro-batch size are stepped by

* ``autoaccum``: ``AutoAccumOptimizer(inner, target_batch_size=T, micro_batch_size=M)`` (pinned
  micro-batch, ``memory=None`` so no memory backend runs), one ``opt.step(loss_fn, batch)`` per
  loader batch;
* ``minimal``: the floor any wrapper pays: cut the loader batch into micro-batches once
  (``split``), call ``loss_fn``, backward seeded with the micro-batch's weight (a cached tensor:
  the cheapest way to scale, as autoaccum's fast path does), one inner step and ``zero_grad`` per
  T samples; no checks, no bookkeeping, no returned loss;
* ``manual``: the loop a careful user writes: for each micro-batch
  ``(loss_fn(mb) * (mb_size / T)).backward()``; after T samples ``optimizer.step()`` and
  ``optimizer.zero_grad(set_to_none=True)``. In token mode (``loss_fn`` returns
  ``(loss_sum, num_items)``) the loop first sums ``num_items`` over the whole step and backwards
  ``loss_sum / total`` (the transformers ``num_items_in_batch`` fix).

Timing: after warm-up the two variants are run alternately (A B B A A B ..., so neither always goes
first), one timed sample = ``k`` optimizer steps of one variant. The ratio of each A/B pair is
recorded; the report gives the median ratio and its interquartile range, and the median ms per
optimizer step of each variant. The timer is this process's CPU time by default (``--clock wall``
for wall time): on a shared machine other processes then do not count. The cyclic garbage collector
is off (and the heap frozen) while timing; it runs every 32 pairs, outside the timed samples.

Memory: a separate pass after timing (never while timing): each variant runs two more optimizer
steps inside ``SimulatedDevice(capacity_bytes=huge).active(params + grads + optimizer state)``,
which counts every live tensor storage (resident tensors plus every storage an ATen op allocates);
``peak_bytes`` is reported. The host batches are CPU tensors already, so they (and the views the
micro-batches are) are not counted by either variant. tracemalloc would not see torch's tensor
allocations (they bypass Python's allocator), so it is not used.

Profile: cProfile over autoaccum steps of the MLP case (per micro-batch microseconds of the
heaviest functions), and timeit micro-benchmarks of the per-micro-batch / per-call pieces of the
driver, reconstructed from the library's own objects.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import gc
import io
import pstats
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoaccum  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "overhead.md"
HUGE = 1 << 50
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK = [time.process_time]  # the timer of timed samples (set from --clock)


# --------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator, int], Any]
    loss_fn: Callable[[nn.Module], Callable[[Any], Any]]
    token: bool
    target: int  # T
    micro: int  # M
    loader: int  # loader batch size
    rounds: int  # timed A/B pairs
    warmup: int  # steps per variant before timing
    k: int  # optimizer steps per timed sample
    goal: float  # the target for the median ratio
    pool: int = 16  # distinct batches, cycled


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def mlp_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def ce_loss(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    def loss_fn(mb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = mb
        return F.cross_entropy(model(x), y)

    return loss_fn


def resnet() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def image_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def small_cnn() -> nn.Module:
    """Two 3x3 conv blocks (16, 32 channels) with max-pooling and a linear head, 32x32 input."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )  # fmt: skip


def small_image_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


VOCAB, SEQ, D = 1000, 32, 64


class TinyLM(nn.Module):
    """2-layer causal transformer encoder, d=64, sequence 32, vocabulary 1000."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(SEQ, D) * 0.02)
        layer = nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, VOCAB)
        self.register_buffer("causal", torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1))

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens) + self.pos
        h = self.enc(h, mask=self.causal, src_key_padding_mask=pad)
        return self.head(h)


def lm_batch(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
    mask = torch.arange(SEQ)[None, :] < lengths[:, None]  # True: a real token
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def lm_loss(model: nn.Module) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    def loss_fn(mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mb["mask"]
        logits = model(mb["tokens"], ~mask)
        loss_sum = F.cross_entropy(logits[mask], mb["targets"][mask], reduction="sum")
        return loss_sum, mask.sum()

    return loss_fn


def cases(quick: bool) -> list[Case]:
    q = quick
    mlp_timing = {"rounds": 100 if q else 400, "warmup": 30, "k": 4 if q else 8, "pool": 32}
    return [
        Case("MLP 64-64, T=64, M=8", mlp, mlp_batch, ce_loss, token=False, target=64, micro=8,
             loader=64, goal=1.03, **mlp_timing),
        Case("MLP 64-64, T=64, M=8, loader 32", mlp, mlp_batch, ce_loss, token=False, target=64,
             micro=8, loader=32, goal=1.03, **mlp_timing),
        Case("Small CNN 32x32, T=128, M=32", small_cnn, small_image_batch, ce_loss, token=False,
             target=128, micro=32, loader=128, goal=1.01, rounds=40 if q else 300, warmup=3,
             k=1, pool=8),
        Case("ResNet-18 64x64, T=32, M=8", resnet, image_batch, ce_loss, token=False, target=32,
             micro=8, loader=32, goal=1.01, rounds=6 if q else 40, warmup=2, k=1,
             pool=4),
        Case("Transformer d=64 x2, T=32, M=8, token loss", TinyLM, lm_batch, lm_loss, token=True,
             target=32, micro=8, loader=32, goal=1.01, rounds=25 if q else 200, warmup=3, k=1),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------- variants
def slice_batch(batch: Any, a: int, b: int) -> Any:
    if isinstance(batch, dict):
        return {key: v[a:b] for key, v in batch.items()}
    return tuple(v[a:b] for v in batch)


def batch_len(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return first.shape[0]


class Manual:
    """The hand-written accumulation loop (state kept across loader batches)."""

    def __init__(self, model: nn.Module, case: Case) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.loss_fn = case.loss_fn(model)
        self.T, self.M, self.token = case.target, case.micro, case.token
        self.seen = 0

    def params_and_state(self) -> list[torch.Tensor]:
        return resident(self.opt)

    def __call__(self, batch: Any) -> None:
        T, M, loss_fn, opt = self.T, self.M, self.loss_fn, self.opt
        n = batch_len(batch)
        if self.token:  # all items of the step, before the first backward
            assert n == T, "token mode here needs loader batch == T"
            total = batch["mask"].sum()
        for a in range(0, n, M):
            b = min(a + M, n)
            mb = slice_batch(batch, a, b)
            if self.token:
                loss_sum, _ = loss_fn(mb)
                loss = loss_sum / total
            else:
                loss = loss_fn(mb) * ((b - a) / T)
            loss.backward()
            self.seen += b - a
            if self.seen == T:
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.seen = 0


class Minimal:
    """The unavoidable work of any wrapper: one ``split`` per leaf and call, loss_fn, backward
    seeded with the weight (no scaling op, no ``ones_like``), one inner step per T samples."""

    def __init__(self, model: nn.Module, case: Case) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.loss_fn = case.loss_fn(model)
        self.T, self.M, self.token = case.target, case.micro, case.token
        self.seen = 0
        self.seeds: dict[Any, torch.Tensor] = {}

    def params_and_state(self) -> list[torch.Tensor]:
        return resident(self.opt)

    def seed(self, key: Any, value: float | torch.Tensor) -> torch.Tensor:
        found = self.seeds.get(key)
        if found is None:
            found = self.seeds[key] = torch.ones(()) * value
        return found

    def __call__(self, batch: Any) -> None:
        T, M, loss_fn, opt = self.T, self.M, self.loss_fn, self.opt
        if isinstance(batch, dict):
            keys = list(batch)
            micro = [dict(zip(keys, parts)) for parts in zip(*[batch[k].split(M) for k in keys])]
            # the step's count is a tensor: one op per call makes the seed
            tseed = torch.ones(()) / batch["mask"].sum() if self.token else None
        else:
            micro = list(zip(*[v.split(M) for v in batch]))
            tseed = None
        for mb in micro:
            size = batch_len(mb)
            if self.token:
                loss_fn(mb)[0].backward(tseed)
            else:
                loss_fn(mb).backward(self.seed(size, size / T))
            self.seen += size
            if self.seen == T:
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.seen = 0


class Auto:
    def __init__(self, model: nn.Module, case: Case) -> None:
        self.model = model
        self.opt = autoaccum.AutoAccumOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-3),
            target_batch_size=case.target,
            micro_batch_size=case.micro,
        )
        self.loss_fn = case.loss_fn(model)

    def params_and_state(self) -> list[torch.Tensor]:
        return resident(self.opt.optimizer)

    def __call__(self, batch: Any) -> None:
        self.opt.step(self.loss_fn, batch)


def resident(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
    for st in opt.state.values():
        out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return out


def pair(case: Case, seed: int = 0) -> tuple[Auto, Manual]:
    torch.manual_seed(seed)
    model = case.build()
    return Auto(copy.deepcopy(model), case), Manual(model, case)


def trio(case: Case, seed: int = 0) -> tuple[Auto, Manual, Minimal]:
    torch.manual_seed(seed)
    model = case.build()
    return (Auto(copy.deepcopy(model), case), Manual(copy.deepcopy(model), case),
            Minimal(model, case))


def batches(case: Case, seed: int = 1) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [case.make_batch(g, case.loader) for _ in range(case.pool)]


# --------------------------------------------------------------------------------- measurement
@dataclass
class Row:
    case: Case
    auto_ms: float
    manual_ms: float
    minimal_ms: float
    ratio: float  # autoaccum / manual, median over rounds
    q1: float
    q3: float
    floor_ratio: float  # minimal / manual
    gap_us: float  # (autoaccum - minimal) per micro-batch, median over rounds
    peak_manual: int
    peak_auto: int
    peak_minimal: int
    resident: int
    agree: float


def check_agreement(case: Case, data: list[Any]) -> float:
    """Max relative difference of one SGD step's parameter update, autoaccum vs manual."""
    auto, manual = pair(case, seed=2)
    auto.opt = autoaccum.AutoAccumOptimizer(
        torch.optim.SGD(auto.model.parameters(), lr=1.0),
        target_batch_size=case.target,
        micro_batch_size=case.micro,
    )
    manual.opt = torch.optim.SGD(manual.model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in manual.model.parameters()]
    per_step = case.target // case.loader
    for b in data[:per_step]:
        auto(b)
        manual(b)
    worst = 0.0
    for p0, pa, pm in zip(before, auto.model.parameters(), manual.model.parameters(), strict=True):
        da, dm = pa.detach() - p0, pm.detach() - p0
        scale = dm.abs().max().item()
        if scale > 0:
            worst = max(worst, (da - dm).abs().max().item() / scale)
    return worst


def peak_bytes(variant: Auto | Manual | Minimal, data: list[Any], steps: int) -> tuple[int, int]:
    """Peak counted bytes over ``steps`` optimizer steps, and the resident bytes at entry."""
    dev = autoaccum.SimulatedDevice(capacity_bytes=HUGE)
    gc.collect()
    with dev.active(variant.params_and_state()):
        start = dev.allocated_bytes()
        dev.reset_peak()
        for b in data[:steps]:
            variant(b)
    return dev.peak_bytes(), start


def run_case(case: Case) -> Row:
    data = batches(case)
    agree = check_agreement(case, data)
    auto, manual, minimal = trio(case)
    variants: dict[str, Callable[[Any], None]] = {"a": auto, "m": manual, "f": minimal}
    per_step = case.target // case.loader  # loader batches per optimizer step
    calls = case.k * per_step
    pos = dict.fromkeys(variants, 0)

    def timed(key: str) -> float:
        i = pos[key]
        todo = [data[(i + j) % len(data)] for j in range(calls)]
        pos[key] = i + calls
        fn = variants[key]
        t0 = CLOCK[0]()
        for b in todo:
            fn(b)
        return (CLOCK[0]() - t0) / case.k

    for _ in range(case.warmup):
        for key in variants:
            timed(key)
    times: dict[str, list[float]] = {key: [] for key in variants}
    orders = ["amf", "fma", "maf", "fam", "mfa", "afm"]  # each variant first equally often
    gc.collect()
    gc.freeze()  # later collections skip the (large, static) torch heap
    gc.disable()
    try:
        for r in range(case.rounds):
            for key in orders[r % len(orders)]:
                times[key].append(timed(key))
            if r % 32 == 31:
                gc.collect()
    finally:
        gc.enable()
        gc.unfreeze()
    ta, tm, tf = times["a"], times["m"], times["f"]
    ratios = [a / m for a, m in zip(ta, tm, strict=True)]
    q1, med, q3 = quantiles(ratios)
    floor = statistics.median(f / m for f, m in zip(tf, tm, strict=True))
    micro_per_step = -(-case.target // case.micro)
    gap = statistics.median(a - f for a, f in zip(ta, tf, strict=True)) / micro_per_step * 1e6
    mem_data = [data[i % len(data)] for i in range(2 * per_step)]
    peak_m, res_m = peak_bytes(manual, mem_data, len(mem_data))
    peak_a, _ = peak_bytes(auto, mem_data, len(mem_data))
    peak_f, _ = peak_bytes(minimal, mem_data, len(mem_data))
    return Row(
        case,
        statistics.median(ta) * 1e3,
        statistics.median(tm) * 1e3,
        statistics.median(tf) * 1e3,
        med,
        q1,
        q3,
        floor,
        gap,
        peak_m,
        peak_a,
        peak_f,
        res_m,
        agree,
    )


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


# ------------------------------------------------------------------------------------- profile
def profile_mlp(steps: int) -> tuple[int, list[tuple[str, float, float]], float]:
    """cProfile autoaccum steps of the MLP case and attribute the driver's own cost.

    Returns the micro-batch count, rows (what, calls per micro-batch, µs per micro-batch) and the
    total µs per micro-batch attributed to the driver. A row is either the own time of a function
    in ``autoaccum/`` or the cumulative time of a call made *from* ``autoaccum/`` into code that
    is not the user's ``loss_fn``, autograd's backward, or the inner optimizer's step / zero_grad
    (the work the manual loop does too).
    """
    case = cases(True)[0]
    data = batches(case)
    auto, _ = pair(case)
    for b in data[:20]:
        auto(b)
    repeats = 3
    micro = steps * (case.target // case.micro)
    best: dict[str, tuple[float, float]] = {}  # row -> (calls, µs) per micro-batch, min of runs

    def ours(func: tuple[str, int, str]) -> bool:
        return "autoaccum" in Path(func[0]).parts

    def label(func: tuple[str, int, str]) -> str:
        file, line, name = func
        if not line:
            return name
        return f"{name} ({file.split('site-packages/')[-1].split(str(ROOT) + '/')[-1]}:{line})"

    # what the manual loop calls too (Optimizer.zero_grad is wrapped by torch._compile's `inner`)
    shared = ("loss_fn", "backward", "step", "zero_grad", "_use_grad", "wrapper", "inner")
    for _ in range(repeats):  # the minimum over repeats drops other processes' interference
        prof = cProfile.Profile()
        gc.collect()
        gc.disable()
        try:
            prof.enable()
            for i in range(steps):
                auto(data[i % len(data)])
            prof.disable()
        finally:
            gc.enable()
        stats = pstats.Stats(prof, stream=io.StringIO()).stats  # type: ignore[attr-defined]
        found: dict[str, tuple[float, float]] = {}
        for func, (_cc, nc, tt, _ct, callers) in stats.items():
            if ours(func):
                found[f"own: {label(func)}"] = (nc / micro, tt / micro * 1e6)
                continue
            if func[2] in shared:
                continue
            for caller, edge in callers.items():
                if ours(caller):
                    found[f"{label(func)} <- {caller[2]}"] = (
                        edge[1] / micro,
                        edge[3] / micro * 1e6,
                    )
        for key, (calls, cost) in found.items():
            if key not in best or cost < best[key][1]:
                best[key] = (calls, cost)
    rows = [(key, calls, cost) for key, (calls, cost) in best.items()]
    rows.sort(key=lambda r: -r[2])
    return micro, rows, sum(r[2] for r in rows)


def us(stmt: Callable[[], Any], number: int = 20000) -> float:
    """Best-of-5 microseconds per call."""
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6


def component_costs(number: int) -> list[tuple[str, str, float]]:
    """Timeit costs of driver pieces, warm (per micro-batch unless marked per call or step).
    In the training loop they run cold, after a backward has flushed the CPU caches, and cost
    two to four times more: the gap column of the table is the figure that counts."""
    from autoaccum import batching, planner, step
    from autoaccum import weights as weights_mod

    x, y = mlp_batch(torch.Generator().manual_seed(0), 64)
    batch = (x, y)
    flat = batching.flatten_batch(batch)
    sizes = planner.balanced_split(64, 8)
    model = mlp()
    loss = F.cross_entropy(model(x[:8]), y[:8])
    raw = [loss.detach() for _ in range(8)]
    out: list[tuple[str, str, float]] = []

    def add(name: str, scope: str, stmt: Callable[[], Any], div: int = 1) -> None:
        try:
            out.append((name, scope, us(stmt, max(number // div, 100))))
        except Exception as exc:  # the library changes under us: report, do not fail
            out.append((f"{name} (failed: {type(exc).__name__})", scope, float("nan")))

    add("flatten_batch((x, y))", "call", lambda: batching.flatten_batch(batch))
    add("Chunk(flat, loss_fn, call) (with the leaves' version counters)", "call",
        lambda: step.Chunk(flat, ce_loss, 1))
    add("balanced_split(64, 8)", "call", lambda: planner.balanced_split(64, 8))
    add("FlatBatch.split(sizes): split_with_sizes per leaf", "call", lambda: flat.split(sizes))
    add("  the minimal wrapper's x.split(8), y.split(8) + zip", "call",
        lambda: list(zip(x.split(8), y.split(8))))
    add("rebuild(leaves) (tuple)", "micro-batch", lambda: flat.rebuild([x, y]))
    seeds = weights_mod.Weights()
    add("Weights.seed(loss, 8, 64): the cached backward seed, looked up per size", "call",
        lambda: seeds.seed(loss, 8, 64, False))
    add("  what it saves: loss * (8 / 64) and ones_like, the hand loop's scale and seed",
        "micro-batch", lambda: torch.ones_like(loss * 0.125))
    add("returned loss: torch.dot(cached weights, torch.stack(8 raw losses))", "call",
        lambda: torch.dot(seeds.mean(sizes, loss), torch.stack(raw)))
    add("StepRecord(...) for opt.history", "step",
        lambda: autoaccum.StepRecord(1, 64, 8, 8, 0, None, None, 1e-3, 6e4, 1e-3))
    return out


# -------------------------------------------------------------------------------------- report
def fmt_bytes(n: int) -> str:
    return f"{n:,}"


def report(
    rows: list[Row],
    profile: tuple[int, list[tuple[str, float, float]], float],
    comps: list[tuple[str, str, float]],
    argv: list[str],
    clock: str,
    seconds: float,
) -> str:
    micro, prof, prof_total = profile
    lines = [
        "# autoaccum overhead against a hand-written accumulation loop",
        "",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}  ",
        f"Command: `python {' '.join(argv)}`  ",
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} intra-op thread(s), "
        f"AdamW(lr=1e-3), clock: {clock}; run took {seconds:.0f} s wall.",
        "",
        "| case | manual ms/step | minimal ms/step | autoaccum ms/step | autoaccum / manual "
        "(IQR) | minimal / manual | autoaccum - minimal, µs per micro-batch | peak bytes "
        "manual | peak Δ autoaccum | peak Δ minimal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case.name} | {r.manual_ms:.3f} | {r.minimal_ms:.3f} | {r.auto_ms:.3f} | "
            f"{r.ratio:.3f} ({r.q1:.3f} to {r.q3:.3f}) | {r.floor_ratio:.3f} | {r.gap_us:+.1f} | "
            f"{fmt_bytes(r.peak_manual)} | {r.peak_auto - r.peak_manual:+,} | "
            f"{r.peak_minimal - r.peak_manual:+,} |"
        )
    short = [
        r.case.name.split(",")[0] + (" loader 32" if "loader" in r.case.name else "") for r in rows
    ]
    timer = (
        "CPU time of this process (`time.process_time`; other processes on the shared machine "
        "do not count)"
        if clock == "cpu"
        else "wall time (`time.perf_counter`)"
    )
    met = [
        f"{n}: {r.ratio:.3f} {'<=' if r.ratio <= r.case.goal else '>'} {r.case.goal}"
        for n, r in zip(short, rows, strict=True)
    ]
    lines += [
        "",
        "Goal from the issue, median ratio <= 1.03 for the MLP and <= 1.01 where the model "
        "dominates, i.e. at most +3 µs per micro-batch above the minimal wrapper: "
        + "; ".join(met) + ". Peak Δ of a few bytes: the raw loss tensors autoaccum keeps for "
        "the loss it returns and its cached backward seeds (a few bytes each). autoaccum can "
        "be faster than the hand loop: on its fast path it seeds each backward with the "
        "micro-batch's weight (a cached tensor) instead of running `loss * w` and "
        "`ones_like`, two dispatcher ops per micro-batch that cost a light model several µs "
        "(the gradient is the same bit for bit); the minimal wrapper does the same, so the "
        "gap column is bookkeeping alone.",
        "",
        "What was measured:",
        "",
        "* ms/step: median time of one optimizer step (T samples; two `step` calls per "
        f"optimizer step for the loader-32 row), measured as {timer}. The three variants "
        "alternate in one process after warm-up, in rotating order (each timed sample is "
        "several steps for the MLP, one for the others); ratios are taken within a round, "
        "median and interquartile range over rounds. Forward, loss, backward and the inner "
        "AdamW step are in all three. The minimal wrapper does only what any wrapper must "
        "(split once, loss_fn, a backward seeded with the weight, one inner step per T "
        "samples); the gap column "
        "is autoaccum's own cost per micro-batch above it.",
        "* peak bytes: `SimulatedDevice(capacity_bytes=2**50).active(params + grads + optimizer "
        "state)` around two more optimizer steps of each variant, in a separate pass after "
        "timing: resident tensors plus every storage an ATen op allocates, while it is alive. "
        "The CPU batch and its micro-batch views are counted for neither variant. Resident at "
        "entry (params + AdamW state; grads are None after zero_grad): "
        + ", ".join(f"{n} {fmt_bytes(r.resident)}" for n, r in zip(short, rows, strict=True))
        + ".",
        "* update check: one SGD(lr=1) step from identical weights on identical data; max "
        "relative difference of the parameter update, autoaccum vs manual: "
        + ", ".join(f"{n} {r.agree:.1e}" for n, r in zip(short, rows, strict=True))
        + ".",
        "",
    ]
    lines += [
        f"## Where autoaccum's own Python time goes (MLP case, {micro} micro-batches profiled)",
        "",
    ]
    for r in rows:
        if r.case.build is mlp:
            per_step = r.case.target // r.case.micro
            gap = (r.auto_ms - r.manual_ms) * 1e3 / per_step
            lines.append(
                f"Measured gap, {r.case.name}: {gap:.1f} µs per micro-batch "
                f"((autoaccum - manual) ms/step ÷ {per_step}).  "
            )
    lines += [
        "",
        "cProfile of the autoaccum variant (minimum over 3 profiled runs). Rows: own time of "
        "functions in `autoaccum/`, and "
        "time of calls made from `autoaccum/` into other code except `loss_fn`, backward and "
        "the inner optimizer's step/zero_grad (work the manual loop does too). Tensor "
        "arithmetic written as operators (`loss * w`, `a + b`) is inside the own time of the "
        "function that does it. cProfile "
        "inflates every Python call by a fixed cost, so the sum "
        f"({prof_total:.1f} µs per micro-batch) is larger than the wall-clock gap; per-call "
        "rows (flatten, _accumulate, _finish_step) are spread over the step's micro-batches.",
        "",
        "| what | calls / micro-batch | µs / micro-batch |",
        "|---|---:|---:|",
    ]
    for name, calls, cost in prof[:30]:
        lines.append(f"| `{name}` | {calls:.3f} | {cost:.2f} |")
    lines += [
        "",
        "Driver pieces timed in isolation (timeit, best of 5, no profiler):",
        "",
        "| piece | runs once per | µs |",
        "|---|---|---:|",
    ]
    for name, scope, cost in comps:
        lines.append(f"| {name} | {scope} | {cost:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 60 s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable timings on a shared CPU)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this process's CPU time (default; robust to other processes "
        "on a shared machine); wall: perf_counter",
    )
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK[0] = CLOCKS[args.clock]
    start = time.perf_counter()
    rows = []
    for case in cases(args.quick):
        if args.only not in case.name:
            continue
        t0 = time.perf_counter()
        row = run_case(case)
        rows.append(row)
        print(
            f"{case.name}: manual {row.manual_ms:.3f} ms, minimal {row.minimal_ms:.3f} ms, "
            f"autoaccum {row.auto_ms:.3f} ms, ratio {row.ratio:.3f} (IQR {row.q1:.3f}-"
            f"{row.q3:.3f}), minimal/manual {row.floor_ratio:.3f}, gap {row.gap_us:+.1f} µs per "
            "micro-batch, peak "
            f"{row.peak_manual:,} / {row.peak_auto:,} B, update diff {row.agree:.1e} "
            f"[{time.perf_counter() - t0:.1f} s]",
            flush=True,
        )
    t0 = time.perf_counter()
    profile = profile_mlp(60 if args.quick else 250)
    comps = component_costs(2000 if args.quick else 20000)
    print(f"profile + components [{time.perf_counter() - t0:.1f} s]", flush=True)
    text = report(
        rows,
        profile,
        comps,
        ["benchmarks/overhead.py", *sys.argv[1:]],
        args.clock,
        time.perf_counter() - start,
    )
    print()
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
