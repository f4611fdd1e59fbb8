"""FSDP2 on a mixed fleet: a sharded model, each GPU planning its own micro-batch and share.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/fsdp2_mixed_fleet.py
    ... examples/fsdp2_mixed_fleet.py --fsdp-mode per_micro     # FSDP's own gather schedule
    ... examples/fsdp2_mixed_fleet.py --shares equal            # compare: an even split
    ... examples/fsdp2_mixed_fleet.py --capacities-mib 12,4 --slowdowns 1,3
    torchrun --standalone --nproc-per-node 4 examples/fsdp2_mixed_fleet.py   # 4 real GPUs (NCCL)

A small transformer (token embedding, attention + MLP blocks, mean pool, classifier) is sharded
with FSDP2's ``fully_shard`` (every block a unit, and the root). ``AutoAccumOptimizer`` wraps the
AdamW built over the sharded parameters, so every optimizer step uses exactly
``--target-batch-size`` samples over all ranks, each rank holding only its shard of the
parameters, gradients and AdamW state between steps. With ``--shares auto`` the ranks start with
equal shares and every ``--share-interval`` steps move samples toward the faster ones; each rank
plans its own micro-batch from its own free memory (next to FSDP's gathered parameters in
``gather_once`` mode). A ``ShareSampler`` feeds each rank exactly its share of every step.

``--fsdp-mode gather_once`` (default) gathers every unit once per step and lets each rank run
its micro-batches on its own; ``per_micro`` is FSDP's own schedule (gathers per micro-batch, in
rounds the ranks agree), for models whose gathered parameters do not fit.

Without CUDA (or with --simulate) the ranks run on the CPU over gloo, each with a SimulatedDevice:
a stand-in GPU with ``--capacities-mib`` of memory (it counts this rank's local shards and the
units FSDP gathers) that runs ``--slowdowns`` times slower (it sleeps). With CUDA the same script
uses NCCL, cuda:LOCAL_RANK, ``fully_shard`` on a CUDA mesh and the GPU's real memory.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import autoaccum
from autoaccum.sharded import local_bytes

parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
parser.add_argument("--target-batch-size", type=int, default=128, help="global batch of a step")
parser.add_argument("--steps", type=int, default=32, help="optimizer steps to run")
parser.add_argument("--num-samples", type=int, default=2048, help="synthetic dataset size")
parser.add_argument("--seq-len", type=int, default=16, help="tokens per sample")
parser.add_argument("--vocab", type=int, default=32)
parser.add_argument("--classes", type=int, default=8)
parser.add_argument("--dim", type=int, default=64, help="model width")
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--layers", type=int, default=2, help="transformer blocks (FSDP units)")
parser.add_argument("--fsdp-mode", default="gather_once", choices=["gather_once", "per_micro"])
parser.add_argument("--shares", default="auto",
                    help="'auto', 'equal' or per-rank sample counts summing to the target: 96,32")
parser.add_argument("--share-interval", type=int, default=4,
                    help="steps between 'auto' share updates")
parser.add_argument("--simulate", action="store_true",
                    help="simulated GPUs on the CPU even when CUDA is available")
parser.add_argument("--capacities-mib", default="16,6",
                    help="simulated memory per rank in MiB (rank r takes entry r %% len)")
parser.add_argument("--slowdowns", default="1,2",
                    help="how many times slower each simulated GPU runs (rank r: entry r %% len)")
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--log-every", type=int, default=4, help="optimizer steps per table row")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if "RANK" not in os.environ:
    parser.error("start it with torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
                 + sys.argv[0])

# -- the job: gloo + simulated GPUs on the CPU, or NCCL + real GPUs ------------------------------
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
local_rank = int(os.environ["LOCAL_RANK"])
simulate = args.simulate or not torch.cuda.is_available()
memory: autoaccum.SimulatedDevice | None
if simulate:
    device = torch.device("cpu")
    # '16,6': rank r takes entry r % 2 (a single value applies to every rank).
    capacities = [float(v) for v in args.capacities_mib.split(",")]
    capacity_mib = capacities[rank % len(capacities)]
    slowdowns = [float(v) for v in args.slowdowns.split(",")]
    slowdown = slowdowns[rank % len(slowdowns)]
    memory = autoaccum.SimulatedDevice(capacity_bytes=int(capacity_mib * 2**20),
                                       slowdown=slowdown, name=f"rank {rank}")
    device_txt = f"simulated {capacity_mib:g} MiB, {slowdown:g}x slower"
else:
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    memory = None  # autoaccum reads this GPU's free memory itself
    device_txt = torch.cuda.get_device_name(device)
dist.init_process_group("gloo" if simulate else "nccl")
mesh = init_device_mesh(device.type, (world,))  # FSDP shards every unit over all ranks

# The library logs its decisions (micro-batch plans, share changes) on the "autoaccum" logger.
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format=f"[rank {rank}] %(name)s: %(message)s")
torch.manual_seed(args.seed)  # same data and initial weights on every rank


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, then an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (b, heads, t, d / heads)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class Classifier(nn.Module):
    """Tokens -> embedding + positions -> blocks -> mean over positions -> class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(args.vocab, args.dim)
        self.pos = nn.Parameter(0.02 * torch.randn(args.seq_len, args.dim))
        self.blocks = nn.ModuleList(Block(args.dim, args.heads) for _ in range(args.layers))
        self.norm = nn.LayerNorm(args.dim)
        self.head = nn.Linear(args.dim, args.classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    # -- data: each class is a random token sequence; a sample is it with 40% of tokens replaced
    labels = torch.randint(0, args.classes, (args.num_samples,))
    patterns = torch.randint(0, args.vocab, (args.classes, args.seq_len))
    noise = torch.randint(0, args.vocab, (args.num_samples, args.seq_len))
    tokens = torch.where(torch.rand(args.num_samples, args.seq_len) < 0.4, noise,
                         patterns[labels])
    dataset = torch.utils.data.TensorDataset(tokens, labels)

    # -- model: every block a FSDP unit, then the root (embedding, norm, head) -------------------
    model = Classifier().to(device)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    shares: Any = args.shares  # "auto", "equal" or explicit per-rank counts
    if shares not in ("auto", "equal"):
        shares = [int(v) for v in shares.split(",")]
    opt = autoaccum.AutoAccumOptimizer(
        torch.optim.AdamW(model.parameters(), lr=args.lr),  # built after fully_shard
        target_batch_size=args.target_batch_size,  # global: summed over all ranks
        shares=shares,
        memory=memory,
        model=model,  # the FSDP2 root: autoaccum picks its sharded gradient sync
        fsdp_mode=args.fsdp_mode,
    )
    opt.share_interval = args.share_interval
    opt.share_lookahead = 1  # no loader workers: batches are cut just before they are used

    sampler = autoaccum.ShareSampler(dataset, opt, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         pin_memory=device.type == "cuda")

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch  # one micro-batch, already on this rank's device
        return F.cross_entropy(model(x), y)

    def allocated() -> int:
        if memory is not None:
            return memory.allocated_bytes()
        return torch.cuda.memory_allocated(device)

    # What this rank holds at the inner optimizer step: its shards of the parameters, the
    # reduced gradients and the AdamW state (FSDP has resharded every unit by then).
    at_inner_step = [0]
    opt.optimizer.register_step_pre_hook(lambda *_: at_inner_step.__setitem__(0, allocated()))

    # -- training ---------------------------------------------------------------------------------
    last = {"reported": 0, "loss": 0.0}
    losses: list[float] = []
    columns = "".join(f" | r{r} share  micro x n" for r in range(world))

    def report() -> None:
        """Every --log-every steps: gather one row per rank; rank 0 prints them as a table line."""
        step = opt.optimizer_steps
        if step == last["reported"] or (step % args.log_every and step != args.steps):
            return
        last["reported"] = step
        rec = opt.history[-1]
        row = (rec.samples, rec.micro_batch_size, rec.accumulation_steps, last["loss"],
               rec.seconds)
        rows: list[Any] = [None] * world
        dist.all_gather_object(rows, row)  # every rank reaches this at the same step
        if rank == 0:
            mean_loss = sum(r[0] * r[3] for r in rows) / max(sum(r[0] for r in rows), 1)
            cells = "".join(f" | {s:8d} {m:4d} x {n:<3d}" for s, m, n, _, _ in rows)
            print(f"{step - 1:4d}  {mean_loss:6.3f} {rows[0][4] * 1e3:8.0f}{cells}", flush=True)

    if rank == 0:
        print(f"{world} ranks, FSDP2 fully_shard ({args.fsdp_mode}), {len(model.blocks) + 1} "
              f"units, {mib(full_bytes)} of parameters; global batch {args.target_batch_size}, "
              f"shares={args.shares}, {args.steps} steps", flush=True)
        print(f"step    loss  step ms{columns}", flush=True)
    start = time.perf_counter()
    resident: list[int] = []  # allocated between steps, after each step
    model.train()
    epoch = 0
    while opt.optimizer_steps < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:  # this rank's share of one optimizer step
            loss = opt.step(loss_fn, (x, y))  # micro-batches, accumulation, sync and step
            last["loss"] = loss.item()
            losses.append(last["loss"])
            resident.append(allocated())
            report()
            if opt.optimizer_steps >= args.steps:  # the same step on every rank
                break
        else:
            opt.flush()  # the epoch's last, partial step (if any); every rank calls it
            report()
        epoch += 1
    opt.flush()  # nothing is pending here; every rank calls it all the same
    wall = time.perf_counter() - start

    # -- summary: every rank's history and memory, printed by rank 0 ------------------------------
    local = local_bytes(model.parameters())  # this rank's parameter shards
    state = local_bytes(v for st in opt.optimizer.state.values()
                        for v in st.values())
    peaks = [rec.peak_bytes for rec in opt.history if rec.peak_bytes is not None]
    mine = (device_txt, opt.history, opt.plan, opt.oom_events, local, state, resident[-1],
            at_inner_step[0], max(peaks) if peaks else allocated())
    everything: list[Any] = [None] * world
    dist.all_gather_object(everything, mine)
    if rank == 0:
        steps = len(opt.history)
        target = args.target_batch_size
        full = [i for i in range(steps) if sum(h[1][i].samples for h in everything) == target]
        full = full or list(range(steps))  # steps with the whole global batch (not a flush)
        first = [h[1][full[0]].samples for h in everything]
        final = [h[1][full[-1]].samples for h in everything]
        seconds = [rec.seconds for rec in opt.history]
        tail = max(1, min(8, steps // 4))
        early = statistics.fmean(losses[:tail])
        late = statistics.fmean(losses[-tail:])
        # parameters + gradients + AdamW state over all ranks, divided by the world size
        sharded_total = (2 * full_bytes + sum(h[5] for h in everything)) / world
        print(f"\n{steps} optimizer steps, "
              f"{sum(rec.samples for h in everything for rec in h[1])} samples in {wall:.1f} s")
        print(f"loss: first {tail} steps {early:.3f} -> last {tail} steps {late:.3f}")
        print(f"shares: {first} -> {final} (step {full[0]} -> step {full[-1]})")
        print(f"median step time: first {tail} steps "
              f"{statistics.median(seconds[:tail]) * 1e3:.0f} ms, last {tail} steps "
              f"{statistics.median(seconds[-tail:]) * 1e3:.0f} ms")
        print(f"(params + grads + AdamW state) / world = {mib(sharded_total)} per rank "
              f"(unsharded: {mib(sharded_total * world)})")
        for r, (txt, hist, plan, ooms, par, st, res, inner, peak) in enumerate(everything):
            sizes = [rec.micro_batch_size for rec in hist if rec.samples]
            print(f"rank {r} ({txt}): share {first[r]} -> {final[r]}, micro-batches "
                  f"{min(sizes)}..{max(sizes)} over the run, last step "
                  f"{list(plan.micro_batch_sizes)}; {sum(rec.samples for rec in hist)} samples, "
                  f"{ooms} OOM events")
            print(f"  memory: {mib(inner)} at the optimizer step "
                  f"({inner / sharded_total:.2f} x (params+grads+state)/world), "
                  f"{mib(res)} between steps (parameter shards {mib(par)} + AdamW state "
                  f"{mib(st)}), peak {mib(peak)} while micro-batches ran")

main()
# Shut down with nothing of the run left in flight: the last collective is a barrier, which holds
# no tensors (a gloo collective whose tensors die while Python exits can abort the process).
gc.collect()
dist.barrier()
dist.destroy_process_group()
