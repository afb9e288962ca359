"""ModelSpec: every hyper-parameter of a BitNet model, read once from GGUF metadata."""
from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import ModelFormatError

# arch name -> default FFN activation (reference.md section 1)
ARCH_ACTIVATION = {"bitnet-b1.58": "relu2", "bitnet-25": "relu2", "bitnet": "silu"}
ACTIVATION_ALIASES = {"relu2": "relu2", "relu_squared": "relu2", "squared_relu": "relu2",
                      "silu": "silu", "swish": "silu"}
MASK_TOKEN_TEXT = "|<MASK>|"
# Texts that end generation besides EOS / EOT (llama.cpp's special_eog_ids detection), counted
# only for CONTROL (3) or USER_DEFINED (4) tokens, as llama.cpp does.
EOG_TEXTS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|endoftext|>", "<|im_end|>",
             "<|end|>", "<end_of_turn>")
EOG_TOKEN_TYPES = (3, 4)
EOT_TEXT = "<|eot_id|>"


@dataclass(frozen=True)
class ModelSpec:
    """Hyper-parameters and special tokens of a BitNet model, as the GGUF file declares them."""

    path: str  # file the spec was read from (for messages)
    arch: str  # general.architecture: bitnet-b1.58, bitnet-25 or bitnet
    n_vocab: int  # rows of token_embd (tokens the model can emit)
    n_embd: int  # residual width
    n_layer: int  # transformer blocks
    n_head: int  # query heads
    n_head_kv: int  # key/value heads (GQA: n_head is a multiple)
    head_dim: int  # n_embd / n_head
    n_rot: int  # rotary dimensions per head (rope.dimension_count, default head_dim)
    n_ff: int  # FFN hidden width
    n_ctx_train: int  # context_length the model was trained with
    rope_base: float  # rope.freq_base
    rms_eps: float  # attention.layer_norm_rms_epsilon
    activation: str  # "relu2" or "silu"
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    mask_id: int | None  # tokenizer.ggml.mask_token_id, or None (detection is the decoder's job)
    eog_ids: frozenset[int] = field(default_factory=frozenset)  # ids that end generation
    shift_logits: bool = True  # diffusion.shift_logits: logit i predicts token i+1

    @property
    def n_embd_kv(self) -> int:
        """Width of the K (or V) projection."""
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], path: str) -> "ModelSpec":
        """Build the spec from GGUF metadata; errors name the file and the key."""

        def need(key: str, kind: type) -> Any:
            return meta_scalar(md, key, kind, path)

        def opt(key: str, kind: type, default: Any) -> Any:
            return meta_scalar(md, key, kind, path, default)

        def positive(key: str, default: Any = MISSING) -> int:
            val = meta_scalar(md, key, int, path, default)
            if val <= 0:
                raise ModelFormatError(f"{path}: metadata key '{key}' = {val}, expected a "
                                       "positive integer")
            return val

        arch = need("general.architecture", str)
        if arch not in ARCH_ACTIVATION:
            raise ModelFormatError(
                f"{path}: unknown architecture '{arch}' in 'general.architecture' "
                f"(expected one of {', '.join(ARCH_ACTIVATION)})")
        p = arch + "."
        n_embd = positive(p + "embedding_length")
        n_head = positive(p + "attention.head_count")
        n_head_kv = positive(p + "attention.head_count_kv", n_head)
        if n_embd % n_head:
            raise ModelFormatError(f"{path}: '{p}embedding_length' {n_embd} is not a multiple "
                                   f"of '{p}attention.head_count' {n_head}")
        if n_head % n_head_kv:
            raise ModelFormatError(f"{path}: '{p}attention.head_count' {n_head} is not a multiple "
                                   f"of '{p}attention.head_count_kv' {n_head_kv}")
        head_dim = n_embd // n_head
        n_rot = opt(p + "rope.dimension_count", int, head_dim)
        if n_rot <= 0 or n_rot > head_dim or n_rot % 2:
            raise ModelFormatError(f"{path}: '{p}rope.dimension_count' = {n_rot}, expected an even "
                                   f"number in 2..{head_dim}")
        act_key = p + "hidden_activation"
        activation = ARCH_ACTIVATION[arch]
        if act_key in md:
            name = need(act_key, str).lower()
            if name not in ACTIVATION_ALIASES:
                raise ModelFormatError(f"{path}: '{act_key}' = {_short(name)}, expected one of "
                                       f"{', '.join(sorted(ACTIVATION_ALIASES))}")
            activation = ACTIVATION_ALIASES[name]
        rope_base = float(opt(p + "rope.freq_base", float, 10000.0))
        rms_eps = float(opt(p + "attention.layer_norm_rms_epsilon", float, 1e-5))
        for key, val in ((p + "rope.freq_base", rope_base),
                         (p + "attention.layer_norm_rms_epsilon", rms_eps)):
            if not (math.isfinite(val) and val > 0):
                raise ModelFormatError(f"{path}: metadata key '{key}' = {val}, expected a finite "
                                       "positive number")
        tokens = meta_strings(md, "tokenizer.ggml.tokens", path)
        n_vocab = (positive(p + "vocab_size") if p + "vocab_size" in md
                   else len(tokens) if tokens is not None else 0)
        if tokens is not None and len(tokens) > n_vocab:
            raise ModelFormatError(f"{path}: 'tokenizer.ggml.tokens' has {len(tokens)} entries "
                                   f"but '{p}vocab_size' = {n_vocab}; expected at most one token "
                                   "per embedding row")
        ids = {k: opt(f"tokenizer.ggml.{k}_token_id", int, None)
               for k in ("bos", "eos", "eot", "mask")}
        eog = {i for i in (ids["eos"], ids["eot"]) if i is not None}
        if tokens is not None:
            types = meta_ints(md, "tokenizer.ggml.token_type", path, len(tokens),
                              "tokenizer.ggml.tokens")
            text_to_id = {t: i for i, t in enumerate(tokens) if t in EOG_TEXTS
                          and (types is None or types[i] in EOG_TOKEN_TYPES)}
            if ids["eot"] is None and EOT_TEXT in text_to_id:
                ids["eot"] = text_to_id[EOT_TEXT]
            eog.update(text_to_id.values())
        for name, val in ids.items():
            if val is not None and not 0 <= val < max(n_vocab, 1):
                raise ModelFormatError(f"{path}: 'tokenizer.ggml.{name}_token_id' = {val} is "
                                       f"outside the vocabulary (0..{n_vocab - 1})")
        return cls(
            path=path, arch=arch, n_vocab=n_vocab, n_embd=n_embd,
            n_layer=positive(p + "block_count"), n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, n_rot=n_rot, n_ff=positive(p + "feed_forward_length"),
            n_ctx_train=positive(p + "context_length", 4096),
            rope_base=rope_base, rms_eps=rms_eps,
            activation=activation, bos_id=ids["bos"], eos_id=ids["eos"], eot_id=ids["eot"],
            mask_id=ids["mask"], eog_ids=frozenset(eog),
            shift_logits=opt("diffusion.shift_logits", bool, True),
        )


