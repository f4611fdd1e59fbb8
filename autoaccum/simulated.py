"""A simulated GPU for CPU runs and CPU tests: counts live tensor bytes and enforces a capacity.

:class:`SimulatedDevice` implements :class:`autoaccum.memory.MemoryBackend`. Inside
``device.active(tensors)`` a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every
ATen op the current thread runs (forward, the autograd engine's CPU backward, the optimizer step),
and the device counts the bytes of every tensor storage that is alive and known to it:

* the storages of ``tensors`` (parameters, gradients, optimizer state), registered once each;
* every storage an op returns as a fresh allocation (op schema without alias annotation).

A storage stops counting the moment it is freed, even if that happens after the context exited:
torch keeps a storage's Python object alive exactly as long as the storage itself, so a weakref
callback on ``tensor.untyped_storage()`` fires when the memory is released.

The op whose output would push the count past ``capacity_bytes`` raises
:class:`torch.OutOfMemoryError` right after it ran; its output is never counted and is freed when
the exception is cleared. ``capacity_bytes`` and ``slowdown`` may be changed at any time, from any
thread, also from inside a forward pass; a new capacity applies from the next allocation on.

Sharded tensors count at their local size: a DTensor's bytes are those of its local shard on this
rank. FSDP2 allocates and frees its unsharded parameters by resizing storages, which no op reports:
the device wraps FSDP2's two helpers for that, so gathered parameters count while they are
gathered (and a gather that would pass the capacity raises, as on a GPU).

Limits: memory that no op reports is invisible: kernel workspaces, allocations in other threads
(e.g. data-loader workers), storages created without an ATen op (``torch.from_numpy``, unpickling)
and tensors created before ``active`` unless passed in as ``tensors``. Inputs that are already on
the CPU are not "copied to the device", so a CPU batch is not counted. Resizes of a counted storage
are seen only when done by an op that writes to it (``resize_``, ``out=``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SimulatedDevice"]

# How each return of an op is treated.
_FRESH = 0  # a new allocation: count its storage if it is not counted yet
_VIEW = 1  # aliases an input without writing it: nothing to do
_WRITTEN = 2  # an input written in place (in-place op, ``out=``): it may have been resized

# Ops whose schema says "fresh" but whose output shares storage with an input, or the reverse.
_ALIASING_WITHOUT_ANNOTATION = frozenset({"aten::_unsafe_view"})
_FRESH_DESPITE_ANNOTATION = frozenset({"aten::lift_fresh"})  # torch.tensor(...) lifts a new tensor

# Slowdown sleeps are batched: sleeping a few microseconds after every small op would oversleep.
_MIN_SLEEP_S = 1e-3

_return_kinds_cache: dict[Any, tuple[int, ...]] = {}
_devices: weakref.WeakSet[SimulatedDevice] = weakref.WeakSet()  # to tell of freed storages
_active_here = threading.local()  # .device: the device whose active() this thread is in


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor that owns this rank's memory: a DTensor's local shard, else ``tensor``."""
    return getattr(tensor, "_local_tensor", tensor)  # type: ignore[no-any-return]


def _hook_fsdp_storage() -> None:
    """Wrap FSDP2's ``alloc_storage`` / ``free_storage`` (storage resizes, not ops) once, if
    FSDP2 is loaded: an allocation counts on the device active in this thread (raising before it
    happens if it would pass the capacity); a free uncounts the storage on every device."""
    param_mod: Any = sys.modules.get("torch.distributed.fsdp._fully_shard._fsdp_param")
    if param_mod is None or getattr(param_mod.alloc_storage, "_autoaccum", False):
        return
    real_alloc, real_free = param_mod.alloc_storage, param_mod.free_storage

    def alloc_storage(tensor: torch.Tensor) -> None:
        device = getattr(_active_here, "device", None)
        if device is not None:
            device._resize(tensor.untyped_storage(), tensor.numel() * tensor.itemsize)
        real_alloc(tensor)

    def free_storage(tensor: torch.Tensor) -> None:
        real_free(tensor)
        storage = tensor.untyped_storage()
        for device in list(_devices):
            device._resized(storage)

    alloc_storage._autoaccum = free_storage._autoaccum = True  # type: ignore[attr-defined]
    param_mod.alloc_storage, param_mod.free_storage = alloc_storage, free_storage
    group_mod: Any = sys.modules.get("torch.distributed.fsdp._fully_shard._fsdp_param_group")
    if group_mod is not None and hasattr(group_mod, "alloc_storage"):
        group_mod.alloc_storage = alloc_storage


