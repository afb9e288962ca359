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
from ..decode.requests import check_context
from ..decode.strategies import Sampling
from ..errors import ConfigError, DecodeError, DlmError
from ..runtime.decode_settings import DecodeSettings
from ..runtime.engine import QueueFull, RequestOutput
from ..runtime.generator import Generator
from ..runtime.prefix_cache import PrefixCache
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
        if not self.service.alive:
            raise P.ApiError(503, self.service.failure or "the server is shutting down",
                             type_="service_unavailable", code="engine_stopped")
        return self.generator, self.service

    def attach(self, model) -> None:
        """Start serving a loaded model."""
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
        svc = state.service
        if svc is not None:
            if svc.alive:
                return {"status": "ok"}
            return JSONResponse({"status": "error",
                                 "message": svc.failure or "the server is shutting down"}, 503)
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
        try:
            gen.model.check_tokens(body.tokens, "tokens")
        except DecodeError as e:
            raise P.ApiError(400, str(e), e.field) from None
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
            ids = list(body.prompt)  # checked with the request (Request: model.check_tokens)
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


async def _complete(state: ServerState, body: P.CommonRequest, ids: list[int], http: HttpRequest,
                    chat: bool):
    gen, svc = state.ready()
    settings = _settings_for(state, gen, body, len(ids))
    stops = body.stops()
    try:
        request = gen.request(ids, settings)
    except DecodeError as e:
        raise P.ApiError(400, str(e), e.field, code=e.code) from None
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
                  ) -> AsyncIterator[tuple]:
    """The request's text as it is decided: ("text", str) items, then ("end", finish_reason,
    usage) or ("error", message).  A stop string cancels the request and ends the text there;
    the usage then counts the tokens through the one that completed it.  Everything comes from
    the engine's frozen outputs, never from the live request."""
    dec = state.generator.model.tokenizer.stream_decoder()
    n_tokens = 0  # tokens whose text was taken, in order
    while True:
        try:
            event = await asyncio.wait_for(handle.queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if poll is not None and await poll():
                state.service.cancel(handle)
                yield "error", "client disconnected"
                return
            continue
        if not isinstance(event, RequestOutput):  # ("error", message) from the service
            yield "error", event[1]
            return
        text, hit = "", False
        for t in event.new_tokens:
            n_tokens += 1
            piece, hit = stopper.push(dec.push(t))
            text += piece
            if hit:
                break
        if text:
            yield "text", text
        if hit:
            state.service.cancel(handle)
            yield "end", "stop", _usage(event, n_tokens)
            return
        if event.finished:
            if event.error is not None:
                yield "error", event.error_message
                return
            text = stopper.flush(dec.flush())
            if text:
                yield "text", text
            yield ("end", "stop" if stopper.stopped else event.stats.finish_reason,
                   _usage(event, len(event.tokens)))
            return


def _usage(out: RequestOutput, completion_tokens: int) -> dict[str, Any]:
    st = out.stats
    return P.usage(st.prompt_tokens, completion_tokens, st.forward_passes, st.ttft_s,
                   st.draft_tokens, st.accepted_tokens)


async def _collect(state, handle, stopper, rid, name, chat, http: HttpRequest):
    parts: list[str] = []
    async for kind, *payload in _tokens(state, handle, stopper, http.is_disconnected):
        if kind == "text":
            parts.append(payload[0])
        elif kind == "end":
            finish, use = payload
        else:
            status = 503 if not state.service.alive or "shutting down" in payload[0] else 500
            raise P.ApiError(status, payload[0], type_="server_error")
    text = "".join(parts)
    return (P.chat_response if chat else P.completion_response)(rid, name, text, finish, use)


async def _stream(state, handle, stopper, rid, name, chat, include_usage):
    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    done = False
    try:
        if chat:
            yield sse(P.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None))
        async for kind, *payload in _tokens(state, handle, stopper):
            if kind == "text":
                yield sse(P.chat_chunk(rid, name, {"content": payload[0]}, None) if chat
                          else P.completion_chunk(rid, name, payload[0], None))
            elif kind == "end":
                finish, use = payload
                yield sse(P.chat_chunk(rid, name, {}, finish) if chat
                          else P.completion_chunk(rid, name, "", finish))
                if include_usage:
                    yield sse(P.usage_chunk(rid, name, "chat.completion.chunk" if chat
                                            else "text_completion", use))
            else:
                yield sse(P.error_body(payload[0], "server_error"))
        done = True
        yield b"data: [DONE]\n\n"
    finally:
        if not done:  # the client went away mid-stream: free the slot at the next step
            state.service.cancel(handle)
