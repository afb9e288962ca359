"""The OpenAI-compatible HTTP app (FastAPI): routes, SSE streaming, auth, limits, errors.

The app never calls the model: requests become decode `Request`s handed to the engine thread
(server/service.py), and handlers read their token events.  Every error is answered in
OpenAI's error shape with a 4xx (bad request, auth, size, queue full) or a 503 (loading,
shutting down); a failure inside the engine is a 500 with a message, never a traceback.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..chat import render_chat
from ..decode.scheduler import DecodeSettings, Generator
from ..decode.strategies import Sampling
from ..engine import QueueFull
from ..errors import ConfigError, DlmError
from ..settings import DECODE_KEYS, check
from . import protocol as P
from .service import EngineService, Metrics, ShuttingDown
from .guards import install_errors, install_middleware
from .stops import StopMatcher

log = logging.getLogger("dlmnumba.server")
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(Sampling))
DISCONNECT_POLL_S = 0.5


@dataclass
class ServerOptions:
    """How the server behaves (from the config's server / scheduler keys)."""

    model_name: str = "dlmnumba"
    api_key: str | None = None
    max_sequences: int = 16
    max_waiting: int = 256
    max_body_bytes: int = 1 << 20
    prefix_cache_tokens: int = 0  # 0 = no prefix cache
    default_max_tokens: int = 128


@dataclass
class ServerState:
    """What the routes need; `service` is None until the model is loaded."""

    options: ServerOptions
    settings: DecodeSettings = field(default_factory=DecodeSettings)
    metrics: Metrics = field(default_factory=Metrics)
    generator: Generator | None = None
    service: EngineService | None = None
    load_error: str | None = None

    def ready(self) -> tuple[Generator, EngineService]:
        if self.service is None or self.generator is None:
            msg = (f"the model failed to load: {self.load_error}" if self.load_error
                   else "the model is loading")
            raise P.ApiError(503, msg, type_="service_unavailable", code="not_ready")
        return self.generator, self.service

    def attach(self, model) -> None:
        """Start serving a loaded model."""
        from ..prefix_cache import PrefixCache

        o = self.options
        self.generator = Generator(model, self.settings)
        pc = PrefixCache(o.prefix_cache_tokens) if o.prefix_cache_tokens > 0 else None
        svc = EngineService(model, o.max_sequences, o.max_waiting, pc, self.metrics)
        svc.start()
        self.service = svc


def create_app(state: ServerState, load: Callable[[], Any] | None = None) -> FastAPI:
    """The app.  `load` (optional) loads the model in a background thread at start-up; until it
    is done /health answers 503.  Without it, call state.attach(model) yourself."""
    import threading
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load is not None:
            def work():
                try:
                    state.attach(load())
                except Exception as e:  # noqa: BLE001 - reported by /health and every route
                    state.load_error = str(e)
                    log.error("model load failed: %s", e)
            threading.Thread(target=work, name="dlmnumba-load", daemon=True).start()
        yield
        if state.service is not None:
            state.service.stop()

    app = FastAPI(title="dlmnumba", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.dlm = state
    install_middleware(app, state.options.api_key, state.options.max_body_bytes)
    install_errors(app)

    @app.get("/health")
    async def health():
        if state.service is not None:
            return {"status": "ok"}
        if state.load_error:
            return JSONResponse({"status": "error", "message": state.load_error}, 503)
        return JSONResponse({"status": "loading"}, 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(state.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.options.model_name, "object": "model",
                                            "created": 0, "owned_by": "dlmnumba"}]}

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        gen, _ = state.ready()
        ids = _encode(gen, body.content, add_bos=None if body.add_special else False)
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        gen, _ = state.ready()
        n = gen.model.spec.n_vocab
        bad = [t for t in body.tokens if not 0 <= t < n]
        if bad:
            raise P.ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{n - 1})",
                             "tokens")
        return {"content": gen.model.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest, http: HttpRequest):
        gen, _ = state.ready()
        _refuse_unsupported(body)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in body.messages]
        try:
            text = render_chat(gen.model.file.metadata, messages)
        except ValueError as e:
            raise P.ApiError(400, str(e), "messages") from None
        ids = _encode(gen, text)
        return await _complete(state, body, ids, http, chat=True)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, http: HttpRequest):
        gen, _ = state.ready()
        _refuse_unsupported(body)
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], str)):
            text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
            ids = _encode(gen, text)
        else:
            ids = list(body.prompt)
            n = gen.model.spec.n_vocab
            bad = [t for t in ids if not 0 <= t < n]
            if bad:
                raise P.ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                      f"(0..{n - 1})", "prompt")
        if not ids:
            raise P.ApiError(400, "the prompt is empty", "prompt")
        return await _complete(state, body, ids, http, chat=False)

    return app


