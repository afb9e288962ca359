"""Every setting defined once: dotted key, type, default, null allowed, range or choices, help.

Everything else derives from SETTINGS: config.py's frozen dataclasses, YAML validation,
environment names and `config generate`'s comments; the CLI's options (flag, type, choices,
help); DecodeSettings' checks (through DECODE_KEYS); an HTTP server's per-request checks.

`check(key, value, source)` validates one value from any source (a YAML file, an environment
variable, a command-line option, a request, a model file) and returns it normalised (ints
widened for float keys, paths as text); `check_together` applies the rules that tie keys to
each other; `check_values` does both for a plain {key: value} dict.  Errors are ConfigError
(also a ValueError) naming the source, the key, the value and what was expected.

Layering: settings sits above decode (it reads the decode modes' registry, decode/policies.py
and decode/modes.py, for the mode choices) and below runtime (DecodeSettings checks itself
here); decode never imports it.
"""
from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .decode.modes import MODE_REGISTRY, MODES
from .decode.policies import POLICIES
from .decode.spec import DRAFT_POLICIES
from .errors import ConfigError
from .kernels.dispatch import PATHS as KERNEL_PATHS

ENV_PREFIX = "DLMNUMBA_"


@dataclass(frozen=True)
class Check:
    """A range rule on an already type-checked, non-null value, and what it demands."""

    test: Callable[[Any], bool]
    expect: str  # completes "must be ...", e.g. ">= 0", "in 1..65535"


def at_least(lo: int) -> Check:
    """value >= lo."""
    return Check(lambda v: v >= lo, f">= {lo}")


POSITIVE = Check(lambda v: v > 0, "a positive integer")
UNIT_CLOSED = Check(lambda v: 0 <= v <= 1, "in the interval [0, 1]")
UNIT_OPEN_CLOSED = Check(lambda v: 0 < v <= 1, "in the interval (0, 1]")
NON_EMPTY = Check(lambda v: v != "", "non-empty")
PORT = Check(lambda v: 1 <= v <= 65535, "in 1..65535")


@dataclass(frozen=True)
class Setting:
    """One settable key and everything about it."""

    key: str  # dotted: "<section>.<leaf>" or a top-level "<leaf>"
    type: type  # int, float, str or bool
    default: Any
    help: str  # one or two sentences: the YAML comment and the CLI help
    nullable: bool = False  # null (None) allowed
    check: Check | None = None
    choices: tuple[str, ...] = ()
    option: str | None = None  # CLI option name when it is not the leaf ("mode", "model")
    env_alias: str | None = None  # a second environment name, read before ours (MODEL_PATH)

    @property
    def leaf(self) -> str:
        """The key's last part."""
        return self.key.rpartition(".")[2]

    @property
    def section(self) -> str:
        """The key's section ("" for a top-level key)."""
        return self.key.rpartition(".")[0]

    @property
    def flag(self) -> str:
        """The command-line option: --block-size, --mode, ..."""
        return "--" + (self.option or self.leaf).replace("_", "-")

    @property
    def param(self) -> str:
        """The option's Python parameter name (click's, from the flag)."""
        return self.flag[2:].replace("-", "_")

    @property
    def env(self) -> str:
        """The environment variable: DLMNUMBA_<LEAF>."""
        return ENV_PREFIX + self.leaf.upper()

    @property
    def annotation(self) -> Any:
        """The Python type of a value (with None when nullable)."""
        return self.type | None if self.nullable else self.type

    def expectation(self) -> str:
        """What a value must be, as a phrase after "must be"."""
        if self.choices:
            what = "one of " + ", ".join(self.choices)
        elif self.check:
            what = self.check.expect
        else:
            what = _TYPE_NAMES[self.type]
        return f"null or {what}" if self.nullable else what


# decode modes (MODES): the registered unmasking policies and `ar` (decode/modes.py)
REFINING_MODES = tuple(name for name, p in POLICIES.items() if p.refines)  # use small blocks

