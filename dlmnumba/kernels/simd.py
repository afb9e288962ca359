"""int8 dot-product micro-kernels emitted as LLVM IR through numba intrinsics.

Weights are laid out for broadcast micro-kernels ("VNNI layout"): a 64-byte weight vector
holds 16 output columns x 4 consecutive k (byte 4 * col + b = W[col, 4 s + b] at step s),
so one dot-product instruction multiplies it by 4 activation bytes broadcast to every lane
and leaves 16 finished column sums, no horizontal reduction:

  bcast_tile   out[t, 16 c + l] += sum_s sum_b W_c[64 s + 4 l + b] * X[t, 4 s + b] for n_tok
               token rows t and n_vec weight vectors c (literals): a register tile of
               n_tok x n_vec accumulators, each step loading n_vec vectors and n_tok 4-byte
               broadcasts.  x_signed = 1: X int8 activations, W unsigned ternary codes
               (the ternary matmul); 0: X unsigned, W int8 (the int8 LM head).
  packed_vec   one token against 2-bit packed ternary vectors, unpacked in registers: each
               packed byte is read once (the bandwidth-bound M = 1 path).
  unpack16     2-bit packed codes -> one code byte per weight, in the same layout.
  f16_tile     the exact LM head's F16 x float32 tile.
  f32_tile     a float32 register tile, A rows broadcast against B's lanes (attention).
  exp_sum, exp_store_sum, silu_mul   vectorized exp (softmax denominators and numerators,
               the SiLU gate).

`path` is a compile-time literal index into PATHS, so only that path's instructions are emitted:
  vnni512  `vpdpbusd` on 512-bit registers (AVX512-VNNI): 64 u8 x s8 products per instruction;
  vnni256  `vpdpbusd` on 256-bit registers (AVX-VNNI, or AVX512-VNNI with VL): each 64-byte
           vector is two 32-byte halves (8 columns each);
  avx2     `vpmaddubsw` (adjacent u8 x s8 pairs summed to int16, saturating) then `vpmaddwd`
           by ones: exact while |u0 s0 + u1 s1| < 2^15, i.e. for ternary codes (u <= 128 here)
           against int8 activations, not for u8 activations against int8 weights;
  portable plain LLVM vector IR (widen to int32, multiply, add) that any target lowers,
           ARM included: exact for every operand, slower.
These are the CPU paths of kernels/dispatch.py too (one set of names; `--kernel` picks one).

numba's on-disk cache keys a compiled function on its own source file only, not on the IR an
intrinsic emits: kernels/__init__.py drops the cached kernels when this file changes.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

# fastest first; index = the literal `path` argument
PATHS = ("vnni512", "vnni256", "avx2", "portable")
COLS = 16  # output columns per 64-byte weight vector
VEC = 64  # bytes per weight vector and per packed chunk
KSTEP = 4  # k per bcast_tile step (4 bytes broadcast)
PACK_K = 16  # k per 64-byte packed chunk (4 steps of 2-bit codes)
PREFETCH_AHEAD = 4096  # bytes ahead on each packed stream (packed_vec, packed_tile)
# prefetcht0: into L1 and L2.  prefetchnta (0) halved the M = 1 stream on an Intel Xeon
# (12.9 vs 25.8 GB/s on 398 MB of packed weights, 2 threads): its lines bypass the L2, whose
# streamer then does not run ahead
PREFETCH_LOCALITY = 3

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_WIDTH = {"vnni512": 64, "vnni256": 32, "avx2": 32, "portable": 64}  # bytes per register


def _declare(module, name, ret, args):
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _const(v: int):
    return ir.Constant(_I64, v)


def _fconst(t, v: float):
    """v as a float32 constant of type t (a scalar, or in every lane of a vector)."""
    return ir.Constant(t, [v] * t.count) if isinstance(t, ir.VectorType) else ir.Constant(t, v)


def _prefetch_fn(module):
    """llvm.prefetch(ptr, rw, locality, cache type)."""
    return _declare(module, "llvm.prefetch.p0", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])


class _Dot4:
    """acc(int32 x W/4) + sum over each lane's 4 byte products of u (unsigned) and s (signed)."""

    def __init__(self, builder, path: str):
        self.b, self.path = builder, path
        self.width = _WIDTH[path]
        self.byte_t = ir.VectorType(_I8, self.width)
        self.acc_t = ir.VectorType(_I32, self.width // 4)
        mod = builder.module
        if path == "avx2":
            i16_t = ir.VectorType(_I16, 16)
            self.maddubs = _declare(mod, "llvm.x86.avx2.pmadd.ub.sw", i16_t, [self.byte_t] * 2)
            self.maddwd = _declare(mod, "llvm.x86.avx2.pmadd.wd", self.acc_t, [i16_t, i16_t])
            self.ones = ir.Constant(i16_t, [1] * 16)
        elif path != "portable":
            self.dp = _declare(mod, f"llvm.x86.avx512.vpdpbusd.{self.width * 8}", self.acc_t,
                               [self.acc_t] * 3)

    def __call__(self, acc, u, s):
        b = self.b
        if self.path == "avx2":
            return b.add(acc, b.call(self.maddwd, [b.call(self.maddubs, [u, s]), self.ones]))
        if self.path == "portable":
            wide_t = ir.VectorType(_I32, self.width)
            prod = b.mul(b.zext(u, wide_t), b.sext(s, wide_t))
            lanes = self.width // 4
            for part in range(4):
                pick = ir.Constant(ir.VectorType(_I32, lanes),
                                   [4 * i + part for i in range(lanes)])
                acc = b.add(acc, b.shuffle_vector(prod, prod, pick))
            return acc
        return b.call(self.dp, [acc, b.bitcast(u, self.acc_t), b.bitcast(s, self.acc_t)])

    def load(self, base, offset):
        ptr = self.b.bitcast(self.b.gep(base, [offset]), self.byte_t.as_pointer())
        return self.b.load(ptr, align=1)

    def broadcast(self, base, offset):
        """The 4 bytes at base + offset in every lane."""
        b = self.b
        word = b.load(b.bitcast(b.gep(base, [offset]), _I32.as_pointer()), align=1)
        return b.bitcast(_splat(b, word, self.acc_t), self.byte_t)


def _literals(*args) -> bool:
    return all(isinstance(a, types.IntegerLiteral) for a in args)


@intrinsic
def bcast_tile(typingctx, path, n_tok, n_vec, x_signed, w_addr, w_vstride, x_addr, x_stride,
               n_steps, out_addr, out_stride):
    """out[t, 16 c + l] += lanes of the n_tok x n_vec tile over n_steps steps of 4 k (int32;
    out rows out_stride bytes apart, W vector c at w_addr + c * w_vstride, step s at +64 s,
    X row t at x_addr + t * x_stride, step s at +4 s).  See the module docstring."""
    if not _literals(path, n_tok, n_vec, x_signed):
        return None
    sig = types.void(path, n_tok, n_vec, x_signed, *([types.intp] * 7))
    return sig, _bcast_codegen(PATHS[path.literal_value], n_tok.literal_value,
                               n_vec.literal_value, bool(x_signed.literal_value))


def _bcast_codegen(path: str, n_tok: int, n_vec: int, x_signed: bool):
    def codegen(context, builder, signature, args):
        wa, wvs, xa, xs, n, oa, os_ = args[4:]
        dot = _Dot4(builder, path)
        halves = VEC // dot.width
        w_base = builder.inttoptr(wa, _I8.as_pointer())
        x_base = builder.inttoptr(xa, _I8.as_pointer())
        o_base = builder.inttoptr(oa, _I8.as_pointer())

        def out_ptr(t, c, h):
            off = builder.add(builder.mul(os_, _const(t)),
                              _const(4 * (COLS * c + h * dot.acc_t.count)))
            return builder.bitcast(builder.gep(o_base, [off]), dot.acc_t.as_pointer())

        accs = {(t, c, h): cgutils.alloca_once_value(builder, builder.load(out_ptr(t, c, h),
                                                                          align=4))
                for t in range(n_tok) for c in range(n_vec) for h in range(halves)}
        w_rows = [builder.gep(w_base, [builder.mul(wvs, _const(c))]) for c in range(n_vec)]
        x_rows = [builder.gep(x_base, [builder.mul(xs, _const(t))]) for t in range(n_tok)]
        with cgutils.for_range(builder, n) as loop:
            kw = builder.mul(loop.index, _const(VEC))
            kx = builder.mul(loop.index, _const(KSTEP))
            wv = {(c, h): dot.load(w_rows[c], builder.add(kw, _const(h * dot.width)))
                  for c in range(n_vec) for h in range(halves)}
            for t in range(n_tok):
                xv = dot.broadcast(x_rows[t], kx)
                for (c, h), w in wv.items():
                    slot = accs[t, c, h]
                    u, s = (w, xv) if x_signed else (xv, w)
                    builder.store(dot(builder.load(slot), u, s), slot)
        for key, slot in accs.items():
            builder.store(builder.load(slot), out_ptr(*key), align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def packed_vec(typingctx, path, n_vec, p_addr, p_vstride, x_addr, n_chunks, out_addr):
    """out[16 c + l] = sum_k code(P_c, k) * X[k] (int32, written) for n_vec (literal) packed
    ternary vectors c at p_addr + c * p_vstride (64 bytes per 16 k) and one int8 token X,
    k < 16 n_chunks.  The codes stay in place in their bytes (masked with 3 << 2 s, not
    shifted), so the step-s products come out 4^s times too large; each s has its own
    accumulator, shifted back exactly at the end."""
    if not _literals(path, n_vec):
        return None
    sig = types.void(path, n_vec, *([types.intp] * 5))
    return sig, _packed_codegen(PATHS[path.literal_value], n_vec.literal_value)


def _packed_codegen(path: str, n_vec: int):
    def codegen(context, builder, signature, args):
        pa, pvs, xa, n, oa = args[2:]
        dot = _Dot4(builder, path)
        halves = VEC // dot.width
        p_base = builder.inttoptr(pa, _I8.as_pointer())
        x_base = builder.inttoptr(xa, _I8.as_pointer())
        o_base = builder.inttoptr(oa, _I32.as_pointer())
        prefetch = _prefetch_fn(builder.module)
        zero = ir.Constant(dot.acc_t, None)
        accs = {(c, h, s): cgutils.alloca_once_value(builder, zero)
                for c in range(n_vec) for h in range(halves) for s in range(4)}
        rows = [builder.gep(p_base, [builder.mul(pvs, _const(c))]) for c in range(n_vec)]
        with cgutils.for_range(builder, n) as loop:
            kp = builder.mul(loop.index, _const(VEC))
            kx = builder.mul(loop.index, _const(PACK_K))
            for c in range(n_vec):
                builder.call(prefetch, [builder.gep(rows[c], [builder.add(kp, _const(PREFETCH_AHEAD))]),
                                        ir.Constant(_I32, 0), ir.Constant(_I32, PREFETCH_LOCALITY),
                                        ir.Constant(_I32, 1)])
            pv = {(c, h): dot.load(rows[c], builder.add(kp, _const(h * dot.width)))
                  for c in range(n_vec) for h in range(halves)}
            for s in range(4):
                xv = dot.broadcast(x_base, builder.add(kx, _const(KSTEP * s)))
                mask = ir.Constant(dot.byte_t, [3 << (2 * s)] * dot.width)
                for (c, h), v in pv.items():
                    slot = accs[c, h, s]
                    builder.store(dot(builder.load(slot), builder.and_(v, mask), xv), slot)
        for c in range(n_vec):
            for h in range(halves):
                total = builder.load(accs[c, h, 0])
                for s in range(1, 4):
                    shift = ir.Constant(dot.acc_t, [2 * s] * dot.acc_t.count)
                    total = builder.add(total, builder.ashr(builder.load(accs[c, h, s]), shift))
                ptr = builder.gep(o_base, [_const(COLS * c + h * dot.acc_t.count)])
                builder.store(total, builder.bitcast(ptr, dot.acc_t.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def packed_tile(typingctx, path, n_tok, n_vec, p_addr, p_vstride, x_addr, x_stride, n_chunks,
                out_addr, out_stride):
    """out[t, 16 c + l] = sum_k code(P_c, k) * X[t, k] (int32, written) for n_tok (literal)
    int8 tokens (row t at x_addr + t * x_stride) and n_vec (literal) packed ternary vectors c
    at p_addr + c * p_vstride, k < 16 n_chunks; out rows out_stride bytes apart.  A few
    tokens at once (the small-batch path): each packed byte is read once for all of them, and
    its four 2-bit codes are shifted and masked in registers once per step, then dotted
    against every token's broadcast."""
    if not _literals(path, n_tok, n_vec):
        return None
    sig = types.void(path, n_tok, n_vec, *([types.intp] * 7))
    return sig, _packed_tile_codegen(PATHS[path.literal_value], n_tok.literal_value,
                                     n_vec.literal_value)


def _packed_tile_codegen(path: str, n_tok: int, n_vec: int):
    def codegen(context, builder, signature, args):
        pa, pvs, xa, xs, n, oa, os_ = args[3:]
        dot = _Dot4(builder, path)
        halves = VEC // dot.width
        p_base = builder.inttoptr(pa, _I8.as_pointer())
        x_base = builder.inttoptr(xa, _I8.as_pointer())
        o_base = builder.inttoptr(oa, _I8.as_pointer())
        prefetch = _prefetch_fn(builder.module)
        zero = ir.Constant(dot.acc_t, None)
        three = ir.Constant(dot.byte_t, [3] * dot.width)
        accs = {(t, c, h): cgutils.alloca_once_value(builder, zero)
                for t in range(n_tok) for c in range(n_vec) for h in range(halves)}
        rows = [builder.gep(p_base, [builder.mul(pvs, _const(c))]) for c in range(n_vec)]
        x_rows = [builder.gep(x_base, [builder.mul(xs, _const(t))]) for t in range(n_tok)]
        with cgutils.for_range(builder, n) as loop:
            kp = builder.mul(loop.index, _const(VEC))
            kx = builder.mul(loop.index, _const(PACK_K))
            for c in range(n_vec):
                builder.call(prefetch, [builder.gep(rows[c], [builder.add(kp, _const(PREFETCH_AHEAD))]),
                                        ir.Constant(_I32, 0), ir.Constant(_I32, PREFETCH_LOCALITY),
                                        ir.Constant(_I32, 1)])
            pv = {(c, h): dot.load(rows[c], builder.add(kp, _const(h * dot.width)))
                  for c in range(n_vec) for h in range(halves)}
            for s in range(4):
                shift = ir.Constant(dot.byte_t, [2 * s] * dot.width)
                codes = {key: builder.and_(builder.lshr(v, shift) if s else v, three)
                         for key, v in pv.items()}
                for t in range(n_tok):
                    xv = dot.broadcast(x_rows[t], builder.add(kx, _const(KSTEP * s)))
                    for (c, h), w in codes.items():
                        slot = accs[t, c, h]
                        builder.store(dot(builder.load(slot), w, xv), slot)
        for (t, c, h), slot in accs.items():
            off = builder.add(builder.mul(os_, _const(t)),
                              _const(4 * (COLS * c + h * dot.acc_t.count)))
            ptr = builder.bitcast(builder.gep(o_base, [off]), dot.acc_t.as_pointer())
            builder.store(builder.load(slot), ptr, align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def unpack16(typingctx, dst_addr, src_addr, n_chunks):
    """dst[256 j + 64 s + i] = (src[64 j + i] >> 2 s) & 3: packed 2-bit chunks expanded to one
    code byte per weight in the broadcast layout (step 4 j + s)."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        da, sa, n = args
        byte_t = ir.VectorType(_I8, VEC)
        dst = builder.inttoptr(da, _I8.as_pointer())
        src = builder.inttoptr(sa, _I8.as_pointer())
        three = ir.Constant(byte_t, [3] * VEC)
        with cgutils.for_range(builder, n) as loop:
            p = builder.gep(src, [builder.mul(loop.index, _const(VEC))])
            v = builder.load(builder.bitcast(p, byte_t.as_pointer()), align=1)
            for s in range(4):
                codes = builder.and_(builder.lshr(v, ir.Constant(byte_t, [2 * s] * VEC)), three)
                off = builder.add(builder.mul(loop.index, _const(4 * VEC)), _const(VEC * s))
                builder.store(codes, builder.bitcast(builder.gep(dst, [off]), byte_t.as_pointer()),
                              align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch(typingctx, addr, n_bytes):
    """Hint the cache lines of [addr, addr + n_bytes) into cache (software prefetch, no fault)."""
    sig = types.void(types.intp, types.intp)

    def codegen(context, builder, signature, args):
        a, n = args
        fn = _prefetch_fn(builder.module)
        base = builder.inttoptr(a, _I8.as_pointer())
        lines = builder.udiv(builder.add(n, _const(63)), _const(64))
        with cgutils.for_range(builder, lines) as loop:
            ptr = builder.gep(base, [builder.mul(loop.index, _const(64))])
            builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                              ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def exp_sum(typingctx, addr, n, shift):
    """sum_i exp(x[i] - shift) over float32 x[0..n) at addr, x[i] <= shift (the softmax
    denominator): 16 lanes at a time, Cody-Waite range reduction and a degree-7 Taylor
    polynomial (relative error ~1e-7, as libm's expf within a few ulp); arguments below -87
    (-inf included) count as 0, where exp is below 1.7e-38, nothing against a total >= 1."""
    sig = types.float32(types.intp, types.intp, types.float32)
    return sig, _exp_codegen(store=False)


@intrinsic
def exp_store_sum(typingctx, addr, n, shift):
    """Like exp_sum, and also x[i] <- exp(x[i] - shift) in place (softmax numerators)."""
    sig = types.float32(types.intp, types.intp, types.float32)
    return sig, _exp_codegen(store=True)


def _exp_codegen(store: bool):
    """LLVM IR emitter of exp_sum / exp_store_sum."""

    def codegen(context, builder, signature, args):
        a, n, sh = args
        f32 = ir.FloatType()
        vt = ir.VectorType(f32, 16)
        base = builder.inttoptr(a, f32.as_pointer())
        vec_exp = _exp_emitter(builder, vt)
        one_exp = _exp_emitter(builder, f32)
        shv = _splat(builder, sh, vt)
        acc = cgutils.alloca_once_value(builder, ir.Constant(vt, [0.0] * 16))
        n16 = builder.udiv(n, _const(16))
        with cgutils.for_range(builder, n16) as loop:
            p = builder.bitcast(builder.gep(base, [builder.mul(loop.index, _const(16))]),
                                vt.as_pointer())
            e = vec_exp(builder.fsub(builder.load(p, align=4), shv))
            if store:
                builder.store(e, p, align=4)
            builder.store(builder.fadd(builder.load(acc), e), acc)
        tail = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
        rest = builder.sub(n, builder.mul(n16, _const(16)))
        with cgutils.for_range(builder, rest) as loop:
            p = builder.gep(base, [builder.add(builder.mul(n16, _const(16)), loop.index)])
            e = one_exp(builder.fsub(builder.load(p), sh))
            if store:
                builder.store(e, p)
            builder.store(builder.fadd(builder.load(tail), e), tail)
        total = builder.load(tail)
        v = builder.load(acc)
        for lane in range(16):  # fixed order: deterministic
            total = builder.fadd(total, builder.extract_element(v, ir.Constant(_I32, lane)))
        return total

    return codegen


@intrinsic
def silu_mul(typingctx, out_addr, gate_addr, up_addr, n):
    """out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i] over float32
    arrays, 16 lanes at a time with exp_sum's exp, in the overflow-free form
    e = exp(-|g|): g >= 0 -> g / (1 + e), g < 0 -> g e / (1 + e)."""
    sig = types.void(types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        oa, ga, ua, n = args
        f32 = ir.FloatType()
        vt = ir.VectorType(f32, 16)
        ptrs = [builder.inttoptr(x, f32.as_pointer()) for x in (oa, ga, ua)]

        def silu(t, width, i):
            exp = _exp_emitter(builder, t)
            fabs = _declare(builder.module, f"llvm.fabs.{_suffix(t)}", t, [t])
            one, zero = _fconst(t, 1.0), _fconst(t, 0.0)

            def ptr(base):
                p = builder.gep(base, [i])
                return builder.bitcast(p, t.as_pointer()) if width > 1 else p

            g = builder.load(ptr(ptrs[1]), align=4)
            u = builder.load(ptr(ptrs[2]), align=4)
            e = exp(builder.fsub(zero, builder.call(fabs, [g])))
            num = builder.select(builder.fcmp_ordered(">=", g, zero), g, builder.fmul(g, e))
            builder.store(builder.fmul(builder.fdiv(num, builder.fadd(one, e)), u),
                          ptr(ptrs[0]), align=4)

        n16 = builder.udiv(n, _const(16))
        with cgutils.for_range(builder, n16) as loop:
            silu(vt, 16, builder.mul(loop.index, _const(16)))
        rest = builder.sub(n, builder.mul(n16, _const(16)))
        with cgutils.for_range(builder, rest) as loop:
            silu(f32, 1, builder.add(builder.mul(n16, _const(16)), loop.index))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def f32_tile(typingctx, n_rows, n_vec, a_addr, a_stride, b_addr, b_stride, n_k, out_addr,
             out_stride):
    """out[r, 16 c + l] = sum_k A[r, k] * B[k, 16 c + l] for n_rows rows r and n_vec vectors c
    (literals; float32, strides in bytes): a register tile of n_rows x n_vec accumulators, each
    k loading n_vec 16-float vectors of B's row k and broadcasting A[r, k] (attention's scores
    and weighted values).  Sums run over k in order: deterministic."""
    if not _literals(n_rows, n_vec):
        return None
    sig = types.void(n_rows, n_vec, *([types.intp] * 7))
    return sig, _f32_codegen(n_rows.literal_value, n_vec.literal_value)


def _f32_codegen(n_rows: int, n_vec: int):
    def codegen(context, builder, signature, args):
        aa, as_, ba, bs, n, oa, os_ = args[2:]
        f32 = ir.FloatType()
        vt = ir.VectorType(f32, 16)
        fmuladd = _declare(builder.module, "llvm.fmuladd.v16f32", vt, [vt] * 3)
        a_base = builder.inttoptr(aa, _I8.as_pointer())
        b_base = builder.inttoptr(ba, _I8.as_pointer())
        o_base = builder.inttoptr(oa, _I8.as_pointer())
        accs = {(r, c): cgutils.alloca_once_value(builder, ir.Constant(vt, [0.0] * 16))
                for r in range(n_rows) for c in range(n_vec)}
        with cgutils.for_range(builder, n) as loop:
            b_row = builder.gep(b_base, [builder.mul(loop.index, bs)])
            bv = [builder.load(builder.bitcast(builder.gep(b_row, [_const(64 * c)]),
                                               vt.as_pointer()), align=4) for c in range(n_vec)]
            for r in range(n_rows):
                ap = builder.gep(a_base, [builder.add(builder.mul(as_, _const(r)),
                                                      builder.mul(loop.index, _const(4)))])
                av = _splat(builder, builder.load(builder.bitcast(ap, f32.as_pointer()),
                                                  align=4), vt)
                for c in range(n_vec):
                    slot = accs[r, c]
                    builder.store(builder.call(fmuladd, [av, bv[c], builder.load(slot)]), slot)
        for (r, c), slot in accs.items():
            off = builder.add(builder.mul(os_, _const(r)), _const(64 * c))
            builder.store(builder.load(slot),
                          builder.bitcast(builder.gep(o_base, [off]), vt.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


def exp_shifted(x, n, shift):
    """x[:n] <- exp(x[:n] - shift) in place, returning their sum (exp_store_sum on a float32
    array); plain numpy where the JIT is off (NUMBA_DISABLE_JIT)."""
    with np.errstate(under="ignore"):
        d = x[:n] - np.float32(shift)
        e = np.where(d < -87.0, np.float32(0.0), np.exp(d)).astype(np.float32)
    x[:n] = e
    return np.float32(e.sum(dtype=np.float32))


@overload(exp_shifted, jit_options={"nogil": True})
def _exp_shifted_jit(x, n, shift):
    return lambda x, n, shift: exp_store_sum(x.ctypes.data, n, shift)


def silu_times(out, gate, up):
    """out = silu(gate) * up over contiguous float32 arrays of one length (silu_mul); plain
    numpy where the JIT is off."""
    with np.errstate(over="ignore"):
        out[:] = gate / (np.float32(1.0) + np.exp(-gate)) * up


@overload(silu_times, jit_options={"nogil": True})
def _silu_times_jit(out, gate, up):
    return lambda out, gate, up: silu_mul(out.ctypes.data, gate.ctypes.data, up.ctypes.data,
                                          out.shape[0])


def _suffix(t) -> str:
    return f"v{t.count}f32" if isinstance(t, ir.VectorType) else "f32"


def _splat(builder, x, vt):
    """x broadcast to every lane of vector type vt."""
    return builder.shuffle_vector(
        builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(_I32, 0)),
        ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))


def _exp_emitter(builder, t):
    """exp(x) for float32 scalars or vectors of type t, x <= 0; 0 below -87 (see exp_sum)."""
    vec = isinstance(t, ir.VectorType)
    it = ir.VectorType(_I32, t.count) if vec else _I32
    suffix = _suffix(t)
    mod = builder.module
    rint = _declare(mod, f"llvm.rint.{suffix}", t, [t])
    maxnum = _declare(mod, f"llvm.maxnum.{suffix}", t, [t, t])
    fma = _declare(mod, f"llvm.fma.{suffix}", t, [t, t, t])

    def c(v):
        return _fconst(t, v)

    def ci(v):
        return ir.Constant(it, [v] * t.count) if vec else ir.Constant(_I32, v)

    def emit(x):
        tiny = builder.fcmp_ordered("<", x, c(-87.0))  # -inf included
        x = builder.call(maxnum, [x, c(-87.0)])
        k = builder.call(rint, [builder.fmul(x, c(1.4426950408889634))])
        r = builder.call(fma, [k, c(-0.693359375), x])  # x - k ln2, ln2 in two parts
        r = builder.call(fma, [k, c(2.12194440e-4), r])
        p = c(1.0 / 5040)
        for coef in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
            p = builder.call(fma, [p, r, c(coef)])
        bits = builder.shl(builder.add(builder.fptosi(k, it), ci(127)), ci(23))
        return builder.select(tiny, c(0.0), builder.fmul(p, builder.bitcast(bits, t)))

    return emit


F16_TILE = 4  # embedding rows per exact-head tile, at most
F16_ACC = 28  # (embedding row, token) accumulators per exact-head tile, at most (of 32 registers)
F16_LANES = 16  # float32 lanes kept per (row, token) pair in its accumulator buffer


@intrinsic
def f16_tile(typingctx, n_rows, n_tok, e_addr, e_stride, h_addr, h_stride, n_steps, acc_addr):
    """Exact-head tile: acc[i * n_tok + j, :] += lanes of sum_k float(E[i, k]) * H[j, k] for
    n_rows F16 rows i (stride in bytes) and n_tok float32 rows j (literals, n_rows <= F16_TILE,
    n_rows * n_tok <= F16_ACC), k < 16 * n_steps.
    Each (i, j) lane is its own chain of fused multiply-adds in k order, whatever the tile's
    shape.  Plain vector IR (fpext half -> float, llvm.fmuladd): vcvtph2ps where the CPU has
    F16C, fused multiply-add where it has FMA, separate multiply and add elsewhere."""
    if not _literals(n_rows, n_tok):
        return None
    if not (n_rows.literal_value <= F16_TILE and n_rows.literal_value * n_tok.literal_value
            <= F16_ACC):
        raise ValueError(f"f16_tile {n_rows.literal_value} x {n_tok.literal_value} exceeds "
                         f"{F16_TILE} rows / {F16_ACC} accumulators")
    sig = types.void(n_rows, n_tok, types.intp, types.intp, types.intp, types.intp, types.intp,
                     types.intp)
    return sig, _f16_codegen(n_rows.literal_value, n_tok.literal_value)


def _f16_codegen(n_rows: int, n_tok: int, gather: bool = False):
    """LLVM IR emitter of f16_tile, or of f16_rows (gather: one address per row)."""
    f32x16 = ir.VectorType(ir.FloatType(), 16)
    f16x16 = ir.VectorType(ir.HalfType(), 16)

    def codegen(context, builder, signature, args):
        if gather:
            row_addrs, (ha, n, oa), hs = args[:n_rows], args[n_rows:], _const(0)
        else:
            _, _, ea, es, ha, hs, n, oa = args
            row_addrs = [builder.add(ea, builder.mul(es, _const(i))) for i in range(n_rows)]
        fmuladd = _declare(builder.module, "llvm.fmuladd.v16f32", f32x16, [f32x16] * 3)
        e_rows = [builder.inttoptr(a, _I8.as_pointer()) for a in row_addrs]
        h_base = builder.inttoptr(ha, _I8.as_pointer())
        acc_base = builder.inttoptr(oa, ir.FloatType().as_pointer())

        def load(base, offset, vt):
            ptr = builder.bitcast(builder.gep(base, [offset]), vt.as_pointer())
            return builder.load(ptr, align=1)

        def acc_ptr(i, j):
            p = builder.gep(acc_base, [ir.Constant(_I64, (i * n_tok + j) * F16_LANES)])
            return builder.bitcast(p, f32x16.as_pointer())

        accs = [[cgutils.alloca_once_value(builder, builder.load(acc_ptr(i, j), align=4))
                 for j in range(n_tok)] for i in range(n_rows)]
        with cgutils.for_range(builder, n) as loop:
            ke = builder.mul(loop.index, ir.Constant(_I64, 32))  # 16 halfs
            kh = builder.mul(loop.index, ir.Constant(_I64, 64))  # 16 floats
            ev = [builder.fpext(load(e_rows[i], ke, f16x16), f32x16) for i in range(n_rows)]
            hv = [load(h_base, builder.add(kh, builder.mul(hs, ir.Constant(_I64, j))), f32x16)
                  for j in range(n_tok)]
            for i in range(n_rows):
                for j in range(n_tok):
                    r = builder.call(fmuladd, [ev[i], hv[j], builder.load(accs[i][j])])
                    builder.store(r, accs[i][j])
        for i in range(n_rows):
            for j in range(n_tok):
                builder.store(builder.load(accs[i][j]), acc_ptr(i, j), align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def f16_rows(typingctx, a0, a1, a2, a3, h_addr, n_steps, acc_addr):
    """f16_tile for 4 F16 rows at any 4 addresses and one token: acc[i, :] += lanes of
    sum_k float(E_i[k]) * h[k], the same chains of fused multiply-adds as f16_tile."""
    sig = types.void(*([types.intp] * 7))
    return sig, _f16_codegen(4, 1, gather=True)
