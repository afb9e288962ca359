"""Which instruction path the int8 kernels run on this CPU (runtime dispatch)."""
from __future__ import annotations

import functools
import os

import numba

from . import simd
from .amx import amx_usable

# The CPU paths, fastest first: simd.PATHS (one instruction set each), and before them 'amx':
# vnni512 everywhere, plus AMX-INT8 tiles for the ternary matmuls of several tokens.
PATHS = ("amx",) + simd.PATHS
_SIMD_PATH = {"amx": "vnni512"}
ENV = "DLMNUMBA_KERNEL"  # force a path: one of PATHS, or "auto"


def simd_path(path: str) -> str:
    """The simd.PATHS entry whose instructions `path` uses outside the AMX matmul."""
    return _SIMD_PATH.get(path, path)


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """Instruction-set features numba compiles for (the host's unless NUMBA_CPU_NAME is set)."""
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return frozenset(f.lstrip("+") for f in (numba.config.CPU_FEATURES or "").split(",")
                         if f.startswith("+"))
    import llvmlite.binding as llb

    return frozenset(k for k, v in llb.get_host_cpu_features().items() if v)


def supported_paths() -> tuple[str, ...]:
    """Paths this CPU can execute, fastest first ('portable' always)."""
    f = cpu_features()
    ok = []
    if {"avx512vnni", "avx512bw", "avx512f"} <= f:
        if {"amx-tile", "amx-int8"} <= f and amx_usable():
            ok.append("amx")
        ok.append("vnni512")
    if "avxvnni" in f or {"avx512vnni", "avx512vl"} <= f:
        ok.append("vnni256")
    if "avx2" in f:
        ok.append("avx2")
    return tuple(ok) + ("portable",)


def select_path(requested: str | None = None) -> str:
    """The path to run: `requested` (or $DLMNUMBA_KERNEL), else the fastest supported."""
    want = (requested or os.environ.get(ENV) or "auto").lower()
    if want == "auto":
        return supported_paths()[0]
    if want not in PATHS:
        raise ValueError(f"kernel path {want!r} is unknown; expected auto or one of "
                         f"{', '.join(PATHS)}")
    if want not in supported_paths():
        raise ValueError(f"kernel path {want!r} needs CPU features this machine lacks "
                         f"(supported here: {', '.join(supported_paths())})")
    return want
