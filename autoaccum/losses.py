"""Token-level losses in the form that accumulates exactly: ``(loss_sum, num_items)``.

A micro-batch's *mean* over its tokens weights every micro-batch alike, whatever its token count, so
the step's result would depend on how the step was cut into micro-batches. The sum over tokens
together with the token count does not: the optimizer divides the step's summed loss by the step's
total count, exactly as one big batch would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "count_causal_lm_items"]


def count_causal_lm_items(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The number of tokens a causal-LM loss counts in ``labels`` (``(batch, seq)``): every label
    after the first position (the shift) that is not ``ignore_index``. A 0-d int64 tensor on
    ``labels``' device; counting a CPU batch costs no device sync.

    Pass it as ``count_items=lambda b: count_causal_lm_items(b["labels"])`` so the optimizer knows
    each step's token count before its first backward pass (see ``AutoAccumOptimizer``).
    """
    if labels.dim() < 2:
        raise ValueError(
            f"labels must be (batch, sequence), got shape {tuple(labels.shape)}; for one sequence "
            "use labels[None]"
        )
    return (labels[:, 1:] != ignore_index).sum()


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy as ``(loss_sum, num_items)``.

    ``logits`` is ``(batch, seq, vocab)`` and ``labels`` ``(batch, seq)``, aligned as Hugging Face
    causal-LM models align them: position ``t`` predicts ``labels[:, t + 1]``. Labels equal to
    ``ignore_index`` (padding, prompts) count neither in the sum nor in the count. The sum is taken
    in float32 at least, whatever the logits' dtype. Return it from ``loss_fn`` and every step
    applies the gradient of the mean over all counted tokens of the step, however it is split::

        def loss_fn(b):
            return autoaccum.causal_lm_loss(model(b["input_ids"]).logits, b["labels"])
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (batch, seq, vocab) and labels (batch, seq) with the same batch and "
            f"seq, got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index,
                               reduction="sum")
    return loss_sum, (shift_labels != ignore_index).sum()
