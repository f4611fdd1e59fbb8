"""The Optimizer contract, mixed precision, clipping, bad input, logging, host syncs."""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch

import autoaccum
from tests.helpers import (
    assert_params_close,
    loader,
    make_data,
    make_model,
    mean_loss_fn,
    reference_params,
    sgd,
    slice_data,
    token_loss_fn,
)


def wrapped(target=8, micro=None, **kw):
    model = make_model()
    return model, autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=target,
                                               micro_batch_size=micro, **kw)


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return params, grads, copy.deepcopy(opt.optimizer.state_dict())


def assert_unchanged(model, opt, snap):
    params, grads, state = snap
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    for p, before in zip(model.parameters(), grads):
        assert (p.grad is None and before is None) or torch.equal(p.grad, before)
    assert str(opt.optimizer.state_dict()) == str(state)


# ------------------------------------------------------------------ the Optimizer contract
def test_is_an_optimizer_sharing_groups_and_state():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = autoaccum.AutoAccumOptimizer(inner, target_batch_size=4)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5


def test_class_construction_passes_arguments_to_the_inner_optimizer():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD, model.parameters(), lr=0.3, momentum=0.5,
                                       target_batch_size=4)
    assert isinstance(opt.optimizer, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["momentum"] == 0.5


def test_plain_step_and_closure_keep_their_standard_meaning():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       target_batch_size=4)
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    batch = slice_data(make_data(4), 0, 4)

    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        mean_loss_fn(m)(batch).backward()
        o.step()

        def closure(m=m, o=o):
            o.zero_grad()
            loss = mean_loss_fn(m)(batch)
            loss.backward()
            return loss

        assert torch.is_tensor(o.step(closure))
    assert_params_close(list(model.parameters()), list(ref.parameters()), rtol=0)
    assert opt.optimizer_steps == 2


def test_zero_grad_delegates():
    model, opt = wrapped()
    mean_loss_fn(model)(slice_data(make_data(3), 0, 3)).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_plan_reports_balanced_micro_batches():
    model, opt = wrapped(target=100, micro=32)
    assert opt.plan == autoaccum.Plan(32, 4, (25, 25, 25, 25))
    opt.step(mean_loss_fn(model), slice_data(make_data(100), 0, 100))
    assert opt.plan.micro_batch_sizes == (25, 25, 25, 25)


def test_returns_the_calls_mean_loss_detached():
    model, opt = wrapped(target=64, micro=3)
    data = make_data(10)
    loss = opt.step(mean_loss_fn(model), data)
    assert not loss.requires_grad
    with torch.no_grad():
        expected = mean_loss_fn(make_model())(data)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8", None])
def test_target_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="target_batch_size must be a positive int"):
        autoaccum.AutoAccumOptimizer(sgd(make_model().parameters()), target_batch_size=bad)


def test_micro_batch_size_must_be_a_positive_int():
    with pytest.raises(ValueError, match="micro_batch_size"):
        autoaccum.AutoAccumOptimizer(sgd(make_model().parameters()), target_batch_size=4,
                                     micro_batch_size=0)


def test_wrapper_keyword_clashing_with_the_inner_optimizer_is_rejected():
    class ClippingSGD(torch.optim.SGD):
        def __init__(self, params, lr=0.1, max_grad_norm=1.0):
            super().__init__(params, lr=lr)

    with pytest.raises(TypeError, match=r"ClippingSGD takes its own \['max_grad_norm'\]"):
        autoaccum.AutoAccumOptimizer(ClippingSGD, make_model().parameters(), target_batch_size=4,
                                     max_grad_norm=1.0)


def test_extra_arguments_with_a_built_optimizer_are_rejected():
    with pytest.raises(TypeError, match="extra arguments"):
        autoaccum.AutoAccumOptimizer(sgd(make_model().parameters()), target_batch_size=4, lr=1.0)


