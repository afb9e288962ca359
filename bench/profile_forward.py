"""Where one forward pass spends its time: matmuls, LM head, attention, the rest.

    python bench/profile_forward.py [--model FILE] [--batch 65] [--prefix 20] [--lm-head exact]
                                    [--exact-confidence]
    python bench/profile_forward.py --sequences 1,8,16 [--prefix 100]   # ar decode steps

Profiles (cProfile: every numba kernel call is one Python-level call) one block forward of
`batch` tokens after a `prefix`, including the fused LM head over every row, as greedy
decoding runs it (the exact head through the int8 screen; --exact-confidence: the full exact
head, as the iterative and adaptive modes run it), and groups the time by kernel family.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from forward_pass import default_model  # noqa: E402

GROUPS = {  # substring of the profiled function's file:name -> family
    "ternary": "ternary matmul", "lm_head": "LM head", "attention": "attention",
    "act_rmsnorm_quantize": "activation + sub-norm + int8 (fused)",
    "rmsnorm_quantize": "residual + norm + int8 (fused)", "rmsnorm": "norms",
    "quantize": "activation quantization", "rope": "RoPE", "add_inplace": "residual",
    "lookup": "embedding lookup", "combine": "LM head", "screen": "LM head",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, default=65)
    ap.add_argument("--prefix", type=int, default=20)
    ap.add_argument("--lm-head", default="exact")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--exact-confidence", action="store_true")
    ap.add_argument("--sequences", help="comma-separated N: an ar step of N sequences each")
    args = ap.parse_args()
    import dlmnumba

    m = dlmnumba.load_model(args.model or default_model(), threads=args.threads,
                            lm_head=args.lm_head)
    rng = np.random.default_rng(0)
    if args.sequences:
        for n in (int(x) for x in args.sequences.split(",")):
            decode_step(m, n, args.prefix, rng)
        return
    prefix = rng.integers(0, 1000, args.prefix).tolist()
    batch = rng.integers(0, 1000, args.batch).tolist()
    cache = m.new_cache(args.prefix + args.batch)
    m.forward_hidden(prefix, None, cache, rows=[])

    def step():
        cache.truncate(args.prefix)
        m.forward_argmax(batch, None, cache, "block", max(64, args.batch),
                         exact_confidence=args.exact_confidence)

    wall, fam = profile(step)
    head = args.lm_head + (", full" if args.exact_confidence else "")
    print(f"one forward of {args.batch} tokens after {args.prefix} (kernel {m.kernel}, LM head "
          f"{head}, {m.threads} threads): {wall * 1e3:.1f} ms wall")
    report(fam)


def decode_step(m, n: int, prefix: int, rng) -> None:
    """Profile one ar step of n sequences (one token each, own caches of `prefix` tokens)."""
    from dlmnumba.model.batch import CAUSAL_MASK, Output, Segment

    caches = []
    for _ in range(n):
        c = m.new_cache(prefix + 1)
        m.forward_hidden(rng.integers(0, 1000, prefix).tolist(), None, c, rows=[])
        caches.append(c)

    def step():
        for c in caches:
            c.truncate(prefix)
        m.forward_batch([Segment([int(rng.integers(0, 1000))], c, None, CAUSAL_MASK, [0],
                                 Output.ARGMAX, m.spec.mask_id) for c in caches])

    wall, fam = profile(step)
    print(f"one ar step of {n} sequences after {prefix} tokens each (kernel {m.kernel}, "
          f"{m.threads} threads): {wall * 1e3:.1f} ms wall, {wall * 1e3 / n:.1f} ms per sequence")
    report(fam)


def profile(step) -> tuple[float, dict[str, float]]:
    """(wall seconds of one step, seconds per kernel family of another, profiled)."""
    step()  # compile / warm
    t = time.perf_counter()
    step()
    wall = time.perf_counter() - t
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    stats = pstats.Stats(prof)
    fam: dict[str, float] = {}
    for (file, _, name), (_, _, tottime, _, _) in stats.stats.items():
        key = next((g for sub, g in GROUPS.items() if sub in name or sub in file), "other")
        fam[key] = fam.get(key, 0.0) + tottime
    return wall, fam


def report(fam: dict[str, float]) -> None:
    total = sum(fam.values())
    for k, v in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<26}{v * 1e3:9.1f} ms  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
