"""Run a scenario as the plain loop and through autoaccum under a variation; compare.

What is compared, in float64 at 1e-10 relative (:func:`compare`; the scenario's ``rtol``): the
parameters, the inner optimizer's state (AdamW's per-parameter step counts included), the module
buffers, each step's gradient as the inner optimizer sees it (after normalization and clipping;
``None`` where the plain loop has ``None``), the learning rate of every step, the number of
optimizer steps, and the total of the returned losses weighted by samples (token mode: by items).

A variation (:class:`Variation`) is the call sizes (a loader's batch size, or any sequence), the
target, a pinned micro-batch size or a plan on a
:class:`autoaccum.SimulatedDevice` of a drawn capacity, an injected out-of-memory error at the k-th
forward or backward pass, a mid-run ``state_dict()`` after a drawn call loaded into fresh objects
(through ``torch.save`` and the default ``torch.load``), and the driver path. Exceptions follow the
documented rule: retry with ``batch[exc.autoaccum_consumed:]``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

import autoaccum

from .scenarios import BY_NAME, Scenario, Setup, _first_tensor

RTOL = 1e-10
_SLACK = 2048
OOM = "CUDA out of memory. Tried to allocate 2.00 MiB (injected by the conformance suite)"


@dataclass(frozen=True)
class Variation:
    loader: tuple[int, ...]  # call sizes, repeated; the last call takes what is left
    target: int | None = None  # target_batch_size; None: the scenario's
    micro: int | None = None  # pinned micro_batch_size; None: planned on a SimulatedDevice
    capacity: float = 1.0  # planned: room for this fraction of one full step's activations
    fault: tuple[str, int] | None = None  # ("forward" | "backward", k): OOM at the k-th pass
    resume_after: int | None = None  # checkpoint after this call, continue in fresh objects
    fast_path: bool = True

    def command(self, scenario: Scenario) -> str:
        """The one command that reruns this variation and prints what differs."""
        return f"python -m tests.conformance {scenario.name} '{json.dumps(asdict(self))}'"


@dataclass
class Observed:
    params: list[torch.Tensor]
    state: dict[int, dict[str, Any]]
    buffers: list[torch.Tensor]
    grads: list[list[torch.Tensor | None]] = field(default_factory=list)  # per step
    lrs: list[list[float]] = field(default_factory=list)  # per step, per group
    loss_total: float | None = 0.0  # None: a call raised, its returned loss was never seen
    runs: int = 0  # micro-batches run by autoaccum (forward passes), for the record


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    return tree_map(lambda x: x[start:stop] if isinstance(x, torch.Tensor) else x, batch)


def take(batch: Any, rows: torch.Tensor) -> Any:
    return tree_map(lambda x: x[rows] if isinstance(x, torch.Tensor) else x, batch)


def _size(batch: Any) -> int:
    return int(_first_tensor(batch).shape[0])


class _Recorder:
    """Step hooks on an inner optimizer: the gradient it steps on, then the scheduler and LR."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed
        self.setup: Setup | None = None

    def attach(self, setup: Setup) -> None:
        self.setup = setup
        setup.optimizer.register_step_pre_hook(self._pre)
        setup.optimizer.register_step_post_hook(self._post)

    def _params(self) -> list[torch.Tensor]:
        assert self.setup is not None
        return [p for g in self.setup.optimizer.param_groups for p in g["params"]]

    def _pre(self, *_: Any) -> None:
        # Outside any SimulatedDevice: the suite's own copies take none of the device's memory.
        with _disable_current_modes():
            self.observed.grads.append(
                [None if p.grad is None else p.grad.detach().clone() for p in self._params()])

    def _post(self, *_: Any) -> None:
        assert self.setup is not None
        if self.setup.scheduler is not None:
            self.setup.scheduler.step()
        self.observed.lrs.append([g["lr"] for g in self.setup.optimizer.param_groups])


def _finish(setup: Setup, observed: Observed) -> Observed:
    observed.params = [p.detach().clone() for p in setup.model.parameters()]
    observed.state = setup.optimizer.state_dict()["state"]
    observed.buffers = [b.detach().clone() for b in setup.model.buffers()]
    return observed


@functools.cache
def run_plain(name: str, target: int | None = None) -> Observed:
    """The reference: one big batch per step, ``zero_grad(); backward(); clip; step()``."""
    sc = BY_NAME[name]
    if target is not None:
        sc = dataclasses.replace(sc, target=target)
    data = sc.data()
    n = _size(data)
    setup = sc.build(0)
    observed = Observed([], {}, [])
    _Recorder(observed).attach(setup)
    total = 0.0
    for start in range(0, n, sc.target):
        batch = slice_batch(data, start, min(n, start + sc.target))
        setup.optimizer.zero_grad(set_to_none=True)
        out = setup.loss_fn(batch)
        if sc.token:
            loss_sum, items = out
            (loss_sum / items).backward()
            total += float(loss_sum.detach())
        else:
            out.backward()
            total += float(out.detach()) * _size(batch)
        if sc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(setup.model.parameters(), sc.max_grad_norm)
        setup.optimizer.step()
    observed.loss_total = total
    return _finish(setup, observed)


