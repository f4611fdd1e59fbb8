"""Rank agreement and gradient reduction for torch.distributed jobs.

One optimizer step across ranks, after every rank has run all of its micro-batches locally (with
DDP's own gradient sync switched off):

1. ``agree``: one small all-gather of a row of numbers per rank (ok flag, item count, compute time,
   samples, whether it came from flush(), the furthest step a sampler has read). No rank starts a
   gradient collective before every rank has finished its share, replays after an OOM included,
   so an OOM anywhere before this point cannot leave a rank waiting in a collective that another
   rank never joins.
2. ``GradientReducer.reduce``: gradients, pre-scaled by each rank's weight, are summed through one
   reusable bucket. Every rank runs every collective even if a local copy fails.
3. ``confirm``: a second small all-gather after the inner optimizer's step, so that a failure
   after the agreement (reduction, clipping, the inner step) ends the step on every rank with a
   clear error, whatever collective the ranks would run next.

How gradients are reduced, and which collectives must match, is a strategy the driver picks at
construction (:class:`GradientSync`): this module's base class is replicated parameters (a plain
module or DDP, steps 2 above); :mod:`autoaccum.sharded` has ZeRO-1 and FSDP2.

Nothing here runs per micro-batch. Failure messages travel as fixed-size byte tensors (no pickling,
so no numpy is needed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Columns of the per-step agreement row (FLUSH: the rank entered the step from flush();
# LAST_READ: the furthest optimizer step whose shares a sampler on that rank has read).
OK, ITEMS, SECONDS, SAMPLES, FLUSH, LAST_READ = range(6)
ROW = 6  # columns before the per-parameter "used" flags
BUCKET_BYTES = 32 * 2**20
_MESSAGE_BYTES = 1024


class PeerFailedError(RuntimeError):
    """Another rank failed during this step; every rank raises so the job ends, not hangs."""

    autoaccum_remote = True  # never this rank's own out-of-memory error (autoaccum.oom.is_oom)


@dataclass(frozen=True)
class Context:
    """This process's place in a distributed job."""

    rank: int
    world_size: int
    device: torch.device  # where collective tensors live (CUDA for NCCL)
    group: dist.ProcessGroup | None = None


def context(group: dist.ProcessGroup | None = None, single: bool = False) -> Context | None:
    """The job this process is in, or None outside a multi-rank job (``single``: also a job of
    one process, for FSDP2 models, whose collectives run whatever the world size)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    if world == 1 and not single:
        return None
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Context(dist.get_rank(group), world, device, group)


def agree(ctx: Context, row: Sequence[float | torch.Tensor],
          extra: torch.Tensor | None = None) -> torch.Tensor:
    """All-gather one row of numbers per rank (``row``, then the float64 vector ``extra``): the
    one small collective before the reduction.

    Returns a float64 ``(world_size, len(row) + len(extra))`` CPU tensor, identical on every
    rank.
    """
    local = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=ctx.device).reshape(()) for v in row]
    )
    if extra is not None and extra.numel():
        local = torch.cat([local, extra.to(device=ctx.device, dtype=torch.float64)])
    table = torch.empty(ctx.world_size * local.numel(), dtype=torch.float64, device=ctx.device)
    _all_gather(table, local, ctx)
    return table.view(ctx.world_size, -1).cpu()


def _all_gather(out: torch.Tensor, local: torch.Tensor, ctx: Context) -> None:
    """All-gather into one flat tensor (``all_gather_single`` where torch has it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=ctx.group)


