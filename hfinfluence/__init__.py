"""hfinfluence: pick the training data that helps a causal LM most, by sketched K-FAC influence."""

from .config import InfluenceConfig
from .errors import (
    ConfigError,
    ConfigMismatchError,
    EmptyInputError,
    InfluenceError,
    NonFiniteError,
    NotFittedError,
    NoTrackableModuleError,
    SharedModuleError,
    UnsupportedModuleError,
)
from .influence import Influence
from .leakage import LeakageReport
from .memory import MemoryPlan
from .sizing import SizingTable

__all__ = [
    "ConfigError",
    "ConfigMismatchError",
    "EmptyInputError",
    "Influence",
    "InfluenceConfig",
    "InfluenceError",
    "LeakageReport",
    "MemoryPlan",
    "NoTrackableModuleError",
    "NonFiniteError",
    "NotFittedError",
    "SharedModuleError",
    "SizingTable",
    "UnsupportedModuleError",
]
__version__ = "0.1.0"
