"""Replica layouts on one machine, same load, same run: the local backend (1 replica x all
threads), Ray Serve with 1 replica x all threads (what Ray adds per request), and Ray with
several replicas x fewer threads.

    python bench/cluster_layouts.py                        # built-in 2B-4T model, 8 clients
    python bench/cluster_layouts.py --layouts local:1x2,ray:1x2,ray:2x1 --concurrency 8

Each layout is started on 127.0.0.1 and a free port, warmed up, loaded by `--concurrency`
streaming clients (bench/loadgen.py, the same load as bench/serve_load.py: distinct prompts,
temperature 0, `--max-tokens`), and stopped.  Reported per layout: aggregate tok/s, requests/s,
TTFT and latency p50/p99, and latency relative to the local backend.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load as S  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(layout: str, cfg):
    """(url, stop) of a running server in this layout ("local:1x2", "ray:2x1")."""
    import httpx

    backend, shape = layout.split(":")
    replicas, threads = (int(x) for x in shape.split("x"))
    port = _port()
    if backend == "local":
        from dlmnumba.server.app import create_app
        from dlmnumba.server.build import load_model, server_state
        from dlmnumba.server.run import ThreadedServer

        c = dataclasses.replace(cfg, threads=threads)
        srv = ThreadedServer(create_app(server_state(c), load=lambda: load_model(c)),
                             port=port).start()
        stop = srv.stop
    else:
        from dlmnumba.cluster import ray_serve

        c = dataclasses.replace(cfg, port=port, cluster=dataclasses.replace(
            cfg.cluster, backend="ray", replicas=replicas, threads_per_replica=threads))
        ray_serve.start(c)
        stop = ray_serve.stop
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/health", timeout=5, trust_env=False).status_code == 200:
                return url, stop
        except httpx.TransportError:
            pass
        if time.monotonic() - t0 > 600:
            stop()
            raise RuntimeError(f"{layout}: not ready after 600 s")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--layouts", default="local:1x2,ray:1x2,ray:2x1")
    ap.add_argument("--mode", default="ar", choices=list(S.SETTINGS))
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--duration-limit", type=float, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from dlmnumba.config import load_config
    from dlmnumba.model_source import resolve_model_path

    path = args.model or str(resolve_model_path(None, "bench", progress=True))
    extra = S.SETTINGS[args.mode]
    cli = {"model_path": path, "scheduler.max_sequences": max(16, args.concurrency),
           "sampling.max_tokens": args.max_tokens,
           **{f"dlm.{'decode_mode' if k == 'mode' else k}": v for k, v in extra.items()}}
    cfg = load_config(env={}, cli=cli)
    rows = []
    print(f"model {path}; {args.concurrency} clients x {args.requests_per_client} streaming "
          f"requests, max_tokens {args.max_tokens}, mode {args.mode}")
    print(f"{'layout':<10}{'tok/s':>8}{'req/s':>8}{'TTFT p50/p99 (s)':>20}"
          f"{'latency p50/p99 (s)':>22}{'latency vs local':>18}{'errors':>8}")
    for layout in args.layouts.split(","):
        url, stop = start(layout, cfg)
        try:
            S.warm_up(url, extra, chat=False)
            r = S.single_turn(url, extra, args.concurrency, args, layout)
        finally:
            stop()
        r["layout"] = layout
        r["requests_per_s"] = r["requests"] / r["wall_s"] if r.get("wall_s") else None
        rows.append(r)
        base = rows[0]["latency_p50_s"]
        print(f"{layout:<10}{r['tok_s']:>8.2f}{r['requests_per_s']:>8.3f}"
              f"{r['ttft_p50_s']:>10.2f} / {r['ttft_p99_s']:<7.2f}"
              f"{r['latency_p50_s']:>11.2f} / {r['latency_p99_s']:<8.2f}"
              f"{r['latency_p50_s'] / base:>12.3f}x{r['errors']:>8}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
