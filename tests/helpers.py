"""Shared test fixtures: a tiny float64 model, data, loss functions and a one-batch reference."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Targets = namedtuple("Targets", ["y", "mask"])

IN, HIDDEN, OUT, TOKENS = 5, 7, 3, 4


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT * TOKENS)).double()


def make_data(n: int, seed: int = 1) -> dict[str, Any]:
    """``n`` samples; each has TOKENS targets of which a random, non-empty subset counts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g, dtype=torch.float64)
    y = torch.randn(n, TOKENS, OUT, generator=g, dtype=torch.float64)
    mask = torch.rand(n, TOKENS, generator=g) < 0.6
    mask[:, 0] = True
    return {"x": x, "t": Targets(y, mask), "note": "non-tensor leaf"}


def _item_losses(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    assert batch["note"] == "non-tensor leaf"
    pred = model(batch["x"]).view(-1, TOKENS, OUT)
    per_token = ((pred - batch["t"].y) ** 2).mean(-1)
    return per_token, batch["t"].mask


def mean_loss_fn(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """Mean over the micro-batch's samples of each sample's mean over its counted tokens."""

    def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
        per_token, mask = _item_losses(model, batch)
        per_sample = (per_token * mask).sum(1) / mask.sum(1)
        return per_sample.mean()

    return loss_fn


def token_loss_fn(model: nn.Module, as_tensor: bool = False) -> Callable[[Any], Any]:
    """``(sum over counted tokens, number of counted tokens)``: token-level normalization."""

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        per_token, mask = _item_losses(model, batch)
        n = mask.sum()
        return (per_token * mask).sum(), (n if as_tensor else int(n))

    return loss_fn


def slice_data(data: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {
        "x": data["x"][start:stop],
        "t": Targets(data["t"].y[start:stop], data["t"].mask[start:stop]),
        "note": data["note"],
    }


def loader(data: dict[str, Any], sizes: Sequence[int]) -> list[dict[str, Any]]:
    out, start = [], 0
    for s in sizes:
        out.append(slice_data(data, start, start + s))
        start += s
    return out


def reference_params(
    data: dict[str, Any],
    target: int,
    token: bool,
    make_opt: Callable[[Any], torch.optim.Optimizer],
    seed: int = 0,
    schedule: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> list[torch.Tensor]:
    """One plain optimizer step per ``target`` consecutive samples on the full-batch loss; the
    leftover samples make a last, smaller step."""
    model = make_model(seed)
    opt = make_opt(model.parameters())
    sched = schedule(opt) if schedule else None
    n = data["x"].shape[0]
    for start in range(0, n, target):
        batch = slice_data(data, start, min(n, start + target))
        opt.zero_grad()
        if token:
            loss_sum, items = token_loss_fn(model)(batch)
            (loss_sum / items).backward()
        else:
            mean_loss_fn(model)(batch).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                        rtol: float = 1e-10) -> None:
    for a, e in zip(actual, expected, strict=True):
        err = (a - e).abs().max().item()
        scale = e.abs().max().item()
        assert err <= rtol * max(scale, 1e-30), f"max abs error {err:.3e} vs scale {scale:.3e}"


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)
