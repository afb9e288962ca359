"""Configuration: frozen dataclasses, YAML <-> dataclass, precedence CLI > YAML > env > model
file > defaults.  Every key, its type, default, range and help come from settings.py.

Environment variables: ``DLMNUMBA_<KEY>`` with the key's leaf name in upper case sets that key,
e.g. ``DLMNUMBA_BLOCK_SIZE``, ``DLMNUMBA_THREADS``, ``DLMNUMBA_TEMPERATURE``,
``DLMNUMBA_ENABLE_RADIX_CACHE``. Leaf names are unique across sections, with one exception:
``DLMNUMBA_MAX_TOKENS`` sets both ``sampling.max_tokens`` and ``benchmark.max_tokens``.
``model_path`` is also read from the seed's ``MODEL_PATH``; ``DLMNUMBA_MODEL_PATH`` wins when
both are set. An empty variable counts as unset.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any

import yaml

from .decode.strategies import Sampling
from .errors import ConfigError
from .runtime.decode_settings import DecodeSettings
from .settings import (DECODE_KEYS, SECTIONS, SETTINGS, SETTINGS_LIST, Setting, check,
                       check_together, error, from_text, short_repr, unknown_key)

DEFAULTS_SOURCE = "defaults"
MODEL_SOURCE = "the model file"
CLI_SOURCE = "command line"


def _section_class(section: str) -> type:
    """A frozen dataclass of one section's settings (DlmConfig, ...), fields in table order."""
    fields = [(s.leaf, s.annotation, field(default=s.default, metadata={"setting": s}))
              for s in SETTINGS_LIST if s.section == section]
    name = section.capitalize() + "Config" if section else "Config"
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__, cls.__doc__ = __name__, SECTIONS.get(section, "The whole configuration.")
    return cls


DlmConfig = _section_class("dlm")
SamplingConfig = _section_class("sampling")
SchedulerConfig = _section_class("scheduler")
ClusterConfig = _section_class("cluster")
BenchmarkConfig = _section_class("benchmark")
_SECTION_CLASSES = {"dlm": DlmConfig, "sampling": SamplingConfig, "scheduler": SchedulerConfig,
                    "cluster": ClusterConfig, "benchmark": BenchmarkConfig}
assert tuple(_SECTION_CLASSES) == tuple(SECTIONS)
Config = dataclasses.make_dataclass(
    "Config",
    [(s.leaf, s.annotation, field(default=s.default, metadata={"setting": s}))
     for s in SETTINGS_LIST if not s.section]
    + [(name, cls, field(default_factory=cls)) for name, cls in _SECTION_CLASSES.items()],
    frozen=True)
Config.__module__, Config.__doc__ = __name__, "The whole effective configuration."


def _env_names() -> dict[str, list[str]]:
    """Environment variable -> dotted keys it sets."""
    names: dict[str, list[str]] = {}
    for s in SETTINGS_LIST:
        names.setdefault(s.env, []).append(s.key)
    return names


ENV_VARS: dict[str, list[str]] = _env_names()


def _apply_env(values: dict[str, Any], sources: dict[str, str], env: Mapping[str, str]) -> None:
    """Apply environment variables (an alias such as MODEL_PATH first, so ours wins)."""
    for s in SETTINGS_LIST:
        if s.env_alias and env.get(s.env_alias):
            source = f"environment variable {s.env_alias}"
            values[s.key], sources[s.key] = from_text(s.key, env[s.env_alias], source), source
    for name, keys in ENV_VARS.items():
        text = env.get(name)
        if not text:
            continue
        for key in keys:
            values[key] = from_text(key, text, f"environment variable {name}")
            sources[key] = f"environment variable {name}"


MAX_YAML_DEPTH = 32  # nesting of a config file: two levels are used, 32 is generous
MAX_YAML_BYTES = 1 << 20  # a config file is a few KB


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader for config files: no aliases (a config has no use for them, and an alias
    bomb expands to gigabytes), bounded nesting, text keys only, no key given twice."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in config files", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_unique_mapping(loader: _ConfigLoader, node: yaml.MappingNode, deep: bool = False):
    """Build a mapping, raising on a repeated key or a key that is not text."""
    seen = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be text, not a list or mapping", key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {short_repr(key)}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _construct_unique_mapping)


