"""Exception types a user can meet; the CLI prints them in one line without a traceback."""
from __future__ import annotations


class DlmError(Exception):
    """Base class for errors caused by user input (files, configs, requests)."""


class ModelFormatError(DlmError):
    """A model file is not a usable BitNet GGUF; the message names the file and what was expected."""


class CheckpointError(DlmError):
    """A Hugging Face checkpoint cannot be converted (`dlmnumba convert`); the message names the
    file, the tensor or key, and what was expected."""


class ConfigError(DlmError, ValueError):
    """A configuration value is unknown, of the wrong type, or out of range (a ValueError too,
    so API callers that catch ValueError for bad settings keep working)."""


class DecodeError(DlmError):
    """A request cannot be decoded as asked (no mask token for a diffusion mode, empty prompt).

    `field` names the request field it is about (the server's 400 names it as `param`), `code`
    a machine-readable kind (OpenAI's `code`), when there is one."""

    def __init__(self, message: str, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.field, self.code = field, code


class TokenRangeError(DecodeError, ValueError):
    """A token id outside the model's vocabulary (a ValueError too: the model's own calls
    raise it for bad input ids)."""
