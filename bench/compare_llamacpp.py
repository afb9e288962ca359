"""dlmnumba against llama.cpp on the same GGUF file, same prompt and settings, in one run.

    python bench/compare_llamacpp.py [--model FILE] [--iterations 10] [--lm-head exact|int8]

Prints, with the seed's report format for each:
  1. llama.cpp replaying the seed server's scheduling (bench/seed_replay.py) - the anchor;
  2. dlmnumba with seed-compatible settings (greedy, block 64, causal, kv_commit none);
  3. dlmnumba with correct settings (greedy, block 64, attention block, kv_commit normal);
  4. autoregressive decoding: llama.cpp (prefill + one token per llama_decode) and dlmnumba
     `--mode ar`, both timed over whole requests (prefill included);
and the tok/s ratios.  Default model: dlmnumba's built-in default (2B-4T shapes, arch bitnet).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from forward_pass import default_model  # noqa: E402
from llamacpp import LlamaCpp  # noqa: E402
from seed_replay import seed_replay  # noqa: E402



def llama_runs(lc: LlamaCpp, fn, iterations: int, warmup: int):
    """RequestStats of `iterations` timed calls of fn() -> (n_tokens, passes), and wall time."""
    from dlmnumba.decode.requests import RequestStats

    for _ in range(warmup):
        fn()
    stats, t0 = [], time.perf_counter()
    for _ in range(iterations):
        t = time.perf_counter()
        n, passes = fn()
        stats.append(RequestStats(generated_tokens=n, forward_passes=passes,
                                  latency_s=time.perf_counter() - t))
    return stats, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--ar-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm-head", choices=["exact", "int8"], default="exact")
    ap.add_argument("--prompt", default="What is the meaning of life?")
    args = ap.parse_args()

    import dlmnumba
    from dlmnumba import bench as B
    from dlmnumba.chat import seed_chat
    from dlmnumba import DecodeSettings, Generator

    path = args.model or default_model()
    m = dlmnumba.load_model(path, threads=args.threads, lm_head=args.lm_head)
    ids = m.tokenizer.encode(seed_chat(args.prompt))
    mask = m.spec.mask_id
    print(f"model {path}; prompt {len(ids)} tokens; max_tokens {args.max_tokens}; block "
          f"{args.block_size}; {args.threads} threads; dlmnumba kernel {m.kernel}, LM head "
          f"{args.lm_head}; {args.iterations} timed requests after {args.warmup} warm-up")

    lc = LlamaCpp(path, n_ctx=len(ids) + args.max_tokens + 2 * args.block_size + 64,
                  n_threads=args.threads, n_batch=max(len(ids), args.block_size + 1))

    def replay():
        out, passes = seed_replay(lc, ids, mask, args.block_size, args.max_tokens)
        return len(out), passes

    def llama_ar():
        lc.truncate(0)
        lc.set_causal(True)
        logits = lc.decode(ids, 0, logits_rows=[len(ids) - 1])
        for i in range(args.ar_tokens - 1):
            tok = int(logits[0].argmax())
            logits = lc.decode([tok], len(ids) + i, logits_rows=[0])
        return args.ar_tokens, args.ar_tokens

    results = {}

    def report(name, stats, wall, max_tokens):
        s = B.summarize(stats, wall, len(ids), max_tokens)
        results[name] = s
        print(f"\n--- {name} ---")
        print(B.format_report(s))
        print(f"({s.forward_passes_per_req:.2f} forward passes/request)")

    report("llama.cpp: seed scheduling replay",
           *llama_runs(lc, replay, args.iterations, args.warmup), args.max_tokens)
    report("llama.cpp: autoregressive",
           *llama_runs(lc, llama_ar, args.iterations, args.warmup), args.ar_tokens)
    lc.close()

    runs = {
        "dlmnumba: seed-compatible (greedy, causal, kv_commit none)":
            DecodeSettings(block_size=args.block_size, attention="causal", kv_commit="none",
                           max_tokens=args.max_tokens),
        "dlmnumba: correct (greedy, attention block, kv_commit normal)":
            DecodeSettings(block_size=args.block_size, max_tokens=args.max_tokens),
        "dlmnumba: autoregressive (--mode ar)":
            DecodeSettings(mode="ar", max_tokens=args.ar_tokens),
    }
    for name, settings in runs.items():
        # random weights: time the full budget, as llama.cpp does
        gen = Generator(m, dataclasses.replace(settings, ignore_eos=True))
        stats, wall = B.run_benchmark(gen, ids, args.iterations, args.warmup)
        report(name, stats, wall, settings.max_tokens)

    anchor = results["llama.cpp: seed scheduling replay"].tokens_per_s
    ar = results["llama.cpp: autoregressive"].tokens_per_s
    print("\n=== tok/s ratios (same run) ===")
    for name, s in results.items():
        base = ar if "autoregressive" in name else anchor
        print(f"{name:<66}{s.tokens_per_s:8.2f} tok/s  x{s.tokens_per_s / base:.2f}")


if __name__ == "__main__":
    main()
