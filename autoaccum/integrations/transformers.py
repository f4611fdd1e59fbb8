"""autoaccum inside a Hugging Face ``Trainer`` (``pip install "autoaccum[hf]"``).

Replace ``Trainer`` with :class:`AutoAccumTrainer` and give the effective batch instead of a
per-device batch and an accumulation count::

    from autoaccum.integrations.transformers import AutoAccumTrainer

    args = TrainingArguments(output_dir="out", learning_rate=3e-4, max_steps=1000, bf16=True)
    trainer = AutoAccumTrainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                               target_batch_size=256)        # samples per optimizer step
    trainer.train()

Each loader batch of the Trainer is one optimizer step: ``target_batch_size / world_size``
samples per rank (``per_device_train_batch_size`` is set to that, ``gradient_accumulation_steps``
stays 1). ``training_step`` hands the batch to :meth:`autoaccum.AutoAccumOptimizer.step`, which
cuts it into micro-batches that fit in memory, runs forward and backward for each, recovers from
out-of-memory errors and steps once. The Trainer keeps everything else: its loop, callbacks,
logging, evaluation, checkpoints, LR schedule and mixed precision.

Guarantees (beyond the optimizer's own, see :class:`~autoaccum.AutoAccumOptimizer`):

* every optimizer step applies the gradient of exactly ``target_batch_size`` samples over all
  ranks, whatever micro-batches autoaccum picks and after any OOM recovery; a short last batch of
  an epoch makes one short step of its own (as in a plain ``Trainer``), never dropped or merged;
* causal language models (the batch has ``labels`` of shape ``(batch, seq)``, the model is a
  causal LM, no ``compute_loss_func``/label smoothing/``compute_loss`` override) are trained in
  token mode: the step's loss is the sum over its label tokens ``!= -100`` divided by their count,
  counted up front, so a step equals one big batch. Other models use the model's mean loss
  (``compute_loss``), weighted by micro-batch size;
* ``state.global_step`` counts optimizer steps, and the LR scheduler advances exactly once per
  optimizer step (not after a step a ``GradScaler`` skipped, as in a plain ``Trainer``);
* ``TrainingArguments.max_grad_norm`` clips once per step, on the full gradient; the logged
  ``grad_norm`` is that step's norm before clipping. Logs also carry ``micro_batch_size`` (largest
  micro-batch of the last step), ``accumulation_steps`` and ``oom_events`` (total);
* ``bf16``/``fp16``: forward passes run under the accelerator's autocast, backward passes outside
  it; fp16's ``GradScaler`` is the accelerator's, used by autoaccum once per step;
* checkpoints hold autoaccum's ``state_dict`` (inner optimizer state, plan and counters) as the
  optimizer state, so ``train(resume_from_checkpoint=...)`` continues exactly, without probing
  memory again.

Training batches stay on the host until autoaccum moves each micro-batch to the device, so a loader
batch larger than the device can hold is fine.

Not supported (each raises a ValueError saying so): ``gradient_accumulation_steps != 1``,
``auto_find_batch_size``, DeepSpeed, the Trainer's FSDP, ``nn.DataParallel`` (several GPUs in one
process; launch with ``torchrun`` instead), tensor/context/sequence parallelism, and shares other
than ``"equal"`` (the Trainer's loader gives every rank the same batch size).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

try:
    from transformers import Trainer, TrainingArguments
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "autoaccum.integrations.transformers needs transformers and accelerate: "
        'pip install "autoaccum[hf]"'
    ) from exc

from .. import checkpoint
from ..arguments import check_memory, check_positive_int
from ..facade import InnerFacade
from ..losses import causal_lm_loss, count_causal_lm_items
from ..memory import MemoryBackend
from ..optimizer import AutoAccumOptimizer
from ._context import plan_metrics

__all__ = ["AutoAccumTrainer"]

log = logging.getLogger("autoaccum")

_DEFAULT_PER_DEVICE_BATCH = 8  # TrainingArguments' default per_device_train_batch_size


class _TrainerOptimizer(InnerFacade):
    """What the Trainer holds as its optimizer (inside accelerate's ``AcceleratedOptimizer``).

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's (so the Trainer's LR
    scheduler sets the learning rate autoaccum steps with). ``step()`` and ``zero_grad()`` do
    nothing: :meth:`AutoAccumTrainer.training_step` has already stepped and zeroed. The state dict
    is the :class:`~autoaccum.AutoAccumOptimizer`'s once it exists; one loaded before that (resume)
    loads the inner optimizer at once and keeps autoaccum's entry until :meth:`attach`.
    """

    def __init__(self, inner: Optimizer, target_batch_size: int) -> None:
        self.optimizer = inner
        self.target_batch_size = target_batch_size
        self.autoaccum: AutoAccumOptimizer | None = None
        self._stashed: dict[str, Any] | None = None  # the checkpoint's "autoaccum" entry

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        if self.autoaccum is not None:
            return self.autoaccum.state_dict()
        sd = self.optimizer.state_dict()
        if self._stashed is not None:
            sd["autoaccum"] = self._stashed
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.autoaccum is not None:
            self.autoaccum.load_state_dict(state_dict)
            return
        state_dict = dict(state_dict)
        own = state_dict.pop("autoaccum", None)
        if own is not None:
            saved = own.get("target_batch_size") if isinstance(own, Mapping) else None
            if saved != self.target_batch_size:
                raise ValueError(
                    f"the checkpoint was made with target_batch_size={saved}, this trainer has "
                    f"target_batch_size={self.target_batch_size}; resuming would change every "
                    f"step. Resume with AutoAccumTrainer(..., target_batch_size={saved})"
                )
            # Validated now, before the inner optimizer changes, and again when attached.
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            checkpoint.precheck_entry(own, target_batch_size=self.target_batch_size,
                                      device=params[0].device if params else torch.device("cpu"))
        self.optimizer.load_state_dict(state_dict)
        self._stashed = own

    def attach(self, opt: AutoAccumOptimizer) -> None:
        """From now on ``opt`` owns the state; a stashed checkpoint entry is applied to it."""
        if self._stashed is not None:
            # The inner optimizer is already loaded: hand its (live) state back with the entry.
            opt.load_state_dict({**self.optimizer.state_dict(), "autoaccum": self._stashed})
            self._stashed = None
        self.autoaccum = opt


def _find_facade(optimizer: Any) -> _TrainerOptimizer | None:
    """The facade inside the Trainer's optimizer wrappers (accelerate's, SageMaker's, ...)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, _TrainerOptimizer):
            return optimizer
        optimizer = optimizer.__dict__.get("optimizer") if hasattr(optimizer, "__dict__") else None
        seen += 1
    return None


class AutoAccumTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps each see exactly ``target_batch_size``
    samples (over all ranks), however they must be cut into micro-batches to fit in memory.

    Takes every ``Trainer`` argument, plus autoaccum's keywords:

    * ``target_batch_size`` (required): samples per optimizer step, all ranks together. It
      replaces ``gradient_accumulation_steps`` and ``auto_find_batch_size`` (both must stay at
      their defaults) and sets ``per_device_train_batch_size`` to ``target_batch_size /
      world_size``: one loader batch per rank is one optimizer step;
    * ``micro_batch_size``: None (default) plans it from memory; an int pins it;
    * ``memory``: a memory backend (None: CUDA memory for CUDA parameters, no limit on CPU;
      :class:`autoaccum.SimulatedDevice` for CPU runs);
    * ``shares``: only ``"equal"`` (the Trainer's loader gives every rank the same batch size).

    The :class:`~autoaccum.AutoAccumOptimizer` is built at the first training step, around the
    optimizer the Trainer created (or the one passed in ``optimizers=``) and with the model the
    Trainer trains (DDP-wrapped in a distributed job); :attr:`autoaccum_optimizer` is it. See the
    module's docstring for what is guaranteed.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        target_batch_size: int,
        micro_batch_size: int | None = None,
        memory: MemoryBackend | None = None,
        shares: str = "equal",
        **trainer_kwargs: Any,
    ) -> None:
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        share = _check_arguments(args, target_batch_size, micro_batch_size, memory, shares,
                                 trainer_kwargs.get("optimizers"))
        # The Trainer reads and writes its arguments; the caller's object is left as given.
        args = copy.copy(args)
        args.per_device_train_batch_size = share
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        ga = self.args.gradient_accumulation_steps
        if ga != 1:  # set by accelerator_config's gradient_accumulation_kwargs
            raise ValueError(
                f"AutoAccumTrainer plans gradient accumulation itself, but the accelerator "
                f"config sets gradient_accumulation_steps={ga} (gradient_accumulation_kwargs"
                "['num_steps']); expected 1. Remove num_steps from accelerator_config"
            )
        unsupported = [name for name, on in (
            ("DeepSpeed", self.is_deepspeed_enabled), ("FSDP", self.is_fsdp_enabled),
            ("tensor parallelism", _size(self, "get_tp_size") > 1),
            ("context parallelism", _size(self, "get_cp_size") > 1),
            ("sequence parallelism", _size(self, "get_sp_size") > 1),
        ) if on]
        if unsupported:
            raise ValueError(
                f"AutoAccumTrainer does not support {' and '.join(unsupported)} (configured for "
                "this run); it supports one device or DDP (torchrun / accelerate launch with "
                "multi-GPU). Use a plain Trainer for this setup, or AutoAccumOptimizer with "
                "FSDP2 (fully_shard) in your own loop"
            )
        self.target_batch_size = target_batch_size
        self.autoaccum_micro_batch_size = micro_batch_size
        self.autoaccum_memory = memory
        self._autoaccum_loss_fn: Callable[[Any], Any] | None = None

    # ------------------------------------------------------------------ public
    @property
    def autoaccum_optimizer(self) -> AutoAccumOptimizer | None:
        """The :class:`~autoaccum.AutoAccumOptimizer` (``plan``, ``oom_events``, ``history``,
        ...), or None before the first training step."""
        facade = _find_facade(self.optimizer)
        return facade.autoaccum if facade is not None else None

    @property
    def autoaccum_loss_mode(self) -> str | None:
        """``"token"`` (a causal LM's loss summed over label tokens, divided by the step's
        count) or ``"mean"`` (the model's mean loss); None before the first training step."""
        opt = self.autoaccum_optimizer
        if opt is None:
            return None
        return "token" if opt.count_items is not None else "mean"

    # ------------------------------------------------------------------ Trainer hooks
    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """The Trainer's optimizer (built as usual, or the one passed in ``optimizers=``),
        wrapped in the facade the Trainer steps, schedules and checkpoints."""
        current: Any = self.optimizer
        if _find_facade(current) is not None:  # a second train() call
            return current
        if isinstance(self.optimizer, AutoAccumOptimizer):
            raise TypeError(
                "AutoAccumTrainer builds the AutoAccumOptimizer itself; pass the inner optimizer "
                "in optimizers=(torch.optim.AdamW(model.parameters()), scheduler), and "
                "target_batch_size= (and micro_batch_size=, memory=) to AutoAccumTrainer"
            )
        inner = super().create_optimizer(model) if model is not None else super().create_optimizer()
        self.optimizer = _TrainerOptimizer(inner, self.target_batch_size)
        return self.optimizer

    def get_train_dataloader(self) -> Any:
        """The Trainer's loader, with batches left on the host: autoaccum moves each
        micro-batch to the device, so a full step's batch need not fit there. (Not when
        accelerate dispatches batches from rank 0, which needs them on the device.)"""
        accelerator = self.accelerator
        dispatch = getattr(getattr(accelerator, "dataloader_config", None), "dispatch_batches",
                           None)
        if dispatch or (dispatch is None and self.args.world_size > 1
                        and isinstance(self.train_dataset, torch.utils.data.IterableDataset)):
            return super().get_train_dataloader()
        placement = accelerator.device_placement
        accelerator.device_placement = False
        try:
            return super().get_train_dataloader()
        finally:
            accelerator.device_placement = placement

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One optimizer step on ``inputs`` (this rank's share of it), through autoaccum.

        ``num_items_in_batch`` is not used: in token mode autoaccum counts the step's label
        tokens itself (over all ranks). Returns the batch's mean loss (token mode: summed loss
        over its tokens), detached.
        """
        model.train()
        train_mode = getattr(self.optimizer, "train", None)
        if callable(train_mode):  # schedule-free optimizers
            train_mode()
        facade = _find_facade(self.optimizer)
        opt = facade.autoaccum if facade is not None else None
        if opt is None or opt.model is not model:
            opt = self._build_autoaccum(model, inputs, facade)
        batch = dict(inputs) if isinstance(inputs, Mapping) else inputs
        loss_fn = self._autoaccum_loss_fn
        skipped = opt.skipped_steps
        loss = opt.step(loss_fn, batch)
        if opt.pending_samples:
            # A short batch (the epoch's last): one short step of its own, before the Trainer's
            # model.zero_grad() could clear what it accumulated.
            opt.flush(loss_fn)
        if opt.grad_scaler is not None:
            # A step the GradScaler skipped must not advance the LR schedule (the Trainer asks
            # the accelerator, which asks its optimizer wrapper).
            for wrapper in getattr(self.accelerator, "_optimizers", ()):
                if hasattr(wrapper, "_is_overflow"):
                    wrapper._is_overflow = opt.skipped_steps > skipped
        return loss.detach()  # type: ignore[no-any-return]

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor | None:
        # autoaccum clipped the full gradient of the step, before its inner step; the gradients
        # are zeroed by now, so the Trainer must not clip (or measure) them again.
        opt = self.autoaccum_optimizer
        return opt.last_grad_norm if opt is not None else None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is not None:
            return grad_norm
        return self._clip_grad_norm(model)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs; training logs also get autoaccum's ``micro_batch_size`` (the
        largest micro-batch of the last step), ``accumulation_steps`` and ``oom_events``."""
        opt = self.autoaccum_optimizer
        if opt is not None and "loss" in logs:
            logs = {**logs, **plan_metrics(opt)}
        if start_time is None:
            super().log(logs)
        else:
            super().log(logs, start_time)

    # ------------------------------------------------------------------ internals
    def _build_autoaccum(self, model: nn.Module, inputs: Any,
                         facade: _TrainerOptimizer | None) -> AutoAccumOptimizer:
        """The AutoAccumOptimizer around the Trainer's optimizer, for ``model`` (as the Trainer
        wrapped it). Rebuilt, carrying its state, if the Trainer hands over another wrapper of
        the same model; a new optimizer (``model_init``, hyperparameter search) starts afresh."""
        if facade is None:
            raise RuntimeError(
                "AutoAccumTrainer's optimizer was replaced after create_optimizer (found "
                f"{type(self.optimizer).__name__}); override create_optimizer and call "
                "super().create_optimizer() so that the Trainer's optimizer stays autoaccum's"
            )
        token = self._token_mode(model, inputs)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            # autoaccum unscales, clips and steps through the scaler itself, once per step; the
            # Trainer's optimizer.step() must then be the facade's no-op, not scaler.step().
            wrapper: Any = self.optimizer
            while wrapper is not None and wrapper is not facade:
                if getattr(wrapper, "scaler", None) is scaler:
                    wrapper.scaler = None
                wrapper = getattr(wrapper, "optimizer", None)
        max_norm: float | None = self.args.max_grad_norm
        if max_norm is not None and not math.isfinite(max_norm):
            max_norm = None  # the Trainer's "measure, do not clip"; autoaccum only clips
        opt = AutoAccumOptimizer(
            facade.optimizer,
            target_batch_size=self.target_batch_size,
            micro_batch_size=self.autoaccum_micro_batch_size,
            memory=self.autoaccum_memory,
            model=model,
            grad_scaler=scaler,
            max_grad_norm=float(max_norm) if max_norm and max_norm > 0 else None,
            shares="equal",
            count_items=_count_label_tokens if token else None,
        )
        old = facade.autoaccum
        if old is not None:  # a later train() with another model wrapper: keep plan and state
            opt.load_state_dict(old.state_dict())
            facade.autoaccum = None
        facade.attach(opt)
        self._autoaccum_loss_fn = (self._token_loss_fn(model) if token
                                   else self._mean_loss_fn(model))
        log.info("autoaccum: target_batch_size=%d (%d per rank), %s mode",
                 self.target_batch_size, self.args.per_device_train_batch_size,
                 "token" if token else "mean")
        return opt

    def _token_mode(self, model: nn.Module, inputs: Any) -> bool:
        """Token mode: a causal LM trained on its own loss over ``labels`` (batch, seq)."""
        labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or "shift_labels" in inputs:
            return False
        if (self.compute_loss_func is not None or self.label_smoother is not None
                or type(self).compute_loss is not Trainer.compute_loss):
            return False  # the user's loss: its mean is what they asked for
        shifts = getattr(self, "_loss_shifts_labels", None)
        if isinstance(shifts, bool):
            return shifts
        unwrapped = self.accelerator.unwrap_model(model)
        config = getattr(unwrapped, "config", None)
        return (type(unwrapped).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                and not getattr(config, "is_encoder_decoder", False))

    def _token_loss_fn(self, model: nn.Module) -> Callable[[Any], Any]:
        def loss_fn(micro: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            inputs = dict(micro)
            labels = inputs.pop("labels")  # the model need not compute a mean loss we discard
            with self.compute_loss_context_manager():
                outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            return causal_lm_loss(logits, labels)

        return loss_fn

    def _mean_loss_fn(self, model: nn.Module) -> Callable[[Any], Any]:
        def loss_fn(micro: dict[str, Any]) -> torch.Tensor:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, micro)
            return loss  # type: ignore[return-value]

        return loss_fn


