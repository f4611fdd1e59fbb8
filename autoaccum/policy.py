"""The micro-batch size over a run: probe, plan, verify one size up, halve on OOM, grow back.

A thin state machine around the pure functions of :mod:`autoaccum.planner`. The optimizer tells it
what happened (a probe's peak, a step's measured peak, an OOM, allocator thrash, the activation
budget at a step's start) and asks it one thing: how many samples the next micro-batch may hold.

Budgets are in bytes that one micro-batch may add above the resident baseline once the run is in
its steady state: free memory at the step's start, less the gradients the step will allocate and
the optimizer state not allocated yet.

Settling: two probes fit a line; the rest of the first step runs at the size the line gives with
``margin`` to spare; each step's measured peak refines the line; one step at a time then tries the
largest size the refined line gives with ``final_margin`` (0 on an exact simulator). A trial step
that runs and measures within budget is adopted; one that runs out of memory goes back to the last
size that ran and marks the failed size, which is not tried again until free memory has risen.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any

from . import planner
from .planner import MemoryModel

log = logging.getLogger("autoaccum")


_V1_KEYS = {"limit", "probes", "model", "planned_free", "failed", "failed_free", "trial",
            "clean_steps"}


_MAX_UNREACHED = 2  # steps in a row that did not run a trial size before it is given up


class OutOfMemoryForOneSample(RuntimeError):
    """Even a micro-batch of one sample does not fit in the device's free memory."""


@dataclass
class _State:
    limit: int | None  # None: no limit known, a whole call is one micro-batch
    probes: list[tuple[int, int]] = field(default_factory=list)
    observed: dict[int, float] = field(default_factory=dict)  # size -> measured peak
    model: tuple[float, float] | None = None  # MemoryModel fields, kept plain for state_dict
    budget: float | None = None  # the budget the current plan was made for
    failed: dict[int, float] = field(default_factory=dict)  # size -> budget when it failed
    trial: int | None = None  # size being verified (falls back to `limit` if it fails)
    clean_steps: int = 0
    settled: bool = False
    trials: int = 0  # trial steps run while settling


