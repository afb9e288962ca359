"""A Hugging Face BitNet checkpoint directory: config.json checked, the safetensors tensors
listed (one file, or a sharded set with its index) and read one at a time from disk."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..synth.models import Preset

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ARCHITECTURE = "BitNetForCausalLM"
ACTIVATIONS = {"relu2": "relu2", "silu": "silu", "swish": "silu"}  # HF hidden_act -> ours
MASTER, PACKED = "master", "packed"  # the two weight forms
# safetensors dtype -> numpy dtype of its bytes (BF16 as raw 16-bit words: numpy has no bf16)
DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1", "I8": "i1", "F64": "<f8",
          "I32": "<i4", "I64": "<i8", "I16": "<i2", "BOOL": "?"}
FLOATS = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class HFConfig:
    """What config.json says about the model, checked."""

    shape: Preset  # every dimension (n_vocab: rows of the embedding)
    activation: str  # "relu2" or "silu"
    tied: bool  # tie_word_embeddings: the LM head is the embedding
    form: str  # MASTER (float weights, ternarized here) or PACKED (Microsoft's 2-bit form)
    bos_id: int | None  # config.json's bos/eos ids (tokenizer_config.json's tokens come first)
    eos_id: int | None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    name: str
    file: Path
    dtype: str  # safetensors dtype name (BF16, F32, U8, ...)
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def _fail(where: Path | str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: {problem}")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise _fail(path, "missing; a Hugging Face checkpoint directory has it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})") from None


def read_config(root: Path) -> HFConfig:
    """Check config.json: a BitNetForCausalLM with a supported activation, rope and weight form."""
    path = root / CONFIG
    cfg = _load_json(path)
    if not isinstance(cfg, dict):
        raise _fail(path, "expected a JSON object")
    archs = cfg.get("architectures")
    if archs != [ARCHITECTURE] and not (cfg.get("model_type") == "bitnet" and archs is None):
        raise _fail(path, f"'architectures' is {archs!r}; expected ['{ARCHITECTURE}']")

    def num(key: str, kind: type, default: Any = None) -> Any:
        value = cfg.get(key, default)
        ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, int))
        if not ok or isinstance(value, bool) or not value > 0:
            raise _fail(path, f"'{key}' is {value!r}; expected a positive "
                        f"{'number' if kind is float else 'integer'}")
        return kind(value)

    act = cfg.get("hidden_act", "relu2")
    if act not in ACTIVATIONS:
        raise _fail(path, f"'hidden_act' is {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    n_embd, n_head = num("hidden_size", int), num("num_attention_heads", int)
    n_head_kv = num("num_key_value_heads", int, cfg.get("num_key_value_heads") or n_head)
    if n_embd % n_head or n_head % n_head_kv:
        raise _fail(path, f"hidden_size {n_embd}, num_attention_heads {n_head} and "
                    f"num_key_value_heads {n_head_kv}: expected each to divide the one before")
    head_dim = cfg.get("head_dim") or n_embd // n_head
    if head_dim != n_embd // n_head or cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise _fail(path, f"'head_dim' {head_dim} with hidden_size {n_embd} and {n_head} heads: "
                    "expected head_dim = hidden_size / num_attention_heads, all of it rotary")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise _fail(path, f"'{key}' is true; BitNet b1.58 has no bias terms")
    shape = Preset(n_vocab=num("vocab_size", int), n_embd=n_embd,
                   n_layer=num("num_hidden_layers", int), n_head=n_head, n_head_kv=n_head_kv,
                   n_ff=num("intermediate_size", int),
                   n_ctx=num("max_position_embeddings", int, 2048),
                   rope_base=_rope_theta(cfg, path), rms_eps=num("rms_norm_eps", float, 1e-5))
    return HFConfig(shape=shape, activation=ACTIVATIONS[act],
                    tied=bool(cfg.get("tie_word_embeddings", False)),
                    form=_weight_form(cfg.get("quantization_config"), path),
                    bos_id=_token_id(cfg, "bos_token_id"), eos_id=_token_id(cfg, "eos_token_id"))


def _rope_theta(cfg: dict, path: Path) -> float:
    """rope_theta (older configs) or rope_parameters (transformers 5); plain RoPE only."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) \
        else params
    if kind != "default":
        raise _fail(path, f"rope type {kind!r}; expected plain RoPE ('default'), the only one "
                    "BitNet b1.58 uses")
    theta = params.get("rope_theta", cfg.get("rope_theta", 500000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise _fail(path, f"'rope_theta' is {theta!r}; expected a positive number")
    return float(theta)


def _weight_form(q: Any, path: Path) -> str:
    """MASTER for float weights (no quantization_config, or transformers' online
    autobitlinear), PACKED for Microsoft's offline bitlinear form; anything else is refused."""
    if q is None:
        return MASTER
    method = q.get("quant_method") if isinstance(q, dict) else q
    if method != "bitnet":
        raise _fail(path, f"'quantization_config.quant_method' is {method!r}; expected none "
                    "(bf16/f16/f32 master weights) or 'bitnet' (Microsoft's packed form)")
    linear = q.get("linear_class", "bitlinear")
    mode = q.get("quantization_mode", "offline")
    if q.get("use_rms_norm"):
        raise _fail(path, "'quantization_config.use_rms_norm' is true (an extra RMSNorm before "
                    "every BitLinear); expected false, as BitNet b1.58 2B-4T has it")
    if (linear, mode) == ("bitlinear", "offline"):
        return PACKED
    if (linear, mode) == ("autobitlinear", "online"):
        return MASTER  # float weights that transformers ternarizes on the fly, as we do here
    raise _fail(path, f"'quantization_config' has linear_class {linear!r} and "
                f"quantization_mode {mode!r}; expected bitlinear/offline (packed) or "
                "autobitlinear/online (master weights)")


def _token_id(cfg: dict, key: str) -> int | None:
    value = cfg.get(key)
    if isinstance(value, list):  # eos_token_id may list several; the first is EOS
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Checkpoint:
    """The tensors of a checkpoint directory, read one at a time (no file is mapped whole)."""

    def __init__(self, root: str | os.PathLike) -> None:
        """Check config.json and list every tensor of the safetensors file(s)."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise _fail(self.root, "not a directory; expected a Hugging Face checkpoint "
                        "directory (config.json, *.safetensors, tokenizer.json)")
        self.config = read_config(self.root)
        self.tensors: dict[str, TensorEntry] = {}
        for file, names in self._shards().items():
            for entry in _list_safetensors(file):
                if names is not None and entry.name not in names:
                    raise _fail(file, f"holds tensor '{entry.name}', which {INDEX} places "
                                "elsewhere or not at all")
                if entry.name in self.tensors:
                    raise _fail(file, f"tensor '{entry.name}' is also in "
                                f"{self.tensors[entry.name].file.name}")
                self.tensors[entry.name] = entry
            for name in sorted(names or ()):
                if name not in self.tensors or self.tensors[name].file != file:
                    raise _fail(file, f"lacks tensor '{name}', which {INDEX} places there")
        self._fds: dict[Path, int] = {}

    def _shards(self) -> dict[Path, set[str] | None]:
        """safetensors file -> the tensor names the index places in it (None: no index)."""
        index = self.root / INDEX
        if not index.exists():
            single = self.root / SINGLE
            if not single.is_file():
                raise _fail(self.root, f"has neither {SINGLE} nor {INDEX}")
            return {single: None}
        weight_map = _load_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise _fail(index, "expected a non-empty 'weight_map' of tensor name -> file name")
        shards: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            path = self.root / file
            if Path(file).name != file or not path.is_file():
                raise _fail(index, f"tensor '{name}' is in '{file}', which is not a file in "
                            f"{self.root}")
            shards.setdefault(path, set()).add(name)
        return dict(shards)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `name` (or rows [start, stop) of it) as a fresh numpy array: float32 for
        the float dtypes (BF16 widened exactly), else the file's own dtype."""
        e = self.tensors[name]
        row_shape = e.shape[1:]
        row_bytes = e.nbytes // e.shape[0] if e.shape and e.shape[0] else e.nbytes
        start, stop = rows if rows is not None else (0, e.shape[0] if e.shape else 1)
        count = (stop - start) * row_bytes
        buf = np.empty(count, np.uint8)
        fd = self._fds.get(e.file)
        if fd is None:
            fd = self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        view, done = memoryview(buf), 0
        while done < count:  # pread may return less than asked (large reads, a shrunk file)
            n = os.preadv(fd, [view[done:]], e.offset + start * row_bytes + done)
            if n == 0:
                raise _fail(e.file, f"tensor '{name}' ends early (the file is truncated)")
            done += n
        shape = ((stop - start), *row_shape) if rows is not None or e.shape else ()
        data = buf.view(DTYPES[e.dtype]).reshape(shape)
        if e.dtype == "BF16":  # bf16 is the top half of a float32
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32) if e.dtype in FLOATS else data

    def close(self) -> None:
        """Close the files read so far."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _list_safetensors(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file.  The `safetensors` library checks the file (header,
    dtypes, offsets covering the file exactly); the offsets come from the header it checked,
    because its numpy reader cannot return BF16 tensors (numpy has no bfloat16)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            checked = {k: (t.get_dtype(), tuple(t.get_shape())) for k, t in slices.items()}
    except (SafetensorError, OSError) as e:
        raise _fail(path, f"not a valid safetensors file ({e})") from None
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    entries = []
    for name, (dtype, shape) in checked.items():
        begin, end = header[name]["data_offsets"]
        if dtype not in DTYPES:
            raise _fail(path, f"tensor '{name}' has dtype {dtype}; expected one of "
                        f"{', '.join(FLOATS)} or U8")
        entries.append(TensorEntry(name, path, dtype, shape, 8 + n + begin, end - begin))
    return entries
