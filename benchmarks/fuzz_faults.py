"""A long run of the double-fault property test (issue 14), beyond what CI can afford.

    python benchmarks/fuzz_faults.py                    # 2000 histories per driver path
    python benchmarks/fuzz_faults.py --examples 200     # a shorter run

CI runs ``tests/test_faults.py::test_any_history_of_faults_and_checkpoints_is_exact`` with 40
histories per driver path (fast and full). This script runs the same test with many more:
hypothesis draws the target, the loader sizes, the micro-batch, the loss mode, up to six
faults (OOMs and plain errors, in forward or in a backward hook, also during replays and
flushes), ``state_dict`` round trips in place or into fresh objects, and whether the caller
retries the unconsumed rest. After each history the parameters must equal the reference for
exactly the samples the optimizer reports consumed (float64, 1e-10).

The report (``benchmarks/results/fuzz_faults.md``) gives, per driver path, the number of
histories run, whether all held, the wall time, and hypothesis' own statistics.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_faults.py::test_any_history_of_faults_and_checkpoints_is_exact"


def run(path: str, examples: int, seed: int) -> tuple[bool, float, str]:
    env = dict(os.environ, AUTOACCUM_FUZZ_EXAMPLES=str(examples), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", f"{TEST}[{path}]", "-q", "-p", "no:cacheprovider",
           "--hypothesis-show-statistics", f"--hypothesis-seed={seed}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    stats = [line for line in proc.stdout.splitlines()
             if line.strip().startswith("-") or "passing" in line or "failing" in line]
    return proc.returncode == 0, wall, "\n".join(stats) or proc.stdout[-2000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="histories per driver path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fuzz_faults.md")
    args = parser.parse_args()

    rows, details, ok_all = [], [], True
    for path in ("fast", "full"):
        ok, wall, stats = run(path, args.examples, args.seed)
        ok_all &= ok
        rows.append(f"| {path} | {args.examples} | {'all held' if ok else '**FAILED**'} "
                    f"| {wall:.0f} s |")
        details.append(f"### {path} path\n\n```\n{stats}\n```\n")
        print(rows[-1], flush=True)

    text = "\n".join([
        "# Double-fault fuzzing: any history of faults and checkpoints is exact",
        "",
        f"Command: `python benchmarks/fuzz_faults.py --examples {args.examples} "
        f"--seed {args.seed}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Machine: {platform.platform()}, torch {torch.__version__}",
        "",
        "What one history is: see the docstring of `benchmarks/fuzz_faults.py` and of "
        "`tests/test_faults.py`.",
        "",
        "| driver path | histories | result | wall time |",
        "|---|---:|---|---:|",
        *rows,
        "",
        *details,
    ])
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
