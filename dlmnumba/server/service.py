"""The engine thread: one thread owns the Engine and steps it; HTTP handlers submit requests and
read their events from asyncio queues.  The HTTP side never calls the model and never reads a
live request: it reads the frozen `RequestOutput`s the engine reports.

Events posted to a handle's queue, in order: one RequestOutput per step that changed the
request (new tokens, a stats snapshot), the last one with `finished` set (the whole output, the
finish reason, any error); or, when the service cannot go on, ("error", message) at once.

The thread survives any exception: a fault in one request fails that request (runtime/engine.py),
a fault in the step loop itself fails every request the engine holds and the loop goes on; if
the thread ever stops all the same, every waiting handler gets an error at once and /health
answers 503.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..decode.requests import Request
from ..runtime.engine import Engine, RequestOutput, StepReport

log = logging.getLogger("dlmnumba.server")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TPP_BUCKETS = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 16, 32, 64)


class Metrics:
    """Prometheus collectors of one server (own registry: several apps can share a process)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "dlmnumba_"
        self.requests = Counter(p + "requests", "Requests by outcome", ["outcome"], registry=r)
        self.responses = Counter(p + "http_responses", "HTTP answers by status (every route)",
                                 ["status"], registry=r)
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
        self.drafted = Counter(p + "draft_tokens", "spec: draft tokens verified", registry=r)
        self.accepted = Counter(p + "accepted_draft_tokens", "spec: draft tokens accepted",
                                registry=r)


class Handle:
    """A submitted request as its HTTP handler sees it: an id and a queue of events."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request_id = request.id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def post(self, event) -> None:
        """From the engine thread: hand an event to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
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
        self.failure: str | None = None  # why the engine thread stopped, if it did
        self._thread = threading.Thread(target=self._main, name="dlmnumba-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine thread is serving (false once it stopped, for whatever reason)."""
        return self.failure is None and self._thread.is_alive()

    # -- HTTP side -----------------------------------------------------------------------------
    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue a request (raises engine.QueueFull when the waiting queue is full,
        ShuttingDown when the service is stopping or stopped)."""
        if self._stopping or self.failure is not None:
            raise ShuttingDown(self.failure or "the server is shutting down")
        h = Handle(request, loop)
        with self._lock:
            self._handles[request.id] = h
        try:
            self.engine.submit(request)
        except Exception:
            with self._lock:
                self._handles.pop(request.id, None)
            raise
        if self.failure is not None:  # the thread stopped meanwhile: nobody would answer
            self._fail_handles(self.failure)
        self.metrics.waiting.set(self.engine.waiting)
        self._wake.set()
        return h

    def cancel(self, handle: Handle) -> None:
        """Drop a request (client gone, stop string reached); its slot frees at the next step."""
        handle.closed = True
        self.engine.cancel(handle.request_id)
        self._wake.set()

    # -- shutdown ------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new requests; end every running and waiting stream with an error event."""
        self._stopping = True
        with self._lock:
            handles = list(self._handles.values())
        for h in handles:
            h.post(("error", "the server is shutting down"))
            self.engine.cancel(h.request_id)
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self.begin_shutdown()
        self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the thread is ending: tell everyone waiting
            self.failure = f"the engine stopped: {type(e).__name__}: {e}"
            log.critical("%s", self.failure, exc_info=True)
            self._fail_handles(self.failure)

    def _fail_handles(self, message: str) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for h in handles:
            h.post(("error", message))

    def _loop(self) -> None:
        while True:
            if not self.engine.has_work():
                if self._stopping:
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                rep = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a fault of the step loop itself
                log.exception("engine step failed: every request it held fails")
                rep = self.engine.abort(e)
            try:
                self._publish(rep)
            except Exception as e:  # noqa: BLE001 - nobody may be left waiting: all fail
                log.exception("publishing a step failed: every request fails")
                self.engine.abort(e)
                self._fail_handles(f"internal error: {type(e).__name__}: {e}")

    def _publish(self, rep: StepReport) -> None:
        """Post each request's output to its handler; update the metrics."""
        m = self.metrics
        if rep.sequences:
            m.passes.inc()
            m.seq_passes.inc(rep.sequences)
            m.rows.observe(rep.rows)
            m.seqs.observe(rep.sequences)
        if rep.prefix_hit_tokens:
            m.prefix_hits.inc(rep.prefix_hit_tokens)
        m.generated.inc(rep.committed_tokens)
        for out in rep.outputs:
            if out.finished:
                with self._lock:
                    h = self._handles.pop(out.request_id, None)
                self._finished(out)
            else:
                h = self._handles.get(out.request_id)
            if h is not None and not h.closed:
                h.post(out)
        m.running.set(self.engine.running)
        m.waiting.set(self.engine.waiting)
        pc = self.engine.prefix_cache
        if pc is not None:
            m.prefix_tokens.set(pc.tokens)

    def _finished(self, out: RequestOutput) -> None:
        m, st = self.metrics, out.stats
        if out.error is not None:
            m.requests.labels("error").inc()
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
        m.drafted.inc(st.draft_tokens)
        m.accepted.inc(st.accepted_tokens)


class ShuttingDown(Exception):
    """A request arrived after shutdown began (or after the engine thread stopped)."""
