"""dlmnumba: a Numba inference engine for ternary-weight (BitNet b1.58) diffusion language models."""
from .decode.strategies import Sampling
from .errors import ConfigError, DecodeError, DlmError, ModelFormatError
from .model.bitnet import Model, load_model
from .runtime import DecodeSettings, Engine, Generation, Generator, PrefixCache

__all__ = ["load_model", "Model", "Generator", "DecodeSettings", "Sampling", "Generation",
           "Engine", "PrefixCache", "DlmError", "ModelFormatError", "ConfigError",
           "DecodeError"]
__version__ = "0.1.0"
