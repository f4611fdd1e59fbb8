"""The core guarantee: each step applies the gradient of the mean loss over exactly its samples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import autoaccum
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


@pytest.fixture(autouse=True, params=["fast", "full"])
def driver_path(request, monkeypatch):
    """Every test here runs on both paths of the driver."""
    monkeypatch.setattr(autoaccum.AutoAccumOptimizer, "fast_path", request.param == "fast")
    return request.param


def run_wrapped(data, sizes, target, token, micro=None, make_opt=sgd, as_tensor=False,
                schedule=None):
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(make_opt(model.parameters()), target_batch_size=target,
                                       micro_batch_size=micro)
    if schedule is not None:
        sched = schedule(opt)
        opt.register_step_post_hook(lambda *_: sched.step())
    loss_fn = token_loss_fn(model, as_tensor) if token else mean_loss_fn(model)
    for batch in loader(data, sizes):
        opt.step(loss_fn, batch)
    opt.flush()
    return model, opt


@st.composite
def runs(draw):
    target = draw(st.integers(1, 24))
    n = draw(st.integers(1, 80))
    sizes, left = [], n
    while left:
        s = draw(st.integers(1, min(left, 3 * target + 5)))
        sizes.append(s)
        left -= s
    micro = draw(st.one_of(st.none(), st.integers(1, target + 3)))
    token = draw(st.booleans())
    return n, target, sizes, micro, token


@settings(max_examples=60, deadline=None)
@given(runs())
def test_matches_one_batch_per_step_reference(run):
    n, target, sizes, micro, token = run
    data = make_data(n)
    model, opt = run_wrapped(data, sizes, target, token, micro)
    expected = reference_params(data, target, token, sgd)
    assert_params_close(list(model.parameters()), expected)
    assert opt.optimizer_steps == -(-n // target)
    assert opt.pending_samples == 0


def test_token_mode_with_tensor_counts_matches_reference():
    data = make_data(45)
    model, _ = run_wrapped(data, [7, 11, 20, 7], target=16, token=True, micro=3, as_tensor=True)
    assert_params_close(list(model.parameters()), reference_params(data, 16, True, sgd))


def test_adamw_several_steps_in_one_call():
    data = make_data(64)
    adamw = lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)  # noqa: E731
    model, opt = run_wrapped(data, [64], target=16, token=False, micro=5, make_opt=adamw)
    assert opt.optimizer_steps == 4
    assert_params_close(list(model.parameters()), reference_params(data, 16, False, adamw))


def test_lr_scheduler_advances_once_per_optimizer_step():
    data = make_data(50)
    def schedule(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    # Calls that straddle steps and calls holding several steps: the scheduler must still move
    # exactly between optimizer steps.
    model, opt = run_wrapped(data, [5, 30, 1, 14], target=8, token=False, micro=3,
                             schedule=schedule)
    expected = reference_params(data, 8, False, sgd, schedule=schedule)
    assert_params_close(list(model.parameters()), expected)
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5**opt.optimizer_steps


def test_mean_of_micro_batch_means_would_be_wrong():
    """The reference is sensitive to the weighting: an unweighted mean over micro-batches of
    unequal size, or a per-micro-batch token mean, gives different parameters."""
    data = make_data(10)
    expected = reference_params(data, 10, True, sgd)
    model = make_model()
    opt = sgd(model.parameters())
    for part in ([0, 3], [3, 10]):
        from tests.helpers import slice_data

        loss_sum, items = token_loss_fn(model)(slice_data(data, *part))
        (loss_sum / items / 2).backward()
    opt.step()
    err = max((a - e).abs().max().item() for a, e in zip(model.parameters(), expected))
    assert err > 1e-6


def test_resume_from_state_dict_mid_step_continues_exactly():
    data = make_data(40)
    sizes = [6, 9, 10, 15]
    expected = reference_params(data, 16, False, sgd)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=4)
    batches = loader(data, sizes)
    for b in batches[:2]:
        opt.step(mean_loss_fn(model), b)
    assert opt.pending_samples == 15 and opt.optimizer_steps == 0
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict()}

    model2 = make_model(seed=123)  # different weights: everything must come from the checkpoint
    model2.load_state_dict(checkpoint["model"])
    opt2 = autoaccum.AutoAccumOptimizer(sgd(model2.parameters()), target_batch_size=16,
                                        micro_batch_size=4)
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.pending_samples == 15
    for b in batches[2:]:
        opt2.step(mean_loss_fn(model2), b)
    opt2.flush()
    assert opt2.optimizer_steps == 3
    assert_params_close(list(model2.parameters()), expected)


def test_resume_after_full_steps_keeps_momentum_and_counters():
    data = make_data(48)
    expected = reference_params(data, 16, True, sgd)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9,
                                       target_batch_size=16)
    batches = loader(data, [16, 16, 16])
    opt.step(token_loss_fn(model), batches[0])
    state = opt.state_dict()
    model2 = make_model(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = autoaccum.AutoAccumOptimizer(torch.optim.SGD, model2.parameters(), lr=0.1, momentum=0.9,
                                        target_batch_size=16)
    opt2.load_state_dict(state)
    assert opt2.optimizer_steps == 1
    for b in batches[1:]:
        opt2.step(token_loss_fn(model2), b)
    assert_params_close(list(model2.parameters()), expected)


def test_flush_is_a_no_op_without_pending_samples():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.flush() is False
    assert opt.optimizer_steps == 0
    assert_params_close(list(model.parameters()), before, rtol=0)
