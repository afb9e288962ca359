"""Chat and text completions: a request's prompts and choices as engine requests, their outputs
read as the engine posts them (never a live request), answered whole or streamed.

One HTTP request becomes one engine request per prompt and choice (`prompt` lists, `n`), all
submitted together so they share the engine's steps; `index` orders the choices prompt by
prompt.  Log-probabilities (`logprobs`, chat's `top_logprobs`) are the exact LM head's, of
each committed token at the pass that committed it; `echo` (completions) prefixes the prompt,
and with logprobs its tokens' log-probabilities from one causal pass over it (the first
token's is null).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from ..decode.requests import check_context
from ..decode.strategies import Sampling
from ..errors import ConfigError, DecodeError, DlmError
from ..runtime.decode_settings import DecodeSettings
from ..runtime.engine import QueueFull, RequestOutput
from ..settings import DECODE_KEYS, check
from . import protocol as P
from .service import ShuttingDown
from .stops import StopMatcher

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(Sampling))
DISCONNECT_POLL_S = 0.5


@dataclass
class Choice:
    """One engine request of an HTTP request, and what its handler has read of it."""

    index: int
    prompt: list[int]
    handle: Any
    stopper: StopMatcher
    echo_text: str = ""  # the prompt's text, when echoed
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # consumed, through a stop string's
    entries: list = field(default_factory=list)  # their log-probabilities
    prompt_entries: tuple | None = None
    finish: str | None = None
    last: RequestOutput | None = None  # the latest output read (its stats)


def settings_for(state, gen, body: P.CommonRequest, n_prompt: int) -> DecodeSettings:
    """The server's default decode settings with the request's fields applied."""
    n_ctx = gen.model.n_ctx
    budget, budget_field = body.token_budget()
    if budget is None:
        budget = max(1, min(state.options.default_max_tokens, n_ctx - n_prompt))
    elif budget < 1:
        raise P.ApiError(400, f"'{budget_field}' must be >= 1, got {budget}", budget_field)
    try:
        check_context(n_prompt, budget, n_ctx, budget_field)
    except DecodeError as e:
        raise P.ApiError(400, str(e), e.field, code=e.code) from None
    base = state.settings
    given = {f: getattr(body, f) for f in (*P.DECODE_FIELDS, *P.OPENAI_FIELDS)
             if f != "max_tokens" and getattr(body, f) is not None}
    for f, value in given.items():  # the same definitions as the CLI and YAML
        try:
            given[f] = check(DECODE_KEYS[f], value, "request")
        except ConfigError as e:
            raise P.ApiError(400, str(e), f) from None
    sampling = {f: v for f, v in given.items() if f in SAMPLING_FIELDS}
    decode = {f: v for f, v in given.items() if f not in SAMPLING_FIELDS}
    try:
        return dataclasses.replace(
            base, max_tokens=budget, sampling=dataclasses.replace(base.sampling, **sampling),
            **decode)
    except ValueError as e:  # a rule between fields (block_size vs small_block_size)
        raise P.ApiError(400, str(e), next(iter(decode), None)) from None


def _nth(settings: DecodeSettings, j: int) -> DecodeSettings:
    """The settings of a prompt's j-th choice: its own seed when sampling."""
    if j == 0 or settings.sampling.temperature <= 0:
        return settings
    return dataclasses.replace(settings, sampling=dataclasses.replace(
        settings.sampling, seed=settings.sampling.seed + j))


