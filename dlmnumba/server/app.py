"""The OpenAI-compatible HTTP app (FastAPI): routes, SSE streaming, auth, limits, errors.

The app never calls the model: requests become decode `Request`s handed to the engine thread
(server/service.py), and handlers read their token events.  Every error is answered in
OpenAI's error shape with a 4xx (bad request, auth, size, queue full) or a 503 (loading,
shutting down); a failure inside the engine is a 500 with a message, never a traceback.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..chat import render_chat
from ..errors import DecodeError
from ..runtime.decode_settings import DecodeSettings
from ..runtime.generator import Generator
from ..runtime.prefix_cache import PrefixCache
from . import protocol as P
from .completions import complete
from .guards import install_errors, install_middleware
from .schema import COMPLETION_RESPONSES, ERROR_RESPONSES, install_schema
from .service import EngineService, Metrics

log = logging.getLogger("dlmnumba.server")
CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"  # GET /


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
    openapi: bool = True  # serve /openapi.json


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

    app = FastAPI(title="dlmnumba", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  openapi_url="/openapi.json" if state.options.openapi else None,
                  description="OpenAI-compatible API of a ternary diffusion LM (dlmnumba).")
    app.state.dlm = state
    install_middleware(app, state.options.api_key, state.options.max_body_bytes,
                       state.metrics.responses)
    install_errors(app)
    install_schema(app, state.options.model_name)

    page_html = CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def page():
        """The chat page (static: its requests to the API carry the key it asks for)."""
        return HTMLResponse(page_html)

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

    def model_card():
        return {"id": state.options.model_name, "object": "model", "created": 0,
                "owned_by": "dlmnumba"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def model(model_id: str):
        if model_id != state.options.model_name:
            raise P.ApiError(404, f"the model '{model_id}' does not exist here (this server "
                                  f"serves '{state.options.model_name}')", "model",
                             type_="not_found_error", code="model_not_found")
        return model_card()

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(body: P.TokenizeRequest):
        gen, _ = state.ready()
        text, special = body.text_and_special()
        ids = _encode(gen, text, add_bos=None if special else False)
        return {"tokens": ids, "count": len(ids), "max_model_len": gen.model.n_ctx}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """What lm-evaluation-harness's remote tokenizer reads (vLLM's endpoint)."""
        gen, _ = state.ready()
        spec, tok = gen.model.spec, gen.model.tokenizer

        def text(i):
            return None if i is None else tok.token_text(i)
        return {"bos_token": text(spec.bos_id), "eos_token": text(spec.eot_id or spec.eos_id),
                "pad_token": None, "chat_template":
                    gen.model.file.metadata.get("tokenizer.chat_template"),
                "model_max_length": gen.model.n_ctx, "vocab_size": gen.model.n_vocab}

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(body: P.DetokenizeRequest):
        gen, _ = state.ready()
        try:
            gen.model.check_tokens(body.tokens, "tokens")
        except DecodeError as e:
            raise P.ApiError(400, str(e), e.field) from None
        text = gen.model.tokenizer.decode(body.tokens)
        return {"content": text, "prompt": text}  # llama.cpp's name, vLLM's

    @app.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
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
        return await complete(state, body, [(ids, text)], http, chat=True)

    @app.post("/v1/completions", responses=COMPLETION_RESPONSES)
    async def completions(body: P.CompletionRequest, http: HttpRequest):
        gen, _ = state.ready()
        _refuse_unsupported(body)
        prompts = []
        for p in body.prompt_list():
            if isinstance(p, str):
                ids, text = _encode(gen, p), p
            else:  # token ids: checked with the request (Request: model.check_tokens)
                ids = list(p)
                try:
                    gen.model.check_tokens(ids, "prompt")
                except DecodeError as e:
                    raise P.ApiError(400, str(e), e.field) from None
                text = gen.model.tokenizer.decode(ids, skip_special=False)
            if not ids:
                raise P.ApiError(400, "the prompt is empty", "prompt")
            prompts.append((ids, text))
        return await complete(state, body, prompts, http, chat=False)

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
