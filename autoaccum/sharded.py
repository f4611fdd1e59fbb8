"""Sharded data parallelism in a multi-rank job: ZeRO-1 and FSDP2, as gradient-sync strategies.

:class:`~autoaccum.AutoAccumOptimizer` picks a :class:`~autoaccum.distributed.GradientSync` at
construction (:func:`gradient_sync`) and calls it at a few points of every step; this module holds
the two sharded ones and the checks that refuse what is not supported (:func:`check_supported`).

``Zero1Sync`` (``torch.distributed.optim.ZeroRedundancyOptimizer`` as the inner optimizer, the
model replicated, DDP or plain): micro-batches and the gradient reduction are the replicated ones;
the planner reserves only this rank's shard of the optimizer state; the inner step is split so
that a local failure cannot hang the others (``ZeroRedundancyOptimizer.step()`` is the local step
followed by broadcasts: the broadcasts wait until every rank confirmed its local step);
``state_dict()`` is this rank's shard.

``FSDPSync`` (FSDP2's ``fully_shard``): FSDP issues collectives inside the model (an all-gather
before each unit's forward and backward, a reduce-scatter after its backward). Every rank must
issue the same ones in the same order, so a rank that raises in the middle of a micro-batch (an
OOM, a bug in ``loss_fn``) would leave its peers waiting forever. Two modes, both exact and both
hang-free:

``"gather_once"`` (default)
    :meth:`FSDPSync.begin_step` all-gathers every unit once; forward and backward then issue no
    collective (resharding off, gradient sync off), gradients accumulate unsharded and locally, so
    each rank runs as many micro-batches as it likes, at its own size, and recovers from an OOM
    on its own, through the same fast path as a replicated model. After the driver's agreement,
    one reduce-scatter per unit. Costs the unsharded parameters and gradients for the whole step
    (DDP's memory, without DDP's optimizer state). If they do not fit on some rank (the gather,
    or a micro-batch of one sample next to them, runs out of memory), every rank switches to
    ``"per_micro"`` for the rest of the run.
``"per_micro"``
    FSDP's own schedule (all-gathers per unit per micro-batch; gradients still accumulate
    unsharded and are reduce-scattered once per step). Every rank must run the same number of
    micro-batches, so micro-batches run at the step's end, in rounds whose count the ranks agree
    (:meth:`FSDPSync.round_count`); a rank with fewer runs zero-weight dummy micro-batches.

Every place where the ranks meet while micro-batches run is a guard exchange: one all-gather of a
row of four int64 (status, kind, value, phase) on the guard group (gloo: host-side flags, no GPU
sync), also right before each of FSDP's collectives. A rank that fails joins the next exchange its
peers reach with a failure status, so every rank learns of it at the same exchange:
:class:`PeerOutOfMemory` (recoverable: reset, agree a new count, replay) or
:class:`~autoaccum.distributed.PeerFailedError` (every rank raises). Ranks that meet at different
kinds of exchange (data-dependent control flow that skips a unit on one rank) raise
:class:`ShardedProtocolError` on every rank instead of hanging.

Private FSDP2 (torch 2.14) internals used, all in one place (:class:`_Fsdp`): the module state,
param groups and their comm objects, ``FSDPParam._unsharded_param.grad`` (the accumulated
unsharded gradient), ``post_forward_mesh_info`` / ``reshard_after_backward`` / ``reduce_grads``
flags, the root's end-of-backward callback (to run the step's reduce-scatters without a backward
pass) and the per-iteration trackers that ``reset_iter_state`` clears.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import Context, GradientSync, PeerFailedError

log = logging.getLogger("autoaccum")

__all__ = [
    "FSDPSync",
    "PeerOutOfMemory",
    "ShardedBytes",
    "ShardedProtocolError",
    "Zero1Sync",
    "check_supported",
    "gradient_sync",
    "local_bytes",
    "local_tensor",
    "local_tensors",
    "sharded_bytes",
]

# Guard row columns and values.
STATUS, KIND, VALUE, PHASE = range(4)
OK, OOM, FAILED = 0, 1, 2
COLLECTIVE, ROUND, REPORT, REDUCED, CLIP = 1, 2, 4, 5, 6
NO_PHASE, FORWARD, BACKWARD, FALLBACK = 0, 1, 2, 3
_KIND_NAMES = {COLLECTIVE: "an FSDP collective", ROUND: "the micro-batch count",
               REPORT: "an error report", REDUCED: "the end of the gradient reduction",
               CLIP: "the gradient norm"}
_PHASE_NAMES = {NO_PHASE: "outside a micro-batch", FORWARD: "forward", BACKWARD: "backward",
                FALLBACK: "a micro-batch of one sample next to the gathered parameters"}
_MESSAGE_BYTES = 512
MODES = ("gather_once", "per_micro")


class PeerOutOfMemory(RuntimeError):
    """Another rank ran out of memory in a micro-batch; this rank's current micro-batch was
    abandoned at the guard before an FSDP collective. Recoverable (the driver replays). Not an
    out-of-memory error of this rank: its micro-batch size is not the problem."""

    autoaccum_remote = True

    def __init__(self, message: str, ranks: Sequence[int], phases: Sequence[int]) -> None:
        super().__init__(message)
        self.ranks = list(ranks)
        self.phases = list(phases)


class ShardedProtocolError(RuntimeError):
    """The ranks met at different points of a step (e.g. one rank skipped an FSDP unit): raised
    on every rank instead of a hang or a silently mismatched collective."""

    autoaccum_remote = True


def _remote(exc: BaseException) -> bool:
    """An error every rank already has (raised at a collective), not this rank's own."""
    return bool(getattr(exc, "autoaccum_remote", False))


