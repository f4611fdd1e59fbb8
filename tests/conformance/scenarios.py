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
    # Called with the number of optimizer steps done, after each step and after a resume: a
    # change the training loop makes at a step boundary (e.g. unfreezing a backbone).
    on_step: Callable[[int], None] | None = None
    others: list[torch.optim.Optimizer] = field(default_factory=list)  # more, in body order
    losses: list[Callable[[Any], Any]] = field(default_factory=list)  # more, for the body
    # Called between calls (aligned scenarios: at step boundaries) with the optimizer steps done
    # and the optimizer the loop holds (the plain one, or autoaccum's), before a resume's load:
    # e.g. ``opt.add_param_group``.
    between: Callable[[int, Any], None] | None = None
    scaler: torch.amp.GradScaler | None = None  # the first optimizer's GradScaler

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, *self.others]


Step = Callable[[int, Callable[[Any], Any], Any], None]  # (optimizer index, loss_fn, batch)


def default_body(setup: Setup, batch: Any, step: Step) -> None:
    """The loop body of most workflows: one optimizer, one loss."""
    step(0, setup.loss_fn, batch)


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
    # BatchNorm: a batch's statistics depend on how the step is cut, so the reference is the
    # plain accumulation loop cut as autoaccum's run ended up cutting each step (after OOM
    # halvings and replays: as if it had been planned at those sizes from the start).
    split_dependent: bool = False
    budget: float = 1.0  # share of the profile's examples (a slow model draws fewer)
    # The loop body, given a batch and ``step(i, loss_fn, batch)`` (the plain loop's
    # zero_grad/backward/clip/step on optimizer i, or autoaccum's ``opts[i].step``).
    body: Callable[[Setup, Any, Step], None] = default_body
    # Calls never straddle a step (the body computes from the parameters, e.g. an attack):
    # variations draw call sizes that divide the target; ``whole_steps``: one call per step
    # (a GAN, whose generator loss must see the discriminator after its whole step).
    aligned: bool = False
    whole_steps: bool = False
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


def _masked_data() -> dict[str, Any]:
    """Runs of three samples whose every item is masked: the split can make a micro-batch
    without items (each step of 8 still has some)."""
    data = helpers.make_data(40)
    for start in (5, 17, 30):
        data["t"].mask[start:start + 3] = False
    return data


def _masked(seed: int) -> Setup:
    model = helpers.make_model(seed)
    inner = helpers.token_loss_fn(model)

    def loss_fn(b: Any) -> Any:
        if not b["t"].mask.any():  # the natural early return: nothing to count
            return torch.zeros((), dtype=torch.float64), 0
        return inner(b)

    return Setup(model, _adamw(model.parameters()), loss_fn)


def _scaled(seed: int) -> Setup:
    """A GradScaler (growth every 2 steps, so the scale moves during the run) and clipping."""
    model = helpers.make_model(seed)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return Setup(model, _adamw(model.parameters()), helpers.mean_loss_fn(model), scaler=scaler)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _one_cycle(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8)


# ---------------------------------------------------------------- parameters without gradients
class _UnusedHead(nn.Module):
    """The MLP with an auxiliary head declared first and never used by the loss."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed + 100)
        self.aux = nn.Linear(helpers.HIDDEN, 2).double()
        self.body = helpers.make_model(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # type: ignore[no-any-return]


def _unused_head(seed: int) -> Setup:
    model = _UnusedHead(seed)
    fn = helpers.mean_loss_fn(model.body)
    return Setup(model, _adamw(model.parameters()), fn)


class _MoE(nn.Module):
    """Top-1 routing over 4 experts, weighted by the router's probability; the router is biased
    so that expert 3 gets a sample in some steps and none in others."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.router = nn.Linear(helpers.IN, 4).double()
        with torch.no_grad():
            self.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -2.0]))
        self.experts = nn.ModuleList(
            nn.Linear(helpers.IN, helpers.OUT * helpers.TOKENS).double() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).softmax(-1)
        choice = probs.argmax(-1)
        out = x.new_zeros(x.shape[0], helpers.OUT * helpers.TOKENS)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().squeeze(1)
            if rows.numel():  # an expert without samples is not in the graph at all
                out = out.index_add(0, rows, expert(x[rows]) * probs[rows, e, None])
        return out


def _moe(seed: int) -> Setup:
    model = _MoE(seed)
    return Setup(model, _adamw(model.parameters()), helpers.mean_loss_fn(model))


def _unfreeze(seed: int) -> Setup:
    """Linear probing, then fine-tuning: the first layer is frozen for two steps."""
    model = helpers.make_model(seed)
    first = model[0]
    first.requires_grad_(False)

    def on_step(done: int) -> None:
        first.requires_grad_(done >= 2)

    return Setup(model, _adamw(model.parameters()), helpers.mean_loss_fn(model), None, on_step)


