"""autoaccum in a loop prepared by 🤗 Accelerate: exact against a plain one-batch-per-step loop (one
process, several micro-batches, an fp16-style GradScaler, two gloo processes), bf16 autocast, the
example script, and clear refusals of the setups that would silently go wrong."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("accelerate")

from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState

import autoaccum
from autoaccum.integrations.accelerate import (
    AcceleratedAutoAccumOptimizer,
    prepare_optimizer,
)
from tests.dist_harness import run_ranks

ROOT = Path(__file__).resolve().parents[1]
N, FEATURES, CLASSES, TARGET = 36, 8, 4, 16
STEP_SIZES = [16, 16, 4]  # 36 samples in steps of 16: two full steps and a flushed one


def make_data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, FEATURES, generator=g, dtype=dtype), torch.randint(CLASSES, (N,),
                                                                             generator=g)


def make_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    # Wide and shallow: a micro-batch's activations are large next to the state, so a small
    # SimulatedDevice forces several micro-batches per step.
    return nn.Sequential(nn.Linear(FEATURES, 1024), nn.Tanh(), nn.Linear(1024, CLASSES)).to(dtype)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def reference(dtype: torch.dtype = torch.float64, autocast: bool = False) -> list[torch.Tensor]:
    """A plain loop, one full batch per step, over the samples in order."""
    x, y = make_data(dtype)
    model = make_model(dtype)
    opt = sgd(model)
    start = 0
    for n in STEP_SIZES:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x[start:start + n]), y[start:start + n])
        loss.backward()
        opt.step()
        opt.zero_grad()
        start += n
    return [p.detach().clone() for p in model.parameters()]


def max_rel_diff(params: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((p.detach().cpu() - r).abs().max() / r.abs().max()).item()
               for p, r in zip(params, ref, strict=True))


def run_prepared(accelerator: Accelerator, loader_batch: int, dtype: torch.dtype = torch.float64,
                 loss_scale: Any = None, **kwargs: Any
                 ) -> tuple[AcceleratedAutoAccumOptimizer, nn.Module, dict[int, list[int]]]:
    """The recipe on the test data: prepare model and loader, build with prepare_optimizer, one
    ``opt.step`` per loader batch, ``flush``. Returns the sample indices each step's micro-batches
    saw (step number from 1)."""
    x, y = make_data(dtype)
    dataset = torch.utils.data.TensorDataset(x, y, torch.arange(N))
    model = make_model(dtype)
    loader = torch.utils.data.DataLoader(dataset, batch_size=loader_batch)
    model, loader = accelerator.prepare(model, loader)
    opt = prepare_optimizer(accelerator, sgd(model), model=model, target_batch_size=TARGET,
                            **kwargs)
    seen: dict[int, set[int]] = defaultdict(set)

    def loss_fn(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, labels, index = batch
        seen[opt.optimizer_steps + 1].update(index.tolist())
        loss = F.cross_entropy(model(inputs), labels)
        return loss if loss_scale is None else loss * loss_scale(opt.optimizer_steps + 1)

    for batch in loader:
        opt.step(loss_fn, batch)
    opt.flush()
    return opt, model, {k: sorted(v) for k, v in seen.items()}


def expected_indices() -> dict[int, list[int]]:
    bounds = [0, *torch.tensor(STEP_SIZES).cumsum(0).tolist()]
    return {k + 1: list(range(bounds[k], bounds[k + 1])) for k in range(len(STEP_SIZES))}


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Any:
    """Accelerate keeps its state in process-wide singletons; each test builds its own."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ------------------------------------------------------------------ exactness, one process
def test_matches_plain_reference_float64() -> None:
    accelerator = Accelerator(cpu=True)
    # Loader batches of 6 straddle the step boundaries (16 = 6 + 6 + 4).
    opt, model, seen = run_prepared(accelerator, loader_batch=6)
    assert isinstance(opt, AcceleratedAutoAccumOptimizer)
    assert opt.model is model and opt.grad_scaler is None
    assert seen == expected_indices()
    assert [h.samples for h in opt.history] == STEP_SIZES
    assert max_rel_diff(list(model.parameters()), reference()) < 1e-10


