"""Ternary weights in our kernel layout, and int8-activation x ternary-weight matmul.

Kernel layout of a ternary matrix W[N, K] (N output rows, K inputs), the broadcast ("VNNI")
layout of kernels/simd.py at 2 bits per weight:
  packed[Nb, Kp // 16, 64] uint8, Kp = K rounded up to a multiple of 128, Nb = N rounded up to
  a multiple of 64, divided by 16: block b holds rows 16 b .. 16 b + 15, chunk j their
  weights 16 j .. 16 j + 15, and byte 4 col + i of the chunk holds, at bits 2 s .. 2 s + 1, the
  code of W[16 b + col, 16 j + 4 s + i] in {0, 1, 2} meaning -1, 0, +1 (padding weights and
  padding rows have code 1, i.e. zero).  One shift and mask of a 64-byte chunk gives the 16 x 4
  codes of step s, ready for a dot-product instruction against 4 activations broadcast.
  scales[N, G] float32: the scale of each group of `group` consecutive weights of a row
  (G = 1 when a tensor has one scale, as BitNet's do; TQ files may carry one per 256 weights).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .cpu import jit, pjit
from .dispatch import PATHS as KERNEL_PATHS, simd_path
from .simd import COLS, KSTEP, PACK_K, PATHS as SIMD_PATHS, VEC, bcast_tile, packed_tile
from .simd import packed_vec, prefetch, unpack16
from .amx import (N_C, TILE_K, TILE_ROWS, require_amx, tile_config, tile_pass, tile_release,
                  whole_tiles)

PACK_BLOCK = 128  # K is padded to a multiple of this (the activations' row length too)
ROW_ALIGN = 64  # N is padded to a multiple of this: 4 blocks, one matmul task
BLOCKS = ROW_ALIGN // COLS  # 16-row blocks per matmul task
M_ALIGN = 6  # activation rows are padded to a multiple of this (zero rows): the tile's tokens
K_CHUNK = 1024  # k per pass over a task's unpacked codes (64 KiB: stay in L2 beside the tokens)
VEC_BLOCKS = 8  # 16-row blocks per parallel task of the single-token mat-vec
# most tokens the small-batch kernel (ternary_matmul_small: packed bytes read once, unpacked in
# registers) runs on each path; above, the block kernel (AMX tiles on 'amx').  Measured with
# `python bench/kernels.py --crossover --kernel PATH` on a 2-core Intel Xeon (AMX), 2 threads,
# the 2B-4T gate|up and down matrices of 30 layers (398 MB, from memory), ms small / block:
# amx 49.8 / 62.5 at 16 tokens, 66.8 / 66.7 at 20, 73.4 / 64.0 at 24; vnni512 (no AMX) 54.9 /
# 86.4 at 16, 102.7 / 132.8 at 32, 195.4 / 231.7 at 65; vnni256 87.2 / 96.3 at 16, 125.9 /
# 129.4 at 24; avx2 126.1 / 137.3 at 16, 192.3 / 202.3 at 24.  Either kernel computes the same
# integers.  On a 2-core AMD EPYC (vnni512, the small kernel's 1 x 8 tile): 17.0 / 54.9 at 2,
# 68.0 / 91.5 at 16, 107.2 / 132.4 at 24, 211.3 / 232.1 at 48, 351.8 / 314.9 at 65 (a second
# run: 307 / 330), 431.4 / 432.8 at 96: vnni512 switches after 48.  The other SIMD paths
# switch at 16 although the small kernel still led beyond it on the Intel machine: their
# machines were not measured at larger M.
SMALL_MAX_ROWS = {"amx": 16, "vnni512": 48, "vnni256": 16, "avx2": 16, "portable": 64}
AMX_MIN_ROWS = SMALL_MAX_ROWS["amx"] + 1  # fewest tokens the 'amx' path runs on tiles


def padded_k(k: int) -> int:
    """K rounded up to the packing block."""
    return -(-k // PACK_BLOCK) * PACK_BLOCK


def padded_n(n: int) -> int:
    """N rounded up to the row alignment of the packed layout."""
    return -(-n // ROW_ALIGN) * ROW_ALIGN


@pjit
def _pack_codes(out, codes):
    # out[Nb, Kp/16, 64] <- codes[N, K] (values 0..2); padding codes are 1 (weight 0)
    n, k = codes.shape
    for b in prange(out.shape[0]):
        for j in range(out.shape[1]):
            for col in range(COLS):
                r = b * COLS + col
                for i in range(KSTEP):
                    v = 0
                    for s in range(4):
                        kk = j * PACK_K + s * KSTEP + i
                        c = np.int64(codes[r, kk]) if r < n and kk < k else np.int64(1)
                        v |= c << (2 * s)
                    out[b, j, col * KSTEP + i] = v


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Pack codes[N, K] in {0,1,2} into the kernel layout packed[Nb, Kp/16, 64]."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D, got shape {codes.shape}")
    if codes.size and codes.max() > 2:
        raise ValueError("ternary codes must be in {0, 1, 2}")
    n, k = codes.shape
    out = np.empty((padded_n(n) // COLS, padded_k(k) // PACK_K, VEC), dtype=np.uint8)
    _pack_codes(out, codes)
    return out


@jit
def _code(packed, r, kk):
    # code (0..2) of W[r, kk] in the packed layout
    r, kk = np.int64(r), np.int64(kk)
    b, col = r // COLS, r % COLS
    j, w = kk // PACK_K, kk % PACK_K
    s, i = w // KSTEP, w % KSTEP
    return (np.int64(packed[b, j, col * KSTEP + i]) >> (2 * s)) & 3


@pjit
def _unpack_codes(out, packed):
    # out[N, K] int8 weights in {-1,0,1} <- packed
    n, k = out.shape
    for r in prange(n):
        for kk in range(k):
            out[r, kk] = np.int8(_code(packed, r, kk) - 1)


def unpack_weights(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Unpack the kernel layout to int8 weights[n, k] in {-1, 0, 1} (for tests and tools)."""
    out = np.empty((n, k), dtype=np.int8)
    _unpack_codes(out, packed)
    return out


