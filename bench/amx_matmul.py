"""The ternary matmul on AMX tiles vs the VNNI tiles, by token count, one run.

    python bench/amx_matmul.py [--threads 2] [--k 2560 --n 13824]   # the 2B-4T gate+up shape

Times `ternary_matmul` on path 'vnni512' and on the AMX kernel itself (below
ternary.AMX_MIN_ROWS the 'amx' path runs the VNNI tiles) for M = 1 .. 64 tokens, median of
--repeats; both give the same integers (tests/test_kernels.py).  Needs a CPU with AMX-INT8.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=2560)
    ap.add_argument("--n", type=int, default=13824)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    import numba

    from dlmnumba.kernels.amx import amx_usable, whole_tiles
    from dlmnumba.kernels.ternary import (M_ALIGN, pack_codes, padded_k, ternary_matmul,
                                          ternary_matmul_amx)
    if not amx_usable():
        raise SystemExit("this CPU (or OS) offers no AMX-INT8 tiles")
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    k, n = args.k, args.n
    packed = pack_codes(rng.integers(0, 3, (n, k), dtype=np.uint8))
    kp = padded_k(k)
    scales = np.ones((n, 1), np.float32)

    def median_ms(fn):
        fn()
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    print(f"{n} x {k} ternary ({packed.nbytes / 1e6:.1f} MB packed), {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'tokens':>6} {'vnni512 ms':>11} {'amx ms':>8} {'vnni/amx':>9}")
    for m in (1, 2, 6, 9, 12, 16, 32, 64):
        mp = -(-m // M_ALIGN) * M_ALIGN
        q = np.zeros((mp, kp), np.int8)
        q[:m, :k] = rng.integers(-128, 128, (m, k))
        q16 = whole_tiles(q, 0)
        qsum = q.astype(np.int32).sum(1).astype(np.int32)
        xs = np.ones(m, np.float32)
        out = np.empty((m, n), np.float32)
        vnni = median_ms(lambda: ternary_matmul(out, q, qsum, xs, packed, scales, kp, "vnni512"))
        if m == 1:  # one token: the mat-vec on every path
            print(f"{m:>6} {vnni:>11.2f} {'-':>8} {'-':>9}")
            continue
        amx = median_ms(lambda: ternary_matmul_amx(out, q16, qsum, xs, packed, scales,
                                                   args.threads))
        print(f"{m:>6} {vnni:>11.2f} {amx:>8.2f} {vnni / amx:>8.2f}x")


if __name__ == "__main__":
    main()
