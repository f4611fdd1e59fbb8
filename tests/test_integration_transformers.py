"""AutoAccumTrainer against a plain transformers Trainer: real transformers, on CPU, float32.

The reference is a plain ``Trainer`` with one full batch of ``TARGET`` samples per step and no
accumulation. Exactness tests use SGD: its update is linear in the gradient, so the comparison
sees the gradient itself. (AdamW's first steps move each weight by about ``lr * sign(grad)``, so
weights whose gradient is at rounding level differ by up to ``2 * lr`` between any two float32
summation orders; the resume test compares AdamW runs that split alike instead.)
"""

from __future__ import annotations

import os
import re
import runpy
import warnings
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import autoaccum  # noqa: E402
from autoaccum.integrations.transformers import AutoAccumTrainer  # noqa: E402

transformers.logging.set_verbosity_error()

TARGET = 16  # samples per optimizer step
SEQ = 24  # padded length (fixed, so that memory per sample is the same in every step)
VOCAB = 64
TOL = 1e-5  # relative to the training update


class Sequences(torch.utils.data.Dataset):
    """Variable-length random token sequences (3..SEQ tokens)."""

    def __init__(self, n: int, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, SEQ + 1, (n,), generator=g).tolist()
        self.items = [torch.randint(1, VOCAB, (k,), generator=g) for k in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[i]}


def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(features), SEQ, dtype=torch.long)
    labels = torch.full_like(ids, -100)  # padding counts in no loss
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = labels[i, :k] = f["input_ids"]
    return {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}


_BASE: dict[str, torch.Tensor] = {}


def make_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=SEQ, pad_token_id=0)
    if not _BASE:
        torch.manual_seed(0)
        _BASE.update(LlamaForCausalLM(config).state_dict())
    model = LlamaForCausalLM(config)
    model.load_state_dict(_BASE)
    return model


def make_args(tmp_path: Any, name: str, **kw: Any) -> TrainingArguments:
    settings: dict[str, Any] = dict(
        output_dir=str(tmp_path / name), per_device_train_batch_size=TARGET, max_steps=4,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[],
        use_cpu=True, disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0,
    )
    settings.update(kw)
    return TrainingArguments(**settings)


def plain_run(tmp_path: Any, n: int = 64, **kw: Any) -> tuple[torch.nn.Module, Trainer]:
    model = make_model()
    trainer = Trainer(model=model, args=make_args(tmp_path, "plain", **kw),
                      train_dataset=Sequences(n), data_collator=collate)
    trainer.train()
    return model, trainer


def autoaccum_run(tmp_path: Any, n: int = 64, name: str = "autoaccum",
                  callbacks: list[TrainerCallback] | None = None, resume: str | None = None,
                  trainer_kw: dict[str, Any] | None = None, **kw: Any
                  ) -> tuple[torch.nn.Module, AutoAccumTrainer]:
    model = make_model()
    trainer = AutoAccumTrainer(model=model, args=make_args(tmp_path, name, **kw),
                               train_dataset=Sequences(n), data_collator=collate,
                               callbacks=callbacks, target_batch_size=TARGET,
                               **(trainer_kw or {}))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def rel_diff(a: torch.nn.Module, b: torch.nn.Module,
             start: dict[str, torch.Tensor] | None = None) -> float:
    """||a - b|| / ||a - start|| over all parameters: the difference relative to the training
    update (0: the same training). Per-element relative errors would instead measure float32
    rounding of the weights against the tiny updates of some tensors (1 ulp of a weight)."""
    start = _BASE if start is None else start
    names = [n for n, _ in a.named_parameters()]
    va = torch.cat([p.detach().flatten() for p in a.parameters()])
    vb = torch.cat([p.detach().flatten() for p in b.parameters()])
    v0 = torch.cat([start[n].flatten() for n in names])
    return ((va - vb).norm() / (va - v0).norm()).item()


def train_logs(trainer: Trainer) -> list[dict[str, float]]:
    return [h for h in trainer.state.log_history if "loss" in h]


