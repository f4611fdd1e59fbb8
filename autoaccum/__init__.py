"""autoaccum: a fixed effective batch size on any GPU, by planned gradient accumulation."""

from .memory import MemoryBackend
from .optimizer import AutoAccumOptimizer, Plan, StepOutOfMemoryError, StepRecord
from .data import ShareSampler, ShareSchedule
from .simulated import SimulatedDevice

__all__ = [
    "AutoAccumOptimizer",
    "MemoryBackend",
    "Plan",
    "ShareSampler",
    "ShareSchedule",
    "SimulatedDevice",
    "StepRecord",
    "StepOutOfMemoryError",
]
__version__ = "0.1.0"
