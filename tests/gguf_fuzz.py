"""GGUF fuzzing: a seeded mutator over the structure of a GGUF file (gguf_doc.Doc) and a
runner that loads each mutant in a forked child under time and memory limits.

A mutant gets 1-3 structural edits (metadata values and types, nesting, array lengths and
declared counts, tensor shapes, types, names, offsets and values), is written either
consistently (`relayout`: it passes the reader's bounds checks and reaches the spec and weight
checks) or over the original data and offsets, and is then sometimes damaged byte-wise (flips,
cuts).  Case i of run `seed` is a pure function of (seed, i), so any finding can be replayed.

Used by tests/test_fuzz_gguf.py (a short seeded run) and scripts/fuzz_gguf.py (the long run).
Linux only (fork, /proc, RLIMIT_AS).
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import random
import resource
import select
import signal
import time
import traceback
import warnings
from typing import Any, Callable

import numpy as np

from gguf_doc import (ARRAY, INT_RANGE, NUMPY_OF, STRING, Arr, Doc, KV, Nested, TInfo, set_kv,
                      write)

# --- mutations ------------------------------------------------------------------------------

EDGE_INTS = [0, 1, 2, 3, -1, 255, 2**15, 2**16, 2**24, 2**31 - 1, 2**31, 2**32 - 1, 2**40,
             2**63 - 1, 2**64 - 1, -2**31, -2**63]
EDGE_FLOATS = [0.0, -1.0, 1e-30, 1e30, 3.4e38, math.inf, -math.inf, math.nan]
NONFINITE = [math.inf, -math.inf, math.nan, 6.6e4, 3.4e38]
TYPE_IDS = [0, 1, 8, 14, 30, 34, 35, 36, 2, 3, 12, 24, 28, 31, 39, 41, 255, 2**31]
HPARAMS = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
           "attention.head_count_kv", "rope.dimension_count", "context_length", "vocab_size",
           "rope.freq_base", "attention.layer_norm_rms_epsilon", "hidden_activation"]
TOKENIZER_KEYS = ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                  "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                  "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                  "tokenizer.ggml.mask_token_id", "tokenizer.ggml.add_bos_token"]
OTHER_KEYS = ["general.alignment", "general.architecture", "diffusion.shift_logits"]


def _int_vtype(rng: random.Random, v: int, keep: int | None) -> tuple[int, int]:
    """(value, integer type that holds it): the old type when it fits, half the time."""
    v = v % 2**64 if not -2**63 <= v < 2**64 else v
    fits = [t for t, (lo, hi) in INT_RANGE.items() if lo <= v <= hi]
    return v, keep if keep in fits and rng.random() < 0.5 else rng.choice(fits)


def _as_int(value: Any) -> int:
    """An integer standing for value, within the range of the GGUF integer types."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return min(max(int(value), -2**63), 2**64 - 1)
    if isinstance(value, Arr):
        return len(value.items)
    return len(value) if isinstance(value, bytes) else 1


def _pick_key(doc: Doc, rng: random.Random) -> str:
    if doc.kvs and rng.random() < 0.5:
        return rng.choice(doc.kvs).key.decode("utf-8", "replace")
    group = rng.choice([HPARAMS, TOKENIZER_KEYS, OTHER_KEYS])
    key = rng.choice(group)
    return f"{doc.arch}.{key}" if group is HPARAMS else key


