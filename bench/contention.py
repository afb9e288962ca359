"""Speed when another program takes a core: the default bench idle and beside a busy loop.

    python bench/contention.py [--rounds 2] [--iterations 5] [--max-tokens 128]

Each round runs `dlmnumba bench` (the built-in default model) once idle and once beside a
busy loop pinned to one core (a separate process that stops by itself after --busy-seconds),
with the default wait policy (waiting threads sleep: dlmnumba/kernels/cpu.py) and with
OMP_WAIT_POLICY=active (spinning waiters, the OpenMP default before).  Prints tok/s and the
busy / idle ratio of each; the machine must otherwise be idle.
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


def bench(env: dict, iterations: int, max_tokens: int) -> float:
    """tok/s of one `dlmnumba bench` run."""
    p = subprocess.run([sys.executable, "-m", "dlmnumba", "bench", "--max-tokens",
                        str(max_tokens), "--iterations", str(iterations), "--warmup", "2"],
                       env=env, capture_output=True, text=True, timeout=1800)
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
    args = ap.parse_args()
    core = sorted(os.sched_getaffinity(0))[-1]
    policies = {"passive (default)": {}, "active (spinning)": {"OMP_WAIT_POLICY": "active"}}
    got: dict[str, dict[str, list[float]]] = {k: {"idle": [], "busy": []} for k in policies}
    for _ in range(args.rounds):
        for name, extra in policies.items():
            env = {**os.environ, **extra}
            got[name]["idle"].append(bench(env, args.iterations, args.max_tokens))
            busy = subprocess.Popen([sys.executable, "-c", BUSY, str(core),
                                     str(args.busy_seconds)])
            try:
                time.sleep(0.5)
                got[name]["busy"].append(bench(env, args.iterations, args.max_tokens))
            finally:
                busy.kill()
                busy.wait()
    print(f"dlmnumba bench --max-tokens {args.max_tokens}, {args.rounds} rounds, busy loop on "
          f"core {core}:")
    for name, r in got.items():
        idle, busy = statistics.median(r["idle"]), statistics.median(r["busy"])
        print(f"  {name:<20} idle {idle:7.2f} tok/s  busy {busy:7.2f} tok/s  "
              f"x{busy / idle:.2f}  (runs: idle {r['idle']}, busy {r['busy']})")


if __name__ == "__main__":
    main()
