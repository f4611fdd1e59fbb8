"""Samplers that feed each rank its share of every optimizer step.

In a distributed job ``target_batch_size`` is the *global* batch of one optimizer step. Each rank
contributes a share of it; shares sum to the target, may be unequal (a faster GPU takes more) and
may change during the run. A :class:`ShareSchedule` says which shares are in force at which
optimizer step; the optimizer owns one (``opt.share_schedule``) and updates it, and a
:class:`ShareSampler` reads it to hand each rank exactly its share of every step::

    opt = autoaccum.AutoAccumOptimizer(model.parameters(), ..., target_batch_size=1024,
                                       shares="auto", model=ddp_model)
    sampler = ShareSampler(dataset, opt)            # rank and world size from torch.distributed
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:                        # one batch = this rank's part of one step
            opt.step(loss_fn, batch)
        opt.flush()                                 # the epoch's last, partial step

Every rank computes the same schedule (the optimizer's shares are agreed across ranks), and every
rank draws the same permutation of the dataset, so the ranks' parts of a step never overlap and
together cover each sample exactly once per epoch.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ShareSampler", "ShareSchedule", "split_by_shares"]


def _as_shares(shares: Any, what: str) -> tuple[int, ...]:
    """``shares`` as a tuple of ints >= 1, or a ValueError/TypeError that shows what was given."""
    if isinstance(shares, (str, bytes)) or not isinstance(shares, Sequence):
        raise TypeError(
            f"{what} must be a sequence of per-rank sample counts such as [512, 512], "
            f"got {type(shares).__name__} {shares!r}"
        )
    values = list(shares)
    if not values:
        raise ValueError(f"{what} must name at least one rank's share, got an empty sequence")
    out = []
    for rank, s in enumerate(values):
        if isinstance(s, bool):
            raise TypeError(f"{what} must be ints, got the bool {s!r} for rank {rank} in {values}")
        try:
            s = operator.index(s)
        except TypeError:
            raise TypeError(
                f"{what} must be ints, got {type(s).__name__} {s!r} for rank {rank} in {values}"
            ) from None
        if s < 1:
            raise ValueError(
                f"{what} must give every rank at least 1 sample, got {s} for rank {rank} in "
                f"{values}; expected ints >= 1"
            )
        out.append(s)
    return tuple(out)


def _as_step(step: Any, what: str = "step") -> int:
    if isinstance(step, bool):
        raise TypeError(f"{what} must be an int, got the bool {step!r}")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(step).__name__} {step!r}") from None
    if step < 0:
        raise ValueError(f"{what} must be >= 0 (counted from 0), got {step}")
    return step


def split_by_shares(n: int, shares: Sequence[int]) -> list[int]:
    """Split ``n`` samples among ranks in proportion to ``shares``, by largest remainder.

    The parts are ints >= 0 that sum to ``n``; each is within one of the exact proportion
    ``n * shares[r] / sum(shares)``; ties in the remainder go to the lower rank. Deterministic, so
    every rank computes the same split. ``split_by_shares(5, [3, 1]) == [4, 1]``.
    """
    if n < 0:
        raise ValueError(f"cannot split a negative number of samples ({n})")
    total = sum(shares)
    parts = [n * s // total for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda r: (-(n * shares[r] % total), r))
    for r in by_remainder[: n - sum(parts)]:
        parts[r] += 1
    return parts


class ShareSchedule:
    """The per-rank shares of every optimizer step of a run.

    ``shares_for(step)[r]`` is how many samples rank ``r`` contributes to optimizer step ``step``
    (0-based, counted over the whole run, across epochs). The shares start as ``initial`` and change
    only through :meth:`set_from`, which keeps the world size and the total (the global batch,
    ``target``) fixed.

    Guarantees:

    * Shares are never changed for a step that has already been read: :meth:`shares_for` records
      the highest step read (:attr:`last_read`), and :meth:`set_from` refuses to change any step at
      or before it. A sampler that ran ahead (DataLoader prefetching) therefore never disagrees with
      the optimizer about a step it has already cut.
    * Every share is an int >= 1, there are always :attr:`world_size` of them, and they always sum
      to :attr:`target`.
    * Only a bounded history is kept: :meth:`set_from` drops the entries that no step still to be
      read can need. Readers (the optimizer and the samplers) read steps in increasing order, so a
      step below the lowest one read since the previous :meth:`set_from` is never read again;
      entries in force only before it are dropped, and reading such a step raises RuntimeError.

    In a distributed job each rank owns its own schedule and applies the same updates, so all ranks
    see identical shares.
    """

    def __init__(self, initial: Sequence[int]) -> None:
        shares = _as_shares(initial, "initial shares")
        self._steps: list[int] = [0]  # entry i is in force from _steps[i] until _steps[i + 1]
        self._shares: list[tuple[int, ...]] = [shares]
        self._last_read = -1
        self._lowest_since_set: int | None = None

    @classmethod
    def equal(cls, target: int, world_size: int) -> ShareSchedule:
        """Shares of ``target`` as even as possible over ``world_size`` ranks (first ranks +1)."""
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (target, world_size)):
            raise TypeError(f"target and world_size must be ints, got {target!r}, {world_size!r}")
        if world_size < 1 or target < world_size:
            raise ValueError(
                f"a target of {target} samples cannot give each of {world_size} ranks at least "
                f"one sample; expected target >= world_size >= 1"
            )
        base, extra = divmod(target, world_size)
        return cls([base + (r < extra) for r in range(world_size)])

    @property
    def target(self) -> int:
        """Samples per optimizer step over all ranks: the sum of every entry's shares."""
        return sum(self._shares[0])

    @property
    def world_size(self) -> int:
        """Number of ranks: the length of every entry's shares."""
        return len(self._shares[0])

    @property
    def last_read(self) -> int:
        """The highest step :meth:`shares_for` has answered for (-1 before the first read)."""
        return self._last_read

    def shares_for(self, step: int) -> tuple[int, ...]:
        """The shares of all ranks in force at optimizer step ``step``.

        Records ``step`` as read: from now on :meth:`set_from` cannot change it or any earlier step.
        """
        step = _as_step(step)
        i = bisect.bisect_right(self._steps, step) - 1
        if i < 0:
            raise RuntimeError(
                f"the shares of step {step} are no longer kept: the schedule starts at step "
                f"{self._steps[0]} (older entries were dropped once every reader had moved past "
                f"them). Steps are read in increasing order; re-reading an old step means the data "
                f"and the optimizer are out of step (did a sampler go back to an earlier epoch?)"
            )
        if step > self._last_read:
            self._last_read = step
        if self._lowest_since_set is None or step < self._lowest_since_set:
            self._lowest_since_set = step
        return self._shares[i]

    def set_from(self, step: int, shares: Sequence[int]) -> None:
        """Make ``shares`` the shares in force from optimizer step ``step`` on.

        A later call overrides earlier ones for the steps from its ``step`` on. Raises ValueError if
        ``shares`` has another world size or another total than the schedule, and RuntimeError if
        ``step`` was already read (``step <= last_read``): the change must then be scheduled
        further ahead. On error nothing changes.
        """
        step = _as_step(step)
        new = _as_shares(shares, "shares")
        if len(new) != self.world_size:
            raise ValueError(
                f"shares {list(new)} are for {len(new)} ranks; expected {self.world_size} (the "
                f"schedule's world size); the number of ranks cannot change during a run"
            )
        if sum(new) != self.target:
            raise ValueError(
                f"shares {list(new)} sum to {sum(new)}; expected {self.target} (the target batch "
                f"size): shares may move samples between ranks but not change the global batch"
            )
        if step <= self._last_read:
            raise RuntimeError(
                f"cannot change the shares of step {step}: data up to step {self._last_read} has "
                f"already been cut with the shares then in force (a DataLoader prefetches ahead of "
                f"the optimizer). Schedule the change further ahead, at a step > {self._last_read}"
                f" (more lookahead than num_workers * prefetch_factor batches)"
            )
        # Drop entries from `step` on, then add the new one unless it changes nothing.
        i = bisect.bisect_left(self._steps, step)
        del self._steps[i:], self._shares[i:]
        if not self._shares or self._shares[-1] != new:
            self._steps.append(step)
            self._shares.append(new)
        self._forget_old()

    def _forget_old(self) -> None:
        """Drop the entries in force only before the lowest step read since the last call."""
        lowest, self._lowest_since_set = self._lowest_since_set, None
        if lowest is None:
            return
        keep_from = bisect.bisect_right(self._steps, lowest) - 1
        if keep_from > 0:
            del self._steps[:keep_from], self._shares[:keep_from]

    def state_dict(self) -> dict[str, Any]:
        """The schedule as plain Python types (ints and lists), for checkpoints."""
        return {
            "entries": [[s, list(sh)] for s, sh in zip(self._steps, self._shares, strict=True)],
            "last_read": self._last_read,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. It must have this schedule's world size and target.

        Raises ValueError (and changes nothing) on a malformed state or another world size/target.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != {"entries", "last_read"} \
                or not isinstance(state_dict["entries"], (list, tuple)) \
                or type(state_dict["last_read"]) is not int or state_dict["last_read"] < -1:
            raise ValueError(
                f"expected a ShareSchedule state dict with exactly 'entries' (a list) and "
                f"'last_read' (an int >= -1), got {state_dict!r}"
            )
        raw_entries = list(state_dict["entries"])
        last_read = state_dict["last_read"]
        if not raw_entries:
            raise ValueError("ShareSchedule state has no entries; expected at least one")
        steps: list[int] = []
        shares: list[tuple[int, ...]] = []
        for entry in raw_entries:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"ShareSchedule state entries must be [step, shares] pairs, "
                                 f"got {entry!r}")
            step, sh = entry
            step = _as_step(step, "entry step")
            sh = _as_shares(sh, f"shares of the entry at step {step}")
            if steps and step <= steps[-1]:
                raise ValueError(f"ShareSchedule state entries must have increasing steps, got "
                                 f"{[e[0] for e in raw_entries]}")
            if len(sh) != self.world_size or sum(sh) != self.target:
                raise ValueError(
                    f"ShareSchedule state has shares {list(sh)} (world size {len(sh)}, total "
                    f"{sum(sh)}); expected world size {self.world_size} and total {self.target}, "
                    f"as this schedule was built with; build a new schedule to change them"
                )
            steps.append(step)
            shares.append(sh)
        self._steps, self._shares = steps, shares
        self._last_read = max(last_read, -1)
        self._lowest_since_set = None

    def __repr__(self) -> str:
        pairs = zip(self._steps, self._shares, strict=True)
        entries = ", ".join(f"{s}: {list(sh)}" for s, sh in pairs)
        return f"ShareSchedule({{{entries}}}, last_read={self._last_read})"