def exchange_messages(ctx: Context, message: str | None) -> list[str | None]:
    """Every rank's message (None for ranks without one), as UTF-8 bytes in a fixed-size tensor:
    only on the error path, after a collective told every rank that someone failed."""
    data = (message or "").encode("utf-8", errors="replace")[: _MESSAGE_BYTES - 1]
    local = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    local[0] = 1 if message is not None else 0
    if data:
        local[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    local = local.to(ctx.device)
    gathered = torch.empty(ctx.world_size * _MESSAGE_BYTES, dtype=torch.uint8, device=ctx.device)
    _all_gather(gathered, local, ctx)
    rows = gathered.view(ctx.world_size, _MESSAGE_BYTES).cpu()
    out: list[str | None] = []
    for row in rows:
        if not int(row[0]):
            out.append(None)
            continue
        raw = bytes(row[1:].tolist()).rstrip(b"\0")
        out.append(raw.decode("utf-8", errors="replace"))
    return out


def confirm(ctx: Context, error: BaseException | None, what: str) -> None:
    """The step's closing collective: every rank says whether its part after the agreement
    (reduction, clipping, inner step) succeeded. Raises on every rank if one failed: the local
    error where it happened, :class:`PeerFailedError` naming it elsewhere."""
    message = None if error is None else f"{type(error).__name__}: {_first_line(error)}"
    table = agree(ctx, [float(error is None)])
    failed = [r for r in range(ctx.world_size) if table[r, 0] == 0]
    if not failed:
        return
    messages = exchange_messages(ctx, message)
    if error is not None:
        raise error
    details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
    raise PeerFailedError(f"{what} failed on another rank after the ranks agreed ({details}); "
                          "the ranks' parameters may now differ: reload a checkpoint")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class GradientReducer:
    """Sums gradients over ranks in place through one reusable flat bucket.

    The bucket is allocated by :meth:`prepare`, before the step's agreement, so the reduction
    itself allocates nothing: at most one bucket (``BUCKET_BYTES``, or the gradients' total if
    smaller) lives beyond the gradients. A gradient larger than the bucket is reduced in place.
    """

    def __init__(self, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.bucket_bytes = bucket_bytes
        self._buckets: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def _wanted(self, grads: Sequence[torch.Tensor]
                ) -> dict[tuple[torch.dtype, torch.device], int]:
        """Elements of the bucket each (dtype, device) of ``grads`` needs."""
        needed: dict[tuple[torch.dtype, torch.device], int] = {}
        for g in grads:
            key = (g.dtype, g.device)
            numel = g.numel()
            if numel * g.element_size() < self.bucket_bytes:
                needed[key] = needed.get(key, 0) + numel
        return {
            (dtype, device): min(total, max(1, self.bucket_bytes // _itemsize(dtype)))
            for (dtype, device), total in needed.items()
        }

    def _missing(self, grads: Sequence[torch.Tensor]
                 ) -> list[tuple[torch.dtype, torch.device, int]]:
        """The buckets ``grads`` need that are not allocated (or too small): dtype, device,
        elements."""
        return [(dtype, device, numel) for (dtype, device), numel in self._wanted(grads).items()
                if (have := self._buckets.get((dtype, device))) is None or have.numel() < numel]

    def missing_bytes(self, grads: Sequence[torch.Tensor]) -> int:
        """Bytes :meth:`prepare` would allocate for ``grads`` (tensors shaped like the
        gradients) now: what the planner reserves before the first step."""
        return sum(numel * _itemsize(dtype) for dtype, _, numel in self._missing(grads))

    def prepare(self, grads: Sequence[torch.Tensor]) -> None:
        """Allocate the bucket of each (dtype, device) once; may raise an OOM (before agreeing)."""
        for dtype, device, numel in self._missing(grads):
            self._buckets[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)

    def buffers(self) -> list[torch.Tensor]:
        """The bucket tensors (resident between steps)."""
        return list(self._buckets.values())

    def reduce(self, ctx: Context, grads: Sequence[torch.Tensor]) -> BaseException | None:
        """Sum ``grads`` over ranks in place. Runs every collective whatever happens locally (so
        no peer is left waiting) and returns the first local error instead of raising it."""
        error: BaseException | None = None
        for bucket, group in self._plan(grads):
            if bucket is None:
                try:
                    dist.all_reduce(group[0], group=ctx.group)
                except BaseException as exc:  # a collective error: nothing to keep in step
                    return exc
                continue
            n = sum(g.numel() for g in group)
            flat = bucket[:n]
            try:
                torch.cat([g.reshape(-1) for g in group], out=flat)
            except BaseException as exc:
                error = error or exc
            try:
                dist.all_reduce(flat, group=ctx.group)
            except BaseException as exc:
                return exc
            try:
                offset = 0
                for g in group:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
            except BaseException as exc:
                error = error or exc
        return error

    def _plan(self, grads: Sequence[torch.Tensor]
              ) -> list[tuple[torch.Tensor | None, list[torch.Tensor]]]:
        """Consecutive groups that fit a bucket (same dtype and device), in the same order on
        every rank (replicated parameters have the same shapes everywhere)."""
        plan: list[tuple[torch.Tensor | None, list[torch.Tensor]]] = []
        current: list[torch.Tensor] = []
        current_bucket: torch.Tensor | None = None
        used = 0
        for g in grads:
            bucket = self._buckets.get((g.dtype, g.device))
            if bucket is None or g.numel() > bucket.numel():
                plan.append((None, [g]))
                continue
            if current and (bucket is not current_bucket or used + g.numel() > bucket.numel()):
                plan.append((current_bucket, current))
                current, used = [], 0
            current_bucket = bucket
            current.append(g)
            used += g.numel()
        if current:
            plan.append((current_bucket, current))
        return plan


class GradientSync:
    """How a step's gradients are reduced across ranks and which collectives must match: the
    strategy :class:`~autoaccum.AutoAccumOptimizer` picks at construction (see
    :func:`autoaccum.sharded.gradient_sync`) and calls at a few points of every step.

    This base class is for replicated parameters (a plain module, or DDP): micro-batches run under
    DDP's ``no_sync``, the step sums whole gradients through one reusable bucket. Subclasses:
    :class:`autoaccum.sharded.Zero1Sync` (ZeroRedundancyOptimizer), :class:`autoaccum.sharded.
    FSDPSync` (FSDP2's ``fully_shard``).

    What the driver calls, per step of a multi-rank job (one process: only :meth:`micro_context`,
    :meth:`clip`, :meth:`step` and the state-dict methods)::

        begin_step()            before the step's first micro-batch; every rank, every step
        micro_context()         around micro-batches
        (rounds)                FSDP only (``rounds``): the micro-batch protocol of FSDPSync
        prepare(params)         before the agreement: allocate what the reduction needs
        -- agreement --
        reduce(ctx, params, s)  sum this rank's gradients, each scaled by s, over the ranks;
                                returns an error instead of raising
        step(inner_step)        the inner optimizer's step (clip(...) inside it)
        -- confirm --
        after_confirm()         only when every rank's step succeeded
        end_step()              after the step, also after any failure
        fail(exc, ...)          any exception out of step()/flush(): True if the peers were told
    """

    kind = "replicated"
    rounds = False  # the driver runs FSDPSync's round protocol before the agreement
    rewind_on_failure = False  # any failure drops the step's gradients (FSDP's gathered state)

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.model = model
        self._no_sync: Callable[[], Any] | None = getattr(model, "no_sync", None)
        self.reducer = GradientReducer()

    # ------------------------------------------------------------------ planning
    @property
    def in_step(self) -> bool:
        """Between :meth:`begin_step` and :meth:`end_step` (always False when they do nothing)."""
        return False

    @property
    def defers_micro_batches(self) -> bool:
        """Whether micro-batches wait for the step's end (their collectives need every rank)."""
        return False

    def state_owner(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
                    ) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        """The optimizer that allocates this rank's state, and the parameters it keeps state for
        (the planner reserves their state before the first step)."""
        return optimizer, params

    def extra_bytes(self) -> int:
        """Bytes a step holds beyond the resident parameters, gradients and optimizer state while
        its micro-batches run (activations not included)."""
        return 0

    def missing_bytes(self) -> int:
        """Bytes of :meth:`extra_bytes` the step has not allocated yet."""
        return 0

    def reduction_bytes(self, params: Sequence[torch.Tensor]) -> int:
        """Bytes the step's reduction will allocate that it does not hold yet (the bucket,
        before the first multi-rank step; resident and so in the baseline afterwards)."""
        return self.reducer.missing_bytes(params)

    def accumulator(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """A tensor whose ``.grad`` holds the step's accumulated gradient (the driver notices
        changes to it between calls)."""
        return params[0] if params else None

    def buffers(self) -> list[torch.Tensor]:
        """Tensors this strategy keeps between steps (memory backends count them)."""
        return self.reducer.buffers()

    # ------------------------------------------------------------------ a step
    def begin_step(self) -> None:
        """Before the step's first micro-batch (or its agreement, on a rank without samples)."""

    def micro_context(self) -> contextlib.AbstractContextManager[Any]:
        """Around micro-batches: DDP's ``no_sync``, so that the reduction waits for the agreement
        and a backward OOM can never leave DDP's reducer waiting for an interrupted one."""
        no_sync = self._no_sync
        return contextlib.nullcontext() if no_sync is None else no_sync()  # type: ignore[no-any-return]

    def materialize_local_grads(self) -> None:
        """Allocate the gradients the strategy accumulates outside ``.grad`` (before a probe)."""

    def clear_local_grads(self) -> None:
        """Drop the gradients the strategy accumulates outside ``.grad`` (a rewind)."""

    def prepare(self, params: Sequence[torch.Tensor]) -> None:
        """Before the agreement: zero gradients where missing (every rank reduces the same
        tensors) and the bucket. May raise (an OOM), before any peer waits in a collective."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.reducer.prepare([p.grad for p in params])  # type: ignore[misc]

    def reduce(self, ctx: Context, params: Sequence[torch.Tensor], scale: Any
               ) -> BaseException | None:
        """After the agreement: scale this rank's gradients by ``scale`` (None: as they are) and
        sum them over the ranks. Returns the first local error instead of raising; every
        collective runs on every rank."""
        grads = [p.grad for p in params if p.grad is not None]
        error: BaseException | None = None
        if scale is not None and grads:
            try:
                torch._foreach_mul_(grads, scale)  # type: ignore[arg-type]
            except BaseException as exc:
                error = exc
        return self.reducer.reduce(ctx, grads) or error  # type: ignore[arg-type]

    def clip(self, params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the summed gradients to ``max_norm``; returns the total norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, inner_step: Callable[[], None]) -> None:
        """The inner optimizer's step (unscale, clip, step), before the closing confirmation."""
        inner_step()

    def after_confirm(self) -> None:
        """After every rank confirmed its step (ZeRO-1: the parameter broadcast)."""

    def end_step(self) -> None:
        """After the step, or after a failure (no collective)."""

    def fail(self, exc: BaseException, in_backward: bool, agreed: bool = False) -> bool:
        """An exception is leaving ``step()``/``flush()`` (``agreed``: after the step's
        agreement). Tell the peers if they wait at a meeting point of this strategy (returns
        True), and leave a legal state."""
        return False

    # ------------------------------------------------------------------ checkpoints
    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


def params_iter(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every parameter of ``optimizer``, in order."""
    for group in optimizer.param_groups:
        yield from group["params"]