@functools.cache
def step_memory(name: str, target: int, micro: int | None = None) -> tuple[int, int, int]:
    """(resident bytes between steps, peak bytes while a step's micro-batches run (one
    micro-batch, or ``micro`` samples each), peak bytes of its inner optimizer step) on a
    simulated device with room for everything: the range a drawn capacity is placed in."""
    sc = dataclasses.replace(BY_NAME[name], target=target)
    setup = sc.build(0)
    device = autoaccum.SimulatedDevice(capacity_bytes=2**40)
    opt = _wrap(sc, setup, micro, device)
    inner = [0]

    def reset(*_: Any) -> None:
        device.reset_peak()

    def read(*_: Any) -> None:
        inner[0] = max(inner[0], device.peak_bytes())

    setup.optimizer.register_step_pre_hook(reset)
    setup.optimizer.register_step_post_hook(read)
    data = sc.data()
    n = _size(data)
    for k in range(4):  # peaks move by a few hundred bytes from step to step (model internals)
        rows = torch.arange(k * target, (k + 1) * target) % n
        opt.step(setup.loss_fn, take(data, rows))
    records = opt.history[1:]  # after the first step: the optimizer state exists
    assert all(r.micro_batch_size == (micro or target) for r in records)
    return (device.allocated_bytes(), max(int(r.peak_bytes or 0) for r in records), inner[0])


def _wrap(sc: Scenario, setup: Setup, micro: int | None,
          memory: autoaccum.SimulatedDevice | None) -> autoaccum.AutoAccumOptimizer:
    return autoaccum.AutoAccumOptimizer(
        setup.optimizer, target_batch_size=sc.target, micro_batch_size=micro, memory=memory,
        max_grad_norm=sc.max_grad_norm, count_items=sc.count_items, **sc.options)


class _AutoRun:
    """autoaccum's side: the objects, the injected fault, the resume."""

    def __init__(self, sc: Scenario, var: Variation) -> None:
        self.sc, self.var = sc, var
        self.observed = Observed([], {}, [])
        self.recorder = _Recorder(self.observed)
        self.passes = {"forward": 0, "backward": 0}
        self._build(0)

    def _build(self, seed: int) -> None:
        sc, var = self.sc, self.var
        self.setup = sc.build(seed)
        memory = None
        if var.micro is None:
            resident, peak, inner = step_memory(sc.name, sc.target)
            one_sample = step_memory(sc.name, 2, 1)[1]  # with the step's gradient resident
            # A real device has slack beyond one step's peak (allocator blocks, workspaces); 2 KiB
            # here covers what a call keeps (losses, weights) on these tiny models. One
            # sample always fits, and so does the inner optimizer step: an OOM there is issue
            # 22's, not drawn yet.
            capacity = max(resident + int(var.capacity * (peak - resident)),
                           one_sample, inner) + _SLACK
            memory = autoaccum.SimulatedDevice(capacity_bytes=capacity)
        self.opt = _wrap(sc, self.setup, var.micro, memory)
        self.opt.fast_path = var.fast_path
        self.recorder.attach(self.setup)
        first = next(p for p in self.setup.model.parameters() if p.requires_grad)
        first.register_hook(self._backward)

    def _fire(self, where: str) -> None:
        self.passes[where] += 1
        if self.var.fault == (where, self.passes[where]):
            raise torch.OutOfMemoryError(OOM)

    def _backward(self, grad: torch.Tensor) -> torch.Tensor:
        self._fire("backward")
        return grad

    def loss_fn(self, batch: Any) -> Any:
        self._fire("forward")
        return self.setup.loss_fn(batch)

    def feed(self, batch: Any) -> None:
        """``opt.step`` with the documented retry rule."""
        for _ in range(64):
            try:
                loss = self.opt.step(self.loss_fn, batch)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                consumed = exc.autoaccum_consumed  # type: ignore[attr-defined]
                self.observed.loss_total = None
                if consumed == _size(batch):
                    return
                batch = slice_batch(batch, consumed, _size(batch))
                continue
            if self.observed.loss_total is not None:
                self.observed.loss_total += float(loss) * self.sc.items(batch)
            return
        raise AssertionError("a call never succeeded")

    def flush(self) -> None:
        for _ in range(64):
            try:
                self.opt.flush(self.loss_fn)
                return
            except (torch.OutOfMemoryError, RuntimeError):
                self.observed.loss_total = None
        raise AssertionError("flush never succeeded")

    def resume(self) -> None:
        """A mid-run checkpoint, through torch.save and the default torch.load, into objects
        built with other initial weights."""
        buffer = io.BytesIO()
        sched = self.setup.scheduler
        torch.save({"model": self.setup.model.state_dict(), "opt": self.opt.state_dict(),
                    "sched": sched.state_dict() if sched is not None else None}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        self._build(seed=1)
        self.setup.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])
        if self.setup.scheduler is not None:
            self.setup.scheduler.load_state_dict(saved["sched"])


