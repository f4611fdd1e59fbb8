"""CudaMemory, device matching and list_gpus on CPU, with a fake pynvml and a fake torch.cuda."""

from __future__ import annotations

import gc
import logging
import uuid as uuidlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from autoaccum import memory
from autoaccum.memory import (
    CudaMemory,
    MemoryBackend,
    VisibleDevice,
    default_backend,
    list_gpus,
    resolve_visible_device,
)

GIB = 1 << 30


# ------------------------------------------------------------------------------------------------
# Fakes
# ------------------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


@dataclass(eq=False)
class FakeGpu:
    """One NVML device; the object itself serves as its NVML handle."""

    uuid: str
    name: str
    bus_id: str  # NVML's format, e.g. "00000000:3B:00.0"
    free: int
    total: int = 80 * GIB
    mig_mode: int | None = None  # None: MIG not supported (NVMLError_NotSupported)
    migs: dict[int, FakeGpu] = field(default_factory=dict)  # slot -> MIG instance
    instance_ids: tuple[int, int] | None = None
    is_mig: bool = False
    pci: tuple[int, int, int] | None = None  # NVML's integer fields; default: parsed from bus_id

    def __post_init__(self) -> None:
        if self.pci is None and self.bus_id:
            domain, bus, rest = self.bus_id.split(":")
            self.pci = (int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16))


class FakeNvml:
    """The pynvml functions autoaccum uses, over a list of FakeGpu in NVML enumeration order."""

    NVMLError = FakeNVMLError
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(
        self, gpus: list[FakeGpu], init_error: bool = False, memory_error: bool = False
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.memory_error = memory_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> bytes:
        return handle.name.encode()  # old pynvml returns bytes

    def nvmlDeviceGetPciInfo(self, handle: FakeGpu) -> SimpleNamespace:
        if handle.is_mig or handle.pci is None:
            raise FakeNVMLError("Not Supported")
        domain, bus, device = handle.pci
        return SimpleNamespace(busId=handle.bus_id.encode(), domain=domain, bus=bus, device=device)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        if self.memory_error:
            raise FakeNVMLError("GPU is lost")
        return SimpleNamespace(
            total=handle.total, free=handle.free, used=handle.total - handle.free
        )

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> list[int]:
        if handle.mig_mode is None:
            raise FakeNVMLError("Not Supported")
        return [handle.mig_mode, handle.mig_mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeGpu) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeGpu, index: int) -> FakeGpu:
        if index not in handle.migs:
            raise FakeNVMLError("Not Found")
        return handle.migs[index]

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeGpu) -> int:
        assert handle.instance_ids is not None
        return handle.instance_ids[0]

    def nvmlDeviceGetComputeInstanceId(self, handle: FakeGpu) -> int:
        assert handle.instance_ids is not None
        return handle.instance_ids[1]


def props(
    name: str,
    uuid: Any = None,
    pci: tuple[int, int, int] | None = None,
) -> SimpleNamespace:
    """torch-like device properties; ``uuid`` bare as torch prints it; ``pci`` = (dom, bus, dev)."""
    ns = SimpleNamespace(name=name, uuid=uuid, total_memory=80 * GIB)
    if pci is not None:
        ns.pci_domain_id, ns.pci_bus_id, ns.pci_device_id = pci
    return ns


class FakeCuda:
    """The torch.cuda functions autoaccum uses, for the devices described by ``devices``."""

    def __init__(self, devices: list[SimpleNamespace], mem_free: int = 7 * GIB) -> None:
        self.devices = devices
        self.mem_free = mem_free
        self.reserved = {i: 0 for i in range(len(devices))}
        self.allocated = {i: 0 for i in range(len(devices))}
        self.peak = {i: 0 for i in range(len(devices))}
        self.calls: list[tuple[str, Any]] = []

    def is_available(self) -> bool:
        return bool(self.devices)

    def device_count(self) -> int:
        return len(self.devices)

    def current_device(self) -> int:
        return 0

    def get_device_properties(self, device: int) -> SimpleNamespace:
        return self.devices[device]

    def memory_reserved(self, device: int) -> int:
        return self.reserved[device]

    def memory_allocated(self, device: int) -> int:
        return self.allocated[device]

    def max_memory_allocated(self, device: int) -> int:
        return self.peak[device]

    def reset_peak_memory_stats(self, device: int) -> None:
        self.calls.append(("reset_peak_memory_stats", device))
        self.peak[device] = self.allocated[device]

    def mem_get_info(self, device: int) -> tuple[int, int]:
        self.calls.append(("mem_get_info", device))
        return (self.mem_free + device, 80 * GIB)

    def empty_cache(self) -> None:
        self.calls.append(("empty_cache", None))


