"""What one forward pass over many sequences is made of: attention masks, segments, outputs.

A `Segment` is one sequence's share of a batched pass (its tokens, their absolute positions,
its own KV cache, its attention mask, the rows whose output it wants, and which output); a
`HeadPass` is a share that only needs the LM head over final hidden states it already has (the
hidden states a diffusion block's first pass kept).  `Model.forward_batch` runs every segment's
rows through each layer together, the LM head once over every wanted row, and returns one
result per share, bit-identical to running that share alone.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..kernels.attention import CAUSAL, NO_TAIL
from .kv_cache import KVCache


@dataclass(frozen=True)
class AttentionMask:
    """Which keys a query sees: causal (block_size 0), or bidirectional inside blocks of
    `block_size` aligned at absolute positions and causal across them (Fast-dLLM v2); and
    with `open_from` >= 0, a bidirectional tail: the positions from open_from on see each
    other and everything before them (a spec pass's draft group after its causal rows)."""

    block_size: int = CAUSAL
    open_from: int = NO_TAIL

    def __post_init__(self):
        if int(self.block_size) < 0:
            raise ValueError(f"attention block_size must be >= 1 (or 0 for causal), "
                             f"got {self.block_size}")
        if int(self.open_from) < NO_TAIL:
            raise ValueError(f"attention open_from must be >= 0 (or {NO_TAIL}: no tail), "
                             f"got {self.open_from}")

    def with_tail(self, open_from: int) -> "AttentionMask":
        """This mask with a bidirectional tail from absolute position open_from on."""
        return AttentionMask(self.block_size, int(open_from))

    @classmethod
    def block(cls, size: int) -> "AttentionMask":
        """The block mask of `size` tokens."""
        if size is None or int(size) < 1:
            raise ValueError(f"attention 'block' needs a positive block_size, got {size}")
        return cls(int(size))

    @property
    def is_causal(self) -> bool:
        """True for plain causal attention."""
        return self.block_size == CAUSAL and self.open_from == NO_TAIL

    @classmethod
    def parse(cls, attention: "str | AttentionMask", block_size: int | None = None
              ) -> "AttentionMask":
        """A mask from the API's (name, block size) form, or a mask passed through."""
        if isinstance(attention, AttentionMask):
            return attention
        if attention == "causal":
            return CAUSAL_MASK
        if attention == "block":
            return cls.block(block_size)
        raise ValueError(f"attention must be 'causal' or 'block', got {attention!r}")

    def __str__(self) -> str:
        base = "causal" if self.block_size == CAUSAL else f"block {self.block_size}"
        return base if self.open_from == NO_TAIL else f"{base}, bidirectional from {self.open_from}"


CAUSAL_MASK = AttentionMask(CAUSAL)


class Output(enum.Enum):
    """What a segment wants for its selected rows."""

    HIDDEN = "hidden"  # final-normed hidden states [R, n_embd]
    LOGITS = "logits"  # float32 logits [R, n_vocab]
    ARGMAX = "argmax"  # (token, softmax probability) per row; the exact head may screen
    ARGMAX_EXACT = "argmax_exact"  # the same with the confidence from the full exact head


@dataclass
class Segment:
    """One sequence's pass: tokens at positions (default: cache.length..) against its cache."""

    tokens: Sequence[int]
    cache: KVCache
    positions: Sequence[int] | None = None
    mask: AttentionMask = CAUSAL_MASK
    rows: Sequence[int] | slice | None = None  # rows wanted (indices into tokens); None = all
    output: Output = Output.LOGITS
    exclude: int | None = None  # token never picked by ARGMAX outputs (the mask token)
    # rows (indices into tokens) whose final-normed hidden states are kept besides the output,
    # for an LM head the caller may run later (forward_batch sets `kept`: [len(keep), n_embd])
    keep: Sequence[int] = ()
    kept: np.ndarray | None = None
    # log-probabilities of the wanted rows besides the output (forward_batch sets
    # `logprobs_out`): what the request asks for, or None
    logprobs: "LogprobsWanted | None" = None
    logprobs_out: "Logprobs | None" = None

    def row_indices(self, m: int) -> np.ndarray:
        """The wanted rows as indices into this segment's m tokens."""
        if self.rows is None:
            return np.arange(m)
        if isinstance(self.rows, slice):
            return np.arange(m)[self.rows]
        return _indices(self.rows, m, "rows")

    def keep_indices(self, m: int) -> np.ndarray:
        """The kept rows as indices into this segment's m tokens."""
        return _indices(self.keep, m, "keep")


@dataclass
class HeadPass:
    """A pass through the LM head alone: the output of final-normed hidden states
    [R, n_embd] (no tokens, no cache, not a forward pass through the layers)."""

    hidden: np.ndarray
    output: Output = Output.ARGMAX_EXACT
    exclude: int | None = None  # token never picked by ARGMAX outputs (the mask token)
    logprobs: "LogprobsWanted | None" = None
    logprobs_out: "Logprobs | None" = None
    tokens = ()  # no rows through the layers

    def __post_init__(self):
        if self.output is Output.HIDDEN:
            raise ValueError("a HeadPass computes the LM head: output HIDDEN makes no sense")


Pass = Segment | HeadPass  # what a request asks the model for in one engine step


@dataclass(frozen=True)
class LogprobsWanted:
    """Per wanted row: the `top` most likely tokens and their log-probabilities, and (targets:
    one token id per row, or None) the log-probability of a given token."""

    top: int = 1
    targets: np.ndarray | None = None


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of R rows under the exact LM head (log-softmax over the vocabulary,
    the excluded token left out): top_ids/top_lps [R, top] most likely first (ties: lower id
    first), target_lps [R] (NaN where no target was asked)."""

    top_ids: np.ndarray
    top_lps: np.ndarray
    target_lps: np.ndarray

    def of(self, row: int, token: int) -> float:
        """The log-probability of `token` at `row`: one of the top tokens (or the target)."""
        hit = np.flatnonzero(self.top_ids[row] == token)
        if hit.size:
            return float(self.top_lps[row, hit[0]])
        raise KeyError(f"token {token} is not among row {row}'s top {self.top_ids.shape[1]}")


def _indices(rows, m: int, what: str) -> np.ndarray:
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -m or idx.max() >= m):
        raise ValueError(f"{what} {idx.tolist()} outside a pass of {m} tokens")
    return np.where(idx < 0, idx + m, idx)