async def complete(state, body: P.CommonRequest, prompts: list[tuple[list[int], str]],
                   http: HttpRequest, chat: bool):
    """Answer a chat or text completion of these (token ids, text) prompts."""
    gen, svc = state.ready()
    n = body.choices_per_prompt()
    k = body.wanted_logprobs()
    echo = bool(getattr(body, "echo", False))
    stops = body.stops()
    grammar = body.grammar()  # structured output (response_format)
    requests = []
    for ids, text in prompts:
        settings = settings_for(state, gen, body, len(ids))
        for j in range(n):
            try:
                requests.append((ids, text, gen.request(ids, _nth(settings, j), logprobs=k,
                                                        echo=echo, grammar=grammar)))
            except DecodeError as e:
                raise P.ApiError(400, str(e), e.field, code=e.code) from None
            except DlmError as e:
                raise P.ApiError(400, str(e)) from None
    if body.dlm_progress and body.stream:  # before the engine thread can step them
        for _, _, r in requests:
            r.report_progress = True
    loop = asyncio.get_running_loop()
    choices: list[Choice] = []
    try:
        for i, (ids, text, r) in enumerate(requests):
            choices.append(Choice(i, ids, svc.submit(r, loop), StopMatcher(stops),
                                  text if echo else ""))
    except (QueueFull, ShuttingDown) as e:
        for c in choices:
            svc.cancel(c.handle)
        if isinstance(e, ShuttingDown):
            raise P.ApiError(503, str(e), type_="service_unavailable") from None
        state.metrics.requests.labels("rejected").inc()
        raise P.ApiError(429, f"{e}; retry later", type_="rate_limit_exceeded",
                         code="queue_full", headers={"Retry-After": "1"}) from None
    reply = _Reply(state, P.new_id("chatcmpl" if chat else "cmpl"), state.options.model_name,
                   chat, k, sum(len(ids) for ids, _ in prompts), choices)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(reply.stream(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await reply.collect(http)


class _Reply:
    """The choices of one HTTP request, read and answered."""

    def __init__(self, state, rid: str, name: str, chat: bool, k: int | None,
                 prompt_tokens: int, choices: list[Choice]):
        self.state, self.rid, self.name, self.chat, self.k = state, rid, name, chat, k
        self.prompt_tokens, self.choices = prompt_tokens, choices  # one count per prompt
        tok = state.generator.model.tokenizer
        self.text_of = lambda t: tok.decode([t], skip_special=False)

    # -- reading one choice -----------------------------------------------------------------
    async def events(self, c: Choice, poll=None) -> AsyncIterator[tuple]:
        """("text", str, entries) as decided (entries: the consumed tokens' log-probabilities),
        then ("end",) or ("error", message).  A stop string cancels the choice and ends its
        text there (its tokens through the one that completed it)."""
        svc = self.state.service
        dec = self.state.generator.model.tokenizer.stream_decoder()
        while True:
            try:
                event = await asyncio.wait_for(c.handle.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if poll is not None and await poll():
                    svc.cancel(c.handle)
                    yield "error", "client disconnected"
                    return
                continue
            if not isinstance(event, RequestOutput):  # ("error", message) from the service
                yield "error", event[1]
                return
            c.last = event
            if event.progress is not None and not event.finished:
                yield "progress", event.progress, event.stats
            if event.prompt_logprobs is not None and c.prompt_entries is None:
                c.prompt_entries = event.prompt_logprobs
            text, hit, entries = "", False, []
            for i, t in enumerate(event.new_tokens):
                c.tokens.append(t)
                if event.new_logprobs:
                    entries.append(event.new_logprobs[i])
                piece, hit = c.stopper.push(dec.push(t))
                text += piece
                if hit:
                    break
            c.entries += entries
            if text or entries:
                c.text.append(text)
                yield "text", text, entries
            if hit:
                svc.cancel(c.handle)
                c.finish = "stop"
                yield ("end",)
                return
            if event.finished:
                if event.error is not None:
                    yield "error", event.error_message
                    return
                text = c.stopper.flush(dec.flush())
                if text:
                    c.text.append(text)
                    yield "text", text, []
                c.finish = "stop" if c.stopper.stopped else event.stats.finish_reason
                yield ("end",)
                return

    # -- the answer -------------------------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        stats = [c.last.stats for c in self.choices if c.last is not None]
        return P.usage(self.prompt_tokens, sum(len(c.tokens) for c in self.choices),
                       sum(s.forward_passes for s in stats),
                       min((s.ttft_s for s in stats), default=0.0),
                       sum(s.draft_tokens for s in stats), sum(s.accepted_tokens for s in stats))

    def logprobs(self, c: Choice, entries: list, tokens: list[int], with_prompt: bool,
                 offset0: int = 0):
        """The logprobs object of these tokens (None without logprobs)."""
        if self.k is None:
            return None
        if self.chat:
            return {"content": P.chat_logprobs(entries, self.text_of, self.k)}
        pairs = list(zip(entries, tokens))
        if with_prompt and c.prompt_entries is not None:
            pairs = list(zip(c.prompt_entries, c.prompt)) + pairs
        return P.completion_logprobs(pairs, self.text_of, offset0)

    def choice_json(self, c: Choice) -> dict[str, Any]:
        text = "".join(c.text)
        lp = self.logprobs(c, c.entries, c.tokens[:len(c.entries)], True)
        if self.chat:
            return {"index": c.index, "message": {"role": "assistant", "content": text},
                    "logprobs": lp, "finish_reason": c.finish}
        return {"index": c.index, "text": c.echo_text + text, "logprobs": lp,
                "finish_reason": c.finish}

    async def collect(self, http: HttpRequest):
        async def one(c: Choice):
            async for kind, *payload in self.events(c, http.is_disconnected):
                if kind == "error":
                    return payload[0]
            return None

        errors = [e for e in await asyncio.gather(*(one(c) for c in self.choices)) if e]
        if errors:
            for c in self.choices:
                self.state.service.cancel(c.handle)
            svc = self.state.service
            status = 503 if not svc.alive or "shutting down" in errors[0] else 500
            raise P.ApiError(status, errors[0], type_="server_error")
        obj = "chat.completion" if self.chat else "text_completion"
        return P.response(self.rid, obj, self.name, [self.choice_json(c) for c in self.choices],
                          self.usage())

    def chunk(self, c: Choice, text: str | None, entries: list, finish: str | None,
              role: bool = False, prompt: bool = False) -> bytes:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {} if text is None else {"content": text})
            choice = {"index": c.index, "delta": delta,
                      "logprobs": (None if role or not entries
                                   else self.logprobs(c, entries, [e.token for e in entries],
                                                      False)),
                      "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            tokens = c.prompt if prompt else [e.token for e in entries]
            lp = None
            if self.k is not None and (entries or prompt):
                lp = (self.logprobs(c, [], [], True) if prompt
                      else self.logprobs(c, entries, tokens, False))
            choice = {"index": c.index, "text": text or "", "logprobs": lp,
                      "finish_reason": finish}
            obj = "text_completion"
        return _sse(P.chunk(self.rid, obj, self.name, [choice]))

    async def stream(self, include_usage: bool):
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice):
            try:
                async for ev in self.events(c):
                    await queue.put((c, ev))
            finally:
                await queue.put((c, None))

        tasks = [asyncio.ensure_future(pump(c)) for c in self.choices]
        done = False
        echoed: set[int] = set()
        try:
            if self.chat:
                for c in self.choices:
                    yield self.chunk(c, None, [], None, role=True)
            open_choices = len(self.choices)
            while open_choices:
                c, ev = await queue.get()
                if c.echo_text and c.index not in echoed and ev is not None:
                    # the prompt first (its log-probabilities come with the first output)
                    echoed.add(c.index)
                    yield self.chunk(c, c.echo_text, [], None, prompt=True)
                if ev is None:
                    open_choices -= 1
                elif ev[0] == "text":
                    yield self.chunk(c, ev[1], ev[2], None)
                elif ev[0] == "progress":
                    offset, tokens = ev[1]
                    obj = "chat.completion.chunk" if self.chat else "text_completion"
                    out = P.chunk(self.rid, obj, self.name, [])
                    out["dlm"] = {"index": c.index, "offset": offset,
                                  "tokens": [None if t is None else self.text_of(t)
                                             for t in tokens],
                                  "forward_passes": ev[2].forward_passes}
                    yield _sse(out)
                elif ev[0] == "end":
                    yield self.chunk(c, None if self.chat else "", [], c.finish)
                else:
                    yield _sse(P.error_body(ev[1], "server_error"))
            if include_usage:
                obj = "chat.completion.chunk" if self.chat else "text_completion"
                yield _sse(P.chunk(self.rid, obj, self.name, [], self.usage()))
            done = True
            yield b"data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            if not done:  # the client went away mid-stream: free the slots at the next step
                for c in self.choices:
                    self.state.service.cancel(c.handle)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
