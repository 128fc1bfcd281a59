"""Triton backend of the four BN-activation ops.

Same signatures and semantics as the executable contract ``resfused/ops/eager.py``:
``bn_stats``, ``bn_act_fwd``, ``bn_act_bwd_reduce``, ``bn_act_bwd_apply``, and
``bn_act_bwd_apply_acc`` (the apply kernels with ``accum`` set: dx is added into a tensor
with x's strides, read and written in place).

Layouts (chosen from ``x.is_contiguous()``; otherwise x is channels_last-contiguous):

* NCHW: the tensor is ``N*C`` rows of ``HW`` contiguous elements. Every kernel works
  on tiles ``[ROWS, BLOCK_HW]`` (``ROWS*BLOCK_HW`` = ``TILE``, ``TILE_FP64`` for fp64)
  of ``ROWS`` images of ONE channel, so per-channel values are scalars in the program
  (a tile across channels replicates them per row and costs ~2x the registers).
* NHWC: the tensor is a ``[N*H*W, C]`` matrix; tiles ``[BLOCK_M, BLOCK_C]`` are
  coalesced along C.
* The apply and backward-reduction kernels also read x as a channel-prefix view
  ``wide[:, :C]`` of a wider NCHW or channels_last tensor (a dense block's layer reading
  its prefix of the feature buffer): x's images (NCHW) or pixel rows (NHWC) then hold
  ``XC`` > C channels. Every other tensor, and every output, is contiguous in x's layout.

Statistics use shifted sums around a per-channel pivot (the channel's first element,
``x[0, c, 0, 0]``) accumulated in fp32 (fp64 for fp64 x). Reductions are two-stage and
deterministic: each program writes its partial sums to a workspace ``[P, rows, C]``;
a small finalize kernel sums the ``P`` partials in a fixed order. No atomics.

Optional operands (residual, its affine, the mask source, the residual's stats or
coefficients) are runtime flags, not constexprs: an absent operand is a masked-off load
(no memory traffic) whose neutral value makes the arithmetic exact (``r*1 + 0``). The
JIT would still specialise every integer argument on being 1 or a multiple of 16, one
compiled variant per combination of flags and sizes met; flags, batch sizes and loop
bounds are therefore marked ``do_not_specialize`` (``UNSPECIALIZED``), and only the
contiguous extent the loads vectorise along (HW for NCHW, C for NHWC and the finalize
kernels) keeps its specialisation. Each kernel then has at most three compiled variants
per (dtype, tile shape): that extent 1, a multiple of 16, or neither. The (dtype, tile)
variants the launchers can use are listed in ``KERNELS`` / ``BLOCKS`` / ``DTYPES``
below; the AOT check (``resfused.triton.aot``) compiles exactly those.

Arithmetic is in the accumulation dtype (fp32, fp64 for fp64 x); ``x*scale + shift``
may be contracted to an FMA by the compiler (ulp-level difference to eager).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import on_device

# --------------------------------------------------------------------------------------
# variants: everything the launchers can compile lives here (aot.py iterates over it)
# --------------------------------------------------------------------------------------

#: elements per tile of every layout kernel (8 per thread at 8 warps); half that for
#: float64, whose registers are twice as wide (sm_80's ptxas spilled at 2048)
TILE = 2048
TILE_FP64 = 1024
#: candidate tile widths: BLOCK_HW for NCHW (ROWS = tile // BLOCK_HW),
#: BLOCK_C for NHWC (BLOCK_M = tile // BLOCK_C)
BLOCKS = {"nchw": (64, 256, 1024), "nhwc": (32, 64, 128)}
#: tile of the finalize kernels ([BLOCK_P partials, BLOCK_C channels])
FIN_BLOCK_P = 16
FIN_BLOCK_C = 128
#: tile_stats: above this many partials, chunks of at least this many are merged by one
#: program each (about TILE_STATS_CHUNKS programs per channel block), then the chunks
TILE_STATS_CHUNK = 64
TILE_STATS_CHUNKS = 64
#: data dtypes the kernels are compiled for
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: programs per SM aimed at by the partial-reduction grids
_PROGRAMS_PER_SM = 4
#: stand-in SM count for CPU tensors (Triton interpreter); small, to keep it quick
CPU_SMS = 2

#: pointer arguments that carry x's dtype; every other ``*_ptr`` is in the
#: accumulation dtype (per-channel tensors and workspaces)
DATA_PTRS = frozenset({"x_ptr", "g_ptr", "res_ptr", "out_ptr", "dx_ptr", "dres_ptr", "dz_ptr"})
#: @triton.jit helpers that are inlined into kernels, never launched on their own
JIT_HELPERS = frozenset({"_relu_keep", "_x_term", "_cast_out", "_nchw_tile"})
#: runtime 0/1 (relu_mode: 0/1/2) flag arguments; every other non-constexpr scalar is a size
FLAG_ARGS = frozenset({"has_res", "res_aff", "relu", "use_res", "res_st", "res_coef", "relu_mode", "write_dz",
                       "accum", "has_w", "has_b", "update", "shifted"})
#: float scalar arguments (fp32: the JIT passes a Python float as one)
FLOAT_ARGS = frozenset({"momentum", "keep", "eps", "unbias"})
#: integer arguments the JIT must not specialise (on == 1 or % 16 == 0): the flags, and
#: sizes no vectorised load depends on. Left specialised: HW in the NCHW kernels (offsets
#: are ``(n*C + c)*HW + hw``), C and XC in the NHWC ones (``m*C + c``, x's ``m*XC + c``),
#: C / K in the finalize kernels.
UNSPECIALIZED = {
    "nchw": tuple(sorted(FLAG_ARGS | {"N", "C", "XC", "n_hwb", "n_units", "units_per_prog"})),
    "nhwc": tuple(sorted(FLAG_ARGS | {"M", "rows_per_prog"})),
    None: ("P", "count", "per_prog", "piv_count"),
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_constexprs(layout: str, block: int, dtype: torch.dtype) -> Dict[str, int]:
    """The constexpr tile arguments of a layout kernel for one entry of ``BLOCKS``."""
    if block not in BLOCKS[layout]:
        raise ValueError(f"block {block} is not a {layout} variant {BLOCKS[layout]}")
    tile = TILE_FP64 if dtype == torch.float64 else TILE
    if layout == "nchw":
        return {"ROWS": tile // block, "BLOCK_HW": block}
    return {"BLOCK_M": tile // block, "BLOCK_C": block}


FIN_CONSTEXPRS = {"BLOCK_P": FIN_BLOCK_P, "BLOCK_C": FIN_BLOCK_C}


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------

#: The Triton interpreter (3.8) casts fp32 -> bf16 by truncation; GPUs round to nearest
#: even. Under the interpreter, round by hand so CPU results match what a GPU stores.
_EXACT_BF16_CAST = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _cast_out(v, ptr):
    """v (accumulation dtype) cast to ptr's element type, round-to-nearest-even."""
    ty = ptr.dtype.element_ty
    if _EXACT_BF16_CAST:
        if ty == tl.bfloat16:
            v = v.to(tl.float32)
            b = v.to(tl.uint32, bitcast=True)
            r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            b = tl.where(v != v, b | 0x400000, r)  # NaN stays (quiet) NaN
            v = b.to(tl.float32, bitcast=True)  # exactly representable in bf16 now
    return v.to(ty)