SETTINGS_LIST: tuple[Setting, ...] = (
    Setting("model_path", str, None, "GGUF model file; unset (null) = the built-in model.",
            nullable=True, option="model", env_alias="MODEL_PATH"),
    Setting("host", str, "127.0.0.1", "Address the HTTP server listens on (the seed used "
            "0.0.0.0).", check=NON_EMPTY),
    Setting("port", int, 30000, "HTTP port.", check=PORT),
    Setting("api_key", str, None, "Key every HTTP route but /health requires as "
            "'Authorization: Bearer <key>'; unset (null) = no key.", nullable=True,
            check=NON_EMPTY),
    Setting("max_request_bytes", int, 1 << 20, "Largest HTTP request body accepted (413 "
            "beyond).", check=POSITIVE),
    Setting("openapi", bool, True, "Serve the API's OpenAPI schema at /openapi.json (behind "
            "the API key like every route but /health)."),
    Setting("threads", int, None, "Compute threads; unset (null) = physical cores.", nullable=True,
            check=at_least(1)),
    Setting("threads_yield", bool, True, "Run each pass on fewer threads while other programs "
            "keep this process's cores busy (measured every 0.25 s; the output does not depend "
            "on it): a parallel loop waits for its slowest thread."),
    Setting("kernel", str, "auto", "int8 kernel instruction path: auto = the fastest this CPU "
            "has.", choices=("auto", *KERNEL_PATHS)),
    Setting("lm_head", str, "exact", "LM head: exact = the file's embedding as stored (greedy "
            "runs it through an int8 screen, same tokens); int8 = quantized per row at load "
            "(faster, logits differ slightly).", choices=("exact", "int8")),
    Setting("dlm.block_size", int, 64, "Tokens decoded per diffusion block; must match the "
            "model's training.", check=POSITIVE),
    Setting("dlm.small_block_size", int, 8, "Sub-block size of iterative/adaptive refinement; "
            "there block_size must be a multiple of it.", check=POSITIVE),
    Setting("dlm.threshold", float, 0.9, "Confidence above which a masked position is committed "
            "(iterative/adaptive), in [0, 1]; at least the most confident one is.",
            check=UNIT_CLOSED),
    Setting("dlm.mask_token_id", int, None, "Id of the MASK token; unset (null) = from the "
            "model file.",
            nullable=True, check=at_least(0)),
    Setting("dlm.max_iterations_per_block", int, 10, "Most passes per block (iterative/"
            "adaptive) before the rest take their most confident earlier prediction.",
            check=POSITIVE),
    Setting("dlm.decode_mode", str, "greedy", "greedy: one pass per block; iterative: unmask "
            "above the threshold; adaptive: rising thresholds; ar: one token per pass; spec: "
            "ar's output, drafted with masks and verified causally in the same pass.",
            choices=MODES, option="mode"),
    Setting("dlm.draft_size", int, 16, "spec: most mask positions a pass drafts.",
            check=POSITIVE),
    Setting("dlm.draft_policy", str, "adaptive", "spec: how many masks a pass drafts: fixed = "
            "draft_size; adaptive = as many as are more likely than not to be accepted, from "
            "the request's acceptance so far (at most draft_size).",
            choices=tuple(DRAFT_POLICIES)),
    Setting("dlm.attention", str, "block", "block: bidirectional within a block, causal across "
            "blocks (Fast-dLLM v2); causal: the seed's causal-only attention.",
            choices=("block", "causal")),
    Setting("dlm.dual_cache", bool, True, "iterative/adaptive: refinement passes run only the "
            "current sub-block against the cached prefix and the block's other positions' K/V "
            "from their latest pass (Fast-dLLM DualCache; an approximation inside the block; "
            "on the bundled model within 1.2 accuracy points of off)."),
    Setting("dlm.confidence", str, "exact", "How iterative/adaptive compute the confidence they "
            "threshold: exact = the softmax of the full exact LM head; screened = the exact head's "
            "argmax through the int8 screen, its probability from the screened rows' exact and "
            "the other rows' int8 logits (F16 embeddings; much cheaper, ~1e-3 relative off).",
            choices=("exact", "screened")),
    Setting("dlm.kv_commit", str, "normal", "normal: the KV cache holds real tokens only; none: "
            "the seed's stale-mask scheduling (speed comparisons only, lower quality).",
            choices=("normal", "none")),
    Setting("sampling.temperature", float, 0.0, "Softmax temperature; 0 = greedy argmax.",
            check=at_least(0)),
    Setting("sampling.top_k", int, 0, "Sample from the k most likely tokens; 0 = off.",
            check=at_least(0)),
    Setting("sampling.top_p", float, 1.0, "Nucleus sampling mass, in (0, 1]; 1 = off.",
            check=UNIT_OPEN_CLOSED),
    Setting("sampling.seed", int, 0, "Random seed for sampling.", check=at_least(0)),
    Setting("sampling.max_tokens", int, 128, "Most new tokens per request (an exact cap).",
            check=POSITIVE),
    Setting("sampling.ignore_eos", bool, False, "Keep generating after an end-of-generation "
            "token, to max_tokens (benchmarks: every request does the same work)."),
    Setting("scheduler.max_sequences", int, 16, "Most sequences decoded together (one forward "
            "pass per step over all of them).", check=POSITIVE),
    Setting("scheduler.max_waiting", int, 256, "Most requests queued for a slot; beyond, the "
            "server answers 429.", check=at_least(0)),
    Setting("scheduler.enable_radix_cache", bool, True, "Reuse the KV cache of shared prompt "
            "prefixes."),
    Setting("scheduler.radix_cache_max_tokens", int, 8192, "Most tokens kept in the prefix "
            "cache (K/V in float32: n_layer x n_embd_kv x 8 bytes a token, 154 KB for BitNet "
            "2B-4T).", check=POSITIVE),
    Setting("cluster.backend", str, "local", "serve: local = one process on this machine; ray = "
            "replicas of the same server as a Ray Serve deployment (pip install -e '.[cluster]').",
            choices=("local", "ray")),
    Setting("cluster.replicas", int, 1, "Ray: replicas (each loads the model once); with "
            "max_replicas, the fewest the autoscaler keeps.", check=POSITIVE),
    Setting("cluster.threads_per_replica", int, None, "Ray: compute threads of each replica; "
            "unset (null) = the node's physical cores divided by its replicas.", nullable=True,
            check=at_least(1)),
    Setting("cluster.max_replicas", int, None, "Ray: autoscale between replicas and "
            "max_replicas on ongoing requests per replica; unset (null) = a fixed count.",
            nullable=True, check=at_least(1)),
    Setting("cluster.ray_address", str, None, "Ray: the cluster to join ('auto', or host:port of "
            "a `ray start --head`); unset (null) = start a local Ray on 127.0.0.1.",
            nullable=True, check=NON_EMPTY),
    Setting("benchmark.iterations", int, 50, "Timed requests, run one after another.",
            check=POSITIVE),
    Setting("benchmark.warmup", int, 3, "Untimed warm-up requests before them (the JIT compile "
            "is among them).", check=at_least(0)),
    Setting("benchmark.max_tokens", int, 128, "New tokens per benchmark request.",
            check=POSITIVE),
    Setting("benchmark.prompt", str, "What is the meaning of life?", "User prompt of every "
            "benchmark request, wrapped as 'USER: ...<|eot_id|>ASSISTANT:'."),
)
SETTINGS: dict[str, Setting] = {s.key: s for s in SETTINGS_LIST}

