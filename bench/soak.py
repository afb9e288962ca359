"""Soak test of dlmnumba's server: many clients for minutes; requests served, errors, memory.

    python bench/soak.py                                # 64 clients, 10 minutes, tiny preset
    python bench/soak.py --duration 20 --clients 8      # quick check
    python bench/soak.py --model m.gguf --modes ar --json soak.json

The server runs in a subprocess (`dlmnumba.server.run.serve_forever` on a free loopback port) so
its resident memory can be read from /proc/PID/status (VmRSS) every `--rss-every` seconds.  The
model defaults to the tiny synthetic preset, written to a temporary folder.  Each client sends
requests one after another until `--duration` ends: streaming and non-streaming completions and
chats in turn at random, decode modes from `--modes`, and a share (`--cancel-share`) closed on
purpose after the first content chunk (a client going away mid-stream).  After the run every
slot must be free again (`dlmnumba_running_sequences` and `_waiting_sequences` back to 0).
Reported: requests served by kind, errors (expected 0), RSS at start (after a warm-up request
per mode) and at the end, its peak and growth.  Every loop is bounded in time; the server is
always stopped (SIGTERM, then SIGKILL), also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen as L  # noqa: E402

SERVER = """
import sys
import dlmnumba
from dlmnumba import DecodeSettings
from dlmnumba.server.app import ServerOptions, ServerState, create_app
from dlmnumba.server.run import serve_forever
path, port, threads, seqs, waiting, cache = sys.argv[1], *map(int, sys.argv[2:7])
state = ServerState(ServerOptions(max_sequences=seqs, max_waiting=waiting,
                                  prefix_cache_tokens=cache), DecodeSettings())
app = create_app(state, load=lambda: dlmnumba.load_model(path, threads=threads))
serve_forever(app, "127.0.0.1", port, log_level="warning")
"""
MODES = {"ar": {"mode": "ar"}, "greedy": {"mode": "greedy", "block_size": 64},
         "iterative": {"mode": "iterative", "block_size": 32, "small_block_size": 8}}
FLAT_GROWTH = 0.10  # RSS growth beyond 10% (and 16 MiB) of the start is reported as not flat
FLAT_SLACK_KB = 16 * 1024


def rss_kb(pid: int) -> int | None:
    """VmRSS of process pid, KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def gauges(url: str) -> dict[str, float]:
    """The server's Prometheus samples that have no labels, by name."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10, trust_env=False).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def body_for(rng: random.Random, i: int, j: int, args) -> tuple[str, dict, str]:
    """(path, body, kind) of client i's request j."""
    mode = rng.choice(args.modes.split(","))
    stream = rng.random() < 0.5
    cancel = stream and rng.random() < args.cancel_share * 2  # share of all requests
    chat = rng.random() < 0.5
    topic = L.TOPICS[(i + j) % len(L.TOPICS)]
    body = {"model": "m", "max_tokens": args.max_tokens, "temperature": 0 if j % 3 else 0.8,
            "seed": i * 100003 + j, "stream": stream, **MODES[mode]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Client {i} asks {j}: {topic}?"}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = f"Client {i}, request {j}: tell me about {topic}."
        path = "/v1/completions"
    kind = "cancelled" if cancel else ("stream" if stream else "plain")
    return path, body, kind


async def soak(url: str, pid: int, args) -> dict:
    results: list[tuple[str, L.Result]] = []
    samples: list[tuple[float, int | None]] = []
    t0 = time.perf_counter()
    deadline = t0 + args.duration

    async def sampler():
        while time.perf_counter() < deadline:
            await asyncio.sleep(min(args.rss_every, max(0.0, deadline - time.perf_counter())))
            samples.append((time.perf_counter() - t0, rss_kb(pid)))

    async def one_client(i: int, http):
        rng = random.Random(i)
        for j in range(10**9):  # bounded by the deadline (and by `bounded`'s limit)
            if time.perf_counter() >= deadline:
                return
            path, body, kind = body_for(rng, i, j, args)
            r = L.Result()
            results.append((kind, r))
            await L.request(http, url, path, body, r,
                            cancel_after_chunks=1 if kind == "cancelled" else None)

    samples.append((0.0, rss_kb(pid)))
    async with L.client(args.clients, args.duration + args.grace) as http:
        s = asyncio.ensure_future(sampler())
        wall, cut = await L.bounded([one_client(i, http) for i in range(args.clients)],
                                    args.duration + args.grace)
        s.cancel()
    return {"results": results, "samples": samples, "wall": wall, "cut_clients": cut}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF file (default: the tiny synthetic preset)")
    ap.add_argument("--preset", default="tiny", help="synthetic preset when no --model")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600, help="seconds of load")
    ap.add_argument("--grace", type=float, default=60,
                    help="seconds in-flight requests get after --duration before being cut")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--modes", default="ar,greedy", help=f"decode modes ({', '.join(MODES)})")
    ap.add_argument("--cancel-share", type=float, default=0.05,
                    help="share of requests closed after their first content chunk")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-sequences", type=int, default=16)
    ap.add_argument("--max-waiting", type=int, default=256)
    ap.add_argument("--prefix-cache-tokens", type=int, default=4096)
    ap.add_argument("--rss-every", type=float, default=10, help="RSS sampling period, seconds")
    ap.add_argument("--json", type=Path, help="also write the report as JSON")
    args = ap.parse_args()
    for m in args.modes.split(","):
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; expected some of {', '.join(MODES)}")
    L.raise_on_sigterm()

    from dlmnumba.bench import environment_info

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        path = args.model or L.preset_model(args.preset, tmp)
        port = L.free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-c", SERVER, path, str(port), str(args.threads),
                str(args.max_sequences), str(args.max_waiting), str(args.prefix_cache_tokens)]
        print(f"model {path}; {args.clients} clients for {args.duration:.0f} s, max_tokens "
              f"{args.max_tokens}, modes {args.modes}; server: {args.threads} threads, "
              f"max_sequences {args.max_sequences}, prefix cache {args.prefix_cache_tokens} "
              f"tokens", flush=True)
        with L.subprocess_server(argv, url + "/health", "dlmnumba-soak") as proc:
            warm_up(url, args)
            out = asyncio.run(soak(url, proc.pid, args))
            time.sleep(2)  # cancelled requests leave at the engine's next step
            end_rss = rss_kb(proc.pid)
            g = gauges(url)
    report = make_report(out, end_rss, g, args)
    print_report(report)
    if args.json:
        report.update(environment=environment_info(), model=path,
                      args={k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()})
        args.json.write_text(json.dumps(report, indent=2))
    if report["errors"] or not report["slots_free"]:
        sys.exit(1)


