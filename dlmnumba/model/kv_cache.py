"""Per-sequence key/value cache: preallocated, grown by doubling, truncatable."""
from __future__ import annotations

import numpy as np

from ..gguf.spec import ModelSpec


class KVCache:
    """K/V of every layer for one sequence; slot i holds the token at absolute position pos[i]."""

    def __init__(self, spec: ModelSpec, capacity: int = 256):
        self.spec = spec
        self.length = 0  # slots in use
        self._alloc(max(1, capacity))

    def _alloc(self, capacity: int) -> None:
        s = self.spec
        shape = (s.n_layer, s.n_head_kv, capacity, s.head_dim)
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        pos = np.zeros(capacity, np.int32)
        if getattr(self, "k", None) is not None and self.length:
            n = self.length
            k[:, :, :n], v[:, :, :n], pos[:n] = self.k[:, :, :n], self.v[:, :, :n], self.pos[:n]
        self.k, self.v, self.pos = k, v, pos

    @property
    def capacity(self) -> int:
        """Slots allocated."""
        return self.pos.shape[0]

    def reserve(self, n_new: int) -> None:
        """Make room for n_new more slots (amortized doubling)."""
        need = self.length + n_new
        if need > self.capacity:
            cap = self.capacity
            while cap < need:
                cap *= 2
            self._alloc(cap)

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        self.length = length

    def clear(self) -> None:
        """Forget everything."""
        self.length = 0

    @property
    def positions(self) -> np.ndarray:
        """Absolute positions of the slots in use."""
        return self.pos[: self.length]