def peak_bytes(samples: int) -> int:
    """Simulated bytes of parameters, gradients and activations of one forward and backward."""
    model, device = make_model(), autoaccum.SimulatedDevice(capacity_bytes=2**40)
    batch = collate([Sequences(samples, seed=2)[i] for i in range(samples)])
    batch["input_ids"][:, :] = 1  # full length: the largest footprint of any batch
    batch["attention_mask"][:, :] = 1
    with device.active(model.parameters()):
        device.reset_peak()
        loss_sum, count = autoaccum.causal_lm_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["input_ids"])
        (loss_sum / count).backward()
        return device.peak_bytes()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models run fastest on one thread (and do not fight parallel test processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def peaks() -> dict[int, int]:
    return {k: peak_bytes(k) for k in (3, 10, TARGET)}


# ---------------------------------------------------------------------------- exactness
def test_default_plan_matches_plain_trainer(tmp_path: Any) -> None:
    ref, plain = plain_run(tmp_path, lr_scheduler_type="linear", warmup_steps=2)
    got, trainer = autoaccum_run(tmp_path, lr_scheduler_type="linear", warmup_steps=2)
    assert rel_diff(ref, got) < TOL
    opt = trainer.autoaccum_optimizer
    assert opt is not None and opt.optimizer_steps == trainer.state.global_step == 4
    # The LR schedule advanced once per optimizer step: warmup, then linear decay.
    lrs = [h["learning_rate"] for h in train_logs(trainer)]
    assert lrs == [h["learning_rate"] for h in train_logs(plain)]
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.25])  # the LR each step used
    assert trainer.lr_scheduler.last_epoch == 4
    for mine, theirs in zip(train_logs(trainer), train_logs(plain), strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)
        assert mine["accumulation_steps"] == 1 and mine["oom_events"] == 0
    assert opt.plan.micro_batch_sizes == (TARGET,)
    assert trainer.autoaccum_loss_mode == "token" and opt.count_items is not None


def test_simulated_device_splits_every_step_exactly(tmp_path: Any, peaks: dict[int, int]
                                                    ) -> None:
    # 56 samples, one epoch: steps of 16, 16, 16 and a short last one of 8 (a flush).
    ref, plain = plain_run(tmp_path, n=56, max_steps=-1, num_train_epochs=1)
    device = autoaccum.SimulatedDevice(capacity_bytes=peaks[10])
    got, trainer = autoaccum_run(tmp_path, n=56, max_steps=-1, num_train_epochs=1,
                                 trainer_kw={"memory": device})
    opt = trainer.autoaccum_optimizer
    assert opt is not None and trainer.state.global_step == plain.state.global_step == 4
    assert [h.samples for h in opt.history] == [16, 16, 16, 8]
    assert all(h.accumulation_steps >= 2 for h in opt.history[:3]), opt.history
    assert all(h.peak_bytes is not None and h.peak_bytes <= peaks[10] for h in opt.history)
    assert rel_diff(ref, got) < TOL
    for mine, theirs in zip(train_logs(trainer), train_logs(plain), strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


class Squeeze(TrainerCallback):
    """Lowers the simulated capacity in the middle of optimizer step ``at`` (counted from 1): in
    its first forward pass, after autoaccum planned the step from the memory then free."""

    def __init__(self, device: autoaccum.SimulatedDevice, at: int, capacity: int) -> None:
        self.device, self.at, self.capacity = device, at, capacity

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 != self.at:
            return
        layer = kwargs["model"].model.layers[0]

        def squeeze(*_: Any) -> None:
            self.device.capacity_bytes = self.capacity
            handle.remove()

        handle = layer.register_forward_pre_hook(squeeze)


def test_squeeze_mid_run_recovers_exactly(tmp_path: Any, peaks: dict[int, int]) -> None:
    ref, _ = plain_run(tmp_path)
    device = autoaccum.SimulatedDevice(capacity_bytes=peaks[TARGET] * 2)
    got, trainer = autoaccum_run(tmp_path, callbacks=[Squeeze(device, 3, peaks[3])],
                                 trainer_kw={"memory": device})
    opt = trainer.autoaccum_optimizer
    assert opt is not None
    assert [h.oom_events for h in opt.history][:2] == [0, 0]
    assert opt.history[2].oom_events >= 1  # the squeezed step ran out of memory, and recovered
    assert opt.history[1].micro_batch_size > opt.history[3].micro_batch_size
    assert rel_diff(ref, got) < TOL
    logs = train_logs(trainer)
    assert [h["oom_events"] for h in logs] == [0, 0, opt.oom_events, opt.oom_events]
    assert logs[-1]["micro_batch_size"] == opt.history[3].micro_batch_size
    assert logs[-1]["accumulation_steps"] == opt.history[3].accumulation_steps


def test_max_grad_norm_clips_the_full_gradient_once(tmp_path: Any, peaks: dict[int, int]
                                                    ) -> None:
    ref, plain = plain_run(tmp_path, max_grad_norm=0.05)
    device = autoaccum.SimulatedDevice(capacity_bytes=peaks[10])
    got, trainer = autoaccum_run(tmp_path, max_grad_norm=0.05, trainer_kw={"memory": device})
    opt = trainer.autoaccum_optimizer
    assert opt is not None and opt.max_grad_norm == 0.05
    assert all(h.accumulation_steps >= 2 for h in opt.history)
    norms = [h["grad_norm"] for h in train_logs(plain)]
    assert min(norms) > 0.1  # every step was clipped, so the clipping is what is compared
    assert [h["grad_norm"] for h in train_logs(trainer)] == pytest.approx(norms, rel=1e-5)
    assert rel_diff(ref, got) < TOL


def test_non_lm_model_uses_its_mean_loss(tmp_path: Any) -> None:
    class Regressor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                           torch.nn.Linear(8, 1))

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            pred = self.net(x).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(pred, labels), "logits": pred}

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(48, 6, generator=g), torch.randn(48, generator=g)
    data = [{"x": x[i], "labels": y[i]} for i in range(48)]
    ref, got = Regressor(), Regressor()
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    Trainer(model=ref, args=make_args(tmp_path, "plain", max_steps=3),
            train_dataset=data).train()
    trainer = AutoAccumTrainer(model=got, args=make_args(tmp_path, "aa", max_steps=3),
                               train_dataset=data, target_batch_size=TARGET, micro_batch_size=5)
    trainer.train()
    opt = trainer.autoaccum_optimizer
    assert opt is not None and opt.plan.micro_batch_sizes == (4, 4, 4, 4)
    assert trainer.autoaccum_loss_mode == "mean"
    assert rel_diff(ref, got, start) < TOL


