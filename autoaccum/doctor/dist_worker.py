"""One rank of the doctor's multi-process check; started by ``torchrun`` (see :mod:`.multigpu`).

    torchrun --standalone --nproc-per-node N -m autoaccum.doctor.dist_worker \\
        --backend nccl --out DIR

Two scenarios, each rank writing ``DIR/rank<r>.json``:

* ``agreement``: a DDP-wrapped fp32 MLP, equal shares of a global batch, pinned micro-batches; the
  last rank runs out of memory (injected ``torch.OutOfMemoryError``) in a forward pass of step 1
  and in the backward pass of its last micro-batch of step 2, where a rank that syncs gradients in
  backward would strand its peers. Recorded: optimizer steps, OOMs, a checksum of the parameters
  (equal on every rank when the ranks agreed) and the deviation from a one-process reference that
  steps on each whole global batch.
* ``peer_failure``: the last rank cannot fit one sample (every forward OOMs). Recorded: the
  exception each rank raised; every rank must raise (the others ``PeerFailedError``), none hang.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..optimizer import AutoAccumOptimizer
from .harness import indices
from .workloads import Workload, mlp

INJECTED = "CUDA out of memory. Tried to allocate 20.00 MiB (injected by autoaccum doctor)"
SHARE = 12  # samples per rank and step
MICRO = 4
STEPS = 4


def _workload() -> Workload:
    return mlp(32, (64, 64), target=SHARE, probe=MICRO)


def agreement(rank: int, world: int, device: torch.device) -> dict[str, Any]:
    workload = _workload()
    model = workload.model(device)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )
    target = SHARE * world
    opt = AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                             target_batch_size=target, micro_batch_size=MICRO, model=ddp)
    faulty = rank == world - 1
    step = [0]
    forwards = [0]
    seen = [0]  # samples through forward in this step, replays included
    raised = [False]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        # The backward of this rank's last micro-batch: in DDP's own scheme, the one that
        # would start the gradient all-reduce the other ranks are waiting in.
        if faulty and step[0] == 2 and seen[0] == SHARE and not raised[0]:
            raised[0] = True
            raise torch.OutOfMemoryError(INJECTED)
        return grad

    next(model.parameters()).register_hook(hook)

    def loss_fn(idx: torch.Tensor) -> Any:
        forwards[0] += 1
        seen[0] += idx.shape[0]
        if faulty and step[0] == 1 and forwards[0] == 2:
            raise torch.OutOfMemoryError(INJECTED)
        return workload.loss(ddp, idx)

    for s in range(STEPS):
        step[0], forwards[0], seen[0] = s, 0, 0
        opt.step(loss_fn, indices(s * target + rank * SHARE, SHARE))
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {
        "steps": opt.optimizer_steps,
        "ooms": opt.oom_events,
        "checksum": float(params.double().sum()),
        "deviation": _deviation(params.cpu(), _reference(workload, target)),
    }


def _reference(workload: Workload, target: int) -> torch.Tensor:
    """One process, one SGD step on each whole global batch."""
    model = workload.model(torch.device("cpu"))
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(STEPS):
        workload.loss(model, indices(s * target, target)).backward()
        sgd.step()
        sgd.zero_grad()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return torch.stack([after, before])


def _deviation(got: torch.Tensor, reference: torch.Tensor) -> float:
    after, before = reference
    update = float((after - before).abs().max())
    return float((got - after).abs().max()) / update if update else float("inf")


def peer_failure(rank: int, world: int, device: torch.device) -> dict[str, Any]:
    workload = _workload()
    model = workload.model(device)
    opt = AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                             target_batch_size=SHARE * world, micro_batch_size=2)

    def loss_fn(idx: torch.Tensor) -> Any:
        if rank == world - 1:
            raise torch.OutOfMemoryError(INJECTED)
        return workload.loss(model, idx)

    try:
        opt.step(loss_fn, indices(rank * SHARE, SHARE))
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc).splitlines()[0][:300]}
    return {"raised": None, "message": "step finished"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=("nccl", "gloo"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cpu")
    if args.backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    torch.set_num_threads(1)
    result: dict[str, Any] = {"rank": rank, "world": world, "backend": args.backend}
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=120))
    try:
        result["agreement"] = agreement(rank, world, device)
        result["peer_failure"] = peer_failure(rank, world, device)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