# --------------------------------------------------------------------------------------- detection
def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def find_fsdp_modules(model: nn.Module | None) -> list[nn.Module]:
    """The modules ``fully_shard`` was applied to, in ``model.modules()`` (pre-)order."""
    cls = _fsdp_module_class()
    if model is None or cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def fsdp_roots(model: nn.Module | None) -> list[nn.Module]:
    """FSDP modules without an FSDP ancestor: the roots FSDP's lazy init picks (one when the top
    module is sharded too, as recommended; several when only blocks are)."""
    cls = _fsdp_module_class()
    if model is None or cls is None:
        return []
    roots: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        if isinstance(module, cls):
            roots.append(module)
            return
        for child in module.children():
            walk(child)

    walk(model)
    return roots


_DTENSOR: list[type] = []


def _is_dtensor(t: Any) -> bool:
    if not _DTENSOR:
        from torch.distributed.tensor import DTensor

        _DTENSOR.append(DTensor)
    return isinstance(t, _DTENSOR[0])


def _unwrap_ddp(model: nn.Module | None) -> tuple[nn.Module | None, bool]:
    if model is not None and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, True
    return model, False


def check_supported(model: nn.Module | None, params: Iterable[torch.Tensor],
                    optimizer: torch.optim.Optimizer | None = None,
                    world_size: int | None = None) -> str:
    """What kind of data parallelism ``params`` come from, or a clear error naming what is
    supported. Returns ``"replicated"`` (plain or DDP parameters), ``"zero1"`` (replicated
    parameters under ``ZeroRedundancyOptimizer``) or ``"fsdp"`` (every parameter sharded by
    FSDP2's ``fully_shard`` over a 1-D mesh spanning the job).

    Refused: tensor parallelism (DTensor parameters FSDP does not manage, or FSDP over a 2-D
    mesh), HSDP and ``replicate()`` (a replicate mesh dimension), FSDP over a sub-group of the
    job, DDP wrapped around FSDP modules, FSDP modules next to parameters outside FSDP, FSDP1
    (``FullyShardedDataParallel``), and ``ZeroRedundancyOptimizer`` over sharded parameters.
    """
    params = list(params)
    supported = (
        "AutoAccumOptimizer supports, in a multi-rank job: replicated parameters (a plain module "
        "or DistributedDataParallel), ZeroRedundancyOptimizer over replicated parameters "
        "(ZeRO-1), and FSDP2's fully_shard over a 1-D device mesh spanning every rank, with "
        "every trained parameter under fully_shard (apply it to the top module too)."
    )
    inner_model, is_ddp = _unwrap_ddp(model)
    if inner_model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in inner_model.modules()):
            raise NotImplementedError(f"FSDP1 (FullyShardedDataParallel) is not supported. "
                                      f"{supported} Port the model to fully_shard.")
    dtensors = [p for p in params if _is_dtensor(p)]
    zero = optimizer is not None and _is_zero_redundancy(optimizer)
    if not dtensors:
        fsdp_modules = find_fsdp_modules(inner_model)
        if fsdp_modules:
            raise NotImplementedError(
                f"the model has {len(fsdp_modules)} fully_shard module(s) but the optimizer's "
                f"parameters are plain tensors (built before fully_shard?). Build the optimizer "
                f"after fully_shard, from model.parameters(). {supported}"
            )
        if zero and getattr(optimizer, "_overlap_with_ddp", False):
            raise NotImplementedError(f"ZeroRedundancyOptimizer(overlap_with_ddp=True) steps "
                                      f"inside DDP's backward; it is not supported. {supported}")
        return "zero1" if zero else "replicated"
    if zero:
        raise NotImplementedError(f"ZeroRedundancyOptimizer over sharded (DTensor) parameters "
                                  f"is not supported. {supported}")
    if is_ddp:
        raise NotImplementedError(f"DistributedDataParallel around sharded (DTensor) parameters "
                                  f"(mixed DDP and FSDP) is not supported. {supported}")
    managed = _fsdp_managed(inner_model)
    foreign = [p for p in dtensors if id(p) not in managed]
    if foreign:
        mesh_dims = sorted({p.device_mesh.ndim for p in foreign})  # type: ignore[attr-defined]
        raise NotImplementedError(
            f"{len(foreign)} sharded (DTensor) parameter(s) are not managed by fully_shard on "
            f"the model given as model= (tensor parallelism or distribute_tensor? mesh "
            f"dimensions {mesh_dims}; or model= was not passed). {supported}"
        )
    plain = [p for p in params if not _is_dtensor(p) and p.requires_grad]
    if plain:
        raise NotImplementedError(
            f"{len(plain)} trained parameter(s) are plain tensors next to fully_shard ones: they "
            f"would not be reduced across ranks (mixed DDP and FSDP). {supported}"
        )
    _check_groups(_Fsdp.groups_of(inner_model), world_size, supported)
    return "fsdp"


