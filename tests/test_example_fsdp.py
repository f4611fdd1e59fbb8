"""examples/fsdp2_mixed_fleet.py runs under torchrun on two gloo ranks with an FSDP2 model: the loss
falls, every sample counts once, work moves to the faster rank, each rank plans its own micro-batch
and holds only its shard of parameters, gradients and AdamW state at the optimizer step."""

from __future__ import annotations

import ast
import os
import re
import subprocess

import pytest

from tests.dist_harness import torchrun
from tests.test_example_ddp import ROOT

pytest.importorskip("torch.distributed.fsdp")

EXAMPLE = ROOT / "examples" / "fsdp2_mixed_fleet.py"
TARGET, STEPS = 64, 16
# Rank 1 is 4x slower and has less memory (6 MiB: its micro-batch is smaller than its share).
# The speed ratio is large so that the direction of the share change holds on a busy CPU.
TINY = ["--simulate", "--target-batch-size", str(TARGET), "--steps", str(STEPS),
        "--share-interval", "3", "--log-every", "2", "--capacities-mib", "16,6",
        "--slowdowns", "1,4"]
TIMEOUT_S = 120


def run_example(*args: str) -> str:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    cmd = [*torchrun(), "--nproc-per-node", "2", "--standalone", str(EXAMPLE), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"the example did not finish in {TIMEOUT_S} s (a hang?):\n{out[-4000:]}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{output[-4000:]}"
    return output


def line(pattern: str, out: str) -> re.Match[str]:
    match = re.search(pattern, out, flags=re.MULTILINE)
    assert match, f"no line matching {pattern!r}:\n{out[-3000:]}"
    return match


def test_fsdp_example_trains_counts_every_sample_and_shards_memory() -> None:
    out = run_example(*TINY)
    tail = out[-3000:]

    # Every sample of every step counted once: STEPS full steps of TARGET samples over the ranks.
    total = line(r"^(\d+) optimizer steps, (\d+) samples in", out)
    assert (int(total[1]), int(total[2])) == (STEPS, STEPS * TARGET), tail
    ranks = re.findall(r"^rank (\d) \(simulated [^)]*\): share (\d+) -> (\d+), micro-batches "
                       r"(\d+)\.\.(\d+) over the run, last step \[[\d, ]+\]; (\d+) samples",
                       out, flags=re.MULTILINE)
    assert [int(r[0]) for r in ranks] == [0, 1], tail
    assert sum(int(r[5]) for r in ranks) == STEPS * TARGET, tail

    # The synthetic task is learnable: the loss falls well below its start.
    loss = line(r"^loss: first \d+ steps ([\d.]+) -> last \d+ steps ([\d.]+)", out)
    assert float(loss[2]) < 0.7 * float(loss[1]), tail

    # "auto" shares moved toward the faster rank 0; the small rank 1 ran smaller micro-batches.
    shares = line(r"^shares: (\[[\d, ]+\]) -> (\[[\d, ]+\])", out)
    first, last = ast.literal_eval(shares[1]), ast.literal_eval(shares[2])
    assert first == [TARGET // 2, TARGET // 2] and sum(last) == TARGET, tail
    assert last[0] > first[0], f"shares did not move to the faster rank 0: {first} -> {last}"
    assert int(ranks[1][4]) < int(ranks[0][4]), f"rank 1's micro-batches not smaller: {ranks}"
    for rank in (0, 1):
        line(rf"^\[rank {rank}\] autoaccum: micro-batch None -> \d+ \(planned", out)
        line(rf"^\[rank {rank}\] autoaccum: shares \[{TARGET // 2}, {TARGET // 2}\] -> ", out)

    # Each rank holds its shard at the optimizer step: within 10% of (P + G + state) / world,
    # and less than the unsharded total between steps.
    sharded = float(line(r"^\(params \+ grads \+ AdamW state\) / world = ([\d.]+) MiB", out)[1])
    memory = re.findall(r"^  memory: ([\d.]+) MiB at the optimizer step \(([\d.]+) x .*?, "
                        r"([\d.]+) MiB between steps", out, flags=re.MULTILINE)
    assert len(memory) == 2, tail
    for at_step, ratio, between in memory:
        assert 0.9 <= float(ratio) <= 1.1, memory
        assert float(between) < float(at_step) <= 1.1 * sharded, memory

    # Table rows: step, loss, step ms, then per rank share and micro x n; shares sum to TARGET.
    rows = re.findall(r"^\s*(\d+)\s+[\d.]+\s+\d+ \| +(\d+) +\d+ x \d+ +\| +(\d+) +\d+ x \d+",
                      out, flags=re.MULTILINE)
    assert [int(r[0]) for r in rows] == list(range(1, STEPS, 2)), tail
    assert all(int(a) + int(b) == TARGET for _, a, b in rows), tail