@triton.jit
def _relu_keep(x, o, r, scale, shift, rs, rb, relu_mode):
    """Backward ReLU mask: everything (mode 0), ``not out <= 0`` (1) or ``not z <= 0``
    recomputed (2): relu's backward (threshold_backward) passes the gradient where the
    output is NaN."""
    z = x * scale + shift + (r * rs + rb)
    return (relu_mode == 0) | ((relu_mode == 1) & ~(o <= 0)) | ((relu_mode == 2) & ~(z <= 0))


@triton.jit
def _x_term(x, mean, p):
    """``(x - mean) * p``, or 0 where ``p == 0`` (eval: the gradient does not depend on x
    nor on the running mean, so an infinite x, or a non-finite running mean, gives a
    finite gradient, as eager's). x and mean are replaced by 0 before the arithmetic
    rather than the product after it: fewer live values (fp64 NCHW spilled on sm_90 the
    other way)."""
    m = tl.where(p == 0, 0, mean)
    return (tl.where(p == 0, m, x) - m) * p


@triton.jit
def _nchw_tile(u, c, N, C, XC, HW, n_hwb, ROWS: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and mask of NCHW tile ``u`` of channel c: ROWS images x BLOCK_HW pixels;
    offsets in a tensor of C channels and in x, whose images hold XC channels (C, or more
    for a channel-prefix view). Both stay multiples of HW, so the loads vectorise alike."""
    ng = u // n_hwb
    n = ng * ROWS + tl.arange(0, ROWS)
    hw = (u - ng * n_hwb) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    m = (n < N)[:, None] & (hw < HW)[None, :]
    n64 = n.to(tl.int64)
    offs = ((n64 * C + c) * HW)[:, None] + hw[None, :]
    xoffs = ((n64 * XC + c) * HW)[:, None] + hw[None, :]
    return offs, xoffs, m


# ---- statistics: partial shifted sums ------------------------------------------------


@triton.jit(do_not_specialize=UNSPECIALIZED["nchw"])
def _stats_part_nchw(x_ptr, ws_ptr, N, C, HW, n_hwb, n_units, units_per_prog,
                     ROWS: tl.constexpr, BLOCK_HW: tl.constexpr):
    # grid (C, P); a unit is (group of ROWS images, block of BLOCK_HW pixels) of channel c
    acc_ty = ws_ptr.dtype.element_ty
    c = tl.program_id(0)
    p = tl.program_id(1)
    pivot = tl.load(x_ptr + c.to(tl.int64) * HW).to(acc_ty)
    s1 = tl.zeros([ROWS, BLOCK_HW], dtype=acc_ty)
    s2 = tl.zeros([ROWS, BLOCK_HW], dtype=acc_ty)
    u0 = p * units_per_prog
    u1 = tl.minimum(u0 + units_per_prog, n_units)
    for u in range(u0, u1):
        offs, _, m = _nchw_tile(u, c, N, C, C, HW, n_hwb, ROWS, BLOCK_HW)
        x = tl.load(x_ptr + offs, mask=m, other=0).to(acc_ty)
        d = tl.where(m, x - pivot, 0)
        s1 += d
        s2 += d * d
    base = ws_ptr + p * 3 * C + c
    tl.store(base, tl.sum(tl.sum(s1, axis=1), axis=0))
    tl.store(base + C, tl.sum(tl.sum(s2, axis=1), axis=0))
    tl.store(base + 2 * C, pivot)


@triton.jit(do_not_specialize=UNSPECIALIZED["nhwc"])
def _stats_part_nhwc(x_ptr, ws_ptr, M, C, rows_per_prog,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (cdiv(C, BLOCK_C), P); program p reduces rows [p*rows_per_prog, +rows_per_prog)
    acc_ty = ws_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1)
    cmask = cols < C
    pivot = tl.load(x_ptr + cols, mask=cmask, other=0).to(acc_ty)
    s1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    s2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    r0 = p * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    for m0 in range(r0, r1, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m = (rows < r1)[:, None] & cmask[None, :]
        offs = (rows.to(tl.int64) * C)[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0).to(acc_ty)
        d = tl.where(m, x - pivot[None, :], 0)
        s1 += d
        s2 += d * d
    base = ws_ptr + p * 3 * C + cols
    tl.store(base, tl.sum(s1, axis=0), mask=cmask)
    tl.store(base + C, tl.sum(s2, axis=0), mask=cmask)
    tl.store(base + 2 * C, pivot, mask=cmask)


@triton.jit(do_not_specialize=UNSPECIALIZED[None])
def _stats_finalize(ws_ptr, mean_ptr, var_ptr, P, C, count,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # ws [P, 3, C]: (sum(x - pivot), sum((x - pivot)^2), pivot)
    acc_ty = ws_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = (ps < P)[:, None] & cmask[None, :]
        offs = (ps * 3 * C)[:, None] + cols[None, :]
        s1 += tl.load(ws_ptr + offs, mask=m, other=0)
        s2 += tl.load(ws_ptr + offs + C, mask=m, other=0)
    pivot = tl.load(ws_ptr + 2 * C + cols, mask=cmask, other=0)
    cnt = count.to(acc_ty)
    if acc_ty == tl.float32:  # correctly rounded (the default fp32 division lowering approximates)
        d = tl.math.div_rn(tl.sum(s1, axis=0), cnt)
        var = tl.math.div_rn(tl.sum(s2, axis=0), cnt) - d * d
    else:  # float64 division is correctly rounded
        d = tl.sum(s1, axis=0) / cnt
        var = tl.sum(s2, axis=0) / cnt - d * d
    var = tl.where(var < 0, 0, var)  # keeps NaN (tl.maximum would drop it)
    tl.store(mean_ptr + cols, pivot + d, mask=cmask)
    tl.store(var_ptr + cols, var, mask=cmask)


@triton.jit(do_not_specialize=UNSPECIALIZED[None])
def _tile_stats_finalize(ws_ptr, piv_ptr, out_ptr, var_ptr, P, C, count, rows, per_prog, piv_count, shifted,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # ws [P, 2, C]: per tile of ``rows`` values (the last tile: the rest of ``count``),
    # (sum y, sum (y - tile mean)^2); with ``shifted``, sums of (y - pivot) instead (a
    # first launch's chunks). The pivot, per channel, is the first tile's mean:
    # piv[0, c] / piv_count (piv: the original tiles). Program (channel block, k) merges
    # tiles [k*per_prog, (k+1)*per_prog) by Chan's formula in float64 on y - pivot (no
    # cancellation however large the mean): mean = sum / n, M2 = sum M2_p +
    # sum n_p (mean_p - mean)^2. With one program along k it writes pivot + mean to out
    # and the biased variance (clamped at 0) to var; with several, its chunk's partial
    # (sum (y - pivot), M2) to out[k] ([S, 2, C]), which a second launch (shifted = 1,
    # rows = per_prog*rows) merges the same way.
    k = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    pivot = tl.load(piv_ptr + cols, mask=cmask, other=0).to(tl.float64) / piv_count.to(tl.float64)
    unshift = tl.where(shifted != 0, 0.0, 1.0).to(tl.float64)
    cnt = count.to(tl.int64)
    rw = rows.to(tl.int64)
    p_lo = k.to(tl.int64) * per_prog
    p_hi = tl.minimum(P, p_lo + per_prog)
    n_all = (tl.minimum(cnt, p_hi * rw) - p_lo * rw).to(tl.float64)
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        m = (ps < p_hi)[:, None] & cmask[None, :]
        n = tl.maximum(tl.minimum(cnt - ps * rw, rw), 1).to(tl.float64)[:, None]
        t1 = tl.load(ws_ptr + (ps * 2 * C)[:, None] + cols[None, :], mask=m, other=0).to(tl.float64)
        s1 += tl.where(m, t1 - unshift * n * pivot[None, :], 0)
    total = tl.sum(s1, axis=0)
    mean = total / n_all
    q = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        m = (ps < p_hi)[:, None] & cmask[None, :]
        offs = (ps * 2 * C)[:, None] + cols[None, :]
        n = tl.maximum(tl.minimum(cnt - ps * rw, rw), 1).to(tl.float64)[:, None]
        t1 = tl.load(ws_ptr + offs, mask=m, other=0).to(tl.float64) - unshift * n * pivot[None, :]
        m2 = tl.load(ws_ptr + offs + C, mask=m, other=0).to(tl.float64)
        d = t1 / n - mean[None, :]
        q += tl.where(m, m2 + n * d * d, 0)
    m2_all = tl.sum(q, axis=0)
    if tl.num_programs(1) == 1:
        var = m2_all / n_all
        var = tl.where(var < 0, 0, var)  # keeps NaN (tl.maximum would drop it)
        tl.store(out_ptr + cols, (pivot + mean).to(out_ptr.dtype.element_ty), mask=cmask)
        tl.store(var_ptr + cols, var.to(var_ptr.dtype.element_ty), mask=cmask)
    else:
        base = out_ptr + k.to(tl.int64) * 2 * C + cols
        tl.store(base, total.to(out_ptr.dtype.element_ty), mask=cmask)
        tl.store(base + C, m2_all.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=("has_w", "has_b", "update"))
def _bn_coef(mean_ptr, var_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, aff_ptr, st_ptr, C, momentum, keep, eps, unbias,
             has_w, has_b, update, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # eager.bn_coef, one channel per lane (BLOCK_P unused: the finalize kernels' constexprs)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = tl.load(mean_ptr + cols, mask=cmask, other=0)
    v = tl.load(var_ptr + cols, mask=cmask, other=1)
    um = cmask & (update != 0)
    rm = tl.load(rm_ptr + cols, mask=um, other=0)
    rv = tl.load(rv_ptr + cols, mask=um, other=0)
    tl.store(rm_ptr + cols, momentum * m + keep * rm, mask=um)
    tl.store(rv_ptr + cols, momentum * (v * unbias) + keep * rv, mask=um)
    if m.dtype == tl.float32:  # correctly rounded, as torch's ops (the default lowering approximates)
        invstd = tl.math.div_rn(tl.full([BLOCK_C], 1.0, m.dtype), tl.sqrt_rn(v + eps))
    else:  # float64 sqrt and division are correctly rounded
        invstd = 1.0 / tl.sqrt(v + eps)
    w = tl.load(w_ptr + cols, mask=cmask & (has_w != 0), other=1)
    scale = tl.where(has_w != 0, w * invstd, invstd)
    b = tl.load(b_ptr + cols, mask=cmask & (has_b != 0), other=0)
    tl.store(aff_ptr + cols, scale, mask=cmask)
    tl.store(aff_ptr + C + cols, b - m * scale, mask=cmask)
    tl.store(st_ptr + cols, m, mask=cmask)
    tl.store(st_ptr + C + cols, invstd, mask=cmask)


@triton.jit(do_not_specialize=UNSPECIALIZED[None])
def _colsum(ws_ptr, out_ptr, P, K, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # out[k] = sum_p ws[p, k], in order p = 0..P-1 blocks (deterministic)
    acc_ty = ws_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < K
    s = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = (ps < P)[:, None] & cmask[None, :]
        s += tl.load(ws_ptr + (ps.to(tl.int64) * K)[:, None] + cols[None, :], mask=m, other=0)
    tl.store(out_ptr + cols, tl.sum(s, axis=0), mask=cmask)


# ---- forward apply -------------------------------------------------------------------


@triton.jit(do_not_specialize=UNSPECIALIZED["nchw"])
def _fwd_nchw(x_ptr, aff_ptr, res_ptr, raff_ptr, out_ptr, N, C, XC, HW, n_hwb, has_res, res_aff, relu,
              ROWS: tl.constexpr, BLOCK_HW: tl.constexpr):
    # grid (cdiv(N, ROWS) * n_hwb, C): ROWS images x BLOCK_HW pixels of one channel, so the
    # per-channel values are scalars (a tile across channels would replicate them per row)
    acc_ty = aff_ptr.dtype.element_ty
    u = tl.program_id(0)
    c = tl.program_id(1)
    offs, xoffs, m = _nchw_tile(u, c, N, C, XC, HW, n_hwb, ROWS, BLOCK_HW)
    scale = tl.load(aff_ptr + c)
    shift = tl.load(aff_ptr + C + c)
    rs = tl.load(raff_ptr + c, mask=res_aff != 0, other=1)
    rb = tl.load(raff_ptr + C + c, mask=res_aff != 0, other=0)
    x = tl.load(x_ptr + xoffs, mask=m, other=0).to(acc_ty)
    r = tl.load(res_ptr + offs, mask=m & (has_res != 0), other=0).to(acc_ty)
    z = x * scale + shift + (r * rs + rb)
    z = tl.where((z < 0) & (relu != 0), 0, z)  # NaN stays NaN, like torch.relu
    tl.store(out_ptr + offs, _cast_out(z, out_ptr), mask=m)


@triton.jit(do_not_specialize=UNSPECIALIZED["nhwc"])
def _fwd_nhwc(x_ptr, aff_ptr, res_ptr, raff_ptr, out_ptr, M, C, XC, has_res, res_aff, relu,
              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C))
    acc_ty = aff_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    scale = tl.load(aff_ptr + cols, mask=cmask, other=0)
    shift = tl.load(aff_ptr + C + cols, mask=cmask, other=0)
    ra = cmask & (res_aff != 0)
    rs = tl.load(raff_ptr + cols, mask=ra, other=1)
    rb = tl.load(raff_ptr + C + cols, mask=ra, other=0)
    m = (rows < M)[:, None] & cmask[None, :]
    offs = (rows.to(tl.int64) * C)[:, None] + cols[None, :]
    xoffs = (rows.to(tl.int64) * XC)[:, None] + cols[None, :]
    x = tl.load(x_ptr + xoffs, mask=m, other=0).to(acc_ty)
    r = tl.load(res_ptr + offs, mask=m & (has_res != 0), other=0).to(acc_ty)
    z = x * scale[None, :] + shift[None, :] + (r * rs[None, :] + rb[None, :])
    z = tl.where((z < 0) & (relu != 0), 0, z)
    tl.store(out_ptr + offs, _cast_out(z, out_ptr), mask=m)


# ---- backward reduction: partial (sum dz, sum dz*x_hat, sum dz*r_hat) -----------------


@triton.jit(do_not_specialize=UNSPECIALIZED["nchw"])
def _bwd_reduce_part_nchw(g_ptr, x_ptr, out_ptr, res_ptr, aff_ptr, st_ptr, raff_ptr, rst_ptr, ws_ptr, dz_ptr,
                          N, C, XC, HW, n_hwb, n_units, units_per_prog,
                          use_res, res_aff, res_st, relu_mode, write_dz,
                          ROWS: tl.constexpr, BLOCK_HW: tl.constexpr):
    # grid (C, P); ws [P, 2 + res_st, C]; dz written when write_dz
    acc_ty = ws_ptr.dtype.element_ty
    c = tl.program_id(0)
    p = tl.program_id(1)
    scale = tl.load(aff_ptr + c)
    shift = tl.load(aff_ptr + C + c)
    mean = tl.load(st_ptr + c)
    invstd = tl.load(st_ptr + C + c)
    rs = tl.load(raff_ptr + c, mask=res_aff != 0, other=1)
    rb = tl.load(raff_ptr + C + c, mask=res_aff != 0, other=0)
    rmean = tl.load(rst_ptr + c, mask=res_st != 0, other=0)
    rinv = tl.load(rst_ptr + C + c, mask=res_st != 0, other=0)
    a0 = tl.zeros([ROWS, BLOCK_HW], dtype=acc_ty)
    a1 = tl.zeros([ROWS, BLOCK_HW], dtype=acc_ty)
    a2 = tl.zeros([ROWS, BLOCK_HW], dtype=acc_ty)
    u0 = p * units_per_prog
    u1 = tl.minimum(u0 + units_per_prog, n_units)
    for u in range(u0, u1):
        offs, xoffs, m = _nchw_tile(u, c, N, C, XC, HW, n_hwb, ROWS, BLOCK_HW)
        g = tl.load(g_ptr + offs, mask=m, other=0).to(acc_ty)
        x = tl.load(x_ptr + xoffs, mask=m, other=0).to(acc_ty)
        o = tl.load(out_ptr + offs, mask=m & (relu_mode == 1), other=0).to(acc_ty)
        r = tl.load(res_ptr + offs, mask=m & (use_res != 0), other=0).to(acc_ty)
        keep = _relu_keep(x, o, r, scale, shift, rs, rb, relu_mode)
        dz = tl.where(keep & m, g, 0)
        tl.store(dz_ptr + offs, _cast_out(dz, dz_ptr), mask=m & (write_dz != 0))
        a0 += dz
        a1 += dz * ((x - mean) * invstd)
        a2 += dz * ((r - rmean) * rinv)
    base = ws_ptr + p * (2 + res_st) * C + c
    tl.store(base, tl.sum(tl.sum(a0, axis=1), axis=0))
    tl.store(base + C, tl.sum(tl.sum(a1, axis=1), axis=0))
    tl.store(base + 2 * C, tl.sum(tl.sum(a2, axis=1), axis=0), mask=res_st != 0)


@triton.jit(do_not_specialize=UNSPECIALIZED["nhwc"])
def _bwd_reduce_part_nhwc(g_ptr, x_ptr, out_ptr, res_ptr, aff_ptr, st_ptr, raff_ptr, rst_ptr, ws_ptr, dz_ptr,
                          M, C, XC, rows_per_prog, use_res, res_aff, res_st, relu_mode, write_dz,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (cdiv(C, BLOCK_C), P); ws [P, 2 + res_st, C]; dz written when write_dz
    acc_ty = ws_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1)
    cmask = cols < C
    scale = tl.load(aff_ptr + cols, mask=cmask, other=0)[None, :]
    shift = tl.load(aff_ptr + C + cols, mask=cmask, other=0)[None, :]
    mean = tl.load(st_ptr + cols, mask=cmask, other=0)[None, :]
    invstd = tl.load(st_ptr + C + cols, mask=cmask, other=0)[None, :]
    ra = cmask & (res_aff != 0)
    rs = tl.load(raff_ptr + cols, mask=ra, other=1)[None, :]
    rb = tl.load(raff_ptr + C + cols, mask=ra, other=0)[None, :]
    rsm = cmask & (res_st != 0)
    rmean = tl.load(rst_ptr + cols, mask=rsm, other=0)[None, :]
    rinv = tl.load(rst_ptr + C + cols, mask=rsm, other=0)[None, :]
    a0 = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    a1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    a2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    r0 = p * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    for m0 in range(r0, r1, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m = (rows < r1)[:, None] & cmask[None, :]
        offs = (rows.to(tl.int64) * C)[:, None] + cols[None, :]
        xoffs = (rows.to(tl.int64) * XC)[:, None] + cols[None, :]
        g = tl.load(g_ptr + offs, mask=m, other=0).to(acc_ty)
        x = tl.load(x_ptr + xoffs, mask=m, other=0).to(acc_ty)
        o = tl.load(out_ptr + offs, mask=m & (relu_mode == 1), other=0).to(acc_ty)
        r = tl.load(res_ptr + offs, mask=m & (use_res != 0), other=0).to(acc_ty)
        keep = _relu_keep(x, o, r, scale, shift, rs, rb, relu_mode)
        dz = tl.where(keep & m, g, 0)
        tl.store(dz_ptr + offs, _cast_out(dz, dz_ptr), mask=m & (write_dz != 0))
        a0 += dz
        a1 += dz * ((x - mean) * invstd)
        a2 += dz * ((r - rmean) * rinv)
    base = ws_ptr + p * (2 + res_st) * C + cols
    tl.store(base, tl.sum(a0, axis=0), mask=cmask)
    tl.store(base + C, tl.sum(a1, axis=0), mask=cmask)
    tl.store(base + 2 * C, tl.sum(a2, axis=0), mask=rsm)


# ---- backward apply ------------------------------------------------------------------


@triton.jit(do_not_specialize=UNSPECIALIZED["nchw"])
def _bwd_apply_nchw(g_ptr, x_ptr, out_ptr, res_ptr, aff_ptr, coef_ptr, raff_ptr, rcoef_ptr, dx_ptr, dres_ptr,
                    N, C, XC, HW, n_hwb, use_res, res_aff, res_coef, has_res, relu_mode, accum,
                    ROWS: tl.constexpr, BLOCK_HW: tl.constexpr):
    # grid (cdiv(N, ROWS) * n_hwb, C), as _fwd_nchw; coef rows (mean, k, mdz, p).
    # accum: dx_ptr has x's strides and dx is added to what it holds
    acc_ty = aff_ptr.dtype.element_ty
    u = tl.program_id(0)
    c = tl.program_id(1)
    offs, xoffs, m = _nchw_tile(u, c, N, C, XC, HW, n_hwb, ROWS, BLOCK_HW)
    scale = tl.load(aff_ptr + c)
    shift = tl.load(aff_ptr + C + c)
    mean = tl.load(coef_ptr + c)
    k = tl.load(coef_ptr + C + c)
    mdz = tl.load(coef_ptr + 2 * C + c)
    pc = tl.load(coef_ptr + 3 * C + c)
    rs = tl.load(raff_ptr + c, mask=res_aff != 0, other=1)
    rb = tl.load(raff_ptr + C + c, mask=res_aff != 0, other=0)
    rmean = tl.load(rcoef_ptr + c, mask=res_coef != 0, other=0)
    rk = tl.load(rcoef_ptr + C + c, mask=res_coef != 0, other=0)
    rmdz = tl.load(rcoef_ptr + 2 * C + c, mask=res_coef != 0, other=0)
    rpc = tl.load(rcoef_ptr + 3 * C + c, mask=res_coef != 0, other=0)
    g = tl.load(g_ptr + offs, mask=m, other=0).to(acc_ty)
    x = tl.load(x_ptr + xoffs, mask=m, other=0).to(acc_ty)
    o = tl.load(out_ptr + offs, mask=m & (relu_mode == 1), other=0).to(acc_ty)
    r = tl.load(res_ptr + offs, mask=m & (use_res != 0), other=0).to(acc_ty)
    keep = _relu_keep(x, o, r, scale, shift, rs, rb, relu_mode)
    dz = tl.where(keep, g, 0)
    doffs = tl.where(accum != 0, xoffs, offs)
    prev = tl.load(dx_ptr + doffs, mask=m & (accum != 0), other=0).to(acc_ty)
    dx = (dz - mdz - _x_term(x, mean, pc)) * k + prev
    tl.store(dx_ptr + doffs, _cast_out(dx, dx_ptr), mask=m)
    dres = tl.where(res_coef != 0, (dz - rmdz - _x_term(r, rmean, rpc)) * rk, dz)
    tl.store(dres_ptr + offs, _cast_out(dres, dres_ptr), mask=m & (has_res != 0))


@triton.jit(do_not_specialize=UNSPECIALIZED["nhwc"])
def _bwd_apply_nhwc(g_ptr, x_ptr, out_ptr, res_ptr, aff_ptr, coef_ptr, raff_ptr, rcoef_ptr, dx_ptr, dres_ptr,
                    M, C, XC, use_res, res_aff, res_coef, has_res, relu_mode, accum,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)); coef rows (mean, k, mdz, p).
    # accum: dx_ptr has x's strides and dx is added to what it holds
    acc_ty = aff_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    scale = tl.load(aff_ptr + cols, mask=cmask, other=0)[None, :]
    shift = tl.load(aff_ptr + C + cols, mask=cmask, other=0)[None, :]
    mean = tl.load(coef_ptr + cols, mask=cmask, other=0)[None, :]
    k = tl.load(coef_ptr + C + cols, mask=cmask, other=0)[None, :]
    mdz = tl.load(coef_ptr + 2 * C + cols, mask=cmask, other=0)[None, :]
    pc = tl.load(coef_ptr + 3 * C + cols, mask=cmask, other=0)[None, :]
    ra = cmask & (res_aff != 0)
    rs = tl.load(raff_ptr + cols, mask=ra, other=1)[None, :]
    rb = tl.load(raff_ptr + C + cols, mask=ra, other=0)[None, :]
    rc = cmask & (res_coef != 0)
    rmean = tl.load(rcoef_ptr + cols, mask=rc, other=0)[None, :]
    rk = tl.load(rcoef_ptr + C + cols, mask=rc, other=0)[None, :]
    rmdz = tl.load(rcoef_ptr + 2 * C + cols, mask=rc, other=0)[None, :]
    rpc = tl.load(rcoef_ptr + 3 * C + cols, mask=rc, other=0)[None, :]
    m = (rows < M)[:, None] & cmask[None, :]
    offs = (rows.to(tl.int64) * C)[:, None] + cols[None, :]
    xoffs = (rows.to(tl.int64) * XC)[:, None] + cols[None, :]
    g = tl.load(g_ptr + offs, mask=m, other=0).to(acc_ty)
    x = tl.load(x_ptr + xoffs, mask=m, other=0).to(acc_ty)
    o = tl.load(out_ptr + offs, mask=m & (relu_mode == 1), other=0).to(acc_ty)
    r = tl.load(res_ptr + offs, mask=m & (use_res != 0), other=0).to(acc_ty)
    keep = _relu_keep(x, o, r, scale, shift, rs, rb, relu_mode)
    dz = tl.where(keep, g, 0)
    doffs = tl.where(accum != 0, xoffs, offs)
    prev = tl.load(dx_ptr + doffs, mask=m & (accum != 0), other=0).to(acc_ty)
    dx = (dz - mdz - _x_term(x, mean, pc)) * k + prev
    tl.store(dx_ptr + doffs, _cast_out(dx, dx_ptr), mask=m)
    dres = tl.where(res_coef != 0, (dz - rmdz - _x_term(r, rmean, rpc)) * rk, dz)
    tl.store(dres_ptr + offs, _cast_out(dres, dres_ptr), mask=m & (has_res != 0))


# --------------------------------------------------------------------------------------
# kernel registry (the single source of variants for launchers and aot.py)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Callable
    layout: Optional[str]  # "nchw" / "nhwc": one variant per BLOCKS[layout] entry; None: FIN_CONSTEXPRS
    num_warps: int
    per_data_dtype: bool  # False: compiled per accumulation dtype only (finalize kernels)


KERNELS: Dict[str, KernelSpec] = {
    s.name: s
    for s in (
        KernelSpec("stats_part_nchw", _stats_part_nchw, "nchw", 8, True),
        KernelSpec("stats_part_nhwc", _stats_part_nhwc, "nhwc", 8, True),
        KernelSpec("stats_finalize", _stats_finalize, None, 4, False),
        KernelSpec("tile_stats_finalize", _tile_stats_finalize, None, 4, False),
        KernelSpec("colsum", _colsum, None, 4, False),
        KernelSpec("bn_coef", _bn_coef, None, 4, False),
        KernelSpec("fwd_nchw", _fwd_nchw, "nchw", 8, True),
        KernelSpec("fwd_nhwc", _fwd_nhwc, "nhwc", 8, True),
        KernelSpec("bwd_reduce_part_nchw", _bwd_reduce_part_nchw, "nchw", 8, True),
        KernelSpec("bwd_reduce_part_nhwc", _bwd_reduce_part_nhwc, "nhwc", 8, True),
        KernelSpec("bwd_apply_nchw", _bwd_apply_nchw, "nchw", 8, True),
        KernelSpec("bwd_apply_nhwc", _bwd_apply_nhwc, "nhwc", 8, True),
    )
}


def variants() -> List[Tuple[KernelSpec, torch.dtype, Dict[str, int]]]:
    """Every (kernel, dtype, constexprs) the launchers can launch. For finalize kernels
    the dtype is the accumulation dtype (the workspace's)."""
    out = []
    for spec in KERNELS.values():
        if spec.per_data_dtype:
            for dt in DTYPES:
                for b in BLOCKS[spec.layout]:
                    out.append((spec, dt, tile_constexprs(spec.layout, b, dt)))
        else:
            for dt in sorted({acc_dtype(d) for d in DTYPES}, key=str):
                out.append((spec, dt, dict(FIN_CONSTEXPRS)))
    return out


def _launch(name: str, grid, args, geo: Optional["_Geom"] = None) -> None:
    spec = KERNELS[name]
    cx = tile_constexprs(spec.layout, geo.block, geo.dtype) if spec.layout is not None else FIN_CONSTEXPRS
    with on_device(args[0].device):  # Triton launches on the current device
        spec.fn[grid](*args, **cx, num_warps=spec.num_warps)


# --------------------------------------------------------------------------------------
# launch geometry
# --------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pick_block(layout: str, extent: int) -> int:
    """Widest tile whose lanes are >= 75% used along the contiguous extent (HW for NCHW,
    C for NHWC); failing that, the one with the least padding (ties: the wider)."""
    cands = sorted(BLOCKS[layout], reverse=True)
    if extent <= 0:
        return cands[-1]
    eff = {b: extent / (_cdiv(extent, b) * b) for b in cands}
    for b in cands:
        if eff[b] >= 0.75:
            return b
    return max(cands, key=lambda b: (eff[b], b))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(x: Tensor) -> int:
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else CPU_SMS
    return sms * _PROGRAMS_PER_SM


def x_layout(x: Tensor) -> Optional[Tuple[str, int]]:
    """(layout, XC) under which the apply and backward-reduction kernels read x in place,
    or None. Contiguous NCHW or channels_last: XC = C. A channel-prefix view
    ``wide[:, :C]`` of an NCHW tensor whose images are a whole number XC >= C of channel
    planes apart, or of a channels_last tensor whose pixel rows are XC >= C apart."""
    if x.dim() != 4:
        return None
    n, c, h, w = x.shape
    if x.is_contiguous():
        return "nchw", c
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc", c
    s = x.stride()
    hw = h * w
    if (w == 1 or s[3] == 1) and (h == 1 or s[2] == w) and (c == 1 or s[1] == hw) \
            and s[0] % hw == 0 and s[0] // hw >= c:
        return "nchw", s[0] // hw
    rs = s[3] if w > 1 else s[2] if h > 1 else s[0]
    if (c == 1 or s[1] == 1) and rs >= c and (w == 1 or s[3] == rs) and (h == 1 or s[2] == w * rs) \
            and (n == 1 or s[0] == hw * rs):
        return "nhwc", rs
    return None


class _Geom:
    """Shape facts shared by the launchers. ``prefix``: x may be a channel-prefix view
    (``x_layout``); only the kernels that take XC accept one."""

    def __init__(self, x: Tensor, prefix: bool = False):
        if x.dim() != 4:
            raise ValueError(f"resfused triton: expected a 4-D tensor, got shape {tuple(x.shape)}")
        self.N, self.C, H, W = x.shape
        self.HW = H * W
        self.M = self.N * self.HW  # elements per channel
        lay = x_layout(x)
        if lay is None or (not prefix and lay[1] != self.C):
            raise ValueError("resfused triton: x must be NCHW- or channels_last-contiguous"
                             + (" (or a channel-prefix view of such a tensor)" if prefix else ""))
        self.layout, self.XC = lay
        self.fmt = torch.channels_last if self.layout == "nhwc" else torch.contiguous_format
        self.dtype = x.dtype
        self.block = _pick_block(self.layout, self.HW if self.layout == "nchw" else self.C)
        cx = tile_constexprs(self.layout, self.block, self.dtype)
        self.rows = cx["ROWS"] if self.layout == "nchw" else cx["BLOCK_M"]

    # elementwise grid
    def apply_grid(self):
        if self.layout == "nchw":
            if self.C > 65535:
                raise ValueError("resfused triton: more than 65535 channels in NCHW layout")
            return (_cdiv(self.N, self.rows) * _cdiv(self.HW, self.block), self.C)
        return (_cdiv(self.M, self.rows), _cdiv(self.C, self.block))

    # partial-reduction split: (P, layout-specific ints)
    def reduce_split(self, x: Tensor):
        target = _target_programs(x)
        if self.layout == "nchw":
            n_hwb = _cdiv(self.HW, self.block)
            n_units = _cdiv(self.N, self.rows) * n_hwb
            p = max(1, min(n_units, _cdiv(target, self.C)))
            upp = _cdiv(n_units, p)
            p = _cdiv(n_units, upp)
            return p, (n_hwb, n_units, upp)
        n_cb = _cdiv(self.C, self.block)
        n_mb = _cdiv(self.M, self.rows)
        p = max(1, min(n_mb, _cdiv(target, n_cb)))
        rpp = _cdiv(n_mb, p) * self.rows
        p = _cdiv(self.M, rpp)
        return p, (rpp,)


def _check_like(name: str, t: Optional[Tensor], x: Tensor, geo: _Geom) -> None:
    if t is None:
        return
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"resfused triton: {name} must match x in shape, dtype and device")
    if not t.is_contiguous(memory_format=geo.fmt):
        raise ValueError(f"resfused triton: {name} must be contiguous in x's memory layout")


def _empty(x: Tensor, geo: _Geom) -> Tensor:
    """An output like x, contiguous in x's layout (x itself may be a prefix view). A dense x
    gives its exact strides: a tensor contiguous both ways ([N, C, 1, 1]) keeps the layout
    only its strides tell, which cuDNN reads to choose the next convolution's layout."""
    if geo.XC == geo.C:
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=geo.fmt)


