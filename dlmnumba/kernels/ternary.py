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

import numba
import numpy as np
from numba import prange

from .cpu import jit, pjit
from .simd import PATHS as SIMD_PATHS
from .simd import ACC_LANES, PACK_GROUP, STEP, TILE, dot_tile, packed_tile, unpack_codes

PACK_BLOCK = 128  # weights per 32-byte packed run
ROW_TILE = 16  # output rows per parallel task (amortizes the unpack buffer)
M_ALIGN = TILE  # activation rows are padded to a multiple of this (zero rows) for the SIMD tile
VEC_ROWS = 64  # weight rows per parallel task of the single-token mat-vec
K_CHUNK = 8192  # bytes of k per SIMD pass over a row block (keeps the working set in L1)


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
    # out[M, N] = (q[M, Kp] @ W[N, Kp]^T) * scales[N, G] * (1 / xscale[M]); exact int32 dot per group
    # (q may have padding rows beyond M; they are ignored)
    m_rows = out.shape[0]
    kp = q.shape[1]
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
                out[m, r] = y * (np.float32(1.0) / xscale[m])


@jit
def _unpack_codes_row(dst, packed, r):
    # dst[Kp] uint8 codes in {0,1,2} <- packed row r
    for g in range(packed.shape[1] // 32):
        for s in range(4):
            base = g * 128 + s * 32
            for b in range(32):
                dst[base + b] = (packed[r, g * 32 + b] >> (2 * s)) & 3


@pjit
def ternary_matmul_simd(path, out, q, qsum, xscale, packed, scales):
    # out[M, N] = (codes[N, Kp] . q[Mp, Kp] - qsum[M]) * scales[N, 0] * (1 / xscale[M])
    # codes = weight + 1 in {0,1,2} (the unsigned operand of vpdpbusd), q int8 activations;
    # sum (w + 1) q = sum w q + sum q, hence the qsum correction.  One scale per row (G = 1).
    # Per task: ROW_TILE weight rows unpacked once, then k in chunks of K_CHUNK so a 4-token
    # slice of q and the rows' codes stay in L1 while every (token, row) tile consumes them;
    # the last chunk's tile also sums its lanes, so the epilogue reads 16 int32 per tile.
    m_rows = out.shape[0]
    mp, kp = q.shape
    n = packed.shape[0]
    lit = numba.literally(path)  # specialize per path: only its instructions are compiled
    n_m = mp // TILE
    inv = np.empty(m_rows, np.float32)
    for m in range(m_rows):
        inv[m] = np.float32(1.0) / xscale[m]
    for t in prange((n + ROW_TILE - 1) // ROW_TILE):
        codes = np.zeros((ROW_TILE, kp), np.uint8)
        acc = np.zeros((ROW_TILE // TILE, n_m, TILE * TILE, ACC_LANES), np.int32)
        sums = np.empty((ROW_TILE // TILE, n_m, TILE * TILE), np.int32)
        r0 = t * ROW_TILE
        nr = min(ROW_TILE, n - r0)
        for i in range(nr):
            unpack_codes(codes[i].ctypes.data, packed[r0 + i].ctypes.data, kp // PACK_GROUP)
        for k0 in range(0, kp, K_CHUNK):
            steps = (min(kp, k0 + K_CHUNK) - k0) // STEP
            last = k0 + K_CHUNK >= kp
            for mt in range(n_m):
                for jt in range((nr + TILE - 1) // TILE):
                    dot_tile(lit, codes.ctypes.data + jt * TILE * kp + k0, kp,
                             q.ctypes.data + mt * TILE * kp + k0, kp, steps,
                             acc[jt, mt].ctypes.data, sums[jt, mt].ctypes.data if last else 0)
        for jt in range((nr + TILE - 1) // TILE):
            for mt in range(n_m):
                for i in range(min(TILE, nr - jt * TILE)):
                    r = r0 + jt * TILE + i
                    for j in range(min(TILE, m_rows - mt * TILE)):
                        m = mt * TILE + j
                        y = np.float32(sums[jt, mt, i * TILE + j] - qsum[m]) * scales[r, 0]
                        out[m, r] = y * inv[m]


@pjit
def ternary_matvec_simd(path, out, q, qsum, xscale, packed, scales):
    # out[1, N] = (codes[N, Kp] . q[0] - qsum[0]) * scales[N, 0] * (1 / xscale[0]), one token:
    # codes unpacked in registers straight from the packed rows (each byte read once), the
    # tile returning finished int32 dot products.
    n, row_bytes = packed.shape
    n_groups = q.shape[1] // PACK_GROUP
    lit = numba.literally(path)
    inv = np.float32(1.0) / xscale[0]
    n_tasks = (n + VEC_ROWS - 1) // VEC_ROWS
    sums_all = np.empty((n_tasks, TILE * TILE), np.int32)
    for t in prange(n_tasks):
        sums = sums_all[t]
        for r4 in range(t * VEC_ROWS, min(n, (t + 1) * VEC_ROWS), TILE):
            rows = min(TILE, n - r4)
            if rows == TILE:
                packed_tile(lit, 1, packed[r4].ctypes.data, row_bytes, q.ctypes.data,
                            q.shape[1], n_groups, sums.ctypes.data)
            else:  # the last rows: from a padded copy, never reading past the end
                tail = np.full((TILE, row_bytes), 0x55, np.uint8)  # code 1 = weight 0
                tail[:rows] = packed[r4:n]
                packed_tile(lit, 1, tail.ctypes.data, row_bytes, q.ctypes.data, q.shape[1],
                            n_groups, sums.ctypes.data)
            for i in range(rows):
                y = np.float32(sums[i * TILE] - qsum[0]) * scales[r4 + i, 0]
                out[0, r4 + i] = y * inv


# One entry point per path, calling the driver with a constant path index: numba types the
# constant as a literal, so each path is compiled (and cached) on its first use only, and a
# call from Python never goes through numba.literally's retry.
@jit
def _simd_vnni512(out, q, qsum, xscale, packed, scales):
    ternary_matmul_simd(0, out, q, qsum, xscale, packed, scales)


@jit
def _simd_vnni256(out, q, qsum, xscale, packed, scales):
    ternary_matmul_simd(1, out, q, qsum, xscale, packed, scales)


@jit
def _simd_avx2(out, q, qsum, xscale, packed, scales):
    ternary_matmul_simd(2, out, q, qsum, xscale, packed, scales)


@jit
def _vec_vnni(out, q, qsum, xscale, packed, scales):
    ternary_matvec_simd(1, out, q, qsum, xscale, packed, scales)  # 32-byte runs: 256-bit


@jit
def _vec_avx2(out, q, qsum, xscale, packed, scales):
    ternary_matvec_simd(2, out, q, qsum, xscale, packed, scales)


@jit
def _vec_generic(out, q, qsum, xscale, packed, scales):
    ternary_matvec_simd(3, out, q, qsum, xscale, packed, scales)


SIMD_MATMUL = {"vnni512": _simd_vnni512, "vnni256": _simd_vnni256, "avx2": _simd_avx2}
SIMD_MATVEC = {"vnni512": _vec_vnni, "vnni256": _vec_vnni, "avx2": _vec_avx2,
               "portable": _vec_generic}
assert all(SIMD_PATHS.index(p) == i for i, p in enumerate(SIMD_MATMUL))  # literals above


def ternary_matmul(out: np.ndarray, q: np.ndarray, qsum: np.ndarray, xscale: np.ndarray,
                   packed: np.ndarray, scales: np.ndarray, group: int, path: str) -> None:
    """out[M, N] = W q with W ternary in kernel layout, on instruction path `path`.

    q is int8 [Mp, Kp] (rows padded to a multiple of M_ALIGN with zeros), qsum its row sums.
    Matrices with several scale groups per row use the portable kernel on every path; a
    single token (M = 1, autoregressive decoding) the in-register unpacking mat-vec."""
    if scales.shape[1] != 1:
        ternary_matmul_kernel(out, q, xscale, packed, scales, group)
    elif out.shape[0] == 1:
        SIMD_MATVEC[path](out, q, qsum, xscale, packed, scales)
    elif path == "portable":
        ternary_matmul_kernel(out, q, xscale, packed, scales, group)
    else:
        SIMD_MATMUL[path](out, q, qsum, xscale, packed, scales)
