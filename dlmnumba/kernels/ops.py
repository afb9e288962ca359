"""Elementwise and row-wise kernels of the transformer: norms, activation quantization, RoPE,
activations, LM-head reduction.  Free functions over arrays, output argument first."""
from __future__ import annotations

import numpy as np
from numba import prange

from .cpu import jit, pjit

QMAX = 127.0
QMIN = -128.0
ABSMAX_FLOOR = 1e-5  # BitNet's floor on max|x| so an all-zero row does not divide by zero


@pjit
def rmsnorm(out, x, weight, eps):
    # out[M, E] = x[M, E] / sqrt(mean(x^2) + eps) * weight[E]
    m_rows, e = x.shape
    for m in prange(m_rows):
        ss = 0.0
        for i in range(e):
            v = np.float64(x[m, i])
            ss += v * v
        r = np.float32(1.0 / np.sqrt(ss / e + eps))
        for i in range(e):
            out[m, i] = x[m, i] * r * weight[i]


@pjit
def quantize_rows(q, xscale, qsum, x):
    # q[Mp, Kp] int8, xscale[M], qsum[Mp] <- x[M, K]: per-row absmax int8 (BitNet BitLinear)
    # s = 127 / max(|x|, 1e-5); q = clamp(round_half_even(x * s), -128, 127); qsum = sum q.
    # Padding (columns K.., rows M..) is zero.
    m_rows, k = x.shape
    mp, kp = q.shape
    for m in prange(mp):
        if m >= m_rows:
            q[m, :] = 0
            qsum[m] = 0
            continue
        amax = np.float32(ABSMAX_FLOOR)
        for i in range(k):
            a = abs(x[m, i])
            if a > amax:
                amax = a
        s = np.float32(QMAX) / amax
        xscale[m] = s
        total = 0
        for i in range(k):
            v = np.int32(min(max(np.rint(x[m, i] * s), QMIN), QMAX))
            q[m, i] = v
            total += v
        qsum[m] = total
        for i in range(k, kp):
            q[m, i] = 0


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


@pjit
def relu2_mul(out, gate_up, n_ff):
    # out[M, F] = relu(gate)^2 * up, gate_up[M, 2F] = [gate | up]
    m_rows = out.shape[0]
    for m in prange(m_rows):
        for i in range(n_ff):
            g = max(gate_up[m, i], np.float32(0.0))
            out[m, i] = g * g * gate_up[m, n_ff + i]


@pjit
def silu_mul(out, gate_up, n_ff):
    # out[M, F] = silu(gate) * up, gate_up[M, 2F] = [gate | up]
    m_rows = out.shape[0]
    for m in prange(m_rows):
        for i in range(n_ff):
            g = gate_up[m, i]
            out[m, i] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[m, n_ff + i]


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
