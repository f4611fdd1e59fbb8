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
from autoaccum import planner

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
    model: bool = True  # pass model= (buffers exact through replays; required if split-dependent)

    def command(self, scenario: Scenario) -> str:
        """The one command that reruns this variation and prints what differs."""
        return f"python -m tests.conformance {scenario.name} '{json.dumps(asdict(self))}'"


@dataclass
class Observed:
    params: list[torch.Tensor]
    state: dict[int, dict[str, Any]]
    buffers: list[torch.Tensor]
    grads: list[list[torch.Tensor | None]] = field(default_factory=list)  # per step
    splits: list[tuple[int, ...]] = field(default_factory=list)  # micro-batch sizes per step
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
    """Step hooks on every inner optimizer of a setup: the gradient it steps on, then the
    scheduler (the first optimizer's), the learning rates and ``on_step``."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed

    def attach(self, setup: Setup) -> None:
        for opt in setup.optimizers:
            opt.register_step_pre_hook(functools.partial(self._pre, opt))
            opt.register_step_post_hook(functools.partial(self._post, setup, opt))

    def _pre(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        # Outside any SimulatedDevice: the suite's own copies take none of the device's memory.
        with _disable_current_modes():
            self.observed.grads.append(
                [None if p.grad is None else p.grad.detach().clone() for p in params])

    def _post(self, setup: Setup, opt: torch.optim.Optimizer, *_: Any) -> None:
        if setup.scheduler is not None and opt is setup.optimizer:
            setup.scheduler.step()
        self.observed.lrs.append([g["lr"] for g in opt.param_groups])
        if setup.on_step is not None:
            setup.on_step(len(self.observed.lrs))


def _finish(setup: Setup, observed: Observed) -> Observed:
    observed.params = [p.detach().clone() for p in setup.model.parameters()]
    observed.state = {f"{i}.{k}": v for i, opt in enumerate(setup.optimizers)
                      for k, v in opt.state_dict()["state"].items()}
    observed.buffers = [b.detach().clone() for b in setup.model.buffers()]
    return observed


def _steps(sc: Scenario, n: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + sc.target)) for start in range(0, n, sc.target)]


@functools.cache
def run_plain(name: str, target: int | None = None,
              splits: tuple[tuple[int, ...], ...] | None = None) -> Observed:
    """The reference: one big batch per step, ``zero_grad(); backward(); clip; step()`` on each
    optimizer the body steps; with ``splits``, the plain accumulation loop cut into those
    micro-batches (each one's loss weighted by its share of the step; token mode: divided by the
    step's item count)."""
    sc = BY_NAME[name]
    if target is not None:
        sc = dataclasses.replace(sc, target=target)
    data = sc.data()
    setup = sc.build(0)
    observed = Observed([], {}, [])
    _Recorder(observed).attach(setup)
    total = 0.0
    k = 0

    def step(i: int, loss_fn: Any, batch: Any) -> None:
        nonlocal total
        opt = setup.optimizers[i]
        opt.zero_grad(set_to_none=True)
        n = _size(batch)
        sizes = splits[k] if splits is not None else (n,)
        assert sum(sizes) == n
        step_items: Any = None
        if sc.token and len(sizes) > 1:
            assert sc.count_items is not None
            step_items = sc.count_items(batch)
        scaler = setup.scaler if i == 0 else None
        at = 0
        for size in sizes:
            out = loss_fn(slice_batch(batch, at, at + size))
            at += size
            if sc.token:
                loss_sum, items = out
                loss = loss_sum / (items if step_items is None else step_items)
                total += float(loss_sum.detach())
            else:
                loss = out * (size / n)
                total += float(out.detach()) * size
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        if sc.max_grad_norm is not None:
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, sc.max_grad_norm)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()

    for k, (start, stop) in enumerate(_steps(sc, _size(data))):
        if setup.between is not None:
            setup.between(k, setup.optimizer)
        sc.body(setup, slice_batch(data, start, stop), step)
    observed.loss_total = total
    return _finish(setup, observed)


