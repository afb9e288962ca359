"""Decode modes registered by name: which request state machine decodes each, and whether it
needs the model's mask token.

The diffusion modes are the unmasking policies (decode/policies.py), decoded by
DiffusionRequest (or the seed's replay, kv_commit 'none'); `ar` one token per pass; `spec`
drafts with masks and verifies causally (decode/spec.py).  Nothing else looks at a mode's
name: a new mode is a `Mode` and one `register_mode` line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .diffusion import DiffusionRequest
from .policies import POLICIES
from .requests import ARRequest, Request, SeedReplayRequest
from .spec import SpecRequest

# kv_commit setting -> the request class of the diffusion modes
KV_COMMITS = {"normal": DiffusionRequest, "none": SeedReplayRequest}


@dataclass(frozen=True)
class Mode:
    """One decode mode."""

    name: str
    needs_mask: bool  # fills mask tokens: the model must have one
    request_class: Callable[..., type[Request]]  # settings -> the state machine
    samples: bool = True  # temperature > 0 allowed (spec: greedy only)


MODE_REGISTRY: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    """Make `mode` available as dlm.decode_mode `mode.name`."""
    MODE_REGISTRY[mode.name] = mode
    return mode


for _name in POLICIES:
    register_mode(Mode(_name, True, lambda s: KV_COMMITS[s.kv_commit]))
register_mode(Mode("ar", False, lambda s: ARRequest))
register_mode(Mode("spec", True, lambda s: SpecRequest, samples=False))
MODES = tuple(MODE_REGISTRY)


def request_class(settings) -> type[Request]:
    """The state machine that decodes with these settings."""
    return MODE_REGISTRY[settings.mode].request_class(settings)


def needs_mask(mode: str) -> bool:
    """Whether `mode` fills mask tokens (so the model needs one)."""
    return MODE_REGISTRY[mode].needs_mask
