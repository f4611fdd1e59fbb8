"""Step time of "auto" shares on ranks of unequal speed, against an equal split and the ideal.

    python benchmarks/shares.py            # full run: 2 x 6 cases (~5 min on 2 cores)
    python benchmarks/shares.py --quick    # smoke run: 2 cases, fewer steps (< 1 min)

Each case runs N gloo ranks on the CPU (spawned processes, 1 intra-op thread each). Rank r has a
``SimulatedDevice`` with ``CAPACITIES_MIB[r]`` of memory; all ranks train the same small CNN
(3x12x12 inputs) with SGD on a global batch of ``TARGET`` samples per optimizer step. Per case:

* **auto**: ``AutoAccumOptimizer(..., shares="auto", memory=device)``; each rank plans its own
  micro-batch from its own memory; shares are recomputed every ``share_interval`` (4) steps and
  take effect one step later (``share_lookahead=1``: batches come straight from a ``ShareSampler``,
  nothing is prefetched). Timed only after ``--warmup`` steps, by when the shares have settled.
* **equal at min micro**: Composer's policy: equal shares, every rank pinned
  (``micro_batch_size=``) to the smallest micro-batch that autoaccum planned over the ranks.
* **ideal**: global batch / sum over ranks of each rank's throughput measured *alone* (the other
  ranks wait in a barrier) at its own planned micro-batch: forward and backward only, so no
  gradient reduction, no optimizer step and no share rounding. A lower bound, not a target.

How rank r is made slower, two ways (a table each):

* ``slowdown``: ``SimulatedDevice(slowdown=s_r)`` sleeps ``s_r - 1`` times each op's wall time.
  There are only 2 CPU cores, so every rank gets a base slowdown of 4 (2 ranks) or 6 (3 ranks)
  times its speed ratio: each rank computes at most 1/4 (1/6) of its time and all ranks together
  need about half a core. The sleep is proportional to the op's *wall* time, though, so when the
  CPU is oversubscribed (other jobs on the machine, or the ranks themselves) every rank runs
  slower together than alone, and the ideal, measured alone, is optimistic.
* ``sleep``: the GPU's compute is a fixed sleep of ``SLEEP_S`` x speed ratio per sample (forward
  1/3, backward 2/3) in the model (``DeviceTime``), as a GPU kernel takes its time whatever the
  host CPU does; ``SimulatedDevice`` only limits memory. The small real CPU compute is all that
  CPU load still affects.

Time per global step: on rank 0, the wall time between the ends of consecutive ``opt.step`` calls
(each call is one whole optimizer step: this rank's share, the agreement, the gradient all-reduce,
SGD). The three measurements are interleaved in rounds (auto block, equal block, solo passes, the
order reversed every other round) so that a change in machine load hits all of them alike; the
table gives medians over all timed steps (solo: median throughput per rank).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoaccum  # noqa: E402

TARGET = 512  # global batch per optimizer step
IMAGE = 12
CAPACITIES_MIB = (24, 8, 4)  # rank r's simulated memory: the faster ranks have more
SLOWDOWN_BASE = {2: 4, 3: 6}  # "slowdown" mode: s_r = base x speed ratio
SLEEP_S = 0.5e-3  # "sleep" mode: seconds of simulated GPU time per sample at speed ratio 1
SHARE_INTERVAL = 4
RESULTS = ROOT / "benchmarks" / "results" / "shares.md"


@dataclass(frozen=True)
class Case:
    mode: str  # "slowdown" or "sleep"
    ratios: tuple[int, ...]  # rank r is ratios[r] times slower than the fastest

    @property
    def world(self) -> int:
        return len(self.ratios)

    @property
    def ratio(self) -> str:
        return ":".join(str(r) for r in self.ratios)

    def slowdown(self, rank: int) -> float:
        if self.mode != "slowdown":
            return 1.0
        return float(SLOWDOWN_BASE[self.world] * self.ratios[rank])

    def sleep_per_sample(self, rank: int) -> float:
        return SLEEP_S * self.ratios[rank] if self.mode == "sleep" else 0.0

    @property
    def speed(self) -> str:
        if self.mode == "slowdown":
            return "slowdowns " + ",".join(f"{self.slowdown(r):g}" for r in range(self.world))
        return "ms/sample " + ",".join(
            f"{self.sleep_per_sample(r) * 1e3:g}" for r in range(self.world))


RATIOS = [(1, 1), (1, 2), (1, 4), (1, 1, 1), (1, 1, 2), (1, 2, 4)]
CASES = [Case(mode, r) for mode in ("slowdown", "sleep") for r in RATIOS]
QUICK_CASES = [Case("slowdown", (1, 2)), Case("sleep", (1, 1, 2))]


class DeviceTime(nn.Module):
    """A GPU's compute time, as a sleep: ``per_sample_s / 3`` per sample in forward and twice that
    in backward, whatever the CPU is doing."""

    def __init__(self, per_sample_s: float) -> None:
        super().__init__()
        self.per_sample_s = per_sample_s

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.per_sample_s > 0:
            time.sleep(self.per_sample_s / 3 * len(h))
            if h.requires_grad:
                h.register_hook(self._backward)
        return h

    def _backward(self, grad: torch.Tensor) -> None:
        time.sleep(self.per_sample_s * 2 / 3 * len(grad))


def make_model(per_sample_s: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), DeviceTime(per_sample_s),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (IMAGE // 4) ** 2, 10),
    )


def balanced(n: int, limit: int) -> list[int]:
    """``n`` samples in the fewest micro-batches of at most ``limit``, sizes within one."""
    k = -(-n // limit)
    return [n // k + (i < n % k) for i in range(k)]


# ------------------------------------------------------------------------------ one rank of a case
def run_rank(rank: int, world: int, case: Case, opts: dict[str, int]) -> dict[str, Any]:
    slowdown = case.slowdown(rank)
    per_sample_s = case.sleep_per_sample(rank)
    capacity = CAPACITIES_MIB[rank] * 2**20
    warmup, rounds, block = opts["warmup"], opts["rounds"], opts["block"]
    steps = warmup + rounds * block + 2
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(TARGET * steps, 3, IMAGE, IMAGE, generator=g)
    y_all = torch.randint(0, 10, (TARGET * steps,), generator=g)

    def build(shares: str, micro: int | None) -> tuple[Any, nn.Module, Any]:
        model = make_model(per_sample_s)
        device = autoaccum.SimulatedDevice(capacity_bytes=capacity, slowdown=slowdown)
        opt = autoaccum.AutoAccumOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.01), target_batch_size=TARGET,
            shares=shares, micro_batch_size=micro, memory=device)
        opt.share_interval, opt.share_lookahead = SHARE_INTERVAL, 1
        batches = iter(autoaccum.ShareSampler(len(x_all), opt, shuffle=True, seed=0))
        return opt, model, batches

    # This rank's busy time in a step: from the step() call to the end of its last backward (the
    # first layer's gradient is computed last); the rest of the step is waiting and syncing.
    backward_done = [0.0]

    def note_backward_done(_: torch.Tensor) -> None:
        backward_done[0] = time.perf_counter()

    def run_block(opt: Any, model: nn.Module, batches: Any, n: int, times: list[float],
                  busy: list[float] | None = None) -> None:
        def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(model(batch[0]), batch[1])

        dist.barrier()
        last = time.perf_counter()
        for _ in range(n):
            idx = next(batches)
            start = time.perf_counter()
            opt.step(loss_fn, (x_all[idx], y_all[idx]))
            now = time.perf_counter()
            times.append(now - last)
            if busy is not None:
                busy.append(backward_done[0] - start)
            last = now

    # auto: warm up until the shares have settled; the plan made at equal shares is the one
    # Composer's policy would pin (its minimum over ranks).
    auto, auto_model, auto_batches = build("auto", None)
    auto_model[0].weight.register_post_accumulate_grad_hook(note_backward_done)
    run_block(auto, auto_model, auto_batches, warmup, [])
    planned = auto.plan.micro_batch_size or TARGET // world
    micros: list[int] = [0] * world
    dist.all_gather_object(micros, planned)
    equal, equal_model, equal_batches = build("equal", min(micros))
    run_block(equal, equal_model, equal_batches, 2, [])

    # ideal: this rank alone, forward + backward at its own micro-batch (memory not enforced)
    solo_model = make_model(per_sample_s)
    solo_device = autoaccum.SimulatedDevice(capacity_bytes=2**40, slowdown=slowdown)
    solo_samples = TARGET // world

    def solo_pass() -> float:
        start = time.perf_counter()
        with solo_device.active(solo_model.parameters()):  # exiting sleeps the rest of the debt
            lo = 0
            for b in balanced(solo_samples, planned):
                loss = F.cross_entropy(solo_model(x_all[lo:lo + b]), y_all[lo:lo + b])
                (loss * (b / solo_samples)).backward()
                lo += b
        seconds = time.perf_counter() - start
        solo_model.zero_grad(set_to_none=True)
        return solo_samples / seconds

    rates: list[float] = []

    def solo_round() -> None:
        for r in range(world):
            dist.barrier()
            if r == rank:
                rates.append(solo_pass())
            dist.barrier()

    solo_round()  # warm-up
    rates.clear()
    auto_times: list[float] = []
    auto_busy: list[float] = []
    equal_times: list[float] = []
    auto_shares_start = len(auto.history)
    for i in range(rounds):
        parts = [
            lambda: run_block(auto, auto_model, auto_batches, block, auto_times, auto_busy),
            lambda: run_block(equal, equal_model, equal_batches, block, equal_times),
            solo_round,
        ]
        for part in parts if i % 2 == 0 else parts[::-1]:
            part()
    shares = [rec.samples for rec in auto.history[auto_shares_start:]]
    return {
        "auto_times": auto_times, "equal_times": equal_times, "rate": statistics.median(rates),
        "planned": planned, "pinned": min(micros), "auto_shares": shares,
        "auto_busy": auto_busy,
        "oom": auto.oom_events + equal.oom_events,
    }


def entry(rank: int, world: int, init: str, queue: Any, case: Case, opts: dict[str, int]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        queue.put((rank, "ok", run_rank(rank, world, case, opts)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_case(case: Case, opts: dict[str, int], timeout: float = 400) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=entry, args=(r, case.world, init, queue, case, opts))
                 for r in range(case.world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            for _ in range(case.world):
                rank, status, value = queue.get(timeout=timeout)
                if status != "ok":
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                results[rank] = value
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(case.world)]


# ------------------------------------------------------------------------------ report
def summarize(case: Case, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    auto_ms = statistics.median(ranks[0]["auto_times"]) * 1e3
    equal_ms = statistics.median(ranks[0]["equal_times"]) * 1e3
    rates = [r["rate"] for r in ranks]
    ideal_ms = TARGET / sum(rates) * 1e3
    return {
        "case": case, "auto": auto_ms, "equal": equal_ms, "ideal": ideal_ms,
        "planned": [r["planned"] for r in ranks], "pinned": ranks[0]["pinned"],
        "shares": [round(statistics.median(r["auto_shares"])) for r in ranks],
        "ideal_shares": [round(TARGET * r / sum(rates)) for r in rates],
        "rates": rates, "oom": sum(r["oom"] for r in ranks),
        "steps": len(ranks[0]["auto_times"]),
        # per timed auto step: the slowest rank's busy time, and how far apart the ranks were
        "busy": statistics.median(max(b) for b in zip(*(r["auto_busy"] for r in ranks))) * 1e3,
        "spread": statistics.median(
            max(b) - min(b) for b in zip(*(r["auto_busy"] for r in ranks))) * 1e3,
    }


MODE_TITLES = {
    "slowdown": "Speed from `SimulatedDevice(slowdown=base x ratio)` (base 4 for 2 ranks, 6 for 3)",
    "sleep": f"Speed from a fixed sleep of {SLEEP_S * 1e3:g} ms x ratio per sample "
             "(`DeviceTime`; `SimulatedDevice` for memory only)",
}


def goal(rows: list[dict[str, Any]]) -> str:
    two = [r for r in rows if r["case"].ratio in ("1:2", "1:1:2")]
    within = all(r["auto"] <= 1.1 * r["ideal"] for r in rows)
    faster = all(r["equal"] >= 1.3 * r["auto"] for r in two)
    speedups = ", ".join(f"{r['case'].ratio}: {r['equal'] / r['auto']:.2f}x" for r in two)
    worst = max(r["auto"] / r["ideal"] for r in rows)
    return (f"Goal: auto within 10% of the ideal in every case: {'yes' if within else 'no'} "
            f"(worst auto/ideal {worst:.3f}); auto at least 1.3x faster than the equal split at "
            f"1:2: {'yes' if faster else 'no'} ({speedups or 'not run'}).")


def render(rows: list[dict[str, Any]], command: str, wall: float, load: tuple[float, ...]) -> str:
    lines = [
        "# Step time with \"auto\" shares on ranks of unequal speed",
        "",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}  ",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, CPU, gloo, {os.cpu_count()} cores, 1 intra-op thread per "
        f"rank; global batch {TARGET}; run took {wall:.0f} s wall; load average at the start "
        f"{load[0]:.2f} (1 min), {load[1]:.2f} (5 min): other jobs shared the machine.",
    ]
    for mode, title in MODE_TITLES.items():
        part = [r for r in rows if r["case"].mode == mode]
        if not part:
            continue
        lines += [
            "", f"## {title}", "",
            "| ranks | speed ratio | auto ms/step | equal-at-min-micro ms/step | ideal ms/step "
            "| auto/ideal | equal/auto |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in part:
            c = r["case"]
            lines.append(
                f"| {c.world} | {c.ratio} | {r['auto']:.1f} | {r['equal']:.1f} | {r['ideal']:.1f} "
                f"| {r['auto'] / r['ideal']:.3f} | {r['equal'] / r['auto']:.2f} |")
        lines += ["", goal(part)]
    lines += [
        "",
        "## Details",
        "",
        "Per case: how speed was set (rank 0 first), simulated memory, the micro-batch each rank "
        "planned (at equal shares), the size pinned for the equal split, auto's shares (median "
        "over the timed steps) against shares proportional to the solo throughputs, each rank's "
        "solo throughput, and where an auto step's time goes: busy = the slowest rank's time "
        "from its `step()` call to the end of its last backward, spread = slowest minus fastest "
        "rank's busy time (the imbalance left), rest = step time minus busy (agreement, gradient "
        "all-reduce, SGD, Python); medians over the timed steps.",
        "",
        "| ranks | speed | memory MiB | planned micro | pinned micro | auto shares | ideal shares "
        "| solo samples/s | auto busy ms | spread ms | rest ms | OOMs |",
        "|---:|---|---|---|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["case"]
        mem = ",".join(str(m) for m in CAPACITIES_MIB[:c.world])
        lines.append(
            f"| {c.world} | {c.speed} | {mem} | {r['planned']} | {r['pinned']} | {r['shares']} "
            f"| {r['ideal_shares']} | {[round(x) for x in r['rates']]} | {r['busy']:.1f} "
            f"| {r['spread']:.1f} | {r['auto'] - r['busy']:.1f} | {r['oom']} |")
    floors = [
        f"{r['case'].mode} {r['case'].ratio}: equal {r['equal'] / r['ideal']:.2f}x, "
        f"auto {r['auto'] / r['ideal']:.2f}x"
        for r in rows if len(set(r["case"].ratios)) == 1
    ]
    if floors:
        lines += [
            "",
            "Reading it: at equal speeds, where equal shares are already right, both variants "
            f"still take longer than the ideal ({'; '.join(floors)}). That is what a step costs "
            "here beyond forward and backward (the agreement, the gradient all-reduce, SGD, "
            "Python per micro-batch; with 3 processes on 2 cores also waiting for a core), and "
            "auto pays it at every ratio: compare its busy time with the ideal.",
        ]
    lines += [
        "",
        "How it was measured:",
        "",
        f"* Model: a 3-layer CNN on 3x{IMAGE}x{IMAGE} random images, 10 classes, SGD(lr=0.01); "
        f"global batch {TARGET} per optimizer step; batches cut by `autoaccum.ShareSampler`; no "
        "DDP wrapper (in a multi-rank job autoaccum reduces the gradients itself).",
        "* ms/step: rank 0's wall time between the ends of consecutive `opt.step` calls (one call "
        "= one whole optimizer step on every rank), median over "
        f"{rows[0]['steps'] if rows else 0} timed steps per variant. auto is timed only after "
        f"its warm-up steps (shares recomputed every {SHARE_INTERVAL} steps, in force 1 step "
        "later), by when the shares have settled; they keep being recomputed while timed.",
        "* equal-at-min-micro: Composer's policy: equal shares and `micro_batch_size` pinned to "
        "the smallest micro-batch autoaccum planned over the ranks.",
        "* ideal: global batch / sum of the ranks' throughputs, each measured alone (the others "
        "wait in a barrier) at its own planned micro-batch over an equal share, forward and "
        "backward only: no gradient all-reduce, optimizer step or share rounding, and no other "
        "rank competing for the CPU, so it is a lower bound.",
        "* The three are interleaved in rounds (auto block, equal block, solo passes; reversed "
        "every other round) so that load changes on the shared machine hit all of them alike.",
        "* slowdown mode: `SimulatedDevice(slowdown=s)` sleeps (s - 1) x each op's wall time. With "
        "2 CPU cores every rank has a slowdown of at least 4 (2 ranks) or 6 (3 ranks), so each "
        "rank computes at most a quarter (a sixth) of its time and the ranks together need about "
        "half a core. The sleep scales with the op's wall time, so CPU contention (from the "
        "other ranks or other jobs) slows a rank by the same factor as its compute: ranks "
        "running together are slower than alone, which the ideal does not see.",
        "* sleep mode: the speed is a fixed sleep per sample in the model (forward 1/3, backward "
        "2/3), like a GPU kernel whose time does not depend on the host CPU; SimulatedDevice "
        "only limits memory (slowdown 1). Only the small real CPU compute still feels the load.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 cases, few steps (smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"markdown output (default: {RESULTS.relative_to(ROOT)}; "
                             "--quick writes nothing unless given)")
    args = parser.parse_args()
    if args.quick:
        cases, opts = QUICK_CASES, {"warmup": 10, "rounds": 2, "block": 3}
    else:
        cases, opts = CASES, {"warmup": 14, "rounds": 5, "block": 4}
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    load = os.getloadavg()
    start = time.perf_counter()
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        row = summarize(case, run_case(case, opts))
        rows.append(row)
        print(f"{case.mode:>8} {case.world} ranks {case.ratio:>6}: auto {row['auto']:7.1f} ms, "
              f"equal {row['equal']:7.1f} ms, ideal {row['ideal']:7.1f} ms, shares {row['shares']} "
              f"(ideal {row['ideal_shares']}), micro {row['planned']} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    command = "python benchmarks/shares.py" + (" --quick" if args.quick else "")
    text = render(rows, command, time.perf_counter() - start, load)
    print()
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}")


if __name__ == "__main__":
    main()
