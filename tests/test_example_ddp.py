"""examples/ddp_mixed_fleet.py runs under torchrun on two gloo ranks and moves work to the faster
rank."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.dist_harness import torchrun

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_mixed_fleet.py"

# 1024 samples in steps of 128: 8 steps per epoch, 16 in all; shares are recomputed every 3 steps.
# Rank 1 is 4x slower (and has less memory): "auto" shares head for about [102, 26]. The ratio is
# large so that the direction holds on a small, busy CPU, where measured throughputs are noisy.
TINY = ["--simulate", "--target-batch-size", "128", "--num-samples", "1024", "--epochs", "2",
        "--share-interval", "3", "--log-every", "2", "--capacities-mib", "64,24",
        "--slowdowns", "1,4"]


def run_example(*args: str, nproc: int = 2) -> str:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    env["OMP_NUM_THREADS"] = "1"  # what torchrun would set; also silences its warning
    cmd = [*torchrun(), "--nproc-per-node", str(nproc), "--standalone", str(EXAMPLE), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"the example did not finish in 120 s:\n{out[-4000:]}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{output[-4000:]}"
    return output


def test_ddp_example_moves_shares_to_the_faster_rank() -> None:
    out = run_example(*TINY)

    # The summary: shares of the first and the last full step, and every sample used once/epoch.
    match = re.search(r"^shares: (\[[\d, ]+\]) -> (\[[\d, ]+\])", out, flags=re.MULTILINE)
    assert match, f"no 'shares:' summary line:\n{out[-3000:]}"
    first, last = ast.literal_eval(match.group(1)), ast.literal_eval(match.group(2))
    assert first == [64, 64], out[-3000:]
    assert sum(last) == 128
    assert last[0] > 80, f"shares did not move to the faster rank 0: {first} -> {last}"
    assert re.search(r"^16 optimizer steps, 2048 samples", out, flags=re.MULTILINE), out[-3000:]

    # The library's own INFO lines show, prefixed with the rank: plans and share changes.
    for rank in (0, 1):
        assert re.search(rf"^\[rank {rank}\] autoaccum: micro-batch None -> \d+ \(planned",
                         out, flags=re.MULTILINE), out[-3000:]
        assert re.search(rf"^\[rank {rank}\] autoaccum: shares \[64, 64\] -> ", out,
                         flags=re.MULTILINE), out[-3000:]

    # Table rows: step, loss, step ms, then per rank share, micro x n, busy ms.
    rows = re.findall(r"^\s*(\d+)\s+[\d.]+\s+\d+ \| +(\d+) +\d+ x \d+ +-?\d+ \| +(\d+) ", out,
                      flags=re.MULTILINE)
    assert len(rows) == 8, out[-3000:]
    assert all(int(a) + int(b) == 128 for _, a, b in rows)
    assert int(rows[-1][1]) > int(rows[-1][2])  # rank 0 ends with the larger share
