"""Test helper: copy a GGUF file with edits (the `gguf` package reads and writes; types kept)."""
from __future__ import annotations

import gguf
import numpy as np

_VTYPES = ((bool, gguf.GGUFValueType.BOOL), (int, gguf.GGUFValueType.UINT32),
           (float, gguf.GGUFValueType.FLOAT32), (str, gguf.GGUFValueType.STRING))


def rewrite(src, dst, drop=(), metadata=None, tensors=None, extra=None, raw_types=None) -> str:
    """Copy src to dst: tensors in `drop` left out, `tensors` replaced (raw bytes when
    `raw_types` names their GGML type), `extra` appended; `metadata` overrides keys, a value of
    None removes the key.  Tensors are copied byte for byte; metadata keeps its types."""
    r = gguf.GGUFReader(str(src))
    md = metadata or {}
    arch = md.get("general.architecture", r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in md and md[key] is None:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, md.get(key, f.contents()), f.types[0], sub_type=sub)
    for key, val in md.items():
        if key not in r.fields and key != "general.architecture" and val is not None:
            vtype = next(t for kind, t in _VTYPES if isinstance(val, kind))
            w.add_key_value(key, val, vtype)
    for t in r.tensors:
        if t.name in drop:
            continue
        if tensors and t.name in tensors:
            raw = (raw_types or {}).get(t.name)
            w.add_tensor(t.name, tensors[t.name], raw_dtype=raw)
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, np.array(t.data))
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)
