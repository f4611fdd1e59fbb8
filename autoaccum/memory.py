"""Memory backends: how much a device has free, and what a micro-batch peaked at.

A backend answers four questions for the planner and one for the OOM handler:

* ``free_bytes()``: bytes this process could still allocate right now;
* ``reset_peak()`` / ``peak_bytes()``: the high-water mark of allocated bytes since the reset;
* ``allocated_bytes()``: bytes allocated right now;
* ``release()``: give cached memory back after an out-of-memory error.

Optional: ``alloc_retries()``, a counter that rises when the allocator had to free its cache and
retry an allocation (CUDA's ``num_alloc_retries``); a rise during a step makes the plan step down
one size even though the step ran. ``headroom``, the fraction of the budget a measured size must
leave free (0 when absent: an exact meter such as :class:`~autoaccum.SimulatedDevice`).

``active(tensors)`` is a context manager the optimizer enters around everything it runs (forward,
backward, optimizer step). Real devices return a null context; :class:`~autoaccum.SimulatedDevice`
counts ``tensors`` (parameters, gradients, optimizer state) as resident and enforces its capacity on
every allocation made inside.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class MemoryBackend(Protocol):
    """The protocol a ``memory=`` argument must follow. All sizes are in bytes."""

    def free_bytes(self) -> int:
        """Bytes this process could still allocate now (device free + its own unused cache)."""
        ...

    def allocated_bytes(self) -> int:
        """Bytes held by live tensors of this process now."""
        ...

    def reset_peak(self) -> None:
        """Start a new peak measurement."""
        ...

    def peak_bytes(self) -> int:
        """Highest ``allocated_bytes()`` seen since the last ``reset_peak()``."""
        ...

    def release(self) -> None:
        """After an out-of-memory error: collect garbage (``gc.collect()``, so tensors held only by
        reference cycles go), then return cached, unused memory to the device."""
        ...

    def active(self, tensors: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """Context entered around the optimizer's work; ``tensors`` are the resident ones."""
        ...


@contextlib.contextmanager
def _null_context() -> Iterator[None]:
    yield


# --------------------------------------------------------------------------------------------------
# CUDA memory: pynvml for the device, the caching allocator for this process's own unused blocks.
# --------------------------------------------------------------------------------------------------

logger = logging.getLogger("autoaccum")

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PCI_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-f]+):)?(?P<bus>[0-9a-f]+):(?P<device>[0-9a-f]+)(?:\.(?P<fn>[0-9a-f]+))?$"
)
_DEVICE_ORDERS = ("FASTEST_FIRST", "PCI_BUS_ID")


