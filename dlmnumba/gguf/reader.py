"""A compact read-only GGUF reader over a memory map (gguf-py's GGUFReader refuses I2_S).

Layout (little-endian, versions 2 and 3): magic b"GGUF", u32 version, u64 n_tensors, u64 n_kv;
n_kv x (string key, u32 value type, value); n_tensors x (string name, u32 n_dims, u64 ne[n_dims],
u32 ggml type, u64 offset); padding to ``general.alignment``; tensor data at data_start + offset.
A string is a u64 byte length plus UTF-8 bytes; an array is u32 element type, u64 count, elements.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES

from dlmnumba.errors import ModelFormatError
from dlmnumba.gguf.quants import I2_S, tensor_nbytes as ternary_nbytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Arrays nested deeper than this are refused: real files nest at most once (llama.cpp's reader
# refuses any nesting), and unbounded nesting would exhaust Python's recursion limit.
MAX_ARRAY_DEPTH = 8

# GGUF metadata value types -> struct format of one scalar; STRING (8) and ARRAY (9) are special.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_SCALAR_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                  10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# ggml types whose data ``array()`` can view as a numpy dtype; BF16 (30) has no numpy dtype, so
# it comes back as its raw uint16 bit patterns.
_ARRAY_DTYPES = {0: "<f4", 1: "<f2", 30: "<u2", 24: "<i1", 25: "<i2", 26: "<i4", 27: "<i8",
                 28: "<f8"}

MISSING: Any = object()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a GGUF file and how it is shaped."""

    name: str
    shape: tuple[int, ...]  # numpy (row-major) order: reversed ne, the last dim is contiguous
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous dim
    qtype: int  # ggml type id (GGMLQuantizationType value; 36 = I2_S)
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        """Number of logical elements."""
        return math.prod(self.ne)


