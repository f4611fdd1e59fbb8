"""Guarantees 1, 2 and 5 against the plain loop, generically: every scenario of
:mod:`tests.conformance.scenarios` under variations hypothesis draws (fixed seed, a budget per
profile). A failure prints the scenario, the variation and the one command that reruns it.

Profiles (``AUTOACCUM_CONFORMANCE``): ``fast`` (the default, in the README's test command) and
``long`` (more variations per scenario; writes ``benchmarks/results/conformance.json``)::

    AUTOACCUM_CONFORMANCE=long python -m pytest tests/conformance -q
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .runner import Variation, compare, reference, run_auto
from .scenarios import SCENARIOS, Scenario

PROFILE = os.environ.get("AUTOACCUM_CONFORMANCE", "fast")
EXAMPLES = {"fast": 15, "long": 100}[PROFILE]
RESULTS = pathlib.Path(__file__).parents[2] / "benchmarks" / "results" / "conformance.json"
_tally: dict[str, list[int]] = {}  # scenario -> [runs, conformant]


def variations(sc: Scenario) -> st.SearchStrategy[Variation]:
    """Loader batch sizes 1, prime, the target and more, or any sequence of call sizes; another
    target; a pinned or a planned micro-batch; an OOM at a forward or backward pass; a resume."""
    t = sc.target
    targets = st.just(None) | (st.integers(1, 2 * t) if sc.vary_target else st.nothing())

    @st.composite
    def draw(draw: st.DrawFn) -> Variation:
        target = draw(targets)
        step = target or t
        if sc.whole_steps:
            loader: tuple[int, ...] = (step,)
        elif sc.aligned:
            loader = (draw(st.sampled_from([d for d in range(1, step + 1) if step % d == 0])),)
        else:
            loader = draw(st.sampled_from([(1,), (7,), (step,), (step + 5,)])
                          | st.lists(st.integers(1, 2 * step + 5), min_size=1, max_size=4)
                          .map(tuple))
        return Variation(
            loader=loader, target=target,
            micro=draw(st.none() | st.integers(1, step)),
            capacity=draw(st.floats(0.35, 1.3)),
            fault=draw(st.none() | st.tuples(st.sampled_from(["forward", "backward"]),
                                             st.integers(1, 12))),
            resume_after=draw(st.none() | st.integers(0, 12)),
            fast_path=draw(st.booleans()),
            model=draw(st.booleans()),
        )

    return draw()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_autoaccum_trains_exactly_as_the_plain_loop(scenario: Scenario) -> None:

    # No shrinking: a failure already prints its variation and the command that reruns it.
    @settings(max_examples=max(2, round(EXAMPLES * scenario.budget)), deadline=None,
              derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(var=variations(scenario))
    def conforms(var: Variation) -> None:
        tally = _tally.setdefault(scenario.name, [0, 0])
        tally[0] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "replaying after an OOM" notes
            actual = run_auto(scenario.name, var)
        diffs = compare(reference(scenario.name, var, actual), actual, scenario.rtol)
        tally[1] += not diffs
        assert not diffs, (f"{scenario.name} under {var}: {len(diffs)} differences from the "
                           f"plain loop:\n  " + "\n  ".join(diffs[:20])
                           + f"\nrerun: {var.command(scenario)}")

    conforms()


def teardown_module() -> None:
    if PROFILE == "long" and _tally:
        RESULTS.write_text(json.dumps({
            "profile": PROFILE, "examples_per_scenario": EXAMPLES,
            "runs": sum(r for r, _ in _tally.values()),
            "conformant": sum(c for _, c in _tally.values()),
            "scenarios": {k: {"runs": r, "conformant": c} for k, (r, c) in _tally.items()},
        }, indent=2) + "\n")
