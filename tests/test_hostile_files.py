"""Regression tests for the hostile-file findings of issue 14 (items 1-8): each builds its own
minimal file from the tiny synthetic model and expects a ModelFormatError naming the file, the
key or tensor and what was expected (or, for prompts, a clear ValueError)."""
import math
import os
import struct

import numpy as np
import pytest

import dlmnumba
from dlmnumba.errors import ModelFormatError
from dlmnumba.gguf.reader import MAX_ARRAY_DEPTH, GGUFFile
from dlmnumba.gguf.spec import ModelSpec
from dlmnumba.gguf.tokenizer import Tokenizer
import gguf_doc as gd

ARCH = "bitnet-b1.58"
U32, I32, U64, F32, STRING = 4, 5, 10, 6, 8


@pytest.fixture
def doc(synth_model):
    """The tiny TQ2_0 model as an editable structure."""
    return gd.parse(open(synth_model(), "rb").read())


def save(doc, tmp_path, name="bad.gguf") -> str:
    path = tmp_path / name
    path.write_bytes(gd.write(doc))
    return str(path)


set_kv = gd.set_kv


def tensor(doc, name) -> gd.TInfo:
    return next(t for t in doc.tensors if t.name == name.encode())


def expect_error(path, *needles):
    with pytest.raises(ModelFormatError) as e:
        dlmnumba.load_model(path)
    for n in (os.path.basename(path),) + needles:
        assert n in str(e.value), (n, str(e.value))
    return str(e.value)


def test_unedited_structure_round_trips(synth_model, doc, tmp_path):
    """The editing helper writes the source back byte for byte, so failures below are edits'."""
    raw = open(synth_model(), "rb").read()
    assert gd.write(doc, relayout=False) == raw
    assert gd.write(doc) == raw
    dlmnumba.load_model(save(doc, tmp_path)).logits([1])


# 1. a block count the tensors do not back: refused before anything is sized by it
@pytest.mark.parametrize("vtype, value", [(U32, 2**24), (U32, 2**31 - 1), (U32, 2**32 - 1),
                                          (U64, 2**40), (U32, 3)])
def test_block_count_not_backed_by_tensors(doc, tmp_path, vtype, value):
    set_kv(doc, f"{ARCH}.block_count", vtype, value)
    msg = expect_error(save(doc, tmp_path), f"'{ARCH}.block_count' = {value}", "tensors")
    assert "2 distinct blocks" in msg


def test_block_count_negative(doc, tmp_path):
    set_kv(doc, f"{ARCH}.block_count", I32, -1)
    expect_error(save(doc, tmp_path), f"'{ARCH}.block_count' = -1", "positive integer")


# 2. token types must match the token list entry for entry
@pytest.mark.parametrize("keep", [0, 1, 1023])
def test_token_type_shorter_than_tokens(doc, tmp_path, keep):
    kv = doc.get("tokenizer.ggml.token_type")
    set_kv(doc, "tokenizer.ggml.token_type", kv.vtype,
           gd.Arr(kv.value.etype, kv.value.items[:keep]))
    path = save(doc, tmp_path)
    expect_error(path, "tokenizer.ggml.token_type", f"has {keep} entries, expected 1024")
    with pytest.raises(ModelFormatError, match="token_type.*expected 1024"):
        Tokenizer.from_metadata(GGUFFile(path).metadata, path)


# 3. nesting depth is bounded in the reader (no RecursionError)
@pytest.mark.parametrize("depth", [MAX_ARRAY_DEPTH + 1, 500, 5000])
def test_deeply_nested_array(doc, tmp_path, depth):
    set_kv(doc, "general.nested", gd.ARRAY, gd.Nested(depth, U32, 7))
    path = save(doc, tmp_path)
    with pytest.raises(ModelFormatError, match="'general.nested': arrays nested more than"):
        GGUFFile(path)
    expect_error(path, "general.nested", f"nested more than {MAX_ARRAY_DEPTH} deep")


def test_nesting_up_to_the_limit_reads(doc, tmp_path):
    set_kv(doc, "general.nested", gd.ARRAY, gd.Nested(MAX_ARRAY_DEPTH, U32, 7))
    value = GGUFFile(save(doc, tmp_path)).metadata["general.nested"]
    for _ in range(MAX_ARRAY_DEPTH - 1):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value.tolist() == [7]


