"""dlmnumba: a Numba inference engine for ternary-weight (BitNet b1.58) diffusion language models."""
from .errors import ConfigError, DlmError, ModelFormatError
from .model.bitnet import Model, load_model

__all__ = ["load_model", "Model", "DlmError", "ModelFormatError", "ConfigError"]
__version__ = "0.1.0"
