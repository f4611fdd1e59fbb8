"""OOM recovery: faults injected at every point, each run checked for exactness afterwards."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import autoaccum
from autoaccum import planner
from autoaccum.oom import is_oom
from tests.helpers import (
    assert_params_close,
    loader,
    make_data,
    make_model,
    mean_loss_fn,
    reference_params,
    sgd,
    token_loss_fn,
)

OOM = "CUDA out of memory. Tried to allocate 20.00 MiB (injected)"


@pytest.fixture(autouse=True, params=["fast", "full"])
def driver_path(request, monkeypatch):
    """Every test here runs on both paths of the driver."""
    monkeypatch.setattr(autoaccum.AutoAccumOptimizer, "fast_path", request.param == "fast")
    return request.param


class Faults:
    """Raises torch.OutOfMemoryError on chosen forward calls and chosen backward passes.

    The backward fault fires in a gradient hook of the *first* layer's weight, which autograd
    reaches last: by then the other parameters' gradients are already accumulated.
    """

    def __init__(self, model, forward_at=(), backward_at=(), token=False):
        self.model = model
        self.forward_at, self.backward_at = set(forward_at), set(backward_at)
        self.forwards = self.backwards = 0
        self.sizes: list[int] = []
        self.inner = token_loss_fn(model) if token else mean_loss_fn(model)
        model[0].weight.register_hook(self._hook)

    def _hook(self, grad):
        self.backwards += 1
        if self.backwards in self.backward_at:
            raise torch.OutOfMemoryError(OOM)
        return grad

    def __call__(self, batch):
        self.forwards += 1
        self.sizes.append(batch["x"].shape[0])
        if self.forwards in self.forward_at:
            raise torch.OutOfMemoryError(OOM)
        return self.inner(batch)


def run(sizes, target, micro, token=False, n=None, **faults):
    data = make_data(n or sum(sizes))
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=target,
                                       micro_batch_size=micro)
    fn = Faults(model, token=token, **faults)
    for batch in loader(data, sizes):
        opt.step(fn, batch)
    opt.flush()
    assert_params_close(list(model.parameters()), reference_params(data, target, token, sgd))
    return opt, fn


@pytest.mark.parametrize("token", [False, True])
def test_forward_oom_on_the_first_micro_batch(token):
    opt, fn = run([16, 16], target=16, micro=8, token=token, forward_at={1})
    assert opt.oom_events == 1 and opt.plan.micro_batch_size == 4
    assert fn.sizes[:2] == [8, 4]  # the failed samples are redone at the new size
    assert opt.optimizer_steps == 2


def test_forward_oom_on_a_later_micro_batch():
    opt, fn = run([20, 12], target=16, micro=6, forward_at={3})
    assert opt.oom_events == 1 and opt.plan.micro_batch_size == 3
    assert fn.backwards == fn.forwards - 1  # no sample ran backward twice


@pytest.mark.parametrize("token", [False, True])
def test_backward_oom_replays_the_step(token):
    # Target 16 from calls of 10 and 22: the step straddles calls, and the OOM hits the backward
    # of the 4th micro-batch, in the second call: the first call's samples must be replayed too.
    opt, _ = run([10, 22], target=16, micro=4, token=token, backward_at={4})
    assert opt.oom_events == 1 and opt.plan.micro_batch_size == 2
    assert opt.optimizer_steps == 2


def test_backward_oom_in_the_last_micro_batch_of_a_step():
    opt, _ = run([16], target=16, micro=4, backward_at={4})
    assert opt.oom_events == 1 and opt.optimizer_steps == 1


def test_repeated_ooms_halve_until_it_fits():
    opt, fn = run([16, 16], target=16, micro=16, forward_at={1, 2}, backward_at={1})
    assert opt.oom_events == 3 and opt.plan.micro_batch_size == 2
    assert fn.sizes[:4] == [16, 8, 4, 2]


def test_oom_at_one_sample_raises_with_remedies():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=4,
                                       micro_batch_size=1)
    before = [p.detach().clone() for p in model.parameters()]
    fn = Faults(model, forward_at=range(1, 100))
    with pytest.raises(torch.OutOfMemoryError, match=r"1 sample does not fit.*checkpointing"):
        opt.step(fn, make_data(4))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert opt.optimizer_steps == 0


def test_oom_in_the_inner_step_is_never_retried():
    model = make_model()
    inner = sgd(model.parameters())
    steps = {"n": 0}

    def failing_step(*_a, **_k):
        steps["n"] += 1
        raise torch.OutOfMemoryError(OOM)

    inner.step = failing_step
    opt = autoaccum.AutoAccumOptimizer(inner, target_batch_size=8, micro_batch_size=4)
    with pytest.raises(autoaccum.StepOutOfMemoryError, match="partly updated"):
        opt.step(mean_loss_fn(model), make_data(8))
    assert steps["n"] == 1 and opt.optimizer_steps == 0 and opt.oom_events == 1
    assert opt.pending_samples == 0  # the step's samples are consumed, not replayed


def test_grow_back_after_clean_steps():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=64,
                                       micro_batch_size=32)
    opt.policy.grow_after = 3
    data = make_data(64 * 8)
    fn = Faults(model, forward_at={1})
    limits = []
    for batch in loader(data, [64] * 8):
        opt.step(fn, batch)
        limits.append(opt.plan.micro_batch_size)
    # 32 fails -> 16; after 3 clean steps try 22 (64 = 22+21+21), adopted after a clean step;
    # nothing a split of 64 can run lies between 22 and 32, so it stays there.
    assert limits == [16, 16, 16, 22, 22, 22, 22, 22]
    assert opt.oom_events == 1
    assert_params_close(list(model.parameters()), reference_params(data, 64, False, sgd))


def test_a_failed_grow_back_returns_to_the_known_good_size():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=24,
                                       micro_batch_size=24)
    opt.policy.grow_after = 2

    def fn(batch):
        if batch["x"].shape[0] > 7:
            raise torch.OutOfMemoryError(OOM)
        return mean_loss_fn(model)(batch)

    data = make_data(24 * 8)
    limits = []
    for batch in loader(data, [24] * 8):
        opt.step(fn, batch)
        limits.append(opt.plan.micro_batch_size)
    # 24 and 12 fail -> 6; the trial at 8 fails -> back to 6, which is then known to be the best.
    assert limits[0] == 6 and 8 in limits and limits[-3:] == [6, 6, 6]
    assert opt.oom_events == 3
    assert_params_close(list(model.parameters()), reference_params(data, 24, False, sgd))


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
        "non-contiguous input.",
        "CUDA out of memory. Tried to allocate 1.00 GiB",
    ],
)
def test_library_allocation_failures_count_as_oom(message):
    assert is_oom(RuntimeError(message))


def test_other_errors_are_not_oom():
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("CUDA out of memory"))  # only RuntimeErrors carry it
    assert is_oom(torch.OutOfMemoryError("anything"))


def test_oom_events_are_logged_with_sizes(caplog):
    with caplog.at_level(logging.INFO, logger="autoaccum"):
        run([8], target=8, micro=8, forward_at={1})
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    message = warning[0].getMessage()
    assert "micro-batch 8" in message and "continuing at 4" in message


# ------------------------------------------------------------------ on a SimulatedDevice
def mlp(width=256):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def inputs(kind, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g) if kind == "mlp" else torch.randn(n, 3, 8, 8, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def trainer(kind, capacity, target, micro=None):
    model = mlp() if kind == "mlp" else cnn()
    device = autoaccum.SimulatedDevice(capacity_bytes=capacity)
    opt = autoaccum.AutoAccumOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                       target_batch_size=target, memory=device,
                                       micro_batch_size=micro)

    def loss_fn(b):
        return nn.functional.cross_entropy(model(b[0]), b[1])

    def do_step(i):
        opt.step(loss_fn, inputs(kind, target, seed=i))

    return opt, do_step


def train(kind, capacity, target, steps, micro=None):
    """Returns the optimizer and the OOM events after the first step."""
    opt, do_step = trainer(kind, capacity, target, micro)
    do_step(0)
    first = opt.oom_events
    for i in range(1, steps):
        do_step(i)
    return opt, opt.oom_events - first


def largest_that_fits(kind, capacity, target):
    lo, hi = 1, target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        opt, _ = train(kind, capacity, target, steps=2, micro=mid)
        if opt.oom_events == 0:
            lo = mid
        else:
            hi = mid - 1
    return lo


@pytest.mark.parametrize(("kind", "capacity"), [("mlp", 3 * 2**20), ("mlp", int(2.625 * 2**20)),
                                              ("cnn", 4 * 2**20)])
def test_plan_reaches_the_largest_runnable_size_and_never_runs_out_of_memory(kind, capacity):
    target = 1024
    best = max(planner.balanced_split(target, largest_that_fits(kind, capacity, target)))
    assert 8 < best < target, "the capacity must make the plan need accumulation"
    opt, do_step = trainer(kind, capacity, target)
    trial_micro_steps = []
    settled_after = None
    for i in range(6):
        probing = opt.policy.probing
        do_step(i)
        if settled_after is None:
            trial_micro_steps.append(opt.oom_events + (2 if probing else 0))
            if opt.policy.settled:
                settled_after = i
    chosen = max(opt.plan.micro_batch_sizes)
    assert chosen == opt.plan.micro_batch_size  # the plan reports the size it runs
    assert chosen == best, (chosen, best)
    assert settled_after is not None and settled_after <= 2
    assert trial_micro_steps[-1] <= 3  # two probes and at most one OOM while settling
    assert opt.oom_events <= 1  # ... and none once settled


def test_the_first_probe_fits_a_model_that_is_large_for_its_device():
    """1/64 of the target (16 samples) does not fit; the first probe is sized from the budget and
    the parameter bytes instead, so the plan is made without any OOM."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    per_sample = 6 * 512 * 4  # activations kept for backward, roughly
    # Weights, gradients, AdamW state, its step's temporaries, and about 12 samples.
    capacity = 6 * params + 12 * per_sample
    device = autoaccum.SimulatedDevice(capacity_bytes=capacity)
    opt = autoaccum.AutoAccumOptimizer(torch.optim.AdamW(model.parameters()),
                                       target_batch_size=1024, memory=device)
    sizes = []

    def loss_fn(b):
        sizes.append(b[0].shape[0])
        return nn.functional.cross_entropy(model(b[0]), b[1])

    opt.step(loss_fn, inputs("mlp", 1024))
    assert sizes[0] < 16 and opt.oom_events == 0
    assert not opt.policy.probing