def _check_groups(groups: list[Any], world_size: int | None, supported: str) -> None:
    """The most specific refusal first: tensor parallelism, then HSDP / replicate, then a
    sub-mesh (with TP+FSDP every unit is also sharded over a sub-mesh)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import (
        DDPMeshInfo,
        FSDPMeshInfo,
        HSDPMeshInfo,
    )

    def where(group: Any) -> str:
        names = sorted({type(m).__name__ for m in group.modules})
        return group._module_fqn or f"the fully_shard unit of {', '.join(names)}"

    for group in groups:
        for fp in group.fsdp_params:
            if getattr(fp, "is_dtensor", False):  # a DTensor before fully_shard: TP / EP
                info = fp._module_info
                name = fp._param_fqn or f"{type(info.module).__name__}.{info.param_name}"
                raise NotImplementedError(
                    f"parameter {name} of {where(group)} was already a DTensor before "
                    f"fully_shard (tensor or expert parallelism combined with FSDP). {supported}"
                )
    for group in groups:
        info = group.mesh_info
        if isinstance(info, HSDPMeshInfo):
            raise NotImplementedError(f"HSDP (fully_shard over a 2-D replicate x shard mesh, at "
                                      f"{where(group)}) is not supported. {supported}")
        if isinstance(info, DDPMeshInfo) or not isinstance(info, FSDPMeshInfo):
            raise NotImplementedError(f"replicate() / DDP-style FSDP2 units ({where(group)}) are "
                                      f"not supported. {supported}")
    for group in groups:
        shard_size = group.mesh_info.shard_mesh_size
        if world_size is not None and shard_size != world_size:
            raise NotImplementedError(
                f"fully_shard shards {where(group)} over {shard_size} of the job's {world_size} "
                f"ranks (a sub-mesh: HSDP-like or mixed parallelism). {supported}"
            )


def _fsdp_managed(model: nn.Module | None) -> set[int]:
    return {id(fp.sharded_param) for g in _Fsdp.groups_of(model) for fp in g.fsdp_params}


def _is_zero_redundancy(optimizer: torch.optim.Optimizer) -> bool:
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(optimizer, ZeroRedundancyOptimizer)



def gradient_sync(model: nn.Module | None, optimizer: torch.optim.Optimizer, ctx: Context | None,
                  *, fsdp_mode: str = "gather_once", grad_scaler: Any = None) -> GradientSync:
    """The strategy for this job (see :func:`check_supported`): replicated
    (:class:`~autoaccum.distributed.GradientSync`), :class:`Zero1Sync` or :class:`FSDPSync`.
    Constructing an :class:`FSDPSync` changes the FSDP modules' reduction settings and may create
    a gloo group: every rank must call this at the same point."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if ctx is None and not any(_is_dtensor(p) for p in params):
        if _is_zero_redundancy(optimizer):
            return Zero1Sync(model, optimizer)
        return GradientSync(model)
    world = ctx.world_size if ctx is not None else dist.get_world_size()
    kind = check_supported(model, params, optimizer, world)
    if kind == "zero1":
        return Zero1Sync(model, optimizer)
    if kind == "replicated":
        return GradientSync(model)
    if grad_scaler is not None:
        raise NotImplementedError(
            "grad_scaler= with FSDP2 is not supported (its inf check would be a collective "
            "inside the step); train FSDP2 models in bf16 (MixedPrecisionPolicy(param_dtype="
            "torch.bfloat16)) without loss scaling"
        )
    inner, _ = _unwrap_ddp(model)
    assert inner is not None  # check_supported refused model=None
    return FSDPSync(inner, mode=fsdp_mode)


# ----------------------------------------------------------------------------------------- ZeRO-1
def _no_op() -> None:
    pass


class Zero1Sync(GradientSync):
    """``ZeroRedundancyOptimizer`` over replicated parameters.

    Micro-batches, the agreement and the gradient reduction are the replicated ones (every rank
    holds the whole summed gradient). The planner reserves state only for this rank's partition.
    ``ZeroRedundancyOptimizer.step()`` runs the local step and then broadcasts every rank's
    updated partition; if the local step raised on one rank (an OOM allocating Adam's state),
    the others would wait in the broadcast while it waits in the driver's confirmation. So the
    broadcast is held back (:meth:`step`) until every rank confirmed (:meth:`after_confirm`).

    Checkpoints are per rank: :meth:`optimizer_state_dict` is this rank's shard (the local
    optimizer's state dict, with ``"zero1_shard": {"rank", "world_size"}``), loadable on the same
    rank of a job of the same size. A consolidated state dict
    (``opt.optimizer.consolidate_state_dict(to=0)`` on every rank, then
    ``opt.optimizer.state_dict()`` on rank 0) loads too, on any world size.
    """

    kind = "zero1"

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model)
        self.zero: Any = optimizer

    def state_owner(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
                    ) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        local = self.zero.optim
        return local, [p for g in local.param_groups for p in g["params"]]

    def step(self, inner_step: Callable[[], None]) -> None:
        zero = self.zero
        zero._sync_params = _no_op  # the broadcast waits for every rank's confirmation
        try:
            inner_step()
        finally:
            del zero._sync_params

    def after_confirm(self) -> None:
        self.zero._sync_params()

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        zero = self.zero
        zero._sync_param_groups(zero.param_groups, zero.optim.param_groups)  # a scheduler's lr
        sd: dict[str, Any] = zero.optim.state_dict()
        sd["zero1_shard"] = {"rank": int(zero.rank), "world_size": int(zero.world_size)}
        return sd

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        zero = self.zero
        shard = state.get("zero1_shard")
        if shard is None:  # a consolidated state dict (ZeroRedundancyOptimizer.state_dict())
            zero.load_state_dict(state)
            return
        here = {"rank": int(zero.rank), "world_size": int(zero.world_size)}
        if dict(shard) != here:
            raise ValueError(
                f"this ZeRO-1 checkpoint holds the optimizer shard of rank {shard['rank']} of "
                f"{shard['world_size']}; this is rank {here['rank']} of {here['world_size']}. "
                "Load each rank's own file in a job of the same size, or save a consolidated "
                "state (opt.optimizer.consolidate_state_dict(to=0), then "
                "opt.optimizer.state_dict() on rank 0)"
            )
        local = {k: v for k, v in state.items() if k != "zero1_shard"}
        zero.optim.load_state_dict(local)
        zero._sync_param_groups(zero.optim.param_groups, zero.param_groups)