def _check_chan(name: str, t: Optional[Tensor], rows: int, x: Tensor) -> None:
    if t is None:
        return
    acc = acc_dtype(x.dtype)
    if t.dtype != acc or not t.is_contiguous() or t.dim() != 2 or t.shape[0] < rows or t.shape[1] != x.shape[1]:
        raise ValueError(f"resfused triton: {name} must be a contiguous [{rows}, C] {acc} tensor")


# --------------------------------------------------------------------------------------
# launchers (the backend API)
# --------------------------------------------------------------------------------------


def bn_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance, in the accumulation dtype."""
    geo = _Geom(x)
    acc = acc_dtype(x.dtype)
    C = geo.C
    if x.numel() == 0:
        nan = torch.full((C,), float("nan"), dtype=acc, device=x.device)
        return nan, nan.clone()
    P, extra = geo.reduce_split(x)
    ws = torch.empty((P, 3, C), dtype=acc, device=x.device)
    if geo.layout == "nchw":
        _launch("stats_part_nchw", (C, P), (x, ws, geo.N, C, geo.HW, *extra), geo)
    else:
        _launch("stats_part_nhwc", (_cdiv(C, geo.block), P), (x, ws, geo.M, C, *extra), geo)
    mean = torch.empty((C,), dtype=acc, device=x.device)
    var = torch.empty((C,), dtype=acc, device=x.device)
    _launch("stats_finalize", (_cdiv(C, FIN_BLOCK_C),), (ws, mean, var, P, C, geo.M))
    return mean, var


def tile_stats(ws: Tensor, count: int, rows: int) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance from per-tile partials ``ws[p] = (Σy,
    Σ(y - ȳ_p)²)`` (``[P, 2, C]``, ``rows`` values per tile, the last one the rest of
    ``count``), merged by Chan's formula in float64 about a pivot (the first tile's mean,
    so a large mean costs no precision); results in ws's dtype. Many tiles (a conv's output
    tiles: thousands) are first merged in chunks, one program each, into partials about the
    same pivot, then the chunks in one program: two short launches instead of one long
    serial one."""
    P, two, C = ws.shape
    if two != 2 or not ws.is_contiguous() or P != _cdiv(count, rows):
        raise ValueError(f"resfused triton tile_stats: ws must be a contiguous [cdiv(count, rows), 2, C] tensor, got "
                         f"{tuple(ws.shape)} for count {count}, rows {rows}")
    first = min(count, rows)  # values in the first tile, whose mean is the pivot
    src, shifted = ws, 0
    if P > TILE_STATS_CHUNK:
        per_prog = max(TILE_STATS_CHUNK, _cdiv(P, TILE_STATS_CHUNKS))
        S = _cdiv(P, per_prog)
        part = torch.empty((S, 2, C), dtype=ws.dtype, device=ws.device)
        _launch("tile_stats_finalize", (_cdiv(C, FIN_BLOCK_C), S),
                (src, ws, part, part, P, C, count, rows, per_prog, first, 0))
        src, shifted, P, rows = part, 1, S, per_prog * rows
    mean = torch.empty((C,), dtype=ws.dtype, device=ws.device)
    var = torch.empty((C,), dtype=ws.dtype, device=ws.device)
    _launch("tile_stats_finalize", (_cdiv(C, FIN_BLOCK_C), 1), (src, ws, mean, var, P, C, count, rows, P, first, shifted))
    return mean, var


