"""Top-1 agreement and logit error of the int8 LM head against the exact (stored-type) head.

    python bench/lm_head_agreement.py [--model FILE] [--tokens 256]

The hidden states come from a real forward pass over a prompt plus random tokens; both heads
see the same hidden states.  With an F16 embedding, also the exact head's int8 screen (greedy
decoding's argmax): its agreement with the exact head (1 by construction), its time, and how
many rows per token it recomputed exactly.  Default model: dlmnumba's built-in default.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from forward_pass import default_model  # noqa: E402

from dlmnumba.model.weights import F16  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    import dlmnumba

    path = args.model or default_model()
    m = dlmnumba.load_model(path, lm_head="int8")
    ids = np.random.default_rng(0).integers(0, 1000, args.tokens).tolist()
    h = m.forward_hidden(ids, None, m.new_cache(len(ids)))
    t = time.perf_counter()
    q = m.project(h)
    t_int8 = time.perf_counter() - t
    exact = np.empty_like(q)
    t = time.perf_counter()
    m.weights.output.project(exact, h)
    t_exact = time.perf_counter() - t
    top1 = (q.argmax(1) == exact.argmax(1)).mean()
    rel = np.linalg.norm(q - exact) / np.linalg.norm(exact)
    top5 = np.mean([exact[i].argmax() in np.argsort(-q[i])[:5] for i in range(len(ids))])
    print(f"model {path}: {len(ids)} positions")
    print(f"int8 vs exact LM head: top-1 agreement {top1:.4f}, exact top-1 within int8 top-5 "
          f"{top5:.4f}, relative logit error {rel:.4f}")
    print(f"time for {len(ids)} rows: exact {t_exact * 1e3:.0f} ms, int8 {t_int8 * 1e3:.0f} ms")
    if m.weights.output.qtype == F16:
        tok, conf = np.empty(len(ids), np.int64), np.empty(len(ids), np.float32)
        m._screened_argmax(tok, conf, h, -1)  # compile
        t = time.perf_counter()
        m._screened_argmax(tok, conf, h, -1)
        t_screen = time.perf_counter() - t
        # the screen leaves exact logits in its scratch int8 logits (q) where it recomputed
        rescored = (m._scratch.approx[:len(ids)] != q).sum(1)
        agree = (tok == exact.argmax(1)).mean()
        print(f"int8-screened exact head: top-1 agreement with exact {agree:.4f}, "
              f"{t_screen * 1e3:.0f} ms, rows recomputed exactly per token: median "
              f"{np.median(rescored):.0f}, max {rescored.max()}")


if __name__ == "__main__":
    main()
