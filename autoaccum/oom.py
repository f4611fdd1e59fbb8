"""Is this exception an out-of-memory error, and how to release memory after one.

Callers must leave the ``except`` block before calling :func:`release`: while the exception is
being handled, its traceback keeps the failed frames, and with them the activations of the failed
micro-batch, alive (PyTorch issue 27600). Keep only :func:`describe`'s string past the block.
"""

from __future__ import annotations

import gc

import torch

from .memory import MemoryBackend

# Allocation failures that surface as plain RuntimeErrors. cuBLAS and cuDNN report failing to get
# workspace this way; cuDNN's NOT_SUPPORTED is what oversize convolution batches raise, and a
# smaller micro-batch is the fix for it too.
_OOM_MESSAGES = (
    "CUDA out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_SUPPORTED",
    "DefaultCPUAllocator: can't allocate memory",
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means the device ran out of memory (by type, else by documented message).
    Never for errors that report another rank's failure (``autoaccum_remote``), whatever their
    message quotes."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if getattr(exc, "autoaccum_remote", False):
        return False
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def describe(exc: BaseException) -> str:
    """The first line of the error message: all a log needs, and it holds no frame alive."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def release(memory: MemoryBackend | None) -> None:
    """Free what the failed micro-batch left: collect reference cycles (once: a collection costs
    100 ms or more in a large process), then let the backend empty its caches."""
    if memory is None:
        gc.collect()
    else:
        memory.release()
