"""Rank agreement and gradient reduction for torch.distributed jobs.

One optimizer step across ranks, after every rank has run all of its micro-batches locally (with
DDP's own gradient sync switched off):

1. ``agree``: one small all-gather of a row of numbers per rank (ok flag, item count, compute time,
   samples, whether it came from flush()). No rank starts a gradient collective before every rank
   has finished its share, replays after an OOM included, so an OOM anywhere cannot leave a rank
   waiting in a collective that another rank never joins.
2. ``reduce_gradients``: gradients, pre-scaled by each rank's weight, are summed in buckets.

Nothing here runs per micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Columns of the per-step agreement row (FLUSH: the rank entered the step from flush()).
OK, ITEMS, SECONDS, SAMPLES, FLUSH = range(5)
_BUCKET_BYTES = 32 * 2**20


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
    """All-gather one row of numbers per rank: the one small collective of a step.

    Returns a float64 ``(world_size, len(row))`` CPU tensor, identical on every rank.
    """
    local = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=ctx.device).reshape(()) for v in row]
    )
    table = torch.empty(ctx.world_size * local.numel(), dtype=torch.float64, device=ctx.device)
    dist.all_gather_into_tensor(table, local, group=ctx.group)
    return table.view(ctx.world_size, -1).cpu()


def report_failure(ctx: Context, message: str | None) -> list[str | None]:
    """Exchange failure messages (only on the error path, after ``agree`` flagged one)."""
    messages: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(messages, message, group=ctx.group)
    return messages


def reduce_gradients(ctx: Context, grads: Sequence[torch.Tensor]) -> None:
    """Sum ``grads`` over ranks in place, in buckets of same-dtype, same-device gradients.

    Every bucket's all-reduce is launched before the first is waited on, so the copies into and out
    of the flat buffers overlap with communication.
    """
    buckets: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    for g in grads:
        lists = buckets.setdefault((g.dtype, g.device), [[]])
        current = lists[-1]
        if current and sum(t.numel() for t in current) * g.element_size() >= _BUCKET_BYTES:
            current = []
            lists.append(current)
        current.append(g)
    pending = []
    for lists in buckets.values():
        for bucket in lists:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            pending.append((dist.all_reduce(flat, group=ctx.group, async_op=True), flat, bucket))
    for work, flat, bucket in pending:
        work.wait()
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