def bn_coef(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
            unbias: float) -> Tuple[Tensor, Tensor]:
    """``eager.bn_coef`` in one launch (float64: eager's, since the kernel's float scalars
    are float32)."""
    if mean.dtype == torch.float64:
        from ..ops import eager

        return eager.bn_coef(mean, var, weight, bias, running_mean, running_var, momentum, eps, unbias)
    C = mean.numel()
    for nm, t in (("var", var), ("weight", weight), ("bias", bias), ("running_mean", running_mean),
                  ("running_var", running_var)):
        if t is not None and (t.dtype != mean.dtype or t.device != mean.device or t.numel() != C
                              or not t.is_contiguous()):
            raise ValueError(f"resfused triton: {nm} must be a contiguous [C] tensor of mean's dtype and device")
    if (running_mean is None) != (running_var is None):
        raise ValueError("resfused triton: running_mean and running_var go together")
    affine = torch.empty((2, C), dtype=mean.dtype, device=mean.device)
    stats = torch.empty((2, C), dtype=mean.dtype, device=mean.device)
    if C == 0:
        return affine, stats
    update = running_mean is not None
    _launch("bn_coef", (_cdiv(C, FIN_BLOCK_C),),
            (mean, var, weight if weight is not None else mean, bias if bias is not None else mean,
             running_mean if update else mean, running_var if update else mean, affine, stats, C,
             float(momentum), float(1.0 - momentum), float(eps), float(unbias),
             int(weight is not None), int(bias is not None), int(update)))
    return affine, stats