def test_an_inner_step_that_cannot_fit_raises_before_training():
    """AdamW's foreach step needs a parameter-sized temporary on top of gradients and state;
    where even that does not fit, no micro-batch size helps: say so before any forward."""
    torch.manual_seed(0)
    model = mlp()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    inner = torch.optim.AdamW(model.parameters(), foreach=True)
    device = autoaccum.SimulatedDevice(capacity_bytes=4 * params + params // 2)
    opt = autoaccum.AutoAccumOptimizer(inner, target_batch_size=64, memory=device)
    forwards = []
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(b):
        forwards.append(1)
        return nn.functional.cross_entropy(model(b[0]), b[1])

    with pytest.raises(autoaccum.StepOutOfMemoryError, match=r"fused=True.*foreach=False"):
        opt.step(loss_fn, inputs("mlp", 64))
    assert forwards == [] and opt.optimizer_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    # The same device trains with the fused implementation (no temporaries).
    fine = autoaccum.AutoAccumOptimizer(torch.optim.AdamW(model.parameters(), fused=True),
                                        target_batch_size=64, memory=device)
    fine.step(loss_fn, inputs("mlp", 64))
    assert fine.optimizer_steps == 1


def test_squeeze_mid_step_halves_and_stays_exact():
    """Another process takes memory in the middle of a step: the OOM happens in the simulated
    forward or backward, the step is finished at half size, and the result stays exact."""
    data = make_data(96)
    model = make_model()
    device = autoaccum.SimulatedDevice(capacity_bytes=2**30)
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=32,
                                       micro_batch_size=16, memory=device)
    inner = mean_loss_fn(model)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        if calls["n"] == 4:  # second micro-batch of the second step
            device.capacity_bytes = device.allocated_bytes() + 3000
        return inner(batch)

    for batch in loader(data, [32, 32, 32]):
        opt.step(loss_fn, batch)
    assert opt.oom_events >= 1 and opt.plan.micro_batch_size < 16
    assert_params_close(list(model.parameters()), reference_params(data, 32, False, sgd))


