"""What ``loss_fn`` may return, and how it is read.

* a scalar tensor: the micro-batch's **mean** loss over its samples;
* ``(loss_sum, num_items)``: **token mode**, the loss summed over the micro-batch's items (tokens)
  and their count; the step divides its summed loss by its total count;
* a ``dict`` with ``"loss"`` (and ``"num_items"`` for token mode) plus any other entries: the
  others are **auxiliary outputs** (metrics), handed back by the optimizer only for micro-batches
  whose gradients count, so they are never counted twice after an OOM replay. Tensors among them
  are detached; keep them small (a count, a sum), since they live until the call returns. Other
  ``Mapping`` types, such as a Hugging Face ``ModelOutput``, are read for ``"loss"`` (and
  ``"num_items"``) only: their logits are not kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

# Forms, fixed per call on its first micro-batch so later ones are read without checks.
TENSOR, PAIR, DICT, MAPPING = range(4)


class Output(NamedTuple):
    loss: torch.Tensor
    items: Any  # None in mean mode; a number or a one-element tensor in token mode
    aux: dict[str, Any] | None


def form_of(out: Any) -> int:
    """Which form ``out`` has; raises TypeError with the accepted forms otherwise."""
    if isinstance(out, torch.Tensor):
        return TENSOR
    if isinstance(out, (tuple, list)) and len(out) == 2:
        items = out[1]
        if isinstance(items, torch.Tensor) and items.numel() != 1:
            raise TypeError(
                f"loss_fn returned a pair whose second item is a tensor of shape "
                f"{tuple(items.shape)}; a pair means (loss_sum, num_items). To hand back other "
                "outputs, return a dict: {'loss': loss, 'logits_argmax': ...}"
            )
        return PAIR
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError(
                f"loss_fn returned a {type(out).__name__} without a 'loss' entry (keys "
                f"{sorted(map(str, out.keys()))}); expected {{'loss': ..., 'num_items': ... "
                "(token mode only), any other outputs}"
            )
        return DICT if type(out) is dict else MAPPING
    raise TypeError(
        f"loss_fn must return a scalar tensor, a (loss_sum, num_items) pair or a dict with "
        f"'loss'; got {type(out).__name__}"
    )


def read(out: Any, form: int) -> Output:
    """``out`` (of a known ``form``) as loss, item count and auxiliary outputs, unchecked."""
    if form == TENSOR:
        return Output(out, None, None)
    if form == PAIR:
        return Output(out[0], out[1], None)
    items = out.get("num_items")
    if form == MAPPING:
        return Output(out["loss"], items, None)
    aux = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
           for k, v in out.items() if k != "loss" and k != "num_items"}
    return Output(out["loss"], items, aux)


def check(output: Output, token: bool) -> None:
    """Full checks of one micro-batch's output (done on the first micro-batch of a call)."""
    what = "loss_sum" if token else "loss"
    loss = output.loss
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor or a (loss_sum, num_items) pair; its {what} is "
            f"a {type(loss).__name__}"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn returned a {what} of shape {tuple(loss.shape)}; expected a scalar (reduce "
            "with .mean(), or return (loss.sum(), num_items) for token-level losses)"
        )
    if token:
        check_items(output.items)
    if not loss.requires_grad and not (token and no_items(output.items)):
        raise no_graph_error(what)


def no_graph_error(what: str = "loss") -> ValueError:
    """``loss_fn``'s loss has no graph, and its micro-batch is not an item-less token one."""
    return ValueError(
        f"loss_fn returned a {what} that does not require grad: is the model's output used, and "
        "is autograd enabled (no torch.no_grad())? (Only a token-mode micro-batch with "
        "num_items == 0 may return a constant.)"
    )


def no_items(items: Any) -> bool:
    """Whether a micro-batch's ``num_items`` is zero (a host sync for a tensor count: asked only
    of a loss without a graph)."""
    return bool(items == 0)


def check_items(items: Any) -> None:
    """A micro-batch's ``num_items``: a finite number >= 0, or a one-element tensor (whose value
    is checked once per call, see :func:`item_total`)."""
    if isinstance(items, torch.Tensor):
        if items.numel() != 1:
            raise ValueError(f"num_items must be a scalar, got shape {tuple(items.shape)}")
        if items.is_complex():
            raise ValueError(f"num_items must be a real count, got dtype {items.dtype}")
        return
    if (
        isinstance(items, bool)
        or not isinstance(items, (int, float))
        or not math.isfinite(items)
        or items < 0
    ):
        raise ValueError(
            f"num_items must be a finite number >= 0 (the items, e.g. tokens, the loss_sum "
            f"adds up), got {items!r}"
        )


def item_total(items: list[Any]) -> tuple[Any, str | None]:
    """A call's item counts summed, and why they are unusable (a negative, NaN or infinite
    count) or None. Numbers are summed on the host; tensor counts with one stack and one sum, and
    checked at one host sync, once per call (a handful of ops, whatever the micro-batch count)."""
    numbers = [x for x in items if not isinstance(x, torch.Tensor)]
    host: Any = sum(numbers)
    bad = [x for x in numbers if isinstance(x, bool) or not isinstance(x, (int, float))
           or not math.isfinite(x) or x < 0]
    if bad:
        return host, f"num_items {bad} hold a negative, NaN, infinite or non-numeric count"
    tensors = [x if x.dim() == 0 else x.reshape(()) for x in items if isinstance(x, torch.Tensor)]
    if not tensors:
        return host, None
    stacked = torch.stack(tensors)
    total = stacked.sum()
    # NaN fails the first test (min is NaN), -inf too, +inf the second (the sum is infinite).
    if not bool((stacked.amin() >= 0) & torch.isfinite(total)):
        return total, f"num_items {stacked.tolist()} hold a negative, NaN or infinite count"
    return (total + host if numbers else total), None
