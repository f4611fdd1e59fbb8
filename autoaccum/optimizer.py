"""AutoAccumOptimizer: turns any stream of batches into optimizer steps of a fixed sample count.

The driver of one step: cut the incoming samples into micro-batches (sizes from the policy), run
forward and a weighted backward for each, and when a step's samples are all in, normalize the
accumulated gradient, clip, step the inner optimizer once and zero the gradients. The samples of the
unfinished step stay referenced on the host, so any part of a step can be replayed after an OOM.

Two paths run micro-batches (:mod:`autoaccum.micro`, also where out-of-memory errors are
recovered from). The fast path takes a call's part of a step through one tight loop
(micro-batches cut once, the output checked on the first one). The full path probes memory,
replays, and recovers from OOM one micro-batch at a time. Both record what reached ``.grad`` in the
same :class:`~autoaccum.step.StepState`, whose invariant makes any exception safe to retry.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from . import checkpoint, distributed, sharded
from . import oom as oom_mod
from . import outputs as out_mod
from .arguments import (
    build_inner,
    check_memory,
    check_positive_int,
    initial_shares,
)
from .batching import FlatBatch, flatten_batch
from .buffers import StepBuffers
from .data import ShareSchedule
from .facade import InnerFacade
from .grads import GradWatch, ZeroFills
from .memory import MemoryBackend, default_backend
from .micro import MicroBatchRunner
from .planner import (
    proportional_shares,
    state_buffers_per_param,
    step_temporaries,
    step_time,
)
from .policy import MicroBatchPolicy
from .records import History, MicroBatchSizes, Plan, StepOutOfMemoryError, StepRecord
from .step import Chunk, LossFn, StepState
from .weights import Weights

log = logging.getLogger("autoaccum")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

_NO_BATCH: Any = object()


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package (the
    user's ``opt.step``/``zero_grad`` line), however deep inside autoaccum it is raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


class AutoAccumOptimizer(MicroBatchRunner, InnerFacade):
    """Wraps an optimizer so that each of its steps sees exactly ``target_batch_size`` samples.

    Guarantees:
        * every sample counts once, in exactly one optimizer step;
        * each step applies the gradient of the mean loss over exactly ``target_batch_size``
          samples (``flush()``: over the samples left), or in token mode (``loss_fn`` returns
          ``(loss_sum, num_items)``) of the summed loss divided by the step's total item count,
          whatever the loader batch size and however the samples are cut into micro-batches;
        * no step is applied twice or on partial gradients, also after an out-of-memory error;
        * after any exception out of ``step()``/``flush()``, ``.grad`` holds exactly the
          gradients of the samples ``pending_samples - replay_samples`` counts, and every other
          pending sample is replayed by the next call. The exception's ``autoaccum_consumed``
          (also ``opt.last_call_consumed``) is how many of the call's samples went into optimizer
          steps that completed; the rest of the call's samples were dropped, so retrying
          ``batch[consumed:]`` is exact;
        * bad input raises before anything changes.

    ``param_groups``, ``state``, ``defaults`` and the hooks are the inner optimizer's at every
    moment (see :mod:`autoaccum.facade`): LR schedulers and checkpoints work as with the inner
    optimizer, also after ``load_state_dict``. ``opt.register_step_post_hook(lambda *_:
    scheduler.step())`` advances a scheduler exactly once per optimizer step.

    ``fast_path`` (a class attribute, True) lets settled steps run through the fast path; tests
    set it False to run every micro-batch through the full one. ``history_size`` (a class
    attribute, 10,000) bounds :attr:`history` to the records of the last steps.

    ``model=`` also keeps module buffers exact through replays (see :mod:`autoaccum.buffers`):
    BatchNorm running statistics are updated once per sample, after an OOM or a mid-step resume
    too.

    ``count_items(batch_part) -> int`` (token mode, optional) counts the items (tokens) of a
    slice of a batch on the host. When a step's samples arrive in one call, the step's count is
    then known before its first backward pass and each micro-batch's ``loss_sum`` is divided by it
    directly, which rounds as one big batch would (models with float32 internals, such as Llama's
    RMSNorm, otherwise differ from one big batch by rounding that AdamW amplifies).
    """

    fast_path = True
    history_size = 10_000  # steps opt.history keeps (about 250 bytes each)

    def __init__(
        self,
        optimizer: Optimizer | type[Optimizer],
        *args: Any,
        target_batch_size: int,
        micro_batch_size: int | None = None,
        memory: MemoryBackend | None = None,
        model: torch.nn.Module | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        shares: str | list[int] = "equal",
        count_items: Callable[[Any], Any] | None = None,
        fsdp_mode: str = "gather_once",
        **kwargs: Any,
    ) -> None:
        check_positive_int("target_batch_size", target_batch_size)
        if micro_batch_size is not None:
            check_positive_int("micro_batch_size", micro_batch_size)
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
            and math.isfinite(max_grad_norm) and max_grad_norm > 0
        ):
            raise ValueError(
                f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}"
            )
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        check_memory(memory)
        if count_items is not None and not callable(count_items):
            raise TypeError(f"count_items must be callable, got {type(count_items).__name__}")
        if fsdp_mode not in sharded.MODES:
            raise ValueError(f"fsdp_mode must be 'gather_once' or 'per_micro', got {fsdp_mode!r}")
        dist_ctx = distributed.context()
        world, rank = (dist_ctx.world_size, dist_ctx.rank) if dist_ctx else (1, 0)
        initial = initial_shares(shares, target_batch_size, world)
        inner = build_inner(optimizer, args, kwargs)
        # How gradients are reduced and which collectives must match: replicated, ZeRO-1 or
        # FSDP2 (refusing the rest); FSDP2 runs its step protocol in a world of one too.
        self._gsync = sharded.gradient_sync(model, inner, dist_ctx, fsdp_mode=fsdp_mode,
                                            grad_scaler=grad_scaler)
        self._sharded = self._gsync.kind == "fsdp"
        if self._sharded and dist_ctx is None:
            dist_ctx = distributed.context(single=True)

        self.optimizer = inner
        self._zero_grad_profile_name = "Optimizer.zero_grad#AutoAccumOptimizer.zero_grad"
        self._target_batch_size = target_batch_size
        self.model = model
        self.grad_scaler = grad_scaler
        self.max_grad_norm = max_grad_norm
        self.count_items = count_items
        self._refresh_params()
        self.memory = memory if memory is not None else default_backend(self._param_device)
        self.policy = MicroBatchPolicy(
            initial[rank],
            pinned=micro_batch_size,
            planning=self.memory is not None,
            final_margin=float(getattr(self.memory, "headroom", 0.0)),
            single_pass_saving=max(sharded.local_bytes([p]) for p in self._params),
            param_bytes=self._param_bytes,
        )
        self.optimizer_steps = 0
        self.oom_events = 0
        self.skipped_steps = 0
        self.last_grad_norm: torch.Tensor | None = None
        self.last_call_consumed = 0
        self.outputs: list[dict[str, Any]] = []
        # Distributed: this rank's share of every step, and how "auto" shares are recomputed.
        self.share_schedule = ShareSchedule(initial)
        self.auto_shares = shares == "auto"
        self.share_interval = 10  # steps between "auto" share updates
        self.share_lookahead = 1  # least steps between an update and its use
        self.share_min_gain = 0.03  # predicted step-time gain below which shares stay
        self._dist = dist_ctx
        self._rank = rank
        self._rates: list[list[list[float]]] = []  # per step, per rank: [samples, seconds]
        self._agreed = False  # this rank entered the current step's agreement
        self._flushed_by_peer = False
        self.history: list[StepRecord] = History(self.history_size)
        self._step = StepState(initial[rank])
        self._fills = ZeroFills()  # probes' zero gradients, None again if no sample wrote them
        self._buffers = StepBuffers(model)  # module buffers, restored when a step starts over
        self._weights = Weights()  # the fast path's backward seeds and loss-averaging weights
        self._step_seconds = 0.0
        self._step_ooms = 0
        self._step_free: int | None = None
        self._step_budget: int | None = None
        self._step_extra = 0  # bytes the gradient sync holds during the step (FSDP)
        self._dummy: tuple[FlatBatch, LossFn] | None = None  # FSDP per_micro: a padding sample
        self._baseline: int | None = None  # allocated bytes between steps
        self._last_step_end: float | None = None
        self._last_sizes: tuple[int, ...] | None = None
        self._token_mode: bool | None = None
        self._loss_fn: LossFn | None = None
        self._calls = 0
        self._call_chunks: list[Chunk] = []
        self._in_backward = False
        self._fresh = True  # no step taken or started since construction / load
        self._sentinel: tuple[torch.Tensor | None, int] | None = None  # FSDP's watch
        self._watch = GradWatch()  # every parameter's .grad when the last call returned
        self._warned: set[str] = set()
        self._retries = 0

    # ---------------------------------------------------------------- public API
    @property
    def target_batch_size(self) -> int:
        """Samples per optimizer step, across all ranks; fixed for the optimizer's life."""
        return self._target_batch_size

    @target_batch_size.setter
    def target_batch_size(self, value: Any) -> None:
        raise AttributeError(
            f"target_batch_size is fixed at {self._target_batch_size} for this optimizer's life "
            f"(its steps, plan, shares and checkpoints are built on it), got {value!r}. To "
            "train on with another batch size, flush(), then build a new AutoAccumOptimizer over "
            "the same inner optimizer with the new target_batch_size"
        )

    @property
    def plan(self) -> Plan:
        limit = self.policy.limit
        if self._last_sizes is not None:
            sizes: Sequence[int] = MicroBatchSizes(sum(self._last_sizes), limit, self._last_sizes)
        else:
            sizes = MicroBatchSizes(self._step.size, limit)
        return Plan(limit, len(sizes), sizes)

    @property
    def pending_samples(self) -> int:
        """Samples of the unfinished step (accumulated in ``.grad`` or waiting for a replay)."""
        return self._step.count

    @property
    def replay_samples(self) -> int:
        """Pending samples whose gradient is not in ``.grad`` yet; the next call replays them."""
        return self._step.count - self._step.accumulated

    def __repr__(self) -> str:
        return (f"AutoAccumOptimizer(target_batch_size={self.target_batch_size}, "
                f"micro_batch_size={self.policy.limit}, inner={self.optimizer!r})")

    def step(self, loss_fn: Any = None, batch: Any = _NO_BATCH) -> Any:  # type: ignore[override]
        """``step(loss_fn, batch)``: accumulate ``batch``, stepping whenever a step is full.

        Returns the mean loss over ``batch`` (token mode: its summed loss over its items) as a
        detached tensor on the device, with no host sync: a stack of the call's micro-batch
        losses and a dot product with cached weights, two small ops per call and none per
        micro-batch (token mode: a stack, a sum and a division). Auxiliary outputs of a
        dict-returning ``loss_fn`` are in :attr:`outputs` afterwards (one entry per micro-batch
        of this call's samples, with its ``num_samples``; each sample in exactly one entry, also
        after an OOM replay). ``step()`` / ``step(closure)`` keep
        ``torch.optim.Optimizer.step``'s meaning: one step of the inner optimizer on the
        gradients as they are.
        """
        if batch is _NO_BATCH:
            if self._step.count:
                raise RuntimeError(
                    f"step() without a batch would apply the gradients of an unfinished step "
                    f"({self.pending_samples} of {self._step.size} samples); call flush() first"
                )
            out = self.optimizer.step(loss_fn)
            self.optimizer_steps += 1
            return out
        self._calls += 1
        call = self._calls
        self.last_call_consumed = 0
        self._call_chunks = []
        self._agreed = False
        try:
            if not callable(loss_fn):
                raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
            flat = flatten_batch(batch)
            loss_fn = self._prepare_loss_fn(loss_fn)
            self._loss_fn = loss_fn
            if self.memory is None:
                loss = self._accumulate(loss_fn, flat, call)
            else:
                with self._active():
                    loss = self._accumulate(loss_fn, flat, call)
        except BaseException as exc:
            self._fail(call, exc)
            raise
        self.outputs = [a for c in self._call_chunks for a in c.aux]
        self._call_chunks = []
        self._remember_grads()
        return loss

    def flush(self, loss_fn: LossFn | None = None) -> bool:
        """End of data: one step on the samples accumulated so far, normalized by their count.

        A no-op returning False when nothing is pending. Samples restored by ``load_state_dict``
        (or waiting after a failed call) are replayed first, with their own ``loss_fn`` or, for
        restored ones, the ``loss_fn`` given here or to the last ``step()``.
        """
        if self._step.empty and self._dist is None:
            return False
        if self._step.empty and self._flushed_by_peer:
            # This rank's share of the last, partial step was full, so it joined that step from
            # step(); the ranks that were short joined it from flush(). It is done.
            self._flushed_by_peer = False
            return True
        self._calls += 1
        self.last_call_consumed = 0
        self._agreed = False
        try:
            with self._active():
                if self._step.chunks:
                    self._check_grads_untouched()
                if self._step.needs_replay:
                    self._replay(self._prepare_loss_fn(loss_fn) if loss_fn else self._loss_fn)
                return self._finish_step(flush=True)
        except BaseException as exc:
            self._fail(self._calls, exc)
            raise

    def _prepare_loss_fn(self, loss_fn: LossFn) -> LossFn:
        """The ``loss_fn`` as it runs, for every micro-batch and replay of a ``step`` or
        ``flush`` that gives one: a subclass wraps it (e.g. in a framework's autocast)."""
        return loss_fn

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients, unless samples of an unfinished step are accumulated in them:
        then it warns once and leaves them (the step needs them; the wrapper zeroes after each
        step itself)."""
        if self._step.accumulated:
            self._warn_once(
                "zero_grad",
                f"zero_grad() was called while {self._step.accumulated} samples of an unfinished "
                "step are accumulated in .grad; ignored. AutoAccumOptimizer zeroes the gradients "
                "after every optimizer step itself: drop zero_grad() from the loop.",
            )
            return
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._refresh_params()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus an ``"autoaccum"`` entry: the plan, the counters
        and compact copies of the unfinished step's samples (replayed after loading), their
        batch structure as plain data that names no code (:mod:`autoaccum.checkpoint`).
        Loadable with ``torch.load``'s default ``weights_only=True`` when the batches' non-tensor
        leaves are plain Python values, whatever the batches' container types."""
        for chunk in self._step.chunks:  # a loader that refilled them: they are not the step's
            chunk.check_unchanged()
        sd = self._gsync.optimizer_state_dict(self.optimizer)
        sd["autoaccum"] = checkpoint.entry(
            target_batch_size=self.target_batch_size, optimizer_steps=self.optimizer_steps,
            oom_events=self.oom_events, skipped_steps=self.skipped_steps,
            token_mode=self._token_mode, last_sizes=self._last_sizes,
            policy=self.policy.state_dict(), shares=self.share_schedule.state_dict(),
            step_size=self._step.size, pending=[c.flat for c in self._step.chunks],
            buffers=self._buffers.state(),
        )
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Atomic: a bad checkpoint raises and changes nothing.

        Pending samples are replayed into zeroed gradients by the next ``step()``/``flush()``,
        whatever ``.grad`` held (a load mid-step into the same live objects, into fresh ones, or
        after gradients were copied all continue exactly), and the restored plan needs no probes.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"load_state_dict expects the dict state_dict() returns, got "
                            f"{type(state_dict).__name__}")
        state_dict = dict(state_dict)
        own = state_dict.pop("autoaccum", None)
        restored = None
        if own is not None:
            restored = checkpoint.parse_entry(
                own, target_batch_size=self.target_batch_size,
                world=self._dist.world_size if self._dist is not None else 1, rank=self._rank,
                new_policy=self._new_policy,
                devices=(torch.device("cpu"), self._param_device),
                check_buffers=self._buffers.check,
            )
        self._gsync.load_optimizer_state_dict(self.optimizer, state_dict)
        self._gsync.end_step()  # FSDP: the next call starts the step's collectives afresh
        self._refresh_params()
        self._fresh = True
        if restored is None:
            return
        self.optimizer_steps = restored.optimizer_steps
        self.oom_events = restored.oom_events
        self.skipped_steps = restored.skipped_steps
        self._token_mode = None  # read again from loss_fn's first output (the replay's)
        self._last_sizes = restored.last_sizes
        self.policy = restored.policy
        self.share_schedule = restored.schedule
        self._step = StepState(restored.step_size)
        for flat in restored.pending:
            self._step.add(Chunk(flat, _replay_needs_loss_fn, call=-1))
        self._count_chunks(self._step.chunks)
        self._clear_grads()  # pending samples are replayed into zeros
        if restored.buffers is not None:  # ... from the model's buffers at the step's start
            self._buffers.load(*restored.buffers)
        self._sentinel = None
        self._remember_grads()  # gradients copied in before the next call are not the step's
        self._baseline = None  # resident bytes are measured again at the next step

    # ---------------------------------------------------------------- internals: setup
    def _refresh_params(self) -> None:
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not self._params:
            raise ValueError("the optimizer has no parameters")
        self._trainable = [p for p in self._params if p.requires_grad]
        self._param_device = self._params[0].device
        self._fills = ZeroFills()
        self._param_bytes = sharded.local_bytes(self._params)  # this rank's shards
        self._grad_bytes = sharded.local_bytes(self._trainable)
        # The optimizer that allocates this rank's state and the parameters it keeps state for
        # (ZeRO-1: the local optimizer and this rank's partition).
        self._state_opt, self._state_params = self._gsync.state_owner(self.optimizer,
                                                                      self._params)
        self._state_complete = False
        self._bucket_complete = False

    def _new_policy(self) -> MicroBatchPolicy:
        """A policy with this optimizer's settings and no history (a checkpoint's goes in)."""
        p = self.policy
        return MicroBatchPolicy(
            p.cap, pinned=p.pinned, planning=self.memory is not None, margin=p.margin,
            final_margin=p.final_margin, grow_after=p.grow_after,
            replan_tolerance=p.replan_tolerance, single_pass_saving=p.single_pass_saving,
            param_bytes=p.param_bytes,
        )

    def _resident(self) -> Iterator[torch.Tensor]:
        for p in self._params:
            yield p
            if p.grad is not None:
                yield p.grad
        for st in self._state_opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    yield v
        yield from self._gsync.buffers()

    def _active(self) -> contextlib.AbstractContextManager[None]:
        if self.memory is None:
            return contextlib.nullcontext()
        resident = self._resident()  # memory backends count local shards, not global tensors
        return self.memory.active(sharded.local_tensors(resident) if self._sharded else resident)

    # ---------------------------------------------------------------- internals: a call
    def _accumulate(self, loss_fn: LossFn, flat: FlatBatch, call: int) -> torch.Tensor:
        step = self._step
        self._check_grads_untouched()
        if step.chunks and step.needs_replay:
            self._replay(loss_fn, live=flat)
        offset = 0
        n = flat.size
        counting = self.count_items is not None
        while offset < n:
            if not step.chunks:
                self._start_step()
            take = min(n - offset, step.size - step.count)
            part = flat.slice(offset, offset + take)
            chunk = Chunk(part, loss_fn, call, self._count(part) if counting else None)
            step.add(chunk)
            self._call_chunks.append(chunk)
            offset += take
            if self._sharded and self._gsync.defers_micro_batches:
                pass  # FSDP per_micro: every rank runs its micro-batches at the step's end
            elif self.fast_path and not self.policy.probing:
                failure = self._run_fast(chunk)
                if failure is not None:  # the fast path's frame, and the failed graph, are gone
                    self._recover(failure)
                    self._drain()
            else:
                self._drain()
            if self._token_mode:
                self._check_call_items(chunk)
            if step.count == step.size:
                self._finish_step()
                self.last_call_consumed = offset
        return self._call_loss()

    def _call_loss(self) -> torch.Tensor:
        """The call's mean loss (token mode: summed loss over summed items), no host sync. The
        common case, a call whose micro-batches all ran on the fast path, costs two small ops:
        a stack of their raw losses and a dot product with cached weights (token mode: a stack,
        a sum and a division by the items). Drops the call's references to the losses."""
        token = self._token_mode
        total: Any = 0.0
        count: Any = 0
        chunks = self._call_chunks
        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            ran = False
            for c in chunks:
                raw, c.raw = c.raw, []
                losses, c.losses = c.losses, []
                if not raw and not losses:  # FSDP per_micro: waits for the step's end
                    continue
                ran = True
                n = self._check_call_items(c) if token else c.size
                if raw and not losses and len(chunks) == 1:  # the common case
                    stacked = torch.stack(raw)
                    if token:
                        return stacked.sum() / n
                    return _dot(self._weights.mean(c.sizes, stacked), stacked)
                # Otherwise in the step's units (each loss divided by the step's denominator and,
                # mean mode, times its size), as the full path records them.
                if raw:
                    stacked = torch.stack(raw)
                    if token:
                        losses.append(stacked.sum() / c.den)
                    else:  # cached weights: no host-to-device copy (a sync on CUDA)
                        sizes = c.sizes[: len(raw)]
                        mean = _dot(self._weights.mean(sizes, stacked), stacked)
                        losses.append(mean * (sum(sizes) / c.den))
                part = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
                if len(chunks) == 1:
                    if isinstance(n, (int, float)):  # no items: the mean over none is NaN
                        return part if n == c.den else part * (c.den / n if n else math.nan)
                    return part * c.den / n
                total = total + part * c.den
                count = count + n
            if not ran or (isinstance(count, (int, float)) and not count):
                return torch.full((), math.nan, device=self._param_device)
            return total / count
        finally:
            torch._C._set_grad_enabled(grad_mode)

    def _fail(self, call: int, exc: BaseException) -> None:
        """Restore the invariant after ``exc``: drop what this call brought to the unfinished
        step; if a partial gradient may be in ``.grad``, clear it and mark the rest for replay.
        Then tell the other ranks and annotate the exception."""
        step = self._step
        in_backward = self._in_backward
        partial = in_backward or self._gsync.rewind_on_failure or any(
            c.done for c in step.chunks if c.call == call
        )
        step.drop_call(call)
        self._in_backward = False
        if partial or self._buffers.active:  # a forward may have updated buffers too
            step.rewind(self._restart)
        elif not step.accumulated:
            self._clear_grads()  # e.g. a failed probe's zero gradients: nothing to keep
        self._call_chunks = []
        self.outputs = []
        self._tell_peers(exc, in_backward)
        consumed = self.last_call_consumed
        with contextlib.suppress(Exception):
            exc.autoaccum_consumed = consumed  # type: ignore[attr-defined]
            note = (f"autoaccum: {consumed} of this call's samples went into optimizer steps "
                    "that completed; its other samples were dropped (retry with the rest)")
            add_note = getattr(exc, "add_note", None)
            if add_note is not None and consumed:
                add_note(note)
        self._remember_grads()

    def _clear_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._gsync.clear_local_grads()
        self._fills.clear()
        self._watch.forget()  # its references would keep the dropped gradients alive

    def _restart(self) -> None:
        """The step's accumulation starts over: no gradient, the buffers of its start."""
        self._clear_grads()
        self._buffers.restore()

    def _refresh_trainable(self) -> None:
        """The parameters that require gradients now (a backbone unfrozen mid-run joins at the
        next step boundary)."""
        trainable = [p for p in self._params if p.requires_grad]
        if len(trainable) != len(self._trainable) or any(
                a is not b for a, b in zip(trainable, self._trainable)):
            self._trainable = trainable
            self._grad_bytes = sharded.local_bytes(trainable)

    def _count(self, part: FlatBatch) -> int:
        assert self.count_items is not None
        n = self.count_items(part.unflatten())
        value = int(n.item() if isinstance(n, torch.Tensor) else n)
        if value < 0:
            raise ValueError(f"count_items returned {value}; expected a count >= 0")
        return value

    def _count_chunks(self, chunks: list[Chunk]) -> None:
        if self.count_items is not None:
            for c in chunks:
                c.counted = self._count(c.flat)

    def _replay(self, loss_fn: LossFn | None, live: FlatBatch | None = None) -> None:
        """Recompute the gradients of pending samples that are not in ``.grad``. Samples restored
        by ``load_state_dict`` take the container types of ``live`` (this call's batch) where
        they have its structure; otherwise they run as the stand-ins the checkpoint allows."""
        for chunk in self._step.chunks:
            if chunk.flat.restored is not None and not (
                live is not None and checkpoint.adopt(chunk.flat, live)
            ):
                self._warn_once(
                    "restored-types",
                    "samples restored from a checkpoint are replayed with stand-in containers "
                    "(a dict for a Mapping type, a namedtuple 'RestoredBatch' of the same fields "
                    "for a namedtuple type): a checkpoint names no code, and no batch of the same "
                    "structure was given to take the types from. Call step(loss_fn, batch) with "
                    "the next batch before flush() to replay them with its types.",
                )
                chunk.flat.restored = None
            if chunk.loss_fn is _replay_needs_loss_fn:
                if loss_fn is None:
                    raise RuntimeError("pending samples restored by load_state_dict must be "
                                       "replayed: pass the loss_fn to flush() or call step()")
                chunk.loss_fn = loss_fn
            chunk.check_unchanged()
        if self._buffers.restore_before_replay:
            self._buffers.restore()
        self._begin_sync()
        self._drain()

    def _check_grads_untouched(self) -> None:
        """Gradients changed since the last call returned. None of it is a gradient of this
        step's samples: with samples accumulated (``model.zero_grad()``, ``clip_grad_norm_`` in
        the loop), warn once and replay them; otherwise (another optimizer's or an attack's
        backward, a copy into ``.grad``) warn once and discard it, as ``zero_grad()`` would."""
        if self._sharded:  # FSDP accumulates into unsharded holders: watch the first one
            if self._sentinel is None or not self._step.accumulated:
                return
            grad, version = self._sentinel
            now = self._accumulator_grad()
            if now is grad and (now is None or now._version == version):
                return
            changed = 1
        else:
            changed = self._watch.changed(self._params)
            if not changed:
                return
        if self._step.accumulated:
            self._warn_once(
                "grads-touched",
                "the gradients of the unfinished step were changed between step() calls "
                "(zero_grad, clip_grad_norm_, another backward or in-place change); "
                "AutoAccumOptimizer replays the step's samples to restore them. Drop backward/"
                "zero_grad/clip_grad_norm_ from the loop: use max_grad_norm= to clip once per "
                "step on the full gradient.",
            )
            self._step.rewind(self._restart)
            return
        self._warn_once(
            "grads-foreign",
            f"{changed} parameter(s) of this optimizer had gradients written outside opt.step "
            "(another optimizer's backward, as in a GAN; an adversarial attack's backward; "
            "gradients copied into .grad); AutoAccumOptimizer discards them, as zero_grad() "
            "would: an optimizer step applies only the gradients of its own samples.",
        )
        self._clear_grads()

    def _remember_grads(self) -> None:
        if not self._sharded:
            self._watch.mark(self._params)
        elif self._trainable:
            g = self._accumulator_grad()
            self._sentinel = (g, g._version if g is not None else 0)

    def _accumulator_grad(self) -> torch.Tensor | None:
        """The gradient the step accumulates into (FSDP: an unsharded one), first parameter."""
        if not self._sharded:
            return self._trainable[0].grad if self._trainable else None
        holder = self._gsync.accumulator(self._trainable)
        return holder.grad if holder is not None else None

    def _check_call_items(self, chunk: Chunk) -> Any:
        """The chunk's item counts summed once (token mode), raising if one is unusable; cached
        on the chunk until its micro-batches change (a replay)."""
        cached = chunk.item_sum
        if cached is not None and cached[0] == len(chunk.items):
            return cached[1]
        total, bad = out_mod.item_total(chunk.items)
        if bad is not None:
            raise ValueError(f"{bad}; expected finite counts >= 0 (the call's samples are "
                             "dropped, earlier samples stay)")
        chunk.item_sum = (len(chunk.items), total)
        return total

    # ---------------------------------------------------------------- internals: a step
    def _start_step(self) -> None:
        """Once per step, before its first micro-batch: this rank's share, the memory budget."""
        step = self._step
        if self._dist is not None:  # one process: the share is always the whole target
            step.size = self.share_schedule.shares_for(self.optimizer_steps)[self._rank]
            self.policy.set_cap(step.size)
        self._step_seconds = 0.0
        self._step_ooms = 0
        self._agreed = False
        if self._last_step_end is None:
            self._last_step_end = time.perf_counter()
        self._refresh_trainable()
        if self._fresh:
            self._fresh = False
            self._clear_grads()  # a step starts from zero gradients, whatever the user left
        self._buffers.save()
        self._step_extra = self._gsync.extra_bytes()
        if self.memory is not None:  # measured before FSDP gathers anything for the step
            free = self.memory.free_bytes()
            self.memory.reset_peak()
            if self._baseline is None:
                self._baseline = self.memory.allocated_bytes()
            self._step_free = free
            self._step_budget = (free - self._grad_bytes - self._reserve_bytes()
                                 - self._step_extra)
            if self.optimizer_steps == 0 and self.policy.probing:
                self._check_inner_step_fits(free)
            self.policy.observe_start(self._step_budget)
        self._begin_sync()

    def _begin_sync(self) -> None:
        """The gradient sync's step start (FSDP gather_once: every unit gathered), once per
        step on every rank, before its first micro-batch or, without samples, its agreement."""
        if self._dist is not None and not self._gsync.in_step:
            self._gsync.begin_step()

    def _reserve_bytes(self) -> int:
        """What the first steps will allocate and keep: the inner optimizer's state and, in a
        distributed job, the gradient reduction's bucket."""
        return self._state_reserve_bytes() + self._bucket_reserve_bytes()

    def _bucket_reserve_bytes(self) -> int:
        """The gradient reduction's bucket, until a multi-rank step has allocated it."""
        if self._dist is None or self._bucket_complete:
            return 0
        bucket = self._gsync.reduction_bytes(self._trainable)
        self._bucket_complete = bucket == 0 and self.optimizer_steps > 0
        return bucket

    def _state_reserve_bytes(self) -> int:
        """Optimizer state the inner optimizer will allocate at its first step."""
        if self._state_complete:
            return 0
        inner = self._state_opt  # ZeRO-1: the local optimizer, over this rank's partition
        missing = [p for p in self._state_params if p.requires_grad and not inner.state.get(p)]
        if not missing and self.optimizer_steps > 0:
            self._state_complete = True
        return state_buffers_per_param(inner) * sharded.local_bytes(missing)

    def _check_inner_step_fits(self, free: int) -> None:
        """Before training: gradients, optimizer state and the inner step's temporaries must fit,
        or no micro-batch size can help."""
        state = self._state_reserve_bytes()
        bucket = self._bucket_reserve_bytes()
        trained = [p for p in self._state_params if p.requires_grad]
        temps = step_temporaries(self._state_opt, list(sharded.local_tensors(trained)))
        need = self._grad_bytes + state + bucket + temps
        if need <= free:
            return
        mib = 2**20
        reduction = f", the gradient reduction's bucket {bucket / mib:.1f} MiB" if bucket else ""
        raise StepOutOfMemoryError(
            f"the optimizer step cannot fit: it needs {need / mib:.1f} MiB (gradients "
            f"{self._grad_bytes / mib:.1f} MiB, {type(self.optimizer).__name__} state "
            f"{state / mib:.1f} MiB{reduction}, its step's temporaries {temps / mib:.1f} MiB) and "
            f"{free / mib:.1f} MiB is free before any micro-batch. No micro-batch size can fix "
            "this. Remedies: fused=True (no temporaries) or foreach=False (one parameter's "
            "worth), an optimizer with less state (SGD, Adafactor), bf16 weights, a smaller "
            "model, or sharding (ZeRO-1, FSDP2)."
        )

    def _finish_step(self, flush: bool = False) -> bool:
        """All of the step's samples are in .grad: agree across ranks, normalize, reduce, clip,
        step once, zero. Returns False when no rank had a sample (a distributed flush)."""
        step = self._step
        if self._dist is not None:
            self._begin_sync()  # a rank without samples in this step (a flush) joins it here
            if self._gsync.rounds:
                self._run_rounds()
        self._refresh_trainable()
        if not self._sharded:  # (FSDP reduces every sharded gradient, zeros included)
            self._fills.unfill()
        samples = step.count
        items = (sum(self._check_call_items(c) for c in step.chunks) if self._token_mode
                 else samples)
        denominator = step.denominator if step.denominator is not None else step.size
        table = None
        peak = self.memory.peak_bytes() if self.memory is not None else None
        if self._dist is not None:
            used = self._used_mask()  # before prepare() fills the missing gradients
            self._gsync.prepare(self._trainable)  # e.g. zeros and the bucket, before agreeing
            table = self._agree(True, items, samples, flush=flush, used=used)
            self._drop_unused(table)
            self._flushed_by_peer = not flush and bool(table[:, distributed.FLUSH].any())
            total: Any = float(table[:, distributed.ITEMS].sum())
            if total == 0:
                step.take()
                self._gsync.end_step()
                return False
        else:
            total = items
            if not bool(total > 0):  # a host sync only for tensor counts, once per step
                raise ValueError(f"the step's num_items sum to {float(total)}; expected > 0 "
                                 "(every item of the step was masked out?)")
        finished = step.take()
        self._buffers.end_step()  # the step's samples are consumed, and so are their updates
        if len(finished) == 1:
            if finished[0].call == self._calls:
                self.last_call_consumed += finished[0].size
            self._last_sizes = tuple(finished[0].sizes)
        else:
            self.last_call_consumed += sum(c.size for c in finished if c.call == self._calls)
            self._last_sizes = tuple(s for c in finished for s in c.sizes)
        try:
            self._apply(total, denominator)
        finally:
            self._clear_grads()
            self._gsync.end_step()
        self._agreed = False  # (after a failure it stays set: the peers already know)
        self.optimizer_steps += 1
        self._end_of_step(samples, peak)
        if table is not None:
            self._update_shares(table)
        return True

    def _apply(self, total: Any, denominator: int) -> None:
        """Normalize, reduce (multi-rank), unscale, clip and step once. Any failure here ends the
        step (its samples count as consumed; parameters may be partly updated); in a multi-rank
        job every rank learns of it in the closing confirmation."""
        exact = type(total) is int and total == denominator
        error: BaseException | None = None
        # .grad holds (sum of this rank's contributions) / denominator; make it this rank's
        # part of the global mean (a no-op for a full single-process step in mean mode).
        if self._dist is not None:  # scaled, summed over the ranks, inner step: the strategy's
            error = self._gsync.reduce(self._dist, self._trainable, denominator / total)
            if error is None:
                try:
                    self._gsync.step(self._inner_step)
                except BaseException as exc:
                    error = exc
        else:
            try:
                grads = [] if exact else [p.grad for p in self._trainable if p.grad is not None]
                if grads:
                    _rescale(grads, denominator, total)
                self._inner_step()
            except BaseException as exc:
                error = exc
        if error is not None and oom_mod.is_oom(error):
            self.oom_events += 1
            message = oom_mod.describe(error)
            error = StepOutOfMemoryError(
                f"the optimizer step (normalization, reduction, clipping or the inner step) ran "
                f"out of memory; parameters may be partly updated and the step is not retried: "
                f"{message}"
            )
        if self._dist is not None:
            distributed.confirm(self._dist, error, f"optimizer step {self.optimizer_steps + 1}")
            self._gsync.after_confirm()  # ZeRO-1: the parameter broadcast, now that all succeeded
        elif error is not None:
            raise error

    def _inner_step(self) -> None:
        inner = self.optimizer
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(inner)
        if self.max_grad_norm is not None:
            self.last_grad_norm = self._gsync.clip(self._trainable, self.max_grad_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(inner)
            if self.grad_scaler.is_enabled():
                found = self.grad_scaler._found_inf_per_device(inner).values()
                self.skipped_steps += bool(sum(v.item() for v in found))
            self.grad_scaler.update()
        else:
            inner.step()
        if torch.is_autocast_enabled(self._param_device.type):
            # A call wrapped in autocast (its weight cache on by default) would run the rest of
            # its micro-batches on low-precision copies of the weights from before this step.
            torch.clear_autocast_cache()

    def _end_of_step(self, samples: int, peak: int | None) -> None:
        """Record the step and tell the policy what it measured."""
        now = time.perf_counter()
        seconds = now - (self._last_step_end or now)
        self._last_step_end = now
        sizes = self._last_sizes or (0,)
        largest = max(sizes)
        measured: float | None = None
        thrash = False
        if self.memory is not None and peak is not None:
            if self._baseline is not None:
                measured = float(peak - self._baseline - self._grad_bytes - self._step_extra)
            # Resident bytes between steps (gradients cleared): the next step's baseline.
            self._baseline = self.memory.allocated_bytes()
            retries = getattr(self.memory, "alloc_retries", None)
            if retries is not None:
                now_retries = int(retries())
                thrash = now_retries > self._retries and self._step_ooms == 0
                self._retries = now_retries
        self.history.append(StepRecord(  # positional: this runs every step
            self.optimizer_steps, samples, largest, len(sizes), self._step_ooms, peak,
            self._step_free, seconds, samples / seconds if seconds > 0 else math.nan,
            self._step_seconds, self.policy.limit,
        ))
        if self.policy.active:
            self.policy.end_of_step(largest, measured, self._step_budget, self._step_ooms > 0,
                                    thrash)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=_user_stacklevel())
            log.warning(message)

    # ---------------------------------------------------------------- distributed
    def _agree(
        self, ok: bool, items: Any, samples: int, message: str | None = None, flush: bool = False,
        used: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step's agreement: every rank's status, items, speed and sampler position, and
        (replicated and ZeRO-1) which parameters its samples gave a gradient."""
        assert self._dist is not None
        row = [float(ok), items, self._step_seconds, samples, float(flush),
               float(self.share_schedule.last_read)]
        if used is None and not self._sharded:  # a failing rank's row: as long as the others'
            used = torch.zeros(len(self._trainable), dtype=torch.float64)
        self._agreed = True
        table = distributed.agree(self._dist, row, used)
        failed = [r for r in range(self._dist.world_size) if table[r, distributed.OK] == 0]
        if failed:
            messages = distributed.exchange_messages(self._dist, message)
            if ok:
                details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
                raise distributed.PeerFailedError(
                    f"optimizer step {self.optimizer_steps + 1} stopped on every rank because "
                    f"another rank failed ({details})"
                )
        return table

    def _used_mask(self) -> torch.Tensor | None:
        """1 for each trainable parameter this rank's samples gave a gradient (replicated and
        ZeRO-1; FSDP reduces every shard)."""
        if self._sharded:
            return None
        return torch.tensor([p.grad is not None for p in self._trainable], dtype=torch.float64)

    def _drop_unused(self, table: torch.Tensor) -> None:
        """A parameter no rank's samples reached ends the step with ``.grad`` None on every rank
        (as in real DDP with ``find_unused_parameters=True``): optimizers skip it, and the
        reduction leaves it out, the same on every rank."""
        if self._sharded:
            return
        used = table[:, distributed.ROW:].amax(0).tolist()
        for p, u in zip(self._trainable, used):
            if not u:
                p.grad = None

    def _tell_peers(self, exc: BaseException, in_backward: bool = False) -> None:
        """This rank is about to raise before reaching the step's agreement: let the others stop
        there (FSDP: at the guard exchange they are at) instead of waiting forever. After the
        agreement, the closing confirmation tells them instead."""
        told = self._gsync.fail(exc, in_backward, self._agreed)
        if self._dist is None or self._agreed or told or isinstance(exc,
                                                                    distributed.PeerFailedError):
            return
        message = f"{type(exc).__name__}: {oom_mod.describe(exc)}"
        with contextlib.suppress(Exception):
            self._agree(False, 0, 0, message)

    def _update_shares(self, table: torch.Tensor) -> None:
        """"auto" shares: every ``share_interval`` steps, shares proportional to the measured
        throughput, identical on every rank (computed from the same gathered table), in force
        from the first step no sampler on any rank has read yet."""
        if not self.auto_shares:
            return
        rows: list[list[float]] = table[:, [distributed.SAMPLES, distributed.SECONDS]].tolist()
        self._rates.append(rows)
        if len(self._rates) < self.share_interval:
            return
        window, self._rates = self._rates, []
        rates = [
            sum(step[r][0] for step in window) / max(sum(step[r][1] for step in window), 1e-9)
            for r in range(len(window[0]))
        ]
        current = self.share_schedule.shares_for(self.optimizer_steps)
        new = proportional_shares(self.target_batch_size, rates)
        # Change only for a real gain in predicted step time (the slowest rank's), not to chase
        # measurement noise.
        if step_time(new, rates) < (1 - self.share_min_gain) * step_time(current, rates):
            read = int(table[:, distributed.LAST_READ].max())
            start = max(self.optimizer_steps + self.share_lookahead, read + 1,
                        self.share_schedule.last_read + 1)
            self.share_schedule.set_from(start, new)
            log.info("shares %s -> %s from step %d (throughput %s samples/s)", list(current), new,
                     start, [round(r, 1) for r in rates])


def _rescale(grads: list[torch.Tensor], denominator: int, total: Any) -> None:
    """Multiply every gradient by ``denominator / total`` in its own dtype: the factor is a
    float64 host scalar, or for a tensor count a float64 tensor cast per dtype and device (one
    cast for the first gradient's dtype would round a float64 gradient to float32's factor)."""
    if not isinstance(total, torch.Tensor):
        torch._foreach_mul_(grads, denominator / total)
        return
    factor = denominator / total.to(torch.float64)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    for (dtype, device), group in groups.items():
        torch._foreach_mul_(group, factor.to(device=device, dtype=dtype))


def _dot(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``weights`` (a vector) times the stacked losses (0-d each, or one element)."""
    return torch.dot(weights, stacked) if stacked.dim() == 1 else weights @ stacked


def _replay_needs_loss_fn(_: Any) -> Any:
    raise RuntimeError("pending samples restored by load_state_dict need a loss_fn to replay")