# NVML enumerates in its own order (here not even PCI order); CUDA's FASTEST_FIRST order puts the
# H100s first. Free memory differs per device so a wrong match shows in free_bytes().
UUID_A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"  # A10  at 17, NVML index 1
UUID_B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"  # H100 at 3B, NVML index 2
UUID_C = "GPU-cccccccc-1111-2222-3333-444444444444"  # H100 at 86, NVML index 0


def three_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(UUID_C, "NVIDIA H100", "00000000:86:00.0", free=30 * GIB),
        FakeGpu(UUID_A, "NVIDIA A10", "00000000:17:00.0", free=10 * GIB, total=24 * GIB),
        FakeGpu(UUID_B, "NVIDIA H100", "00000000:3B:00.0", free=20 * GIB),
    ]


def bare(uuid: str) -> str:
    return uuid[4:]


def cuda_view(with_uuid: bool = True, with_pci: bool = True) -> FakeCuda:
    """What CUDA sees with FASTEST_FIRST and no CUDA_VISIBLE_DEVICES: B, C, then A."""

    def p(name: str, uuid: str, bus: int) -> SimpleNamespace:
        return props(name, bare(uuid) if with_uuid else None, (0, bus, 0) if with_pci else None)

    return FakeCuda(
        [
            p("NVIDIA H100", UUID_B, 0x3B),
            p("NVIDIA H100", UUID_C, 0x86),
            p("NVIDIA A10", UUID_A, 0x17),
        ]
    )


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "autoaccum" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------------
# Matching the NVML device
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ordinal", "expected_free"), [(0, 20 * GIB), (1, 30 * GIB), (2, 10 * GIB)]
)
def test_matches_by_uuid_not_by_index(
    ordinal: int, expected_free: int, caplog: pytest.LogCaptureFixture
) -> None:
    cuda = cuda_view(with_pci=False)
    mem = CudaMemory(ordinal, nvml=FakeNvml(three_gpus()), cuda=cuda)
    assert mem.free_bytes() == expected_free
    assert not warnings_of(caplog)
    assert ("mem_get_info", ordinal) not in cuda.calls


def test_uuid_given_only_as_bytes_still_matches() -> None:
    class CUuuid:  # like torch._C._CUuuid if its str() were not the hex form
        bytes = bytes.fromhex(bare(UUID_C).replace("-", ""))

    cuda = FakeCuda([props("NVIDIA H100", CUuuid())])
    assert CudaMemory(0, nvml=FakeNvml(three_gpus()), cuda=cuda).free_bytes() == 30 * GIB


def test_uuid_with_prefix_and_upper_case_matches() -> None:
    cuda = FakeCuda([props("NVIDIA H100", UUID_C.upper())])
    assert CudaMemory(0, nvml=FakeNvml(three_gpus()), cuda=cuda).free_bytes() == 30 * GIB


@pytest.mark.parametrize("nvml_bus", ["00000000:3B:00.0", "0000:3b:00.0", "3b:00.0", "??"])
def test_matches_by_pci_bus_id_when_uuid_missing(nvml_bus: str) -> None:
    gpus = three_gpus()
    gpus[2].bus_id = nvml_bus  # "??": unparsable, NVML's integer fields are used instead
    cuda = FakeCuda([props("NVIDIA H100", None, (0, 0x3B, 0))])
    assert CudaMemory(0, nvml=FakeNvml(gpus), cuda=cuda).free_bytes() == 20 * GIB


def test_pci_used_when_uuid_unknown_to_nvml() -> None:
    cuda = FakeCuda([props("NVIDIA H100", str(uuidlib.uuid4()), (0, 0x86, 0))])
    assert CudaMemory(0, nvml=FakeNvml(three_gpus()), cuda=cuda).free_bytes() == 30 * GIB


