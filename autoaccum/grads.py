"""Which gradients a step's samples produced.

A probe allocates every missing gradient as zeros first, so that its measured peak counts the
same resident gradients as every later micro-batch. A parameter that no sample of the step then
reaches (an unused head, an expert no token was routed to) must still end the step with
``.grad is None``, as in the plain loop: optimizers skip such parameters (AdamW applies no weight
decay and counts no step for them), where a zero tensor would be stepped.
"""

from __future__ import annotations

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
