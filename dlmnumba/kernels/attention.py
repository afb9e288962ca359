"""Scaled dot-product attention of a batch of queries over a KV cache, with GQA and masks."""
from __future__ import annotations

import numpy as np
from numba import prange
from numba.extending import overload

from .cpu import jit, pjit
from .simd import exp_shifted, f32_tile

CAUSAL = 0  # block_size 0 selects the causal mask
NO_TAIL = -1  # open_from: no bidirectional tail
SEES_ALL = np.int64(2**62)  # the key-position limit of a query that sees every key
Q_CHUNK = 16  # queries per parallel task
LANES = 16  # float32 lanes of the score / value tiles; keys are padded to a multiple of this
WIDE = 64  # keys (scores) or value columns per wide tile (4 vectors of 16)


@pjit
def attention(out, q, k_cache, v_cache, key_pos, n_keys, query_pos, block_size, open_from,
              scale):
    # out[M, H, D] = softmax(q k^T * scale + mask) v over cache slots [0, n_keys)
    # k_cache[Hkv, D, C] (keys transposed), v_cache[Hkv, C, D], C a multiple of LANES;
    # key_pos[C], query_pos[M] absolute positions.
    # mask: causal (block_size 0) sees key_pos <= query_pos; block sees every key whose
    # block (pos // block_size) is not later than the query's: bidirectional inside a block.
    # open_from >= 0 (a bidirectional tail): a query at or after it sees every key (the tail's
    # positions see each other and everything before them; queries before it are unchanged).
    # The cache holds each KV head's keys transposed (kt[D, slots]), so scores come out in
    # vector lanes; per task (one KV head, up to Q_CHUNK queries) the `group` query heads
    # sharing it run as the rows of register tiles (simd.f32_tile): scores = q kt, then
    # values = p v.  Keys after the last one any of the task's queries can see are skipped
    # (the slots past n_keys, up to the tile's 16-key group, are read and never used).
    m_rows, n_heads = q.shape[0], q.shape[1]
    n_kv = k_cache.shape[0]
    group = n_heads // n_kv
    n_chunks = (m_rows + Q_CHUNK - 1) // Q_CHUNK
    nk = (n_keys + LANES - 1) // LANES * LANES
    for task in prange(n_kv * n_chunks):
        kh = task // n_chunks
        m0 = (task % n_chunks) * Q_CHUNK
        _task(out, q, k_cache[kh], v_cache[kh], key_pos, n_keys, query_pos, block_size,
              open_from, scale, kh, m0, min(m_rows, m0 + Q_CHUNK), group, nk)


@pjit
def attention_many(out, q, k_caches, v_caches, key_pos, n_keys, rows, query_pos, block_sizes,
                   open_froms, scale, layer):
    # attention() for many sequences at once: sequence s owns the query rows
    # rows[s]:rows[s+1] of out/q/query_pos and the first n_keys[s] slots of its own cache
    # (k_caches[s][layer]: [Hkv, D, C], v_caches[s][layer]: [Hkv, C, D]; key_pos[s]: [C]), mask
    # block_sizes[s] and open_froms[s].  One parallel loop over (sequence, KV head); each runs attention()'s
    # per-task arithmetic on the same transposed keys, so every row is bit-identical to
    # attention() on its sequence alone -- without a thread-pool launch per sequence.
    n_heads = q.shape[1]
    n_kv = k_caches[0].shape[1]
    group = n_heads // n_kv
    for task in prange(len(k_caches) * n_kv):
        s = task // n_kv
        kh = task % n_kv
        nkeys = n_keys[s]
        nk = (nkeys + LANES - 1) // LANES * LANES
        kt = k_caches[s][layer, kh]
        for m0 in range(rows[s], rows[s + 1], Q_CHUNK):
            _task(out, q, kt, v_caches[s][layer, kh], key_pos[s], nkeys, query_pos,
                  block_sizes[s], open_froms[s], scale, kh, m0, min(rows[s + 1], m0 + Q_CHUNK),
                  group, nk)


