"""dlmnumba: a Numba inference engine for ternary-weight (BitNet b1.58) diffusion language models."""
from .decode.scheduler import DecodeSettings, Generation, Generator
from .decode.strategies import Sampling
from .engine import Engine
from .errors import ConfigError, DecodeError, DlmError, ModelFormatError
from .model.bitnet import Model, load_model

__all__ = ["load_model", "Model", "Generator", "DecodeSettings", "Sampling", "Generation",
           "Engine", "DlmError", "ModelFormatError", "ConfigError", "DecodeError"]
__version__ = "0.1.0"
