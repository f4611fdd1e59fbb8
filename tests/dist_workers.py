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
              target: int, faults: dict[int, dict[str, set[int]]], use_ddp: bool,
              zero1: bool = False) -> Any:
    data = make_data(n)
    model = make_model()
    net: nn.Module = DistributedDataParallel(model) if use_ddp else model
    opt = autoaccum.AutoAccumOptimizer(zero1_sgd(model) if zero1 else sgd(model.parameters()),
                                       target_batch_size=target,
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


def ddp_world_of_one_recovers_from_a_last_backward_oom(rank: int, world: int) -> Any:
    """torchrun with one process, the same script as on 8 GPUs: an OOM in the backward of a
    step's last micro-batch is recovered and training continues exactly."""
    data = make_data(32)
    model = make_model()
    net = DistributedDataParallel(model)
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=4, model=net)
    count = {"b": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        count["b"] += 1
        if count["b"] == 4:  # the last micro-batch of the first step
            raise torch.OutOfMemoryError(OOM)
        return grad

    model[0].weight.register_hook(hook)
    for start in range(0, 32, 16):
        opt.step(mean_loss_fn(net), slice_data(data, start, start + 16))
    return {"params": [p.detach().clone() for p in model.parameters()],
            "oom_events": opt.oom_events, "steps": opt.optimizer_steps}


def zero1_sgd(model: nn.Module) -> torch.optim.Optimizer:
    """tests/helpers.sgd as ZeRO-1: each rank keeps the momentum of its partition only."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1,
                                   momentum=0.9)


def failure_after_the_agreement(rank: int, world: int, where: str, zero1: bool = False) -> Any:
    """Rank 1 fails after every rank agreed: in its inner optimizer step (an OOM) or inside the
    gradient reduction (a local copy). Every rank must raise, and then run the user's next
    collective (a barrier before saving, say) without hanging."""
    import sys

    sys.modules["numpy"] = None  # type: ignore[assignment]  # messages must not need numpy
    data = make_data(16)
    model = make_model()
    inner = zero1_sgd(model) if zero1 else sgd(model.parameters())
    opt = autoaccum.AutoAccumOptimizer(inner, target_batch_size=16, micro_batch_size=4)
    if zero1:  # ZeroRedundancyOptimizer.step() runs its local optimizer's step first
        inner = inner.optim  # type: ignore[assignment]
    if rank == 1 and where == "inner step":
        def failing_step(*_a: Any, **_k: Any) -> None:
            raise torch.OutOfMemoryError(OOM)

        inner.step = failing_step  # type: ignore[method-assign]
    if rank == 1 and where == "reduction":
        real_cat = torch.cat

        def failing_cat(*args: Any, **kwargs: Any) -> Any:
            if "out" in kwargs:
                raise RuntimeError("injected failure copying into the bucket")
            return real_cat(*args, **kwargs)

        torch.cat = failing_cat  # type: ignore[assignment]
    error = None
    try:
        opt.step(mean_loss_fn(model), slice_data(data, 8 * rank, 8 * rank + 8))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if rank == 1 and where == "reduction":
            torch.cat = real_cat  # type: ignore[assignment]
    torch.distributed.barrier()  # the user's next collective
    return {"error": error, "steps": opt.optimizer_steps}


def resume_mid_step_after_shares_changed(rank: int, world: int, tmp: str) -> Any:
    """Shares change from step 1 on ([4, 12] -> [10, 6]); a checkpoint is taken in the middle of
    step 1 and loaded into fresh objects on every rank; the run continues exactly."""
    import os

    data = make_data(48)
    shares = [[4, 12], [10, 6], [10, 6]]

    def build() -> tuple[nn.Module, autoaccum.AutoAccumOptimizer]:
        model = make_model()
        opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                           shares=[4, 12], micro_batch_size=3)
        opt.share_schedule.set_from(1, [10, 6])
        return model, opt

    model, opt = build()
    lo, hi = rank_slice(shares[0], rank, 0, 16)
    opt.step(mean_loss_fn(model), slice_data(data, lo, hi))
    lo, hi = rank_slice(shares[1], rank, 16, 32)
    half = lo + (hi - lo) // 2
    opt.step(mean_loss_fn(model), slice_data(data, lo, half))  # the first half of step 1
    path = os.path.join(tmp, f"rank{rank}.pt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    del model, opt
    model, opt = build()
    saved = torch.load(path)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    opt.step(mean_loss_fn(model), slice_data(data, half, hi))
    lo, hi = rank_slice(shares[2], rank, 32, 48)
    opt.step(mean_loss_fn(model), slice_data(data, lo, hi))
    return {"params": [p.detach().clone() for p in model.parameters()],
            "steps": opt.optimizer_steps}


def auto_shares_with_many_loader_workers(rank: int, world: int, workers: int) -> Any:
    """A DataLoader with many workers reads num_workers * prefetch_factor batches ahead of the
    optimizer; share changes must land after whatever it has read, on every rank alike."""
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                       target_batch_size=32, shares="auto", micro_batch_size=8)
    opt.share_interval = 2
    opt.share_min_gain = 0.0
    n = 32 * 30
    data = torch.utils.data.TensorDataset(torch.randn(n, 8), torch.arange(n))
    sampler = autoaccum.ShareSampler(data, opt, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=workers,
                                         prefetch_factor=4, persistent_workers=False)

    def loss_fn(b: Any) -> torch.Tensor:
        time.sleep(2e-4 * (1 + 3 * rank) * b[0].shape[0])  # rank 1 is slower
        return model(b[0]).pow(2).mean()

    seen: list[int] = []
    for x, idx in loader:
        seen.extend(idx.tolist())
        opt.step(loss_fn, (x,))
    opt.flush()
    return {"seen": seen, "steps": opt.optimizer_steps,
            "shares": list(opt.share_schedule.shares_for(opt.optimizer_steps))}


def bucket_is_budgeted(rank: int, world: int) -> Any:
    """A device where gradients, AdamW state and the step's temporaries fit but the reduction's
    bucket does not: refused before any forward, naming the bucket."""
    from autoaccum.planner import step_temporaries

    torch.manual_seed(0)
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), foreach=False)
    params = list(model.parameters())
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    need_without_bucket = p_bytes + 2 * p_bytes + step_temporaries(inner, params)
    device = autoaccum.SimulatedDevice(capacity_bytes=p_bytes + need_without_bucket
                                       + p_bytes // 2)
    opt = autoaccum.AutoAccumOptimizer(inner, target_batch_size=8, memory=device)
    forwards = []
    inner_fn = mean_loss_fn(model)

    def loss_fn(batch: Any) -> Any:
        forwards.append(1)
        return inner_fn(batch)

    data = make_data(4 * world)
    try:
        opt.step(loss_fn, slice_data(data, 4 * rank, 4 * rank + 4))
    except autoaccum.StepOutOfMemoryError as exc:
        return {"error": str(exc), "forwards": len(forwards),
                "grads": [p.grad is None for p in params]}
    return {"error": None, "forwards": len(forwards)}


class Routed(nn.Module):
    """Two experts chosen per sample by the sign of its first feature, and a head no sample
    ever uses: some steps reach only one expert, on one rank or on every rank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unused = nn.Linear(5, 2).double()
        self.body = nn.Linear(5, 5).double()
        self.experts = nn.ModuleList(nn.Linear(5, 12).double() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        out = x.new_zeros(x.shape[0], 12)
        for e, expert in enumerate(self.experts):
            rows = ((x[:, 0] > 0) == (e == 0)).nonzero().squeeze(1)
            if rows.numel():
                out = out.index_add(0, rows, expert(h[rows]))
        return out


def routed_data(n: int) -> dict[str, Any]:
    """Step 1 (samples 0-7): all positive (expert 1 unused everywhere); step 2: rank 0's
    positive, rank 1's negative; step 3: mixed."""
    data = make_data(n)
    x = data["x"]
    x[:8, 0] = x[:8, 0].abs() + 0.1
    x[8:12, 0] = x[8:12, 0].abs() + 0.1
    x[12:16, 0] = -x[12:16, 0].abs() - 0.1
    return data


def unused_parameters(rank: int, world: int, n: int, target: int, planned: bool,
                      zero1: bool) -> Any:
    data = routed_data(n)
    model = Routed()
    params = list(model.parameters())
    if zero1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        inner: Any = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW,
                                             lr=1e-2, weight_decay=0.1)
    else:
        inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    memory = autoaccum.SimulatedDevice(capacity_bytes=2**30) if planned else None
    opt = autoaccum.AutoAccumOptimizer(inner, target_batch_size=target, memory=memory,
                                       micro_batch_size=None if planned else 2)
    loss_fn = mean_loss_fn(model)
    seen: list[list[bool]] = []
    (inner.optim if zero1 else inner).register_step_pre_hook(
        lambda *_: seen.append([p.grad is not None for p in params]))
    half = target // world
    for start in range(0, n, target):
        lo = start + rank * half
        opt.step(loss_fn, slice_data(data, lo, lo + half))
    state = (inner.optim if zero1 else inner).state
    return {"params": [p.detach().clone() for p in params], "grads": seen,
            "steps": [float(state[p]["step"]) if p in state else 0.0 for p in params]}


def foreign_gradients(rank: int, world: int, shares: list[int], n: int, target: int,
                      calls_per_step: int) -> Any:
    """Each call is followed by a backward outside opt.step (an attack's, a metric's) that
    fills every parameter's .grad on this rank only: no rank's step may see it."""
    data = make_data(n)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=target,
                                       shares=shares, micro_batch_size=3)
    for start in range(0, n, target):
        lo, hi = rank_slice(shares, rank, start, min(n, start + target))
        cut = lo + (hi - lo) // calls_per_step if calls_per_step > 1 else hi
        for a, b in ((lo, cut), (cut, hi)):
            if b > a:
                opt.step(mean_loss_fn(model), slice_data(data, a, b))
                model(data["x"][a:b]).pow(2).sum().mul(rank + 1).backward()
    opt.flush()
    return {"params": [p.detach().clone() for p in model.parameters()]}
