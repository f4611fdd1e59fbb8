"""plot_history: writes a readable PNG from an optimizer or its history, and labels size changes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import autoaccum
from autoaccum.optimizer import StepRecord
from autoaccum.report import _size_changes, _squeezed_spans, plot_history

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(step: int, size: int, *, samples: int = 1024, oom: int = 0, memory: bool = True,
           rate: float = 1000.0) -> StepRecord:
    return StepRecord(
        step=step,
        samples=samples,
        micro_batch_size=size,
        accumulation_steps=-(-samples // size),
        oom_events=oom,
        peak_bytes=(1 << 20) + size * 4096 if memory else None,
        free_bytes=(2 << 20) if memory else None,
        seconds=samples / rate,
        samples_per_s=rate,
        compute_seconds=samples / rate,
    )


def squeeze_history(memory: bool = True) -> list[StepRecord]:
    """342 until an OOM in step 5 halves it to 171 from step 6; back at 342 from step 10."""
    sizes = [342] * 5 + [171] * 4 + [342] * 3
    return [
        record(i + 1, s, oom=int(i + 1 == 5), memory=memory, rate=900.0 if s == 171 else 1200.0)
        for i, s in enumerate(sizes)
    ]


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file()
    assert path.stat().st_size > 20_000  # three panels with lines and text, not a blank canvas
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert height > 500 and width > 800
    assert pixels.std() > 0.05  # not a uniform image


def test_writes_png_from_history(tmp_path: Path) -> None:
    out = plot_history(squeeze_history(), tmp_path / "h.png", title="a squeeze")
    assert out == tmp_path / "h.png"
    assert_png(out)


def test_accepts_the_optimizer_and_a_str_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = autoaccum.AutoAccumOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), target_batch_size=8, micro_batch_size=4
    )
    x, y = torch.randn(24, 4), torch.randn(24, 2)
    opt.step(lambda b: nn.functional.mse_loss(model(b[0]), b[1]), (x, y))
    assert len(opt.history) == 3
    out = plot_history(opt, os.fspath(tmp_path / "opt.png"))
    assert isinstance(out, Path)
    assert_png(out)


def test_without_memory_fields(tmp_path: Path) -> None:
    out = plot_history(squeeze_history(memory=False), tmp_path / "nomem.png")
    assert_png(out)


def test_single_step_and_partial_memory(tmp_path: Path) -> None:
    assert_png(plot_history([record(1, 64)], tmp_path / "one.png"))
    mixed = [record(1, 64), record(2, 64, memory=False)]
    assert_png(plot_history(mixed, tmp_path / "mixed.png"))


def test_empty_history_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty history"):
        plot_history([], tmp_path / "empty.png")
    opt = autoaccum.AutoAccumOptimizer(
        torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), target_batch_size=4
    )
    with pytest.raises(ValueError, match="no optimizer step"):
        plot_history(opt, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_wrong_input_raises_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="StepRecord"):
        plot_history([(1, 2, 3)], tmp_path / "bad.png")  # type: ignore[list-item]
    with pytest.raises(TypeError, match="got int"):
        plot_history(3, tmp_path / "bad.png")  # type: ignore[arg-type]


def test_missing_matplotlib_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib.*autoaccum\[plot\]"):
        plot_history(squeeze_history(), tmp_path / "h.png")


def test_labels_halving_and_grow_back() -> None:
    changes = _size_changes(squeeze_history())
    assert [(c.step, c.old, c.new, c.label) for c in changes] == [
        (6, 342, 171, "halved"),
        (10, 171, 342, "grew back"),
    ]
    assert _squeezed_spans(squeeze_history()) == [(6, 9)]


def test_labels_several_halvings_and_ignores_a_short_last_step() -> None:
    hist = [record(11, 512), record(12, 128, oom=2), record(13, 128),
            record(14, 100, samples=100)]
    changes = _size_changes(hist)
    assert [(c.step, c.label) for c in changes] == [(12, "halved x2")]
    assert _squeezed_spans(hist) == [(12, 13)]


def test_first_step_probes_are_not_a_size_change() -> None:
    hist = [record(1, 315), record(2, 342), record(3, 342)]
    assert _size_changes(hist) == []
    assert _squeezed_spans(hist) == []


def test_losses_add_a_fourth_panel_and_bad_losses_raise(tmp_path: Path) -> None:
    import matplotlib.image

    history = squeeze_history()
    plain = plot_history(history, tmp_path / "plain.png")
    losses = {r.step: 2.0 / r.step for r in history}
    with_loss = plot_history(history, tmp_path / "loss.png", losses=losses)
    assert_png(with_loss)
    # the loss panel makes the figure taller than the three-panel one
    assert (matplotlib.image.imread(with_loss).shape[0]
            > matplotlib.image.imread(plain).shape[0])
    with pytest.raises(TypeError, match="mapping of optimizer step number to loss"):
        plot_history(history, tmp_path / "bad.png", losses=[1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="losses must be numbers"):
        plot_history(history, tmp_path / "bad.png", losses={1: "high"})  # type: ignore[dict-item]
    assert not (tmp_path / "bad.png").exists()


def test_a_loader_cut_is_not_a_halving_when_records_carry_the_limit() -> None:
    """Loader batches of 160 against a step of 256 at a limit of 128: the steps' largest
    micro-batches are 96, 80, 128, ... as the calls are cut. The plan never changed, so nothing
    is labelled."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = autoaccum.AutoAccumOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), target_batch_size=256, micro_batch_size=128
    )
    x, y = torch.randn(160, 4), torch.randn(160, 2)
    for _ in range(16):
        opt.step(lambda b: nn.functional.mse_loss(model(b[0]), b[1]), (x, y))
    history = opt.history
    assert {r.micro_batch_size for r in history} != {128}  # the cut shows in the largest run
    assert {r.micro_batch_limit for r in history} == {128}
    assert _size_changes(history) == []
    assert _squeezed_spans(history) == []
    # The same records without the limit (as older code wrote them) read as size changes.
    assert _size_changes([r._replace(micro_batch_limit=None) for r in history])


