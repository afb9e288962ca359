"""int8 dot products on AMX tiles (Intel Advanced Matrix Extensions, AMX-INT8).

An AMX tile register holds up to 16 rows of 64 bytes; `tdpbsud` multiplies an int8 tile
A[M, 64] (signed: the activations) by a uint8 tile B[16, 64] (unsigned: the ternary codes
0..2) in the VNNI layout, B row s, byte 4 col + i = W[col, 4 s + i], and adds the int32 sums
into C[M, 16]:  C[m, col] += sum_s sum_i A[m, 4 s + i] B[s, 4 col + i].
That is exactly the broadcast layout `simd.unpack16` writes (64 bytes per step of 4 k, one
16-row block after another), so the codes unpacked for the VNNI tiles serve as B tiles as they
are; the sums are the same integers as every other path's (int32, exact), only faster: one
instruction does 16 x 16 x 64 multiply-adds.

    tile_pass     configure, then C tiles 0..3 (4 blocks of 16 output rows) += A . B over
                  n steps of 64 k: A alternating in tiles 4/5, B in tiles 6/7 (int8 A x
                  uint8 B: the ternary matmul); tile_pass_us: uint8 A x int8 B (the int8
                  LM head, whose rows are stored in the same layout)
    tile_release  the tiles back to their initial state
(`ternary.ternary_matmul_amx` and `lm_head.lm_head_int8_amx` drive them.)

Linux gives a process the AMX register state only on request (arch_prctl
ARCH_REQ_XCOMP_PERM); `amx_usable()` asks once.  Tile configuration is per thread: each worker
of a parallel kernel loads its own once (`ldtilecfg`) and releases the tiles when done.
"""
from __future__ import annotations

import ctypes
import functools
import platform
import sys

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .cpu import jit
from .simd import COLS, VEC

TILE_ROWS = 16  # tokens per A / C tile (the tile height)
TILE_K = 64  # k per tdpbsud (a tile row: 64 bytes)
N_C = 4  # C tiles: the 4 blocks of 16 output rows of one task
CONFIG_BYTES = 64  # ldtilecfg's memory operand