def test_uuid_wins_over_a_conflicting_pci_id() -> None:
    cuda = FakeCuda([props("NVIDIA H100", bare(UUID_B), (0, 0x86, 0))])
    assert CudaMemory(0, nvml=FakeNvml(three_gpus()), cuda=cuda).free_bytes() == 20 * GIB


def test_visible_devices_indices_with_pci_bus_id_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # PCI order: 17 (A10), 3B (H100 B), 86 (H100 C). "2,0" -> cuda:0 is C, cuda:1 is A.
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    cuda = FakeCuda([props("NVIDIA H100"), props("NVIDIA A10")])
    nvml = FakeNvml(three_gpus())
    assert CudaMemory(0, nvml=nvml, cuda=cuda).free_bytes() == 30 * GIB
    assert CudaMemory(1, nvml=nvml, cuda=cuda).free_bytes() == 10 * GIB
    assert not any(call[0] == "mem_get_info" for call in cuda.calls)


def test_visible_devices_fastest_first_with_unlike_gpus_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cuda = FakeCuda([props("NVIDIA H100")])
    mem = CudaMemory(0, nvml=FakeNvml(three_gpus()), cuda=cuda)
    assert mem.free_bytes() == cuda.mem_free  # CUDA's guess at "fastest" cannot be redone
    assert len(warnings_of(caplog)) == 1


def test_visible_devices_fastest_first_with_like_gpus_uses_pci_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = [g for g in three_gpus() if g.name == "NVIDIA H100"]  # C at 86 first, then B at 3B
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    cuda = FakeCuda([props("NVIDIA H100")])
    assert CudaMemory(0, nvml=FakeNvml(gpus), cuda=cuda).free_bytes() == 30 * GIB


def test_visible_devices_index_rejects_a_name_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # PCI index 0 is the A10
    cuda = FakeCuda([props("NVIDIA H100")])
    assert CudaMemory(0, nvml=FakeNvml(three_gpus()), cuda=cuda).free_bytes() == cuda.mem_free


def test_visible_devices_abbreviated_gpu_uuids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc,GPU-aaaaaaaa-1111")
    cuda = FakeCuda([props("NVIDIA H100"), props("NVIDIA A10")])
    nvml = FakeNvml(three_gpus())
    assert CudaMemory(0, nvml=nvml, cuda=cuda).free_bytes() == 30 * GIB
    assert CudaMemory(1, nvml=nvml, cuda=cuda).free_bytes() == 10 * GIB


def test_visible_devices_ambiguous_uuid_prefix_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gpus = three_gpus()
    gpus[1].uuid = "GPU-cccc0000-1111-2222-3333-444444444444"  # shares "GPU-cccc" with C
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc")
    cuda = FakeCuda([props("NVIDIA H100")])
    assert CudaMemory(0, nvml=FakeNvml(gpus), cuda=cuda).free_bytes() == cuda.mem_free
    assert len(warnings_of(caplog)) == 1


MIG_1 = "MIG-11111111-aaaa-bbbb-cccc-dddddddddddd"
MIG_2 = "MIG-22222222-aaaa-bbbb-cccc-dddddddddddd"
UUID_MIG_PARENT = "GPU-99999999-1111-2222-3333-444444444444"


def mig_gpus() -> list[FakeGpu]:
    parent = FakeGpu(UUID_MIG_PARENT, "NVIDIA A100", "00000000:AF:00.0", free=35 * GIB, mig_mode=1)
    parent.migs = {  # slot 1 is empty: NVML raises Not Found for it
        0: FakeGpu(
            MIG_1,
            "NVIDIA A100 MIG 3g.20gb",
            "",
            free=15 * GIB,
            total=20 * GIB,
            instance_ids=(1, 0),
            is_mig=True,
        ),
        2: FakeGpu(
            MIG_2,
            "NVIDIA A100 MIG 3g.20gb",
            "",
            free=18 * GIB,
            total=20 * GIB,
            instance_ids=(2, 0),
            is_mig=True,
        ),
    }
    other = FakeGpu(UUID_B, "NVIDIA H100", "00000000:3B:00.0", free=20 * GIB, mig_mode=0)
    return [other, parent]


