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
        single_pass_saving: bytes a one-micro-batch step saves (see ``choose_micro_batch``).
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
        single_pass_saving: int = 0,
    ) -> None:
        self.cap = cap
        self.single_pass_saving = single_pass_saving
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

    def set_cap(self, cap: int) -> None:
        """This rank's share of a step changed: plan for the new size (no probing needed)."""
        if cap == self.cap:
            return
        self.cap = cap
        s = self._s
        model = self.memory_model
        if model is not None and s.planned_free is not None and s.trial is None:
            self._plan(model, s.planned_free, 0, f"share is now {cap}")

    # -- what the optimizer reports ----------------------------------------------------------
    def record_probe(
        self, size: int, peak_above_baseline: int, free_bytes: int, reserve: int
    ) -> None:
        """A probe micro-batch of ``size`` peaked ``peak_above_baseline`` bytes above resident."""
        self._s.probes.append((size, peak_above_baseline))
        if len(self._s.probes) >= 2 or size >= self.cap:
            self._plan(planner.fit_memory_model(self._s.probes), free_bytes, reserve, "planned")

    def _plan(self, model: MemoryModel, free_bytes: int, reserve: int, why: str) -> None:
        s = self._s
        s.model = (model.fixed_bytes, model.per_sample_bytes)
        s.planned_free = free_bytes - reserve
        size = planner.choose_micro_batch(
            model, free_bytes, reserve, self.margin, self.cap, self.single_pass_saving
        )
        if s.failed is not None and size >= s.failed:
            size = max(1, s.failed - 1)
        # Snap to the size a balanced split of a full step really runs (e.g. 196 -> 171 for 512).
        self._set_limit(planner.first_split(self.cap, size), why, free_bytes)

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
        current = self.limit
        new = planner.halve(current if current is not None and current >= size else size)
        if new < 1:
            raise OutOfMemoryForOneSample(context)
        if s.model is None and self.planning:
            s.probes.clear()  # the failed probe says nothing about the slope; plan from new ones
        self._set_limit(new, f"out of memory at {size}", free_bytes)
        return new

    def observe_free(self, free_bytes: int, reserve: int) -> None:
        """Free memory at the start of a step (``reserve``: what will be allocated before the
        next micro-batch's peak). Re-plans when it moved by more than the tolerance."""
        s = self._s
        model = self.memory_model
        if model is None or s.planned_free is None or s.trial is not None:
            return
        if not planner.free_moved(s.planned_free, free_bytes - reserve, self.replan_tolerance):
            return
        if self._rose_since_failure(free_bytes):
            s.failed = None  # more memory than when it failed: the failed size may fit now
        self._plan(model, free_bytes, reserve, "free memory moved")

    def end_of_step(self, free_bytes: int | None, had_oom: bool) -> None:
        """One optimizer step finished; ``free_bytes`` (if known) is read at its end."""
        s = self._s
        if had_oom:
            return
        if s.trial is not None:  # the trial size ran a whole step: adopt it
            self._s.limit, self._s.trial = s.trial, None
            log.info("micro-batch grew back to %d", s.limit)
        s.clean_steps += 1
        if s.failed is None or s.clean_steps < self.grow_after or s.limit is None:
            return
        ceiling = s.failed if self.pinned is None else min(s.failed, self.pinned + 1)
        candidate = planner.grow_candidate(s.limit, ceiling, self.cap)
        if candidate == s.limit:  # converged just below the failed size
            if not self._rose_since_failure(free_bytes):
                return
            # More memory than when it failed: try the smallest size a step runs that is not
            # smaller than the failed one (a limit of 341 runs 256s for a step of 1024; 342 runs).
            candidate = planner.achievable_at_least(s.failed, self.cap)
            s.failed = None
        s.trial, s.clean_steps = candidate, 0
        log.info("trying micro-batch %d (grow-back after %d clean steps)",
                 candidate, self.grow_after)

    def _rose_since_failure(self, free_bytes: int | None) -> bool:
        s = self._s
        return (
            s.failed is not None and s.failed_free is not None and free_bytes is not None
            and free_bytes > s.failed_free * (1 + self.replan_tolerance)
        )

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return asdict(self._s)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["probes"] = [tuple(p) for p in state["probes"]]
        state["model"] = tuple(state["model"]) if state["model"] is not None else None
        self._s = _State(**state)
