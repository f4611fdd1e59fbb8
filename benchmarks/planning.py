"""From the first batch to a settled plan: autoaccum against two OOM-driven baselines, on CPU.

    python benchmarks/planning.py            # full run (~4 min on 2 busy cores)
    python benchmarks/planning.py --quick    # smoke run (~45 s; prints, writes no file)

The full run writes benchmarks/results/planning.md. torch runs with one intra-op thread (see
main()). Most of the baselines' time is Accelerate's retries: each OOM costs it a gc.collect().

Every policy trains the same model (same initial weights, same data) on its own fresh
``autoaccum.SimulatedDevice(capacity_bytes=C)``: a CPU stand-in GPU that counts live tensor storages
and raises ``torch.OutOfMemoryError`` at the allocation that passes ``C``. Each optimizer step is
exactly ``target`` samples (gradient accumulation over micro-batches); the loader batch is the
whole step, on the CPU (not counted by the device, for any policy).

Models: ``mlp`` (64-256-256-10) and ``cnn`` (two 3x3 convolutions on 3x8x8 inputs), mean
cross-entropy; ``lm``: a GPT-style causal transformer (2 layers, d=64, 4 heads, 32 tokens,
vocabulary 1000) on padded sequences of 4 to 32 real tokens, token loss (``loss_fn`` returns
``(loss_sum, num_items)``; the memory of a step depends on its data through ``logits[mask]``);
``resnet18``: torchvision's ResNet-18 (10 classes) on 3x32x32 images; ``lm-tight``: a transformer
that is large for its device (1 layer, d=128, vocabulary 2000, 32 tokens, every token real, token
loss) at a capacity where 1/64 of the target does not fit (the first probe must be sized from the
budget and the parameter bytes).

Policies:

* ``autoaccum``: ``AutoAccumOptimizer(AdamW, target_batch_size=T, memory=device)``, planned
  micro-batch (``micro_batch_size=None``), default settings.
* ``accelerate``: the real ``accelerate.utils.find_executable_batch_size(starting_batch_size=T)``
  around the training loop (its documented ``inner_training_loop`` use): on OOM it shrinks the
  batch size by 0.9 and calls the whole function again. The function accumulates
  ``ceil(T / batch_size)`` micro-batches (``x.split(batch_size)``) per step, so the effective batch
  stays ``T`` (Accelerate itself has no effective-batch bookkeeping).
* ``halving``: Composer-style ``device_train_microbatch_size="auto"``: start at the full batch,
  halve on OOM, re-run the step that failed, never grow.

The baselines run forward, backward and the optimizer step inside
``device.active(params + grads + optimizer state)``, so the device accounts for them exactly as it
does for autoaccum (which enters ``active`` with the same tensors itself). In token mode they divide
each micro-batch's ``loss_sum`` by the step's item count (known before the first backward).

When is a plan settled: autoaccum after the first step at whose end ``opt.policy.settled`` is True
(no probe and no trial pending); baselines after two full steps (the second one runs with the AdamW
state resident, as every later step does). Then every policy runs ``AFTER_STEPS`` more steps on the
unchanged device (not timed), and their OOMs and size changes are reported.

Measured, from the first batch to the settled plan:

* trial micro-steps: forward/backward passes run only to learn the size. autoaccum: its probe
  micro-batches plus every micro-batch that ran out of memory (a trial step's micro-batches are
  real work and are not counted; the trial steps are counted in their own column). Baselines:
  every micro-batch attempted before the first one that succeeded at the final size.
* OOMs while settling: out-of-memory errors caught in that window; OOMs after settling: in the
  ``AFTER_STEPS`` steps after it.
* trial steps (autoaccum): ``policy.state_dict()["trials"]`` once settled: the trials of a
  larger size it started (one in the first step may run only the sizes the rest of that step
  allows; the step's measurement then decides).
* wasted samples: samples whose forward/backward was thrown away. autoaccum: the OOMed
  micro-batches and the replays after a backward OOM (its probes and trial steps are real samples
  of their steps). Baselines: every micro-batch of an attempt that failed.
* time to settle: wall time from the first batch to the end of the backward of the first
  micro-batch run at the final size that was not thrown away (autoaccum: in the first step whose
  largest micro-batch is the final size, after its last trial micro-step; baselines: the first
  success at the final size). Median over repetitions; the counts are deterministic (checked).
* final micro-batch: the largest micro-batch of a settled step (autoaccum:
  ``max(balanced_split(T, limit))`` for the policy's limit at the end of the run, i.e. after the
  steps after settling; a different size at settling is reported as "settled at") against the
  largest runnable: the largest ``max(balanced_split(T, M))`` over pinned
  ``micro_batch_size=M`` for which autoaccum runs the checked steps without an OOM (a search over
  the sizes a balanced split can run, independent of the policy). Checked steps: the first two
  for models whose step memory does not depend on the data (from the second step on every step
  allocates the same), all ``SETTLE_STEPS_MAX + AFTER_STEPS`` batches of the run for ``lm``. The
  baselines split by ``x.split(size)``, which can run sizes a balanced split cannot, so their
  fraction may pass 1.
* peak at the final size (autoaccum): measured = the step's micro-batch peak
  (``opt.history[i].peak_bytes``, read before the inner optimizer step) minus the bytes allocated
  on the device before the step (parameters and optimizer state: the resident baseline) minus the
  gradient bytes, the largest over the steps without an OOM whose largest micro-batch is the final
  size; it must
  equal ``policy.state_dict()["observed"][final]`` (the policy's own record), which the report
  checks. Predicted: ``policy.memory_model.peak(final)`` at the
  end of the run, and (details) the model's prediction for the final size before any step had run
  it as its largest micro-batch.

Goals (issue 8): fraction of the largest runnable size median >= 0.97 and min >= 0.90, <= 3 trial
micro-steps, <= 1 OOM while settling, 0 OOMs after settling; checked per autoaccum row and
overall, one verdict line each at the end of the output.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoaccum  # noqa: E402
from autoaccum.planner import balanced_split  # noqa: E402

MIB = 2**20
SETTLE_STEPS_MAX = 6  # autoaccum: give up (and say so) if the plan has not settled by then
AFTER_STEPS = 4  # steps run on the unchanged device after settling
GOAL_MEDIAN, GOAL_MIN, GOAL_TRIALS, GOAL_SETTLE_OOMS = 0.97, 0.90, 3, 1


# ------------------------------------------------------------------------------ models and data
class TinyLM(nn.Module):
    """GPT-style causal transformer: token + position embedding, encoder layers, LM head."""

    def __init__(self, vocab: int, seq: int, d: int, layers: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("causal", torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1))

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens) + self.pos
        h = self.enc(h, mask=self.causal, src_key_padding_mask=pad)
        return self.head(h)


@dataclass(frozen=True)
class Kind:
    """A model family: how to build it, its batches and its loss."""

    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, int], Any]  # (generator, samples) -> a step's batch
    loss: Callable[[nn.Module, Any], Any]  # a tensor (mean) or (loss_sum, num_items)
    token: bool = False
    data_dependent: bool = False  # whether a step's memory depends on its data


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(  # 3x8x8 inputs
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def _classes(shape: tuple[int, ...]) -> Callable[[torch.Generator, int], Any]:
    def batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)

    return batch


def _mean_ce(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(b[0]), b[1])


def _tokens(vocab: int, seq: int, shortest: int) -> Callable[[torch.Generator, int], Any]:
    def batch(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
        lengths = torch.randint(shortest, seq + 1, (n,), generator=g)
        mask = torch.arange(seq)[None, :] < lengths[:, None]  # True: a real token
        return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}

    return batch


def _token_ce(model: nn.Module, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mb["mask"]
    logits = model(mb["tokens"], ~mask)
    loss_sum = F.cross_entropy(logits[mask], mb["targets"][mask], reduction="sum")
    return loss_sum, mask.sum()


KINDS: dict[str, Kind] = {
    "mlp": Kind(_mlp, _classes((64,)), _mean_ce),
    "cnn": Kind(_cnn, _classes((3, 8, 8)), _mean_ce),
    "lm": Kind(lambda: TinyLM(1000, 32, 64, 2), _tokens(1000, 32, 4), _token_ce, token=True,
               data_dependent=True),
    "resnet18": Kind(_resnet18, _classes((3, 32, 32)), _mean_ce),
    "lm-tight": Kind(lambda: TinyLM(2000, 32, 128, 1), _tokens(2000, 32, 32), _token_ce,
                     token=True),
}


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return KINDS[kind].make()


def make_batches(kind: str, target: int, n: int) -> list[Any]:
    return [KINDS[kind].batch(torch.Generator().manual_seed(seed), target) for seed in range(n)]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def batch_len(batch: Any) -> int:
    first = batch["mask"] if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])


def split_batch(batch: Any, size: int) -> list[Any]:
    """``x.split(size)`` over every tensor of a batch (what the baselines run)."""
    if isinstance(batch, dict):
        parts = {k: v.split(size) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(len(parts["mask"]))]
    return list(zip(*(v.split(size) for v in batch)))


@dataclass(frozen=True)
class Case:
    kind: str
    capacity: int  # bytes
    target: int
    max_reps: int | None = None  # fewer repetitions for the slow cases

    @property
    def label(self) -> str:
        return f"{self.kind} T={self.target}"

    @property
    def checked_steps(self) -> int:
        """Steps a pinned size must run for the search (see the docstring)."""
        return SETTLE_STEPS_MAX + AFTER_STEPS if KINDS[self.kind].data_dependent else 2


# ------------------------------------------------------------------------------ bookkeeping
@dataclass
class MicroStep:
    size: int
    start: float
    attempt: int = 0  # baselines: which attempt (a step try, or a whole-function call)
    config: int = 0  # baselines: the micro-batch size the attempt was configured for
    probe: bool = False  # autoaccum: a probe micro-batch
    ooms_before: int = 0  # autoaccum: opt.oom_events when it started
    step: int = 0  # autoaccum: the optimizer step (0-based) it belongs to
    predicted: float | None = None  # autoaccum: memory_model.peak(size) when it started
    end: float | None = None  # end of its backward (None: it ran out of memory)
    oom: bool = False


@dataclass
class Outcome:
    trials: int  # trial micro-steps
    ooms: int  # while settling
    wasted: int
    settle_s: float
    final: int
    trace: str  # the trial micro-steps, compactly
    ooms_after: int = 0
    later: str = ""  # what the steps after settling did, if anything surprising
    notes: list[str] = field(default_factory=list)
    # autoaccum only
    settle_steps: int | None = None  # steps until policy.settled
    trial_steps: int | None = None
    measured: float | None = None  # peak above the resident baseline at the final size
    observed: float | None = None  # policy.state_dict()["observed"][final]
    predicted: float | None = None  # policy.memory_model.peak(final) at the end
    predicted_before: float | None = None  # ... before a step had run it as its largest
    budget: float | None = None
    steps_trace: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> tuple[Any, ...]:
        return (self.trials, self.ooms, self.wasted, self.final, self.trace, self.ooms_after,
                self.later, self.settle_steps, self.trial_steps, self.measured, self.predicted)


def _trace(steps: list[MicroStep]) -> str:
    parts = []
    for s in steps:
        tag = "p" if s.probe else ""
        if s.oom:
            tag += "!"
        parts.append(f"{s.size}{tag}")
    if len(parts) > 24:
        parts = [*parts[:10], f"... ({len(parts) - 20} more) ...", *parts[-10:]]
    return " ".join(parts) if parts else "-"


def _run_lengths(calls: list[MicroStep]) -> str:
    """``2p 7p 16x15 14!``: sizes in order, runs of one size as size x count."""
    out: list[str] = []
    prev, count = "", 0
    for c in calls:
        tag = f"{c.size}{'p' if c.probe else ''}{'!' if c.oom else ''}"
        if tag == prev and not c.probe:
            count += 1
            continue
        if prev:
            out.append(prev if count == 1 else f"{prev}x{count}")
        prev, count = tag, 1
    if prev:
        out.append(prev if count == 1 else f"{prev}x{count}")
    return " ".join(out)


def _same(a: float | None, b: float | None) -> bool:
    """Equal within 1 KiB: the policy's resident baseline is read at the end of the step before,
    while that step's scalar losses (4 bytes per micro-batch) are still alive."""
    return a is not None and b is not None and abs(a - b) < 1024


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MIB:.3f}"


