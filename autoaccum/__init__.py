"""autoaccum: a fixed effective batch size on any GPU, by planned gradient accumulation."""

from .data import ShareSampler, ShareSchedule
from .distributed import PeerFailedError
from .losses import causal_lm_loss, count_causal_lm_items
from .memory import MemoryBackend
from .optimizer import AutoAccumOptimizer
from .records import Plan, StepOutOfMemoryError, StepRecord
from .report import plot_history
from .simulated import SimulatedDevice

__all__ = [
    "AutoAccumOptimizer",
    "MemoryBackend",
    "PeerFailedError",
    "Plan",
    "ShareSampler",
    "ShareSchedule",
    "SimulatedDevice",
    "StepOutOfMemoryError",
    "StepRecord",
    "causal_lm_loss",
    "count_causal_lm_items",
    "plot_history",
]
__version__ = "0.1.0"
