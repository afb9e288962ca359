"""`--mode spec`: how often its drafts are accepted, and what that buys, in one run.

    python bench/spec.py                        # bundled toy model + the built-in 2B-4T shape
    python bench/spec.py --n 50 --drafts 4,8,16,32 --json out.json

1. The bundled toy model on its held-out tasks (`--n` prompts per task, the chat form it was
   trained on): per draft setting (fixed sizes `--drafts`, and the adaptive rule), the
   accepted fraction of the draft tokens, generated tokens per pass and tok/s, per task and
   overall; `ar` and iterative 0.9 (block 32 / 8, dual cache) in the same run.  spec's
   tokens are checked equal to ar's (an error otherwise).
2. The 2B-4T shape (built-in random-weight model): ms per pass of [1 committed token + k
   drafts + B masks] after a ~100-token prefix, against an `ar` step (median of
   `--repeats`); then end-to-end tok/s (128 tokens, `--iterations` rounds taking turns) with
   the toy model's acceptance replayed (random weights accept nothing): from the toy's
   verifying passes, the probability that draft token i is accepted given the ones before it
   were (`acceptance_rates`: counted only up to the answer's stop token, since the toy's
   answers are short and a long generation goes on), then each verifying pass accepts draft
   tokens one by one with those probabilities (seeded), against `ar` and iterative 0.9 with the dual cache (its commit
   schedule replayed: bench/refine_cost.py).
3. The real server on loopback, one client: a 128-token completion's latency in `ar` and in
   spec's default settings (the same replay, in the server's process).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from forward_pass import default_model  # noqa: E402
from refine_cost import replay, toy_schedule  # noqa: E402

DEFAULT = "spec adaptive 16"  # the default settings (dlm.draft_policy, dlm.draft_size)
ITERATIVE = dict(mode="iterative", block_size=32, small_block_size=8, threshold=0.9,
                 dual_cache=True)


def spec_settings(drafts: list[int]) -> dict[str, dict]:
    """name -> DecodeSettings keywords of each spec setting measured."""
    out = {f"spec {k}": dict(mode="spec", draft_size=k, draft_policy="fixed") for k in drafts}
    for k in sorted({16, max(drafts)}):  # the default (adaptive, at most 16), and the largest
        out[f"spec adaptive {k}"] = dict(mode="spec", draft_size=k, draft_policy="adaptive")
    return out


def toy_runs(n: int, drafts: list[int]) -> tuple[dict, dict[str, list[tuple[int, int]]]]:
    """Per setting and task: accepted fraction, tokens per pass, tok/s; and per spec setting
    the (drafted, accepted) of every verifying pass, in order (the replay schedule)."""
    import dlmnumba
    from dlmnumba import DecodeSettings, Generator
    from dlmnumba.chat import chat_prompt
    from dlmnumba.decode.spec import SpecRequest
    from dlmnumba.model_source import TOY_MODEL
    from dlmnumba.tasks import TASKS, heldout

    m = dlmnumba.load_model(str(TOY_MODEL))
    stops = set(m.spec.eog_ids)
    enc = m.tokenizer.encode
    prompts = {t: [enc(chat_prompt(m.file.metadata, e.prompt)) for e in heldout(t, n)]
               for t in TASKS}
    runs = {"ar": dict(mode="ar"), "iterative 0.9, dual cache": ITERATIVE,
            **spec_settings(drafts)}
    table: dict = {}
    schedules: dict[str, list[tuple[int, int]]] = {}
    want: dict[str, list] = {}
    real = SpecRequest._accept
    for name, kw in runs.items():
        gen = Generator(m, DecodeSettings(max_tokens=48, **kw))
        seen: list[tuple[int, int]] = []

        def record(draft, picks):
            j = real(draft, picks)
            # the draft positions that matter: up to ar's first stop token (after it, both
            # sides predict what follows an answer, which no 128-token replay should count)
            end = next((i + 1 for i, t in enumerate(picks) if t in stops), len(draft))
            if draft:
                seen.append((len(draft), j, min(len(draft), end)))
            return j
        SpecRequest._accept = staticmethod(record)
        try:
            for p in prompts["add"][:3]:
                gen.generate(p)  # warm-up (the JIT compile)
            seen.clear()
            rows = {}
            for t, ps in prompts.items():
                t0 = time.perf_counter()
                outs = [gen.generate(p) for p in ps]
                wall = time.perf_counter() - t0
                if name == "ar":
                    want[t] = [o.tokens for o in outs]
                elif kw["mode"] == "spec" and [o.tokens for o in outs] != want[t]:
                    raise SystemExit(f"{name}: tokens differ from ar's on task {t}")
                tok = sum(o.stats.generated_tokens for o in outs)
                rows[t] = {"tokens": tok,
                           "passes": sum(o.stats.forward_passes for o in outs),
                           "drafted": sum(o.stats.draft_tokens for o in outs),
                           "accepted": sum(o.stats.accepted_tokens for o in outs),
                           "seconds": wall}
        finally:
            SpecRequest._accept = staticmethod(real)
        rows["all"] = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
        table[name] = rows
        if kw["mode"] == "spec":
            schedules[name] = list(seen)
    return table, schedules


def print_toy(table: dict) -> None:
    tasks = list(next(iter(table.values())))
    print("bundled toy model, held-out tasks: accepted % of draft tokens / tokens per pass")
    print(f"{'setting':<28}" + "".join(f"{t:>14}" for t in tasks) + f"{'tok/s':>9}")
    for name, rows in table.items():
        cells = []
        for t in tasks:
            r = rows[t]
            acc = f"{100 * r['accepted'] / r['drafted']:.0f}%" if r["drafted"] else "-"
            cells.append(f"{acc:>6} {r['tokens'] / r['passes']:>6.2f}")
        a = rows["all"]
        print(f"{name:<28}" + "".join(f"{c:>14}" for c in cells)
              + f"{a['tokens'] / a['seconds']:>9.1f}")


def pass_costs(model_path: str, threads: int, repeats: int, sizes: list[int]) -> list[dict]:
    """ms of a spec pass [1 + k drafts + B masks] (k = B) and of an ar step, ~100-token
    prefix."""
    import dlmnumba
    from dlmnumba.model.batch import CAUSAL_MASK, Output, Segment

    m = dlmnumba.load_model(model_path, threads=threads)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, m.spec.n_vocab - 1, 100).tolist()
    cache = m.new_cache(256)
    m.forward_batch([Segment(prefix, cache, None, CAUSAL_MASK, [], Output.HIDDEN)])
    start = cache.length

    def timed(tokens, mask, rows):
        ts = []
        for _ in range(repeats + 1):
            seg = Segment(tokens, cache, None, mask, rows, Output.ARGMAX, m.spec.mask_id)
            t0 = time.perf_counter()
            m.forward_batch([seg])
            ts.append(time.perf_counter() - t0)
            cache.truncate(start)
        return statistics.median(ts[1:]) * 1e3

    ar = timed([5], CAUSAL_MASK, [0])
    out = [{"drafts": 0, "masks": 0, "ms": ar, "x_ar": 1.0}]
    for b in sizes:
        for k in sorted({0, b}):
            toks = [5] + rng.integers(0, m.spec.n_vocab - 1, k).tolist() + [m.spec.mask_id] * b
            ms = timed(toks, CAUSAL_MASK.with_tail(start + 1 + k), list(range(len(toks))))
            out.append({"drafts": k, "masks": b, "ms": ms, "x_ar": ms / ar})
    return out


def end_to_end(model_path: str, threads: int, iterations: int, schedules: dict,
               iterative_schedule: list[int]) -> dict:
    """tok/s of 128-token requests: ar, iterative 0.9 dual cache (its toy commit schedule
    replayed), and each spec setting with its toy acceptance replayed; taking turns."""
    import dlmnumba
    from dlmnumba import DecodeSettings, Generator
    from dlmnumba.decode import policies
    from dlmnumba.decode.spec import SpecRequest

    m = dlmnumba.load_model(model_path, threads=threads)
    prompt = m.tokenizer.encode("USER: What is the meaning of life?<|eot_id|>ASSISTANT:")
    names = {"ar": dict(mode="ar"), "iterative 0.9, dual cache": ITERATIVE}
    for name in schedules:
        names[name] = dict(mode="spec", **_spec_kw(name))
    state = {name: [0.0, 0, 0] for name in names}  # wall, passes, accepted
    real_accept, real_select = SpecRequest._accept, policies.select_unmask
    rates = {name: acceptance_rates(sched) for name, sched in schedules.items()}

    def replayed(name):
        alpha, rng = rates[name], np.random.default_rng(0)

        def accept(draft, picks):
            j = 0
            while j < len(draft) and rng.random() < alpha[min(j, len(alpha) - 1)]:
                j += 1
            return j
        return accept

    pick = replay(iterative_schedule)
    try:
        for it in range(iterations + 1):  # the first round warms up
            for name, kw in names.items():
                gen = Generator(m, DecodeSettings(max_tokens=128, ignore_eos=True, **kw))
                if name in schedules:
                    SpecRequest._accept = staticmethod(replayed(name))
                policies.select_unmask = pick
                t0 = time.perf_counter()
                st = gen.generate(prompt).stats
                if it:
                    state[name][0] += time.perf_counter() - t0
                    state[name][1] += st.forward_passes
                    state[name][2] += st.accepted_tokens
                SpecRequest._accept, policies.select_unmask = real_accept, real_select
    finally:
        SpecRequest._accept, policies.select_unmask = real_accept, real_select
    ar = iterations * 128 / state["ar"][0]
    return {name: {"tok_s": iterations * 128 / w, "tokens_per_pass": iterations * 128 / p,
                   "x_ar": iterations * 128 / w / ar}
            for name, (w, p, _) in state.items()}


def acceptance_rates(passes: list[tuple[int, int, int]]) -> list[float]:
    """P(draft token i accepted | the ones before it were), per draft index i, from the toy's
    verifying passes (drafted k, accepted j, draft positions up to the answer's stop e): index
    i is observed where i < e and i <= j (censored at the answer's end, which a long
    generation does not have).  Indices never observed take the rate of all of them."""
    n = max(k for k, _, _ in passes)
    seen, took = np.zeros(n), np.zeros(n)
    for k, j, e in passes:
        for i in range(min(e, j + 1)):
            seen[i] += 1
            took[i] += i < j
    pooled = took.sum() / max(1.0, seen.sum())
    return [float(took[i] / seen[i]) if seen[i] >= 20 else pooled for i in range(n)]


def server_latency(model_path: str, threads: int, iterations: int, schedules: dict,
                   name: str) -> dict:
    """One client on the real server (loopback): median latency of a 128-token completion in
    `ar` and in spec setting `name` (its toy acceptance replayed in the server's process)."""
    import httpx

    import dlmnumba
    from dlmnumba import DecodeSettings
    from dlmnumba.decode.spec import SpecRequest
    from dlmnumba.server.app import ServerOptions, ServerState, create_app
    from dlmnumba.server.run import ThreadedServer

    alpha, rng = acceptance_rates(schedules[name]), np.random.default_rng(1)

    def accept(draft, picks):
        j = 0
        while j < len(draft) and rng.random() < alpha[min(j, len(alpha) - 1)]:
            j += 1
        return j

    m = dlmnumba.load_model(model_path, threads=threads)
    state = ServerState(ServerOptions(model_name="m"), DecodeSettings())
    real = SpecRequest._accept
    SpecRequest._accept = staticmethod(accept)
    srv = ThreadedServer(create_app(state, load=lambda: m)).start()
    try:
        t0 = time.monotonic()
        while httpx.get(srv.url + "/health").status_code != 200:
            if time.monotonic() - t0 > 300:
                raise SystemExit("the server did not load the model")
            time.sleep(0.1)
        body = {"prompt": "What is the meaning of life?", "max_tokens": 128,
                "ignore_eos": True}
        lat = {"ar": [], name: []}
        runs = {"ar": {"mode": "ar"}, name: {"mode": "spec", **_spec_kw(name)}}
        for it in range(iterations + 1):
            for key, kw in runs.items():
                t1 = time.perf_counter()
                r = httpx.post(srv.url + "/v1/completions", json={**body, **kw}, timeout=600)
                r.raise_for_status()
                if it:
                    lat[key].append(time.perf_counter() - t1)
    finally:
        srv.stop()
        SpecRequest._accept = staticmethod(real)
    med = {k: statistics.median(v) for k, v in lat.items()}
    return {"latency_s": med, "ratio": med[name] / med["ar"]}


def _spec_kw(name: str) -> dict:
    parts = name.split()
    if parts[1] == "adaptive":
        return {"draft_size": int(parts[2]), "draft_policy": "adaptive"}
    return {"draft_size": int(parts[1]), "draft_policy": "fixed"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="the 2B-4T-shaped file (default: the built-in model)")
    ap.add_argument("--n", type=int, default=50, help="toy prompts per task")
    ap.add_argument("--drafts", default="4,8,16,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--schedule-examples", type=int, default=20,
                    help="toy examples per task for iterative's commit schedule")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    drafts = [int(x) for x in args.drafts.split(",")]
    table, schedules = toy_runs(args.n, drafts)
    print_toy(table)
    path = args.model or default_model()
    costs = pass_costs(path, args.threads, args.repeats, drafts)
    print(f"\n2B-4T shape, ms per pass ({args.threads} threads), ~100-token prefix:")
    for c in costs:
        print(f"  1 + {c['drafts']:>2} drafts + {c['masks']:>2} masks  {c['ms']:>7.1f} ms"
              f"  x{c['x_ar']:.2f} of an ar step")
    e2e = end_to_end(path, args.threads, args.iterations, schedules,
                     toy_schedule(args.schedule_examples))
    print("\n2B-4T shape end to end, 128 tokens, the toy model's acceptance replayed:")
    for name, r in e2e.items():
        print(f"  {name:<30}{r['tok_s']:>8.2f} tok/s  {r['tokens_per_pass']:>5.2f} tok/pass"
              f"  x{r['x_ar']:.2f} of ar")
    srv = server_latency(path, args.threads, args.iterations, schedules, DEFAULT)
    print(f"\nserver, one client, 128-token completion, median of {args.iterations}: ar "
          f"{srv['latency_s']['ar']:.2f} s, {DEFAULT} {srv['latency_s'][DEFAULT]:.2f} s "
          f"(x{srv['ratio']:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"toy": table, "pass_costs": costs,
                                         "end_to_end": e2e, "server": srv}, indent=2))


if __name__ == "__main__":
    main()