# 4. a number stored as an array (or other non-scalar) is a format error naming the key
@pytest.mark.parametrize("key", [f"{ARCH}.{k}" for k in (
    "block_count", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "rope.dimension_count", "context_length", "vocab_size",
    "rope.freq_base", "attention.layer_norm_rms_epsilon")] + [
    f"tokenizer.ggml.{k}_token_id" for k in ("bos", "eos", "eot", "mask")])
def test_numeric_hyperparameter_as_array(doc, tmp_path, key):
    kv = doc.get(key)
    value = kv.value if kv is not None else 5
    etype = F32 if isinstance(value, float) else U32
    set_kv(doc, key, gd.ARRAY, gd.Arr(etype, np.array([value], gd.NUMPY_OF[etype])))
    expect_error(save(doc, tmp_path), f"'{key}' is an array of 1 elements", "expected a")


@pytest.mark.parametrize("key, vtype, value, needle", [
    (f"{ARCH}.feed_forward_length", STRING, b"512", "is str '512', expected an integer"),
    (f"{ARCH}.feed_forward_length", F32, 512.0, "is float 512.0, expected an integer"),
    (f"{ARCH}.embedding_length", 7, True, "is bool True, expected an integer"),
    (f"{ARCH}.rope.freq_base", F32, math.inf, "rope.freq_base' = inf, expected a finite"),
    (f"{ARCH}.attention.layer_norm_rms_epsilon", F32, math.nan, "= nan, expected a finite"),
    ("tokenizer.ggml.tokens", U32, 5, "'tokenizer.ggml.tokens' is int 5, expected an array"),
    (f"{ARCH}.vocab_size", U32, 1000, "has 1024 entries but"),
])
def test_metadata_of_the_wrong_type_or_range(doc, tmp_path, key, vtype, value, needle):
    set_kv(doc, key, vtype, value)
    expect_error(save(doc, tmp_path), needle)


def test_tokenizer_ids_share_the_typed_accessor(doc, tmp_path):
    set_kv(doc, "tokenizer.ggml.eos_token_id", gd.ARRAY, gd.Arr(U32, np.array([3], "<u4")))
    path = save(doc, tmp_path)
    with pytest.raises(ModelFormatError, match="'tokenizer.ggml.eos_token_id' is an array"):
        Tokenizer.from_metadata(GGUFFile(path).metadata, path)


def test_spec_refuses_arrays_from_any_mapping():
    md = {"general.architecture": ARCH, f"{ARCH}.embedding_length": np.array([256], "<u4")}
    with pytest.raises(ModelFormatError, match="x.gguf: metadata key .*embedding_length' is an "
                                               "array of 1 elements"):
        ModelSpec.from_metadata(md, "x.gguf")


# 5. a per-matrix `.scale` tensor holds exactly one finite number
def scale_tensor(ne, value=1.0, qtype=0):
    dtype = np.float32 if qtype == 0 else np.float16
    return gd.TInfo(b"blk.0.attn_q.scale", ne, qtype, 0,
                    np.full(math.prod(ne), value, dtype).tobytes())


@pytest.mark.parametrize("ne", [[4], [0], [192, 274]])
def test_scale_tensor_of_other_than_one_element(doc, tmp_path, ne):
    doc.tensors.append(scale_tensor(ne))
    expect_error(save(doc, tmp_path), "'blk.0.attn_q.scale'", "expected [1]")


def test_scale_tensor_of_one_element_scales_the_matrix(doc, tmp_path):
    ref = dlmnumba.load_model(save(doc, tmp_path, "ref.gguf"))
    doc.tensors.append(scale_tensor([1], 2.0, qtype=1))
    m = dlmnumba.load_model(save(doc, tmp_path))
    np.testing.assert_array_equal(m.weights.layers[0].qkv.scales[:256],
                                  2 * ref.weights.layers[0].qkv.scales[:256])
    np.testing.assert_array_equal(m.weights.layers[0].qkv.scales[256:],
                                  ref.weights.layers[0].qkv.scales[256:])


def test_scale_tensor_of_a_non_float_type(doc, tmp_path):
    doc.tensors.append(gd.TInfo(b"blk.0.attn_q.scale", [1], 24, 0, b"\x01"))  # I8
    expect_error(save(doc, tmp_path), "'blk.0.attn_q.scale' has type I8", "expected one of F32")