def test_a_halving_of_the_limit_is_labelled_at_its_step() -> None:
    """An OOM in step 4 halves the limit (that step ran 128 before it), so step 5 runs 64; step 6
    is cut short by the loader (its largest is 48 under the same limit); a grow-back trial runs
    128 in step 7."""
    rows = [(128, 128), (128, 128), (128, 128), (128, 64), (64, 64), (48, 64), (128, 128)]
    history = [record(i + 1, largest, samples=256, oom=int(i == 3))._replace(micro_batch_limit=m)
               for i, (largest, m) in enumerate(rows)]
    changes = _size_changes(history)
    assert [(c.step, c.old, c.new, c.label) for c in changes] == [
        (5, 128, 64, "halved"), (7, 64, 128, "grew back")]
    assert _squeezed_spans(history) == [(5, 6)]
    # Without the limits the loader's cut in step 6 reads as one more drop.
    plain = [r._replace(micro_batch_limit=None) for r in history]
    assert [c.step for c in _size_changes(plain)] == [5, 6, 7]


def test_a_size_the_plan_gave_up_without_running_is_not_a_change() -> None:
    """The main example: the planner verified 86, the loader's batches cut every call into
    micro-batches of 64, so 86 never ran and the plan settled at 64 after two steps."""
    history = [record(i + 1, 64, samples=256)._replace(micro_batch_limit=86 if i < 2 else 64)
               for i in range(8)]
    assert _size_changes(history) == []
    assert _squeezed_spans(history) == []


def test_plot_with_limits(tmp_path: Path) -> None:
    history = [r._replace(micro_batch_limit=r.micro_batch_size) for r in squeeze_history()]
    assert_png(plot_history(history, tmp_path / "limits.png"))
