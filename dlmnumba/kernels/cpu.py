"""One numba decorator policy for every kernel, and thread-count control."""
from __future__ import annotations

import functools
import os
import time

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


class CpuShare:
    """How many compute threads to run now: `threads`, or fewer when other programs keep so
    many of this process's CPUs busy that fewer than `threads` are left (on 16 allowed CPUs
    with 10 busy elsewhere, 2 threads stay 2; on 2 with one busy, 1).  Every parallel loop
    waits for its slowest thread, and a thread whose core a busy program shares makes each of a
    token's ~300 loops wait for the scheduler (2-core AMD EPYC, `ar` beside one busy loop: 5.7
    tok/s on both threads, against 26.2 idle).  Read from /proc/stat every INTERVAL seconds:
    the busy time of the CPUs this process may run on, minus this process's own CPU time, is
    what the others used.  Where /proc/stat cannot be read (not Linux), always `threads`."""

    INTERVAL = 0.25  # seconds between two readings
    GIVE_UP = 0.3  # a core others keep busy this fraction of the time is left to them

    def __init__(self, threads: int, enabled: bool = True):
        self.wanted = self.current = threads
        try:
            self._cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        except AttributeError:  # not Linux
            self._cpus = set()
        self._allowed = len(self._cpus)
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._sample() if enabled and threads > 1 else None

    def _sample(self) -> tuple[float, float, float] | None:
        """(monotonic time, busy seconds of the allowed CPUs, this process's CPU seconds)."""
        if not self._cpus:
            return None
        busy = 0
        try:
            with open("/proc/stat", encoding="ascii") as f:
                for line in f:
                    name, _, rest = line.partition(" ")
                    if name in self._cpus:
                        # user nice system idle iowait irq softirq steal ...: busy = user, nice,
                        # system, irq, softirq (not idle, iowait or the hypervisor's steal)
                        v = rest.split()
                        busy += int(v[0]) + int(v[1]) + int(v[2]) + int(v[5]) + int(v[6])
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), busy / self._hz, time.process_time()

    def threads(self) -> int:
        """The thread count for the next pass."""
        if self._last is None:
            return self.wanted
        now = time.monotonic()
        if now - self._last[0] < self.INTERVAL:
            return self.current
        sample = self._sample()
        if sample is None:
            self._last = None
            return self.wanted
        (t0, busy0, own0), (t1, busy1, own1) = self._last, sample
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)  # cores, on average
        free = self._allowed - int(others + 1 - self.GIVE_UP)  # CPUs others leave us
        self.current = max(1, min(self.wanted, free))
        self._last = sample
        return self.current