def _pending_state(target=8, data=None):
    """An optimizer part-way through a step, so .grad holds accumulated values."""
    model, opt = wrapped(target=target, micro=2)
    opt.step(mean_loss_fn(model), slice_data(make_data(5) if data is None else data, 0, 5))
    assert opt.pending_samples == 5 and model[0].weight.grad is not None
    return model, opt


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        ({"a": 1, "b": "x"}, TypeError, "holds no tensor"),
        ((torch.zeros(3, 2), torch.zeros(4)), ValueError, r"disagree on dim 0.*3.*4"),
        (torch.zeros(0, 5), ValueError, "empty"),
        (torch.tensor(1.0), ValueError, "0-d tensor"),
    ],
)
def test_bad_batches_raise_and_change_nothing(batch, error, match):
    model, opt = _pending_state()
    snap = snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step(mean_loss_fn(model), batch)
    assert_unchanged(model, opt, snap)
    assert opt.pending_samples == 5


@pytest.mark.parametrize(
    ("make_loss", "error", "match"),
    [
        (lambda m: lambda b: mean_loss_fn(m)(b) * torch.ones(2), ValueError, "shape"),
        (lambda m: lambda b: (token_loss_fn(m)(b)[0], 0), ValueError, "num_items"),
        (lambda m: lambda b: (token_loss_fn(m)(b)[0], -2), ValueError, "num_items"),
        (lambda m: lambda b: 3.0, TypeError, "scalar tensor"),
        (lambda m: lambda b: mean_loss_fn(m)(b).detach(), ValueError, "does not require grad"),
    ],
)
def test_bad_losses_raise_and_change_nothing(make_loss, error, match):
    model, opt = _pending_state()
    snap = snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step(make_loss(model), slice_data(make_data(6, seed=3), 0, 6))
    assert_unchanged(model, opt, snap)
    assert opt.pending_samples == 5


def test_error_on_a_later_micro_batch_leaves_only_whole_gradients_and_continues_exactly():
    """The first micro-batches of the call ran backward when the third raised: the call's samples
    are dropped, .grad is cleared, and the earlier call's samples wait for a replay."""
    data = make_data(16)
    model, opt = _pending_state(target=16, data=data)
    calls = []

    def flaky(batch):
        calls.append(batch["x"].shape[0])
        if len(calls) == 3:
            raise RuntimeError("user bug")
        return mean_loss_fn(model)(batch)

    with pytest.raises(RuntimeError, match="user bug") as info:
        opt.step(flaky, slice_data(make_data(6, seed=3), 0, 6))
    assert info.value.autoaccum_consumed == 0 and opt.last_call_consumed == 0
    assert all(p.grad is None for p in model.parameters())
    assert opt.pending_samples == 5 and opt.replay_samples == 5
    # ...and the run continues exactly: finish the step and compare with the reference.
    opt.step(mean_loss_fn(model), slice_data(data, 5, 16))
    assert opt.optimizer_steps == 1 and opt.pending_samples == 0
    assert_params_close(list(model.parameters()), reference_params(data, 16, False, sgd))


# ------------------------------------------------------------------ precision and clipping
def manual_accumulation(micro_sizes, data, target, autocast_dtype=None, scaler=None, clip=None):
    """The loop a careful user writes by hand."""
    model = make_model().float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = 0
    for step_start in range(0, data["x"].shape[0], target):
        for size in micro_sizes:
            b = slice_data(data, start, start + size)
            b = {**b, "x": b["x"].float()}
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = mean_loss_fn(model)(b) * (size / target)
            (scaler.scale(loss) if scaler else loss).backward()
            start += size
        if scaler:
            scaler.unscale_(opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        assert start == step_start + target
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_the_hand_written_loop(dtype):
    data = make_data(32)
    scaler_kw = {"init_scale": 2.0**8} if dtype == torch.float16 else None
    ref = manual_accumulation([6, 5, 5], data, 16, dtype,
                              torch.amp.GradScaler("cpu", **scaler_kw) if scaler_kw else None)
    model = make_model().float()
    scaler = torch.amp.GradScaler("cpu", **scaler_kw) if scaler_kw else None
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                       target_batch_size=16, micro_batch_size=6,
                                       grad_scaler=scaler)

    def loss_fn(b):
        with torch.autocast("cpu", dtype=dtype):
            return mean_loss_fn(model)({**b, "x": b["x"].float()})

    for batch in loader(data, [16, 16]):
        opt.step(loss_fn, batch)
    assert opt.plan.micro_batch_sizes == (6, 5, 5)
    for a, e in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-6)


