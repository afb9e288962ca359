"""GGUFFile against files written by gguf.GGUFWriter and read by gguf.GGUFReader."""

import mmap
import struct

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from dlmnumba.errors import ModelFormatError
from dlmnumba.gguf.quants import I2_S, encode_ternary
from dlmnumba.gguf.reader import GGUFFile, TensorInfo

V = GGUFValueType
SCALARS = [  # (key, value type, value); add_key_value, since add_string skips empty strings
    ("t.u8", V.UINT8, 200), ("t.i8", V.INT8, -100), ("t.u16", V.UINT16, 60000),
    ("t.i16", V.INT16, -30000), ("t.u32", V.UINT32, 4_000_000_000),
    ("t.i32", V.INT32, -2_000_000_000), ("t.f32", V.FLOAT32, 0.1),
    ("t.u64", V.UINT64, 2**63 + 5), ("t.i64", V.INT64, -(2**62)),
    ("t.f64", V.FLOAT64, 0.1), ("t.bool", V.BOOL, True), ("t.bool0", V.BOOL, False),
    ("t.str", V.STRING, "héllo ✓ wörld"), ("t.empty", V.STRING, ""),
]
ARRAYS = {
    "t.arr_i32": [1, -2, 3],
    "t.arr_f32": [0.5, -1.25, 3.0],
    "t.arr_bool": [True, False, True],
    "t.arr_str": ["a", "Ġhello", "日本", ""],
}
NESTED = {
    "t.nested_int": [[1, 2, 3], [4, 5]],
    "t.nested_str": [["x", "yy"], ["zzz"]],
}


def plain_tensors(rng):
    """F32/F16/BF16/I8/I32 and TQ tensors: name -> (array, raw_dtype or None)."""
    ternary = (rng.integers(0, 3, size=(4, 512)).astype(np.float32) - 1) * 0.5
    return {
        "f32": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "f32_1d": (rng.standard_normal(7).astype(np.float32), None),  # odd size: padding follows
        "f16": (rng.standard_normal((4, 8)).astype(np.float16), None),
        "bf16": (rng.integers(0, 2**16, size=(2, 6), dtype=np.uint16),
                 GGMLQuantizationType.BF16),
        "i8": (rng.integers(-128, 128, size=(3, 3), dtype=np.int8), None),
        "i32": (rng.integers(-1000, 1000, size=(2, 2, 3), dtype=np.int32), None),
        "tq1": (gguf_quantize(ternary, GGMLQuantizationType.TQ1_0), GGMLQuantizationType.TQ1_0),
        "tq2": (gguf_quantize(ternary, GGMLQuantizationType.TQ2_0), GGMLQuantizationType.TQ2_0),
    }


def write_gguf(path, tensors, alignment=None, i2s=None):
    """Write metadata of every value type, the given tensors, and optionally an I2_S tensor."""
    w = GGUFWriter(str(path), arch="bitnet-b1.58")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, value in SCALARS:
        w.add_key_value(key, value, vtype)
    for key, value in ARRAYS.items():
        w.add_array(key, value)
    for key, value in NESTED.items():
        w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.ARRAY)
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    if i2s is not None:
        name, raw, shape = i2s
        w.add_tensor(name, raw.view(np.int8), raw_shape=shape)
        w.tensors[-1][name].dtype = I2_S  # the writer packs the type id with struct "I"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tensors():
    return plain_tensors(np.random.default_rng(0))


@pytest.fixture
def gguf_path(tmp_path, tensors):
    return write_gguf(tmp_path / "model.gguf", tensors)


def base_is_mmap(arr):
    """Follow .base to the bottom and report whether it is the file mapping."""
    while isinstance(arr, np.ndarray):
        if arr.flags.owndata:
            return False
        arr = arr.base
    if isinstance(arr, memoryview):
        arr = arr.obj
    return isinstance(arr, mmap.mmap)


