"""The checkpoint's weight forms as ternary codes (uint8 {0, 1, 2} = weights {-1, 0, +1}) and
one float32 scale per tensor, and float tensors in the GGUF types we write."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ..errors import CheckpointError

ABSMEAN_EPS = np.float32(1e-5)  # floor of mean|W| (transformers' WeightQuant clamps to 1e-5)
F16_MAX = 65504.0
EMBD_TYPES = ("F32", "F16", "BF16")
EMBD_CHUNK_BYTES = 32 << 20  # float32 bytes of embedding rows converted at a time


def absmean_ternary(w: np.ndarray, where: str) -> tuple[np.ndarray, np.float32]:
    """Ternarize float32 master weights per tensor: codes and the scale d, W ~= (code - 1) * d.

    The BitNet b1.58 recipe (Ma et al. 2024, "The Era of 1-bit LLMs", arXiv 2402.17764,
    eqs. 1-3: gamma = mean|W|, W~ = RoundClip(W / gamma, -1, 1)), computed as transformers'
    `WeightQuant` (integrations/bitnet.py) does in float32: s = 1 / max(mean|W|, 1e-5),
    Wq = clamp(round(W * s), -1, 1), value = Wq / s; so d = 1 / s.  llama.cpp's BitnetModel
    converter and bitnet.cpp's preprocess script use the same recipe.  The mean is summed in
    float64 and rounded once, so it does not depend on a summation order (torch's float32
    reduction can differ from it in the last bit)."""
    _check_finite(w, where)
    mean = np.float32(np.abs(w).sum(dtype=np.float64) / w.size)
    s = np.float32(1) / np.maximum(mean, ABSMEAN_EPS)
    q = np.multiply(w, s, out=w)  # w is ours (a fresh read): reuse it
    np.rint(q, out=q)  # round half to even, as torch.round
    np.clip(q, -1, 1, out=q)
    codes = q.astype(np.int8)
    codes += 1
    return codes.view(np.uint8), np.float32(1) / s


def unpack_packed(packed: np.ndarray, weight_scale: np.ndarray,
                  where: str) -> tuple[np.ndarray, np.float32]:
    """Microsoft's packed form: uint8 [out/4, in] -> codes [out, in] and d = 1 / weight_scale.

    As transformers' `unpack_weights` (integrations/bitnet.py): bits 2i..2i+1 of packed row r
    hold row i * (out/4) + r (four planes one after the other), code = w + 1; `BitLinear`
    divides by weight_scale, so the stored scale is the inverse of d."""
    rows = packed.shape[0]
    codes = np.empty((4 * rows, packed.shape[1]), np.uint8)
    for i in range(4):
        np.bitwise_and(packed >> (2 * i), 3, out=codes[i * rows:(i + 1) * rows])
    bad = np.flatnonzero(codes == 3)
    if bad.size:
        r, c = divmod(int(bad[0]), codes.shape[1])
        raise CheckpointError(f"{where}: 2-bit code 3 at row {r}, column {c} (unpacked); "
                              "expected codes 0, 1, 2 (weights -1, 0, +1)")
    scale = weight_scale.reshape(-1).astype(np.float32)
    if scale.size != 1 or not np.isfinite(scale[0]) or not scale[0] > 0:
        raise CheckpointError(f"{where} weight_scale: {scale[:4].tolist()}; expected one "
                              "finite positive number")
    return codes, np.float32(1) / scale[0]


def check_tq_scale(d: np.float32, where: str, qtype: str) -> None:
    """TQ1_0/TQ2_0 store the scale as f16: refuse one that f16 cannot hold."""
    half = np.float16(d)
    if not np.isfinite(half) or half == 0 or abs(float(half) - float(d)) > 1e-3 * float(d):
        raise CheckpointError(f"{where}: scale {float(d):.6g} does not fit {qtype}'s f16 block "
                              "scale; expected one in [6.1e-05, 65504] (use --qtype I2_S, which "
                              "stores it as f32)")


def norm_f32(w: np.ndarray, where: str) -> np.ndarray:
    """A norm weight as float32, checked finite."""
    _check_finite(w, where)
    return np.ascontiguousarray(w, dtype=np.float32)


class ChunkedTensor:
    """A tensor written to the GGUF file in chunks (the writer calls `tofile`), so an embedding
    never sits in memory whole; `nbytes` is its size in the file."""

    def __init__(self, nbytes: int, chunks: Callable[[], Iterator[np.ndarray]]) -> None:
        """chunks() yields the tensor's bytes, in order, as numpy arrays."""
        self.nbytes = nbytes
        self._chunks = chunks

    def tofile(self, fp) -> None:
        """Write every chunk to fp and check the total."""
        written = 0
        for chunk in self._chunks():
            chunk.tofile(fp)
            written += chunk.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"chunked tensor wrote {written} bytes, expected {self.nbytes}")


def float_chunks(read_rows: Callable[[int, int], np.ndarray], n_rows: int, n_cols: int,
                 gguf_type: str, where: str) -> Iterator[np.ndarray]:
    """Rows of a float matrix (read_rows(start, stop) -> float32) in type F32, F16 or BF16."""
    import gguf

    step = max(1, EMBD_CHUNK_BYTES // (4 * n_cols))
    for start in range(0, n_rows, step):
        x = read_rows(start, min(start + step, n_rows))
        _check_finite(x, where, start)
        if gguf_type == "F32":
            yield x
        elif gguf_type == "F16":
            big = np.abs(x) > F16_MAX
            if big.any():
                r, c = np.argwhere(big)[0]
                raise CheckpointError(f"{where}: value {float(x[r, c]):.6g} at row "
                                      f"{start + int(r)} exceeds F16's range (65504); use "
                                      "--embd-type BF16 or F32")
            yield x.astype(np.float16)
        else:
            yield gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16)


def float_nbytes(n_rows: int, n_cols: int, gguf_type: str) -> int:
    """Bytes of a float matrix in type F32, F16 or BF16."""
    return n_rows * n_cols * (4 if gguf_type == "F32" else 2)


def _check_finite(x: np.ndarray, where: str, row0: int = 0) -> None:
    """Refuse NaN and infinity, naming the first such element (row0: index of x's first row)."""
    bad = ~np.isfinite(x)
    if bad.any():
        idx = np.argwhere(bad)[0] if x.ndim else np.zeros(0, np.int64)
        value = float(x[tuple(idx)])
        if idx.size:
            idx[0] += row0
        raise CheckpointError(f"{where}: non-finite value {value:g} at index {idx.tolist()}; "
                              "expected finite weights")
