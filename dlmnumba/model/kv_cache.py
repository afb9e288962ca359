"""Per-sequence key/value cache: preallocated, grown by doubling, truncatable.

Keys are stored transposed (k[layer, head, dim, slot]), so the attention kernels read each
head's keys as the [dim, keys] operand of their score tiles as they are, with no copy per
call; values as v[layer, head, slot, dim].  Capacity is a multiple of LANES (the tiles read
keys in groups of 16).  `view` and `load` speak the plain [layer, head, slot, dim] form.

The cache owns its writes: `append` (new slots of a forward pass), `write` (their K/V, layer by
layer; `PassWrites.write` for every cache of a batched pass at once), `load` (K/V computed
elsewhere: the prefix cache's pages, the dual cache's block) and `truncate` are the only code
that changes `k`, `v`, `pos` or `length`
(tests/test_layers.py checks it).  Everyone else reads, through `view` or the arrays themselves
(the attention kernels take them as they are).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numba.typed import List

from ..gguf.spec import ModelSpec
from ..kernels.attention import LANES  # capacity granule: the score tiles' key group
from ..kernels.attention import write_kv_rows


class KVCache:
    """K/V of every layer for one sequence; slot i holds the token at absolute position pos[i].

    k: float32 [n_layer, n_head_kv, head_dim, capacity] (transposed); v: float32 [n_layer,
    n_head_kv, capacity, head_dim]; pos: int32 [capacity]."""

    def __init__(self, spec: ModelSpec, capacity: int = 256):
        self.spec = spec
        self._length = 0  # slots in use
        self.k = self.v = self.pos = None
        self._alloc(max(1, capacity))

    def _alloc(self, capacity: int) -> None:
        s = self.spec
        capacity = -(-capacity // LANES) * LANES
        k = np.zeros((s.n_layer, s.n_head_kv, s.head_dim, capacity), np.float32)
        v = np.zeros((s.n_layer, s.n_head_kv, capacity, s.head_dim), np.float32)
        pos = np.zeros(capacity, np.int32)
        if self.k is not None and self._length:
            n = self._length
            k[..., :n], v[:, :, :n], pos[:n] = self.k[..., :n], self.v[:, :, :n], self.pos[:n]
        self.k, self.v, self.pos = k, v, pos

    @property
    def length(self) -> int:
        """Slots in use."""
        return self._length

    @property
    def capacity(self) -> int:
        """Slots allocated."""
        return self.pos.shape[0]

    @property
    def positions(self) -> np.ndarray:
        """Absolute positions of the slots in use."""
        return self.pos[: self._length]

    def reserve(self, n_new: int) -> None:
        """Make room for n_new more slots (amortized doubling)."""
        need = self._length + n_new
        if need > self.capacity:
            cap = self.capacity
            while cap < need:
                cap *= 2
            self._alloc(cap)

    # -- writes ------------------------------------------------------------------------------
    def append(self, positions: np.ndarray) -> int:
        """Open len(positions) slots after the ones in use, at these absolute positions; return
        the first.  Their K/V are written by `write` (or `PassWrites.write`), layer by layer,
        before anything reads them (a forward pass does both)."""
        n = len(positions)
        self.reserve(n)
        first = self._length
        self.pos[first:first + n] = positions
        self._length = first + n
        return first

    def write(self, layer: int, first: int, k: np.ndarray, v: np.ndarray) -> None:
        """K/V [m, n_head_kv, head_dim] of one layer into slots first..first+m (in use)."""
        self.check_slots(first, k.shape[0])
        self.k[layer, :, :, first:first + k.shape[0]] = k.transpose(1, 2, 0)
        self.v[layer, :, first:first + k.shape[0]] = v.transpose(1, 0, 2)

    def check_slots(self, first: int, m: int) -> None:
        """Slots first..first+m are in use (a write may go there)."""
        if not 0 <= first <= first + m <= self._length:
            raise ValueError(f"slots {first}..{first + m} are not in use (length "
                             f"{self._length})")

    def load(self, start: int, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        """Slots start.. hold K/V [n_layer, n_head_kv, n, head_dim] at these positions, and
        nothing after them (start <= length)."""
        n = len(positions)
        if not 0 <= start <= self._length:
            raise ValueError(f"cannot load at slot {start} of a cache of {self._length}")
        if k.shape[2] != n or v.shape[2] != n:
            raise ValueError(f"K/V of {k.shape[2]}/{v.shape[2]} slots for {n} positions")
        self._length = start
        self.reserve(n)
        self.k[..., start:start + n] = k.transpose(0, 1, 3, 2)
        self.v[:, :, start:start + n] = v
        self.pos[start:start + n] = positions
        self._length = start + n

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate a cache of {self._length} slots to {length}")
        self._length = length

    def clear(self) -> None:
        """Forget everything."""
        self._length = 0

    # -- reads -------------------------------------------------------------------------------
    def view(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """K/V [n_layer, n_head_kv, stop - start, head_dim] of slots start..stop (views: copy
        them to keep them past the next write)."""
        stop = self._length if stop is None else stop
        if not 0 <= start <= stop <= self._length:
            raise ValueError(f"slots {start}..{stop} are not in use (length {self._length})")
        return self.k[..., start:stop].transpose(0, 1, 3, 2), self.v[:, :, start:stop]


class PassWrites:
    """The K/V writes of one forward pass over several caches (a batched step): each cache's
    new slots checked once, then each layer's rows of every cache written by one kernel call
    (one `write` per sequence and layer cost a 16-sequence `ar` step ~5 ms of Python).  `k`,
    `v` are the caches' arrays as typed lists, which the attention kernel reads too; valid
    while no cache grows (`append` reserves every slot of the pass before it runs)."""

    def __init__(self, caches: Sequence[KVCache], firsts: Sequence[int],
                 bounds: Sequence[int]):
        # cache i's rows of the pass are bounds[i]..bounds[i+1], its slots from firsts[i]
        if not len(caches) == len(firsts) == len(bounds) - 1:
            raise ValueError(f"{len(caches)} caches, {len(firsts)} first slots and "
                             f"{len(bounds)} row bounds: expected n, n and n + 1")
        for c, f, a, b in zip(caches, firsts, bounds, bounds[1:]):
            c.check_slots(f, b - a)
        self.k, self.v, self.pos = List(), List(), List()
        for c in caches:
            self.k.append(c.k)
            self.v.append(c.v)
            self.pos.append(c.pos)
        self.firsts = np.asarray(firsts, np.int64)
        self.bounds = np.asarray(bounds, np.int64)
        s = caches[0].spec
        self._shape = (int(self.bounds[-1]), s.n_head_kv, s.head_dim)
        self._layers = s.n_layer

    def write(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Rows of K/V [M, n_head_kv, head_dim] of one layer into their caches' slots."""
        if k.shape != self._shape or v.shape != self._shape or not 0 <= layer < self._layers:
            raise ValueError(f"K/V {k.shape} / {v.shape} of layer {layer} do not fit the pass: "
                             f"expected {self._shape}, layer < {self._layers}")
        write_kv_rows(self.k, self.v, layer, self.firsts, self.bounds, k, v)
