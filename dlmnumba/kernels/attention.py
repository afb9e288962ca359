"""Scaled dot-product attention of a batch of queries over a KV cache, with GQA and masks."""
from __future__ import annotations

import numpy as np
from numba import prange

from .cpu import pjit

CAUSAL = 0  # block_size 0 selects the causal mask


# fastmath lets LLVM reassociate the head_dim dot products into SIMD partial sums (strict
# float order would keep them scalar); results stay deterministic run to run.
@pjit(fastmath=True)
def attention(out, q, k_cache, v_cache, key_pos, n_keys, query_pos, block_size, scale):
    # out[M, H, D] = softmax(q k^T * scale + mask) v over cache slots [0, n_keys)
    # k_cache/v_cache[Hkv, C, D]; key_pos[C], query_pos[M] absolute positions.
    # mask: causal (block_size 0) sees key_pos <= query_pos; block sees every key whose
    # block (pos // block_size) is not later than the query's: bidirectional inside a block.
    m_rows, n_heads, d = q.shape
    group = n_heads // k_cache.shape[0]
    for task in prange(m_rows * n_heads):
        m = task // n_heads
        h = task % n_heads
        kh = h // group
        qp = query_pos[m]
        limit = qp if block_size == CAUSAL else (qp // block_size + 1) * block_size - 1
        scores = np.empty(n_keys, dtype=np.float32)
        mx = -np.inf
        for j in range(n_keys):
            if key_pos[j] > limit:
                scores[j] = -np.inf
                continue
            s = np.float32(0.0)
            for i in range(d):
                s += q[m, h, i] * k_cache[kh, j, i]
            s *= scale
            scores[j] = s
            if s > mx:
                mx = s
        total = np.float32(0.0)
        for j in range(n_keys):
            p = np.exp(scores[j] - mx) if scores[j] != -np.inf else np.float32(0.0)
            scores[j] = p
            total += p
        for i in range(d):
            out[m, h, i] = 0.0
        for j in range(n_keys):
            p = scores[j] / total
            if p != 0.0:
                for i in range(d):
                    out[m, h, i] += p * v_cache[kh, j, i]
