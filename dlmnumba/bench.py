"""Benchmark statistics and reports: the seed's text report, byte for byte, and a JSON record."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from dataclasses import dataclass
from typing import Any, Callable

from .decode.requests import RequestStats
from .runtime.generator import Generator

# Seed report layout: values start at column 20 (labels padded to 19 characters).
_LABEL_WIDTH = 19
_TITLE = "=== Benchmark Results ==="
# CPU features that pick our kernel paths (see kernels): VNNI tiles, AVX2 fallback.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512bw", "fma", "amx_tile", "amx_int8")


@dataclass(frozen=True)
class BenchSummary:
    """Aggregate statistics of one benchmark run (the seed's report fields, plus ours)."""

    iterations: int  # measured requests (warm-up excluded)
    prompt_tokens: int  # prompt length in tokens
    max_tokens: int  # requested new tokens per request
    total_tokens: int  # sum of generated tokens over measured requests
    latency_mean_ms: float  # mean request latency
    latency_p50_ms: float  # percentiles use the seed's rule: sorted[round(p/100*(n-1))]
    latency_p95_ms: float
    latency_p99_ms: float
    tokens_per_s: float  # total tokens / wall time of all measured requests
    avg_tokens_per_req: float  # total tokens / iterations
    total_time_s: float  # wall time of all measured requests
    forward_passes_per_req: float  # mean forward passes per request
    tokens_per_forward_pass: float  # total tokens / total forward passes (0 if none counted)
    ttft_mean_ms: float  # mean time to first token
    acceptance: float = 0.0  # spec: accepted / drafted tokens (0 without drafts)


def round_half_away(x: float) -> int:
    """Round to the nearest integer, halves away from zero (Rust's f64::round, not Python's)."""
    whole = math.trunc(x)
    frac = abs(x - whole)  # exact for floats: no x + 0.5 rounding error
    return whole + (int(math.copysign(1, x)) if frac >= 0.5 else 0)


def percentile(sorted_values: list[float], p: float) -> float:
    """The seed's percentile: sorted_values[round(p / 100 * (n - 1))], halves away from zero."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    return sorted_values[round_half_away(p / 100 * (len(sorted_values) - 1))]


def summarize(requests: list[RequestStats], wall_s: float, prompt_tokens: int,
              max_tokens: int) -> BenchSummary:
    """Aggregate per-request stats of the measured (not warm-up) requests."""
    if not requests:
        raise ValueError("summarize needs at least one measured request")
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    n = len(requests)
    latencies = sorted(r.latency_s * 1000.0 for r in requests)
    total = sum(r.generated_tokens for r in requests)
    passes = sum(r.forward_passes for r in requests)
    return BenchSummary(
        iterations=n,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        total_tokens=total,
        latency_mean_ms=sum(latencies) / n,
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        latency_p99_ms=percentile(latencies, 99),
        tokens_per_s=total / wall_s,
        avg_tokens_per_req=total / n,
        total_time_s=wall_s,
        forward_passes_per_req=passes / n,
        tokens_per_forward_pass=total / passes if passes else 0.0,
        ttft_mean_ms=sum(r.ttft_s for r in requests) * 1000.0 / n,
        acceptance=(sum(r.accepted_tokens for r in requests)
                    / max(1, sum(r.draft_tokens for r in requests))),
    )


def _row(label: str, value: str) -> str:
    """One report line with the value at the seed's column."""
    return f"{label:<{_LABEL_WIDTH}}{value}"


def format_report(s: BenchSummary) -> str:
    """The seed's benchmark report, byte for byte (no trailing newline)."""
    lines = [
        _TITLE,
        _row("Iterations:", f"{s.iterations}"),
        _row("Prompt tokens:", f"{s.prompt_tokens}"),
        _row("Max tokens:", f"{s.max_tokens}"),
        _row("Total tokens:", f"{s.total_tokens}"),
        "",
        "Latency (ms):",
        _row("  Mean:", f"{s.latency_mean_ms:.2f}"),
        _row("  p50:", f"{s.latency_p50_ms:.2f}"),
        _row("  p95:", f"{s.latency_p95_ms:.2f}"),
        _row("  p99:", f"{s.latency_p99_ms:.2f}"),
        "",
        "Throughput:",
        _row("  Tokens/sec:", f"{s.tokens_per_s:.2f}"),
        _row("  Avg tokens/req:", f"{s.avg_tokens_per_req:.2f}"),
        _row("  Total time:", f"{s.total_time_s:.2f}s"),
        "=" * len(_TITLE),
    ]
    return "\n".join(lines)


def _cpuinfo() -> tuple[str, set[str]]:
    """CPU model name and feature flags from /proc/cpuinfo (empty where unavailable)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def environment_info() -> dict[str, Any]:
    """Machine and library facts for a benchmark record (no hostname)."""
    import numba
    import numpy

    from .kernels.cpu import physical_cores

    model, flags = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return {
        "cpu_model": model,
        "cpu_flags": {name: name in flags for name in CPU_FLAGS},
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": physical_cores(),
        "numba_threads": numba.get_num_threads(),
        "python": platform.python_version(),
        "numba": numba.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def write_json(path: str | os.PathLike, summary: BenchSummary, env: dict[str, Any],
               settings: dict[str, Any]) -> None:
    """Write {"summary", "environment", "settings"} as one JSON object to path."""
    record = {"summary": dataclasses.asdict(summary), "environment": env, "settings": settings}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def process_memory_mib() -> tuple[float, float]:
    """Current and peak resident set size of this process in MiB."""
    cur = peak = 0.0
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
    except OSError:  # not Linux: only the peak is known
        import resource
        peak = cur = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return cur, peak


def run_benchmark(gen: Generator, prompt: list[int], iterations: int, warmup: int,
                  progress: bool = False,
                  on_request: Callable[[RequestStats], None] | None = None) -> tuple[list[RequestStats], float]:
    """`warmup` untimed requests (the JIT compile among them), then `iterations` timed ones in
    sequence; returns each timed request's stats and the wall time of all timed requests."""
    import time

    from tqdm import tqdm

    bar = tqdm(total=warmup + iterations, desc="Benchmark", unit="req", disable=not progress)
    for _ in range(warmup):
        gen.generate(prompt)
        bar.update(1)
    stats: list[RequestStats] = []
    t0 = time.perf_counter()
    for _ in range(iterations):
        stats.append(gen.generate(prompt).stats)
        if on_request is not None:
            on_request(stats[-1])
        bar.update(1)
    wall = time.perf_counter() - t0
    bar.close()
    return stats, wall