def test_mig_instance_matched_by_torch_uuid() -> None:
    cuda = FakeCuda([props("NVIDIA A100 MIG 3g.20gb", bare(MIG_2), (0, 0xAF, 0))])
    assert CudaMemory(0, nvml=FakeNvml(mig_gpus()), cuda=cuda).free_bytes() == 18 * GIB


def test_mig_instance_matched_by_visible_devices_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{MIG_2},{MIG_1}")
    cuda = FakeCuda([props("NVIDIA A100 MIG 3g.20gb")] * 2)
    nvml = FakeNvml(mig_gpus())
    assert CudaMemory(0, nvml=nvml, cuda=cuda).free_bytes() == 18 * GIB
    assert CudaMemory(1, nvml=nvml, cuda=cuda).free_bytes() == 15 * GIB


def test_mig_instance_matched_by_legacy_mig_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"MIG-{UUID_MIG_PARENT}/2/0")
    cuda = FakeCuda([props("NVIDIA A100 MIG 3g.20gb")])
    assert CudaMemory(0, nvml=FakeNvml(mig_gpus()), cuda=cuda).free_bytes() == 18 * GIB


def test_pci_id_of_a_mig_parent_is_ambiguous_and_falls_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cuda = FakeCuda([props("NVIDIA A100 MIG 3g.20gb", None, (0, 0xAF, 0))])
    mem = CudaMemory(0, nvml=FakeNvml(mig_gpus()), cuda=cuda)
    assert mem.free_bytes() == cuda.mem_free  # not the parent's 35 GiB
    assert len(warnings_of(caplog)) == 1


# ------------------------------------------------------------------------------------------------
# free_bytes arithmetic and fallbacks
# ------------------------------------------------------------------------------------------------


def test_free_bytes_adds_reserved_minus_allocated() -> None:
    cuda = cuda_view()
    mem = CudaMemory(1, nvml=FakeNvml(three_gpus()), cuda=cuda)
    cuda.reserved[1], cuda.allocated[1] = 5 * GIB, 2 * GIB
    assert mem.free_bytes() == 30 * GIB + 3 * GIB
    cuda.allocated[1] = 5 * GIB
    assert mem.free_bytes() == 30 * GIB
    cuda.reserved[0] = 9 * GIB  # another device's cache does not count
    assert mem.free_bytes() == 30 * GIB


