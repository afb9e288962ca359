"""Configuration: frozen dataclasses, YAML <-> dataclass, precedence CLI > YAML > env > defaults.

Environment variables: ``DLMNUMBA_<KEY>`` with the key's leaf name in upper case sets that key,
e.g. ``DLMNUMBA_BLOCK_SIZE``, ``DLMNUMBA_THREADS``, ``DLMNUMBA_TEMPERATURE``,
``DLMNUMBA_ENABLE_RADIX_CACHE``. Leaf names are unique across sections, with one exception:
``DLMNUMBA_MAX_TOKENS`` sets both ``sampling.max_tokens`` and ``benchmark.max_tokens``.
``model_path`` is also read from the seed's ``MODEL_PATH``; ``DLMNUMBA_MODEL_PATH`` wins when
both are set. An empty variable counts as unset.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError

ENV_PREFIX = "DLMNUMBA_"
DEFAULTS_SOURCE = "defaults"
MODEL_SOURCE = "the model file"
CLI_SOURCE = "command line"

# A range rule: predicate on the (already type-checked) value, and what it demands.
Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "must be a positive integer")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be >= 0")
NULL_OR_POSITIVE: Check = (lambda v: v is None or v >= 1, "must be null or >= 1")
NULL_OR_NON_NEGATIVE: Check = (lambda v: v is None or v >= 0, "must be null or >= 0")


def _f(default: Any, doc: str, check: Check | None = None,
       choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field whose help text is its comment here and in the generated YAML."""
    return field(default=default, metadata={"help": doc, "check": check, "choices": choices})


def _section(cls: type, doc: str) -> Any:
    """A nested-section field (default-constructed) with its help text."""
    return field(default_factory=cls, metadata={"help": doc})


@dataclass(frozen=True)
class DlmConfig:
    """Diffusion decoding settings."""

    block_size: int = _f(64, "Tokens decoded per diffusion block; must match the model's training.",
                         POSITIVE)
    small_block_size: int = _f(8, "Sub-block size for iterative/adaptive unmasking; block_size "
                                  "must be a multiple of it.", POSITIVE)
    threshold: float = _f(0.9, "Confidence above which a masked position is committed "
                               "(iterative/adaptive), in (0, 1).",
                          (lambda v: 0 < v < 1, "must be in the open interval (0, 1)"))
    mask_token_id: int | None = _f(None, "Id of the MASK token; null = auto-detect from the "
                                         "vocabulary.", NULL_OR_NON_NEGATIVE)
    max_iterations_per_block: int = _f(10, "Most forward passes per block in iterative mode.",
                                       POSITIVE)
    decode_mode: str = _f("greedy", "greedy: one pass per block; iterative: unmask above "
                                    "threshold; adaptive: rising thresholds; ar: one token per "
                                    "pass.", choices=("greedy", "iterative", "adaptive", "ar"))
    attention: str = _f("block", "block: bidirectional within a block, causal across blocks; "
                                 "causal: the seed's causal-only attention.",
                        choices=("block", "causal"))
    kv_commit: str = _f("normal", "normal: decoded tokens are written to the KV cache; none: the "
                                  "seed's stale-mask scheduling (comparison only, lower quality).",
                        choices=("normal", "none"))


@dataclass(frozen=True)
class SamplingConfig:
    """Token sampling settings."""

    temperature: float = _f(0.0, "Softmax temperature; 0 = greedy argmax.",
                            (lambda v: v >= 0, "must be >= 0"))
    top_k: int = _f(0, "Keep only the k most likely tokens; 0 = off.", NON_NEGATIVE)
    top_p: float = _f(1.0, "Nucleus sampling mass, in (0, 1]; 1 = off.",
                      (lambda v: 0 < v <= 1, "must be in the interval (0, 1]"))
    seed: int = _f(0, "Random seed for sampling.", NON_NEGATIVE)
    max_tokens: int = _f(128, "Default most new tokens per request.", POSITIVE)


