"""The values the optimizer reports: the plan, one record per step, and its step-level error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .planner import split_shape

__all__ = ["MicroBatchSizes", "Plan", "StepOutOfMemoryError", "StepRecord"]


class MicroBatchSizes(Sequence[int]):
    """The sizes of a balanced split of ``n`` samples at ``limit``, without building the list
    (a target of 10**9 at a limit of 1 stays small). Compares equal to the tuple it stands for."""

    __slots__ = ("_limit", "_n", "_sizes")

    def __init__(self, n: int, limit: int | None, sizes: tuple[int, ...] | None = None):
        self._n, self._limit, self._sizes = n, limit, sizes

    def _count(self) -> tuple[int, int, int]:
        return split_shape(self._n, self._limit)

    def __len__(self) -> int:
        return len(self._sizes) if self._sizes is not None else self._count()[0]

    def __getitem__(self, i: Any) -> Any:
        if self._sizes is not None:
            return self._sizes[i]
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        k, base, extra = self._count()
        if i < 0:
            i += k
        if not 0 <= i < k:
            raise IndexError(i)
        return base + 1 if i < extra else base

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, list, MicroBatchSizes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        if len(self) <= 16:
            return repr(tuple(self))
        return f"({self[0]}, {self[1]}, ..., {self[-1]}: {len(self)} micro-batches)"


class Plan(NamedTuple):
    """How steps are cut into micro-batches.

    ``micro_batch_size`` is the current limit (None: no limit, one micro-batch per call).
    ``micro_batch_sizes`` are the micro-batches of the last finished step (before the first step,
    the planned split of a full one); ``accumulation_steps`` is their count.
    """

    micro_batch_size: int | None
    accumulation_steps: int
    micro_batch_sizes: Sequence[int]


class StepRecord(NamedTuple):
    """What one optimizer step did (``opt.history``); memory fields are None without a backend."""

    step: int  # optimizer steps done after this one (the first step is 1)
    samples: int  # this rank's samples in the step
    micro_batch_size: int  # largest micro-batch that ran
    accumulation_steps: int  # micro-batches whose gradients the step used
    oom_events: int  # OOMs recovered from during the step
    peak_bytes: int | None  # peak allocated while its micro-batches ran (before the inner step)
    free_bytes: int | None  # free at the step's start, before its first micro-batch
    seconds: float  # wall time since the previous step ended (data loading included)
    samples_per_s: float  # samples / seconds, this rank
    compute_seconds: float  # this rank's forward/backward time in the step (no waiting, no data)
    # The plan's micro-batch limit at the step's end (None: no limit, or a record made without
    # it). Unlike micro_batch_size it does not drop when a loader batch cuts a call short.
    micro_batch_limit: int | None = None


class StepOutOfMemoryError(RuntimeError):
    """The inner optimizer's step ran out of memory (or cannot fit); see the message."""


class History(list):  # type: ignore[type-arg]
    """``opt.history``: the :class:`StepRecord` of the last steps, a list bounded to at least
    ``maxlen`` and at most 10% more of the newest records (older ones are dropped in batches, so
    a long run holds a bounded amount of host memory at no per-step cost). Whole-run totals are
    the optimizer's counters (``optimizer_steps``, ``oom_events``, ``skipped_steps``)."""

    def __init__(self, maxlen: int) -> None:
        super().__init__()
        self.maxlen = maxlen

    def append(self, record: StepRecord) -> None:  # type: ignore[override]
        super().append(record)
        if len(self) > self.maxlen + self.maxlen // 10:
            del self[: len(self) - self.maxlen]
