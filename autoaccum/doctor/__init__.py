"""``python -m autoaccum doctor``: does autoaccum work on this machine, and what does it pick?

One command runs every check on whatever it finds and leaves a report a user can paste into a bug
report (markdown on stdout, optionally JSON):

1. :mod:`.devices`: each GPU's torch / NVML match and free-memory readings (without CUDA: a
   self-test of the simulated device the other checks then use);
2. :mod:`.plan`: planned micro-batch and predicted peak against measured peaks and the largest
   micro-batch that really runs, for built-in workloads;
3. :mod:`.recovery`: a real squeeze mid-step: OOM caught, memory released, same result;
4. :mod:`.overhead`: step time against a hand-written accumulation loop;
5. :mod:`.multigpu`: a ``torchrun`` job with an OOM on one rank must not hang (NCCL with 2+
   GPUs; gloo on the CPU in a full run; otherwise skipped).

On a machine without CUDA the same checks run on :class:`~autoaccum.SimulatedDevice` with small
models. A check that raises is reported as failed with the error, and the run goes on. This
package is imported only by the ``doctor`` command, never by ``import autoaccum``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import devices as _devices
from . import multigpu as _multigpu
from . import overhead as _overhead
from . import plan as _plan
from . import recovery as _recovery
from .devices import check_devices, versions
from .multigpu import check_multigpu
from .overhead import check_overhead
from .plan import check_plan
from .platform import Platform, select_platform
from .recovery import check_recovery
from .result import CheckResult, Report, render_markdown

CHECKS = ("devices", "plan", "recovery", "overhead", "multigpu")
_TITLES = {m.NAME: m.TITLE for m in (_devices, _plan, _recovery, _overhead, _multigpu)}

__all__ = ["CHECKS", "CheckResult", "Report", "render_markdown", "run_doctor"]


def _stderr(message: str) -> None:
    print(f"doctor: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _autoaccum_log(verbose: bool) -> Iterator[None]:
    """The checks provoke OOMs on purpose: keep the library's warnings about them off stderr
    unless ``verbose`` (then show its INFO log too)."""
    log = logging.getLogger("autoaccum")
    saved = log.propagate, log.level
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if verbose else logging.NullHandler()
    )
    handler.setFormatter(logging.Formatter("autoaccum %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    if verbose:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate, log.level = saved[0], saved[1]


def guarded(name: str, run: Callable[[], CheckResult]) -> CheckResult:
    """``run()`` with its wall time; an exception becomes a failed check that names it."""
    started = time.perf_counter()
    try:
        result = run()
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result = CheckResult(
            name, _TITLES.get(name, name), "fail",
            notes=[f"the check raised {type(exc).__name__}: {exc} "
                   f"({where.filename}:{where.lineno})"],
        )
    result.seconds = time.perf_counter() - started
    return result


def run_doctor(
    quick: bool = False,
    *,
    platform: Platform | None = None,
    checks: tuple[str, ...] = CHECKS,
    progress: Callable[[str], None] = _stderr,
    verbose: bool = False,
) -> Report:
    """Run ``checks`` (default: all) and return the :class:`Report`; prints nothing but
    ``progress`` lines (default: to stderr)."""
    started = time.perf_counter()
    platform = platform or select_platform()
    cuda = platform.kind == "cuda"
    gpu_count = int(torch.cuda.device_count()) if cuda else 0
    gpus: list[dict[str, Any]] = []
    results: list[CheckResult] = []

    def devices() -> CheckResult:
        result, found = check_devices()
        gpus.extend(found)
        return result

    runners: dict[str, Callable[[], CheckResult]] = {
        "devices": devices,
        "plan": lambda: check_plan(platform, quick, progress=progress),
        "recovery": lambda: check_recovery(platform, quick),
        "overhead": lambda: check_overhead(platform, quick),
        "multigpu": lambda: check_multigpu(platform, quick, gpu_count),
    }
    progress(f"{'quick' if quick else 'full'} run on {platform.describe()}")
    with _autoaccum_log(verbose):
        environment = versions()
        for name in checks:
            progress(f"{_TITLES[name]} ...")
            result = guarded(name, runners[name])
            progress(f"{name}: {result.status.upper()} ({result.seconds:.1f} s)")
            results.append(result)
            platform.cleanup()
    return Report(platform.kind, quick, environment, gpus, results,
                  seconds=time.perf_counter() - started)
