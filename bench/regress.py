"""Performance-regression check for CI: a calibration and a short benchmark in one process,
throughput normalised by the calibration, compared with the committed baseline.

    python bench/regress.py            # compare with bench/baseline.json, exit 1 on regression
    python bench/regress.py --update   # measure and write bench/baseline.json

Calibration: the register-only VNNI (or the CPU's best path) tile loop of bench/kernels.py,
in GMAC/s: it moves with the machine's clock and load, so tok/s divided by it is steadier on
shared machines than tok/s alone.  Benchmarks: greedy block decoding and `ar` decoding on the
`small` synthetic preset (written once to the user cache).  A metric regresses when its
normalised value falls below (1 - tolerance) x the baseline's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BASELINE = HERE / "baseline.json"
sys.path.insert(0, str(HERE))


def small_model() -> str:
    """The `small` preset (arch bitnet-b1.58, TQ2_0) in the user cache, written once."""
    from dlmnumba.model_source import default_model_path
    from dlmnumba.synth.models import write_synthetic

    path = default_model_path()[0].with_name("regress-small-TQ2_0.gguf")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(path, preset="small", qtype="TQ2_0")
    return str(path)


def run(iterations: int) -> dict:
    """Calibration and benchmarks; returns the figures."""
    import dlmnumba
    from dlmnumba.bench import run_benchmark, summarize
    from dlmnumba import DecodeSettings, Generator
    from kernels import measure_peak

    m = dlmnumba.load_model(small_model())
    peak = measure_peak(m.kernel, m.threads, seconds=0.6)
    prompt = m.tokenizer.encode("USER: What is the meaning of life?<|eot_id|>ASSISTANT:")
    figures = {"kernel": m.kernel, "threads": m.threads, "peak_gmacs": round(peak, 1),
               "metrics": {}}
    for name, settings in {
        "greedy_block32": DecodeSettings(block_size=32, max_tokens=96),
        "ar": DecodeSettings(mode="ar", max_tokens=64),
    }.items():
        # random weights: always the full budget
        gen = Generator(m, dataclasses.replace(settings, ignore_eos=True))
        stats, wall = run_benchmark(gen, prompt, iterations, warmup=2)
        tps = summarize(stats, wall, len(prompt), settings.max_tokens).tokens_per_s
        figures["metrics"][name] = {"tok_s": round(tps, 2),
                                    "tok_s_per_peak_gmacs": round(tps / peak, 5)}
    figures["metrics"]["matmul_65x2560x6912"] = _matmul_metric(m.kernel, peak)
    return figures


def _matmul_metric(path: str, peak: float) -> dict:
    """Block-batch ternary matmul at BitNet 2B-4T's FFN shape, GMAC/s (median of 5)."""
    import statistics

    import numpy as np

    from dlmnumba.kernels.ternary import M_ALIGN, pack_codes, ternary_matmul

    m, k, n = 65, 2560, 6912
    rng = np.random.default_rng(0)
    packed = pack_codes(rng.integers(0, 3, (n, k), dtype=np.uint8))
    q = np.zeros((-(-m // M_ALIGN) * M_ALIGN, k), np.int8)
    q[:m] = rng.integers(-128, 128, (m, k))
    qsum = q.astype(np.int32).sum(1).astype(np.int32)
    out, xs, sc = np.empty((m, n), np.float32), np.ones(m, np.float32), np.ones((n, 1), np.float32)
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        ternary_matmul(out, q, qsum, xs, packed, sc, k, path)
        ts.append(time.perf_counter() - t)
    g = m * k * n / statistics.median(ts[1:]) / 1e9
    return {"gmacs": round(g, 1), "tok_s_per_peak_gmacs": round(g / peak, 5)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="write the baseline")
    ap.add_argument("--tolerance", type=float, default=0.35)
    ap.add_argument("--iterations", type=int, default=12)
    args = ap.parse_args()
    if args.update:  # the median of three runs per metric, so one lucky run sets no bar
        runs = [run(args.iterations) for _ in range(3)]
        now = runs[0]
        for name in now["metrics"]:
            for key in now["metrics"][name]:
                now["metrics"][name][key] = statistics.median(r["metrics"][name][key] for r in runs)
        now["peak_gmacs"] = statistics.median(r["peak_gmacs"] for r in runs)
        BASELINE.write_text(json.dumps(now, indent=2) + "\n")
        print(f"wrote {BASELINE}: {now}")
        return 0
    failed = check(args)
    if failed:  # shared machines are noisy: a regression must show twice
        print(f"re-measuring {', '.join(failed)} once to confirm")
        failed = [f for f in check(args) if f in failed]
    if failed:
        print(f"performance regression in: {', '.join(failed)} (tolerance {args.tolerance})")
        return 1
    return 0


def check(args) -> list[str]:
    """Measure and compare with the baseline; the names of the regressed metrics."""
    t0 = time.perf_counter()
    now = run(args.iterations)
    print(f"calibration: {now['peak_gmacs']} GMAC/s ({now['kernel']}, {now['threads']} threads)")
    base = json.loads(BASELINE.read_text())
    failed = []
    for name, fig in now["metrics"].items():
        ref = base["metrics"].get(name)
        if ref is None:
            print(f"{name}: {fig} (no baseline)")
            continue
        ratio = fig["tok_s_per_peak_gmacs"] / ref["tok_s_per_peak_gmacs"]
        verdict = "ok" if ratio >= 1 - args.tolerance else "REGRESSION"
        raw = f"{fig['tok_s']} tok/s" if "tok_s" in fig else f"{fig['gmacs']} GMAC/s"
        print(f"{name}: {raw}, normalised {fig['tok_s_per_peak_gmacs']} vs "
              f"baseline {ref['tok_s_per_peak_gmacs']} (x{ratio:.2f}): {verdict}")
        if verdict != "ok":
            failed.append(name)
    if now["kernel"] != base.get("kernel"):
        print(f"note: kernel path {now['kernel']} here, {base.get('kernel')} in the baseline")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return failed


if __name__ == "__main__":
    sys.exit(main())
