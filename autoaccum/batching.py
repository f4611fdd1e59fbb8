"""Split, count, move and store nested batches.

A batch is a tensor or any nest of tuples, lists, dicts, namedtuples and other ``Mapping`` types
(e.g. Hugging Face's ``BatchEncoding``) whose tensor leaves share their first dimension: the
samples. Non-tensor leaves go unchanged to every micro-batch. A batch is flattened once per
``AutoAccumOptimizer.step`` call; micro-batches are rebuilt from the flat leaves by a function
compiled once per call, so the per-micro-batch cost is a few list operations.

The structure is kept in two forms: a runtime one holding the container classes, and a plain one
(nested lists of strings, ints and the keys) that a checkpoint holds, that
``torch.load(..., weights_only=True)`` accepts, and that names no code: a user type appears in it
only as a display string, never imported or called (see :mod:`autoaccum.checkpoint`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

log = logging.getLogger("autoaccum")

# Runtime structure nodes: (kind, cls, keys, children). Kinds:
LEAF, CONST, TUPLE, LIST, DICT, NAMEDTUPLE, MAPPING = range(7)
Spec = tuple[Any, ...]
TENSOR_SPEC: Spec = (LEAF,)
Rebuild = Callable[[Sequence[Any]], Any]


class FlatBatch:
    """A validated batch: its leaves, its structure, which leaves are tensors, its sample count."""

    __slots__ = ("device", "leaves", "rebuild", "restored", "size", "spec", "tensors")

    def __init__(
        self,
        leaves: list[Any],
        spec: Spec,
        tensors: tuple[int, ...],
        size: int,
        device: torch.device | None,
        rebuild: Rebuild | None = None,
    ) -> None:
        self.leaves, self.spec, self.tensors, self.size = leaves, spec, tensors, size
        self.device = device  # where every tensor leaf is, or None if they differ
        self.rebuild = rebuild if rebuild is not None else _compile(spec)
        # Samples restored from a checkpoint: the plain structure they were saved with, until a
        # live batch of the same structure lends them its container types (None otherwise).
        self.restored: list[Any] | None = None

    def slice(self, start: int, stop: int) -> FlatBatch:
        """Samples ``[start, stop)`` as views of the same host memory (no copy)."""
        if start == 0 and stop == self.size:
            return self
        leaves = list(self.leaves)
        for i in self.tensors:
            leaves[i] = leaves[i][start:stop]
        return FlatBatch(leaves, self.spec, self.tensors, stop - start, self.device, self.rebuild)

    def micro(self, start: int, stop: int, device: torch.device) -> Any:
        """Samples ``[start, stop)`` in the user's structure, tensors moved to ``device``."""
        leaves = list(self.leaves)
        move = self.device != device
        for i in self.tensors:
            t = leaves[i][start:stop]
            leaves[i] = to_device(t, device) if move and t.device != device else t
        return self.rebuild(leaves)

    def split(self, sizes: Sequence[int]) -> list[list[Any]]:
        """The leaves of consecutive micro-batches of ``sizes`` (views; one ``split`` per tensor
        leaf). Rebuild each with :attr:`rebuild` after moving its tensors."""
        parts = [self.leaves[i].split_with_sizes(sizes) for i in self.tensors]
        if len(self.tensors) == len(self.leaves):
            return [list(x) for x in zip(*parts)]
        out = []
        for j in range(len(sizes)):
            leaves = list(self.leaves)
            for i, p in zip(self.tensors, parts):
                leaves[i] = p[j]
            out.append(leaves)
        return out

    def unflatten(self) -> Any:
        """The batch in the user's structure, where it is."""
        return self.rebuild(self.leaves)

    def versions(self) -> tuple[int, ...]:
        """The version counters of the tensor leaves (they move when a tensor is written)."""
        return tuple(self.leaves[i]._version for i in self.tensors)

    def to_checkpoint(self) -> dict[str, Any]:
        """The samples as compact copies (only their own bytes, not the storage they view) and
        the structure in plain form; loadable with ``torch.load(weights_only=True)`` as long as
        the non-tensor leaves are plain Python values."""
        leaves = [
            x.detach().clone(memory_format=torch.contiguous_format) if i in self.tensors else x
            for i, x in enumerate(self.leaves)
        ]
        return {"leaves": leaves, "structure": plain_structure(self.spec)}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; CPU tensors bound for CUDA are pinned and copied asynchronously (the
    caching host allocator keeps the pinned buffer alive until the copy has run)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------------------- flatten
