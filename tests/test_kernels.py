"""Every kernel against a plain numpy reference; integer paths must be exactly equal.

The module is also run once more with NUMBA_DISABLE_JIT=1 (test_kernels_without_jit), so the
kernels' Python source is checked too and failures there show Python tracebacks.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from dlmnumba.kernels import attention as attn_k
from dlmnumba.kernels import ops
from dlmnumba.kernels.ternary import (pack_codes, padded_k, padded_n, ternary_matmul_kernel,
                                      unpack_weights)

NO_JIT = os.environ.get("NUMBA_DISABLE_JIT") == "1"
# shapes: odd K (padding), K crossing 128-blocks, several scale groups
SHAPES = [(1, 128, 5), (3, 200, 7), (5, 512, 16), (2, 768, 33)]


def ref_quantize(x):
    """BitNet absmax int8 per row, straight from reference.md."""
    s = (127.0 / np.maximum(np.abs(x).max(axis=1), 1e-5).astype(np.float32)).astype(np.float32)
    q = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.int64)
    return q, s


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_pack_roundtrip(m, k, n):
    rng = np.random.default_rng(k)
    codes = rng.integers(0, 3, (n, k), dtype=np.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (padded_n(n) // 16, padded_k(k) // 16, 64)
    assert np.array_equal(unpack_weights(packed, n, k), codes.astype(np.int8) - 1)
    # padding weights and rows are zero: unpacking the padded shape shows code 1 there
    full = unpack_weights(packed, padded_n(n), padded_k(k))
    assert np.all(full[:, k:] == 0) and np.all(full[n:] == 0)
    # the documented layout, bit by bit: W[16 b + col, 16 j + 4 s + i] at bits 2 s of
    # byte 4 col + i of chunk j of block b
    r, kk = n - 1, k - 1
    byte = packed[r // 16, kk // 16, 4 * (r % 16) + kk % 4]
    assert (byte >> (2 * (kk % 16 // 4))) & 3 == codes[r, kk]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_quantize_rows_exact(m, k, n):
    rng = np.random.default_rng(m * 1000 + k)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 50)).astype(np.float32)
    x[0, :3] = [0.5, -0.5, 1.5]  # exercise ties
    q = np.full((m + 3, padded_k(k)), 99, np.int8)  # 3 padding rows
    xs = np.empty(m, np.float32)
    qsum = np.full(m + 3, 99, np.int32)
    ops.quantize_rows(q, xs, qsum, x)
    qr, sr = ref_quantize(x)
    assert np.array_equal(q[:m, :k], qr)
    assert np.all(q[:m, k:] == 0) and np.all(q[m:] == 0)
    assert np.array_equal(qsum, np.concatenate([qr.sum(1), [0, 0, 0]]))
    assert np.array_equal(xs, sr)
    # an all-zero row uses the 1e-5 floor and quantizes to zeros
    z = np.zeros((1, k), np.float32)
    ops.quantize_rows(q[:1], xs[:1], qsum[:1], z)
    assert np.all(q[0] == 0) and xs[0] == np.float32(127.0) / np.float32(1e-5)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("grouped", [False, True])
def test_ternary_matmul_exact(m, k, n, grouped):
    rng = np.random.default_rng(n)
    if grouped:
        k = padded_k(max(k, 256) // 256 * 256)  # groups of 256 need K a multiple of 256
    codes = rng.integers(0, 3, (n, k), dtype=np.uint8)
    kp = padded_k(k)
    q = np.zeros((m, kp), np.int16)
    q[:, :k] = rng.integers(-128, 128, (m, k))
    xs = rng.uniform(0.5, 2.0, m).astype(np.float32)
    group = 256 if grouped else kp
    scales = rng.uniform(0.1, 1.0, (n, kp // group)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    ternary_matmul_kernel(out, q, xs, pack_codes(codes), scales, group)
    w = codes.astype(np.int64) - 1
    # integer dot per group, then the same float32 steps as the kernel
    acc = np.stack([q[:, g * group:(g + 1) * group][:, :k].astype(np.int64)
                    @ w[:, g * group:(g + 1) * group].T for g in range(kp // group)], axis=-1)
    y = np.zeros((m, n), np.float32)
    for g in range(kp // group):
        y += acc[:, :, g].astype(np.float32) * scales[None, :, g]
    np.testing.assert_allclose(out, y / xs[:, None], rtol=2e-6, atol=1e-6)
    # the integer part alone must be exact: unit scales and unit xs
    ternary_matmul_kernel(out, q, np.ones(m, np.float32), pack_codes(codes),
                          np.ones_like(scales), group)
    assert np.array_equal(out, acc.sum(-1).astype(np.float32))


def test_rmsnorm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 96).astype(np.float32)
    out = np.empty_like(x)
    ops.rmsnorm(out, x, w, 1e-5)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_rot", [16, 8])
def test_rope_neox(n_rot):
    rng = np.random.default_rng(2)
    m, h, d = 3, 2, 16
    x = rng.standard_normal((m, h, d)).astype(np.float32)
    pos = np.array([0, 7, 4000])
    cos, sin = ops.rope_tables(pos, n_rot, 500000.0)
    y = x.copy()
    ops.rope_neox(y, cos, sin)
    ref = x.astype(np.float64).copy()
    half = n_rot // 2
    for mi, p in enumerate(pos):
        for i in range(half):
            th = p * 500000.0 ** (-2 * i / n_rot)
            a, b = x[mi, :, i].astype(np.float64), x[mi, :, i + half].astype(np.float64)
            ref[mi, :, i] = a * np.cos(th) - b * np.sin(th)
            ref[mi, :, i + half] = a * np.sin(th) + b * np.cos(th)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert np.array_equal(y[..., n_rot:], x[..., n_rot:])  # partial rotary leaves the rest


def keys_t(kc, fill=0.0):
    """Keys [..., C, D] in the KV cache's layout: transposed [..., D, C16], C16 = C rounded up
    to the tiles' 16-key group (the extra slots hold `fill`)."""
    c, d = kc.shape[-2:]
    out = np.full(kc.shape[:-2] + (d, -(-c // 16) * 16), fill, np.float32)
    out[..., :c] = np.swapaxes(kc, -1, -2)
    return out


def ref_attention(q, k, v, kpos, qpos, block, open_from=-1):
    """Dense float64 attention; the mask written out per (query, key): causal, or block
    (bidirectional inside aligned blocks), and with open_from >= 0 a bidirectional tail (a
    query at or after open_from sees every key)."""
    m, h, d = q.shape
    grp = h // k.shape[0]
    out = np.zeros((m, h, d))
    for mi in range(m):
        for hi in range(h):
            if block:
                vis = kpos // block <= qpos[mi] // block
            else:
                vis = kpos <= qpos[mi]
            if 0 <= open_from <= qpos[mi]:
                vis = np.ones_like(vis)
            s = k[hi // grp] @ q[mi, hi] / np.sqrt(d)
            s = np.where(vis, s, -np.inf)
            p = np.exp(s - s.max())
            out[mi, hi] = (p / p.sum()) @ v[hi // grp]
    return out


@pytest.mark.parametrize("block", [0, 4])
def test_attention_masks(block):
    rng = np.random.default_rng(3)
    n_keys, m, h, hkv, d = 11, 5, 4, 2, 8
    kc = rng.standard_normal((hkv, 16, d)).astype(np.float32)
    vc = rng.standard_normal((hkv, 16, d)).astype(np.float32)
    kpos = np.zeros(16, np.int32)
    kpos[:n_keys] = np.arange(n_keys)
    qpos = np.arange(n_keys - m, n_keys).astype(np.int32)  # the batch is the last m slots
    q = rng.standard_normal((m, h, d)).astype(np.float32)
    out = np.empty_like(q)
    attn_k.attention(out, q, keys_t(kc), vc, kpos, n_keys, qpos, block, -1,
                     np.float32(1 / np.sqrt(d)))
    ref = ref_attention(q, kc[:, :n_keys], vc[:, :n_keys], kpos[:n_keys], qpos, block)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    if block:  # block mask differs from causal: the first query of a block sees later ones
        causal = ref_attention(q, kc[:, :n_keys], vc[:, :n_keys], kpos[:n_keys], qpos, 0)
        assert not np.allclose(causal, ref)


@pytest.mark.parametrize("m,h,hkv,d,prefix,block", [
    (65, 20, 5, 128, 20, 64),  # the 2B-4T block pass: 4-row x 64-column tiles, 16-key tails
    (40, 6, 2, 100, 90, 0),  # head_dim 100 (scalar value columns), 3 heads per KV head, causal
    (1, 8, 8, 32, 70, 0)])  # one query, no GQA: 1-row tiles; keys past the visible ones skipped
def test_attention_tiles(m, h, hkv, d, prefix, block):
    """The register-tiled paths (wide / narrow / scalar columns, 4-row and 1-row tiles, skipped
    invisible keys) against the float64 reference; cache slots past n_keys hold garbage that
    must not leak in."""
    rng = np.random.default_rng(m + d)
    n_keys = prefix + m
    cap = n_keys + 9
    kc = rng.standard_normal((hkv, cap, d)).astype(np.float32)
    vc = rng.standard_normal((hkv, cap, d)).astype(np.float32)
    kc[:, n_keys:], vc[:, n_keys:] = 1e30, np.nan
    kpos = np.full(cap, 10 ** 6, np.int32)
    kpos[:n_keys] = np.arange(n_keys)
    qpos = np.arange(prefix, n_keys).astype(np.int32)
    q = rng.standard_normal((m, h, d)).astype(np.float32)
    out = np.empty_like(q)
    attn_k.attention(out, q, keys_t(kc, 1e30), vc, kpos, n_keys, qpos, block, -1,
                     np.float32(1 / np.sqrt(d)))
    ref = ref_attention(q, kc[:, :n_keys], vc[:, :n_keys], kpos[:n_keys], qpos, block)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m,tail,hkv,d", [(9, 4, 2, 8), (20, 17, 5, 128), (3, 2, 1, 16)])
def test_attention_bidirectional_tail(m, tail, hkv, d):
    """The spec pass's mask: causal rows, then a tail of rows that see each other and every
    key before them; against the dense reference mask, through attention() and
    attention_many() (beside a plain causal sequence), and the causal rows before the tail
    bit-identical to the same rows without the tail's keys (what makes spec equal ar)."""
    rng = np.random.default_rng(m * 7 + tail)
    h, prefix = 4 * hkv, 13
    n_keys = prefix + m
    kc = rng.standard_normal((hkv, n_keys + 5, d)).astype(np.float32)
    vc = rng.standard_normal((hkv, n_keys + 5, d)).astype(np.float32)
    kpos = np.zeros(n_keys + 5, np.int32)
    kpos[:n_keys] = np.arange(n_keys)
    qpos = np.arange(prefix, n_keys).astype(np.int32)
    q = rng.standard_normal((m, h, d)).astype(np.float32)
    open_from = prefix + m - tail
    scale = np.float32(1 / np.sqrt(d))
    out = np.empty_like(q)
    attn_k.attention(out, q, keys_t(kc), vc, kpos, n_keys, qpos, 0, open_from, scale)
    ref = ref_attention(q, kc[:, :n_keys], vc[:, :n_keys], kpos[:n_keys], qpos, 0, open_from)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ref, ref_attention(q, kc[:, :n_keys], vc[:, :n_keys],
                                              kpos[:n_keys], qpos, 0))  # the tail matters
    causal_rows = m - tail
    alone = np.empty((causal_rows, h, d), np.float32)
    attn_k.attention(alone, q[:causal_rows].copy(), keys_t(kc), vc, kpos, n_keys - tail,
                     qpos[:causal_rows].copy(), 0, -1, scale)
    # bit-identical: the compiled tiles sum in key order (numpy's BLAS without the JIT does not)
    def same(a, b):
        if NO_JIT:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)
    same(out[:causal_rows], alone)
    # attention_many: this sequence beside a causal one, each row as alone
    from numba.typed import List
    other_q = rng.standard_normal((5, h, d)).astype(np.float32)
    kc2 = rng.standard_normal((1, hkv, 9, d)).astype(np.float32)
    vc2 = rng.standard_normal((1, hkv, 9, d)).astype(np.float32)
    kp2 = np.arange(9, dtype=np.int32)
    both = np.empty((m + 5, h, d), np.float32)
    attn_k.attention_many(both, np.concatenate([q, other_q]), List([keys_t(kc[None]), keys_t(kc2)]),
                          List([vc[None], vc2]), List([kpos, kp2]),
                          np.array([n_keys, 9], np.int64), np.array([0, m, m + 5], np.int64),
                          np.concatenate([qpos, np.arange(4, 9, dtype=np.int32)]),
                          np.array([0, 0], np.int64), np.array([open_from, -1], np.int64),
                          scale, 0)
    same(both[:m], out)


def test_argmax_confidence():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
    tok = np.empty(4, np.int64)
    conf = np.empty(4, np.float32)
    ops.argmax_confidence(tok, conf, logits)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.array_equal(tok, logits.argmax(1))
    np.testing.assert_allclose(conf, p.max(1), rtol=1e-5)


@pytest.mark.skipif(NO_JIT, reason="already running without the JIT")
def test_kernels_without_jit():
    """The same tests with NUMBA_DISABLE_JIT=1: the kernels' Python source must be right too."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        __file__, "-k", "not without_jit and not 768"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("path", ["amx", "vnni512", "vnni256", "avx2", "portable"])
@pytest.mark.parametrize("kernel", ["auto", "small", "block"])
@pytest.mark.parametrize("m,k,n", [(1, 128, 5), (1, 640, 38), (5, 512, 16), (7, 1536, 37),
                                   (65, 2560, 24), (13, 1152, 130), (2, 256, 20), (9, 640, 70),
                                   (16, 1280, 64), (17, 384, 200), (31, 1152, 48)])
def test_every_kernel_path_is_exact(path, kernel, m, k, n):
    """Each instruction path and kernel (the one matmul_kernel picks, and the small-batch and
    block kernels forced at every M) against the plain integer reference, bit for bit (M of
    every remainder mod 6 and mod 8 exercises the last tiles' rows, odd N the padded rows;
    K > 1024 crosses the k-chunking)."""
    from dlmnumba.kernels.dispatch import supported_paths
    from dlmnumba.kernels.ternary import M_ALIGN, matmul_kernel, ternary_matmul
    if kernel == "auto":
        kernel = matmul_kernel(path, m)
    elif kernel == "block":
        kernel = {"amx": "amx", "portable": "grouped"}.get(path, "block")
    if NO_JIT and kernel != "grouped":
        pytest.skip("LLVM intrinsics (every SIMD kernel) need the JIT")
    if path not in supported_paths():
        pytest.skip(f"this CPU cannot execute the {path} path (supported: {supported_paths()})")
    if kernel == "matvec" and m != 1:
        pytest.skip("the mat-vec kernel takes one token")
    rng = np.random.default_rng(m * 7 + n)
    codes = rng.integers(0, 3, (n, k), dtype=np.uint8)
    kp = padded_k(k)
    mp = -(-m // M_ALIGN) * M_ALIGN
    q = np.zeros((mp, kp), np.int8)
    q[:m, :k] = rng.integers(-128, 128, (m, k))
    q[0, :k] = -128  # the extreme value on one row
    qsum = q.astype(np.int32).sum(1).astype(np.int32)
    xs = rng.uniform(0.5, 2.0, m).astype(np.float32)
    scales = rng.uniform(0.1, 1.0, (n, 1)).astype(np.float32)
    acc = q[:m, :k].astype(np.int64) @ (codes.astype(np.int64) - 1).T
    out = np.empty((m, n), np.float32)
    ternary_matmul(out, q, qsum, np.ones(m, np.float32), pack_codes(codes),
                   np.ones_like(scales), kp, path, kernel)
    assert np.array_equal(out, acc.astype(np.float32))
    ternary_matmul(out, q, qsum, xs, pack_codes(codes), scales, kp, path, kernel)
    expect = (acc.astype(np.float32) * scales[:, 0]) * (np.float32(1) / xs[:, None])
    assert np.array_equal(out, expect)


@pytest.mark.parametrize("table", ["SIMD_MATVEC", "SIMD_SMALL"])
def test_each_machine_kinds_tuned_variant_is_exact(table):
    """The mat-vec and small-batch variants tuned per machine kind (e.g. 'amx' keeps the Intel
    Xeon's 2-vector streams, 'vnni512' the AMD EPYC's single one) run their SIMD path's
    instructions: each one this CPU can execute is exact, whatever machine runs the tests."""
    from dlmnumba.kernels import ternary
    from dlmnumba.kernels.dispatch import simd_path, supported_paths
    if NO_JIT:
        pytest.skip("LLVM intrinsics (every SIMD kernel) need the JIT")
    rng = np.random.default_rng(3)
    n, k = 200, 1152
    codes = rng.integers(0, 3, (n, k), dtype=np.uint8)
    packed = pack_codes(codes)
    ran = []
    for key, fn in getattr(ternary, table).items():
        if simd_path(key) not in supported_paths():
            continue
        for m in ((1,) if table == "SIMD_MATVEC" else (2, 7, 8, 9, 16)):
            q = np.zeros((-(-m // 6) * 6, padded_k(k)), np.int8)
            q[:m, :k] = rng.integers(-128, 128, (m, k))
            qsum = q.astype(np.int32).sum(1).astype(np.int32)
            out = np.empty((m, n), np.float32)
            fn(out, q, qsum, np.ones(m, np.float32), packed, np.ones((n, 1), np.float32))
            acc = q[:m, :k].astype(np.int64) @ (codes.astype(np.int64) - 1).T
            assert np.array_equal(out, acc.astype(np.float32)), (key, m)
        ran.append(key)
    assert ran  # the portable entry runs everywhere


@pytest.mark.parametrize("path", ["amx", "vnni512", "vnni256", "portable"])
@pytest.mark.parametrize("m", [7, 12, 14])
def test_int8_lm_head_exact_and_fused(path, m):
    """int8 LM head vs the integer reference; fused argmax/confidence vs the full logits (M
    on 4-token tiles and, 12, on 6-token tiles)."""
    from dlmnumba.kernels.dispatch import supported_paths
    from dlmnumba.kernels.lm_head import LM_HEAD, LM_ROWS, combine_partials, interleave_rows
    if NO_JIT:
        pytest.skip("LLVM intrinsics need the JIT")
    if path != "portable" and path not in supported_paths():
        pytest.skip(f"this CPU cannot execute the {path} path")
    rng = np.random.default_rng(11)
    k, v = 1280, 301  # v not a multiple of the tile or of LM_ROWS; K over K_CHUNK
    rows = np.zeros((-(-v // LM_ROWS) * LM_ROWS, k), np.int8)
    rows[:v] = rng.integers(-128, 128, (v, k))
    rows[3] = -128  # the extreme value on one row
    e8 = interleave_rows(rows)
    e_inv = rng.uniform(50, 200, v).astype(np.float32)
    e_sum = rows[:v].astype(np.int32).sum(1).astype(np.int32)
    q = rng.integers(-128, 128, (m, k))
    q[1] = 127
    u = np.full((-(-m // 6) * 6, k), 128, np.uint8)  # padding rows as quantize_head_input's
    u[:m] = q + 128
    xs = rng.uniform(50, 200, m).astype(np.float32)
    logits = np.empty((m, v), np.float32)
    n_tasks = -(-v // LM_ROWS)
    part = np.empty((n_tasks, m, 3))
    LM_HEAD[path](logits, part, u, xs, e8, e_inv, e_sum, -1)
    dot = q.astype(np.int64) @ rows[:v].astype(np.int64).T
    assert np.array_equal(logits, dot.astype(np.float32) / (xs[:, None] * e_inv[None, :]))
    one = np.empty((1, v), np.float32)  # a single token takes the streaming path
    LM_HEAD[path](one, np.empty((n_tasks, 1, 3)), u[:6], xs[:1], e8, e_inv, e_sum, -1)
    assert np.array_equal(one, logits[:1])
    for exclude in (-1, int(logits[0].argmax())):
        LM_HEAD[path](np.empty((0, 0), np.float32), part, u, xs, e8, e_inv, e_sum, exclude)
        tok, conf = np.empty(m, np.int64), np.empty(m, np.float32)
        combine_partials(tok, conf, part)
        ref = logits.astype(np.float64)
        if exclude >= 0:
            ref[:, exclude] = -np.inf
        p = np.exp(ref - ref.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        assert np.array_equal(tok, ref.argmax(1))
        np.testing.assert_allclose(conf, p.max(1), rtol=1e-5)


def test_cached_kernels_dropped_when_simd_ir_changes():
    """A changed simd.py (a new stamp) removes the cached kernels; an unchanged one keeps them."""
    import dlmnumba.kernels as K
    from pathlib import Path
    cache = Path(K.__file__).parent / "__pycache__"
    stamp = cache / "simd-ir.sha256"
    K._drop_stale_kernel_caches()
    good = stamp.read_text()
    fake = cache / "zz_fake_kernel.nbi"
    fake.write_bytes(b"x")
    K._drop_stale_kernel_caches()
    assert fake.exists()  # same simd.py: nothing dropped
    stamp.write_text("0" * 64)
    K._drop_stale_kernel_caches()
    assert not fake.exists() and stamp.read_text() == good


@pytest.mark.parametrize("n_rows,chunk", [(301, 64), (128, 8192), (37, 16)])
def test_quantize_head_layout_and_sums(n_rows, chunk):
    """quantize_head against a per-row numpy quantization, read back through the documented
    broadcast layout; row counts that are not a multiple of 16 (or of the chunk) leave the
    neighbouring arrays intact (the chunk's padding rows once wrote past e_sum)."""
    from dlmnumba.model.weights import F32, Embedding, quantize_head
    rng = np.random.default_rng(n_rows)
    k = 200
    emb_f = (rng.standard_normal((n_rows, k)) * rng.uniform(0.1, 3, (n_rows, 1))).astype(np.float32)
    head = quantize_head(Embedding(emb_f.reshape(-1).view(np.uint8), F32, n_rows, k, "t"), chunk)
    qr, sr = ref_quantize(emb_f)
    e8 = head.e8
    assert e8.shape == (-(-n_rows // 64) * 4, padded_k(k) // 4, 64)
    # row r, column kk sits in vector r // 16, step kk // 4, byte 4 (r % 16) + kk % 4
    back = e8.reshape(e8.shape[0], e8.shape[1], 16, 4).transpose(0, 2, 1, 3).reshape(
        e8.shape[0] * 16, -1)
    assert np.array_equal(back[:n_rows, :k], qr)
    assert np.all(back[n_rows:] == 0) and np.all(back[:, k:] == 0)
    assert np.array_equal(head.e_inv, sr)
    assert np.array_equal(head.e_sum, qr.sum(1))


def _norm_then_quantize(x, w, eps, mp, kp):
    """The unfused reference: ops.rmsnorm, then ops.quantize_rows (each tested above)."""
    a = np.empty_like(x)
    ops.rmsnorm(a, x, w, eps)
    q = np.empty((mp, kp), np.int8)
    xs = np.empty(x.shape[0], np.float32)
    qsum = np.empty(mp, np.int32)
    ops.quantize_rows(q, xs, qsum, a)
    return q, xs, qsum


@pytest.mark.parametrize("with_res", [False, True])
def test_rmsnorm_quantize_equals_the_separate_kernels(with_res):
    """Fused [residual add] + rmsnorm + int8 quantization: bit-identical to the unfused kernels,
    padding rows and columns zero, and x updated in place by the residual."""
    rng = np.random.default_rng(5)
    m, e, mp, kp = 7, 200, 12, 256
    x = (rng.standard_normal((m, e)) * 3).astype(np.float32)
    res = rng.standard_normal((m, e)).astype(np.float32) if with_res else np.empty((0, e), np.float32)
    w = rng.uniform(0.5, 1.5, e).astype(np.float32)
    expect_x = x + res if with_res else x.copy()
    ref = _norm_then_quantize(expect_x, w, 1e-5, mp, kp)
    q = np.full((mp, kp), 99, np.int8)
    xs = np.empty(m, np.float32)
    qsum = np.full(mp, 99, np.int32)
    assert ops.rmsnorm_quantize(q, xs, qsum, x, res, w, 1e-5) is True  # every row has a scale
    assert np.array_equal(x, expect_x)
    for got, want in zip((q, xs, qsum), ref):
        assert np.array_equal(got, want)
    for bad in (np.inf, np.nan):  # a row with no int8 scale is reported, on any row
        x2 = expect_x.copy()
        x2[m - 1, 3] = bad
        assert ops.rmsnorm_quantize(q, xs, qsum, x2, np.empty((0, e), np.float32), w,
                                    1e-5) is False


@pytest.mark.parametrize("silu", [False, True])
def test_act_rmsnorm_quantize(silu):
    """Fused gated activation + rmsnorm + int8: relu^2 bit-identical to numpy's float32 g*g*up
    through the unfused kernels; silu (libm vs numpy exp may differ by an ulp) within one
    quantization step."""
    rng = np.random.default_rng(6)
    m, f, mp, kp = 5, 300, 6, 384
    gu = (rng.standard_normal((m, 2 * f)) * 2).astype(np.float32)
    w = rng.uniform(0.5, 1.5, f).astype(np.float32)
    gate, up = gu[:, :f], gu[:, f:]
    if silu:
        g = (gate.astype(np.float64) / (1 + np.exp(-gate.astype(np.float64))) * up).astype(np.float32)
    else:
        r = np.maximum(gate, np.float32(0))
        g = r * r * up
    ref_q, ref_xs, _ = _norm_then_quantize(g, w, 1e-5, mp, kp)
    q = np.full((mp, kp), 99, np.int8)
    xs = np.empty(m, np.float32)
    qsum = np.full(mp, 99, np.int32)
    for bad in (np.inf, np.nan):  # an activation with no int8 scale is reported
        gu2 = gu.copy()
        gu2[1, f + 7] = bad
        assert ops.act_rmsnorm_quantize(q, xs, qsum, gu2, f, w, 1e-5, silu) is False
    assert ops.act_rmsnorm_quantize(q, xs, qsum, gu, f, w, 1e-5, silu) is True
    assert np.all(q[m:] == 0) and np.all(q[:, f:] == 0) and np.all(qsum[m:] == 0)
    assert np.array_equal(qsum[:m], q[:m].astype(np.int64).sum(1))
    if silu:
        assert np.abs(q.astype(int) - ref_q).max() <= 1
        np.testing.assert_allclose(xs, ref_xs, rtol=1e-5)
    else:
        assert np.array_equal(q, ref_q) and np.array_equal(xs, ref_xs)


@pytest.mark.parametrize("n", [1, 15, 16, 64, 77])
def test_exp_sum_matches_float64(n):
    """The vectorized softmax denominator against numpy in float64: relative error < 1e-6, -inf
    and arguments far below the max adding nothing visible, lanes and scalar tail alike."""
    from numba import njit
    from dlmnumba.kernels.simd import exp_sum
    if NO_JIT:
        pytest.skip("LLVM intrinsics need the JIT")

    @njit
    def run(x, shift):
        return exp_sum(x.ctypes.data, x.shape[0], shift)

    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 8).astype(np.float32)
    x[0] = 3.0
    if n > 2:
        x[1], x[2] = -np.inf, -200.0
    mx = np.float32(x.max())
    ref = np.exp(x.astype(np.float64) - np.float64(mx)).sum()
    got = run(x, mx)
    assert abs(got - ref) / ref < 1e-6
    grid = np.linspace(-80, 0, 4001).astype(np.float32)  # each value alone: per-argument error
    for v in grid[::250]:
        one = np.array([v], np.float32)
        assert abs(run(one, np.float32(0)) - np.exp(np.float64(v))) <= 2e-7 * np.exp(np.float64(v))


@pytest.mark.parametrize("n", [1, 16, 77])
def test_exp_shifted_and_silu_match_float64(n):
    """The vectorized softmax numerators (exp_shifted: values in place and their sum) and the
    SiLU gate (silu_times) against numpy in float64, lanes and scalar tail alike: relative
    error < 1e-6; -inf and arguments below -87 give exactly 0; silu stays finite and exact in
    sign at |g| = 100 (the overflow-free form)."""
    from numba import njit
    from dlmnumba.kernels.simd import exp_shifted, silu_times
    if NO_JIT:
        pytest.skip("LLVM intrinsics need the JIT")

    @njit
    def run_exp(x, shift):
        return exp_shifted(x, x.shape[0] - 1, shift)  # the last value is past n: untouched

    @njit
    def run_silu(out, g, u):
        silu_times(out, g, u)

    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n + 1) * 8).astype(np.float32)
    x[0] = 3.0
    if n > 2:
        x[1], x[2] = -np.inf, -100.0
    last = x[-1]
    mx = np.float32(x[:n].max())
    ref = np.exp((x[:n] - mx).astype(np.float64))  # the difference is rounded to float32 first
    got_sum = run_exp(x, mx)
    assert x[-1] == last
    assert np.all(np.abs(x[:n] - ref) <= 1e-6 * ref + (ref < 1e-37) * 1e-37)
    if n > 2:
        assert x[1] == 0.0 and x[2] == 0.0
    assert abs(got_sum - ref.sum()) / ref.sum() < 1e-6

    g = (rng.standard_normal(n) * 4).astype(np.float32)
    g[0] = 100.0 if n == 1 else g[0]
    if n > 2:
        g[1], g[2] = -100.0, 0.0
    u = rng.standard_normal(n).astype(np.float32)
    out = np.empty(n, np.float32)
    run_silu(out, g, u)
    g64 = g.astype(np.float64)
    ref = g64 / (1.0 + np.exp(-g64)) * u
    assert np.all(np.isfinite(out))
    assert np.all(np.abs(out - ref) <= 1e-6 * np.abs(ref) + 1e-40)


def _screen_case(rng, v, k, m):
    """An F16 embedding with a duplicated row (a tie) and token states h: one along that row,
    one with an outlier coordinate (a coarse int8 step), the rest random."""
    from dlmnumba.model.weights import F16, Embedding, quantize_head
    emb = (rng.standard_normal((v, k)) * rng.uniform(0.02, 0.2, (v, 1))).astype(np.float16)
    emb[v - 3] = emb[10]  # rows 10 and v - 3 always tie
    # rows 100..179: near copies of one row, ordered differently by the int8 and exact heads
    emb[100:180] = (emb[100].astype(np.float32)
                    * (1 + 0.003 * rng.standard_normal((80, k)))).astype(np.float16)
    h = rng.standard_normal((m, k)).astype(np.float32)
    h[0] = emb[10].astype(np.float32) * 40  # row 10 (and its twin) win this token
    h[-1] = emb[100].astype(np.float32) * 40 if m > 1 else h[-1]  # the near copies compete
    if m > 2:
        h[1, 5] = 60.0
    e = Embedding(emb.reshape(-1).view(np.uint8), F16, v, k, "t")
    return e, quantize_head(e, 64), h, emb.view(np.uint16)


@pytest.mark.parametrize("m", [1, 5])
def test_screened_exact_head(m):
    """The int8 screen (lm_screen.screen_exact_f16) against the exact F16 head: the documented
    bound holds on every row; the argmax equals the exact head's (lowest index on a tie, the
    excluded row never); rescored rows carry the exact logits bit for bit; conf is the softmax
    of that mixed row."""
    from dlmnumba.kernels.lm_head import (LM_HEAD, LM_ROWS, lm_head_exact_f16,
                                          quantize_activations_u8)
    from dlmnumba.kernels.lm_screen import BOUND_MARGIN, LOGIT_ROUNDING, screen_exact_f16
    if NO_JIT:
        pytest.skip("LLVM intrinsics need the JIT")
    rng = np.random.default_rng(m)
    v, k = 301, 256
    emb, head, h, e16 = _screen_case(rng, v, k, m)
    n_tasks = -(-v // LM_ROWS)
    exact = np.empty((m, v), np.float32)
    hp = np.zeros((-(-m // 4) * 4, k), np.float32)
    hp[:m] = h
    lm_head_exact_f16(exact, np.empty((n_tasks, m, 3)), hp, e16, -1)
    u = np.empty((-(-m // 6) * 6, padded_k(k)), np.uint8)
    xs = np.empty(m, np.float32)
    quantize_activations_u8(u, xs, h)
    approx = np.empty((m, v), np.float32)
    LM_HEAD["portable"](approx, np.empty((n_tasks, m, 3)), u, xs, head.e8, head.e_inv,
                       head.e_sum, -1)
    a = np.linalg.norm(h.astype(np.float64), axis=1)
    b = np.linalg.norm(h - (u[:m, :k].astype(np.float64) - 128) / xs[:, None], axis=1)
    bound = ((head.err_h * a[:, None] + head.norm8 * b[:, None]) * (1 + BOUND_MARGIN)
             + LOGIT_ROUNDING * np.abs(approx))
    assert np.all(np.abs(exact.astype(np.float64) - approx) <= bound)
    if m > 1:  # the case that needs the screen: int8 alone would pick another row
        assert approx[-1].argmax() != exact[-1].argmax()
    for exclude in (-1, 10):
        ref = exact.astype(np.float64)
        if exclude >= 0:
            ref[:, exclude] = -np.inf
        work = approx.copy()
        tok, conf = np.empty(m, np.int64), np.empty(m, np.float32)
        screen_exact_f16(tok, conf, work, u, xs, h, e16, head.err_h, head.norm8, exclude)
        assert np.array_equal(tok, ref.argmax(1))
        assert tok[0] == (10 if exclude < 0 else v - 3)  # the tie: lowest index that may win
        changed = work != approx
        if exclude >= 0:
            changed[:, exclude] = False
        assert np.array_equal(work[changed], exact[changed])
        assert np.all(work[np.arange(m), tok] == exact[np.arange(m), tok])
        mixed = work.astype(np.float64)
        p = np.exp(mixed - mixed[np.arange(m), tok][:, None]).sum(1)
        np.testing.assert_allclose(conf, 1 / p, rtol=1e-5)


def test_exact_f16_head_tiles_give_each_row_its_own_logits():
    """Every tile shape of the exact F16 head (1, 5, 7 tokens, 5 at a time beyond) computes a
    row's logits bit for bit as that row alone, and within float32 rounding of float64 dots."""
    from dlmnumba.kernels.lm_head import F16_TILES, LM_ROWS, lm_head_exact_f16
    if NO_JIT:
        pytest.skip("LLVM intrinsics need the JIT")
    rng = np.random.default_rng(5)
    v, k = 301, 256
    e16 = rng.standard_normal((v, k)).astype(np.float16)
    h = rng.standard_normal((12, k)).astype(np.float32)
    n_tasks = -(-v // LM_ROWS)
    alone = np.empty((12, v), np.float32)
    for i in range(12):
        lm_head_exact_f16(alone[i:i + 1], np.empty((n_tasks, 1, 3)), h[i:i + 1],
                          e16.view(np.uint16), -1)
    ref = h.astype(np.float64) @ e16.astype(np.float64).T
    np.testing.assert_allclose(alone, ref, rtol=1e-5, atol=1e-4)
    assert {t for _, t, _ in F16_TILES} == {1, 5, 7}
    for m in range(2, 13):
        out = np.empty((m, v), np.float32)
        lm_head_exact_f16(out, np.empty((n_tasks, m, 3)), h[:m], e16.view(np.uint16), -1)
        assert np.array_equal(out, alone[:m]), m


def test_amx_path_offered_only_with_the_features_and_the_os_grant(monkeypatch):
    """'amx' comes first when the CPU has AMX-INT8 (and VNNI-512) and the OS grants the tile
    state; without either it is not offered, and the other paths stay as they were."""
    from dlmnumba.kernels import dispatch
    vnni = {"avx512vnni", "avx512bw", "avx512f", "avx512vl", "avx2"}
    cases = [(vnni | {"amx-tile", "amx-int8"}, True, "amx"),
             (vnni | {"amx-tile", "amx-int8"}, False, "vnni512"),
             (vnni, True, "vnni512")]
    for features, granted, first in cases:
        monkeypatch.setattr(dispatch, "cpu_features", lambda f=features: frozenset(f))
        monkeypatch.setattr(dispatch, "amx_usable", lambda g=granted: g)
        paths = dispatch.supported_paths()
        assert paths[0] == first and paths[-1] == "portable"
        assert ("amx" in paths) == (first == "amx")
        assert dispatch.select_path("auto") == first
    assert dispatch.simd_path("amx") == "vnni512" and dispatch.simd_path("avx2") == "avx2"
    with pytest.raises(ValueError, match="lacks"):
        dispatch.select_path("amx")  # the last case: no AMX


def test_amx_kernels_refuse_without_the_os_grant(monkeypatch):
    """Asked for 'amx' where the OS withholds the tile state, the matmul and the head raise a
    ValueError naming the path instead of faulting on the first tile instruction."""
    from dlmnumba.kernels import amx, lm_head, ternary
    monkeypatch.setattr(amx, "amx_usable", lambda: False)
    m = -(-ternary.AMX_MIN_ROWS // ternary.M_ALIGN) * ternary.M_ALIGN  # enough rows for tiles
    n, k = 2 * ternary.BLOCKS * ternary.COLS, 2 * ternary.PACK_BLOCK  # operands that fit
    packed = np.zeros((n // ternary.COLS, k // ternary.PACK_K, ternary.VEC), np.uint8)
    with pytest.raises(ValueError, match="kernel path 'amx' needs AMX-INT8"):
        ternary.ternary_matmul(np.empty((m, n), np.float32), np.zeros((m, k), np.int8),
                               np.zeros(m, np.int32), np.ones(m, np.float32),
                               packed, np.ones((n, 1), np.float32), k, "amx")
    with pytest.raises(ValueError, match="tile path 'amx' needs AMX-INT8"):
        lm_head.LM_HEAD["amx"](None, None, None, np.ones(4, np.float32), None, None, None, -1)