# Section name -> its help text (the YAML comment above it), in file order.
SECTIONS: dict[str, str] = {"dlm": "Diffusion decoding.", "sampling": "Sampling.",
                            "scheduler": "Scheduler.",
                            "cluster": "Scale-out (dlmnumba serve --backend ray).",
                            "benchmark": "Benchmark (dlmnumba bench)."}

# DecodeSettings field (and its Sampling's) -> the setting that defines it.
DECODE_KEYS: dict[str, str] = {
    "mode": "dlm.decode_mode", "block_size": "dlm.block_size",
    "small_block_size": "dlm.small_block_size", "threshold": "dlm.threshold",
    "max_iterations_per_block": "dlm.max_iterations_per_block", "attention": "dlm.attention",
    "kv_commit": "dlm.kv_commit", "dual_cache": "dlm.dual_cache",
    "confidence": "dlm.confidence", "draft_size": "dlm.draft_size",
    "draft_policy": "dlm.draft_policy", "mask_token_id": "dlm.mask_token_id",
    "max_tokens": "sampling.max_tokens", "ignore_eos": "sampling.ignore_eos",
    "temperature": "sampling.temperature",
    "top_k": "sampling.top_k", "top_p": "sampling.top_p", "seed": "sampling.seed",
}

# bool is a subclass of int, so ints and floats exclude it explicitly (YAML true is not 1).
_TYPE_TESTS: dict[type, Callable[[Any], bool]] = {
    bool: lambda v: type(v) is bool,
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string",
               bool: "a boolean (true/false)"}


def error(source: str, key: str, problem: str) -> ConfigError:
    """A ConfigError naming where the value came from and which key it is."""
    return ConfigError(f"{source}: '{key}' {problem}")


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: one readable line whatever the value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " ...'"


def unknown_key(key: str, source: str, candidates: tuple[str, ...] | None = None) -> ConfigError:
    """An unknown-key error suggesting the same leaf in its section, then close spellings."""
    candidates = candidates or (*SETTINGS, *SECTIONS)
    key = key if len(key) <= 80 else key[:75] + " ..."
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in candidates if k != key and k.rsplit(".", 1)[-1] == leaf]
    close += [k for k in difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
              if k not in close]
    hint = f" (did you mean {' or '.join(repr(c) for c in close[:3])}?)" if close else ""
    return error(source, key, f"is not a known configuration key{hint}")


