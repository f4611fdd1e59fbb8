"""Train with 🤗 Accelerate and autoaccum: Accelerate prepares the model and the data, autoaccum
makes every optimizer step exactly --target-batch-size samples, in micro-batches that fit.

    python examples/accelerate_recipe.py                           # one process
    torchrun --nproc-per-node 2 examples/accelerate_recipe.py      # two processes (gloo on CPU)
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_recipe.py  # GPUs, or CPU

The recipe, in four rules:

1. `accelerator.prepare` gets the model and the data loader, never the optimizer: an
   AcceleratedOptimizer steps and zeroes on Accelerate's own accumulation schedule and applies
   the GradScaler itself, next to autoaccum.
2. `prepare_optimizer(accelerator, optimizer, model=model, target_batch_size=...)` builds the
   AutoAccumOptimizer: the prepared (DDP) model, the accelerator's GradScaler under fp16, and every
   loss_fn call inside `accelerator.autocast()`.
3. The loop body is `opt.step(loss_fn, batch)`: no `accelerator.backward`, no
   `accelerator.accumulate`, no `zero_grad`. `opt.flush()` ends an epoch.
4. The LR scheduler is not prepared either: it steps in a post-step hook, once per optimizer step.

Without CUDA each process gets a SimulatedDevice of --simulate-mem-mib so that the plan splits a
loader batch into several micro-batches, as a small GPU would. The task is synthetic and learnable
(noisy class prototypes), so the loss falls within the default run.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from torch import nn

import autoaccum
from autoaccum.integrations.accelerate import prepare_optimizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--target-batch-size", type=int, default=1024,
                    help="samples per optimizer step, over all processes")
parser.add_argument("--loader-batch-size", type=int, default=256, help="per process")
parser.add_argument("--num-samples", type=int, default=8192)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--tokens", type=int, default=32)
parser.add_argument("--features", type=int, default=16)
parser.add_argument("--classes", type=int, default=8)
parser.add_argument("--hidden", type=int, default=128)
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--max-grad-norm", type=float, default=1.0)
parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                    help="through the accelerator's autocast; fp16 needs a GPU (default: "
                         "accelerate launch's --mixed_precision, else bf16)")
parser.add_argument("--simulate-mem-mib", type=float, default=6.0,
                    help="simulated device memory per process without CUDA; 0 = off")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# -- the accelerator: device, processes (DDP), mixed precision ------------------------------------
accelerator = Accelerator(
    cpu=not torch.cuda.is_available(),
    mixed_precision=args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "bf16"),
    # Every sample exactly once: by default Accelerate repeats samples to even out the last batches.
    dataloader_config=DataLoaderConfiguration(even_batches=False),
)
torch.manual_seed(args.seed)  # the same initial model on every process

# -- data: a synthetic task with something to learn --------------------------------------------
# Each sample is a short sequence (--tokens x --features): a class prototype, the same for every
# token, under Gaussian noise twice its size. The label is the class.
g = torch.Generator().manual_seed(args.seed)
labels = torch.randint(args.classes, (args.num_samples,), generator=g)
prototypes = 0.5 * torch.randn(args.classes, args.features, generator=g)
inputs = prototypes[labels][:, None, :] + torch.randn(
    args.num_samples, args.tokens, args.features, generator=g)
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(inputs, labels), batch_size=args.loader_batch_size,
    shuffle=True, generator=torch.Generator().manual_seed(args.seed),
)


class TokenMLP(nn.Module):
    """An MLP on every token, mean-pooled, then a linear classifier: activations grow with
    tokens x hidden per sample, so a micro-batch's memory is mostly activations, as in real
    models (an MLP on flat vectors would be mostly weights)."""

    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x).mean(1))


model = TokenMLP(args.features, args.hidden, args.classes)
# Rule 1: the model and the loader, not the optimizer. (For loader batches larger than the device
# holds, use accelerator.prepare_data_loader(loader, device_placement=False): host batches.)
model, loader = accelerator.prepare(model, loader)

# -- rule 2: the optimizer, built from the accelerator -----------------------------------------
on_gpu = accelerator.device.type == "cuda"
memory = None
if not on_gpu and args.simulate_mem_mib > 0:
    memory = autoaccum.SimulatedDevice(capacity_bytes=int(args.simulate_mem_mib * 2**20))
opt = prepare_optimizer(
    accelerator,
    torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True),
    model=model,
    target_batch_size=args.target_batch_size,
    max_grad_norm=args.max_grad_norm,
    memory=memory,  # None on a GPU: its real free memory
)
# Rule 4: the scheduler steps once per optimizer step.
total_steps = math.ceil(args.num_samples / args.target_batch_size) * args.epochs
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps)
opt.register_step_post_hook(lambda *_: sched.step())


def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The mean loss of one micro-batch (already on the device, inside accelerator.autocast)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


# -- rule 3: the loop ------------------------------------------------------------------------------
accelerator.print(
    f"{accelerator.num_processes} process(es) on {accelerator.device}, mixed precision "
    f"{accelerator.mixed_precision}, memory {memory}; {args.num_samples} samples x {args.epochs} "
    f"epochs -> {total_steps} optimizer steps of {args.target_batch_size}"
)
step_losses: dict[int, float] = {}  # this process's mean training loss of each optimizer step
running_sum: torch.Tensor | float = 0.0
running_n = 0
samples_seen = 0
start = time.perf_counter()
model.train()
for _epoch in range(args.epochs):
    for x, y in loader:
        before, lr = opt.optimizer_steps, sched.get_last_lr()[0]
        loss = opt.step(loss_fn, (x, y))  # forward, backward, a step whenever one is full
        running_sum, running_n = running_sum + loss * len(y), running_n + len(y)
        samples_seen += len(y)
        if opt.optimizer_steps == before:
            continue
        step_losses[opt.optimizer_steps] = float(running_sum) / running_n  # one sync per step
        running_sum, running_n = 0.0, 0
        record = opt.history[-1]
        accelerator.print(
            f"step {opt.optimizer_steps:3d}/{total_steps}: "
            f"loss {step_losses[opt.optimizer_steps]:.3f}"
            f", {record.accumulation_steps} micro-batch(es) of up to {record.micro_batch_size}"
            f" on process 0, lr {lr:.2e}"
        )
    if opt.flush() and running_n:  # the epoch's last, partial step
        step_losses[opt.optimizer_steps] = float(running_sum) / running_n
    running_sum, running_n = 0.0, 0
wall = time.perf_counter() - start

# -- summary: totals over all processes ------------------------------------------------------
totals = accelerator.reduce(
    torch.tensor([samples_seen, opt.oom_events], device=accelerator.device), reduction="sum"
)
accelerator.print(f"optimizer steps: {opt.optimizer_steps} (expected {total_steps})")
accelerator.print(f"samples seen:    {int(totals[0])} (all processes)")
accelerator.print(f"oom events:      {int(totals[1])}")
accelerator.print(f"final plan:      {opt.plan} (process 0)")
accelerator.print(f"wall time:       {wall:.1f} s")
if step_losses:
    first, last = min(step_losses), max(step_losses)
    accelerator.print(f"train loss:      {step_losses[first]:.3f} (step {first}) -> "
                      f"{step_losses[last]:.3f} (step {last}), process 0")
accelerator.end_training()
