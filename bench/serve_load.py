"""Load test of OpenAI-compatible servers: dlmnumba (`ar`, greedy diffusion) against
llama-cpp-python's server on the same GGUF file, driven by the same asyncio load generator.

    python bench/serve_load.py                       # built-in 2B-4T-shaped model, 1/4/16 clients
    python bench/serve_load.py --preset tiny --concurrency 1,4 --max-tokens 8   # quick check
    python bench/serve_load.py --target dlmnumba --settings ar --concurrency 16 --json out.json
    python bench/serve_load.py --target http://127.0.0.1:8000 --url-settings greedy
    python bench/serve_load.py --multi-turn 4        # chat TTFT per turn, prefix cache on/off

Targets: `dlmnumba` (our server in this process, one per setting: `ar`, and greedy diffusion
with 64-token blocks and block attention; max_sequences = the largest concurrency),
`dlmnumba-proc` (the same as `dlmnumba serve` in its own process, as users run it),
`llamacpp` (`python -m llama_cpp.server`, same file, same threads, `--interrupt_requests False`
so that a new request waits instead of cutting the streaming one short), `llama-server`
(llama.cpp's own server, continuous batching over as many slots as the largest concurrency,
each with --n-ctx tokens; build it with `bash scripts/build_llama_server.sh`, or pass
--llama-server PATH), or the URL of a running loopback server.  Subprocess servers run on a
free loopback port and are always stopped at the end.  Each of C clients sends
`--requests-per-client` streaming requests one after another (`/v1/completions`, temperature 0,
distinct prompts); per request the client times the first non-empty content (TTFT) and [DONE]
(latency), and takes the completion tokens from the usage chunk (llama-cpp-python sends none:
there, its token chunks are counted, one per token).  Aggregate tok/s = completion tokens of
finished requests / wall time of the measurement.  Random-weight models may stop early at an end
token: tokens/request is reported beside every row.  Every measurement stops by itself after
`--duration-limit` seconds (unfinished requests are reported as `cut`).

--multi-turn N: instead, each client holds an N-turn conversation over /v1/chat/completions
(each turn resends the whole history plus a new user message); TTFT per turn, for our server
with the prefix cache off and on, in the same run.

Issue targets checked at the end: 16 `ar` clients >= 5x llama-cpp-python's tok/s and >= 4x
llama-server's (the `dlmnumba-proc` row when measured: both servers in their own processes);
at 1 client greedy latency <= 0.5x `ar`'s; turn-N chat TTFT with the prefix cache <= 0.5x
without.  The "vs llama" column divides by llama-server's row at the same concurrency when it
was measured, else by llama-cpp-python's.  Note: the `dlmnumba` target shares this process
(and its GIL) with the load generator.

    python bench/serve_load.py --target llama-server --target dlmnumba-proc --settings ar \
        --concurrency 1,16
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen as L  # noqa: E402

ANCHORS = ("llama-server", "llamacpp")  # llama.cpp's servers: the "vs llama" ratios
LOCAL_TARGETS = ANCHORS + ("dlmnumba", "dlmnumba-proc")  # started by this script
SETTINGS = {  # name -> extra body fields (also the server's default decode settings)
    "ar": {"mode": "ar"},
    "greedy": {"mode": "greedy", "block_size": 64, "attention": "block"},
}


# -- measurements -------------------------------------------------------------------------------
def single_turn(url: str, extra: dict, c: int, args, tag: str) -> dict:
    """C clients x requests-per-client streaming completions; the summary row."""
    async def go():
        results: list[L.Result] = []
        deadline = time.perf_counter() + args.duration_limit
        async with L.client(c, args.duration_limit + 30) as http:
            async def one_client(i: int):
                for j in range(args.requests_per_client):
                    if time.perf_counter() > deadline:
                        return
                    body = {"model": "m", "prompt": f"Request {tag}-{i}-{j}: tell me about "
                            f"{L.TOPICS[(i + j) % len(L.TOPICS)]}.",
                            "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}, **extra}
                    r = L.Result()
                    results.append(r)
                    await L.request(http, url, "/v1/completions", body, r)
            wall, _ = await L.bounded([one_client(i) for i in range(c)], args.duration_limit)
        return L.summarize(results, wall)
    return asyncio.run(go())


def multi_turn(url: str, extra: dict, c: int, args, tag: str) -> dict:
    """C clients, each an N-turn chat; TTFT / latency per turn."""
    turns = args.multi_turn

    async def go():
        per_turn: list[list[L.Result]] = [[] for _ in range(turns)]
        deadline = time.perf_counter() + args.duration_limit
        async with L.client(c, args.duration_limit + 30) as http:
            async def conversation(i: int):
                topic = L.TOPICS[i % len(L.TOPICS)]
                messages = [{"role": "system", "content": "You are a concise assistant."}]
                for t in range(turns):
                    if time.perf_counter() > deadline:
                        return
                    messages.append({"role": "user", "content":
                                     f"Conversation {tag}-{i}: tell me about {topic}." if t == 0
                                     else f"Turn {t + 1}: say more about {topic}, please."})
                    body = {"model": "m", "messages": list(messages),
                            "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}, **extra}
                    r = L.Result()
                    per_turn[t].append(r)
                    await L.request(http, url, "/v1/chat/completions", body, r)
                    if not r.ok:
                        return
                    messages.append({"role": "assistant", "content": r.text})
            wall, _ = await L.bounded([conversation(i) for i in range(c)], args.duration_limit)
        return {"wall_s": wall, "turns": [L.summarize(rs, wall) for rs in per_turn]}
    return asyncio.run(go())


def prefix_hits(url: str) -> float | None:
    """dlmnumba_prefix_cache_hit_tokens from /metrics (None if the server has no such metric)."""
    import httpx

    try:
        for line in httpx.get(url + "/metrics", timeout=10, trust_env=False).text.splitlines():
            if line.startswith("dlmnumba_prefix_cache_hit_tokens_total "):
                return float(line.split()[-1])
    except httpx.HTTPError:
        pass
    return None


def warm_up(url: str, extra: dict, chat: bool) -> None:
    """One short untimed request (JIT, first-touch) before measuring."""
    async def go():
        async with L.client(1, 600) as http:
            body = {"model": "m", "max_tokens": 4, "temperature": 0, "stream": True, **extra}
            if chat:
                body["messages"] = [{"role": "user", "content": "Hello there."}]
            else:
                body["prompt"] = "Hello there."
            r = await L.request(http, url, "/v1/chat/completions" if chat else "/v1/completions",
                                body, L.Result())
            if not r.ok:
                raise RuntimeError(f"warm-up request to {url} failed: {r.error}")
    asyncio.run(go())


# -- printing -----------------------------------------------------------------------------------
HEADER = (f"{'target':<14}{'setting':<9}{'C':>4}{'req':>5}{'err':>4}{'cut':>4}{'tok/req':>8}"
          f"{'tok/s':>9}{'vs llama':>9}   {'TTFT p50 / p99 (s)':>19}"
          f"   {'latency p50 / p99 (s)':>21}")


def _label(target: str) -> str:
    """A URL target by its port (the full URL is in the JSON and the header line)."""
    return target if "://" not in target else f":{urlparse(target).port}"


def print_row(r: dict) -> None:
    ratio = f"{r['tok_s_vs_llamacpp']:.2f}x" if r.get("tok_s_vs_llamacpp") else "-"
    print(f"{_label(r['target']):<14}{r['setting']:<9}{r['concurrency']:>4}{r['requests']:>5}"
          f"{r['errors']:>4}{r['cut']:>4}{L.fmt(r['tokens_per_request'], '.1f'):>8}"
          f"{L.fmt(r['tok_s']):>9}{ratio:>9}   "
          f"{L.fmt(r['ttft_p50_s']):>9} / {L.fmt(r['ttft_p99_s']):<7}"
          f"{L.fmt(r['latency_p50_s']):>13} / {L.fmt(r['latency_p99_s']):<7}", flush=True)
    for e in r["error_samples"]:
        print(f"    error: {e}", flush=True)


def print_multi(r: dict) -> None:
    cells = "".join(f"{L.fmt(t['ttft_p50_s']):>8}" for t in r["turns"])
    lat = "".join(f"{L.fmt(t['latency_p50_s']):>8}" for t in r["turns"])
    errs = sum(t["errors"] for t in r["turns"])
    hits = "-" if r.get("prefix_hit_tokens") is None else f"{r['prefix_hit_tokens']:.0f}"
    print(f"{_label(r['target']):<14}{r['setting']:<9}{r['cache']:<6}{r['concurrency']:>4}{errs:>4}"
          f"{hits:>7}   {cells}   |{lat}", flush=True)
    for t in r["turns"]:
        for e in t["error_samples"]:
            print(f"    error: {e}", flush=True)


# -- verdicts -----------------------------------------------------------------------------------
def single_verdicts(rows: list[dict]) -> dict:
    def get(target, setting, c):
        return next((r for r in rows if r["target"] == target and r["setting"] == setting
                     and r["concurrency"] == c and r["ok"]), None)

    out: dict = {}
    cs = sorted({r["concurrency"] for r in rows})
    top = 16 if 16 in cs else (cs[-1] if cs else None)
    ar_top = get("dlmnumba-proc", "ar", top) or get("dlmnumba", "ar", top)
    for anchor, key, target in (("llamacpp", "ar_vs_llamacpp_tok_s", 5.0),
                                ("llama-server", "ar_vs_llama_server_tok_s", 4.0)):
        ll_top = get(anchor, "plain", top)
        if ar_top and ll_top and ll_top["tok_s"]:
            x = ar_top["tok_s"] / ll_top["tok_s"]
            out[key] = {"concurrency": top, "ratio": x, "target": target, "met": x >= target,
                        "ours": ar_top["target"]}
    ar1, gr1 = get("dlmnumba", "ar", 1), get("dlmnumba", "greedy", 1)
    if ar1 and gr1 and ar1["latency_p50_s"] and gr1["latency_p50_s"] is not None:
        x = gr1["latency_p50_s"] / ar1["latency_p50_s"]
        out["greedy_vs_ar_latency_c1"] = {"ratio": x, "target": 0.5, "met": x <= 0.5,
                                          "tokens_per_request": [ar1["tokens_per_request"],
                                                                 gr1["tokens_per_request"]]}
    cross = []
    for c in cs:
        a, g = get("dlmnumba", "ar", c), get("dlmnumba", "greedy", c)
        if a and g and a["tok_s"] and g["tok_s"]:
            cross.append({"concurrency": c, "tok_s_ar": a["tok_s"], "tok_s_greedy": g["tok_s"],
                          "faster": "ar" if a["tok_s"] > g["tok_s"] else "greedy",
                          "latency_p50_ar": a["latency_p50_s"],
                          "latency_p50_greedy": g["latency_p50_s"]})
    if cross:
        flip = next((x["concurrency"] for x in cross if x["faster"] != cross[0]["faster"]), None)
        out["crossover"] = {"by_concurrency": cross, "first_faster": cross[0]["faster"],
                            "flips_at": flip}
    return out


def multi_verdicts(rows: list[dict], turns: int) -> list[dict]:
    out = []
    for r_on in rows:
        if r_on["cache"] != "on":
            continue
        r_off = next((r for r in rows if r["cache"] == "off" and r["setting"] == r_on["setting"]
                      and r["concurrency"] == r_on["concurrency"]
                      and r["target"] == r_on["target"]), None)
        if r_off is None:
            continue
        on, off = r_on["turns"][-1]["ttft_p50_s"], r_off["turns"][-1]["ttft_p50_s"]
        if on is not None and off:
            out.append({"setting": r_on["setting"], "concurrency": r_on["concurrency"],
                        "turn": turns, "ttft_on_s": on, "ttft_off_s": off, "ratio": on / off,
                        "target": 0.5, "met": on / off <= 0.5})
    return out


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append",
                    help="dlmnumba, dlmnumba-proc, llamacpp, llama-server or a loopback URL; "
                         "repeatable (default: dlmnumba and llamacpp; with --multi-turn: "
                         "dlmnumba)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="GGUF file (default: the built-in 2B-4T-shaped model)")
    src.add_argument("--preset", help="a synthetic preset written to a temporary folder "
                                      "(e.g. tiny, small)")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"dlmnumba decode settings to run ({', '.join(SETTINGS)})")
    ap.add_argument("--url-settings", default="plain",
                    help="extra fields sent to a URL target: plain (none) or any of --settings")
    ap.add_argument("--concurrency", default="1,4,16", help="concurrent client counts")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--duration-limit", type=float, default=600,
                    help="hard bound on one measurement, seconds")
    ap.add_argument("--threads", type=int, default=2, help="threads of both servers")
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp's context size")
    ap.add_argument("--multi-turn", type=int, default=0, metavar="N",
                    help="N-turn chats instead of single completions")
    ap.add_argument("--prefix-cache-tokens", type=int, default=8192,
                    help="prefix cache budget of the 'on' runs (--multi-turn)")
    ap.add_argument("--llama-server", metavar="PATH",
                    help="llama-server binary (default: $LLAMA_SERVER, PATH, or the one "
                         "scripts/build_llama_server.sh writes)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    L.raise_on_sigterm()

    cs = [int(c) for c in args.concurrency.split(",")]
    settings = [s for s in args.settings.split(",") if s]
    for s in settings + [s for s in args.url_settings.split(",") if s != "plain"]:
        if s not in SETTINGS:
            ap.error(f"unknown setting {s!r}; expected one of {', '.join(SETTINGS)}")
    targets = args.target or (["dlmnumba"] if args.multi_turn else ["dlmnumba", "llamacpp"])
    for t in targets:
        if t not in LOCAL_TARGETS:
            L.check_loopback(t)
    if "llama-server" in targets:
        args.llama_server = L.llama_server_binary(args.llama_server)  # fail before measuring
    # llama.cpp first, so every later row can show its ratio against it
    order = {t: i for i, t in enumerate(ANCHORS + ("dlmnumba", "dlmnumba-proc"))}
    targets = sorted(targets, key=lambda t: order.get(t, len(order)))

    tmp = tempfile.TemporaryDirectory(prefix="serve_load-")
    try:
        if not set(LOCAL_TARGETS) & set(targets):
            path = None  # URL targets only: each server has its own model
        elif args.preset:
            path = L.preset_model(args.preset, tmp.name)
        else:
            path = args.model or L.default_model()
        run(args, targets, settings, cs, path)
    finally:
        tmp.cleanup()


def run(args, targets: list[str], settings: list[str], cs: list[int], path: str | None
        ) -> None:
    from dlmnumba.bench import environment_info

    model = None

    def our_model():
        nonlocal model
        if model is None:
            import dlmnumba

            model = dlmnumba.load_model(path, threads=args.threads)
        return model

    def servers():
        """(target, setting, cache, url context factory, extra body fields) to measure."""
        from dlmnumba import DecodeSettings

        caches = ("off", "on") if args.multi_turn else ("off",)
        for t in targets:
            if t == "llamacpp":
                yield t, "plain", "-", lambda: L.llamacpp_server(path, args.threads,
                                                                 args.n_ctx), {}
            elif t == "llama-server":
                yield t, "plain", "-", lambda: L.llama_server(
                    args.llama_server, path, args.threads, args.n_ctx, max(cs)), {}
            elif t == "dlmnumba-proc":
                for s in settings:
                    yield t, s, "off", (lambda s=s: L.dlmnumba_process_server(
                        path, args.threads, SETTINGS[s], max(cs))), dict(SETTINGS[s])
            elif t == "dlmnumba":
                for s in settings:
                    for cache in caches:
                        tokens = args.prefix_cache_tokens if cache == "on" else 0
                        yield t, s, cache, (lambda s=s, tokens=tokens: L.dlmnumba_server(
                            our_model(), DecodeSettings(**SETTINGS[s]), max_sequences=max(cs),
                            prefix_cache_tokens=tokens)), dict(SETTINGS[s])
            else:
                for s in args.url_settings.split(","):
                    yield (t, s, "?", (lambda t=t: contextlib.nullcontext(L.check_loopback(t))),
                           dict(SETTINGS.get(s, {})))

    urls = [t for t in targets if t not in LOCAL_TARGETS]
    print(f"model {path or 'of the server'}; {args.threads} threads; concurrency {cs}; "
          f"{args.requests_per_client if not args.multi_turn else args.multi_turn} "
          f"{'requests' if not args.multi_turn else 'turns'} per client, max_tokens "
          f"{args.max_tokens}" + (f"; URL targets {', '.join(urls)}" if urls else ""), flush=True)
    if args.multi_turn:
        print(f"{'target':<10}{'setting':<9}{'cache':<6}{'C':>4}{'err':>4}{'hits':>7}   "
              f"{'TTFT p50 (s) per turn':<{8 * args.multi_turn}}   | latency p50 (s) per turn",
              flush=True)
    else:
        print(HEADER, flush=True)
    rows: list[dict] = []
    tag = 0
    for target, setting, cache, server, extra in servers():
        with server() as url:
            warm_up(url, extra, chat=bool(args.multi_turn))
            for c in cs:
                tag += 1
                if args.multi_turn:
                    hits0 = prefix_hits(url)
                    r = multi_turn(url, extra, c, args, str(tag))
                    hits1 = prefix_hits(url)
                    r.update(target=target, setting=setting, cache=cache, concurrency=c,
                             prefix_hit_tokens=None if hits0 is None or hits1 is None
                             else hits1 - hits0)
                    rows.append(r)
                    print_multi(r)
                    continue
                r = single_turn(url, extra, c, args, str(tag))
                r.update(target=target, setting=setting, concurrency=c)
                ll = next((x for a in ANCHORS for x in rows if x["target"] == a
                           and x["concurrency"] == c), None)
                if ll and ll["tok_s"] and r["tok_s"] is not None and target not in ANCHORS:
                    r["vs"] = ll["target"]
                    r["tok_s_vs_llamacpp"] = r["tok_s"] / ll["tok_s"]
                    if ll["latency_p50_s"] and r["latency_p50_s"] is not None:
                        r["latency_p50_vs_llamacpp"] = r["latency_p50_s"] / ll["latency_p50_s"]
                rows.append(r)
                print_row(r)

    verdicts = (multi_verdicts(rows, args.multi_turn) if args.multi_turn
                else single_verdicts(rows))
    print_verdicts(verdicts, args.multi_turn)
    if args.json:
        args.json.write_text(json.dumps(
            {"rows": rows, "verdicts": verdicts, "environment": environment_info(),
             "model": path, "threads": args.threads,
             "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
            indent=2))


def print_verdicts(v, multi: int) -> None:
    print("\ntargets:")
    if multi:
        if not v:
            print("  (no cache on/off pair measured)")
        for x in v:
            print(f"  turn-{x['turn']} chat TTFT, prefix cache on / off ({x['setting']}, "
                  f"C={x['concurrency']}): {x['ttft_on_s']:.3f} / {x['ttft_off_s']:.3f} s = "
                  f"{x['ratio']:.2f}x (target <= 0.5x: {'met' if x['met'] else 'NOT met'})")
        return
    for key, name in (("ar_vs_llamacpp_tok_s", "llama-cpp-python"),
                      ("ar_vs_llama_server_tok_s", "llama-server")):
        if key in v:
            x = v[key]
            print(f"  ar tok/s ({x['ours']}) vs {name} at C={x['concurrency']}: "
                  f"{x['ratio']:.2f}x (target >= {x['target']:g}x: "
                  f"{'met' if x['met'] else 'NOT met'})")
    if "greedy_vs_ar_latency_c1" in v:
        x = v["greedy_vs_ar_latency_c1"]
        tpr = "/".join(L.fmt(t, ".1f") for t in x["tokens_per_request"])
        print(f"  greedy vs ar latency p50 at C=1: {x['ratio']:.2f}x (target <= 0.5x: "
              f"{'met' if x['met'] else 'NOT met'}; tokens/request ar/greedy {tpr})")
    if "crossover" in v:
        x = v["crossover"]
        steps = ", ".join(f"C={y['concurrency']}: {y['faster']}" for y in x["by_concurrency"])
        where = (f"flips at C={x['flips_at']}" if x["flips_at"] else "no crossover in range")
        print(f"  higher aggregate tok/s: {steps} ({where})")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; servers stopped")