@jit
def _unpack_block(w, packed, b):
    # w[16, Kp] int16 weights in {-1,0,1} <- packed block b
    for j in range(packed.shape[1]):
        for col in range(COLS):
            for i in range(KSTEP):
                v = np.int64(packed[b, j, col * KSTEP + i])
                for s in range(4):
                    w[col, j * PACK_K + s * KSTEP + i] = np.int16((v >> (2 * s)) & 3) - 1


@pjit
def ternary_matmul_kernel(out, q, xscale, packed, scales, group):
    # out[M, N] = (q[M, Kp] @ W[N, Kp]^T) * scales[N, G] * (1 / xscale[M]); exact int32 dot per group
    # (q may have padding rows beyond M; they are ignored)
    m_rows, n = out.shape
    kp = q.shape[1]
    n_groups = scales.shape[1]
    for b in prange(packed.shape[0]):
        if b * COLS >= n:
            continue
        w = np.empty((COLS, kp), dtype=np.int16)
        _unpack_block(w, packed, b)
        for col in range(min(COLS, n - b * COLS)):
            r = b * COLS + col
            for m in range(m_rows):
                y = np.float32(0.0)
                for g in range(n_groups):
                    # slices give LLVM a plain counted loop to vectorize; the int32 casts keep
                    # it on 32-bit lanes (vpmaddwd) instead of numba's default int64
                    qg = q[m, g * group:(g + 1) * group]
                    wg = w[col, g * group:(g + 1) * group]
                    acc = np.int32(0)
                    for j in range(group):
                        acc = np.int32(acc + np.int32(qg[j]) * np.int32(wg[j]))
                    y += np.float32(acc) * scales[r, g]
                out[m, r] = y * (np.float32(1.0) / xscale[m])


@jit
def _finish(out, acc, qsum, inv, scales, r0, m_rows):
    # out[m, r0 + c] = (acc[m, c] - qsum[m]) * scales[r0 + c, 0] * inv[m] for the real rows
    for m in range(m_rows):
        for c in range(min(acc.shape[1], out.shape[1] - r0)):
            out[m, r0 + c] = np.float32(acc[m, c] - qsum[m]) * scales[r0 + c, 0] * inv[m]


