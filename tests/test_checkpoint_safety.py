"""A checkpoint is data (issue 27, guarantee 4).

Loading autoaccum's entry of a checkpoint imports and calls nothing the file names: restored
samples take their container types from the next live batch of the same structure, or run as plain
stand-ins. Every field is validated before anything changes; a bad one raises a ``TypeError`` or
``ValueError`` naming the field, and leaves the optimizer, the inner optimizer, the model and the
gradients exactly as they were. Any structural mutant of a valid checkpoint either loads and trains
exactly like the original (float64, 1e-10 against one batch per step) or raises that way.
"""

from __future__ import annotations

import collections
import copy
import importlib
import io
import sys
import warnings
from collections import namedtuple
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoaccum
from tests.helpers import (
    Targets,
    assert_params_close,
    loader,
    make_data,
    make_model,
    mean_loss_fn,
    reference_params,
    sgd,
)

Batch = namedtuple("Batch", ["x", "t", "note"])
CALLS = [10, 10, 10, 18]  # after 3 calls: 14 samples of step 2 pending, from two calls
TARGET, MICRO = 16, 3


def as_kind(kind: str, batch: dict[str, Any]) -> Any:
    if kind == "namedtuple":
        return Batch(**batch)
    if kind == "UserDict":
        return collections.UserDict(batch)
    return batch


def loss_fn_for(model, seen=None):
    inner = mean_loss_fn(model)

    def loss_fn(b):
        if seen is not None:
            seen.append(type(b))
        fields = b._asdict() if isinstance(b, tuple) else b
        t = fields["t"]
        return inner({"x": fields["x"], "t": Targets(t[0], t[1]), "note": "non-tensor leaf"})

    return loss_fn


def build(seed=0):
    model = make_model(seed)
    opt = autoaccum.AutoAccumOptimizer(sgd(model.parameters()), target_batch_size=TARGET,
                                       micro_batch_size=MICRO)
    return model, opt


def saved_mid_step(kind="dict"):
    """A checkpoint taken with 14 samples pending, round-tripped through torch.save and the
    default (weights_only) torch.load, and the batches of the run."""
    data = make_data(sum(CALLS))
    batches = [as_kind(kind, b) for b in loader(data, CALLS)]
    model, opt = build()
    loss_fn = loss_fn_for(model)
    for b in batches[:3]:
        opt.step(loss_fn, b)
    assert opt.pending_samples == 14
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer), batches, data


def resume(saved, batches, seen=None):
    model, opt = build(seed=7)  # other initial weights: everything must come back
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    loss_fn = loss_fn_for(model, seen)
    opt.step(loss_fn, batches[3])
    opt.flush()
    return model, opt


