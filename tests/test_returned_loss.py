"""What ``step()`` returns, and what the fast path costs per micro-batch in ops.

The returned loss is built from the raw micro-batch losses the fast path keeps (their backward is
seeded with the weight), from the weighted ones the full path records, or from both after a
recovery; each way must give the call's mean loss. With ``lr=0`` the weights never move, so the
expected value is the loss of the call's samples under the initial model.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import autoaccum
from tests.helpers import loader, make_data, make_model, mean_loss_fn, token_loss_fn
from tests.test_oom import Faults


@pytest.fixture(autouse=True, params=["fast", "full"])
def driver_path(request, monkeypatch):
    monkeypatch.setattr(autoaccum.AutoAccumOptimizer, "fast_path", request.param == "fast")
    return request.param


def frozen(target, micro):
    model = make_model()
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                       target_batch_size=target, micro_batch_size=micro)
    return model, opt


def expected_loss(batch, token):
    with torch.no_grad():
        if token:
            loss_sum, items = token_loss_fn(make_model())(batch)
            return loss_sum / items
        return mean_loss_fn(make_model())(batch)


@pytest.mark.parametrize("token", [False, True], ids=["mean", "token"])
@pytest.mark.parametrize(
    "target, micro, sizes",
    [
        (64, 3, [10]),  # one call, unequal micro-batches (4, 3, 3), step not full
        (10, 4, [10, 10]),  # each call exactly one step
        (8, 3, [20, 4]),  # a call spanning three steps (8 + 8 + 4), then one finishing it
        (10, 4, [6, 7, 7]),  # calls cut across step boundaries
    ],
)
def test_returned_loss_is_the_calls_mean(target, micro, sizes, token):
    model, opt = frozen(target, micro)
    loss_fn = token_loss_fn(model) if token else mean_loss_fn(model)
    for batch in loader(make_data(sum(sizes)), sizes):
        loss = opt.step(loss_fn, batch)
        assert not loss.requires_grad
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss.reshape(()), expected_loss(batch, token), rtol=1e-12,
                                   atol=0)


@pytest.mark.parametrize("token", [False, True], ids=["mean", "token"])
@pytest.mark.parametrize("faults, ooms", [
    ({"forward_at": [3]}, 1),  # raw losses of two micro-batches, then weighted ones
    ({"forward_at": [3], "backward_at": [4]}, 2),  # a partial gradient: everything replays
], ids=["forward", "forward-then-backward"])
def test_returned_loss_after_an_oom_in_the_middle_of_a_call(token, faults, ooms):
    """The fast path's raw losses of the micro-batches before the OOM and the full path's
    weighted ones after it make one mean (and a replayed micro-batch counts once)."""
    model, opt = frozen(24, 8)
    fn = Faults(model, token=token, **faults)
    batch = loader(make_data(24), [24])[0]
    loss = opt.step(fn, batch)
    assert opt.oom_events == ooms
    assert opt.optimizer_steps == 1
    torch.testing.assert_close(loss.reshape(()), expected_loss(batch, token), rtol=1e-12, atol=0)


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _ops(run):
    with _OpCount() as counter:
        run()
    return counter.ops


def test_fast_path_runs_no_op_of_its_own_per_micro_batch(driver_path):
    """Per micro-batch the fast path dispatches exactly what the user's forward and a seeded
    backward dispatch (no scaling op, no ones_like, no detach); the full path is not bound to
    that (it records a detached weighted loss per micro-batch)."""
    data = make_data(64)
    batch = loader(data, [64])[0]

    def per_micro_batch_ops(micro_a, micro_b, run):
        a, b = run(micro_a), run(micro_b)
        return (a - b) / (64 // micro_a - 64 // micro_b)

    def wrapped(micro):
        model, opt = frozen(64, micro)
        loss_fn = mean_loss_fn(model)
        opt.step(loss_fn, batch)  # the seeds and weights are made here
        return _ops(lambda: opt.step(loss_fn, batch))

    def seeded_loop(micro):
        model = make_model()
        loss_fn = mean_loss_fn(model)
        parts = loader(data, [micro] * (64 // micro))
        seed = torch.ones((), dtype=torch.float64) * (micro / 64)

        def run():
            for part in parts:
                loss_fn(part).backward(seed)

        return _ops(run)

    def hand_loop(micro):
        model = make_model()
        loss_fn = mean_loss_fn(model)
        parts = loader(data, [micro] * (64 // micro))

        def run():
            for part in parts:
                (loss_fn(part) * (micro / 64)).backward()

        return _ops(run)

    floor = per_micro_batch_ops(8, 16, seeded_loop)
    assert per_micro_batch_ops(8, 16, hand_loop) >= floor + 2  # the test can tell ops apart
    ours = per_micro_batch_ops(8, 16, wrapped)
    if driver_path == "fast":
        assert ours == floor
    else:
        assert ours > floor


def test_seeded_backward_gives_the_hand_loops_gradient_bit_for_bit():
    model, opt = frozen(64, 8)
    data = make_data(64)
    opt.optimizer.param_groups[0]["lr"] = 1.0
    hand = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(mean_loss_fn(model), loader(data, [64])[0])
    for part in loader(data, [8] * 8):
        (mean_loss_fn(hand)(part) * (8 / 64)).backward()
    for b, p, h in zip(before, model.parameters(), hand.parameters(), strict=True):
        assert torch.equal(p, b.add(h.grad, alpha=-1.0))  # what SGD(lr=1) does with it



class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("token", [False, True], ids=["mean", "token"])
def test_settled_calls_copy_no_host_data_to_the_device(token):
    """A tensor made from host numbers (torch.tensor(list)) is a blocking copy on CUDA. Once the
    weights are cached, no call makes one, also a call spanning several steps."""
    model, opt = frozen(8, 3)
    loss_fn = token_loss_fn(model, as_tensor=True) if token else mean_loss_fn(model)
    batches = loader(make_data(60), [20, 20, 20])
    opt.step(loss_fn, batches[0])  # the seeds and weights are made here
    with _OpNames() as seen:
        opt.step(loss_fn, batches[1])
    assert "lift_fresh" not in seen.names
    assert "stack" in seen.names  # the mode sees the driver's ops
