"""An editable structural model of a GGUF file, parsed and written independently of
dlmnumba's reader: `write(parse(raw), relayout=False) == raw` for any well-formed file.

`write` can also produce what no writer library would: wrong declared counts, arrays nested
thousands deep (`Nested`), unknown value types, tensor infos whose sizes disagree with the data.
With `relayout` every tensor's data is resized to its (possibly edited) shape and type and the
offsets are recomputed, so an edited file still passes the reader's bounds checks.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES

STRING, ARRAY = 8, 9
SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
              12: "d"}
NUMPY_OF = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}
INT_RANGE = {0: (0, 2**8 - 1), 1: (-2**7, 2**7 - 1), 2: (0, 2**16 - 1), 3: (-2**15, 2**15 - 1),
             4: (0, 2**32 - 1), 5: (-2**31, 2**31 - 1), 10: (0, 2**64 - 1), 11: (-2**63, 2**63 - 1)}
I2_S = 36


@dataclass
class Arr:
    """A GGUF array: numeric items as a numpy array, strings as bytes, nested arrays as Arr."""

    etype: int
    items: Any  # np.ndarray (numeric etype) or list[bytes] or list[Arr]
    count: int | None = None  # declared count when it should lie about len(items)


@dataclass
class Nested:
    """`value` of type `vtype` wrapped in `depth` one-element arrays (written without recursion)."""

    depth: int
    vtype: int
    value: Any


@dataclass
class KV:
    key: bytes
    vtype: int
    value: Any  # int / float / bool, bytes (STRING), Arr (ARRAY), Nested (ARRAY)


@dataclass
class TInfo:
    name: bytes
    ne: list[int]
    qtype: int
    offset: int  # relative to the data section
    data: bytes  # this tensor's bytes in the source file (empty when out of range)


@dataclass
class Doc:
    version: int
    kvs: list[KV]
    tensors: list[TInfo]
    blob: bytes  # the source's whole data section (for writes without relayout)
    n_tensors: int | None = None  # declared counts when they should lie
    n_kv: int | None = None

    def get(self, key: str) -> KV | None:
        k = key.encode()
        return next((kv for kv in self.kvs if kv.key == k), None)

    @property
    def arch(self) -> str:
        kv = self.get("general.architecture")
        return kv.value.decode("utf-8", "replace") if kv and isinstance(kv.value, bytes) else "?"


def nbytes_of(ne: list[int], qtype: int) -> int:
    """Bytes a tensor of this shape and type takes (a best guess for impossible combinations)."""
    n = math.prod(ne)
    if qtype == I2_S:
        return n // 4 + 32
    block, size = GGML_QUANT_SIZES.get(qtype, (1, 1))
    return n // block * size


def parse(raw: bytes) -> Doc:
    """Parse a well-formed GGUF file (v2/v3, little-endian) into a Doc."""
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> bytes:
        nonlocal pos
        n = take("Q")
        pos += n
        return raw[pos - n:pos]

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype in SCALAR_FMT:
            return take(SCALAR_FMT[vtype])
        if vtype == STRING:
            return string()
        etype, n = take("IQ")
        if etype in NUMPY_OF:
            items = np.frombuffer(raw, NUMPY_OF[etype], n, pos).copy()
            pos += items.nbytes
            return Arr(etype, items)
        return Arr(etype, [value(etype) for _ in range(n)])

    assert raw[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("IQQ")
    kvs = []
    for _ in range(n_kv):
        key = string()
        vtype = take("I")
        kvs.append(KV(key, vtype, value(vtype)))
    infos = []
    for _ in range(n_tensors):
        name = string()
        nd = take("I")
        ne = [take("Q") for _ in range(nd)]
        qtype, off = take("IQ")
        infos.append((name, ne, qtype, off))
    align = next((kv.value for kv in kvs if kv.key == b"general.alignment"), 32)
    start = -(-pos // align) * align
    blob = raw[start:]
    tensors = [TInfo(name, ne, qtype, off, blob[off:off + nbytes_of(ne, qtype)])
               for name, ne, qtype, off in infos]
    return Doc(version, kvs, tensors, blob)


def _pack(out: list[bytes], vtype: int, value: Any) -> None:
    if isinstance(value, Nested):
        out.append(struct.pack("<IQ", ARRAY, 1) * (value.depth - 1))
        out.append(struct.pack("<I", value.vtype))
        out.append(struct.pack("<Q", 1))
        _pack(out, value.vtype, value.value)
        return
    if vtype in SCALAR_FMT:
        out.append(struct.pack("<" + SCALAR_FMT[vtype], value))
    elif vtype == STRING:
        out.append(struct.pack("<Q", len(value)) + value)
    elif vtype == ARRAY:
        items = value.items
        out.append(struct.pack("<IQ", value.etype,
                               len(items) if value.count is None else value.count))
        if value.etype in NUMPY_OF:
            out.append(np.asarray(items).astype(NUMPY_OF[value.etype]).tobytes())
        else:
            for item in items:
                _pack(out, value.etype, item)
    else:  # an invalid type id: write a u32 as its "value"
        out.append(struct.pack("<I", int(value) & 0xFFFFFFFF if isinstance(value, int) else 0))


def write(doc: Doc, relayout: bool = True) -> bytes:
    """Serialize; relayout places each tensor's data (resized to its shape and type) anew."""
    out = [b"GGUF", struct.pack("<I", doc.version),
           struct.pack("<Q", len(doc.tensors) if doc.n_tensors is None else doc.n_tensors),
           struct.pack("<Q", len(doc.kvs) if doc.n_kv is None else doc.n_kv)]
    for kv in doc.kvs:
        out.append(struct.pack("<Q", len(kv.key)) + kv.key + struct.pack("<I", kv.vtype))
        _pack(out, kv.vtype, kv.value)
    align_kv = doc.get("general.alignment")
    align = align_kv.value if align_kv and isinstance(align_kv.value, int) else 32
    if not 0 < align <= 4096 or align & (align - 1):
        align = 32
    datas, offsets, off = [], [], 0
    for t in doc.tensors:
        if relayout:
            n = nbytes_of(t.ne, t.qtype)
            if n > 1 << 26:  # an absurd shape: keep the bytes we have and let the reader object
                n = len(t.data)
            data = t.data[:n] + bytes(max(0, n - len(t.data)))
            offsets.append(off)
            datas.append(data)
            off += -(-len(data) // align) * align
        else:
            offsets.append(t.offset)
    for t, o in zip(doc.tensors, offsets):
        out.append(struct.pack("<Q", len(t.name)) + t.name + struct.pack("<I", len(t.ne)))
        out.append(b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in t.ne))
        out.append(struct.pack("<IQ", t.qtype & 0xFFFFFFFF, o & (2**64 - 1)))
    head = b"".join(out)
    head += bytes(-len(head) % align)
    if not relayout:
        return head + doc.blob
    body = bytearray()
    for data in datas:
        body += data
        body += bytes(-len(body) % align)
    return head + bytes(body)


def set_kv(doc: Doc, key: str, vtype: int, value: Any) -> None:
    """Replace key's type and value in place, or append the key."""
    kv = doc.get(key)
    if kv is None:
        doc.kvs.append(KV(key.encode(), vtype, value))
    else:
        doc.kvs[doc.kvs.index(kv)] = KV(kv.key, vtype, value)
