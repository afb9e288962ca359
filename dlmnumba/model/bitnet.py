"""The BitNet b1.58 transformer: load a GGUF file, run a batch of tokens against a KV cache."""
from __future__ import annotations

import threading
import time
from typing import Sequence

import numba
import numpy as np

from ..errors import ModelFormatError
from ..gguf.reader import GGUFFile
from ..gguf.spec import ModelSpec
from ..kernels import attention as attn_k
from ..kernels import ops
from ..kernels.cpu import set_threads
from ..kernels.dispatch import select_path
from ..kernels.ternary import M_ALIGN, padded_k, ternary_matmul
from .kv_cache import KVCache
from ..kernels.lm_head import (LM_ROWS, TILE_PATH, combine_partials, exact_argmax_screened,
                               lm_head_exact_f16, lm_head_int8_run, quantize_head_input)
from .weights import F16, Int8Head, Weights, load_weights, quantize_head

ATTENTION_MODES = ("causal", "block")
LM_HEADS = ("exact", "int8")


class Model:
    """A loaded BitNet model: spec, tokenizer, packed weights, and the forward pass."""

    def __init__(self, path: str, threads: int | None = None, progress: bool = False,
                 kernel: str | None = None, lm_head: str = "exact"):
        t0 = time.perf_counter()
        self.kernel = select_path(kernel)  # int8 matmul instruction path (kernels/dispatch.py)
        if lm_head not in LM_HEADS:
            raise ValueError(f"lm_head must be one of {', '.join(LM_HEADS)}, got {lm_head!r}")
        self.lm_head = lm_head
        self.path = str(path)
        self.file = GGUFFile(self.path)
        self.spec = ModelSpec.from_metadata(self.file.metadata, self.path)
        self._tokenizer = None
        self.threads = set_threads(threads)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=self.spec.n_layer, desc="Loading layers", unit="layer", leave=False)
        try:
            self.weights: Weights = load_weights(self.file, self.spec, bar)
        finally:
            if bar is not None:
                bar.close()
        emb = self.weights.output
        # the F16 bits of the embedding, for the exact head's F16 kernels (full head and
        # rescoring; rows of whole 16-lane vectors), or None
        self._e16: np.ndarray | None = (
            emb.raw.view(np.uint16).reshape(emb.n_rows, emb.n_cols)
            if emb.qtype == F16 and emb.n_cols % 16 == 0 else None)
        # the int8 head: the logits of lm_head 'int8'; with 'exact' over an F16 embedding, the
        # screen that finds the exact argmax with few exact rows (lm_head.screen_exact_f16)
        self.head8: Int8Head | None = (
            quantize_head(emb) if lm_head == "int8" or self._e16 is not None else None)
        self._scratch = threading.local()  # per thread: the screened exact head's int8 logits
        self.load_seconds = time.perf_counter() - t0

    @property
    def tokenizer(self):
        """The tokenizer the GGUF file carries (built on first use)."""
        if self._tokenizer is None:
            from ..gguf.tokenizer import Tokenizer
            if "tokenizer.ggml.tokens" not in self.file.metadata:
                raise ModelFormatError(f"{self.path}: the file carries no tokenizer "
                                       "('tokenizer.ggml.tokens' is missing)")
            self._tokenizer = Tokenizer.from_metadata(self.file.metadata, self.path)
        return self._tokenizer

    def new_cache(self, capacity: int = 256) -> KVCache:
        """An empty KV cache for one sequence."""
        return KVCache(self.spec, capacity)

    def forward(self, tokens: Sequence[int], positions: Sequence[int] | None, cache: KVCache,
                attention: str = "causal", block_size: int | None = None,
                rows: Sequence[int] | slice | None = None) -> np.ndarray:
        """Run tokens at positions against the cache, append their K/V, return logits of `rows`.

        positions default to cache.length.. (a contiguous continuation).  attention 'causal' or
        'block' (bidirectional inside blocks of block_size aligned at absolute positions, causal
        across).  rows selects which batch rows get logits (default all): float32 [R, n_vocab].
        """
        return self.project(self.forward_hidden(tokens, positions, cache, attention, block_size,
                                                rows))

    def forward_argmax(self, tokens, positions, cache, attention="causal", block_size=None,
                       rows=None, exclude: int | None = None, exact_confidence: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Like forward() but returns, per row, the argmax token and its softmax probability
        (token `exclude` left out); the LM-head kernels fuse this and never build the logits.

        With the exact head and exact_confidence False (greedy decoding, which only needs the
        argmax), the int8 head screens the vocabulary and only rows that can win are computed
        exactly: the same argmax, provably (lm_head.screen_exact_f16); the confidence then
        mixes those rows' exact logits with the others' int8 ones."""
        h = self.forward_hidden(tokens, positions, cache, attention, block_size, rows)
        n = h.shape[0]
        tok, conf = np.empty(n, np.int64), np.empty(n, np.float32)
        if n == 0:
            return tok, conf
        skip = -1 if exclude is None else exclude
        if (not exact_confidence and self.lm_head == "exact" and self.head8 is not None
                and np.isfinite(h).all()):
            self._screened_argmax(tok, conf, h, skip)
            return tok, conf
        part = self._head(h, np.empty((0, 0), np.float32), skip)
        if part is None:  # no kernel for this embedding type: full logits, then argmax
            logits = self.project(h)
            if exclude is not None:
                logits[:, exclude] = -np.inf
            ops.argmax_confidence(tok, conf, logits)
        else:
            combine_partials(tok, conf, part)
        return tok, conf

    def project(self, h: np.ndarray) -> np.ndarray:
        """Logits [M, n_vocab] of final-normed hidden states h[M, n_embd]."""
        out = np.empty((h.shape[0], self.weights.output.n_rows), np.float32)
        if self._head(h, out, -1) is None:
            self.weights.output.project(out, h)
        return out

    def _screened_argmax(self, tok: np.ndarray, conf: np.ndarray, h: np.ndarray,
                         exclude: int) -> None:
        """The exact head's argmax through the int8 screen (see forward_argmax)."""
        m, hd, emb = h.shape[0], self.head8, self.weights.output
        approx = getattr(self._scratch, "approx", None)
        if approx is None or approx.shape[0] < m:  # reused while big enough: no fresh pages
            approx = self._scratch.approx = np.empty((m, emb.n_rows), np.float32)
        exact_argmax_screened(tok, conf, h, self._e16, hd.e8, hd.e_inv, hd.e_sum, hd.err_h, hd.norm8,
                              TILE_PATH[self.kernel], approx[:m], exclude)

    def _head(self, h: np.ndarray, logits: np.ndarray, exclude: int) -> np.ndarray | None:
        """Run an LM-head kernel into logits, or (logits of width 0) into fused partials
        (returned); None when no kernel fits (exact head over a non-F16 embedding)."""
        m = h.shape[0]
        emb = self.weights.output
        part = np.empty((-(-emb.n_rows // LM_ROWS), m, 3), np.float64)
        if self.lm_head == "int8":
            hd = self.head8
            u, xs = quantize_head_input(h, hd.e8)
            lm_head_int8_run(TILE_PATH[self.kernel], logits, part, u, xs, hd.e8, hd.e_inv,
                             hd.e_sum, exclude)
            return part
        if self._e16 is not None:
            lm_head_exact_f16(logits, part, h, self._e16, exclude)
            return part
        return None

    def forward_hidden(self, tokens, positions, cache, attention="causal", block_size=None,
                       rows=None) -> np.ndarray:
        """Like forward() but returns the final-normed hidden states [R, n_embd] of `rows`."""
        s, w = self.spec, self.weights
        ids = self._check_tokens(tokens)
        m = len(ids)
        pos = (np.arange(cache.length, cache.length + m, dtype=np.int32) if positions is None
               else np.asarray(positions, dtype=np.int32))
        if pos.shape != (m,):
            raise ValueError(f"positions has shape {pos.shape}, expected ({m},)")
        block = self._block_arg(attention, block_size)
        numba.set_num_threads(self.threads)

        cache.reserve(m)
        first = cache.length
        cache.pos[first:first + m] = pos
        n_keys = first + m
        cos, sin = ops.rope_tables(pos, s.n_rot, s.rope_base)
        scale = np.float32(1.0 / np.sqrt(s.head_dim))
        e, ekv, hd = s.n_embd, s.n_embd_kv, s.head_dim

        x = w.token_embd.lookup(ids)
        mp = -(-m // M_ALIGN) * M_ALIGN
        q_e = np.empty((mp, padded_k(e)), np.int8)  # int8 activations of the BitLinear inputs
        q_f = np.empty((mp, padded_k(s.n_ff)), np.int8)
        xs = np.empty(m, np.float32)
        qsum = np.empty(mp, np.int32)
        qkv = np.empty((m, e + 2 * ekv), np.float32)
        att = np.empty((m, s.n_head, hd), np.float32)
        proj = np.empty((m, e), np.float32)
        gu = np.empty((m, 2 * s.n_ff), np.float32)
        silu = s.activation != "relu2"
        no_res = np.empty((0, e), np.float32)
        res = no_res  # a residual not yet added to x (the previous layer's down projection)

        def linear(out, q, wt):
            ternary_matmul(out, q, qsum, xs, wt.packed, wt.scales, wt.group, self.kernel)

        # Each BitLinear input is normed and quantized to int8 by one fused kernel
        # (ops.rmsnorm_quantize: [x += residual], rmsnorm, absmax int8 per row).
        for li, L in enumerate(w.layers):
            # attention: [x += res] -> norm -> int8 -> q,k,v -> rope -> cache -> attend ->
            # sub-norm -> int8 -> Wo
            ops.rmsnorm_quantize(q_e, xs, qsum, x, res, L.attn_norm, s.rms_eps)
            linear(qkv, q_e, L.qkv)
            q = np.ascontiguousarray(qkv[:, :e].reshape(m, s.n_head, hd))
            k = np.ascontiguousarray(qkv[:, e:e + ekv].reshape(m, s.n_head_kv, hd))
            ops.rope_neox(q, cos, sin)
            ops.rope_neox(k, cos, sin)
            cache.k[li, :, first:n_keys] = k.transpose(1, 0, 2)
            cache.v[li, :, first:n_keys] = qkv[:, e + ekv:].reshape(m, s.n_head_kv, hd).transpose(1, 0, 2)
            attn_k.attention(att, q, cache.k[li], cache.v[li], cache.pos, n_keys, pos, block, scale)
            ops.rmsnorm_quantize(q_e, xs, qsum, att.reshape(m, e), no_res, L.attn_sub_norm,
                                 s.rms_eps)
            linear(proj, q_e, L.o)
            # feed-forward: x += Wo out -> norm -> int8 -> gate,up -> act(gate)*up -> sub-norm
            # -> int8 -> Wdown (added to x by the next layer's first kernel)
            ops.rmsnorm_quantize(q_e, xs, qsum, x, proj, L.ffn_norm, s.rms_eps)
            linear(gu, q_e, L.gate_up)
            ops.act_rmsnorm_quantize(q_f, xs, qsum, gu, s.n_ff, L.ffn_sub_norm, s.rms_eps, silu)
            linear(proj, q_f, L.down)
            res = proj
        ops.add_inplace(x, res)
        cache.length = n_keys

        sel = x if rows is None else np.ascontiguousarray(x[rows])
        out = np.empty_like(sel)
        ops.rmsnorm(out, sel, w.output_norm, s.rms_eps)
        return out

    def logits(self, token_ids: Sequence[int], attention: str = "causal",
               block_size: int | None = None) -> np.ndarray:
        """Logits [len(token_ids), n_vocab] float32 of a fresh sequence starting at position 0."""
        cache = self.new_cache(max(1, len(token_ids)))
        return self.forward(token_ids, None, cache, attention, block_size)

    def _check_tokens(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no tokens to evaluate")
        n = self.weights.token_embd.n_rows
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{n - 1})")
        return ids

    @staticmethod
    def _block_arg(attention: str, block_size: int | None) -> int:
        if attention == "causal":
            return attn_k.CAUSAL
        if attention == "block":
            if block_size is None or int(block_size) < 1:
                raise ValueError(f"attention 'block' needs a positive block_size, got {block_size}")
            return int(block_size)
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")


def load_model(path: str, threads: int | None = None, progress: bool = False,
               kernel: str | None = None, lm_head: str = "exact") -> Model:
    """Load a BitNet GGUF model (TQ1_0, TQ2_0 or I2_S ternary weights).

    kernel forces an int8 instruction path (vnni512, vnni256, avx2, portable); default: the
    fastest this CPU supports, or $DLMNUMBA_KERNEL.  lm_head 'exact' keeps the stored
    embedding (F16/F32/...) for the logits; 'int8' quantizes it per row at load (VNNI path)."""
    return Model(path, threads=threads, progress=progress, kernel=kernel, lm_head=lm_head)
