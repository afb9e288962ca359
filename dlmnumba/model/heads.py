"""LM heads: logits = E h over the final hidden states, or their fused argmax + confidence.

Each head is chosen once at load (`make_head`) and offers the same two operations:
- `logits(h)`: float32 [M, V];
- `argmax(h, exclude, exact_confidence)`: per row the best token (never `exclude`) and its
  softmax probability, without materialising M x V logits where a fused kernel exists.
Every head computes a row the same way whatever the other rows are, so a batched pass gives
each sequence the very logits it gets alone.
"""
from __future__ import annotations

import threading

import numpy as np

from ..kernels import ops
from ..kernels.lm_head import (LM_ROWS, TILE_PATH, combine_partials, lm_head_dense,
                               lm_head_exact_f16, lm_head_int8_run, quantize_head_input)
from ..kernels.lm_screen import exact_argmax_screened
from .weights import F16, Embedding, Int8Head, quantize_head

HEAD_KINDS = ("exact", "int8")  # the `lm_head` setting
_FUSED = np.empty((0, 0), np.float32)  # the kernels' logits argument when they fuse the argmax


class LMHead:
    """Interface: see the module docstring."""

    name = "?"

    def __init__(self, emb: Embedding):
        self.emb = emb

    def logits(self, h: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def argmax(self, h: np.ndarray, exclude: int | None = None, exact_confidence: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _partials(self, m: int) -> np.ndarray:
        return np.empty((-(-self.emb.n_rows // LM_ROWS), m, 3), np.float64)

    def describe(self) -> str:
        """One line for `model info`."""
        return self.name


def _empty(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty(n, np.int64), np.empty(n, np.float32)


class DenseHead(LMHead):
    """Any stored embedding type: rows converted to float32 in chunks, fixed-order dots."""

    name = "exact"

    def logits(self, h):
        out = np.empty((h.shape[0], self.emb.n_rows), np.float32)
        h = np.ascontiguousarray(h, dtype=np.float32)
        step = self.emb.CHUNK_ROWS
        for start in range(0, self.emb.n_rows, step):
            stop = min(self.emb.n_rows, start + step)
            part = np.empty((h.shape[0], stop - start), np.float32)
            lm_head_dense(part, h, np.ascontiguousarray(self.emb.rows_f32(start, stop)))
            out[:, start:stop] = part
        return out

    def argmax(self, h, exclude=None, exact_confidence=True):
        tok, conf = _empty(h.shape[0])
        if h.shape[0]:
            logits = self.logits(h)
            if exclude is not None:
                logits[:, exclude] = -np.inf
            ops.argmax_confidence(tok, conf, logits)
        return tok, conf


class ExactF16Head(LMHead):
    """The stored F16 embedding times float32 h (vcvtph2ps kernel).  An argmax that needs no
    exact confidence (greedy, ar) goes through the int8 screen: the int8 head scores every row,
    a rigorous bound discards rows that cannot win, the rest are recomputed exactly."""

    name = "exact"

    def __init__(self, emb: Embedding, head8: Int8Head, tile_path: str):
        super().__init__(emb)
        self.e16 = emb.raw.view(np.uint16).reshape(emb.n_rows, emb.n_cols)
        self.head8, self.tile_path = head8, tile_path
        self._scratch = threading.local()  # per thread: the screen's int8 logits

    def logits(self, h):
        out = np.empty((h.shape[0], self.emb.n_rows), np.float32)
        if h.shape[0]:
            lm_head_exact_f16(out, self._partials(h.shape[0]), h, self.e16, -1)
        return out

    def argmax(self, h, exclude=None, exact_confidence=True):
        m = h.shape[0]
        tok, conf = _empty(m)
        if m == 0:
            return tok, conf
        skip = -1 if exclude is None else exclude
        if not exact_confidence and np.isfinite(h).all():
            approx = getattr(self._scratch, "approx", None)
            if approx is None or approx.shape[0] < m:  # reused while big enough
                approx = self._scratch.approx = np.empty((m, self.emb.n_rows), np.float32)
            hd = self.head8
            exact_argmax_screened(tok, conf, h, self.e16, hd.e8, hd.e_inv, hd.e_sum, hd.err_h,
                                  hd.norm8, self.tile_path, approx[:m], skip)
            return tok, conf
        part = self._partials(m)
        lm_head_exact_f16(_FUSED, part, h, self.e16, skip)
        combine_partials(tok, conf, part)
        return tok, conf

    def describe(self):
        return "exact (greedy: int8 screen)"


class Int8LMHead(LMHead):
    """The embedding quantized to int8 per row at load, run on the VNNI tile."""

    name = "int8"

    def __init__(self, emb: Embedding, head8: Int8Head, tile_path: str):
        super().__init__(emb)
        self.head8, self.tile_path = head8, tile_path

    def _run(self, h, logits, exclude):
        hd = self.head8
        part = self._partials(h.shape[0])
        u, xs = quantize_head_input(h, hd.e8)
        lm_head_int8_run(self.tile_path, logits, part, u, xs, hd.e8, hd.e_inv, hd.e_sum, exclude)
        return part

    def logits(self, h):
        out = np.empty((h.shape[0], self.emb.n_rows), np.float32)
        if h.shape[0]:
            self._run(h, out, -1)
        return out

    def argmax(self, h, exclude=None, exact_confidence=True):
        tok, conf = _empty(h.shape[0])
        if h.shape[0]:
            combine_partials(tok, conf, self._run(h, _FUSED, -1 if exclude is None else exclude))
        return tok, conf


LOGPROB_ROWS = 32  # rows of full logits materialised at a time (32 x 128k floats: 16 MB)


def head_logprobs(head: LMHead, h: np.ndarray, exclude: int | None, top: int,
                  targets: np.ndarray | None = None):
    """model.batch.Logprobs of final hidden states h[R, n_embd] under `head`'s logits: a
    log-softmax in float64 over the vocabulary (token `exclude` left out), `top` most likely
    tokens per row (ties: lower id first), and the log-probability of targets[r] per row."""
    from .batch import Logprobs

    r = h.shape[0]
    top = max(1, int(top))
    ids = np.empty((r, top), np.int64)
    lps = np.empty((r, top), np.float64)
    tgt = np.full(r, np.nan)
    for c0 in range(0, r, LOGPROB_ROWS):
        c1 = min(r, c0 + LOGPROB_ROWS)
        logits = head.logits(np.ascontiguousarray(h[c0:c1], dtype=np.float32)).astype(np.float64)
        if exclude is not None:
            logits[:, exclude] = -np.inf
        mx = logits.max(1, keepdims=True)
        lsm = logits - (mx + np.log(np.exp(logits - mx).sum(1, keepdims=True)))
        part = np.argpartition(-lsm, top - 1, axis=1)[:, :top]
        for i in range(c1 - c0):
            cand = part[i]
            order = np.lexsort((cand, -lsm[i, cand]))  # most likely first, then lower id
            ids[c0 + i] = cand[order]
            lps[c0 + i] = lsm[i, cand[order]]
            if targets is not None:
                tgt[c0 + i] = lsm[i, int(targets[c0 + i])]
    return Logprobs(ids, lps, tgt)


def make_head(kind: str, emb: Embedding, kernel: str) -> LMHead:
    """The head for setting `kind` ('exact' | 'int8') over embedding `emb` on CPU path
    `kernel`: int8 quantizes at load; exact uses the F16 kernel (with its int8 screen) when the
    embedding is F16 in whole 16-lane rows, else the dense fallback."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"lm_head must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    tile = TILE_PATH[kernel]
    if kind == "int8":
        return Int8LMHead(emb, quantize_head(emb), tile)
    if emb.qtype == F16 and emb.n_cols % 16 == 0:
        return ExactF16Head(emb, quantize_head(emb), tile)
    return DenseHead(emb)
