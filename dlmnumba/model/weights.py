"""Model weights in kernel layout, loaded from a GGUF file through one name table.

Ternary projections stay 2-bit packed (kernels/ternary.py layout); projections that share an
input are fused row-wise (q|k|v and gate|up) since every row carries its own scale.  The token
embedding stays a zero-copy view of the memory-mapped file in its stored type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import ModelFormatError
from ..gguf import quants
from ..gguf.ggml_types import BF16, F16, F32, Q6_K, Q8_0
from ..gguf.reader import GGUFFile
from ..gguf.spec import ModelSpec
from ..kernels.ternary import ROW_ALIGN, pack_codes, padded_k, unpack_weights

TQ_GROUP = 256  # weights per TQ1_0/TQ2_0 block, each with its own f16 scale

EMBED_TYPES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q6_K: "Q6_K"}
NORM_TYPES = {F32: "F32", F16: "F16", BF16: "BF16"}

# our field -> GGUF tensor name pattern, its row count and input width (from the spec)
TERNARY = {
    "q": ("blk.{i}.attn_q", lambda s: s.n_embd, lambda s: s.n_embd),
    "k": ("blk.{i}.attn_k", lambda s: s.n_embd_kv, lambda s: s.n_embd),
    "v": ("blk.{i}.attn_v", lambda s: s.n_embd_kv, lambda s: s.n_embd),
    "o": ("blk.{i}.attn_output", lambda s: s.n_embd, lambda s: s.n_embd),
    "gate": ("blk.{i}.ffn_gate", lambda s: s.n_ff, lambda s: s.n_embd),
    "up": ("blk.{i}.ffn_up", lambda s: s.n_ff, lambda s: s.n_embd),
    "down": ("blk.{i}.ffn_down", lambda s: s.n_embd, lambda s: s.n_ff),
}
NORMS = {
    "attn_norm": ("blk.{i}.attn_norm.weight", lambda s: s.n_embd),
    "attn_sub_norm": ("blk.{i}.attn_sub_norm.weight", lambda s: s.n_embd),
    "ffn_norm": ("blk.{i}.ffn_norm.weight", lambda s: s.n_embd),
    "ffn_sub_norm": ("blk.{i}.ffn_sub_norm.weight", lambda s: s.n_ff),
}


class Ternary(NamedTuple):
    """A ternary matrix W[n_out, k] in kernel layout."""

    packed: np.ndarray  # uint8 [padded_n / 16, padded_k / 16, 64] (kernels/ternary.py)
    scales: np.ndarray  # float32 [n_out, G]: scale per group of `group` weights of a row
    group: int  # weights per scale group (padded_k when G == 1)
    k: int  # logical input width


class Layer(NamedTuple):
    """One transformer block's weights."""

    attn_norm: np.ndarray
    qkv: Ternary  # rows: q (n_embd) | k (n_embd_kv) | v (n_embd_kv)
    attn_sub_norm: np.ndarray
    o: Ternary
    ffn_norm: np.ndarray
    gate_up: Ternary  # rows: gate (n_ff) | up (n_ff)
    ffn_sub_norm: np.ndarray
    down: Ternary


