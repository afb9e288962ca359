"""Synthetic BitNet GGUF models: real shapes, random ternary weights, a real BPE vocabulary.

Used as the default benchmark model (the `bitnet-2b4t` preset has BitNet b1.58 2B-4T's shapes;
model_source.py says which and where) and as test fixtures.  Weights are random, so text
generated from them is noise.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..gguf import quants
from ..gguf.ggml_types import I2_S, TERNARY
from ..gguf.spec import ARCH_ACTIVATION


@dataclass(frozen=True)
class Preset:
    """Shapes of a synthetic model."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int = 4096
    rope_base: float = 500000.0
    rms_eps: float = 1e-5


PRESETS = {
    # dims are multiples of 256 so TQ1_0/TQ2_0 rows fit whole blocks (llama.cpp requires it)
    "tiny": Preset(n_vocab=1024, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=768,
                   n_ctx=2048),
    "small": Preset(n_vocab=4096, n_embd=512, n_layer=4, n_head=8, n_head_kv=2, n_ff=1536),
    # BitNet b1.58 2B-4T (reference.md section 1) with the DLM fine-tunes' extra |<MASK>| token
    "bitnet-2b4t": Preset(n_vocab=128257, n_embd=2560, n_layer=30, n_head=20, n_head_kv=5,
                          n_ff=6912),
}
QTYPES = TERNARY  # storage types of the projection weights, by name


def layer_tensors(p: Preset, i: int) -> list[tuple[str, int, int]]:
    """(name, rows, cols) of block i's ternary projections, in llama.cpp's order."""
    kv = p.n_embd // p.n_head * p.n_head_kv
    return [(f"blk.{i}.attn_q.weight", p.n_embd, p.n_embd),
            (f"blk.{i}.attn_k.weight", kv, p.n_embd),
            (f"blk.{i}.attn_v.weight", kv, p.n_embd),
            (f"blk.{i}.attn_output.weight", p.n_embd, p.n_embd),
            (f"blk.{i}.ffn_gate.weight", p.n_ff, p.n_embd),
            (f"blk.{i}.ffn_up.weight", p.n_ff, p.n_embd),
            (f"blk.{i}.ffn_down.weight", p.n_embd, p.n_ff)]