def params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def canary(tmp_path, monkeypatch):
    """A module on sys.path that records being imported, and a class in it that records being
    called; plus a record of every importlib.import_module call. The test fails if either ran."""
    flag = tmp_path / "canary-ran"
    (tmp_path / "autoaccum_canary_mod.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(flag)!r}).write_text('imported')\n"
        "class Boom(dict):\n"
        "    def __init__(self, *args, **kwargs):\n"
        f"        pathlib.Path({str(flag)!r}).write_text('called')\n"
        "        super().__init__(*args, **kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    imported: list[str] = []
    real = importlib.import_module

    def recording(name, package=None):
        imported.append(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", recording)
    yield "autoaccum_canary_mod:Boom", flag, imported
    assert not flag.exists(), f"the checkpoint ran code: the canary was {flag.read_text()}"
    assert "autoaccum_canary_mod" not in sys.modules
    assert not [n for n in imported if "canary" in n or n in ("subprocess", "os")], imported


# ============================================================ 1. nothing named is run
def test_the_subprocess_run_structure_runs_no_command(tmp_path, canary):
    """The reported exploit: a pending structure edited to ``subprocess:run`` with the command
    in its keys, loadable with weights_only=True. Restoring calls nothing: the samples become a
    plain dict, and the user's loss_fn (which expects other keys) fails on its own."""
    saved, batches, _ = saved_mid_step("UserDict")
    marker = tmp_path / "pwned"
    chunk = saved["opt"]["autoaccum"]["pending"][0]
    x = chunk["leaves"][0]
    chunk["leaves"] = [x, x.clone()]
    chunk["structure"] = ["mapping", "subprocess:run", ["touch", str(marker)],
                          [["tensor"], ["tensor"]]]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # still passes the safe loader
    model, opt = build(seed=7)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    seen: list[Any] = []

    def loss_fn(b):
        seen.append(b)
        return mean_loss_fn(model)(b)  # expects "x": a KeyError on the attacker's dict

    with pytest.warns(UserWarning, match="stand-in containers"), pytest.raises(KeyError):
        opt.step(loss_fn, batches[3])
    assert not marker.exists()
    assert type(seen[0]) is dict and set(seen[0]) == {"touch", str(marker)}


@pytest.mark.parametrize("kind", ["namedtuple", "UserDict"])
def test_a_type_named_by_the_checkpoint_is_never_imported_or_called(kind, canary):
    name, _, _ = canary
    saved, batches, data = saved_mid_step(kind)
    for chunk in saved["opt"]["autoaccum"]["pending"]:
        chunk["structure"][1] = name
    seen: list[type] = []
    with pytest.warns(UserWarning, match="stand-in containers"):
        model, _ = resume(saved, batches, seen)
    restored_type = seen[0]  # the stand-in; the live batch's type for the samples after it
    assert restored_type is (dict if kind == "UserDict" else autoaccum_restored_namedtuple())
    assert seen[-1] is type(batches[3])
    assert_params_close(params(model), reference_params(data, TARGET, False, sgd))


def autoaccum_restored_namedtuple():
    from autoaccum.checkpoint import _stand_in

    return _stand_in(("x", "t", "note"))


# ============================================================ 2. types come back from live data
@pytest.mark.parametrize("kind", ["dict", "namedtuple", "UserDict"])
def test_restored_samples_take_the_next_batchs_types_and_continue_exactly(kind):
    saved, batches, data = saved_mid_step(kind)
    seen: list[type] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stand-in warning: the types are known
        model, opt = resume(saved, batches, seen)
    assert seen and all(t is type(batches[3]) for t in seen)
    assert opt.optimizer_steps == 3
    assert_params_close(params(model), reference_params(data, TARGET, False, sgd))


@pytest.mark.parametrize("kind", ["namedtuple", "UserDict"])
def test_a_flush_right_after_loading_runs_stand_ins_with_a_warning_and_stays_exact(kind):
    saved, _, data = saved_mid_step(kind)
    model, opt = build(seed=7)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    seen: list[type] = []
    with pytest.warns(UserWarning, match="stand-in containers"):
        assert opt.flush(loss_fn_for(model, seen))
    stand_in = dict if kind == "UserDict" else autoaccum_restored_namedtuple()
    assert seen and all(t is stand_in for t in seen)
    assert_params_close(params(model), reference_after_partial(data))


def reference_after_partial(data):
    """One step on samples 0-15, one on 16-29 (the flushed 14)."""
    sliced = {"x": data["x"][:30], "t": Targets(data["t"].y[:30], data["t"].mask[:30]),
              "note": data["note"]}
    return reference_params(sliced, TARGET, False, sgd)


# ============================================================ 3. validation, atomic
def snapshot(model, opt):
    return {
        "params": params(model),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "inner": copy.deepcopy(opt.optimizer.state_dict()),
        "counters": (opt.optimizer_steps, opt.oom_events, opt.skipped_steps,
                     opt.pending_samples, opt.replay_samples, opt.plan),
        "policy": opt.policy.state_dict(),
        "shares": opt.share_schedule.state_dict(),
    }


def assert_same(a, b):
    for x, y in zip(a["params"] + a["grads"], b["params"] + b["grads"], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    assert repr(a["inner"]) == repr(b["inner"])
    assert a["counters"] == b["counters"]
    assert a["policy"] == b["policy"] and a["shares"] == b["shares"]


def live_mid_run():
    """A model and optimizer in the middle of their own run: gradients and samples pending."""
    data = make_data(40, seed=5)
    model, opt = build(seed=3)
    loss_fn = loss_fn_for(model)
    for b in loader(data, [16, 5]):
        opt.step(loss_fn, b)
    assert opt.pending_samples == 5 and any(p.grad is not None for p in model.parameters())
    return model, opt


def _set(path, value):
    def edit(own):
        node = own
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


def _delete(key):
    def edit(own):
        del own[key]
    return edit


BAD = [
    (_set(["version"], 99), ValueError, "version 99"),
    (_set(["version"], "2"), ValueError, "version '2'"),
    (_delete("step_size"), ValueError, r"missing fields \['step_size'\]"),
    (_set(["extra"], 1), ValueError, r"unknown fields \['extra'\]"),
    (_set(["target_batch_size"], 8), ValueError, "target_batch_size=8"),
    (_set(["optimizer_steps"], -1), ValueError, "'optimizer_steps' is -1"),
    (_set(["oom_events"], 2**70), ValueError, "'oom_events' is"),
    (_set(["skipped_steps"], 1.5), TypeError, "'skipped_steps' is float"),
    (_set(["optimizer_steps"], True), TypeError, "'optimizer_steps' is bool"),
    (_set(["token_mode"], "yes"), TypeError, "'token_mode'"),
    (_set(["last_sizes"], [0]), ValueError, "'last_sizes' is 0"),
    (_set(["last_sizes"], [16, 16]), ValueError, "'last_sizes' sums to 32"),
    (_set(["step_size"], 3), ValueError, "'step_size' is 3; expected 16"),
    (_set(["step_size"], -4), ValueError, "'step_size' is -4"),
    (_set(["pending_samples"], 13), ValueError, "'pending_samples' is 13 but"),
    (_set(["pending"], "x"), TypeError, "'pending' is a str"),
    (_set(["pending", 0, "structure"], ["mapping", "os:system", None, []]), ValueError,
     r"pending\[0\].structure\[2\]"),
    (_set(["pending", 0, "structure", 0], "module"), ValueError, "expected a list starting"),
    (_set(["pending", 0, "structure", 2], ["x", "t"]), ValueError, "expected a list of 3 keys"),
    (_set(["pending", 0, "structure", 2], ["x", "x", "note"]), ValueError, "repeats a key"),
    (_set(["pending", 0, "structure", 3, 1, 2], ["y", "__class__"]), ValueError,
     "field names"),
    (_set(["pending", 0, "structure", 1], 7), TypeError, "type name"),
    (_set(["pending", 0, "leaves", 0], [1.0]), TypeError, r"leaves\[0\]' is a list"),
    (_set(["pending", 0, "leaves", 3], torch.zeros(2)), TypeError, "a plain value"),
    (_set(["pending", 0, "leaves", 0], torch.zeros(3, 5, dtype=torch.float64)), ValueError,
     "disagree on the sample count"),
    (_set(["pending", 0, "leaves", 0], torch.zeros((), dtype=torch.float64)), ValueError,
     "dim 0 holds"),
    (_set(["pending", 0, "leaves", 0], torch.zeros(10, 5, device="meta")), ValueError,
     "is on meta"),
    (_set(["pending", 0], {"leaves": []}), TypeError, "exactly 'leaves' and 'structure'"),
    (_set(["policy", "limit"], -3), ValueError, "'policy' is malformed"),
    (_set(["policy", "observed"], [[4, float("nan")]]), ValueError, "'policy' is malformed"),
    (_set(["policy", "settled"], "no"), TypeError, "'policy' is malformed"),
    (_set(["shares", "entries"], [[0, [8]]]), ValueError, "'shares' is malformed"),
    (_set(["shares", "last_read"], "zero"), ValueError, "'shares' is malformed"),
    (_set(["shares", "entries"], [[5, [16]]]), ValueError, "no shares for step 2"),
]


@pytest.mark.parametrize("edit,error,pattern", BAD, ids=[p for _, _, p in BAD])
def test_a_bad_field_raises_naming_it_and_changes_nothing(edit, error, pattern):
    saved, _, _ = saved_mid_step("namedtuple")
    state = saved["opt"]
    edit(state["autoaccum"])
    model, opt = live_mid_run()
    before = snapshot(model, opt)
    with pytest.raises(error, match=pattern):
        opt.load_state_dict(state)
    assert_same(before, snapshot(model, opt))
    opt.step(loss_fn_for(model), loader(make_data(40, seed=5), [16, 5, 11])[2])  # still usable
    assert opt.optimizer_steps == 2 and opt.pending_samples == 0


def test_an_entry_that_is_not_a_dict_raises_and_changes_nothing():
    saved, _, _ = saved_mid_step()
    model, opt = live_mid_run()
    before = snapshot(model, opt)
    for bad in ([], "autoaccum", 3):
        with pytest.raises(TypeError, match="'autoaccum' is a"):
            opt.load_state_dict({**saved["opt"], "autoaccum": bad})
    with pytest.raises(TypeError, match="got list"):
        opt.load_state_dict([])  # type: ignore[arg-type]
    assert_same(before, snapshot(model, opt))


# ============================================================ 4. any mutant: exact, or refused
def _paths(node, path=()):
    """Every position in the entry a mutation can hit (tensor leaves' values are the samples
    themselves, data the file is trusted to hold, as are dict keys; their shapes are not)."""
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


def _is_keys(path):
    """A list of dict keys inside a batch structure: ``[..., "structure", ..., 2]``."""
    return "structure" in path and len(path) >= 1 and path[-1] == 2


def _get(node, path):
    for k in path:
        node = node[k]
    return node


REPLACEMENTS = [None, "subprocess:run", "autoaccum_canary_mod:Boom", "os:system", -1, 0, 1,
                2**70, 1.5, float("nan"), True, [], {}, [1], ["tensor"], ["mapping"]]


@st.composite
def mutants(draw, own):
    own = copy.deepcopy(own)
    paths = [p for p in _paths(own) if p and not _is_keys(p[:-1])
             and not ("leaves" in p and p.index("leaves") < len(p) - 2)]
    path = draw(st.sampled_from(paths))
    parent, key = _get(own, path[:-1]), path[-1]
    value = parent[key]
    op = draw(st.sampled_from(["drop", "replace", "negate", "resize", "swap", "append"]))
    if op == "drop":
        del parent[key]
    elif op == "negate" and type(value) in (int, float):
        parent[key] = -value - 1
    elif op == "resize" and isinstance(value, torch.Tensor) and value.dim() > 0:
        n = draw(st.integers(0, 2 * value.shape[0]))
        parent[key] = value.repeat_interleave(2, 0)[:n]
    elif op == "swap" and isinstance(parent, dict) and len(parent) > 1:
        other = draw(st.sampled_from(sorted(k for k in parent if k != key)))
        parent[key], parent[other] = parent[other], parent[key]
    elif op == "append" and isinstance(value, list):
        value.append(copy.deepcopy(value[-1]) if value else 1)
    else:
        op = "replace"
        choices = [None, 1.0, "x", [1.0]] if isinstance(value, torch.Tensor) else REPLACEMENTS
        parent[key] = draw(st.sampled_from(choices))
    return own, f"{op} at {list(path)}"


_SAVED, _BATCHES, _DATA = saved_mid_step("namedtuple")
_REFERENCE = reference_params(_DATA, TARGET, False, sgd)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=st.data())
def test_any_mutant_loads_and_trains_exactly_or_is_refused_with_nothing_changed(data, canary):
    own, what = data.draw(mutants(_SAVED["opt"]["autoaccum"]))
    model, opt = live_mid_run()
    before = snapshot(model, opt)
    # A fresh copy, as torch.load gives: the inner optimizer adopts its state tensors.
    state = {**copy.deepcopy({k: v for k, v in _SAVED["opt"].items() if k != "autoaccum"}),
             "autoaccum": own}
    try:
        opt.load_state_dict(state)
    except (TypeError, ValueError):
        assert_same(before, snapshot(model, opt))
        return
    model.load_state_dict(_SAVED["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stand-in containers where a type name was edited
        loss_fn = loss_fn_for(model)
        opt.step(loss_fn, _BATCHES[3])
        opt.flush()
    assert opt.pending_samples == 0, what
    assert_params_close(params(model), _REFERENCE)


# ============================================================ 5. the framework layers' entries
def test_the_hf_trainer_refuses_a_bad_entry_before_loading_its_inner_optimizer():
    pytest.importorskip("transformers")
    from autoaccum.integrations.transformers import _TrainerOptimizer

    saved, _, _ = saved_mid_step()
    model = make_model(seed=3)
    inner = sgd(model.parameters())
    facade = _TrainerOptimizer(inner, TARGET)
    before = repr(inner.state_dict())
    bad = copy.deepcopy(saved["opt"])
    bad["autoaccum"]["pending"][0]["structure"] = ["mapping", "subprocess:run", ["a"], []]
    with pytest.raises(ValueError, match=r"pending\[0\].structure"):
        facade.load_state_dict(bad)
    assert repr(inner.state_dict()) == before and facade._stashed is None
    facade.load_state_dict(copy.deepcopy(saved["opt"]))  # a good one is stashed for attach()
    assert facade._stashed is not None


@pytest.mark.parametrize("saved,pattern", [
    ("ranks", "expected a dict with exactly"),
    ({"optimizer_index": 3, "ranks": [{}]}, "'optimizer_index' is 3"),
    ({"optimizer_index": 0, "ranks": "all"}, "'ranks' is 'all'"),
    ({"optimizer_index": 0, "ranks": [["pending"]]}, "'ranks' is"),
])
def test_lightning_refuses_malformed_rank_entries(saved, pattern):
    pytest.importorskip("lightning")
    from autoaccum.integrations.lightning import AutoAccumCallback

    class Trainer:
        world_size, global_rank = 2, 0

    states = [{"state": {}, "param_groups": []}]
    with pytest.raises(ValueError, match=pattern):
        AutoAccumCallback().on_load_checkpoint(
            Trainer(), None, {"optimizer_states": states, "autoaccum_ranks": saved})  # type: ignore[arg-type]
    assert states == [{"state": {}, "param_groups": []}]
