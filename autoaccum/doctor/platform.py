"""Where the doctor's checks run: a real CUDA device, or a SimulatedDevice on the CPU.

A check asks its :class:`Platform` for a memory backend, for the bytes allocated and reserved, for
a ballast tensor that takes memory away, and for step timings; it never asks which kind of
platform it has. :class:`CudaPlatform` answers from ``torch.cuda`` (real allocator, real OOMs, CUDA
events); :class:`SimPlatform` from a :class:`~autoaccum.SimulatedDevice` per run.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..memory import CudaMemory, MemoryBackend
from ..simulated import SimulatedDevice


class MemoryMeter:
    """A memory backend around another one, keeping the true high-water mark of a measurement.

    ``AutoAccumOptimizer`` calls ``reset_peak()`` at the start of every step and around probes,
    which would wipe a measurement taken around a whole step. The meter reads the inner peak
    before each such reset, so after :meth:`start`, :meth:`high_water` is the highest
    ``allocated_bytes()`` the inner backend saw since then, whatever the optimizer reset in
    between (likewise :meth:`high_water_reserved` when a ``peak_reserved`` reading is given).
    Everything else is delegated unchanged, optional attributes (``headroom``,
    ``alloc_retries``) included, so the optimizer behaves as with the inner backend itself.
    """

    def __init__(
        self,
        inner: MemoryBackend,
        *,
        reserved: Callable[[], int] | None = None,
        peak_reserved: Callable[[], int] | None = None,
    ) -> None:
        self.inner = inner
        self._reserved = reserved
        self._peak_reserved = peak_reserved
        self._high = 0
        self._high_reserved = 0

    def __repr__(self) -> str:
        return f"MemoryMeter({self.inner!r})"

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    # -- MemoryBackend ------------------------------------------------------------------------
    def free_bytes(self) -> int:
        return self.inner.free_bytes()

    def allocated_bytes(self) -> int:
        return self.inner.allocated_bytes()

    def reset_peak(self) -> None:
        self._fold()
        self.inner.reset_peak()

    def peak_bytes(self) -> int:
        return self.inner.peak_bytes()

    def release(self) -> None:
        self.inner.release()

    def active(self, tensors: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        return self.inner.active(tensors)

    # -- measurement --------------------------------------------------------------------------
    def start(self) -> None:
        """Begin a measurement at the current allocation."""
        self.inner.reset_peak()
        self._high = self.inner.allocated_bytes()
        self._high_reserved = self._peak_reserved() if self._peak_reserved is not None else 0

    def high_water(self) -> int:
        """Highest allocated bytes since :meth:`start`."""
        self._fold()
        return self._high

    def high_water_reserved(self) -> int | None:
        """Highest reserved bytes since :meth:`start` (None when the backend reserves nothing)."""
        if self._peak_reserved is None:
            return None
        self._fold()
        return self._high_reserved

    def reserved_bytes(self) -> int | None:
        """Bytes the allocator holds now, in use or cached (None: no caching allocator)."""
        return self._reserved() if self._reserved is not None else None

    def _fold(self) -> None:
        self._high = max(self._high, self.inner.peak_bytes())
        if self._peak_reserved is not None:
            self._high_reserved = max(self._high_reserved, self._peak_reserved())


class Platform:
    """The device the checks run on. Subclasses: :class:`CudaPlatform`, :class:`SimPlatform`."""

    kind = "none"
    device = torch.device("cpu")
    #: Fraction of free memory an allocation may not reach in practice (allocator rounding).
    slack = 0.0

    def describe(self) -> str:
        raise NotImplementedError

    def memory(self, capacity_bytes: int) -> MemoryMeter:
        """A fresh metered backend; ``capacity_bytes`` sizes a simulated device (ignored on a
        real one, whose capacity is the hardware's)."""
        raise NotImplementedError

    def free_bytes(self, meter: MemoryMeter) -> int:
        """Bytes an allocation could still get now (device free plus this process's cache)."""
        return meter.free_bytes()

    def synchronize(self) -> None:
        """Wait for queued device work (nothing to wait for on the CPU)."""

    def cleanup(self) -> None:
        """Collect garbage and give cached device memory back, between runs."""
        gc.collect()

    def ballast(self, meter: MemoryMeter, nbytes: int) -> torch.Tensor:
        """Allocate ``nbytes`` that the memory backend counts, taking them from the run."""
        return torch.empty(max(0, nbytes), dtype=torch.uint8, device=self.device)

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn()`` takes, including the device work it queues."""
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class SimPlatform(Platform):
    """The CPU with a :class:`~autoaccum.SimulatedDevice` per run: exact byte accounting, OOMs at
    the capacity a check chooses, wall-clock timing."""

    kind = "simulated"

    def describe(self) -> str:
        return "SimulatedDevice on the CPU (no CUDA device)"

    def memory(self, capacity_bytes: int) -> MemoryMeter:
        return MemoryMeter(SimulatedDevice(capacity_bytes=int(capacity_bytes), name="doctor"))


class CudaPlatform(Platform):
    """One CUDA device: :class:`~autoaccum.memory.CudaMemory` (NVML + caching allocator), real
    OOMs from the real allocator, ``max_memory_allocated`` / ``max_memory_reserved`` for peaks,
    CUDA events for timings.

    ``cuda`` (an object with the ``torch.cuda`` functions used) and ``nvml`` are for tests.
    """

    kind = "cuda"
    # The caching allocator rounds blocks and can fragment: a ballast that leaves exactly the
    # bytes a micro-batch needs is not enough to run it.
    slack = 0.03

    def __init__(self, index: int | None = None, *, cuda: Any = None, nvml: Any = None) -> None:
        self._cuda = cuda if cuda is not None else torch.cuda
        self._nvml = nvml
        self.index = int(self._cuda.current_device()) if index is None else int(index)
        self.device = torch.device("cuda", self.index)

    def describe(self) -> str:
        name = getattr(self._cuda.get_device_properties(self.index), "name", "?")
        return f"cuda:{self.index} ({name})"

    def memory(self, capacity_bytes: int) -> MemoryMeter:
        i, cuda = self.index, self._cuda
        backend = CudaMemory(i, nvml=self._nvml, cuda=cuda)
        return MemoryMeter(
            backend,
            reserved=lambda: int(cuda.memory_reserved(i)),
            peak_reserved=lambda: int(cuda.max_memory_reserved(i)),
        )

    def free_bytes(self, meter: MemoryMeter) -> int:
        # What the allocator can hand out: device free plus this process's unused cache. (Not
        # CudaMemory.free_bytes, whose NVML reading is the thing check 1 verifies.)
        free = int(self._cuda.mem_get_info(self.index)[0])
        cache = int(self._cuda.memory_reserved(self.index)) - int(
            self._cuda.memory_allocated(self.index)
        )
        return free + max(0, cache)

    def synchronize(self) -> None:
        self._cuda.synchronize(self.index)

    def cleanup(self) -> None:
        gc.collect()
        self._cuda.synchronize(self.index)
        self._cuda.empty_cache()

    def ballast(self, meter: MemoryMeter, nbytes: int) -> torch.Tensor:
        # Cached blocks would absorb part of the ballast; give them back first so that it takes
        # device memory, as another process would.
        self._cuda.empty_cache()
        return torch.empty(max(0, nbytes), dtype=torch.uint8, device=self.device)

    def timed(self, fn: Callable[[], Any]) -> float:
        start = self._cuda.Event(enable_timing=True)
        end = self._cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3


def select_platform(cuda: Any = None) -> Platform:
    """:class:`CudaPlatform` on the current CUDA device when CUDA is available, else
    :class:`SimPlatform`."""
    cuda = cuda if cuda is not None else torch.cuda
    if cuda.is_available() and int(cuda.device_count()) > 0:
        return CudaPlatform(cuda=cuda)
    return SimPlatform()
