"""SimulatedDevice: exact byte accounting, OOM where a GPU would have it, and slowdown."""

from __future__ import annotations

import gc
import time

import pytest
import torch
from torch import nn

from autoaccum.memory import MemoryBackend
from autoaccum.simulated import SimulatedDevice

F32 = 4
GIB = 1 << 30


def storage_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)
    )


def test_is_a_memory_backend() -> None:
    assert isinstance(SimulatedDevice(GIB), MemoryBackend)


def test_allocations_views_and_frees_are_counted_exactly() -> None:
    dev = SimulatedDevice(GIB)
    with dev.active([]):
        assert dev.allocated_bytes() == 0
        a = torch.empty(1000)  # 4000 bytes
        assert dev.allocated_bytes() == 4000
        b = torch.zeros(250, dtype=torch.float64)  # 2000 bytes
        assert dev.allocated_bytes() == 6000
        v1, v2, v3 = a[10:20], a.view(10, 100), a.t() if a.dim() == 2 else a.unsqueeze(0)
        a.add_(1.0)
        v2.mul_(2.0)
        assert dev.allocated_bytes() == 6000  # views and in-place ops allocate nothing
        c = a * 2  # a fresh result: 4000 bytes
        assert dev.allocated_bytes() == 10000
        del b
        assert dev.allocated_bytes() == 8000
        del a  # its views keep the storage alive
        assert dev.allocated_bytes() == 8000
        del v1, v2, v3
        assert dev.allocated_bytes() == 4000
        del c
        assert dev.allocated_bytes() == 0
    assert dev.peak_bytes() == 10000


def test_torch_tensor_and_out_resize_are_counted() -> None:
    dev = SimulatedDevice(GIB)
    with dev.active([]):
        t = torch.tensor([1.0, 2.0, 3.0])  # built outside the dispatcher, then lifted
        assert dev.allocated_bytes() == 3 * F32
        out = torch.empty(0)
        torch.add(t, t, out=out)  # resizes out's storage to 12 bytes
        assert dev.allocated_bytes() == 2 * 3 * F32
        del t, out
        assert dev.allocated_bytes() == 0


def test_resident_tensors_count_once_across_views_and_calls() -> None:
    dev = SimulatedDevice(GIB)
    lin = nn.Linear(32, 16)
    expected = (32 * 16 + 16) * F32
    with dev.active([lin.weight, lin.weight, lin.bias]):
        assert dev.allocated_bytes() == expected
    with dev.active([lin.weight[0], lin.bias.view(4, 4), *lin.parameters()]):
        assert dev.allocated_bytes() == expected
        with dev.active(lin.parameters()):  # nested: registers only
            assert dev.allocated_bytes() == expected
    assert dev.allocated_bytes() == expected  # still alive after the context
    del lin
    gc.collect()
    assert dev.allocated_bytes() == 0


def test_storage_freed_after_the_context_stops_counting() -> None:
    dev = SimulatedDevice(GIB)
    with dev.active([]):
        kept = torch.ones(100)
    assert dev.allocated_bytes() == 100 * F32
    outside = torch.ones(1000)  # allocated outside: not seen
    assert dev.allocated_bytes() == 100 * F32
    del kept, outside
    assert dev.allocated_bytes() == 0


def test_peak_is_the_high_water_mark_since_reset() -> None:
    dev = SimulatedDevice(GIB)
    with dev.active([]):
        a = torch.empty(1000)
        b = torch.empty(3000)
        del b
        assert dev.peak_bytes() == 16000
        dev.reset_peak()
        assert dev.peak_bytes() == 4000  # the current allocation
        c = torch.empty(500)
        assert dev.peak_bytes() == 6000
        del a, c
        assert dev.peak_bytes() == 6000
        assert dev.allocated_bytes() == 0


def test_free_bytes_is_capacity_minus_allocated_clamped_at_zero() -> None:
    dev = SimulatedDevice(10_000)
    assert dev.free_bytes() == 10_000
    with dev.active([]):
        a = torch.empty(1000)
        assert dev.free_bytes() == 6000
        dev.capacity_bytes = 1000  # someone else took memory
        assert dev.free_bytes() == 0
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(1)
        dev.capacity_bytes = 5000
        assert dev.free_bytes() == 1000
        del a
        assert dev.free_bytes() == 5000


def test_backward_gradients_are_counted() -> None:
    dev = SimulatedDevice(GIB)
    lin = nn.Linear(64, 32)
    params = list(lin.parameters())
    x = torch.randn(16, 64)
    with dev.active(params):
        before = dev.allocated_bytes()
        assert before == storage_bytes(*params)
        loss = lin(x).square().mean()
        loss.backward()
        grads = [p.grad for p in params]
        assert all(g is not None for g in grads)
        after = dev.allocated_bytes()
        assert after - before >= (64 * 32 + 32) * F32
        assert after == storage_bytes(*params) + storage_bytes(*grads) + storage_bytes(loss)
    del loss, grads
    lin.zero_grad(set_to_none=True)
    assert dev.allocated_bytes() == before


def test_oom_at_the_crossing_allocation_and_failed_tensor_not_counted() -> None:
    dev = SimulatedDevice(10_000)
    with dev.active([]):
        a = torch.empty(2000)  # 8000 bytes
        b = torch.empty(500)  # 2000 more: exactly the capacity, allowed
        assert dev.allocated_bytes() == dev.capacity_bytes == 10_000
        with pytest.raises(torch.OutOfMemoryError, match="out of memory") as info:
            torch.empty(1)
        assert dev.allocated_bytes() == 10_000
        message = str(info.value)
        assert "Tried to allocate 4 bytes" in message
        assert "total capacity of 9.77 KiB" in message
        del b
        c = torch.empty(400)
        assert dev.allocated_bytes() == 9600
        del a, c


