"""Running a step's micro-batches, and recovering when one runs out of memory.

A mixin of :class:`~autoaccum.optimizer.AutoAccumOptimizer` (it works on the optimizer's state;
the optimizer drives calls and steps, this module their micro-batches):

* the fast path (:meth:`MicroBatchRunner._run_fast`): a settled call's micro-batches in one tight
  loop, each backward seeded with its weight;
* the full path (:meth:`MicroBatchRunner._drain`): one micro-batch at a time, probing memory while
  the plan is not settled, replaying what a rewind dropped;
* FSDP2 ``per_micro`` rounds (:meth:`MicroBatchRunner._run_rounds`), whose collectives every rank
  must run alike;
* out-of-memory recovery (:meth:`MicroBatchRunner._recover`): release the cache, halve (the
  policy), rewind after a partial backward, or give up on one sample with the remedies.

An OOM is caught where it happens and handed back as an :class:`Oom`, so that recovery runs after
the failed micro-batch's frame (and the autograd graph it holds) is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import oom as oom_mod
from . import outputs as out_mod
from . import sharded
from .batching import FlatBatch, to_device
from .buffers import StepBuffers
from .distributed import GradientSync
from .grads import ZeroFills
from .memory import MemoryBackend
from .planner import balanced_split, first_split
from .policy import MicroBatchPolicy, OutOfMemoryForOneSample
from .step import Chunk, LossFn, StepState
from .weights import Weights, weigh

log = logging.getLogger("autoaccum")


class Oom(NamedTuple):
    """A micro-batch that ran out of memory: its size, where, the error's message."""

    size: int
    phase: str
    message: str
    peer: tuple[int, ...] = ()  # FSDP: a peer ran out of memory (its phases); not this rank


def _no_op() -> None:
    pass


