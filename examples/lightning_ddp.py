"""Lightning + autoaccum: a fixed effective batch on any GPU (or CPU), also under DDP.

    python examples/lightning_ddp.py                              # one process (CPU or 1 GPU)
    torchrun --nproc-per-node 2 examples/lightning_ddp.py         # DDP: gloo on CPU, NCCL on GPUs
    python examples/lightning_ddp.py --precision bf16-mixed       # mixed precision

A student MLP learns the labels a fixed random teacher MLP gives to random inputs. Every
optimizer step uses exactly --target-batch-size samples over all ranks, whatever --batch-size the
loader uses and however many micro-batches each device needs: the LightningModule's
training_step is one `self.autoaccum_step(loss_fn, batch)`. Without CUDA each process trains on a
SimulatedDevice of --capacity-mib (a stand-in GPU whose memory autoaccum plans against, so you see
it accumulate); with CUDA autoaccum reads the GPU's real free memory.
"""

import argparse
import math
import os

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

import autoaccum
from autoaccum.integrations.lightning import AutoAccumModule

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--target-batch-size", type=int, default=2048,
                    help="samples per optimizer step, all ranks together")
parser.add_argument("--batch-size", type=int, default=1536, help="loader batch size per rank")
parser.add_argument("--samples", type=int, default=12000, help="training set size")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed (GPU)")
parser.add_argument("--capacity-mib", type=float, default=10.0,
                    help="simulated device memory per process when there is no CUDA")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# -- data: labels from a fixed random teacher, so the task is learnable ---------------------------
IN, CLASSES = 32, 4
g = torch.Generator().manual_seed(1234)
teacher = nn.Sequential(nn.Linear(IN, 64), nn.Tanh(), nn.Linear(64, CLASSES))
for p in teacher.parameters():
    p.requires_grad_(False)
    p.copy_(torch.randn(p.shape, generator=g) * 2 / p.shape[-1] ** 0.5)


def dataset(n: int, seed: int) -> torch.utils.data.TensorDataset:
    x = torch.randn(n, IN, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.TensorDataset(x, teacher(x).argmax(1))


cuda = torch.cuda.is_available()
train = torch.utils.data.DataLoader(dataset(args.samples, 1), batch_size=args.batch_size,
                                    shuffle=True, pin_memory=cuda)
val = torch.utils.data.DataLoader(dataset(2048, 2), batch_size=1024)


# -- the model: training_step is one autoaccum step -----------------------------------------------
class Student(AutoAccumModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                 nn.Linear(512, CLASSES))

    def loss_fn(self, batch):  # forward only: autoaccum runs backward, steps and zeroes
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self.autoaccum_step(self.loss_fn, batch)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        # Under DDP, configure_autoaccum passes the DDP-wrapped module as model= (autoaccum runs
        # micro-batches under its no_sync and reduces once per step).
        memory = None if cuda else autoaccum.SimulatedDevice(int(args.capacity_mib * 2**20))
        opt = self.configure_autoaccum(torch.optim.AdamW(self.parameters(), lr=args.lr),
                                       target_batch_size=args.target_batch_size, memory=memory)
        # The scheduler steps once per optimizer step (not per loader batch); each epoch ends
        # with a flushed, shorter step.
        total = args.epochs * math.ceil(args.samples / args.target_batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_end(self):  # after autoaccum's end-of-epoch flush and the validation
        opt = self.autoaccum_optimizer
        share = opt.target_batch_size // self.trainer.world_size  # this rank's part of a step
        full = [h for h in opt.history if h.samples >= share]  # the flushed step is shorter
        m = self.trainer.callback_metrics
        self.print(f"epoch {self.current_epoch}: train loss {float(m['train_loss_epoch']):.3f}  "
                   f"val acc {float(m['val_acc']):.3f}  optimizer steps {opt.optimizer_steps}  "
                   f"micro-batch limit {opt.plan.micro_batch_size} "
                   f"({full[-1].accumulation_steps if full else 0} micro-batches a full step)  "
                   f"OOMs recovered {opt.oom_events}")


# -- the trainer: one process, or DDP when torchrun started us -----------------------------------
L.seed_everything(args.seed, verbose=False)
world = int(os.environ.get("WORLD_SIZE", 1))
trainer = L.Trainer(
    accelerator="gpu" if cuda else "cpu",
    devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    num_nodes=max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", 1))),
    strategy="ddp" if world > 1 else "auto",
    precision=args.precision,
    max_epochs=args.epochs,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)
model = Student()
trainer.fit(model, train, val)
opt = model.autoaccum_optimizer
if trainer.is_global_zero:
    print(f"done: {opt.optimizer_steps} optimizer steps (global_step {trainer.global_step}) of "
          f"{args.target_batch_size} samples, the last of each epoch shorter; "
          f"{opt.oom_events} OOMs recovered")