def _import_pynvml() -> Any | None:
    """Return the ``pynvml`` module, or None when it is not installed (tests patch this)."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _torch_cuda() -> _CudaApi:
    """Return the object CUDA queries go to by default: ``torch.cuda`` (tests patch this)."""
    return torch.cuda


class _CudaApi(Protocol):
    """The part of ``torch.cuda`` this module uses; ``torch.cuda`` itself satisfies it."""

    def is_available(self) -> bool: ...
    def device_count(self) -> int: ...
    def current_device(self) -> int: ...
    def get_device_properties(self, device: int) -> Any: ...
    def memory_reserved(self, device: int) -> int: ...
    def memory_allocated(self, device: int) -> int: ...
    def max_memory_allocated(self, device: int) -> int: ...
    def reset_peak_memory_stats(self, device: int) -> None: ...
    def mem_get_info(self, device: int) -> tuple[int, int]: ...
    def empty_cache(self) -> None: ...


@dataclass(frozen=True)
class VisibleDevice:
    """The physical device a torch CUDA ordinal stands for, as ``CUDA_VISIBLE_DEVICES`` says.

    Exactly one of ``index`` and ``uuid`` is set. ``index`` is a position in CUDA's own
    enumeration of all devices, which follows ``order`` (``"FASTEST_FIRST"``, CUDA's default, or
    ``"PCI_BUS_ID"``); it is *not* an NVML index. ``uuid`` is the ``GPU-...`` or ``MIG-...``
    string as written in the variable, possibly an abbreviated prefix of the full UUID.
    """

    index: int | None = None
    uuid: str | None = None
    order: str = "FASTEST_FIRST"


def resolve_visible_device(
    ordinal: int, cuda_visible_devices: str | None, cuda_device_order: str | None = None
) -> VisibleDevice | None:
    """Map torch CUDA ordinal ``ordinal`` to the physical device selector it refers to.

    A pure function of its arguments (pass ``os.environ.get(...)`` values). The variable is read
    the way CUDA and ``torch.cuda`` read it: elements are comma separated; an element is an
    integer (leading digits only, so ``"1gpu"`` is 1; a negative or non-numeric element ends the
    list) or, when the first element starts with ``GPU-`` or ``MIG-``, a UUID (the list ends at
    the first element without that prefix); a repeated element makes no device visible.
    ``None`` (unset) means every device, in order. Returns None when the ordinal is not visible.
    An unknown ``cuda_device_order`` is treated as CUDA's default, ``"FASTEST_FIRST"``.
    """
    if ordinal < 0:
        raise ValueError(f"CUDA ordinal must be >= 0, got {ordinal}")
    order = (cuda_device_order or "").strip().upper()
    if order not in _DEVICE_ORDERS:
        order = "FASTEST_FIRST"
    if cuda_visible_devices is None:
        return VisibleDevice(index=ordinal, order=order)
    elements = [e.strip() for e in cuda_visible_devices.split(",")]
    first = elements[0]
    if first.startswith(("GPU-", "MIG-")):
        prefix = first[:4]
        uuids: list[str] = []
        for element in elements:
            if not element.startswith(prefix):
                break
            if element in uuids:
                return None
            uuids.append(element)
        return VisibleDevice(uuid=uuids[ordinal], order=order) if ordinal < len(uuids) else None
    indices: list[int] = []
    for element in elements:
        digits = re.match(r"^\+?\d+", element)
        if digits is None:
            break
        value = int(digits.group(0))
        if value in indices:
            return None
        indices.append(value)
    return VisibleDevice(index=indices[ordinal], order=order) if ordinal < len(indices) else None


def _text(value: Any) -> str:
    """NVML strings come back as ``str`` from recent pynvml, as ``bytes`` from old ones."""
    if isinstance(value, bytes):
        return value.decode(errors="replace").rstrip("\0")
    return str(value)


def _bare_uuid(uuid: str) -> str:
    """``"GPU-ABC..."`` / ``"MIG-abc..."`` / ``"abc..."`` -> ``"abc..."`` (lower case)."""
    uuid = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if uuid.startswith(prefix):
            return uuid[len(prefix) :]
    return uuid


def _torch_uuid(props: Any) -> str | None:
    """The bare lower-case UUID of a torch device, or None when torch does not report one."""
    raw = getattr(props, "uuid", None)
    if raw is None:
        return None
    text = _bare_uuid(_text(raw))
    if not _UUID_RE.match(text):
        data = getattr(raw, "bytes", None)
        if data is None or len(bytes(data)) != 16:
            return None
        hexed = bytes(data).hex()
        text = f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"
    if set(text) <= {"0", "-"}:
        return None
    return text


def _parse_pci(bus_id: str) -> tuple[int, int, int] | None:
    """``"00000000:3B:00.0"`` or ``"0000:3b:00.0"`` -> ``(domain, bus, device)``; None if bad."""
    match = _PCI_RE.match(bus_id.strip().lower())
    if match is None:
        return None
    return (int(match["domain"] or "0", 16), int(match["bus"], 16), int(match["device"], 16))


def _torch_pci(props: Any) -> tuple[int, int, int] | None:
    """``(domain, bus, device)`` of a torch device, or None when torch does not report it."""
    try:
        bus = int(props.pci_bus_id)
        device = int(props.pci_device_id)
        domain = int(getattr(props, "pci_domain_id", 0))
    except (AttributeError, TypeError, ValueError):
        return None
    return (domain, bus, device)


@dataclass(frozen=True)
class _NvmlDevice:
    """One NVML device: a physical GPU, or a MIG instance of one (``mig_index`` set)."""

    index: int  # NVML index of the physical GPU (the parent, for a MIG instance)
    handle: Any
    uuid: str  # as NVML writes it: "GPU-..." or "MIG-..."
    name: str
    pci: tuple[int, int, int] | None
    mig_enabled: bool = False  # a physical GPU whose MIG mode is on
    mig_index: int | None = None
    instance_ids: tuple[int, int] | None = None  # (GPU instance id, compute instance id) of MIG

    @property
    def is_mig(self) -> bool:
        return self.mig_index is not None


def _nvml_errors(nvml: Any) -> tuple[type[BaseException], ...]:
    error = getattr(nvml, "NVMLError", None)
    base = error if isinstance(error, type) and issubclass(error, BaseException) else Exception
    return (base, AttributeError)


def _device_name(nvml: Any, handle: Any, errors: tuple[type[BaseException], ...]) -> str:
    try:
        return _text(nvml.nvmlDeviceGetName(handle))
    except errors:
        return ""


def _enumerate_nvml(nvml: Any) -> list[_NvmlDevice]:
    """Every NVML device and its MIG instances. Devices NVML cannot describe are skipped."""
    errors = _nvml_errors(nvml)
    devices: list[_NvmlDevice] = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except errors:
            continue
        name = _device_name(nvml, handle, errors)
        pci: tuple[int, int, int] | None
        try:
            info = nvml.nvmlDeviceGetPciInfo(handle)
            pci = _parse_pci(_text(info.busId))
            if pci is None:
                pci = (int(info.domain), int(info.bus), int(info.device))
        except (*errors, TypeError, ValueError):  # type: ignore[misc]
            pci = None
        try:
            current = nvml.nvmlDeviceGetMigMode(handle)[0]
            mig_enabled = current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)
        except errors:
            mig_enabled = False
        devices.append(_NvmlDevice(index, handle, uuid, name, pci, mig_enabled))
        if mig_enabled:
            devices.extend(_enumerate_mig(nvml, index, handle, pci))
    return devices


def _enumerate_mig(
    nvml: Any, index: int, parent: Any, pci: tuple[int, int, int] | None
) -> list[_NvmlDevice]:
    errors = _nvml_errors(nvml)
    try:
        count = int(nvml.nvmlDeviceGetMaxMigDeviceCount(parent))
    except errors:
        return []
    instances: list[_NvmlDevice] = []
    for mig_index in range(count):
        try:  # a slot without an instance raises NVML_ERROR_NOT_FOUND
            handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, mig_index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except errors:
            continue
        name = _device_name(nvml, handle, errors)
        try:
            ids: tuple[int, int] | None = (
                int(nvml.nvmlDeviceGetGpuInstanceId(handle)),
                int(nvml.nvmlDeviceGetComputeInstanceId(handle)),
            )
        except errors:
            ids = None
        instances.append(_NvmlDevice(index, handle, uuid, name, pci, False, mig_index, ids))
    return instances


def _match_by_selector(
    selector: VisibleDevice, devices: list[_NvmlDevice], torch_name: str | None
) -> _NvmlDevice | None:
    """The NVML device a ``CUDA_VISIBLE_DEVICES`` selector names, or None when unsure."""
    if selector.uuid is not None:
        wanted = selector.uuid.lower()
        legacy = re.match(r"^mig-(gpu-[0-9a-f-]+)/(\d+)/(\d+)$", wanted)  # pre-R470 MIG names
        if legacy is not None:
            parent, gi, ci = legacy[1], int(legacy[2]), int(legacy[3])
            hits = [
                d
                for d in devices
                if d.is_mig
                and d.instance_ids == (gi, ci)
                and any(p.index == d.index and p.uuid.lower() == parent for p in devices)
            ]
        else:
            hits = [d for d in devices if d.uuid.lower().startswith(wanted)]
        if len(hits) != 1 or hits[0].mig_enabled:
            return None  # unknown, ambiguous prefix, or a MIG parent (which instance?)
        return hits[0]
    assert selector.index is not None
    gpus = [d for d in devices if not d.is_mig]
    if selector.order != "PCI_BUS_ID" and len({d.name for d in gpus}) > 1:
        return None  # FASTEST_FIRST order of unlike GPUs is CUDA's guess; NVML cannot redo it
    gpus.sort(key=lambda d: (d.pci is None, d.pci or (0, 0, 0), d.index))
    if selector.index >= len(gpus):
        return None
    hit = gpus[selector.index]
    if hit.mig_enabled or (torch_name and hit.name and hit.name != torch_name):
        return None
    return hit


def _match_nvml_device(
    props: Any,
    ordinal: int,
    devices: list[_NvmlDevice],
    cuda_visible_devices: str | None,
    cuda_device_order: str | None,
) -> tuple[_NvmlDevice | None, str]:
    """Find the NVML device that is torch CUDA device ``ordinal``; returns ``(device, how)``.

    Tried in order: torch's UUID (exact, GPU or MIG), then torch's PCI bus id (unless that GPU is
    split into MIG instances), then, only when torch reports no UUID, the selector
    ``CUDA_VISIBLE_DEVICES`` / ``CUDA_DEVICE_ORDER`` give for the ordinal. ``how`` says which
    one matched, or why nothing did.
    """
    uuid = _torch_uuid(props)
    if uuid is not None:
        hits = [d for d in devices if _bare_uuid(d.uuid) == uuid]
        if len(hits) == 1:
            return hits[0], "uuid"
    pci = _torch_pci(props)
    if pci is not None:
        hits = [d for d in devices if not d.is_mig and d.pci == pci]
        if len(hits) == 1 and not hits[0].mig_enabled:
            return hits[0], "pci"
    if uuid is None:
        selector = resolve_visible_device(ordinal, cuda_visible_devices, cuda_device_order)
        if selector is not None:
            hit = _match_by_selector(selector, devices, getattr(props, "name", None))
            if hit is not None:
                return hit, "CUDA_VISIBLE_DEVICES"
    return None, f"no NVML device has uuid={uuid} or pci={_format_pci(pci)}"


def _format_pci(pci: tuple[int, int, int] | None) -> str | None:
    return None if pci is None else f"{pci[0]:04x}:{pci[1]:02x}:{pci[2]:02x}.0"


def _device_index(device: torch.device | int | str | None, cuda: _CudaApi) -> int:
    if device is None:
        return int(cuda.current_device())
    if isinstance(device, int):
        index: int | None = device
    else:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(
                f"CudaMemory needs a CUDA device, got {device}; use SimulatedDevice or memory=None "
                "for CPU runs"
            )
        index = device.index
    if index is None:
        return int(cuda.current_device())
    if index < 0:
        raise ValueError(f"CUDA device index must be >= 0, got {index}")
    return index


class CudaMemory:
    """Memory backend for one torch CUDA device (see :class:`MemoryBackend`).

    ``free_bytes()`` is NVML's free memory of the physical device (or MIG instance) this torch
    device is, plus this process's cached-but-unused allocator blocks
    (``memory_reserved() - memory_allocated()``), which NVML counts as used but this process can
    reuse. The NVML device is found by UUID, then PCI bus id, then ``CUDA_VISIBLE_DEVICES``; the
    NVML index is never assumed to equal the CUDA index. When pynvml is missing, cannot start, or
    finds no matching device, ``torch.cuda.mem_get_info`` is used instead (plus the same unused
    cache); each such reason is logged once per instance as a warning on the ``"autoaccum"``
    logger. Nothing is printed. NVML is initialised on first use and left initialised.

    ``nvml`` (a pynvml-compatible module) and ``cuda`` (an object with the ``torch.cuda``
    functions used here) are for tests; by default ``pynvml`` and ``torch.cuda`` are used.
    """

    def __init__(
        self,
        device: torch.device | int | None = None,
        *,
        nvml: Any | None = None,
        cuda: _CudaApi | None = None,
    ) -> None:
        self._cuda: _CudaApi = cuda if cuda is not None else _torch_cuda()
        self.index: int = _device_index(device, self._cuda)
        self._nvml_override = nvml
        self._nvml: Any = None
        self._handle: Any | None = None
        self._resolved = False
        self._warned: set[str] = set()
        self._retries = 0

    def __repr__(self) -> str:
        return f"CudaMemory(device=cuda:{self.index})"

    @property
    def headroom(self) -> float:
        """Fraction of the budget a measured size must leave free: the caching allocator rounds
        blocks and can fragment, so a peak of exactly the free bytes would not fit. 1% with
        ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (segments grow in place), 3%
        otherwise; a size that then thrashes the allocator steps down on its own."""
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()
        return 0.01 if "expandable_segments:true" in conf else 0.03

    @property
    def device(self) -> torch.device:
        """The torch device this backend measures."""
        return torch.device("cuda", self.index)

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning("%r: %s", self, message)

    def _resolve(self) -> None:
        """Find the NVML handle once; on failure leave it None and warn (once)."""
        self._resolved = True
        nvml = self._nvml_override if self._nvml_override is not None else _import_pynvml()
        fallback = "; using torch.cuda.mem_get_info for free memory"
        if nvml is None:
            self._warn_once("pynvml-missing", "pynvml is not installed" + fallback)
            return
        errors = _nvml_errors(nvml)
        try:
            nvml.nvmlInit()
        except errors as exc:
            self._warn_once("nvml-init", f"NVML failed to initialise ({exc!r})" + fallback)
            return
        try:
            devices = _enumerate_nvml(nvml)
        except errors as exc:
            self._warn_once("nvml-enumerate", f"NVML could not list devices ({exc!r})" + fallback)
            return
        props = self._cuda.get_device_properties(self.index)
        found, how = _match_nvml_device(
            props,
            self.index,
            devices,
            os.environ.get("CUDA_VISIBLE_DEVICES"),
            os.environ.get("CUDA_DEVICE_ORDER"),
        )
        if found is None:
            self._warn_once("no-match", how + fallback)
            return
        logger.debug("%r is NVML device %s (%s, matched by %s)", self, found.index, found.uuid, how)
        self._nvml, self._handle = nvml, found.handle

    def _unused_cache(self) -> int:
        reserved = int(self._cuda.memory_reserved(self.index))
        return max(0, reserved - int(self._cuda.memory_allocated(self.index)))

    def free_bytes(self) -> int:
        """Device free bytes (NVML, else ``mem_get_info``) plus this process's unused cache."""
        if not self._resolved:
            self._resolve()
        unused = self._unused_cache()
        if self._handle is not None:
            try:
                return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).free) + unused
            except _nvml_errors(self._nvml) as exc:
                self._warn_once(
                    "nvml-query",
                    f"NVML memory query failed ({exc!r}); using torch.cuda.mem_get_info",
                )
        return int(self._cuda.mem_get_info(self.index)[0]) + unused

    def allocated_bytes(self) -> int:
        """``torch.cuda.memory_allocated`` of this device."""
        return int(self._cuda.memory_allocated(self.index))

    def reset_peak(self) -> None:
        """``torch.cuda.reset_peak_memory_stats`` of this device."""
        self._cuda.reset_peak_memory_stats(self.index)

    def peak_bytes(self) -> int:
        """``torch.cuda.max_memory_allocated`` of this device since the last ``reset_peak()``.

        Read from one ``torch.cuda.memory_stats`` call, which also refreshes
        :meth:`alloc_retries` (no query of its own)."""
        stats_fn = getattr(self._cuda, "memory_stats", None)
        stats = stats_fn(self.index) if stats_fn is not None else None
        if stats and "allocated_bytes.all.peak" in stats:
            self._retries = int(stats.get("num_alloc_retries", 0))
            return int(stats["allocated_bytes.all.peak"])
        return int(self._cuda.max_memory_allocated(self.index))

    def alloc_retries(self) -> int:
        """The caching allocator's ``num_alloc_retries`` (cudaMalloc retried after freeing its
        cache: memory is thrashing) as of the last :meth:`peak_bytes` call."""
        return self._retries

    def release(self) -> None:
        """Collect garbage (dropping unreachable tensors), then ``torch.cuda.empty_cache()``."""
        gc.collect()
        self._cuda.empty_cache()

    def active(self, tensors: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """A null context: the real allocator enforces the real capacity."""
        return _null_context()


def default_backend(device: torch.device) -> MemoryBackend | None:
    """The backend used when ``memory=None``: :class:`CudaMemory` for a CUDA device, else None.

    None means no memory limit (CPU and other devices).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return CudaMemory(device)
    return None


def list_gpus(*, nvml: Any | None = None, cuda: _CudaApi | None = None) -> list[dict[str, Any]]:
    """Describe every CUDA device torch can see, in torch order; ``[]`` when there is none.

    Each entry has ``torch_index`` (int), ``nvml_index`` (int or None when unmatched; for a MIG
    instance, its parent's), ``name``, ``uuid`` (NVML form ``GPU-...``/``MIG-...``, or None),
    ``total_bytes``, ``free_bytes``, ``used_bytes`` (device-wide, from NVML when the device was
    matched, else from ``torch.cuda.mem_get_info``), ``mig`` (bool), ``matched_by`` (``"uuid"``,
    ``"pci"``, ``"CUDA_VISIBLE_DEVICES"`` or None) and ``memory_source`` (``"nvml"`` or
    ``"cuda"``). Devices are matched with the same rules as :class:`CudaMemory`. Nothing is
    logged above INFO and NVML is shut down again before returning.
    """
    cuda = cuda if cuda is not None else _torch_cuda()
    if not cuda.is_available():
        return []
    count = int(cuda.device_count())
    if count == 0:
        return []
    nvml = nvml if nvml is not None else _import_pynvml()
    devices: list[_NvmlDevice] = []
    started = False
    if nvml is None:
        logger.info("pynvml is not installed; GPU memory comes from torch.cuda.mem_get_info")
    else:
        try:
            nvml.nvmlInit()
            started = True
            devices = _enumerate_nvml(nvml)
        except _nvml_errors(nvml) as exc:
            logger.info("NVML unavailable (%r); GPU memory comes from torch.cuda", exc)
    try:
        return [_describe(i, cuda, nvml, devices) for i in range(count)]
    finally:
        if started:
            with contextlib.suppress(*_nvml_errors(nvml)):
                nvml.nvmlShutdown()  # type: ignore[union-attr]


def _describe(index: int, cuda: _CudaApi, nvml: Any, devices: list[_NvmlDevice]) -> dict[str, Any]:
    props = cuda.get_device_properties(index)
    found, how = _match_nvml_device(
        props,
        index,
        devices,
        os.environ.get("CUDA_VISIBLE_DEVICES"),
        os.environ.get("CUDA_DEVICE_ORDER"),
    )
    memory = None
    if found is not None:
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(found.handle)
        except _nvml_errors(nvml) as exc:
            logger.info("NVML memory query for cuda:%d failed (%r)", index, exc)
    if memory is not None:
        total, free = int(memory.total), int(memory.free)
        used = int(memory.used)
    else:
        free, total = (int(x) for x in cuda.mem_get_info(index))
        used = total - free
    uuid = _torch_uuid(props)
    name = _text(getattr(props, "name", "")) or (found.name if found is not None else "")
    mig = found.is_mig if found is not None else "MIG" in name  # unmatched: CUDA names MIG so
    if found is not None:
        full_uuid: str | None = found.uuid
    else:
        full_uuid = None if uuid is None else ("MIG-" if mig else "GPU-") + uuid
    return {
        "torch_index": index,
        "nvml_index": found.index if found is not None else None,
        "name": name,
        "uuid": full_uuid,
        "total_bytes": total,
        "free_bytes": free,
        "used_bytes": used,
        "mig": mig,
        "matched_by": how if found is not None else None,
        "memory_source": "nvml" if memory is not None else "cuda",
    }
