"""The bookkeeping of one unfinished optimizer step, shared by the fast and the full path.

The invariant, kept here and nowhere else: ``.grad`` holds exactly the weighted gradients of the
micro-batches recorded in the chunks (each chunk's samples ``[0, done)``, chunks before ``cursor``
complete), and nothing else. Every pending sample is either accumulated that way or waits for a
replay (``done`` below its chunk's size). :meth:`StepState.rewind` restores the invariant after
anything that may have left a partial gradient: it clears ``.grad`` (through the callback it is
given) and marks every pending sample for replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .batching import FlatBatch

LossFn = Callable[[Any], Any]


class Chunk:
    """The samples one ``step()`` call brought to this step, and how far they are accumulated."""

    __slots__ = ("aux", "call", "counted", "den", "done", "flat", "item_sum", "items", "loss_fn",
                 "losses", "raw", "sizes", "versions")

    def __init__(self, flat: FlatBatch, loss_fn: LossFn, call: int, counted: int | None = None):
        self.flat = flat
        self.loss_fn = loss_fn
        self.call = call
        self.counted = counted  # items count_items() gave for these samples, if known
        self.versions = flat.versions()  # to notice a loader that refills its buffers in place
        self.restart()

    def restart(self) -> None:
        """Nothing of this chunk is in ``.grad`` any more."""
        self.done = 0  # samples whose gradient is in .grad (a prefix)
        self.den: Any = 1  # what the micro-batch losses were divided by (the step's)
        # Per accumulated micro-batch: its loss, item count (token mode only), size and auxiliary
        # outputs; combined once per call, never per micro-batch. The loss is either raw (the
        # fast path's: loss_fn's output, its backward seeded with the weight) in ``raw``, or
        # detached and weighted (the full path's: divided by ``den``, and times its size in mean
        # mode) in ``losses``; ``raw`` holds the first micro-batches, ``sizes`` all of them.
        self.raw: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.items: list[Any] = []
        self.item_sum: tuple[int, Any] | None = None  # (len(items), their checked sum)
        self.sizes: list[int] = []
        self.aux: list[dict[str, Any]] = []

    @property
    def size(self) -> int:
        return self.flat.size

    def record(self, weighted: torch.Tensor, items: Any, size: int, aux: dict[str, Any] | None
               ) -> None:
        """One micro-batch of ``size`` samples reached ``.grad`` through ``weighted`` (its loss
        divided by :attr:`den`, and times ``size`` in mean mode); ``items`` is its item count in
        token mode (None in mean mode, where the sizes are the counts)."""
        self.losses.append(weighted.detach())
        if items is not None:
            self.items.append(items)
        self.sizes.append(size)
        if aux is not None:
            self.aux.append({**aux, "num_samples": size})
        self.done += size

    def check_unchanged(self) -> None:
        """Raise if the samples were written in place since they were given (a loader reusing
        one buffer): a replay would then compute the gradient of other samples."""
        if self.flat.versions() != self.versions:
            raise RuntimeError(
                "samples of the unfinished step were modified in place after they were given (a "
                "data loader that reuses its buffers, or a loss_fn that writes into its "
                "micro-batch); autoaccum keeps them to replay the step after an OOM and to "
                "checkpoint it. Give each batch its own tensors (e.g. batch.clone()) and keep "
                "loss_fn from editing its micro-batch in place (x = x - x.mean(), not x.sub_())."
            )


class StepState:
    """The samples of the unfinished step, in arrival order."""

    def __init__(self, size: int) -> None:
        self.size = size  # this rank's share of the step: the samples it needs
        self.chunks: list[Chunk] = []
        self.count = 0  # samples in chunks
        self.cursor = 0  # index of the first chunk not fully accumulated
        self.denominator: Any = None  # what micro-batch losses are divided by; set per step

    @property
    def empty(self) -> bool:
        return not self.chunks

    @property
    def full(self) -> bool:
        return self.count == self.size

    @property
    def accumulated(self) -> int:
        return sum(c.done for c in self.chunks)

    @property
    def needs_replay(self) -> bool:
        """Between calls: some pending sample's gradient is not in ``.grad`` (after a rewind, or
        samples restored by ``load_state_dict``). Chunks before the cursor are complete."""
        return self.advance() is not None

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.count += chunk.size

    def advance(self) -> Chunk | None:
        """The first chunk with samples not in ``.grad`` (moving the cursor past done ones)."""
        chunks = self.chunks
        while self.cursor < len(chunks) and chunks[self.cursor].done == chunks[self.cursor].size:
            self.cursor += 1
        return chunks[self.cursor] if self.cursor < len(chunks) else None

    def rewind(self, clear_grads: Callable[[], None]) -> None:
        """After a partial gradient: clear ``.grad`` and mark every pending sample for replay."""
        clear_grads()
        for c in self.chunks:
            c.restart()
        self.cursor = 0
        self.denominator = None

    def drop_call(self, call: int) -> int:
        """Forget the samples ``call`` brought (they are the last chunks); returns how many. The
        caller rewinds if any of them had reached ``.grad``."""
        dropped = 0
        while self.chunks and self.chunks[-1].call == call:
            chunk = self.chunks.pop()
            self.count -= chunk.size
            dropped += chunk.size
        self.cursor = min(self.cursor, len(self.chunks))
        return dropped

    def take(self) -> list[Chunk]:
        """End of the step: hand over its chunks and start empty."""
        chunks = self.chunks
        self.chunks, self.count, self.cursor, self.denominator = [], 0, 0, None
        return chunks