def _read_yaml(path: str) -> dict[str, Any]:
    """Parse a YAML config file into a mapping (an empty file is an empty mapping)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_YAML_BYTES + 1)
        if len(text) > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: config file larger than {MAX_YAML_BYTES} bytes")
        data = yaml.load(text, Loader=_ConfigLoader)
    except IsADirectoryError:
        raise ConfigError(f"{path}: cannot read config file: it is a directory") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: config file is not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_cut(' '.join(str(e).split()))}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path}: a value cannot be read: {_cut(str(e))}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config file must be a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return data


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def _flatten(data: Mapping[Any, Any], source: str) -> dict[str, Any]:
    """Nested YAML mapping -> {dotted key: value}; unknown keys and non-mapping sections raise."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        name = str(name)
        if name in SECTIONS:
            if value is None:  # a section whose keys are all commented out
                continue
            if not isinstance(value, dict):
                raise error(source, name, f"must be a mapping of keys to values, got "
                                          f"{short_repr(value)}")
            for sub, subvalue in value.items():
                flat[f"{name}.{sub}"] = subvalue
        elif isinstance(value, dict):  # a misspelt section
            raise unknown_key(name, source, tuple(SECTIONS))
        else:
            flat[name] = value
    return flat


def _checked(flat: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """{dotted key: value} from one source, each value checked; and each key's source."""
    return ({key: check(key, value, source) for key, value in flat.items()},
            dict.fromkeys(flat, source))


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


ModelDefaults = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]


def load_config(path: str | None = None, cli: dict[str, Any] | None = None,
                env: Mapping[str, str] | None = None,
                model_defaults: ModelDefaults | None = None) -> Config:
    """Defaults, then the model file's recommendations (model_source.recommended_settings),
    then environment (os.environ if env is None), then the YAML file, then CLI.  Each value is
    checked, the rules between keys on the merged result.

    model_defaults is a mapping, or a function of the effective `model_path` returning one:
    it is called once, after every other source has been read and checked (so the file a
    command runs is opened once, and a bad value elsewhere is reported before it is)."""
    layers = []  # (values, sources), lowest precedence first
    env_values: dict[str, Any] = {}
    env_sources: dict[str, str] = {}
    _apply_env(env_values, env_sources, os.environ if env is None else env)
    layers.append((env_values, env_sources))
    if path is not None:
        path = os.fspath(path)
        layers.append(_checked(_flatten(_read_yaml(path), path), path))
    if cli:
        layers.append(_checked({k: v for k, v in cli.items() if v is not None}, CLI_SOURCE))
    if callable(model_defaults):
        model_path = SETTINGS["model_path"].default
        for layer_values, _ in layers:
            model_path = layer_values.get("model_path", model_path)
        model_defaults = model_defaults(model_path)
    if model_defaults:
        layers.insert(0, _checked(dict(model_defaults), MODEL_SOURCE))
    values = {key: s.default for key, s in SETTINGS.items()}
    sources = dict.fromkeys(SETTINGS, DEFAULTS_SOURCE)
    for layer_values, layer_sources in layers:
        values.update(layer_values)
        sources.update(layer_sources)
    check_together(values, sources)
    return _build(values)


def get(cfg: Config, key: str) -> Any:
    """The value of a dotted key in a Config."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def decode_settings(cfg: Config, max_tokens: int | None = None):
    """The DecodeSettings of a Config (max_tokens: the command's cap, default
    sampling.max_tokens)."""
    sampling = {f.name for f in dataclasses.fields(Sampling)}
    kw = {name: get(cfg, key) for name, key in DECODE_KEYS.items() if name not in sampling}
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    return DecodeSettings(**kw, sampling=Sampling(**{name: get(cfg, DECODE_KEYS[name])
                                                     for name in sampling}))


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


def _comment(text: str, indent: str) -> list[str]:
    """Help text as wrapped YAML comment lines."""
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 96 - len(indent))]


def _setting_comment(s: Setting, indent: str) -> list[str]:
    """A setting's help text with its allowed values."""
    return _comment(s.help + (f" One of: {', '.join(s.choices)}." if s.choices else ""), indent)


_HEADER = """\
# dlmnumba configuration (`dlmnumba config generate` writes this file; values are the defaults).
# Precedence: command-line options > this file > environment variables > the model file's
# recommended settings (its diffusion.block_size, ...) > defaults.
# Environment: DLMNUMBA_<KEY> sets a key by its upper-cased leaf name (DLMNUMBA_BLOCK_SIZE,
# DLMNUMBA_THREADS, ...); DLMNUMBA_MAX_TOKENS sets both max_tokens keys; model_path is also
# read from MODEL_PATH (DLMNUMBA_MODEL_PATH wins).
"""


def generate_config_text() -> str:
    """A commented example YAML whose values are the defaults; it loads back to Config()."""
    lines = [_HEADER]
    lines += [line for s in SETTINGS_LIST if not s.section
              for line in (*_setting_comment(s, ""), f"{s.leaf}: {_scalar(s.default)}")]
    for section, doc in SECTIONS.items():
        lines += ["", *_comment(doc, ""), f"{section}:"]
        lines += [line for s in SETTINGS_LIST if s.section == section
                  for line in (*_setting_comment(s, "  "), f"  {s.leaf}: {_scalar(s.default)}")]
    return "\n".join(lines) + "\n"
