"""A faithful Optimizer facade and exact resume from any gradient state (issue 8)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import autoaccum
from tests.helpers import (
    assert_params_close,
    make_data,
    make_model,
    mean_loss_fn,
    reference_params,
    sgd,
    slice_data,
)


def test_param_groups_state_and_defaults_stay_the_inner_optimizers_after_it_rebinds_them():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = autoaccum.AutoAccumOptimizer(inner, target_batch_size=4)
    opt.step(mean_loss_fn(model), make_data(4))
    # torch's Optimizer.load_state_dict rebinds param_groups and state on the inner optimizer.
    inner.load_state_dict(inner.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    assert len(inner.param_groups) == 2
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5


def test_attributes_of_the_inner_optimizer_are_reachable_through_the_wrapper():
    model = make_model()
    inner = sgd(model.parameters())
    inner.custom_flag = "seen"  # e.g. ZeroRedundancyOptimizer.consolidate_state_dict
    opt = autoaccum.AutoAccumOptimizer(inner, target_batch_size=4)
    assert opt.custom_flag == "seen"
    with pytest.raises(AttributeError):
        _ = opt.no_such_attribute


def _run(data, calls, interrupt_after=None):
    """StepLR on the wrapper; returns the learning rate the inner optimizer really used at each
    of its steps, and the parameters. With ``interrupt_after=k``, everything is saved after the
    k-th call (mid-step) and training continues on fresh objects loaded from that checkpoint."""
    used: list[float] = []

    def build(model):
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        inner.register_step_pre_hook(lambda o, *_: used.append(o.param_groups[0]["lr"]))
        opt = autoaccum.AutoAccumOptimizer(inner, target_batch_size=16, micro_batch_size=3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        opt.register_step_post_hook(lambda *_: sched.step())
        return opt, sched

    model = make_model()
    opt, sched = build(model)
    start = 0
    for i, size in enumerate(calls):
        opt.step(mean_loss_fn(model), slice_data(data, start, start + size))
        start += size
        if i == interrupt_after:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer)
            model = make_model(seed=7)  # other initial weights: everything must come back
            model.load_state_dict(saved["model"])
            opt, sched = build(model)
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
    opt.flush()
    return used, [p.detach().clone() for p in model.parameters()]


def test_a_resumed_run_uses_the_same_learning_rate_at_every_step_as_an_uninterrupted_one():
    data = make_data(96)
    calls = [10] * 9 + [6]
    expected_lrs, expected = _run(data, calls)
    assert expected_lrs == [0.1 * 0.5**i for i in range(6)]
    lrs, params = _run(data, calls, interrupt_after=3)  # 40 samples: 8 pending in step 3
    assert lrs == expected_lrs
    assert_params_close(params, expected)


@pytest.mark.parametrize("grads", ["kept", "copied and scaled", "random"])
def test_loading_mid_step_into_live_objects_continues_exactly_whatever_grad_holds(grads):
    data = make_data(32)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=3)
    opt.step(mean_loss_fn(model), slice_data(data, 0, 10))
    state = opt.state_dict()
    if grads == "copied and scaled":
        for p in model.parameters():
            p.grad = p.grad.clone() * 2
    elif grads == "random":
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    opt.load_state_dict(state)  # a rollback to the start of this call's state
    assert all(p.grad is None for p in model.parameters())
    assert opt.pending_samples == 10 and opt.replay_samples == 10
    opt.step(mean_loss_fn(model), slice_data(data, 10, 32))
    opt.flush()
    assert_params_close(list(model.parameters()), reference_params(data, 16, False, sgd))


def test_a_resumed_settled_plan_takes_no_probes():
    torch.manual_seed(0)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def run(model, opt, seed, sizes):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)

        def loss_fn(b):
            sizes.append(b[0].shape[0])
            return nn.functional.cross_entropy(model(b[0]), b[1])

        opt.step(loss_fn, (x, y))

    capacity = 700_000  # about half a step fits
    model = mlp()
    opt = autoaccum.AutoAccumOptimizer(
        torch.optim.AdamW(model.parameters()), target_batch_size=256,
        memory=autoaccum.SimulatedDevice(capacity_bytes=capacity))
    sizes: list[int] = []
    for seed in range(3):
        run(model, opt, seed, sizes)
    assert opt.policy.settled and opt.plan.accumulation_steps > 1
    planned = opt.plan.micro_batch_sizes
    state = opt.state_dict()
    fresh_model = mlp()
    fresh_model.load_state_dict(model.state_dict())
    fresh = autoaccum.AutoAccumOptimizer(
        torch.optim.AdamW(fresh_model.parameters()), target_batch_size=256,
        memory=autoaccum.SimulatedDevice(capacity_bytes=capacity))
    fresh.load_state_dict(state)
    assert not fresh.policy.probing
    sizes.clear()
    run(fresh_model, fresh, 9, sizes)
    assert tuple(sizes) == tuple(planned) and fresh.oom_events == opt.oom_events
