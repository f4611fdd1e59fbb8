"""The micro-batch size over a run: probe, plan, halve on OOM, re-plan, grow back.

A thin state machine around the pure functions of :mod:`autoaccum.planner`. The optimizer tells it
what happened (a probe's peak, an OOM, the end of a step with the free memory then) and asks it one
thing: how many samples the next micro-batch may hold.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from . import planner
from .planner import MemoryModel

log = logging.getLogger("autoaccum")


class OutOfMemoryForOneSample(RuntimeError):
    """Even a micro-batch of one sample does not fit in the device's free memory."""


@dataclass
class _State:
    limit: int | None  # None: no limit known, a whole call is one micro-batch
    probes: list[tuple[int, int]]
    model: tuple[float, float] | None  # MemoryModel fields, kept plain for state_dict
    planned_free: int | None  # free bytes (+ reserve) the current plan was made for
    failed: int | None  # smallest size that ran out of memory since the last re-plan
    failed_free: int | None  # free bytes when it failed
    trial: int | None  # size being tried by grow-back (falls back to `limit` if it fails)
    clean_steps: int


class MicroBatchPolicy:
    """Decides micro-batch sizes. ``limit`` is the size the next micro-batch may take.

    Args:
        cap: the most samples one micro-batch needs (this rank's share of a step).
        pinned: a user-fixed size; it is never exceeded, only halved on OOM and grown back to.
        planning: whether to probe and plan from memory (a backend with a free-memory reading).
        margin: fraction of free memory kept unused by the plan.
        grow_after: clean steps before trying a larger size again after an OOM.
        replan_tolerance: fraction by which free memory must move to trigger a re-plan.
    """

    def __init__(
        self,
        cap: int,
        *,
        pinned: int | None,
        planning: bool,
        margin: float = 0.1,
        grow_after: int = 50,
        replan_tolerance: float = 0.1,
    ) -> None:
        self.cap = cap
        self.pinned = pinned
        self.planning = planning and pinned is None
        self.margin = margin
        self.grow_after = grow_after
        self.replan_tolerance = replan_tolerance
        self._s = _State(
            limit=pinned, probes=[], model=None, planned_free=None, failed=None,
            failed_free=None, trial=None, clean_steps=0,
        )

    # -- what the optimizer asks -------------------------------------------------------------
    @property
    def limit(self) -> int | None:
        """Largest micro-batch allowed now (None: unlimited)."""
        return self._s.trial or self._s.limit

    @property
    def probing(self) -> bool:
        """Whether the next micro-batch is a probe whose peak memory must be reported."""
        return self.planning and self._s.model is None

    def probe_size(self, free_bytes: int) -> int:
        first = self._s.probes[0] if self._s.probes else None
        return planner.next_probe_size(first, free_bytes, self.cap)

    @property
    def memory_model(self) -> MemoryModel | None:
        return MemoryModel(*self._s.model) if self._s.model else None

    # -- what the optimizer reports ----------------------------------------------------------
    def record_probe(self, size: int, peak_above_baseline: int, free_bytes: int, reserve: int) -> None:
        """A probe micro-batch of ``size`` peaked ``peak_above_baseline`` bytes above resident."""
        self._s.probes.append((size, peak_above_baseline))
        if len(self._s.probes) >= 2 or size >= self.cap:
            self._plan(planner.fit_memory_model(self._s.probes), free_bytes, reserve, "planned")

    def _plan(self, model: MemoryModel, free_bytes: int, reserve: int, why: str) -> None:
        s = self._s
        s.model = (model.fixed_bytes, model.per_sample_bytes)
        s.planned_free = free_bytes - reserve
        size = planner.choose_micro_batch(model, free_bytes, reserve, self.margin, self.cap)
        if s.failed is not None and size >= s.failed:
            size = max(1, s.failed - 1)
        self._set_limit(size, why, free_bytes)

    def _set_limit(self, size: int, why: str, free_bytes: int | None) -> None:
        old, self._s.limit, self._s.trial = self.limit, size, None
        if size != old:
            free = f"{free_bytes / 2**20:.0f} MiB free" if free_bytes is not None else "free n/a"
            log.info("micro-batch %s -> %d (%s; %s)", old, size, why, free)

    def on_oom(self, size: int, free_bytes: int | None, context: str) -> int:
        """A micro-batch of ``size`` ran out of memory. Returns the new limit.

        Raises:
            OutOfMemoryForOneSample: ``size`` was already 1.
        """
        s = self._s
        s.clean_steps = 0
        s.failed = size if s.failed is None else min(s.failed, size)
        s.failed_free = free_bytes
        if s.trial is not None and size >= s.trial and s.limit is not None and s.limit < size:
            # A grow-back trial failed: go back to the size that was known to work.
            self._set_limit(s.limit, f"grow-back to {size} ran out of memory", free_bytes)
            return s.limit
        new = planner.halve(size)
        if new < 1:
            raise OutOfMemoryForOneSample(context)
        if s.model is None and self.planning:
            s.probes.clear()  # the failed probe says nothing about the slope; plan from new ones
        self._set_limit(new, f"out of memory at {size}", free_bytes)
        return new

    def end_of_step(self, free_bytes: int | None, reserve: int, had_oom: bool) -> None:
        """One optimizer step finished; ``free_bytes`` is read at the same point of every step."""
        s = self._s
        if had_oom:
            return
        if s.trial is not None:  # the trial size ran a whole step: adopt it
            self._s.limit, self._s.trial = s.trial, None
            log.info("micro-batch grew back to %d", s.limit)
        s.clean_steps += 1
        model = self.memory_model
        if (
            model is not None
            and free_bytes is not None
            and s.planned_free is not None
            and planner.free_moved(s.planned_free, free_bytes - reserve, self.replan_tolerance)
        ):
            if s.failed is not None and s.failed_free is not None and free_bytes > s.failed_free:
                s.failed = None  # more memory than when it failed: the failed size may fit now
            self._plan(model, free_bytes, reserve, "free memory moved")
            return
        if s.failed is None or s.clean_steps < self.grow_after or s.limit is None:
            return
        candidate = planner.grow_candidate(s.limit, s.failed, self.pinned or self.cap)
        if candidate == s.limit:  # converged just below the failed size
            rose = free_bytes is not None and s.failed_free is not None and (
                free_bytes > s.failed_free * (1 + self.replan_tolerance))
            if not rose:
                return
            candidate, s.failed = s.failed, None  # more memory than when it failed: try it again
        s.trial, s.clean_steps = candidate, 0
        log.info("trying micro-batch %d (grow-back after %d clean steps)", candidate, self.grow_after)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return asdict(self._s)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["probes"] = [tuple(p) for p in state["probes"]]
        state["model"] = tuple(state["model"]) if state["model"] is not None else None
        self._s = _State(**state)
