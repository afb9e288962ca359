"""What a refinement pass of the quality modes costs, and their end-to-end speed, on the 2B-4T
shape, in one run.

    python bench/refine_cost.py                          # built-in 2B-4T-shaped model
    python bench/refine_cost.py --baseline-tree /path/to/old/checkout   # + the old code

1. ms per pass (median of `--repeats`), after a 100-token prefix, for block 32 / sub-block 8
   and block 64 / sub-block 8:
   - "full block, every masked row": the whole block with the exact LM head for all its
     masked positions (what a refinement pass cost before sub-block rows);
   - "full block, sub-block rows": the whole block, the head for the sub-block only (today
     without the dual cache);
   - "dual cache": the sub-block and the row before it (9 tokens) against the prefix and the
     block's other positions' cached K/V, head for the sub-block (exact confidence, and the
     screened confidence: the exact argmax through the int8 screen);
   - an `ar` step against the same prefix.
2. End-to-end generated tok/s of iterative 0.9 (block 32 / sub-block 8, 128 tokens) with a
   forced commit schedule: random weights give meaningless confidences, so the bundled toy
   model's own per-pass commit counts (iterative 0.9 on its held-out tasks) are recorded and
   replayed (each pass commits that many of the current sub-block's most confident
   positions); without and with the dual cache, and `ar`, same run, taking turns (one
   generation each per round, `--iterations` rounds).  With --baseline-tree the same replay
   runs on another checkout (e.g. the commit before sub-block rows) in a child process, in the
   same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forward_pass import default_model  # noqa: E402


def toy_schedule(n_per_task: int) -> list[int]:
    """Commits per pass of iterative 0.9 (block 32 / 8) on the bundled toy model's held-out
    tasks, in order."""
    import dlmnumba
    from dlmnumba import DecodeSettings, Generator
    from dlmnumba.chat import chat_prompt
    from dlmnumba.decode import policies
    from dlmnumba.model_source import TOY_MODEL
    from dlmnumba.tasks import TASKS, heldout

    m = dlmnumba.load_model(str(TOY_MODEL))
    gen = Generator(m, DecodeSettings(mode="iterative", block_size=32, small_block_size=8,
                                      threshold=0.9, max_tokens=48))
    counts: list[int] = []
    real = policies.select_unmask

    def record(conf, threshold):
        chosen = real(conf, threshold)
        counts.append(len(chosen))
        return chosen

    policies.select_unmask = record
    try:
        for t in TASKS:
            for e in heldout(t, n_per_task):
                gen.generate(m.tokenizer.encode(chat_prompt(m.file.metadata, e.prompt)))
    finally:
        policies.select_unmask = real
    return counts


def replay(schedule: list[int]):
    """A select_unmask that commits the scheduled number of most confident positions."""
    import numpy as np
    state = {"i": 0}

    def pick(conf, threshold):
        k = min(schedule[state["i"] % len(schedule)], conf.shape[0])
        state["i"] += 1
        return np.sort(np.argsort(-conf, kind="stable")[:max(1, k)])
    return pick


def end_to_end(model_path: str, schedule: list[int], iterations: int, threads: int,
               module: str, kernel: str | None = None) -> dict[str, float]:
    """tok/s of the scheduled iterative runs (dual cache off/on where the code has it) and ar.
    `module`: where select_unmask is looked up (decode.policies since the policy registry)."""
    import importlib

    import dlmnumba
    from dlmnumba import DecodeSettings, Generator

    m = dlmnumba.load_model(model_path, threads=threads, kernel=kernel)
    prompt = m.tokenizer.encode("USER: What is the meaning of life?<|eot_id|>ASSISTANT:")
    target = importlib.import_module(module)
    runs = {"iterative 0.9, no dual cache": dict(mode="iterative", block_size=32,
                                                 small_block_size=8, threshold=0.9),
            "ar": dict(mode="ar")}
    if "dual_cache" in DecodeSettings.__dataclass_fields__:  # (its default is on now)
        runs["iterative 0.9, no dual cache"]["dual_cache"] = False
        runs["iterative 0.9, dual cache"] = dict(mode="iterative", block_size=32,
                                                 small_block_size=8, threshold=0.9,
                                                 dual_cache=True)
    if "confidence" in DecodeSettings.__dataclass_fields__:
        runs["iterative 0.9, dual cache, screened confidence"] = dict(
            mode="iterative", block_size=32, small_block_size=8, threshold=0.9,
            dual_cache=True, confidence="screened")
    # round robin (one generation of each run in turn), so a slow spell of the machine hits
    # every run alike; each run replays the schedule from its own position
    gens = {}
    ignore_eos = "ignore_eos" in DecodeSettings.__dataclass_fields__
    for name, kw in runs.items():
        gen = Generator(m, DecodeSettings(max_tokens=128, **kw,
                                          **({"ignore_eos": True} if ignore_eos else {})))
        if not ignore_eos:  # a baseline tree from before the setting: the same by hand
            gen.eog = frozenset()
        gens[name] = [gen, replay(schedule), 0.0, 0]
    real = target.select_unmask
    try:
        for it in range(iterations + 1):  # the first round warms up
            for name, g in gens.items():
                target.select_unmask = g[1]
                t0 = time.perf_counter()
                passes = g[0].generate(prompt).stats.forward_passes
                if it:
                    g[2] += time.perf_counter() - t0
                    g[3] += passes
    finally:
        target.select_unmask = real
    return {name: {"tok_s": iterations * 128 / wall, "tokens_per_pass": iterations * 128 / passes}
            for name, (_, _, wall, passes) in gens.items()}


def pass_costs(model_path: str, threads: int, repeats: int, kernel: str | None = None
               ) -> list[dict]:
    """ms per pass of each kind (see the module docstring)."""
    import numpy as np

    import dlmnumba
    from dlmnumba.model.batch import AttentionMask, Output, Segment

    m = dlmnumba.load_model(model_path, threads=threads, kernel=kernel)
    rng = np.random.default_rng(0)
    mask_id = m.spec.mask_id
    rows = []
    for block, sub in ((32, 8), (64, 8)):
        prefix_len = (100 // block + 1) * block  # the block starts on a block boundary
        prefix = rng.integers(0, m.spec.n_vocab - 1, prefix_len).tolist()
        cache = m.new_cache(prefix_len + 2 * block + 1)
        mask = AttentionMask.block(block)
        m.forward_batch([Segment(prefix, cache, None, mask, [], Output.HIDDEN)])
        content = rng.integers(0, m.spec.n_vocab - 1, block).tolist()
        content[sub:] = [mask_id] * (block - sub)  # sub-block 0 decided, the rest masked
        content[sub + 2] = content[sub + 5] = 7  # two tokens of sub-block 1 committed
        start = prefix_len
        masked = [i for i, t in enumerate(content) if t == mask_id]
        cur = [i for i in masked if sub <= i < 2 * sub]

        def timed(seg_fn):
            ts = []
            for _ in range(repeats + 1):
                seg = seg_fn()
                t0 = time.perf_counter()
                m.forward_batch([seg])
                ts.append(time.perf_counter() - t0)
                cache.truncate(start)
            return statistics.median(ts[1:]) * 1e3

        pos = np.arange(start, start + block, dtype=np.int32)
        full_all = timed(lambda: Segment(content, cache, pos, mask, [i - 1 for i in masked],
                                         Output.ARGMAX_EXACT, mask_id))
        full_sub = timed(lambda: Segment(content, cache, pos, mask, [i - 1 for i in cur],
                                         Output.ARGMAX_EXACT, mask_id))
        m.forward_batch([Segment(content, cache, pos, mask, [], Output.HIDDEN)])
        bk, bv = (a.copy() for a in cache.view(start, start + block))
        cache.truncate(start)
        lo, hi = sub - 1, 2 * sub  # the row before the sub-block, then the sub-block
        keep = np.ones(block, bool)
        keep[lo:hi] = False

        def dual():
            cache.load(start, bk[:, :, keep], bv[:, :, keep], start + np.flatnonzero(keep))
            return Segment(content[lo:hi], cache, pos[lo:hi], mask, [i - 1 - lo for i in cur],
                           Output.ARGMAX_EXACT, mask_id)
        dual_ms = timed(dual)

        def dual_screened():
            seg = dual()
            seg.output = Output.ARGMAX
            return seg
        dual_screened_ms = timed(dual_screened)
        ar_ms = timed(lambda: Segment([5], cache, [start], AttentionMask(), [0], Output.ARGMAX,
                                      mask_id))
        rows.append({"block": block, "sub_block": sub, "full_block_all_rows_ms": full_all,
                     "full_block_sub_rows_ms": full_sub, "dual_cache_ms": dual_ms,
                     "dual_cache_screened_ms": dual_screened_ms,
                     "ar_step_ms": ar_ms})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--schedule-examples", type=int, default=20, help="toy examples per task")
    ap.add_argument("--kernel", help="kernel path (default: the fastest here)")
    ap.add_argument("--baseline-tree", help="another checkout: the replay runs there too")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: baseline replay
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(end_to_end(spec["model"], spec["schedule"], spec["iterations"],
                                    spec["threads"], spec["module"])))
        return

    path = args.model or default_model()
    schedule = toy_schedule(args.schedule_examples)
    print(f"toy schedule: {len(schedule)} passes, {sum(schedule) / len(schedule):.2f} commits "
          f"per pass (iterative 0.9, block 32 / 8)")
    costs = pass_costs(path, args.threads, args.repeats, args.kernel)
    print(f"\nms per pass ({args.threads} threads, kernel {args.kernel or 'auto'}), after a prefix "
          "of ~100 tokens:")
    print(f"{'block/sub':>10}{'full, all rows':>16}{'full, sub rows':>16}{'dual cache':>12}"
          f"{'dual, screened':>16}{'ar step':>10}")
    for r in costs:
        print(f"{r['block']:>6}/{r['sub_block']:<3}{r['full_block_all_rows_ms']:>16.1f}"
              f"{r['full_block_sub_rows_ms']:>16.1f}{r['dual_cache_ms']:>12.1f}"
              f"{r['dual_cache_screened_ms']:>16.1f}{r['ar_step_ms']:>10.1f}")
    e2e = end_to_end(path, schedule, args.iterations, args.threads, "dlmnumba.decode.policies",
                     args.kernel)
    if args.baseline_tree:
        spec = json.dumps({"model": path, "schedule": schedule, "iterations": args.iterations,
                           "threads": args.threads, "module": "dlmnumba.decode.policies"})
        env = dict(os.environ, PYTHONPATH=str(Path(args.baseline_tree).resolve()))
        child = subprocess.run([sys.executable, str(HERE / "refine_cost.py"), "--child", spec],
                               env=env, capture_output=True, text=True, check=True)
        base = json.loads(child.stdout.strip().splitlines()[-1])
        e2e.update({f"baseline tree: {k}": v for k, v in base.items()})
    ar = e2e["ar"]["tok_s"]
    print(f"\nend to end, 128 tokens, toy schedule replayed ({args.threads} threads):")
    for name, r in e2e.items():
        print(f"  {name:<48}{r['tok_s']:>8.2f} tok/s  {r['tokens_per_pass']:>5.2f} tok/pass"
              f"  x{r['tok_s'] / ar:.2f} of ar")
    if args.json:
        args.json.write_text(json.dumps({"schedule_mean": sum(schedule) / len(schedule),
                                         "pass_costs": costs, "end_to_end": e2e}, indent=2))


if __name__ == "__main__":
    main()
