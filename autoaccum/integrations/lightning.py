"""autoaccum inside a Lightning ``LightningModule`` (``pip install "autoaccum[lightning]"``).

Subclass :class:`AutoAccumModule` instead of ``LightningModule``; build the optimizer with
:meth:`~AutoAccumModule.configure_autoaccum` in ``configure_optimizers``; make ``training_step``
one call of :meth:`~AutoAccumModule.autoaccum_step`::

    import lightning.pytorch as L
    from autoaccum.integrations.lightning import AutoAccumModule

    class Model(AutoAccumModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(32, 4)

        def loss_fn(self, batch):                        # forward only: no backward, no step
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def training_step(self, batch, batch_idx):
            return self.autoaccum_step(self.loss_fn, batch)

        def configure_optimizers(self):
            opt = self.configure_autoaccum(torch.optim.AdamW(self.parameters(), lr=1e-3),
                                           target_batch_size=1024)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    L.Trainer(strategy="ddp", precision="bf16-mixed", max_epochs=3).fit(Model(), loader)

Guarantees (beyond the optimizer's own, see :class:`~autoaccum.AutoAccumOptimizer`):

* every optimizer step applies the mean gradient of exactly ``target_batch_size`` samples over
  all ranks, whatever the loader batch size and the micro-batches autoaccum picks; at the end of
  each epoch a short last step is applied (``flush``), never dropped;
* under ``strategy="ddp"`` the only gradient reduction is autoaccum's own, once per optimizer
  step (micro-batches run under DDP's ``no_sync``; Lightning's manual optimization keeps DDP's
  reducer from preparing for a backward after ``training_step``);
* ``trainer.global_step`` (and so ``max_steps``, ``log_every_n_steps``, ``every_n_train_steps``)
  counts optimizer steps, not loader batches; schedulers with ``interval="step"`` step once per
  optimizer step, at the moment it happens (also several times within one loader batch), those
  with ``interval="epoch"`` once per epoch after the flush;
* under ``precision="bf16-mixed"`` / ``"16-mixed"`` forward passes run under Lightning's autocast
  and backward passes outside it (PyTorch's recommendation); ``"16-mixed"``'s ``GradScaler`` is
  the optimizer's ``grad_scaler``;
* a checkpoint restores the plan, the counters and the samples of an unfinished step, for every
  rank of a DDP job (each rank's own, gathered into the checkpoint), so a resumed run continues
  exactly. Resume with the same number of ranks.

Training batches stay on the host until autoaccum moves each micro-batch to the device
(``autoaccum_keep_batch_on_host``), so a loader batch larger than the device can hold is fine.
Mid-epoch checkpoints resume exactly only with a resumable data loader (Lightning's own rule);
epoch-end checkpoints always do.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "autoaccum.integrations.lightning needs Lightning 2.2 or newer (import lightning.pytorch): "
        'pip install "autoaccum[lightning]"'
    ) from exc

from .. import checkpoint as checkpoint_entry
from ..batching import flatten_batch
from ..optimizer import AutoAccumOptimizer
from ._context import InContext, plan_metrics

__all__ = ["AutoAccumCallback", "AutoAccumModule", "find_autoaccum_optimizer"]

LossFn = Callable[[Any], Any]
_CHECKPOINT_KEY = "autoaccum_ranks"


def find_autoaccum_optimizer(trainer: pl.Trainer) -> AutoAccumOptimizer:
    """The one :class:`~autoaccum.AutoAccumOptimizer` of ``trainer.optimizers`` (the raw
    optimizer, not Lightning's ``LightningOptimizer`` wrapper), or a clear error."""
    found = [o for o in trainer.optimizers if isinstance(o, AutoAccumOptimizer)]
    if len(found) != 1:
        given = [type(o).__name__ for o in trainer.optimizers]
        raise RuntimeError(
            f"autoaccum's Lightning integration expects exactly one AutoAccumOptimizer among the "
            f"optimizers configure_optimizers returned; got {given or 'none'}. Return "
            "self.configure_autoaccum(torch.optim.AdamW(self.parameters()), target_batch_size=...) "
            "(optionally in a dict with an lr_scheduler)."
        )
    return found[0]


def _wrapped_model(trainer: pl.Trainer, module: pl.LightningModule) -> torch.nn.Module:
    """The module autoaccum must see: DDP's wrapper when there is one (its ``no_sync``)."""
    model = trainer.strategy.model
    return model if isinstance(model, DistributedDataParallel) else module


def _callbacks(trainer: pl.Trainer) -> list[Callback]:
    return list(getattr(trainer, "callbacks", []))  # set by Lightning, not declared on Trainer


def _max_steps_reached(trainer: pl.Trainer) -> bool:
    return trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps


class AutoAccumCallback(Callback):
    """The training-loop side of the integration; :class:`AutoAccumModule` attaches it.

    Pass one to ``Trainer(callbacks=[...])`` (or set ``AutoAccumModule.autoaccum_flush_each_epoch``)
    only to change ``flush_each_epoch``:

    ``flush_each_epoch=True`` (default): at the end of every epoch, the samples of an unfinished
    step make one short step of their own. ``False``: steps run across epoch boundaries (the
    stream of epochs is cut into steps of exactly ``target_batch_size``) and only the end of
    ``fit`` flushes. Either way, when ``fit`` stops at ``max_steps`` the unfinished step's
    samples stay pending (also in checkpoints) instead of making an extra step.

    Per fit it: keeps ``trainer.global_step`` equal to the optimizer steps taken, steps the LR
    schedulers (``interval="step"``: right after each optimizer step, through the optimizer's
    step hook, so a step that the fp16 ``GradScaler`` skips does not advance them; ``"epoch"``:
    after each epoch's flush; every ``frequency``-th time), flushes, and carries each rank's
    unfinished step through checkpoints. ``ReduceLROnPlateau`` needs a metric: step it yourself.
    """

    def __init__(self, flush_each_epoch: bool = True) -> None:
        self.flush_each_epoch = flush_each_epoch
        self._opt: AutoAccumOptimizer | None = None
        self._counted = 0  # optimizer steps already added to Lightning's step progress
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ fit lifecycle
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.automatic_optimization:
            raise RuntimeError(
                "autoaccum runs backward and the optimizer step itself: set "
                "self.automatic_optimization = False in the LightningModule (AutoAccumModule "
                "does), and call self.autoaccum_step(loss_fn, batch) in training_step"
            )
        opt = find_autoaccum_optimizer(trainer)
        wrapper = trainer.strategy.model
        if isinstance(wrapper, DistributedDataParallel) and opt.model is not wrapper:
            raise RuntimeError(
                "under DDP the AutoAccumOptimizer must be built with the DDP-wrapped module, "
                "model=self.trainer.strategy.model, so that it can run micro-batches under "
                "no_sync and reduce gradients once per step; self.configure_autoaccum(...) in "
                "configure_optimizers does this"
            )
        self._remove_hooks()
        self._opt = opt
        self._counted = opt.optimizer_steps  # restored by now when resuming
        applied = opt.optimizer_steps - opt.skipped_steps
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                warnings.warn(
                    "autoaccum does not step ReduceLROnPlateau (it needs a metric): call "
                    "self.lr_schedulers().step(metric) yourself, e.g. in on_validation_epoch_end",
                    stacklevel=2,
                )
            elif config.interval == "step":
                self._handles.append(opt.register_step_post_hook(
                    _StepScheduler(config.scheduler, config.frequency, applied)))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._sync_global_step(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_global_step(trainer)
        if self.flush_each_epoch:
            self._flush(trainer, pl_module)
        epoch = trainer.current_epoch + 1  # the epoch that is ending, counted from 1
        for config in trainer.lr_scheduler_configs:
            if (config.interval == "epoch" and epoch % config.frequency == 0
                    and not isinstance(config.scheduler,
                                       torch.optim.lr_scheduler.ReduceLROnPlateau)):
                config.scheduler.step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module)
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = self._opt
        if opt is None or _max_steps_reached(trainer):
            return
        # Every rank calls this (Lightning runs the same hooks everywhere): in a DDP job, flush
        # is a collective even on a rank with nothing pending.
        opt.flush()  # pending samples replay with the loss_fn they came with
        self._sync_global_step(trainer)

    def _sync_global_step(self, trainer: pl.Trainer) -> None:
        """Add the optimizer steps taken since the last call to Lightning's step progress, the
        counter behind ``trainer.global_step`` under manual optimization."""
        opt = self._opt
        if opt is None:
            return
        new = opt.optimizer_steps - self._counted
        if new <= 0:
            return
        try:
            progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        except AttributeError as exc:  # pragma: no cover - a Lightning layout we do not know
            raise RuntimeError(
                f"this Lightning version ({pl.__version__}) keeps its manual-optimization step "
                "progress elsewhere; autoaccum cannot keep trainer.global_step in line"
            ) from exc
        for _ in range(new):  # what LightningOptimizer.step does around each step
            progress.increment_ready()
            progress.increment_completed()
        self._counted = opt.optimizer_steps

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Runs on every rank (Lightning builds the checkpoint everywhere, rank 0 writes it):
        gather each rank's ``"autoaccum"`` entry (plan, counters, unfinished step's samples)."""
        states = checkpoint.get("optimizer_states")
        if not states or self._opt is None:
            return
        index = next((i for i, o in enumerate(trainer.optimizers) if o is self._opt), None)
        if index is None or "autoaccum" not in states[index]:
            return
        entry = states[index]["autoaccum"]
        world = trainer.world_size
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            entries: list[Any] = [None] * world
            torch.distributed.all_gather_object(entries, entry)
        else:
            entries = [entry]
        checkpoint[_CHECKPOINT_KEY] = {"optimizer_index": index, "ranks": entries}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads the optimizer state: put this rank's own entry in its place."""
        saved = checkpoint.get(_CHECKPOINT_KEY)
        states = checkpoint.get("optimizer_states")
        if saved is None or not states:
            return
        index, ranks = checkpoint_entry.rank_entries(saved, len(states))
        world, rank = trainer.world_size, trainer.global_rank
        if len(ranks) != world:
            pending = [r for r, e in enumerate(ranks) if e and e.get("pending")]
            if pending:
                raise ValueError(
                    f"the checkpoint was saved by {len(ranks)} ranks with samples of an "
                    f"unfinished step pending on ranks {pending}; this job has {world}. Resume "
                    "with the same number of ranks, or from a checkpoint taken after a flush "
                    "(flush_each_epoch=True: any epoch-end checkpoint)"
                )
            return  # nothing pending: rank 0's plan and counters serve every rank
        states[index]["autoaccum"] = ranks[rank]


