"""Ternary weights in our kernel layout, and int8-activation x ternary-weight matmul.

Kernel layout of a ternary matrix W[N, K] (N output rows, K inputs):
  packed[N, Kp // 4] uint8, Kp = K rounded up to a multiple of 128.  Each run of 128 weights
  of a row lives in 32 bytes: weight k = g*128 + s*32 + b sits in byte g*32 + b at bits 2s..2s+1
  as a code in {0, 1, 2} meaning -1, 0, +1 (padding weights have code 1, i.e. zero).  Unpacking
  32 bytes with one shift and mask yields 32 consecutive weights, which vectorizes well.
  scales[N, G] float32: the scale of each group of `group` consecutive weights of a row
  (G = 1 when a tensor has one scale, as BitNet's do; TQ files may carry one per 256 weights).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .cpu import jit, pjit

PACK_BLOCK = 128  # weights per 32-byte packed run
ROW_TILE = 16  # output rows per parallel task (amortizes the unpack buffer)


def padded_k(k: int) -> int:
    """K rounded up to the packing block."""
    return -(-k // PACK_BLOCK) * PACK_BLOCK


@pjit
def _pack_codes(out, codes):
    # out[N, Kp/4] <- codes[N, K] (values 0..2); pad codes are 1 (weight 0)
    n, k = codes.shape
    kp4 = out.shape[1]
    for r in prange(n):
        for byte in range(kp4):
            g, b = divmod(byte, 32)
            v = 0
            for s in range(4):
                kk = g * 128 + s * 32 + b
                c = np.int64(codes[r, kk]) if kk < k else np.int64(1)
                v |= c << (2 * s)
            out[r, byte] = v


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Pack codes[N, K] in {0,1,2} into the kernel layout packed[N, Kp/4]."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D, got shape {codes.shape}")
    if codes.size and codes.max() > 2:
        raise ValueError("ternary codes must be in {0, 1, 2}")
    out = np.empty((codes.shape[0], padded_k(codes.shape[1]) // 4), dtype=np.uint8)
    _pack_codes(out, codes)
    return out


@pjit
def _unpack_codes(out, packed):
    # out[N, K] int8 weights in {-1,0,1} <- packed[N, Kp/4]
    n, k = out.shape
    for r in prange(n):
        for kk in range(k):
            g, w = divmod(kk, 128)
            s, b = divmod(w, 32)
            out[r, kk] = np.int8((np.int64(packed[r, g * 32 + b]) >> (2 * s)) & 3) - 1


def unpack_weights(packed: np.ndarray, k: int) -> np.ndarray:
    """Unpack the kernel layout to int8 weights[N, K] in {-1, 0, 1} (for tests and tools)."""
    out = np.empty((packed.shape[0], k), dtype=np.int8)
    _unpack_codes(out, packed)
    return out


@jit
def _unpack_row(w, packed, r):
    # w[Kp] int16 weights in {-1,0,1} <- packed row r
    for g in range(packed.shape[1] // 32):
        for s in range(4):
            base = g * 128 + s * 32
            for b in range(32):
                w[base + b] = np.int16((np.int64(packed[r, g * 32 + b]) >> (2 * s)) & 3) - 1


@pjit
def ternary_matmul_kernel(out, q, xscale, packed, scales, group):
    # out[M, N] = (q[M, Kp] @ W[N, Kp]^T) * scales[N, G] / xscale[M]; exact int32 dot per group
    m_rows, kp = q.shape
    n = packed.shape[0]
    n_groups = scales.shape[1]
    n_tiles = (n + ROW_TILE - 1) // ROW_TILE
    for t in prange(n_tiles):
        w = np.empty(kp, dtype=np.int16)
        for r in range(t * ROW_TILE, min(n, (t + 1) * ROW_TILE)):
            _unpack_row(w, packed, r)
            for m in range(m_rows):
                y = np.float32(0.0)
                for g in range(n_groups):
                    # slices give LLVM a plain counted loop to vectorize; the int32 casts keep
                    # it on 32-bit lanes (vpmaddwd) instead of numba's default int64
                    qg = q[m, g * group:(g + 1) * group]
                    wg = w[g * group:(g + 1) * group]
                    acc = np.int32(0)
                    for j in range(group):
                        acc = np.int32(acc + np.int32(qg[j]) * np.int32(wg[j]))
                    y += np.float32(acc) * scales[r, g]
                out[m, r] = y / xscale[m]