# 6. non-finite norms and scales are refused at load, naming the tensor
@pytest.mark.parametrize("name, index, value", [
    ("blk.0.attn_norm.weight", 0, math.inf), ("blk.1.attn_sub_norm.weight", 7, math.inf),
    ("output_norm.weight", 3, math.nan), ("blk.1.ffn_sub_norm.weight", 767, -math.inf)])
def test_non_finite_norm(doc, tmp_path, name, index, value):
    t = tensor(doc, name)
    a = np.frombuffer(t.data, np.float32).copy()
    a[index] = value
    t.data = a.tobytes()
    expect_error(save(doc, tmp_path), f"'{name}' holds 1 non-finite value",
                 f"at flat index {index}")


def test_norm_with_a_flipped_type_id(doc, tmp_path):
    """F32 norm bytes read as F16 after a type flip: the low halves 0x7C00 become +inf."""
    t = tensor(doc, "blk.0.attn_norm.weight")
    t.data = np.full(256, 0x3F807C00, "<u4").tobytes()  # finite as F32 (~1.0038)
    t.qtype = 1  # F16: the first 256 halves, 0x7C00 0x3F80 ..., half of them +inf
    expect_error(save(doc, tmp_path), "'blk.0.attn_norm.weight' holds 128 non-finite")


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_scale_tensor(doc, tmp_path, value):
    doc.tensors.append(scale_tensor([1], value))
    expect_error(save(doc, tmp_path), "'blk.0.attn_q.scale' holds 1 non-finite")


def test_non_finite_ternary_block_scale(doc, tmp_path):
    t = tensor(doc, "blk.1.ffn_down.weight")  # TQ2_0: 64 bytes of codes, then an f16 scale
    raw = bytearray(t.data)
    raw[66 + 64:66 + 66] = struct.pack("<H", 0x7E00)  # the second block's scale: NaN
    t.data = bytes(raw)
    expect_error(save(doc, tmp_path), "'blk.1.ffn_down.weight' holds 1 non-finite block scale")


# 7. an embedding with no rows (and no vocabulary to say how many it needs)
def test_embedding_without_rows(doc, tmp_path):
    doc.kvs = [kv for kv in doc.kvs if not kv.key.startswith(b"tokenizer.")
               and kv.key != f"{ARCH}.vocab_size".encode()]
    t = tensor(doc, "token_embd.weight")
    t.ne, t.data = [t.ne[0], 0], b""
    expect_error(save(doc, tmp_path), "'token_embd.weight' has shape [0, 256]: no rows")


# 8. prompts that are not valid Unicode text
@pytest.mark.parametrize("text, index", [("a\udcffb", 1), ("\ud800", 0), ("ok \udc80", 3)])
def test_encode_refuses_lone_surrogates(synth_model, text, index):
    tok = dlmnumba.load_model(synth_model()).tokenizer
    with pytest.raises(ValueError, match=f"not valid Unicode: the character at index {index}"):
        tok.encode(text)


def test_encode_wants_a_str(synth_model):
    tok = dlmnumba.load_model(synth_model()).tokenizer
    with pytest.raises(TypeError, match="must be a str, got bytes"):
        tok.encode(b"hello")
    assert tok.encode("a\U0001F600b")  # astral characters are valid text


# 6, the forward half: finite but huge weights overflow float32 in the pass; the pass stops
# with a ModelFormatError naming the layer and the norm instead of decoding wrong tokens
@pytest.mark.parametrize("name, where", [("blk.0.attn_norm.weight", "layer 0's attn_norm"),
                                         ("blk.1.ffn_sub_norm.weight", "layer 1's ffn_sub_norm"),
                                         ("output_norm.weight", "final hidden states")])
def test_huge_finite_norm_overflows_in_the_forward_pass(doc, tmp_path, name, where):
    t = tensor(doc, name)
    t.data = np.full(len(t.data) // 4, 3.4e38, np.float32).tobytes()
    path = save(doc, tmp_path)
    m = dlmnumba.load_model(path)  # finite: loads
    with pytest.raises(ModelFormatError, match=f"bad.gguf: .*{where}.* not finite"):
        m.logits([1, 2, 3])
    gen = dlmnumba.Generator(m, dlmnumba.DecodeSettings(mode="greedy", block_size=8,
                                                        max_tokens=4))
    with pytest.raises(ModelFormatError, match=where):
        gen.generate([1, 2, 3])
