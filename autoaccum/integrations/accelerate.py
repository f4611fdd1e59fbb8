"""autoaccum in a training loop prepared by 🤗 Accelerate (``pip install "autoaccum[accelerate]"``).

Accelerate places the model, wraps it in DDP, shards the data over processes and provides mixed
precision; autoaccum cuts every step into micro-batches that fit and accumulates them. The two meet
at the model and the loss: prepare the model and the data loader, not the optimizer, and let
:func:`prepare_optimizer` build the optimizer from the accelerator::

    from accelerate import Accelerator
    from autoaccum.integrations.accelerate import prepare_optimizer

    accelerator = Accelerator(mixed_precision="bf16")
    model, loader = accelerator.prepare(model, loader)      # NOT the optimizer
    opt = prepare_optimizer(accelerator, torch.optim.AdamW(model.parameters(), lr=3e-4),
                            model=model, target_batch_size=256)   # samples per step, all processes
    for batch in loader:
        loss = opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch)
    opt.flush()

No ``accelerator.backward``, ``accelerator.accumulate``, ``accelerator.clip_grad_norm_`` or
``zero_grad`` in the loop (``max_grad_norm=`` clips). An LR scheduler is not prepared either
(Accelerate would step it once per process): ``opt.register_step_post_hook(lambda *_:
sched.step())``. For loader batches larger than the device holds, keep them on the host with
``accelerator.prepare_data_loader(loader, device_placement=False)``; the optimizer moves each
micro-batch itself.

Accelerate's prepared loader gives each process its own loader batches (process ``r`` of ``n``
gets batches ``r, r + n, ...``) and, with its default ``even_batches=True``, repeats a few samples
from the start to even out the last ones; ``Accelerator(dataloader_config=
DataLoaderConfiguration(even_batches=False))`` counts every sample exactly once. Shares are
"equal": other ``shares=`` need :class:`autoaccum.ShareSampler` in place of the prepared loader.

Not supported: DeepSpeed and Megatron-LM (they own the optimizer step and the accumulation).
FSDP through Accelerate is not covered by the tests of this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ..optimizer import AutoAccumOptimizer
from ._context import InContext

try:
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'autoaccum.integrations.accelerate needs 🤗 Accelerate: pip install "autoaccum[accelerate]"'
    ) from exc

__all__ = ["AcceleratedAutoAccumOptimizer", "prepare_optimizer"]

_RECIPE = ("prepare only the model and the data: `model, loader = accelerator.prepare(model, "
           "loader)`, and give prepare_optimizer the plain torch optimizer")
_UNSUPPORTED = ("DEEPSPEED", "MEGATRON_LM")


class AcceleratedAutoAccumOptimizer(AutoAccumOptimizer):
    """An :class:`~autoaccum.AutoAccumOptimizer` that takes its mixed precision from an
    ``Accelerator``; build it with :func:`prepare_optimizer`.

    Guarantees, besides all of :class:`~autoaccum.AutoAccumOptimizer`'s (every sample in exactly
    one step, each step the gradient of the mean loss over ``target_batch_size`` samples across
    all processes, no step on partial gradients, also after an out-of-memory error):

    * every call of a ``loss_fn`` given to :meth:`step` or :meth:`flush`, replays after an
      out-of-memory error included, runs inside ``accelerator.autocast()`` (a no-op without mixed
      precision);
    * with ``Accelerator(mixed_precision="fp16")`` the loss is scaled by the accelerator's own
      ``GradScaler`` (``accelerator.scaler``), unscaled before clipping and updated once per
      optimizer step, after the gradients are reduced across processes; a step whose gradients
      hold inf/nan is skipped (``GradScaler.step``'s rule) and counted in ``skipped_steps``;
    * nothing is registered with or set on the accelerator; only its GradScaler's state changes,
      as in a plain fp16 loop.
    """

    def __init__(self, accelerator: Accelerator, optimizer: Optimizer | type[Optimizer],
                 *args: Any, model: torch.nn.Module, target_batch_size: int,
                 **kwargs: Any) -> None:
        _check(accelerator, optimizer, model, kwargs)
        super().__init__(optimizer, *args, target_batch_size=target_batch_size, model=model,
                         grad_scaler=accelerator.scaler, **kwargs)
        self.accelerator = accelerator

    def _prepare_loss_fn(self, loss_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        # step(loss_fn, batch) and flush(loss_fn): inside accelerator.autocast(); step() and
        # step(closure) keep the plain Optimizer.step meaning (the closure is not autocast).
        return InContext(self.accelerator.autocast, loss_fn)


def prepare_optimizer(accelerator: Accelerator, optimizer: Optimizer | type[Optimizer],
                      *args: Any, model: torch.nn.Module, target_batch_size: int,
                      **kwargs: Any) -> AcceleratedAutoAccumOptimizer:
    """An :class:`AcceleratedAutoAccumOptimizer` for a loop prepared by ``accelerator``.

    ``optimizer`` is a built torch optimizer or an optimizer class (then ``*args`` and the
    keywords autoaccum does not take go to it, as with :class:`~autoaccum.AutoAccumOptimizer`).
    ``model`` is the module ``accelerator.prepare`` returned (DDP-wrapped in a multi-process run).
    ``target_batch_size`` counts the samples of one optimizer step over all processes. Other
    keywords (``micro_batch_size``, ``memory``, ``max_grad_norm``, ``count_items``, ...) are
    :class:`~autoaccum.AutoAccumOptimizer`'s; ``grad_scaler`` is the accelerator's.

    Raises, before anything is built:
        TypeError: ``accelerator`` is not an ``Accelerator``; ``optimizer`` went through
            ``accelerator.prepare`` (an ``AcceleratedOptimizer``, or the optimizer inside one),
            which would step and zero it on its own; ``grad_scaler=`` was given.
        ValueError: the accelerator accumulates gradients itself
            (``gradient_accumulation_steps > 1``); ``model`` is not one that
            ``accelerator.prepare`` returned, or is the bare module inside the DDP wrapper of a
            multi-process run.
        NotImplementedError: the accelerator runs DeepSpeed or Megatron-LM.
    """
    return AcceleratedAutoAccumOptimizer(accelerator, optimizer, *args, model=model,
                                         target_batch_size=target_batch_size, **kwargs)


def _check(accelerator: Any, optimizer: Any, model: Any, kwargs: dict[str, Any]) -> None:
    """Every refusal of :func:`prepare_optimizer`, with what was given and what to do."""
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got "
                        f"{type(accelerator).__name__}")
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in _UNSUPPORTED:
        raise NotImplementedError(
            f"the accelerator runs {kind}, which steps the optimizer and accumulates gradients "
            f"itself; autoaccum works with plain, DDP (and FSDP2) models: launch without the "
            f"{kind} plugin"
        )
    if isinstance(optimizer, AcceleratedOptimizer):
        raise TypeError(
            f"got an AcceleratedOptimizer around {type(optimizer.optimizer).__name__}: the "
            f"optimizer went through accelerator.prepare, so Accelerate would decide when it steps "
            f"and zeroes (its own accumulation schedule) and apply the GradScaler itself, next to "
            f"autoaccum. Expected the plain torch optimizer; {_RECIPE}"
        )
    prepared = [o.optimizer for o in getattr(accelerator, "_optimizers", ())]
    if any(o is optimizer for o in prepared):
        raise TypeError(
            f"this {type(optimizer).__name__} went through accelerator.prepare (the accelerator "
            f"holds it as an AcceleratedOptimizer and steps it); {_RECIPE}"
        )
    steps = accelerator.gradient_accumulation_steps
    if steps != 1:
        raise ValueError(
            f"the accelerator accumulates gradients itself (gradient_accumulation_steps={steps}); "
            f"expected 1. autoaccum does the accumulation: build the Accelerator without "
            f"gradient_accumulation_steps and set target_batch_size to the samples of one "
            f"optimizer step over all processes (loader batch x {steps} x "
            f"{accelerator.num_processes} processes, to keep your current effective batch)"
        )
    if "grad_scaler" in kwargs:
        raise TypeError(
            "grad_scaler= is taken from the accelerator (Accelerator(mixed_precision='fp16') "
            "makes accelerator.scaler); drop the argument, or build AutoAccumOptimizer yourself"
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be the torch.nn.Module accelerator.prepare returned, got "
                        f"{type(model).__name__}")
    chain = _wrappers(model)
    models = getattr(accelerator, "_models", None)
    if models is not None and not any(m is w for m in models for w in chain):
        names = [type(m).__name__ for m in models] or "none"
        raise ValueError(
            f"model (a {type(model).__name__}) is not a model accelerator.prepare returned "
            f"(prepared so far: {names}); pass the model from `model = accelerator.prepare(model)`"
        )
    kind_is_fsdp = kind == "FSDP"  # fully_shard works in place: no wrapper to pass
    ddp = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    if (accelerator.num_processes > 1 and not kind_is_fsdp
            and not any(isinstance(w, ddp) for w in chain)):
        raise ValueError(
            f"this run has {accelerator.num_processes} processes, and model is the bare "
            f"{type(model).__name__}; expected the DistributedDataParallel module that "
            f"accelerator.prepare returned (autoaccum skips its gradient sync on all but the "
            f"last micro-batch of a step): pass `model = accelerator.prepare(model)` itself"
        )


def _wrappers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model`` and the modules inside it through DDP / DataParallel / torch.compile wrappers,
    outermost first (read only)."""
    chain = [model]
    while True:
        m = chain[-1]
        if isinstance(m, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = m.module
        else:
            inner = getattr(m, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, torch.nn.Module) or any(inner is c for c in chain):
            return chain
        chain.append(inner)