class Embedding:
    """Token embedding / LM head kept in its stored type; rows converted to float32 on use."""

    CHUNK_ROWS = 8192  # rows converted per step of the LM-head product

    def __init__(self, raw: np.ndarray, qtype: int, n_rows: int, n_cols: int, name: str):
        self.raw, self.qtype, self.n_rows, self.n_cols, self.name = raw, qtype, n_rows, n_cols, name
        self.row_bytes = raw.nbytes // n_rows

    def rows_f32(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 [stop-start, n_cols]."""
        chunk = self.raw[start * self.row_bytes: stop * self.row_bytes]
        if self.qtype == F32:
            return chunk.view(np.float32).reshape(stop - start, self.n_cols)
        if self.qtype == F16:
            return chunk.view(np.float16).reshape(stop - start, self.n_cols).astype(np.float32)
        if self.qtype == BF16:
            u = chunk.view(np.uint16).astype(np.uint32) << 16
            return u.view(np.float32).reshape(stop - start, self.n_cols)
        from gguf import GGMLQuantizationType, quants as gq  # Q8_0 / Q6_K: the gguf package decodes
        flat = gq.dequantize(chunk.reshape(stop - start, self.row_bytes),
                             GGMLQuantizationType(self.qtype))
        return flat.reshape(stop - start, self.n_cols).astype(np.float32)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows of the given token ids, float32 [len(ids), n_cols]."""
        rows = self.raw.reshape(self.n_rows, self.row_bytes)[np.asarray(ids, np.int64)]
        return Embedding(rows.reshape(-1), self.qtype, len(rows), self.n_cols,
                         self.name).rows_f32(0, len(rows)).copy()

    def project(self, out: np.ndarray, h: np.ndarray) -> None:
        """out[M, n_rows] = h[M, n_cols] @ E^T, converting CHUNK_ROWS rows at a time."""
        for start in range(0, self.n_rows, self.CHUNK_ROWS):
            stop = min(self.n_rows, start + self.CHUNK_ROWS)
            np.matmul(h, self.rows_f32(start, stop).T, out=out[:, start:stop])


class Int8Head(NamedTuple):
    """The LM head quantized to int8 per row (kernels/lm_head.py), with the per-row norms that
    bound its error against the exact head (lm_screen.screen_exact_f16)."""

    e8: np.ndarray  # int8 [Vp / 16, Kp / 4, 64]: rows padded to LM_ROWS, broadcast layout
    e_inv: np.ndarray  # float32 [V]: 127 / max|row| (the row's quantization scale)
    e_sum: np.ndarray  # int32 [V]: sum of the row's int8 values (unsigned-offset correction)
    err_h: np.ndarray  # float32 [V]: ||e - e8 / s|| + exact_sum_error ||e|| (times ||h||)
    norm8: np.ndarray  # float32 [V]: ||e8 / s|| (multiplies ||h - q / s_h||)


def quantize_head(emb: Embedding, chunk: int = 2048) -> Int8Head:
    """Quantize the LM head per row to int8, the way activations are (absmax, half-even), and
    measure each row's quantization error (float64 norms, rounded up to float32)."""
    from ..kernels.lm_head import LM_ROWS, interleave_rows
    from ..kernels.lm_screen import exact_sum_error, head_error_norms
    from ..kernels.ops import quantize_rows

    kp = padded_k(emb.n_cols)
    vp = -(-emb.n_rows // LM_ROWS) * LM_ROWS
    e8 = np.empty((vp // 16, kp // 4, 64), np.int8)
    e_inv = np.empty(emb.n_rows, np.float32)
    e_sum = np.empty(emb.n_rows, np.int32)
    err_h = np.empty(emb.n_rows, np.float32)
    norm8 = np.empty(emb.n_rows, np.float32)
    sum_error = exact_sum_error(emb.n_cols)
    for start in range(0, emb.n_rows, chunk):  # chunk: a multiple of 16
        stop = min(emb.n_rows, start + chunk)
        rows = np.empty((-(-(stop - start) // 16) * 16, kp), np.int8)  # zero padding rows
        sums = np.empty(rows.shape[0], np.int32)
        exact = np.ascontiguousarray(emb.rows_f32(start, stop))
        quantize_rows(rows, e_inv[start:stop], sums, exact)
        e_sum[start:stop] = sums[:stop - start]
        e8[start // 16:start // 16 + rows.shape[0] // 16] = interleave_rows(rows)
        head_error_norms(err_h[start:stop], norm8[start:stop], exact, rows, e_inv[start:stop],
                         sum_error)
    e8[-(-emb.n_rows // 16):] = 0  # padding rows
    return Int8Head(e8, e_inv, e_sum, err_h, norm8)


@dataclass
class Weights:
    """All weights of a BitNet model."""

    token_embd: Embedding
    output: Embedding  # token_embd itself when the LM head is tied
    output_norm: np.ndarray
    layers: list[Layer]
    tied: bool


def load_weights(f: GGUFFile, spec: ModelSpec, progress=None) -> Weights:
    """Load and repack every weight; all missing/unexpected tensors reported at once."""
    names = set(f.tensors)
    # The metadata's block count must be backed by tensors before anything is sized by it: a
    # corrupt count (2^31) would otherwise build name sets and loops of that length.  Blocks
    # that are present but incomplete are left to the missing-tensor report below.
    per_layer = len(TERNARY) + len(NORMS)
    blocks = {n.split(".")[1] for n in names if n.startswith("blk.") and n.count(".") >= 2}
    if spec.n_layer > len(blocks) and spec.n_layer * per_layer + 2 > len(names):
        raise ModelFormatError(
            f"{f.path}: metadata key '{spec.arch}.block_count' = {spec.n_layer}, but the file has "
            f"only {len(names)} tensors ({len(blocks)} distinct blocks 'blk.N'); expected "
            f"{per_layer} per block plus 'token_embd.weight' and 'output_norm.weight'")
    expected = {"token_embd.weight", "output_norm.weight"}
    optional = {"output.weight"}
    for i in range(spec.n_layer):
        expected |= {pat.format(i=i) + ".weight" for pat, _, _ in TERNARY.values()}
        optional |= {pat.format(i=i) + ".scale" for pat, _, _ in TERNARY.values()}
        expected |= {pat.format(i=i) for pat, _ in NORMS.values()}
    missing = sorted(expected - names)
    unexpected = sorted(names - expected - optional - {"rope_freqs.weight"})
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:12])}"
                         + (f" (+{len(missing) - 12} more)" if len(missing) > 12 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:12])}"
                         + (f" (+{len(unexpected) - 12} more)" if len(unexpected) > 12 else ""))
        raise ModelFormatError(f"{f.path}: " + "; ".join(parts)
                               + f" (expected a {spec.arch} model with {spec.n_layer} layers)")

    token_embd = _embedding(f, "token_embd.weight", spec.n_vocab or None, spec.n_embd)
    if spec.n_vocab and token_embd.n_rows != spec.n_vocab:
        raise ModelFormatError(f"{f.path}: tensor 'token_embd.weight' has {token_embd.n_rows} rows, "
                               f"expected {spec.n_vocab} (the vocabulary size)")
    tied = "output.weight" not in names
    output = token_embd if tied else _embedding(f, "output.weight", token_embd.n_rows, spec.n_embd)
    layers = []
    for i in range(spec.n_layer):
        t = {key: _ternary(f, pat.format(i=i), rows(spec), cols(spec))
             for key, (pat, rows, cols) in TERNARY.items()}
        norms = {key: _vector(f, pat.format(i=i), n(spec)) for key, (pat, n) in NORMS.items()}
        layers.append(Layer(qkv=_fuse([t["q"], t["k"], t["v"]]), o=t["o"],
                            gate_up=_fuse([t["gate"], t["up"]]), down=t["down"], **norms))
        if progress is not None:
            progress.update(1)
    return Weights(token_embd=token_embd, output=output,
                   output_norm=_vector(f, "output_norm.weight", spec.n_embd),
                   layers=layers, tied=tied)


def _expect_shape(f: GGUFFile, name: str, shape: tuple[int, ...]) -> None:
    got = tuple(f.tensors[name].shape)
    if got != shape:
        raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(got)}, expected "
                               f"{list(shape)} from the metadata")


def _vector(f: GGUFFile, name: str, n: int, why: str = "from the metadata") -> np.ndarray:
    """A norm weight (or scale) of n finite values, as float32."""
    info = f.tensors[name]
    if info.qtype not in NORM_TYPES:
        raise ModelFormatError(f"{f.path}: tensor '{name}' has type {type_name(info.qtype)}, "
                               f"expected one of {', '.join(NORM_TYPES.values())}")
    if info.n_elements != n:
        raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(info.shape)}, "
                               f"expected [{n}] {why}")
    v = Embedding(f.data(name), info.qtype, 1, n, name).rows_f32(0, 1)[0].copy()
    _check_finite(f, name, v)
    return v