def _resolve_schedule(source: Any) -> ShareSchedule:
    if isinstance(source, ShareSchedule):
        return source
    schedule = getattr(source, "share_schedule", None)
    if isinstance(schedule, ShareSchedule):
        return schedule
    raise TypeError(
        f"schedule must be a ShareSchedule or an object with a .share_schedule ShareSchedule (an "
        f"AutoAccumOptimizer), got {type(source).__name__}"
        + (f" whose .share_schedule is {schedule!r}" if hasattr(source, "share_schedule") else "")
    )


class ShareSampler(Sampler[list[int]]):
    """A batch sampler that gives this rank exactly its share of every optimizer step.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``: each item is the list of dataset
    indices this rank contributes to one optimizer step, so one loader batch is one step.

    Epoch ``e`` orders the ``N`` indices by ``torch.randperm(N)`` drawn from
    ``torch.Generator().manual_seed(seed + e)`` (``range(N)`` with ``shuffle=False``), identically
    on every rank. Step ``i`` of the epoch covers ``order[i*T:(i+1)*T]`` (``T`` = the schedule's
    target); rank ``r`` takes the slice ``[sum(shares[:r]), sum(shares[:r+1]))`` of it, where
    ``shares = schedule.shares_for(global_step)`` and
    ``global_step = start_step + epoch * len(self) + i``.

    Guarantees:

    * Over all ranks, every index appears exactly once per epoch, and a full step has exactly
      ``T`` samples, this rank's being exactly its share.
    * The last step of an epoch gets the ``N % T`` left-over samples, split in proportion to the
      shares (:func:`split_by_shares`). A rank whose part is empty yields nothing for that step
      (a loader batch cannot be empty), so it runs one batch fewer than ``len(self)``. Call
      ``opt.flush()`` at the end of every epoch: it applies that partial step (ranks with nothing
      pending take part too) and keeps the optimizer's step count equal to the sampler's.
    * Deterministic: the batches are a function of ``seed``, ``epoch``, ``rank`` and the schedule.
    * Only this rank's indices are produced: the DataLoader loads no other rank's samples.

    Epochs: iteration uses :attr:`epoch`, then moves it on by one when the iteration starts, so a
    loop that never calls :meth:`set_epoch` still walks epochs 0, 1, 2, ... with global steps that
    follow on. :meth:`set_epoch` works as with ``DistributedSampler`` (call it before iterating).

    The shares of a step are read when the DataLoader asks for its indices, which with worker
    processes is ``num_workers * prefetch_factor`` batches ahead of training: share changes must be
    scheduled further ahead than that (see :meth:`ShareSchedule.set_from`).

    With equal shares a plain ``DistributedSampler`` keeps working with the optimizer; this sampler
    is needed when shares are unequal or change (``shares="auto"``), since it hands each rank as
    many samples per step as that rank's share.
    """

    def __init__(
        self,
        dataset_or_len: Sized | int,
        schedule: ShareSchedule | Any,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        start_step: int = 0,
    ) -> None:
        if isinstance(dataset_or_len, bool):
            raise TypeError("dataset_or_len must be a dataset or an int, got a bool")
        if isinstance(dataset_or_len, Sized):
            n = len(dataset_or_len)
        elif hasattr(dataset_or_len, "__index__"):
            n = operator.index(dataset_or_len)
        else:
            raise TypeError(
                f"dataset_or_len must be a sized (map-style) dataset or an int, got "
                f"{type(dataset_or_len).__name__}"
            )
        if n < 0:
            raise ValueError(f"dataset length must be >= 0, got {n}")
        sched = _resolve_schedule(schedule)
        initialized = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        if world_size != sched.world_size:
            raise ValueError(
                f"world_size is {world_size} but the schedule has shares for "
                f"{sched.world_size} ranks; expected them to match"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self._source = schedule
        self.num_samples = n
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.start_step = _as_step(start_step, "start_step")
        self.epoch = 0

    @property
    def schedule(self) -> ShareSchedule:
        """The schedule read for every step (looked up on the optimizer each time, if given one)."""
        sched = _resolve_schedule(self._source)
        if sched.world_size != self.world_size:
            raise ValueError(
                f"the schedule now has shares for {sched.world_size} ranks; this sampler was "
                f"built for world_size={self.world_size}"
            )
        return sched

    @property
    def steps_per_epoch(self) -> int:
        """``ceil(N / T)``: optimizer steps per epoch, the last one partial if ``T`` doesn't
        divide ``N``."""
        return math.ceil(self.num_samples / self.schedule.target)

    def __len__(self) -> int:
        """Steps per epoch. A rank with no part in the epoch's partial last step yields one less."""
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch`` for the next iteration (its permutation and its global steps)."""
        self.epoch = _as_step(epoch, "epoch")

    def global_step(self, i: int, epoch: int | None = None) -> int:
        """The optimizer step that batch ``i`` of ``epoch`` (default: :attr:`epoch`) belongs to."""
        epoch = self.epoch if epoch is None else epoch
        return self.start_step + epoch * self.steps_per_epoch + i

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: nothing runs (and no epoch is consumed) until the first index is asked for,
        # so the DataLoader may create iterators it never uses.
        epoch = self.epoch
        self.epoch = epoch + 1
        order = self._order(epoch)
        target = self.schedule.target
        r = self.rank
        full, rest = divmod(self.num_samples, target)
        base = self.start_step + epoch * (full + (rest > 0))
        for i in range(full):
            shares = self.schedule.shares_for(base + i)
            lo = i * target + sum(shares[:r])
            yield order[lo : lo + shares[r]].tolist()
        if rest:
            parts = split_by_shares(rest, self.schedule.shares_for(base + full))
            if parts[r]:
                lo = full * target + sum(parts[:r])
                yield order[lo : lo + parts[r]].tolist()

    def __repr__(self) -> str:
        return (
            f"ShareSampler(num_samples={self.num_samples}, rank={self.rank}, "
            f"world_size={self.world_size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"start_step={self.start_step}, epoch={self.epoch})"
        )
