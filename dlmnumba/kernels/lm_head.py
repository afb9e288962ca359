"""int8 LM head: logits = E h with E quantized to int8 per row (at load) and h per token.

The final hidden state h[M, E] is quantized per token like a BitLinear input (q = rint(h * s),
s = 127 / max|h|) and shifted to unsigned (u = q + 128, the unsigned operand of vpdpbusd);
the embedding rows are int8 e8 with their own s_e, stored in the broadcast layout of
kernels/simd.py (`interleave_rows`: 16 rows x 4 k per 64-byte vector).  sum u e8 =
sum q e8 + 128 sum e8, so
    logit[m, r] = (dot(u_m, e8_r) - 128 * esum[r]) / (s[m] * s_e[r]).
`lm_head_int8` either writes logits[M, V] or, fused, keeps per task a running max, its index
and the sum of exp(logit - max) per token (online softmax), so greedy decoding never
materialises M x V floats; `combine_partials` merges the tasks' partials in an explicit step.

The exact head (`lm_head_f16`: the stored F16 embedding times float32 h) has the same fused
form; kernels/lm_screen.py gets its argmax for a fraction of its work through the int8 head.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .cpu import jit, pjit
from .simd import COLS, F16_ACC, F16_LANES, KSTEP, PATHS as SIMD_PATHS
from .simd import bcast_tile, exp_sum, f16_tile
from .amx import (TILE_K, TILE_ROWS, require_amx, tile_config, tile_pass_us, tile_release,
                  whole_tiles)
from .dispatch import PATHS as KERNEL_PATHS
from .ternary import M_ALIGN

LM_ROWS = 64  # vocabulary rows per parallel task (4 vectors of 16); E rows padded to this
K_CHUNK = 1024  # k per pass over the task's rows (they and the token tiles stay in L2)
# tokens per tile of a several-token pass where M_ALIGN's (6) would pad more rows (8 tokens:
# 8 rows, not 12; AMD EPYC, vnni512: 12.8 instead of 14.5-17.9 ms); the literal in
# lm_head_int8's tile call
SMALL_TILE = 4
U_OFFSET = 128  # added to int8 activations to make them unsigned
# CPU path -> the path of the LM head's tile: avx2's vpmaddubsw would saturate on u8 x s8
# products (unsigned activations against int8 weights), so avx2 runs the portable tile
TILE_PATH = {"amx": "amx", "vnni512": "vnni512", "vnni256": "vnni256", "avx2": "portable",
             "portable": "portable"}


@jit
def _emit(blk, logits, part, t, r0, exclude):
    # task t's logits blk[M, nr] (rows r0..) -> logits[:, r0:r0+nr], or (fused: logits of
    # width 0) part[t, m] = (max, sum exp(x - max), argmax) with row `exclude` left out;
    # the max / argmax scan is exact, the exp sum vectorized (simd.exp_sum)
    m_rows, nr = blk.shape
    if logits.shape[1] != 0:
        for m in range(m_rows):
            for c in range(nr):
                logits[m, r0 + c] = blk[m, c]
        return
    if r0 <= exclude < r0 + nr:
        for m in range(m_rows):
            blk[m, exclude - r0] = -np.inf
    for m in range(m_rows):
        mx = _row_max(blk[m])
        arg = 0  # the first position of the max (as a strict > scan keeps it)
        while blk[m, arg] != mx and arg < nr - 1:
            arg += 1
        total = np.float32(0.0)
        if mx != -np.inf:
            total = exp_sum(blk[m].ctypes.data, nr, mx)
        part[t, m, 0] = mx
        part[t, m, 1] = total
        part[t, m, 2] = r0 + arg if mx != -np.inf else -1


# max is exact in any order for non-NaN values (logits are checked finite upstream), so LLVM
# may vectorize it
@jit(fastmath={"nnan"})
def _row_max(x):
    mx = x[0]
    for c in range(1, x.shape[0]):
        mx = max(mx, x[c])
    return mx


def interleave_rows(rows: np.ndarray) -> np.ndarray:
    """int8 rows[V, Kp] (V a multiple of 16, Kp of 4) -> the broadcast layout [V/16, Kp/4, 64]:
    vector b, step s, byte 4 col + i = rows[16 b + col, 4 s + i]."""
    v, kp = rows.shape
    return np.ascontiguousarray(
        rows.reshape(v // COLS, COLS, kp // KSTEP, KSTEP).transpose(0, 2, 1, 3)
        .reshape(v // COLS, kp // KSTEP, COLS * KSTEP))


@pjit
def lm_head_int8(path, n_vec, logits, part, u, xscale, e8, e_inv, e_sum, exclude):
    # logits[M, V] = (u . e8 - 128 esum) / (xscale e_inv), or fused partials (see _emit)
    # u[Mp, Kp] uint8 (Mp % M_ALIGN == 0), e8[Vb, Kp/4, 64] int8 (Vb % 4 == 0)
    m_rows = xscale.shape[0]
    mp, kp = u.shape
    v = e_inv.shape[0]
    lit = numba.literally(path)
    nv = numba.literally(n_vec)
    vstride = kp * COLS  # bytes per vector of 16 rows
    blocks = LM_ROWS // COLS
    # 8 tokens run as 2 x 4, not 2 x 6 (u's rows up to mp exist either way)
    small = -(-m_rows // SMALL_TILE) * SMALL_TILE < mp
    t_stop, t_step = (m_rows, SMALL_TILE) if small else (mp, M_ALIGN)
    for t in prange((v + LM_ROWS - 1) // LM_ROWS):
        acc = np.zeros((mp, LM_ROWS), np.int32)
        b0 = t * blocks
        if m_rows == 1:  # one token: stream each row once
            for c0 in range(0, blocks, nv):
                bcast_tile(lit, 1, nv, 0, e8[b0 + c0].ctypes.data, vstride, u.ctypes.data, kp,
                           kp // KSTEP, acc.ctypes.data + c0 * COLS * 4, LM_ROWS * 4)
        else:  # tiles of M_ALIGN tokens, or of SMALL_TILE where they pad fewer rows
            for k0 in range(0, kp, K_CHUNK):
                steps = (min(kp, k0 + K_CHUNK) - k0) // KSTEP
                for t0 in range(0, t_stop, t_step):
                    for c0 in range(0, blocks, nv):
                        w = e8[b0 + c0, k0 // KSTEP].ctypes.data
                        x = u.ctypes.data + t0 * kp + k0
                        o = acc.ctypes.data + (t0 * LM_ROWS + c0 * COLS) * 4
                        if small:
                            bcast_tile(lit, 4, nv, 0, w, vstride, x, kp, steps, o, LM_ROWS * 4)
                        else:
                            bcast_tile(lit, 6, nv, 0, w, vstride, x, kp, steps, o, LM_ROWS * 4)
        _int8_emit(acc, logits, part, t, xscale, e_inv, e_sum, exclude)


@jit
def _int8_emit(acc, logits, part, t, xscale, e_inv, e_sum, exclude):
    # task t's int32 sums acc[M, 64] (u . e8) -> logits (u = q + 128: minus 128 esum), _emit
    m_rows, v = xscale.shape[0], e_inv.shape[0]
    r0 = t * LM_ROWS
    nr = min(LM_ROWS, v - r0)
    blk = np.empty((m_rows, nr), np.float32)
    for m in range(m_rows):
        for c in range(nr):
            # int32 throughout (|acc| < 2^27, 128 |esum| < 2^26): converts on vector lanes
            blk[m, c] = np.float32(acc[m, c] - np.int32(U_OFFSET) * e_sum[r0 + c]) / (
                xscale[m] * e_inv[r0 + c])
    _emit(blk, logits, part, t, r0, exclude)


@pjit
def lm_head_int8_amx(logits, part, u, xscale, e8, e_inv, e_sum, exclude, n_threads):
    # lm_head_int8 on AMX tiles (kernels/amx.py): u[Mq, Kp] uint8 with Mq % 16 == 0; the int8
    # rows' broadcast layout is the B tiles' layout, so they are read as stored.  Each thread
    # configures the tiles once and runs every n_threads-th task of 64 rows.
    mq, kp = u.shape
    v = e_inv.shape[0]
    n_tasks = (v + LM_ROWS - 1) // LM_ROWS
    n_workers = max(1, min(n_threads, n_tasks))
    blocks = LM_ROWS // COLS
    for w in prange(n_workers):
        acc = np.empty((mq, LM_ROWS), np.int32)
        cfg = tile_config(TILE_ROWS)
        first = True
        for t in range(w, n_tasks, n_workers):
            for t0 in range(0, mq, TILE_ROWS):
                tile_pass_us(cfg.ctypes.data if first else 0, u.ctypes.data + t0 * kp, kp,
                             e8[t * blocks].ctypes.data, kp * COLS,
                             acc.ctypes.data + t0 * LM_ROWS * 4, LM_ROWS * 4, kp // TILE_K, 0)
                first = False
            _int8_emit(acc, logits, part, t, xscale, e_inv, e_sum, exclude)
        tile_release()


@pjit
def lm_head_f16(n_rows, n_tok, logits, part, h, e16, exclude):
    # logits[M, V] = h[M, K] . e16[V, K] (F16 bits, the stored embedding) in float32, or
    # fused partials (see _emit); tiles of n_rows embedding rows x n_tok tokens (literals).
    # h has rows padded to a multiple of n_tok (zeros); K % 16 == 0.
    mp, k = h.shape
    v = e16.shape[0]
    m_rows = part.shape[1]
    lr = numba.literally(n_rows)
    lit = numba.literally(n_tok)
    for t in prange((v + LM_ROWS - 1) // LM_ROWS):
        acc = np.zeros((F16_ACC, F16_LANES), np.float32)
        r0 = t * LM_ROWS
        nr = min(LM_ROWS, v - r0)
        blk = np.empty((m_rows, nr), np.float32)
        for c0 in range(0, nr, lr):
            rows = min(lr, nr - c0)
            src = e16[r0 + c0:r0 + c0 + lr]
            if rows < lr:  # last rows of the vocabulary: a padded copy, no read past the end
                tail = np.zeros((lr, k), np.uint16)
                tail[:rows] = e16[r0 + c0:r0 + c0 + rows]
                src = tail
            for m0 in range(0, m_rows, lit):
                acc[:] = 0
                f16_tile(lr, lit, src.ctypes.data, 2 * k, h.ctypes.data + 4 * m0 * k, 4 * k,
                         k // 16, acc.ctypes.data)
                for i in range(rows):
                    for j in range(min(lit, m_rows - m0)):
                        x = np.float32(0.0)
                        for lane in range(F16_LANES):
                            x += acc[i * lit + j, lane]
                        blk[m0 + j, c0 + i] = x
        _emit(blk, logits, part, t, r0, exclude)


@jit
def combine_partials(tokens, conf, part):
    # tokens[M], conf[M] <- argmax and its softmax probability from per-task partials
    n_tasks, m_rows, _ = part.shape
    for m in range(m_rows):
        mx = -np.inf
        arg = -1
        for t in range(n_tasks):
            if part[t, m, 0] > mx:
                mx = part[t, m, 0]
                arg = int(part[t, m, 2])
        total = 0.0
        for t in range(n_tasks):
            if part[t, m, 2] >= 0:
                total += part[t, m, 1] * np.exp(part[t, m, 0] - mx)
        tokens[m] = arg
        conf[m] = 1.0 / total


@jit
def quantize_activations_u8(u, xscale, h):
    # u[Mp, Kp] uint8 = rint(h * s) + 128 per row (s = 127 / max|h|), padding = 128 (zero)
    m_rows, k = h.shape
    for m in range(u.shape[0]):
        if m >= m_rows:
            u[m, :] = U_OFFSET
            continue
        amax = np.float32(1e-5)
        for i in range(k):
            amax = max(amax, abs(h[m, i]))
        s = np.float32(127.0) / amax
        xscale[m] = s
        for i in range(k):
            u[m, i] = np.uint8(np.int32(min(max(np.rint(h[m, i] * s), -128.0), 127.0)) + U_OFFSET)
        for i in range(k, u.shape[1]):
            u[m, i] = U_OFFSET


def quantize_head_input(h: np.ndarray, e8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h[M, K] float32 quantized for the int8 head e8: u[Mp, Kp] uint8 (q + 128, rows padded
    to M_ALIGN) and the per-token scales xscale[M] (quantize_activations_u8)."""
    m = h.shape[0]
    u = np.empty((-(-m // M_ALIGN) * M_ALIGN, e8.shape[1] * KSTEP), np.uint8)
    xs = np.empty(m, np.float32)
    quantize_activations_u8(u, xs, h)
    return u, xs


# one entry point per tile path (constant literal: compiled on first use only)
@jit
def _lm_vnni512(logits, part, u, xscale, e8, e_inv, e_sum, exclude):
    lm_head_int8(0, 4, logits, part, u, xscale, e8, e_inv, e_sum, exclude)


@jit
def _lm_vnni256(logits, part, u, xscale, e8, e_inv, e_sum, exclude):
    lm_head_int8(1, 1, logits, part, u, xscale, e8, e_inv, e_sum, exclude)


@jit
def _lm_portable(logits, part, u, xscale, e8, e_inv, e_sum, exclude):
    lm_head_int8(3, 1, logits, part, u, xscale, e8, e_inv, e_sum, exclude)


# fewest tokens the AMX head runs on tiles (its rows need no unpacking; one token streams them)
AMX_HEAD_MIN_ROWS = 2


def _lm_amx(logits, part, u, xscale, e8, e_inv, e_sum, exclude):
    # several tokens on AMX tiles (u padded to whole 16-row tiles), one on the VNNI stream
    m = xscale.shape[0]
    if m < AMX_HEAD_MIN_ROWS:
        _lm_vnni512(logits, part, u, xscale, e8, e_inv, e_sum, exclude)
        return
    require_amx("tile path")
    lm_head_int8_amx(logits, part, whole_tiles(u, U_OFFSET), xscale, e8, e_inv, e_sum, exclude,
                     numba.get_num_threads())


LM_HEAD = {"amx": _lm_amx, "vnni512": _lm_vnni512, "vnni256": _lm_vnni256,
           "portable": _lm_portable}
assert all(SIMD_PATHS.index(p) == i for i, p in ((0, "vnni512"), (1, "vnni256"), (3, "portable")))
assert set(TILE_PATH) == set(KERNEL_PATHS) and set(TILE_PATH.values()) == set(LM_HEAD)
assert SMALL_TILE == 4 and M_ALIGN == 6  # the literals of lm_head_int8's tile calls


def lm_head_int8_run(path: str, logits: np.ndarray, part: np.ndarray, u: np.ndarray,
                     xscale: np.ndarray, e8: np.ndarray, e_inv: np.ndarray, e_sum: np.ndarray,
                     exclude: int) -> None:
    """The int8 LM head on tile path `path` (see lm_head_int8), its operands' shapes checked."""
    m, v = xscale.shape[0], e_inv.shape[0]
    if (u.shape[1] != e8.shape[1] * KSTEP or u.shape[0] % M_ALIGN or u.shape[0] < m
            or e8.shape[0] * COLS < v or (e8.shape[0] * COLS) % LM_ROWS
            or part.shape[:2] != (-(-v // LM_ROWS), m)):
        raise ValueError(f"int8 LM head operands do not fit: u {u.shape}, e8 {e8.shape}, "
                         f"{m} tokens, {v} rows, partials {part.shape}")
    LM_HEAD[path](logits, part, u, xscale, e8, e_inv, e_sum, exclude)


# exact-head tiles (embedding rows x tokens) by token count.  A pass over the embedding costs
# about the same for 1 to 5 tokens (streaming and converting the F16 rows dominates: 30-39 ms
# for 2B-4T's 657 MB on 2 cores), so few tokens take one pass: 4 x 1, 4 x 5, and 4 x 7 (28
# accumulators: 46 ms for 6-7 tokens instead of two 4 x 5 passes' 55-57); more go 5 at a time
# (each 4-row group read from memory once, then from cache).
@jit
def _f16_one(logits, part, h, e16, exclude):
    lm_head_f16(4, 1, logits, part, h, e16, exclude)


@jit
def _f16_seven(logits, part, h, e16, exclude):
    lm_head_f16(4, 7, logits, part, h, e16, exclude)


@jit
def _f16_many(logits, part, h, e16, exclude):
    lm_head_f16(4, 5, logits, part, h, e16, exclude)


# (most tokens, the tile's tokens, entry), the first that fits
F16_TILES = ((1, 1, _f16_one), (5, 5, _f16_many), (7, 7, _f16_seven), (None, 5, _f16_many))


def lm_head_exact_f16(logits: np.ndarray, part: np.ndarray, h: np.ndarray, e16: np.ndarray,
                      exclude: int) -> None:
    """The exact LM head over an F16 embedding (e16: its uint16 bits) for the first M rows of
    h[>= M, K] float32, M = part.shape[1]; see lm_head_f16.  Every tile shape gives the same
    logits (each is one chain of fused multiply-adds per lane in k order)."""
    m, k = part.shape[1], h.shape[1]
    if h.shape[0] < m or k != e16.shape[1] or k % 16:
        raise ValueError(f"exact LM head operands do not fit: h {h.shape}, e16 {e16.shape}, "
                         f"{m} tokens")
    tok, fn = next((t, f) for most, t, f in F16_TILES if most is None or m <= most)
    mp = -(-m // tok) * tok  # the tile reads whole groups of its token rows
    if mp == m and h.flags.c_contiguous and h.shape[0] == m:
        fn(logits, part, h, e16, exclude)
        return
    hp = np.zeros((mp, k), np.float32)
    hp[:m] = h[:m]
    fn(logits, part, hp, e16, exclude)


@pjit
def lm_head_dense(logits, h, e):
    # logits[M, V] = h[M, K] . e[V, K] in float32: lane l of 16 sums k = l (mod 16) in k order,
    # then the lanes in order, so a row's logits do not depend on the other rows of the batch
    # (BLAS picks other summation orders for other M: batched == alone needs this fixed one)
    m_rows, k = h.shape
    v = e.shape[0]
    k16 = k // F16_LANES * F16_LANES
    for t in prange((v + LM_ROWS - 1) // LM_ROWS):
        acc = np.empty(F16_LANES, np.float32)
        for r in range(t * LM_ROWS, min(v, (t + 1) * LM_ROWS)):
            for m in range(m_rows):
                acc[:] = 0.0
                for k0 in range(0, k16, F16_LANES):
                    for lane in range(F16_LANES):
                        acc[lane] += h[m, k0 + lane] * e[r, k0 + lane]
                for i in range(k16, k):
                    acc[i - k16] += h[m, i] * e[r, i]
                x = np.float32(0.0)
                for lane in range(F16_LANES):
                    x += acc[lane]
                logits[m, r] = x
