"""Command line: ``python -m autoaccum info [--json]`` lists the GPUs this process can see."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    ``info`` exits 0 whether or not a GPU is visible; a usage error exits 2 (argparse).
    """
    args = _build_parser().parse_args(argv)
    if args.command == "info":
        return _info(args.json)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
