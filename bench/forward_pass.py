"""Load time, resident memory and the time of one block forward (65 tokens after a 20-token
prefix) for dlmnumba and llama.cpp on the same GGUF file, in one run.

    python bench/forward_pass.py [--model FILE] [--threads 2] [--repeats 5]

Without --model it uses dlmnumba's built-in default model (a synthetic `bitnet-2b4t` with arch
`bitnet` and TQ2_0 weights, which both engines load), writing it once to the user cache.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    """Current resident set size of this process."""
    from dlmnumba.bench import process_memory_mib

    return process_memory_mib()[0]


def default_model() -> str:
    """The built-in default model (2B-4T shapes, TQ2_0), written once to the user cache."""
    from dlmnumba.model_source import resolve_model_path

    return str(resolve_model_path(None, "bench", progress=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=20)
    ap.add_argument("--batch", type=int, default=65)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    path = args.model or default_model()
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 1000, args.prefix).tolist()
    batch = rng.integers(0, 1000, args.batch).tolist()
    print(f"model {path} ({os.path.getsize(path) / 2**20:.0f} MiB), threads {args.threads}, "
          f"prefix {args.prefix}, batch {args.batch}, median of {args.repeats}")

    import dlmnumba

    r0 = rss_mib()
    t = time.perf_counter()
    m = dlmnumba.load_model(path, threads=args.threads)
    load = time.perf_counter() - t
    rss = rss_mib() - r0
    cache = m.new_cache(args.prefix + args.batch)
    m.forward(prefix, None, cache)
    times = []
    for i in range(args.repeats + 1):  # the first run compiles / warms up
        cache.truncate(args.prefix)
        t = time.perf_counter()
        m.forward(batch, None, cache, attention="block", block_size=args.batch)
        times.append(time.perf_counter() - t)
    ours = statistics.median(times[1:])
    print(f"dlmnumba : load {load:6.2f} s, +RSS {rss:6.0f} MiB, forward {ours * 1e3:8.1f} ms")
    del m, cache

    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp import LlamaCpp

    r0 = rss_mib()
    t = time.perf_counter()
    lc = LlamaCpp(path, n_ctx=256, n_threads=args.threads, n_batch=128)
    load_l = time.perf_counter() - t
    lc.decode(prefix, 0)
    rss_l = rss_mib() - r0
    times = []
    for i in range(args.repeats + 1):
        lc.truncate(args.prefix)
        t = time.perf_counter()
        lc.decode(batch, args.prefix, logits_rows="all")
        times.append(time.perf_counter() - t)
    theirs = statistics.median(times[1:])
    lc.close()
    print(f"llama.cpp: load {load_l:6.2f} s, +RSS {rss_l:6.0f} MiB, forward {theirs * 1e3:8.1f} ms")
    print(f"forward time ratio llama.cpp / dlmnumba: {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
