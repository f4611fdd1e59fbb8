"""Split, count and move nested batches.

A batch is a tensor or any nest of tuples, lists, dicts and namedtuples (anything
``torch.utils._pytree`` flattens) whose tensor leaves share their first dimension: the samples.
Non-tensor leaves go unchanged to every micro-batch. The batch is flattened once per
``AutoAccumOptimizer.step`` call; micro-batches are rebuilt from the flat leaves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


class FlatBatch:
    """A validated batch: its leaves, its structure, which leaves are tensors, its sample count."""

    __slots__ = ("device", "leaves", "size", "spec", "tensors")

    def __init__(
        self,
        leaves: list[Any],
        spec: pytree.TreeSpec,
        tensors: tuple[int, ...],
        size: int,
        device: torch.device | None,
    ) -> None:
        self.leaves, self.spec, self.tensors, self.size = leaves, spec, tensors, size
        self.device = device  # where every tensor leaf is, or None if they differ

    def slice(self, start: int, stop: int) -> FlatBatch:
        """Samples ``[start, stop)`` as views of the same host memory (no copy)."""
        leaves = list(self.leaves)
        for i in self.tensors:
            leaves[i] = leaves[i][start:stop]
        return FlatBatch(leaves, self.spec, self.tensors, stop - start, self.device)

    def micro(self, start: int, stop: int, device: torch.device) -> Any:
        """Samples ``[start, stop)`` in the user's structure, tensors moved to ``device``.

        CPU tensors bound for CUDA are pinned and copied with ``non_blocking=True`` so the copy
        overlaps with compute; the caching host allocator keeps the pinned buffer alive until the
        copy has run.
        """
        leaves = list(self.leaves)
        if self.device == device:
            for i in self.tensors:
                leaves[i] = leaves[i][start:stop]
        else:
            for i in self.tensors:
                t = leaves[i][start:stop]
                leaves[i] = t if t.device == device else _to_device(t, device)
        return pytree.tree_unflatten(leaves, self.spec)

    def unflatten(self) -> Any:
        """The batch in the user's structure, where it is (e.g. for a checkpoint)."""
        return pytree.tree_unflatten(list(self.leaves), self.spec)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def flatten_batch(batch: Any) -> FlatBatch:
    """Validate ``batch`` and flatten it.

    Raises:
        TypeError: the batch holds no tensor.
        ValueError: a tensor leaf has no dim 0, leaves disagree on dim 0, or the batch is empty.
    """
    leaves, spec = pytree.tree_flatten(batch)
    tensors = tuple(i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor))
    if not tensors:
        raise TypeError(
            f"the batch holds no tensor (got {type(batch).__name__} with leaves of types "
            f"{sorted({type(x).__name__ for x in leaves})}); expected a tensor or a nested "
            "tuple/list/dict/namedtuple of tensors whose dim 0 indexes samples"
        )
    first = leaves[tensors[0]]
    size = first.shape[0] if first.dim() else -1
    if any(leaves[i].dim() == 0 or leaves[i].shape[0] != size for i in tensors):
        _raise_shape_error(batch)
    if size == 0:
        raise ValueError("the batch is empty (dim 0 is 0); pass at least one sample")
    device = first.device
    if any(leaves[i].device != device for i in tensors[1:]):
        device = None
    return FlatBatch(leaves, spec, tensors, size, device)


def _raise_shape_error(batch: Any) -> None:
    """The error path: name every tensor leaf by its path in the batch."""
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
    shown = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise ValueError(
        f"tensors in the batch disagree on dim 0 (the sample count): {shown}; "
        "every tensor leaf must hold the same number of samples"
    )