# ------------------------------------------------------------------------------------ byte counts
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns this rank's memory: a DTensor's local shard, else ``t`` itself.
    Memory backends and the planner should count these, never a DTensor's global size
    (``DTensor.untyped_storage().nbytes()`` reports the *global* size)."""
    if _is_dtensor(t):
        return t._local_tensor  # type: ignore[attr-defined,no-any-return]
    return t


def local_tensors(tensors: Iterable[Any]) -> Iterator[torch.Tensor]:
    """:func:`local_tensor` of every tensor in ``tensors`` (others are skipped)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            yield local_tensor(t)


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes this rank holds for ``tensors`` (local shards of DTensors)."""
    return sum(t.numel() * t.element_size() for t in local_tensors(tensors))


@dataclass(frozen=True)
class ShardedBytes:
    """What an FSDP2 model costs on this rank, in bytes (padding of the last shard ignored).

    ``local_params`` / ``local_grads``: the sharded parameters and gradients (resident).
    ``unsharded_params`` / ``unsharded_grads``: every unit gathered / every unit's full gradient
    accumulated locally (in the reduce dtype under mixed precision, if larger).
    """

    local_params: int
    local_grads: int
    unsharded_params: int
    unsharded_grads: int

    def step_extra(self, mode: str) -> int:
        """Bytes beyond the resident local shards (and optimizer state) that a step holds for
        all of its micro-batches, activations not included: what the planner subtracts from
        free memory. ``"gather_once"``: every unit gathered and every unit's gradient
        accumulated unsharded. ``"per_micro"``: the unsharded gradients (the units FSDP gathers
        during a micro-batch count as that micro-batch's memory)."""
        if mode == "gather_once":
            return self.unsharded_params + self.unsharded_grads
        return self.unsharded_grads


def sharded_bytes(model: nn.Module) -> ShardedBytes:
    """:class:`ShardedBytes` of a model after ``fully_shard`` (before or after its first step).
    Counts this rank's local shards, not the global tensors."""
    local_params = local_grads = unsharded_params = unsharded_grads = 0
    for _, group in _Fsdp.module_groups(model):
        for fp in group.fsdp_params:
            sharded = fp.sharded_param
            local = local_tensor(sharded)
            numel = sharded.numel()  # global
            param_dtype = getattr(fp, "param_dtype", None) or sharded.dtype
            reduce_dtype = getattr(fp, "reduce_dtype", None) or param_dtype
            p_size = torch.empty((), dtype=param_dtype).element_size()
            r_size = torch.empty((), dtype=reduce_dtype).element_size()
            local_params += local.numel() * local.element_size()
            unsharded_params += numel * p_size
            if sharded.requires_grad:
                local_grads += local.numel() * local.element_size()
                unsharded_grads += numel * max(p_size, r_size)
    return ShardedBytes(local_params, local_grads, unsharded_params, unsharded_grads)


# ------------------------------------------------------------------------------------- FSDP access
# ------------------------------------------------------------------------------------- FSDP access
class _Fsdp:
    """Every private FSDP2 attribute this module touches, in one place (torch 2.14)."""

    @staticmethod
    def state(module: nn.Module) -> Any:
        return module._get_fsdp_state()  # type: ignore[operator]

    @staticmethod
    def module_groups(model: nn.Module | None) -> Iterator[tuple[nn.Module, Any]]:
        for module in find_fsdp_modules(model):
            for group in _Fsdp.state(module)._fsdp_param_groups:
                yield module, group

    @staticmethod
    def groups_of(model: nn.Module | None) -> list[Any]:
        return [g for _, g in _Fsdp.module_groups(model)]

    @staticmethod
    def lazy_init(root: nn.Module) -> None:
        """FSDP's root lazy init (normally at the first forward): before unsharding by hand."""
        _Fsdp.state(root)._lazy_init()

    @staticmethod
    def unsharded_grads(groups: Iterable[Any]) -> list[torch.Tensor]:
        """The gradients accumulated unsharded: ``_unsharded_param.grad`` and, under a
        mixed-precision ``reduce_dtype``, ``unsharded_accumulated_grad`` (FSDP folds the former
        into the latter after each backward; both are returned if both exist)."""
        out = []
        for group in groups:
            for fp in group.fsdp_params:
                acc = getattr(fp, "unsharded_accumulated_grad", None)
                if acc is not None:
                    out.append(acc)
                param = getattr(fp, "_unsharded_param", None)
                if param is not None and param.grad is not None:
                    out.append(param.grad)
        return out

    @staticmethod
    def clear_unsharded_grads(groups: Iterable[Any]) -> None:
        for group in groups:
            for fp in group.fsdp_params:
                param = getattr(fp, "_unsharded_param", None)
                if param is not None:
                    param.grad = None
                fp.unsharded_accumulated_grad = None

    @staticmethod
    def soft_reset(root: nn.Module) -> None:
        """``reset_iter_state`` without resharding: clears the per-iteration trackers an
        exception left behind (training states, forward root, queued callback flag, post-forward
        order) and keeps gathered units gathered. Only valid when no collective is in flight
        (gather_once mode: micro-batches issue none)."""
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        state = _Fsdp.state(root)
        ctx = state._state_ctx
        comm = state._comm_ctx
        if getattr(comm, "all_gather_state", None) is not None:
            comm.all_gather_state = None
        if hasattr(comm, "post_forward_order"):
            comm.post_forward_order.clear()
        for st in ctx.all_states or [state]:
            st._modules_to_run_forward.clear()
            st._training_state = TrainingState.IDLE
            for group in st._fsdp_param_groups:
                group._post_forward_indices.clear()
                group._training_state = TrainingState.IDLE
        ctx.iter_forward_root = None
        ctx.post_backward_final_callback_queued = False

    @staticmethod
    def reset(root: nn.Module) -> None:
        """``reset_iter_state`` (public since torch 2.14): wait for in-flight collectives,
        reshard every unit, clear the per-iteration trackers. Older torch: the trackers by hand
        and a reshard of every group (in-flight work is not awaited: CPU/gloo only)."""
        reset = getattr(root, "reset_iter_state", None)
        if reset is not None:
            reset()
            return
        _Fsdp.soft_reset(root)  # pragma: no cover - torch < 2.14
        for st in _Fsdp.state(root)._state_ctx.all_states:  # pragma: no cover
            for group in st._fsdp_param_groups:
                group._all_gather_result = None
                group._to_sharded()

    @staticmethod
    def run_post_backward(root: nn.Module) -> None:
        """FSDP's end-of-backward callback without a backward pass: every group's post-backward
        (which reduce-scatters when ``reduce_grads`` is set) in FSDP's own order, then the
        finalization (waits, trackers cleared)."""
        state = _Fsdp.state(root)
        state._state_ctx.is_last_backward = True
        state._root_post_backward_final_callback()

    @staticmethod
    def wrap_comms(group: Any, guard: Guard, index: int) -> None:
        if not isinstance(group._all_gather_comm, _GuardedAllGather):
            group._all_gather_comm = _GuardedAllGather(group._all_gather_comm, guard, 2 * index)
        if not isinstance(group._reduce_scatter_comm, _GuardedReduceScatter):
            group._reduce_scatter_comm = _GuardedReduceScatter(group._reduce_scatter_comm, guard,
                                                               2 * index + 1)

    @staticmethod
    def process_group(group: Any) -> dist.ProcessGroup:
        return group.mesh_info.shard_process_group  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ guard
class Guard:
    """The ranks' meeting point while micro-batches run: one all-gather of a 4-int row.

    ``sync(kind, value)`` on the normal path returns every rank's value; if any rank reported a
    failure at this exchange it raises :class:`PeerOutOfMemory` or
    :class:`~autoaccum.distributed.PeerFailedError` instead (after one more exchange carrying the
    messages). ``report(status, phase, message)`` is the failing rank's side: it joins whatever
    exchange the peers are at and returns. ``active`` switches the per-collective guards of
    :class:`FSDPSync` on and off (the explicit exchanges always run).
    """

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, rank: int) -> None:
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.active = True
        self.exchanges = 0  # how many exchanges ran (tests and cost measurements)
        self.all_gathers = 0  # FSDP all-gathers / reduce-scatters seen by the guarded comms
        self.reduce_scatters = 0
        # Seconds blocked in exchanges and in FSDP's collectives (cumulative): waiting for the
        # peers to arrive, plus the transfer. The driver leaves it out of the compute time it
        # reports for "auto" shares, which would otherwise count a slower peer's time as this
        # rank's own. Two perf_counter calls per exchange / collective. On gloo (CPU) every
        # collective blocks the host until all ranks are in it, so this is the whole wait. With
        # NCCL the guard exchanges still run on gloo and block the host: captured is the skew
        # between the ranks' hosts, which follows the GPUs' skew as far as each host is held back
        # by its GPU (syncs, allocator); the NCCL collectives themselves return once enqueued
        # on FSDP's stream (and async ones are waited inside FSDP, outside the comm call), so the
        # time a stream waits there for a peer's kernel is not captured.
        self.wait_seconds = 0.0
        # Every buffer an exchange uses, allocated once here: an exchange never allocates, so a
        # rank at the edge of its memory (or a SimulatedDevice counting host tensors) can always
        # reach its peers, also from the error path.
        self._row = torch.zeros(4, dtype=torch.int64)
        self._table = torch.zeros(world_size * 4, dtype=torch.int64)
        self._floats = torch.zeros(2, dtype=torch.float64)
        self._float_table = torch.zeros(world_size * 2, dtype=torch.float64)
        self._message = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
        self._message_table = torch.zeros(world_size * _MESSAGE_BYTES, dtype=torch.uint8)

    def _gather(self, row: list[int]) -> torch.Tensor:
        local = self._row
        for i, v in enumerate(row):
            local[i] = v
        self._exchange(self._table, local)
        self.exchanges += 1
        return self._table.view(self.world_size, len(row))

    def _exchange(self, out: torch.Tensor, local: torch.Tensor) -> None:
        started = time.perf_counter()
        _all_gather(out, local, group=self.group)
        self.wait_seconds += time.perf_counter() - started

    def sync(self, kind: int, value: int = 0) -> list[int]:
        """Meet the other ranks (normal path). Every rank's ``value``."""
        table = self._gather([OK, kind, value, NO_PHASE])
        statuses = table[:, STATUS].tolist()
        if any(statuses):
            self._raise_peer_failure(table, self._messages(None))
        kinds = table[:, KIND].tolist()
        values = table[:, VALUE].tolist()
        if len(set(kinds)) > 1 or (kind == COLLECTIVE and len(set(values)) > 1):
            where = "; ".join(
                f"rank {r}: {_KIND_NAMES.get(k, k)}" + (f" #{v}" if k == COLLECTIVE else "")
                for r, (k, v) in enumerate(zip(kinds, values))
            )
            raise ShardedProtocolError(
                f"the ranks reached different points of the step ({where}): FSDP needs every "
                "rank to run the same units in the same order (no data-dependent skipping of "
                "fully_shard units) and every rank to call the step protocol alike"
            )
        return [int(v) for v in values]

    def gather_floats(self, values: list[float]) -> torch.Tensor:
        """Every rank's ``values`` (float64, one row per rank): an exchange outside the kinds
        :meth:`sync` checks, for numbers a step needs from every rank (the gradient norm)."""
        if len(values) != 2:
            raise ValueError(f"gather_floats takes 2 values, got {len(values)}")
        local = self._floats
        for i, v in enumerate(values):
            local[i] = v
        self._exchange(self._float_table, local)
        self.exchanges += 1
        return self._float_table.view(self.world_size, len(values))

    def report(self, status: int, phase: int, message: str) -> list[int]:
        """The failing rank's side: join the exchange the others are at with ``status``
        (:data:`OOM` or :data:`FAILED`). Returns the statuses of every rank; never raises for a
        peer's failure (the caller raises its own error or recovers)."""
        table = self._gather([status, REPORT, 0, phase])
        self._messages(message)
        return [int(s) for s in table[:, STATUS].tolist()]

    def _messages(self, message: str | None) -> list[str | None]:
        data = (message or "").encode("utf-8", errors="replace")[: _MESSAGE_BYTES - 1]
        local = self._message
        local.zero_()
        local[0] = 1 if message is not None else 0
        if data:  # frombuffer shares the bytes (no allocation); copy_ writes into the buffer
            local[1 : 1 + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        gathered = self._message_table
        self._exchange(gathered, local)
        out: list[str | None] = []
        for row in gathered.view(self.world_size, _MESSAGE_BYTES):
            if not int(row[0]):
                out.append(None)
            else:
                out.append(bytes(row[1:].tolist()).rstrip(b"\0").decode("utf-8", "replace"))
        return out

    def _raise_peer_failure(self, table: torch.Tensor, messages: list[str | None]) -> None:
        statuses = table[:, STATUS].tolist()
        phases = table[:, PHASE].tolist()
        failed = [r for r, s in enumerate(statuses) if s != OK]
        details = "; ".join(
            f"rank {r} in {_PHASE_NAMES.get(phases[r], '?')}: {messages[r]}" for r in failed
        )
        if all(statuses[r] == OOM for r in failed):
            raise PeerOutOfMemory(
                f"rank(s) {failed} ran out of memory ({details}); this rank's micro-batch was "
                "stopped before an FSDP collective so that no rank waits forever",
                failed, [phases[r] for r in failed],
            )
        raise PeerFailedError(f"the step stopped on every rank because another rank failed "
                              f"({details})")


class _GuardedComm:
    """One of FSDP's comms (all-gather or reduce-scatter) with a guard exchange right before its
    collective, i.e. after FSDP allocated the collective's buffers: a rank that runs out of
    memory allocating them can still meet its peers at this exchange from its error path. The
    collective's own time counts as waiting (:attr:`Guard.wait_seconds`)."""

    def __init__(self, inner: Any, guard: Guard, tag: int) -> None:
        self.inner, self.guard, self.tag = inner, guard, tag

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)  # type: ignore[no-any-return]

    def _run(self, **kwargs: Any) -> Any:
        guard = self.guard
        if guard.active:
            guard.sync(COLLECTIVE, self.tag)
        started = time.perf_counter()  # blocking on gloo; see Guard.wait_seconds
        work = self.inner(**kwargs)
        guard.wait_seconds += time.perf_counter() - started
        return work