@functools.cache
def step_memory(name: str, target: int, micro: int | None = None) -> tuple[int, int, int]:
    """(resident bytes between steps, peak bytes while a step's micro-batches run (one
    micro-batch, or ``micro`` samples each), peak bytes of an inner optimizer step) on a
    simulated device with room for everything: the range a drawn capacity is placed in."""
    sc = dataclasses.replace(BY_NAME[name], target=target)
    setup = sc.build(0)
    device = autoaccum.SimulatedDevice(capacity_bytes=2**40)
    opts = [_wrap(sc, setup, inner, micro, device) for inner in setup.optimizers]
    inner_peak = [0]

    def reset(*_: Any) -> None:
        device.reset_peak()

    def read(*_: Any) -> None:
        inner_peak[0] = max(inner_peak[0], device.peak_bytes())

    for inner in setup.optimizers:
        inner.register_step_pre_hook(reset)
        inner.register_step_post_hook(read)
    data = sc.data()
    n = _size(data)
    steps = 0
    for k in range(4 * n):  # peaks move by a few hundred bytes from step to step (model internals)
        batch = take(data, torch.arange(k * target, (k + 1) * target) % n)
        if sc.token and not sc.items(batch):
            continue  # a step needs items
        sc.body(setup, batch, lambda i, fn, b: opts[i].step(fn, b))
        steps += 1
        if steps == 4:
            break
    records = [r for opt in opts for r in opt.history[1:]]  # the optimizer state exists
    assert all(r.micro_batch_size == (micro or target) for r in records)
    return (device.allocated_bytes(), max(int(r.peak_bytes or 0) for r in records),
            inner_peak[0])


def _inner_step_need(setup: Setup) -> int:
    """What autoaccum checks fits before training (parameters, gradients, the optimizer state,
    the inner step's temporaries): below it, it refuses to start, as documented."""
    need = 0
    for opt in setup.optimizers:
        params = [p for g in opt.param_groups for p in g["params"]]
        size = sum(p.numel() * p.element_size() for p in params)
        state = planner.state_buffers_per_param(opt) * size
        need = max(need, size + state + planner.step_temporaries(opt, params))  # grads too
    return need + sum(p.numel() * p.element_size() for p in setup.model.parameters())


def _wrap(sc: Scenario, setup: Setup, inner: torch.optim.Optimizer, micro: int | None,
          memory: autoaccum.SimulatedDevice | None, model: bool = True
          ) -> autoaccum.AutoAccumOptimizer:
    return autoaccum.AutoAccumOptimizer(
        inner, target_batch_size=sc.target, micro_batch_size=micro, memory=memory,
        max_grad_norm=sc.max_grad_norm, count_items=sc.count_items,
        model=setup.model if model else None,
        grad_scaler=setup.scaler if inner is setup.optimizer else None, **sc.options)