def test_replan_when_free_memory_moves_between_steps():
    opt, do_step = trainer("mlp", 3 * 2**20, 1024)
    do_step(0)
    do_step(1)
    planned = opt.plan.micro_batch_size
    opt.memory.capacity_bytes -= opt.memory.free_bytes() // 3  # another process takes memory
    do_step(2)  # seen at the start of the step: re-planned before any micro-batch runs
    smaller = opt.plan.micro_batch_size
    assert smaller < planned and opt.oom_events == 0
    opt.memory.capacity_bytes = 3 * 2**20  # ... and frees it
    do_step(4)
    assert opt.plan.micro_batch_size == planned and opt.oom_events == 0


def test_the_found_plan_survives_state_dict():
    opt, _ = train("mlp", 3 * 2**20, 1024, steps=2)
    state = opt.state_dict()
    model = mlp()
    opt2 = autoaccum.AutoAccumOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                        target_batch_size=1024,
                                        memory=autoaccum.SimulatedDevice(capacity_bytes=3 * 2**20))
    assert opt2.policy.probing
    opt2.load_state_dict(state)
    assert not opt2.policy.probing
    assert opt2.plan.micro_batch_size == opt.plan.micro_batch_size


def test_history_records_each_step_with_its_oom_and_sizes():
    model = make_model()
    device = autoaccum.SimulatedDevice(capacity_bytes=2**30)
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=8, memory=device)
    fn = Faults(model, forward_at={3})  # first micro-batch of the second step
    for batch in loader(make_data(48), [16, 16, 16]):
        opt.step(fn, batch)
    steps = [(h.step, h.samples, h.micro_batch_size, h.accumulation_steps, h.oom_events)
             for h in opt.history]
    assert steps == [(1, 16, 8, 2, 0), (2, 16, 4, 4, 1), (3, 16, 4, 4, 0)]
    assert all(h.peak_bytes and h.free_bytes is not None and h.samples_per_s > 0
               for h in opt.history)


