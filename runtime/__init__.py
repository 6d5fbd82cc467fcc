"""The Mamba runtime: checkpoints, Mamba1/Mamba2 models, per-sequence scale sets, recurrent state."""

__version__ = "0.1.0"  # the project's one version; pyproject.toml reads it from here

from .config import MAMBA1, MAMBA2, ModelConfig
from .decimation import Decimation
from .errors import BackendUnavailableError, CheckpointError, DecimationError, ScaleSetError
from .loader import LoadedModel, fingerprint, load_model
from .model import MambaLM
from .scales import BatchScales, LayerScales, ScaleMethod, ScaleSet, batch_scales
from .state import InferenceState

__all__ = [
    "MAMBA1", "MAMBA2", "BackendUnavailableError", "BatchScales", "CheckpointError", "Decimation", "DecimationError",
    "InferenceState", "LayerScales", "LoadedModel", "MambaLM", "ModelConfig", "ScaleMethod", "ScaleSet", "ScaleSetError",
    "batch_scales", "fingerprint", "load_model",
]
