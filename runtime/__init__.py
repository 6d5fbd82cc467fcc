"""The Mamba runtime: checkpoints, Mamba1/Mamba2 models, per-sequence extensions (scale sets, decimation),
recurrent state, CUDA decode graphs, and the kernel back-ends behind one operator contract (ops.contract)."""

__version__ = "0.1.0"  # the project's one version; pyproject.toml reads it from here

from .config import MAMBA1, MAMBA2, ModelConfig
from .decimation import Decimation
from .errors import BackendUnavailableError, CheckpointError, DecimationError, ScaleSetError
from .extension import IDENTITY, Extension
from .loader import LoadedModel, fingerprint, load_model
from .model import MambaLM
from .padding import Padding, pads_exactly
from .scales import BatchScales, LayerScales, ScaleMethod, ScaleSet, batch_scales
from .state import InferenceState, PoolRows

__all__ = [
    "IDENTITY", "MAMBA1", "MAMBA2", "BackendUnavailableError", "BatchScales", "CheckpointError", "Decimation",
    "DecimationError", "Extension", "InferenceState", "LayerScales", "LoadedModel", "MambaLM", "ModelConfig", "Padding",
    "PoolRows", "ScaleMethod", "ScaleSet", "ScaleSetError", "batch_scales", "fingerprint", "load_model",
    "pads_exactly",
]
