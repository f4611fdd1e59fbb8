"""DDP on a mixed fleet: each GPU plans its own micro-batch, faster GPUs take more of every step.

    torchrun --nproc-per-node 2 examples/ddp_mixed_fleet.py        # CPU: two simulated GPUs
    torchrun --nproc-per-node 2 examples/ddp_mixed_fleet.py --capacities-mib 64,24 --slowdowns 1,2
    torchrun --nproc-per-node 2 examples/ddp_mixed_fleet.py --shares equal   # compare: even split
    torchrun --nproc-per-node 4 examples/ddp_mixed_fleet.py        # on 4 real GPUs (NCCL)

Every optimizer step uses exactly `--target-batch-size` samples over all ranks. With
`--shares auto` each rank starts with an equal share; every `--share-interval` steps the ranks
gather the throughput each one measured and move samples toward the faster ones, so all ranks
finish their part of a step at about the same time. Independently, each rank plans its own
micro-batch from its own free memory, so a small GPU accumulates over more micro-batches than a
large one. A `ShareSampler` feeds each rank exactly its share of every step.

Without CUDA (or with --simulate) the ranks run on the CPU over gloo, each with a SimulatedDevice:
a stand-in GPU with `--capacities-mib` of memory that runs `--slowdowns` times slower (it sleeps).
With CUDA the same script uses NCCL, cuda:LOCAL_RANK and the GPU's real memory.
"""

import argparse
import gc
import logging
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import autoaccum

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--target-batch-size", type=int, default=512, help="global batch of a step")
parser.add_argument("--num-samples", type=int, default=8192, help="synthetic dataset size")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--image-size", type=int, default=16)
parser.add_argument("--shares", default="auto",
                    help="'auto', 'equal' or per-rank sample counts summing to the target: 384,128")
parser.add_argument("--share-interval", type=int, default=5,
                    help="steps between 'auto' share updates")
parser.add_argument("--simulate", action="store_true",
                    help="simulated GPUs on the CPU even when CUDA is available")
parser.add_argument("--capacities-mib", default="64,24",
                    help="simulated memory per rank in MiB (rank r takes entry r %% len)")
parser.add_argument("--slowdowns", default="1,2",
                    help="how many times slower each simulated GPU runs (rank r: entry r %% len)")
parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--log-every", type=int, default=4, help="optimizer steps per table row")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if "RANK" not in os.environ:
    parser.error("start it with torchrun, e.g. torchrun --nproc-per-node 2 " + sys.argv[0])

# -- the job: gloo + simulated GPUs on the CPU, or NCCL + real GPUs ------------------------------
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
local_rank = int(os.environ["LOCAL_RANK"])
simulate = args.simulate or not torch.cuda.is_available()
if simulate:
    device = torch.device("cpu")
    # '64,24': rank r takes entry r % 2 (a single value applies to every rank).
    capacity_mib = [float(v) for v in args.capacities_mib.split(",")]
    capacity_mib = capacity_mib[rank % len(capacity_mib)]
    slowdown = [float(v) for v in args.slowdowns.split(",")]
    slowdown = slowdown[rank % len(slowdown)]
    memory = autoaccum.SimulatedDevice(capacity_bytes=int(capacity_mib * 2**20),
                                       slowdown=slowdown, name=f"rank {rank}")
    device_txt = f"simulated {capacity_mib:g} MiB, {slowdown:g}x slower"
else:
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    memory = None  # autoaccum reads this GPU's free memory itself
    device_txt = torch.cuda.get_device_name(device)
dist.init_process_group("gloo" if simulate else "nccl")

# The library logs its decisions (micro-batch plans, share changes) on the "autoaccum" logger.
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format=f"[rank {rank}] %(name)s: %(message)s")
torch.manual_seed(args.seed)  # same data and initial weights on every rank


