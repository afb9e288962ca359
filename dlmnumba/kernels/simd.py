"""int8 dot-product micro-kernels emitted as LLVM IR through a numba intrinsic.

dot_tile(path, u_addr, u_stride, s_addr, s_stride, n_steps, acc_addr) adds to a 4 x 4 tile
    acc[i * 4 + j, :] += lanes of sum_k U[i, k] * S[j, k]       (int32, k < 64 * n_steps)
where U rows are unsigned bytes starting at u_addr + i * u_stride, S rows signed bytes starting
at s_addr + j * s_stride, and acc is int32 [16, ACC_LANES]: each pair keeps its partial sums in
vector lanes (the path's lane count; the rest stay untouched), so a long k can be split into
cache-sized chunks and the lanes are summed once at the end (reduce_tile).  `path` is a compile-time literal index into PATHS, so only
that path's instructions are emitted (callers pass numba.literally(path)); each path is a
separate compiled (and cached) specialization.

  vnni512  `vpdpbusd` on 512-bit registers (AVX512-VNNI): 64 u8 x s8 products per instruction;
  vnni256  `vpdpbusd` on 256-bit registers (AVX-VNNI, or AVX512-VNNI with VL);
  avx2     `vpmaddubsw` (adjacent u8 x s8 pairs summed to int16, saturating) then `vpmaddwd`
           by ones: exact only while |u0*s0 + u1*s1| < 2^15, i.e. for ternary codes (u <= 2)
           against int8 activations, not for u8 activations against int8 weights;
  generic  plain LLVM vector IR (widen to int32, multiply, add) that any target lowers,
           ARM included: exact for every operand, slower.
The 16 accumulators of a tile live in registers (allocas that LLVM promotes), so each 64-byte
step loads 4 + 4 vectors and issues 16 dot-product instructions.

numba's on-disk cache keys a compiled function on its own source file only, not on the IR an
intrinsic emits: kernels/__init__.py drops the cached kernels when this file changes.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

PATHS = ("vnni512", "vnni256", "avx2", "generic")  # index = the literal `path` argument
TILE = 4  # rows of U and of S per tile
STEP = 64  # bytes of k consumed per step
ACC_LANES = 16  # int32 lanes kept per (i, j) pair in the accumulator buffer

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


@intrinsic
def dot_tile(typingctx, path, u_addr, u_stride, s_addr, s_stride, n_steps, acc_addr, sum_addr):
    """The 4 x 4 int8 dot-product tile of instruction path PATHS[path] (path: literal int);
    when sum_addr is not 0 the lanes are also summed into int32 sum[16] there."""
    if not isinstance(path, types.IntegerLiteral):
        return None
    sig = types.void(path, types.intp, types.intp, types.intp, types.intp, types.intp,
                     types.intp, types.intp)
    return sig, _codegen(PATHS[path.literal_value])


def _declare(module, name, ret, args):
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _codegen(path: str):
    """LLVM IR emitter of dot_tile for one instruction path."""
    lanes, width = {"vnni512": (16, 512), "vnni256": (8, 256), "avx2": (8, 256),
                    "generic": (16, 128)}[path]
    acc_t = ir.VectorType(_I32, lanes)
    byte_t = ir.VectorType(_I8, width // 8)
    i16_t = ir.VectorType(_I16, width // 16)
    vec_bytes = width // 8

    def codegen(context, builder, signature, args):
        _, ua, us, sa, ss, n, oa, sum_a = args
        mod = builder.module
        if path == "generic":
            wide_t = ir.VectorType(_I32, 16)
        elif path == "avx2":
            maddubs = _declare(mod, "llvm.x86.avx2.pmadd.ub.sw", i16_t, [byte_t, byte_t])
            maddwd = _declare(mod, "llvm.x86.avx2.pmadd.wd", acc_t, [i16_t, i16_t])
            ones = ir.Constant(i16_t, [1] * (width // 16))
        else:
            dp = _declare(mod, f"llvm.x86.avx512.vpdpbusd.{width}", acc_t, [acc_t] * 3)

        def load(base, offset):
            ptr = builder.bitcast(builder.gep(base, [offset]), byte_t.as_pointer())
            return builder.load(ptr, align=1)

        u_base = builder.inttoptr(ua, _I8.as_pointer())
        s_base = builder.inttoptr(sa, _I8.as_pointer())
        acc_base = builder.inttoptr(oa, _I32.as_pointer())

        def acc_ptr(i, j):
            p = builder.gep(acc_base, [ir.Constant(_I64, (i * TILE + j) * ACC_LANES)])
            return builder.bitcast(p, acc_t.as_pointer())

        accs = [[cgutils.alloca_once_value(builder, builder.load(acc_ptr(i, j), align=4))
                 for j in range(TILE)] for i in range(TILE)]
        with cgutils.for_range(builder, n) as loop:
            k0 = builder.mul(loop.index, ir.Constant(_I64, STEP))
            for part in range(STEP // vec_bytes):
                k = builder.add(k0, ir.Constant(_I64, part * vec_bytes))
                uv = [load(u_base, builder.add(k, builder.mul(us, ir.Constant(_I64, i))))
                      for i in range(TILE)]
                sv = [load(s_base, builder.add(k, builder.mul(ss, ir.Constant(_I64, j))))
                      for j in range(TILE)]
                for i in range(TILE):
                    for j in range(TILE):
                        a = builder.load(accs[i][j])
                        if path == "generic":
                            prod = builder.mul(builder.zext(uv[i], wide_t),
                                               builder.sext(sv[j], wide_t))
                            r = builder.add(a, prod)
                        elif path == "avx2":
                            pairs = builder.call(maddubs, [uv[i], sv[j]])
                            r = builder.add(a, builder.call(maddwd, [pairs, ones]))
                        else:
                            r = builder.call(dp, [a, builder.bitcast(uv[i], acc_t),
                                                  builder.bitcast(sv[j], acc_t)])
                        builder.store(r, accs[i][j])
        for i in range(TILE):
            for j in range(TILE):
                builder.store(builder.load(accs[i][j]), acc_ptr(i, j), align=4)
        _store_sums(builder, [[builder.load(a) for a in row] for row in accs], sum_a, acc_t)
        return context.get_dummy_value()

    return codegen


def _store_sums(builder, vecs, sum_addr, acc_t):
    """If sum_addr != 0: sum[i * 4 + j] = horizontal sum of vecs[i][j] (int32)."""
    reduce = _declare(builder.module, f"llvm.vector.reduce.add.v{acc_t.count}i32", _I32, [acc_t])
    with builder.if_then(builder.icmp_unsigned("!=", sum_addr, ir.Constant(_I64, 0))):
        out = builder.inttoptr(sum_addr, _I32.as_pointer())
        for i, row in enumerate(vecs):
            for j, v in enumerate(row):
                builder.store(builder.call(reduce, [v]),
                              builder.gep(out, [ir.Constant(_I64, i * TILE + j)]))


@intrinsic
def unpack_codes(typingctx, dst_addr, src_addr, n_runs):
    """dst[128 * g + 32 * s + b] = (src[32 * g + b] >> 2 s) & 3: the 2-bit layout of
    kernels/ternary.py expanded to one code byte per weight, 32 bytes at a time."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        da, sa, n = args
        byte_t = ir.VectorType(_I8, 32)
        dst = builder.inttoptr(da, _I8.as_pointer())
        src = builder.inttoptr(sa, _I8.as_pointer())
        three = ir.Constant(byte_t, [3] * 32)
        with cgutils.for_range(builder, n) as loop:
            g = loop.index
            p = builder.bitcast(builder.gep(src, [builder.mul(g, ir.Constant(_I64, 32))]),
                                byte_t.as_pointer())
            v = builder.load(p, align=1)
            for sh in range(4):
                codes = builder.and_(builder.lshr(v, ir.Constant(byte_t, [2 * sh] * 32)), three)
                off = builder.add(builder.mul(g, ir.Constant(_I64, 128)),
                                  ir.Constant(_I64, 32 * sh))
                q = builder.bitcast(builder.gep(dst, [off]), byte_t.as_pointer())
                builder.store(codes, q, align=1)
        return context.get_dummy_value()

    return sig, codegen


