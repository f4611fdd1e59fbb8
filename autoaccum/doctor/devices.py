"""Check 1, devices, and the versions block of the report.

With CUDA: per visible GPU, the torch index, the NVML device matched to it (index, UUID, MIG, how
it was matched), and three free-memory readings side by side: NVML's, ``torch.cuda.mem_get_info``'s
and the caching allocator's unused cache (``memory_reserved - memory_allocated``), with the free
bytes autoaccum's :class:`~autoaccum.memory.CudaMemory` reports and the source it used. Without
CUDA: a self-test of :class:`~autoaccum.SimulatedDevice`'s byte accounting, which every other check
then relies on.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform as pyplatform
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ..memory import CudaMemory, _import_pynvml, list_gpus
from ..oom import is_oom
from ..simulated import SimulatedDevice
from .result import CheckResult, judged

NAME, TITLE = "devices", "Devices and free memory"
CACHE_BYTES = 64 << 20  # allocated and freed per GPU so that the allocator holds unused cache
# Two readings of one device's free memory, taken a moment apart, may differ by what other
# processes allocate in between; more than this means two different devices.
AGREEMENT_BYTES = 256 << 20
AGREEMENT_FRACTION = 0.02


def versions(nvml: Any = None, cuda: Any = None) -> dict[str, str]:
    """Versions a bug report needs: Python, OS, torch and its CUDA / cuDNN / NCCL, the NVIDIA
    driver and NVML (via pynvml), nvidia-ml-py and autoaccum. Never raises: a version that
    cannot be read says why."""
    from .. import __version__

    cuda = cuda if cuda is not None else torch.cuda
    out = {
        "python": sys.version.split()[0],
        "os": pyplatform.platform(),
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda or "none (CPU build)"),
    }
    if cuda.is_available():
        out["cuDNN"] = str(torch.backends.cudnn.version())
        with contextlib.suppress(Exception):
            nccl = torch.cuda.nccl.version()
            out["NCCL"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    out.update(_nvml_versions(nvml))
    for package in ("nvidia-ml-py", "pynvml"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    out["autoaccum"] = __version__
    out["GPUs visible to torch"] = str(cuda.device_count() if cuda.is_available() else 0)
    for var in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PYTORCH_CUDA_ALLOC_CONF"):
        if var in os.environ:
            out[var] = os.environ[var]
    return out


def _nvml_versions(nvml: Any) -> dict[str, str]:
    nvml = nvml if nvml is not None else _import_pynvml()
    if nvml is None:
        return {"NVIDIA driver": "unknown (pynvml not installed)"}
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return {"NVIDIA driver": f"unknown (NVML unavailable: {exc})"}
    out = {}
    try:
        for key, fn in (("NVIDIA driver", "nvmlSystemGetDriverVersion"),
                        ("NVML", "nvmlSystemGetNVMLVersion")):
            try:
                value = getattr(nvml, fn)()
                out[key] = value.decode() if isinstance(value, bytes) else str(value)
            except Exception as exc:
                out[key] = f"unknown ({exc})"
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return out


def nvml_status(nvml: Any = None) -> str:
    """``"ok"``, or why NVML cannot be used (then autoaccum reads ``cudaMemGetInfo``)."""
    nvml = nvml if nvml is not None else _import_pynvml()
    if nvml is None:
        return "pynvml not installed"
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return f"nvmlInit failed: {exc}"
    with contextlib.suppress(Exception):
        nvml.nvmlShutdown()
    return "ok"


@contextlib.contextmanager
def _autoaccum_warnings() -> Iterator[list[str]]:
    """Collect what the ``"autoaccum"`` logger warns inside the block."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    log = logging.getLogger("autoaccum")
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)


def check_devices(
    *, nvml: Any = None, cuda: Any = None, warm_cache: bool | None = None
) -> tuple[CheckResult, list[dict[str, Any]]]:
    """Check 1 and the report's device list (``list_gpus()``; ``[]`` without CUDA).

    ``nvml`` and ``cuda`` replace ``pynvml`` and ``torch.cuda`` (tests). ``warm_cache``
    allocates and frees :data:`CACHE_BYTES` per GPU first, so the allocator holds unused cache
    that autoaccum must count as free (default: only with the real ``torch.cuda``).
    """
    api = cuda if cuda is not None else torch.cuda
    if not api.is_available() or int(api.device_count()) == 0:
        return simulated_self_test(nvml_status(nvml)), []
    if warm_cache is None:
        warm_cache = cuda is None
    if warm_cache:
        # Before any reading: this also creates each device's CUDA context, whose memory must
        # be gone from all three readings alike.
        for i in range(int(api.device_count())):
            torch.empty(CACHE_BYTES, dtype=torch.uint8, device=torch.device("cuda", i))
    gpus = list_gpus(nvml=nvml, cuda=cuda)
    status = nvml_status(nvml)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    ok = True
    for gpu in gpus:
        i = gpu["torch_index"]
        row, problems = _compare(gpu, api, nvml, cuda, status)
        rows.append(row)
        notes += [f"cuda:{i}: {p}" for p in problems]
        ok = ok and not problems
    if status != "ok":
        notes.append(f"NVML: {status}; autoaccum reads free memory from cudaMemGetInfo "
                     "(plus the allocator's unused cache)")
    notes.append(
        "free = NVML's free bytes of the matched device; cuda free = torch.cuda.mem_get_info; "
        "cache = memory_reserved - memory_allocated (this process's unused blocks, which both "
        "count as used); autoaccum free = CudaMemory.free_bytes() = source's free + cache. Pass: "
        "every device matched when NVML works, NVML and CUDA agree within "
        f"{AGREEMENT_BYTES >> 20} MiB or {AGREEMENT_FRACTION:.0%}, autoaccum free = source + "
        "cache."
    )
    figures = {"gpus": len(gpus), "nvml": status}
    return judged(NAME, TITLE, ok, figures=figures, rows=rows, notes=notes), gpus