def _flatten(obj: Any, leaves: list[Any]) -> Spec:
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return (LEAF,)
    cls = type(obj)
    if cls is tuple or cls is list:
        children = tuple(_flatten(x, leaves) for x in obj)
        return (TUPLE if cls is tuple else LIST, None, None, children)
    if isinstance(obj, tuple) and hasattr(cls, "_fields"):
        children = tuple(_flatten(x, leaves) for x in obj)
        return (NAMEDTUPLE, cls, tuple(cls._fields), children)
    if isinstance(obj, Mapping):
        keys = tuple(obj.keys())
        children = tuple(_flatten(obj[k], leaves) for k in keys)
        return (DICT if cls is dict else MAPPING, cls, keys, children)
    if isinstance(obj, (tuple, list)):  # subclasses: rebuilt as their base
        children = tuple(_flatten(x, leaves) for x in obj)
        return (TUPLE if isinstance(obj, tuple) else LIST, None, None, children)
    leaves.append(obj)
    return (CONST,)


def _compile(spec: Spec) -> Rebuild:
    """A function ``leaves -> batch`` for ``spec``; common shapes get a direct one."""
    kind = spec[0]
    if kind == LEAF:
        return _first
    children = spec[3] if kind not in (LEAF, CONST) else ()
    flat_children = all(c[0] in (LEAF, CONST) for c in children)
    if flat_children:
        if kind == TUPLE:
            return tuple
        if kind == LIST:
            return list
        if kind == DICT:
            keys = spec[2]
            return lambda leaves: dict(zip(keys, leaves))
        if kind == NAMEDTUPLE:
            return spec[1]._make  # type: ignore[no-any-return]

    def rebuild(leaves: Sequence[Any]) -> Any:
        it = iter(leaves)
        return _build(spec, it)

    return rebuild


def _first(leaves: Sequence[Any]) -> Any:
    return leaves[0]


def _build(spec: Spec, it: Any) -> Any:
    kind = spec[0]
    if kind in (LEAF, CONST):
        return next(it)
    values = [_build(c, it) for c in spec[3]]
    if kind == TUPLE:
        return tuple(values)
    if kind == LIST:
        return values
    if kind == NAMEDTUPLE:
        return spec[1]._make(values)
    mapping = dict(zip(spec[2], values))
    if kind == DICT:
        return mapping
    return _make_mapping(spec[1], mapping)


def _make_mapping(cls: Any, mapping: dict[Any, Any]) -> Any:
    try:
        return cls(mapping)
    except Exception:  # a Mapping whose constructor takes something else: hand over a dict
        return mapping


