"""Ternary formats (TQ1_0, TQ2_0, I2_S) against independent oracles.

TQ types: the `gguf` package's numpy quantize/dequantize. I2_S (unknown to the package): a
plain-Python packer written here from the layout text in docs/reference.md section 2.
"""

import struct

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from dlmnumba.gguf import quants
from dlmnumba.gguf.quants import (I2_S, TERNARY_TYPES, TQ1_0, TQ2_0, decode_ternary, dequantize,
                                  encode_ternary, tensor_nbytes)

TQ_TYPES = [(TQ1_0, GGMLQuantizationType.TQ1_0), (TQ2_0, GGMLQuantizationType.TQ2_0)]
TQ_SHAPES = [(1, 256), (3, 512), (7, 1024), (2, 2560)]


def random_ternary(rng, shape, group):
    """Random codes and per-group scales (f16-exact), with some all-zero and one-sign groups."""
    n, k = shape
    codes = rng.integers(0, 3, size=shape).astype(np.uint8)
    scales = rng.uniform(0.01, 3.0, size=(n, k // group)).astype(np.float16).astype(np.float32)
    grouped = codes.reshape(n, k // group, group)
    flat = grouped.reshape(-1, group)
    flat[0] = 1  # an all-zero group
    if flat.shape[0] > 2:
        flat[2] = np.where(flat[2] == 2, 1, flat[2])  # only -1 and 0: max |x| comes from a -1
        flat[-1] = 1
        flat[-1, 7] = 2  # a single nonzero weight
    scales.reshape(-1)[(grouped == 1).all(axis=-1).reshape(-1)] = 0.0  # what quantize yields
    return codes, scales


def to_float(codes, scales):
    """(code - 1) * scale of its group, in float32."""
    n, k = codes.shape
    g = scales.shape[1]
    w = codes.astype(np.float32).reshape(n, g, k // g) - 1.0
    return (w * scales[:, :, None]).reshape(n, k)


# --------------------------------------------------------------------------------------------
# TQ1_0 / TQ2_0 against the gguf package
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype,gtype", TQ_TYPES, ids=["TQ1_0", "TQ2_0"])
@pytest.mark.parametrize("shape", TQ_SHAPES)
def test_tq_decode_matches_gguf(qtype, gtype, shape):
    rng = np.random.default_rng(hash((qtype, shape)) % 2**32)
    codes, scales = random_ternary(rng, shape, 256)
    raw = gguf_quantize(to_float(codes, scales), gtype).reshape(-1)

    got_codes, got_scales = decode_ternary(qtype, raw, shape)
    assert got_codes.dtype == np.uint8 and got_codes.shape == shape
    assert got_scales.dtype == np.float32 and got_scales.shape == (shape[0], shape[1] // 256)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_scales, scales)

    ours = dequantize(qtype, raw, shape)
    theirs = gguf_dequantize(raw.reshape(shape[0], -1), gtype)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qtype,gtype", TQ_TYPES, ids=["TQ1_0", "TQ2_0"])
@pytest.mark.parametrize("shape", TQ_SHAPES)
def test_tq_encode_matches_gguf_and_roundtrips(qtype, gtype, shape):
    rng = np.random.default_rng(hash((qtype, shape, 1)) % 2**32)
    codes, scales = random_ternary(rng, shape, 256)
    raw = gguf_quantize(to_float(codes, scales), gtype).reshape(-1)

    encoded = encode_ternary(qtype, codes, scales)
    assert encoded.dtype == np.uint8
    np.testing.assert_array_equal(encoded, raw)
    np.testing.assert_array_equal(encode_ternary(qtype, *decode_ternary(qtype, raw, shape)), raw)


@pytest.mark.parametrize("qtype,gtype", TQ_TYPES, ids=["TQ1_0", "TQ2_0"])
def test_tq_element_order_of_single_weights(qtype, gtype):
    # One +1 at each position in turn: the decoded position must be exactly that one.
    k = 256
    codes = np.ones((k, k), np.uint8)
    codes[np.arange(k), np.arange(k)] = 2
    raw = gguf_quantize(codes.astype(np.float32) - 1.0, gtype).reshape(-1)
    got, _ = decode_ternary(qtype, raw, (k, k))
    np.testing.assert_array_equal(got, codes)


def test_tq2_0_rejects_code_3():
    codes = np.ones((2, 512), np.uint8)
    raw = encode_ternary(TQ2_0, codes, np.ones((2, 2), np.float32))
    # Row 1, block 1, byte qs[32 + 5] bits 4..5: element 256 + 128 + 2*32 + 5 per the layout.
    raw[66 * 2 + 66 + 32 + 5] |= 0b11 << 4
    with pytest.raises(ValueError, match=r"code 3 at element \[1, 453\]"):
        decode_ternary(TQ2_0, raw, (2, 512))


def test_tq1_0_any_byte_decodes_like_gguf():
    # Every byte value in every qs/qh position, not only canonical ones; d = 1.0 so gguf's
    # dequantized values are the trits minus one.
    raw = np.resize(np.arange(256, dtype=np.uint8), 5 * 54).reshape(5, 54)
    raw[:, 52:54] = np.array([1.0], "<f2").view(np.uint8)
    codes, scales = decode_ternary(TQ1_0, raw.reshape(-1), (5, 256))
    assert codes.max() <= 2 and np.all(scales == 1.0)
    theirs = gguf_dequantize(raw, GGMLQuantizationType.TQ1_0)
    np.testing.assert_array_equal(codes.astype(np.float32) - 1.0, theirs)


# --------------------------------------------------------------------------------------------
# I2_S against a plain-Python packer written from the layout text
# --------------------------------------------------------------------------------------------


def i2_s_reference_pack(codes, scale):
    """n values in 128-value blocks of 32 bytes; value j -> byte j % 32, shift 6 - 2*(j // 32)."""
    flat = [int(c) for c in codes.reshape(-1)]
    n = len(flat)
    out = bytearray(n // 4 + 32)
    for i, c in enumerate(flat):
        block, j = divmod(i, 128)
        out[block * 32 + j % 32] |= c << (6 - 2 * (j // 32))
    out[n // 4:n // 4 + 4] = struct.pack("<f", scale)
    return np.frombuffer(bytes(out), dtype=np.uint8)


I2_S_SHAPES = [(3, 128), (7, 384), (1, 128), (5, 640), (2, 64), (6, 320)]


@pytest.mark.parametrize("shape", I2_S_SHAPES)
def test_i2_s_matches_reference_packer(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    codes = rng.integers(0, 3, size=shape).astype(np.uint8)
    scale = np.float32(rng.uniform(0.1, 2.0))
    raw = i2_s_reference_pack(codes, scale)
    assert raw.size == tensor_nbytes(I2_S, codes.size) == codes.size // 4 + 32

    got_codes, got_scales = decode_ternary(I2_S, raw, shape)
    np.testing.assert_array_equal(got_codes, codes)
    assert got_scales.shape == (shape[0], 1) and got_scales.dtype == np.float32
    assert np.all(got_scales == scale)

    np.testing.assert_array_equal(encode_ternary(I2_S, codes, got_scales), raw)
    np.testing.assert_array_equal(encode_ternary(I2_S, codes, float(scale)), raw)
    np.testing.assert_array_equal(dequantize(I2_S, raw, shape),
                                  (codes.astype(np.float32) - 1.0) * scale)


def test_i2_s_row_r_starts_at_byte_r_k_over_4():
    rng = np.random.default_rng(7)
    n, k = 4, 384
    codes = rng.integers(0, 3, size=(n, k)).astype(np.uint8)
    raw = encode_ternary(I2_S, codes, 0.5)
    for r in range(n):
        row = np.concatenate([raw[r * k // 4:(r + 1) * k // 4], raw[n * k // 4:]])
        got, _ = decode_ternary(I2_S, row, (1, k))
        np.testing.assert_array_equal(got[0], codes[r])


def test_i2_s_tail_is_scale_then_zeros():
    raw = encode_ternary(I2_S, np.full((1, 128), 2, np.uint8), np.float32(1.25))
    assert raw[:32].tolist() == [0b10101010] * 32
    assert raw[32:36].view("<f4")[0] == np.float32(1.25)
    assert not raw[36:].any() and raw.size == 64


def test_i2_s_rejects_code_3_and_unequal_scales():
    raw = encode_ternary(I2_S, np.ones((2, 128), np.uint8), 1.0)
    raw[32 + 3] |= 0b11  # row 1 (bytes 32..63), byte 3, shift 0 -> element 3*32 + 3
    with pytest.raises(ValueError, match=r"code 3 at element \[1, 99\]"):
        decode_ternary(I2_S, raw, (2, 128))
    with pytest.raises(ValueError, match="one scale per tensor"):
        encode_ternary(I2_S, np.ones((2, 128), np.uint8), np.array([[1.0], [2.0]], np.float32))


# --------------------------------------------------------------------------------------------
# table, sizes, argument checks
# --------------------------------------------------------------------------------------------


def test_table_and_sizes():
    assert {t: f.name for t, f in TERNARY_TYPES.items()} == {34: "TQ1_0", 35: "TQ2_0", 36: "I2_S"}
    for qtype, gtype in TQ_TYPES:
        block, type_size = GGML_QUANT_SIZES[gtype]
        assert tensor_nbytes(qtype, 6912 * 2560) == 6912 * 2560 // block * type_size
    assert tensor_nbytes(I2_S, 6912 * 2560) == 6912 * 2560 // 4 + 32


@pytest.mark.parametrize("qtype", [TQ1_0, TQ2_0, I2_S])
def test_large_roundtrip(qtype):
    rng = np.random.default_rng(qtype)
    shape = (96, 2560)
    codes = rng.integers(0, 3, size=shape).astype(np.uint8)
    scales = np.full((96, 10 if qtype != I2_S else 1), 0.75, np.float32)
    raw = encode_ternary(qtype, codes, scales)
    assert raw.size == tensor_nbytes(qtype, codes.size)
    got, got_scales = decode_ternary(qtype, raw, shape)
    np.testing.assert_array_equal(got, codes)
    np.testing.assert_array_equal(got_scales, scales)


@pytest.mark.parametrize("call,match", [
    (lambda: decode_ternary(TQ2_0, np.zeros(65, np.uint8), (1, 256)), "needs 66 bytes; got 65"),
    (lambda: decode_ternary(TQ1_0, np.zeros(54, np.uint8), (1, 200)), "multiple of 256"),
    (lambda: decode_ternary(I2_S, np.zeros(48, np.uint8), (1, 64)), "multiple of 128"),
    (lambda: decode_ternary(I2_S, np.zeros(64, np.int8), (1, 128)), "expected uint8"),
    (lambda: decode_ternary(2, np.zeros(64, np.uint8), (1, 128)), "not a ternary format"),
    (lambda: decode_ternary(TQ2_0, np.zeros(66, np.uint8), (256,)), "2 positive dims"),
    (lambda: encode_ternary(TQ2_0, np.full((1, 256), 3, np.uint8), np.ones((1, 1))), r"\{0, 1, 2\}"),
    (lambda: encode_ternary(TQ2_0, np.ones((1, 256), np.uint8), np.ones((1, 2))), "one per 256"),
    (lambda: encode_ternary(TQ1_0, np.ones((1, 256), np.float32), np.ones((1, 1))), "integers"),
    (lambda: tensor_nbytes(I2_S, 100), "multiple of 128"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_module_constants():
    assert (quants.TQ1_0, quants.TQ2_0, quants.I2_S) == (34, 35, 36)
    assert (int(GGMLQuantizationType.TQ1_0), int(GGMLQuantizationType.TQ2_0)) == (34, 35)
