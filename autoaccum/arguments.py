"""Checks of the optimizer's constructor arguments: each raises before anything is built, naming
what was given, what is expected and what to do."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.optim import Optimizer

from .facade import InnerFacade
from .memory import MemoryBackend
from .planner import check_shares, equal_shares

# Keywords the wrapper takes for itself (an optimizer class that takes one of them too must be
# built by the user).
WRAPPER_KEYWORDS = (
    "target_batch_size", "micro_batch_size", "memory", "model", "grad_scaler", "max_grad_norm",
    "shares", "count_items", "fsdp_mode",
)


def initial_shares(shares: Any, target: int, world: int) -> list[int]:
    if isinstance(shares, str) and shares in ("equal", "auto"):
        if target < world:
            raise ValueError(
                f"target_batch_size={target} is smaller than the {world} ranks of this job; every "
                "rank needs at least one sample per step"
            )
        return equal_shares(target, world)
    if isinstance(shares, (list, tuple)):
        return check_shares(shares, target, world)
    raise ValueError(f"shares must be 'equal', 'auto' or a list of per-rank sample counts, "
                     f"got {shares!r}")


def check_memory(memory: Any) -> None:
    if memory is not None and not isinstance(memory, MemoryBackend):
        raise TypeError(
            f"memory must follow autoaccum.MemoryBackend (free_bytes, allocated_bytes, "
            f"reset_peak, peak_bytes, release, active; e.g. autoaccum.SimulatedDevice), got "
            f"{type(memory).__name__}"
        )


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def build_inner(
    optimizer: Optimizer | type[Optimizer], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Optimizer:
    if isinstance(optimizer, InnerFacade):
        raise TypeError("the optimizer is already an AutoAccumOptimizer; wrap the inner one once")
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if isinstance(cls, type) and issubclass(cls, torch.optim.LBFGS):
        raise TypeError(
            "LBFGS re-evaluates a closure several times per step, which accumulated "
            "micro-batches cannot provide; use it without AutoAccumOptimizer (full batches), or "
            "an optimizer whose step reads .grad once (SGD, Adam, AdamW, ...)"
        )
    if isinstance(optimizer, Optimizer):
        if args or kwargs:
            raise TypeError(
                f"extra arguments {list(args) + sorted(kwargs)} were given with a built "
                f"{type(optimizer).__name__}; pass them only with an optimizer class"
            )
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        try:
            accepted: Any = inspect.signature(optimizer).parameters
        except (TypeError, ValueError):
            accepted = {}
        clash = [k for k in WRAPPER_KEYWORDS if k in accepted]
        if clash:
            raise TypeError(
                f"{optimizer.__name__} takes its own {clash}, which AutoAccumOptimizer also "
                "takes; build the optimizer yourself and pass the instance"
            )
        return optimizer(*args, **kwargs)
    raise TypeError(
        f"expected a torch.optim.Optimizer or an Optimizer class, got {type(optimizer).__name__}"
    )