def run_auto(name: str, var: Variation) -> Observed:
    sc = BY_NAME[name]
    if var.target is not None:
        sc = dataclasses.replace(sc, target=var.target)
    data = sc.data()
    n = _size(data)
    run = _AutoRun(sc, var)
    start = 0
    for call, size in enumerate(itertools.cycle(var.loader)):
        if start >= n:
            break
        run.feed(slice_batch(data, start, min(n, start + size)))
        start += size
        if var.resume_after == call:
            run.resume()
    run.flush()
    run.observed.runs = run.passes["forward"]
    return _finish(run.setup, run.observed)


def compare(expected: Observed, actual: Observed, rtol: float = RTOL) -> list[str]:
    """What differs, one line each (empty: conformant). A tensor's error is relative to its own
    largest value, or to 1e-8 of the largest of its kind (all parameters, all gradients of the
    step, all optimizer state of that name) where it is smaller: a gradient of 1e-23 is the
    rounding residue of a cancellation, and its relative error means nothing."""
    out: list[str] = []
    floors: dict[str, float] = {}

    def floor(kind: str, tensors: Any) -> float:
        if kind not in floors:
            floors[kind] = 1e-8 * max((t.abs().max().item() for t in tensors
                                       if isinstance(t, torch.Tensor) and t.numel()
                                       and t.is_floating_point()), default=0.0)
        return floors[kind]

    def close(what: str, a: Any, e: Any, least: float = 0.0) -> None:
        if isinstance(e, torch.Tensor) or isinstance(a, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(e, torch.Tensor)):
                out.append(f"{what}: {type(a).__name__} where the plain loop has "
                           f"{type(e).__name__}")
                return
            if a.shape != e.shape:
                out.append(f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}")
                return
            if not e.is_floating_point():
                if not torch.equal(a, e):
                    out.append(f"{what}: {a.tolist()} vs {e.tolist()}")
                return
            err = (a - e).abs().max().item() if e.numel() else 0.0
            scale = e.abs().max().item() if e.numel() else 0.0
            if not err <= rtol * max(scale, least, 1e-300):
                out.append(f"{what}: max abs error {err:.3e} vs scale {scale:.3e}")
        elif a != e:
            out.append(f"{what}: {a!r} vs {e!r}")

    if len(actual.grads) != len(expected.grads):
        out.append(f"optimizer steps: {len(actual.grads)} vs {len(expected.grads)}")
    for s, (ga, ge) in enumerate(zip(actual.grads, expected.grads)):
        for i, (a, e) in enumerate(zip(ga, ge)):
            if (a is None) != (e is None):
                out.append(f"step {s + 1} .grad of parameter {i}: "
                           f"{'None' if a is None else 'a tensor'} vs "
                           f"{'None' if e is None else 'a tensor'}")
            elif a is not None:
                close(f"step {s + 1} .grad of parameter {i}", a, e, floor(f"grad{s}", ge))
    if actual.lrs != expected.lrs:
        out.append(f"learning rates per step: {actual.lrs} vs {expected.lrs}")
    for i, (a, e) in enumerate(zip(actual.params, expected.params, strict=True)):
        close(f"parameter {i}", a, e, floor("params", expected.params))
    for i, (a, e) in enumerate(zip(actual.buffers, expected.buffers, strict=True)):
        close(f"buffer {i}", a, e, floor("buffers", expected.buffers))
    if set(actual.state) != set(expected.state):
        out.append(f"optimizer state for parameters {sorted(actual.state)} vs "
                   f"{sorted(expected.state)}")
    for k in sorted(set(actual.state) & set(expected.state)):
        sa, se = actual.state[k], expected.state[k]
        if set(sa) != set(se):
            out.append(f"optimizer state keys of parameter {k}: {sorted(sa)} vs {sorted(se)}")
        for key in sorted(set(sa) & set(se)):
            close(f"optimizer state {key!r} of parameter {k}", sa[key], se[key],
                  floor(key, [st.get(key) for st in expected.state.values()]))
    if actual.loss_total is not None and expected.loss_total is not None:
        err = abs(actual.loss_total - expected.loss_total)
        if not err <= rtol * abs(expected.loss_total):
            out.append(f"total returned loss {actual.loss_total!r} vs {expected.loss_total!r}")
    return out
