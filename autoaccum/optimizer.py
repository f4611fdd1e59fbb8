"""AutoAccumOptimizer: turns any stream of batches into optimizer steps of a fixed sample count.

The driver of one step: cut the incoming samples into micro-batches (sizes from the policy), run
forward and a weighted backward for each, and when a step's samples are all in, normalize the
accumulated gradient, clip, step the inner optimizer once and zero the gradients. The samples of the
unfinished step stay referenced on the host, so any part of a step can be replayed after an OOM.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

from . import distributed
from . import oom as oom_mod
from .batching import FlatBatch, flatten_batch
from .data import ShareSchedule
from .memory import MemoryBackend, default_backend
from .planner import (
    balanced_split,
    check_shares,
    equal_shares,
    first_split,
    proportional_shares,
    state_buffers_per_param,
    step_time,
)
from .policy import MicroBatchPolicy, OutOfMemoryForOneSample

log = logging.getLogger("autoaccum")

LossFn = Callable[[Any], Any]
_WRAPPER_KEYWORDS = (
    "target_batch_size", "micro_batch_size", "memory", "model", "grad_scaler", "max_grad_norm",
    "shares",
)
_NO_BATCH: Any = object()
_NULL_CONTEXT = contextlib.nullcontext()  # reusable


class Plan(NamedTuple):
    """How steps are cut into micro-batches.

    ``micro_batch_size`` is the current limit (None: no limit, one micro-batch per call).
    ``micro_batch_sizes`` are the micro-batches of the last finished step (before the first step,
    the planned split of a full one); ``accumulation_steps`` is their count.
    """

    micro_batch_size: int | None
    accumulation_steps: int
    micro_batch_sizes: tuple[int, ...]


class StepRecord(NamedTuple):
    """What one optimizer step did (``opt.history``); memory fields are None without a backend."""

    step: int
    samples: int  # this rank's samples in the step
    micro_batch_size: int  # largest micro-batch that ran
    accumulation_steps: int  # micro-batches whose gradients the step used
    oom_events: int  # OOMs recovered from during the step
    peak_bytes: int | None  # peak allocated during the step
    free_bytes: int | None  # free at the end of the step
    seconds: float  # wall time since the previous step ended (data loading included)
    samples_per_s: float  # samples / seconds, this rank
    compute_seconds: float  # this rank's forward/backward time in the step (no waiting, no data)


class StepOutOfMemoryError(RuntimeError):
    """The inner optimizer's step ran out of memory; parameters may be partly updated."""


@dataclass
class _Chunk:
    """Samples of the unfinished step that came from one ``step()`` call."""

    samples: FlatBatch
    loss_fn: LossFn
    call: int
    done: int = 0  # samples whose gradient is in .grad
    # Per micro-batch whose gradient is in .grad: its detached loss (mean or token sum), its item
    # count (samples, or num_items in token mode) and its size. Combined once per call or step,
    # never per micro-batch.
    losses: list[torch.Tensor] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def restart(self) -> None:
        self.done, self.losses, self.items, self.sizes = 0, [], [], []


class _Oom(NamedTuple):
    size: int
    phase: str
    message: str


