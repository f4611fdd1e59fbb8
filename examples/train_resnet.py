"""Train torchvision's ResNet-18 with autoaccum: a fixed batch of 256 on any device.

    python examples/train_resnet.py                      # synthetic stripes, no download
    python examples/train_resnet.py --data ~/imagenette/train --image-size 128 --epochs 5
    python examples/train_resnet.py --squeeze 3:0.15 --release 6   # watch an OOM get absorbed

The training loop is one call per loader batch: `opt.step(loss_fn, batch)` cuts the batch into
micro-batches that fit in memory, accumulates their gradients and steps SGD every
`--target-batch-size` samples. Without CUDA, a SimulatedDevice stands in for a GPU so that the
plan (and an out-of-memory error, with --squeeze) can be watched on a laptop.

Without --data the images are synthetic and learnable: noisy stripes whose angle is the class (10
angles, 18 degrees apart), generated from a seeded generator. The training loss falls from about
2.5 to well under 1 within the default run, and the summary prints it for the first and last step.
"""

import argparse
import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import datasets, models, transforms
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import autoaccum

# Default simulated memory without CUDA. Measured with SimulatedDevice for ResNet-18, 3x32x32,
# float32 on CPU: parameters, gradients and SGD momentum take 3 x 42.7 MiB = 128 MiB resident,
# and one micro-batch of b samples peaks about 9 MiB + 0.42 MiB * b above that. The planner keeps
# 10% of free memory spare, so 0.17 GiB (174 MiB) leaves room for ~70 samples: the planner picks
# micro-batches of 64, 4 per step of 256 (0.15 GiB gives 32, 0.25 GiB a whole step at once).
DEFAULT_SIM_GIB = 0.17

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data",
                    help="ImageFolder directory (default: synthetic stripes, no download)")
parser.add_argument("--image-size", type=int, default=32)
parser.add_argument("--num-samples", type=int, default=4096, help="synthetic dataset size")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--target-batch-size", type=int, default=256)
parser.add_argument("--micro-batch-size", type=int, default=None, help="pin it (default: plan)")
parser.add_argument("--loader-batch-size", type=int, default=128)
parser.add_argument("--lr", type=float, default=0.02, help="peak LR of the one-cycle schedule")
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--simulate-gpu-mem", type=float, default=None, metavar="GIB",
                    help=f"simulated device memory in GiB; 0 = off "
                         f"(default: {DEFAULT_SIM_GIB} without CUDA, off with CUDA)")
parser.add_argument("--squeeze", metavar="STEP:GIB",
                    help="in the middle of optimizer step STEP (from 0), shrink the simulated "
                         "memory to GIB: the micro-batch runs out of memory and is halved")
parser.add_argument("--release", type=int, metavar="STEP",
                    help="at optimizer step STEP, give the squeezed memory back")
