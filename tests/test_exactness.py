"""The core guarantee: each step applies the gradient of the mean loss over exactly its samples.

Exactness under every split, loader size, target, fault and resume is the conformance suite's
(tests/conformance); what stays here are the cases it does not draw."""

from __future__ import annotations

import pytest
import torch

import autoaccum
from tests.helpers import (
    assert_params_close,
    loader,
    make_data,
    make_model,
    reference_params,
    sgd,
    token_loss_fn,
)


@pytest.fixture(autouse=True, params=["fast", "full"])
def driver_path(request, monkeypatch):
    """Every test here runs on both paths of the driver."""
    monkeypatch.setattr(autoaccum.AutoAccumOptimizer, "fast_path", request.param == "fast")
    return request.param


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
