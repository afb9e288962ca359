"""Which model file a command runs, and the settings that file recommends.

Without a configured path, `generate` and `eval` run the bundled toy model and `bench` the
built-in default model: a synthetic model with BitNet b1.58 2B-4T's shapes, written once to the
user cache.  A file may recommend decoding settings in its metadata (`diffusion.block_size`,
...); they apply above the defaults and below environment, YAML and command line.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, ModelFormatError
from .settings import check, check_together

# The bundled toy model (scripts/train_toy_dlm.py): the default model of `generate` and `eval`.
TOY_MODEL = Path(__file__).resolve().parent / "data" / "toy-dlm.gguf"
# The built-in default model of `bench`: real 2B-4T shapes, in a type and architecture that
# llama.cpp also loads, so comparisons run on the very same file.
DEFAULT_MODEL = {"preset": "bitnet-2b4t", "qtype": "TQ2_0", "arch": "bitnet", "seed": 0}
CACHE_ENV = "DLMNUMBA_CACHE_DIR"

# GGUF metadata key -> the setting it recommends.
RECOMMENDED_KEYS = {
    "diffusion.block_size": "dlm.block_size",
    "diffusion.small_block_size": "dlm.small_block_size",
    "diffusion.threshold": "dlm.threshold",
    "diffusion.decode_mode": "dlm.decode_mode",
}


def default_model_path() -> tuple[Path, dict]:
    """Where the built-in default model lives (user cache dir) and how to write it."""
    root = Path(os.environ.get(CACHE_ENV) or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlmnumba")
    d = DEFAULT_MODEL
    return root / f"synthetic-{d['preset']}-{d['qtype']}-{d['arch']}-seed{d['seed']}.gguf", dict(d)


def resolve_model_path(path: str | os.PathLike | None, default: str = "bench",
                       note: Callable[[str], None] = lambda _: None,
                       progress: bool = False) -> Path:
    """`path`, or the built-in model of `default` ("toy": the bundled toy model, "bench": the
    2B-4T-shaped synthetic model, written on first use); `note` is told which one runs."""
    if path is not None:
        return Path(path)
    if default == "toy":
        note(f"model: bundled {TOY_MODEL.name} (a tiny ternary block-diffusion model "
             "trained on arithmetic, copy, reverse, sort and lookup tasks; pass --model for a "
             "real model)")
        return TOY_MODEL
    if default != "bench":
        raise ValueError(f"unknown default model {default!r}; expected toy or bench")
    out, spec = default_model_path()
    if not out.exists():
        from .synth.models import write_synthetic

        note(f"writing the built-in default model to {out} (once) ...")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(out, progress=progress, **spec)
    note(f"model: built-in default {out.name} (BitNet 2B-4T shapes, random weights: its text is "
         "noise; pass --model for a real model)")
    return out


def resolve(load_config: Callable[[Callable[[Any], Mapping[str, Any]]], Any],
            default: str = "bench", note: Callable[[str], None] = lambda _: None,
            progress: bool = False):
    """(Config, opened GGUF file) of a command, each resolved once: `load_config` gets the
    function that maps the effective model_path to the file's recommended settings (see
    config.load_config); that function opens the file (the configured one, or the built-in
    one of `default`) once and checks its metadata, so a bad file fails here.  The Config's
    model_path is the file's path."""
    import dataclasses

    from .gguf.reader import GGUFFile
    from .gguf.spec import ModelSpec

    opened: list[GGUFFile] = []

    def recommended(model_path):
        path = str(resolve_model_path(model_path, default, note, progress))
        f = GGUFFile(path)
        ModelSpec.from_metadata(f.metadata, path)
        opened.append(f)
        return recommended_settings(f.metadata, path)

    cfg = load_config(recommended)
    return dataclasses.replace(cfg, model_path=opened[0].path), opened[0]


def open_model(cfg, default: str = "bench", note: Callable[[str], None] = lambda _: None,
               progress: bool = False, file=None):
    """Load the model a Config names (or the built-in one of `default`; or `file`, a GGUF file
    already opened for it) with its threads, kernel path and LM head."""
    from .model.bitnet import load_model

    source = file if file is not None else str(
        resolve_model_path(cfg.model_path, default, note, progress))
    return load_model(source, threads=cfg.threads, progress=progress,
                      kernel=None if cfg.kernel == "auto" else cfg.kernel, lm_head=cfg.lm_head,
                      threads_yield=cfg.threads_yield)


def _as_written(value: Any) -> Any:
    """A float32 metadata value as its shortest decimal (0.9, not 0.8999999761581421)."""
    if isinstance(value, float) and float(np.float32(value)) == value:
        return float(str(np.float32(value)))
    return value


def _source(path: str, gguf_key: str) -> str:
    return f"{path} (metadata {gguf_key!r})"


def recommended_settings(metadata: Mapping[str, Any], path: str) -> dict[str, Any]:
    """{setting key: value} of the decoding settings the file recommends, each checked by the
    setting's own definition; a bad one is a ModelFormatError naming the file and the key."""
    out: dict[str, Any] = {}
    for gguf_key, key in RECOMMENDED_KEYS.items():
        if gguf_key not in metadata:
            continue
        try:
            out[key] = check(key, _as_written(metadata[gguf_key]), _source(path, gguf_key))
        except ConfigError as e:
            raise ModelFormatError(str(e)) from None
    try:
        check_together(out, {key: _source(path, g) for g, key in RECOMMENDED_KEYS.items()})
    except ConfigError as e:
        raise ModelFormatError(f"{path}: recommended settings disagree: {e}") from None
    return out