class MicroBatchPolicy:
    """Decides micro-batch sizes. ``limit`` is the size the next micro-batch may take.

    Args:
        cap: the most samples one micro-batch needs (this rank's share of a step).
        pinned: a user-fixed size; it is never exceeded, only halved on OOM and grown back to.
        planning: whether to probe and plan from memory (a backend with a free-memory reading).
        margin: fraction of the budget a size known only from the model must leave unused.
        final_margin: fraction a measured or trial size must leave unused (allocator
            fragmentation and workspaces on a real GPU; 0 on an exact simulator).
        grow_after: clean steps before trying a larger size again after a runtime OOM.
        replan_tolerance: fraction by which the budget must move to trigger a re-plan.
        single_pass_saving: bytes a one-micro-batch step saves (no gradient to add into).
        param_bytes: bytes of the parameters, which size the first probe.
    """

    def __init__(
        self,
        cap: int,
        *,
        pinned: int | None,
        planning: bool,
        margin: float = 0.1,
        final_margin: float = 0.0,
        grow_after: int = 50,
        replan_tolerance: float = 0.1,
        single_pass_saving: int = 0,
        param_bytes: int = 0,
    ) -> None:
        self.cap = cap
        self.single_pass_saving = single_pass_saving
        self.param_bytes = param_bytes
        self.pinned = pinned
        self.planning = planning and pinned is None
        self.margin = margin
        self.final_margin = final_margin
        self.grow_after = grow_after
        self.replan_tolerance = replan_tolerance
        self._s = _State(limit=pinned)
        # Trial sizes that steps did not run although they had the samples (calls smaller than
        # the step are cut on their own, e.g. loader batches of 128 never run 86 of a 256 step).
        self._unreached: dict[int, int] = {}

    # -- what the optimizer asks -------------------------------------------------------------
    @property
    def limit(self) -> int | None:
        """Largest micro-batch allowed now (None: unlimited)."""
        return self._s.trial or self._s.limit

    @property
    def probing(self) -> bool:
        """Whether the next micro-batch is a probe whose peak memory must be reported."""
        return self.planning and self._s.model is None

    @property
    def settled(self) -> bool:
        """No probe, no trial pending: the size stays until memory moves or an OOM happens."""
        return not self.planning or (self._s.settled and self._s.trial is None)

    @property
    def active(self) -> bool:
        """Whether :meth:`end_of_step` can change anything (planning, or an OOM to grow back
        from); a pinned size that never failed needs no per-step bookkeeping."""
        return self.planning or bool(self._s.failed) or self._s.trial is not None

    @property
    def fallback(self) -> int | None:
        """The size that ran (or is known to fit) to go back to if a trial fails."""
        return self._s.limit

    @property
    def trial(self) -> int | None:
        """The size being verified by the current step, if any."""
        return self._s.trial

    def probe_size(self, budget: int) -> int:
        """Size of the next probe for an activation ``budget``."""
        s = self._s
        if not s.probes:
            return planner.first_probe_size(self.cap, budget, self.param_bytes)
        return planner.next_probe_size(s.probes[0], budget, self.cap)

    @property
    def memory_model(self) -> MemoryModel | None:
        """Predicted peak above the resident baseline of a micro-batch of ``b`` samples."""
        return MemoryModel(*self._s.model) if self._s.model else None

    def set_cap(self, cap: int) -> None:
        """This rank's share of a step changed: plan for the new size (no probing needed)."""
        if cap == self.cap:
            return
        self.cap = cap
        self._unreached.clear()
        s = self._s
        if self.memory_model is not None and s.budget is not None and s.trial is None:
            self._choose(s.budget, f"share is now {cap}")
        elif self.pinned is None and s.limit is not None and not self.planning:
            s.limit = min(s.limit, cap)

    # -- what the optimizer reports ----------------------------------------------------------
    def record_probe(self, size: int, peak_above_baseline: int, budget: int) -> None:
        """A probe micro-batch of ``size`` peaked ``peak_above_baseline`` bytes above resident."""
        s = self._s
        s.probes.append((size, peak_above_baseline))
        s.observed[size] = max(s.observed.get(size, 0.0), float(peak_above_baseline))
        if len(s.probes) >= 2 or size >= self.cap:
            self._refit()
            self._choose(budget, "planned", mid_step=True)

    def observe_start(self, budget: int) -> None:
        """The activation budget at a step's start. Re-plans when it moved by more than the
        tolerance since the plan was made; forgets failed sizes once it rose beyond them."""
        s = self._s
        if self.memory_model is None or s.budget is None or s.trial is not None:
            return
        risen = [b for b, at in s.failed.items() if budget > at * (1 + self.replan_tolerance)]
        for b in risen:
            del s.failed[b]
        if risen or planner.free_moved(int(s.budget), budget, self.replan_tolerance):
            s.settled = False
            self._choose(budget, "free memory moved")

    def on_oom(self, size: int, budget: int | None, context: str) -> int:
        """A micro-batch of ``size`` ran out of memory. Returns the new limit.

        A failed trial goes back to the size that ran before; any other OOM halves. The failed
        size is remembered with ``budget`` and not tried again until the budget rises.

        Raises:
            OutOfMemoryForOneSample: ``size`` was already 1.
        """
        s = self._s
        s.clean_steps = 0
        if budget is None:
            budget = int(s.budget) if s.budget is not None else 0
        s.failed[size] = min(s.failed.get(size, budget), budget)
        if s.trial is not None and s.limit is not None and s.limit < size:
            s.trial, s.settled = None, True
            log.info("micro-batch %d ran out of memory in its trial step; back to %d",
                     size, s.limit)
            return s.limit
        current = self.limit
        new = planner.halve(current if current is not None and current >= size else size)
        if new < 1:
            raise OutOfMemoryForOneSample(context)
        if s.model is None and self.planning:
            s.probes.clear()  # the failed probe says nothing about the slope; plan from new ones
        s.trial = None
        self._set_limit(new, f"out of memory at {size}", budget)
        return new

    def after_fallback(self, budget: int) -> None:
        """Memory held for the whole step was released (FSDP stopped holding every unit
        gathered): forget the sizes that failed next to it and plan again for ``budget``."""
        s = self._s
        s.failed.clear()
        s.trial = None
        if self.memory_model is not None:
            self._choose(budget, "gathered parameters released")
        elif self.pinned is not None:
            self._set_limit(self.pinned, "gathered parameters released", budget)

    def end_of_step(
        self,
        largest: int,
        peak: float | None,
        budget: int | None,
        had_oom: bool,
        thrash: bool = False,
    ) -> None:
        """One optimizer step finished.

        ``largest`` is the largest micro-batch the step ran and ``peak`` its measured peak above
        the resident baseline (None without a memory backend); ``budget`` the step's activation
        budget; ``thrash`` whether the allocator had to free its cache and retry during the step
        (the size is too big for the fragmented memory even though it ran).
        """
        s = self._s
        if had_oom:
            return
        measuring = self.planning and s.model is not None
        over = False
        if measuring and peak is not None and largest > 0:
            s.observed[largest] = max(s.observed.get(largest, 0.0), float(peak))
            self._refit()
            # A size planned from the model alone that measures over budget (it ran only because
            # the step had room the steady state will not have) is not kept, settled or not.
            over = budget is not None and peak > budget * (1 - self.final_margin)
        if thrash and s.limit is not None:
            size = self.limit or s.limit
            s.failed[size] = float(budget if budget is not None else s.budget or 0)
            s.trial, s.settled = None, True
            self._set_limit(planner.one_size_down(size, self.cap), "allocator retried", budget)
            return
        if s.trial is not None:
            if largest < s.trial:
                # The step did not run the trial size: too few samples (a flush), or calls cut
                # smaller than the step (each call's part is split on its own). What it measured
                # may still say the trial cannot fit; otherwise try it next step, but give up on
                # a size two steps in a row did not run.
                missed = self._unreached[s.trial] = self._unreached.get(s.trial, 0) + 1
                if missed >= _MAX_UNREACHED:
                    log.info("micro-batch %d does not run with these loader batches; staying at "
                             "%s", s.trial, s.limit)
                    s.trial, s.settled = None, True
                elif measuring and budget is not None:
                    self._choose(budget, "measured")
                return
            self._unreached.pop(s.trial, None)
            size, s.trial = s.trial, None
            if peak is None or budget is None or peak <= budget * (1 - self.final_margin):
                self._set_limit(size, "trial step ran", budget)
            else:
                s.failed[size] = float(budget)
            if measuring and budget is not None:
                self._choose(budget, "measured")
            return
        if measuring and (over or not s.settled) and budget is not None:
            self._choose(budget, "measured over budget" if over else "measured")
            return
        s.clean_steps += 1
        self._maybe_grow_back(budget)

    # -- internals ---------------------------------------------------------------------------
    def _refit(self) -> None:
        # A step of one micro-batch (the whole share) allocates no gradient temporaries, so its
        # peak lies below the line of the accumulating sizes: fit the line without it.
        points = {b: p for b, p in self._s.observed.items() if b < self.cap}
        model = planner.refine_memory_model(points or self._s.observed)
        self._s.model = (model.fixed_bytes, model.per_sample_bytes)

    def _ceiling(self, budget: float) -> int | None:
        """The smallest size that failed at this budget or more (sizes from it on are out)."""
        failed = [b for b, at in self._s.failed.items()
                  if budget <= at * (1 + self.replan_tolerance)]
        return min(failed) if failed else None

    def _choose(self, budget: float, why: str, mid_step: bool = False) -> None:
        """Re-plan for ``budget``. ``mid_step``: the current step has already run micro-batches,
        so a trial of the whole share in one micro-batch (which saves only when it is the step's
        first) waits for the next step."""
        s = self._s
        model = self.memory_model
        assert model is not None
        s.budget = float(budget)
        # A step of one micro-batch allocates no gradient temporaries (backward steals each
        # gradient into .grad): worth a trial if it fits with at most all the gradients saved.
        # A wrong guess costs one OOM in the trial step, and is not repeated.
        saving = max(self.single_pass_saving, self.param_bytes)
        choice = planner.choose_sizes(
            model, s.observed, budget, self.cap, margin=self.margin,
            final_margin=self.final_margin, single_pass_saving=saving,
            ceiling=self._ceiling(budget),
        )
        self._set_limit(choice.limit, why, budget)
        trial = choice.trial
        if trial is not None and self._unreached.get(trial, 0) >= _MAX_UNREACHED:
            trial = None  # steps with these loader batches do not run it
        if mid_step and trial == self.cap:
            s.trial, s.settled = None, False  # chosen again at the step's end
            return
        s.trial = trial
        s.settled = trial is None
        if trial is not None:
            s.trials += 1
            log.info("trying micro-batch %d for one step (%s predicts it fits)", trial, why)

    def _maybe_grow_back(self, budget: int | None) -> None:
        """After a runtime OOM and ``grow_after`` clean steps: binary search towards the failed
        size over the sizes a step runs; the failed size itself only once memory has risen."""
        s = self._s
        if not s.failed or s.clean_steps < self.grow_after or s.limit is None:
            return
        failed = min(s.failed)
        if failed <= s.limit:
            return
        ceiling = failed if self.pinned is None else min(failed, self.pinned + 1)
        candidate = planner.grow_candidate(s.limit, ceiling, self.cap)
        if candidate == s.limit:  # converged just below the failed size
            rose = budget is not None and budget > s.failed[failed] * (1 + self.replan_tolerance)
            if not rose:
                return
            candidate = planner.achievable_at_least(failed, self.cap)
            del s.failed[failed]
        s.trial, s.clean_steps = candidate, 0
        log.info("trying micro-batch %d (grow-back after %d clean steps)",
                 candidate, self.grow_after)

    def _set_limit(self, size: int, why: str, budget: float | None) -> None:
        old, self._s.limit = self.limit, size
        if size != old:
            room = f"{budget / 2**20:.0f} MiB budget" if budget is not None else "budget n/a"
            log.info("micro-batch %s -> %d (%s; %s)", old, size, why, room)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = self._s
        return {
            "version": 2,
            "limit": s.limit,
            "probes": [list(p) for p in s.probes],
            "observed": [[b, p] for b, p in sorted(s.observed.items())],
            "model": list(s.model) if s.model is not None else None,
            "budget": s.budget,
            "failed": [[b, at] for b, at in sorted(s.failed.items())],
            "trial": s.trial,
            "clean_steps": s.clean_steps,
            "settled": s.settled,
            "trials": s.trials,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, validated first: a ``TypeError``/``ValueError``
        names the field and changes nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"the policy state is a {type(state).__name__}; expected a dict")
        known = {f.name for f in fields(_State)}
        if state.get("version", 1) == 1:  # 0.1 checkpoints: keep the size and the model
            unknown = set(state) - _V1_KEYS - {"version"}
            if unknown:
                raise ValueError(f"unknown micro-batch policy state {sorted(unknown, key=repr)}")
            state = {"limit": state.get("limit"), "model": state.get("model"),
                     "budget": state.get("planned_free"), "settled": True}
        elif state.get("version") != 2:
            raise ValueError(f"policy state version {state.get('version')!r}; expected 1 or 2")
        unknown = set(state) - known - {"version"}
        if unknown or "limit" not in state:
            raise ValueError(f"policy state has unknown fields {sorted(unknown, key=repr)} or no "
                             f"'limit'; expected the fields {sorted(known)}")
        model = state.get("model")
        if model is not None:
            model = _pair(model, "model", _number, _number)
        self._s = _State(
            limit=_size(state["limit"], "limit", none=True),
            probes=[_pair(x, "probes", _size, _peak) for x in _list(state, "probes")],
            observed=dict(_pair(x, "observed", _size, _number) for x in _list(state, "observed")),
            model=model,
            budget=_number(state.get("budget"), "budget", none=True),
            failed=dict(_pair(x, "failed", _size, _number) for x in _list(state, "failed")),
            trial=_size(state.get("trial"), "trial", none=True),
            clean_steps=_count(state.get("clean_steps", 0), "clean_steps"),
            settled=_flag(state.get("settled", False), "settled"),
            trials=_count(state.get("trials", 0), "trials"),
        )


def _list(state: dict[str, Any], name: str) -> list[Any]:
    value = state.get(name, [])
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"policy field {name!r} is {value!r}; expected a list")
    return list(value)


def _pair(value: Any, name: str, first: Any, second: Any) -> Any:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise TypeError(f"policy field {name!r} holds {value!r}; expected pairs")
    return first(value[0], name), second(value[1], name)


def _size(value: Any, name: str, none: bool = False) -> Any:
    if value is None and none:
        return None
    if type(value) is not int or not 1 <= value <= 2**62:
        raise ValueError(f"policy field {name!r} holds {value!r}; expected a sample count >= 1")
    return value


def _count(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= 2**62:
        raise ValueError(f"policy field {name!r} holds {value!r}; expected an int >= 0")
    return value


def _peak(value: Any, name: str) -> int:
    if type(value) is not int or abs(value) > 2**62:
        raise ValueError(f"policy field {name!r} holds {value!r}; expected a byte count")
    return value


def _number(value: Any, name: str, none: bool = False) -> Any:
    if value is None and none:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"policy field {name!r} holds {value!r}; expected a finite number")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise TypeError(f"policy field {name!r} is {value!r}; expected True or False")
    return value
