"""What a doctor check returns, and the two renderings of a run: markdown and JSON.

Both renderers read the same :class:`Report`, so the markdown a user pastes into a bug report and
the JSON a script reads never disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "skip"]
JSON_SCHEMA = 1
_MIB = float(1 << 20)
_GIB = float(1 << 30)


@dataclass
class CheckResult:
    """The outcome of one check.

    ``status`` is ``"pass"``, ``"fail"`` or ``"skip"`` (not run here, e.g. one GPU for a
    multi-GPU check; a skip never counts as a pass). ``figures`` holds the check's headline
    numbers (JSON scalars or None), ``rows`` its per-item table (e.g. one row per workload: a list
    of dicts with the same keys), ``notes`` sentences for a human, ``seconds`` its wall time.
    """

    name: str
    title: str
    status: Status
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True for a check that ran and passed; False for a failure and for a skip."""
        return self.status == "pass"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "passed": self.passed,
            "figures": _plain(self.figures),
            "rows": _plain(self.rows),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


def judged(name: str, title: str, ok: bool, **kwargs: Any) -> CheckResult:
    """A :class:`CheckResult` whose status is ``"pass"`` when ``ok``, else ``"fail"``."""
    return CheckResult(name, title, "pass" if ok else "fail", **kwargs)


@dataclass
class Report:
    """A whole doctor run: environment, devices and every check in order."""

    platform: str  # "cuda" or "simulated"
    quick: bool
    versions: dict[str, Any]
    devices: list[dict[str, Any]]
    checks: list[CheckResult]
    seconds: float = 0.0

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def exit_status(self) -> int:
        """0 when every check that ran passed (skips allowed), 1 otherwise."""
        return 1 if self.failed else 0

    @property
    def verdict(self) -> str:
        return "FAIL" if self.failed else "PASS"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": JSON_SCHEMA,
            "verdict": self.verdict,
            "exit_status": self.exit_status,
            "platform": self.platform,
            "quick": self.quick,
            "seconds": round(self.seconds, 3),
            "versions": _plain(self.versions),
            "devices": _plain(self.devices),
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def _plain(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples as lists (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------- markdown
_MARK = {"pass": "PASS", "fail": "**FAIL**", "skip": "SKIP"}


def fmt(value: Any, key: str = "") -> str:
    """One figure as report text, by its key: ``*_bytes`` in GiB / MiB / KiB, ``*_error`` as a
    signed percentage, ``*_s`` / ``*_ms`` with fixed decimals, other floats with 3 significant
    digits, booleans as yes / no, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and key.endswith("_bytes"):
        for unit, size in (("GiB", _GIB), ("MiB", _MIB), ("KiB", 1024.0)):
            if abs(value) >= size:
                return f"{value / size:.2f} {unit}"
        return f"{int(value)} B"
    if isinstance(value, float):
        if key.endswith("error"):
            return f"{value:+.1%}"
        if key.endswith("_ms"):
            return f"{value:.2f}"
        if key.endswith("_s"):
            return f"{value:.3f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}" if value != 0 else "0"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> list[str]:
    if not rows:
        return []
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c), c) for c in columns) + " |")
    return lines


def render_markdown(report: Report) -> str:
    """The report as markdown: verdict, versions, devices, then each check with its figures."""
    counts = {s: sum(c.status == s for c in report.checks) for s in ("pass", "fail", "skip")}
    mode = "quick" if report.quick else "full"
    where = "CUDA" if report.platform == "cuda" else "SimulatedDevice on the CPU (no CUDA)"
    out = [
        "# autoaccum doctor",
        "",
        f"**Verdict: {report.verdict}** ({counts['pass']} passed, {counts['fail']} failed, "
        f"{counts['skip']} skipped; {mode} run on {where}, {report.seconds:.1f} s)",
        "",
        "## Versions",
        "",
        *_table([{"component": k, "version": v} for k, v in report.versions.items()]),
        "",
        "## Devices",
        "",
    ]
    out += _table(report.devices) if report.devices else ["No CUDA device visible."]
    out += ["", "## Checks", "", "| # | check | result | time |", "|---|---|---|---|"]
    out += [f"| {n} | {c.title} | {_MARK[c.status]} | {c.seconds:.1f} s |"
            for n, c in enumerate(report.checks, 1)]
    for number, check in enumerate(report.checks, 1):
        out += ["", f"## {number}. {check.title}: {_MARK[check.status]}", ""]
        if check.figures:
            out += ["| figure | value |", "|---|---|"]
            out += [f"| {k} | {fmt(v, k)} |" for k, v in check.figures.items()]
            out.append("")
        if check.rows:
            out += _table(check.rows)
            out.append("")
        out += [f"- {note}" for note in check.notes]
        out.append(f"\n_{check.seconds:.1f} s_")
    return "\n".join(out).rstrip() + "\n"