@jit
def _task(out, q, kt, v, key_pos, n_keys, query_pos, block_size, open_from, scale, kh, m0, m1,
          group, nk):
    # queries m0..m1 of the `group` query heads sharing KV head kh: scores = q kt, softmax,
    # values = p v; keys after the last one any of these queries sees are skipped
    d = q.shape[2]
    n_vis = 0  # keys [0, n_vis) hold every key a query of this task sees
    for m in range(m0, m1):
        lim = _limit(query_pos[m], block_size, open_from)
        for j in range(n_keys - 1, n_vis - 1, -1):
            if key_pos[j] <= lim:
                n_vis = j + 1
                break
    nv16 = (n_vis + LANES - 1) // LANES * LANES
    scores = np.zeros((group, nk), np.float32)
    acc = np.empty((group, d), np.float32)
    for m in range(m0, m1):
        lim = _limit(query_pos[m], block_size, open_from)
        h0 = kh * group
        _rows_times(scores, q[m, h0:h0 + group], kt, d, nv16)
        for g in range(group):
            mx = -np.inf
            for j in range(n_vis):
                if key_pos[j] > lim:
                    scores[g, j] = -np.inf
                else:
                    scores[g, j] *= scale
                    mx = max(mx, scores[g, j])
            if mx == -np.inf:  # no visible key (not reachable: a query sees itself)
                scores[g, :] = 0.0
                continue
            # exp(s - max) in place, vectorized (masked keys: -inf -> exactly 0)
            total = exp_shifted(scores[g], n_vis, mx)
            scores[g, :n_vis] *= np.float32(1.0) / total
        _rows_times(acc, scores, v, n_vis, d)
        for g in range(group):
            for i in range(d):
                out[m, h0 + g, i] = acc[g, i]


@jit
def write_kv_rows(k_caches, v_caches, layer, firsts, bounds, k, v):
    # cache i (k_caches[i] [L, H, D, slots], keys transposed; v_caches[i] [L, H, slots, D]):
    # slots firsts[i] + j <- rows bounds[i] + j of k, v [M, H, D], for one layer (the K/V
    # writes of a batched pass, model/kv_cache.py:PassWrites)
    for i in range(len(k_caches)):
        kc, vc = k_caches[i], v_caches[i]
        for r in range(bounds[i], bounds[i + 1]):
            slot = firsts[i] + r - bounds[i]
            for h in range(k.shape[1]):
                for d in range(k.shape[2]):
                    kc[layer, h, d, slot] = k[r, h, d]
                    vc[layer, h, slot, d] = v[r, h, d]


@jit
def _limit(qp, block_size, open_from):
    # the last key position a query at qp sees
    if open_from >= 0 and qp >= open_from:
        return SEES_ALL
    return qp if block_size == CAUSAL else (qp // block_size + 1) * block_size - 1


def _rows_times(out, a, b, n_k, width):
    """out[r, :width] = sum_{k < n_k} a[r, k] * b[k, :width] for every row r of a (float32,
    rows contiguous); compiled: _rows_times_tiled, numpy where the JIT is off."""
    out[:, :width] = a[:, :n_k] @ b[:n_k, :width]


@overload(_rows_times, jit_options={"nogil": True})
def _rows_times_jit(out, a, b, n_k, width):
    return _rows_times_tiled


def _rows_times_tiled(out, a, b, n_k, width):
    # _rows_times as register tiles (simd.f32_tile) of 4 rows x 64 columns, then 16, then
    # scalar columns, each sum in k order
    n_rows = a.shape[0]
    sa, sb, so = a.strides[0], b.strides[0], out.strides[0]
    w16 = width // LANES * LANES
    r = 0
    while r < n_rows:
        four = r + 4 <= n_rows
        c = 0
        while c < w16:
            ap, bp, op = a[r:].ctypes.data, b.ctypes.data + 4 * c, out[r:].ctypes.data + 4 * c
            if c + WIDE <= w16:
                if four:
                    f32_tile(4, 4, ap, sa, bp, sb, n_k, op, so)
                else:
                    f32_tile(1, 4, ap, sa, bp, sb, n_k, op, so)
                c += WIDE
            else:
                if four:
                    f32_tile(4, 1, ap, sa, bp, sb, n_k, op, so)
                else:
                    f32_tile(1, 1, ap, sa, bp, sb, n_k, op, so)
                c += LANES
        for rr in range(r, r + (4 if four else 1)):
            for cc in range(w16, width):
                x = np.float32(0.0)
                for k in range(n_k):
                    x += a[rr, k] * b[k, cc]
                out[rr, cc] = x
        r += 4 if four else 1