def write_synthetic(path: str | Path, preset: str = "tiny", qtype: str = "TQ2_0",
                    arch: str = "bitnet-b1.58", seed: int = 0, progress: bool = False,
                    **overrides: int) -> Path:
    """Write a synthetic model; the same arguments always give the same bytes.

    overrides replace preset fields (e.g. n_ff=256, used by tests that need every matmul input
    to be one 256-value block, where llama.cpp's activation quantization equals ours)."""
    import gguf

    from .vocab import add_tokenizer_metadata, build_synth_vocab

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if qtype not in QTYPES:
        raise ValueError(f"unknown qtype {qtype!r}; expected one of {', '.join(QTYPES)}")
    if arch not in ARCH_ACTIVATION:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCH_ACTIVATION)}")
    import dataclasses

    p, qt = dataclasses.replace(PRESETS[preset], **overrides), QTYPES[qtype]
    path = Path(path)
    rng = np.random.default_rng(seed)
    vocab = build_synth_vocab(p.n_vocab)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"dlmnumba synthetic {preset} ({qtype}, random weights, seed {seed})")
    add_shape_metadata(w, p)
    add_tokenizer_metadata(w, vocab)

    # embeddings ~ N(0, 4/E) so tied-head logits have unit-order spread
    embd = (rng.standard_normal((p.n_vocab, p.n_embd), dtype=np.float32)
            * np.float32(2.0 / np.sqrt(p.n_embd))).astype(np.float16)
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", _norm(rng, p.n_embd))
    for i in range(p.n_layer):
        mats = layer_tensors(p, i)
        for name, rows, cols in mats:
            _add_ternary(w, rng, name, rows, cols, qt)
        w.add_tensor(f"blk.{i}.attn_norm.weight", _norm(rng, p.n_embd))
        w.add_tensor(f"blk.{i}.attn_sub_norm.weight", _norm(rng, p.n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", _norm(rng, p.n_embd))
        w.add_tensor(f"blk.{i}.ffn_sub_norm.weight", _norm(rng, p.n_ff))

    return write_atomically(w, path, progress)


def add_shape_metadata(w, p: Preset, shift_logits: bool = True) -> None:
    """The `<arch>.*` hyperparameters of a model of shape p, and `diffusion.shift_logits`."""
    w.add_context_length(p.n_ctx)
    w.add_embedding_length(p.n_embd)
    w.add_block_count(p.n_layer)
    w.add_feed_forward_length(p.n_ff)
    w.add_head_count(p.n_head)
    w.add_head_count_kv(p.n_head_kv)
    w.add_rope_freq_base(p.rope_base)
    w.add_rope_dimension_count(p.n_embd // p.n_head)
    w.add_layer_norm_rms_eps(p.rms_eps)
    w.add_vocab_size(p.n_vocab)
    w.add_bool("diffusion.shift_logits", shift_logits)


def write_atomically(w, path: Path, progress: bool = False,
                     data: Iterable | None = None) -> Path:
    """Write a gguf.GGUFWriter to path via path.part, so a half-written model never sits under
    `path`; on any error (Ctrl-C included) the .part file is removed.

    data None writes the tensors given to add_tensor.  Otherwise the writer holds tensor infos
    only (add_tensor_info, add_ternary_tensor_info) and data yields each one's bytes in that
    order (numpy arrays, or objects with `nbytes` and `tofile(fp)`), so a converter holds one
    tensor at a time."""
    tmp = path.with_name(path.name + ".part")
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        if data is None:
            w.write_tensors_to_file(progress=progress)
        else:
            w.write_ti_data_to_file()
            for tensor in data:
                w.write_tensor_data(tensor)
            if any(w.tensors):
                raise RuntimeError(f"{path}: tensor data ended before the last tensor info")
        w.close()
        tmp.replace(path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _norm(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def _add_ternary(w, rng: np.random.Generator, name: str, rows: int, cols: int, qt: int) -> None:
    """Random ternary codes (a third each of -1, 0, +1) and one scale for the whole tensor."""
    codes = rng.integers(0, 3, size=(rows, cols), dtype=np.uint8)
    # scale so a unit-RMS input gives a unit-RMS output: var = cols * 2/3 * scale^2
    scale = np.float32(np.sqrt(1.5 / cols))
    if qt == I2_S:
        add_i2s_tensor(w, name, codes, float(scale))
    else:
        import gguf
        scale = np.float32(np.float16(scale))  # TQ stores d as f16
        raw = quants.encode_ternary(qt, codes, np.full((rows, cols // 256), scale, np.float32))
        w.add_tensor(name, raw.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType(qt))


def add_ternary_tensor_info(w, name: str, rows: int, cols: int, qt: int) -> int:
    """Register a ternary tensor [rows, cols] of type qt (TQ1_0, TQ2_0 or I2_S) in a
    gguf.GGUFWriter without its data (written later: write_atomically's `data`); returns the
    number of bytes its data must have."""
    import gguf

    nbytes = quants.tensor_nbytes(qt, rows * cols)
    if qt == I2_S:
        w.add_tensor_info(name, (rows, cols), np.dtype(np.int8), nbytes)
        w.tensors[-1][name].dtype = I2_S  # the gguf package has no I2_S type: set the id by hand
    else:
        w.add_tensor_info(name, (rows, cols), np.dtype(np.float32), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType(qt))
    return nbytes


def add_i2s_tensor(w, name: str, codes: np.ndarray, scale: float) -> None:
    """Add an I2_S tensor (codes uint8 {0, 1, 2} = {-1, 0, +1} of shape [rows, cols], one scale)
    to a gguf.GGUFWriter, which has no I2_S type of its own."""
    rows, cols = codes.shape
    raw = quants.encode_ternary(I2_S, codes, np.full((rows, 1), scale, np.float32))
    w.add_tensor(name, raw.view(np.int8), raw_shape=(rows, cols))
    w.tensors[-1][name].dtype = I2_S  # set the type id by hand

