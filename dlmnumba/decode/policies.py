"""Unmasking policies of the diffusion modes, registered by name.

A policy answers, for the block being decoded: how large its sub-blocks are (the positions a
pass decides, refined in order), which masked positions of the current sub-block a pass
commits, whether its decisions read the confidence (so the LM head must compute it exactly),
and how many passes a block may take before the rest is filled with the best predictions seen.
The scheduler (decode/diffusion.py) never looks at a mode's name; adding a policy is a class
here and one `register` line.
"""
from __future__ import annotations

import numpy as np


def select_unmask(conf: np.ndarray, threshold: float) -> np.ndarray:
    """Indices (into conf) to commit: every confidence above threshold, at least the best one."""
    chosen = np.flatnonzero(conf > threshold)
    if chosen.size == 0 and conf.size:
        chosen = np.array([int(np.argmax(conf))])
    return chosen


class Policy:
    """Base: every masked position of the block at once (greedy)."""

    name = "?"
    needs_confidence = False  # commit decisions read the softmax probability
    refines = False  # several passes per block, capped by max_iterations_per_block

    def sub_block(self, settings) -> int:
        """Positions per sub-block (aligned at absolute multiples inside the block)."""
        return settings.block_size

    def commit(self, conf: np.ndarray, step: int, settings) -> np.ndarray:
        """Indices into `conf` (the current sub-block's masked positions, in order) to commit
        on refinement step `step` (0-based) of that sub-block."""
        return np.arange(conf.shape[0])

    def max_passes(self, settings) -> int | None:
        """Passes after which a block's remaining masks take their best predictions."""
        return settings.max_iterations_per_block if self.refines else None


class Greedy(Policy):
    """One pass per block: every masked position takes its argmax."""

    name = "greedy"


class Iterative(Policy):
    """Sub-blocks refined in order; a pass commits every masked position of the current
    sub-block whose confidence exceeds the threshold, and at least the most confident."""

    name = "iterative"
    needs_confidence = True
    refines = True

    def sub_block(self, settings) -> int:
        return settings.small_block_size

    def threshold_at(self, threshold: float, step: int) -> float:
        """The confidence a position needs on refinement step `step` of its sub-block."""
        return threshold

    def commit(self, conf, step, settings):
        return select_unmask(conf, self.threshold_at(settings.threshold, step))


class Adaptive(Iterative):
    """As iterative, with the seed's rising thresholds: max(0.5, t - 0.4) on a sub-block's
    first step, max(0.7, t - 0.2) on its second, t from the third on."""

    name = "adaptive"

    def threshold_at(self, threshold, step):
        if step == 0:
            return max(0.5, threshold - 0.4)
        if step == 1:
            return max(0.7, threshold - 0.2)
        return threshold


POLICIES: dict[str, Policy] = {}


def register(policy: Policy) -> Policy:
    """Make `policy` available as decode mode `policy.name`."""
    POLICIES[policy.name] = policy
    return policy


for _p in (Greedy(), Iterative(), Adaptive()):
    register(_p)


def step_threshold(mode: str, threshold: float, step: int) -> float:
    """Confidence threshold of refinement step `step` (0-based) of a sub-block under policy
    `mode` (iterative keeps `threshold`, adaptive rises to it)."""
    policy = POLICIES[mode]
    return policy.threshold_at(threshold, step) if hasattr(policy, "threshold_at") else threshold
