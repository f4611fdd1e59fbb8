"""autoaccum: a fixed effective batch size on any GPU, by planned gradient accumulation."""

from .memory import MemoryBackend
from .optimizer import AutoAccumOptimizer, Plan, StepOutOfMemoryError
from .simulated import SimulatedDevice

__all__ = [
    "AutoAccumOptimizer",
    "MemoryBackend",
    "Plan",
    "SimulatedDevice",
    "StepOutOfMemoryError",
]
__version__ = "0.1.0"
