"""The small constant tensors the fast path weights micro-batch losses with, made once.

A hand-written loop weights each micro-batch's loss with an op (``loss * (size / T)``) and then
seeds backward with ``torch.ones_like``: two dispatcher ops per micro-batch that cost more than
all of the wrapper's bookkeeping on a light model. Seeding ``loss.backward(seed)`` with a tensor
holding the weight instead gives the same gradient bit for bit (the hand loop's first backward
op computes ``ones * weight``; the seed is made by that same op) and skips both. The seeds and
the weights that average a call's losses for :meth:`AutoAccumOptimizer.step`'s return value
depend only on the plan, so they are cached here and reused while it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

_MAX_ENTRIES = 64  # a settled plan uses a handful; a changing one must not grow the cache


def weigh(x: torch.Tensor, size: int, den: int, token: bool) -> torch.Tensor:
    """A micro-batch's loss (or backward seed) weighted as a hand-written loop does: token mode
    divides a ``loss_sum`` by the step's count, mean mode weights by the micro-batch's share of
    the step. The one formula of the fast path's seeds and of the full path's weighted losses."""
    return x / den if token else x * (size / den)


class Weights:
    """Cached seeds and averaging weights, keyed by what they are made from."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def _put(self, key: tuple[Any, ...], value: torch.Tensor) -> torch.Tensor:
        if len(self._cache) >= _MAX_ENTRIES:
            self._cache.clear()
        self._cache[key] = value
        return value

    def seed(self, loss: torch.Tensor, size: int, den: int, token: bool) -> torch.Tensor:
        """The backward seed of a micro-batch of ``size`` samples: ``ones / den`` in token mode
        (a ``loss_sum`` divided by the step's count), ``ones * (size / den)`` in mean mode, in
        ``loss``'s shape, dtype and device, made by the op the hand loop's backward runs."""
        key = ("seed", token, 0 if token else size, den, loss.shape, loss.dtype, loss.device)
        found = self._cache.get(key)
        if found is not None:
            return found
        with torch.no_grad():
            value = weigh(torch.ones(loss.shape, dtype=loss.dtype, device=loss.device), size,
                          den, token)
        return self._put(key, value)

    def mean(self, sizes: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """``sizes / sum(sizes)`` as a vector: the dot product with a call's stacked losses is
        their sample-weighted mean."""
        key = ("mean", tuple(sizes), like.dtype, like.device)
        found = self._cache.get(key)
        if found is not None:
            return found
        total = sum(sizes)
        value = torch.tensor([s / total for s in sizes], dtype=like.dtype, device=like.device)
        return self._put(key, value)
