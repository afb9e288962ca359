"""The block-diffusion scheduler: requests -> blocks of masked tokens -> forward passes.

KV-cache discipline (kv_commit 'normal'): before a block is decoded the cache holds the K/V of
the real tokens of every earlier block, and nothing else.  No extra pass does it: the first
forward of a block is [real tokens not yet cached, masks of the block], which writes the K/V of
the block finished before it; afterwards the cache is cut back to the block start, dropping the
K/V that saw masks.  The last block's tokens stay pending (`Generation.pending`), to be written
by whatever forward continues the sequence, or by `Generator.commit()`.

kv_commit 'none' replays the seed server's scheduling for like-for-like speed comparisons:
prefill, one autoregressive token, then per block one pass of [previous token, masks] whose
mask K/V stay in the cache as stale entries (see _seed_replay).  Its output quality suffers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..errors import DecodeError
from ..model.bitnet import Model
from ..model.kv_cache import KVCache
from .strategies import (ATTENTIONS, KV_COMMITS, MODES, Sampling, pick_tokens, select_unmask,
                         step_threshold)

MASK_TEXT = "|<MASK>|"
CONFIDENT = ("iterative", "adaptive")  # modes whose decisions read the confidence


@dataclass(frozen=True)
class DecodeSettings:
    """How one request is decoded."""

    mode: str = "greedy"  # greedy | iterative | adaptive | ar
    block_size: int = 64  # tokens per diffusion block (blocks aligned at multiples of it)
    small_block_size: int = 8  # sub-block refined at a time by iterative / adaptive
    threshold: float = 0.9  # confidence needed to commit a token (iterative / adaptive)
    max_iterations_per_block: int = 10  # refinement passes per block before filling the rest
    attention: str = "block"  # block (Fast-dLLM v2) | causal
    kv_commit: str = "normal"  # normal | none (the seed's stale-mask scheduling)
    mask_token_id: int | None = None  # None = from the model file
    max_tokens: int = 128  # exact cap on generated tokens
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self):
        for name, choices in (("mode", MODES), ("attention", ATTENTIONS),
                              ("kv_commit", KV_COMMITS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("block_size", "small_block_size", "max_iterations_per_block", "max_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mode in ("iterative", "adaptive") and self.block_size % self.small_block_size:
            raise ValueError(f"block_size {self.block_size} is not a multiple of "
                             f"small_block_size {self.small_block_size}")


@dataclass
class RequestStats:
    """What one request cost."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    ttft_s: float = 0.0  # time to the first committed token
    latency_s: float = 0.0
    finish_reason: str = "length"  # length | stop

    @property
    def tokens_per_pass(self) -> float:
        """Generated tokens per forward pass."""
        return self.generated_tokens / max(1, self.forward_passes)


@dataclass
class Chunk:
    """Tokens committed by one step of decoding, in order."""

    tokens: list[int]


@dataclass
class Generation:
    """A finished request."""

    tokens: list[int]  # generated ids (through the end-of-generation token, if any)
    text: str  # detokenized, special tokens dropped
    stats: RequestStats
    cache: KVCache  # K/V of prompt + tokens, except `pending`
    pending: list[int]  # trailing tokens whose K/V are not in the cache yet


def resolve_mask_id(model: Model, override: int | None = None) -> int | None:
    """The mask token: override, the file's mask_token_id, the token |<MASK>|, or one of the
    last 4 ids whose text contains MASK; None when the model has none."""
    n = model.spec.n_vocab
    if override is not None:
        if not 0 <= override < n:
            raise DecodeError(f"mask_token_id {override} is outside the vocabulary (0..{n - 1})")
        return int(override)
    if model.spec.mask_id is not None:
        return model.spec.mask_id
    try:
        tok = model.tokenizer
    except Exception:  # no tokenizer in the file: nothing more to look at
        return None
    found = tok.id_of(MASK_TEXT)
    if found is not None:
        return found
    for i in range(n - 1, max(-1, n - 5), -1):
        if "MASK" in tok.token_text(i).upper():
            return i
    return None


