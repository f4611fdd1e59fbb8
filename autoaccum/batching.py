"""Split, count and move nested batches.

A batch is a tensor or any nest of tuples, lists, dicts and namedtuples (anything
``torch.utils._pytree`` flattens) whose tensor leaves share their first dimension: the samples.
Non-tensor leaves go unchanged to every micro-batch. The batch is flattened once per
``AutoAccumOptimizer.step`` call; micro-batches are rebuilt from the flat leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class FlatBatch:
    """A validated batch: its leaves, its structure and its sample count."""

    leaves: tuple[Any, ...]
    spec: pytree.TreeSpec
    size: int

    def slice(self, start: int, stop: int) -> FlatBatch:
        """Samples ``[start, stop)`` as views of the same host memory (no copy)."""
        leaves = tuple(
            leaf[start:stop] if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves
        )
        return FlatBatch(leaves, self.spec, stop - start)

    def materialize(self, device: torch.device | None) -> Any:
        """The batch as the user's structure, its tensors on ``device`` (None: where they are).

        CPU tensors bound for CUDA are pinned and copied with ``non_blocking=True`` so the copy
        overlaps with compute; the caching host allocator keeps the pinned buffer alive until the
        copy has run.
        """
        if device is None:
            return pytree.tree_unflatten(list(self.leaves), self.spec)
        return pytree.tree_unflatten([_to_device(x, device) for x in self.leaves], self.spec)

    def cat(self, other: FlatBatch) -> FlatBatch:
        """This batch followed by ``other`` (same structure), copying the tensor leaves."""
        leaves = tuple(
            torch.cat([a, b]) if isinstance(a, torch.Tensor) else a
            for a, b in zip(self.leaves, other.leaves)
        )
        return FlatBatch(leaves, self.spec, self.size + other.size)


def _to_device(leaf: Any, device: torch.device) -> Any:
    if not isinstance(leaf, torch.Tensor) or leaf.device == device:
        return leaf
    if device.type == "cuda" and leaf.device.type == "cpu":
        return leaf.pin_memory().to(device, non_blocking=True)
    return leaf.to(device)


def flatten_batch(batch: Any) -> FlatBatch:
    """Validate ``batch`` and flatten it.

    Raises:
        TypeError: the batch holds no tensor.
        ValueError: a tensor leaf has no dim 0, leaves disagree on dim 0, or the batch is empty.
    """
    leaves, spec = pytree.tree_flatten(batch)
    sizes: dict[str, int] = {}
    for path, leaf in pytree.tree_flatten_with_path(batch)[0]:
        if isinstance(leaf, torch.Tensor):
            name = "batch" + pytree.keystr(path)
            if leaf.dim() == 0:
                raise ValueError(
                    f"{name} is a 0-d tensor; every tensor in a batch needs dim 0 to index "
                    "samples (wrap scalars in a Python number to pass them to every micro-batch)"
                )
            sizes[name] = leaf.shape[0]
    if not sizes:
        raise TypeError(
            f"the batch holds no tensor (got {type(batch).__name__} with leaves of types "
            f"{sorted({type(x).__name__ for x in leaves})}); expected a tensor or a nested "
            "tuple/list/dict/namedtuple of tensors whose dim 0 indexes samples"
        )
    distinct = set(sizes.values())
    if len(distinct) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"tensors in the batch disagree on dim 0 (the sample count): {shown}; "
            "every tensor leaf must hold the same number of samples"
        )
    (size,) = distinct
    if size == 0:
        raise ValueError("the batch is empty (dim 0 is 0); pass at least one sample")
    return FlatBatch(tuple(leaves), spec, size)