MISSING: Any = object()
_KIND_NAMES = {int: "an integer", float: "a number", bool: "a bool", str: "a string"}


def _short(value: Any, limit: int = 60) -> str:
    """repr of a metadata value cut to `limit` characters (arrays may hold 100k entries)."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(value: Any) -> str:
    if isinstance(value, (list, np.ndarray)):
        return f"an array of {len(value)} elements {_short(value)}"
    return f"{type(value).__name__} {_short(value)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def meta_scalar(md: Mapping[str, Any], key: str, kind: type, path: str,
                default: Any = MISSING) -> Any:
    """The single value of kind int, float, bool or str stored under key (ints are accepted
    for floats); a missing key gives default, or a ModelFormatError without one."""
    if key not in md:
        if default is MISSING:
            raise ModelFormatError(f"{path}: missing metadata key '{key}'")
        return default
    value = md[key]
    if kind is int and _is_int(value):
        return int(value)
    if kind is float and (_is_int(value) or isinstance(value, (float, np.floating))):
        return float(value)
    if kind is bool and isinstance(value, (bool, np.bool_)):
        return bool(value)
    if kind is str and isinstance(value, str):
        return value
    raise ModelFormatError(f"{path}: metadata key '{key}' is {_describe(value)}, expected "
                           f"{_KIND_NAMES[kind]}")


def meta_strings(md: Mapping[str, Any], key: str, path: str) -> list[str] | None:
    """The array of strings stored under key, or None when the key is absent."""
    value = md.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelFormatError(f"{path}: metadata key '{key}' is {_describe(value)}, expected "
                               "an array of strings")
    return value


def meta_ints(md: Mapping[str, Any], key: str, path: str, length: int,
              length_key: str) -> list[int] | None:
    """The array of integers stored under key, which must have one entry per element of
    length_key; None when the key is absent."""
    value = md.get(key)
    if value is None:
        return None
    ok = (isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu") or (
        isinstance(value, list) and all(_is_int(v) for v in value))
    if not ok:
        raise ModelFormatError(f"{path}: metadata key '{key}' is {_describe(value)}, expected "
                               "an array of integers")
    if len(value) != length:
        raise ModelFormatError(f"{path}: metadata key '{key}' has {len(value)} entries, "
                               f"expected {length}, one per entry of '{length_key}'")
    return [int(v) for v in value]