def _parses_as_float(text: str) -> bool:
    """True if text is a number as Python reads it."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _typed(s: Setting, value: Any, source: str) -> Any:
    """value (ints widened for float keys, paths as text) if it has the key's type; else raise."""
    if isinstance(value, os.PathLike) and s.type is str:
        value = os.fspath(value)
    if value is None and s.nullable:
        return None
    ok = _TYPE_TESTS[s.type](value)
    if ok and s.type is float:
        value = float(value)
        ok = math.isfinite(value)
    if not ok:
        expected = _TYPE_NAMES[s.type] + (" or null" if s.nullable else "")
        shown = "null" if value is None else f"{short_repr(value)} ({type(value).__name__})"
        hint = ""
        if s.type is float and isinstance(value, str) and _parses_as_float(value):
            hint = " (YAML reads exponents without a dot, like 1e-3, as text: write 1.0e-3)"
        raise error(source, s.key, f"must be {expected}, got {shown}{hint}")
    return value


def check(key: str, value: Any, source: str = "value") -> Any:
    """value, normalised, if `key` accepts it (type, null, choices, range); else ConfigError."""
    s = SETTINGS.get(key)
    if s is None:
        raise unknown_key(key, source)
    value = _typed(s, value, source)
    if value is None:
        return None
    if s.choices and value not in s.choices:
        raise error(source, key, f"must be one of {', '.join(s.choices)}; got {short_repr(value)}")
    if s.check and not s.check.test(value):
        raise error(source, key, f"must be {s.expectation()}, got {short_repr(value)}")
    return value


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def from_text(key: str, text: str, source: str) -> Any:
    """A value given as text (an environment variable, a query string), parsed per the key's
    type and checked."""
    s = SETTINGS[key]
    low = text.strip().lower()
    if s.nullable and s.type is not str and low in ("null", "none"):
        value = None
    elif s.type is str:
        value = text
    elif s.type is bool:
        if low not in _TRUE | _FALSE:
            raise error(source, key, f"must be one of true/false/1/0/yes/no/on/off, got {text!r}")
        value = low in _TRUE
    else:
        try:
            value = s.type(text.strip())
        except ValueError:
            raise error(source, key, f"must be {_TYPE_NAMES[s.type]}, got {text!r}") from None
    return check(key, value, source)


def check_together(values: Mapping[str, Any], sources: Mapping[str, str] | str) -> None:
    """Rules between keys, on values already checked one by one; a rule whose keys are not all
    in `values` is skipped.  Today one: in iterative/adaptive mode (or with no mode given)
    block_size must be a multiple of small_block_size."""
    def src(key: str) -> str:
        return sources if isinstance(sources, str) else sources[key]

    lo, hi = "cluster.replicas", "cluster.max_replicas"
    if values.get(lo) is not None and values.get(hi) is not None and values[lo] > values[hi]:
        raise ConfigError(f"'{lo}' ({values[lo]}, from {src(lo)}) must be <= '{hi}' "
                          f"({values[hi]}, from {src(hi)})")
    block, small = "dlm.block_size", "dlm.small_block_size"
    mode = values.get("dlm.decode_mode")
    temp = "sampling.temperature"
    if mode is not None and not MODE_REGISTRY[mode].samples and values.get(temp):
        raise ConfigError(
            f"'dlm.decode_mode' {mode} (from {src('dlm.decode_mode')}) decodes greedily: "
            f"'{temp}' must be 0, got {values[temp]} (from {src(temp)}); sampling needs "
            "another mode")
    if block in values and small in values and (mode is None or mode in REFINING_MODES):
        if values[block] % values[small]:
            in_mode = f" in {mode} mode (from {src('dlm.decode_mode')})" if mode else ""
            raise ConfigError(
                f"'{block}' ({values[block]}, from {src(block)}) must be a multiple of "
                f"'{small}' ({values[small]}, from {src(small)}){in_mode}")


def check_values(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """{key: value} from one source (a request, a DecodeSettings), each value checked, then the
    rules between them; returns the normalised values."""
    out = {key: check(key, value, source) for key, value in values.items()}
    check_together(out, source)
    return out


def _self_check() -> None:
    """The defaults pass their own checks; env names are unique but for max_tokens."""
    check_values({k: s.default for k, s in SETTINGS.items()}, "defaults")
    assert all(s.section in ("", *SECTIONS) for s in SETTINGS_LIST)
    assert set(DECODE_KEYS.values()) <= set(SETTINGS)
    envs: dict[str, list[str]] = {}
    for s in SETTINGS_LIST:
        envs.setdefault(s.env, []).append(s.key)
    shared = {name: keys for name, keys in envs.items() if len(keys) > 1}
    # one variable for the request default and the benchmark, deliberately
    assert shared == {"DLMNUMBA_MAX_TOKENS": ["sampling.max_tokens",
                                              "benchmark.max_tokens"]}, shared


_self_check()