class MicroBatchRunner:
    """The micro-batch methods of :class:`~autoaccum.optimizer.AutoAccumOptimizer`."""

    # The optimizer's state these methods work on (set in AutoAccumOptimizer.__init__).
    policy: MicroBatchPolicy
    optimizer: torch.optim.Optimizer
    memory: MemoryBackend | None
    grad_scaler: torch.amp.GradScaler | None
    count_items: Callable[[Any], Any] | None
    auto_shares: bool
    oom_events: int
    _gsync: GradientSync
    _step: StepState
    _weights: Weights
    _trainable: list[torch.Tensor]
    _fills: ZeroFills
    _buffers: StepBuffers
    _param_device: torch.device
    _sharded: bool
    _token_mode: bool | None
    _in_backward: bool
    _dummy: tuple[FlatBatch, LossFn] | None
    _grad_bytes: int
    _step_budget: int | None
    _step_extra: int
    _step_ooms: int
    _step_seconds: float

    if TYPE_CHECKING:  # the optimizer's methods these call
        def _clear_grads(self) -> None: ...
        def _restart(self) -> None: ...
        def _reserve_bytes(self) -> int: ...
        def _check_call_items(self, chunk: Chunk) -> Any: ...

    def _denominator(self) -> int:
        """What this step's micro-batch losses are divided by; fixed at its first backward."""
        step = self._step
        if step.denominator is None:
            d = step.size
            if self._token_mode and self.count_items is not None and step.full:
                known = sum(c.counted or 0 for c in step.chunks)
                if known > 0:
                    d = known
            step.denominator = d
        return step.denominator

    def _run_fast(self, chunk: Chunk) -> Oom | None:
        """The settled path: one tight loop over a new chunk's micro-batches (cut once, output
        checked on the first one, no per-micro-batch object, no op beyond ``loss_fn`` and a
        seeded backward; the raw losses are kept for the returned value). An OOM is returned,
        for the caller to recover from once this frame (and the failed micro-batch's graph it
        holds) is gone."""
        n = chunk.size
        sizes = balanced_split(n, self.policy.limit)
        flat = chunk.flat
        parts = flat.split(sizes) if len(sizes) > 1 else [list(flat.leaves)]
        rebuild = flat.rebuild
        device = self._param_device
        move = flat.device != device
        tensors = flat.tensors
        loss_fn = chunk.loss_fn
        scaler = self.grad_scaler
        raw, items_list, aux_list = chunk.raw, chunk.items, chunk.aux
        seeds: dict[int, torch.Tensor] = {}
        form = den = 0
        token = False
        k = phase = 0
        failure: Oom | None = None
        started = time.perf_counter()
        try:
            with self._gsync.micro_context():
                for leaves in parts:
                    size = sizes[k]
                    if move:
                        for i in tensors:
                            leaves[i] = to_device(leaves[i], device)
                    out = loss_fn(rebuild(leaves))
                    if k == 0:
                        form = out_mod.form_of(out)
                        loss, items, aux = self._read_checked(out, form)
                        token = bool(self._token_mode)
                        den = chunk.den = self._denominator()
                        make = self._weights.seed
                    elif form == out_mod.TENSOR:
                        loss = out
                    else:
                        loss, items, aux = out_mod.read(out, form)
                    # Token mode divides by the step's count as one big batch would; mean mode
                    # weights by the micro-batch's share of the step, as a hand-written loop does:
                    # through backward's seed (see weights.py), with a scaler through its scale.
                    phase = 1
                    if not loss.requires_grad:  # a token micro-batch without items
                        loss = self._empty_micro(loss, items, token)
                    elif scaler is None:  # seeds: a balanced split has at most two sizes
                        seed = seeds.get(size)
                        if seed is None:
                            seed = seeds[size] = make(loss, size, den, token)
                        loss.backward(seed)
                    else:
                        scaler.scale(weigh(loss, size, den, token)).backward()
                    phase = 0
                    # Kept as is: a detach per micro-batch costs more than the whole rest of the
                    # loop's bookkeeping. Its graph's saved tensors are already freed by backward;
                    # _call_loss drops these references when the call returns.
                    raw.append(loss)
                    if token:
                        items_list.append(items)
                    if aux is not None:
                        aux_list.append({**aux, "num_samples": size})
                    k += 1
        except BaseException as exc:
            chunk.sizes.extend(sizes[:k])
            chunk.done = sum(sizes[:k])
            self._in_backward = bool(phase)  # a partial gradient, if it propagates
            if not oom_mod.is_oom(exc):
                raise
            failure = Oom(sizes[k], "backward" if phase else "forward", oom_mod.describe(exc))
        else:
            chunk.sizes.extend(sizes)
            chunk.done = n
        self._step_seconds += time.perf_counter() - started
        if failure is None:
            self._step.cursor = len(self._step.chunks)  # every chunk is complete now
        self._in_backward = False
        return failure

    def _read_checked(self, out: Any, form: int) -> out_mod.Output:
        output = out_mod.read(out, form)
        token = form in (out_mod.PAIR,) or (form in (out_mod.DICT, out_mod.MAPPING)
                                            and output.items is not None)
        out_mod.check(output, token)
        if self._token_mode is not token:
            self._set_mode(token)
        return output

    def _drain(self) -> None:
        """The full path: forward and backward for every pending sample not yet in ``.grad``,
        one micro-batch at a time, probing memory and recovering from OOM."""
        started = time.perf_counter()
        step = self._step
        while True:
            todo = step.advance()
            if self._sharded and self._gsync.defers_micro_batches:
                todo = None  # FSDP per_micro: in rounds at the step's end (_run_rounds)
            if todo is None:
                if self.auto_shares:  # time the work, not the queueing
                    if self._param_device.type == "cuda":
                        torch.cuda.synchronize(self._param_device)
                    getattr(self.memory, "synchronize", _no_op)()
                self._step_seconds += time.perf_counter() - started
                return
            remaining = todo.size - todo.done
            probing = self.policy.probing and self.memory is not None
            size = self._next_size(remaining, probing)
            failure = self._try_micro_step(todo, size, probing)
            if failure is not None:  # out of the except block: the failed frames are gone
                self._recover(failure)

    def _run_rounds(self) -> None:
        """FSDP, before the agreement: what is not in ``.grad`` yet runs locally (gather_once) or
        in rounds of a micro-batch count every rank agrees (per_micro: FSDP's collectives run
        inside them; a rank with no sample left pads with zero-weight dummies), until every rank
        has run all of its samples. A peer's OOM stops this rank at the next exchange, then
        both replay."""
        sync: Any = self._gsync
        step = self._step
        if step.chunks:
            first = step.chunks[0]
            part = first.flat.slice(0, 1)  # one sample, copied: the padding of later rounds
            leaves = [x.clone() if i in part.tensors else x for i, x in enumerate(part.leaves)]
            self._dummy = (FlatBatch(leaves, part.spec, part.tensors, 1, part.device,
                                     part.rebuild), first.loss_fn)
        while True:
            self._drain()  # gather_once (also after a rewind): locally, no collective
            # The ranks meet inside the rounds (the count, every FSDP collective): time blocked
            # there waiting for a slower peer is not this rank's compute ("auto" shares divide
            # by it), so it is left out.
            started = time.perf_counter()
            waited = sync.wait_seconds
            failure: Oom | None = None
            try:
                k = sync.round_count(self._wanted())
                if k == 0:
                    break
                for _ in range(k):
                    todo = step.advance()
                    probing = self.policy.probing and self.memory is not None
                    failure = (self._try_dummy() if todo is None else self._try_micro_step(
                        todo, self._next_size(todo.size - todo.done, probing), probing))
                    if failure is not None:
                        break
            except sharded.PeerOutOfMemory as exc:  # met at the round count
                failure = Oom(0, "forward", oom_mod.describe(exc), tuple(exc.phases))
            self._step_seconds += (time.perf_counter() - started
                                   - (sync.wait_seconds - waited))
            if failure is not None:
                self._recover(failure)
        if self._token_mode:
            for chunk in step.chunks:
                self._check_call_items(chunk)

    def _wanted(self) -> int:
        """per_micro: how many micro-batches this rank still needs (one per round while probing);
        gather_once: 0 (its micro-batches ran locally)."""
        step = self._step
        if not self._gsync.defers_micro_batches or step.advance() is None:
            return 0
        if self.policy.probing and self.memory is not None:
            return 1
        limit = self.policy.limit
        return sum(1 if limit is None else -(-(c.size - c.done) // limit)
                   for c in step.chunks if c.done < c.size)

    def _try_dummy(self) -> Oom | None:
        """A micro-batch of weight 0 on one sample: FSDP's collectives run as on the peers, the
        gradient it adds is exactly 0 (per_micro, a rank with no sample left in a round)."""
        if self._dummy is None:
            raise RuntimeError("FSDP per_micro: this rank has no sample to pad a round with (it "
                               "has not run any sample yet); give every rank samples")
        flat, loss_fn = self._dummy
        self._in_backward = False
        try:
            with self._gsync.micro_context():
                out = loss_fn(flat.micro(0, 1, self._param_device))
                loss = out_mod.read(out, out_mod.form_of(out)).loss
                self._in_backward = True
                (loss * 0.0).backward()
                self._in_backward = False
        except BaseException as exc:
            return self._micro_failure(exc, 1)
        return None

    def _after_fallback(self) -> None:
        """Every rank dropped FSDP's gathered parameters (gather_once -> per_micro): plan the rest
        from the memory that freed."""
        self._step_extra = self._gsync.extra_bytes()
        if self.memory is None:
            return
        self.memory.reset_peak()
        budget = (self.memory.free_bytes() - self._grad_bytes - self._reserve_bytes()
                  - self._step_extra)
        self._step_budget = budget
        self.policy.after_fallback(budget)

    def _next_size(self, remaining: int, probing: bool) -> int:
        limit = self.policy.limit
        if probing:
            size = min(remaining, self.policy.probe_size(self._probe_budget()))
            return min(size, limit) if limit is not None else size
        return first_split(remaining, limit)

    def _probe_budget(self) -> int:
        assert self.memory is not None
        return self.memory.free_bytes() - self._reserve_bytes() - self._missing_grad_bytes()

    def _missing_grad_bytes(self) -> int:
        missing = sharded.local_bytes(p for p in self._trainable if p.grad is None)
        return missing + self._gsync.missing_bytes()

    def _try_micro_step(self, chunk: Chunk, size: int, probing: bool) -> Oom | None:
        self._in_backward = False
        if chunk.done == 0:
            chunk.check_unchanged()  # a replay must see the samples as they were given
        try:
            if probing:
                assert self.memory is not None
                self._materialize_grads()
                baseline = self.memory.allocated_bytes()
                self.memory.reset_peak()
            micro = chunk.flat.micro(chunk.done, chunk.done + size, self._param_device)
            with self._gsync.micro_context():
                out = chunk.loss_fn(micro)
                output = self._read_checked(out, out_mod.form_of(out))
                den = chunk.den = self._denominator()
                weighted = weigh(output.loss, size, den, bool(self._token_mode))
                if not weighted.requires_grad:  # a token micro-batch without items
                    weighted = self._empty_micro(weighted, output.items, True)
                else:
                    scaled = (weighted if self.grad_scaler is None
                              else self.grad_scaler.scale(weighted))
                    self._in_backward = True
                    scaled.backward()
                    self._in_backward = False
        except BaseException as exc:
            return self._micro_failure(exc, size)
        chunk.record(weighted, output.items, size, output.aux)
        if probing:
            assert self.memory is not None
            peak = self.memory.peak_bytes() - baseline
            del micro, out, output, weighted
            self.policy.record_probe(size, peak, self._probe_budget())
        return None

    def _empty_micro(self, loss: torch.Tensor, items: Any, token: bool) -> torch.Tensor:
        """A micro-batch whose loss has no graph. In token mode with zero items (every item of
        the samples the split put together is masked: ``loss_fn`` may return a constant) it
        contributes nothing and training goes on; otherwise it is ``loss_fn``'s mistake."""
        if token and out_mod.no_items(items):
            return loss.detach().to(self._param_device)
        raise out_mod.no_graph_error("loss_sum" if token else "loss")

    def _set_mode(self, token: bool) -> None:
        if self._token_mode is None:
            if not token and self.count_items is not None:
                raise ValueError("count_items= counts items for token mode, but loss_fn returned "
                                 "a mean loss; return (loss_sum, num_items) or drop count_items")
            self._token_mode = token
        elif self._token_mode != token:
            raise ValueError(
                "loss_fn switched between returning a mean loss and a (loss_sum, num_items) pair; "
                "one optimizer needs one mode for every step"
            )

    def _micro_failure(self, exc: BaseException, size: int) -> Oom:
        """An exception out of a micro-batch of the full path: an OOM (this rank's, or a peer's
        that stopped this micro-batch at an FSDP guard) to recover from, or re-raised."""
        peer = tuple(exc.phases) if isinstance(exc, sharded.PeerOutOfMemory) else ()
        if not peer and not oom_mod.is_oom(exc):
            raise exc
        phase = "backward" if self._in_backward else "forward"
        self._in_backward = False
        return Oom(size, phase, oom_mod.describe(exc), peer)

    def _materialize_grads(self) -> None:
        """Allocate missing gradients as zeros (adding into a zero gradient gives exactly the
        gradient) before a probe, so that its peak counts the same resident bytes as every later
        micro-batch (FSDP: also the unsharded gradients it accumulates)."""
        if not isinstance(self.optimizer, torch.optim.SparseAdam):  # it refuses dense grads
            self._fills.fill(self._trainable)
        self._gsync.materialize_local_grads()

    def _recover(self, failure: Oom) -> None:
        backward = failure.phase == "backward"
        sync: Any = self._gsync
        if failure.peer:  # FSDP: a peer's OOM stopped this rank's micro-batch; no size change
            fallbacks = sync.fallbacks
            if sync.recover(in_backward=backward, peer_phases=failure.peer):
                self._step.rewind(self._restart)
            oom_mod.release(self.memory)
            if sync.fallbacks != fallbacks:
                self._after_fallback()
            log.info("%s; replaying", failure.message)
            return
        self.oom_events += 1
        self._step_ooms += 1
        if backward or self._buffers.active:
            # .grad holds part of a micro-batch (or the forward updated buffers): start the
            # step's accumulation over (before anything else can raise, so the invariant holds
            # whatever happens next).
            self._step.rewind(self._restart)
        oom_mod.release(self.memory)
        free = self.memory.free_bytes() if self.memory is not None else None
        free_txt = f"{free / 2**20:.0f} MiB" if free is not None else "unknown"
        try:
            new = self.policy.on_oom(failure.size, self._step_budget, failure.message)
        except OutOfMemoryForOneSample:
            if not (self._sharded and sync.can_fall_back):
                raise self._one_sample_error(failure, free) from None
            # FSDP gather_once: one sample does not fit next to the gathered parameters; every
            # rank drops them and runs per micro-batch (the others hear of it at their next
            # exchange). The step starts over.
            sync.recover(in_backward=backward, message=failure.message, smallest=True)
            self._step.rewind(self._restart)
            self._after_fallback()
            return
        if self._sharded:  # FSDP: a legal state again (per_micro: the peers hear of it)
            sync.recover(in_backward=backward, message=failure.message)
        log.warning(
            "out of memory in %s at micro-batch %d (%s free): %s; continuing at %d%s",
            failure.phase, failure.size, free_txt, failure.message, new,
            ", replaying the step" if backward or self._buffers.active else "",
        )

    def _one_sample_error(self, failure: Oom, free: int | None) -> torch.OutOfMemoryError:
        model = self.policy.memory_model
        need = f"about {model.peak(1) / 2**20:.1f} MiB" if model else "more than is free"
        free_txt = f"{free / 2**20:.1f} MiB" if free is not None else "an unknown amount"
        return torch.OutOfMemoryError(
            f"autoaccum: a micro-batch of 1 sample does not fit in {failure.phase}: one sample "
            f"needs {need} and {free_txt} is free. Remedies: activation checkpointing "
            f"(torch.utils.checkpoint), bf16 autocast, a smaller model or shorter inputs. "
            f"Last error: {failure.message}"
        )