class _StepScheduler:
    """A step post-hook: steps an LR scheduler after every ``frequency``-th applied step."""

    def __init__(self, scheduler: Any, frequency: int, applied: int) -> None:
        self.scheduler, self.frequency, self.applied = scheduler, frequency, applied

    def __call__(self, *_: Any) -> None:
        self.applied += 1
        if self.applied % self.frequency == 0:
            self.scheduler.step()


class AutoAccumModule(pl.LightningModule):
    """A ``LightningModule`` whose training steps are autoaccum's: see the module docstring.

    Sets ``automatic_optimization = False`` and attaches :class:`AutoAccumCallback` (through
    ``configure_callbacks``; if you override that, include ``super().configure_callbacks()``).
    Class attributes to override:

    ``autoaccum_log`` (True)
        ``autoaccum_step`` logs ``train_loss`` (per step and epoch mean, this rank's) and,
        whenever a call completed an optimizer step, of the last step completed:
        ``autoaccum/micro_batch_size`` (its largest micro-batch), ``autoaccum/accumulation_steps``
        (its micro-batch count), and ``autoaccum/oom_events``, ``autoaccum/optimizer_steps``.
    ``autoaccum_keep_batch_on_host`` (True)
        Training batches are not moved to the device by Lightning; autoaccum moves each
        micro-batch (use ``DataLoader(pin_memory=True)`` on CUDA). Validation is unaffected.
    ``autoaccum_flush_each_epoch`` (True)
        See :class:`AutoAccumCallback`.
    """

    autoaccum_log: bool = True
    autoaccum_keep_batch_on_host: bool = True
    autoaccum_flush_each_epoch: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self._autoaccum_checked: object | None = None

    def configure_autoaccum(self, optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer],
                            *args: Any, target_batch_size: int, **kwargs: Any
                            ) -> AutoAccumOptimizer:
        """``AutoAccumOptimizer(optimizer, *args, target_batch_size=..., **kwargs)`` for this
        trainer: ``model=`` the DDP-wrapped module under DDP (this module otherwise) and, under
        ``precision="16-mixed"``, ``grad_scaler=`` Lightning's scaler, unless given. Call it in
        ``configure_optimizers`` (Lightning wraps the model in DDP before calling that)."""
        trainer = self.trainer
        kwargs.setdefault("model", _wrapped_model(trainer, self))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            kwargs.setdefault("grad_scaler", scaler)
        return AutoAccumOptimizer(optimizer, *args, target_batch_size=target_batch_size, **kwargs)

    @property
    def autoaccum_optimizer(self) -> AutoAccumOptimizer:
        """The trainer's :class:`~autoaccum.AutoAccumOptimizer` (the raw optimizer: its
        ``plan``, ``oom_events``, ``history``, ``optimizer_steps``)."""
        return find_autoaccum_optimizer(self.trainer)

    def autoaccum_step(self, loss_fn: LossFn, batch: Any) -> torch.Tensor:
        """``opt.step(loss_fn, batch)`` for ``training_step``: forward and backward for every
        micro-batch, optimizer steps whenever ``target_batch_size`` samples are in. Returns the
        batch's mean loss (detached; token mode: its summed loss over its items).

        ``loss_fn(micro_batch)`` is the forward pass only, as for
        :meth:`autoaccum.AutoAccumOptimizer.step`. Under mixed precision it runs under
        Lightning's autocast and the backward passes outside it."""
        trainer = self.trainer
        self._check_callback(trainer)
        opt = self.autoaccum_optimizer
        plugin = trainer.precision_plugin
        before = opt.optimizer_steps
        if isinstance(plugin, MixedPrecision) and callable(loss_fn):
            fn: LossFn = InContext(plugin.forward_context, loss_fn)
            context: contextlib.AbstractContextManager[Any] = torch.autocast(plugin.device,
                                                                             enabled=False)
        else:
            fn, context = loss_fn, contextlib.nullcontext()
        with context:
            loss: torch.Tensor = opt.step(fn, batch)
        if self.autoaccum_log:
            self._autoaccum_log_step(opt, loss, batch, opt.optimizer_steps > before)
        return loss

    def _autoaccum_log_step(self, opt: AutoAccumOptimizer, loss: torch.Tensor, batch: Any,
                            stepped: bool) -> None:
        size = flatten_batch(batch).size
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        if stepped:
            metrics = {**plan_metrics(opt), "optimizer_steps": opt.optimizer_steps}
            for name, value in metrics.items():
                self.log(f"autoaccum/{name}", float(value), on_step=True, on_epoch=False,
                         batch_size=size)

    def _check_callback(self, trainer: pl.Trainer) -> None:
        if self._autoaccum_checked is trainer:
            return
        if not any(isinstance(c, AutoAccumCallback) for c in _callbacks(trainer)):
            raise RuntimeError(
                "AutoAccumCallback is not among trainer.callbacks: without it the last step of "
                "an epoch, LR schedulers and global_step would be wrong. If you override "
                "configure_callbacks, return [*super().configure_callbacks(), ...]"
            )
        self._autoaccum_checked = trainer

    # ------------------------------------------------------------------ Lightning hooks
    def configure_callbacks(self) -> list[Callback]:  # type: ignore[override]
        """:class:`AutoAccumCallback`, unless the Trainer was given one already."""
        if any(isinstance(c, AutoAccumCallback) for c in _callbacks(self.trainer)):
            return []
        return [AutoAccumCallback(flush_each_epoch=self.autoaccum_flush_each_epoch)]

    def transfer_batch_to_device(self, batch: Any, device: torch.device,
                                 dataloader_idx: int) -> Any:
        """Training batches stay on the host (autoaccum moves each micro-batch); others move."""
        if (self.autoaccum_keep_batch_on_host and self._trainer is not None
                and self.trainer.training):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_validation_model_zero_grad(self) -> None:
        """Lightning clears gradients before validation; in the middle of an unfinished step
        they hold accumulated samples, which autoaccum would otherwise have to replay."""
        opt = next((o for o in self.trainer.optimizers if isinstance(o, AutoAccumOptimizer)), None)
        if opt is not None and opt.pending_samples:
            return
        super().on_validation_model_zero_grad()
