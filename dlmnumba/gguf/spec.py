"""ModelSpec: every hyper-parameter of a BitNet model, read once from GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

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
            if key not in md:
                raise ModelFormatError(f"{path}: missing metadata key '{key}'")
            return _typed(md[key], kind, key, path)

        def opt(key: str, kind: type, default: Any) -> Any:
            return _typed(md[key], kind, key, path) if key in md else default

        arch = need("general.architecture", str)
        if arch not in ARCH_ACTIVATION:
            raise ModelFormatError(
                f"{path}: unknown architecture '{arch}' in 'general.architecture' "
                f"(expected one of {', '.join(ARCH_ACTIVATION)})")
        p = arch + "."
        n_embd = need(p + "embedding_length", int)
        n_head = need(p + "attention.head_count", int)
        n_head_kv = opt(p + "attention.head_count_kv", int, n_head)
        for key, val in ((p + "embedding_length", n_embd), (p + "attention.head_count", n_head),
                         (p + "attention.head_count_kv", n_head_kv)):
            if val <= 0:
                raise ModelFormatError(f"{path}: '{key}' = {val}, expected a positive integer")
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
            name = _typed(md[act_key], str, act_key, path).lower()
            if name not in ACTIVATION_ALIASES:
                raise ModelFormatError(f"{path}: '{act_key}' = '{name}', expected one of "
                                       f"{', '.join(sorted(ACTIVATION_ALIASES))}")
            activation = ACTIVATION_ALIASES[name]
        tokens = md.get("tokenizer.ggml.tokens")
        n_vocab = opt(p + "vocab_size", int, len(tokens) if tokens is not None else 0)
        ids = {k: opt(f"tokenizer.ggml.{k}_token_id", int, None)
               for k in ("bos", "eos", "eot", "mask")}
        eog = {i for i in (ids["eos"], ids["eot"]) if i is not None}
        if tokens is not None:
            types = md.get("tokenizer.ggml.token_type")
            text_to_id = {t: i for i, t in enumerate(tokens) if t in EOG_TEXTS
                          and (types is None or int(types[i]) in EOG_TOKEN_TYPES)}
            if ids["eot"] is None and EOT_TEXT in text_to_id:
                ids["eot"] = text_to_id[EOT_TEXT]
            eog.update(text_to_id.values())
        for name, val in ids.items():
            if val is not None and not 0 <= val < max(n_vocab, 1):
                raise ModelFormatError(f"{path}: 'tokenizer.ggml.{name}_token_id' = {val} is "
                                       f"outside the vocabulary (0..{n_vocab - 1})")
        return cls(
            path=path, arch=arch, n_vocab=n_vocab, n_embd=n_embd,
            n_layer=need(p + "block_count", int), n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, n_rot=n_rot, n_ff=need(p + "feed_forward_length", int),
            n_ctx_train=opt(p + "context_length", int, 4096),
            rope_base=float(opt(p + "rope.freq_base", float, 10000.0)),
            rms_eps=float(opt(p + "attention.layer_norm_rms_epsilon", float, 1e-5)),
            activation=activation, bos_id=ids["bos"], eos_id=ids["eos"], eot_id=ids["eot"],
            mask_id=ids["mask"], eog_ids=frozenset(eog),
            shift_logits=bool(opt("diffusion.shift_logits", bool, True)),
        )


def _typed(value: Any, kind: type, key: str, path: str) -> Any:
    """Check a metadata value's type (ints accepted for floats) and return it."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and hasattr(value, "__index__") and not isinstance(value, bool):
        return int(value)
    if isinstance(value, kind):
        return value
    raise ModelFormatError(f"{path}: metadata '{key}' is {type(value).__name__} {value!r}, "
                           f"expected {kind.__name__}")
