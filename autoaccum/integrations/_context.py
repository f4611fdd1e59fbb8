"""What the integrations share: a ``loss_fn`` run inside a framework's autocast context."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any


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