def assert_format_error(path, *needles):
    """Open path, expect ModelFormatError naming the path and every needle; return the message."""
    with pytest.raises(ModelFormatError) as err:
        GGUFFile(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


# --------------------------------------------------------------------------------------------
# reading valid files
# --------------------------------------------------------------------------------------------


def test_metadata_matches_gguf_reader(gguf_path):
    ours = GGUFFile(gguf_path)
    ref = GGUFReader(gguf_path)
    ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == ref_keys  # file order kept
    for key in ref_keys:
        if key in NESTED:
            continue  # GGUFReader.contents() does not flatten nested arrays; checked below
        theirs = ref.fields[key].contents()
        mine = ours.metadata[key]
        if isinstance(mine, np.ndarray):
            np.testing.assert_array_equal(mine, np.asarray(theirs))
            assert mine.dtype == ref.fields[key].parts[-1].dtype
        else:
            assert type(mine) is type(theirs) and mine == theirs, key


def test_metadata_values_are_what_was_written(gguf_path):
    md = GGUFFile(gguf_path).metadata
    assert md["general.architecture"] == "bitnet-b1.58"
    for key, vtype, value in SCALARS:
        if vtype == V.FLOAT32:
            assert md[key] == float(np.float32(value))
        else:
            assert md[key] == value and type(md[key]) is type(value), key
    assert md["t.arr_i32"].dtype == np.int32 and md["t.arr_i32"].tolist() == [1, -2, 3]
    assert md["t.arr_f32"].dtype == np.float32 and md["t.arr_f32"].tolist() == [0.5, -1.25, 3.0]
    assert md["t.arr_bool"].tolist() == [True, False, True]
    assert md["t.arr_str"] == ARRAYS["t.arr_str"]
    assert [a.tolist() for a in md["t.nested_int"]] == NESTED["t.nested_int"]
    assert md["t.nested_str"] == NESTED["t.nested_str"]


def test_tensors_match_gguf_reader(gguf_path, tensors):
    ours = GGUFFile(gguf_path)
    ref = GGUFReader(gguf_path)
    assert list(ours.tensors) == [t.name for t in ref.tensors] == list(tensors)
    for rt in ref.tensors:
        info = ours.tensors[rt.name]
        assert isinstance(info, TensorInfo)
        assert info.qtype == int(rt.tensor_type)
        assert info.ne == tuple(int(d) for d in rt.shape)
        assert info.shape == info.ne[::-1]
        assert info.n_elements == rt.n_elements
        assert info.offset == rt.data_offset and info.offset % 32 == 0
        assert info.nbytes == rt.n_bytes
        assert ours.data(rt.name).tobytes() == rt.data.tobytes()


def test_typed_arrays_are_zero_copy_views(gguf_path, tensors):
    f = GGUFFile(gguf_path)
    for name in ("f32", "f32_1d", "f16", "bf16", "i8", "i32"):
        arr = f.array(name)
        want = tensors[name][0]
        assert arr.shape == want.shape and arr.dtype == want.dtype
        np.testing.assert_array_equal(arr, want)
        assert base_is_mmap(arr) and not arr.flags.writeable
    for name in tensors:
        raw = f.data(name)
        assert raw.dtype == np.uint8 and raw.ndim == 1 and base_is_mmap(raw)
        assert np.shares_memory(raw, f.data(name))
    with pytest.raises(ModelFormatError, match="tq2"):
        f.array("tq2")


def test_shapes_are_numpy_order(gguf_path):
    f = GGUFFile(gguf_path)
    assert f.tensors["tq2"].shape == (4, 512) and f.tensors["tq2"].ne == (512, 4)
    assert f.tensors["i32"].shape == (2, 2, 3) and f.tensors["i32"].ne == (3, 2, 2)


def test_custom_alignment(tmp_path, tensors):
    path = write_gguf(tmp_path / "a64.gguf", tensors, alignment=64)
    f = GGUFFile(path)
    ref = GGUFReader(path)
    assert f.alignment == 64 and f.data_start % 64 == 0
    for rt in ref.tensors:
        assert f.tensors[rt.name].offset == rt.data_offset
        assert f.data(rt.name).tobytes() == rt.data.tobytes()


def test_i2_s_tensor(tmp_path, tensors):
    rng = np.random.default_rng(1)
    shape = (6, 384)
    codes = rng.integers(0, 3, size=shape).astype(np.uint8)
    raw = encode_ternary(I2_S, codes, 0.25)
    path = write_gguf(tmp_path / "i2s.gguf", tensors, i2s=("blk.0.ffn_up.weight", raw, shape))
    with pytest.raises(Exception):
        GGUFReader(path)  # the reason this reader exists
    f = GGUFFile(path)
    info = f.tensors["blk.0.ffn_up.weight"]
    assert info.qtype == 36 and info.shape == shape and info.ne == (384, 6)
    assert info.nbytes == 6 * 384 // 4 + 32
    np.testing.assert_array_equal(f.data(info.name), raw)
    np.testing.assert_array_equal(f.array("f32"), tensors["f32"][0])  # tensors before it intact


def test_get_and_tensor_accessors(gguf_path):
    f = GGUFFile(gguf_path)
    assert f.get("t.u8") == 200
    assert f.get("no.such.key", 7) == 7 and f.get("no.such.key", None) is None
    with pytest.raises(ModelFormatError, match="no.such.key") as err:
        f.get("no.such.key")
    assert str(gguf_path) in str(err.value)
    with pytest.raises(ModelFormatError, match="nope"):
        f.data("nope")


def test_version_2_is_read(gguf_path):
    data = bytearray(gguf_path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    gguf_path.write_bytes(bytes(data))
    assert GGUFFile(gguf_path).version == 2


def test_close_keeps_handed_out_views_valid(gguf_path, tensors):
    with GGUFFile(gguf_path) as f:
        arr = f.array("f32")
    np.testing.assert_array_equal(arr, tensors["f32"][0])


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_not_gguf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is text\n")
    assert_format_error(path, "not a GGUF file", "b'hell'")


def test_empty_and_tiny_files(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_format_error(path, "not a GGUF file")
    path.write_bytes(b"GGUF")
    assert_format_error(path, "truncated")


def test_missing_path_and_directory(tmp_path):
    assert_format_error(tmp_path / "missing.gguf", "not found")
    assert_format_error(tmp_path, "directory")


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(gguf_path, version):
    data = bytearray(gguf_path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    gguf_path.write_bytes(bytes(data))
    assert_format_error(gguf_path, "unsupported GGUF version", version)


def _find_string(data: bytes, s: str) -> int:
    """Offset of a GGUF string (u64 length + bytes) in data."""
    enc = s.encode()
    pos = data.find(struct.pack("<Q", len(enc)) + enc)
    assert pos > 0
    return pos


def test_truncated_at_several_points(tmp_path, gguf_path):
    data = gguf_path.read_bytes()
    ref = GGUFReader(gguf_path)
    key_pos = _find_string(data, "t.arr_str")
    ti_pos = _find_string(data, "f16")
    first, last = ref.tensors[0], ref.tensors[-1]
    cuts = {
        "header": (10, ["truncated", "header"]),
        "metadata value": (key_pos + 8 + len("t.arr_str") + 10, ["truncated", "t.arr_str"]),
        "tensor info": (ti_pos + 8 + len("f16") + 6, ["truncated", "f16"]),
        "first tensor data": (first.data_offset + 3,
                              ["truncated", first.name, first.data_offset + first.n_bytes,
                               first.data_offset + 3]),
        "last tensor data": (last.data_offset + last.n_bytes - 1,
                             ["truncated", last.name, last.data_offset + last.n_bytes]),
    }
    for what, (cut, needles) in cuts.items():
        path = tmp_path / f"cut_{cut}.gguf"
        path.write_bytes(data[:cut])
        assert_format_error(path, *needles)


def test_every_truncation_raises_format_error(tmp_path, gguf_path):
    data = gguf_path.read_bytes()
    data_start = GGUFFile(gguf_path).data_start
    last = GGUFReader(gguf_path).tensors[-1]
    end = last.data_offset + last.n_bytes  # the writer pads after it; cuts there lose nothing
    path = tmp_path / "cut.gguf"
    for cut in list(range(0, data_start, 2)) + list(range(data_start, end, 97)) + [end - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError):
            GGUFFile(path)


def test_corrupt_bytes_never_escape_as_other_errors(tmp_path, gguf_path):
    data = gguf_path.read_bytes()
    data_start = GGUFFile(gguf_path).data_start
    rng = np.random.default_rng(3)
    path = tmp_path / "corrupt.gguf"
    for _ in range(300):
        buf = bytearray(data)
        for pos in rng.integers(4, data_start, size=3):
            buf[pos] = rng.integers(0, 256)
        path.write_bytes(bytes(buf))
        try:
            GGUFFile(path)
        except ModelFormatError as e:
            assert str(path) in str(e)


def test_unknown_tensor_type(gguf_path):
    data = bytearray(gguf_path.read_bytes())
    pos = _find_string(bytes(data), "f16") + 8 + 3  # after the name: u32 n_dims, u64 ne[..], type
    n_dims = struct.unpack_from("<I", data, pos)[0]
    type_pos = pos + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_pos)[0] == int(GGMLQuantizationType.F16)
    data[type_pos:type_pos + 4] = struct.pack("<I", 99)
    gguf_path.write_bytes(bytes(data))
    assert_format_error(gguf_path, "'f16'", "unknown ggml type 99")


def test_unknown_value_type(gguf_path):
    data = bytearray(gguf_path.read_bytes())
    pos = _find_string(bytes(data), "t.u16") + 8 + len("t.u16")
    assert struct.unpack_from("<I", data, pos)[0] == int(GGUFValueType.UINT16)
    data[pos:pos + 4] = struct.pack("<I", 99)
    gguf_path.write_bytes(bytes(data))
    assert_format_error(gguf_path, "t.u16", "unknown GGUF value type 99")


def test_invalid_utf8_string(gguf_path):
    data = bytearray(gguf_path.read_bytes())
    pos = _find_string(bytes(data), "héllo ✓ wörld")
    data[pos + 8] = 0xFF
    gguf_path.write_bytes(bytes(data))
    assert_format_error(gguf_path, "t.str", "UTF-8")


def test_absurd_counts(gguf_path):
    data = bytearray(gguf_path.read_bytes())
    data[16:24] = struct.pack("<Q", 2**60)  # n_kv
    gguf_path.write_bytes(bytes(data))
    assert_format_error(gguf_path, "metadata keys", 2**60)
