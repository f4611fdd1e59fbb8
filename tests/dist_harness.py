"""Run a function on N gloo ranks in fresh processes, with a timeout that turns a hang into a
test failure. Workers live in importable modules (spawned processes re-import them)."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _entry(fn: Callable[..., Any], rank: int, world: int, init: str, queue: Any,
           args: tuple[Any, ...]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        # Results travel as bytes: a tensor sent through the queue would be shared memory that
        # disappears when this process exits.
        buffer = io.BytesIO()
        torch.save(fn(rank, world, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException as exc:  # report every failure, the test decides what it means
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 90.0
              ) -> dict[int, tuple[str, Any]]:
    """``{rank: ("ok", result) | ("error", text)}``. Raises AssertionError on a hang."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_entry, args=(fn, r, world, init, queue, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, tuple[str, Any]] = {}
        try:
            for _ in range(world):
                rank, status, value = queue.get(timeout=timeout)
                if status == "ok":
                    value = torch.load(io.BytesIO(value), weights_only=False)
                results[rank] = (status, value)
        except Exception as exc:
            raise AssertionError(
                f"ranks {sorted(set(range(world)) - set(results))} did not finish within "
                f"{timeout} s: a hang"
            ) from exc
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return results


def torchrun() -> list[str]:
    """torchrun of this interpreter's environment (python -m torch.distributed.run otherwise)."""
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]