def bn_act_fwd(x: Tensor, affine: Tensor, residual: Optional[Tensor], res_affine: Optional[Tensor],
               relu: bool) -> Tensor:
    geo = _Geom(x, prefix=True)
    _check_like("residual", residual, x, geo)
    _check_chan("affine", affine, 2, x)
    _check_chan("res_affine", res_affine, 2, x)
    if res_affine is not None and residual is None:
        raise ValueError("resfused triton: res_affine given without residual")
    out = _empty(x, geo)
    if x.numel() == 0:
        return out
    args = (x, affine, residual if residual is not None else x, res_affine if res_affine is not None else affine,
            out)
    flags = (int(residual is not None), int(res_affine is not None), int(bool(relu)))
    if geo.layout == "nchw":
        _launch("fwd_nchw", geo.apply_grid(),
                (*args, geo.N, geo.C, geo.XC, geo.HW, _cdiv(geo.HW, geo.block), *flags), geo)
    else:
        _launch("fwd_nhwc", geo.apply_grid(), (*args, geo.M, geo.C, geo.XC, *flags), geo)
    return out


def _relu_mode(relu: bool, out: Optional[Tensor]) -> int:
    if not relu:
        return 0
    return 1 if out is not None else 2


def bn_act_bwd_reduce(grad_out: Tensor, x: Tensor, affine: Tensor, stats: Tensor,
                      residual: Optional[Tensor], res_affine: Optional[Tensor],
                      res_stats: Optional[Tensor], out: Optional[Tensor], relu: bool,
                      write_dz: bool = False) -> Tuple[Tensor, Tensor]:
    """(sums, dz): rows (sum dz, sum dz*x_hat[, sum dz*res_hat when res_stats is given]),
    and dz in x's dtype and layout when ``write_dz`` (else an empty tensor)."""
    geo = _Geom(x, prefix=True)
    for nm, t in (("grad_out", grad_out), ("residual", residual), ("out", out)):
        _check_like(nm, t, x, geo)
    for nm, t, k in (("affine", affine, 2), ("stats", stats, 2), ("res_affine", res_affine, 2),
                     ("res_stats", res_stats, 2)):
        _check_chan(nm, t, k, x)
    if residual is None and (res_affine is not None or res_stats is not None):
        raise ValueError("resfused triton: res_affine/res_stats given without residual")
    acc = acc_dtype(x.dtype)
    C = geo.C
    R = 3 if res_stats is not None else 2
    dz = _empty(x, geo) if write_dz else x.new_empty(0)
    if x.numel() == 0:
        return torch.zeros((R, C), dtype=acc, device=x.device), dz
    mode = _relu_mode(relu, out)
    use_res = residual is not None and (mode == 2 or res_stats is not None)
    P, extra = geo.reduce_split(x)
    ws = torch.empty((P, R, C), dtype=acc, device=x.device)
    ptrs = (grad_out, x, out if mode == 1 else x, residual if residual is not None else x,
            affine, stats, res_affine if res_affine is not None else affine,
            res_stats if res_stats is not None else stats, ws, dz if write_dz else x)
    flags = (int(use_res), int(res_affine is not None), int(res_stats is not None), mode, int(bool(write_dz)))
    if geo.layout == "nchw":
        _launch("bwd_reduce_part_nchw", (C, P), (*ptrs, geo.N, C, geo.XC, geo.HW, *extra, *flags), geo)
    else:
        _launch("bwd_reduce_part_nhwc", (_cdiv(C, geo.block), P), (*ptrs, geo.M, C, geo.XC, *extra, *flags), geo)
    res = torch.empty((R, C), dtype=acc, device=x.device)
    _launch("colsum", (_cdiv(R * C, FIN_BLOCK_C),), (ws, res, P, R * C))
    return res, dz


