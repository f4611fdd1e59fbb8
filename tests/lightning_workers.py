"""The LightningModule, data and plain reference of tests/test_integration_lightning.py, and its
DDP worker: ``torchrun --nproc-per-node 2 tests/lightning_workers.py OUT_DIR`` runs the scenarios
on gloo ranks and rank 0 saves what they produced to ``OUT_DIR/results.pt``."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

IN, HIDDEN, OUT = 8, 32, 4
LR, MOMENTUM = 0.1, 0.9


def make_net(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).to(dtype)


def make_data(n: int, seed: int = 1, dtype: torch.dtype = torch.float64
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: y is a fixed random linear map of x, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g, dtype=torch.float64)
    w = torch.randn(IN, OUT, generator=g, dtype=torch.float64)
    y = x @ w + 0.01 * torch.randn(n, OUT, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def lr_factor(step: int) -> float:
    return 1.0 / (1.0 + 0.2 * step)


def loader(n: int, batch_size: int, dtype: torch.dtype = torch.float64) -> Any:
    data = torch.utils.data.TensorDataset(*make_data(n, dtype=dtype))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def build_module(target: int, capacity: int | None = None, micro: int | None = None,
                 flush_each_epoch: bool = True, dtype: torch.dtype = torch.float64,
                 scheduler: str = "step") -> Any:
    import autoaccum
    from autoaccum.integrations.lightning import AutoAccumModule

    class Regression(AutoAccumModule):
        autoaccum_flush_each_epoch = flush_each_epoch

        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(dtype=dtype)
            self.calls: list[int] = []  # micro-batch sizes loss_fn saw
            self.autocast: list[bool] = []

        def loss_fn(self, batch: Any) -> torch.Tensor:
            x, y = batch
            self.calls.append(x.shape[0])
            self.autocast.append(torch.is_autocast_enabled("cpu"))
            return nn.functional.mse_loss(self.net(x).float() if dtype != torch.float64
                                          else self.net(x), y)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.autoaccum_step(self.loss_fn, batch)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> Any:
            memory = autoaccum.SimulatedDevice(capacity_bytes=capacity) if capacity else None
            opt = self.configure_autoaccum(
                torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM),
                target_batch_size=target, memory=memory, micro_batch_size=micro)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": scheduler}}

    return Regression()


def make_trainer(root: str, **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=2, enable_progress_bar=False, logger=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=root,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def ddp_order(n: int, epoch: int, seed: int = 0) -> torch.Tensor:
    """The order in which the DistributedSampler that Lightning puts under a training loader
    (shuffled, seed PL_GLOBAL_SEED or 0, set_epoch every epoch) deals ``n`` samples: rank r gets
    positions r, r + world, ...; with equal shares a step of ``target`` samples is then the
    consecutive positions [k * target, (k + 1) * target) of this order."""
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


def reference(n: int, target: int, orders: list[torch.Tensor], flush_each_epoch: bool = True
              ) -> list[torch.Tensor]:
    """A plain loop, one full batch per optimizer step, the samples of epoch e in the order
    ``orders[e]``: each epoch is cut into steps of ``target`` (a short last one), or, without
    per-epoch flushes, the stream of all epochs is. The LR scheduler steps after every step."""
    net = make_net()
    x, y = make_data(n)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    if flush_each_epoch:
        chunks = [o[s:s + target] for o in orders for s in range(0, len(o), target)]
    else:
        stream = torch.cat(orders)
        chunks = [stream[s:s + target] for s in range(0, len(stream), target)]
    for idx in chunks:
        opt.zero_grad()
        nn.functional.mse_loss(net(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in net.parameters()]


def sequential(n: int, epochs: int) -> list[torch.Tensor]:
    return [torch.arange(n)] * epochs


def _params(module: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.net.parameters()]


def ddp_main(out_dir: str) -> None:
    """Scenarios under strategy="ddp" on 2 gloo ranks (per rank: 22 samples in loader batches of
    3, 4 samples per rank per step of 8)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    n, target = 44, 8
    results: dict[str, Any] = {"world": world}
    ddp = dict(strategy="ddp", devices=world)

    # 1. exactness: two epochs, a short flushed step at the end of each, micro-batches of 3.
    module = build_module(target, micro=3)
    trainer = make_trainer(os.path.join(out_dir, "a"), **ddp)
    trainer.fit(module, loader(n, 3))
    opt = module.autoaccum_optimizer
    wrapped = module.autoaccum_optimizer.model
    results["exact"] = {
        "params": _params(module), "steps": opt.optimizer_steps, "global_step": trainer.global_step,
        "wrapped_is_ddp": isinstance(wrapped, torch.nn.parallel.DistributedDataParallel),
        "lr": opt.param_groups[0]["lr"], "micro": max(module.calls),
    }
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, _params(module))
    results["replicas_equal"] = all(
        all(torch.equal(a, b) for a, b in zip(gathered[0], g)) for g in gathered)

    # 2. bf16-mixed under DDP: steps, and every forward under autocast, every backward outside.
    module = build_module(target, micro=3, dtype=torch.float32)
    trainer = make_trainer(os.path.join(out_dir, "b"), precision="bf16-mixed", max_epochs=1, **ddp)
    trainer.fit(module, loader(n, 3, dtype=torch.float32))
    results["bf16"] = {"steps": module.autoaccum_optimizer.optimizer_steps,
                       "global_step": trainer.global_step, "autocast": module.autocast,
                       "finite": all(bool(p.isfinite().all()) for p in _params(module))}

    # 3. resume from an epoch-end checkpoint taken mid-step (steps cross epochs: 2 samples per
    # rank pending) against one uninterrupted run.
    root = os.path.join(out_dir, "c")
    module = build_module(target, micro=3, flush_each_epoch=False)
    ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = make_trainer(root, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt], **ddp)
    # Stop before on_train_end's flush: the checkpoint of epoch 0 is what a crash would leave.
    trainer.fit(module, loader(n, 3))
    path = os.path.join(root, "epoch=0.ckpt")
    saved = torch.load(path, weights_only=False, map_location="cpu")
    results["saved_pending"] = [sum(int(p["leaves"][0].shape[0]) for p in e["pending"])
                                for e in saved["autoaccum_ranks"]["ranks"]]
    module = build_module(target, micro=3, flush_each_epoch=False)
    trainer = make_trainer(root, max_epochs=3, **ddp)
    trainer.fit(module, loader(n, 3), ckpt_path=path)
    results["resumed"] = {"params": _params(module),
                          "steps": module.autoaccum_optimizer.optimizer_steps,
                          "global_step": trainer.global_step}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ddp_main(sys.argv[1])
