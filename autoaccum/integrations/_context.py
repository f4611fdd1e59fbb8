"""What the integrations share: a ``loss_fn`` run inside a framework's autocast context, and
the plan's figures they log."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any


def plan_metrics(opt: Any) -> dict[str, int]:
    """What a framework logs of an :class:`~autoaccum.AutoAccumOptimizer` after a step: the
    largest micro-batch of the last step, its accumulation steps, the OOM events so far."""
    plan = opt.plan  # of the last finished step: its sizes are a short tuple
    return {"micro_batch_size": max(plan.micro_batch_sizes, default=0),
            "accumulation_steps": plan.accumulation_steps, "oom_events": opt.oom_events}


class InContext:
    """``loss_fn`` run inside a fresh ``context()`` (e.g. ``accelerator.autocast``, Lightning's
    ``precision_plugin.forward_context``) at every call, replays included: the forward is
    autocast, the backward that autoaccum runs afterwards is not."""

    __slots__ = ("context", "loss_fn")

    def __init__(self, context: Callable[[], contextlib.AbstractContextManager[Any]],
                 loss_fn: Callable[[Any], Any]) -> None:
        self.context, self.loss_fn = context, loss_fn

    def __call__(self, micro_batch: Any) -> Any:
        with self.context():
            return self.loss_fn(micro_batch)

    def __repr__(self) -> str:
        return f"in_context({self.loss_fn!r})"