def _check_finite(f: GGUFFile, name: str, a: np.ndarray, what: str = "") -> None:
    """Non-finite norms or scales turn every activation into inf/NaN: refuse them at load."""
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ModelFormatError(
            f"{f.path}: tensor '{name}' holds {bad.size} non-finite {what or 'value'}(s) "
            f"(first: {a.reshape(-1)[bad[0]]} at flat index {bad[0]}); expected finite numbers")


def _embedding(f: GGUFFile, name: str, n_rows: int | None, n_cols: int) -> Embedding:
    info = f.tensors[name]
    if info.qtype not in EMBED_TYPES:
        raise ModelFormatError(f"{f.path}: tensor '{name}' has type {type_name(info.qtype)}, "
                               f"expected one of {', '.join(EMBED_TYPES.values())}")
    if len(info.shape) != 2 or info.shape[1] != n_cols or (n_rows and info.shape[0] != n_rows):
        want = [n_rows if n_rows else "n_vocab", n_cols]
        raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(info.shape)}, "
                               f"expected {want} from the metadata")
    if info.shape[0] == 0:
        raise ModelFormatError(f"{f.path}: tensor '{name}' has shape {list(info.shape)}: no "
                               "rows; expected one row per vocabulary token")
    return Embedding(f.data(name), info.qtype, info.shape[0], n_cols, name)