def test_matches_reference_with_simulated_device_forcing_micro_batches() -> None:
    accelerator = Accelerator(cpu=True)
    device = autoaccum.SimulatedDevice(capacity_bytes=500_000)
    # One loader batch of 36 holds every step; the device holds only a few samples at a time.
    opt, model, seen = run_prepared(accelerator, loader_batch=N, memory=device)
    assert seen == expected_indices()
    full = opt.history[:2]
    assert all(h.accumulation_steps >= 3 for h in full), opt.history
    assert all(h.micro_batch_size < TARGET for h in full), opt.history
    assert max_rel_diff(list(model.parameters()), reference()) < 1e-10


def test_grad_scaler_is_the_accelerators_and_stays_exact() -> None:
    # Accelerate makes a GradScaler only for fp16 on a GPU; this one stands in for it on the CPU.
    # A power-of-two scale is exact in float64, so the result must still match the reference.
    accelerator = Accelerator(cpu=True)
    scaler = accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt, model, _ = run_prepared(accelerator, loader_batch=6)
    assert opt.grad_scaler is scaler
    assert scaler.get_scale() == 2.0**10  # used (lazily initialized), no inf seen
    assert opt.skipped_steps == 0
    assert max_rel_diff(list(model.parameters()), reference()) < 1e-10


def test_grad_scaler_skips_a_step_with_inf_gradients() -> None:
    accelerator = Accelerator(cpu=True)
    scaler = accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in make_model().parameters()]
    opt, model, _ = run_prepared(accelerator, loader_batch=6,
                                 loss_scale=lambda step: math.inf if step == 1 else 1.0)
    assert opt.optimizer_steps == 3 and opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0**9  # halved once, by the skipped step
    assert max_rel_diff(list(model.parameters()), before) > 1e-3  # steps 2 and 3 ran


def test_bf16_mixed_precision_runs_loss_fn_under_the_accelerators_autocast() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    seen_autocast: list[tuple[bool, torch.dtype]] = []
    hidden_dtypes: list[torch.dtype] = []
    x, y = make_data(torch.float32)
    model = make_model(torch.float32)
    first_layer: nn.Module = model.get_submodule("0")
    first_layer.register_forward_hook(lambda _m, _i, out: hidden_dtypes.append(out.dtype))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)
    model, loader = accelerator.prepare(model, loader)
    opt = prepare_optimizer(accelerator, sgd(model), model=model, target_batch_size=TARGET,
                            micro_batch_size=4)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen_autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return F.cross_entropy(model(batch[0]), batch[1])

    losses = [opt.step(loss_fn, batch) for batch in loader]
    assert opt.flush()
    assert opt.optimizer_steps == 3 and all(torch.isfinite(loss) for loss in losses)
    assert [h.samples for h in opt.history] == STEP_SIZES
    # The wrapper autocasts loss_fn itself (the prepared model autocasts only inside forward).
    assert seen_autocast and set(seen_autocast) == {(True, torch.bfloat16)}
    assert hidden_dtypes and set(hidden_dtypes) == {torch.bfloat16}
    # Against a plain bf16-autocast loop, one full batch per step: bf16 rounds each micro-batch
    # differently, so the match is to bf16 precision, not exact (measured: 3e-3; the same loop
    # without autocast is 4e-3 away, so the autocast checks above are what tell the two apart).
    diff = max_rel_diff(list(model.parameters()), reference(torch.float32, autocast=True))
    assert diff < 1e-2, diff


