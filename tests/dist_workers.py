"""Functions run on every rank by tests/test_distributed.py (spawned processes import them)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import autoaccum
from tests.helpers import make_data, make_model, mean_loss_fn, sgd, slice_data, token_loss_fn

OOM = "CUDA out of memory. Tried to allocate 20.00 MiB (injected)"


def rank_slice(shares: list[int], rank: int, start: int, stop: int) -> tuple[int, int]:
    """This rank's part of global batch [start, stop): its share, cut short at the data end."""
    offset = start + sum(shares[:rank])
    return min(offset, stop), min(offset + shares[rank], stop)


def exactness(rank: int, world: int, shares: list[int], micros: list[int], token: bool, n: int,
              target: int, faults: dict[int, dict[str, set[int]]], use_ddp: bool) -> Any:
    data = make_data(n)
    model = make_model()
    net: nn.Module = DistributedDataParallel(model) if use_ddp else model
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=target,
                                       shares=shares, micro_batch_size=micros[rank],
                                       model=net if use_ddp else None)
    mine = faults.get(rank, {})
    forward_at, backward_at = mine.get("forward", set()), mine.get("backward", set())
    count = {"f": 0, "b": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        count["b"] += 1
        if count["b"] in backward_at:
            raise torch.OutOfMemoryError(OOM)
        return grad

    model[0].weight.register_hook(hook)
    inner = token_loss_fn(net) if token else mean_loss_fn(net)

    def loss_fn(batch: Any) -> Any:
        count["f"] += 1
        if count["f"] in forward_at:
            raise torch.OutOfMemoryError(OOM)
        return inner(batch)

    for start in range(0, n, target):
        lo, hi = rank_slice(shares, rank, start, min(n, start + target))
        if hi > lo:
            opt.step(loss_fn, slice_data(data, lo, hi))
    opt.flush()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "oom_events": opt.oom_events,
        "steps": opt.optimizer_steps,
    }


def cannot_fit_one_sample(rank: int, world: int) -> Any:
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8,
                                       micro_batch_size=2)
    inner = mean_loss_fn(model)

    def loss_fn(batch: Any) -> Any:
        if rank == 1:
            raise torch.OutOfMemoryError(OOM)
        return inner(batch)

    data = make_data(4 * world)
    opt.step(loss_fn, slice_data(data, 4 * rank, 4 * rank + 4))
    return "finished"  # must not be reached


def auto_shares(rank: int, world: int, slowdowns: list[float], steps: int) -> Any:
    """Ranks of different speed; "auto" shares and a ShareSampler.

    Speed is a sleep per sample (1 ms x slowdown) rather than SimulatedDevice's slowdown factor,
    which scales measured op times and so also scales whatever CPU contention the test machine
    has: the sleep keeps the speed ratio what the test says it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 4))
    device = autoaccum.SimulatedDevice(capacity_bytes=2**34)
    target = 96
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                       target_batch_size=target, shares="auto", memory=device,
                                       micro_batch_size=16)
    opt.share_interval, opt.share_lookahead = 2, 2
    n = target * steps
    data = torch.utils.data.TensorDataset(torch.randn(n, 32), torch.randint(0, 4, (n,)),
                                          torch.arange(n))
    sampler = autoaccum.ShareSampler(data, opt, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    def loss_fn(b: Any) -> torch.Tensor:
        time.sleep(1e-3 * slowdowns[rank] * b[0].shape[0])
        return nn.functional.cross_entropy(model(b[0]), b[1])

    seen: list[int] = []
    history = []
    for x, y, idx in loader:
        seen.extend(idx.tolist())
        history.append(opt.share_schedule.shares_for(opt.optimizer_steps))
        opt.step(loss_fn, (x, y))
    opt.flush()
    return {"seen": seen, "history": [list(h) for h in history], "steps": opt.optimizer_steps}


def sharded_parameters_are_refused(rank: int, world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    weight = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
    try:
        autoaccum.AutoAccumOptimizer(torch.optim.SGD([weight], lr=0.1), target_batch_size=8)
    except NotImplementedError as exc:
        return str(exc)
    return "accepted"
