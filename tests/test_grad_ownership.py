"""A step owns its gradients and its samples (issue 32). The loops that write gradients outside
``opt.step`` (a GAN, FGSM, linear probing then fine-tuning) are conformance scenarios; here are
the cases that are not a training loop."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import autoaccum
from tests.helpers import loader, make_data, make_model, mean_loss_fn, reference_params, sgd


class AuxFirst(nn.Module):
    """A head declared before the body and unused by the loss: its gradient stays None."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(3, 2).double()
        self.body = make_model()


@pytest.mark.parametrize("habit", ["model.zero_grad", "clip_grad_norm_"])
def test_a_habit_between_calls_is_seen_whatever_parameter_comes_first(habit):
    """The old check watched the first parameter only; an unused first one hid every habit."""
    data = make_data(32)
    model = AuxFirst()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=3)
    loss_fn = mean_loss_fn(model.body)
    with pytest.warns(UserWarning, match="changed between step"):
        for batch in loader(data, [5, 6, 5, 16]):
            opt.step(loss_fn, batch)
            if habit == "model.zero_grad":
                model.zero_grad()
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    expected = reference_params(data, 16, False, sgd)
    for a, e in zip(list(model.body.parameters()), expected, strict=True):
        assert torch.allclose(a, e, rtol=1e-10, atol=0)
    assert model.aux.weight.grad is None


def test_gradients_copied_in_after_a_load_are_not_the_steps():
    """Issue 22: a checkpoint restored, then old .grad tensors copied into the parameters."""
    data = make_data(48)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=3)
    for batch in loader(data, [10, 10]):
        opt.step(mean_loss_fn(model), batch)
    grads = [p.grad.clone() for p in model.parameters()]
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    fresh = make_model(seed=3)
    fresh.load_state_dict(saved["model"])
    opt = autoaccum.AutoAccumOptimizer(sgd(fresh.parameters()), target_batch_size=16,
                                       micro_batch_size=3)
    opt.load_state_dict(saved["opt"])
    for p, g in zip(fresh.parameters(), grads):
        p.grad = g.clone()
    with pytest.warns(UserWarning, match="written outside opt.step"):
        for batch in loader(data, [10, 10, 10, 18])[2:]:
            opt.step(mean_loss_fn(fresh), batch)
    assert opt.pending_samples == 0 and opt.optimizer_steps == 3
    expected = reference_params(data, 16, False, sgd)
    for a, e in zip(fresh.parameters(), expected, strict=True):
        assert torch.allclose(a, e, rtol=1e-10, atol=0)


def test_a_float64_gradient_is_rescaled_in_float64_next_to_a_float32_one():
    """Token mode with tensor counts: the step's factor is cast per gradient dtype."""
    torch.manual_seed(0)
    w32 = torch.randn(4, dtype=torch.float32, requires_grad=True)
    w64 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(8, 4, dtype=torch.float64)
    mask = torch.rand(8, 4) < 0.7

    def loss_fn(b):
        xb, mb = b
        per = (xb * w32.double()).sin() * w64 + (xb * w64).cos()
        return (per * mb).sum(), mb.sum()

    ref = [w32.detach().clone().requires_grad_(True), w64.detach().clone().requires_grad_(True)]
    per = (x * ref[0].double()).sin() * ref[1] + (x * ref[1]).cos()
    ((per * mask).sum() / mask.sum()).backward()
    expected = ref[1] - 0.5 * ref[1].grad
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD([w32, w64], lr=0.5), target_batch_size=8)
    opt.step(loss_fn, (x[:3], mask[:3]))  # the count is not known before the step's end
    opt.step(loss_fn, (x[3:], mask[3:]))
    assert torch.allclose(w64.detach(), expected, rtol=1e-12, atol=0)


def test_target_batch_size_is_read_only_and_says_how_to_change_it():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16)
    with pytest.raises(AttributeError, match=r"fixed at 16.*got 8.*flush"):
        opt.target_batch_size = 8  # type: ignore[misc]
    assert opt.target_batch_size == 16 and opt.plan.accumulation_steps >= 1


def test_lbfgs_is_refused_at_construction():
    model = make_model()
    with pytest.raises(TypeError, match="LBFGS re-evaluates a closure"):
        autoaccum.AutoAccumOptimizer(torch.optim.LBFGS(model.parameters()), target_batch_size=8)
    with pytest.raises(TypeError, match="LBFGS"):
        autoaccum.AutoAccumOptimizer(torch.optim.LBFGS, model.parameters(), target_batch_size=8)


def test_state_dict_refuses_samples_a_loader_overwrote_in_place():
    """A static-buffer loader (DALI, CUDA prefetchers) refilled the held samples: saving them
    would resume on the next batch's contents."""
    data = make_data(16)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8)
    buffer = loader(data, [4])[0]
    opt.step(mean_loss_fn(model), buffer)
    buffer["x"].copy_(make_data(4, seed=9)["x"])  # the loader writes its next batch
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.pending_samples == 4


def test_a_batch_tensor_that_carries_a_graph_is_refused_before_anything_runs():
    """Distillation with the teacher run without no_grad(): its logits share one graph."""
    data = make_data(8)
    model, teacher = make_model(), make_model(seed=4)
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8,
                                       micro_batch_size=3)
    before = [p.detach().clone() for p in model.parameters()]
    batch = {**data, "teacher": teacher(data["x"])}
    with pytest.raises(ValueError, match=r"batch\['teacher'\] carries an autograd graph.*detach"):
        opt.step(lambda b: mean_loss_fn(model)(b), batch)
    assert opt.pending_samples == 0 and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    leaf = data["x"].clone().requires_grad_(True)  # a leaf that requires grad is an input
    opt.step(lambda b: mean_loss_fn(model)(b), {**data, "x": leaf})
    assert opt.optimizer_steps == 1 and leaf.grad is not None


def test_the_watch_keeps_no_cleared_gradient_alive_while_the_next_step_runs():
    """The watch's references to the last call's gradients must not outlive their clearing:
    on a GPU they would hold one more gradient's memory through the next step."""
    import gc
    import weakref

    data = make_data(16)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8,
                                       micro_batch_size=3)
    opt.step(mean_loss_fn(model), loader(data, [5])[0])
    old = [weakref.ref(p.grad) for p in model.parameters()]
    alive_in_next_step = []

    def loss_fn(b):
        if opt.optimizer_steps == 1:  # step 1 is done: its gradients were cleared
            gc.collect()
            alive_in_next_step.append(sum(r() is not None for r in old))
        return mean_loss_fn(model)(b)

    opt.step(loss_fn, loader(data, [5, 11])[1])  # 3 samples end step 1, 8 more run step 2
    assert alive_in_next_step and max(alive_in_next_step) == 0
