"""Module buffers a forward updates (BatchNorm running statistics, ``num_batches_tracked``, any
buffer a model writes in its forward), kept exact through replays.

A replay runs a micro-batch's forward again: after an OOM, after the gradients were changed
between calls, after a mid-step checkpoint is loaded. Without care each replay updates the running
statistics a second time. :class:`StepBuffers` copies the buffers a forward can change at a step's
start and puts them back whenever the step's accumulation starts over, so every sample updates
them once, in the micro-batches that end up in the step (as if the run had been planned at the
sizes it ended with). A mid-step checkpoint carries the copy, and the replay after loading starts
from it.

Which buffers: those of normalization layers with running statistics, and those the first step
changed (compared once, at its end). A model without such buffers, or no ``model=``, costs
nothing; otherwise one copy of those buffers per step (not per micro-batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


class StepBuffers:
    """The buffers of ``model`` a forward may update, saved at each step's start."""

    def __init__(self, model: nn.Module | None) -> None:
        self._all: list[torch.Tensor] = list(model.buffers()) if model is not None else []
        norm = {id(b) for m in (model.modules() if model is not None else ())
                if isinstance(m, _NormBase) for b in m.buffers(recurse=False)}
        self._mutable: list[int] | None = None  # indices into _all; None: not learned yet
        self._norm = [i for i, b in enumerate(self._all) if id(b) in norm]
        self._saved: list[torch.Tensor] | None = None
        self._saved_index: list[int] = []
        self.restore_before_replay = False  # a checkpoint's copy waits for the replay

    @property
    def active(self) -> bool:
        """Whether a replay must restore buffers (a copy of this step's start is held)."""
        return self._saved is not None

    def _candidates(self) -> list[int]:
        if self._mutable is not None:
            return self._mutable
        return [i for i, b in enumerate(self._all) if b.dtype != torch.bool]

    def save(self) -> None:
        """At a step's start, before its first micro-batch."""
        if not self._all:
            return
        index = self._candidates()
        if not index:
            return
        with torch.no_grad():
            self._saved = [self._all[i].detach().clone() for i in index]
        self._saved_index = list(index)
        self.restore_before_replay = False

    def restore(self) -> None:
        """The step's accumulation starts over: the buffers as they were at its start."""
        if self._saved is None:
            return
        with torch.no_grad():
            for i, saved in zip(self._saved_index, self._saved):
                self._all[i].copy_(saved)
        self.restore_before_replay = False

    def end_step(self) -> None:
        """The step's samples are consumed: their updates stay. Learns, at the first step, which
        buffers forwards change."""
        if self._saved is not None and self._mutable is None:
            changed = {i for i, s in zip(self._saved_index, self._saved)
                       if not torch.equal(self._all[i], s)}
            self._mutable = sorted(changed | set(self._norm))
        self._saved = None
        self.restore_before_replay = False

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict[str, Any] | None:
        """The copy of the unfinished step's start, for a checkpoint (None: none held)."""
        if self._saved is None:
            return None
        return {"index": list(self._saved_index),
                "values": [s.detach().clone() for s in self._saved]}

    def check(self, state: Any) -> tuple[list[int], list[torch.Tensor]] | None:
        """Validate a checkpoint's copy against this model's buffers (None: nothing to restore).

        Raises:
            TypeError / ValueError: naming what was found and what was expected.
        """
        if state is None:
            return None
        if not isinstance(state, dict) or set(state) != {"index", "values"}:
            raise TypeError(f"checkpoint field 'buffers' is {type(state).__name__}; expected None "
                            "or a dict with 'index' and 'values'")
        index, values = state["index"], state["values"]
        if not isinstance(index, list) or not isinstance(values, list) \
                or len(index) != len(values):
            raise ValueError("checkpoint field 'buffers' needs lists 'index' and 'values' of "
                             "one length")
        if not self._all:
            return None  # no model= here: nothing to restore into
        out = []
        for i, v in zip(index, values):
            if type(i) is not int or not 0 <= i < len(self._all):
                raise ValueError(f"checkpoint field 'buffers.index' holds {i!r}; expected an "
                                 f"index of one of the model's {len(self._all)} buffers")
            b = self._all[i]
            if not isinstance(v, torch.Tensor) or v.shape != b.shape or v.dtype != b.dtype:
                got = (f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor)
                       else type(v).__name__)
                raise ValueError(f"checkpoint field 'buffers.values' for buffer {i} is {got}; "
                                 f"expected {tuple(b.shape)} {b.dtype} like the model's")
            out.append(v)
        return list(index), out

    def load(self, index: Sequence[int], values: list[torch.Tensor]) -> None:
        """Hold a checkpoint's copy (checked by :meth:`check`); the replay starts from it."""
        self._saved = [v.to(self._all[i].device) for i, v in zip(index, values)]
        self._saved_index = list(index)
        self.restore_before_replay = True
