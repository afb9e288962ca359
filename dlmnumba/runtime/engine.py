"""The engine: admission, the running batch, and the step loop that runs every pass.

`Engine.step()` applies cancellations, admits waiting requests (up to `max_running`; the prefix
cache seeds their caches), asks every running request for its next pass, runs them all in ONE
`Model.forward_batch` (layer passes and head-only passes alike), feeds each request its result
and retires the finished.  Requests join and leave between steps (continuous batching).

What a step did is reported as frozen `RequestOutput`s (new tokens, a stats snapshot, and at
the end the whole output, the finish reason and any error): whoever waits on a request reads
those, never the live `Request`, which only the stepping thread touches.

Faults stay with what caused them: an exception in one request's `next_pass`/`feed` (or its
prefix-cache attach) fails that request only; an exception in `forward_batch` makes the engine
run the step's passes one by one (each gives the very result it gives in the batch), so only
the passes that fail on their own fail their requests.  Either way the request ends with an
error its waiter sees, and the engine goes on with the others.

`submit` and `cancel` may be called from any thread; `step` from one thread at a time (the
server's engine thread, or the caller's thread for `Generator.stream` / `generate_many`).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from ..decode.requests import Request, RequestStats
from ..errors import DlmError

log = logging.getLogger("dlmnumba.engine")


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request (a copy: safe to hand to another thread)."""

    request_id: int
    new_tokens: tuple[int, ...]  # committed by this step, in order
    stats: RequestStats  # snapshot after the step
    finished: bool = False
    tokens: tuple[int, ...] = ()  # once finished: the whole output
    error: BaseException | None = None  # once finished with finish_reason 'error'
    # when the request asks for log-probabilities: one TokenLogprob per new token; and with
    # echo, the prompt's (the first None), in every output once computed
    new_logprobs: tuple = ()
    prompt_logprobs: tuple | None = None
    # when the request reports progress: Request.progress() after this step
    progress: tuple | None = None

    @property
    def error_message(self) -> str | None:
        """The error as a user reads it: our own errors' message, else the exception's type
        and message."""
        e = self.error
        if e is None:
            return None
        if isinstance(e, DlmError):
            return str(e)
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


@dataclass
class StepReport:
    """What one step did."""

    outputs: list[RequestOutput] = field(default_factory=list)  # one per request it changed
    rows: int = 0  # tokens forwarded through the layers in the step's pass (all sequences)
    sequences: int = 0  # shares of the pass (head-only passes included)
    prefix_hit_tokens: int = 0  # prompt tokens of admitted requests taken from the prefix cache

    @property
    def committed_tokens(self) -> int:
        """Tokens committed by the step, all requests."""
        return sum(len(o.new_tokens) for o in self.outputs)

    @property
    def finished(self) -> list[RequestOutput]:
        """The outputs of requests that ended in this step."""
        return [o for o in self.outputs if o.finished]


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

    def cancel(self, request: Request | int) -> None:
        """Drop a request (or a request id) at the next step (its slot is freed then)."""
        with self._lock:
            self._cancel.add(request if isinstance(request, int) else request.id)

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

    # -- the stepping thread ------------------------------------------------------------------
    def step(self) -> StepReport:
        """Cancel, admit, run one forward pass over every running request's next pass, feed,
        retire; report what changed."""
        rep = StepReport()
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            ended = [r for r in (*self._waiting, *self._running) if r.id in cancel]
            for r in ended:
                r.cancel()
            self._waiting = deque(r for r in self._waiting if r.id not in cancel)
            self._running = [r for r in self._running if r.id not in cancel]  # slots freed
            admitted = []
            while self._waiting and len(self._running) < self.max_running:
                admitted.append(self._waiting.popleft())
                self._running.append(admitted[-1])
        for r in admitted:
            rep.prefix_hit_tokens += self._attach(r)
        new = self._run_passes(self._running, rep)
        for r in ended + self._running:
            if r.id in new or r.finished or r.report_progress:
                rep.outputs.append(_output(r, new.get(r.id, ())))
        still = []
        for r in self._running:
            if not r.finished:
                still.append(r)
            elif r.error is None:
                self._insert(r)
        self._running = still  # finished requests leave; their slots take others next step
        return rep

    def abort(self, error: BaseException) -> StepReport:
        """Fail every running and waiting request with `error` (the step loop itself broke)."""
        with self._lock:
            requests = self._running + list(self._waiting)
            self._running, self._cancel = [], set()
            self._waiting.clear()
        rep = StepReport()
        for r in requests:
            r.fail(error)
            rep.outputs.append(_output(r, ()))
        return rep

    def run_until_idle(self) -> None:
        """Step until no request is running or waiting."""
        while self.has_work():
            self.step()

    # -- inside a step -------------------------------------------------------------------------
    def _run_passes(self, running: list[Request], rep: StepReport) -> dict[int, tuple]:
        """Plan, run and feed every running request's pass; {request id: tokens committed}."""
        batch, passes = [], []
        for r in running:
            try:
                p = r.next_pass()
            except Exception as e:  # noqa: BLE001 - this request cannot go on; the others can
                r.fail(e)
                continue
            if p is not None:
                batch.append(r)
                passes.append(p)
        if not passes:
            return {}
        rep.rows, rep.sequences = sum(len(p.tokens) for p in passes), len(passes)
        try:
            results = [(r, res) for r, res in zip(batch, self.model.forward_batch(passes))]
        except Exception as e:  # noqa: BLE001 - find the passes that fail on their own
            results = self._isolate(batch, passes, e)
        new = {}
        for r, res in results:
            try:
                got = r.feed(res)
            except Exception as e:  # noqa: BLE001
                r.fail(e)
                continue
            if got:
                new[r.id] = tuple(got)
        return new

    def _isolate(self, batch: list[Request], passes: list, error: Exception) -> list:
        """The batched pass failed: run each pass alone (the same results as in the batch:
        rows never depend on other sequences); a pass that fails alone fails its request.
        One request only: it fails with the batch's error."""
        if len(passes) == 1:
            batch[0].fail(error)
            return []
        log.warning("a batched pass of %d sequences failed (%s: %s); running them one by one",
                    len(passes), type(error).__name__, error)
        results = []
        for r, p in zip(batch, passes):
            try:
                results.append((r, self.model.forward_batch([p])[0]))
            except Exception as e:  # noqa: BLE001
                r.fail(e)
        return results

    def _attach(self, r: Request) -> int:
        if self.prefix_cache is None or r.finished:
            return 0
        try:
            return self.prefix_cache.attach(r)
        except Exception as e:  # noqa: BLE001 - this request's fault, not the engine's
            r.fail(e)
            return 0

    def _insert(self, r: Request) -> None:
        if self.prefix_cache is None:
            return
        try:
            self.prefix_cache.insert(r)
        except Exception:  # noqa: BLE001 - the request is answered; only the reuse is lost
            log.exception("prefix cache: could not store request %d", r.id)


def _output(r: Request, new: tuple) -> RequestOutput:
    lps = tuple(r.out_logprobs[len(r.out) - len(new):]) if r.logprobs_k is not None else ()
    return RequestOutput(r.id, tuple(new), r.stats, r.finished,
                         tuple(r.out) if r.finished else (), r.error, lps, r.prompt_logprobs,
                         r.progress() if r.report_progress else None)


class QueueFull(DlmError):
    """The engine's waiting queue is at its bound."""
