#!/usr/bin/env python3
"""The quality table: accuracy, tokens per forward pass and tok/s of each decoding setting on the
held-out synthetic tasks, with the bundled toy model (or --model).  Every row runs the same
examples in one process, the same way `dlmnumba eval` does.

    python scripts/quality_table.py -n 200 --out docs/quality.md --json docs/quality.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dlmnumba  # noqa: E402
from dlmnumba import evaluate as E  # noqa: E402
from dlmnumba import tasks as T  # noqa: E402
from dlmnumba.bench import environment_info  # noqa: E402
from dlmnumba.chat import chat_prompt  # noqa: E402
from dlmnumba import DecodeSettings, Generator  # noqa: E402
from dlmnumba.model_source import TOY_MODEL  # noqa: E402

# (label, settings): the rows the issue asks for, in the order of the table
ROWS = [
    ("ar", dict(mode="ar")),
    ("greedy, block 8", dict(mode="greedy", block_size=8)),
    ("greedy, block 16", dict(mode="greedy", block_size=16)),
    ("greedy, block 32", dict(mode="greedy", block_size=32)),
    ("greedy, block 64", dict(mode="greedy", block_size=64)),
    ("iterative 0.5, block 32 / 8", dict(mode="iterative", block_size=32, threshold=0.5,
                                         dual_cache=False)),
    ("iterative 0.7, block 32 / 8", dict(mode="iterative", block_size=32, threshold=0.7,
                                         dual_cache=False)),
    ("iterative 0.9, block 32 / 8", dict(mode="iterative", block_size=32, threshold=0.9,
                                         dual_cache=False)),
    ("adaptive 0.9, block 32 / 8", dict(mode="adaptive", block_size=32, threshold=0.9,
                                        dual_cache=False)),
    ("iterative 0.5, block 32 / 8, dual cache", dict(mode="iterative", block_size=32,
                                                     threshold=0.5, dual_cache=True)),
    ("iterative 0.7, block 32 / 8, dual cache", dict(mode="iterative", block_size=32,
                                                     threshold=0.7, dual_cache=True)),
    ("iterative 0.9, block 32 / 8, dual cache", dict(mode="iterative", block_size=32,
                                                     threshold=0.9, dual_cache=True)),
    ("adaptive 0.9, block 32 / 8, dual cache", dict(mode="adaptive", block_size=32,
                                                    threshold=0.9, dual_cache=True)),
    ("greedy, block 16, attention causal", dict(mode="greedy", block_size=16, attention="causal")),
    ("iterative 0.9, block 32 / 8, attention causal",
     dict(mode="iterative", block_size=32, threshold=0.9, attention="causal", dual_cache=False)),
    ("seed scheduling (kv_commit none), block 16, causal",
     dict(mode="greedy", block_size=16, attention="causal", kv_commit="none")),
    ("seed scheduling (kv_commit none), block 16, block attention",
     dict(mode="greedy", block_size=16, kv_commit="none")),
    ("seed scheduling (kv_commit none), block 64, causal",
     dict(mode="greedy", block_size=64, attention="causal", kv_commit="none")),
    ("spec, draft 4", dict(mode="spec", draft_size=4, draft_policy="fixed")),
    ("spec, draft 8", dict(mode="spec", draft_size=8, draft_policy="fixed")),
    ("spec, draft 16", dict(mode="spec", draft_size=16, draft_policy="fixed")),
    ("spec, draft 32", dict(mode="spec", draft_size=32, draft_policy="fixed")),
    ("spec, adaptive draft (at most 16)", dict(mode="spec", draft_size=16,
                                               draft_policy="adaptive")),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(TOY_MODEL))
    ap.add_argument("-n", "--examples", type=int, default=200, help="held-out examples per task")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rows", help="comma-separated row numbers (1-based) to run; default all")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args(argv)
    m = dlmnumba.load_model(args.model, threads=args.threads)
    exs = E.examples_for(T.TASKS, args.examples)
    encode = lambda p: m.tokenizer.encode(chat_prompt(m.file.metadata, p))  # noqa: E731
    rows = ROWS if not args.rows else [ROWS[int(i) - 1] for i in args.rows.split(",")]
    Generator(m, DecodeSettings(max_tokens=4)).generate(encode("Copy: ab"))  # JIT warm-up
    header = ("| setting | " + " | ".join(T.TASKS) + " | all | tokens/pass | tok/s |\n"
              "|---|" + "---:|" * (len(T.TASKS) + 3))
    lines, doc = [header], []
    for label, kw in rows:
        gen = Generator(m, DecodeSettings(max_tokens=args.max_tokens, **kw))
        t0 = time.perf_counter()
        results, total = E.run_eval(gen, encode, exs)
        by = {r.task: r for r in results}
        line = (f"| {label} | " + " | ".join(f"{100 * by[t].accuracy:.1f}" for t in T.TASKS)
                + f" | **{100 * total.accuracy:.1f}** | {total.tokens_per_pass:.2f} | "
                  f"{total.tokens_per_second:.0f} |")
        print(line, f"({time.perf_counter() - t0:.0f} s)", flush=True)
        lines.append(line)
        doc.append({"label": label, "settings": kw, "total": total.to_dict(),
                    "tasks": [r.to_dict() for r in results]})
    table = "\n".join(lines)
    env = environment_info()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"Accuracy (%) on {args.examples} held-out examples per task, "
            f"model `{Path(args.model).name}`, max_tokens {args.max_tokens}, "
            f"{m.threads} threads on {env.get('cpu_model', 'this CPU')}; `python scripts/quality_table.py`.\n\n"
            + table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "examples_per_task": args.examples,
                                         "environment": env, "rows": doc}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
