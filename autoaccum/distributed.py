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

Nothing here runs per micro-batch. Failure messages travel as fixed-size byte tensors (no pickling,
so no numpy is needed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Columns of the per-step agreement row (FLUSH: the rank entered the step from flush();
# LAST_READ: the furthest optimizer step whose shares a sampler on that rank has read).
OK, ITEMS, SECONDS, SAMPLES, FLUSH, LAST_READ = range(6)
BUCKET_BYTES = 32 * 2**20
_MESSAGE_BYTES = 1024


class PeerFailedError(RuntimeError):
    """Another rank failed during this step; every rank raises so the job ends, not hangs."""


@dataclass(frozen=True)
class Context:
    """This process's place in a distributed job."""

    rank: int
    world_size: int
    device: torch.device  # where collective tensors live (CUDA for NCCL)
    group: dist.ProcessGroup | None = None


def context(group: dist.ProcessGroup | None = None) -> Context | None:
    """The job this process is in, or None outside a multi-rank job."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    if world == 1:
        return None
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Context(dist.get_rank(group), world, device, group)


def check_replicated(params: Iterable[torch.Tensor]) -> None:
    """Refuse sharded (DTensor) parameters: the step reduces whole gradients across ranks, which
    is right for replicated (DDP-style) parameters only."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        raise NotImplementedError(
            "AutoAccumOptimizer got sharded (DTensor) parameters, e.g. from FSDP2's fully_shard, "
            "in a multi-rank job; it reduces whole gradients itself and supports replicated "
            "parameters (DDP, or a plain module) only. Keep the FSDP2 model on a plain optimizer."
        )


def agree(ctx: Context, row: Sequence[float | torch.Tensor]) -> torch.Tensor:
    """All-gather one row of numbers per rank: the one small collective before the reduction.

    Returns a float64 ``(world_size, len(row))`` CPU tensor, identical on every rank.
    """
    local = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=ctx.device).reshape(()) for v in row]
    )
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


class GradientReducer:
    """Sums gradients over ranks in place through one reusable flat bucket.

    The bucket is allocated by :meth:`prepare`, before the step's agreement, so the reduction
    itself allocates nothing: at most one bucket (``BUCKET_BYTES``, or the gradients' total if
    smaller) lives beyond the gradients. A gradient larger than the bucket is reduced in place.
    """

    def __init__(self, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.bucket_bytes = bucket_bytes
        self._buckets: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def prepare(self, grads: Sequence[torch.Tensor]) -> None:
        """Allocate the bucket of each (dtype, device) once; may raise an OOM (before agreeing)."""
        needed: dict[tuple[torch.dtype, torch.device], int] = {}
        for g in grads:
            key = (g.dtype, g.device)
            numel = g.numel()
            if numel * g.element_size() < self.bucket_bytes:
                needed[key] = needed.get(key, 0) + numel
        for (dtype, device), total in needed.items():
            limit = max(1, self.bucket_bytes // torch.empty((), dtype=dtype).element_size())
            numel = min(total, limit)
            have = self._buckets.get((dtype, device))
            if have is None or have.numel() < numel:
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