class _Cursor:
    """Sequential little-endian reads from a buffer; running past its end raises ModelFormatError."""

    def __init__(self, buf: mmap.mmap, path: str, pos: int = 0) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, pos, len(buf)
        self.where = "header"  # what is being parsed, for error messages

    def need(self, n: int) -> None:
        """Fail with a 'truncated' error unless n more bytes are available."""
        if self.pos + n > self.size:
            raise ModelFormatError(
                f"{self.path}: truncated GGUF file: reading {self.where} needs bytes up to "
                f"offset {self.pos + n}, but the file has only {self.size} bytes")

    def scalar(self, fmt: str) -> Any:
        """Read one struct-packed value."""
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self) -> int:
        """Read a uint32."""
        return self.scalar("<I")

    def u64(self) -> int:
        """Read a uint64."""
        return self.scalar("<Q")

    def count(self, what: str, min_item_bytes: int) -> int:
        """Read a u64 count, rejecting counts the rest of the file cannot possibly hold."""
        n = self.u64()
        if n * min_item_bytes > self.size - self.pos:
            raise ModelFormatError(
                f"{self.path}: truncated or corrupt GGUF file: {self.where} declares {n} {what}, "
                f"which cannot fit in the {self.size - self.pos} bytes left after offset {self.pos}")
        return n

    def string(self) -> str:
        """Read a u64-length-prefixed UTF-8 string."""
        n = self.count("string bytes", 1)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelFormatError(f"{self.path}: {self.where}: string at offset {self.pos - n} is "
                                   f"not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def value(self, vtype: int, depth: int = 0) -> Any:
        """Read one metadata value of GGUF value type vtype (depth: arrays around it)."""
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is not None:
            return self.scalar(fmt)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array(depth)
        raise ModelFormatError(f"{self.path}: {self.where}: unknown GGUF value type {vtype} at "
                               f"offset {self.pos - 4}; expected 0..12")

    def array(self, depth: int = 0) -> Any:
        """Read an array: numbers -> numpy array (copied), strings -> list[str], arrays -> list."""
        if depth >= MAX_ARRAY_DEPTH:
            raise ModelFormatError(f"{self.path}: {self.where}: arrays nested more than "
                                   f"{MAX_ARRAY_DEPTH} deep at offset {self.pos - 4}; expected "
                                   "at most one level of nesting")
        etype = self.u32()
        dtype = _SCALAR_DTYPES.get(etype)
        if dtype is not None:
            itemsize = np.dtype(dtype).itemsize
            n = self.count("array elements", itemsize)
            # Copy: metadata is small and must not pin the mapping after close().
            out = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
            self.pos += n * itemsize
            return out
        if etype == _STRING:
            return [self.string() for _ in range(self.count("strings", 8))]
        if etype == _ARRAY:
            return [self.array(depth + 1) for _ in range(self.count("nested arrays", 12))]
        raise ModelFormatError(f"{self.path}: {self.where}: unknown GGUF array element type "
                               f"{etype} at offset {self.pos - 4}; expected 0..12")


def _tensor_nbytes(path: str, name: str, ne: tuple[int, ...], qtype: int) -> int:
    """Size of a tensor's data from its ggml type; unknown types are a format error."""
    n = math.prod(ne)  # Python ints: corrupt dims must not overflow into a small size
    if qtype == I2_S:  # bitnet.cpp's type, unknown to the gguf package
        try:
            return ternary_nbytes(qtype, n)
        except ValueError as e:
            raise ModelFormatError(f"{path}: tensor {name!r} with ne {ne}: {e}") from None
    sizes = GGML_QUANT_SIZES.get(qtype)
    if sizes is None:
        raise ModelFormatError(f"{path}: tensor {name!r} has unknown ggml type {qtype}; expected a "
                               "type known to the gguf package or 36 (I2_S)")
    block, type_size = sizes
    if ne and ne[0] % block:
        raise ModelFormatError(f"{path}: tensor {name!r} has ne[0] = {ne[0]}, not a multiple of "
                               f"the block size {block} of its ggml type {qtype}")
    return n // block * type_size


class GGUFFile:
    """A GGUF file opened read-only: metadata, tensor infos, and zero-copy views of tensor data."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mmap = self._open(self.path)
        # One uint8 view of the whole mapping; every tensor view is a slice of it (no copies).
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)
        self._parse()

    @staticmethod
    def _open(path: str) -> mmap.mmap:
        """Map the file read-only, turning OS errors into ModelFormatError."""
        if os.path.isdir(path):
            raise ModelFormatError(f"{path}: is a directory; expected a GGUF model file")
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < len(GGUF_MAGIC):
                    raise ModelFormatError(f"{path}: not a GGUF file: only {size} bytes, expected "
                                           f"the magic {GGUF_MAGIC!r}")
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: file not found; expected a GGUF model file") from None
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot open: {e.strerror or e}") from None

    def _parse(self) -> None:
        """Read header, metadata and tensor infos; size and bounds-check every tensor."""
        magic = bytes(self._mmap[:4])
        if magic != GGUF_MAGIC:
            raise ModelFormatError(f"{self.path}: not a GGUF file: starts with {magic!r}, "
                                   f"expected {GGUF_MAGIC!r}")
        cur = _Cursor(self._mmap, self.path, pos=len(GGUF_MAGIC))
        self.version = cur.u32()
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian GGUF?)" if self.version & 0xFFFF == 0 else ""
            raise ModelFormatError(f"{self.path}: unsupported GGUF version {self.version}{hint}; "
                                   f"expected one of {SUPPORTED_VERSIONS}")
        n_tensors = cur.count("tensors", 24)  # name length + n_dims + type + offset, at least
        n_kv = cur.count("metadata keys", 12)  # key length + value type, at least

        for i in range(n_kv):
            cur.where = f"metadata key #{i}"
            key = cur.string()
            cur.where = f"metadata key {key!r}"
            if key in self.metadata:
                raise ModelFormatError(f"{self.path}: duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(cur.u32())

        infos = []
        for i in range(n_tensors):
            cur.where = f"tensor info #{i}"
            name = cur.string()
            cur.where = f"tensor info {name!r}"
            n_dims = cur.u32()
            if n_dims > MAX_DIMS:
                raise ModelFormatError(f"{self.path}: tensor {name!r} has {n_dims} dims; expected "
                                       f"at most {MAX_DIMS}")
            ne = tuple(cur.u64() for _ in range(n_dims))
            infos.append((name, ne, cur.u32(), cur.u64()))

        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
            raise ModelFormatError(f"{self.path}: metadata key 'general.alignment' is {align!r}; "
                                   "expected a positive power of two")
        self.alignment = align
        self.data_start = -(-cur.pos // align) * align

        size = len(self._mmap)
        for name, ne, qtype, rel in infos:
            if name in self.tensors:
                raise ModelFormatError(f"{self.path}: duplicate tensor name {name!r}")
            if rel % align:
                raise ModelFormatError(f"{self.path}: tensor {name!r} data offset {rel} is not a "
                                       f"multiple of the alignment {align}")
            nbytes = _tensor_nbytes(self.path, name, ne, qtype)
            start = self.data_start + rel
            if start + nbytes > size:
                raise ModelFormatError(
                    f"{self.path}: truncated GGUF file: tensor {name!r} data needs bytes up to "
                    f"offset {start + nbytes}, but the file has only {size} bytes")
            self.tensors[name] = TensorInfo(name, ne[::-1], ne, qtype, start, nbytes)

    def get(self, key: str, default: Any = MISSING) -> Any:
        """Metadata value for key; without a default, a missing key is a ModelFormatError."""
        if key in self.metadata:
            return self.metadata[key]
        if default is MISSING:
            raise ModelFormatError(f"{self.path}: metadata key {key!r} is missing")
        return default

    def tensor(self, name: str) -> TensorInfo:
        """TensorInfo for name; a missing tensor is a ModelFormatError."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing")
        return info

    def data(self, name: str) -> np.ndarray:
        """The tensor's raw bytes as a read-only uint8 view into the mapping (no copy)."""
        info = self.tensor(name)
        return self._bytes[info.offset:info.offset + info.nbytes]

    def array(self, name: str) -> np.ndarray:
        """F32/F16/BF16/F64/I8..I64 tensor as a typed read-only view shaped like info.shape.

        BF16 comes back as uint16 bit patterns (numpy has no bfloat16).
        """
        info = self.tensor(name)
        dtype = _ARRAY_DTYPES.get(info.qtype)
        if dtype is None:
            raise ModelFormatError(f"{self.path}: tensor {name!r} has ggml type {info.qtype}; "
                                   f"expected a plain type {sorted(_ARRAY_DTYPES)} for array()")
        return self.data(name).view(dtype).reshape(info.shape)

    def release(self, name: str) -> None:
        """Tell the OS a tensor's pages are not needed any more (after repacking it): they
        leave the resident set and are read again from the file only if touched."""
        info = self.tensor(name)
        page = mmap.PAGESIZE
        start = info.offset // page * page
        end = (info.offset + info.nbytes) // page * page  # whole pages inside the tensor only
        if end > start and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Drop the mapping; it stays alive while views handed out still reference it."""
        self._bytes = np.empty(0, np.uint8)
        try:
            self._mmap.close()
        except BufferError:
            pass  # views are still exported; the OS unmaps when the last one is collected

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"