def _compare(
    gpu: dict[str, Any], api: Any, nvml: Any, cuda: Any, status: str
) -> tuple[dict[str, Any], list[str]]:
    i = gpu["torch_index"]
    cuda_free, total = (int(x) for x in api.mem_get_info(i))
    cache = max(0, int(api.memory_reserved(i)) - int(api.memory_allocated(i)))
    with _autoaccum_warnings() as warned:
        autoaccum_free = CudaMemory(i, nvml=nvml, cuda=cuda).free_bytes()
    nvml_free = gpu["free_bytes"] if gpu["memory_source"] == "nvml" else None
    source_free = nvml_free if nvml_free is not None else cuda_free
    tolerance = max(AGREEMENT_BYTES, int(AGREEMENT_FRACTION * total))
    problems = []
    if status == "ok" and gpu["nvml_index"] is None:
        problems.append("NVML works but no NVML device matches this torch device (by UUID, PCI "
                        "bus id or CUDA_VISIBLE_DEVICES); autoaccum falls back to cudaMemGetInfo")
    if nvml_free is not None and abs(nvml_free - cuda_free) > tolerance:
        problems.append(f"NVML says {nvml_free >> 20} MiB free, cudaMemGetInfo {cuda_free >> 20} "
                        "MiB: the matched NVML device may be another GPU")
    if abs(autoaccum_free - (source_free + cache)) > tolerance:
        problems.append(f"autoaccum reports {autoaccum_free >> 20} MiB free, expected "
                        f"{(source_free + cache) >> 20} MiB ({gpu['memory_source']} free + cache)")
    problems += [f"autoaccum warned: {w}" for w in warned if status == "ok"]
    row = {
        "torch": i,
        "nvml": gpu["nvml_index"],
        "name": gpu["name"],
        "uuid": gpu["uuid"],
        "mig": gpu["mig"],
        "matched_by": gpu["matched_by"],
        "total_bytes": total,
        "nvml_free_bytes": nvml_free,
        "cuda_free_bytes": cuda_free,
        "cache_bytes": cache,
        "autoaccum_free_bytes": autoaccum_free,
        "source": gpu["memory_source"],
        "status": "FAIL" if problems else "PASS",
    }
    return row, problems


def simulated_self_test(nvml: str) -> CheckResult:
    """Without CUDA: SimulatedDevice counts a tensor's bytes exactly, reports free memory as
    capacity minus allocated, raises an OOM that autoaccum recognises past its capacity, and
    forgets a freed tensor."""
    capacity = 1 << 20
    sim = SimulatedDevice(capacity_bytes=capacity, name="self-test")
    problems = []
    with sim.active():
        kept = torch.empty(1000, dtype=torch.float32)
        counted, free = sim.allocated_bytes(), sim.free_bytes()
        try:
            torch.empty(capacity, dtype=torch.uint8)
            raised = "nothing"
        except Exception as exc:
            raised = "an OOM" if is_oom(exc) else f"{type(exc).__name__}"
    del kept
    after = sim.allocated_bytes()
    if counted != 4000:
        problems.append(f"a 4000-byte tensor was counted as {counted} bytes")
    if free != capacity - counted:
        problems.append(f"free_bytes() = {free}, expected capacity - allocated = "
                        f"{capacity - counted}")
    if raised != "an OOM":
        problems.append(f"an allocation past the capacity raised {raised}, expected an OOM")
    if after != 0:
        problems.append(f"{after} bytes still counted after the tensor was freed")
    figures = {
        "cuda": False,
        "nvml": nvml,
        "memory used by the checks": "SimulatedDevice (exact byte accounting)",
        "counted_bytes": counted,
        "free_bytes": free,
        "past capacity": raised,
        "after free": after,
    }
    notes = ["No CUDA device: the checks below run on SimulatedDevice with small models; NVML "
             "matching and the caching allocator are not exercised (the unit tests cover them "
             "with fakes).", *problems]
    return judged(NAME, TITLE, not problems, figures=figures, notes=notes)