@dataclass(frozen=True)
class SchedulerConfig:
    """Request scheduling and cache settings."""

    max_sequences: int = _f(16, "Most sequences decoded together.", POSITIVE)
    enable_radix_cache: bool = _f(True, "Reuse the KV cache of shared prompt prefixes.")
    radix_cache_max_tokens: int = _f(65536, "Most tokens kept in the prefix cache.", POSITIVE)


@dataclass(frozen=True)
class BenchmarkConfig:
    """Built-in benchmark settings (the seed's report)."""

    enabled: bool = _f(False, "Run the benchmark instead of serving.")
    iterations: int = _f(50, "Measured requests, run one after another.", POSITIVE)
    warmup: int = _f(3, "Unmeasured warm-up requests before them.", NON_NEGATIVE)
    max_tokens: int = _f(128, "New tokens per benchmark request.", POSITIVE)
    prompt: str = _f("What is the meaning of life?", "User prompt of every benchmark request.")


@dataclass(frozen=True)
class Config:
    """The whole effective configuration."""

    model_path: str | None = _f(None, "GGUF model file; null = built-in default model.")
    host: str = _f("127.0.0.1", "Address the HTTP server listens on (the seed used 0.0.0.0).",
                   (lambda v: v != "", "must not be empty"))
    port: int = _f(30000, "HTTP port.", (lambda v: 1 <= v <= 65535, "must be in 1..65535"))
    threads: int | None = _f(None, "Compute threads; null = physical cores.", NULL_OR_POSITIVE)
    kernel: str = _f("auto", "int8 kernel instruction path: auto (fastest this CPU has), vnni512, "
                             "vnni256, avx2 or portable.",
                     choices=("auto", "vnni512", "vnni256", "avx2", "portable"))
    lm_head: str = _f("exact", "LM head: exact (the file's embedding as stored) or int8 "
                               "(quantized per row at load; faster, logits differ slightly).",
                      choices=("exact", "int8"))
    dlm: DlmConfig = _section(DlmConfig, "Diffusion decoding.")
    sampling: SamplingConfig = _section(SamplingConfig, "Sampling.")
    scheduler: SchedulerConfig = _section(SchedulerConfig, "Scheduler.")
    benchmark: BenchmarkConfig = _section(BenchmarkConfig, "Benchmark (dlmnumba bench).")


@dataclass(frozen=True)
class _Leaf:
    """One settable key: its dotted name, base type, whether null is allowed, and its field."""

    key: str
    type: type
    optional: bool
    field: dataclasses.Field


def _leaves_of(cls: type, prefix: str = "") -> list[_Leaf]:
    """All leaf keys of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves_of(tp, f"{prefix}{f.name}.")
            continue
        args = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        base = [a for a in args if a is not type(None)]
        assert len(base) == 1 and base[0] in (int, float, str, bool), f"unsupported type {tp}"
        out.append(_Leaf(prefix + f.name, base[0], type(None) in args, f))
    return out


LEAVES: dict[str, _Leaf] = {leaf.key: leaf for leaf in _leaves_of(Config)}
SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config)
                                  if dataclasses.is_dataclass(f.default_factory))


def _env_names() -> dict[str, list[str]]:
    """Environment variable -> dotted keys it sets."""
    names: dict[str, list[str]] = {}
    for key in LEAVES:
        names.setdefault(ENV_PREFIX + key.rsplit(".", 1)[-1].upper(), []).append(key)
    # Leaf names must stay unique so that each variable means one key; max_tokens is the one
    # deliberate exception (one variable for the request default and the benchmark).
    shared = {name: keys for name, keys in names.items() if len(keys) > 1}
    assert shared == {"DLMNUMBA_MAX_TOKENS": ["sampling.max_tokens", "benchmark.max_tokens"]}, shared
    return names


ENV_VARS: dict[str, list[str]] = _env_names()

# bool is a subclass of int, so ints and floats exclude it explicitly (YAML true is not 1).
_TYPE_TESTS: dict[type, Callable[[Any], bool]] = {
    bool: lambda v: type(v) is bool,
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean (true/false)"}


def _err(source: str, key: str, problem: str) -> ConfigError:
    """A ConfigError naming where the value came from and which key it is."""
    return ConfigError(f"{source}: '{key}' {problem}")


def _check_type(leaf: _Leaf, value: Any, source: str) -> Any:
    """Return value (ints widened for float keys) if it has the key's type; else raise."""
    if isinstance(value, os.PathLike) and leaf.type is str:
        value = os.fspath(value)
    if value is None and leaf.optional:
        return None
    tp = leaf.type
    ok = _TYPE_TESTS[tp](value)
    if ok and tp is float:
        value = float(value)
        ok = math.isfinite(value)
    if not ok:
        expected = _TYPE_NAMES[tp] + (" or null" if leaf.optional else "")
        shown = "null" if value is None else f"{value!r} ({type(value).__name__})"
        hint = ""
        if tp is float and isinstance(value, str) and _parses_as_float(value):
            hint = " (YAML reads exponents without a dot, like 1e-3, as text: write 1.0e-3)"
        raise _err(source, leaf.key, f"must be {expected}, got {shown}{hint}")
    return value