# -- request handling ---------------------------------------------------------------------------
def _encode(gen: Generator, text: str, add_bos: bool | None = None) -> list[int]:
    try:
        return gen.model.tokenizer.encode(text, add_bos=add_bos)
    except (ValueError, TypeError) as e:
        raise P.ApiError(400, f"cannot tokenize the text: {e}") from None


def _refuse_unsupported(body: P.CommonRequest) -> None:
    bad = body.unsupported()
    if bad is not None:
        raise P.ApiError(400, bad[1], bad[0], code="unsupported")


def _settings_for(state: ServerState, gen: Generator, body: P.CommonRequest,
                  n_prompt: int) -> DecodeSettings:
    """The server's default decode settings with the request's fields applied."""
    n_ctx = gen.model.n_ctx
    budget, budget_field = body.token_budget()
    if budget is None:
        budget = max(1, min(state.options.default_max_tokens, n_ctx - n_prompt))
    elif budget < 1:
        raise P.ApiError(400, f"'{budget_field}' must be >= 1, got {budget}", budget_field)
    if n_prompt + budget > n_ctx:
        raise P.ApiError(400, f"the prompt ({n_prompt} tokens) plus '{budget_field}' ({budget})"
                              f" is {n_prompt + budget} tokens, beyond the model's context "
                              f"length ({n_ctx})", budget_field, code="context_length_exceeded")
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


async def _complete(state: ServerState, body: P.CommonRequest, ids: list[int], http: HttpRequest,
                    chat: bool):
    gen, svc = state.ready()
    settings = _settings_for(state, gen, body, len(ids))
    stops = body.stops()
    try:
        request = gen.request(ids, settings)
    except DlmError as e:
        raise P.ApiError(400, str(e)) from None
    try:
        handle = svc.submit(request, asyncio.get_running_loop())
    except QueueFull as e:
        state.metrics.requests.labels("rejected").inc()
        raise P.ApiError(429, f"{e}; retry later", type_="rate_limit_exceeded",
                         code="queue_full", headers={"Retry-After": "1"}) from None
    except ShuttingDown as e:
        raise P.ApiError(503, str(e), type_="service_unavailable") from None
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    name = state.options.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(state, handle, StopMatcher(stops), rid, name, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _collect(state, handle, StopMatcher(stops), rid, name, chat, http)


async def _tokens(state: ServerState, handle, stopper: StopMatcher, poll=None
                  ) -> AsyncIterator[tuple[str, Any]]:
    """The request's text as it is decided: ("text", str) items, then ("end", finish_reason)
    or ("error", message).  A stop string cancels the request and ends the text there."""
    dec = state.generator.model.tokenizer.stream_decoder()
    while True:
        try:
            kind, payload = await asyncio.wait_for(handle.queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if poll is not None and await poll():
                state.service.cancel(handle)
                yield "error", "client disconnected"
                return
            continue
        if kind == "tokens":
            text, hit = stopper.push("".join(dec.push(t) for t in payload))
            if text:
                yield "text", text
            if hit:
                state.service.cancel(handle)
                yield "end", "stop"
                return
        elif kind == "done":
            text = stopper.flush(dec.flush())
            if text:
                yield "text", text
            yield "end", "stop" if stopper.stopped else handle.request.stats.finish_reason
            return
        else:
            yield "error", payload
            return


def _usage(handle) -> dict[str, Any]:
    st = handle.request.stats
    return P.usage(st.prompt_tokens, len(handle.request.out), st.forward_passes, st.ttft_s)


async def _collect(state, handle, stopper, rid, name, chat, http: HttpRequest):
    parts: list[str] = []
    finish = "length"
    async for kind, payload in _tokens(state, handle, stopper, http.is_disconnected):
        if kind == "text":
            parts.append(payload)
        elif kind == "end":
            finish = payload
        else:
            status = 503 if "shutting down" in payload else 500
            raise P.ApiError(status, payload, type_="server_error")
    text = "".join(parts)
    use = _usage(handle)
    return (P.chat_response if chat else P.completion_response)(rid, name, text, finish, use)


async def _stream(state, handle, stopper, rid, name, chat, include_usage):
    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    done = False
    try:
        if chat:
            yield sse(P.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None))
        async for kind, payload in _tokens(state, handle, stopper):
            if kind == "text":
                yield sse(P.chat_chunk(rid, name, {"content": payload}, None) if chat
                          else P.completion_chunk(rid, name, payload, None))
            elif kind == "end":
                yield sse(P.chat_chunk(rid, name, {}, payload) if chat
                          else P.completion_chunk(rid, name, "", payload))
                if include_usage:
                    yield sse(P.usage_chunk(rid, name, "chat.completion.chunk" if chat
                                            else "text_completion", _usage(handle)))
            else:
                yield sse(P.error_body(payload, "server_error"))
        done = True
        yield b"data: [DONE]\n\n"
    finally:
        if not done:  # the client went away mid-stream: free the slot at the next step
            state.service.cancel(handle)
