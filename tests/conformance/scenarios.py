"""The workflows the conformance suite trains, each a short declarative :class:`Scenario`.

A scenario says how to build a fresh model, its inner optimizer, its data and its loss, once. The
runner (:mod:`tests.conformance.runner`) trains it twice, as the plain PyTorch loop (one big batch
per step: ``zero_grad(); backward(); clip; step(); scheduler.step()``) and through autoaccum under a
drawn variation, and compares everything a user can observe. Adding a workflow is adding one
scenario to :data:`SCENARIOS`; a scenario whose defect is filed and not yet fixed is added by the
change that fixes it (the suite never skips and never expects a failure).

Every scenario is float64 and deterministic (no dropout), so 1e-10 relative is the bar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import autoaccum
from tests import helpers


@dataclass
class Setup:
    """One fresh copy of a scenario's objects."""

    model: nn.Module
    optimizer: torch.optim.Optimizer  # the inner optimizer, over the model's parameters
    loss_fn: Callable[[Any], Any]  # batch -> mean loss, or (loss_sum, num_items) in token mode
    scheduler: Any = None  # an LR scheduler on ``optimizer``, stepped once per optimizer step


@dataclass(frozen=True)
class Scenario:
    """A workflow: ``build(seed)`` makes fresh objects (``seed`` sets the initial weights; a
    resume loads the checkpoint into objects built with another seed), ``data()`` the whole data
    set as one batch whose tensors' dim 0 indexes samples."""

    name: str
    build: Callable[[int], Setup]
    data: Callable[[], Any]
    target: int  # target_batch_size; the data set is cut into steps of this many samples
    vary_target: bool = True  # variations may draw another target (not with a sized schedule)
    token: bool = False  # loss_fn returns (loss_sum, num_items)
    count_items: Callable[[Any], Any] | None = None  # token mode: items of a batch, on the host
    max_grad_norm: float | None = None
    options: dict[str, Any] = field(default_factory=dict)  # more AutoAccumOptimizer keywords
    # The bar: 1e-10 relative in float64. A model that computes parts in float32 whatever its
    # dtype rounds differently for one big batch and for its micro-batches (float64 matmuls
    # of other shapes differ in the last bit, and a float32 cast can flip on that bit), so its
    # bar is float32 rounding; such a scenario says so here.
    rtol: float = 1e-10

    def items(self, batch: Any) -> float:
        """How a batch is weighted in the run's total loss: its samples, or its items."""
        if self.count_items is None:
            return float(_first_tensor(batch).shape[0])
        return float(self.count_items(batch))

    def __repr__(self) -> str:
        return self.name


def _first_tensor(batch: Any) -> torch.Tensor:
    leaves = torch.utils._pytree.tree_leaves(batch)
    return next(x for x in leaves if isinstance(x, torch.Tensor))


# ---------------------------------------------------------------- an MLP (tests/helpers.py)
def _mlp(opt: Callable[[Any], torch.optim.Optimizer], token: bool = False,
         schedule: Callable[[torch.optim.Optimizer], Any] | None = None
         ) -> Callable[[int], Setup]:
    def build(seed: int) -> Setup:
        model = helpers.make_model(seed)
        inner = opt(model.parameters())
        fn = helpers.token_loss_fn(model) if token else helpers.mean_loss_fn(model)
        return Setup(model, inner, fn, schedule(inner) if schedule else None)

    return build


def _mlp_items(batch: Any) -> int:
    return int(batch["t"].mask.sum())


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _one_cycle(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8)


# ---------------------------------------------------------------- tiny transformers models
VOCAB, SEQ = 48, 10


def _lm_data(n: int = 40, seed: int = 3) -> dict[str, torch.Tensor]:
    """Right-padded sequences of random lengths, ``-100`` labels on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
    mask = torch.arange(SEQ)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    labels = ids.masked_fill(~mask, -100)
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


def _lm_items(batch: Any) -> Any:
    return autoaccum.count_causal_lm_items(batch["labels"])


def _causal_lm(config_name: str, **config: Any) -> Callable[[int], Setup]:
    def build(seed: int) -> Setup:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        torch.manual_seed(seed)
        model_cls = (transformers.GPT2LMHeadModel if config_name == "GPT2Config"
                     else transformers.LlamaForCausalLM)
        model = model_cls(cfg).double()
        if config.get("use_cache") is False:  # the name changed in transformers 5
            enable = (getattr(model, "activation_checkpointing_enable", None)
                      or model.gradient_checkpointing_enable)
            enable()
        model.train()

        def loss_fn(b: Any) -> Any:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return autoaccum.causal_lm_loss(logits, b["labels"])

        return Setup(model, _adamw(model.parameters()), loss_fn)

    return build


def _bert_data(n: int = 36, seed: int = 4) -> dict[str, torch.Tensor]:
    batch = _lm_data(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.randint(0, 3, (n,), generator=g)}


def _bert(seed: int) -> Setup:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ + 2, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg).double()
    model.train()

    def loss_fn(b: Any) -> Any:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits, b["labels"])

    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), loss_fn)


_GPT2 = dict(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
             bos_token_id=0, eos_token_id=0)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
              attn_implementation="eager")

SCENARIOS: list[Scenario] = [
    Scenario("mlp-sgd-momentum", _mlp(helpers.sgd), lambda: helpers.make_data(40), target=8),
    Scenario("mlp-adamw-wd-token", _mlp(_adamw, token=True), lambda: helpers.make_data(40),
             target=8, token=True, count_items=_mlp_items),
    Scenario("mlp-adamw-clip-onecycle", _mlp(_adamw, schedule=_one_cycle),
             lambda: helpers.make_data(40), target=6, max_grad_norm=0.05, vary_target=False),
    Scenario("gpt2-tied-padded-token", _causal_lm("GPT2Config", **_GPT2), _lm_data, target=8,
             token=True, count_items=_lm_items),
    Scenario("gpt2-gradient-checkpointing", _causal_lm("GPT2Config", use_cache=False, **_GPT2),
             lambda: _lm_data(24), target=8, token=True, count_items=_lm_items),
    # HF Llama runs RMSNorm and the rotary embedding in float32 whatever the model's dtype.
    Scenario("llama-padded-token-clip", _causal_lm("LlamaConfig", **_LLAMA), _lm_data, target=8,
             token=True, count_items=_lm_items, max_grad_norm=0.5, rtol=1e-5),
    Scenario("bert-classification", _bert, _bert_data, target=12),
]

BY_NAME = {s.name: s for s in SCENARIOS}
