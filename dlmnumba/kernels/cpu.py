"""One numba decorator policy for every kernel, and thread-count control."""
from __future__ import annotations

import functools
import os

# Threads waiting for the next parallel loop spin only briefly, then sleep (OpenMP, numba's
# threading layer here; set before numba starts it, and only what the user has not set).  A
# forward pass is a chain of short parallel loops, each waiting for its slowest thread: with one
# core taken by another program, long-spinning waiters took the time the shared core's thread
# needed; sleeping at once costs a wake-up per loop, which an `ar` token (300 loops) feels.
# 2-core Intel Xeon (bench/contention.py): default bench beside a busy loop 20-36 tok/s with
# libgomp's default spin (91-97 idle), 48-49 with 10,000 spins (91-93 idle); `ar` 24.6 tok/s
# spinning, 23.7 with 10,000 spins, 14.7 sleeping at once (OMP_WAIT_POLICY=passive).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # GNU libgomp
    os.environ.setdefault("KMP_BLOCKTIME", "1")  # Intel's OpenMP: ms of spinning

import numba  # noqa: E402

# Every kernel is cached on disk (first run compiles, later runs load) and releases the GIL.
jit = functools.partial(numba.njit, cache=True, nogil=True)
# Parallel kernels split independent outputs across threads with prange.
pjit = functools.partial(numba.njit, cache=True, nogil=True, parallel=True)


def physical_cores() -> int:
    """Number of physical cores available to this process (hyper-threads not counted)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu, phys, core = None, "0", None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu, phys, core = int(value), "0", None
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and cpu is not None:
                    if cpu in allowed:
                        cores.add((phys, core if core is not None else str(cpu)))
                    cpu = None
            if cpu is not None and cpu in allowed:
                cores.add((phys, core if core is not None else str(cpu)))
    except OSError:
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def set_threads(threads: int | None) -> int:
    """Set the numba thread count (None = physical cores) and return it."""
    n = physical_cores() if threads is None else int(threads)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n