@pjit
def ternary_matmul_simd(path, n_vec, out, q, qsum, xscale, packed, scales):
    # out[M, N] = (codes[N, Kp] . q[Mp, Kp] - qsum[M]) * scales[N, 0] * (1 / xscale[M])
    # codes = weight + 1 in {0,1,2} (the unsigned operand of vpdpbusd), q int8 activations;
    # sum (w + 1) q = sum w q + sum q, hence the qsum correction.  One scale per row (G = 1).
    # Per task: 4 blocks (64 rows); per k chunk their codes are unpacked once into a buffer
    # that every 6-token tile (n_vec weight vectors at a time) then reads.
    m_rows, n = out.shape
    mp, kp = q.shape
    lit = numba.literally(path)
    nv = numba.literally(n_vec)
    inv = np.empty(m_rows, np.float32)
    for m in range(m_rows):
        inv[m] = np.float32(1.0) / xscale[m]
    vstride = K_CHUNK * COLS  # bytes of one block's codes per chunk (a byte per weight)
    for t in prange(packed.shape[0] // BLOCKS):
        if t * ROW_ALIGN >= n:
            continue
        codes = np.empty((BLOCKS, vstride), np.uint8)
        acc = np.zeros((mp, ROW_ALIGN), np.int32)
        for k0 in range(0, kp, K_CHUNK):
            steps = (min(kp, k0 + K_CHUNK) - k0) // KSTEP
            for c in range(BLOCKS):
                unpack16(codes[c].ctypes.data, packed[t * BLOCKS + c, k0 // PACK_K].ctypes.data,
                         steps * KSTEP // PACK_K)
            # while the tiles run, fetch the packed bytes the next chunk (or task) unpacks
            nt, nk = (np.int64(t), k0 + K_CHUNK) if k0 + K_CHUNK < kp else (np.int64(t) + 1, 0)
            if nt * BLOCKS < packed.shape[0]:
                for c in range(BLOCKS):
                    prefetch(packed[nt * BLOCKS + c, nk // PACK_K].ctypes.data,
                             min(K_CHUNK, kp - nk) // PACK_K * VEC)
            for t0 in range(0, mp, M_ALIGN):
                rest = m_rows - t0  # a last tile of 1..4 tokens computes only those rows
                for c0 in range(0, BLOCKS, nv):
                    w = codes[c0].ctypes.data
                    x = q.ctypes.data + t0 * kp + k0
                    o = acc.ctypes.data + (t0 * ROW_ALIGN + c0 * COLS) * 4
                    if rest >= 5:
                        bcast_tile(lit, 6, nv, 1, w, vstride, x, kp, steps, o, ROW_ALIGN * 4)
                    elif rest == 4:
                        bcast_tile(lit, 4, nv, 1, w, vstride, x, kp, steps, o, ROW_ALIGN * 4)
                    elif rest == 3:
                        bcast_tile(lit, 3, nv, 1, w, vstride, x, kp, steps, o, ROW_ALIGN * 4)
                    elif rest == 2:
                        bcast_tile(lit, 2, nv, 1, w, vstride, x, kp, steps, o, ROW_ALIGN * 4)
                    else:
                        bcast_tile(lit, 1, nv, 1, w, vstride, x, kp, steps, o, ROW_ALIGN * 4)
        _finish(out, acc, qsum, inv, scales, t * ROW_ALIGN, m_rows)


@pjit
def ternary_matmul_amx(out, q, qsum, xscale, packed, scales, n_threads):
    # out[M, N] = (codes[N, Kp] . q[Mq, Kp] - qsum[M]) * scales[N, 0] * (1 / xscale[M]) on AMX
    # tiles (kernels/amx.py), Mq a multiple of 16 (zero rows): per task 4 blocks (64 rows,
    # C tiles 0..3), per k chunk their codes unpacked once (the VNNI layout is the B tiles'
    # layout), then every 16-token tile.  Each thread configures the tiles once and runs every
    # n_threads-th task (configuring and releasing per task costs as much as small tiles' work).
    m_rows, n = out.shape
    mq, kp = q.shape
    inv = np.empty(m_rows, np.float32)
    for m in range(m_rows):
        inv[m] = np.float32(1.0) / xscale[m]
    vstride = K_CHUNK * COLS
    n_tasks = min(packed.shape[0] // BLOCKS, -(-n // ROW_ALIGN))
    n_workers = max(1, min(n_threads, n_tasks))
    for w in prange(n_workers):
        codes = np.empty((BLOCKS, vstride), np.uint8)
        acc = np.empty((mq, ROW_ALIGN), np.int32)
        cfg = tile_config(TILE_ROWS)
        first = True
        for t in range(w, n_tasks, n_workers):
            for k0 in range(0, kp, K_CHUNK):
                kn = min(kp, k0 + K_CHUNK) - k0
                for c in range(BLOCKS):
                    unpack16(codes[c].ctypes.data,
                             packed[t * BLOCKS + c, k0 // PACK_K].ctypes.data, kn // PACK_K)
                nt, nk = ((np.int64(t), k0 + K_CHUNK) if k0 + K_CHUNK < kp
                          else (np.int64(t) + n_workers, 0))
                if nt < n_tasks:
                    for c in range(BLOCKS):
                        prefetch(packed[nt * BLOCKS + c, nk // PACK_K].ctypes.data,
                                 min(K_CHUNK, kp - nk) // PACK_K * VEC)
                for t0 in range(0, mq, TILE_ROWS):
                    tile_pass(cfg.ctypes.data if first else 0, q.ctypes.data + t0 * kp + k0, kp,
                              codes.ctypes.data, vstride, acc.ctypes.data + t0 * ROW_ALIGN * 4,
                              ROW_ALIGN * 4, kn // TILE_K, 1 if k0 > 0 else 0)
                    first = False
            _finish(out, acc, qsum, inv, scales, t * ROW_ALIGN, m_rows)
        tile_release()


@pjit
def ternary_matvec_simd(path, n_vec, out, q, qsum, xscale, packed, scales):
    # out[1, N] = (codes[N, Kp] . q[0] - qsum[0]) * scales[N, 0] * (1 / xscale[0]), one token:
    # the codes are unpacked in registers straight from the packed blocks (each byte read
    # once), n_vec blocks at a time.
    n = out.shape[1]
    nb, n_chunks, _ = packed.shape
    lit = numba.literally(path)
    nv = numba.literally(n_vec)
    inv = np.empty(1, np.float32)
    inv[0] = np.float32(1.0) / xscale[0]
    for t in prange((nb + VEC_BLOCKS - 1) // VEC_BLOCKS):
        b0 = t * VEC_BLOCKS
        if b0 * COLS >= n:
            continue
        acc = np.empty((1, VEC_BLOCKS * COLS), np.int32)
        for c in range(0, min(VEC_BLOCKS, nb - b0), nv):
            packed_vec(lit, nv, packed[b0 + c].ctypes.data, n_chunks * VEC, q.ctypes.data,
                       n_chunks, acc.ctypes.data + c * COLS * 4)
        _finish(out, acc, qsum, inv, scales, b0 * COLS, 1)


@pjit
def ternary_matmul_small(path, n_vec, tile, out, q, qsum, xscale, packed, scales):
    # out[M, N] = (codes[N, Kp] . q[M, Kp] - qsum[M]) * scales[N, 0] * (1 / xscale[M]) for a few
    # tokens (the small-batch path): per task VEC_BLOCKS blocks, n_vec at a time, each packed
    # byte read once per `tile` tokens and unpacked in registers (simd.packed_tile), so the
    # step stays bound by reading the weights until the dot products catch up.
    m_rows, n = out.shape
    nb, n_chunks, _ = packed.shape
    kp = q.shape[1]
    lit = numba.literally(path)
    nv = numba.literally(n_vec)
    tm = numba.literally(tile)
    inv = np.empty(m_rows, np.float32)
    for m in range(m_rows):
        inv[m] = np.float32(1.0) / xscale[m]
    vstride = n_chunks * VEC
    ostride = VEC_BLOCKS * COLS * 4
    for t in prange((nb + VEC_BLOCKS - 1) // VEC_BLOCKS):
        b0 = t * VEC_BLOCKS
        if b0 * COLS >= n:
            continue
        acc = np.empty((m_rows, VEC_BLOCKS * COLS), np.int32)
        for c in range(0, min(VEC_BLOCKS, nb - b0), nv):
            p = packed[b0 + c].ctypes.data
            for t0 in range(0, m_rows, tm):
                rest = min(m_rows - t0, tm)
                x = q.ctypes.data + t0 * kp
                o = acc.ctypes.data + t0 * ostride + c * COLS * 4
                if rest == 8:
                    packed_tile(lit, 8, nv, p, vstride, x, kp, n_chunks, o, ostride)
                elif rest == 7:
                    packed_tile(lit, 7, nv, p, vstride, x, kp, n_chunks, o, ostride)
                elif rest == 6:
                    packed_tile(lit, 6, nv, p, vstride, x, kp, n_chunks, o, ostride)
                elif rest == 5:
                    packed_tile(lit, 5, nv, p, vstride, x, kp, n_chunks, o, ostride)
                elif rest == 4:
                    packed_tile(lit, 4, nv, p, vstride, x, kp, n_chunks, o, ostride)
                elif rest == 3:
                    packed_tile(lit, 3, nv, p, vstride, x, kp, n_chunks, o, ostride)
                elif rest == 2:
                    packed_tile(lit, 2, nv, p, vstride, x, kp, n_chunks, o, ostride)
                else:
                    packed_tile(lit, 1, nv, p, vstride, x, kp, n_chunks, o, ostride)
        _finish(out, acc, qsum, inv, scales, b0 * COLS, m_rows)


# One entry point per path, calling the driver with constant literals (path index, weight
# vectors per tile): numba types the constants as literals, so each path is compiled (and
# cached) on its first use only, and a call from Python never goes through numba.literally's
# retry.  512-bit registers hold 4 weight vectors x 6 tokens of accumulators; 256-bit paths
# (16 registers on AVX2 / AVX-VNNI) one vector (two halves) x 6 tokens.
@jit
def _simd_vnni512(out, q, qsum, xscale, packed, scales):
    ternary_matmul_simd(0, 4, out, q, qsum, xscale, packed, scales)


@jit
def _simd_vnni256(out, q, qsum, xscale, packed, scales):
    ternary_matmul_simd(1, 1, out, q, qsum, xscale, packed, scales)


@jit
def _simd_avx2(out, q, qsum, xscale, packed, scales):
    ternary_matmul_simd(2, 1, out, q, qsum, xscale, packed, scales)


# the mat-vec's weight vectors (streams) read side by side per task, per machine kind: on the
# 2-core AMD EPYC (vnni512), 30 layers' gate|up + down from memory (398 MB), one vector (a
# single sequential stream per task) read 28.8 GB/s against 21.3 for 2, 4 or 8 at a time (read
# bandwidth 32.2 GB/s, same run); the Intel Xeon with AMX keeps the 2 it was tuned with
@jit
def _vec_vnni512(out, q, qsum, xscale, packed, scales):
    ternary_matvec_simd(0, 1, out, q, qsum, xscale, packed, scales)


@jit
def _vec_amx(out, q, qsum, xscale, packed, scales):
    ternary_matvec_simd(0, 2, out, q, qsum, xscale, packed, scales)


@jit
def _vec_vnni256(out, q, qsum, xscale, packed, scales):
    ternary_matvec_simd(1, 1, out, q, qsum, xscale, packed, scales)


@jit
def _vec_avx2(out, q, qsum, xscale, packed, scales):
    ternary_matvec_simd(2, 1, out, q, qsum, xscale, packed, scales)


@jit
def _vec_generic(out, q, qsum, xscale, packed, scales):
    ternary_matvec_simd(3, 1, out, q, qsum, xscale, packed, scales)


# the small-batch tiles, measured per machine kind (bench/kernels.py --crossover and a tile
# sweep, 30 layers of 2B-4T's matrices from memory): on the AMD EPYC (vnni512) one weight
# vector x 8 tokens beats 2 x 8 by 10-17% at M = 8-16 (fewer accumulators in flight); the
# Intel Xeon with AMX keeps the 2 x 8 it was tuned with.
@jit
def _small_vnni512(out, q, qsum, xscale, packed, scales):
    ternary_matmul_small(0, 1, 8, out, q, qsum, xscale, packed, scales)


@jit
def _small_amx(out, q, qsum, xscale, packed, scales):
    ternary_matmul_small(0, 2, 8, out, q, qsum, xscale, packed, scales)


@jit
def _small_vnni256(out, q, qsum, xscale, packed, scales):
    ternary_matmul_small(1, 1, 4, out, q, qsum, xscale, packed, scales)


@jit
def _small_avx2(out, q, qsum, xscale, packed, scales):
    ternary_matmul_small(2, 1, 4, out, q, qsum, xscale, packed, scales)


@jit
def _small_generic(out, q, qsum, xscale, packed, scales):
    ternary_matmul_small(3, 1, 4, out, q, qsum, xscale, packed, scales)


SIMD_SMALL = {"amx": _small_amx, "vnni512": _small_vnni512, "vnni256": _small_vnni256,
              "avx2": _small_avx2, "portable": _small_generic}
assert set(SIMD_SMALL) == set(KERNEL_PATHS)  # every path has its own small kernel
SIMD_MATMUL = {"vnni512": _simd_vnni512, "vnni256": _simd_vnni256, "avx2": _simd_avx2}
SIMD_MATVEC = {"amx": _vec_amx, "vnni512": _vec_vnni512, "vnni256": _vec_vnni256,
               "avx2": _vec_avx2, "portable": _vec_generic}
assert set(SIMD_MATVEC) == set(KERNEL_PATHS)
assert all(SIMD_PATHS.index(p) == i for i, p in enumerate(SIMD_MATMUL))  # literals above
# the tile calls above pass M_ALIGN as the literal 6 (a literal must appear in the source)
assert M_ALIGN == 6 and K_CHUNK % PACK_K == 0 and PACK_BLOCK % PACK_K == 0
assert BLOCKS == N_C and K_CHUNK % TILE_K == 0 and PACK_BLOCK % TILE_K == 0  # the AMX kernel


KERNELS = ("matvec", "small", "block", "amx", "grouped")  # what matmul_kernel() picks


def matmul_kernel(path: str, m: int, grouped: bool = False) -> str:
    """Which kernel runs M tokens on instruction path `path`: the single-token mat-vec, the
    small-batch kernel up to SMALL_MAX_ROWS[path] tokens, then the block kernel (AMX tiles on
    'amx'); matrices with several scale groups per row (and the portable path's large M) the
    plain numba kernel."""
    if grouped:
        return "grouped"
    if m == 1:
        return "matvec"
    if m <= SMALL_MAX_ROWS[path]:
        return "small"
    if path == "amx":
        return "amx"
    return "grouped" if path == "portable" else "block"


def ternary_matmul(out: np.ndarray, q: np.ndarray, qsum: np.ndarray, xscale: np.ndarray,
                   packed: np.ndarray, scales: np.ndarray, group: int, path: str,
                   kernel: str | None = None) -> None:
    """out[M, N] = W q with W ternary in kernel layout, on instruction path `path`.

    q is int8 [Mp, Kp] (rows padded to a multiple of M_ALIGN with zeros), qsum its row sums.
    `kernel` (default: matmul_kernel's choice; tests and benches force one) is one of
    KERNELS: every kernel computes the same integers."""
    m, n = out.shape
    if (q.shape[1] != packed.shape[1] * PACK_K or q.shape[0] % M_ALIGN or q.shape[0] < m
            or packed.shape[0] * COLS < n or packed.shape[0] % BLOCKS or scales.shape[0] != n):
        raise ValueError(f"ternary matmul operands do not fit: out {out.shape}, q {q.shape}, "
                         f"packed {packed.shape}, scales {scales.shape}")
    kernel = kernel or matmul_kernel(path, m, scales.shape[1] != 1)
    if kernel == "grouped":
        ternary_matmul_kernel(out, q, xscale, packed, scales, group)
    elif scales.shape[1] != 1:
        raise ValueError(f"kernel {kernel!r} takes one scale per row, got {scales.shape[1]}")
    elif kernel == "matvec":
        if m != 1:
            raise ValueError(f"the mat-vec kernel takes one token, got {m}")
        SIMD_MATVEC[path](out, q, qsum, xscale, packed, scales)
    elif kernel == "small":
        SIMD_SMALL[path](out, q, qsum, xscale, packed, scales)
    elif kernel == "amx":
        require_amx("kernel path")
        # whole 16-row tiles (zero rows): one tile configuration throughout
        ternary_matmul_amx(out, whole_tiles(q, 0), qsum, xscale, packed, scales,
                           numba.get_num_threads())
    elif kernel == "block" and simd_path(path) in SIMD_MATMUL:
        SIMD_MATMUL[simd_path(path)](out, q, qsum, xscale, packed, scales)
    else:
        raise ValueError(f"no {kernel!r} ternary matmul kernel on path {path!r}")
