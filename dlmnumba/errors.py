"""Exception types a user can meet; the CLI prints them in one line without a traceback."""


class DlmError(Exception):
    """Base class for errors caused by user input (files, configs, requests)."""


class ModelFormatError(DlmError):
    """A model file is not a usable BitNet GGUF; the message names the file and what was expected."""


class ConfigError(DlmError, ValueError):
    """A configuration value is unknown, of the wrong type, or out of range (a ValueError too,
    so API callers that catch ValueError for bad settings keep working)."""


class DecodeError(DlmError):
    """A request cannot be decoded as asked (no mask token for a diffusion mode, empty prompt)."""