def bn_act_bwd_apply(grad_out: Tensor, x: Tensor, affine: Tensor, coef: Tensor,
                     residual: Optional[Tensor], res_affine: Optional[Tensor],
                     res_coef: Optional[Tensor], out: Optional[Tensor], relu: bool) -> Tuple[Tensor, Tensor]:
    """Returns (dx, dres). dres is ``dz`` for a plain residual, the BN input
    gradient for a residual with ``res_coef``, and an empty tensor without residual."""
    return _bwd_apply(grad_out, x, affine, coef, residual, res_affine, res_coef, out, relu, None)


def bn_act_bwd_apply_acc(acc: Tensor, grad_out: Tensor, x: Tensor, affine: Tensor, coef: Tensor,
                         out: Optional[Tensor], relu: bool) -> None:
    """``acc += dx`` in place (no residual); acc has x's shape, dtype and strides."""
    if acc.shape != x.shape or acc.dtype != x.dtype or acc.device != x.device or acc.stride() != x.stride():
        raise ValueError("resfused triton: acc must match x in shape, dtype, device and strides")
    _bwd_apply(grad_out, x, affine, coef, None, None, None, out, relu, acc)


def _bwd_apply(grad_out, x, affine, coef, residual, res_affine, res_coef, out, relu, acc):
    geo = _Geom(x, prefix=True)
    for nm, t in (("grad_out", grad_out), ("residual", residual), ("out", out)):
        _check_like(nm, t, x, geo)
    for nm, t, k in (("affine", affine, 2), ("coef", coef, 4), ("res_affine", res_affine, 2),
                     ("res_coef", res_coef, 4)):
        _check_chan(nm, t, k, x)
    if residual is None and (res_affine is not None or res_coef is not None):
        raise ValueError("resfused triton: res_affine/res_coef given without residual")
    dx = _empty(x, geo) if acc is None else acc
    dres = _empty(x, geo) if residual is not None else x.new_empty(0)
    if x.numel() == 0:
        return dx, dres
    mode = _relu_mode(relu, out)
    use_res = residual is not None and (mode == 2 or res_coef is not None)
    ptrs = (grad_out, x, out if mode == 1 else x, residual if residual is not None else x,
            affine, coef, res_affine if res_affine is not None else affine,
            res_coef if res_coef is not None else coef, dx, dres if residual is not None else dx)
    flags = (int(use_res), int(res_affine is not None), int(res_coef is not None), int(residual is not None), mode,
             int(acc is not None))
    if geo.layout == "nchw":
        _launch("bwd_apply_nchw", geo.apply_grid(),
                (*ptrs, geo.N, geo.C, geo.XC, geo.HW, _cdiv(geo.HW, geo.block), *flags), geo)
    else:
        _launch("bwd_apply_nhwc", geo.apply_grid(), (*ptrs, geo.M, geo.C, geo.XC, *flags), geo)
    return dx, dres
