"""Thread scaling on a many-core machine: the 2B-4T `bench` at 1, 2, 4, 8, 16 threads, and
batched `ar` throughput at the same thread counts, in one run.

    python bench/threads.py                         # built-in 2B-4T-shaped model
    python bench/threads.py --threads 1,2,4,8,16 --iterations 3 --json out.json

For each thread count: greedy block decoding (block 64, block attention, kv_commit normal, 128
tokens: the `dlmnumba bench` default) and the seed-compatible scheduling (greedy, causal,
kv_commit none), `--iterations` timed requests after one warm-up each; `ar` (32 tokens) one
request alone and 8 together.  tok/s = generated tokens / wall time.  Random weights: stop
tokens ignored, every request runs its budget.  The seed's headline for comparison: 120.67
tok/s for its greedy block-64 scheduling on a 16-core c3d-standard-32 at 8 threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forward_pass import default_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=600.0,
                    help="stop starting new measurements after this many seconds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import numpy as np

    import dlmnumba
    from dlmnumba import DecodeSettings, Generator
    from dlmnumba.bench import environment_info

    t_start = time.perf_counter()
    path = args.model or default_model()
    counts = [int(t) for t in args.threads.split(",")]
    m = dlmnumba.load_model(path, threads=max(counts))
    prompt = m.tokenizer.encode("USER: What is the meaning of life?<|eot_id|>ASSISTANT:")
    rng = np.random.default_rng(0)
    prompts8 = [rng.integers(0, m.spec.n_vocab - 1, 24).tolist() for _ in range(8)]
    runs = {
        "greedy block 64 (correct)": DecodeSettings(block_size=64, max_tokens=128),
        "seed-compatible (greedy, causal, kv_commit none)":
            DecodeSettings(block_size=64, attention="causal", kv_commit="none", max_tokens=128),
        "ar": DecodeSettings(mode="ar", max_tokens=32),
    }
    rows = []
    print(f"model {path}; cpu cores {os.cpu_count()}; kernel {m.kernel}", flush=True)
    print(f"{'threads':>7}  {'setting':<52}{'tok/s':>9}  {'p50 latency s':>14}", flush=True)
    for t in counts:
        if time.perf_counter() - t_start > args.time_limit:
            print(f"time limit reached before {t} threads", flush=True)
            break
        m.threads = t
        for name, settings in runs.items():
            gen = Generator(m, dataclasses.replace(settings, ignore_eos=True))
            gen.generate(prompt)  # warm-up (JIT compile on the first count)
            lat = []
            t0 = time.perf_counter()
            for _ in range(args.iterations):
                lat.append(gen.generate(prompt).stats.latency_s)
            wall = time.perf_counter() - t0
            tps = args.iterations * settings.max_tokens / wall
            rows.append({"threads": t, "setting": name, "tok_s": tps,
                         "latency_p50_s": statistics.median(lat)})
            print(f"{t:>7}  {name:<52}{tps:>9.2f}  {statistics.median(lat):>14.3f}", flush=True)
        gen = Generator(m, dataclasses.replace(runs["ar"], ignore_eos=True))
        gen.generate_many(prompts8[:2])
        t0 = time.perf_counter()
        gen.generate_many(prompts8)
        tps = 8 * 32 / (time.perf_counter() - t0)
        rows.append({"threads": t, "setting": "ar, 8 sequences together", "tok_s": tps})
        print(f"{t:>7}  {'ar, 8 sequences together':<52}{tps:>9.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "environment": environment_info(),
                                         "model": path}, indent=2))


if __name__ == "__main__":
    main()