class CountingBackend:
    """A SimulatedDevice that counts the queries made of it."""

    def __init__(self, capacity):
        self.inner = autoaccum.SimulatedDevice(capacity_bytes=capacity)
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in ("free_bytes", "allocated_bytes", "reset_peak", "peak_bytes", "release"):
            def counted(*a, **k):
                self.calls[name] = self.calls.get(name, 0) + 1
                return attr(*a, **k)
            return counted
        return attr

    def active(self, tensors):
        return self.inner.active(tensors)


@pytest.mark.parametrize("micro", [None, 64])
def test_memory_queries_once_settled_are_per_step_not_per_micro_batch(micro):
    backend = CountingBackend(3 * 2**20)
    model = mlp()
    opt = autoaccum.AutoAccumOptimizer(torch.optim.AdamW(model.parameters()),
                                       target_batch_size=1024, memory=backend,
                                       micro_batch_size=micro)

    def loss_fn(b):
        return nn.functional.cross_entropy(model(b[0]), b[1])

    for i in range(2):  # probe and settle
        opt.step(loss_fn, inputs("mlp", 1024, seed=i))
    backend.calls.clear()
    for i in range(3):
        opt.step(loss_fn, inputs("mlp", 1024, seed=10 + i))
    assert opt.plan.accumulation_steps >= 3  # several micro-batches per step...
    # ...and still only these 4 queries per step: free memory and a peak reset at the start, the
    # micro-batches' peak before the inner step, the resident bytes after it.
    assert backend.calls == {"free_bytes": 3, "reset_peak": 3, "peak_bytes": 3,
                             "allocated_bytes": 3}


class ThrashingBackend(CountingBackend):
    """A SimulatedDevice whose allocator reports cudaMalloc retries from a given step on."""

    def __init__(self, capacity, thrash_from):
        super().__init__(capacity)
        self.steps = 0
        self.thrash_from = thrash_from

    def alloc_retries(self):
        self.steps += 1
        return max(0, self.steps - self.thrash_from)


def test_allocator_thrash_steps_the_size_down_one_runnable_size():
    backend = ThrashingBackend(3 * 2**20, thrash_from=4)
    model = mlp()
    opt = autoaccum.AutoAccumOptimizer(torch.optim.AdamW(model.parameters()),
                                       target_batch_size=1024, memory=backend)

    def loss_fn(b):
        return nn.functional.cross_entropy(model(b[0]), b[1])

    limits = []
    for i in range(6):
        opt.step(loss_fn, inputs("mlp", 1024, seed=i))
        limits.append(opt.plan.micro_batch_size)
    assert limits[3] == 342 and limits[4] == 256  # 1024 = 3 x 342 -> 4 x 256, not 171
    assert opt.oom_events == 0
