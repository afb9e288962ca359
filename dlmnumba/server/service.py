"""The engine thread: one thread owns the Engine and steps it; HTTP handlers submit requests and
read their events from asyncio queues.  The HTTP side never calls the model.

Events posted to a handle's queue, in order: ("tokens", [ids]) for each step that commits
tokens, then exactly one of ("done", request) or ("error", message).
"""
from __future__ import annotations

import asyncio
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..decode.requests import Request
from ..engine import Engine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TPP_BUCKETS = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 16, 32, 64)


class Metrics:
    """Prometheus collectors of one server (own registry: several apps can share a process)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "dlmnumba_"
        self.requests = Counter(p + "requests", "Requests by outcome", ["outcome"], registry=r)
        self.running = Gauge(p + "running_sequences", "Sequences in the running batch",
                             registry=r)
        self.waiting = Gauge(p + "waiting_sequences", "Requests waiting for a slot", registry=r)
        self.generated = Counter(p + "generated_tokens", "Tokens committed", registry=r)
        self.prompt = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests",
                              registry=r)
        self.passes = Counter(p + "forward_passes", "Batched forward passes (engine steps)",
                              registry=r)
        self.seq_passes = Counter(p + "sequence_passes", "Per-sequence passes", registry=r)
        self.rows = Histogram(p + "batch_rows", "Token rows forwarded per step", registry=r,
                              buckets=ROW_BUCKETS)
        self.seqs = Histogram(p + "batch_sequences", "Sequences per step", registry=r,
                              buckets=ROW_BUCKETS)
        self.tpp = Histogram(p + "tokens_per_pass", "Generated tokens per forward pass, per "
                             "request", registry=r, buckets=TPP_BUCKETS)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.latency = Histogram(p + "request_latency_seconds", "Request latency", registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.prefix_hits = Counter(p + "prefix_cache_hit_tokens",
                                   "Prompt tokens whose K/V came from the prefix cache",
                                   registry=r)
        self.prefix_tokens = Gauge(p + "prefix_cache_tokens", "Tokens held by the prefix cache",
                                   registry=r)


class Handle:
    """A submitted request as its HTTP handler sees it."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def post(self, kind: str, payload) -> None:
        """From the engine thread: hand an event to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the handler's loop is gone (server shut down)
            pass


class EngineService:
    """Owns the engine and its thread; see the module docstring."""

    def __init__(self, model, max_sequences: int, max_waiting: int, prefix_cache=None,
                 metrics: Metrics | None = None):
        self.engine = Engine(model, max_running=max_sequences, max_waiting=max_waiting,
                             prefix_cache=prefix_cache)
        self.metrics = metrics or Metrics()
        self._handles: dict[int, Handle] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dlmnumba-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- HTTP side -----------------------------------------------------------------------------
    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue a request (raises engine.QueueFull when the waiting queue is full)."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        h = Handle(request, loop)
        with self._lock:
            self._handles[id(request)] = h
        try:
            self.engine.submit(request)
        except Exception:
            with self._lock:
                self._handles.pop(id(request), None)
            raise
        self.metrics.waiting.set(self.engine.waiting)
        self._wake.set()
        return h

    def cancel(self, handle: Handle) -> None:
        """Drop a request (client gone, stop string reached); its slot frees at the next step."""
        handle.closed = True
        self.engine.cancel(handle.request)
        self._wake.set()

    # -- shutdown ------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new requests; end every running and waiting stream with an error event."""
        self._stopping = True
        with self._lock:
            handles = list(self._handles.values())
        for h in handles:
            h.post("error", "the server is shutting down")
            self.engine.cancel(h.request)
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self.begin_shutdown()
        self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        m = self.metrics
        while True:
            if not self.engine.has_work():
                if self._stopping:
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            rep = self.engine.step()
            if rep.sequences:
                m.passes.inc()
                m.seq_passes.inc(rep.sequences)
                m.rows.observe(rep.rows)
                m.seqs.observe(rep.sequences)
            if rep.prefix_hit_tokens:
                m.prefix_hits.inc(rep.prefix_hit_tokens)
            for r, new in rep.committed:
                m.generated.inc(len(new))
                h = self._handles.get(id(r))
                if h is not None and not h.closed:
                    h.post("tokens", new)
            for r in rep.finished:
                with self._lock:
                    h = self._handles.pop(id(r), None)
                self._finished(r, h)
            m.running.set(self.engine.running)
            m.waiting.set(self.engine.waiting)
            pc = self.engine.prefix_cache
            if pc is not None:
                m.prefix_tokens.set(pc.tokens)

    def _finished(self, r: Request, h: Handle | None) -> None:
        m, st = self.metrics, r.stats
        if r.error is not None:
            m.requests.labels("error").inc()
            if h is not None:
                h.post("error", str(r.error))
            return
        if st.finish_reason == "cancelled":
            m.requests.labels("cancelled").inc()
        else:
            m.requests.labels("ok").inc()
            m.latency.observe(st.latency_s)
            if st.generated_tokens:
                m.ttft.observe(st.ttft_s)
            m.tpp.observe(st.tokens_per_pass)
        m.prompt.inc(st.prompt_tokens)
        if h is not None:
            h.post("done", r)


class ShuttingDown(Exception):
    """A request arrived after shutdown began."""

