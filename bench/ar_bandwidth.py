"""How close one `ar` request's decode steps come to the memory-bandwidth limit, in one run.

    python bench/ar_bandwidth.py [--model FILE] [--threads 2] [--tokens 64] [--repeats 5]
                                 [--prompt-len 24] [--lm-head exact|int8]

A token of `ar` decoding must read every ternary weight once (the packed 2-bit codes and their
scales) and the LM head's int8 screen (the exact head rescores a few hundred F16 rows beside
it); everything else a step touches (norms, the KV cache, activations) is small next to them.
This bench times whole requests as a user runs them (Generator, `--mode ar`, greedy, stop
tokens ignored: random weights), a short and a long one on the same prompt, and takes the
difference per token, so prefill and the request's setup cancel; it measures the machine's read
bandwidth in the same run (bench/kernels.py's parallel sum over 1 GB, before the requests and
after each round of them: on a shared machine it drifts by a third within minutes) and
prints bytes per token / time per token against it: the issue-25 target is >= 85%.  Medians of
`--repeats` alternating runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_pass import default_model  # noqa: E402
from kernels import read_bandwidth  # noqa: E402


def weight_bytes(m) -> dict[str, int]:
    """Bytes a single `ar` token must read, by part."""
    ternary = sum(t.packed.nbytes + t.scales.nbytes for layer in m.weights.layers
                  for t in (layer.qkv, layer.o, layer.gate_up, layer.down))
    norms = sum(getattr(layer, f).nbytes for layer in m.weights.layers
                for f in ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm"))
    head8 = getattr(m.head, "head8", None)
    if head8 is not None:  # the int8 rows (the screen of the exact head, or the int8 head)
        head = head8.e8.nbytes + head8.e_inv.nbytes + head8.e_sum.nbytes
    else:  # a dense head reads its embedding as stored
        head = m.weights.output.raw.nbytes
    return {"ternary": ternary, "norms": norms, "LM head": head}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the built-in 2B-4T-shaped model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=64, help="extra tokens of the long request")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lm-head", choices=["exact", "int8"], default="exact")
    args = ap.parse_args()

    import numpy as np

    import dlmnumba
    from dlmnumba import DecodeSettings, Generator
    from dlmnumba.bench import environment_info

    path = args.model or default_model()
    m = dlmnumba.load_model(path, threads=args.threads, lm_head=args.lm_head)
    prompt = np.random.default_rng(0).integers(0, m.spec.n_vocab - 1, args.prompt_len).tolist()
    short, long_ = 8, 8 + args.tokens
    gens = {n: Generator(m, DecodeSettings(mode="ar", max_tokens=n, ignore_eos=True))
            for n in (short, long_)}
    for g in gens.values():  # JIT compile and warm up, untimed
        g.generate(prompt)
    bws = [read_bandwidth(args.threads)]
    times = {n: [] for n in gens}
    for _ in range(args.repeats):  # the bandwidth between rounds: a shared machine's drifts
        for n, g in gens.items():
            t = time.perf_counter()
            out = g.generate(prompt)
            times[n].append(time.perf_counter() - t)
            if len(out.tokens) != n:
                raise SystemExit(f"a request of max_tokens {n} generated {len(out.tokens)}")
        bws.append(read_bandwidth(args.threads))
    per_token = (statistics.median(times[long_]) - statistics.median(times[short])) / args.tokens
    if per_token <= 0:
        raise SystemExit(f"the {long_}-token requests took no longer than the {short}-token ones: "
                         "the machine is too noisy for this measurement; run it again")
    parts = weight_bytes(m)
    total = sum(parts.values())
    bw = statistics.median(bws)
    env = environment_info()
    print(f"model {path}; {m.threads} threads, kernel {m.kernel}, LM head {m.head.describe()}; "
          f"CPU {env['cpu_model']}")
    print("bytes per token: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in parts.items())
          + f"; total {total / 1e6:.0f} MB")
    print(f"read bandwidth {bw:.1f} GB/s (median of {len(bws)}, {min(bws):.1f}-{max(bws):.1f}); "
          f"requests of {short} and {long_} tokens: {statistics.median(times[short]):.3f} s / "
          f"{statistics.median(times[long_]):.3f} s (median of {args.repeats})")
    print(f"ar decode: {per_token * 1e3:.1f} ms per token ({1 / per_token:.1f} tok/s), "
          f"{total / per_token / 1e9:.1f} GB/s = {total / per_token / 1e9 / bw:.0%} of the read "
          f"bandwidth (target >= 85%); the weights alone at the read bandwidth: "
          f"{total / bw / 1e6:.1f} ms per token")


if __name__ == "__main__":
    main()
