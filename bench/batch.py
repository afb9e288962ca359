"""Many sequences decoded together vs the same sequences one after another, in one run.

    python bench/batch.py                       # built-in 2B-4T-shaped model, 2 threads
    python bench/batch.py --ns 1,2,4,8,16 --modes ar,greedy,iterative --json out.json
    python bench/batch.py --model m.gguf --quick

For each decode mode and each N: N different prompts (random token ids, `--prompt-len` each)
decoded one after another (`Generator.generate`), then the same N decoded together
(`Generator.generate_many`: one forward pass per step over every unfinished sequence).  Both
runs produce the same tokens (checked here too: a batched result that differs is an error).
Reported: aggregate generated tok/s of each, their ratio, for `ar` the ratio of the decode
steps alone ("decode x": each request's time after its first token, so the prefill passes,
which cost the same either way once the prompt tokens fill the int8 units, are left out; the
diffusion modes commit their one block at the end, so they have none), and each sequence's
latency (p50 / max; together, every sequence starts at once, so its latency includes waiting for
the others' rows in each pass).  Random weights: stop tokens are ignored, every sequence runs
its budget.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forward_pass import default_model  # noqa: E402

MODES = {  # name -> (DecodeSettings keyword arguments, max_tokens)
    "ar": (dict(mode="ar"), 32),
    "greedy": (dict(mode="greedy", block_size=64, attention="block", kv_commit="normal"), 64),
    "iterative": (dict(mode="iterative", block_size=32, small_block_size=8, threshold=0.9), 16),
}


def measure(gen, prompts, together: bool
            ) -> tuple[float, list[float], list[list[int]], float]:
    """Wall time, per-sequence latencies, tokens of decoding `prompts`, and the time spent in
    decode steps (after the first token: one after another the sum of each request's, together
    from the last first token to the end)."""
    t0 = time.perf_counter()
    if together:
        outs = gen.generate_many(prompts)
    else:
        outs = [gen.generate(p) for p in prompts]
    wall = time.perf_counter() - t0
    if not together:  # one after another: a sequence waits for those before it
        done, lat = 0.0, []
        for o in outs:
            done += o.stats.latency_s
            lat.append(done)
        decode = sum(o.stats.latency_s - o.stats.ttft_s for o in outs)
    else:
        lat = [o.stats.latency_s for o in outs]
        decode = max(lat) - max(o.stats.ttft_s for o in outs)
    return wall, lat, [o.tokens for o in outs], decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF file (default: the built-in 2B-4T-shaped model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ns", default="1,2,4,8,16", help="sequence counts")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--lm-head", choices=["exact", "int8"], default="exact")
    ap.add_argument("--quick", action="store_true", help="N = 1, 4 and a quarter of the tokens")
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    args = ap.parse_args()

    import numpy as np

    import dlmnumba
    from dlmnumba import DecodeSettings, Generator
    from dlmnumba.bench import environment_info

    ns = [1, 4] if args.quick else [int(n) for n in args.ns.split(",")]
    path = args.model or default_model()
    m = dlmnumba.load_model(path, threads=args.threads, lm_head=args.lm_head)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, m.spec.n_vocab - 1, args.prompt_len).tolist()
               for _ in range(max(ns))]
    print(f"model {path}; {m.threads} threads, kernel {m.kernel}, LM head {args.lm_head}; "
          f"prompts of {args.prompt_len} tokens")
    rows = []
    header = (f"{'mode':<10}{'N':>4}{'tokens':>8}  {'one by one tok/s':>17}{'together tok/s':>16}"
              f"{'ratio':>8}{'decode x':>10}  {'latency p50 / max (s): one by one':>34}"
              f"{'together':>18}")
    print(header)
    for name in args.modes.split(","):
        kw, max_tokens = MODES[name]
        if args.quick:
            max_tokens = max(4, max_tokens // 4)
        # random weights: every sequence runs its whole budget
        gen = Generator(m, DecodeSettings(max_tokens=max_tokens, ignore_eos=True, **kw))
        gen.generate(prompts[0])  # JIT compile and warm-up, untimed
        # every N's passes once, on a short budget: a kernel first used at some M (the block
        # kernel past SMALL_MAX_ROWS prompt tokens) compiles or loads here, not in a timed run
        warm = Generator(m, DecodeSettings(max_tokens=2, ignore_eos=True, **kw))
        for n in ns:
            warm.generate_many(prompts[:n])
        for n in ns:
            ps = prompts[:n]
            wall_1, lat_1, tok_1, dec_1 = measure(gen, ps, together=False)
            wall_n, lat_n, tok_n, dec_n = measure(gen, ps, together=True)
            if tok_1 != tok_n:
                raise SystemExit(f"{name} N={n}: batched tokens differ from one-at-a-time")
            gen_tokens = n * max_tokens
            r = {"mode": name, "n": n, "max_tokens": max_tokens,
                 "tok_s_one_by_one": gen_tokens / wall_1, "tok_s_together": gen_tokens / wall_n,
                 "ratio": wall_1 / wall_n,
                 "decode_ratio": dec_1 / dec_n if name == "ar" and dec_n > 0 else None,
                 "latency_one_by_one_p50_s": statistics.median(lat_1),
                 "latency_one_by_one_max_s": max(lat_1),
                 "latency_together_p50_s": statistics.median(lat_n),
                 "latency_together_max_s": max(lat_n)}
            rows.append(r)
            decode = "-" if r["decode_ratio"] is None else f"{r['decode_ratio']:.2f}x"
            print(f"{name:<10}{n:>4}{max_tokens:>8}  {r['tok_s_one_by_one']:>17.2f}"
                  f"{r['tok_s_together']:>16.2f}{r['ratio']:>7.2f}x{decode:>10}  "
                  f"{r['latency_one_by_one_p50_s']:>25.2f} / {r['latency_one_by_one_max_s']:<6.2f}"
                  f"{r['latency_together_p50_s']:>11.2f} / {r['latency_together_max_s']:<6.2f}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "environment": environment_info(),
                                         "model": path, "threads": m.threads}, indent=2))


if __name__ == "__main__":
    main()
