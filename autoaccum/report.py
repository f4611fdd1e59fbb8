"""A picture of a run: micro-batch sizes, memory and throughput per optimizer step.

``plot_history(opt, "history.png")`` draws ``opt.history`` so that an out-of-memory squeeze, the
halving that answered it and the grow-back once memory returned can be seen without reading logs.
matplotlib is an optional dependency (``pip install autoaccum[plot]``), imported only when called.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .optimizer import AutoAccumOptimizer, StepRecord

__all__ = ["plot_history"]

_MIB = 2**20
_OOM_COLOR = "#d62728"
_SQUEEZE_COLOR = "#ff7f0e"
_GROW_COLOR = "#2ca02c"
_FIELDS = StepRecord._fields
# Least distance between two text labels of one kind, as a fraction of the step axis: a size
# change label is about 8% of the axis wide, a (rotated) OOM label about 2%.
_LABEL_GAP = 0.09
_OOM_LABEL_GAP = 0.025
_MAX_OOM_LABELS = 8


class _Change(NamedTuple):
    """The micro-batch size changed between the step before ``step`` and ``step``."""

    step: int
    old: int
    new: int
    label: str  # "halved", "halved x3", "shrank", "grew back", "grew"
    down: bool


def plot_history(
    history: Sequence[StepRecord] | AutoAccumOptimizer,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    losses: Mapping[int, float] | None = None,
) -> pathlib.Path:
    """Draw a run's step history into a PNG file at ``path`` and return that path.

    ``history`` is ``opt.history`` (a sequence of :class:`~autoaccum.StepRecord`) or the
    :class:`~autoaccum.AutoAccumOptimizer` itself. The figure has three panels over the optimizer
    step:

    1. the largest micro-batch each step ran (a step plot, left axis) and the step's number of
       micro-batches, i.e. accumulation steps (dashed, right axis);
    2. peak memory during the step and free memory at its end, in MiB; without a memory backend
       (fields ``None``) the panel says "no memory backend";
    3. throughput in samples/s, each step and (from 10 steps on) the median of the 5 steps
       around it;
    4. with ``losses`` (optimizer step number, as in ``StepRecord.step``, to that step's loss,
       e.g. collected from ``opt.step``'s return values): the training loss, on a panel above
       the others.

    Steps that recovered from out-of-memory errors get a red vertical line on every panel (and a
    red cross, with the count when more than one, in the first); the legend entry "OOM (n)" gives
    the total. A drop of the micro-batch size is annotated "halved" (or "halved xk" for k halvings
    in one step, "shrank" for a smaller cut), a rise back to a size run before "grew back", and
    the steps spent below an earlier size are shaded as the squeeze. Each step shows the largest
    micro-batch it ran, so a halving in the middle of a step shows from the next step on; the
    first step's memory probes (small micro-batches before the plan) are not counted as a change.
    The plan's limit is drawn dotted, and a change counts only where the plan moved (an OOM, a
    new limit): a step whose loader batches cut its calls into smaller micro-batches under the
    same plan is not a halving.
    Labels that would crowd each other are left out; their markers stay.

    Raises:
        ValueError: the history is empty (no optimizer step has finished yet).
        TypeError: ``history`` is neither an optimizer nor a sequence of step records, or
            ``losses`` is not a mapping of step numbers to numbers.
        ImportError: matplotlib is not installed.
    """
    records = _records(history)
    loss_points = _loss_points(losses)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError(
            "plot_history needs matplotlib: pip install matplotlib (or pip install "
            "'autoaccum[plot]')"
        ) from exc

    out = pathlib.Path(path)
    steps = [r.step for r in records]
    sizes = [r.micro_batch_size for r in records]
    changes = _size_changes(records)
    squeezes = _squeezed_spans(records)
    ooms = [(r.step, r.oom_events) for r in records if r.oom_events > 0]
    total_ooms = sum(n for _, n in ooms)

    # A Figure with an explicit Agg canvas: no pyplot, so the caller's backend is left alone.
    fig = Figure(figsize=(13, 11 if loss_points else 9), layout="constrained")
    FigureCanvasAgg(fig)
    if loss_points:
        ax_loss, ax_size, ax_mem, ax_rate = fig.subplots(4, 1, sharex=True,
                                                         height_ratios=(1, 1.4, 1, 1))
        ax_loss.plot([p[0] for p in loss_points], [p[1] for p in loss_points], color="#2ca02c",
                     lw=1.8, marker="." if len(loss_points) <= 200 else "", ms=4)
        ax_loss.set_ylabel("training loss")
        ax_loss.grid(True, alpha=0.3)
    else:
        ax_size, ax_mem, ax_rate = fig.subplots(3, 1, sharex=True, height_ratios=(1.4, 1, 1))

    dot = "." if len(records) <= 200 else ""  # a marker per step, while they stay apart

    # (1) micro-batch size and accumulation steps.
    size_line = ax_size.plot(
        steps, sizes, drawstyle="steps-mid", color="#1f77b4", lw=2.2, marker=dot, ms=4,
        label="micro-batch size (largest run)",
    )[0]
    size_lines = [size_line]
    limits: list[int] = []
    if any(r.micro_batch_limit is not None for r in records):
        full = max(r.samples for r in records)
        limits = [full if r.micro_batch_limit is None else min(r.micro_batch_limit, full)
                  for r in records]
        size_lines.append(ax_size.plot(
            steps, limits, drawstyle="steps-mid",
            color="#1f77b4", lw=1.2, ls=":", label="micro-batch limit (plan)",
        )[0])
    ax_acc = ax_size.twinx()
    acc_line = ax_acc.plot(
        steps, [r.accumulation_steps for r in records], drawstyle="steps-mid", color="#7f7f7f",
        lw=1.4, ls="--", label="accumulation steps",
    )[0]
    ax_size.set_ylabel("micro-batch size (samples)")
    ax_acc.set_ylabel("accumulation steps", color="#555555")
    ax_acc.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_size.set_ylim(0, max(max(sizes), *limits, 1) * 1.35)
    ax_acc.set_ylim(0, max(r.accumulation_steps for r in records) * 1.35 + 0.5)
    span = steps[-1] - steps[0] + 1
    # OOM text labels while they are few; beyond that the red lines and the legend say it.
    oom_labels: set[float] = set()
    if len(ooms) <= _MAX_OOM_LABELS:
        oom_labels = _spaced([step for step, _ in ooms], _OOM_LABEL_GAP * span)
    for step, n in ooms:
        y = sizes[steps.index(step)]
        ax_size.plot([step], [y], marker="X", ms=11, color=_OOM_COLOR, mec="white", zorder=5)
        if n > 1 and step in oom_labels:
            ax_size.annotate(f"x{n}", (step, y), xytext=(7, -12), textcoords="offset points",
                             color=_OOM_COLOR, fontsize=9, fontweight="bold")
    _annotate_changes(ax_size, changes, max(sizes), _LABEL_GAP * span)

    # (2) memory.
    peak = [_mib(r.peak_bytes) for r in records]
    free = [_mib(r.free_bytes) for r in records]
    mem_lines = []
    if any(not math.isnan(v) for v in peak + free):
        mem_lines.append(ax_mem.plot(steps, peak, color="#9467bd", lw=1.8, marker=dot, ms=4,
                                     label="peak during step")[0])
        mem_lines.append(ax_mem.plot(steps, free, color="#17becf", lw=1.8, marker=dot, ms=4,
                                     label="free at end of step")[0])
        top = max(v for v in peak + free if not math.isnan(v))
        ax_mem.set_ylim(0, top * 1.3 if top > 0 else 1)
    else:
        ax_mem.text(0.5, 0.5, "no memory backend: peak and free memory unknown",
                    transform=ax_mem.transAxes, ha="center", va="center", color="#555555")
        ax_mem.set_yticks([])
    ax_mem.set_ylabel("memory (MiB)")

    # (3) throughput.
    rate = [r.samples_per_s for r in records]
    rate_lines = [ax_rate.plot(steps, rate, color="#8c8c8c", lw=0.8, marker=dot, ms=4,
                               alpha=0.8, label="each step")[0]]
    if len(records) >= 10:
        rate_lines.append(ax_rate.plot(steps, _rolling_median(rate, 5), color="#e377c2", lw=2.2,
                                       label="median of 5 steps")[0])
    finite = [v for v in rate if math.isfinite(v)]
    ax_rate.set_ylim(0, max(finite) * 1.15 if finite and max(finite) > 0 else 1)
    ax_rate.set_ylabel("samples / s")
    ax_rate.set_xlabel("optimizer step")
    ax_rate.xaxis.set_major_locator(MaxNLocator(integer=True))

    # On every panel: OOM lines and the squeeze.
    oom_handle = None
    squeeze_handle = None
    for ax in (ax_size, ax_mem, ax_rate):
        for step, _ in ooms:
            oom_handle = ax.axvline(step, color=_OOM_COLOR, lw=1.6, ls="-", alpha=0.85, zorder=1,
                                    label=f"OOM ({total_ooms})")
        for start, end in squeezes:
            squeeze_handle = ax.axvspan(start - 0.5, end + 0.5, color=_SQUEEZE_COLOR, alpha=0.1,
                                        lw=0, zorder=0, label="squeezed: below an\nearlier size")
        ax.grid(True, alpha=0.3)
    for step, n in ooms:
        if step not in oom_labels:
            continue
        ax_size.annotate(f"OOM x{n}" if n > 1 else "OOM", (step, 1.0),
                         xycoords=("data", "axes fraction"), xytext=(-3, -4),
                         textcoords="offset points", rotation=90, ha="right", va="top",
                         color=_OOM_COLOR, fontsize=9, fontweight="bold")
    marks = [h for h in (oom_handle, squeeze_handle) if h is not None]
    # Legends outside, right of the panels (past the accumulation axis): they never hide data.
    legend = {"loc": "upper left", "fontsize": 9, "borderaxespad": 0.0}
    ax_size.legend(handles=[*size_lines, acc_line, *marks], bbox_to_anchor=(1.07, 1), **legend)
    if mem_lines:
        ax_mem.legend(handles=[*mem_lines, *marks[:1]], bbox_to_anchor=(1.07, 1), **legend)
    ax_rate.legend(handles=[*rate_lines, *marks[:1]], bbox_to_anchor=(1.07, 1), **legend)
    ax_size.set_xlim(steps[0] - 0.7, steps[-1] + 0.7)

    if title is None:
        samples = max(r.samples for r in records)
        title = (f"autoaccum: {len(records)} optimizer steps of {samples} samples, "
                 f"{total_ooms} OOM event{'s' if total_ooms != 1 else ''} recovered")
    (ax_loss if loss_points else ax_size).set_title(title, fontsize=13)
    fig.savefig(out, format="png", dpi=110)
    return out


def _loss_points(losses: Any) -> list[tuple[int, float]]:
    if losses is None:
        return []
    if not isinstance(losses, Mapping):
        raise TypeError(f"plot_history(losses=...) takes a mapping of optimizer step number to "
                        f"loss, got {type(losses).__name__}; e.g. {{opt.optimizer_steps: loss}}")
    try:
        return sorted((int(k), float(v)) for k, v in losses.items())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"plot_history(losses=...): step numbers must be ints and losses "
                        f"must be numbers ({exc})") from None


def _records(history: Any) -> list[StepRecord]:
    if isinstance(history, AutoAccumOptimizer):
        history = history.history
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise TypeError(
            f"plot_history needs opt.history (a sequence of StepRecord) or the "
            f"AutoAccumOptimizer, got {type(history).__name__}"
        )
    if len(history) == 0:
        raise ValueError(
            "plot_history got an empty history: no optimizer step has finished yet; plot after "
            "training (at least one full step of target_batch_size samples, or flush())"
        )
    records = []
    for i, rec in enumerate(history):
        if not all(hasattr(rec, f) for f in _FIELDS):
            raise TypeError(
                f"history[{i}] is a {type(rec).__name__}, expected an autoaccum.StepRecord with "
                f"fields {', '.join(_FIELDS)}"
            )
        records.append(rec)
    return records


def _mib(n: int | None) -> float:
    return float("nan") if n is None else n / _MIB


def _rolling_median(values: Sequence[float], window: int) -> list[float]:
    """Median of the ``window`` values centred on each one (fewer at the ends; NaN skipped)."""
    out = []
    half = window // 2
    for i in range(len(values)):
        chunk = sorted(v for v in values[max(0, i - half): i + half + 1] if math.isfinite(v))
        if not chunk:
            out.append(float("nan"))
            continue
        mid = len(chunk) // 2
        out.append(chunk[mid] if len(chunk) % 2 else (chunk[mid - 1] + chunk[mid]) / 2)
    return out


def _limited(records: Sequence[StepRecord], i: int, full: int) -> bool:
    """Whether record ``i``'s micro-batch size says something about the limit. Not so for the
    first step of a run with a memory backend (it probes with small micro-batches before it
    plans), nor for a short step (flush, smaller share) that ran as one micro-batch: that only
    shows how few samples it had."""
    r = records[i]
    if r.step == 1 and r.peak_bytes is not None and r.oom_events == 0 and len(records) > 1:
        return False
    return r.micro_batch_size > 0 and not (r.samples < full and r.micro_batch_size >= r.samples)


def _sizes(records: Sequence[StepRecord]) -> list[int | None]:
    """The size whose changes count, per record (None: a record that says nothing about the
    limit, see :func:`_limited`): the largest micro-batch run.

    Where the records carry the plan's limit, the steps fall into spans under one plan (a new
    one after each change of the limit and after each step with an OOM), and every step counts
    with the largest micro-batch its span ran: a step whose loader batches cut its calls into
    smaller micro-batches (each call's part is split on its own) changes nothing, and neither
    does a limit the plan gave up before any step ran it.
    """
    full = max(r.samples for r in records)
    base = [r.micro_batch_size if _limited(records, i, full) else None
            for i, r in enumerate(records)]
    if all(r.micro_batch_limit is None for r in records):
        return base
    span_of: list[int] = []
    largest: list[int | None] = []  # per span
    limit: int | None = None
    oom = False
    for r, size in zip(records, base, strict=True):
        if not largest or r.micro_batch_limit != limit or oom:
            largest.append(None)
            limit, oom = r.micro_batch_limit, False
        oom = oom or r.oom_events > 0
        if size is not None:
            largest[-1] = max(largest[-1] or 0, size)
        span_of.append(len(largest) - 1)
    return [None if size is None else largest[k] for size, k in zip(base, span_of, strict=True)]


def _size_changes(records: Sequence[StepRecord]) -> list[_Change]:
    changes: list[_Change] = []
    prev: int | None = None
    highest = 0
    for r, size in zip(records, _sizes(records), strict=True):
        if size is None:
            continue
        if prev is not None and size != prev:
            if size < prev:
                halvings = round(math.log2(prev / size))
                if size <= prev * 0.6 and halvings >= 2:
                    label = f"halved x{halvings}"
                elif size <= prev * 0.6:
                    label = "halved"
                else:
                    label = "shrank"
            else:
                label = "grew back" if highest >= size * 0.98 else "grew"
            changes.append(_Change(r.step, prev, size, label, size < prev))
        prev = size
        highest = max(highest, size)
    return changes


def _squeezed_spans(records: Sequence[StepRecord]) -> list[tuple[int, int]]:
    """Runs of steps whose micro-batch is below the largest size run before (after a drop)."""
    spans: list[tuple[int, int]] = []
    highest = 0
    start: int | None = None
    last = records[0].step
    for r, size in zip(records, _sizes(records), strict=True):
        if size is None:
            continue
        below = 0 < size < highest * 0.98
        if below and start is None:
            start = r.step
        elif not below and start is not None:
            spans.append((start, last))
            start = None
        last = r.step
        highest = max(highest, size)
    if start is not None:
        spans.append((start, last))
    return spans


def _spaced(xs: Sequence[float], gap: float) -> set[float]:
    """The ``xs`` (ascending) that get a text label: each at least ``gap`` after the last one."""
    keep: set[float] = set()
    last = -math.inf
    for x in xs:
        if x - last >= gap:
            keep.add(x)
            last = x
    return keep


def _annotate_changes(ax: Any, changes: Sequence[_Change], top: int, gap: float) -> None:
    """A marker at every size change; a text label where labels of its kind do not crowd."""
    labelled = {
        down: _spaced([c.step for c in changes if c.down == down], gap) for down in (True, False)
    }
    for c in changes:
        color = _SQUEEZE_COLOR if c.down else _GROW_COLOR
        x = c.step - 0.5  # where the step line jumps (steps-mid)
        ax.plot([x], [c.new], marker="v" if c.down else "^", ms=9, color=color, zorder=4)
        if c.step not in labelled[c.down]:
            continue
        y_text = top * 1.17 if not c.down else max(c.new * 0.45, top * 0.12)
        ax.annotate(
            f"{c.label}\n{c.old} \u2192 {c.new}", xy=(x, c.new), xytext=(x, y_text),
            ha="center", va="center", fontsize=9, fontweight="bold", color=color,
            arrowprops={"arrowstyle": "->", "color": color, "lw": 1.3},
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": color, "alpha": 0.9},
        )
