"""Which request state machine decodes a mode: `ar`, or a diffusion policy under a kv_commit."""
from __future__ import annotations

from .diffusion import DiffusionRequest
from .policies import POLICIES
from .requests import ARRequest, Request, SeedReplayRequest

# kv_commit setting -> the request class of the diffusion modes
KV_COMMITS = {"normal": DiffusionRequest, "none": SeedReplayRequest}
AR_MODE = "ar"  # the one mode that is not a diffusion policy
MODES = (*POLICIES, AR_MODE)


def request_class(settings) -> type[Request]:
    """The state machine that decodes with these settings."""
    return ARRequest if settings.mode == AR_MODE else KV_COMMITS[settings.kv_commit]