def _parses_as_float(text: str) -> bool:
    """True if text is a number as Python reads it."""
    try:
        float(text)
    except ValueError:
        return False
    return True


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _parse_env(leaf: _Leaf, name: str, text: str) -> Any:
    """Parse one environment variable's text per the key's type; errors name the variable."""
    source = f"environment variable {name}"
    low = text.strip().lower()
    if leaf.optional and leaf.type is not str and low in ("null", "none"):
        return None
    if leaf.type is str:
        return text
    if leaf.type is bool:
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise _err(source, leaf.key, f"must be one of true/false/1/0/yes/no/on/off, got {text!r}")
    try:
        value = leaf.type(text.strip())
    except ValueError:
        raise _err(source, leaf.key, f"must be {_TYPE_NAMES[leaf.type]}, got {text!r}") from None
    return _check_type(leaf, value, source)


def _apply_env(values: dict[str, Any], sources: dict[str, str], env: Mapping[str, str]) -> None:
    """Apply environment variables (MODEL_PATH first so that DLMNUMBA_MODEL_PATH wins)."""
    if env.get("MODEL_PATH"):
        values["model_path"], sources["model_path"] = env["MODEL_PATH"], "environment variable MODEL_PATH"
    for name, keys in ENV_VARS.items():
        text = env.get(name)
        if not text:
            continue
        for key in keys:
            values[key] = _parse_env(LEAVES[key], name, text)
            sources[key] = f"environment variable {name}"


