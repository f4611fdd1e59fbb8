"""Double faults: exceptions anywhere, replays that fail, checkpoints restored in place or into
fresh objects. After any history the parameters equal the reference for exactly the samples the
optimizer reports consumed (float64, 1e-10)."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoaccum
from tests.helpers import (
    assert_params_close,
    make_data,
    make_model,
    mean_loss_fn,
    reference_params,
    sgd,
    slice_data,
    token_loss_fn,
)

OOM = "CUDA out of memory. Tried to allocate 20.00 MiB (injected)"


@pytest.fixture(autouse=True, params=["fast", "full"])
def driver_path(request, monkeypatch):
    monkeypatch.setattr(autoaccum.AutoAccumOptimizer, "fast_path", request.param == "fast")
    return request.param


class Injector:
    """Raises at chosen forward and backward passes (counted over the whole run): an OOM or a
    plain RuntimeError. The backward fault fires in a hook of the first layer's weight, which
    autograd reaches last, so the other gradients are already partly written."""

    def __init__(self, faults: dict[tuple[str, int], str], token: bool) -> None:
        self.faults = faults
        self.token = token
        self.count = {"f": 0, "b": 0}
        self.model: torch.nn.Module | None = None

    def attach(self, model: torch.nn.Module) -> None:
        self.model = model
        model[0].weight.register_hook(self._hook)

    def _fire(self, where: str) -> None:
        self.count[where] += 1
        kind = self.faults.get((where, self.count[where]))
        if kind == "oom":
            raise torch.OutOfMemoryError(OOM)
        if kind == "error":
            raise RuntimeError(f"injected error in {where} #{self.count[where]}")

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        self._fire("b")
        return grad

    def __call__(self, batch):
        self._fire("f")
        assert self.model is not None
        return (token_loss_fn(self.model) if self.token else mean_loss_fn(self.model))(batch)


def fresh_copy(model, opt, micro):
    """New model and optimizer objects restored from a checkpoint made with torch.save."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only=True: the default
    new_model = make_model()
    new_model.load_state_dict(saved["model"])
    new_opt = autoaccum.AutoAccumOptimizer(sgd(new_model.parameters()),
                                           target_batch_size=opt.target_batch_size,
                                           micro_batch_size=micro)
    new_opt.load_state_dict(saved["opt"])
    return new_model, new_opt


def feed(opt, fn, data, lo, hi, kept, retry: bool, attempts: int = 50) -> None:
    """Offer samples [lo, hi); after an exception keep what it says was consumed and retry the
    rest (or drop it)."""
    for _ in range(attempts):
        try:
            opt.step(fn, slice_data(data, lo, hi))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            consumed = exc.autoaccum_consumed
            assert consumed == opt.last_call_consumed
            assert 0 <= consumed <= hi - lo
            kept.extend(range(lo, lo + consumed))
            lo += consumed
            if not retry or lo == hi:
                return
            continue
        kept.extend(range(lo, hi))
        return
    raise AssertionError("the call never succeeded")


def flush(opt, fn, attempts: int = 50) -> None:
    for _ in range(attempts):
        try:
            opt.flush(fn)
            return
        except (RuntimeError, torch.OutOfMemoryError):
            continue
    raise AssertionError("flush never succeeded")


def check_invariant(model, opt) -> None:
    """.grad is all-or-nothing: cleared whenever samples wait for a replay."""
    if opt.replay_samples == opt.pending_samples and opt.pending_samples:
        assert all(p.grad is None for p in model.parameters())


def reference_for(data, kept, target, token):
    index = torch.tensor(kept, dtype=torch.long)
    picked = {
        "x": data["x"][index],
        "t": type(data["t"])(data["t"].y[index], data["t"].mask[index]),
        "note": data["note"],
    }
    return reference_params(picked, target, token, sgd)


@st.composite
def histories(draw):
    target = draw(st.integers(2, 12))
    n = draw(st.integers(1, 40))
    sizes, left = [], n
    while left:
        s = draw(st.integers(1, min(left, 2 * target + 3)))
        sizes.append(s)
        left -= s
    micro = draw(st.integers(1, target))
    token = draw(st.booleans())
    faults = draw(st.dictionaries(
        st.tuples(st.sampled_from("fb"), st.integers(1, 30)),
        st.sampled_from(["oom", "error"]), max_size=6,
    ))
    roundtrips = draw(st.dictionaries(st.integers(0, len(sizes)), st.sampled_from(
        ["in place", "fresh"]), max_size=2))
    retry = draw(st.booleans())
    return n, target, sizes, micro, token, faults, roundtrips, retry


