"""What a step owns beyond its gradients (issue 28): module buffers through failed calls, and a
bounded history. Exactness under OOMs, resumes and unused parameters is the conformance suite's
(scenarios resnet18-batchnorm, unused-head-adamw-wd, moe-unrouted-experts-adamw,
unfreeze-backbone-clip, sparse-embedding-sparseadam)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoaccum


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()


def bn_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,),
                                                                                  generator=g)


def train(fail_at: int | None, model_kw: bool = True) -> nn.Module:
    """target 8, micro 4, calls of 4 samples; ``fail_at``: the call whose loss_fn raises after
    the model's forward (the BatchNorm statistics are already updated), retried as documented."""
    model = bn_model()
    opt = autoaccum.AutoAccumOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), target_batch_size=8,
        micro_batch_size=4, model=model if model_kw else None)
    x, y = bn_data()
    calls = 0

    def loss_fn(b):
        out = F.cross_entropy(model(b[0]), b[1])
        if calls == fail_at:
            raise ValueError("a metric failed after the forward")
        return out

    for start in range(0, 24, 4):
        calls += 1
        batch = (x[start:start + 4], y[start:start + 4])
        try:
            opt.step(loss_fn, batch)
        except ValueError as exc:
            rest = exc.autoaccum_consumed  # type: ignore[attr-defined]
            calls += 1  # the retry does not fail
            opt.step(loss_fn, (batch[0][rest:], batch[1][rest:]))
    opt.flush()
    return model


@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_a_failed_call_leaves_no_buffer_update_behind(fail_at):
    expected = train(None)
    actual = train(fail_at)
    for a, e in zip(list(actual.buffers()) + list(actual.parameters()),
                    list(expected.buffers()) + list(expected.parameters()), strict=True):
        assert torch.allclose(a, e, rtol=1e-12, atol=0), (a, e)


def test_without_model_a_failed_call_updates_the_buffers_twice():
    """The reason for model=: autoaccum cannot see buffers it is not given."""
    expected = train(None, model_kw=False)
    actual = train(2, model_kw=False)
    assert list(actual.buffers())[2].item() == list(expected.buffers())[2].item() + 1


def test_history_keeps_a_bounded_window_of_the_newest_steps(monkeypatch):
    monkeypatch.setattr(autoaccum.AutoAccumOptimizer, "history_size", 20)
    model = nn.Linear(3, 1).double()
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                       target_batch_size=2)
    x = torch.randn(2, 3, dtype=torch.float64)
    lengths = []
    for _ in range(100):
        opt.step(lambda b: model(b).pow(2).mean(), x)
        lengths.append(len(opt.history))
    assert max(lengths) == 22 and lengths[-1] <= 22
    assert opt.history[-1].step == 100 and opt.history[0].step == 100 - len(opt.history) + 1
    assert opt.optimizer_steps == 100
