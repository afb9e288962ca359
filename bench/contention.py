"""Speed when another program takes a core: the default bench idle and beside a busy loop.

    python bench/contention.py [--rounds 2] [--iterations 5] [--max-tokens 128]

Each round runs `dlmnumba bench` (the built-in default model; greedy, and `--mode ar` with 32
tokens) once idle and once beside a busy loop pinned to one core (a separate process that stops
by itself after --busy-seconds), with the default wait policy (waiting threads spin 10,000
times, then sleep: dlmnumba/kernels/cpu.py), with libgomp's own default (a long spin:
GOMP_SPINCOUNT=300000) and with OMP_WAIT_POLICY=passive (sleep at once); the default also with
its thread count fixed (`threads_yield` off: every pass on all threads, where the default gives
up a core that another program keeps busy, kernels/cpu.py:CpuShare); the other two policies run
with fixed threads, as they were measured before.  Prints tok/s and the busy / idle ratio of
each; the machine must otherwise be idle.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

BUSY = ("import os, sys, time\n"
        "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
        "end = time.time() + float(sys.argv[2])\n"
        "while time.time() < end:\n"
        "    pass\n")


def bench(env: dict, iterations: int, max_tokens: int, extra: tuple = ()) -> float:
    """tok/s of one `dlmnumba bench` run."""
    p = subprocess.run([sys.executable, "-m", "dlmnumba", "bench", "--max-tokens",
                        str(max_tokens), "--iterations", str(iterations), "--warmup", "2",
                        *extra], env=env, capture_output=True, text=True, timeout=1800)
    found = re.search(r"Tokens/sec:\s+([\d.]+)", p.stdout)
    if p.returncode or not found:
        raise SystemExit(f"dlmnumba bench failed: {p.stderr[-2000:]}")
    return float(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--busy-seconds", type=float, default=120.0)
    ap.add_argument("--policies", help="comma-separated name prefixes of the policies to run "
                    "(default: all)")
    args = ap.parse_args()
    core = sorted(os.sched_getaffinity(0))[-1]
    policies = {"default (10,000 spins)": {},
                "fixed threads": {"DLMNUMBA_THREADS_YIELD": "false"},
                "libgomp default spin": {"GOMP_SPINCOUNT": "300000",
                                         "DLMNUMBA_THREADS_YIELD": "false"},
                "passive": {"OMP_WAIT_POLICY": "passive", "DLMNUMBA_THREADS_YIELD": "false"}}
    if args.policies:
        policies = {k: v for k, v in policies.items()
                    if any(k.startswith(p) for p in args.policies.split(","))}
    modes = {"greedy": (args.max_tokens, ()), "ar": (32, ("--mode", "ar"))}
    got = {(p, mo): {"idle": [], "busy": []} for p in policies for mo in modes}
    for _ in range(args.rounds):
        for (name, mode), r in got.items():
            env = {**os.environ, **policies[name]}
            tokens, extra = modes[mode]
            r["idle"].append(bench(env, args.iterations, tokens, extra))
            busy = subprocess.Popen([sys.executable, "-c", BUSY, str(core),
                                     str(args.busy_seconds)])
            try:
                time.sleep(0.5)
                r["busy"].append(bench(env, args.iterations, tokens, extra))
            finally:
                busy.kill()
                busy.wait()
    print(f"dlmnumba bench (greedy: --max-tokens {args.max_tokens}; ar: 32 tokens), "
          f"{args.rounds} rounds, busy loop on core {core}:")
    for (name, mode), r in got.items():
        idle, busy = statistics.median(r["idle"]), statistics.median(r["busy"])
        print(f"  {mode:<7}{name:<24} idle {idle:7.2f} tok/s  busy {busy:7.2f} tok/s  "
              f"x{busy / idle:.2f}")


if __name__ == "__main__":
    main()
