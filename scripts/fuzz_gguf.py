"""Fuzz the GGUF loading path: mutated model files, each loaded fully in a forked child.

    python scripts/fuzz_gguf.py --cases 20000                  # the long run
    python scripts/fuzz_gguf.py --cases 2000 --seed 14 --json r.json  # what the tests run
    python scripts/fuzz_gguf.py --show 1234 --save d          # describe case 1234, save its file

Bases: the bundled toy model, tiny synthetic TQ2_0 / TQ1_0 / I2_S files and a TQ2_0 file with
per-block scales (case i mutates base i % 5).  Each case loads the model, builds the tokenizer,
encodes and decodes a prompt, and runs one forward pass (every --forward-every'th case); our own errors (DlmError) are the expected
refusals, anything else, a hang past --timeout seconds or a crash is a finding.  Linux only.
"""
from __future__ import annotations

import os

# Children are forked from this process: GNU OpenMP does not survive fork(), workqueue does.
os.environ["NUMBA_THREADING_LAYER"] = "workqueue"

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import gguf_doc  # noqa: E402
import gguf_fuzz as gf  # noqa: E402

import numpy as np  # noqa: E402

from dlmnumba.model_source import TOY_MODEL  # noqa: E402
from dlmnumba.synth.models import write_synthetic  # noqa: E402

QTYPES = ("TQ2_0", "TQ1_0", "I2_S")


def make_bases(root: Path) -> list[str]:
    """The toy model, one tiny synthetic file per ternary type, and a TQ2_0 file whose blocks
    have scales of their own (the kernels' per-group path, which BitNet files never use)."""
    paths = [str(TOY_MODEL)]
    for qtype in QTYPES:
        paths.append(str(write_synthetic(root / f"tiny-{qtype}.gguf", preset="tiny", qtype=qtype)))
    doc = gguf_doc.parse(Path(paths[1]).read_bytes())
    for t in doc.tensors:
        if t.qtype == 35 and t.name.startswith(b"blk.0."):  # 66-byte blocks: codes, f16 scale
            blocks = np.frombuffer(t.data, np.uint8).reshape(-1, 66).copy()
            scales = np.linspace(0.01, 0.1, len(blocks), dtype=np.float16)
            blocks[:, 64:] = scales.view(np.uint8).reshape(-1, 2)
            t.data = blocks.tobytes()
    paths.append(str(root / "tiny-TQ2_0-group-scales.gguf"))
    Path(paths[-1]).write_bytes(gguf_doc.write(doc))
    return paths


def summarize(results: list[dict], seconds: float) -> dict:
    """Counts by outcome and by exception type, hangs, peak-memory ratios, run time."""
    outcomes = collections.Counter(r["outcome"] for r in results)
    findings = [r for r in results if gf.is_finding(r)]
    by_type = collections.Counter(f"{r.get('type', r['outcome'])} @ {r.get('where', '-')}"
                                  for r in findings)
    examples = {}
    for r in findings:
        examples.setdefault(f"{r.get('type', r['outcome'])} @ {r.get('where', '-')}",
                            {"index": r["index"], "msg": r.get("msg", "")})
    ratios = sorted(r["ratio"] for r in results if "peak" in r)
    peaks = sorted(r["peak"] for r in results if "peak" in r)
    walls = sorted(r["wall"] for r in results if "wall" in r)
    rejected = [r for r in results if r["outcome"] == "rejected"]

    def q(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0.0

    return {
        "cases": len(results), "seconds": round(seconds, 1), "outcomes": dict(outcomes),
        "findings": len(findings), "findings_by_type": dict(by_type), "examples": examples,
        "hangs": outcomes.get("hang", 0),
        "rejected_by_stage": dict(collections.Counter(r["stage"] for r in rejected)),
        "rejected_without_file_name": sum(not r["names_file"] for r in rejected),
        "nonfinite_logits": sum(r.get("finite_logits") is False for r in results),
        "with_warnings": sum("warning" in r for r in results),
        "warnings": sorted({f"case {r['index']}: {r['warning']}" for r in results
                            if "warning" in r})[:5],
        "peak_ratio": {"median": q(ratios, 0.5), "p99": q(ratios, 0.99), "max": q(ratios, 1.0)},
        "peak_bytes": {"median": q(peaks, 0.5), "p99": q(peaks, 0.99), "max": q(peaks, 1.0)},
        "cases_over_2x": sum(x > 2 for x in ratios),
        "max_peak_bytes_over_2x": max((r["peak"] for r in results
                                       if r.get("ratio", 0) > 2), default=0),
        "top_peaks": [{k: r.get(k) for k in ("index", "ratio", "peak", "size", "outcome", "stage")}
                      for r in sorted(results, key=lambda r: -r.get("ratio", 0))[:5]],
        "case_seconds": {"median": q(walls, 0.5), "max": q(walls, 1.0)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds before a case is a hang")
    ap.add_argument("--mem-limit-mb", type=int, default=1024,
                    help="address space a case may add (RLIMIT_AS)")
    ap.add_argument("--forward-every", type=int, default=1,
                    help="run the forward pass on every n-th case only")
    ap.add_argument("--json", help="write the summary (and the findings) here")
    ap.add_argument("--save", help="save the files of findings to this directory")
    ap.add_argument("--show", type=int, help="describe one case (and --save its file), run none")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fuzz-gguf-") as tmp:
        bases = make_bases(Path(tmp))
        docs = [gguf_doc.parse(Path(b).read_bytes()) for b in bases]
        if args.show is not None:
            raw, prompt, forward, notes = gf.case(docs, args.seed, args.show, args.forward_every)
            print(f"case {args.show}: base {Path(bases[args.show % len(bases)]).name}: {notes}")
            if args.save:
                out = Path(args.save) / f"case-{args.seed}-{args.show}.gguf"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(raw)
                print(f"saved {out}")
            return 0
        for b in bases:  # warm up: numba kernels compiled or loaded from the cache here
            gf.exercise(b, gf.PROMPTS[0], True)

        t0, last = time.perf_counter(), [time.perf_counter()]

        def progress(rep: dict) -> None:
            if gf.is_finding(rep) and not args.quiet:
                try:
                    _, _, _, notes = gf.case(docs, args.seed, rep["index"], args.forward_every)
                except Exception as e:  # noqa: BLE001 - reported as a "harness" outcome
                    notes = f"(mutator failed: {e!r})"
                print(f"FINDING case {rep['index']}: {rep['outcome']} {rep.get('type', '')} "
                      f"@ {rep.get('where', '-')}: {rep.get('msg', '')[:160]}\n    {notes[:300]}",
                      flush=True)
            if not args.quiet and time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                print(f"... case {rep['index']}, {time.perf_counter() - t0:.0f} s", flush=True)

        results = gf.run_cases(docs, bases, args.seed, range(args.start, args.start + args.cases),
                               timeout=args.timeout, mem_limit=args.mem_limit_mb << 20,
                               forward_every=args.forward_every, tmpdir=tmp, on_result=progress)
        summary = summarize(results, time.perf_counter() - t0)
        if args.save:
            out = Path(args.save)
            out.mkdir(parents=True, exist_ok=True)
            for r in results:
                if gf.is_finding(r) and r["outcome"] != "harness":
                    raw, _, _, _ = gf.case(docs, args.seed, r["index"], args.forward_every)
                    (out / f"case-{args.seed}-{r['index']}.gguf").write_bytes(raw)
    print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=1))
    if args.json:
        findings = [r for r in results if gf.is_finding(r)]
        Path(args.json).write_text(json.dumps({**summary, "findings": findings}, indent=1))
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