def flatten_batch(batch: Any) -> FlatBatch:
    """Validate ``batch`` and flatten it.

    Raises:
        TypeError: the batch holds no tensor.
        ValueError: a tensor leaf has no dim 0, leaves disagree on dim 0, or the batch is empty.
    """
    leaves: list[Any]
    tensors: tuple[int, ...]
    spec: Spec
    cls = type(batch)
    rebuild: Rebuild | None = None
    # The common shapes without recursion: a tensor, a flat tuple/list/dict of tensors.
    if cls is torch.Tensor:
        leaves, spec, tensors, rebuild = [batch], TENSOR_SPEC, (0,), _first
    elif (cls is tuple or cls is list) and all(type(x) is torch.Tensor for x in batch):
        leaves = list(batch)
        spec = (TUPLE if cls is tuple else LIST, None, None, (TENSOR_SPEC,) * len(leaves))
        tensors = tuple(range(len(leaves)))
        rebuild = cls
    elif cls is dict and all(type(x) is torch.Tensor for x in batch.values()):
        leaves = list(batch.values())
        spec = (DICT, dict, tuple(batch), (TENSOR_SPEC,) * len(leaves))
        tensors = tuple(range(len(leaves)))
    else:
        leaves = []
        spec = _flatten(batch, leaves)
        tensors = tuple(i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor))
    if not tensors:
        raise TypeError(
            f"the batch holds no tensor (got {type(batch).__name__} with leaves of types "
            f"{sorted({type(x).__name__ for x in leaves})}); expected a tensor or a nested "
            "tuple/list/dict/namedtuple/Mapping of tensors whose dim 0 indexes samples"
        )
    first = leaves[tensors[0]]
    shape = first.shape
    size = shape[0] if shape else -1
    device = first.device
    for i in tensors:
        leaf = leaves[i]
        leaf_shape = leaf.shape
        if not leaf_shape or leaf_shape[0] != size:
            _raise_shape_error(batch)
        if leaf.grad_fn is not None:
            _raise_graph_error(batch)
        if device is not None and leaf.device != device:
            device = None
    if size == 0:
        raise ValueError("the batch is empty (dim 0 is 0); pass at least one sample")
    return FlatBatch(leaves, spec, tensors, size, device, rebuild)


def _paths(obj: Any, prefix: str) -> list[tuple[str, Any]]:
    cls = type(obj)
    if isinstance(obj, Mapping):
        return [p for k in obj for p in _paths(obj[k], f"{prefix}[{k!r}]")]
    if isinstance(obj, (tuple, list)) and not isinstance(obj, torch.Tensor):
        if hasattr(cls, "_fields"):
            return [p for f, x in zip(cls._fields, obj) for p in _paths(x, f"{prefix}.{f}")]
        return [p for i, x in enumerate(obj) for p in _paths(x, f"{prefix}[{i}]")]
    return [(prefix, obj)]


def _raise_graph_error(batch: Any) -> None:
    """A batch tensor that is the output of a graph: its micro-batches would share that graph
    (a second backward through it fails) and the held samples would keep it alive."""
    found = [(name, leaf.grad_fn) for name, leaf in _paths(batch, "batch")
             if isinstance(leaf, torch.Tensor) and leaf.grad_fn is not None]
    raise ValueError(
        f"{', '.join(name for name, _ in found)} carries an autograd graph (grad_fn "
        f"{type(found[0][1]).__name__}): its micro-batches would share it, and a second "
        "backward through it fails. Pass it detached (.detach(), or compute it under "
        "torch.no_grad(), e.g. a teacher's logits); inputs that require grad as leaves (a "
        "gradient penalty's real images) are fine"
    )


def _raise_shape_error(batch: Any) -> None:
    """The error path: name every tensor leaf by its path in the batch."""
    sizes: dict[str, int] = {}
    for name, leaf in _paths(batch, "batch"):
        if isinstance(leaf, torch.Tensor):
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


# ------------------------------------------------------------------------------ checkpoint form
KIND_NAMES = {LEAF: "tensor", CONST: "value", TUPLE: "tuple", LIST: "list", DICT: "dict",
              NAMEDTUPLE: "namedtuple", MAPPING: "mapping"}


def type_name(cls: type) -> str:
    """How a checkpoint names a user's container type: a display string, never resolved."""
    return f"{cls.__module__}:{cls.__qualname__}"


def plain_structure(spec: Spec) -> list[Any]:
    """``spec`` as nested lists ``[kind, type name or None, keys or None, children]`` (leaves:
    ``[kind]``), the form a checkpoint holds."""
    kind = spec[0]
    name = KIND_NAMES[kind]
    if kind in (LEAF, CONST):
        return [name]
    cls = spec[1]
    keys = list(spec[2]) if spec[2] is not None else None
    return [name, type_name(cls) if cls is not None else None, keys,
            [plain_structure(c) for c in spec[3]]]