def test_grad_scaler_scales_each_micro_backward_and_steps_once_per_step():
    model = make_model().float()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    counts = {"scale": 0, "step": 0, "update": 0}
    for name in counts:
        original = getattr(scaler, name)

        def counted(*a, _name=name, _orig=original, **k):
            counts[_name] += 1
            return _orig(*a, **k)

        setattr(scaler, name, counted)
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       target_batch_size=12, micro_batch_size=4,
                                       grad_scaler=scaler)
    data = make_data(24)
    poison = {"on": False}

    def loss_fn(b):
        loss = mean_loss_fn(model)({**b, "x": b["x"].float()})
        return loss * float("inf") if poison["on"] else loss

    opt.step(loss_fn, slice_data(data, 0, 12))
    assert counts == {"scale": 3, "step": 1, "update": 1}
    before = [p.detach().clone() for p in model.parameters()]
    poison["on"] = True
    opt.step(loss_fn, slice_data(data, 12, 24))
    assert opt.skipped_steps == 1 and opt.optimizer_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**9


def test_clipping_applies_once_to_the_full_normalized_gradient():
    data = make_data(40)
    max_norm = 0.05
    ref = make_model()
    ref_opt = sgd(ref.parameters())
    for start in range(0, 40, 16):
        ref_opt.zero_grad()
        mean_loss_fn(ref)(slice_data(data, start, min(40, start + 16))).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        assert norm > max_norm  # clipping is active in this test
        ref_opt.step()
    model, opt = wrapped(target=16, micro=3, max_grad_norm=max_norm)
    for batch in loader(data, [10, 10, 10, 10]):
        opt.step(mean_loss_fn(model), batch)
    opt.flush()
    assert_params_close(list(model.parameters()), list(ref.parameters()))


# ------------------------------------------------------------------ DDP seam, syncs, logging
class FakeDDP(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        self.inside = False
        self.forwards: list[bool] = []

    def forward(self, x):
        self.forwards.append(self.inside)
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


def test_every_micro_batch_runs_under_no_sync():
    """Also in one process (DDP with world size 1): a backward OOM can then never leave DDP's
    reducer waiting for an interrupted reduction, and there is nothing to reduce."""
    model = make_model()
    ddp = FakeDDP(model)
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8,
                                       micro_batch_size=2, model=ddp)
    for batch in loader(make_data(16), [5, 11]):
        opt.step(mean_loss_fn(ddp), batch)
    # Step 1: 5 samples as 2+2+1, then 3 as 2+1; step 2: 8 as 2+2+2+2.
    assert opt.optimizer_steps == 2
    assert ddp.forwards == [True] * 9


def test_no_host_sync_per_micro_batch(monkeypatch):
    model, opt = wrapped(target=64, micro=2)
    syncs = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            syncs.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    opt.step(mean_loss_fn(model), make_data(20))
    monkeypatch.undo()
    assert opt.plan.micro_batch_sizes is not None and opt.pending_samples == 20
    assert syncs == []


def test_logs_plan_changes_and_never_prints(caplog, capsys):
    model, opt = wrapped(target=8, micro=4)
    fail = {"left": 1}

    def loss_fn(b):
        if fail["left"]:
            fail["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return mean_loss_fn(model)(b)

    with caplog.at_level(logging.INFO, logger="autoaccum"):
        opt.step(loss_fn, make_data(8))
    assert opt.oom_events == 1 and opt.plan.micro_batch_size == 2
    assert any(r.levelno == logging.INFO and "4 -> 2" in r.getMessage() for r in caplog.records)
    assert all(r.name == "autoaccum" for r in caplog.records)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_a_call_under_autocast_that_crosses_a_step_runs_on_the_new_weights():
    """autocast caches low-precision copies of the weights for its whole region; one call that
    holds two steps must not run the second step's micro-batches on the first step's copies."""

    def run(calls: list[tuple[int, int]]) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                           target_batch_size=8, micro_batch_size=4)
        x, y = torch.randn(16, 4), torch.randn(16, 3)
        for lo, hi in calls:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # cache_enabled by default
                opt.step(lambda b: ((model(b[0]).float() - b[1]) ** 2).mean(),
                         (x[lo:hi], y[lo:hi]))
        assert opt.optimizer_steps == 2
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    # Same micro-batches, same bf16 rounding: one call of two steps equals two calls of one.
    assert torch.equal(run([(0, 16)]), run([(0, 8), (8, 16)]))