class Generator:
    """Decodes requests on one model with fixed settings."""

    def __init__(self, model: Model, settings: DecodeSettings = DecodeSettings()):
        self.model = model
        self.settings = settings
        self.mask_id = resolve_mask_id(model, settings.mask_token_id)
        if settings.mode != "ar" and self.mask_id is None:
            raise DecodeError(
                f"{model.path}: the model declares no mask token (no "
                f"'tokenizer.ggml.mask_token_id', no '{MASK_TEXT}' token), so mode "
                f"'{settings.mode}' cannot run; pass --mask-token-id ID or use --mode ar")
        self.eog = frozenset(model.spec.eog_ids)
        self.stats = RequestStats()
        self._result: tuple[KVCache, list[int]] | None = None

    # -- public API ---------------------------------------------------------------------------
    def stream(self, prompt: Sequence[int]) -> Iterator[Chunk]:
        """Decode one request, yielding committed tokens as they are decided."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise DecodeError("the prompt is empty (and the model adds no BOS token)")
        s = self.settings
        self.stats = RequestStats(prompt_tokens=len(prompt))
        self._rng = np.random.default_rng(s.sampling.seed)
        self._t0 = time.perf_counter()
        cache = self.model.new_cache(len(prompt) + s.max_tokens + 2 * s.block_size + 1)
        if s.mode == "ar":
            steps = self._ar(prompt, cache)
        elif s.kv_commit == "none":
            steps = self._seed_replay(prompt, cache)
        else:
            steps = self._diffusion(prompt, cache)
        out: list[int] = []
        for new in steps:
            new = new[: s.max_tokens - len(out)]
            stop = next((i for i, t in enumerate(new) if t in self.eog), None)
            if stop is not None:
                new = new[: stop + 1]
            if new:
                if not out:
                    self.stats.ttft_s = time.perf_counter() - self._t0
                out += new
                yield Chunk(new)
            if stop is not None or len(out) >= s.max_tokens:
                self.stats.finish_reason = "stop" if stop is not None else "length"
                break
        self.stats.generated_tokens = len(out)
        self.stats.latency_s = time.perf_counter() - self._t0
        full = prompt + out
        self._result = (cache, full[cache.length:] if s.kv_commit == "normal" or s.mode == "ar"
                        else [])

    def generate(self, prompt: Sequence[int]) -> Generation:
        """Decode one request to the end."""
        tokens = [t for chunk in self.stream(prompt) for t in chunk.tokens]
        cache, pending = self._result
        return Generation(tokens, self.model.tokenizer.decode(tokens), self.stats, cache, pending)

    def commit(self, gen: Generation) -> None:
        """Write the pending tokens' K/V into the generation's cache (one forward pass)."""
        if gen.pending:
            block = self.settings.block_size if self._attention() == "block" else None
            self.model.forward_hidden(gen.pending, None, gen.cache, self._attention(), block,
                                      rows=[])
            gen.pending = []

    # -- decoding loops: each yields the tokens it commits, in position order -------------------
    def _attention(self) -> str:
        return "causal" if self.settings.mode == "ar" else self.settings.attention

    def _decide(self, tokens, pos0: int, cache: KVCache, rows) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass; the token picked for each of `rows` and its confidence.  Greedy
        picks use the model's fused LM-head argmax; the mask token is never picked."""
        self.stats.forward_passes += 1
        att = self._attention()
        positions = np.arange(pos0, pos0 + len(tokens), dtype=np.int32)
        block = self.settings.block_size if att == "block" else None
        if self.settings.sampling.temperature <= 0.0:  # greedy and ar need only the argmax
            return self.model.forward_argmax(tokens, positions, cache, att, block, rows,
                                             exclude=self.mask_id,
                                             exact_confidence=self.settings.mode in CONFIDENT)
        logits = self.model.forward(tokens, positions, cache, att, block, rows)
        if self.mask_id is not None:  # committing a mask token would be meaningless
            logits[:, self.mask_id] = -np.inf
        return pick_tokens(logits, self.settings.sampling, self._rng)

    def _stopped(self, block: np.ndarray, masked: np.ndarray) -> bool:
        """Whether a committed end-of-generation token has every position before it decided."""
        for i in range(block.shape[0]):
            if masked[i]:
                return False
            if int(block[i]) in self.eog:
                return True
        return False

    def _ar(self, prompt: list[int], cache: KVCache) -> Iterator[list[int]]:
        """One token per forward pass, causal attention."""
        tok = int(self._decide(prompt, 0, cache, [len(prompt) - 1])[0][0])
        pos = len(prompt)
        while True:
            yield [tok]
            tok = int(self._decide([tok], pos, cache, [0])[0][0])
            pos += 1

    def _seed_replay(self, prompt: list[int], cache: KVCache) -> Iterator[list[int]]:
        """The seed's scheduling: prefill, one AR token, then per block one pass of
        [prev @ p-1, masks @ p..p+B-1] with p = len(prompt) at first.  The pass overwrites the
        cache slot at p-1 (at first the last prompt token's, later the previous block's last
        mask) and leaves every other mask's stale K/V in place."""
        s = self.settings
        prev = int(self._decide(prompt, 0, cache, [len(prompt) - 1])[0][0])
        yield [prev]
        p = len(prompt)
        while True:
            cache.truncate(p - 1)
            batch = [prev] + [self.mask_id] * s.block_size
            new = [int(t) for t in self._decide(batch, p - 1, cache,
                                                list(range(s.block_size)))[0]]
            yield new
            prev, p = new[-1], p + s.block_size

    def _diffusion(self, prompt: list[int], cache: KVCache) -> Iterator[list[int]]:
        """Fast-dLLM v2 block decoding with a clean prefix cache (see the module docstring)."""
        s = self.settings
        big, shift = s.block_size, self.model.spec.shift_logits
        tokens = list(prompt)
        while True:
            pos = len(tokens)
            start = pos // big * big
            end = start + big
            block = np.full(end - pos, self.mask_id, np.int64)
            need = min(end - pos, s.max_tokens - (pos - len(prompt)))
            self._decode_block(tokens, block, pos, start, cache, shift, need)
            new = [int(t) for t in block]
            tokens += new
            yield new

    def _decode_block(self, tokens: list[int], block: np.ndarray, pos: int, start: int,
                      cache: KVCache, shift: bool, need: int) -> None:
        """Fill block (positions pos..) in place with the mode's policy, until its first `need`
        positions are decided (the rest of a last, cut block stays masked)."""
        s = self.settings
        n = block.shape[0]
        masked = np.ones(n, bool)
        masked[need:] = False  # beyond max_tokens: never committed, still masks in the pass
        best_tok = np.zeros(n, np.int64)
        best_conf = np.full(n, -1.0, np.float32)
        sub = s.small_block_size if s.mode in ("iterative", "adaptive") else s.block_size
        saved = None  # pick of position start-1's row (fixed once the block starts)
        first, passes, step, active_sub = True, 0, 0, -1
        while masked.any():
            pos0 = cache.length if first else start
            seq = tokens[pos0:pos] + block.tolist()
            idx = np.flatnonzero(masked)  # block indices still masked
            row_pos = pos + idx - (1 if shift else 0)  # the logit row predicting each of them
            in_pass = row_pos >= pos0
            tok, conf = self._decide(seq, pos0, cache, (row_pos[in_pass] - pos0).tolist())
            cache.truncate(start)  # K/V from `start` on saw masks: drop them
            if not in_pass.all():  # only position start-1 can precede the pass
                tok, conf = np.concatenate([saved[0], tok]), np.concatenate([saved[1], conf])
            elif first and shift and pos == start and pos0 < start:
                saved = (tok[:1].copy(), conf[:1].copy())
            first = False
            passes += 1
            better = conf > best_conf[idx]
            best_tok[idx[better]], best_conf[idx[better]] = tok[better], conf[better]
            # refine the first sub-block (aligned at absolute positions) that still has masks
            sub_of = (pos + idx - start) // sub
            cur = sub_of == sub_of.min()
            if sub_of.min() != active_sub:
                active_sub, step = int(sub_of.min()), 0
            if s.mode in ("iterative", "adaptive"):
                chosen = select_unmask(conf[cur], step_threshold(s.mode, s.threshold, step))
                commit = idx[cur][chosen]
                block[commit] = tok[cur][chosen]
            else:  # greedy: every masked position at once
                commit = idx
                block[commit] = tok
            masked[commit] = False
            step += 1
            if masked.any() and self._stopped(block, masked):
                break  # the output ends at a committed stop token: later positions are unused
            if masked.any() and passes >= s.max_iterations_per_block and s.mode != "greedy":
                block[masked] = best_tok[masked]  # cap reached: best earlier prediction
                masked[:] = False
