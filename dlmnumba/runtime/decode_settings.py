"""How one request is decoded: `DecodeSettings`, checked by the same definitions as YAML, the
command line and HTTP requests (dlmnumba/settings.py)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..decode.strategies import Sampling
from ..settings import DECODE_KEYS, check_values


@dataclass(frozen=True)
class DecodeSettings:
    """How one request is decoded."""

    mode: str = "greedy"  # greedy | iterative | adaptive | ar | spec
    block_size: int = 64  # tokens per diffusion block (blocks aligned at multiples of it)
    small_block_size: int = 8  # sub-block refined at a time by iterative / adaptive
    threshold: float = 0.9  # confidence needed to commit a token (iterative / adaptive)
    max_iterations_per_block: int = 10  # refinement passes per block before filling the rest
    attention: str = "block"  # block (Fast-dLLM v2) | causal
    kv_commit: str = "normal"  # normal | none (the seed's stale-mask scheduling)
    dual_cache: bool = True  # refinement passes over the sub-block only (Fast-dLLM DualCache)
    confidence: str = "exact"  # exact | screened: the confidence iterative/adaptive threshold
    draft_size: int = 16  # spec: most mask positions a pass drafts
    draft_policy: str = "adaptive"  # spec: adaptive | fixed (decode/spec.py DRAFT_POLICIES)
    mask_token_id: int | None = None  # None = from the model file
    max_tokens: int = 128  # exact cap on generated tokens
    ignore_eos: bool = False  # run to max_tokens: end-of-generation tokens do not stop
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self):
        values = {DECODE_KEYS[f.name]: getattr(self, f.name) for f in fields(self)
                  if f.name in DECODE_KEYS}
        values.update({DECODE_KEYS[f.name]: getattr(self.sampling, f.name)
                       for f in fields(self.sampling)})
        check_values(values, "DecodeSettings")
