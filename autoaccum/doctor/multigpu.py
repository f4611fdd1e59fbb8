"""Check 5, multi-process agreement: a ``torchrun`` job with an injected OOM on one rank.

With two or more GPUs: NCCL, one rank per GPU (at most :data:`MAX_RANKS`). Without CUDA, in a full
run: gloo with two CPU ranks (a cheap stand-in that exercises the same agreement protocol, not
NCCL). Otherwise the check is skipped and says why; a skip is never a pass.

The job (:mod:`.dist_worker`) runs in its own process group under a wall-clock limit: a hang is
killed and reported as a failure. It passes when every rank finished and wrote its result, every
rank took the same number of optimizer steps with identical parameters (checksum) that match a
one-process reference, the faulty rank caught its OOMs, and in the peer-failure scenario every
rank raised (the healthy ones ``PeerFailedError``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .platform import Platform
from .result import CheckResult, judged

NAME, TITLE = "multigpu", "Multi-process agreement and an OOM on one rank"
MAX_RANKS = 8
TIMEOUT_S = {"nccl": 180.0, "gloo": 60.0}
MAX_DEVIATION = 1e-4


@dataclass(frozen=True)
class Launch:
    """What a launcher returns: exit status (None when killed at the limit) and output tail."""

    returncode: int | None
    output: str


Launcher = Callable[[Sequence[str], dict[str, str], float], Launch]


def launch(cmd: Sequence[str], env: dict[str, str], timeout: float) -> Launch:
    """Run ``cmd`` in a new session; past ``timeout`` seconds kill its whole process group
    (torchrun and its workers) and return ``returncode=None``."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return Launch(proc.returncode, output[-4000:])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return Launch(None, (output or "")[-4000:])


def plan_launch(platform: Platform, quick: bool, gpu_count: int) -> tuple[str, int] | str:
    """``(backend, ranks)`` to run, or the reason to skip."""
    if platform.kind == "cuda":
        if gpu_count < 2:
            return f"skipped ({gpu_count} GPU{'s' if gpu_count != 1 else ''}: needs 2 or more)"
        return "nccl", min(gpu_count, MAX_RANKS)
    if quick:
        return "skipped (no CUDA; the 2-rank gloo stand-in runs without --quick)"
    return "gloo", 2


def check_multigpu(
    platform: Platform, quick: bool, gpu_count: int, launcher: Launcher = launch
) -> CheckResult:
    """Run check 5 (see the module docstring); ``launcher`` is replaceable for tests."""
    planned = plan_launch(platform, quick, gpu_count)
    if isinstance(planned, str):
        return CheckResult(NAME, TITLE, "skip", figures={"gpus": gpu_count}, notes=[planned])
    backend, ranks = planned
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    timeout = TIMEOUT_S[backend]
    with tempfile.TemporaryDirectory(prefix="autoaccum-doctor-") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "autoaccum.doctor.dist_worker",
               "--backend", backend, "--out", out]
        result = launcher(cmd, env, timeout)
        ranks_out = {}
        for path in sorted(Path(out).glob("rank*.json")):
            data = json.loads(path.read_text())
            ranks_out[int(data["rank"])] = data
    return judge(backend, ranks, timeout, result, ranks_out)


def judge(
    backend: str, ranks: int, timeout: float, launched: Launch, results: dict[int, dict[str, Any]]
) -> CheckResult:
    """The verdict from the launcher's outcome and each rank's JSON (a pure function)."""
    problems: list[str] = []
    if launched.returncode is None:
        problems.append(f"the job did not finish within {timeout:.0f} s and was killed: a hang")
    elif launched.returncode != 0:
        problems.append(f"torchrun exited with status {launched.returncode}")
    missing = sorted(set(range(ranks)) - set(results))
    if missing:
        problems.append(f"ranks {missing} wrote no result")
    for rank, data in sorted(results.items()):
        if "error" in data:
            problems.append(f"rank {rank} raised {data['error']}")
    agreements = {r: d["agreement"] for r, d in results.items() if "agreement" in d}
    failures = {r: d["peer_failure"] for r, d in results.items() if "peer_failure" in d}
    steps = sorted({a["steps"] for a in agreements.values()})
    checksums = sorted({a["checksum"] for a in agreements.values()})
    deviation = max((a["deviation"] for a in agreements.values()), default=None)
    faulty = ranks - 1
    if agreements and not missing:
        if len(steps) != 1:
            problems.append(f"ranks took different numbers of optimizer steps: {steps}")
        if len(checksums) != 1:
            problems.append(f"ranks ended with different parameters (checksums {checksums})")
        if deviation is None or not deviation <= MAX_DEVIATION:
            problems.append(f"parameters deviate from the one-process reference by {deviation} "
                            f"of the update (> {MAX_DEVIATION})")
        if agreements.get(faulty, {}).get("ooms", 0) < 2:
            problems.append(f"rank {faulty} caught {agreements.get(faulty, {}).get('ooms')} OOMs, "
                            "expected the 2 injected")
    if failures and not missing:
        for rank, failure in sorted(failures.items()):
            if failure["raised"] is None:
                problems.append(f"peer failure: rank {rank} finished its step although rank "
                                f"{faulty} could not fit one sample")
            elif rank != faulty and failure["raised"] != "PeerFailedError":
                problems.append(f"peer failure: rank {rank} raised {failure['raised']}, "
                                "expected PeerFailedError")
    figures = {
        "backend": backend,
        "ranks": ranks,
        "finished": launched.returncode is not None,
        "exit_status": launched.returncode,
        "optimizer_steps": steps[0] if len(steps) == 1 else steps,
        "ooms_on_faulty_rank": agreements.get(faulty, {}).get("ooms"),
        "ranks_agree": len(checksums) == 1 if checksums else None,
        "deviation_from_reference": deviation,
        "peer_failure_raised": ", ".join(
            f"{r}: {f['raised']}" for r, f in sorted(failures.items())) or None,
    }
    notes = [
        f"torchrun --standalone, {ranks} ranks, {backend}; DDP MLP, equal shares, the last rank "
        "injects an OOM in a forward (step 1) and in its last micro-batch's backward (step 2); "
        "then a step where the last rank cannot fit one sample.",
        *problems,
    ]
    if problems and launched.output.strip():
        notes.append("output tail: " + " / ".join(launched.output.strip().splitlines()[-8:]))
    return judged(NAME, TITLE, not problems, figures=figures, notes=notes)