# ------------------------------------------------------------------ two processes
def _two_process_worker(rank: int, world: int) -> dict[str, Any]:
    """One rank of a gloo job that Accelerate recognises as MULTI_CPU (the harness made the
    process group; these are the variables a launcher would set)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True,
                              dataloader_config=DataLoaderConfiguration(even_batches=False))
    assert accelerator.num_processes == world, accelerator.num_processes
    bare = make_model()
    accelerator.prepare(bare)
    try:  # the bare module of a DDP run is refused
        prepare_optimizer(accelerator, sgd(bare), model=bare, target_batch_size=TARGET)
        bare_error = ""
    except ValueError as exc:
        bare_error = str(exc)
    # Loader batches of 4 per rank, shares of 8: rank r gets global batches r, r + 2, ...; the
    # 9th batch (samples 32-35) goes to rank 0 alone, and both ranks end in flush().
    opt, model, seen = run_prepared(accelerator, loader_batch=4)
    return {"params": [p.detach().clone() for p in model.parameters()], "seen": seen,
            "samples": [h.samples for h in opt.history], "type": type(model).__name__,
            "bare_error": bare_error, "distributed_type": str(accelerator.distributed_type)}


def test_two_processes_match_the_single_process_reference() -> None:
    results = run_ranks(_two_process_worker, 2, timeout=90)
    errors = {r: v for r, (status, v) in results.items() if status != "ok"}
    assert not errors, errors
    out = [results[r][1] for r in range(2)]
    assert all(o["type"] == "DistributedDataParallel" for o in out)
    assert all("MULTI_CPU" in o["distributed_type"] for o in out)
    assert all("model is the bare Sequential; expected the DistributedDataParallel" in
               o["bare_error"] for o in out), [o["bare_error"] for o in out]
    # The ranks' samples of each step are disjoint and together the same samples, in the same
    # steps, as the single-process reference.
    for step, indices in expected_indices().items():
        parts = [set(o["seen"].get(step, [])) for o in out]
        assert not parts[0] & parts[1], (step, parts)
        assert sorted(parts[0] | parts[1]) == indices, (step, parts)
    assert out[0]["samples"] == [8, 8, 4] and out[1]["samples"] == [8, 8, 0]
    ref = reference()
    for o in out:
        assert max_rel_diff(o["params"], ref) < 1e-10


# ------------------------------------------------------------------ bad input
def test_refuses_an_accelerated_optimizer() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    accelerated = accelerator.prepare(sgd(model))
    with pytest.raises(TypeError, match=r"got an AcceleratedOptimizer around SGD.*"
                                        r"accelerator\.prepare\(model, loader\)"):
        prepare_optimizer(accelerator, accelerated, model=model, target_batch_size=TARGET)
    # ... and the optimizer inside one, which Accelerate holds and steps.
    with pytest.raises(TypeError, match=r"this SGD went through accelerator\.prepare"):
        prepare_optimizer(accelerator, accelerated.optimizer, model=model,
                          target_batch_size=TARGET)


def test_refuses_the_accelerators_own_gradient_accumulation() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = accelerator.prepare(make_model())
    inner = sgd(model)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4\); expected 1.*"
                                         r"target_batch_size"):
        prepare_optimizer(accelerator, inner, model=model, target_batch_size=TARGET)
    assert inner.state == {} and all(p.grad is None for p in model.parameters())


def test_refuses_other_bad_input_with_what_was_given() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    with pytest.raises(TypeError, match=r"must be an accelerate\.Accelerator, got str"):
        prepare_optimizer("accelerator", sgd(model), model=model,  # type: ignore[arg-type]
                          target_batch_size=TARGET)
    with pytest.raises(TypeError, match="grad_scaler= is taken from the accelerator"):
        prepare_optimizer(accelerator, sgd(model), model=model, target_batch_size=TARGET,
                          grad_scaler=torch.amp.GradScaler("cpu"))
    stranger = make_model()
    with pytest.raises(ValueError, match=r"model \(a Sequential\) is not a model "
                                         r"accelerator\.prepare returned"):
        prepare_optimizer(accelerator, sgd(stranger), model=stranger, target_batch_size=TARGET)
    with pytest.raises(ValueError, match="target_batch_size must be a positive int, got 0"):
        prepare_optimizer(accelerator, sgd(model), model=model, target_batch_size=0)
    assert len(accelerator._optimizers) == 0  # nothing was registered with the accelerator


# ------------------------------------------------------------------ the example
def test_example_runs_and_the_loss_falls() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                 "")]))
    env["OMP_NUM_THREADS"] = "1"
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "accelerate_recipe.py"), "--num-samples",
         "2048", "--target-batch-size", "256", "--loader-batch-size", "256", "--epochs", "1",
         "--lr", "2e-2"],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "mixed precision bf16" in out
    assert re.search(r"^optimizer steps: 8 \(expected 8\)", out, re.MULTILINE), out[-2000:]
    assert re.search(r"^samples seen:\s+2048 ", out, re.MULTILINE), out[-2000:]
    # Loader batches of a whole step (256): the 6 MiB simulated device splits each one.
    plan = re.search(r"^final plan:\s+Plan\(micro_batch_size=(\d+), accumulation_steps=(\d+)",
                     out, re.MULTILINE)
    assert plan and int(plan.group(1)) < 256 and int(plan.group(2)) >= 2, out[-2000:]
    match = re.search(r"^train loss:\s+([\d.]+) \(step 1\) -> ([\d.]+) \(step 8\)", out,
                      re.MULTILINE)
    assert match, out[-2000:]
    first, last = float(match.group(1)), float(match.group(2))
    assert last < 0.5 * first, (first, last)
