"""The batching engine: many requests decoded together, one forward pass per step.

`Engine.step()` admits waiting requests (up to `max_running`), asks every running request for
its next pass, runs them all in ONE `Model.forward_batch`, feeds each request its result and
retires the finished and the cancelled.  Requests join and leave between steps (continuous
batching).  `submit` and `cancel` may be called from any thread; `step` from one thread at a
time (the server's engine thread, or `run_until_idle`).
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from .decode.requests import Request
from .errors import DlmError


@dataclass
class StepReport:
    """What one step did."""

    committed: list[tuple[Request, list[int]]] = field(default_factory=list)  # new tokens
    finished: list[Request] = field(default_factory=list)  # done, cancelled or failed
    rows: int = 0  # tokens forwarded in the step's pass (all sequences)
    sequences: int = 0  # sequences in the pass
    prefix_hit_tokens: int = 0  # prompt tokens of admitted requests taken from the prefix cache


class Engine:
    """Steps the passes of many requests through one model together."""

    def __init__(self, model, max_running: int = 16, max_waiting: int | None = None,
                 prefix_cache=None):
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.model = model
        self.prefix_cache = prefix_cache  # a PrefixCache, or None
        self.max_running = max_running
        self.max_waiting = max_waiting  # None = unbounded
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cancel: set[int] = set()  # ids of requests to drop at the next step
        self._lock = threading.Lock()

    # -- any thread ----------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request; it joins the running batch at a coming step."""
        with self._lock:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests)")
            self._waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Drop a request at the next step (its slot is freed then)."""
        with self._lock:
            self._cancel.add(id(request))

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        with self._lock:
            return bool(self._running or self._waiting)

    # -- the engine thread ---------------------------------------------------------------------
    def step(self) -> StepReport:
        """Admit, run one forward pass over every running request's next pass, feed, retire."""
        rep = StepReport()
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            for r in list(self._waiting):
                if id(r) in cancel:
                    self._waiting.remove(r)
                    r.cancel()
                    rep.finished.append(r)
            for r in self._running:
                if id(r) in cancel:
                    r.cancel()
                    rep.finished.append(r)
            self._running = [r for r in self._running if not r.finished]  # free their slots
            admitted = []
            while self._waiting and len(self._running) < self.max_running:
                admitted.append(self._waiting.popleft())
                self._running.append(admitted[-1])
        if self.prefix_cache is not None:
            for r in admitted:
                rep.prefix_hit_tokens += self.prefix_cache.attach(r)
        batch, segs = [], []
        for r in self._running:
            try:
                seg = r.next_pass()
            except DlmError as e:  # this request cannot go on; the others can
                r.fail(e)
                continue
            if seg is not None:
                batch.append(r)
                segs.append(seg)
        if segs:
            rep.rows, rep.sequences = sum(len(s.tokens) for s in segs), len(segs)
            try:
                results = self.model.forward_batch(segs)
            except Exception as e:  # noqa: BLE001 - every request of the pass gets the error
                for r in batch:
                    r.fail(e)
                results = None
            if results is not None:
                for r, res in zip(batch, results):
                    try:
                        new = r.feed(res)
                    except DlmError as e:
                        r.fail(e)
                        continue
                    if new:
                        rep.committed.append((r, new))
        still = []
        for r in self._running:
            (rep.finished if r.finished else still).append(r)
            if r.finished and r.error is None and self.prefix_cache is not None:
                self.prefix_cache.insert(r)
        self._running = still  # finished requests leave; their slots take others next step
        return rep

    def run_until_idle(self) -> None:
        """Step until no request is running or waiting."""
        while self.has_work():
            self.step()


class QueueFull(DlmError):
    """The engine's waiting queue is at its bound."""
