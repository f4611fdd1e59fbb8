"""The examples run end to end (tiny settings) and report what they did."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "train_resnet.py"

# 320 samples in steps of 128: 2 full steps and a flushed one of 64. Targets of 128 or more keep
# every micro-batch at >= 2 samples: ResNet-18 at 32x32 ends in a 1x1 feature map, where BatchNorm
# in training mode rejects a batch of one sample.
TINY = ["--num-samples", "320", "--target-batch-size", "128", "--loader-batch-size", "96",
        "--workers", "0"]


def run_example(*args: str) -> str:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    # One intra-op thread: on a small, busy CPU two OpenMP threads contend and run 10x slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(RESNET), *args],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{output[-4000:]}"
    return output


def summary_int(output: str, label: str) -> int:
    match = re.search(rf"^{label}:\s+(\d+)", output, flags=re.MULTILINE)
    assert match, f"no '{label}:' line in the summary:\n{output[-2000:]}"
    return int(match.group(1))


def train_loss(output: str) -> tuple[float, float]:
    """The summary's first and last optimizer-step training losses."""
    match = re.search(r"^train loss:\s+([\d.]+) \(step 1\) -> ([\d.]+) \(step \d+\)", output,
                      flags=re.MULTILINE)
    assert match, f"no 'train loss:' line in the summary:\n{output[-2000:]}"
    return float(match.group(1)), float(match.group(2))


def test_train_resnet_loss_falls_on_the_synthetic_task() -> None:
    # 10 steps of 64 at 16x16, each accumulated from 4 micro-batches of 16. On the stripes the
    # loss falls from about 2.5 to under 1 (seeds 0-2: 0.68-0.98); on random labels (FakeData,
    # the old default) it stays above 2.2.
    out = run_example("--image-size", "16", "--num-samples", "640", "--target-batch-size", "64",
                      "--loader-batch-size", "64", "--micro-batch-size", "16",
                      "--simulate-gpu-mem", "0", "--lr", "0.02", "--workers", "0")
    assert summary_int(out, "optimizer steps") == 10
    assert "accumulation_steps=4" in out
    first, last = train_loss(out)
    assert first > 2.0, first  # starts near ln(10): nothing learned before the first step
    assert last < 0.6 * first, (first, last)


def test_train_resnet_runs_and_counts_steps() -> None:
    out = run_example(*TINY, "--seed", "1")
    assert summary_int(out, "optimizer steps") == 3  # ceil(320 / 128)
    assert summary_int(out, "samples seen") == 320
    assert "final plan:" in out
    train_loss(out)  # printed for every run


def test_train_resnet_pinned_micro_batch_without_memory_planning() -> None:
    out = run_example("--num-samples", "96", "--target-batch-size", "32",
                      "--loader-batch-size", "24", "--micro-batch-size", "16",
                      "--simulate-gpu-mem", "0", "--workers", "0")
    assert summary_int(out, "optimizer steps") == 3  # ceil(96 / 32)
    assert summary_int(out, "oom events") == 0
    assert "micro_batch_size=16" in out


def test_train_resnet_squeeze_causes_oom_and_recovers() -> None:
    # 0.17 GiB plans micro-batches of 64 (2 per step); squeezing to 0.15 GiB in the middle of
    # step 1 makes the second micro-batch of 64 run out of memory, and the library halves it.
    out = run_example(*TINY, "--simulate-gpu-mem", "0.17", "--squeeze", "1:0.15")
    assert summary_int(out, "oom events") >= 1
    assert summary_int(out, "optimizer steps") == 3
    assert summary_int(out, "samples seen") == 320
    assert "squeeze: step 1" in out
    assert "out of memory" in out


def test_gan_example_trains_two_optimizers_that_never_see_each_others_gradients():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "gan.py"), "--steps", "120"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "optimizer steps: discriminator 120, generator 120" in out
    assert "warnings about gradients written outside opt.step: 1" in out  # once, not per step
    mean = float(re.search(r"generated radius: mean ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert 1.5 < mean < 2.5, out  # the ring of radius 2 is learned
