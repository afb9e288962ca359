#!/usr/bin/env python3
"""Does the screened confidence make the same commit decisions as the exact one?

    python scripts/confidence_agreement.py -n 100

The screened confidence (`--confidence screened`) exists for F16 embeddings (the int8 screen
rescores only the rows that can win), so the bundled toy model (F32 embedding) gets an LM head
over its embedding rounded to F16; then every held-out example is decoded with the exact and
with the screened confidence, for iterative and adaptive at several thresholds, with and
without the dual cache.  Reported per setting: examples whose generated tokens and forward-pass
counts are identical, and the accuracy of each.  Identical tokens and pass counts mean every
commit decision was the same.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = [
    ("iterative 0.5, block 32 / 8", dict(mode="iterative", block_size=32, threshold=0.5)),
    ("iterative 0.7, block 32 / 8", dict(mode="iterative", block_size=32, threshold=0.7)),
    ("iterative 0.9, block 32 / 8", dict(mode="iterative", block_size=32, threshold=0.9)),
    ("adaptive 0.9, block 32 / 8", dict(mode="adaptive", block_size=32, threshold=0.9)),
]


def with_f16_head(m) -> None:
    """Give the loaded model an LM head over its embedding rounded to F16 (the exact F16 head
    with its int8 screen, as a BitNet 2B-4T file has); the input embedding stays as stored."""
    import numpy as np

    from dlmnumba.model.heads import make_head
    from dlmnumba.model.weights import F16, Embedding

    src = m.weights.output
    e16 = np.ascontiguousarray(src.rows_f32(0, src.n_rows).astype(np.float16))
    emb = Embedding(e16.reshape(-1).view(np.uint8), F16, src.n_rows, src.n_cols,
                    src.name + " (rounded to F16)")
    m.head = make_head("exact", emb, m.kernel)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--examples", type=int, default=100, help="held-out examples per task")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import dlmnumba
    from dlmnumba import DecodeSettings, Generator
    from dlmnumba import evaluate as E
    from dlmnumba.chat import chat_prompt
    from dlmnumba.model.heads import ExactF16Head
    from dlmnumba.model_source import TOY_MODEL

    m = dlmnumba.load_model(str(TOY_MODEL))
    with_f16_head(m)
    assert isinstance(m.head, ExactF16Head)
    exs = E.examples_for(E.T.TASKS, args.examples)
    prompts = [m.tokenizer.encode(chat_prompt(m.file.metadata, e.prompt)) for e in exs]
    rows = []
    print(f"{len(exs)} held-out examples, toy model with an F16 LM head")
    print(f"{'setting':<42}{'dual':>6}{'same tokens+passes':>20}{'acc exact':>11}"
          f"{'acc screened':>14}")
    for label, kw in SETTINGS:
        for dual in (False, True):
            outs = {}
            for conf in ("exact", "screened"):
                gen = Generator(m, DecodeSettings(max_tokens=48, dual_cache=dual,
                                                  confidence=conf, **kw))
                outs[conf] = [gen.generate(p) for p in prompts]
            same = sum(a.tokens == b.tokens and a.stats.forward_passes ==
                       b.stats.forward_passes for a, b in zip(outs["exact"],
                                                              outs["screened"]))
            acc = {c: sum(E.T.is_correct(e, o.text) for e, o in zip(exs, outs[c])) / len(exs)
                   for c in outs}
            rows.append({"setting": label, "dual_cache": dual, "examples": len(exs),
                         "identical": same, "accuracy_exact": acc["exact"],
                         "accuracy_screened": acc["screened"]})
            print(f"{label:<42}{'on' if dual else 'off':>6}{same:>14} / {len(exs):<4}"
                  f"{100 * acc['exact']:>10.1f}%{100 * acc['screened']:>13.1f}%", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
