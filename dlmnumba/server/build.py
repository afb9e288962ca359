"""The server of a resolved Config: its state (options, default decode settings) and the local
backend (one uvicorn process).  The Ray backend (dlmnumba/cluster) builds the same app."""
from __future__ import annotations

from pathlib import Path

from ..config import decode_settings
from .app import ServerOptions, ServerState, create_app


def server_state(cfg) -> ServerState:
    """The app state a Config describes (cfg.model_path resolved to a file)."""
    sc = cfg.scheduler
    return ServerState(
        ServerOptions(model_name=Path(cfg.model_path).stem, api_key=cfg.api_key,
                      max_sequences=sc.max_sequences, max_waiting=sc.max_waiting,
                      max_body_bytes=cfg.max_request_bytes,
                      prefix_cache_tokens=(sc.radix_cache_max_tokens if sc.enable_radix_cache
                                           else 0),
                      default_max_tokens=cfg.sampling.max_tokens, openapi=cfg.openapi),
        decode_settings(cfg, cfg.sampling.max_tokens))


def load_model(cfg, file=None):
    """The Config's model with its threads, kernel path and LM head (`file`: its GGUF file,
    already opened), its kernels warmed up (runtime.warmup: compiled or loaded from the disk
    cache before the first request, not inside it)."""
    from ..model_source import open_model
    from ..runtime.warmup import warm_up

    model = open_model(cfg, progress=False, file=file)
    warm_up(model, decode_settings(cfg, cfg.sampling.max_tokens))
    return model


def serve_local(cfg, log_level: str = "info", file=None) -> None:
    """Serve in this process until Ctrl-C / SIGTERM; the model (from `file`, the GGUF file the
    configuration was resolved with, when given) loads in the background while /health
    answers 503."""
    from .run import serve_forever

    serve_forever(create_app(server_state(cfg), load=lambda: load_model(cfg, file)), cfg.host,
                  cfg.port, log_level)
