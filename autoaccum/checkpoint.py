"""autoaccum's part of a checkpoint: what it holds, and a load that trusts none of it.

A checkpoint is data. Nothing here imports a module, resolves a name or calls anything the
checkpoint names: the batch structure of the unfinished step's samples is plain data (container
kinds, keys, leaf kinds), and a user's own container type is recorded only as a display string.
Restored samples get their container types back from the next live batch of the same structure
(:func:`adopt`), the batch a training loop passes to the first ``step()`` after the load; until
then (or for a ``flush()`` straight after loading) they are rebuilt as plain stand-ins: a dict for
a ``Mapping`` type, a namedtuple with the same fields for a namedtuple type.

:func:`parse_entry` validates every field (types, ranges, the pending sample count against the
leaves, the leaves' devices, the version) into new objects and raises ``TypeError`` or
``ValueError`` naming the field, what was found and what was expected; the caller changes nothing
until it returns. See ``docs/checkpoints.md``.
"""

from __future__ import annotations

import collections
import keyword
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed
from .batching import (
    CONST,
    DICT,
    KIND_NAMES,
    LEAF,
    LIST,
    NAMEDTUPLE,
    TUPLE,
    FlatBatch,
    Spec,
    flatten_batch,
    plain_structure,
)
from .data import ShareSchedule
from .planner import equal_shares
from .policy import MicroBatchPolicy

log = logging.getLogger("autoaccum")

VERSION = 3  # 3: "pending_samples", "buffers"; 2: structures as plain data; 1: raw batches (0.1)
_MAX_COUNT = 2**62  # larger counters than any run reaches: a corrupted file
_MAX_DEPTH = 64  # nesting of a batch structure
_MAX_NODES = 1_000_000  # containers and leaves in one batch structure
_MAX_NAME = 1000  # characters of a recorded type name
_KINDS = {v: k for k, v in KIND_NAMES.items()}
_KEY_TYPES = (str, int, float, bool, type(None), bytes)
_COMMON = ("target_batch_size", "optimizer_steps", "oom_events", "skipped_steps", "token_mode",
           "last_sizes", "policy", "shares", "pending")
_FIELDS = {1: {*_COMMON, "version"}, 2: {*_COMMON, "version", "step_size"},
           3: {*_COMMON, "version", "step_size", "pending_samples", "buffers"}}


@dataclass
class Restored:
    """A validated ``"autoaccum"`` entry, as new objects (nothing is set on an optimizer)."""

    optimizer_steps: int
    oom_events: int
    skipped_steps: int
    last_sizes: tuple[int, ...] | None
    policy: MicroBatchPolicy
    schedule: ShareSchedule
    step_size: int
    pending: list[FlatBatch]
    buffers: tuple[list[int], list[torch.Tensor]] | None = None  # the step's start, to replay


def entry(*, target_batch_size: int, optimizer_steps: int, oom_events: int, skipped_steps: int,
          token_mode: bool | None, last_sizes: Sequence[int] | None, policy: dict[str, Any],
          shares: dict[str, Any], step_size: int, pending: Sequence[FlatBatch],
          buffers: dict[str, Any] | None) -> dict[str, Any]:
    """The ``"autoaccum"`` entry of a state dict, in plain Python types and tensors only."""
    return {
        "version": VERSION,
        "target_batch_size": target_batch_size,
        "optimizer_steps": optimizer_steps,
        "oom_events": oom_events,
        "skipped_steps": skipped_steps,
        "token_mode": token_mode,
        "last_sizes": list(last_sizes) if last_sizes else None,
        "policy": policy,
        "shares": shares,
        "step_size": step_size,
        "pending_samples": sum(f.size for f in pending),
        "pending": [f.to_checkpoint() for f in pending],
        "buffers": buffers if pending else None,
    }


