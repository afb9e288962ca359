"""Ternary weight formats of GGUF (TQ1_0, TQ2_0, I2_S): unpack to codes + scales and pack back.

In memory a ternary matrix [N, K] (K = ggml ne0, the contiguous dim) is a pair:
  codes  uint8 [N, K], values in {0, 1, 2}; the weight is code - 1;
  scales float32 [N, G], one scale per group of K/G consecutive elements of a row:
         G = K/256 for TQ1_0/TQ2_0 (the f16 ``d`` of each 256-block), G = 1 for I2_S
         (its single per-tensor f32 scale, repeated for every row).
The formats are registered by GGUF type id in ``TERNARY_TYPES`` (after gguf-py's quants.py).
Wrappers validate and raise ValueError; the model loader adds the file and tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit, prange

from .ggml_types import I2_S, TQ1_0, TQ2_0

QK_K = 256  # elements per TQ block (llama.cpp's super-block size)
TQ1_0_BLOCK_BYTES = 54  # qs[48] (5 trits/byte) + qh[4] (4 trits/byte) + f16 d
TQ2_0_BLOCK_BYTES = 66  # qs[64] (4 codes/byte) + f16 d
TQ1_0_QS_BYTES = 48
TQ1_0_D_OFFSET = 52  # d follows qs[48] and qh[4]
TQ2_0_D_OFFSET = 64  # d follows qs[64]
I2_S_BLOCK = 128  # elements per I2_S block (x86 layout of bitnet.cpp)
I2_S_BLOCK_BYTES = 32
I2_S_TAIL_BYTES = 32  # f32 scale + zero padding after the packed codes

Codes = np.ndarray
Scales = np.ndarray


# ---------------------------------------------------------------------------------------------
# numba kernels: output first, no validation (the wrappers below do that)
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _trit(b: int, n: int) -> int:
    # b is a base-3 fixed-point fraction v/243 stored as ceil(v*256/243); multiplying by 3^n
    # mod 256 shifts trit n to the top, and *3 >> 8 reads it (ggml's TQ1_0 decoding).
    p = 1
    for _ in range(n):
        p *= 3
    return (((b * p) & 0xFF) * 3) >> 8


@njit(cache=True, nogil=True, parallel=True)
def _tq1_0_unpack(codes, raw):
    # codes[N, K] <- raw[N, K/256*54]; returns 0 (TQ1_0 trits are valid by construction)
    n_rows, k = codes.shape
    for r in prange(n_rows):
        for blk in range(k // QK_K):
            src = blk * TQ1_0_BLOCK_BYTES
            dst = blk * QK_K
            for m in range(32):  # qs[0:32] -> elements n*32 + m, n = 0..4
                b = np.int64(raw[r, src + m])
                for n in range(5):
                    codes[r, dst + n * 32 + m] = _trit(b, n)
            for m in range(16):  # qs[32:48] -> elements 160 + n*16 + m
                b = np.int64(raw[r, src + 32 + m])
                for n in range(5):
                    codes[r, dst + 160 + n * 16 + m] = _trit(b, n)
            for m in range(4):  # qh[0:4] -> elements 240 + n*4 + m, 4 trits per byte
                b = np.int64(raw[r, src + TQ1_0_QS_BYTES + m])
                for n in range(4):
                    codes[r, dst + 240 + n * 4 + m] = _trit(b, n)
    return 0


@njit(cache=True, nogil=True, parallel=True)
def _tq1_0_pack(raw, codes):
    # raw[N, K/256*54] <- codes[N, K] (qs and qh only; the caller writes d)
    n_rows, k = codes.shape
    for r in prange(n_rows):
        for blk in range(k // QK_K):
            src = blk * QK_K
            dst = blk * TQ1_0_BLOCK_BYTES
            for m in range(32):
                v = 0
                for n in range(5):
                    v = v * 3 + np.int64(codes[r, src + n * 32 + m])
                raw[r, dst + m] = (v * 256 + 242) // 243
            for m in range(16):
                v = 0
                for n in range(5):
                    v = v * 3 + np.int64(codes[r, src + 160 + n * 16 + m])
                raw[r, dst + 32 + m] = (v * 256 + 242) // 243
            for m in range(4):
                v = 0
                for n in range(4):
                    v = v * 3 + np.int64(codes[r, src + 240 + n * 4 + m])
                v *= 3  # qh holds 4 trits in the top digits; the fifth (lowest) is 0
                raw[r, dst + TQ1_0_QS_BYTES + m] = (v * 256 + 242) // 243
    return 0


@njit(cache=True, nogil=True, parallel=True)
def _tq2_0_unpack(codes, raw):
    # codes[N, K] <- raw[N, K/256*66]; returns how many bytes hold the invalid code 3
    n_rows, k = codes.shape
    n_bad = 0
    for r in prange(n_rows):
        for blk in range(k // QK_K):
            src = blk * TQ2_0_BLOCK_BYTES
            dst = blk * QK_K
            for half in range(2):  # qs[half*32 + m] holds elements half*128 + n*32 + m
                for m in range(32):
                    b = raw[r, src + half * 32 + m]
                    n_bad += (b & (b >> 1) & 0x55) != 0  # some 2-bit field equals 3
                    for n in range(4):
                        codes[r, dst + half * 128 + n * 32 + m] = (b >> (2 * n)) & 3
    return n_bad


@njit(cache=True, nogil=True, parallel=True)
def _tq2_0_pack(raw, codes):
    # raw[N, K/256*66] <- codes[N, K] (qs only; the caller writes d)
    n_rows, k = codes.shape
    for r in prange(n_rows):
        for blk in range(k // QK_K):
            src = blk * QK_K
            dst = blk * TQ2_0_BLOCK_BYTES
            for half in range(2):
                for m in range(32):
                    b = 0
                    for n in range(4):
                        b |= np.int64(codes[r, src + half * 128 + n * 32 + m]) << (2 * n)
                    raw[r, dst + half * 32 + m] = b
    return 0


@njit(cache=True, nogil=True, parallel=True)
def _i2_s_unpack(codes, raw):
    # codes[n] <- raw[n/4] (flat); returns how many bytes hold the invalid code 3
    n_bad = 0
    for blk in prange(codes.size // I2_S_BLOCK):
        for p in range(I2_S_BLOCK_BYTES):  # byte p holds elements g*32 + p at shift 6 - 2g
            b = raw[blk * I2_S_BLOCK_BYTES + p]
            n_bad += (b & (b >> 1) & 0x55) != 0
            for g in range(4):
                codes[blk * I2_S_BLOCK + g * 32 + p] = (b >> (6 - 2 * g)) & 3
    return n_bad


@njit(cache=True, nogil=True, parallel=True)
def _i2_s_pack(raw, codes):
    # raw[n/4] <- codes[n] (flat; the caller writes the scale tail)
    for blk in prange(codes.size // I2_S_BLOCK):
        for p in range(I2_S_BLOCK_BYTES):
            b = 0
            for g in range(4):
                b |= np.int64(codes[blk * I2_S_BLOCK + g * 32 + p]) << (6 - 2 * g)
            raw[blk * I2_S_BLOCK_BYTES + p] = b
    return 0


# ---------------------------------------------------------------------------------------------
# per-format wrappers (sizes already checked by decode_ternary / encode_ternary)
# ---------------------------------------------------------------------------------------------


def _first_code3(codes: np.ndarray, name: str) -> ValueError:
    """Build the error for the first element whose 2-bit code is 3."""
    idx = np.unravel_index(int(np.argmax(codes == 3)), codes.shape)
    where = ", ".join(str(int(i)) for i in idx)
    return ValueError(f"{name} data holds the 2-bit code 3 at element [{where}]; "
                      "expected ternary codes 0, 1, 2 (weights -1, 0, +1)")


def _tq_scales(blocks: np.ndarray, d_offset: int) -> np.ndarray:
    """Read each block's f16 d as float32 [N, G]."""
    d = np.ascontiguousarray(blocks[:, :, d_offset:d_offset + 2])
    return d.view("<f2")[:, :, 0].astype(np.float32)


