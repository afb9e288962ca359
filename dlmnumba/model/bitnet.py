"""The BitNet b1.58 transformer: load a GGUF file, run many sequences' passes in one batch.

`Model.forward_batch(segments)` is the one forward pass: every segment (one sequence's tokens
against its own KV cache, model/batch.py) goes through the embedding, every BitLinear (one
matmul per projection per layer over the rows of all segments), the norms and activations
together; attention runs per segment against its own cache; the LM head runs once over the
wanted rows of all segments that want the same output.  Each row is computed exactly as if
its segment ran alone.  `forward`, `forward_argmax` and `forward_hidden` are one-segment calls.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import numba
import numpy as np

from ..errors import ModelFormatError, TokenRangeError
from ..gguf.reader import GGUFFile
from ..gguf.spec import ModelSpec
from ..kernels import attention as attn_k
from ..kernels import ops
from ..kernels.cpu import CpuShare, set_threads
from ..kernels.dispatch import select_path
from ..kernels.ternary import M_ALIGN, padded_k, ternary_matmul
from .batch import AttentionMask, HeadPass, Output, Pass, Segment
from .heads import HEAD_KINDS, LMHead, head_logprobs, make_head
from .kv_cache import KVCache, PassWrites
from .weights import Weights, load_weights



class Model:
    """A loaded BitNet model: spec, tokenizer, packed weights, LM head, and the forward pass.

    Thread-safe: passes from several threads run one at a time (each is parallel inside)."""

    def __init__(self, source: "str | GGUFFile", threads: int | None = None,
                 progress: bool = False, kernel: str | None = None, lm_head: str = "exact",
                 threads_yield: bool = True):
        t0 = time.perf_counter()
        self.kernel = select_path(kernel)  # int8 matmul instruction path (kernels/dispatch.py)
        if lm_head not in HEAD_KINDS:
            raise ValueError(f"lm_head must be one of {', '.join(HEAD_KINDS)}, got {lm_head!r}")
        self.lm_head = lm_head
        # an opened file is taken as it is (a caller that read its metadata opens it once)
        self.file = source if isinstance(source, GGUFFile) else GGUFFile(str(source))
        self.path = self.file.path
        self.spec = ModelSpec.from_metadata(self.file.metadata, self.path)
        self._tokenizer = None
        self.threads = set_threads(threads)
        # the threads of each pass: fewer while other programs keep this process's cores busy
        self.cpu_share = CpuShare(self.threads, enabled=threads_yield)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=self.spec.n_layer, desc="Loading layers", unit="layer", leave=False)
        try:
            self.weights: Weights = load_weights(self.file, self.spec, bar)
        finally:
            if bar is not None:
                bar.close()
        self.head: LMHead = make_head(lm_head, self.weights.output, self.kernel)
        self._lock = threading.Lock()  # one pass at a time (numba's thread pool is shared)
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

    @property
    def n_vocab(self) -> int:
        """Tokens the model can read and emit (rows of its embedding)."""
        return self.weights.token_embd.n_rows

    def check_tokens(self, tokens, field: str | None = None) -> np.ndarray:
        """tokens as int64 ids, if every one is in the vocabulary; else a TokenRangeError
        naming `field` (the one check of token ids: prompts, detokenize, mask_token_id)."""
        n = self.n_vocab
        try:
            ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        except OverflowError:  # an id beyond int64
            bad = next(t for t in tokens if not -2**63 <= int(t) < 2**63)
            what = f"{field} token id" if field else "token id"
            raise TokenRangeError(f"{what} {bad} is outside the vocabulary (0..{n - 1})",
                                  field) from None
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            what = f"{field} token id" if field else "token id"
            raise TokenRangeError(f"{what} {int(bad[0])} is outside the vocabulary "
                                  f"(0..{n - 1})", field)
        return ids

    @property
    def n_ctx(self) -> int:
        """Positions the model was trained for (its context length)."""
        return self.spec.n_ctx_train

    def new_cache(self, capacity: int = 256) -> KVCache:
        """An empty KV cache for one sequence."""
        return KVCache(self.spec, capacity)

    # -- one-segment forms ------------------------------------------------------------------
    def forward(self, tokens: Sequence[int], positions: Sequence[int] | None, cache: KVCache,
                attention: str | AttentionMask = "causal", block_size: int | None = None,
                rows: Sequence[int] | slice | None = None) -> np.ndarray:
        """Run tokens at positions against the cache, append their K/V, return logits of `rows`.

        positions default to cache.length.. (a contiguous continuation).  attention 'causal' or
        'block' (bidirectional inside blocks of block_size aligned at absolute positions, causal
        across), or an AttentionMask.  rows selects which batch rows get logits (default all):
        float32 [R, n_vocab].
        """
        return self.forward_batch([Segment(tokens, cache, positions,
                                           AttentionMask.parse(attention, block_size), rows,
                                           Output.LOGITS)])[0]

    def forward_argmax(self, tokens, positions, cache, attention="causal", block_size=None,
                       rows=None, exclude: int | None = None, exact_confidence: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Like forward() but returns, per row, the argmax token and its softmax probability
        (token `exclude` left out); the LM-head kernels fuse this and never build the logits.

        With the exact head over an F16 embedding and exact_confidence False (greedy decoding,
        which only needs the argmax), the int8 head screens the vocabulary and only rows that
        can win are computed exactly: the same argmax, provably (lm_screen.screen_exact_f16); the
        confidence then mixes those rows' exact logits with the others' int8 ones."""
        out = Output.ARGMAX_EXACT if exact_confidence else Output.ARGMAX
        return self.forward_batch([Segment(tokens, cache, positions,
                                           AttentionMask.parse(attention, block_size), rows,
                                           out, exclude)])[0]

    def forward_hidden(self, tokens, positions, cache, attention="causal", block_size=None,
                       rows=None) -> np.ndarray:
        """Like forward() but returns the final-normed hidden states [R, n_embd] of `rows`."""
        return self.forward_batch([Segment(tokens, cache, positions,
                                           AttentionMask.parse(attention, block_size), rows,
                                           Output.HIDDEN)])[0]

    def project(self, h: np.ndarray) -> np.ndarray:
        """Logits [M, n_vocab] of final-normed hidden states h[M, n_embd]."""
        with self._lock:
            return self.head.logits(np.ascontiguousarray(h, dtype=np.float32))

    # -- the batched pass ---------------------------------------------------------------------
    def forward_batch(self, passes: Sequence[Pass]) -> list:
        """One forward pass over every share (see the module docstring); per share, in order:
        its HIDDEN states, LOGITS, or (tokens, confidences) for the ARGMAX outputs.  Segments go
        through the layers together; HeadPasses join them at the LM head.  If the pass fails,
        every segment's cache is as it was before it."""
        if not passes:
            return []
        segs = [p for p in passes if isinstance(p, Segment)]
        plan = [self._prepare(seg) for seg in segs]
        with self._lock:
            firsts = [seg.cache.length for seg in segs]
            try:
                hs = self._layers(segs, plan) if segs else []
            except BaseException:
                for seg, first in zip(segs, firsts):
                    seg.cache.truncate(min(first, seg.cache.length))
                raise
            layer_h = dict(zip(map(id, segs), hs))
            return self._outputs(passes, [layer_h.get(id(p)) for p in passes])

    def head_argmax(self, h: np.ndarray, exclude: int | None = None,
                    exact_confidence: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The ARGMAX outputs of final-normed hidden states h[M, n_embd] (e.g. a Segment's
        `kept` rows), computed as forward_batch computes them."""
        out = Output.ARGMAX_EXACT if exact_confidence else Output.ARGMAX
        return self.forward_batch([HeadPass(h, out, exclude)])[0]

    def _prepare(self, seg: Segment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validated (ids, positions, rows: the wanted rows, then the kept ones) of one
        segment."""
        ids = self.check_tokens(seg.tokens)
        m = len(ids)
        if m == 0:
            raise ValueError("no tokens to evaluate")
        c = seg.cache
        pos = (np.arange(c.length, c.length + m, dtype=np.int32) if seg.positions is None
               else np.asarray(seg.positions, dtype=np.int32))
        if pos.shape != (m,):
            raise ValueError(f"positions has shape {pos.shape}, expected ({m},)")
        if not isinstance(seg.mask, AttentionMask):
            raise TypeError(f"Segment.mask must be an AttentionMask, got {seg.mask!r}")
        return ids, pos, np.concatenate([seg.row_indices(m), seg.keep_indices(m)])

    def _layers(self, segments: Sequence[Segment], plan) -> list[np.ndarray]:
        """Run all segments' rows through every layer; per segment, the final-normed hidden
        states of its wanted rows, then of its kept rows."""
        s, w = self.spec, self.weights
        numba.set_num_threads(self.cpu_share.threads())
        ids = np.concatenate([p[0] for p in plan])
        pos = np.concatenate([p[1] for p in plan])
        m = len(ids)
        bounds = np.cumsum([0] + [len(p[0]) for p in plan])
        # each segment's new slots in its cache: [first, first + its rows)
        firsts = [seg.cache.append(spos) for seg, (_, spos, _) in zip(segments, plan)]
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

        many = None  # several segments: one K/V write and one attention_many call per layer
        if len(segments) > 1:
            writes = PassWrites([seg.cache for seg in segments], firsts, bounds)
            many = (writes.k, writes.v, writes.pos,
                    np.asarray([seg.cache.length for seg in segments], np.int64),
                    writes.bounds, pos,
                    np.array([seg.mask.block_size for seg in segments], np.int64),
                    np.array([seg.mask.open_from for seg in segments], np.int64))

        def attend(li, q, k, v):
            # the new K/V into the caches, then the queries against them (several segments:
            # one kernel call for all the writes, one for all the attention)
            if many is None:
                seg = segments[0]
                c = seg.cache
                c.write(li, firsts[0], k, v)
                attn_k.attention(att, q, c.k[li], c.v[li], c.pos, c.length, pos,
                                 seg.mask.block_size, seg.mask.open_from, scale)
            else:
                writes.write(li, k, v)
                attn_k.attention_many(att, q, *many, scale, li)

        # Each BitLinear input is normed and quantized to int8 by one fused kernel
        # (ops.rmsnorm_quantize: [x += residual], rmsnorm, absmax int8 per row).
        for li, L in enumerate(w.layers):
            # attention: [x += res] -> norm -> int8 -> q,k,v -> rope -> cache -> attend ->
            # sub-norm -> int8 -> Wo
            ok = ops.rmsnorm_quantize(q_e, xs, qsum, x, res, L.attn_norm, s.rms_eps)
            self._check_scales(ok, li, "attn_norm")
            linear(qkv, q_e, L.qkv)
            q = np.ascontiguousarray(qkv[:, :e].reshape(m, s.n_head, hd))
            k = np.ascontiguousarray(qkv[:, e:e + ekv].reshape(m, s.n_head_kv, hd))
            ops.rope_neox(q, cos, sin)
            ops.rope_neox(k, cos, sin)
            attend(li, q, k, qkv[:, e + ekv:].reshape(m, s.n_head_kv, hd))
            ok = ops.rmsnorm_quantize(q_e, xs, qsum, att.reshape(m, e), no_res, L.attn_sub_norm,
                                      s.rms_eps)
            self._check_scales(ok, li, "attn_sub_norm")
            linear(proj, q_e, L.o)
            # feed-forward: x += Wo out -> norm -> int8 -> gate,up -> act(gate)*up -> sub-norm
            # -> int8 -> Wdown (added to x by the next layer's first kernel)
            ok = ops.rmsnorm_quantize(q_e, xs, qsum, x, proj, L.ffn_norm, s.rms_eps)
            self._check_scales(ok, li, "ffn_norm")
            linear(gu, q_e, L.gate_up)
            ok = ops.act_rmsnorm_quantize(q_f, xs, qsum, gu, s.n_ff, L.ffn_sub_norm, s.rms_eps,
                                          silu)
            self._check_scales(ok, li, "ffn_sub_norm")
            linear(proj, q_f, L.down)
            res = proj
        ops.add_inplace(x, res)

        sel = np.concatenate([bounds[i] + p[2] for i, p in enumerate(plan)])
        h = np.ascontiguousarray(x[sel])
        out = np.empty_like(h)
        ops.rmsnorm(out, h, w.output_norm, s.rms_eps)
        if not np.isfinite(out).all():
            self._overflow("the final hidden states (output_norm)")
        return np.split(out, np.cumsum([len(p[2]) for p in plan])[:-1])

    def _check_scales(self, ok: bool, layer: int, norm: str) -> None:
        # ok: the fused norm + int8 kernel gave every row an int8 scale.  A row whose input
        # held inf / NaN (the kernel sets its scale to 0) or whose normed values overflow
        # (127 / inf = 0) has none: it would quantize to arbitrary values and decode to wrong
        # tokens, so stop instead
        if not ok:
            self._overflow(f"layer {layer}'s {norm} output")

    def _overflow(self, where: str) -> None:
        raise ModelFormatError(f"{self.path}: {where} is not finite (inf/NaN) on this input: "
                               "the model's weights overflow float32")

    def _outputs(self, passes: Sequence[Pass], layer_h: list) -> list:
        """Each share's output from the hidden states of its wanted rows (a segment's from the
        layers, a head pass's its own); the LM head runs once per kind of output (and
        excluded token) over the rows of every share asking."""
        results: list = [None] * len(passes)
        hidden: list = [None] * len(passes)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(passes):
            if isinstance(p, HeadPass):
                hidden[i] = np.ascontiguousarray(p.hidden, dtype=np.float32)
            else:
                n = len(layer_h[i]) - len(p.keep)
                hidden[i] = layer_h[i][:n]
                p.kept = layer_h[i][n:].copy() if len(p.keep) else None
            if p.output is Output.HIDDEN:
                results[i] = hidden[i]
            else:
                key = (p.output, p.exclude if p.output is not Output.LOGITS else None)
                groups.setdefault(key, []).append(i)
        for i, p in enumerate(passes):
            if p.logprobs is not None:
                p.logprobs_out = head_logprobs(self.head, hidden[i], p.exclude, p.logprobs.top,
                                               p.logprobs.targets)
        for (kind, exclude), members in groups.items():
            hg = np.ascontiguousarray(np.concatenate([hidden[i] for i in members]))
            if kind is Output.LOGITS:
                res = self.head.logits(hg)
            else:
                res = self.head.argmax(hg, exclude, kind is Output.ARGMAX_EXACT)
            at = 0
            for i in members:
                n = len(hidden[i])
                results[i] = (res[at:at + n] if kind is Output.LOGITS
                              else (res[0][at:at + n], res[1][at:at + n]))
                at += n
        return results

    def logits(self, token_ids: Sequence[int], attention: str = "causal",
               block_size: int | None = None) -> np.ndarray:
        """Logits [len(token_ids), n_vocab] float32 of a fresh sequence starting at position 0."""
        cache = self.new_cache(max(1, len(token_ids)))
        return self.forward(token_ids, None, cache, attention, block_size)


def load_model(path: "str | GGUFFile", threads: int | None = None, progress: bool = False,
               kernel: str | None = None, lm_head: str = "exact",
               threads_yield: bool = True) -> Model:
    """Load a BitNet GGUF model (TQ1_0, TQ2_0 or I2_S ternary weights) from a path or an
    opened GGUFFile.

    kernel forces an int8 instruction path (vnni512, vnni256, avx2, portable); default: the
    fastest this CPU supports, or $DLMNUMBA_KERNEL.  lm_head 'exact' keeps the stored
    embedding (F16/F32/...) for the logits; 'int8' quantizes it per row at load (VNNI path).
    threads_yield: run a pass on fewer threads while other programs keep this process's cores
    busy (kernels.cpu.CpuShare); the results do not depend on the thread count."""
    return Model(path, threads=threads, progress=progress, kernel=kernel, lm_head=lm_head,
                 threads_yield=threads_yield)
