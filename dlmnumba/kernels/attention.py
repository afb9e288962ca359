"""Scaled dot-product attention of a batch of queries over a KV cache, with GQA and masks."""
from __future__ import annotations

import numpy as np
from numba import prange

from .cpu import pjit

CAUSAL = 0  # block_size 0 selects the causal mask
Q_CHUNK = 16  # queries per parallel task (each task also transposes its KV head's keys once)
LANES = 16  # keys are padded to a multiple of this in the transposed copy


# fastmath lets LLVM vectorize the score and value loops; results stay deterministic run to run
# (each output is computed by one thread in a fixed order).
@pjit(fastmath=True)
def attention(out, q, k_cache, v_cache, key_pos, n_keys, query_pos, block_size, scale):
    # out[M, H, D] = softmax(q k^T * scale + mask) v over cache slots [0, n_keys)
    # k_cache/v_cache[Hkv, C, D]; key_pos[C], query_pos[M] absolute positions.
    # mask: causal (block_size 0) sees key_pos <= query_pos; block sees every key whose
    # block (pos // block_size) is not later than the query's: bidirectional inside a block.
    # Per task: one KV head and up to Q_CHUNK queries; the head's keys are transposed once
    # (kt[D, keys]) so scores of all keys come out in vector lanes, no horizontal sums, and
    # the `group` query heads sharing the KV head read each key and value row together.
    m_rows, n_heads, d = q.shape
    n_kv = k_cache.shape[0]
    group = n_heads // n_kv
    n_chunks = (m_rows + Q_CHUNK - 1) // Q_CHUNK
    nk = (n_keys + LANES - 1) // LANES * LANES
    for task in prange(n_kv * n_chunks):
        kh = task // n_chunks
        m0 = (task % n_chunks) * Q_CHUNK
        kt = np.zeros((d, nk), np.float32)
        for j in range(n_keys):
            for i in range(d):
                kt[i, j] = k_cache[kh, j, i]
        scores = np.empty((group, nk), np.float32)
        acc = np.empty((group, d), np.float32)
        for m in range(m0, min(m_rows, m0 + Q_CHUNK)):
            qp = query_pos[m]
            limit = qp if block_size == CAUSAL else (qp // block_size + 1) * block_size - 1
            scores[:] = 0.0
            for i in range(d):
                for g in range(group):
                    qi = q[m, kh * group + g, i] * scale
                    for j in range(nk):
                        scores[g, j] += qi * kt[i, j]
            for g in range(group):
                mx = -np.inf
                for j in range(n_keys):
                    if key_pos[j] > limit:
                        scores[g, j] = -np.inf
                    elif scores[g, j] > mx:
                        mx = scores[g, j]
                total = np.float32(0.0)
                for j in range(n_keys):
                    p = np.exp(scores[g, j] - mx) if scores[g, j] != -np.inf else np.float32(0.0)
                    scores[g, j] = p
                    total += p
                scores[g, :n_keys] *= np.float32(1.0) / total
            acc[:] = 0.0
            for j in range(n_keys):
                for g in range(group):
                    p = scores[g, j]
                    if p != 0.0:
                        for i in range(d):
                            acc[g, i] += p * v_cache[kh, j, i]
            for g in range(group):
                for i in range(d):
                    out[m, kh * group + g, i] = acc[g, i]