def test_oom_in_forward_leaves_no_counted_bytes_behind() -> None:
    model = mlp()
    params = list(model.parameters())
    dev = SimulatedDevice(GIB)
    base = storage_bytes(*params)
    x = torch.randn(32, 64)
    dev.capacity_bytes = base + 32 * 256 * F32 + 100  # room for the first activation only
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"), dev.active(params):
        model(x)
    gc.collect()
    assert dev.allocated_bytes() == base
    assert all(p.grad is None for p in params)


def _step(dev: SimulatedDevice, model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """One forward+backward inside ``dev``; (peak after forward, peak after backward)."""
    dev.reset_peak()
    with dev.active(model.parameters()):
        loss = model(x).square().mean()
        forward_peak = dev.peak_bytes()
        loss.backward()
    return forward_peak, dev.peak_bytes()


def test_oom_half_way_through_backward_then_counter_returns_to_base() -> None:
    model = mlp()
    params = list(model.parameters())
    x = torch.randn(128, 64)
    dev = SimulatedDevice(GIB)
    base = storage_bytes(*params)
    with dev.active(params):
        assert dev.allocated_bytes() == base
    forward_peak, backward_peak = _step(dev, model, x)
    assert base < forward_peak < backward_peak
    model.zero_grad(set_to_none=True)
    assert dev.allocated_bytes() == base

    dev.capacity_bytes = (forward_peak + backward_peak) // 2
    dev.reset_peak()
    loss = None
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"), dev.active(params):
        loss = model(x).square().mean()  # forward fits ...
        assert dev.peak_bytes() == forward_peak
        loss.backward()  # ... backward does not
    assert loss is not None
    assert dev.peak_bytes() <= dev.capacity_bytes
    del loss
    model.zero_grad(set_to_none=True)
    gc.collect()
    assert dev.allocated_bytes() == base

    dev.capacity_bytes = backward_peak  # and the same step fits exactly at its peak
    model.zero_grad(set_to_none=True)
    assert _step(dev, model, x) == (forward_peak, backward_peak)


def test_capacity_lowered_inside_forward_applies_at_next_allocation() -> None:
    model = mlp()
    params = list(model.parameters())
    x = torch.randn(8, 64)
    dev = SimulatedDevice(GIB)
    with dev.active(params):
        model(x)  # fits with the original capacity
    reached: list[str] = []

    def grab_everything(*_: object) -> None:
        reached.append("hook")
        dev.capacity_bytes = dev.allocated_bytes()  # another process takes all that is free

    model[0].register_forward_hook(grab_everything)
    model[2].register_forward_pre_hook(lambda *_: reached.append("layer 2"))
    with pytest.raises(torch.OutOfMemoryError), dev.active(params):
        model(x)
    assert reached == ["hook"]  # the ReLU right after the hook failed to allocate


def test_reentering_active_keeps_counts_consistent() -> None:
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    dev = SimulatedDevice(GIB)
    x = torch.randn(16, 64)
    for _ in range(3):
        with dev.active(params):
            model(x).square().mean().backward()
        with dev.active([*params, *(p.grad for p in params), *opt.state.values()]):
            opt.step()
        opt.zero_grad(set_to_none=True)
        state = [t for s in opt.state.values() for t in s.values()]
        assert dev.allocated_bytes() == storage_bytes(*params, *state)


def test_slowdown_one_never_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sleep(_: float) -> None:
        raise AssertionError("slowdown=1.0 slept")

    monkeypatch.setattr(time, "sleep", no_sleep)
    dev = SimulatedDevice(GIB)
    m = torch.randn(128, 128)
    with dev.active([]):
        for _ in range(20):
            m = (m @ m).tanh()


def test_slowdown_times_every_op_and_owes_slowdown_minus_one_times_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every op inside ``active`` is timed and owes (s - 1) times its time; debts are paid in
    sleeps of at least 1 ms. Checked on a fake clock that a sleep advances, not on wall time, so
    a busy machine cannot make it flaky."""
    measured: list[float] = []
    dev = SimulatedDevice(GIB, slowdown=3.0)
    real_owe = dev._owe_time
    monkeypatch.setattr(dev, "_owe_time", lambda e: (measured.append(e), real_owe(e)))
    m = torch.randn(64, 64)
    with dev.active([]):
        for _ in range(10):
            (m @ m).tanh_()
    assert len(measured) >= 20 and all(e > 0 for e in measured)  # every op was timed

    clock = {"t": 0.0}
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock["t"] += seconds

    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(time, "sleep", sleep)
    dev = SimulatedDevice(GIB, slowdown=3.0)
    for _ in range(10):
        dev._owe_time(4e-4)  # each op took 0.4 ms: 0.8 ms owed
    assert all(s >= 1e-3 for s in slept) and len(slept) == 5  # batched: every other op
    assert sum(slept) + dev._debt_s == pytest.approx(10 * 8e-4)
    dev.synchronize()  # what is still owed is paid when the device is waited for
    assert sum(slept) == pytest.approx(10 * 8e-4) and dev._debt_s == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"capacity_bytes": -1}, ValueError),
        ({"capacity_bytes": 1.5}, TypeError),
        ({"capacity_bytes": 10, "slowdown": 0.5}, ValueError),
        ({"capacity_bytes": 10, "slowdown": float("inf")}, ValueError),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, float], error: type[Exception]) -> None:
    with pytest.raises(error):
        SimulatedDevice(**kwargs)  # type: ignore[arg-type]
