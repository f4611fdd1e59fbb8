"""Command line: ``python -m autoaccum info [--json]`` lists the GPUs this process can see;
``python -m autoaccum doctor [--quick] [--json PATH] [--report PATH]`` checks autoaccum on them
(checks in :mod:`autoaccum.doctor`, imported only for that command)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autoaccum.memory import list_gpus

_GIB = float(1 << 30)
NO_DEVICE_LINE = "no CUDA device visible (torch.cuda.is_available() is False)"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autoaccum", description="autoaccum utilities.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = commands.add_parser(
        "info",
        help="list the visible GPUs and their memory",
        description=(
            "List the CUDA devices torch can see: torch index, NVML index (matched by UUID, PCI "
            "bus id or CUDA_VISIBLE_DEVICES, never assumed equal), name, UUID, total / free / "
            "used memory and whether the device is a MIG instance."
        ),
    )
    info.add_argument("--json", action="store_true", help="print a JSON list ([] when no GPU)")
    doctor = commands.add_parser(
        "doctor",
        help="check autoaccum on this machine and print a report",
        description=(
            "Run autoaccum's checks on whatever this machine has (the CUDA device, or a "
            "SimulatedDevice on the CPU): device matching and free memory, plan accuracy "
            "against measured peaks and the largest micro-batch that runs, OOM recovery under "
            "a real squeeze, overhead against a hand-written loop, and (2+ GPUs) a torchrun "
            "job with an OOM on one rank. Prints a markdown report; exits 1 if a check fails."
        ),
    )
    doctor.add_argument("--quick", action="store_true",
                        help="fewer and smaller workloads, fewer timing samples")
    doctor.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    doctor.add_argument("--report", metavar="PATH",
                        help="also write the markdown report to PATH")
    doctor.add_argument("--verbose", action="store_true",
                        help="show autoaccum's log (plan changes, the provoked OOMs) on stderr")
    return parser


def _format_table(gpus: list[dict[str, Any]]) -> str:
    header = ["torch", "nvml", "name", "uuid", "total GiB", "free GiB", "used GiB", "MIG", "source"]
    rows = [
        [
            str(gpu["torch_index"]),
            "-" if gpu["nvml_index"] is None else str(gpu["nvml_index"]),
            gpu["name"],
            gpu["uuid"] or "-",
            f"{gpu['total_bytes'] / _GIB:.2f}",
            f"{gpu['free_bytes'] / _GIB:.2f}",
            f"{gpu['used_bytes'] / _GIB:.2f}",
            "yes" if gpu["mig"] else "no",
            gpu["memory_source"],
        ]
        for gpu in gpus
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = {0, 1, 4, 5, 6}
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _info(as_json: bool) -> int:
    gpus = list_gpus()
    if as_json:
        print(json.dumps(gpus, indent=2))
        return 0
    if not gpus:
        print(NO_DEVICE_LINE)
    else:
        print(_format_table(gpus))
        if any(gpu["memory_source"] != "nvml" for gpu in gpus):
            print("source 'cuda': NVML unavailable or unmatched; memory from cudaMemGetInfo")
    for var in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        if var in os.environ:
            print(f"{var}={os.environ[var]}")
    return 0


def _doctor(quick: bool, json_path: str | None, report_path: str | None, verbose: bool) -> int:
    from autoaccum.doctor import render_markdown, run_doctor

    report = run_doctor(quick, verbose=verbose)
    markdown = render_markdown(report)
    print(markdown, end="")
    if report_path:
        Path(report_path).write_text(markdown)
    if json_path:
        Path(json_path).write_text(report.to_json() + "\n")
    return report.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    ``info`` exits 0 whether or not a GPU is visible; ``doctor`` exits 0 when every check that
    ran passed (skipped ones allowed) and 1 otherwise; a usage error exits 2 (argparse).
    """
    args = _build_parser().parse_args(argv)
    if args.command == "info":
        return _info(args.json)
    if args.command == "doctor":
        return _doctor(args.quick, args.json, args.report, args.verbose)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