PACK_GROUP = 128  # weights per 32-byte packed run (kernels/ternary.py layout)
PREFETCH_AHEAD = 5120
PREFETCH_LOCALITY = 0


@intrinsic
def packed_tile(typingctx, path, n_tok, p_addr, p_stride, q_addr, q_stride, n_groups, sum_addr):
    """Ternary rows straight from the 2-bit layout: sum[i * 4 + j] = sum_k code(P[i], k) *
    Q[j, k] (int32) for 4 packed rows i and n_tok (literal, 1..4) int8 rows j,
    k < 128 * n_groups; codes are unpacked in registers (shift, and), so each packed byte is
    read once: the small-batch (M = 1 decode) path.  path indexes PATHS (vnni512 runs the
    256-bit vpdpbusd, the 32-byte runs of the layout being 256 bits)."""
    if not (isinstance(path, types.IntegerLiteral) and isinstance(n_tok, types.IntegerLiteral)):
        return None
    sig = types.void(path, n_tok, types.intp, types.intp, types.intp, types.intp, types.intp,
                     types.intp)
    return sig, _packed_codegen(PATHS[path.literal_value], n_tok.literal_value)


def _packed_codegen(path: str, n_tok: int):
    """LLVM IR emitter of packed_tile."""
    acc_t = ir.VectorType(_I32, 8)
    byte_t = ir.VectorType(_I8, 32)
    i16_t = ir.VectorType(_I16, 16)
    wide_t = ir.VectorType(_I32, 32)

    def codegen(context, builder, signature, args):
        _, _, pa, ps, qa, qs, n, sum_a = args
        mod = builder.module
        if path == "avx2":
            maddubs = _declare(mod, "llvm.x86.avx2.pmadd.ub.sw", i16_t, [byte_t, byte_t])
            maddwd = _declare(mod, "llvm.x86.avx2.pmadd.wd", acc_t, [i16_t, i16_t])
            ones = ir.Constant(i16_t, [1] * 16)
        elif path != "generic":
            dp = _declare(mod, "llvm.x86.avx512.vpdpbusd.256", acc_t, [acc_t] * 3)
        p_base = builder.inttoptr(pa, _I8.as_pointer())
        q_base = builder.inttoptr(qa, _I8.as_pointer())

        def load(base, offset):
            ptr = builder.bitcast(builder.gep(base, [offset]), byte_t.as_pointer())
            return builder.load(ptr, align=1)

        # with few tokens, each (row, token) pair gets `split` partial accumulators (one per
        # shift s modulo split), so consecutive vpdpbusd do not wait on each other's result
        split = max(1, 4 // n_tok)
        zero = ir.Constant(acc_t, None)
        accs = [[[cgutils.alloca_once_value(builder, zero) for part in range(split)]
                 for j in range(n_tok)] for i in range(TILE)]
        three = ir.Constant(byte_t, [3] * 32)
        prefetch = _declare(mod, "llvm.prefetch.p0", ir.VoidType(),
                            [_I8.as_pointer(), _I32, _I32, _I32])
        with cgutils.for_range(builder, n) as loop:
            g = builder.mul(loop.index, ir.Constant(_I64, 32))  # packed byte offset
            k = builder.mul(loop.index, ir.Constant(_I64, PACK_GROUP))
            for i in range(TILE):
                off = builder.add(builder.add(g, builder.mul(ps, ir.Constant(_I64, i))),
                                  ir.Constant(_I64, PREFETCH_AHEAD))
                builder.call(prefetch, [builder.gep(p_base, [off]), ir.Constant(_I32, 0),
                                        ir.Constant(_I32, PREFETCH_LOCALITY),
                                        ir.Constant(_I32, 1)])
            pv = [load(p_base, builder.add(g, builder.mul(ps, ir.Constant(_I64, i))))
                  for i in range(TILE)]
            for s in range(4):
                shift = ir.Constant(byte_t, [2 * s] * 32)
                codes = [builder.and_(builder.lshr(v, shift), three) for v in pv]
                ks = builder.add(k, ir.Constant(_I64, 32 * s))
                qv = [load(q_base, builder.add(ks, builder.mul(qs, ir.Constant(_I64, j))))
                      for j in range(n_tok)]
                for i in range(TILE):
                    for j in range(n_tok):
                        slot = accs[i][j][s % split]
                        a = builder.load(slot)
                        if path == "generic":
                            prod = builder.mul(builder.zext(codes[i], wide_t),
                                               builder.sext(qv[j], wide_t))
                            # fold 32 products into 8 lanes: sum the four 8-lane quarters
                            parts = [builder.shuffle_vector(prod, prod, ir.Constant(
                                ir.VectorType(_I32, 8), list(range(8 * h, 8 * h + 8))))
                                for h in range(4)]
                            r = builder.add(a, builder.add(builder.add(parts[0], parts[1]),
                                                           builder.add(parts[2], parts[3])))
                        elif path == "avx2":
                            pairs = builder.call(maddubs, [codes[i], qv[j]])
                            r = builder.add(a, builder.call(maddwd, [pairs, ones]))
                        else:
                            r = builder.call(dp, [a, builder.bitcast(codes[i], acc_t),
                                                  builder.bitcast(qv[j], acc_t)])
                        builder.store(r, slot)
        totals = []
        for i in range(TILE):
            row = []
            for j in range(n_tok):
                total = builder.load(accs[i][j][0])
                for part in range(1, split):
                    total = builder.add(total, builder.load(accs[i][j][part]))
                row.append(total)
            totals.append(row)
        _store_sums(builder, totals, sum_a, acc_t)
        return context.get_dummy_value()

    return codegen


@intrinsic
def f16_tile(typingctx, n_tok, e_addr, e_stride, h_addr, h_stride, n_steps, acc_addr):
    """Exact-head tile: acc[i * 4 + j, :] += lanes of sum_k float(E[i, k]) * H[j, k] for 4 F16
    rows i (stride in bytes) and n_tok (literal, 1..4) float32 rows j, k < 16 * n_steps.
    Plain vector IR (fpext half -> float, llvm.fmuladd): vcvtph2ps where the CPU has F16C,
    fused multiply-add where it has FMA, separate multiply and add elsewhere."""
    if not isinstance(n_tok, types.IntegerLiteral):
        return None
    sig = types.void(n_tok, types.intp, types.intp, types.intp, types.intp, types.intp,
                     types.intp)
    return sig, _f16_codegen(n_tok.literal_value)


def _f16_codegen(n_tok: int):
    """LLVM IR emitter of f16_tile."""
    f32x16 = ir.VectorType(ir.FloatType(), 16)
    f16x16 = ir.VectorType(ir.HalfType(), 16)

    def codegen(context, builder, signature, args):
        _, ea, es, ha, hs, n, oa = args
        fmuladd = _declare(builder.module, "llvm.fmuladd.v16f32", f32x16, [f32x16] * 3)
        e_base = builder.inttoptr(ea, _I8.as_pointer())
        h_base = builder.inttoptr(ha, _I8.as_pointer())
        acc_base = builder.inttoptr(oa, ir.FloatType().as_pointer())

        def load(base, offset, vt):
            ptr = builder.bitcast(builder.gep(base, [offset]), vt.as_pointer())
            return builder.load(ptr, align=1)

        def acc_ptr(i, j):
            p = builder.gep(acc_base, [ir.Constant(_I64, (i * TILE + j) * ACC_LANES)])
            return builder.bitcast(p, f32x16.as_pointer())

        accs = [[cgutils.alloca_once_value(builder, builder.load(acc_ptr(i, j), align=4))
                 for j in range(n_tok)] for i in range(TILE)]
        with cgutils.for_range(builder, n) as loop:
            ke = builder.mul(loop.index, ir.Constant(_I64, 32))  # 16 halfs
            kh = builder.mul(loop.index, ir.Constant(_I64, 64))  # 16 floats
            ev = [builder.fpext(load(e_base, builder.add(ke, builder.mul(
                es, ir.Constant(_I64, i))), f16x16), f32x16) for i in range(TILE)]
            hv = [load(h_base, builder.add(kh, builder.mul(hs, ir.Constant(_I64, j))), f32x16)
                  for j in range(n_tok)]
            for i in range(TILE):
                for j in range(n_tok):
                    r = builder.call(fmuladd, [ev[i], hv[j], builder.load(accs[i][j])])
                    builder.store(r, accs[i][j])
        for i in range(TILE):
            for j in range(n_tok):
                builder.store(builder.load(accs[i][j]), acc_ptr(i, j), align=4)
        return context.get_dummy_value()

    return codegen