# CI runs a bounded number of histories; benchmarks/fuzz_faults.py runs many more.
EXAMPLES = int(os.environ.get("AUTOACCUM_FUZZ_EXAMPLES", "40"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_any_history_of_faults_and_checkpoints_is_exact(history):
    n, target, sizes, micro, token, faults, roundtrips, retry = history
    data = make_data(n)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=target,
                                       micro_batch_size=micro)
    fn = Injector(faults, token)
    fn.attach(model)
    kept: list[int] = []
    lo = 0
    for call, size in enumerate(sizes):
        feed(opt, fn, data, lo, lo + size, kept, retry)
        check_invariant(model, opt)
        lo += size
        how = roundtrips.get(call)
        if how == "in place":
            opt.load_state_dict(opt.state_dict())
        elif how == "fresh":
            model, opt = fresh_copy(model, opt, micro)
            fn.attach(model)
    flush(opt, fn)
    assert opt.pending_samples == 0
    assert opt.optimizer_steps == math.ceil(len(kept) / target)
    assert_params_close(list(model.parameters()), reference_for(data, kept, target, token))


@pytest.mark.parametrize("where", ["f", "b"])
@pytest.mark.parametrize("position", range(1, 13))
def test_retrying_the_unconsumed_rest_is_exact_wherever_the_call_fails(where, position):
    """Loader batches of 10, target 16, micro-batches of 4: a failure at every micro-batch
    position of four calls, including right after a step boundary inside a call."""
    data = make_data(40)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=4)
    fn = Injector({(where, position): "error"}, token=False)
    fn.attach(model)
    kept: list[int] = []
    failures = 0
    for lo in range(0, 40, 10):
        before = len(kept)
        feed(opt, fn, data, lo, lo + 10, kept, retry=True)
        failures += len(kept) != before + 10
    opt.flush()
    assert kept == list(range(40)) and failures == 0
    assert_params_close(list(model.parameters()), reference_params(data, 16, False, sgd))


def test_consumed_counts_the_steps_a_failing_call_completed():
    """Target 16 from calls of 10: the second call completes step 1 (6 samples) and fails in
    step 2's first micro-batch. Those 6 are consumed; the 4 others are dropped."""
    data = make_data(30)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=4)
    fn = Injector({("f", 6): "error"}, token=False)  # 10 = 4+4+2, then 6 = 4+2, then 4
    fn.attach(model)
    opt.step(fn, slice_data(data, 0, 10))
    with pytest.raises(RuntimeError, match="injected") as info:
        opt.step(fn, slice_data(data, 10, 20))
    assert info.value.autoaccum_consumed == 6 and opt.optimizer_steps == 1
    assert any("6 of this call's samples" in note for note in info.value.__notes__)
    assert opt.pending_samples == 0
    opt.step(fn, slice_data(data, 16, 30))  # the unconsumed rest, then more
    opt.flush()
    assert_params_close(list(model.parameters()), reference_params(data, 16, False, sgd))


def test_a_failing_replay_leaves_no_partial_gradient():
    """A call fails after its first micro-batches ran backward; the next call's replay of the
    earlier samples fails too, in a gradient hook. Nothing is counted twice."""
    data = make_data(32)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=32,
                                       micro_batch_size=4)
    # Call 1: 8 samples (backward #1, #2). Call 2 fails at its second forward (#4) after one
    # backward (#3). Call 3 replays call 1 first: its second backward (#5) fails.
    fn = Injector({("f", 4): "error", ("b", 5): "error"}, token=False)
    fn.attach(model)
    kept: list[int] = []
    feed(opt, fn, data, 0, 8, kept, retry=False)
    feed(opt, fn, data, 8, 16, kept, retry=False)
    assert kept == list(range(8)) and opt.replay_samples == 8
    assert all(p.grad is None for p in model.parameters())
    feed(opt, fn, data, 8, 16, kept, retry=False)
    assert opt.replay_samples == 8 and all(p.grad is None for p in model.parameters())
    feed(opt, fn, data, 8, 32, kept, retry=False)
    assert kept == list(range(32)) and opt.optimizer_steps == 1
    assert_params_close(list(model.parameters()), reference_params(data, 32, False, sgd))


