"""Rank functions for tests/test_sharded.py: AutoAccumOptimizer over FSDP2 (``fully_shard``) and
ZeroRedundancyOptimizer on gloo ranks, with injected failures. Spawned processes import this
module. The model and data are tests/helpers' (float64), so the single-process reference is too."""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import autoaccum
from autoaccum.distributed import PeerFailedError
from tests.dist_workers import rank_slice
from tests.helpers import make_data, make_model, mean_loss_fn, sgd, slice_data, token_loss_fn

OOM = "CUDA out of memory. Tried to allocate 20.00 MiB (injected)"
ERRORS = (PeerFailedError, torch.OutOfMemoryError, autoaccum.StepOutOfMemoryError, ValueError,
          RuntimeError)


def shard(model: nn.Module) -> nn.Module:
    """Three FSDP units: both Linear layers and the root."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter gathered (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return [p.full_tensor().detach().clone() if isinstance(p, DTensor) else p.detach().clone()
            for p in model.parameters()]


class Faults:
    """Failures injected on this rank. ``forward`` / ``backward``: sets of pass counts (every
    micro-batch counts, replays and dummies included) that raise an OOM; ``error``: forward counts
    that raise a ValueError; ``cap``: ``(from_step, size)``, forwards of more than ``size`` samples
    from that optimizer step on run out of memory (a grow-back trial); ``gathered``: every forward
    runs out of memory while FSDP holds every unit gathered; ``always``: every forward;
    ``inner_step``: the inner optimizer's step (this rank's ZeRO shard) at that optimizer step."""

    def __init__(self, spec: dict[str, Any], model: nn.Module) -> None:
        self.spec = spec
        self.count = {"f": 0, "b": 0}
        self.opt: autoaccum.AutoAccumOptimizer | None = None
        model[0].register_forward_hook(self._hook_output)

    def forward(self, size: int) -> None:
        self.count["f"] += 1
        spec, n, opt = self.spec, self.count["f"], self.opt
        assert opt is not None
        if n in spec.get("error", ()):
            raise ValueError("injected bug in loss_fn")
        cap = spec.get("cap")
        over = cap is not None and opt.optimizer_steps >= cap[0] and size > cap[1]
        gathered = spec.get("gathered") and opt._gsync.step_mode == "gather_once"  # type: ignore[attr-defined]
        if n in spec.get("forward", ()) or over or gathered or spec.get("always"):
            raise torch.OutOfMemoryError(OOM)

    def _hook_output(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> torch.Tensor:
        self.count["b"] += 1
        if self.count["b"] in self.spec.get("backward", ()):
            raise torch.OutOfMemoryError(OOM)
        return grad


def train(rank: int, world: int, mode: str, shares: list[int], micros: list[int | None],
          token: bool, n: int, faults: dict[int, dict[str, Any]] | None = None,
          memory_mib: list[float] | None = None, fast_path: bool = True,
          max_grad_norm: float | None = None) -> dict[str, Any]:
    """AutoAccumOptimizer(SGD) over an FSDP2 model: one loader batch per rank per optimizer step
    (its share, cut short at the data's end), then flush(). Returns the gathered parameters,
    counters, the error if one ended the run, and an eval forward after it (FSDP still legal)."""
    autoaccum.AutoAccumOptimizer.fast_path = fast_path
    target = sum(shares)
    data = make_data(n)
    model = shard(make_model())
    memory = None
    if memory_mib is not None:
        memory = autoaccum.SimulatedDevice(capacity_bytes=int(memory_mib[rank] * 2**20))
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=target,
                                       shares=shares, micro_batch_size=micros[rank], model=model,
                                       fsdp_mode=mode, memory=memory,
                                       max_grad_norm=max_grad_norm)
    injected = Faults((faults or {}).get(rank, {}), model)
    injected.opt = opt
    opt.policy.grow_after = 1
    inner_loss = token_loss_fn(model) if token else mean_loss_fn(model)
    if injected.spec.get("inner_step") is not None:
        real_step = opt.optimizer.step

        def failing_step(*args: Any, **kwargs: Any) -> Any:
            if opt.optimizer_steps == injected.spec["inner_step"]:
                raise torch.OutOfMemoryError(OOM)
            return real_step(*args, **kwargs)

        opt.optimizer.step = failing_step  # type: ignore[method-assign]

    def loss_fn(batch: Any) -> Any:
        injected.forward(batch["x"].shape[0])
        return inner_loss(batch)

    error = None
    resident = []
    try:
        for start in range(0, n, target):
            lo, hi = rank_slice(shares, rank, start, min(n, start + target))
            if hi > lo:
                opt.step(loss_fn, slice_data(data, lo, hi))
            if memory is not None:
                resident.append(memory.allocated_bytes())
        opt.flush()
    except ERRORS as exc:
        error = f"{type(exc).__name__}: {exc}"
    sync: Any = opt._gsync  # type: ignore[attr-defined]
    dist.barrier()  # the user's next collective must not hang ...
    with torch.no_grad():  # ... nor FSDP's: an eval forward gathers every unit again
        model(data["x"][:2])
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())  # type: ignore[attr-defined]
    return {
        "params": full_params(model), "error": error, "oom_events": opt.oom_events,
        "steps": opt.optimizer_steps, "sizes": [r.micro_batch_size for r in opt.history],
        "accumulation": [r.accumulation_steps for r in opt.history], "mode": sync.mode,
        "fallbacks": sync.fallbacks, "all_gathers": sync.guard.all_gathers,
        "reduce_scatters": sync.guard.reduce_scatters, "exchanges": sync.guard.exchanges,
        "resident": resident, "local_param_bytes": local,
        "global_param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grad_norm": opt.last_grad_norm,
    }


def reference_clipped(n: int, target: int, max_norm: float) -> list[torch.Tensor]:
    """tests/helpers.reference_params in mean mode, clipping each step's gradient."""
    model = make_model()
    opt = sgd(model.parameters())
    data = make_data(n)
    for start in range(0, n, target):
        opt.zero_grad()
        mean_loss_fn(model)(slice_data(data, start, min(n, start + target))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def checkpoint(rank: int, world: int, mode: str) -> dict[str, Any]:
    """Per-rank checkpoints (model and AdamW state: DTensor local shards; the wrapper's state)
    between steps and in the middle of a step, each loaded with weights_only=True into fresh
    objects, continue bit for bit."""
    shares, target, n = [5, 11], 16, 64
    data = make_data(n)

    def build() -> tuple[nn.Module, autoaccum.AutoAccumOptimizer]:
        model = shard(make_model())
        opt = autoaccum.AutoAccumOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                           target_batch_size=target, shares=shares,
                                           micro_batch_size=2, model=model, fsdp_mode=mode)
        return model, opt

    def save(model: nn.Module, opt: autoaccum.AutoAccumOptimizer) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        return buffer.getvalue()

    def load(blob: bytes) -> tuple[nn.Module, autoaccum.AutoAccumOptimizer]:
        model, opt = build()
        saved = torch.load(io.BytesIO(blob), weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        return model, opt

    # One loader batch per rank per step, in two halves: a checkpoint can fall mid-step.
    calls = []
    for start in range(0, n, target):
        lo, hi = rank_slice(shares, rank, start, start + target)
        mid = lo + (hi - lo) // 2
        calls += [(lo, mid), (mid, hi)]

    def run(model: nn.Module, opt: autoaccum.AutoAccumOptimizer, first: int,
            blobs: dict[int, bytes] | None = None) -> None:
        loss_fn = mean_loss_fn(model)
        for i in range(first, len(calls)):
            if blobs is not None and i in (2, 5):  # between steps 0 and 1; inside step 2
                blobs[i] = save(model, opt)
            opt.step(loss_fn, slice_data(data, *calls[i]))

    model, opt = build()
    blobs: dict[int, bytes] = {}
    run(model, opt, 0, blobs)
    out: dict[str, Any] = {"straight": full_params(model), "steps": opt.optimizer_steps}
    for i, blob in sorted(blobs.items()):
        model, opt = load(blob)
        run(model, opt, i)
        out[f"resumed at call {i}"] = full_params(model)
    return out


def refusals(rank: int, world: int) -> dict[str, str]:
    """What AutoAccumOptimizer says to each unsupported configuration (and to ranks that meet at
    different points of the guard protocol)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from autoaccum.sharded import COLLECTIVE, ROUND, Guard, ShardedProtocolError

    out: dict[str, str] = {}

    def verdict(name: str, model: nn.Module | None, params: Any, **kwargs: Any) -> None:
        try:
            opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(params, lr=0.1),
                                               target_batch_size=8, model=model, **kwargs)
            out[name] = opt._gsync.kind  # type: ignore[attr-defined]
        except NotImplementedError as exc:
            out[name] = f"refused: {exc}"

    plain = make_model()
    verdict("plain", plain, plain.parameters())
    ddp = nn.parallel.DistributedDataParallel(make_model())
    verdict("ddp", ddp, ddp.parameters())
    fsdp = shard(make_model())
    verdict("fsdp", fsdp, fsdp.parameters())
    fsdp = shard(make_model())
    verdict("fsdp without model=", None, fsdp.parameters())
    partial = make_model()
    fully_shard(partial[0])
    verdict("partial sharding", partial, partial.parameters())
    tp = make_model()
    parallelize_module(tp, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel()})
    verdict("tensor parallel", tp, tp.parameters())
    hsdp = make_model()
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (world, 1), mesh_dim_names=("r", "s")))
    verdict("hsdp", hsdp, hsdp.parameters())
    mixed = shard(make_model())
    verdict("ddp around fsdp", nn.parallel.DistributedDataParallel(mixed, init_sync=False),
            mixed.parameters())
    scaled = shard(make_model())
    try:
        verdict("fsdp with grad_scaler", scaled, scaled.parameters(),
                grad_scaler=torch.amp.GradScaler("cpu"))
    except NotImplementedError as exc:
        out["fsdp with grad_scaler"] = f"refused: {exc}"

    guard = Guard(None, world, rank)
    try:
        guard.sync(ROUND if rank == 0 else COLLECTIVE, 3)
        out["protocol"] = "no error"
    except ShardedProtocolError as exc:
        out["protocol"] = str(exc)
    dist.barrier()
    return out


# ----------------------------------------------------------------------------------------- ZeRO-1
def zero1_checkpoint(rank: int, world: int) -> dict[str, Any]:
    """ZeroRedundancyOptimizer(SGD with momentum) under DDP with unequal shares and micro-batch
    sizes; a per-rank checkpoint from the middle of step 1 loads into fresh objects and the run
    continues exactly. Also: the state the planner reserves (this rank's partition only), and a
    checkpoint of the other rank refused."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    shares, micros, target, n = [5, 11], [2, 4], 16, 48
    data = make_data(n)

    def build() -> tuple[nn.Module, nn.Module, autoaccum.AutoAccumOptimizer]:
        model = make_model()
        net = nn.parallel.DistributedDataParallel(model)
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD,
                                       lr=0.1, momentum=0.9)
        opt = autoaccum.AutoAccumOptimizer(zero, target_batch_size=target, shares=shares,
                                           micro_batch_size=micros[rank], model=net)
        return model, net, opt

    calls = []
    for start in range(0, n, target):
        lo, hi = rank_slice(shares, rank, start, start + target)
        calls += [(lo, lo + (hi - lo) // 2), (lo + (hi - lo) // 2, hi)]
    model, net, opt = build()
    out: dict[str, Any] = {
        "reserved": opt._state_reserve_bytes(),  # type: ignore[attr-defined]
        "all_params": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    blob = b""
    for i, call in enumerate(calls):
        if i == 3:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            blob = buffer.getvalue()
        opt.step(mean_loss_fn(net), slice_data(data, *call))
    out["params"] = [p.detach().clone() for p in model.parameters()]
    saved = torch.load(io.BytesIO(blob), weights_only=True)
    out["shard"] = saved["opt"]["zero1_shard"]
    model, net, opt = build()
    model.load_state_dict(saved["model"])
    wrong = dict(saved["opt"], zero1_shard={"rank": 1 - rank, "world_size": world})
    try:
        opt.load_state_dict(wrong)
        out["wrong rank"] = "accepted"
    except ValueError as exc:
        out["wrong rank"] = str(exc)
    opt.load_state_dict(saved["opt"])
    for call in calls[3:]:
        opt.step(mean_loss_fn(net), slice_data(data, *call))
    out["resumed"] = [p.detach().clone() for p in model.parameters()]
    return out


def uneven_speed(rank: int, world: int, mode: str, sleep_s: list[float], steps: int
                 ) -> dict[str, Any]:
    """Equal shares of 8, micro-batches of 4, ``steps`` optimizer steps; each rank's compute is a
    sleep of ``sleep_s[rank]`` per sample (a third in forward after the first unit, two thirds in
    its backward), as on a slower GPU. Returns each step's reported compute seconds and the
    guard's measured wait per step (0 where it measures none)."""
    import time

    per_sample = sleep_s[rank]
    data = make_data(8 * world * steps)
    model = shard(make_model())

    def sleep_forward(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        time.sleep(per_sample / 3 * out.shape[0])
        if out.requires_grad:
            out.register_hook(lambda grad: time.sleep(per_sample * 2 / 3 * grad.shape[0]))

    model[0].register_forward_hook(sleep_forward)
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8 * world,
                                       shares="equal", micro_batch_size=4, model=model,
                                       fsdp_mode=mode)
    loss_fn = mean_loss_fn(model)
    sync: Any = opt._gsync  # type: ignore[attr-defined]
    waits = []
    for step in range(steps):
        lo, hi = rank_slice([8] * world, rank, step * 8 * world, (step + 1) * 8 * world)
        before = getattr(sync, "wait_seconds", 0.0)
        opt.step(loss_fn, slice_data(data, lo, hi))
        waits.append(getattr(sync, "wait_seconds", 0.0) - before)
    return {"compute": [r.compute_seconds for r in opt.history], "wait": waits,
            "sleep": per_sample * 8}