def m_int_edge(doc: Doc, rng: random.Random) -> str:
    key = _pick_key(doc, rng)
    kv = doc.get(key)
    old = _as_int(kv.value) if kv else 1
    v = rng.choice(EDGE_INTS + [old * 2, old + 1, old - 1, old // 2, rng.randrange(-9, 5000)])
    v, vt = _int_vtype(rng, v, kv.vtype if kv else None)
    set_kv(doc, key, vt, v)
    return f"int {key}={v} (type {vt})"


def m_float_edge(doc: Doc, rng: random.Random) -> str:
    key = _pick_key(doc, rng)
    v = rng.choice(EDGE_FLOATS)
    vt = rng.choice([6, 12])
    set_kv(doc, key, vt, v)
    return f"float {key}={v} (type {vt})"


def m_retype(doc: Doc, rng: random.Random) -> str:
    """Store a value as another type: a scalar as an array, an array as a scalar, and so on."""
    key = _pick_key(doc, rng)
    kv = doc.get(key)
    value = kv.value if kv else 7
    iv = _as_int(value)
    choice = rng.randrange(8)
    if choice == 0:  # one-element array (item 4)
        et = rng.choice([4, 5, 10, 6])
        new = (ARRAY, Arr(et, np.array([iv if et != 6 else float(iv)]).astype(NUMPY_OF[et],
                                                                               casting="unsafe")))
    elif choice == 1:  # empty array
        new = (ARRAY, Arr(STRING, []) if rng.random() < 0.5 else Arr(4, np.array([], "<u4")))
    elif choice == 2:
        new = (STRING, str(iv).encode() if rng.random() < 0.5 else bytes([0xff, 0xfe, 0x41]))
    elif choice == 3:
        new = (rng.choice([6, 12]), float(iv))
    elif choice == 4:
        new = (7, bool(iv))
    elif choice == 5 and isinstance(value, Arr):  # array of another element type
        n = len(value.items)
        if value.etype in NUMPY_OF:
            new = (ARRAY, Arr(STRING, [str(x).encode() for x in value.items[:n]]))
        else:
            new = (ARRAY, Arr(rng.choice([0, 4, 5, 6, 11]), np.arange(n) % 7))
    elif choice == 6:  # array of arrays
        inner = value if isinstance(value, Arr) else Arr(4, np.array([iv & 0xFFFFFFFF], "<u4"))
        new = (ARRAY, Arr(ARRAY, [inner, inner]))
    else:
        new = (rng.choice([13, 99, 2**31]), iv)  # unknown value type
    set_kv(doc, key, *new)
    return f"retype {key} -> type {new[0]}"


def m_nest(doc: Doc, rng: random.Random) -> str:
    """Wrap a value in arrays (item 3)."""
    key = _pick_key(doc, rng)
    kv = doc.get(key)
    depth = rng.choice([1, 2, 3, 8, 9, 50, 500, 5000])
    vtype, value = (kv.vtype, kv.value) if kv else (4, 512)
    if isinstance(value, Nested):
        depth, vtype, value = depth + value.depth, value.vtype, value.value
    set_kv(doc, key, ARRAY, Nested(depth, vtype, value))
    return f"nest {key} depth {depth}"


def m_array_len(doc: Doc, rng: random.Random) -> str:
    """Shorten or lengthen an array, or make its declared count lie (item 2)."""
    arrays = [kv for kv in doc.kvs if isinstance(kv.value, Arr)]
    if not arrays:
        return "no arrays"
    kv = rng.choice(arrays)
    a = copy.copy(kv.value)
    n = len(a.items)
    r = rng.randrange(4)
    if r == 0:
        k = rng.choice([0, 1, n // 2, max(0, n - 1)])
        a.items = a.items[:k]
        what = f"truncated to {k}"
    elif r == 1:
        extra = a.items[-1:] * rng.choice([1, 5]) if n else []
        a.items = (np.concatenate([a.items, np.repeat(a.items[-1:], 3)])
                   if isinstance(a.items, np.ndarray) else list(a.items) + extra)
        what = "extended"
    else:
        a.count = rng.choice([n + 1, n - 1 if n else 0, 2**32, 2**62, 2**64 - 1])
        what = f"count declared {a.count}"
    doc.kvs[doc.kvs.index(kv)] = KV(kv.key, kv.vtype, a)
    return f"array {kv.key.decode(errors='replace')} {what}"


def m_array_items(doc: Doc, rng: random.Random) -> str:
    """Damage array entries: bad UTF-8 or duplicate tokens, odd token types, broken merges."""
    arrays = [kv for kv in doc.kvs if isinstance(kv.value, Arr) and len(kv.value.items)]
    if not arrays:
        return "no arrays"
    kv = rng.choice(arrays)
    a = copy.copy(kv.value)
    items = a.items.copy() if isinstance(a.items, np.ndarray) else list(a.items)
    for _ in range(rng.choice([1, 3, 50])):
        i = rng.randrange(len(items))
        if isinstance(items, np.ndarray):
            lo, hi = INT_RANGE.get(a.etype, (0, 1))
            items[i] = rng.choice([lo, hi, 0, 6, 7, 1]) if a.etype not in (6, 12) else math.nan
        elif a.etype == STRING:
            items[i] = rng.choice([b"", b"\xff\xfe", items[rng.randrange(len(items))],
                                   b"a b c", b"|<MASK>|", b"<|eot_id|>", bytes(300)])
    a.items = items
    doc.kvs[doc.kvs.index(kv)] = KV(kv.key, kv.vtype, a)
    return f"items {kv.key.decode(errors='replace')}"


def m_kv_drop_dup(doc: Doc, rng: random.Random) -> str:
    if not doc.kvs:
        return "no kvs"
    i = rng.randrange(len(doc.kvs))
    if rng.random() < 0.7:
        return f"drop key {doc.kvs.pop(i).key.decode(errors='replace')}"
    doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), doc.kvs[i])
    return f"duplicate key {doc.kvs[i].key.decode(errors='replace')}"


def _pick_tensor(doc: Doc, rng: random.Random, pred: Callable[[TInfo], bool] = lambda t: True):
    cands = [i for i, t in enumerate(doc.tensors) if pred(t)]
    return rng.choice(cands) if cands else None


def m_shape(doc: Doc, rng: random.Random) -> str:
    """Odd tensor shapes (data resized to match when written with relayout)."""
    i = _pick_tensor(doc, rng)
    if i is None:
        return "no tensors"
    t = copy.copy(doc.tensors[i])
    ne = list(t.ne)
    r = rng.randrange(6)
    if r == 0 and len(ne) > 1:
        ne.reverse()
    elif r == 1:
        ne[rng.randrange(len(ne))] = rng.choice([0, 1, 2**31, 2**40, 2**63])
    elif r == 2 and len(ne) < 5:
        ne.append(rng.choice([1, 2, 0]))
    elif r == 3 and ne:
        ne.pop()
    elif r == 4:
        ne[0] = ne[0] * rng.choice([2, 3]) // 2 or 256
    else:
        ne = [rng.choice([0, 1, 4, 256, 512])] * rng.choice([1, 2])
    t.ne = ne
    doc.tensors[i] = t
    return f"shape {t.name.decode(errors='replace')} ne {ne}"


def m_type(doc: Doc, rng: random.Random) -> str:
    """Flip a tensor's type id: the data is reinterpreted (and resized with relayout)."""
    i = _pick_tensor(doc, rng)
    if i is None:
        return "no tensors"
    t = copy.copy(doc.tensors[i])
    t.qtype = rng.choice(TYPE_IDS + [t.qtype ^ (1 << rng.randrange(6))])
    doc.tensors[i] = t
    return f"type {t.name.decode(errors='replace')} -> {t.qtype}"


def m_tensor_set(doc: Doc, rng: random.Random) -> str:
    """Drop, duplicate or rename a tensor; add `.scale` tensors of odd shapes (item 5)."""
    r = rng.randrange(4)
    i = _pick_tensor(doc, rng)
    if i is None:
        return "no tensors"
    if r == 0:
        return f"drop tensor {doc.tensors.pop(i).name.decode(errors='replace')}"
    if r == 1:
        doc.tensors.append(doc.tensors[i])
        return f"duplicate tensor {doc.tensors[i].name.decode(errors='replace')}"
    if r == 2:
        t = copy.copy(doc.tensors[i])
        t.name = rng.choice([b"blk.99.attn_q.weight", b"output.weight", b"rope_freqs.weight",
                             b"blk.0.attn_q.weight", b"token_embd.weight", b"\xff\xfe", b""])
        doc.tensors[i] = t
        return f"rename tensor -> {t.name!r}"
    proj = rng.choice(["attn_q", "attn_k", "ffn_down", "attn_output"])
    ne = rng.choice([[1], [4], [0], [192, 274], [1, 1]])
    qtype = rng.choice([0, 0, 1, 30, 8, 36])
    val = rng.choice([1.5, 0.0] + NONFINITE)
    data = np.full(math.prod(ne), val, np.float32 if qtype == 0 else np.float16).tobytes()
    doc.tensors.append(TInfo(f"blk.0.{proj}.scale".encode(), ne, qtype, 0, data))
    return f"add blk.0.{proj}.scale ne {ne} type {qtype} value {val}"


def m_values(doc: Doc, rng: random.Random) -> str:
    """Non-finite or huge values in a float tensor (norms, embedding), or random bytes (item 6)."""
    i = _pick_tensor(doc, rng, lambda t: t.qtype in (0, 1, 30) and len(t.data) >= 4)
    if i is None or rng.random() < 0.2:
        i = _pick_tensor(doc, rng, lambda t: len(t.data) > 0)
        if i is None:
            return "no data"
        t = copy.copy(doc.tensors[i])
        b = bytearray(t.data)
        for _ in range(rng.choice([1, 8, 64])):
            b[rng.randrange(len(b))] = rng.randrange(256)
        t.data = bytes(b)
        doc.tensors[i] = t
        return f"random bytes in {t.name.decode(errors='replace')}"
    t = copy.copy(doc.tensors[i])
    dt = {0: np.float32, 1: np.float16, 30: np.uint16}[t.qtype]
    a = np.frombuffer(t.data, dt).copy()
    val = rng.choice(NONFINITE)
    idx = rng.randrange(len(a)) if rng.random() < 0.8 else slice(None)
    if t.qtype == 30:
        a[idx] = (np.array(val, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    else:
        a[idx] = np.array(val).astype(dt)
    t.data = a.tobytes()
    doc.tensors[i] = t
    return f"value {val} in {t.name.decode(errors='replace')}"


def m_offset(doc: Doc, rng: random.Random) -> str:
    i = _pick_tensor(doc, rng)
    if i is None:
        return "no tensors"
    t = copy.copy(doc.tensors[i])
    t.offset = rng.choice([t.offset + 1, t.offset + 32, 0, 2**40, 2**64 - 32,
                           doc.tensors[rng.randrange(len(doc.tensors))].offset])
    doc.tensors[i] = t
    return f"offset {t.name.decode(errors='replace')} = {t.offset}"


def m_counts(doc: Doc, rng: random.Random) -> str:
    r = rng.randrange(3)
    if r == 0:
        doc.n_tensors = rng.choice([len(doc.tensors) + 1, max(0, len(doc.tensors) - 1), 2**40])
        return f"n_tensors declared {doc.n_tensors}"
    if r == 1:
        doc.n_kv = rng.choice([len(doc.kvs) + 1, max(0, len(doc.kvs) - 1), 2**63])
        return f"n_kv declared {doc.n_kv}"
    doc.version = rng.choice([1, 2, 4, 0x03000000])
    return f"version {doc.version}"


STRUCTURAL = [m_int_edge, m_float_edge, m_retype, m_nest, m_array_len, m_array_items,
              m_kv_drop_dup, m_shape, m_type, m_tensor_set, m_values, m_offset, m_counts]
# Relative frequencies: the metadata and tensor-info ops that reach the deepest checks first.
WEIGHTS = [4, 1, 3, 1, 2, 2, 1, 3, 2, 2, 3, 1, 1]


def mutate(doc: Doc, rng: random.Random) -> tuple[bytes, list[str]]:
    """One mutant of doc (left unchanged): 1-3 structural edits, then maybe byte damage."""
    doc = copy.copy(doc)
    doc.kvs, doc.tensors = list(doc.kvs), list(doc.tensors)
    with np.errstate(all="ignore"):  # overflow to inf in casts is the point of some edits
        notes = [op(doc, rng)
                 for op in rng.choices(STRUCTURAL, WEIGHTS, k=rng.choice([1, 1, 2, 3]))]
    relayout = rng.random() < 0.85
    raw = bytearray(write(doc, relayout))
    if not relayout:
        notes.append("original offsets")
    r = rng.random()
    if r < 0.15:  # byte flips, mostly in the header where they matter
        head = len(raw) - len(doc.blob) if not relayout else min(len(raw), 1 << 16)
        for _ in range(rng.choice([1, 2, 4, 16])):
            p = rng.randrange(head if rng.random() < 0.8 else len(raw))
            raw[p] ^= 1 << rng.randrange(8)
        notes.append("byte flips")
    elif r < 0.22:
        cut = rng.randrange(len(raw))
        del raw[cut:]
        notes.append(f"truncated at {cut}")
    return bytes(raw), notes


# --- running one case -----------------------------------------------------------------------

PROMPTS = ["Once upon a time", "", "The 3 cats <|eot_id|> sat.", "|<MASK>|", "a\udcffb",
           "\ud800", "héllo wörld ✓ 日本", "x" * 300]


def use_model(path: str, prompt: str, forward: bool, stage: list[str]) -> dict:
    """Use the file as a user would: model, tokenizer, encode/decode, one tiny forward pass;
    stage[0] says how far it got."""
    import dlmnumba
    from dlmnumba.errors import DlmError

    m = dlmnumba.load_model(path, threads=1)
    stage[0] = "tokenizer"
    first = m.spec.bos_id if m.spec.bos_id is not None else 0
    try:
        tok = m.tokenizer
    except DlmError as e:  # a model without a usable tokenizer still runs token ids
        tok, tok_error = None, e
    else:
        tok_error = None
    if tok is not None:
        stage[0] = "encode"
        try:
            ids = tok.encode(prompt)
        except ValueError:
            if _valid_text(prompt):
                raise  # only text that is not valid Unicode may be refused
            ids = []
        tok.decode(ids)
        first = ids[0] if ids else first
    finite = True
    if forward:
        stage[0] = "forward"
        finite = bool(np.isfinite(m.logits([first])).all())
    if tok_error is not None:
        stage[0] = "tokenizer"
        raise tok_error
    return {"outcome": "ok", "finite_logits": finite}


def exercise(path: str, prompt: str, forward: bool) -> dict:
    """Run use_model and classify: ok, rejected (our own DlmError, the expected way to refuse
    a file) or exception (anything else: a finding), with the stage and where it was raised."""
    from dlmnumba.errors import DlmError

    stage = ["load"]
    try:
        return use_model(path, prompt, forward, stage)
    except DlmError as e:
        return {"outcome": "rejected", "stage": stage[0], "type": type(e).__name__,
                "msg": str(e)[:300], "names_file": os.path.basename(path) in str(e)}
    except Exception as e:  # noqa: BLE001 - every other exception is a finding
        tb = traceback.extract_tb(e.__traceback__)
        ours = [f for f in tb if "dlmnumba" in f.filename] or tb
        where = f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno} {ours[-1].name}" \
            if ours else "?"
        return {"outcome": "exception", "stage": stage[0], "type": type(e).__name__,
                "msg": str(e)[:300], "where": where}


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _case_path(tmpdir: str, index: int) -> str:
    return os.path.join(tmpdir, f"case-{index}.gguf")


def _child(docs: list[Doc], bases: list[str], seed: int, indices: range, forward_every: int,
           mem_limit: int, tmpdir: str, out: int) -> None:
    """Run cases in this (forked) process, one JSON line per case on `out`."""
    for base in bases:  # fault in the code paths once, so peaks measure the case, not the fork
        exercise(base, PROMPTS[0], True)
    gc.freeze()  # the inherited heap is never garbage: keep gc.collect() per case cheap
    os.write(out, b'{"ready": true}\n')  # the parent's per-case clock starts now
    for index in indices:
        try:
            raw, prompt, forward, _ = case(docs, seed, index, forward_every)
        except Exception as e:  # noqa: BLE001 - a bug of the mutator, not of the library
            os.write(out, (json.dumps({"outcome": "harness", "type": type(e).__name__,
                                       "msg": str(e)[:300], "index": index, "size": 0,
                                       "peak": 0}) + "\n").encode())
            continue
        gc.collect()  # the last case's model (and its mapping) goes before the next is loaded
        path = _case_path(tmpdir, index)  # a fresh file: old mappings stay valid
        with open(path, "wb") as f:
            f.write(raw)
        vm = _status_kb("VmSize") * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + mem_limit, resource.RLIM_INFINITY))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        rss0 = _status_kb("VmRSS")
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = exercise(path, prompt, forward)
        rep.update(index=index, wall=time.perf_counter() - t0, size=len(raw),
                   peak=max(0, _status_kb("VmHWM") - rss0) * 1024)
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        if rep.get("type") == "MemoryError":
            rep["outcome"] = "memory"
        if caught:
            rep["warning"] = f"{caught[0].category.__name__}: {caught[0].message}"[:200]
        os.unlink(path)
        os.write(out, (json.dumps(rep) + "\n").encode())


def run_cases(docs: list[Doc], bases: list[str], seed: int, indices: range, *,
              timeout: float = 10.0, mem_limit: int = 1 << 30, batch: int = 100,
              forward_every: int = 1, tmpdir: str = "/tmp",
              on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Run cases `indices` of run `seed` in forked children, `batch` cases per child.

    A case that runs past `timeout` seconds is a hang (its child is killed, the next child
    resumes after it); one that dies is a crash; a child may add at most `mem_limit` bytes of
    address space per case (RLIMIT_AS). Each result carries the case index, its outcome, wall
    time and the peak resident growth while it ran (`peak`, bytes). The parent must not have
    used GNU OpenMP (set NUMBA_THREADING_LAYER=workqueue before importing numba)."""
    results: list[dict] = []
    todo = list(indices)
    while todo:
        chunk = todo[:batch]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                _child(docs, bases, seed, chunk, forward_every, mem_limit, tmpdir, w)
            except BaseException:  # noqa: BLE001 - a harness failure; the parent reports it
                traceback.print_exc()
                code = 3
            finally:
                os._exit(code)
        os.close(w)
        done, buf, hung = 0, b"", False
        deadline = time.perf_counter() + timeout + 60  # the child's warm-up comes first
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                hung = True
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            data = os.read(r, 1 << 16)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                rep = json.loads(line)
                deadline = time.perf_counter() + timeout
                if rep.get("ready"):
                    continue
                rep["ratio"] = rep["peak"] / max(1, rep["size"])
                results.append(rep)
                if on_result:
                    on_result(rep)
                done += 1
        if hung:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(r)
        if done < len(chunk):  # the case in progress hung or killed its child
            if hung:
                rep = {"outcome": "hang"}
            elif os.WIFSIGNALED(status):
                rep = {"outcome": "crash", "type": f"signal {os.WTERMSIG(status)}"}
            else:
                rep = {"outcome": "crash", "type": f"exit {os.WEXITSTATUS(status)}"}
            rep.update(index=chunk[done], ratio=0.0)
            if os.path.exists(_case_path(tmpdir, chunk[done])):
                os.unlink(_case_path(tmpdir, chunk[done]))
            results.append(rep)
            if on_result:
                on_result(rep)
            done += 1
        todo = todo[done:]
    return results


def is_finding(rep: dict) -> bool:
    """A failure: anything but a clean load or one of our own errors (a "harness" outcome,
    a bug of the mutator, counts too, so that it cannot hide cases)."""
    return rep["outcome"] not in ("ok", "rejected")


def case(docs: list[Doc], seed: int, index: int,
         forward_every: int = 1) -> tuple[bytes, str, bool, str]:
    """Case `index` of run `seed` (base docs[index % len(docs)]): (file bytes, prompt, run the
    forward pass?, description)."""
    rng = random.Random(f"{seed}:{index}")
    raw, notes = mutate(docs[index % len(docs)], rng)
    prompt = rng.choice(PROMPTS)
    return raw, prompt, index % forward_every == 0, "; ".join(notes) + f"; prompt {prompt!r}"