def _return_kinds(func: Any) -> tuple[int, ...]:
    """The :data:`_FRESH` / :data:`_VIEW` / :data:`_WRITTEN` kind of each return of ``func``."""
    kinds = _return_kinds_cache.get(func)
    if kinds is None:
        schema = getattr(func, "_schema", None)  # higher-order operators have none
        name = getattr(schema, "name", "")
        result = []
        # In-place collectives (c10d::allreduce_, _allgather_base_, ...) return the tensors they
        # were given, unannotated: they allocate nothing.
        in_place_collective = name.startswith("c10d::") and name.endswith("_")
        for ret in getattr(schema, "returns", ()):
            alias = ret.alias_info
            if in_place_collective:
                result.append(_VIEW)
            elif name in _FRESH_DESPITE_ANNOTATION:
                result.append(_FRESH)
            elif alias is None:
                result.append(_VIEW if name in _ALIASING_WITHOUT_ANNOTATION else _FRESH)
            else:
                result.append(_WRITTEN if alias.is_write else _VIEW)
        kinds = tuple(result)
        _return_kinds_cache[func] = kinds
    return kinds


def _dynamo_frames_seen() -> int:
    """How many code objects torch.compile has been asked to convert so far (0 when dynamo was
    never imported). It grows when a compiled function is called, also when dynamo then skips
    the frame because a dispatch mode is active: that is how a skipped compile is noticed."""
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")
    codes = getattr(getattr(convert_frame, "input_codes", None), "seen", None)
    return len(codes) if codes is not None else 0


def _format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


class _Mode(TorchDispatchMode):
    """Sees every op of the thread that entered it and reports outputs to the device."""

    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__()
        self._device = device

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        device = self._device
        if kwargs is None:
            kwargs = {}
        if device._slowdown > 1.0:
            start = time.perf_counter()
            out = func(*args, **kwargs)
            device._owe_time(time.perf_counter() - start)
        else:
            out = func(*args, **kwargs)
        kinds = _return_kinds_cache.get(func)
        if kinds is None:
            kinds = _return_kinds(func)
        if not kinds or kinds == (_VIEW,):
            return out
        if len(kinds) == 1:
            failure = device._account(out, kinds[0])
        else:
            failure = device._account_many(out, kinds)
        if failure is not None:
            del out  # the output dies with this frame, not with the traceback
            raise torch.OutOfMemoryError(failure)
        return out