class _GuardedAllGather(_GuardedComm):
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False) -> Any:
        self.guard.all_gathers += 1
        return self._run(output_tensor=output_tensor, input_tensor=input_tensor, group=group,
                         async_op=async_op)


class _GuardedReduceScatter(_GuardedComm):
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: Any, async_op: bool = False) -> Any:
        self.guard.reduce_scatters += 1
        return self._run(output_tensor=output_tensor, input_tensor=input_tensor, group=group,
                         op=op, async_op=async_op)


# -------------------------------------------------------------------------------------- the step
_IDLE, _RUNNING, _CLOSED = range(3)


class FSDPSync(GradientSync):
    """The gradient-sync strategy for an FSDP2 (``fully_shard``) model in a multi-rank job.

    Built by :func:`gradient_sync` on every rank at the same moment (it may create a gloo group
    for the guard), after ``fully_shard``. It sets FSDP's gradient divide factor to 1 and
    sum-only reductions on every unit (the driver scales each rank's gradients itself, so a
    reduce-scatter is a plain sum: gloo has no PREMUL_SUM) and installs the guarded comms.

    Per step, on every rank (also one without samples, e.g. in a flush), the driver calls:

    1. :meth:`begin_step`.
    2. Micro-batches. ``gather_once``: locally, any number, any size (OOM: :meth:`recover`,
       which touches no peer). Then ``round_count(0)``: the step's closing exchange.
       ``per_micro``: rounds ``k = round_count(wanted)`` (``wanted``: the micro-batches this rank
       still needs, 0 once it has run all of its samples); exactly ``k`` micro-batches, dummies
       (loss times 0 on one sample) where this rank has none left; until ``k`` is 0.
    3. On ``torch.OutOfMemoryError`` (this rank) or :class:`PeerOutOfMemory`, outside the except
       block: ``rewind = recover(...)``; if ``rewind``, the driver clears ``.grad`` and
       :meth:`clear_local_grads` and replays the step's samples, else only the interrupted
       micro-batch. A one-sample OOM in ``gather_once`` falls back to ``per_micro`` on every
       rank (``recover(smallest=True)``); in ``per_micro`` it is fatal (step 4).
    4. Any other exception: :meth:`fail`, which meets the peers at the exchange they are at
       (until the closing exchange) so that they raise :class:`PeerFailedError`, and resets FSDP.
    5. The driver's agreement, then :meth:`reduce` (one guarded reduce-scatter per unit; its
       result is the same on every rank, so that :meth:`clip`, a collective, runs on all or
       none), the inner step and the driver's confirmation.
    6. :meth:`end_step` (also after a failure).
    """

    kind = "fsdp"
    rounds = True
    rewind_on_failure = True

    def __init__(self, model: nn.Module, *, mode: str = "gather_once",
                 guard_group: dist.ProcessGroup | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"fsdp_mode must be 'gather_once' or 'per_micro', got {mode!r}")
        super().__init__(None)
        self.model = model
        self.roots = fsdp_roots(model)
        if not self.roots:
            raise ValueError("FSDPSync needs a model with fully_shard modules")
        self.groups = _Fsdp.groups_of(model)
        pg = _Fsdp.process_group(self.groups[0])
        self.world_size = dist.get_world_size(pg)
        self.rank = dist.get_rank(pg)
        self.guard = Guard(guard_group or _gloo_group(pg), self.world_size, self.rank)
        self.mode = mode
        self.fallbacks = 0  # switches from gather_once to per_micro
        for module in find_fsdp_modules(model):  # not recursive: every unit
            module.set_gradient_divide_factor(1.0)  # type: ignore[operator]
            force_sum = getattr(module, "set_force_sum_reduction_for_comms", None)
            if force_sum is not None:  # gloo has no PREMUL_SUM (fp32/bf16 with a factor)
                force_sum(True)
        for i, group in enumerate(self.groups):
            _Fsdp.wrap_comms(group, self.guard, i)
            group.reduce_scatter_unused_params = True  # same reduce-scatter sizes on every rank
        self.bytes = sharded_bytes(model)
        self._grad_sizes = [  # (FSDP parameter, bytes of its unsharded gradient)
            (fp, fp.sharded_param.numel() * torch.empty(
                (), dtype=getattr(fp, "param_dtype", None) or fp.sharded_param.dtype
            ).element_size())
            for g in self.groups for fp in g.fsdp_params if fp.sharded_param.requires_grad
        ]
        self._saved: list[tuple[Any, bool, Any, bool, bool]] = []
        self._phase = _IDLE
        self._step_mode = mode
        self.guard.active = False

    # ------------------------------------------------------------------ what the driver reads
    @property
    def in_step(self) -> bool:
        return self._phase != _IDLE

    @property
    def step_mode(self) -> str:
        """The mode of the current step (of the next one between steps)."""
        return self._step_mode if self._phase != _IDLE else self.mode

    @property
    def defers_micro_batches(self) -> bool:
        return self.step_mode == "per_micro"

    @property
    def can_fall_back(self) -> bool:
        """Whether a one-sample OOM can still be cured by dropping the gathered parameters."""
        return self._phase == _RUNNING and self._step_mode == "gather_once"

    @property
    def wait_seconds(self) -> float:
        """Seconds this rank was blocked at guard exchanges and in FSDP's collectives so far
        (:attr:`Guard.wait_seconds`): time a faster rank spends waiting for a slower one, which
        the driver keeps out of the compute time behind "auto" shares."""
        return self.guard.wait_seconds

    def extra_bytes(self) -> int:
        return self.bytes.step_extra(self.step_mode)

    def missing_bytes(self) -> int:
        missing = 0
        for fp, nbytes in self._grad_sizes:
            param = getattr(fp, "_unsharded_param", None)
            if fp.unsharded_accumulated_grad is None and (param is None or param.grad is None):
                missing += nbytes
        return missing

    def accumulator(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        if self._grad_sizes:
            param = getattr(self._grad_sizes[0][0], "_unsharded_param", None)
            if param is not None:
                return param  # type: ignore[no-any-return]
        return params[0] if params else None

    def buffers(self) -> list[torch.Tensor]:
        return []

    def materialize_local_grads(self) -> None:
        for fp, _ in self._grad_sizes:
            param = getattr(fp, "_unsharded_param", None)
            if param is not None and param.grad is None and fp.unsharded_accumulated_grad is None:
                param.grad = torch.zeros_like(param)

    def clear_local_grads(self) -> None:
        _Fsdp.clear_unsharded_grads(self.groups)

    def micro_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def prepare(self, params: Sequence[torch.Tensor]) -> None:
        pass  # FSDP reduce-scatters the unsharded gradients into the sharded ones

    def reduction_bytes(self, params: Sequence[torch.Tensor]) -> int:
        return 0  # no bucket (extra_bytes counts what FSDP holds)

    # ------------------------------------------------------------------ the step
    def begin_step(self) -> None:
        """Every rank, once per step, before its first micro-batch. ``gather_once``:
        all-gathers every unit (guarded); if any rank runs out of memory doing so, every rank
        reshards and runs per micro-batch from now on."""
        if self._phase != _IDLE:
            raise RuntimeError("begin_step() called twice without end_step()")
        self._phase = _RUNNING
        self._step_mode = self.mode
        self._saved = [(g, g.reshard_after_backward, g.post_forward_mesh_info, g.reduce_grads,
                        g.all_reduce_grads) for g in self.groups]
        for g in self.groups:
            g.reduce_grads = False
            g.all_reduce_grads = False
        self.guard.active = True  # every FSDP collective below and in micro-batches is guarded
        if self._step_mode == "per_micro":
            return
        for g in self.groups:
            g.post_forward_mesh_info = None  # no reshard after forward
            g.reshard_after_backward = False
        failure: BaseException | None = None
        try:
            for root in self.roots:
                _Fsdp.lazy_init(root)
            for module in find_fsdp_modules(self.model):
                module.unshard()  # type: ignore[operator]
        except PeerOutOfMemory as exc:
            failure = exc
        except torch.OutOfMemoryError as exc:
            self.guard.report(OOM, FALLBACK, f"gathering the parameters: {_first_line(exc)}")
            failure = exc
        except BaseException as exc:
            self.fail(exc, False)
            raise
        # Micro-batches issue no collective now; the guard stays on so that an unexpected one
        # (a unit gathered again) ends in ShardedProtocolError rather than a hang.
        if failure is None:
            return
        del failure
        self._switch_to_per_micro()  # some rank cannot hold every unit gathered

    def round_count(self, wanted: int) -> int:
        """How many micro-batches to run now: the largest ``wanted`` over the ranks (one guard
        exchange); 0 closes the micro-batches of the step on every rank. ``gather_once``: called
        with 0 only (micro-batches ran locally): the closing exchange. Raises
        :class:`PeerOutOfMemory` / PeerFailedError when a peer reports at this point."""
        if wanted < 0:
            raise ValueError(f"wanted must be >= 0, got {wanted}")
        k = max(self.guard.sync(ROUND, wanted))
        if k == 0:
            self._phase = _CLOSED
        return k

    def recover(self, *, in_backward: bool, message: str = "", peer_phases: Sequence[int] = (),
                smallest: bool = False) -> bool:
        """After an OOM on this rank (``message``), or a :class:`PeerOutOfMemory` (its
        ``peer_phases``): tell the peers when they need to know, leave FSDP's state legal, and
        return whether the driver must rewind the whole step (True) or only replay the
        interrupted micro-batch (False).

        ``smallest``: this rank's micro-batch was one sample. ``gather_once``: every rank then
        drops the gathered parameters and continues the step (and the following ones) per
        micro-batch, rewinding it (returns True). ``per_micro``: not allowed (fatal: the driver
        raises, and :meth:`fail` tells the peers)."""
        phase = BACKWARD if in_backward else FORWARD
        peer = bool(peer_phases)
        if self._step_mode == "per_micro":
            if smallest and not peer:
                raise ValueError("recover(smallest=True) in per_micro mode: nothing smaller")
            if not peer:
                self.guard.report(OOM, phase, message)
            self._reset_fsdp(reshard=True)
            return in_backward
        if peer:
            if FALLBACK not in peer_phases:  # gather_once micro-batches exchange nothing
                raise RuntimeError("unexpected PeerOutOfMemory in gather_once mode")
            self._switch_to_per_micro()
            return True
        if smallest:  # tell the others (they meet this at round_count(0)), then all switch
            self.guard.report(OOM, FALLBACK, f"cannot fit one sample next to the gathered "
                              f"parameters: {message}")
            self._switch_to_per_micro()
            return True
        self._reset_fsdp(reshard=False)  # local: the peers never hear of it
        return in_backward

    def fail(self, exc: BaseException, in_backward: bool, agreed: bool = False) -> bool:
        """Any exception that ends the step on this rank: until the step's closing exchange the
        peers wait at guard exchanges, so meet them there with a failure (they raise
        PeerFailedError); after it (or once the ranks ``agreed``) they learn in the driver's
        agreement or confirmation. Then reset FSDP and end the step. Returns whether the peers
        know."""
        told = _remote(exc)
        if not told and not agreed and self._phase != _CLOSED:
            phase = BACKWARD if in_backward else FORWARD
            with contextlib.suppress(Exception):
                self.guard.report(FAILED, phase, f"{type(exc).__name__}: {_first_line(exc)}")
                told = True
        self._reset_fsdp(reshard=True)
        self.end_step()
        return told

    def reduce(self, ctx: Context, params: Sequence[torch.Tensor], scale: Any
               ) -> BaseException | None:
        """After the agreement: scale this rank's accumulated gradients by ``scale`` and sum them
        into the sharded ``.grad`` (one guarded reduce-scatter per unit, in FSDP's order), then
        one closing guard exchange. Returns None on every rank, or an error on every rank (this
        rank's own, or a PeerFailedError naming the rank that failed), never raising."""
        error: BaseException | None = None
        try:
            grads = _Fsdp.unsharded_grads(self.groups)
            if grads and scale is not None:
                torch._foreach_mul_(grads, scale)
        except BaseException as exc:  # a local failure before any reduce-scatter
            error = exc
        self.guard.active = True
        try:
            if error is not None:
                raise error
            for g in self.groups:
                g.reduce_grads = True
                g.all_reduce_grads = True
                g.reshard_after_backward = True
            for root in self.roots:
                _Fsdp.run_post_backward(root)
            self.guard.sync(REDUCED)
        except BaseException as exc:
            if not _remote(exc):
                with contextlib.suppress(Exception):
                    self.guard.report(FAILED, NO_PHASE, f"gradient reduction: "
                                      f"{type(exc).__name__}: {_first_line(exc)}")
            self._reset_fsdp(reshard=True)
            return exc
        return None

    def clip(self, params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over the sharded gradients without a collective that a local
        failure could leave unmatched: each rank's sum of squares travels in one guard-group
        all-gather with its status; a failure anywhere raises on every rank."""
        grads = [local_tensor(p.grad) for p in params if p.grad is not None]
        error: BaseException | None = None
        sumsq = 0.0
        try:
            if grads:
                norms = torch._foreach_norm(grads)
                sumsq = float(torch.stack([n.double() for n in norms]).square().sum())
        except BaseException as exc:
            error = exc
        table = self.guard.gather_floats([float(error is None), sumsq])
        failed = [r for r in range(self.world_size) if table[r, 0] == 0]
        if failed:
            messages = self.guard._messages(
                None if error is None else f"{type(error).__name__}: {_first_line(error)}")
            if error is not None:
                raise error
            details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
            raise PeerFailedError(f"clipping the gradient norm failed on another rank ({details})")
        total = math.sqrt(float(table[:, 1].sum()))
        coef = min(1.0, max_norm / (total + 1e-6))
        if grads:
            torch._foreach_mul_(grads, coef)
            return torch.tensor(total, dtype=grads[0].dtype, device=grads[0].device)
        return torch.tensor(total)

    def end_step(self) -> None:
        """After the step (or a failure): reshard, restore FSDP's flags, drop what is left of the
        accumulated gradients. No collective."""
        if self._phase == _IDLE:
            return
        self._reset_fsdp(reshard=True)
        _Fsdp.clear_unsharded_grads(self.groups)
        self._restore()
        self._phase = _IDLE
        self.guard.active = False

    # ------------------------------------------------------------------ internals
    def _switch_to_per_micro(self) -> None:
        """Every rank, at the same exchange: drop the gathered units and the gradients
        accumulated in this step, and run per micro-batch from now on."""
        self._reset_fsdp(reshard=True)
        _Fsdp.clear_unsharded_grads(self.groups)
        self._restore(flags_only=True)
        self.mode = self._step_mode = "per_micro"
        self.fallbacks += 1
        log.warning("FSDP gather_once: the gathered parameters leave too little memory on some "
                    "rank; running FSDP per micro-batch from now on")

    def _restore(self, flags_only: bool = False) -> None:
        for g, reshard_after_backward, post_forward, reduce_grads, all_reduce in self._saved:
            g.reshard_after_backward = reshard_after_backward
            g.post_forward_mesh_info = post_forward
            if not flags_only:
                g.reduce_grads = reduce_grads
                g.all_reduce_grads = all_reduce

    def _reset_fsdp(self, reshard: bool) -> None:
        for root in self.roots:
            if reshard:
                if _Fsdp.state(root)._is_root is None:
                    continue  # never ran: nothing to reset
                _Fsdp.reset(root)
            else:
                _Fsdp.soft_reset(root)


def _gloo_group(pg: dist.ProcessGroup) -> dist.ProcessGroup:
    """``pg`` itself when it is gloo, else a new gloo group over the same ranks (a collective
    call: every rank constructs FSDPSync at the same point). Guard flags live on the host; on a
    gloo group they need no GPU stream sync."""
    if "gloo" in str(dist.get_backend(pg)).lower():
        return pg
    group = dist.new_group(dist.get_process_group_ranks(pg), backend="gloo")
    if not isinstance(group, dist.ProcessGroup):
        raise RuntimeError("could not create a gloo group for the FSDP guard")
    return group


def _all_gather(out: torch.Tensor, local: torch.Tensor, group: Any = None) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
