#!/usr/bin/env python3
"""Does the screened confidence make the same commit decisions as the exact one?

    python scripts/confidence_agreement.py -n 100

The screened confidence (`--confidence screened`) exists for F16 embeddings (the int8 screen
rescores only the rows that can win), so the bundled toy model (F32 embedding) is copied with
its embedding rounded to F16; on that copy every held-out example is decoded with the exact and
with the screened confidence, for iterative and adaptive at several thresholds, with and
without the dual cache.  Reported per setting: examples whose generated tokens and forward-pass
counts are identical, and the accuracy of each.  Identical tokens and pass counts mean every
commit decision was the same.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SETTINGS = [
    ("iterative 0.5, block 32 / 8", dict(mode="iterative", block_size=32, threshold=0.5)),
    ("iterative 0.7, block 32 / 8", dict(mode="iterative", block_size=32, threshold=0.7)),
    ("iterative 0.9, block 32 / 8", dict(mode="iterative", block_size=32, threshold=0.9)),
    ("adaptive 0.9, block 32 / 8", dict(mode="adaptive", block_size=32, threshold=0.9)),
]


def f16_copy(dst: Path) -> str:
    """The toy model with its (tied) embedding stored as F16."""
    import gguf
    import numpy as np

    from gguf_edit import rewrite
    from dlmnumba.model_source import TOY_MODEL

    r = gguf.GGUFReader(str(TOY_MODEL))
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    e = np.array(emb.data, dtype=np.float32).reshape(int(emb.shape[1]), int(emb.shape[0]))
    return rewrite(TOY_MODEL, dst, tensors={"token_embd.weight": e.astype(np.float16)})


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

    with tempfile.TemporaryDirectory() as tmp:
        m = dlmnumba.load_model(f16_copy(Path(tmp) / "toy-f16.gguf"))
        assert isinstance(m.head, ExactF16Head)
        exs = E.examples_for(E.T.TASKS, args.examples)
        prompts = [m.tokenizer.encode(chat_prompt(m.file.metadata, e.prompt)) for e in exs]
        rows = []
        print(f"{len(exs)} held-out examples, toy model with an F16 embedding")
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
