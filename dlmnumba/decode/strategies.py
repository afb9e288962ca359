"""Token choice: how tokens (and their confidences) are picked from logits.

No model knowledge here: functions over logits.  Which masked positions a pass commits is the
policies' business (decode/policies.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels.ops import argmax_confidence


@dataclass(frozen=True)
class Sampling:
    """Token choice: temperature 0 is greedy argmax; otherwise seeded top-k / top-p sampling."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1.0 = no nucleus cut
    seed: int = 0


def pick_tokens(logits: np.ndarray, sampling: Sampling,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Token and its confidence (probability under the sampling distribution) per row."""
    n = logits.shape[0]
    tokens = np.empty(n, np.int64)
    conf = np.empty(n, np.float32)
    if sampling.temperature <= 0.0:
        argmax_confidence(tokens, conf, np.ascontiguousarray(logits, dtype=np.float32))
        return tokens, conf
    for r in range(n):
        z = logits[r].astype(np.float64) / sampling.temperature
        if 0 < sampling.top_k < z.shape[0]:
            kth = np.partition(z, -sampling.top_k)[-sampling.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if sampling.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, sampling.top_p) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        t = int(rng.choice(p.shape[0], p=p))
        tokens[r], conf[r] = t, p[t]
    return tokens, conf