def test_flush_after_a_restored_checkpoint_survives_a_failing_replay():
    data = make_data(12)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=4)
    opt.step(mean_loss_fn(model), slice_data(data, 0, 12))
    model, opt = fresh_copy(model, opt, 4)
    fn = Injector({("f", 2): "error"}, token=False)
    fn.attach(model)
    with pytest.raises(RuntimeError, match="injected"):
        opt.flush(fn)
    assert opt.pending_samples == 12  # nothing dropped: the samples are not flush()'s own
    assert opt.flush(fn)
    assert opt.optimizer_steps == 1
    assert_params_close(list(model.parameters()), reference_params(data, 16, False, sgd))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("only_second", [False, True], ids=["every", "second-micro-batch"])
def test_bad_num_items_cost_only_the_failing_call(bad, as_tensor, only_second):
    data = make_data(24)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=24,
                                       micro_batch_size=4)
    good = token_loss_fn(model)
    opt.step(good, slice_data(data, 0, 8))

    seen = []

    def bad_fn(batch):  # the first micro-batch's output is checked in full, later ones per call
        loss_sum, items = good(batch)
        seen.append(1)
        if only_second and len(seen) != 2:
            return loss_sum, (torch.tensor(items) if as_tensor else items)
        return loss_sum, (torch.tensor(bad) if as_tensor else bad)

    with pytest.raises(ValueError, match="num_items"):
        opt.step(bad_fn, slice_data(data, 8, 16))
    assert opt.pending_samples == 8  # the earlier call's samples stay
    opt.step(good, slice_data(data, 8, 24))
    assert opt.optimizer_steps == 1
    assert_params_close(list(model.parameters()), reference_params(data, 24, True, sgd))


def test_an_oom_computing_the_returned_loss_reports_what_it_consumed(monkeypatch):
    data = make_data(24)
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=4)
    real_stack = torch.stack
    calls = {"n": 0}

    def failing_stack(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError(OOM)
        return real_stack(*args, **kwargs)

    monkeypatch.setattr(torch, "stack", failing_stack)
    with pytest.raises(torch.OutOfMemoryError) as info:
        opt.step(mean_loss_fn(model), slice_data(data, 0, 20))
    assert info.value.autoaccum_consumed == 16 and opt.optimizer_steps == 1
    assert opt.pending_samples == 0  # the 4 samples after the step were dropped
    opt.step(mean_loss_fn(model), slice_data(data, 16, 24))  # retry with the rest
    opt.flush()
    assert_params_close(list(model.parameters()), reference_params(data, 16, False, sgd))


def test_checkpoints_hold_only_the_pending_samples_bytes():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8)
    big = torch.randn(100_000, 5, dtype=torch.float64)
    opt.step(lambda b: model(b).pow(2).mean(), big[:4])
    saved = opt.state_dict()["autoaccum"]["pending"][0]["leaves"][0]
    assert saved.shape == (4, 5)
    assert saved.untyped_storage().nbytes() == 4 * 5 * 8


def test_a_loader_that_refills_its_buffer_in_place_is_caught_before_a_replay():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=8,
                                       micro_batch_size=2)
    buffer = make_data(4)
    fn = Injector({("b", 3): "oom"}, token=False)  # the next call's first backward
    fn.attach(model)
    opt.step(fn, buffer)
    buffer["x"].add_(1.0)  # the loader writes the next batch into the same tensor
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step(fn, make_data(4, seed=5))  # the OOM's replay would use the new contents


def test_load_state_dict_is_atomic():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=16,
                                       micro_batch_size=4)
    opt.step(mean_loss_fn(model), make_data(8))
    state = opt.state_dict()
    broken = dict(state)
    broken["autoaccum"] = {**state["autoaccum"], "policy": {"limit": 4, "bogus": 1}}
    before = (opt.policy.state_dict(), opt.pending_samples, opt.optimizer.state_dict()["state"])
    with pytest.raises(ValueError):
        opt.load_state_dict(broken)
    after = (opt.policy.state_dict(), opt.pending_samples, opt.optimizer.state_dict()["state"])
    assert str(before) == str(after)


def test_repr_and_plan_stay_small_for_a_huge_target():
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=10**12,
                                       micro_batch_size=1)
    assert "target_batch_size=1000000000000" in repr(opt)
    plan = opt.plan
    assert plan.accumulation_steps == 10**12 and len(plan.micro_batch_sizes) == 10**12
    assert plan.micro_batch_sizes[-1] == 1 and "..." in repr(plan.micro_batch_sizes)
