"""The exact F16 head's argmax through the int8 head (a screen with a rigorous bound).

`exact_argmax_screened` runs the int8 head (kernels/lm_head.py), bounds each row's
|exact - int8| rigorously (`screen_exact_f16`, norms from `head_error_norms` measured at load)
and recomputes exactly, with lm_head_f16's own arithmetic, only the rows that can still win:
the exact head's token for a fraction of its work.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .cpu import jit, pjit
from .lm_head import LM_ROWS, U_OFFSET, lm_head_int8_run, quantize_head_input
from .simd import F16_LANES, F16_TILE, exp_sum, f16_rows

BOUND_MARGIN = 1e-4  # relative slack on the screening bound (its own float32 rounding)
LOGIT_ROUNDING = 1e-6  # >= the relative rounding of an int8-head logit (4 float32 operations)
SCAN_ROWS = 64  # rows per chunk of the screen's first pass (a chunk's highest upper bound)


def exact_sum_error(k: int) -> float:
    """Bound on |float32 exact-head logit - real dot product| / (||e|| ||h||) for rows of length
    k: lm_head_f16 sums each lane over k / 16 fused multiply-adds, then 16 lanes, one rounding
    per step (gamma_n = n u / (1 - n u), u = 2^-24), with 1% to spare."""
    n = -(-k // 16) + 16
    u = 2.0 ** -24
    return 1.01 * n * u / (1 - n * u)


@pjit
def head_error_norms(err_h, norm8, exact, rows, scale, sum_error):
    # per row r of the int8 head (rows[R, >= K] int8, scale[R] = 127 / max|row|) and the exact
    # rows exact[R, K] float32, in float64 and rounded up to float32:
    #   err_h[r] = ||exact_r - rows_r / scale_r|| + sum_error ||exact_r||
    #   norm8[r] = ||rows_r / scale_r||
    n, k = exact.shape
    for r in prange(n):
        inv = 1.0 / np.float64(scale[r])
        d2 = 0.0
        e2 = 0.0
        a2 = 0.0
        for i in range(k):
            e = np.float64(exact[r, i])
            a = np.float64(rows[r, i]) * inv
            d2 += (e - a) * (e - a)
            e2 += e * e
            a2 += a * a
        err_h[r] = _f32_up(np.sqrt(d2) + sum_error * np.sqrt(e2))
        norm8[r] = _f32_up(np.sqrt(a2))


@pjit
def screen_exact_f16(tokens, conf, approx, u, xscale, h, e16, err_h, norm8, exclude):
    # The exact head's argmax from the int8 head's logits approx[M, V] (overwritten):
    # |exact - approx| <= bound[m, r] = (err_h[r] ||h_m|| + norm8[r] ||h_m - q_m / s_m||)
    #   (1 + BOUND_MARGIN) + LOGIT_ROUNDING |approx|
    # (the split e h - e' h' = (e - e') h + e' (h - h'), Cauchy-Schwarz on each, plus float32
    # rounding on both sides; weights.quantize_head measures err_h, norm8).  Every row whose
    # upper bound reaches the best lower bound is rescored exactly, with lm_head_f16's very
    # arithmetic (f16_tile, same lane sums), so the argmax (lowest index on ties) is the exact
    # head's.  Rescored rows keep their exact logits in approx; conf = the softmax probability
    # of that row with them and the other rows' int8 logits.  Row `exclude` never wins.
    m_rows, v = approx.shape
    k = h.shape[1]
    for m in prange(m_rows):
        a = 0.0
        b = 0.0
        s = np.float64(xscale[m])
        for i in range(k):
            x = np.float64(h[m, i])
            d = x - (np.float64(u[m, i]) - U_OFFSET) / s
            a += x * x
            b += d * d
        a32 = _f32_up(np.sqrt(a))  # float32 coefficients, rounded up: the bound stays a bound
        b32 = _f32_up(np.sqrt(b))
        row = approx[m]
        if 0 <= exclude < v:
            row[exclude] = -np.inf
        chunk_hi = np.empty(-(-v // SCAN_ROWS), np.float32)
        lo = _scan_bounds(row, err_h, norm8, a32, b32, chunk_hi)
        # rows that may win, in ascending order, rescored 4 at a time (independent chains);
        # only the chunks whose highest upper bound reaches lo are scanned row by row
        acc = np.zeros((F16_TILE, F16_LANES), np.float32)
        pend = np.zeros(F16_TILE, np.int64)
        n = 0
        best, best_val = -1, np.float32(-np.inf)
        for c in range(chunk_hi.shape[0]):
            if chunk_hi[c] < lo:
                continue
            for r in range(c * SCAN_ROWS, min(v, (c + 1) * SCAN_ROWS)):
                x = row[r]
                if x + _bound(x, err_h[r], norm8[r], a32, b32) >= lo and x != -np.inf:
                    pend[n] = r
                    n += 1
                    if n == F16_TILE:
                        best, best_val = _rescore(row, pend, n, e16, acc, h[m], best, best_val)
                        n = 0
        best, best_val = _rescore(row, pend, n, e16, acc, h[m], best, best_val)
        tokens[m] = best
        conf[m] = np.float32(1.0) / exp_sum(row.ctypes.data, v, best_val) if best >= 0 else 0.0


@jit
def _rescore(row, pend, n, e16, acc, h, best, best_val):
    # row[pend[j]] <- exact logit of e16[pend[j]] . h (lm_head_f16's arithmetic) for j < n;
    # the running argmax (rows come in ascending order: the lowest index wins a tie)
    if n == 0:
        return best, best_val
    for j in range(n, F16_TILE):  # unused slots repeat the first row
        pend[j] = pend[0]
    k = h.shape[0]
    acc[:] = 0.0
    f16_rows(e16[pend[0]].ctypes.data, e16[pend[1]].ctypes.data, e16[pend[2]].ctypes.data,
             e16[pend[3]].ctypes.data, h.ctypes.data, k // 16, acc.ctypes.data)
    for j in range(n):
        x = np.float32(0.0)
        for lane in range(F16_LANES):
            x += acc[j, lane]
        row[pend[j]] = x
        if x > best_val:
            best, best_val = pend[j], x
    return best, best_val


@jit
def _f32_up(x):
    # float64 -> a float32 not below it
    y = np.float32(x)
    return y if np.float64(y) >= x else np.nextafter(y, np.float32(np.inf))


@jit
def _bound(x, err_h, norm8, a, b):
    # float32 throughout (vectorizes); BOUND_MARGIN covers its own rounding
    return (err_h * a + norm8 * b) * np.float32(1.0 + BOUND_MARGIN) + np.float32(
        LOGIT_ROUNDING) * abs(x)


@jit(fastmath={"nnan"})
def _scan_bounds(row, err_h, norm8, a, b, chunk_hi):
    # -> max over rows of approx - bound (the best lower bound; -inf rows: excluded), and
    # chunk_hi[c] = max over chunk c's SCAN_ROWS rows of approx + bound: the same float
    # operations as the row test of screen_exact_f16, and max is exact in any order, so a
    # chunk whose chunk_hi is below the lower bound has no row that passes the test
    lo = np.float32(-np.inf)
    n = row.shape[0]
    for c in range(chunk_hi.shape[0]):
        hi = np.float32(-np.inf)
        for r in range(c * SCAN_ROWS, min(n, (c + 1) * SCAN_ROWS)):
            bd = _bound(row[r], err_h[r], norm8[r], a, b)
            lo = max(lo, row[r] - bd)
            hi = max(hi, row[r] + bd)
        chunk_hi[c] = hi
    return lo


def exact_argmax_screened(tokens: np.ndarray, conf: np.ndarray, h: np.ndarray, e16: np.ndarray,
                          e8: np.ndarray, e_inv: np.ndarray, e_sum: np.ndarray,
                          err_h: np.ndarray, norm8: np.ndarray, path: str, approx: np.ndarray,
                          exclude: int) -> None:
    """The exact F16 head's argmax (and a mixed confidence) for h[M, K] float32: the int8 head
    on tile path `path` writes approx[M, V] (scratch), screen_exact_f16 rescores the rows that
    may win.  e16: the embedding's F16 bits [V, K]; e8 .. norm8: weights.Int8Head."""
    m, v = h.shape[0], e16.shape[0]
    u, xs = quantize_head_input(h, e8)
    lm_head_int8_run(path, approx, np.empty((-(-v // LM_ROWS), m, 3)), u, xs, e8, e_inv, e_sum,
                     -1)
    screen_exact_f16(tokens, conf, approx, u, xs, h, e16, err_h, norm8, exclude)