def warm_up(url: str, args) -> None:
    """Requests of every kind and mode, alone and together (JIT, first-touch), before the
    start RSS is read."""
    rng = random.Random(-1)
    reqs = [body_for(rng, 1000 + j, 0, args) for j in range(24)]

    async def go():
        async with L.client(len(reqs), 600) as http:
            rs = await asyncio.gather(*(L.request(http, url, p, b, L.Result())
                                        for p, b, _ in reqs))
            bad = [r.error for r in rs if not r.ok]
            if bad:
                raise SystemExit(f"warm-up requests failed: {bad[0]}")
    asyncio.run(go())


def make_report(out: dict, end_rss: int | None, g: dict, args) -> dict:
    res, samples = out["results"], out["samples"]
    by_kind = {}
    for kind in ("plain", "stream", "cancelled"):
        rs = [r for k, r in res if k == kind]
        by_kind[kind] = {"requests": len(rs), "ok": sum(r.ok for r in rs),
                         "errors": sum(r.error is not None for r in rs),
                         "cancelled": sum(r.cancelled for r in rs)}
    all_r = [r for _, r in res]
    served = [r for r in all_r if r.ok and not r.cancelled]
    lat = [r.latency for r in served if r.latency is not None]
    errors = [r.error for r in all_r if r.error]
    rss = [kb for _, kb in samples if kb is not None]
    start = rss[0] if rss else None
    end = end_rss if end_rss is not None else (rss[-1] if rss else None)
    flat = (None if start is None or end is None
            else end <= start * (1 + FLAT_GROWTH) + FLAT_SLACK_KB)
    mid = next((kb for t, kb in samples if t >= args.duration / 2 and kb is not None), None)
    half = None if mid is None or end is None else end - mid
    running = g.get("dlmnumba_running_sequences")
    waiting = g.get("dlmnumba_waiting_sequences")
    return {"clients": args.clients, "duration_s": args.duration, "wall_s": out["wall"],
            "requests": len(all_r), "served": len(served),
            "cancelled": sum(r.cancelled for r in all_r), "cut": sum(r.cut for r in all_r),
            "errors": len(errors), "error_samples": sorted(set(errors))[:5], "by_kind": by_kind,
            "tokens": sum(r.tokens for r in served),
            "latency_p50_s": L.pct(lat, 50), "latency_p99_s": L.pct(lat, 99),
            "rss_start_kb": start, "rss_end_kb": end, "rss_peak_kb": max(rss + [end or 0]) or None,
            "rss_growth_kb": None if start is None or end is None else end - start,
            "rss_flat": flat, "rss_growth_second_half_kb": half, "rss_samples": samples,
            "running_after": running, "waiting_after": waiting,
            "slots_free": running == 0 and waiting == 0,
            "server_requests_generated_tokens": g.get("dlmnumba_generated_tokens_total")}


def print_report(r: dict) -> None:
    mb = lambda kb: "-" if kb is None else f"{kb / 1024:.1f} MiB"  # noqa: E731
    print(f"requests {r['requests']} in {r['wall_s']:.1f} s: served {r['served']}, cancelled on "
          f"purpose {r['cancelled']}, cut at the end {r['cut']}, errors {r['errors']}")
    for k, v in r["by_kind"].items():
        print(f"  {k:<10} {v['requests']:>6} requests, {v['ok']:>6} ok, {v['errors']:>4} errors")
    for e in r["error_samples"]:
        print(f"  error: {e}")
    print(f"tokens {r['tokens']} ({r['tokens'] / r['wall_s']:.1f} tok/s); latency p50 / p99 "
          f"{L.fmt(r['latency_p50_s'])} / {L.fmt(r['latency_p99_s'])} s")
    series = " ".join(f"{t:.0f}s:{mb(kb)}" for t, kb in r["rss_samples"])
    print(f"RSS start {mb(r['rss_start_kb'])}, end {mb(r['rss_end_kb'])}, peak "
          f"{mb(r['rss_peak_kb'])}, growth {mb(r['rss_growth_kb'])} "
          f"({'flat' if r['rss_flat'] else 'NOT flat'}: limit +{FLAT_GROWTH:.0%} + "
          f"{FLAT_SLACK_KB // 1024} MiB); growth over the second half "
          f"{mb(r['rss_growth_second_half_kb'])}")
    print(f"  samples: {series}")
    print(f"after the run: running sequences {r['running_after']}, waiting "
          f"{r['waiting_after']} ({'all slots free' if r['slots_free'] else 'SLOTS LEAKED'})")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; servers stopped")