def test_bf16_runs_forward_under_autocast(tmp_path: Any) -> None:
    ref, _ = plain_run(tmp_path, bf16=True, max_steps=2)
    dtypes: list[torch.dtype] = []
    model = make_model()
    model.lm_head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    trainer = AutoAccumTrainer(model=model, args=make_args(tmp_path, "aa", bf16=True, max_steps=2),
                               train_dataset=Sequences(64), data_collator=collate,
                               target_batch_size=TARGET)
    trainer.train()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32
    assert rel_diff(ref, model) < TOL  # one micro-batch: the same ops as the plain Trainer


# ---------------------------------------------------------------------------- checkpoints
def test_resume_from_checkpoint_continues_exactly(tmp_path: Any, peaks: dict[int, int]) -> None:
    adamw = dict(optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="linear",
                 save_strategy="steps", save_steps=2)
    full, trainer = autoaccum_run(
        tmp_path, name="run", trainer_kw={"memory": autoaccum.SimulatedDevice(peaks[10])},
        **adamw)
    opt = trainer.autoaccum_optimizer
    assert opt is not None and all(h.accumulation_steps >= 2 for h in opt.history)
    checkpoint = os.path.join(tmp_path, "run", "checkpoint-2")
    saved = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True)
    assert saved["autoaccum"]["optimizer_steps"] == 2
    assert saved["state"]  # AdamW's moments are in the checkpoint

    resumed, again = autoaccum_run(
        tmp_path, name="resumed", resume=checkpoint,
        trainer_kw={"memory": autoaccum.SimulatedDevice(peaks[10])}, **adamw)
    opt2 = again.autoaccum_optimizer
    assert opt2 is not None and opt2.optimizer_steps == 4 and again.state.global_step == 4
    # The plan came from the checkpoint: the resumed steps split as the uninterrupted ones.
    assert [h.micro_batch_size for h in opt2.history] == [h.micro_batch_size
                                                          for h in opt.history[2:]]
    assert rel_diff(full, resumed) < 1e-6
    # The resumed history holds the checkpoint's two steps, then the two it ran itself.
    lrs = [h["learning_rate"] for h in train_logs(trainer)]
    assert [h["learning_rate"] for h in train_logs(again)] == lrs == pytest.approx(
        [0.01, 0.0075, 0.005, 0.0025])