class SimulatedDevice:
    """A stand-in GPU that counts live tensor bytes and raises OOM past ``capacity_bytes``.

    Guarantees:

    * ``allocated_bytes()`` is the sum of ``untyped_storage().nbytes()`` over the distinct live
      storages it knows: those of tensors passed to :meth:`active` (each storage once, however
      often and through however many views it is passed) and those allocated by ops run inside
      :meth:`active` in the entering thread. Views and in-place ops add nothing, unless they grow
      a counted storage (``resize_``, ``out=``). A storage stops counting when it is freed, also
      after the context has exited.
    * The op whose output would make ``allocated_bytes()`` exceed ``capacity_bytes`` raises
      :class:`torch.OutOfMemoryError` with a CUDA-style message and is not counted, so OOMs
      happen where a GPU would have them: in forward, half-way through backward, in the
      optimizer step. Registering resident ``tensors`` never raises.
    * ``peak_bytes()`` is the highest ``allocated_bytes()`` since :meth:`reset_peak` (or since
      construction); ``free_bytes()`` is ``max(0, capacity_bytes - allocated_bytes())``.
    * With ``slowdown = s > 1`` every op inside :meth:`active` is followed by ``(s - 1)`` times
      its measured wall time of sleep (batched into sleeps of at least 1 ms; any rest is slept
      when the context exits). ``slowdown == 1`` measures nothing and never sleeps.
    """

    def __init__(self, capacity_bytes: int, *, slowdown: float = 1.0, name: str = "simulated"):
        self._lock = threading.RLock()
        # id(storage) -> (weakref to the storage, counted bytes)
        self._live: dict[int, tuple[weakref.ref[torch.UntypedStorage], int]] = {}
        self._allocated = 0
        self._peak = 0
        self._thread = threading.local()  # .depth: nesting of active() in this thread
        self._debt_s = 0.0
        self._warned_compile = False
        self._capacity = 0
        self._slowdown = 1.0
        self.name = str(name)
        self.capacity_bytes = capacity_bytes
        self.slowdown = slowdown
        _devices.add(self)

    def __repr__(self) -> str:
        return (
            f"SimulatedDevice(capacity_bytes={self._capacity}, slowdown={self._slowdown}, "
            f"name={self.name!r})"
        )

    # -- settings -----------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        """Total bytes the device holds; may be set at any time, applies from the next op on."""
        return self._capacity

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"capacity_bytes must be an int (bytes), got {value!r}")
        if value < 0:
            raise ValueError(
                f"capacity_bytes must be an int >= 0 (bytes), got {value!r}; "
                "e.g. SimulatedDevice(capacity_bytes=64 * 2**20) for 64 MiB"
            )
        self._capacity = value

    @property
    def slowdown(self) -> float:
        """How many times slower than the host this device runs (``>= 1.0``)."""
        return self._slowdown

    @slowdown.setter
    def slowdown(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"slowdown must be a number >= 1.0, got {value!r}")
        if not math.isfinite(value) or value < 1.0:
            raise ValueError(
                f"slowdown must be a finite number >= 1.0 (1.0 = host speed), got {value!r}"
            )
        self._slowdown = float(value)

    # -- MemoryBackend --------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """``max(0, capacity_bytes - allocated_bytes())``."""
        return max(0, self._capacity - self._allocated)

    def allocated_bytes(self) -> int:
        """Bytes of the live storages counted now."""
        return self._allocated

    def reset_peak(self) -> None:
        """Start a new peak measurement at the current ``allocated_bytes()``."""
        with self._lock:
            self._peak = self._allocated

    def peak_bytes(self) -> int:
        """Highest ``allocated_bytes()`` since the last :meth:`reset_peak`."""
        return self._peak

    def release(self) -> None:
        """Collect garbage so that storages held only by reference cycles are freed."""
        gc.collect()

    @contextlib.contextmanager
    def active(self, tensors: Iterable[torch.Tensor] = ()) -> Iterator[None]:
        """Count ``tensors`` as resident and every allocation of this thread inside the block.

        Entering again later keeps the counts (a storage is never counted twice). A nested
        ``active`` of the same device in the same thread only registers its ``tensors``; each
        thread that enters ``active`` has its own allocations counted.
        """
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._register(tensor)
        local = self._thread
        if getattr(local, "depth", 0):
            local.depth += 1
            try:
                yield
            finally:
                local.depth -= 1
            return
        local.depth = 1
        compiled_before = _dynamo_frames_seen()
        _hook_fsdp_storage()
        outer, _active_here.device = getattr(_active_here, "device", None), self
        try:
            with _Mode(self):
                yield
        finally:
            _active_here.device = outer
            local.depth = 0
            self.synchronize()
            if not self._warned_compile and _dynamo_frames_seen() > compiled_before:
                self._warned_compile = True
                message = (
                    "torch.compile'd code ran eagerly while SimulatedDevice counted memory: dynamo "
                    "does not compile under a TorchDispatchMode (the simulator's), so the "
                    "simulated run is not compiled and its memory figures are those of eager "
                    "mode. On a GPU (CudaMemory) compiled models run compiled."
                )
                warnings.warn(message, stacklevel=3)
                logging.getLogger("autoaccum").warning(message)

    def synchronize(self) -> None:
        """Pay the slowdown still owed (sleeps are batched), like waiting for a GPU to finish."""
        debt, self._debt_s = self._debt_s, 0.0
        if debt > 0.0:
            time.sleep(debt)

    # -- internals ------------------------------------------------------------------------------

    def _register(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage as resident (no capacity check), once."""
        try:
            storage = _local(tensor).untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            return
        if storage.device.type == "meta":
            return
        with self._lock:
            if id(storage) not in self._live:
                self._track(storage, storage.nbytes())

    def _track(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        key = id(storage)
        forget: Callable[[object], None] = functools.partial(self._forget, key)
        self._live[key] = (weakref.ref(storage, forget), nbytes)
        self._allocated += nbytes
        self._peak = max(self._peak, self._allocated)

    def _forget(self, key: int, _ref: object) -> None:
        """Weakref callback: the storage ``key`` was freed."""
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self._allocated -= entry[1]

    def _account(self, out: Any, kind: int) -> str | None:
        """Count the storages ``out`` (a return of an op) allocated; an OOM message if over."""
        if isinstance(out, torch.Tensor):
            outs: Iterable[Any] = (out,)
        elif isinstance(out, list | tuple):
            outs = out
        else:
            return None
        new: list[torch.UntypedStorage] = []
        grown: list[tuple[torch.UntypedStorage, int]] = []
        live = self._live
        for tensor in outs:
            if not isinstance(tensor, torch.Tensor):
                continue
            if type(tensor) is not torch.Tensor:  # a DTensor counts its local shard
                tensor = _local(tensor)
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            entry = live.get(id(storage))
            if entry is None:
                if kind == _FRESH and storage.device.type != "meta":
                    new.append(storage)
            elif kind == _WRITTEN and storage.nbytes() != entry[1]:
                grown.append((storage, entry[1]))
        if not new and not grown:
            return None
        return self._commit(new, grown)

    def _account_many(self, out: Any, kinds: tuple[int, ...]) -> str | None:
        """:meth:`_account` for an op with several returns (all-or-nothing per return)."""
        if not isinstance(out, tuple) or len(out) != len(kinds):
            return None
        for value, kind in zip(out, kinds, strict=True):
            if kind != _VIEW:
                failure = self._account(value, kind)
                if failure is not None:
                    return failure
        return None

    def _commit(
        self, new: list[torch.UntypedStorage], grown: list[tuple[torch.UntypedStorage, int]]
    ) -> str | None:
        """Count ``new`` storages and resized ``grown`` ones, or return why that would OOM."""
        with self._lock:
            sizes: dict[int, int] = {}
            for storage in new:
                if id(storage) not in self._live:
                    sizes[id(storage)] = storage.nbytes()
            extra = sum(sizes.values())
            extra += sum(storage.nbytes() - old for storage, old in grown)
            if extra > 0 and self._allocated + extra > self._capacity:
                return self._oom_message(extra)
            for storage in new:
                nbytes = sizes.pop(id(storage), None)
                if nbytes is not None:  # empty storages too: an ``out=`` op may grow them
                    self._track(storage, nbytes)
            for storage, old in grown:
                key = id(storage)
                entry = self._live.get(key)
                if entry is not None:
                    nbytes = storage.nbytes()
                    self._live[key] = (entry[0], nbytes)
                    self._allocated += nbytes - old
                    self._peak = max(self._peak, self._allocated)
        return None

    def _resize(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """``storage`` is about to be resized to ``nbytes`` (FSDP gathering a unit): count it,
        or raise the OOM a GPU would raise, before anything happens."""
        with self._lock:
            entry = self._live.get(id(storage))
            extra = nbytes - (entry[1] if entry is not None else 0)
            if extra > 0 and self._allocated + extra > self._capacity:
                raise torch.OutOfMemoryError(self._oom_message(extra))
            if entry is None:
                self._track(storage, nbytes)
                return
            self._live[id(storage)] = (entry[0], nbytes)
            self._allocated += extra
            self._peak = max(self._peak, self._allocated)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """``storage`` was resized without an op (FSDP freeing a unit): count its new size."""
        with self._lock:
            entry = self._live.get(id(storage))
            if entry is not None and entry[0]() is storage and storage.nbytes() != entry[1]:
                self._allocated += storage.nbytes() - entry[1]
                self._live[id(storage)] = (entry[0], storage.nbytes())

    def _oom_message(self, requested: int) -> str:
        where = (
            "simulated device" if self.name == "simulated" else f"simulated device {self.name!r}"
        )
        return (
            # Worded like PyTorch's CUDA message, so tools that match it (Accelerate) see an OOM.
            f"CUDA out of memory. Tried to allocate {_format_bytes(requested)} (simulated). "
            f"{where} has a total capacity of {_format_bytes(self._capacity)} of which "
            f"{_format_bytes(self.free_bytes())} is free. "
            f"{_format_bytes(self._allocated)} is allocated by live tensors counted by this device "
            f"(peak {_format_bytes(self._peak)}). Use a smaller micro-batch, free tensors that "
            "are no longer needed, or raise SimulatedDevice.capacity_bytes."
        )

    def _owe_time(self, elapsed_s: float) -> None:
        """Add ``(slowdown - 1) * elapsed_s`` of sleep; sleep once at least 1 ms is owed."""
        debt = self._debt_s + (self._slowdown - 1.0) * elapsed_s
        if debt >= _MIN_SLEEP_S:
            start = time.perf_counter()
            time.sleep(debt)
            debt -= time.perf_counter() - start  # an oversleep is credited to later ops
        self._debt_s = debt