def main():
    # -- data: synthetic images, each a noisy copy of its class's random pattern (learnable) ------
    size, count = args.image_size, args.num_samples
    labels = torch.randint(0, 10, (count,))
    images = torch.randn(10, 3, size, size)[labels] + 2 * torch.randn(count, 3, size, size)
    dataset = torch.utils.data.TensorDataset(images, labels)

    # -- model and optimizer ----------------------------------------------------------------------
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 10),
    ).to(device)
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    shares = args.shares  # "auto", "equal" or explicit per-rank counts
    if shares not in ("auto", "equal"):
        shares = [int(v) for v in shares.split(",")]
    opt = autoaccum.AutoAccumOptimizer(
        torch.optim.AdamW(ddp.parameters(), lr=args.lr),
        target_batch_size=args.target_batch_size,  # global: summed over all ranks
        shares=shares,
        memory=memory,
        model=ddp,
    )
    opt.share_interval = args.share_interval
    # A share change takes effect this many steps later: more than the DataLoader reads ahead
    # (num_workers * prefetch_factor batches), so batches already cut keep their shares.
    opt.share_lookahead = 2 * args.workers + 1

    sampler = autoaccum.ShareSampler(dataset, opt, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")

    def loss_fn(batch):
        x, y = batch  # one micro-batch, already on this rank's device
        return F.cross_entropy(ddp(x), y)

    # Busy time of a step on this rank: from the step() call to the end of its last backward (the
    # first layer's gradient is the last one computed). The rest of a step is waiting for others.
    backward_done = [0.0]

    def note_backward_done(_param):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        backward_done[0] = time.perf_counter()

    model[0].weight.register_post_accumulate_grad_hook(note_backward_done)

    # -- training ---------------------------------------------------------------------------------
    last = {"reported": 0, "loss": 0.0, "busy_ms": 0.0}
    columns = "".join(f" | r{r} share   micro x n  busy ms" for r in range(world))

    def report():
        """Every --log-every steps: gather one row per rank; rank 0 prints them as a table line."""
        step = opt.optimizer_steps
        if step == last["reported"] or step % args.log_every:
            return
        last["reported"] = step
        rec = opt.history[-1]
        row = (rec.samples, rec.micro_batch_size, rec.accumulation_steps, last["busy_ms"],
               last["loss"], rec.seconds)
        rows = [None] * world
        dist.all_gather_object(rows, row)  # every rank reaches this at the same step
        if rank == 0:
            mean_loss = sum(r[0] * r[4] for r in rows) / max(sum(r[0] for r in rows), 1)
            cells = "".join(f" | {s:8d} {m:5d} x {n:<3d} {b:8.0f}" for s, m, n, b, _, _ in rows)
            print(f"{step - 1:4d}  {mean_loss:6.3f} {rows[0][5] * 1e3:8.0f}{cells}", flush=True)

    if rank == 0:
        print(f"{world} ranks, global batch {args.target_batch_size}, shares={args.shares}, "
              f"{len(sampler)} steps/epoch x {args.epochs} epochs", flush=True)
        print(f"step    loss  step ms{columns}", flush=True)
    start = time.perf_counter()
    ddp.train()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:  # this rank's share of one optimizer step
            t0 = time.perf_counter()
            loss = opt.step(loss_fn, (x, y))  # micro-batches, accumulation, sync and step
            last["busy_ms"] = (backward_done[0] - t0) * 1e3
            last["loss"] = loss.item()
            report()
        opt.flush()  # the epoch's last, partial step (if any); every rank calls it
        report()
    wall = time.perf_counter() - start

    # -- summary: every rank's history, printed by rank 0 -----------------------------------------
    everything = [None] * world
    dist.all_gather_object(everything, (device_txt, opt.history, opt.plan, opt.oom_events))
    if rank == 0:
        steps = len(opt.history)
        target = args.target_batch_size
        full = [i for i in range(steps) if sum(h[1][i].samples for h in everything) == target]
        full = full or list(range(steps))  # steps with the whole global batch (not a flush)
        first = [h[1][full[0]].samples for h in everything]
        final = [h[1][full[-1]].samples for h in everything]
        seconds = [rec.seconds for rec in opt.history]
        tail = max(1, min(10, steps // 4))
        print(f"\n{steps} optimizer steps, {sum(rec.samples for h in everything for rec in h[1])} "
              f"samples in {wall:.1f} s")
        print(f"shares: {first} -> {final} (step {full[0]} -> step {full[-1]})")
        early, late = statistics.median(seconds[:tail]), statistics.median(seconds[-tail:])
        print(f"median step time: first {tail} steps {early * 1e3:.0f} ms, "
              f"last {tail} steps {late * 1e3:.0f} ms")
        for r, (txt, hist, plan, ooms) in enumerate(everything):
            print(f"rank {r} ({txt}): share {final[r]}, last step's micro-batches "
                  f"{list(plan.micro_batch_sizes)} (limit {plan.micro_batch_size}), "
                  f"{sum(rec.samples for rec in hist)} samples, {ooms} OOM events")


main()
# Shut down with nothing of the run left: with gloo, a collective whose tensors are released by a
# gloo thread while Python exits aborts the process ("terminate called without an active
# exception"). So the DDP module (which holds its last all-reduce) is freed first, and the last
# collective is a barrier, which holds no tensors.
gc.collect()
dist.barrier()
dist.destroy_process_group()
