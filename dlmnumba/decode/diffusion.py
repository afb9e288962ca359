"""Fast-dLLM v2 block decoding as a request state machine (see decode/requests.py for the
protocol).

KV-cache discipline of the diffusion modes (kv_commit 'normal'): before a block is decoded
the cache holds the K/V of the real tokens of every earlier block, and nothing else.  No extra
pass does it: the first pass of a block is [real tokens not yet cached, masks of the block],
which writes the K/V of the block finished before it; after each pass the cache is cut back to
the block start, dropping the K/V that saw masks.  The last block's tokens stay pending
(`pending()`), to be written by whatever pass continues the sequence.

Within a block, a policy (decode/policies.py) picks the positions each pass commits; with the
dual cache, refinement passes run only the current sub-block against the block's other K/V.
At the iteration cap, the positions whose head the block's first pass deferred get it from a
head-only pass (`HeadPass` of the hidden states that pass kept), batched by the engine with
everything else: a request never calls the model itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..model.batch import AttentionMask, HeadPass
from .mask_token import require_mask_token
from .policies import POLICIES, Policy
from .requests import EXACT_CONFIDENCE, Request


@dataclass
class _Block:
    """The block being decoded: positions pos.. up to end, aligned at start."""

    pos: int
    start: int
    tokens: np.ndarray  # current content: decided tokens and masks
    masked: np.ndarray  # still to decide
    best_tok: np.ndarray  # most confident prediction seen per position
    best_conf: np.ndarray
    first: bool = True  # the next pass is the block's first (it also writes the K/V before it)
    passes: int = 0
    step: int = 0  # refinement step within the active sub-block
    active_sub: int = -1
    saved: tuple | None = None  # pick of the row before the block start (fixed once computed)
    pos0: int = 0  # of the pass in flight: its first position
    idx: np.ndarray | None = None  # ... the masked block indices it decides
    in_pass: np.ndarray | None = None  # ... and which of them have their row in the pass
    deferred: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    first_hidden: np.ndarray | None = None  # the first pass's hidden states predicting them
    fill: np.ndarray | None = None  # at the iteration cap: deferred positions whose head runs
    # log-probabilities (when asked): of each committed position, of each best prediction
    entry: dict = dataclasses.field(default_factory=dict)
    best_entry: dict = dataclasses.field(default_factory=dict)
    saved_entry: object = None
    saved_logits: np.ndarray | None = None  # (under a grammar) the logits of that row


class DiffusionRequest(Request):
    """Fast-dLLM v2 block decoding with a clean prefix cache, positions committed by a policy
    (see the module docstring)."""

    def __init__(self, model, prompt, settings, mask_id, eog, cache=None, **kw):
        require_mask_token(model, mask_id, settings.mode)
        super().__init__(model, prompt, settings, mask_id, eog, cache, **kw)
        self.policy: Policy = POLICIES[settings.mode]
        self.mask = AttentionMask.parse(settings.attention, settings.block_size)
        self.tokens = list(self.prompt)  # prompt + every finished block
        self.block: _Block | None = None

    def _new_block(self) -> _Block:
        s = self.settings
        pos = len(self.tokens)
        start = pos // s.block_size * s.block_size
        n = start + s.block_size - pos
        need = min(n, s.max_tokens - (pos - len(self.prompt)))
        masked = np.ones(n, bool)
        masked[need:] = False  # beyond max_tokens: never committed, still masks in the pass
        return _Block(pos, start, np.full(n, self.mask_id, np.int64), masked,
                      np.zeros(n, np.int64), np.full(n, -1.0, np.float32))

    def _plan(self):
        if self.block is None:
            self.block = self._new_block()
        b, s = self.block, self.settings
        if b.fill is not None:  # the iteration cap: the head of the deferred positions' rows
            return HeadPass(b.first_hidden[b.masked[b.deferred]],
                            self._output(self._exact_confidence()), self.mask_id,
                            logprobs=self._wanted())
        sub = self.policy.sub_block(s)
        masked = np.flatnonzero(b.masked)
        cur = (b.pos + masked[0] - b.start) // sub  # the first sub-block with masks
        # the positions this pass decides: the current sub-block's masked ones.  A block's first
        # pass also keeps the hidden states predicting every other masked position: their
        # first prediction, which only the iteration cap may need (_cap_fill runs their head).
        in_cur = (b.pos + masked - b.start) // sub == cur
        b.idx = masked[in_cur]
        shift = 1 if self.shift else 0
        row_pos = b.pos + b.idx - shift  # the logit row predicting each
        keep: list[int] = []
        if b.first or not s.dual_cache:
            pos0 = self.cache.length if b.first else b.start
            seq = self.tokens[pos0:b.pos] + b.tokens.tolist()
            if b.first and self.policy.max_passes(s) is not None:
                b.deferred = masked[~in_cur]
                keep = (b.pos + b.deferred - shift - pos0).tolist()
        else:  # dual cache: the current sub-block (and the row before it) against the rest
            lo = max(b.start + cur * sub, b.pos)
            hi = min(b.start + (cur + 1) * sub, b.start + s.block_size)
            pos0 = max(lo - shift, b.start)
            content = self.tokens[b.start:b.pos] + b.tokens.tolist()
            seq = content[pos0 - b.start:hi - b.start]
            self._load_block_kv(b.start, pos0, hi)
        b.pos0 = pos0
        b.in_pass = row_pos >= pos0
        seg = self._segment(seq, pos0, self.mask, (row_pos[b.in_pass] - pos0).tolist(),
                            self._exact_confidence())
        seg.keep = keep
        return seg

    def progress(self):
        b = self.block
        if b is None:
            return None
        n = min(len(b.tokens), self.settings.max_tokens - (b.pos - len(self.prompt)))
        return (b.pos - len(self.prompt),
                tuple(None if b.masked[i] else int(b.tokens[i]) for i in range(max(0, n))))

    def _exact_confidence(self) -> bool:
        return self.policy.needs_confidence and EXACT_CONFIDENCE[self.settings.confidence]

    def _cap_fill(self, b: _Block, tok: np.ndarray, conf: np.ndarray, ents=None) -> None:
        """At the iteration cap: the first pass's predictions (tok, conf) of the deferred
        positions `b.fill` (their head run by a head pass, from its kept hidden states), where
        no later pass was more confident; then every remaining mask takes its best prediction.
        The same tokens as if the first pass had run the head for every masked position."""
        pos = b.fill
        if pos is not None and pos.size:
            first = conf >= b.best_conf[pos]  # ties: the earlier pass
            b.best_tok[pos[first]], b.best_conf[pos[first]] = tok[first], conf[first]
            if ents is not None:
                for i in np.flatnonzero(first):
                    b.best_entry[int(pos[i])] = ents[i]
        for p in np.flatnonzero(b.masked):
            b.entry[int(p)] = b.best_entry.get(int(p))
        b.tokens[b.masked] = b.best_tok[b.masked]
        b.masked[:] = False

    # -- dual cache (Fast-dLLM): the block's K/V from the latest pass that computed each ------
    def _load_block_kv(self, start: int, lo: int, hi: int) -> None:
        """Cache slots from `start`: the block K/V of every block position outside [lo, hi) (the
        pass appends its own after them)."""
        keep = self._outside
        keep[:] = True
        keep[lo - start:hi - start] = False
        self.cache.load(start, self._bk[:, :, keep], self._bv[:, :, keep],
                        start + np.flatnonzero(keep))

    def _save_block_kv(self, start: int, pos0: int, m: int) -> None:
        """After a pass of m positions from pos0 (its K/V in the cache's last m slots)."""
        if not self.settings.dual_cache:
            return
        if not hasattr(self, "_bk"):
            c, n = self.cache, self.settings.block_size
            self._bk = np.empty(c.v.shape[:2] + (n,) + c.v.shape[3:], np.float32)  # [L, H, n, D]
            self._bv = np.empty_like(self._bk)
            self._outside = np.ones(n, bool)
        first = self.cache.length - m
        lo = pos0 - start
        if lo < 0:  # a block's first pass also held real tokens before the block
            first, m, lo = first - lo, m + lo, 0
        k, v = self.cache.view(first, first + m)
        self._bk[:, :, lo:lo + m] = k
        self._bv[:, :, lo:lo + m] = v

    def _take(self, tok, conf):
        b, s = self.block, self.settings
        if b.fill is not None:  # the head pass of the iteration cap
            self._cap_fill(b, tok, conf, self._entries(range(len(tok)), tok))
            return self._end_block()
        self._save_block_kv(b.start, b.pos0, len(self._last.tokens))
        if len(self._last.keep):
            b.first_hidden = self._last.kept
        self.cache.truncate(b.start)  # K/V from the block start on saw masks: drop them
        if self.constraint is not None:
            return self._take_constrained(b)
        ents = self._entries(range(len(tok)), tok)  # log-probabilities of this pass's rows
        if not b.in_pass.all():  # only the row before the block start can precede the pass
            tok, conf = np.concatenate([b.saved[0], tok]), np.concatenate([b.saved[1], conf])
            ents = None if ents is None else [b.saved_entry] + ents
        elif b.first and self.shift and b.pos == b.start and b.pos0 < b.start:
            b.saved = (tok[:1].copy(), conf[:1].copy())
            b.saved_entry = None if ents is None else ents[0]
        b.first = False
        b.passes += 1
        idx = b.idx
        better = conf > b.best_conf[idx]
        b.best_tok[idx[better]], b.best_conf[idx[better]] = tok[better], conf[better]
        if ents is not None:
            for i in np.flatnonzero(better):
                b.best_entry[int(idx[i])] = ents[i]
        # refine the first sub-block (aligned at absolute positions) that still has masks
        sub_of = (b.pos + idx - b.start) // self.policy.sub_block(s)
        cur = sub_of == sub_of.min()
        if sub_of.min() != b.active_sub:
            b.active_sub, b.step = int(sub_of.min()), 0
        chosen = self.policy.commit(conf[cur], b.step, s)
        commit = idx[cur][chosen]
        b.tokens[commit] = tok[cur][chosen]
        if ents is not None:
            for i in np.flatnonzero(cur)[chosen]:
                b.entry[int(idx[i])] = ents[i]
        b.masked[commit] = False
        b.step += 1
        done = not b.masked.any()
        if not done and self._stopped(b):
            done = True  # the output ends at a committed stop token: later positions unused
        cap = self.policy.max_passes(s)
        if not done and cap is not None and b.passes >= cap:  # best earlier predictions
            b.fill = b.deferred[b.masked[b.deferred]]
            if b.fill.size:
                return []  # their first-pass head is the next pass (a head pass)
            self._cap_fill(b, tok[:0], conf[:0], [])
            done = True
        if not done:
            return []
        return self._end_block()

    def _take_constrained(self, b: _Block) -> list[int]:
        """A pass under a grammar: from the block's first undecided position on, left to right,
        each position takes the most likely token the matcher allows after the text decided
        before it (masked logits), until the policy would not commit one (at least the first
        is); the matcher only ever advances over decided text.  No iteration cap: every pass
        commits a position."""
        s, logits = self.settings, self._last_logits
        if not b.in_pass.all():
            logits = np.concatenate([b.saved_logits, logits])
        elif b.first and self.shift and b.pos == b.start and b.pos0 < b.start:
            b.saved_logits = logits[:1].copy()
        b.first = False
        b.passes += 1
        first = int(np.flatnonzero(b.masked)[0])
        walk = self.constraint.fork()
        toks, confs = [], []
        for i, p in enumerate(b.idx):
            if p != first + i:
                break
            t, c = self._masked_pick(logits[i], walk)
            toks.append(t)
            confs.append(c)
            if t in self.eog:
                break
            self.constraint.consume(t, walk)
            if walk.is_stopped():
                break
        chosen = {int(c) for c in self.policy.commit(np.asarray(confs, np.float32), b.step, s)}
        r = 0
        while r < len(toks) and r in chosen:
            r += 1
        r = max(r, 1)  # at least the leftmost
        for i in range(r):
            p = int(b.idx[i])
            b.tokens[p], b.masked[p] = toks[i], False
            b.entry[p] = self._row_entry(logits[i], toks[i])
            if toks[i] not in self.eog:
                self.constraint.consume(toks[i])
        b.step += 1
        if toks[r - 1] in self.eog or self.constraint.done:  # the output ends here
            new = [int(t) for t in b.tokens[:first + r]]
            entries = (None if self.logprobs_k is None
                       else [b.entry.get(i) for i in range(first + r)])
            self.tokens += new
            self.block = None
            out = self._emit(new, entries)
            self._constraint_done()
            return out
        if b.masked.any():
            return []
        return self._end_block()

    def _end_block(self) -> list[int]:
        """The block is decided: its tokens join the sequence and are emitted."""
        b = self.block
        new = [int(t) for t in b.tokens]
        self.tokens += new
        self.block = None
        entries = (None if self.logprobs_k is None
                   else [b.entry.get(i) for i in range(len(new))])
        return self._emit(new, entries)

    def _stopped(self, b: _Block) -> bool:
        """Whether a committed end-of-generation token has every position before it decided."""
        for i in range(b.tokens.shape[0]):
            if b.masked[i]:
                return False
            if int(b.tokens[i]) in self.eog:
                return True
        return False