class _SparseBag(nn.Module):
    """``nn.Embedding(sparse=True)`` trained by SparseAdam, a dense head by nothing else."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 6, sparse=True).double()
        self.head = nn.Linear(6, 3).double().requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))  # type: ignore[no-any-return]


def _sparse(seed: int) -> Setup:
    model = _SparseBag(seed)
    opt = torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.05)
    return Setup(model, opt, lambda b: F.cross_entropy(model(b["ids"]), b["y"]))


def _ids_data(n: int = 40, seed: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, VOCAB, (n, 5), generator=g),
            "y": torch.randint(0, 3, (n,), generator=g)}


# ---------------------------------------------------------------- gradients written outside a step
class _GAN(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.g = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, helpers.IN)).double()
        self.d = nn.Sequential(nn.Linear(helpers.IN, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _gan(seed: int) -> Setup:
    """Two optimizers; G's backward writes D's gradients, which D's next step must not see."""
    model = _GAN(seed)
    g, d = model.g, model.d

    def d_loss(b: Any) -> Any:
        fake = g(b["z"]).detach()
        real_logits, fake_logits = d(b["x"]), d(fake)
        return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

    def g_loss(b: Any) -> Any:
        logits = d(g(b["z"]))
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    def adam(params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-2, betas=(0.5, 0.999))

    return Setup(model, adam(d.parameters()), d_loss, others=[adam(g.parameters())],
                 losses=[g_loss])


def _gan_body(setup: Setup, batch: Any, step: Step) -> None:
    step(0, setup.loss_fn, batch)  # D
    step(1, setup.losses[0], batch)  # G


def _gan_data(n: int = 40, seed: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, helpers.IN, generator=g, dtype=torch.float64) + 1.0,
            "z": torch.randn(n, 3, generator=g, dtype=torch.float64)}


def _fgsm(seed: int) -> Setup:
    """FGSM adversarial training: the attack's backward fills every parameter's gradient."""
    model = helpers.make_model(seed)
    return Setup(model, helpers.sgd(model.parameters()), helpers.mean_loss_fn(model))


def _fgsm_body(setup: Setup, batch: Any, step: Step) -> None:
    x = batch["x"].clone().requires_grad_(True)
    helpers.mean_loss_fn(setup.model)({**batch, "x": x}).backward()  # into the weights, too
    assert x.grad is not None
    step(0, setup.loss_fn, {**batch, "x": (x + 0.05 * x.grad.sign()).detach()})


def _probe_then_finetune(seed: int) -> Setup:
    """Linear probing for two steps (the body requires grad but is not optimized, so its
    gradients pile up), then ``add_param_group`` at a step boundary: its first step must not
    see the probing steps' gradients."""
    model = helpers.make_model(seed)
    head = model[2]
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.1)

    def between(done: int, user_opt: Any) -> None:
        if done >= 2 and len(user_opt.param_groups) == 1:
            user_opt.add_param_group({"params": list(model[0].parameters()), "lr": 5e-3})

    return Setup(model, opt, helpers.mean_loss_fn(model), between=between)


# ---------------------------------------------------------------- BatchNorm: ResNet-18
def _image_data(n: int = 24, seed: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 64, 64, generator=g, dtype=torch.float64),  # 2x2 after layer4
            torch.randint(0, 4, (n,), generator=g))


def _resnet(seed: int) -> Setup:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=4).double().train()

    def loss_fn(b: Any) -> Any:
        return F.cross_entropy(model(b[0]), b[1])

    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), loss_fn)


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
    Scenario("gradscaler-clip-adamw", _scaled, lambda: helpers.make_data(40), target=8,
             max_grad_norm=0.05),
    Scenario("token-all-masked-micro-batches", _masked, _masked_data, target=8, token=True,
             count_items=_mlp_items, vary_target=False),
    Scenario("unused-head-adamw-wd", _unused_head, lambda: helpers.make_data(40), target=8),
    Scenario("moe-unrouted-experts-adamw", _moe, lambda: helpers.make_data(48, seed=2),
             target=6),
    Scenario("unfreeze-backbone-clip", _unfreeze, lambda: helpers.make_data(40), target=8,
             max_grad_norm=0.05),
    Scenario("sparse-embedding-sparseadam", _sparse, _ids_data, target=8),
    Scenario("gan-two-optimizers", _gan, _gan_data, target=8, body=_gan_body, aligned=True,
             whole_steps=True, vary_target=False),
    Scenario("fgsm-adversarial", _fgsm, lambda: helpers.make_data(40), target=8,
             body=_fgsm_body, aligned=True, vary_target=False),
    Scenario("probe-then-finetune", _probe_then_finetune, lambda: helpers.make_data(48),
             target=8, aligned=True, vary_target=False),
    Scenario("resnet18-batchnorm", _resnet, _image_data, target=8, split_dependent=True,
             budget=0.3),
    Scenario("gpt2-tied-padded-token", _causal_lm("GPT2Config", **_GPT2), _lm_data, target=8,
             token=True, count_items=_lm_items),
    Scenario("gpt2-gradient-checkpointing", _causal_lm("GPT2Config", use_cache=False, **_GPT2),
             lambda: _lm_data(24), target=8, token=True, count_items=_lm_items),
    # HF Llama runs RMSNorm and the attention softmax in float32 whatever the model's dtype:
    # how a step is cut moves its gradients at float32 rounding (1e-7 relative, the plain loop
    # cut the same way included), which AdamW's normalization amplifies over the run (1e-4
    # seen). Its bar is 1e-3: a sample counted twice or weighted wrongly is 1e-2 and more.
    Scenario("llama-padded-token-clip", _causal_lm("LlamaConfig", **_LLAMA), _lm_data, target=8,
             token=True, count_items=_lm_items, max_grad_norm=0.5, rtol=1e-3),
    Scenario("bert-classification", _bert, _bert_data, target=12),
]

BY_NAME = {s.name: s for s in SCENARIOS}