class AutoAccumOptimizer(Optimizer):
    """Wraps an optimizer so that each of its steps sees exactly ``target_batch_size`` samples.

    Guarantees:
        * every sample counts once, in exactly one optimizer step;
        * each step applies the gradient of the mean loss over exactly ``target_batch_size``
          samples (``flush()``: over the samples left), or in token mode (``loss_fn`` returns
          ``(loss_sum, num_items)``) of the summed loss divided by the step's total item count,
          whatever the loader batch size and however the samples are cut into micro-batches;
        * no step is applied twice or on partial gradients, also after an out-of-memory error;
        * bad input raises before anything changes; an error inside ``loss_fn`` leaves the
          gradients as they were after the last complete ``step()`` call.

    ``param_groups`` and ``state`` are the inner optimizer's: LR schedulers and checkpoints work as
    with the inner optimizer. Step hooks registered on the wrapper run on each inner step, so
    ``opt.register_step_post_hook(lambda *_: scheduler.step())`` advances a scheduler exactly once
    per optimizer step.
    """

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
        **kwargs: Any,
    ) -> None:
        _check_positive_int("target_batch_size", target_batch_size)
        if micro_batch_size is not None:
            _check_positive_int("micro_batch_size", micro_batch_size)
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0
        ):
            raise ValueError(
                f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}"
            )
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        if memory is not None and not isinstance(memory, MemoryBackend):
            raise TypeError(
                f"memory must follow autoaccum.MemoryBackend (free_bytes, allocated_bytes, "
                f"reset_peak, peak_bytes, release, active), got {type(memory).__name__}"
            )
        dist_ctx = distributed.context()
        world, rank = (dist_ctx.world_size, dist_ctx.rank) if dist_ctx else (1, 0)
        initial = _initial_shares(shares, target_batch_size, world)
        inner = _build_inner(optimizer, args, kwargs)
        if dist_ctx is not None:
            distributed.check_replicated(p for g in inner.param_groups for p in g["params"])

        self.optimizer = inner
        self.defaults = inner.defaults
        self.param_groups = inner.param_groups
        self.state = inner.state
        # Step hooks are shared: hooks registered on the wrapper fire on each real step.
        self._optimizer_step_pre_hooks = inner._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = inner._optimizer_step_post_hooks
        self._optimizer_state_dict_pre_hooks = inner._optimizer_state_dict_pre_hooks
        self._optimizer_state_dict_post_hooks = inner._optimizer_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = inner._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_post_hooks = inner._optimizer_load_state_dict_post_hooks
        self._zero_grad_profile_name = "Optimizer.zero_grad#AutoAccumOptimizer.zero_grad"

        self.target_batch_size = target_batch_size
        self.model = model
        self.grad_scaler = grad_scaler
        self.max_grad_norm = max_grad_norm
        self.memory = memory if memory is not None else default_backend(self._device())
        self.policy = MicroBatchPolicy(
            target_batch_size,
            pinned=micro_batch_size,
            planning=self.memory is not None,
            single_pass_saving=max(p.numel() * p.element_size() for p in self._params()),
        )
        self.optimizer_steps = 0
        self.oom_events = 0
        self.skipped_steps = 0
        self.last_grad_norm: torch.Tensor | None = None
        # Distributed: this rank's share of every step, and how "auto" shares are recomputed.
        self.share_schedule = ShareSchedule(initial)
        self.auto_shares = shares == "auto"
        self.share_interval = 10  # steps between "auto" share updates
        self.share_lookahead = 8  # steps between an update and its use (data-loader prefetch)
        self.share_min_gain = 0.03  # predicted step-time gain below which shares stay
        self._dist = dist_ctx
        self._rank = rank
        self._step_size = initial[rank]
        self._step_seconds = 0.0
        self._rates: list[list[list[float]]] = []  # per step, per rank: [samples, seconds]
        self._in_collective = False
        self._flushed_by_peer = False
        self.history: list[StepRecord] = []
        self._last_step_end: float | None = None
        self._pending: list[_Chunk] = []
        self._pending_count = 0  # samples in _pending
        self._cursor = 0  # index of the first pending chunk not fully accumulated
        self._needs_replay = False
        self._calls = 0
        self._last_sizes: tuple[int, ...] | None = None
        self._token_mode: bool | None = None
        self._loss_fn: LossFn | None = None
        self._grads_touched = False
        self._step_ooms = 0
        self._param_device = self._device()

    # ---------------------------------------------------------------- public API
    @property
    def plan(self) -> Plan:
        limit = self.policy.limit
        sizes = self._last_sizes or tuple(balanced_split(self._step_size, limit))
        return Plan(limit, len(sizes), sizes)

    @property
    def pending_samples(self) -> int:
        """Samples of the unfinished step (already accumulated or waiting for a replay)."""
        return self._pending_count

    def step(self, loss_fn: Any = None, batch: Any = _NO_BATCH) -> Any:  # type: ignore[override]
        """``step(loss_fn, batch)``: accumulate ``batch``, stepping whenever a step is full.

        Returns the mean loss over ``batch`` as a detached tensor (no host sync).
        ``step()`` / ``step(closure)`` keep ``torch.optim.Optimizer.step``'s meaning: one step of
        the inner optimizer on the gradients as they are.
        """
        if batch is _NO_BATCH:
            if self._pending:
                raise RuntimeError(
                    f"step() without a batch would apply the gradients of an unfinished step "
                    f"({self.pending_samples} of {self._step_size} samples); call flush() first"
                )
            out = self.optimizer.step(loss_fn)
            self.optimizer_steps += 1
            return out
        try:
            if not callable(loss_fn):
                raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
            flat = flatten_batch(batch)
            self._loss_fn = loss_fn
            with self._active():
                return self._accumulate(loss_fn, flat)
        except BaseException as exc:
            self._tell_peers(exc)
            raise

    def flush(self, loss_fn: LossFn | None = None) -> bool:
        """End of data: one step on the samples accumulated so far, normalized by their count.

        A no-op returning False when nothing is pending. ``loss_fn`` is needed only after
        ``load_state_dict`` restored pending samples and no ``step()`` call followed.
        """
        if not self._pending and self._dist is None:
            return False
        if not self._pending and self._flushed_by_peer:
            # This rank's share of the last, partial step was full, so it joined that step from
            # step(); the ranks that were short joined it from flush(). It is done.
            self._flushed_by_peer = False
            return True
        try:
            with self._active():
                if self._needs_replay:
                    fn = loss_fn or self._loss_fn
                    if fn is None:
                        raise RuntimeError("flush() must replay samples restored by "
                                           "load_state_dict: pass the loss_fn")
                    self._replay(fn)
                return self._finish_step(flush=True)
        except BaseException as exc:
            self._tell_peers(exc)
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus an ``"autoaccum"`` entry: the plan, the counters
        and the host-side samples of the unfinished step (replayed after loading)."""
        sd = self.optimizer.state_dict()
        sd["autoaccum"] = {
            "version": 1,
            "target_batch_size": self.target_batch_size,
            "optimizer_steps": self.optimizer_steps,
            "oom_events": self.oom_events,
            "skipped_steps": self.skipped_steps,
            "token_mode": self._token_mode,
            "last_sizes": self._last_sizes,
            "policy": self.policy.state_dict(),
            "shares": self.share_schedule.state_dict(),
            "pending": [c.samples.unflatten() for c in self._pending],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("autoaccum", None)
        if own is not None and own["target_batch_size"] != self.target_batch_size:
            raise ValueError(
                f"checkpoint was made with target_batch_size={own['target_batch_size']}, this "
                f"optimizer has {self.target_batch_size}; resuming would change every step"
            )
        self.optimizer.load_state_dict(state_dict)
        if own is None:
            return
        self.optimizer_steps = own["optimizer_steps"]
        self.oom_events = own["oom_events"]
        self.skipped_steps = own["skipped_steps"]
        self._token_mode = own["token_mode"]
        self._last_sizes = tuple(own["last_sizes"]) if own["last_sizes"] else None
        self.policy.load_state_dict(own["policy"])
        self.share_schedule.load_state_dict(own["shares"])
        self._pending = [
            _Chunk(flatten_batch(b), _replay_needs_loss_fn, call=-1) for b in own["pending"]
        ]
        self._pending_count = sum(c.samples.size for c in self._pending)
        self._cursor = 0
        self._needs_replay = bool(self._pending)

    def __repr__(self) -> str:
        return (
            f"AutoAccumOptimizer(target_batch_size={self.target_batch_size}, "
            f"plan={self.plan}, optimizer={self.optimizer!r})"
        )

    # ---------------------------------------------------------------- the step driver
    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        raise ValueError("the optimizer has no parameters")

    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _resident(self) -> Iterator[torch.Tensor]:
        for p in self._params():
            yield p
            if p.grad is not None:
                yield p.grad
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    yield v

    def _active(self) -> contextlib.AbstractContextManager[None]:
        if self.memory is None:
            return contextlib.nullcontext()
        return self.memory.active(self._resident())

    def _accumulate(self, loss_fn: LossFn, flat: FlatBatch) -> torch.Tensor:
        self._calls += 1
        call = self._calls
        self._grads_touched = False
        first_new = len(self._pending)
        finished: list[_Chunk] = []
        try:
            if self._needs_replay:
                self._replay(loss_fn)
            offset = 0
            while offset < flat.size:
                if not self._pending:
                    self._start_step()
                take = min(flat.size - offset, self._step_size - self._pending_count)
                self._pending.append(_Chunk(flat.slice(offset, offset + take), loss_fn, call))
                self._pending_count += take
                offset += take
                self._drain()
                if self._pending_count == self._step_size:
                    finished.extend(c for c in self._pending if c.call == call)
                    self._finish_step()
                    first_new, self._grads_touched = 0, False
        except BaseException:
            self._rollback(call, first_new)
            raise
        ours = finished + [c for c in self._pending if c.call == call]
        losses = torch.stack([x for c in ours for x in c.losses])
        items = sum(x for c in ours for x in c.items)
        if self._token_mode:
            return losses.sum() / items
        return _weighted_mean(losses, [s for c in ours for s in c.sizes], items)

    def _replay(self, loss_fn: LossFn) -> None:
        """Recompute the gradients of pending samples restored by load_state_dict (or left by a
        failed call) with ``loss_fn``."""
        for chunk in self._pending:
            chunk.loss_fn = loss_fn
        self._drain()

    def _start_step(self) -> None:
        """Once per step, before its first micro-batch: this rank's share, free memory."""
        self._step_size = self.share_schedule.shares_for(self.optimizer_steps)[self._rank]
        self.policy.set_cap(self._step_size)
        self._step_seconds = 0.0
        if self._last_step_end is None:
            self._last_step_end = time.perf_counter()
        if self.memory is None:
            return
        self.memory.reset_peak()
        if self.policy.probing:
            return
        missing_grads = sum(
            p.numel() * p.element_size()
            for p in self._params()
            if p.requires_grad and p.grad is None
        )
        self.policy.observe_free(self.memory.free_bytes(), self._reserve_bytes() + missing_grads)

    def _rollback(self, call: int, first_new: int) -> None:
        """Forget this call's samples of the unfinished step and restore the earlier ones'
        gradients (by replaying them) so the failed call leaves no trace."""
        del self._pending[first_new:]
        self._pending_count = sum(c.samples.size for c in self._pending)
        self._cursor = min(self._cursor, len(self._pending))
        if not self._grads_touched:
            return  # no backward ran in this call: .grad is as it was
        self.optimizer.zero_grad(set_to_none=True)
        self._restart_step()
        try:
            self._drain()
        except Exception:
            self._needs_replay = True  # replay again at the next call

    def _restart_step(self) -> None:
        """Mark every pending sample as not accumulated (after .grad was cleared)."""
        for chunk in self._pending:
            chunk.restart()
        self._cursor = 0

    def _drain(self) -> None:
        """Run forward and backward for every pending sample whose gradient is not in .grad."""
        self._needs_replay = False
        started = time.perf_counter()
        pending = self._pending
        while True:
            while self._cursor < len(pending) and (
                pending[self._cursor].done == pending[self._cursor].samples.size
            ):
                self._cursor += 1
            if self._cursor == len(pending):
                if self.auto_shares:  # time the work, not the queueing
                    if self._param_device.type == "cuda":
                        torch.cuda.synchronize(self._param_device)
                    getattr(self.memory, "synchronize", _no_op)()
                self._step_seconds += time.perf_counter() - started
                return
            todo = pending[self._cursor]
            remaining = todo.samples.size - todo.done
            probing = self.policy.probing
            size = self._next_size(remaining, probing)
            last = (
                self._cursor == len(pending) - 1
                and size == remaining
                and self._pending_count == self._step_size
            )
            failure = self._try_micro_step(todo, size, last, probing)
            if failure is not None:  # out of the except block: the failed frames are gone
                self._recover(failure)

    def _next_size(self, remaining: int, probing: bool) -> int:
        limit = self.policy.limit
        if probing:
            free = self.memory.free_bytes() if self.memory is not None else 0
            size = min(remaining, self.policy.probe_size(free))
            return min(size, limit) if limit is not None else size
        return first_split(remaining, limit)

    def _try_micro_step(self, chunk: _Chunk, size: int, last: bool, probing: bool) -> _Oom | None:
        phase = "forward"
        probing = probing and self.memory is not None
        try:
            if probing:
                assert self.memory is not None
                self._materialize_grads()
                baseline = self.memory.allocated_bytes()
                self.memory.reset_peak()
            micro = chunk.samples.micro(chunk.done, chunk.done + size, self._param_device)
            with self._sync_context(last):  # DDP decides in forward whether backward syncs
                loss, items, token = self._forward(chunk.loss_fn, micro, size)
                phase = "backward"
                self._grads_touched = True
                scaled = loss * ((1 if token else size) / self._step_size)
                if self.grad_scaler is not None:
                    scaled = self.grad_scaler.scale(scaled)
                scaled.backward()
        except BaseException as exc:
            if not oom_mod.is_oom(exc):
                raise
            return _Oom(size, phase, oom_mod.describe(exc))
        chunk.losses.append(loss.detach())
        chunk.items.append(items)
        chunk.done += size
        chunk.sizes.append(size)
        if probing:
            assert self.memory is not None
            peak = self.memory.peak_bytes() - baseline
            del micro, loss, scaled
            self.policy.record_probe(size, peak, self.memory.free_bytes(), self._reserve_bytes())
        return None

    def _forward(self, loss_fn: LossFn, micro: Any, size: int) -> tuple[torch.Tensor, Any, bool]:
        """Run ``loss_fn``; return the loss, its item count and whether it is token mode.

        Backward weights make ``.grad`` hold (sum of per-sample or per-item losses) / step size;
        the step rescales by step size / total items, exactly 1 for full steps in mean mode.
        """
        out = loss_fn(micro)
        token = isinstance(out, tuple) and len(out) == 2
        loss, items = out if token else (out, size)
        _check_scalar_loss(loss, "loss_sum" if token else "loss")
        if token:
            _check_items(items)
        if self._token_mode is not token:
            self._set_mode(token)
        return loss, items, token

    def _set_mode(self, token: bool) -> None:
        if self._token_mode is None:
            self._token_mode = token
        elif self._token_mode != token:
            raise ValueError(
                "loss_fn switched between returning a mean loss and a (loss_sum, num_items) pair; "
                "one optimizer needs one mode for every step"
            )

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP's own gradient sync runs only on the last micro-batch of a single-process step;
        in a multi-rank job every micro-batch runs under ``no_sync`` and the step reduces the
        gradients itself once all ranks agree (a backward OOM can then never strand a peer in
        DDP's all-reduce)."""
        ddp = self.model
        if ddp is None or (last and self._dist is None) or not hasattr(ddp, "no_sync"):
            return _NULL_CONTEXT
        return ddp.no_sync()  # type: ignore[operator]

    def _materialize_grads(self) -> None:
        """Allocate gradients before a probe so its peak counts the same resident bytes as every
        later micro-batch (adding into a zero gradient gives exactly the gradient)."""
        for p in self._params():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def _reserve_bytes(self) -> int:
        """Optimizer state the inner optimizer will allocate at its first step."""
        buffers = state_buffers_per_param(self.optimizer)
        return sum(
            buffers * p.numel() * p.element_size()
            for p in self._params()
            if p.requires_grad and not self.state.get(p)
        )

    def _recover(self, failure: _Oom) -> None:
        self.oom_events += 1
        self._step_ooms += 1
        oom_mod.release(self.memory)
        free = self.memory.free_bytes() if self.memory is not None else None
        free_txt = f"{free / 2**20:.0f} MiB" if free is not None else "unknown"
        try:
            new = self.policy.on_oom(failure.size, free, failure.message)
        except OutOfMemoryForOneSample:
            raise self._one_sample_error(failure, free) from None
        log.warning(
            "out of memory in %s at micro-batch %d (%s free): %s; continuing at %d%s",
            failure.phase, failure.size, free_txt, failure.message, new,
            ", replaying the step" if failure.phase == "backward" else "",
        )
        if failure.phase == "backward":
            # .grad holds part of a micro-batch: start the step's accumulation over.
            self.optimizer.zero_grad(set_to_none=True)
            self._restart_step()

    def _one_sample_error(self, failure: _Oom, free: int | None) -> torch.OutOfMemoryError:
        model = self.policy.memory_model
        need = f"about {model.peak(1) / 2**20:.1f} MiB" if model else "more than is free"
        free_txt = f"{free / 2**20:.1f} MiB" if free is not None else "an unknown amount"
        return torch.OutOfMemoryError(
            f"autoaccum: a micro-batch of 1 sample does not fit in {failure.phase}: one sample "
            f"needs {need} and {free_txt} is free. Remedies: activation checkpointing "
            f"(torch.utils.checkpoint), bf16 autocast, a smaller model or shorter inputs. "
            f"Last error: {failure.message}"
        )

    def _finish_step(self, flush: bool = False) -> bool:
        """All of the step's samples are in .grad: agree across ranks, normalize, reduce, clip,
        step once, zero. Returns False when no rank had a sample (a distributed flush)."""
        chunks, self._pending = self._pending, []
        self._pending_count, self._cursor = 0, 0
        items = sum(x for c in chunks for x in c.items)
        samples = sum(c.samples.size for c in chunks)
        if self._dist is not None:
            table = self._agree(True, items, samples, flush=flush)
            self._flushed_by_peer = not flush and bool(table[:, distributed.FLUSH].any())
            total: Any = float(table[:, distributed.ITEMS].sum())
            if total == 0:
                return False
        else:
            total = items
        if isinstance(total, torch.Tensor) and not bool(total > 0):
            self.optimizer.zero_grad(set_to_none=True)
            raise ValueError(f"the step's num_items sum to {total.item()}; expected > 0")
        if self._dist is not None:
            self._materialize_grads()  # every rank reduces the same tensors
        grads = [p.grad for p in self._params() if p.grad is not None]
        # .grad holds (sum of this rank's contributions) / its step size; make it this rank's
        # part of the global mean (a no-op for a full single-process step in mean mode).
        if grads and not (isinstance(total, int) and total == self._step_size):
            if isinstance(total, torch.Tensor):
                factor: Any = (self._step_size / total.to(torch.float64)).to(grads[0].dtype)
            else:
                factor = self._step_size / total
            torch._foreach_mul_(grads, factor)
        if self._dist is not None:
            distributed.reduce_gradients(self._dist, grads)
        self._apply(self.optimizer)
        self.optimizer_steps += 1
        self._last_sizes = tuple(s for c in chunks for s in c.sizes)
        self.optimizer.zero_grad(set_to_none=True)
        free = self.memory.free_bytes() if self.memory is not None else None
        self._record(samples, free)
        self.policy.end_of_step(free, had_oom=self._step_ooms > 0)
        self._step_ooms = 0
        if self._dist is not None:
            self._update_shares(table)
        return True

    def _record(self, samples: int, free: int | None) -> None:
        now = time.perf_counter()
        seconds = now - (self._last_step_end or now)
        self._last_step_end = now
        sizes = self._last_sizes or (0,)
        self.history.append(StepRecord(
            step=self.optimizer_steps,
            samples=samples,
            micro_batch_size=max(sizes),
            accumulation_steps=len(sizes),
            oom_events=self._step_ooms,
            peak_bytes=self.memory.peak_bytes() if self.memory is not None else None,
            free_bytes=free,
            seconds=seconds,
            samples_per_s=samples / seconds if seconds > 0 else float("nan"),
            compute_seconds=self._step_seconds,
        ))

    def _apply(self, inner: Optimizer) -> None:
        """Unscale, clip and step the inner optimizer once; an OOM here is never retried."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(inner)
        if self.max_grad_norm is not None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(
                list(self._params()), self.max_grad_norm
            )
        try:
            if self.grad_scaler is not None:
                self.grad_scaler.step(inner)
                if self.grad_scaler.is_enabled():
                    found = self.grad_scaler._found_inf_per_device(inner).values()
                    self.skipped_steps += bool(sum(v.item() for v in found))
                self.grad_scaler.update()
            else:
                inner.step()
        except BaseException as exc:
            if not oom_mod.is_oom(exc):
                raise
            message = oom_mod.describe(exc)
        else:
            return
        self.oom_events += 1
        raise StepOutOfMemoryError(
            f"the inner optimizer's step ran out of memory; parameters may be partly updated "
            f"and the step is not retried: {message}"
        )

    # ---------------------------------------------------------------- distributed
    def _agree(
        self, ok: bool, items: Any, samples: int, message: str | None = None, flush: bool = False
    ) -> torch.Tensor:
        """The step's one small collective: every rank's status, items and speed."""
        assert self._dist is not None
        row = [float(ok), items, self._step_seconds, samples, float(flush)]
        self._in_collective = True
        try:
            table = distributed.agree(self._dist, row)
            failed = [r for r in range(self._dist.world_size) if table[r, distributed.OK] == 0]
            if failed:
                messages = distributed.report_failure(self._dist, message)
                if ok:
                    details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
                    raise distributed.PeerFailedError(
                        f"optimizer step {self.optimizer_steps} stopped on every rank because "
                        f"another rank failed ({details})"
                    )
        finally:
            self._in_collective = False
        return table

    def _tell_peers(self, exc: BaseException) -> None:
        """This rank is about to raise: let the others stop at the step's agreement instead of
        waiting there forever."""
        if (
            self._dist is None
            or self._in_collective
            or isinstance(exc, distributed.PeerFailedError)
        ):
            return
        message = f"{type(exc).__name__}: {oom_mod.describe(exc)}"
        with contextlib.suppress(Exception):
            self._agree(False, 0, 0, message)

    def _update_shares(self, table: torch.Tensor) -> None:
        """"auto" shares: every ``share_interval`` steps, shares proportional to the measured
        throughput, identical on every rank (computed from the same gathered table), in force
        ``share_lookahead`` steps later so data already prefetched stays valid."""
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
            self.share_schedule.set_from(self.optimizer_steps + self.share_lookahead, new)
            log.info("shares %s -> %s from step %d (throughput %s samples/s)", list(current), new,
                     self.optimizer_steps + self.share_lookahead,
                     [round(r, 1) for r in rates])


def _no_op() -> None:
    pass


def _weighted_mean(losses: torch.Tensor, sizes: list[int], total: int) -> torch.Tensor:
    """Mean over samples of per-micro-batch mean losses, in a few device ops: balanced splits give
    runs of equal sizes, and each run is one slice sum (no host-to-device copy of weights)."""
    if sizes.count(sizes[0]) == len(sizes):
        return losses.mean()
    acc: Any = 0.0
    start = 0
    for end in range(1, len(sizes) + 1):
        if end == len(sizes) or sizes[end] != sizes[start]:
            acc = acc + losses[start:end].sum() * sizes[start]
            start = end
    return acc / total


def _initial_shares(shares: Any, target: int, world: int) -> list[int]:
    if isinstance(shares, str) and shares in ("equal", "auto"):
        if target < world:
            raise ValueError(
                f"target_batch_size={target} is smaller than the {world} ranks of this job; every "
                "rank needs at least one sample per step"
            )
        return equal_shares(target, world)
    if isinstance(shares, (list, tuple)):
        return check_shares(shares, target, world)
    raise ValueError(f"shares must be 'equal', 'auto' or a list of per-rank sample counts, "
                     f"got {shares!r}")


def _replay_needs_loss_fn(_: Any) -> Any:
    raise RuntimeError("pending samples restored by load_state_dict need a loss_fn to replay")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_scalar_loss(loss: Any, what: str) -> None:
    if isinstance(loss, torch.Tensor) and loss.requires_grad and loss.numel() == 1:
        return
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor or a (loss_sum, num_items) pair; its {what} is "
            f"a {type(loss).__name__}"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn returned a {what} of shape {tuple(loss.shape)}; expected a scalar (reduce "
            "with .mean(), or return (loss.sum(), num_items) for token-level losses)"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"loss_fn returned a {what} that does not require grad: is the model's output used, "
            "and is autograd enabled (no torch.no_grad())?"
        )


def _check_items(items: Any) -> None:
    if isinstance(items, torch.Tensor):
        if items.numel() != 1:
            raise ValueError(f"num_items must be a scalar, got shape {tuple(items.shape)}")
        return  # checked per step, to avoid a host sync per micro-batch
    if isinstance(items, bool) or not isinstance(items, (int, float)) or items <= 0:
        raise ValueError(f"num_items must be a positive number, got {items!r}")


def _build_inner(
    optimizer: Optimizer | type[Optimizer], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Optimizer:
    if isinstance(optimizer, AutoAccumOptimizer):
        raise TypeError("the optimizer is already an AutoAccumOptimizer; wrap the inner one once")
    if isinstance(optimizer, Optimizer):
        if args or kwargs:
            raise TypeError(
                f"extra arguments {list(args) + sorted(kwargs)} were given with a built "
                f"{type(optimizer).__name__}; pass them only with an optimizer class"
            )
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        try:
            accepted: Any = inspect.signature(optimizer).parameters
        except (TypeError, ValueError):
            accepted = {}
        clash = [k for k in _WRAPPER_KEYWORDS if k in accepted]
        if clash:
            raise TypeError(
                f"{optimizer.__name__} takes its own {clash}, which AutoAccumOptimizer also "
                "takes; build the optimizer yourself and pass the instance"
            )
        return optimizer(*args, **kwargs)
    raise TypeError(
        f"expected a torch.optim.Optimizer or an Optimizer class, got {type(optimizer).__name__}"
    )