# ------------------------------------------------------------------------------ autoaccum
def run_autoaccum(case: Case, batches: list[Any]) -> Outcome:
    kind = KINDS[case.kind]
    model = make_model(case.kind)
    device = autoaccum.SimulatedDevice(capacity_bytes=case.capacity)
    opt = autoaccum.AutoAccumOptimizer(
        make_optimizer(model), target_batch_size=case.target, memory=device
    )
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    calls: list[MicroStep] = []
    step_no = 0

    def loss_fn(b: Any) -> Any:
        size = batch_len(b)
        mm = opt.policy.memory_model
        calls.append(MicroStep(
            size=size, start=time.perf_counter(), probe=opt.policy.probing,
            ooms_before=opt.oom_events, step=step_no,
            predicted=mm.peak(size) if mm is not None else None,
        ))
        return kind.loss(model, b)

    def backward_done(_: torch.Tensor) -> None:
        calls[-1].end = time.perf_counter()  # the last parameter's gradient ends the backward

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(backward_done)

    largest: list[int] = []  # per step: its largest micro-batch
    measured: list[float | None] = []  # per step: its peak above the resident baseline (None:
    # an OOM in the step, whose peak may come from a larger micro-batch than the one it ended at)
    policy_after: list[str] = []  # per step: the policy's limit / trial after it

    def resident() -> int:  # what is allocated between steps: parameters, optimizer state
        tensors = [*model.parameters(), *(v for st in opt.optimizer.state.values()
                                          for v in st.values() if isinstance(v, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)

    def one_step() -> None:
        nonlocal step_no
        before = resident()
        if step_no:  # (before the first step the device has not seen the parameters yet)
            assert before == device.allocated_bytes(), (before, device.allocated_bytes())
        opt.step(loss_fn, batches[step_no])
        record = opt.history[-1]
        largest.append(record.micro_batch_size)
        assert record.peak_bytes is not None
        measured.append(
            None if record.oom_events else float(record.peak_bytes - before - grad_bytes))
        st = opt.policy.state_dict()
        policy_after.append(
            f"limit {st['limit']}" + (f", trial {st['trial']}" if st["trial"] else "")
            + (", settled" if opt.policy.settled else "")
        )
        step_no += 1

    gc.collect()
    t0 = time.perf_counter()
    while step_no < SETTLE_STEPS_MAX:
        one_step()
        if opt.policy.settled:
            break
    settled = opt.policy.settled
    settle_steps = step_no
    window = len(calls)
    ooms_window = opt.oom_events
    state_at_settle = opt.policy.state_dict()
    limit = opt.policy.limit
    settled_size = max(balanced_split(case.target, limit))
    for _ in range(AFTER_STEPS):
        one_step()
    ooms_after = opt.oom_events - ooms_window
    state = opt.policy.state_dict()
    final = max(balanced_split(case.target, state["limit"]))  # what training goes on with

    for i, c in enumerate(calls):
        after = calls[i + 1].ooms_before if i + 1 < len(calls) else opt.oom_events
        c.oom = after > c.ooms_before
    trial_calls = [c for c in calls[:window] if c.probe or c.oom]
    last_trial = max((i for i, c in enumerate(calls[:window]) if c.probe or c.oom), default=-1)
    first_at_final = next(
        (c for c in calls[last_trial + 1:]
         if c.size == final and c.end is not None and largest[c.step] == final), None,
    )
    later = []
    if settled_size != final:
        later.append(f"settled at {settled_size}")
    if ooms_after:
        later.append(f"{ooms_after} OOM")
    ran_after = sorted(set(largest[settle_steps:]))
    if ran_after != [final]:
        later.append(f"steps ran {'/'.join(map(str, ran_after))}")
    if opt.policy.limit != limit:
        later.append(f"limit {limit} -> {opt.policy.limit}")
    if state["trials"] != state_at_settle["trials"]:
        later.append(f"{state['trials'] - state_at_settle['trials']} more trial steps")
    notes = [] if settled else [f"not settled after {SETTLE_STEPS_MAX} steps"]
    at_final = [m for s, m in zip(largest, measured) if s == final and m is not None]
    observed = dict((int(b), float(p)) for b, p in state["observed"])
    model_now = opt.policy.memory_model
    first_step_at_final = next((s for s, b in enumerate(largest) if b == final), None)
    predicted_before = next(
        (c.predicted for c in calls if c.step == first_step_at_final and c.size == final), None,
    )
    steps_trace = [
        f"{_run_lengths([c for c in calls if c.step == s])} ({policy_after[s]})"
        for s in range(step_no)
    ]
    return Outcome(
        trials=len(trial_calls),
        ooms=ooms_window,
        wasted=sum(c.size for c in calls[:window]) - settle_steps * case.target,
        settle_s=(first_at_final.end if first_at_final and first_at_final.end else float("nan"))
        - t0,
        final=final,
        trace=_trace(trial_calls),
        ooms_after=ooms_after,
        later=", ".join(later),
        notes=notes,
        settle_steps=settle_steps if settled else None,
        trial_steps=state_at_settle["trials"],
        measured=max(at_final) if at_final else None,
        observed=observed.get(final),
        predicted=model_now.peak(final) if model_now is not None else None,
        predicted_before=predicted_before,
        budget=state["budget"],
        steps_trace=steps_trace,
        state=state,
    )


# ------------------------------------------------------------------------------ baselines
class _Recorder:
    def __init__(self) -> None:
        self.steps: list[MicroStep] = []
        self.failed_attempts: set[int] = set()
        self.attempt = 0


def _resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = list(model.parameters())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for st in optimizer.state.values() for v in st.values()
                if isinstance(v, torch.Tensor)]
    return tensors


def _train_step(
    kind: Kind, model: nn.Module, optimizer: torch.optim.Optimizer,
    device: autoaccum.SimulatedDevice, batch: Any, size: int, rec: _Recorder,
) -> None:
    """One optimizer step over ``batch`` in micro-batches of ``size`` (plain accumulation)."""
    n = batch_len(batch)
    items = batch["mask"].sum() if kind.token else None  # the step's tokens, before any backward
    with device.active(_resident(model, optimizer)):
        for mb in split_batch(batch, size):
            m = batch_len(mb)
            ms = MicroStep(m, time.perf_counter(), rec.attempt, size)
            rec.steps.append(ms)
            out = kind.loss(model, mb)
            loss = out[0] / items if kind.token else out * (m / n)
            loss.backward()
            ms.end = time.perf_counter()
            del loss, out
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _try_step(
    kind: Kind, model: nn.Module, optimizer: torch.optim.Optimizer,
    device: autoaccum.SimulatedDevice, batch: Any, size: int, rec: _Recorder,
) -> str | None:
    """``_train_step``; on OOM: the error message, with the failed frames already gone."""
    try:
        _train_step(kind, model, optimizer, device, batch, size, rec)
    except torch.OutOfMemoryError as exc:
        message = str(exc)
    else:
        return None
    rec.steps[-1].oom = rec.steps[-1].end is None
    optimizer.zero_grad(set_to_none=True)  # the step's partial gradient is thrown away
    return message


def _baseline_outcome(rec: _Recorder, t0: float, final: int, notes: list[str]) -> Outcome:
    steps = rec.steps
    first = next(
        i for i, s in enumerate(steps)
        if s.config == final and s.end is not None and s.attempt not in rec.failed_attempts
    )
    end = steps[first].end
    assert end is not None
    return Outcome(
        trials=first,
        ooms=len(rec.failed_attempts),
        wasted=sum(s.size for s in steps if s.attempt in rec.failed_attempts),
        settle_s=end - t0,
        final=final,
        trace=_trace(steps[:first]),
        notes=notes,
    )


def _after(
    out: Outcome, kind: Kind, model: nn.Module, optimizer: torch.optim.Optimizer,
    device: autoaccum.SimulatedDevice, batches: list[Any], size: int, rec: _Recorder,
) -> None:
    """The steps after settling (each tried once; an OOM is counted, not recovered from)."""
    for batch in batches[2:2 + AFTER_STEPS]:
        rec.attempt += 1
        if _try_step(kind, model, optimizer, device, batch, size, rec) is not None:
            out.ooms_after += 1
    if out.ooms_after:
        out.later = f"{out.ooms_after} OOM"


def run_halving(case: Case, batches: list[Any]) -> Outcome:
    kind = KINDS[case.kind]
    model = make_model(case.kind)
    optimizer = make_optimizer(model)
    device = autoaccum.SimulatedDevice(capacity_bytes=case.capacity)
    rec = _Recorder()
    size = case.target
    gc.collect()
    t0 = time.perf_counter()
    for i in range(2):
        while True:
            rec.attempt += 1
            if _try_step(kind, model, optimizer, device, batches[i], size, rec) is None:
                break
            rec.failed_attempts.add(rec.attempt)
            # Composer: zero_grad(set_to_none=True) and torch.cuda.empty_cache(), no gc.collect
            if size == 1:
                raise RuntimeError(f"{case}: one sample does not fit")
            size //= 2
    out = _baseline_outcome(rec, t0, size, [])
    _after(out, kind, model, optimizer, device, batches, size, rec)
    return out


def _accelerate_oom_shim() -> tuple[bool, list[str]]:
    """Does Accelerate recognise the simulated OOM? Returns (needs_shim, notes)."""
    from accelerate.utils import is_cuda_available
    from accelerate.utils.memory import should_reduce_batch_size

    device = autoaccum.SimulatedDevice(capacity_bytes=0)
    error: BaseException | None = None
    try:
        with device.active():
            torch.ones(8)
    except torch.OutOfMemoryError as exc:
        error = exc
    assert error is not None
    needs = not should_reduce_batch_size(error)  # type: ignore[arg-type]
    notes = []
    if needs:
        notes.append(
            "accelerate.utils.memory.should_reduce_batch_size rejects the simulated OOM (its "
            "message reads 'CUDA out of memory (simulated). Tried ...' and Accelerate looks for "
            "' out of memory.'), so the accelerate run re-raises each simulated OOM as "
            "torch.OutOfMemoryError with the message a real CUDA OOM has ('CUDA out of memory. "
            "Tried ...'), outside the except block."
        )
    else:
        notes.append("accelerate.utils.memory.should_reduce_batch_size accepts the simulated OOM.")
    notes.append(
        "accelerate's clear_device_cache calls torch.cuda.empty_cache only when CUDA is available "
        f"(here: {is_cuda_available()}), so nothing of Accelerate was monkeypatched; its "
        "gc.collect() runs (and is timed) as in real use."
    )
    return needs, notes


def run_accelerate(case: Case, batches: list[Any], shim: bool) -> Outcome:
    from accelerate.utils import find_executable_batch_size

    kind = KINDS[case.kind]
    model = make_model(case.kind)
    optimizer = make_optimizer(model)
    device = autoaccum.SimulatedDevice(capacity_bytes=case.capacity)
    rec = _Recorder()
    used: list[int] = []

    @find_executable_batch_size(starting_batch_size=case.target)
    def inner_training_loop(batch_size: int) -> None:
        rec.attempt += 1
        used.append(batch_size)
        for i in range(2):
            message = _try_step(kind, model, optimizer, device, batches[i], batch_size, rec)
            if message is not None:
                rec.failed_attempts.add(rec.attempt)
                if shim:
                    message = message.replace(
                        "CUDA out of memory (simulated).", "CUDA out of memory."
                    )
                raise torch.OutOfMemoryError(message)

    gc.collect()
    t0 = time.perf_counter()
    inner_training_loop()
    out = _baseline_outcome(rec, t0, used[-1], [])
    _after(out, kind, model, optimizer, device, batches, used[-1], rec)
    return out


# ------------------------------------------------------------------------------ reference
class _Abort(Exception):
    pass


def runs_clean(case: Case, batches: list[Any], micro: int) -> bool:
    """Whether autoaccum with ``micro_batch_size=micro`` runs the checked steps with no OOM."""
    kind = KINDS[case.kind]
    model = make_model(case.kind)
    device = autoaccum.SimulatedDevice(capacity_bytes=case.capacity)
    opt = autoaccum.AutoAccumOptimizer(
        make_optimizer(model), target_batch_size=case.target, memory=device,
        micro_batch_size=micro,
    )

    def loss_fn(b: Any) -> Any:
        if opt.oom_events:
            raise _Abort  # the answer is known; skip the rest of the (halved) step
        return kind.loss(model, b)

    try:
        for batch in batches[:case.checked_steps]:
            opt.step(loss_fn, batch)
    except (_Abort, autoaccum.StepOutOfMemoryError):  # (the latter: no size can fit)
        return False
    return opt.oom_events == 0


def largest_that_fits(case: Case, batches: list[Any]) -> int:
    """The largest micro-batch a balanced split of ``target`` can run without an OOM.

    Searches the micro-batch count k (size ``ceil(T / k)``): doubling until it fits, then
    bisection, assuming that a smaller micro-batch never needs more memory. Each size is run once
    (many counts give the same size).
    """
    t = case.target
    known: dict[int, bool] = {}

    def fits(k: int) -> bool:
        size = -(-t // k)
        if size not in known:
            known[size] = runs_clean(case, batches, size)
        return known[size]

    if fits(1):
        return t
    lo, hi = 1, 2  # fits(lo) is False
    while not fits(hi):
        lo, hi = hi, min(t, hi * 2)
        if lo == t:
            raise RuntimeError(f"{case}: even one sample does not fit")
    while hi - lo > 1:  # fits(hi), not fits(lo)
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return max(balanced_split(t, -(-t // hi)))


# ------------------------------------------------------------------------------ driver
POLICIES = ("autoaccum", "accelerate", "halving")


def run_policy(policy: str, case: Case, batches: list[Any], shim: bool) -> Outcome:
    if policy == "autoaccum":
        return run_autoaccum(case, batches)
    if policy == "accelerate":
        return run_accelerate(case, batches, shim)
    return run_halving(case, batches)


@dataclass
class Row:
    case: Case
    policy: str
    outcome: Outcome
    times_ms: list[float]
    largest: int
    consistent: bool

    @property
    def fraction(self) -> float:
        return self.outcome.final / self.largest

    def misses(self) -> list[str]:
        """The per-row goals this (autoaccum) row misses."""
        o = self.outcome
        out = []
        if self.fraction < GOAL_MIN:
            out.append(f"fraction {self.fraction:.2f} < {GOAL_MIN}")
        if o.trials > GOAL_TRIALS:
            out.append(f"{o.trials} trial micro-steps > {GOAL_TRIALS}")
        if o.ooms > GOAL_SETTLE_OOMS:
            out.append(f"{o.ooms} OOMs while settling > {GOAL_SETTLE_OOMS}")
        if o.ooms_after:
            out.append(f"{o.ooms_after} OOM{'s' if o.ooms_after > 1 else ''} after settling")
        if o.settle_steps is None:
            out.append("not settled")
        return out


def bench_case(case: Case, reps: int, shim: bool, log: Callable[[str], None]) -> list[Row]:
    batches = make_batches(case.kind, case.target, SETTLE_STEPS_MAX + AFTER_STEPS)
    t = time.perf_counter()
    largest = largest_that_fits(case, batches)
    log(f"  {case.label} {case.capacity / MIB:g} MiB: largest runnable {largest} "
        f"({time.perf_counter() - t:.1f} s search)")
    reps = min(reps, case.max_reps or reps)
    outcomes: dict[str, list[Outcome]] = {p: [] for p in POLICIES}
    for _ in range(reps):  # policies interleaved, so slow phases of the machine hit all alike
        for policy in POLICIES:
            t = time.perf_counter()
            outcomes[policy].append(run_policy(policy, case, batches, shim))
            log(f"    {policy}: final {outcomes[policy][-1].final} "
                f"({time.perf_counter() - t:.1f} s)")
    rows = []
    for policy in POLICIES:
        outs = outcomes[policy]
        rows.append(Row(
            case, policy, outs[0], [o.settle_s * 1e3 for o in outs], largest,
            consistent=all(o.counts() == outs[0].counts() for o in outs),
        ))
    return rows


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("mlp", int(2.625 * MIB), 1024), Case("cnn", 4 * MIB, 1024),
                Case("lm", 12 * MIB, 256, max_reps=1)]
    # Picked on purpose (see the notes of the report): mlp 2.625 MiB, where a line through small
    # probes under-estimates the peak of large micro-batches (the old policy's 5%-margin row ran
    # out of memory); mlp 3.25 MiB, where it does so by more than the margin; mlp T=512 3 MiB,
    # where the whole step fits in one micro-batch by less than the single-pass saving is off.
    out = [Case("mlp", int(c * MIB), 1024) for c in (2, 2.625, 3, 3.25, 4)]
    out += [Case("cnn", c * MIB, 1024) for c in (3, 4, 6)]
    out += [Case("mlp", 2 * MIB, 512), Case("mlp", 3 * MIB, 512), Case("cnn", 4 * MIB, 512)]
    out += [
        Case("lm", 12 * MIB, 256, max_reps=1),
        Case("resnet18", 200 * MIB, 256, max_reps=1),
        Case("lm-tight", 14 * MIB, 256, max_reps=1),
    ]
    return out


def render(rows: list[Row]) -> str:
    head = (
        "| model | capacity | policy | trial micro-steps | OOMs while settling | OOMs after "
        "| wasted samples | time to settle (ms) | final micro-batch | largest runnable "
        "| fraction |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        o = r.outcome
        flag = "" if r.consistent else " (varies)"
        later = f" (then {o.later})" if o.later else ""
        lines.append(
            f"| {r.case.label} | {r.case.capacity / MIB:g} MiB | {r.policy} | {o.trials}{flag} "
            f"| {o.ooms} | {o.ooms_after} | {o.wasted} "
            f"| {statistics.median(r.times_ms):.0f} | {o.final}{later} | {r.largest} "
            f"| {r.fraction:.2f} |"
        )
    return "\n".join(lines)


def render_autoaccum(rows: list[Row]) -> str:
    head = (
        "| model | capacity | final / largest runnable | fraction | trial micro-steps "
        "| OOMs while settling | OOMs after settling | trial steps | steps to settle "
        "| peak at final (MiB): measured | predicted, end of run | predicted before it ran "
        "| budget (MiB) | goals |"
    )
    lines = [head, "|" + "---|" * 14]

    def vs(predicted: float | None, measured: float | None) -> str:
        if predicted is None or not measured:
            return _mib(predicted)
        return f"{_mib(predicted)} ({(predicted - measured) / measured:+.1%})"

    for r in rows:
        o = r.outcome
        misses = r.misses()
        lines.append(
            f"| {r.case.label} | {r.case.capacity / MIB:g} MiB | {o.final} / {r.largest} "
            f"| {r.fraction:.2f} | {o.trials} | {o.ooms} | {o.ooms_after} | {o.trial_steps} "
            f"| {o.settle_steps if o.settle_steps is not None else 'no'} "
            f"| {_mib(o.measured)} | {vs(o.predicted, o.measured)} "
            f"| {vs(o.predicted_before, o.measured)} | {_mib(o.budget)} "
            f"| {'met' if not misses else 'MISSED: ' + '; '.join(misses)} |"
        )
    return "\n".join(lines)


def render_traces(rows: list[Row]) -> str:
    lines = [
        "Baselines' trial micro-steps in order (size; ! = ran out of memory; every micro-batch "
        "before the first success at the final size):",
        "",
    ]
    for r in rows:
        if r.policy != "autoaccum":
            lines.append(
                f"- {r.case.label} {r.case.capacity / MIB:g} MiB, {r.policy}: {r.outcome.trace}"
            )
    lines += [
        "",
        "autoaccum, step by step (micro-batch sizes in order; p = probe, ! = ran out of memory, "
        "NxK = K micro-batches of N; in parentheses the policy's limit and pending trial after "
        "the step), then its memory model at the end of the run (peak above the resident "
        "baseline of b samples = fixed + per-sample * b), the model's prediction for the final "
        "size before any step had run it as its largest micro-batch, and the measured points "
        "(`observed`, size: MiB):",
        "",
    ]
    for r in rows:
        o = r.outcome
        if r.policy != "autoaccum":
            continue
        steps = "; ".join(f"{i + 1}: {s}" for i, s in enumerate(o.steps_trace))
        model = o.state.get("model")
        fit = (f"fixed {model[0] / MIB:.3f} MiB + {model[1] / 1024:.1f} KiB/sample"
               if model else "none")
        observed = ", ".join(f"{b}: {p / MIB:.3f}" for b, p in o.state.get("observed", []))
        failed = ", ".join(f"{b} (at {at / MIB:.3f} MiB)" for b, at in o.state.get("failed", []))
        check = "" if _same(o.observed, o.measured) else (
            f"; observed[{o.final}] = {_mib(o.observed)} MiB differs from the measured "
            f"{_mib(o.measured)}")
        lines.append(
            f"- {r.case.label} {r.case.capacity / MIB:g} MiB: steps {steps}. Model {fit}; "
            f"predicted {_mib(o.predicted_before)} MiB for {o.final} before it ran; observed "
            f"{observed}; failed {failed or '-'}{check}"
            + (f". {' '.join(o.notes)}" if o.notes else "")
        )
    return "\n".join(lines)


def tight_note(r: Row) -> str:
    """How the first probe was sized where 1/64 of the target does not fit."""
    t, o = r.case.target, r.outcome
    params = sum(p.numel() * p.element_size() for p in make_model(r.case.kind).parameters())
    first = o.steps_trace[0].split()[0].rstrip("p!") if o.steps_trace else "?"
    return (
        f"{r.case.label} {r.case.capacity / MIB:g} MiB: 1/64 of the target ({t // 64} samples) "
        f"does not fit (largest runnable {r.largest}). The first probe ran {first} samples: "
        f"`first_probe_size` takes the least of T // 64 = {t // 64} and budget // (8 x "
        f"parameter bytes) = {_mib(o.budget)} MiB // {8 * params / MIB:.1f} MiB = "
        f"{int((o.budget or 0) // (8 * params))}, and never less than 2."
    )


def verdicts(rows: list[Row]) -> list[str]:
    aa = [r for r in rows if r.policy == "autoaccum"]
    fr = [r.fraction for r in aa]
    med, low = statistics.median(fr), min(fr)
    worst = min(aa, key=lambda r: r.fraction)
    trials = max(aa, key=lambda r: r.outcome.trials)
    settling = max(aa, key=lambda r: r.outcome.ooms)
    after = [r for r in aa if r.outcome.ooms_after]
    unsettled = [r for r in aa if r.outcome.settle_steps is None]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def where(r: Row) -> str:
        return f"{r.case.label} {r.case.capacity / MIB:g} MiB"

    return [
        f"{verdict(med >= GOAL_MEDIAN)} median fraction of the largest runnable size >= "
        f"{GOAL_MEDIAN}: {med:.3f} over {len(aa)} cases",
        f"{verdict(low >= GOAL_MIN)} min fraction >= {GOAL_MIN}: {low:.3f} ({where(worst)})",
        f"{verdict(trials.outcome.trials <= GOAL_TRIALS)} trial micro-steps <= {GOAL_TRIALS} "
        f"per case: at most {trials.outcome.trials} ({where(trials)})",
        f"{verdict(settling.outcome.ooms <= GOAL_SETTLE_OOMS)} OOMs while settling <= "
        f"{GOAL_SETTLE_OOMS} per case: at most {settling.outcome.ooms} ({where(settling)})",
        f"{verdict(not after)} 0 OOMs in the {AFTER_STEPS} steps after settling: "
        + (", ".join(f"{r.outcome.ooms_after} in {where(r)}" for r in after) or "none")
        + (f"; not settled within {SETTLE_STEPS_MAX} steps: "
           + ", ".join(where(r) for r in unsettled) if unsettled else ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="mlp, cnn and lm, one repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per policy")
    parser.add_argument("--only", action="append", default=None, metavar="KIND",
                        help="run only the cases of this model (repeatable; writes no file)")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="report file (default: benchmarks/results/planning.md; --quick writes none)",
    )
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    logging.getLogger("autoaccum").setLevel(logging.ERROR)  # one warning per OOM otherwise
    # One intra-op thread: with two, a busy machine stalls the parallel regions for whole
    # scheduler slices (one 341-sample MLP micro-step took 2 ms or 200 ms).
    torch.set_num_threads(1)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    shim, notes = _accelerate_oom_shim()
    gc_ms = []
    for _ in range(5):
        t = time.perf_counter()
        gc.collect()
        gc_ms.append((time.perf_counter() - t) * 1e3)
    notes.append(
        f"One gc.collect() in this process (torch and accelerate imported) takes "
        f"{statistics.median(gc_ms):.0f} ms (median of 5). After an OOM autoaccum collects once "
        "(in the backend's release), Accelerate once (plus once per "
        "call of the decorated function), the Composer-style halving not at all (it only "
        "empties the CUDA cache): on a small model this dominates the time to settle."
    )
    if not args.quick:
        notes.append(
            "mlp T=1024 2.625 and 3.25 MiB and mlp T=512 3 MiB were picked on purpose: each "
            "broke an earlier version of the planner. The peak of this MLP is convex in b "
            "(another phase of backward takes over at large b), so the line through two small "
            "probes under-estimates far from them. At 3.25 MiB (found by a sweep of 2-5 MiB in "
            "1/16 MiB steps) the line says 512 fits with the 10% margin; the first step runs it "
            "(before the AdamW state exists) and measures it over the steady-state budget, and "
            "the planner now re-plans on that measurement instead of keeping 512 (which ran out "
            "of memory in the next step). At T=512 3 MiB the whole step fits in one micro-batch "
            "(pinned 512 runs, 1% under the budget) although an accumulating 503 does not: a "
            "step of one micro-batch allocates no gradient temporaries. It is now tried once, "
            "at a step's start, counting at most all the gradients as saved."
        )
    rows: list[Row] = []
    selected = [c for c in cases(args.quick) if not args.only or c.kind in args.only]
    for case in selected:
        rows.extend(bench_case(case, reps, shim, log))
    elapsed = time.perf_counter() - started
    notes += [tight_note(r) for r in rows
              if r.policy == "autoaccum" and r.largest < r.case.target // 64]
    slow = [c for c in selected if c.max_reps is not None and c.max_reps < reps]
    if slow:
        notes.append(
            "Repetitions: " + ", ".join(f"{c.label} {c.capacity / MIB:g} MiB" for c in slow)
            + f" ran {min(c.max_reps or reps for c in slow)} time(s), not {reps}, to keep the run "
            "short (their time column is one run; counts are deterministic for the fixed-shape "
            "models, and the lm batches are fixed by seed)."
        )

    import accelerate

    command = "python benchmarks/planning.py" + (" --quick" if args.quick else "")
    if args.reps:
        command += f" --reps {args.reps}"
    lines = verdicts(rows)
    report = "\n".join([
        "# From the first batch to a settled plan",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}  ",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, accelerate {accelerate.__version__}, "
        f"autoaccum {autoaccum.__version__}  ",
        f"Repetitions: {reps} (time: median; counts identical across repetitions unless marked "
        f"'varies'); run took {elapsed:.0f} s.",
        "",
        "Each row: a fresh model and a fresh `SimulatedDevice(capacity_bytes=capacity)`, AdamW, "
        "steps of exactly T samples. Definitions are in the docstring of "
        "`benchmarks/planning.py`. 'largest runnable' is the largest micro-batch a balanced split "
        "of T runs (pinned `micro_batch_size`) without an OOM; the baselines split with "
        "`x.split(size)`, which can run other sizes, so their fraction can pass 1.00. After "
        f"settling every policy runs {AFTER_STEPS} more steps on the unchanged device; "
        "'(then ...)' marks an OOM or plan change in them.",
        "",
        "## Goals (issue 8), autoaccum",
        "",
        *[f"- {v}" for v in lines],
        "",
        render_autoaccum([r for r in rows if r.policy == "autoaccum"]),
        "",
        "Trial micro-steps: probes plus micro-batches that ran out of memory before "
        "`opt.policy.settled`; trial steps: `policy.state_dict()['trials']` when settled (trials "
        "started; a first-step trial may run only the sizes the rest of that step allows). "
        "Peak at final: measured = the step's micro-batch peak (`opt.history[i].peak_bytes`) "
        "minus the resident baseline (bytes allocated before the step: parameters and optimizer "
        "state) minus the gradients, the largest over the steps without an OOM that ran the "
        "final size (equal "
        "to `policy.state_dict()['observed'][final]` unless the details say otherwise); "
        "predicted, end of run = `policy.memory_model.peak(final)` after the last step (the "
        "refined line passes through the largest measured size, so it equals the measurement "
        "by construction where that is the final size); predicted before it ran = the model's "
        "prediction at the first micro-batch of the first step whose largest micro-batch was "
        "the final size; in parentheses: relative to the measured. Budget = "
        "`policy.state_dict()['budget']`, the bytes a micro-batch may add above the baseline.",
        "",
        "## All policies",
        "",
        render(rows),
        "",
        render_traces(rows),
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in notes],
        "",
    ])
    print(report)
    out = args.out or (None if args.quick or args.only else ROOT / "benchmarks/results/planning.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        log(f"written to {out}")
    for v in lines:
        log(v)


if __name__ == "__main__":
    main()