def _decode_tq1_0(raw: np.ndarray, n: int, k: int) -> tuple[Codes, Scales]:
    """TQ1_0 bytes -> (codes [n, k], scales [n, k/256])."""
    blocks = raw.reshape(n, k // QK_K, TQ1_0_BLOCK_BYTES)
    codes = np.empty((n, k), np.uint8)
    _tq1_0_unpack(codes, raw.reshape(n, -1))
    return codes, _tq_scales(blocks, TQ1_0_D_OFFSET)


def _decode_tq2_0(raw: np.ndarray, n: int, k: int) -> tuple[Codes, Scales]:
    """TQ2_0 bytes -> (codes [n, k], scales [n, k/256])."""
    blocks = raw.reshape(n, k // QK_K, TQ2_0_BLOCK_BYTES)
    codes = np.empty((n, k), np.uint8)
    if _tq2_0_unpack(codes, raw.reshape(n, -1)):
        raise _first_code3(codes, "TQ2_0")
    return codes, _tq_scales(blocks, TQ2_0_D_OFFSET)


def _decode_i2_s(raw: np.ndarray, n: int, k: int) -> tuple[Codes, Scales]:
    """I2_S bytes -> (codes [n, k], scales [n, 1] all equal to the tensor scale)."""
    n_el = n * k
    codes = np.empty(n_el, np.uint8)
    if _i2_s_unpack(codes, raw[: n_el // 4]):
        raise _first_code3(codes.reshape(n, k), "I2_S")
    scale = raw[n_el // 4: n_el // 4 + 4].view("<f4")[0]
    return codes.reshape(n, k), np.full((n, 1), scale, np.float32)


def _encode_tq(pack: Callable, block_bytes: int, d_offset: int,
               codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Pack codes with a TQ kernel and store each block's scale as f16 d."""
    n, k = codes.shape
    if scales.shape != (n, k // QK_K):
        raise ValueError(f"scales have shape {scales.shape}; expected {(n, k // QK_K)} "
                         "(one per 256-element block)")
    raw = np.zeros((n, k // QK_K * block_bytes), np.uint8)
    pack(raw, codes)
    d = scales.astype("<f2").view(np.uint8).reshape(n, k // QK_K, 2)
    raw.reshape(n, k // QK_K, block_bytes)[:, :, d_offset:d_offset + 2] = d
    return raw.reshape(-1)


def _encode_tq1_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(codes, scales [n, k/256]) -> TQ1_0 bytes."""
    return _encode_tq(_tq1_0_pack, TQ1_0_BLOCK_BYTES, TQ1_0_D_OFFSET, codes, scales)


def _encode_tq2_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(codes, scales [n, k/256]) -> TQ2_0 bytes."""
    return _encode_tq(_tq2_0_pack, TQ2_0_BLOCK_BYTES, TQ2_0_D_OFFSET, codes, scales)


def _encode_i2_s(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(codes, one scale) -> I2_S bytes: packed codes, f32 scale, zero padding."""
    n, k = codes.shape
    s = np.asarray(scales, np.float32).reshape(-1)
    if s.size not in (1, n) or not np.all(s.view(np.uint32) == s.view(np.uint32)[0]):
        raise ValueError(f"I2_S has one scale per tensor; got scales of shape "
                         f"{np.shape(scales)} that are not a single repeated value")
    raw = np.zeros(i2_s_nbytes(n * k), np.uint8)
    _i2_s_pack(raw, codes.reshape(-1))
    raw[n * k // 4: n * k // 4 + 4] = s[:1].astype("<f4").view(np.uint8)
    return raw


# ---------------------------------------------------------------------------------------------
# the table and the public functions
# ---------------------------------------------------------------------------------------------


def tq1_0_nbytes(n_elements: int) -> int:
    """Bytes of a TQ1_0 tensor of n_elements (a multiple of 256)."""
    return n_elements // QK_K * TQ1_0_BLOCK_BYTES


def tq2_0_nbytes(n_elements: int) -> int:
    """Bytes of a TQ2_0 tensor of n_elements (a multiple of 256)."""
    return n_elements // QK_K * TQ2_0_BLOCK_BYTES


def i2_s_nbytes(n_elements: int) -> int:
    """Bytes of an I2_S tensor: 2 bits per element plus a 32-byte tail holding the scale."""
    return n_elements // 4 + I2_S_TAIL_BYTES


@dataclass(frozen=True)
class TernaryFormat:
    """One ternary GGUF type: how to size, unpack and pack it."""

    type_id: int
    name: str
    row_multiple: int  # K must be a multiple of this (the scale group along a row)
    total_multiple: int  # N*K must be a multiple of this (the packing block)
    nbytes: Callable[[int], int]
    decode: Callable[[np.ndarray, int, int], tuple[Codes, Scales]]
    encode: Callable[[np.ndarray, np.ndarray], np.ndarray]


TERNARY_TYPES: dict[int, TernaryFormat] = {
    TQ1_0: TernaryFormat(TQ1_0, "TQ1_0", QK_K, QK_K, tq1_0_nbytes, _decode_tq1_0, _encode_tq1_0),
    TQ2_0: TernaryFormat(TQ2_0, "TQ2_0", QK_K, QK_K, tq2_0_nbytes, _decode_tq2_0, _encode_tq2_0),
    # I2_S blocks run over the flattened tensor, so rows need only start on a byte (K % 4).
    I2_S: TernaryFormat(I2_S, "I2_S", 4, I2_S_BLOCK, i2_s_nbytes, _decode_i2_s, _encode_i2_s),
}


def ternary_format(qtype: int) -> TernaryFormat:
    """Look up a ternary format by GGUF type id, or raise ValueError."""
    fmt = TERNARY_TYPES.get(int(qtype))
    if fmt is None:
        names = ", ".join(f"{t} ({f.name})" for t, f in TERNARY_TYPES.items())
        raise ValueError(f"GGML type {qtype} is not a ternary format; expected one of {names}")
    return fmt


def _check_shape(fmt: TernaryFormat, shape: tuple[int, ...]) -> tuple[int, int]:
    """Validate a logical [N, K] shape against the format's block rules."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{fmt.name} tensor shape {tuple(shape)}: expected 2 positive dims [N, K]")
    n, k = int(shape[0]), int(shape[1])
    if k % fmt.row_multiple or (n * k) % fmt.total_multiple:
        raise ValueError(f"{fmt.name} tensor shape {(n, k)}: row length K must be a multiple of "
                         f"{fmt.row_multiple} and N*K a multiple of {fmt.total_multiple}")
    return n, k


def tensor_nbytes(qtype: int, n_elements: int) -> int:
    """Bytes a ternary tensor of n_elements takes in the file; ValueError if not blockable."""
    fmt = ternary_format(qtype)
    if n_elements < 1 or n_elements % fmt.total_multiple:
        raise ValueError(f"{fmt.name} tensor of {n_elements} elements: expected a positive "
                         f"multiple of {fmt.total_multiple}")
    return fmt.nbytes(n_elements)


def decode_ternary(qtype: int, raw: np.ndarray, shape: tuple[int, int]) -> tuple[Codes, Scales]:
    """Unpack a ternary tensor's file bytes into (codes uint8 [N, K], scales float32 [N, G])."""
    fmt = ternary_format(qtype)
    n, k = _check_shape(fmt, shape)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"{fmt.name} raw data has dtype {raw.dtype}; expected uint8 bytes")
    raw = raw.reshape(-1)
    want = fmt.nbytes(n * k)
    if raw.size != want:
        raise ValueError(f"{fmt.name} tensor of shape {(n, k)} needs {want} bytes; got {raw.size}")
    return fmt.decode(raw, n, k)


def encode_ternary(qtype: int, codes: np.ndarray, scales: np.ndarray | float) -> np.ndarray:
    """Pack (codes [N, K] in {0,1,2}, scales) into the bytes the file stores for this type."""
    fmt = ternary_format(qtype)
    codes = np.asarray(codes)
    n, k = _check_shape(fmt, codes.shape)
    if codes.dtype.kind not in "iu":
        raise ValueError(f"{fmt.name} codes have dtype {codes.dtype}; expected integers 0, 1, 2")
    if codes.size and (codes.min() < 0 or codes.max() > 2):
        raise ValueError(f"{fmt.name} codes range over [{codes.min()}, {codes.max()}]; "
                         "expected values in {0, 1, 2}")
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    return fmt.encode(codes, np.asarray(scales, np.float32))


def dequantize(qtype: int, raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Decode a ternary tensor to float32 [N, K] = (code - 1) * scale of its group."""
    codes, scales = decode_ternary(qtype, raw, shape)
    n, k = codes.shape
    g = scales.shape[1]
    w = codes.reshape(n, g, k // g).astype(np.int8) - np.int8(1)
    return (w.astype(np.float32) * scales[:, :, None]).reshape(n, k)
