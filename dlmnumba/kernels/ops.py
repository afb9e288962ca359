"""Elementwise and row-wise kernels of the transformer: norms, activation quantization, RoPE,
activations, LM-head reduction.  Free functions over arrays, output argument first."""
from __future__ import annotations

import numpy as np
from numba import prange

from .cpu import jit, pjit
from .simd import silu_times

QMAX = 127.0
QMIN = -128.0
ABSMAX_FLOOR = 1e-5  # BitNet's floor on max|x| so an all-zero row does not divide by zero


@pjit
def rmsnorm(out, x, weight, eps):
    # out[M, E] = x[M, E] / sqrt(mean(x^2) + eps) * weight[E]
    m_rows, e = x.shape
    for m in prange(m_rows):
        r = np.float32(1.0 / np.sqrt(_sum_squares(x[m]) / e + eps))
        for i in range(e):
            out[m, i] = x[m, i] * r * weight[i]


@pjit
def quantize_rows(q, xscale, qsum, x):
    # q[Mp, Kp] int8, xscale[M], qsum[Mp] <- x[M, K]: per-row absmax int8 (BitNet BitLinear)
    # s = 127 / max(|x|, 1e-5); q = clamp(round_half_even(x * s), -128, 127); qsum = sum q.
    # Padding (columns K.., rows M..) is zero.
    m_rows, k = x.shape
    for m in prange(q.shape[0]):
        if m >= m_rows:  # padding row
            _zero_row(q, qsum, m)
            continue
        xscale[m], qsum[m] = _quantize_row(q[m], x[m])


@jit
def _zero_row(q, qsum, m):
    # a padding row of the int8 activations: zero values, zero sum
    q[m, :] = 0
    qsum[m] = 0


@jit
def _quantize_row(qrow, x):
    # qrow[Kp] = clamp(round_half_even(x * s), -128, 127), zero beyond x; -> (s, sum q)
    s = np.float32(QMAX) / _absmax(x, ABSMAX_FLOOR)
    total = np.int32(0)
    for i in range(x.shape[0]):
        v = np.int32(min(max(np.rint(x[i] * s), np.float32(QMIN)), np.float32(QMAX)))
        qrow[i] = v
        total += v
    for i in range(x.shape[0], qrow.shape[0]):
        qrow[i] = 0
    return s, total


@jit
def _quantize_normed(qrow, buf, r, weight):
    # buf[:E] *= r * weight (as rmsnorm), then qrow = quantize_rows of it; -> (scale, sum q)
    for i in range(buf.shape[0]):
        buf[i] = buf[i] * r * weight[i]
    return _quantize_row(qrow, buf)


@jit
def _sum_squares(x):
    # sum of x[i]^2 in float64, as 8 interleaved partial sums (independent chains, so the
    # adds overlap) combined in a fixed order: deterministic on every machine
    n = x.shape[0]
    s = np.zeros(8, np.float64)
    n8 = n - n % 8
    for i in range(0, n8, 8):
        for j in range(8):
            v = np.float64(x[i + j])
            s[j] += v * v
    for i in range(n8, n):
        v = np.float64(x[i])
        s[0] += v * v
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


# max is exact in any order for non-NaN values, so 16 partial maxima (which LLVM turns into
# one vector register; the plain running max it left scalar: 5x slower) change nothing
@jit(fastmath={"nnan"})
def _absmax(x, floor):
    n = x.shape[0]
    n16 = n - n % 16
    lanes = np.full(16, np.float32(floor), np.float32)
    for i in range(0, n16, 16):
        for j in range(16):
            v = abs(x[i + j])
            lanes[j] = v if v > lanes[j] else lanes[j]
    amax = np.float32(floor)
    for j in range(16):
        amax = max(amax, lanes[j])
    for i in range(n16, n):
        amax = max(amax, abs(x[i]))
    return amax