def _unknown(key: str, source: str, candidates: tuple[str, ...] | None = None) -> ConfigError:
    """An unknown-key error suggesting the same leaf in its section, then close spellings."""
    candidates = candidates or (*LEAVES, *SECTIONS)
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in candidates if k != key and k.rsplit(".", 1)[-1] == leaf]
    close += [k for k in difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
              if k not in close]
    hint = f" (did you mean {' or '.join(repr(c) for c in close[:3])}?)" if close else ""
    return _err(source, key, f"is not a known configuration key{hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    """Build a mapping, raising on a repeated key."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)


def _read_yaml(path: str) -> dict[str, Any]:
    """Parse a YAML config file into a mapping (an empty file is an empty mapping)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: config file is not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config file must be a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return data


def _flatten(data: Mapping[Any, Any], source: str) -> dict[str, Any]:
    """Nested YAML mapping -> {dotted key: value}; unknown keys and non-mapping sections raise."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        name = str(name)
        if name in SECTIONS:
            if value is None:  # a section whose keys are all commented out
                continue
            if not isinstance(value, dict):
                raise _err(source, name, f"must be a mapping of keys to values, got {value!r}")
            for sub, subvalue in value.items():
                flat[f"{name}.{sub}"] = subvalue
        elif isinstance(value, dict):  # a misspelt section
            raise _unknown(name, source, SECTIONS)
        else:
            flat[name] = value
    return flat


def _apply(values: dict[str, Any], sources: dict[str, str], flat: Mapping[str, Any],
           source: str) -> None:
    """Type-check and apply {dotted key: value} from one source."""
    for key, value in flat.items():
        if key not in LEAVES:
            raise _unknown(key, source)
        values[key] = _check_type(LEAVES[key], value, source)
        sources[key] = source


def _validate(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Range, choice and cross-key checks on the merged values; errors name key and source."""
    for key, leaf in LEAVES.items():
        value, meta = values[key], leaf.field.metadata
        if meta["choices"] and value not in meta["choices"]:
            raise _err(sources[key], key, f"must be one of {', '.join(meta['choices'])}; "
                                          f"got {value!r}")
        if meta["check"] and not meta["check"][0](value):
            raise _err(sources[key], key, f"{meta['check'][1]}, got {value!r}")
    block, small = values["dlm.block_size"], values["dlm.small_block_size"]
    if block % small:
        raise ConfigError(
            f"'dlm.block_size' ({block}, from {sources['dlm.block_size']}) must be a multiple of "
            f"'dlm.small_block_size' ({small}, from {sources['dlm.small_block_size']})")


def _build(values: Mapping[str, Any]) -> Config:
    """Dataclasses from {dotted key: value}."""
    top: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            prefix = f.name + "."
            top[f.name] = f.default_factory(**{k[len(prefix):]: v for k, v in values.items()
                                               if k.startswith(prefix)})
        else:
            top[f.name] = values[f.name]
    return Config(**top)


def load_config(path: str | None = None, cli: dict[str, Any] | None = None,
                env: Mapping[str, str] | None = None,
                model_defaults: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the model file's recommendations (e.g. its diffusion block size), then
    environment (os.environ if env is None), then the YAML file, then CLI."""
    values = {key: leaf.field.default for key, leaf in LEAVES.items()}
    sources = dict.fromkeys(LEAVES, DEFAULTS_SOURCE)
    if model_defaults:
        _apply(values, sources, dict(model_defaults), MODEL_SOURCE)
    _apply_env(values, sources, os.environ if env is None else env)
    if path is not None:
        path = os.fspath(path)
        _apply(values, sources, _flatten(_read_yaml(path), path), path)
    if cli:
        _apply(values, sources, {k: v for k, v in cli.items() if v is not None}, CLI_SOURCE)
    _validate(values, sources)
    return _build(values)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a nested dict of plain values (same shape as the YAML file)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The effective config as YAML (loads back to an equal Config)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def _scalar(value: Any) -> str:
    """A default value as a YAML scalar (strings double-quoted, so always read back as text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if re.fullmatch(r"[A-Za-z_][\w.-]*", value) and yaml.safe_load(value) == value:
            return value  # a plain word that YAML reads back as this text (not true/null/...)
        return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar
    return repr(value)


def _comment(f: dataclasses.Field, indent: str) -> list[str]:
    """A field's help text (with its allowed values) as wrapped YAML comment lines."""
    choices = f.metadata.get("choices")
    text = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 96 - len(indent))]


_HEADER = """\
# dlmnumba configuration (`dlmnumba config generate` writes this file; values are the defaults).
# Precedence: command-line options > this file > environment variables > defaults.
# Environment: DLMNUMBA_<KEY> sets a key by its upper-cased leaf name (DLMNUMBA_BLOCK_SIZE,
# DLMNUMBA_THREADS, ...); DLMNUMBA_MAX_TOKENS sets both max_tokens keys; model_path is also
# read from MODEL_PATH (DLMNUMBA_MODEL_PATH wins).
"""


def generate_config_text() -> str:
    """A commented example YAML whose values are the defaults; it loads back to Config()."""
    lines = [_HEADER]
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            lines += ["", *_comment(f, ""), f"{f.name}:"]
            for sub in dataclasses.fields(f.default_factory):
                lines += [*_comment(sub, "  "), f"  {sub.name}: {_scalar(sub.default)}"]
        else:
            lines += [*_comment(f, ""), f"{f.name}: {_scalar(f.default)}"]
    return "\n".join(lines) + "\n"
