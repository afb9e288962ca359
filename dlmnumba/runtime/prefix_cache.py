"""Prefix cache: K/V of token prefixes kept in a radix tree of pages, reused by later requests.

A page is `page_size` tokens: the attention block size under a block mask (the K/V of a
block's tokens depend on every token of the block, so only whole blocks can be reused), 16
under the causal mask.  Each tree node holds one page of tokens and their K/V for every
layer; a node's path from the root is the token prefix its K/V belong to.  There is one tree
per attention mask (K/V computed under another mask differ).

- `attach(request)`: before a request's first pass, copy the K/V of the longest cached prefix
  of its prompt (at most all but its last token: that one's logits are needed) into its
  cache; its first pass then runs only the rest.  The K/V are the very values a fresh pass
  computes (rows are batch-independent, and extra keys a query cannot see add exact zeros),
  so the output does not change.
- `insert(request)`: when a request finishes, store the pages of prompt + output whose K/V
  its cache holds (real tokens only, never masks).  Multi-turn chat, which resends the
  conversation, then skips everything up to the previous answer's last full page.
- Least recently used leaves are evicted while the tree holds more than `max_tokens`.
Thread-safe: engines stepping in several threads (one `Generator` streaming from many) may
share one.
"""
from __future__ import annotations

import itertools
import threading

import numpy as np

from ..model.batch import AttentionMask

CAUSAL_PAGE = 16  # tokens per page under the causal mask


class _Node:
    __slots__ = ("tokens", "keys", "values", "children", "parent", "used")

    def __init__(self, tokens, keys, values, parent):
        self.tokens, self.keys, self.values, self.parent = tokens, keys, values, parent
        self.children: dict[tuple, _Node] = {}
        self.used = 0


class PrefixCache:
    """Radix tree of K/V pages under a token budget, LRU eviction (see the module docstring)."""

    def __init__(self, max_tokens: int):
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self.tokens = 0  # tokens held
        self.hit_tokens = 0  # prompt tokens whose K/V came from the cache, all requests
        self._roots: dict[AttentionMask, _Node] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    @staticmethod
    def page_size(mask: AttentionMask) -> int:
        """Tokens per page under this mask."""
        return CAUSAL_PAGE if mask.is_causal else mask.block_size

    def _walk(self, mask: AttentionMask, tokens: list[int], n_pages: int) -> list[_Node]:
        """Nodes of the longest cached path along the first n_pages pages of tokens."""
        node = self._roots.get(mask)
        p = self.page_size(mask)
        path = []
        for i in range(n_pages):
            if node is None:
                break
            node = node.children.get(tuple(tokens[i * p:(i + 1) * p]))
            if node is None:
                break
            path.append(node)
        return path

    def attach(self, request) -> int:
        """Seed a request that has not run yet with its prompt's cached prefix; the tokens
        reused (0 on a miss)."""
        if not request.reusable_kv or request.started or request.cache.length:
            return 0
        mask, prompt = request.mask, request.prompt
        p = self.page_size(mask)
        with self._lock:
            path = self._walk(mask, prompt, (len(prompt) - 1) // p)
            if not path:
                return 0
            n = len(path) * p
            cache = request.cache
            cache.reserve(n)
            now = next(self._clock)
            for i, node in enumerate(path):
                cache.load(i * p, node.keys, node.values,
                           np.arange(i * p, (i + 1) * p, dtype=np.int32))
                node.used = now
            self.hit_tokens += n
        return n

    def insert(self, request) -> int:
        """Store the full pages of a finished request's prompt + output held in its cache;
        the tokens added."""
        if not request.reusable_kv or self.max_tokens == 0:
            return 0
        mask, cache = request.mask, request.cache
        p = self.page_size(mask)
        tokens = (request.prompt + request.out)[:cache.length]
        if not np.array_equal(cache.positions[:len(tokens)], np.arange(len(tokens))):
            return 0  # not a plain sequence from position 0
        with self._lock:
            node = self._roots.setdefault(mask, _Node((), None, None, None))
            now = next(self._clock)
            added = 0
            for i in range(len(tokens) // p):
                key = tuple(tokens[i * p:(i + 1) * p])
                child = node.children.get(key)
                if child is None:
                    k, v = cache.view(i * p, (i + 1) * p)
                    child = _Node(key, k.copy(), v.copy(), node)
                    node.children[key] = child
                    added += p
                child.used = now
                node = child
            self.tokens += added
            self._evict()
        return added

    def _evict(self) -> None:
        """Drop least recently used leaves until the budget holds."""
        while self.tokens > self.max_tokens:
            leaves = [n for n in self._nodes() if not n.children]
            if not leaves:
                break
            victim = min(leaves, key=lambda n: n.used)
            del victim.parent.children[victim.tokens]
            self.tokens -= len(victim.tokens)

    def _nodes(self):
        stack = [c for r in self._roots.values() for c in r.children.values()]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._roots.clear()
            self.tokens = 0