def _ternary(f: GGUFFile, base: str, n_out: int, k: int) -> Ternary:
    name = base + ".weight"
    info = f.tensors[name]
    if info.qtype not in quants.TERNARY_TYPES:
        raise ModelFormatError(
            f"{f.path}: tensor '{name}' has type {type_name(info.qtype)}, expected a ternary "
            f"type ({', '.join(fmt.name for fmt in quants.TERNARY_TYPES.values())})")
    _expect_shape(f, name, (n_out, k))
    try:
        codes, scales = quants.decode_ternary(info.qtype, f.data(name), (n_out, k))
    except ValueError as e:
        raise ModelFormatError(f"{f.path}: tensor '{name}': {e}") from None
    f.release(name)  # repacked below: the file's copy need not stay resident
    _check_finite(f, name, scales, "block scale")
    scales = _collapse_scales(codes, scales)
    if base + ".scale" in f.tensors:
        extra = _vector(f, base + ".scale", 1, "(one scale for the whole matrix)")
        scales = scales * extra[0]
        _check_finite(f, base + ".scale", scales, "product with the block scales")
    kp = padded_k(k)
    group = kp if scales.shape[1] == 1 else TQ_GROUP
    return Ternary(pack_codes(codes), np.ascontiguousarray(scales, np.float32), group, k)


def _collapse_scales(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """One scale per row when every group holding a nonzero weight shares it (BitNet's case)."""
    if scales.shape[1] == 1:
        return scales
    n, g = scales.shape
    used = (codes.reshape(n, g, -1) != 1).any(axis=2)
    row = np.max(np.where(used, scales, -np.inf), axis=1)  # -inf: a row of zero weights
    same = np.all(~used | (scales == row[:, None]), axis=1)
    if same.all():
        return np.where(np.isfinite(row), row, 0.0).astype(np.float32)[:, None]
    return scales


def _fuse(parts: list[Ternary]) -> Ternary:
    """Stack matrices sharing an input into one (rows concatenated, scales aligned)."""
    if len({p.group for p in parts}) > 1:
        parts = [p._replace(scales=np.repeat(p.scales, p.group // TQ_GROUP, axis=1), group=TQ_GROUP)
                 if p.scales.shape[1] == 1 else p for p in parts]
    if all(p.scales.shape[0] % ROW_ALIGN == 0 for p in parts[:-1]):  # blocks line up
        packed = np.concatenate([p.packed for p in parts])
    else:  # a part's padding rows would sit inside the stack: pack the codes again
        packed = pack_codes(np.concatenate([unpack_weights(p.packed, p.scales.shape[0], p.k)
                                            for p in parts]) + 1)
    return Ternary(packed, np.concatenate([p.scales for p in parts]), parts[0].group, parts[0].k)


def type_name(qtype: int) -> str:
    """Name of a GGML tensor type id (ours for I2_S, the gguf package's otherwise)."""
    if qtype in quants.TERNARY_TYPES:
        return quants.TERNARY_TYPES[qtype].name
    try:
        from gguf import GGMLQuantizationType
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"