def _assert_single_fallback(
    mem: CudaMemory, cuda: FakeCuda, caplog: pytest.LogCaptureFixture, capsys: Any, text: str
) -> None:
    cuda.reserved[0], cuda.allocated[0] = 4 * GIB, 1 * GIB
    for _ in range(3):
        assert mem.free_bytes() == cuda.mem_free + 3 * GIB
    records = warnings_of(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert text in records[0].getMessage()
    assert "mem_get_info" in records[0].getMessage()
    assert capsys.readouterr() == ("", "")  # the library never prints


def test_nvml_init_failure_falls_back_with_one_warning(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    cuda = cuda_view()
    mem = CudaMemory(0, nvml=FakeNvml(three_gpus(), init_error=True), cuda=cuda)
    _assert_single_fallback(mem, cuda, caplog, capsys, "initialise")


def test_missing_pynvml_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(memory, "_import_pynvml", lambda: None)
    cuda = cuda_view()
    _assert_single_fallback(CudaMemory(0, cuda=cuda), cuda, caplog, capsys, "not installed")


def test_no_matching_device_falls_back_with_one_warning(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    cuda = FakeCuda([props("NVIDIA H100", str(uuidlib.uuid4()), (0, 0x99, 0))])
    mem = CudaMemory(0, nvml=FakeNvml(three_gpus()), cuda=cuda)
    _assert_single_fallback(mem, cuda, caplog, capsys, "no NVML device")


def test_nvml_query_failure_falls_back_with_one_warning(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    cuda = cuda_view()
    mem = CudaMemory(0, nvml=FakeNvml(three_gpus(), memory_error=True), cuda=cuda)
    _assert_single_fallback(mem, cuda, caplog, capsys, "query failed")


def test_each_instance_warns_once() -> None:
    handler_records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            handler_records.append(record)

    log = logging.getLogger("autoaccum")
    handler = Collect(level=logging.WARNING)
    log.addHandler(handler)
    try:
        cuda = cuda_view()
        nvml = FakeNvml(three_gpus(), init_error=True)
        for _ in range(2):
            mem = CudaMemory(0, nvml=nvml, cuda=cuda)
            mem.free_bytes()
            mem.free_bytes()
    finally:
        log.removeHandler(handler)
    assert len(handler_records) == 2
    assert nvml.init_calls == 2  # resolved once per instance, not per call


def test_real_pynvml_without_gpu_takes_fallback_path(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pynvml")
    # A UUID no real GPU has and no PCI id: with or without a driver, the fallback is taken.
    cuda = FakeCuda([props("Fake GPU", str(uuidlib.uuid4()))])
    mem = CudaMemory(0, cuda=cuda)  # the real pynvml
    _assert_single_fallback(mem, cuda, caplog, capsys, "")


# ------------------------------------------------------------------------------------------------
# The rest of the backend
# ------------------------------------------------------------------------------------------------


def test_is_a_memory_backend_and_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = cuda_view()
    mem = CudaMemory(torch.device("cuda", 2), nvml=FakeNvml(three_gpus()), cuda=cuda)
    assert isinstance(mem, MemoryBackend)
    assert mem.index == 2 and mem.device == torch.device("cuda", 2)
    cuda.allocated[2], cuda.peak[2] = 3, 11
    assert mem.allocated_bytes() == 3
    assert mem.peak_bytes() == 11
    mem.reset_peak()
    assert cuda.calls[-1] == ("reset_peak_memory_stats", 2)
    assert mem.peak_bytes() == 3

    order: list[str] = []
    monkeypatch.setattr(gc, "collect", lambda *a: order.append("gc") or 0)
    monkeypatch.setattr(cuda, "empty_cache", lambda: order.append("empty_cache"))
    mem.release()
    assert order == ["gc", "empty_cache"]

    with mem.active([torch.zeros(3)]):
        big = torch.zeros(1000)  # a null context: nothing is counted or refused
    assert big.numel() == 1000


def test_peak_and_alloc_retries_come_from_one_memory_stats_call() -> None:
    """With torch.cuda.memory_stats, the peak read also refreshes the allocator's retry count
    (cudaMalloc retried after freeing the cache): the thrash signal costs no query of its own."""
    cuda = cuda_view()
    stats = {"allocated_bytes.all.peak": 123, "num_alloc_retries": 0}
    calls: list[int] = []

    def memory_stats(device: int) -> dict[str, int]:
        calls.append(device)
        return dict(stats)

    cuda.memory_stats = memory_stats  # type: ignore[attr-defined]
    mem = CudaMemory(torch.device("cuda", 1), nvml=FakeNvml(three_gpus()), cuda=cuda)
    assert mem.peak_bytes() == 123 and mem.alloc_retries() == 0
    stats["num_alloc_retries"] = 2
    assert mem.alloc_retries() == 0  # not refreshed until the next peak read
    assert mem.peak_bytes() == 123 and mem.alloc_retries() == 2
    assert calls == [1, 1]


def test_device_none_uses_current_device() -> None:
    cuda = cuda_view()
    cuda.current_device = lambda: 1  # type: ignore[method-assign]
    assert CudaMemory(nvml=FakeNvml(three_gpus()), cuda=cuda).free_bytes() == 30 * GIB
    assert CudaMemory("cuda", cuda=cuda).index == 1  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["cpu", torch.device("meta"), -1])
def test_rejects_non_cuda_devices(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"CUDA device|>= 0"):
        CudaMemory(bad, cuda=cuda_view())


def test_default_backend() -> None:
    assert default_backend(torch.device("cpu")) is None
    assert default_backend(torch.device("meta")) is None
    backend = default_backend(torch.device("cuda", 1))
    assert isinstance(backend, CudaMemory) and backend.index == 1


def test_headroom_is_smaller_with_expandable_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    mem = CudaMemory(torch.device("cuda", 0), nvml=FakeNvml(three_gpus()), cuda=cuda_view())
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert mem.headroom == 0.03
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:True")
    assert mem.headroom == 0.01


# ------------------------------------------------------------------------------------------------
# resolve_visible_device (pure)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ordinal", "visible", "order", "expected"),
    [
        (3, None, None, VisibleDevice(index=3)),
        (0, "", None, None),
        (0, "2,0", "PCI_BUS_ID", VisibleDevice(index=2, order="PCI_BUS_ID")),
        (1, "2,0", " pci_bus_id ", VisibleDevice(index=0, order="PCI_BUS_ID")),
        (1, "1gpu2, 3", None, VisibleDevice(index=3)),
        (2, "1,3", None, None),
        (1, "0,-1,2", None, None),  # a negative index ends the list
        (1, "0,x,2", None, None),  # so does garbage
        (0, "1,1", None, None),  # a repeated index hides every device
        (0, "0", "SOMETHING_ELSE", VisibleDevice(index=0)),
        (1, "GPU-ab,GPU-cd", None, VisibleDevice(uuid="GPU-cd")),
        (1, "GPU-ab,1", None, None),  # the UUID list ends at the first non-UUID
        (0, "MIG-ab", None, VisibleDevice(uuid="MIG-ab")),
        (0, "GPU-ab,GPU-ab", None, None),
    ],
)
def test_resolve_visible_device(
    ordinal: int, visible: str | None, order: str | None, expected: VisibleDevice | None
) -> None:
    assert resolve_visible_device(ordinal, visible, order) == expected


def test_resolve_visible_device_rejects_negative_ordinal() -> None:
    with pytest.raises(ValueError, match="-1"):
        resolve_visible_device(-1, None)


# ------------------------------------------------------------------------------------------------
# list_gpus
# ------------------------------------------------------------------------------------------------


def test_list_gpus_reports_matched_nvml_devices() -> None:
    nvml = FakeNvml(three_gpus())
    gpus = list_gpus(nvml=nvml, cuda=cuda_view())
    assert [g["torch_index"] for g in gpus] == [0, 1, 2]
    assert [g["nvml_index"] for g in gpus] == [2, 0, 1]
    assert [g["uuid"] for g in gpus] == [UUID_B, UUID_C, UUID_A]
    assert [g["free_bytes"] for g in gpus] == [20 * GIB, 30 * GIB, 10 * GIB]
    assert gpus[2]["total_bytes"] == 24 * GIB and gpus[2]["used_bytes"] == 14 * GIB
    assert {g["memory_source"] for g in gpus} == {"nvml"}
    assert {g["matched_by"] for g in gpus} == {"uuid"}
    assert not any(g["mig"] for g in gpus)
    assert (nvml.init_calls, nvml.shutdown_calls) == (1, 1)


def test_list_gpus_mig_and_fallback() -> None:
    cuda = FakeCuda(
        [
            props("NVIDIA A100 MIG 3g.20gb", bare(MIG_1)),
            props("Unknown GPU", str(uuidlib.uuid4())),
        ]
    )
    gpus = list_gpus(nvml=FakeNvml(mig_gpus()), cuda=cuda)
    assert gpus[0]["mig"] is True and gpus[0]["nvml_index"] == 1 and gpus[0]["uuid"] == MIG_1
    assert gpus[0]["free_bytes"] == 15 * GIB and gpus[0]["total_bytes"] == 20 * GIB
    assert gpus[1]["nvml_index"] is None and gpus[1]["memory_source"] == "cuda"
    assert gpus[1]["free_bytes"] == cuda.mem_free + 1
    assert gpus[1]["used_bytes"] == 80 * GIB - gpus[1]["free_bytes"]


def test_list_gpus_without_cuda_is_empty_and_skips_nvml() -> None:
    nvml = FakeNvml(three_gpus())
    assert list_gpus(nvml=nvml, cuda=FakeCuda([])) == []
    assert nvml.init_calls == 0


def test_list_gpus_when_nvml_fails(caplog: pytest.LogCaptureFixture) -> None:
    gpus = list_gpus(nvml=FakeNvml(three_gpus(), init_error=True), cuda=cuda_view())
    assert [g["memory_source"] for g in gpus] == ["cuda"] * 3
    assert [g["uuid"] for g in gpus] == [UUID_B, UUID_C, UUID_A]  # from torch's UUIDs
    assert not warnings_of(caplog)