class _AutoRun:
    """autoaccum's side: the objects, the injected fault, the resume."""

    def __init__(self, sc: Scenario, var: Variation) -> None:
        self.sc, self.var = sc, var
        self.observed = Observed([], {}, [])
        self.recorder = _Recorder(self.observed)
        self.passes = {"forward": 0, "backward": 0}
        self.inside = False  # faults fire only inside autoaccum's calls
        self._build(0)

    def _build(self, seed: int) -> None:
        sc, var = self.sc, self.var
        self.setup = sc.build(seed)
        memory = None
        if var.micro is None:
            resident, peak, inner = step_memory(sc.name, sc.target)
            one_sample = step_memory(sc.name, 2, 1)[1]  # with the step's gradient resident
            inner = max(inner, _inner_step_need(self.setup))
            # A real device has slack beyond one step's peak (allocator blocks, workspaces); 2 KiB
            # here covers what a call keeps (losses, weights) on these tiny models. One
            # sample always fits, and so does the inner optimizer step: an OOM there is issue
            # 22's, not drawn yet.
            capacity = max(resident + int(var.capacity * (peak - resident)),
                           one_sample, inner) + _SLACK
            memory = autoaccum.SimulatedDevice(capacity_bytes=capacity)
        self.opts = [_wrap(sc, self.setup, inner, var.micro, memory,
                           model=var.model or sc.split_dependent)
                     for inner in self.setup.optimizers]
        for opt in self.opts:
            opt.fast_path = var.fast_path
        self.recorder.attach(self.setup)
        first = self.opts[0]  # the sizes each step ended with (private: read, never written)
        self.setup.optimizer.register_step_pre_hook(
            lambda *_: self.observed.splits.append(tuple(first._last_sizes or ())))
        param = next(p for p in self.setup.model.parameters() if p.requires_grad)
        param.register_hook(self._backward)

    def _fire(self, where: str) -> None:
        if not self.inside:
            return
        self.passes[where] += 1
        if self.var.fault == (where, self.passes[where]):
            raise torch.OutOfMemoryError(OOM)

    def _backward(self, grad: torch.Tensor) -> torch.Tensor:
        self._fire("backward")
        return grad

    def step(self, i: int, loss_fn: Any, batch: Any) -> None:
        """``opts[i].step`` with the documented retry rule."""

        def faulty(b: Any) -> Any:
            self._fire("forward")
            return loss_fn(b)

        for _ in range(64):
            self.inside = True
            try:
                loss = self.opts[i].step(faulty, batch)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                consumed = exc.autoaccum_consumed  # type: ignore[attr-defined]
                self.observed.loss_total = None
                if consumed == _size(batch):
                    return
                batch = slice_batch(batch, consumed, _size(batch))
                continue
            finally:
                self.inside = False
            items = self.sc.items(batch)
            if self.observed.loss_total is not None and items:  # no items: the mean is NaN
                self.observed.loss_total += float(loss) * items
            return
        raise AssertionError("a call never succeeded")

    def flush(self) -> None:
        for i, opt in enumerate(self.opts):
            fn = self.setup.loss_fn if i == 0 else self.setup.losses[i - 1]
            for _ in range(64):
                self.inside = True
                try:
                    opt.flush(fn)
                    break
                except (torch.OutOfMemoryError, RuntimeError):
                    self.observed.loss_total = None
                finally:
                    self.inside = False
            else:
                raise AssertionError("flush never succeeded")

    def between(self, done: int | None = None) -> None:
        if self.setup.between is not None:
            self.setup.between(self.opts[0].optimizer_steps if done is None else done,
                               self.opts[0])

    def resume(self) -> None:
        """A mid-run checkpoint, through torch.save and the default torch.load, into objects
        built with other initial weights."""
        buffer = io.BytesIO()
        sched = self.setup.scheduler
        scaler = self.setup.scaler
        torch.save({"model": self.setup.model.state_dict(),
                    "opts": [opt.state_dict() for opt in self.opts],
                    "sched": sched.state_dict() if sched is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        done = self.opts[0].optimizer_steps
        self._build(seed=1)
        self.between(done)  # the param groups the checkpoint was made with
        self.setup.model.load_state_dict(saved["model"])
        for opt, state in zip(self.opts, saved["opts"], strict=True):
            opt.load_state_dict(state)
        if self.setup.scheduler is not None:
            self.setup.scheduler.load_state_dict(saved["sched"])
        if self.setup.scaler is not None:
            self.setup.scaler.load_state_dict(saved["scaler"])
        if self.setup.on_step is not None:
            self.setup.on_step(len(self.observed.lrs))


def run_auto(name: str, var: Variation) -> Observed:
    sc = BY_NAME[name]
    if var.target is not None:
        sc = dataclasses.replace(sc, target=var.target)
    data = sc.data()
    n = _size(data)
    run = _AutoRun(sc, var)
    run.between()
    start = 0
    for call, size in enumerate(itertools.cycle(var.loader)):
        if start >= n:
            break
        sc.body(run.setup, slice_batch(data, start, min(n, start + size)), run.step)
        start += size
        run.between()  # a step boundary's change comes before a checkpoint taken there
        if var.resume_after == call:
            run.resume()
    run.flush()
    if sc.split_dependent and run.opts[0].oom_events:
        # The loss a call returned was computed at the sizes of its time; a later OOM may have
        # replayed its samples at other sizes, and BatchNorm makes the loss depend on them.
        run.observed.loss_total = None
    run.observed.runs = run.passes["forward"]
    return _finish(run.setup, run.observed)


def reference(name: str, var: Variation, actual: Observed) -> Observed:
    """The plain loop this run is compared with (cut as the run was, if split-dependent)."""
    if BY_NAME[name].split_dependent:
        return run_plain(name, var.target, tuple(actual.splits))
    return run_plain(name, var.target)


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
                                       and t.is_floating_point() and not t.is_sparse),
                                      default=0.0)
        return floors[kind]

    def close(what: str, a: Any, e: Any, least: float = 0.0) -> None:
        if isinstance(e, torch.Tensor) or isinstance(a, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(e, torch.Tensor)):
                out.append(f"{what}: {type(a).__name__} where the plain loop has "
                           f"{type(e).__name__}")
                return
            if a.is_sparse or e.is_sparse:  # sparse stays sparse, compared by value
                if a.is_sparse != e.is_sparse:
                    out.append(f"{what}: {'sparse' if a.is_sparse else 'dense'} where the plain "
                               f"loop's is {'sparse' if e.is_sparse else 'dense'}")
                    return
                a, e = a.to_dense(), e.to_dense()
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