def _count_label_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    return count_causal_lm_items(batch["labels"])


def _size(trainer: Any, name: str) -> int:
    getter = getattr(trainer, name, None)
    try:
        return int(getter()) if callable(getter) else 1
    except Exception:  # a parallelism the installed version cannot report: not in use
        return 1


def _check_arguments(
    args: Any, target: Any, micro: Any, memory: Any, shares: Any, optimizers: Any
) -> int:
    """Validate autoaccum's keywords against the TrainingArguments before anything is built;
    returns this rank's share of a step (the per-device loader batch)."""
    check_positive_int("target_batch_size", target)
    if micro is not None:
        check_positive_int("micro_batch_size", micro)
    check_memory(memory)
    if shares != "equal":
        raise ValueError(
            f"AutoAccumTrainer supports shares='equal' only, got shares={shares!r}: the Trainer's "
            "loader gives every rank the same batch size. For 'auto' or per-rank shares use "
            "AutoAccumOptimizer with autoaccum.ShareSampler in your own loop"
        )
    if isinstance(optimizers, tuple) and optimizers and isinstance(optimizers[0],
                                                                    AutoAccumOptimizer):
        raise TypeError(
            "AutoAccumTrainer builds the AutoAccumOptimizer itself; pass the inner optimizer in "
            "optimizers=(torch.optim.AdamW(model.parameters()), scheduler), and target_batch_size= "
            "(and micro_batch_size=, memory=) to AutoAccumTrainer"
        )
    ga = args.gradient_accumulation_steps
    if ga != 1:
        raise ValueError(
            f"AutoAccumTrainer(target_batch_size={target}) plans gradient accumulation itself, "
            f"but TrainingArguments has gradient_accumulation_steps={ga}; expected 1 (the "
            "default). Remove gradient_accumulation_steps; to keep the effective batch of "
            f"per_device_train_batch_size x gradient_accumulation_steps x world_size, pass "
            f"target_batch_size={args.per_device_train_batch_size * ga * args.world_size}"
        )
    if args.auto_find_batch_size:
        raise ValueError(
            "TrainingArguments has auto_find_batch_size=True, which AutoAccumTrainer replaces: "
            "it would shrink the batch and so the effective batch. Set auto_find_batch_size="
            f"False; autoaccum keeps target_batch_size={target} and finds the micro-batch that fits"
        )
    if getattr(args, "deepspeed", None):
        raise ValueError(
            f"AutoAccumTrainer does not support DeepSpeed (TrainingArguments deepspeed="
            f"{args.deepspeed!r}); DeepSpeed runs its own accumulation. Drop deepspeed= or use a "
            "plain Trainer"
        )
    if getattr(args, "fsdp", None):
        raise ValueError(
            f"AutoAccumTrainer does not support the Trainer's FSDP (TrainingArguments fsdp="
            f"{args.fsdp!r}); use DDP, or AutoAccumOptimizer with FSDP2 (fully_shard) in your "
            "own loop"
        )
    if args.n_gpu > 1:
        raise ValueError(
            f"this process sees {args.n_gpu} GPUs and the Trainer would use nn.DataParallel, "
            "which AutoAccumTrainer does not support; launch one process per GPU (torchrun "
            "--nproc-per-node N or accelerate launch), or set CUDA_VISIBLE_DEVICES to one GPU"
        )
    world = args.world_size
    if target % world:
        raise ValueError(
            f"target_batch_size={target} does not divide over the {world} ranks of this job; "
            f"the Trainer's loader gives every rank the same batch, so target_batch_size must be "
            f"a multiple of {world} (e.g. {(target // world) * world or world} or "
            f"{(target // world + 1) * world})"
        )
    share = target // world
    given = args.per_device_train_batch_size
    if given not in (share, _DEFAULT_PER_DEVICE_BATCH):
        warnings.warn(
            f"per_device_train_batch_size={given} is ignored: AutoAccumTrainer loads "
            f"target_batch_size / world_size = {share} samples per rank and step and picks the "
            f"micro-batch itself; to pin the micro-batch, pass micro_batch_size={given}",
            stacklevel=3,
        )
    return share
