"""The runtime: one engine runs every pass (runtime/engine.py), with the prefix cache
(runtime/prefix_cache.py); the Generator (runtime/generator.py) is the library's front of it,
DecodeSettings (runtime/decode_settings.py) what one request asks for."""
from .decode_settings import DecodeSettings
from .engine import Engine, QueueFull, RequestOutput, StepReport
from .generator import Chunk, Generation, Generator, Stream
from .prefix_cache import PrefixCache

__all__ = ["DecodeSettings", "Engine", "QueueFull", "RequestOutput", "StepReport", "Chunk",
           "Generation", "Generator", "Stream", "PrefixCache"]