@pjit
def rmsnorm_quantize(q, xscale, qsum, x, res, weight, eps):
    # x[M, E] += res (when res has rows; the residual add), then q, xscale, qsum =
    # quantize_rows(rmsnorm(x, weight, eps)) in one pass per row: the same float operations
    # as rmsnorm followed by quantize_rows, without writing the normed rows; -> whether every
    # row got a scale (_scales_ok)
    m_rows, e = x.shape
    for m in prange(q.shape[0]):
        if m >= m_rows:  # padding row
            _zero_row(q, qsum, m)
            continue
        if res.shape[0]:
            for i in range(e):
                x[m, i] += res[m, i]
        buf = x[m].copy()
        ss = _sum_squares(buf)
        if not np.isfinite(ss):  # an inf / NaN input (absmax skips NaNs): _unscaled_row
            _unscaled_row(q, xscale, qsum, m)
            continue
        r = np.float32(1.0 / np.sqrt(ss / e + eps))
        xscale[m], qsum[m] = _quantize_normed(q[m], buf, r, weight)
    return _scales_ok(xscale, m_rows)


@pjit
def act_rmsnorm_quantize(q, xscale, qsum, gate_up, n_ff, weight, eps, silu):
    # g = relu(gate)^2 * up (silu: silu(gate) * up), gate_up[M, 2F] = [gate | up]; then
    # q, xscale, qsum = quantize_rows(rmsnorm(g, weight, eps)), as the separate kernels compute;
    # -> whether every row got a scale (_scales_ok)
    m_rows = gate_up.shape[0]
    for m in prange(q.shape[0]):
        if m >= m_rows:  # padding row
            _zero_row(q, qsum, m)
            continue
        buf = np.empty(n_ff, np.float32)
        gate, up = gate_up[m, :n_ff], gate_up[m, n_ff:]
        if silu:  # vectorized exp (simd.silu_times)
            silu_times(buf, gate, up)
        else:  # one branch-free loop: vectorizes
            for i in range(n_ff):
                g = max(gate[i], np.float32(0.0))
                buf[i] = g * g * up[i]
        ss = _sum_squares(buf)
        if not np.isfinite(ss):  # an inf / NaN input (absmax skips NaNs): _unscaled_row
            _unscaled_row(q, xscale, qsum, m)
            continue
        r = np.float32(1.0 / np.sqrt(ss / n_ff + eps))
        xscale[m], qsum[m] = _quantize_normed(q[m], buf, r, weight)
    return _scales_ok(xscale, m_rows)


@jit
def _unscaled_row(q, xscale, qsum, m):
    # a row with no int8 scale (its input not finite): zero values, zero sum, scale 0
    _zero_row(q, qsum, m)
    xscale[m] = np.float32(0.0)


@jit
def _scales_ok(xscale, m_rows):
    # every row has an int8 scale: 127 / max|x| > 0 and not NaN (a row with inf / NaN in its
    # input, or whose normed values overflow, has none; the caller refuses the pass).  What
    # the fused kernels return.
    for m in range(m_rows):
        if not xscale[m] > 0:
            return False
    return True


@pjit
def rope_neox(x, cos, sin):
    # x[M, H, D] rotated in place: pairs (i, i + n_rot/2) for i < n_rot/2; cos/sin[M, n_rot/2]
    m_rows, n_heads, _ = x.shape
    half = cos.shape[1]
    for m in prange(m_rows):
        for h in range(n_heads):
            for i in range(half):
                a = x[m, h, i]
                b = x[m, h, i + half]
                c = cos[m, i]
                s = sin[m, i]
                x[m, h, i] = a * c - b * s
                x[m, h, i + half] = a * s + b * c


def rope_tables(positions: np.ndarray, n_rot: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin[M, n_rot/2] for NEOX RoPE at the given absolute positions (float64 angles)."""
    inv_freq = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@jit
def add_inplace(x, y):
    # x[M, E] += y[M, E]
    m_rows, e = x.shape
    for m in range(m_rows):
        for i in range(e):
            x[m, i] += y[m, i]


@pjit
def argmax_confidence(tokens, conf, logits):
    # tokens[M], conf[M] <- argmax and its softmax probability per row of logits[M, V]
    m_rows, v = logits.shape
    for m in prange(m_rows):
        best = 0
        mx = logits[m, 0]
        for i in range(1, v):
            if logits[m, i] > mx:
                mx = logits[m, i]
                best = i
        s = 0.0
        for i in range(v):
            s += np.exp(np.float64(logits[m, i] - mx))
        tokens[m] = best
        conf[m] = np.float32(1.0 / s)
