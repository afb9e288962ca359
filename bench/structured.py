"""Structured output: what the grammar costs, in one run.

    python bench/structured.py [--n 20]

1. The bundled toy model on its held-out tasks (`--n` per task): tokens per pass of each mode
   without a grammar and under a JSON schema (an object with a bounded integer, a short string
   and an enum), and the share of constrained outputs that parse and validate.
2. llguidance on the built-in 2B-4T-shaped model's 128,256-token vocabulary: the time to build
   its tokenizer (once per model), to compile the schema, and per token to compute a mask.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forward_pass import default_model  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "integer", "minimum": 0, "maximum": 199},
    "word": {"type": "string", "maxLength": 6},
    "pick": {"enum": ["add", "sub", "copy"]}},
    "required": ["answer", "word", "pick"], "additionalProperties": False}
MODES = {"ar": dict(mode="ar"), "greedy 32": dict(mode="greedy", block_size=32),
         "iterative 0.9, 32/8": dict(mode="iterative", block_size=32, threshold=0.9),
         "adaptive 0.9, 32/8": dict(mode="adaptive", block_size=32, threshold=0.9),
         "spec": dict(mode="spec")}


def toy_costs(n: int) -> None:
    import jsonschema

    import dlmnumba
    from dlmnumba import DecodeSettings, Generator
    from dlmnumba.chat import chat_prompt
    from dlmnumba.decode.constraint import Grammar
    from dlmnumba.model_source import TOY_MODEL
    from dlmnumba.tasks import TASKS, heldout

    m = dlmnumba.load_model(str(TOY_MODEL))
    prompts = [m.tokenizer.encode(chat_prompt(m.file.metadata, e.prompt))
               for t in TASKS for e in heldout(t, n)]
    g = Grammar.json_schema(SCHEMA)
    print(f"bundled toy model, {len(prompts)} held-out prompts: tokens per pass "
          "(plain / under the schema), constrained outputs valid")
    for name, kw in MODES.items():
        gen = Generator(m, DecodeSettings(max_tokens=48, **kw))
        plain = gen.generate_many(prompts)
        cons = gen.generate_many(prompts, grammar=g)
        valid = 0
        for o in cons:
            try:
                jsonschema.validate(json.loads(o.text), SCHEMA)
                valid += o.stats.finish_reason == "stop"
            except (ValueError, jsonschema.ValidationError):
                pass

        def tpp(outs):
            return (sum(o.stats.generated_tokens for o in outs)
                    / max(1, sum(o.stats.forward_passes for o in outs)))
        print(f"  {name:<22}{tpp(plain):>6.2f} / {tpp(cons):>5.2f}   "
              f"{valid}/{len(cons)} valid")


def mask_costs() -> None:
    import dlmnumba
    from dlmnumba.decode.constraint import Constraint, Grammar

    m = dlmnumba.load_model(default_model())
    tok = m.tokenizer
    t0 = time.perf_counter()
    g = Grammar.json_schema(SCHEMA)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = Constraint(g, tok, m.n_vocab, frozenset(m.spec.eog_ids))
    first_s = time.perf_counter() - t0  # the tokenizer's trie, built once per model
    t0 = time.perf_counter()
    Constraint(g, tok, m.n_vocab, frozenset(m.spec.eog_ids))
    again_s = time.perf_counter() - t0
    ts = []
    for t in tok.encode('{"answer":12,"word":"ab","pick":"sub"}', add_bos=False):
        t1 = time.perf_counter()
        c.allowed()
        ts.append(time.perf_counter() - t1)
        c.consume(t)
    print(f"\nllguidance on a {m.n_vocab}-token vocabulary: tokenizer built in {first_s:.2f} s "
          f"(once per model; a matcher after it {again_s * 1e3:.1f} ms), schema compiled in "
          f"{compile_s * 1e3:.1f} ms, a mask per token {statistics.median(ts) * 1e3:.2f} ms "
          f"median (max {max(ts) * 1e3:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    toy_costs(args.n)
    mask_costs()


if __name__ == "__main__":
    main()
