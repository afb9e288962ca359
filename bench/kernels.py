"""GMAC/s of the matmul kernels on BitNet 2B-4T's shapes, next to this chip's measured int8 peak.

    python bench/kernels.py [--threads N] [--kernel vnni512|vnni256|avx2|portable] [--quick]

The peak is a register-only VNNI loop (the 4 x 4 dot-product tile on L1-resident rows, one
per thread) measured in the same run.  Medians of several calls per shape.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
from numba import prange

from dlmnumba.kernels.cpu import set_threads
from dlmnumba.kernels.dispatch import select_path
from dlmnumba.kernels.lm_head import LM_HEAD, LM_ROWS, TILE_PATH, lm_head_exact_f16
from dlmnumba.kernels.simd import TILE, dot_tile
from dlmnumba.kernels.ternary import M_ALIGN, pack_codes, padded_k, ternary_matmul

E, FF, KV, VOCAB = 2560, 6912, 640, 128256
SHAPES = [("q / o", E, E), ("k / v", E, KV), ("qkv fused", E, E + 2 * KV),
          ("gate / up", E, FF), ("gate|up fused", E, 2 * FF), ("down", FF, E)]
PEAK_K = 1024  # bytes per row in the peak loop: 8 rows x 1 KiB stay in L1


@numba.njit(parallel=True, cache=True)
def _peak(path, u, s, acc, reps):
    # every thread runs the tile `reps` times on its own L1-resident rows
    lit = numba.literally(path)
    for t in prange(acc.shape[0]):
        for _ in range(reps):
            dot_tile(lit, u[t].ctypes.data, u.shape[2], s[t].ctypes.data, s.shape[2],
                     u.shape[2] // 64, acc[t].ctypes.data, 0)


@numba.njit(cache=True)
def _peak_vnni512(u, s, acc, reps):
    _peak(0, u, s, acc, reps)


@numba.njit(cache=True)
def _peak_vnni256(u, s, acc, reps):
    _peak(1, u, s, acc, reps)


@numba.njit(cache=True)
def _peak_avx2(u, s, acc, reps):
    _peak(2, u, s, acc, reps)


@numba.njit(cache=True)
def _peak_generic(u, s, acc, reps):
    _peak(3, u, s, acc, reps)


PEAK = {"vnni512": _peak_vnni512, "vnni256": _peak_vnni256, "avx2": _peak_avx2,
        "portable": _peak_generic}


def measure_peak(path: str, threads: int, seconds: float = 1.0) -> float:
    """int8 GMAC/s of the register-only tile loop on all threads."""
    u = np.ones((threads, TILE, PEAK_K), np.uint8)
    s = np.ones((threads, TILE, PEAK_K), np.int8)
    acc = np.zeros((threads, 16, 16), np.int32)
    PEAK[path](u, s, acc, 10)
    reps = 1000
    while True:
        t = time.perf_counter()
        PEAK[path](u, s, acc, reps)
        dt = time.perf_counter() - t
        if dt > seconds / 3:
            break
        reps *= 4
    best = dt
    for _ in range(2):
        t = time.perf_counter()
        PEAK[path](u, s, acc, reps)
        best = min(best, time.perf_counter() - t)
    return threads * reps * TILE * TILE * PEAK_K / best / 1e9


def timed(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    path = select_path(args.kernel)
    peak = measure_peak(path, threads)
    print(f"kernel path {path}, {threads} threads; measured int8 peak (register-only "
          f"{'vpdpbusd' if path.startswith('vnni') else path} tile): {peak:.1f} GMAC/s\n")
    rng = np.random.default_rng(0)
    ms = (1, 65) if args.quick else (1, 20, 65, 128)
    repeats = 3 if args.quick else 7
    print(f"{'matrix':<16}{'K':>6}{'N':>8}{'M':>5}{'ms':>10}{'GMAC/s':>9}{'% peak':>8}")
    for name, k, n in (SHAPES[2:3] + SHAPES[4:] if args.quick else SHAPES):
        packed = pack_codes(rng.integers(0, 3, (n, k), dtype=np.uint8))
        scales = np.ones((n, 1), np.float32)
        for m in ms:
            mp = -(-m // M_ALIGN) * M_ALIGN
            q = np.zeros((mp, padded_k(k)), np.int8)
            q[:m, :k] = rng.integers(-128, 128, (m, k))
            qsum = q.astype(np.int32).sum(1).astype(np.int32)
            out = np.empty((m, n), np.float32)
            xs = np.ones(m, np.float32)
            dt = timed(lambda: ternary_matmul(out, q, qsum, xs, packed, scales, padded_k(k),
                                              path), repeats)
            g = m * k * n / dt / 1e9
            print(f"{name:<16}{k:>6}{n:>8}{m:>5}{dt * 1e3:>10.2f}{g:>9.1f}{100 * g / peak:>7.0f}%")
    # LM head: int8 (VNNI) and exact F16, fused argmax as greedy decoding runs them
    e8 = rng.integers(-127, 128, (-(-VOCAB // 4) * 4, E), dtype=np.int8)
    e_inv = np.ones(VOCAB, np.float32)
    e_sum = e8[:VOCAB].astype(np.int32).sum(1).astype(np.int32)
    e16 = (rng.standard_normal((VOCAB, E), dtype=np.float32) * 0.02).astype(np.float16)
    for m in ms:
        mp = -(-m // M_ALIGN) * M_ALIGN
        part = np.empty((-(-VOCAB // LM_ROWS), m, 3))
        u = rng.integers(0, 256, (mp, E), dtype=np.uint8)
        xs = np.ones(m, np.float32)
        none = np.empty((0, 0), np.float32)
        fn8 = LM_HEAD[TILE_PATH[path]]
        dt = timed(lambda: fn8(none, part, u, xs, e8, e_inv, e_sum, -1), repeats)
        g = m * E * VOCAB / dt / 1e9
        print(f"{'LM head int8':<16}{E:>6}{VOCAB:>8}{m:>5}{dt * 1e3:>10.2f}{g:>9.1f}"
              f"{100 * g / peak:>7.0f}%")
        h = rng.standard_normal((mp, E), dtype=np.float32)
        dt = timed(lambda: lm_head_exact_f16(none, part, h, e16.view(np.uint16), -1), repeats)
        g = m * E * VOCAB / dt / 1e9
        print(f"{'LM head F16':<16}{E:>6}{VOCAB:>8}{m:>5}{dt * 1e3:>10.2f}{g:>9.1f}"
              f"{'(f32)':>8}")


if __name__ == "__main__":
    main()
