"""autoaccum.integrations.lightning: a LightningModule whose training_step is one autoaccum step
trains exactly like a plain one-batch-per-step loop, in one process and under Lightning's DDP on
two gloo ranks, in bf16-mixed and fp16 (GradScaler), and across a checkpoint taken mid-step.

The model and data are float64 (tests/lightning_workers.py), so "exact" means agreement with the
plain reference to rounding: a relative difference of 1e-12 where float64 rounding gives ~1e-16
and a single misplaced sample or step gives ~1e-2."""

from __future__ import annotations

import os
import signal
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from tests.dist_harness import torchrun
from tests.lightning_workers import (
    LR,
    build_module,
    ddp_order,
    loader,
    lr_factor,
    make_trainer,
    reference,
    sequential,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "lightning_workers.py"
EXACT = 1e-12
DDP_TIMEOUT_S = 240  # a hang fails the test instead of the suite


def params(module: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.net.parameters()]


def pending_samples(entry: dict[str, Any]) -> int:
    """Samples of the unfinished step in an optimizer state's "autoaccum" entry."""
    return sum(int(p["leaves"][0].shape[0]) for p in entry["pending"])


def max_rel_diff(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(((a.double() - e).abs().max() / e.abs().max()).item()
               for a, e in zip(actual, expected, strict=True))


# -------------------------------------------------------------------------- one process
def test_single_process_matches_the_plain_loop_with_simulated_memory(tmp_path: Path) -> None:
    # 100 samples a epoch in loader batches of 12, steps of 16: 6 full steps and a flushed step
    # of 4 per epoch. The simulated device holds about 4 samples' activations next to the
    # parameters, gradients and momentum, so the planner cuts every call into micro-batches.
    # Validation after every 5th batch falls in the middle of a step (60 = 3 * 16 + 12).
    module = build_module(16, capacity=16_000)
    trainer = make_trainer(str(tmp_path), val_check_interval=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(100, 12), loader(16, 8))

    opt = module.autoaccum_optimizer
    assert opt.optimizer_steps == trainer.global_step == 14
    assert max(h.accumulation_steps for h in opt.history) >= 3
    assert max(module.calls) < 12  # no loader batch ran as one micro-batch
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * lr_factor(14), rel=1e-15)
    assert max_rel_diff(params(module), reference(100, 16, sequential(100, 2))) < EXACT
    # Lightning's zero_grad before validation left the accumulated gradients alone.
    touched = [w for w in caught if "gradients of the unfinished step" in str(w.message)]
    assert not touched, touched[0].message
    assert "val_loss" in trainer.callback_metrics
    metrics = trainer.callback_metrics
    # Logged by the last training_step that completed a step (the epoch's flush came after it).
    assert metrics["autoaccum/micro_batch_size"] == opt.history[-2].micro_batch_size
    assert metrics["autoaccum/oom_events"] == opt.oom_events
    assert torch.isfinite(metrics["train_loss_epoch"])


def test_epoch_interval_scheduler_steps_once_per_epoch(tmp_path: Path) -> None:
    module = build_module(8, micro=3, scheduler="epoch")
    trainer = make_trainer(str(tmp_path), max_epochs=3)
    trainer.fit(module, loader(44, 6))
    assert module.autoaccum_optimizer.optimizer_steps == 18
    assert module.autoaccum_optimizer.param_groups[0]["lr"] == pytest.approx(LR * lr_factor(3),
                                                                            rel=1e-15)


def test_max_steps_counts_optimizer_steps_and_forces_no_extra_step(tmp_path: Path) -> None:
    module = build_module(8, micro=3)
    trainer = make_trainer(str(tmp_path), max_steps=3)
    trainer.fit(module, loader(44, 5))  # step 3 completes inside the 5th batch: 1 sample over
    opt = module.autoaccum_optimizer
    assert opt.optimizer_steps == trainer.global_step == 3
    assert opt.pending_samples == 1  # kept for a resumed run, not flushed into a fourth step
    assert max_rel_diff(params(module), reference(44, 8, [torch.arange(24)])) < EXACT


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_steps_with_forward_under_autocast_and_backward_outside(
        tmp_path: Path, precision: str) -> None:
    # Lightning turns precision="16-mixed" on a CPU into bf16-mixed; its plugin, given directly,
    # runs fp16 autocast with a GradScaler on the CPU too.
    options: dict[str, Any] = (
        {"precision": precision} if precision == "bf16-mixed"
        else {"plugins": [MixedPrecision("16-mixed", "cpu")]})
    module = build_module(8, micro=3, dtype=torch.float32)
    in_backward: list[bool] = []
    module.net[0].weight.register_hook(
        lambda g: in_backward.append(torch.is_autocast_enabled("cpu")))
    trainer = make_trainer(str(tmp_path), **options)
    trainer.fit(module, loader(44, 6, dtype=torch.float32))

    opt = module.autoaccum_optimizer
    assert opt.optimizer_steps == trainer.global_step == 12  # 2 epochs x (5 full + 1 flushed)
    assert module.autocast and all(module.autocast)
    assert in_backward and not any(in_backward)
    scaler = trainer.precision_plugin.scaler  # type: ignore[attr-defined]
    assert opt.grad_scaler is scaler and (scaler is None) == (precision == "bf16-mixed")
    assert opt.skipped_steps == 0
    # Rounding (bf16: about 3 significant digits) keeps it near the float64 reference; a lost or
    # doubled step moves it by more than 0.1.
    assert max_rel_diff(params(module), reference(44, 8, sequential(44, 2))) < 3e-2


class Restored(Callback):
    """What the optimizer holds when training starts, after Lightning restored a checkpoint."""

    seen: tuple[int, ...] = ()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        opt = pl_module.autoaccum_optimizer
        self.seen = (opt.pending_samples, opt.optimizer_steps, trainer.global_step,
                     opt.policy.state_dict())


def test_resume_from_a_checkpoint_taken_mid_step(tmp_path: Path) -> None:
    # Steps cross epoch boundaries (no per-epoch flush): the epoch-0 checkpoint holds 4 samples
    # of an unfinished step; resuming must replay them and go on as if never interrupted.
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first = build_module(8, capacity=16_000, flush_each_epoch=False)
    trainer = make_trainer(str(tmp_path), max_epochs=1, enable_checkpointing=True,
                           callbacks=[ckpt])
    trainer.fit(first, loader(44, 6))
    path = tmp_path / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)
    entry = saved["optimizer_states"][0]["autoaccum"]
    assert pending_samples(entry) == 4
    assert saved["autoaccum_ranks"]["ranks"] == [entry]

    module = build_module(8, capacity=16_000, flush_each_epoch=False)
    restored = Restored()
    trainer = make_trainer(str(tmp_path), max_epochs=3, callbacks=[restored])
    trainer.fit(module, loader(44, 6), ckpt_path=str(path))
    opt = module.autoaccum_optimizer
    # The unfinished step, the counters and the plan came back (no probing from scratch).
    assert restored.seen == (4, 5, 5, entry["policy"])
    assert opt.optimizer_steps == trainer.global_step == 17  # 132 samples: 16 steps + 4 flushed
    expected = reference(44, 8, sequential(44, 3), flush_each_epoch=False)
    assert max_rel_diff(params(module), expected) < EXACT
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * lr_factor(17), rel=1e-15)


