"""Numba kernels over numpy arrays (no model knowledge, no I/O)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def _drop_stale_kernel_caches() -> None:
    """numba caches each kernel keyed on its own file; the LLVM IR they inline comes from
    simd.py, so when simd.py changes every cached kernel of this package must be recompiled."""
    here = Path(__file__).parent
    cache = here / "__pycache__"
    stamp = cache / "simd-ir.sha256"
    try:
        digest = hashlib.sha256((here / "simd.py").read_bytes()).hexdigest()
        if stamp.exists() and stamp.read_text() == digest:
            return
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink()
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:  # read-only install: numba then caches elsewhere or not at all
        pass


_drop_stale_kernel_caches()