def parse_entry(own: Any, *, target_batch_size: int, world: int, rank: int,
                new_policy: Callable[[], MicroBatchPolicy],
                devices: Sequence[torch.device],
                check_buffers: Callable[[Any], Any] = lambda state: None) -> Restored:
    """Validate the ``"autoaccum"`` entry ``own`` for an optimizer of ``target_batch_size`` on
    rank ``rank`` of ``world``, whose restored samples may be on ``devices``; ``check_buffers``
    validates the copy of the model's buffers at the unfinished step's start.

    Raises:
        TypeError / ValueError: naming the field, what was found and what was expected.
    """
    if not isinstance(own, dict):
        raise TypeError(f"checkpoint entry 'autoaccum' is a {type(own).__name__}; expected the "
                        "dict AutoAccumOptimizer.state_dict() saves")
    version = own.get("version", 1)
    if type(version) is not int or version not in _FIELDS:
        raise ValueError(f"checkpoint entry 'autoaccum' has version {version!r}; this autoaccum "
                         f"reads versions {sorted(_FIELDS)}: load it with the autoaccum that "
                         "saved it")
    found, expected = set(own), _FIELDS[version]
    if version == 1:
        expected = expected - {"version"}
        found = found - {"version"}
    if found != expected:
        missing, unknown = sorted(expected - found), sorted(found - expected, key=repr)
        raise ValueError(f"checkpoint entry 'autoaccum' (version {version}) is missing fields "
                         f"{missing} and has unknown fields {unknown}; expected exactly "
                         f"{sorted(expected)}")
    saved_target = own["target_batch_size"]
    if saved_target != target_batch_size or type(saved_target) is not int:
        raise ValueError(
            f"checkpoint was made with target_batch_size={saved_target!r}, this optimizer has "
            f"{target_batch_size}; resuming would change every step. Build the optimizer with "
            f"target_batch_size={saved_target!r} to resume this run"
        )
    counts = {k: _int(k, own[k], 0) for k in ("optimizer_steps", "oom_events", "skipped_steps")}
    if own["token_mode"] not in (None, True, False):
        raise TypeError(f"checkpoint field 'token_mode' is {own['token_mode']!r}; expected "
                        "True, False or None")
    last_sizes = _last_sizes(own["last_sizes"], target_batch_size)
    policy = new_policy()
    try:
        policy.load_state_dict(own["policy"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"checkpoint field 'policy' is malformed: {exc}") from exc
    schedule = ShareSchedule(equal_shares(target_batch_size, world))
    try:
        schedule.load_state_dict(own["shares"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"checkpoint field 'shares' is malformed: {exc}") from exc
    try:
        share = schedule.shares_for(counts["optimizer_steps"])[rank]
    except RuntimeError as exc:
        raise ValueError(f"checkpoint field 'shares' has no shares for step "
                         f"{counts['optimizer_steps'] + 1}: {exc}") from exc
    pending_raw = own["pending"]
    if not isinstance(pending_raw, list):
        raise TypeError(f"checkpoint field 'pending' is a {type(pending_raw).__name__}; "
                        "expected a list of saved batches")
    if version == 1:
        pending = [flatten_batch(b) for b in pending_raw]
        step_size = share
    else:
        pending = [restore_batch(p, devices=devices, where=f"pending[{i}]")
                   for i, p in enumerate(pending_raw)]
        step_size = _int("step_size", own["step_size"], 1, target_batch_size)
    held = sum(f.size for f in pending)
    if version >= 3:
        saved_count = _int("pending_samples", own["pending_samples"], 0, target_batch_size)
        if saved_count != held:
            raise ValueError(f"checkpoint field 'pending_samples' is {saved_count} but its "
                             f"pending batches hold {held} samples; the file is inconsistent")
    if (pending or world == 1) and step_size != share:
        raise ValueError(
            f"checkpoint field 'step_size' is {step_size}; expected {share}, this rank's share of "
            f"step {counts['optimizer_steps'] + 1} by the checkpoint's own share schedule"
        )
    if held > step_size:
        raise ValueError(f"the checkpoint holds {held} pending samples for a step of "
                         f"{step_size}; expected at most {step_size}")
    buffers = check_buffers(own["buffers"]) if version >= 3 and pending else None
    return Restored(counts["optimizer_steps"], counts["oom_events"], counts["skipped_steps"],
                    last_sizes, policy, schedule, share, pending, buffers)


def _int(name: str, value: Any, low: int, high: int = _MAX_COUNT) -> int:
    if type(value) is not int:
        raise TypeError(f"checkpoint field {name!r} is {type(value).__name__} {value!r}; "
                        "expected an int")
    if not low <= value <= high:
        raise ValueError(f"checkpoint field {name!r} is {value}; expected an int in "
                         f"[{low}, {high}]")
    return value


def _last_sizes(value: Any, target: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise TypeError(f"checkpoint field 'last_sizes' is {value!r}; expected None or a "
                        "non-empty list of micro-batch sizes")
    sizes = tuple(_int("last_sizes", s, 1, target) for s in value)
    if sum(sizes) > target:
        raise ValueError(f"checkpoint field 'last_sizes' sums to {sum(sizes)}; expected at "
                         f"most the target batch size {target}")
    return sizes


# ----------------------------------------------------------------------- pending samples
def restore_batch(saved: Any, *, devices: Sequence[torch.device] = (torch.device("cpu"),),
                  where: str = "pending batch") -> FlatBatch:
    """The :class:`FlatBatch` that :meth:`FlatBatch.to_checkpoint` saved, validated, with
    stand-in container types until :func:`adopt` gives it a live batch's."""
    if not isinstance(saved, dict) or set(saved) != {"leaves", "structure"}:
        got = sorted(saved, key=repr) if isinstance(saved, dict) else type(saved).__name__
        raise TypeError(f"checkpoint field {where!r} is {got}; expected a dict with exactly "
                        "'leaves' and 'structure'")
    leaves = saved["leaves"]
    if not isinstance(leaves, list):
        raise TypeError(f"checkpoint field '{where}.leaves' is a {type(leaves).__name__}; "
                        "expected a list")
    structure = saved["structure"]
    kinds: list[int] = []
    spec = _spec(structure, kinds, f"{where}.structure", 0)
    if len(kinds) != len(leaves):
        raise ValueError(f"checkpoint field {where!r} has {len(leaves)} leaves but its "
                         f"structure names {len(kinds)}; expected as many")
    leaves = list(leaves)
    size = -1
    on: set[torch.device] = set()
    for i, (kind, leaf) in enumerate(zip(kinds, leaves)):
        is_tensor = isinstance(leaf, torch.Tensor)
        if is_tensor != (kind == LEAF):
            raise TypeError(f"checkpoint field '{where}.leaves[{i}]' is a "
                            f"{type(leaf).__name__}; its structure says "
                            f"{'a tensor' if kind == LEAF else 'a plain value'}")
        if not is_tensor:
            continue
        if leaf.layout != torch.strided or leaf.dim() == 0 or leaf.shape[0] == 0:
            raise ValueError(f"checkpoint field '{where}.leaves[{i}]' is a {leaf.layout} tensor "
                             f"of shape {tuple(leaf.shape)}; expected a dense tensor whose dim "
                             "0 holds at least one sample")
        if size not in (-1, leaf.shape[0]):
            raise ValueError(f"checkpoint field '{where}.leaves' disagree on the sample count "
                             f"(dim 0): {size} and {leaf.shape[0]} at leaf {i}")
        if leaf.device not in devices:
            raise ValueError(f"checkpoint field '{where}.leaves[{i}]' is on {leaf.device}; "
                             f"expected one of {[str(d) for d in devices]} (load the file with "
                             "torch.load(..., map_location='cpu'))")
        size = leaf.shape[0]
        on.add(leaf.device)
        leaves[i] = leaf.detach()
    if size == -1:
        raise ValueError(f"checkpoint field {where!r} holds no tensor; expected the samples of a "
                         "batch")
    tensors = tuple(i for i, k in enumerate(kinds) if k == LEAF)
    flat = FlatBatch(leaves, spec, tensors, size, on.pop() if len(on) == 1 else None)
    flat.restored = structure if _names_types(structure) else None
    return flat


def adopt(restored: FlatBatch, live: FlatBatch) -> bool:
    """Give ``restored`` the container types of ``live`` if ``live`` has the structure they were
    saved with (kinds, keys and recorded type names all equal). Returns whether it did."""
    if restored.restored is None:
        return True
    if plain_structure(live.spec) != restored.restored:
        return False
    restored.spec, restored.rebuild, restored.restored = live.spec, live.rebuild, None
    return True


def _names_types(plain: list[Any]) -> bool:
    """Whether a (validated) saved structure holds a user container type."""
    if plain[0] in ("namedtuple", "mapping"):
        return True
    return len(plain) == 4 and any(_names_types(c) for c in plain[3])


def _spec(node: Any, kinds: list[int], where: str, depth: int) -> Spec:
    """The runtime structure of a saved one, with stand-in types; ``kinds`` gets the leaves'."""
    if depth > _MAX_DEPTH or len(kinds) > _MAX_NODES:
        raise ValueError(f"checkpoint field {where!r} nests deeper than {_MAX_DEPTH} or holds "
                         f"more than {_MAX_NODES} leaves; expected a batch structure")
    if not isinstance(node, list) or not node or node[0] not in _KINDS:
        raise ValueError(f"checkpoint field {where!r} is {_short(node)}; expected a list "
                         f"starting with one of {sorted(_KINDS)}")
    kind = _KINDS[node[0]]
    if kind in (LEAF, CONST):
        if len(node) != 1:
            raise ValueError(f"checkpoint field {where!r} is {_short(node)}; expected "
                             f"[{node[0]!r}]")
        kinds.append(kind)
        return (kind,)
    if len(node) != 4 or not isinstance(node[3], list):
        raise ValueError(f"checkpoint field {where!r} is {_short(node)}; expected [kind, type "
                         "name, keys, children]")
    _, name, keys, children = node
    if name is not None and (not isinstance(name, str) or len(name) > _MAX_NAME):
        raise TypeError(f"checkpoint field '{where}[1]' (a type name) is {_short(name)}; "
                        f"expected None or a string of at most {_MAX_NAME} characters")
    if kind in (TUPLE, LIST):
        if keys is not None:
            raise ValueError(f"checkpoint field '{where}[2]' is {_short(keys)}; a {node[0]} has "
                             "no keys (expected None)")
    else:
        keys = _keys(keys, len(children), f"{where}[2]", kind == NAMEDTUPLE)
    specs = tuple(_spec(c, kinds, f"{where}[3][{i}]", depth + 1)
                  for i, c in enumerate(children))
    if kind in (TUPLE, LIST):
        return (kind, None, None, specs)
    if kind == NAMEDTUPLE:
        return (NAMEDTUPLE, _stand_in(keys), keys, specs)
    return (DICT, dict, keys, specs)  # a Mapping type: a dict until a live batch lends its type


def _keys(keys: Any, n: int, where: str, fields: bool) -> tuple[Any, ...]:
    if not isinstance(keys, (list, tuple)) or len(keys) != n:
        raise ValueError(f"checkpoint field {where!r} is {_short(keys)}; expected a list of {n} "
                         "keys, one per child")
    for k in keys:
        ok = (isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k)
              and not k.startswith("_")) if fields else _plain_key(k)
        if not ok:
            what = "field names (identifiers not starting with '_')" if fields else \
                "keys of plain types (str, int, float, bool, None, bytes or tuples of them)"
            raise ValueError(f"checkpoint field {where!r} holds the key {_short(k)}; expected "
                             f"{what}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"checkpoint field {where!r} repeats a key in {_short(keys)}; expected "
                         "distinct keys")
    return tuple(keys)


def _plain_key(k: Any) -> bool:
    if isinstance(k, tuple):
        return all(_plain_key(x) for x in k)
    return isinstance(k, _KEY_TYPES) and not (isinstance(k, float) and math.isnan(k))


_STAND_INS: dict[tuple[str, ...], Any] = {}


def _stand_in(fields: tuple[str, ...]) -> Any:
    """A namedtuple class with ``fields`` (validated identifiers) for a restored namedtuple."""
    cls = _STAND_INS.get(fields)
    if cls is None:
        cls = _STAND_INS[fields] = collections.namedtuple("RestoredBatch", fields)  # type: ignore[misc]
    return cls


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------- framework layers
def precheck_entry(own: Any, *, target_batch_size: int, device: torch.device) -> None:
    """Validate an entry before an optimizer exists to load it into (the HF Trainer loads its
    optimizer's state before autoaccum's optimizer is built): everything :func:`parse_entry`
    checks that does not depend on that optimizer's settings."""
    ctx = distributed.context()
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    parse_entry(own, target_batch_size=target_batch_size, world=world, rank=rank,
                new_policy=lambda: MicroBatchPolicy(target_batch_size, pinned=None,
                                                    planning=False),
                devices=(torch.device("cpu"), device))


def rank_entries(saved: Any, optimizers: int) -> tuple[int, list[Any]]:
    """The per-rank entries a distributed framework checkpoint gathers (Lightning's callback):
    ``{"optimizer_index": i, "ranks": [entry or None per rank]}``, validated as plain data."""
    if not isinstance(saved, dict) or set(saved) != {"optimizer_index", "ranks"}:
        raise ValueError(f"the checkpoint's autoaccum rank entries are {_short(saved)}; expected "
                         "a dict with exactly 'optimizer_index' and 'ranks'")
    index, ranks = saved["optimizer_index"], saved["ranks"]
    if type(index) is not int or not 0 <= index < optimizers:
        raise ValueError(f"the checkpoint's autoaccum 'optimizer_index' is {_short(index)}; "
                         f"expected an int in [0, {optimizers})")
    if not isinstance(ranks, list) or not ranks or not all(
            isinstance(e, dict) or e is None for e in ranks):
        raise ValueError(f"the checkpoint's autoaccum 'ranks' is {_short(ranks)}; expected a "
                         "non-empty list of per-rank entries (dicts)")
    return index, ranks