# -------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lightning_ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [*torchrun(), "--nproc-per-node", "2", "--standalone", str(WORKER), str(out)]
    # A session of its own, so that a hang kills torchrun and both ranks, not just torchrun.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=DDP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the DDP run did not finish in {DDP_TIMEOUT_S} s (a hang?):\n"
                    f"{output[-4000:]}")
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{output[-6000:]}"
    return torch.load(out / "results.pt", weights_only=False)  # type: ignore[no-any-return]


def test_ddp_two_ranks_match_the_plain_loop(ddp_results: dict[str, Any]) -> None:
    exact = ddp_results["exact"]
    assert ddp_results["world"] == 2
    assert exact["wrapped_is_ddp"]  # autoaccum drove DDP's no_sync and did the reduction
    assert exact["steps"] == exact["global_step"] == 12  # 2 epochs x (5 full + 1 flushed)
    assert exact["micro"] == 3
    assert ddp_results["replicas_equal"]
    # Lightning's DistributedSampler deals a shuffled order round-robin; with equal shares each
    # step of 8 is 8 consecutive positions of that order.
    expected = reference(44, 8, [ddp_order(44, e) for e in range(2)])
    assert max_rel_diff(exact["params"], expected) < EXACT
    assert exact["lr"] == pytest.approx(LR * lr_factor(12), rel=1e-15)


def test_ddp_bf16_mixed_steps(ddp_results: dict[str, Any]) -> None:
    bf16 = ddp_results["bf16"]
    assert bf16["steps"] == bf16["global_step"] == 6
    assert bf16["autocast"] and all(bf16["autocast"])
    assert bf16["finite"]


def test_ddp_resume_restores_each_ranks_unfinished_step(ddp_results: dict[str, Any]) -> None:
    assert ddp_results["saved_pending"] == [2, 2]  # each rank's own 2 pending samples, saved
    resumed = ddp_results["resumed"]
    assert resumed["steps"] == resumed["global_step"] == 17
    expected = reference(44, 8, [ddp_order(44, e) for e in range(3)], flush_each_epoch=False)
    assert max_rel_diff(resumed["params"], expected) < EXACT