parser.add_argument("--log-every", type=int, default=5, help="loader batches per bar update")
parser.add_argument("--plot", metavar="PATH", help="save a plot of the run's history")
args = parser.parse_args()

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                    datefmt="%H:%M:%S")
log = logging.getLogger("train_resnet")
torch.manual_seed(args.seed)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# -- data: CPU batches; the optimizer moves each micro-batch to the device itself -------------
class Stripes(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Noisy stripes whose angle is the label: class k is at k * 18 degrees (10 classes), with a
    random phase and Gaussian noise. Sample i is drawn from a generator seeded by (seed, i), so
    the dataset is the same in every run and in every DataLoader worker, and needs no download."""

    num_classes = 10

    def __init__(self, size: int, image_size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        yy, xx = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
        self.grid = (yy.float(), xx.float())
        self.image_size = image_size
        self.period = image_size / 5  # five stripes across the image

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (), generator=g))
        angle = math.pi * label / self.num_classes
        phase = 2 * math.pi * float(torch.rand((), generator=g))
        yy, xx = self.grid
        wave = torch.sin(2 * math.pi / self.period * (xx * math.cos(angle) + yy * math.sin(angle))
                         + phase)
        n = self.image_size
        image = 0.5 + 0.3 * wave.expand(3, n, n) + 0.25 * torch.randn(3, n, n, generator=g)
        return (image - 0.5) / 0.25, label  # about zero mean, unit variance


dataset: Any
if args.data:
    normalize = transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    dataset = datasets.ImageFolder(args.data, transforms.Compose([
        transforms.RandomResizedCrop(args.image_size, scale=(0.35, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ]))
    num_classes = len(dataset.classes)
else:
    dataset = Stripes(args.num_samples, args.image_size, args.seed)
    num_classes = Stripes.num_classes
loader = torch.utils.data.DataLoader(
    dataset, batch_size=args.loader_batch_size, shuffle=True, num_workers=args.workers,
    pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    generator=torch.Generator().manual_seed(args.seed),
)

# -- model, memory, optimizer, schedule ---------------------------------------------------------
model = models.resnet18(num_classes=num_classes).to(device)

sim_gib = args.simulate_gpu_mem
if sim_gib is None and device.type == "cpu":
    sim_gib = DEFAULT_SIM_GIB
memory = autoaccum.SimulatedDevice(capacity_bytes=int(sim_gib * 2**30)) if sim_gib else None
if (args.squeeze or args.release is not None) and memory is None:
    parser.error("--squeeze/--release change a simulated device: add --simulate-gpu-mem GIB")
squeeze_step, squeeze_gib = None, 0.0
if args.squeeze:
    step_txt, _, gib_txt = args.squeeze.partition(":")
    squeeze_step, squeeze_gib = int(step_txt), float(gib_txt)

opt = autoaccum.AutoAccumOptimizer(
    torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4),
    target_batch_size=args.target_batch_size,
    model=model,
    memory=memory,
    micro_batch_size=args.micro_batch_size,
)
total_steps = math.ceil(len(dataset) / args.target_batch_size) * args.epochs
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps)
opt.register_step_post_hook(lambda *_: sched.step())  # once per optimizer step, not per batch

# Where we are inside the current optimizer step (for --squeeze / --release).
micro_in_step = {"step": -1, "count": 0}


def change_memory() -> None:
    """Squeeze or release the simulated memory at the optimizer steps asked for."""
    assert memory is not None
    step = opt.optimizer_steps
    if step != micro_in_step["step"]:
        micro_in_step.update(step=step, count=0)
    micro_in_step["count"] += 1
    if step == squeeze_step and micro_in_step["count"] == 2:  # not the first micro-batch
        log.info("squeeze: step %d, micro-batch 2: simulated memory %.3f -> %.3f GiB",
                 step, memory.capacity_bytes / 2**30, squeeze_gib)
        memory.capacity_bytes = int(squeeze_gib * 2**30)
    if step == args.release and micro_in_step["count"] == 1:
        log.info("release: step %d: simulated memory back to %.3f GiB", step, sim_gib)
        memory.capacity_bytes = int(sim_gib * 2**30)


def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch  # one micro-batch, already on the device
    if memory is not None:
        change_memory()
    return F.cross_entropy(model(images), labels)


# -- training -------------------------------------------------------------------------------------
log.info("device %s, memory %s, %d samples x %d epochs -> %d optimizer steps of %d",
         device, memory, len(dataset), args.epochs, total_steps, args.target_batch_size)
start = time.perf_counter()
samples_seen = 0
# The training loss of each optimizer step (step number -> loss): the sample-weighted mean of the
# returned losses of the loader batches whose samples completed that step (exact when the target
# is a multiple of the loader batch size). One host sync per step, none per batch.
step_losses: dict[int, float] = {}
running: dict[str, Any] = {"sum": 0.0, "samples": 0}  # since the last recorded step


def record_step_loss() -> None:
    """Close the running loss into ``step_losses`` once an optimizer step has finished."""
    step = opt.optimizer_steps
    if running["samples"] and step not in step_losses:
        step_losses[step] = float(running["sum"]) / running["samples"]
        record = opt.history[-1]
        log.info("step %d/%d: loss %.3f, %d micro-batches of up to %d samples", step,
                 total_steps, step_losses[step], record.accumulation_steps,
                 record.micro_batch_size)
        running.update(sum=0.0, samples=0)


model.train()
with logging_redirect_tqdm():
    for epoch in range(args.epochs):
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch")
        epoch_start, epoch_samples = time.perf_counter(), 0
        for i, (images, labels) in enumerate(bar):
            steps_before = opt.optimizer_steps
            loss = opt.step(loss_fn, (images, labels))  # forward, backward, and a step when due
            samples_seen += len(labels)
            epoch_samples += len(labels)
            running["sum"] = running["sum"] + loss * len(labels)  # on the device, no sync
            running["samples"] += len(labels)
            if opt.optimizer_steps != steps_before:
                record_step_loss()
            if i % args.log_every == 0 or i == len(loader) - 1:
                plan = opt.plan
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",  # a host sync, like the per-step loss above
                    samples_s=f"{epoch_samples / (time.perf_counter() - epoch_start):.0f}",
                    micro=plan.micro_batch_size,
                    accum=plan.accumulation_steps,
                    lr=f"{sched.get_last_lr()[0]:.3g}",
                )
        opt.flush()  # the last, partial step of the epoch
        record_step_loss()
        bar.close()
wall = time.perf_counter() - start

print(f"optimizer steps: {opt.optimizer_steps} (expected {total_steps})")
print(f"samples seen:    {samples_seen}")
print(f"oom events:      {opt.oom_events}")
print(f"final plan:      {opt.plan}")
print(f"wall time:       {wall:.1f} s ({samples_seen / wall:.0f} samples/s)")
if step_losses:
    first, last = min(step_losses), max(step_losses)
    print(f"train loss:      {step_losses[first]:.3f} (step {first}) -> "
          f"{step_losses[last]:.3f} (step {last})")
if args.plot:
    autoaccum.plot_history(opt.history, args.plot, losses=step_losses)
    print(f"plot saved to {args.plot}")
