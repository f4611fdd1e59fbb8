"""Which gradients a step's samples produced.

A probe allocates every missing gradient as zeros first, so that its measured peak counts the
same resident gradients as every later micro-batch. A parameter that no sample of the step then
reaches (an unused head, an expert no token was routed to) must still end the step with
``.grad is None``, as in the plain loop: optimizers skip such parameters (AdamW applies no weight
decay and counts no step for them), where a zero tensor would be stepped.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch


class ZeroFills:
    """The zero gradients autoaccum allocated in the current step, until backward writes them."""

    def __init__(self) -> None:
        self._filled: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def fill(self, params: Iterable[torch.Tensor]) -> None:
        """Allocate a zero ``.grad`` for every parameter of ``params`` that has none."""
        for p in params:
            if p.grad is None:
                p.grad = g = torch.zeros_like(p)
                self._filled.append((p, g, g._version))

    def unfill(self) -> int:
        """Put back ``None`` where a filled gradient was never written (same tensor, same
        version: backward accumulates in place or replaces it). Returns how many."""
        undone = 0
        for p, g, version in self._filled:
            if p.grad is g and g._version == version:
                p.grad = None
                undone += 1
        self._filled = []
        return undone

    def clear(self) -> None:
        """The gradients were dropped (a step ended, or its accumulation starts over)."""
        self._filled = []


class GradWatch:
    """What every parameter's ``.grad`` was when autoaccum last handed control back (the end
    of a ``step()``/``flush()`` call, or a load): the next call sees any change made in between,
    by another optimizer's backward, an attack's backward, ``zero_grad``, ``clip_grad_norm_`` or
    a copy into ``.grad``. Two list comprehensions per call, no per-micro-batch cost."""

    def __init__(self) -> None:
        self._grads: list[torch.Tensor | None] | None = None
        self._versions: list[int] = []

    def mark(self, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        self._grads = grads
        self._versions = [g._version for g in grads if g is not None]

    def forget(self) -> None:
        """Drop the references (they would keep gradients autoaccum cleared alive); the call
        marks again when it returns."""
        self._grads = None

    def changed(self, params: list[torch.Tensor]) -> int:
        """How many parameters' gradients changed since :meth:`mark` (0 without a mark). A
        parameter added since then counts if it holds a gradient."""
        old = self._grads
        if old is None:
            return 0
        grads = [p.grad for p in params]
        if len(grads) == len(old) and all(map(operator.is_, grads, old)) and self._versions == [
                g._version for g in grads if g is not None]:
            return 0
        changed = sum(g is not None for g in grads[len(old):])
        versions = iter(self._versions)
        for g, o in zip(grads, old):
            version = next(versions) if o is not None else None
            if g is not o or (g is not None and g._version != version):
                changed += 1
        return changed