_I8, _I64 = ir.IntType(8), ir.IntType(64)
_P = _I8.as_pointer()
_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.lru_cache(maxsize=1)
def amx_usable() -> bool:
    """True when this process may execute AMX-INT8 (the OS granted the tile state)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def require_amx(what: str) -> None:
    """Raise a ValueError naming `what` unless AMX-INT8 is usable (asks the OS once per process)."""
    if not amx_usable():
        raise ValueError(f"{what} 'amx' needs AMX-INT8 and the OS's tile state")


def _void_fn(module, name, args):
    return cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), args), name)


def _tile_pass_codegen(dot: str):
    """The codegen of tile_pass with dot-product instruction `dot` (tdpbsud / tdpbusd)."""

    def codegen(context, builder, signature, args):
        cfg, a, a_st, b, b_vs, c, c_st, n, load = args
        mod = builder.module
        ldcfg = _void_fn(mod, "llvm.x86.ldtilecfg", [_P])
        tload = _void_fn(mod, "llvm.x86.tileloadd64", [_I8, _P, _I64])
        tzero = _void_fn(mod, "llvm.x86.tilezero", [_I8])
        tdp = _void_fn(mod, f"llvm.x86.{dot}", [_I8, _I8, _I8])
        tstore = _void_fn(mod, "llvm.x86.tilestored64", [_I8, _P, _I64])

        def ptr(x):
            return builder.inttoptr(x, _P)

        def t(i):
            return ir.Constant(_I8, i)

        def c_ptr(i):
            return ptr(builder.add(c, ir.Constant(_I64, 4 * COLS * i)))

        with builder.if_then(builder.icmp_signed("!=", cfg, ir.Constant(_I64, 0))):
            builder.call(ldcfg, [ptr(cfg)])
        with builder.if_else(builder.icmp_signed("!=", load, ir.Constant(_I64, 0))) as (yes, no):
            with yes:
                for i in range(N_C):
                    builder.call(tload, [t(i), c_ptr(i), c_st])
            with no:
                for i in range(N_C):
                    builder.call(tzero, [t(i)])
        b_step = ir.Constant(_I64, TILE_ROWS * VEC)  # one step: 16 B rows of 64 bytes

        def step(idx, ta, tb0):
            # k step idx: A into tile ta, the 4 B tiles alternating between tb0 and tb0 + 1
            builder.call(tload, [t(ta), ptr(builder.add(a, builder.mul(idx, ir.Constant(
                _I64, TILE_K)))), a_st])
            base = builder.add(b, builder.mul(idx, b_step))
            for i in range(N_C):
                tb = tb0 + i % 2
                builder.call(tload, [t(tb), ptr(builder.add(base, builder.mul(
                    b_vs, ir.Constant(_I64, i)))), ir.Constant(_I64, VEC)])
                builder.call(tdp, [t(i), t(ta), t(tb)])

        # two k steps per iteration (A alternates between tiles 4 and 5), then an odd last one
        pairs = builder.udiv(n, ir.Constant(_I64, 2))
        with cgutils.for_range(builder, pairs) as loop:
            s0 = builder.mul(loop.index, ir.Constant(_I64, 2))
            step(s0, 4, 6)
            step(builder.add(s0, ir.Constant(_I64, 1)), 5, 6)
        odd = builder.icmp_unsigned("!=", builder.urem(n, ir.Constant(_I64, 2)),
                                    ir.Constant(_I64, 0))
        with builder.if_then(odd):
            step(builder.sub(n, ir.Constant(_I64, 1)), 4, 6)
        for i in range(N_C):
            builder.call(tstore, [t(i), c_ptr(i), c_st])
        return context.get_dummy_value()

    return codegen


_TILE_SIG = types.void(*([types.intp] * 9))


@intrinsic
def tile_pass(typingctx, cfg_addr, a_addr, a_stride, b_addr, b_vstride, c_addr, c_stride,
              n_steps, load_c):
    """Load the tile configuration at cfg_addr (0: keep the loaded one), then C_c (c < 4) =
    load_c ? C[:, 16 c ..] : 0, C_c += A[:, 64 s ..] . B_c[s] for s < n_steps (A: byte rows
    a_stride apart; B_c: 16 rows of 64 bytes per step at b_addr + c b_vstride + 1024 s), and
    store C_c back (c_stride bytes between rows).  Tile shapes come from the configuration
    (rows of A and C: the tokens).  A signed (int8 activations), B unsigned (ternary codes):
    tdpbsud."""
    return _TILE_SIG, _tile_pass_codegen("tdpbsud")


@intrinsic
def tile_pass_us(typingctx, cfg_addr, a_addr, a_stride, b_addr, b_vstride, c_addr, c_stride,
                 n_steps, load_c):
    """tile_pass with A unsigned (activations + 128) and B signed (int8 LM-head rows):
    tdpbusd."""
    return _TILE_SIG, _tile_pass_codegen("tdpbusd")


@intrinsic
def tile_release(typingctx):
    """Return the tile registers to their initial state (cheaper context switches)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.call(_void_fn(builder.module, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()

    return sig, codegen


@jit
def tile_config(rows):
    # ldtilecfg's operand: palette 1; tiles 0..5 (C, A) `rows` rows of 64 bytes, tiles 6, 7 (B)
    # 16 rows
    cfg = np.zeros(CONFIG_BYTES, np.uint8)
    cfg[0] = 1
    for i in range(8):
        cfg[16 + 2 * i] = VEC  # colsb, little-endian uint16
        cfg[48 + i] = rows if i < 6 else TILE_ROWS
    return cfg


def whole_tiles(a: np.ndarray, fill: int) -> np.ndarray:
    """a[M, K] with rows added (value `fill`) up to a multiple of TILE_ROWS (a itself if it has
    them): every A tile then has 16 rows, so one tile configuration serves a whole kernel."""
    if a.shape[0] % TILE_ROWS == 0:
        return a
    out = np.full((-(-a.shape[0] // TILE_ROWS) * TILE_ROWS, a.shape[1]), fill, a.dtype)
    out[:a.shape[0]] = a
    return out