def test_checkpoint_of_another_target_is_refused(tmp_path: Any) -> None:
    autoaccum_run(tmp_path, name="run", max_steps=2, save_strategy="steps", save_steps=2)
    model = make_model()
    trainer = AutoAccumTrainer(model=model, args=make_args(tmp_path, "other", max_steps=4,
                                                           per_device_train_batch_size=8),
                               train_dataset=Sequences(64), data_collator=collate,
                               target_batch_size=8)
    with pytest.raises(ValueError, match=r"target_batch_size=16.*target_batch_size=8"):
        trainer.train(resume_from_checkpoint=os.path.join(tmp_path, "run", "checkpoint-2"))


# ---------------------------------------------------------------------------- bad input
def _build(tmp_path: Any, **kw: Any) -> AutoAccumTrainer:
    args_kw = kw.pop("args_kw", {})
    return AutoAccumTrainer(model=make_model(), args=make_args(tmp_path, "bad", **args_kw),
                            train_dataset=Sequences(16), data_collator=collate, **kw)


@pytest.mark.parametrize(("kw", "match"), [
    ({"target_batch_size": 32, "args_kw": {"gradient_accumulation_steps": 4}},
     r"gradient_accumulation_steps=4.*expected 1.*target_batch_size=64"),
    ({"target_batch_size": 32, "args_kw": {"auto_find_batch_size": True}},
     r"auto_find_batch_size=True.*auto_find_batch_size=False"),
    ({"target_batch_size": 0}, r"target_batch_size must be a positive int, got 0"),
    ({"target_batch_size": 16, "micro_batch_size": -2}, r"micro_batch_size.*-2"),
    ({"target_batch_size": 16, "shares": "auto"}, r"shares='equal' only, got shares='auto'"),
])
def test_bad_input_raises_a_clear_error(tmp_path: Any, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _build(tmp_path, **kw)


def test_target_must_divide_over_ranks(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 4))
    with pytest.raises(ValueError, match=r"target_batch_size=18 .* 4 ranks.*multiple of 4.*16"):
        _build(tmp_path, target_batch_size=18)


def test_an_autoaccum_optimizer_is_refused(tmp_path: Any) -> None:
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       target_batch_size=TARGET)
    with pytest.raises(TypeError, match="pass the inner optimizer"):
        AutoAccumTrainer(model=model, args=make_args(tmp_path, "bad"), optimizers=(opt, None),
                         train_dataset=Sequences(16), data_collator=collate,
                         target_batch_size=TARGET)


def test_callers_arguments_are_left_as_given(tmp_path: Any) -> None:
    args = make_args(tmp_path, "args", per_device_train_batch_size=4)
    with pytest.warns(UserWarning, match=r"per_device_train_batch_size=4 is ignored"):
        trainer = AutoAccumTrainer(model=make_model(), args=args, train_dataset=Sequences(16),
                                   data_collator=collate, target_batch_size=TARGET)
    assert args.per_device_train_batch_size == 4
    assert trainer.args.per_device_train_batch_size == TARGET
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default per-device size is not worth a warning
        _build(tmp_path, target_batch_size=TARGET, args_kw={"per_device_train_batch_size": 8})


# ---------------------------------------------------------------------------- the example
def test_example_runs_and_reports(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "hf_trainer.py")
    monkeypatch.setattr("sys.argv", [example, "--steps", "3", "--target-batch-size", "32",
                                     "--simulate-gpu-mem", "8", "--squeeze", "2:4",
                                     "--output-dir", str(tmp_path / "example")])
    runpy.run_path(example, run_name="__main__")
    out = capsys.readouterr().out
    assert "optimizer steps:  3" in out
    assert "samples per step: [32]" in out
    assert "loss mode:        token" in out
    assert re.search(r"oom events:\s+[1-9]", out), out
