"""GMAC/s of the matmul kernels on BitNet 2B-4T's shapes, next to this chip's measured int8 peak.

    python bench/kernels.py [--threads N] [--kernel vnni512|vnni256|avx2|portable] [--quick]
    python bench/kernels.py --crossover [--ms 2,4,8,16,24,32,65]   # small vs block kernel

The matmul rows also give GB/s of packed weights read (from cache: one matrix again and again);
`--crossover` times the small-batch and the block kernel on 30 layers' gate|up and down
matrices (398 MB: from memory, as in a forward pass) at each M, next to the machine's read
bandwidth measured in the same run (a parallel sum over 1 GB): the numbers behind
kernels/ternary.py's SMALL_MAX_ROWS.

The peak is the matmul's own register tile (6 tokens x 4 weight vectors of vpdpbusd on the
vnni512 path) looping over L1-resident rows, one per thread, measured in the same run.  Medians
of several calls per shape.  LM head rows: the int8 head, the full exact F16 head, and the exact
head through the int8 screen (the argmax as greedy decoding runs it).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
from numba import prange

from dlmnumba.kernels.cpu import set_threads
from dlmnumba.kernels.dispatch import select_path, simd_path
from dlmnumba.kernels.lm_head import (LM_HEAD, LM_ROWS, TILE_PATH, interleave_rows,
                                      lm_head_exact_f16)
from dlmnumba.kernels.lm_screen import exact_argmax_screened
from dlmnumba.kernels.simd import bcast_tile
from dlmnumba.kernels.ternary import M_ALIGN, pack_codes, padded_k, ternary_matmul
from dlmnumba.model.weights import F16, Embedding, quantize_head

E, FF, KV, VOCAB = 2560, 6912, 640, 128256
SHAPES = [("q / o", E, E), ("k / v", E, KV), ("qkv fused", E, E + 2 * KV),
          ("gate / up", E, FF), ("gate|up fused", E, 2 * FF), ("down", FF, E)]
PEAK_K = 256  # k per row in the peak loop: 4 x 16 x 256 + 6 x 256 bytes stay in L1


@numba.njit(parallel=True, cache=True)
def _peak(path, n_vec, w, x, acc, reps):
    # every thread runs the 6-token tile `reps` times on its own L1-resident rows
    lit = numba.literally(path)
    nv = numba.literally(n_vec)
    for t in prange(acc.shape[0]):
        for _ in range(reps):
            bcast_tile(lit, 6, nv, 1, w[t].ctypes.data, w.shape[2], x[t].ctypes.data,
                       x.shape[2], PEAK_K // 4, acc[t].ctypes.data, acc.shape[2] * 4)


@numba.njit(cache=True)
def _peak_vnni512(w, x, acc, reps):
    _peak(0, 4, w, x, acc, reps)


@numba.njit(cache=True)
def _peak_vnni256(w, x, acc, reps):
    _peak(1, 1, w, x, acc, reps)


@numba.njit(cache=True)
def _peak_avx2(w, x, acc, reps):
    _peak(2, 1, w, x, acc, reps)


@numba.njit(cache=True)
def _peak_generic(w, x, acc, reps):
    _peak(3, 1, w, x, acc, reps)


PEAK = {"vnni512": (_peak_vnni512, 4), "vnni256": (_peak_vnni256, 1),
        "avx2": (_peak_avx2, 1), "portable": (_peak_generic, 1)}


def measure_peak(path: str, threads: int, seconds: float = 1.0) -> float:
    """int8 GMAC/s of the register-tile loop (the matmul's own tile) on L1-resident data,
    all threads."""
    fn, n_vec = PEAK[simd_path(path)]  # the VNNI tile ('amx' runs it below 8 tokens)
    w = np.ones((threads, n_vec, PEAK_K * 16), np.uint8)  # n_vec vectors of 16 columns
    x = np.ones((threads, 6, PEAK_K), np.int8)
    acc = np.zeros((threads, 6, 16 * n_vec), np.int32)
    fn(w, x, acc, 10)
    reps = 1000
    while True:
        t = time.perf_counter()
        fn(w, x, acc, reps)
        dt = time.perf_counter() - t
        if dt > seconds / 3:
            break
        reps *= 4
    best = dt
    for _ in range(2):
        t = time.perf_counter()
        fn(w, x, acc, reps)
        best = min(best, time.perf_counter() - t)
    return threads * reps * 6 * 16 * n_vec * PEAK_K / best / 1e9


@numba.njit(nogil=True, cache=True)
def _read_sum(a):
    # sum of a uint64 array [n, 8] in 8 independent lanes (vectorized): one thread's share
    acc = np.zeros(8, np.uint64)
    for i in range(a.shape[0]):
        for j in range(8):
            acc[j] += a[i, j]
    return acc.sum()


def read_bandwidth(threads: int, mb: int = 1024) -> float:
    """GB/s of a sum over `mb` MB split between `threads` Python threads (best of 5).  Each
    share runs in a plain nogil kernel: a prange loop with the reduction inside was not
    vectorized on the AMD EPYC and read 9 GB/s where this reads 34."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones((mb * (1 << 20) // 64, 8), np.uint64)
    shares = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        def run():
            return sum(pool.map(_read_sum, shares))
        run()
        return a.nbytes / min(timed_once(run) for _ in range(5)) / 1e9


def timed_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def crossover(path: str, threads: int, ms: list[int]) -> None:
    """Small-batch vs block kernel on 30 layers of gate|up and down, from memory."""
    from dlmnumba.kernels.ternary import matmul_kernel

    rng = np.random.default_rng(0)
    base = {(k, n): pack_codes(rng.integers(0, 3, (n, k), dtype=np.uint8))
            for k, n in ((E, 2 * FF), (FF, E))}
    mats = [(k, n, base[k, n].copy()) for _ in range(30) for k, n in base]
    total = sum(p.nbytes for _, _, p in mats)
    bw = read_bandwidth(threads)
    block = {"amx": "amx", "portable": "grouped"}.get(path, "block")
    print(f"{total / 1e6:.0f} MB of packed weights, read bandwidth {bw:.1f} GB/s; path {path}, "
          f"{threads} threads; ms per pass over all of them (GB/s)")
    print(f"{'M':>4}{'small':>18}{'block':>18}   picked")
    for m in ms:
        mp = -(-m // M_ALIGN) * M_ALIGN
        ops = {}
        for k in (E, FF):
            q = np.zeros((mp, padded_k(k)), np.int8)
            q[:m, :k] = rng.integers(-128, 128, (m, k))
            ops[k] = (q, q.astype(np.int32).sum(1).astype(np.int32))
        outs = {n: np.empty((m, n), np.float32) for n in (E, 2 * FF)}
        scales = {n: np.ones((n, 1), np.float32) for n in (E, 2 * FF)}
        xs = np.ones(m, np.float32)
        cells = []
        for kernel in ("small", block):
            def run():
                for k, n, p in mats:
                    ternary_matmul(outs[n], ops[k][0], ops[k][1], xs, p, scales[n], k, path,
                                   kernel)
            dt = timed(run, 5)
            cells.append(f"{dt * 1e3:8.1f} ({total / dt / 1e9:4.1f})")
        print(f"{m:>4}{cells[0]:>18}{cells[1]:>18}   {matmul_kernel(path, m)}")


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
    ap.add_argument("--crossover", action="store_true",
                    help="small-batch vs block kernel from memory, at --ms")
    ap.add_argument("--ms", default="2,4,8,16,24,32,65")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    path = select_path(args.kernel)
    if args.crossover:
        crossover(path, threads, [int(x) for x in args.ms.split(",")])
        return
    peak = measure_peak(path, threads)
    print(f"kernel path {path}, {threads} threads; measured int8 peak (register-only "
          f"{'vpdpbusd' if path.startswith('vnni') else path} tile): {peak:.1f} GMAC/s\n")
    rng = np.random.default_rng(0)
    ms = (1, 8, 65) if args.quick else (1, 2, 4, 8, 16, 32, 65)
    repeats = 3 if args.quick else 7
    print(f"{'matrix':<16}{'K':>6}{'N':>8}{'M':>5}{'ms':>10}{'GMAC/s':>9}{'% peak':>8}"
          f"{'GB/s':>8}")
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
            print(f"{name:<16}{k:>6}{n:>8}{m:>5}{dt * 1e3:>10.2f}{g:>9.1f}{100 * g / peak:>7.0f}%"
                  f"{packed.nbytes / dt / 1e9:>8.1f}")
    # LM head: int8 (VNNI) and exact F16, fused argmax as greedy decoding runs them
    rows = rng.integers(-127, 128, (-(-VOCAB // LM_ROWS) * LM_ROWS, E), dtype=np.int8)
    e_inv = np.ones(VOCAB, np.float32)
    e_sum = rows[:VOCAB].astype(np.int32).sum(1).astype(np.int32)
    e8 = interleave_rows(rows)
    del rows
    e16 = (rng.standard_normal((VOCAB, E), dtype=np.float32) * 0.02).astype(np.float16)
    # the exact head through the int8 screen (greedy decoding's default); random rows and
    # states: logits close together, hundreds of rows rescored per token (a trained model's
    # peaked logits leave fewer)
    head = quantize_head(Embedding(e16.reshape(-1).view(np.uint8), F16, VOCAB, E, "bench"))
    approx = np.empty((max(ms), VOCAB), np.float32)
    for m in ms:
        mp = -(-m // M_ALIGN) * M_ALIGN
        part = np.empty((-(-VOCAB // LM_ROWS), m, 3))
        u = rng.integers(0, 256, (mp, E), dtype=np.uint8)
        xs = np.ones(m, np.float32)
        none = np.empty((0, 0), np.float32)
        fn8 = LM_HEAD[TILE_PATH[simd_path(path)]]
        dt = timed(lambda: fn8(none, part, u, xs, e8, e_inv, e_sum, -1), repeats)
        g = m * E * VOCAB / dt / 1e9
        print(f"{'LM head int8':<16}{E:>6}{VOCAB:>8}{m:>5}{dt * 1e3:>10.2f}{g:>9.1f}"
              f"{100 * g / peak:>7.0f}%")
        h = rng.standard_normal((-(-m // 4) * 4, E), dtype=np.float32)
        dt = timed(lambda: lm_head_exact_f16(none, part, h, e16.view(np.uint16), -1), repeats)
        g = m * E * VOCAB / dt / 1e9
        print(f"{'LM head F16':<16}{E:>6}{VOCAB:>8}{m:>5}{dt * 1e3:>10.2f}{g:>9.1f}"
              f"{'(f32)':>8}")
        tok, conf = np.empty(m, np.int64), np.empty(m, np.float32)
        dt = timed(lambda: exact_argmax_screened(
            tok, conf, h[:m], e16.view(np.uint16), head.e8, head.e_inv, head.e_sum, head.err_h,
            head.norm8, TILE_PATH[simd_path(path)], approx[:m], -1), repeats)
        print(f"{'F16 screened':<16}{E:>6}{VOCAB:>8}{m:>5}{dt * 1e3:>10.2f}")


if __name__ == "__main__":
    main()
