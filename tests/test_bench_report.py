"""Benchmark statistics and reports: the seed's percentile rule and report text, JSON record."""
import json

import pytest

from dlmnumba.bench import (CPU_FLAGS, BenchSummary, RequestStats, environment_info,
                            format_report, percentile, round_half_away, summarize, write_json)

# Copied verbatim from the seed's notebook (seed/notebook.md, "Benchmark Results").
SEED_REPORT = """\
=== Benchmark Results ===
Iterations:        50
Prompt tokens:     20
Max tokens:        128
Total tokens:      6450

Latency (ms):
  Mean:            1069.02
  p50:             1069.31
  p95:             1071.16
  p99:             1071.76

Throughput:
  Tokens/sec:      120.67
  Avg tokens/req:  129.00
  Total time:      53.45s
========================="""


def seed_summary(**changes):
    """A summary holding the seed's published numbers."""
    fields = dict(iterations=50, prompt_tokens=20, max_tokens=128, total_tokens=6450,
                  latency_mean_ms=1069.02, latency_p50_ms=1069.31, latency_p95_ms=1071.16,
                  latency_p99_ms=1071.76, tokens_per_s=120.67, avg_tokens_per_req=129.0,
                  total_time_s=53.45, forward_passes_per_req=3.0, tokens_per_forward_pass=43.0,
                  ttft_mean_ms=20.0)
    fields.update(changes)
    return BenchSummary(**fields)


def test_seed_report_byte_for_byte():
    assert format_report(seed_summary()) == SEED_REPORT


def test_report_values_start_at_column_20_and_round_to_2_decimals():
    text = format_report(seed_summary(latency_mean_ms=1069.016, tokens_per_s=7.0,
                                      total_time_s=5.0))
    assert "  Mean:            1069.02" in text.splitlines()
    assert "  Tokens/sec:      7.00" in text.splitlines()
    assert "  Total time:      5.00s" in text.splitlines()
    for line in text.splitlines():
        if ":" in line and not line.endswith(":"):
            assert line[19] != " " and line[18] == " ", line


@pytest.mark.parametrize("x,expected", [
    (0.5, 1), (1.5, 2), (2.5, 3), (2.4999999999999996, 2), (0.49999999999999994, 0),
    (46.55, 47), (3.0, 3), (0.0, 0), (-2.5, -3),
])
def test_round_half_away_from_zero(x, expected):
    assert round_half_away(x) == expected


def test_percentile_matches_seed_rule_not_bankers_rounding():
    three = [10.0, 20.0, 30.0]
    assert percentile(three, 50) == 20.0  # 0.5 * 2 = 1.0 -> index 1
    six = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert round(2.5) == 2  # Python would pick index 2 ...
    assert percentile(six, 50) == 4.0  # ... the seed (Rust round) picks index 3
    fifty = [float(i) for i in range(50)]
    assert percentile(fifty, 95) == 47.0  # 0.95 * 49 = 46.55 -> 47
    assert percentile(fifty, 99) == 49.0  # 48.51 -> 49
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_statistics():
    # latencies 1..6 s given out of order; 129 tokens each, as the seed (1 + 2 x 64)
    reqs = [RequestStats(prompt_tokens=20, generated_tokens=129 + i % 2, forward_passes=3,
                         latency_s=lat, ttft_s=0.01 * (i + 1))
            for i, lat in enumerate([3.0, 1.0, 6.0, 2.0, 5.0, 4.0])]
    s = summarize(reqs, wall_s=25.0, prompt_tokens=20, max_tokens=128)
    assert (s.iterations, s.prompt_tokens, s.max_tokens) == (6, 20, 128)
    assert s.total_tokens == 129 * 6 + 3
    assert s.latency_mean_ms == pytest.approx(3500.0)
    assert s.latency_p50_ms == 4000.0  # sorted[round(2.5)] with halves away from zero
    assert s.latency_p95_ms == 6000.0  # 4.75 -> 5
    assert s.latency_p99_ms == 6000.0
    assert s.tokens_per_s == pytest.approx(777 / 25.0)  # total tokens / overall wall time
    assert s.avg_tokens_per_req == pytest.approx(777 / 6)
    assert s.total_time_s == 25.0
    assert s.forward_passes_per_req == 3.0
    assert s.tokens_per_forward_pass == pytest.approx(777 / 18)
    assert s.ttft_mean_ms == pytest.approx(35.0)


def test_summarize_rejects_empty_and_zero_wall_time():
    r = RequestStats(prompt_tokens=1, generated_tokens=1, forward_passes=0, latency_s=1.0,
                     ttft_s=1.0)
    assert summarize([r], 1.0, 1, 1).tokens_per_forward_pass == 0.0
    with pytest.raises(ValueError):
        summarize([], 1.0, 1, 1)
    with pytest.raises(ValueError):
        summarize([r], 0.0, 1, 1)


def test_environment_info_fields():
    env = environment_info()
    assert set(env["cpu_flags"]) == set(CPU_FLAGS)
    assert all(isinstance(v, bool) for v in env["cpu_flags"].values())
    assert env["physical_cores"] >= 1 and env["logical_cpus"] >= env["physical_cores"]
    assert env["python"].count(".") == 2 and env["numba"] and env["numpy"]
    assert isinstance(env["cpu_model"], str) and env["cpu_model"]
    assert "hostname" not in env and "node" not in env
    json.dumps(env)  # serialisable as it stands


def test_write_json_content(tmp_path):
    settings = {"model": "m.gguf", "model_size_bytes": 1234, "mode": "greedy", "block_size": 64,
                "attention": "block", "kv_commit": "normal", "threads": 2,
                "forward_passes_per_request": 3.0}
    env = {"cpu_model": "test cpu", "cpu_flags": {"avx2": True}}
    path = tmp_path / "bench.json"
    write_json(path, seed_summary(), env, settings)
    record = json.loads(path.read_text(encoding="utf-8"))
    assert set(record) == {"summary", "environment", "settings"}
    assert record["environment"] == env and record["settings"] == settings
    assert record["summary"]["tokens_per_s"] == 120.67
    assert record["summary"]["total_tokens"] == 6450
    assert BenchSummary(**record["summary"]) == seed_summary()
