"""Rerun one scenario under one variation and print what differs from the plain loop:

    python -m tests.conformance <scenario> '<variation as JSON>'

(the command a failing conformance test prints). Without arguments, lists the scenarios."""

from __future__ import annotations

import json
import sys

from .runner import Variation, compare, reference, run_auto
from .scenarios import BY_NAME


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("scenarios:", ", ".join(BY_NAME))
        return 2
    name, raw = argv
    fields = json.loads(raw)
    if fields.get("fault") is not None:
        fields["fault"] = tuple(fields["fault"])
    fields["loader"] = tuple(fields["loader"])
    var = Variation(**fields)
    actual = run_auto(name, var)
    diffs = compare(reference(name, var, actual), actual, BY_NAME[name].rtol)
    print(f"{name} {var}: " + ("conformant" if not diffs else f"{len(diffs)} differences"))
    for line in diffs:
        print("  " + line)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
