"""Triton convolutions for channels_last tensors with BatchNorm fused into them
(DESIGN.md §2, Level 2).

Implicit GEMM over ``M = N*OH*OW`` output pixels (rows) and ``Cout`` channels (columns),
reduced over ``K = KH*KW*Cin`` in one loop of ``BLOCK_K`` steps over (kernel tap, channel
block), so a 1x1 convolution is a plain GEMM and a 3x3 one gathers its rows with per-row
bounds (stride, padding and dilation); kernel size, stride, padding and dilation are
runtime arguments (one compiled kernel serves every conv of a network).
fp16/bf16 operands with fp32 accumulation; fp32 operands with IEEE fp32 products, or TF32
when the caller allows it (``TF32``).

* ``_conv_fwd`` — **prologue** ``a = relu(x*scale + shift)`` per input channel while the
  input tile is loaded (the previous BN-ReLU is never written to memory; zero padding is
  applied *after* it), then the GEMM, then an **epilogue** that adds a per-channel bias
  (folded BN), adds a residual, applies ReLU, stores the tile and, for the next BN,
  writes per-tile partial statistics ``(Σy, Σ(y - tile mean)²)`` of the *stored* (rounded)
  values. ``stats_finalize`` merges the partials with Chan's formula in float64, so the
  variance stays sound at millions of values per channel (no single running Σy²).
* ``_conv_dgrad`` — ``dx`` as an implicit GEMM over input pixels with the transposed
  weight (a tap contributes where ``ih + pad - r*dil`` is a multiple of the stride). For a
  strided conv (dilation 1) the pixels are split into stride phases, each running only the
  taps that reach it (a stride-2 3x3 conv: 9 tap blocks over 4 phases, not 36). Its
  optional epilogue is the backward of the prologue that produced the conv's input:
  the ReLU mask recomputed from the previous BN's input y (``z = y*scale + shift``, rounded
  as in forward), ``dz`` stored in place of ``dx``, and per-tile partial sums
  ``(Σdz, Σdz*x̂)`` for the BN backward — one pass instead of the reduction pass.
* ``_conv_wgrad`` — ``dW[co, (r, s, ci)] = Σ_m dy[m, co] * a[m ⊕ (r, s), ci]`` with the
  activation recomputed in its **prologue** from the previous BN's input (a is never
  stored), split over ``M`` into ``SPLIT`` partial products summed in a fixed order
  (deterministic, no atomics).

Every kernel variant the launchers can launch is in ``variants()`` (tile configs x
dtypes x fused modes), which ``resfused.triton.aot`` compiles for sm_80/sm_90.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import on_device
from ..ops.conv import out_size
from .bn_act import _cast_out, tile_stats

# --------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def constexprs(self) -> Dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}


#: tile configs per kernel and operand width: "large" for big GEMMs, "small" where the
#: large tile would leave most SMs idle (few pixels or few channels)
CONFIGS: Dict[str, Dict[str, Dict[str, TileConfig]]] = {
    "fwd": {
        "16": {"large": TileConfig(128, 128, 32, 8, 3), "small": TileConfig(64, 64, 32, 4, 3)},
        "32": {"large": TileConfig(128, 64, 16, 8, 2), "small": TileConfig(64, 32, 16, 4, 3)},
    },
    # dgrad's 16-bit small tile runs 8 warps: its per-row phase and tap arithmetic spilled
    # at 4; the fp32 one is 32x32 on 4 warps (64x32 spilled on sm_80 under triton 3.6 with
    # 4 or 8 warps, 2 or 3 stages; 32x32 spills under none of triton 3.6 / 3.8, sm_80 / sm_90)
    "dgrad": {
        "16": {"large": TileConfig(128, 128, 32, 8, 3), "small": TileConfig(64, 64, 32, 8, 3)},
        "32": {"large": TileConfig(128, 64, 16, 8, 3), "small": TileConfig(32, 32, 16, 4, 3)},
    },
    # wgrad: BLOCK_M over Cout, BLOCK_N over Cin, BLOCK_K over pixels
    "wgrad": {
        "16": {"large": TileConfig(128, 128, 32, 8, 3), "small": TileConfig(64, 64, 32, 4, 3)},
        "32": {"large": TileConfig(64, 64, 16, 4, 3), "small": TileConfig(32, 32, 16, 4, 3)},
    },
}
#: fused modes (constexpr flags) per kernel, as the launchers use them
MODES: Dict[str, Dict[str, Dict[str, int]]] = {
    "fwd": {
        "stats": dict(PROLOGUE=0, BIAS=0, RES=0, RELU=0, STATS=1),
        "prologue": dict(PROLOGUE=1, BIAS=0, RES=0, RELU=0, STATS=0),
        "prologue_stats": dict(PROLOGUE=1, BIAS=0, RES=0, RELU=0, STATS=1),
        "bias": dict(PROLOGUE=0, BIAS=1, RES=0, RELU=0, STATS=0),
        "bias_relu": dict(PROLOGUE=0, BIAS=1, RES=0, RELU=1, STATS=0),
        "bias_res_relu": dict(PROLOGUE=0, BIAS=1, RES=1, RELU=1, STATS=0),
    },
    "dgrad": {"plain": dict(EPILOGUE=0), "bn_relu": dict(EPILOGUE=1)},
    "wgrad": {"plain": dict(PROLOGUE=0), "prologue": dict(PROLOGUE=1)},
}
#: operand dtypes the kernels are compiled for
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: pointer arguments in the operand dtype; every other ``*_ptr`` is fp32
DATA_PTRS = frozenset({"x_ptr", "w_ptr", "out_ptr", "res_ptr", "dy_ptr", "dx_ptr", "y_ptr"})
#: integer arguments the JIT must not specialise (batch-dependent sizes)
UNSPECIALIZED = ("N", "M", "H", "W", "OH", "OW", "m_per_split", "KH", "KW", "stride_h", "stride_w", "pad_h",
                 "pad_w", "dil_h", "dil_w", "qh", "qw")
GROUP_M = 8


def width_key(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _prologue(a, mask, x_ptr, aff_ptr, ci, c_ok, Cin, PROLOGUE: tl.constexpr):
    """relu(a*scale + shift) per input channel (when PROLOGUE), then zero outside the
    tensor (padding after the prologue), cast back to the operand dtype."""
    if PROLOGUE:
        sc = tl.load(aff_ptr + ci, mask=c_ok, other=0)
        sh = tl.load(aff_ptr + Cin + ci, mask=c_ok, other=0)
        z = a.to(tl.float32) * sc[None, :] + sh[None, :]
        z = tl.where(z < 0, 0, z)  # relu keeping NaN, as torch.relu
        a = _cast_out(tl.where(mask, z, 0), x_ptr)
    return a


#: The Triton interpreter (3.8) multiplies bf16 tiles wrongly in ``tl.dot``; under it, bf16
#: operands are widened to fp32 first (exact: a bf16 product fits fp32), as a GPU's MMA does.
_WIDEN_BF16_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _mma(a, b, acc, TF32: tl.constexpr):
    if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP: tl.constexpr):
    # grouped ordering: GROUP row tiles share the column tiles they load (L2 reuse)
    width = GROUP * num_n
    first = (pid // width) * GROUP
    size = tl.minimum(num_m - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _tile(M, NC, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output tile (grouped order): pid_m, its rows and columns, their masks."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(NC, BLOCK_N), 8)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, rm, rn, rm < M, rn < NC


@triton.jit
def _pixel(r, H, W):
    """(image as int64, row, column) of flat pixel indices r over [N, H, W]."""
    t = r // W
    return (t // H).to(tl.int64), t % H, r % W


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _conv_fwd(x_ptr, w_ptr, out_ptr, aff_ptr, bias_ptr, res_ptr, ws_ptr,
              N, H, W, Cin, sxn, sxh, sxw, OH, OW, Cout, M,
              stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
              KH, KW, PROLOGUE: tl.constexpr, BIAS: tl.constexpr,
              RES: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr, TF32: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # x: [N, H, W, Cin] with strides (sxn, sxh, sxw, 1); w: [KH, KW, Cin, Cout] contiguous;
    # out/res: [M, Cout] contiguous; ws: [cdiv(M, BLOCK_M), 2, Cout] fp32
    pid_m, rm, rn, m_ok, n_ok = _tile(M, Cout, BLOCK_M, BLOCK_N)
    nimg, oh, ow = _pixel(rm, OH, OW)
    nb = nimg * sxn
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # one loop over (tap, channel block): K = KH*KW*Cin in BLOCK_K steps (pipelined)
    n_cb = tl.cdiv(Cin, BLOCK_K)
    for kc in range(0, KH * KW * n_cb):
        rs = kc // n_cb
        ci = (kc - rs * n_cb) * BLOCK_K + rk
        r = rs // KW
        ih = ih0 + r * dil_h
        iw = iw0 + (rs - r * KW) * dil_w
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        row = nb + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        c_ok = ci < Cin
        a_mask = row_ok[:, None] & c_ok[None, :]
        a = tl.load(x_ptr + row[:, None] + ci[None, :], mask=a_mask, other=0)
        a = _prologue(a, a_mask, x_ptr, aff_ptr, ci, c_ok, Cin, PROLOGUE)
        kk = (rs * Cin + ci).to(tl.int64)
        b = tl.load(w_ptr + kk[:, None] * Cout + rn[None, :], mask=c_ok[:, None] & n_ok[None, :], other=0)
        acc = _mma(a, b, acc, TF32)
    o_mask = m_ok[:, None] & n_ok[None, :]
    o_off = rm.to(tl.int64)[:, None] * Cout + rn[None, :]
    if BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0)[None, :]
    if RES:
        acc += tl.load(res_ptr + o_off, mask=o_mask, other=0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0, 0, acc)
    q = _cast_out(acc, out_ptr)
    tl.store(out_ptr + o_off, q, mask=o_mask)
    if STATS:
        # per-tile (sum, sum of squares about the tile mean) of the stored values
        v = tl.where(o_mask, q.to(tl.float32), 0)
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        s1 = tl.sum(v, axis=0)
        d = tl.where(o_mask, v - (s1 / cnt)[None, :], 0)
        base = ws_ptr + pid_m.to(tl.int64) * 2 * Cout + rn
        tl.store(base, s1, mask=n_ok)
        tl.store(base + Cout, tl.sum(d * d, axis=0), mask=n_ok)


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _conv_dgrad(dy_ptr, w_ptr, dx_ptr, y_ptr, aff_ptr, st_ptr, ws_ptr,
                N, H, W, Cin, syn, syh, syw, OH, OW, Cout, M,
                stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                KH, KW, qh, qw, EPILOGUE: tl.constexpr, TF32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dy: [N*OH*OW, Cout]; w: [KH, KW, Cout, Cin] contiguous; dx: [N, H, W, Cin] contiguous;
    # y: [N, H, W, Cin] with strides (syn, syh, syw, 1) (a channel-prefix view is fine);
    # aff (scale, shift) and st (mean, invstd): [2, Cin] fp32; ws: [qh*qw, tiles, 2, Cin].
    # Phases (grid axis 1): with (qh, qw) = the stride (dilation 1), program row r of phase
    # (ph, pw) is input pixel (n, ph + i*qh, pw + j*qw), and only the taps r ≡ ph + pad
    # (mod stride) reach it: a stride-2 3x3 dgrad does 9 tap-blocks over four phases
    # instead of 36 (qh = qw = 1: one phase, every tap, masks decide).
    q = tl.program_id(1)
    ph = q // qw
    pw = q - ph * qw
    Hq = (H - ph + qh - 1) // qh
    Wq = (W - pw + qw - 1) // qw
    Mq = N * Hq * Wq
    n_tiles = tl.cdiv(M, BLOCK_M)  # tiles of the largest phase (the grid's axis 0)
    if tl.program_id(0) >= tl.cdiv(Mq, BLOCK_M) * tl.cdiv(Cin, BLOCK_N):
        return  # a smaller phase: its workspace rows stay zero
    pid_m, rm, rn, m_ok, n_ok = _tile(Mq, Cin, BLOCK_M, BLOCK_N)
    nimg, i, j = _pixel(rm, Hq, Wq)
    ih = ph + i * qh
    iw = pw + j * qw
    nb = nimg * OH
    r0 = (ph + pad_h) % qh
    s0 = (pw + pad_w) % qw
    nr = tl.maximum(KH - r0 + qh - 1, 0) // qh
    ns = tl.maximum(KW - s0 + qw - 1, 0) // qw
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_cb = tl.cdiv(Cout, BLOCK_K)
    for kc in range(0, nr * ns * n_cb):
        t = kc // n_cb
        co = (kc - t * n_cb) * BLOCK_K + rk
        tr = t // ns
        r = r0 + tr * qh
        sw = s0 + (t - tr * ns) * qw
        hn = ih + pad_h - r * dil_h
        wn = iw + pad_w - sw * dil_w
        oh = tl.where(hn >= 0, hn, 0) // stride_h
        ow = tl.where(wn >= 0, wn, 0) // stride_w
        row_ok = m_ok & (hn >= 0) & (oh * stride_h == hn) & (oh < OH) & (wn >= 0) & (ow * stride_w == wn) & (ow < OW)
        row = ((nb + oh) * OW + ow) * Cout
        c_ok = co < Cout
        a = tl.load(dy_ptr + row[:, None] + co[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0)
        kk = ((r * KW + sw) * Cout + co).to(tl.int64)
        b = tl.load(w_ptr + kk[:, None] * Cin + rn[None, :], mask=c_ok[:, None] & n_ok[None, :], other=0)
        acc = _mma(a, b, acc, TF32)
    o_mask = m_ok[:, None] & n_ok[None, :]
    o_off = (((nimg * H + ih) * W + iw) * Cin)[:, None] + rn[None, :]
    if EPILOGUE:
        # backward of a = relu(y*scale + shift): mask from z rounded as forward stored a
        y_row = nimg * syn + ih.to(tl.int64) * syh + iw.to(tl.int64) * syw
        y = tl.load(y_ptr + y_row[:, None] + rn[None, :], mask=o_mask, other=0).to(tl.float32)
        sc = tl.load(aff_ptr + rn, mask=n_ok, other=0)
        sh = tl.load(aff_ptr + Cin + rn, mask=n_ok, other=0)
        z = _cast_out(y * sc[None, :] + sh[None, :], dx_ptr).to(tl.float32)
        dz = _cast_out(tl.where(o_mask & ~(z <= 0), acc, 0), dx_ptr)  # NaN z passes, as relu's backward
        tl.store(dx_ptr + o_off, dz, mask=o_mask)
        mean = tl.load(st_ptr + rn, mask=n_ok, other=0)
        invstd = tl.load(st_ptr + Cin + rn, mask=n_ok, other=0)
        dzf = dz.to(tl.float32)
        xhat = (y - mean[None, :]) * invstd[None, :]
        base = ws_ptr + (q * n_tiles + pid_m).to(tl.int64) * 2 * Cin + rn
        tl.store(base, tl.sum(dzf, axis=0), mask=n_ok)
        tl.store(base + Cin, tl.sum(tl.where(o_mask, dzf * xhat, 0), axis=0), mask=n_ok)
    else:
        tl.store(dx_ptr + o_off, _cast_out(acc, dx_ptr), mask=o_mask)


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _conv_wgrad(dy_ptr, x_ptr, aff_ptr, ws_ptr,
                N, H, W, Cin, sxn, sxh, sxw, OH, OW, Cout, M, m_per_split,
                stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                KH, KW, PROLOGUE: tl.constexpr, TF32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dy: [M = N*OH*OW, Cout]; x: [N, H, W, Cin] strided (sxn, sxh, sxw, 1);
    # ws: [SPLIT, Cout, KH*KW*Cin] fp32. grid (cdiv(Cout, BM) * KH*KW * cdiv(Cin, BN), SPLIT)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_ci = tl.cdiv(Cin, BLOCK_N)
    pid_n = pid % n_ci
    t = pid // n_ci
    rs = t % (KH * KW)
    pid_m = t // (KH * KW)
    r = rs // KW
    s = rs % KW
    co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    ci_ok = ci < Cin
    m0 = split * m_per_split
    m1 = tl.minimum(m0 + m_per_split, M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for p0 in range(m0, m1, BLOCK_K):
        pix = p0 + rk
        p_ok = pix < m1
        nimg, oh, ow = _pixel(pix, OH, OW)
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        g = tl.load(dy_ptr + pix.to(tl.int64)[None, :] * Cout + co[:, None], mask=co_ok[:, None] & p_ok[None, :],
                    other=0)
        row = nimg * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        b_mask = ok[:, None] & ci_ok[None, :]
        b = tl.load(x_ptr + row[:, None] + ci[None, :], mask=b_mask, other=0)
        b = _prologue(b, b_mask, x_ptr, aff_ptr, ci, ci_ok, Cin, PROLOGUE)
        acc = _mma(g, b, acc, TF32)
    KK = KH * KW * Cin
    off = (split.to(tl.int64) * Cout + co.to(tl.int64))[:, None] * KK + (rs * Cin + ci)[None, :]
    tl.store(ws_ptr + off, acc, mask=co_ok[:, None] & ci_ok[None, :])


# --------------------------------------------------------------------------------------
# kernel registry (the single source of variants for launchers and aot.py)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvKernel:
    name: str  # "fwd", "dgrad", "wgrad"
    fn: Callable


KERNELS: Dict[str, ConvKernel] = {k.name: k for k in (ConvKernel("fwd", _conv_fwd), ConvKernel("dgrad", _conv_dgrad),
                                                       ConvKernel("wgrad", _conv_wgrad))}
JIT_HELPERS = frozenset({"_prologue", "_mma", "_tile_ids", "_tile", "_pixel", "_cast_out"})


def tf32_values(dtype: torch.dtype) -> Tuple[int, ...]:
    """TF32 flag values a dtype's kernels are compiled with (only fp32 has a choice)."""
    return (0, 1) if dtype == torch.float32 else (1,)


def variant_constexprs(kernel: str, dtype: torch.dtype, config: str, mode: str, tf32: int) -> Dict[str, int]:
    cfg = CONFIGS[kernel][width_key(dtype)][config]
    return {**MODES[kernel][mode], "TF32": tf32, **cfg.constexprs()}


def variants() -> List[Tuple[str, torch.dtype, str, str, int, bool]]:
    """Every (kernel, dtype, config, mode, tf32, aligned) the launchers can launch.
    ``aligned``: every specialised size argument (channel counts, pixel strides) is a
    multiple of 16, the case the JIT vectorises; the "large" tile is only launched then
    (unvectorised, it would spill), the "small" one in both cases."""
    out = []
    for kernel in KERNELS:
        for dt in DTYPES:
            for config in CONFIGS[kernel][width_key(dt)]:
                for mode in MODES[kernel]:
                    for tf in tf32_values(dt):
                        for aligned in ((True,) if config == "large" else (False, True)):
                            out.append((kernel, dt, config, mode, tf, aligned))
    return out


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(t: Tensor) -> int:
    if not t.is_cuda:
        return 2  # Triton interpreter: keep grids small
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _pick_config(kernel: str, dtype: torch.dtype, rows: int, cols: int, t: Tensor, sizes: Sequence[int]) -> str:
    """"large" when the specialised ``sizes`` are all multiples of 16 (vectorised loads)
    and its grid gives every SM a tile; "small" otherwise."""
    cfg = CONFIGS[kernel][width_key(dtype)]["large"]
    tiles = _cdiv(rows, cfg.block_m) * _cdiv(cols, cfg.block_n)
    aligned = all(v % 16 == 0 for v in sizes)
    return "large" if aligned and tiles >= _sms(t) else "small"


def _launch(kernel: str, grid, args, dtype: torch.dtype, config: str, mode: str, tf32: int) -> None:
    cx = variant_constexprs(kernel, dtype, config, mode, tf32)
    cfg = CONFIGS[kernel][width_key(dtype)][config]
    with on_device(args[0].device):  # Triton launches on the current device
        KERNELS[kernel].fn[grid](*args, **cx, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check_operand(name: str, t: Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != 4:
        raise ValueError(f"resfused triton conv: {name} must be 4-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype or t.device != device:
        raise ValueError(f"resfused triton conv: {name} must be {dtype} on {device}, got {t.dtype} on {t.device}")


def _pixel_strides(name: str, t: Tensor) -> Tuple[int, int, int]:
    """(n, h, w) strides of a tensor whose channels are contiguous (channels_last, or a
    channel-prefix view of a channels_last tensor)."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"resfused triton conv: {name} must be channels_last (channels contiguous), got strides "
                         f"{t.stride()}")
    return t.stride(0), t.stride(2), t.stride(3)


def _rows(name: str, t: Tensor) -> Tensor:
    if not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"resfused triton conv: {name} must be channels_last-contiguous")
    return t


def _per_channel(name: str, t: Optional[Tensor], rows: int, c: int) -> None:
    if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (rows, c) or not t.is_contiguous()):
        raise ValueError(f"resfused triton conv: {name} must be a contiguous [{rows}, {c}] float32 tensor")


def _fp32_placeholder(device: torch.device) -> Tensor:
    """A one-element fp32 tensor passed for pointer arguments a mode never reads, so each
    launch has the argument types its AOT-checked variant was compiled with."""
    return torch.empty(1, dtype=torch.float32, device=device)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise TypeError(f"resfused triton conv: dtype {dtype} is not supported; supported: float16, bfloat16, "
                        f"float32")


def stats_finalize(ws: Tensor, M: int, block_m: int) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance from per-tile partials ``ws[p] = (Σy, Σ(y - ȳ_p)²)`` of
    tiles of ``block_m`` rows (the last one shorter): ``bn_act.tile_stats``, Chan's merge
    in float64 (one launch, two with many tiles)."""
    return tile_stats(ws, M, block_m)


def conv_fwd(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
             prologue: Optional[Tensor] = None, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
             relu: bool = False, stats: bool = False, allow_tf32: bool = False
             ) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """``out = act(conv(prologue(x), weight) + bias + residual)`` in x's dtype,
    channels_last; with ``stats``, also the batch (mean, biased var) of ``out`` per
    channel (fp32). ``prologue`` is a [2, Cin] fp32 (scale, shift): the conv reads
    ``relu(x*scale + shift)``. ``bias`` is fp32 [Cout]."""
    _check_dtype(x.dtype)
    _check_operand("x", x, x.dtype, x.device)
    _check_operand("weight", weight, x.dtype, x.device)
    N, Cin, H, W = x.shape
    Cout, wc, KH, KW = weight.shape
    if wc != Cin:
        raise ValueError(f"resfused triton conv: weight expects {wc} input channels, x has {Cin} (groups=1 only)")
    sxn, sxh, sxw = _pixel_strides("x", x)
    OH = out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = out_size(W, KW, stride[1], padding[1], dilation[1])
    if OH <= 0 or OW <= 0:
        raise ValueError(f"resfused triton conv: input {H}x{W} is too small for kernel {KH}x{KW}")
    _per_channel("prologue", prologue, 2, Cin)
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (Cout,)):
        raise ValueError(f"resfused triton conv: bias must be a [{Cout}] float32 tensor")
    out = torch.empty((N, Cout, OH, OW), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if residual is not None:
        _check_operand("residual", residual, x.dtype, x.device)
        if residual.shape != out.shape:
            raise ValueError(f"resfused triton conv: residual shape {tuple(residual.shape)} != output shape "
                             f"{tuple(out.shape)}")
        _rows("residual", residual)
    M = N * OH * OW
    if prologue is None and bias is None and residual is None and not relu and not stats:
        bias = torch.zeros((Cout,), dtype=torch.float32, device=x.device)  # a plain conv: zero bias
    mode = _fwd_mode(prologue is not None, bias is not None, residual is not None, relu, stats)
    config = _pick_config("fwd", x.dtype, M, Cout, x, (Cin, Cout, sxn, sxh, sxw))
    bm = CONFIGS["fwd"][width_key(x.dtype)][config].block_m
    bn = CONFIGS["fwd"][width_key(x.dtype)][config].block_n
    f32 = _fp32_placeholder(x.device)  # for fp32 pointer arguments a mode does not read
    ws = torch.empty((_cdiv(M, bm), 2, Cout), dtype=torch.float32, device=x.device) if stats else f32
    if M > 0:
        wt = weight.permute(2, 3, 1, 0).contiguous()  # [KH, KW, Cin, Cout]
        grid = (_cdiv(M, bm) * _cdiv(Cout, bn),)
        _launch("fwd", grid, (x, wt, out, prologue if prologue is not None else f32, bias if bias is not None else f32,
                              residual if residual is not None else out, ws,
                              N, H, W, Cin, sxn, sxh, sxw, OH, OW, Cout, M,
                              stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], KH, KW),
                x.dtype, config, mode, _tf32(x.dtype, allow_tf32))
    if not stats:
        return out, None
    if M == 0:
        nan = torch.full((Cout,), float("nan"), dtype=torch.float32, device=x.device)
        return out, (nan, nan.clone())
    return out, stats_finalize(ws, M, bm)


def _tf32(dtype: torch.dtype, allow: bool) -> int:
    return 1 if dtype != torch.float32 or allow else 0


def _fwd_mode(pro: bool, bias: bool, res: bool, relu: bool, stats: bool) -> str:
    want = dict(PROLOGUE=int(pro), BIAS=int(bias), RES=int(res), RELU=int(relu), STATS=int(stats))
    for name, flags in MODES["fwd"].items():
        if flags == want:
            return name
    raise ValueError(f"resfused triton conv: no fused forward for prologue={pro}, bias={bias}, residual={res}, "
                     f"relu={relu}, stats={stats}; fused forwards: {', '.join(MODES['fwd'])}")


def _check_backward(grad_out: Tensor, name: str, operand: Tensor, input_shape: Sequence[int],
                    weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int]) -> None:
    """dgrad's and wgrad's checks: dtypes and devices, grad_out channels_last-contiguous,
    and grad_out, the conv input and the weight shapes agreeing with each other."""
    _check_dtype(grad_out.dtype)
    _check_operand("grad_out", grad_out, grad_out.dtype, grad_out.device)
    _check_operand(name, operand, grad_out.dtype, grad_out.device)
    _rows("grad_out", grad_out)
    N, Cin, H, W = (int(v) for v in input_shape)
    Cout, wc, KH, KW = (int(v) for v in weight_shape)
    OH, OW = grad_out.shape[2], grad_out.shape[3]
    if wc != Cin or grad_out.shape[1] != Cout or grad_out.shape[0] != N or \
            OH != out_size(H, KH, stride[0], padding[0], dilation[0]) or \
            OW != out_size(W, KW, stride[1], padding[1], dilation[1]):
        raise ValueError(f"resfused triton conv: grad_out {tuple(grad_out.shape)}, input {tuple(input_shape)} and "
                         f"weight {tuple(weight_shape)} shapes do not agree")


def conv_dgrad(grad_out: Tensor, weight: Tensor, input_shape: Sequence[int], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], bn_input: Optional[Tensor] = None,
               affine: Optional[Tensor] = None, bn_stats: Optional[Tensor] = None, allow_tf32: bool = False
               ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradient of the conv input (channels_last, grad_out's dtype). With ``bn_input``
    (the previous BN's input y, shaped like the conv input), ``affine`` (scale, shift)
    and ``bn_stats`` (mean, invstd), the conv input was ``relu(y*scale + shift)``: returns
    ``dz`` (the ReLU-masked gradient) and the sums ``(Σdz, Σdz*x̂)`` [2, Cin] fp32."""
    _check_backward(grad_out, "weight", weight, input_shape, weight.shape, stride, padding, dilation)
    N, Cin, H, W = (int(v) for v in input_shape)
    Cout, _, KH, KW = weight.shape
    OH, OW = grad_out.shape[2], grad_out.shape[3]
    epi = bn_input is not None
    syn = syh = syw = 0
    if epi:
        _check_operand("bn_input", bn_input, grad_out.dtype, grad_out.device)
        if tuple(bn_input.shape) != (N, Cin, H, W):
            raise ValueError("resfused triton conv: bn_input must have the conv input's shape")
        syn, syh, syw = _pixel_strides("bn_input", bn_input)
        _per_channel("affine", affine, 2, Cin)
        _per_channel("bn_stats", bn_stats, 2, Cin)
    dx = torch.empty((N, Cin, H, W), dtype=grad_out.dtype, device=grad_out.device, memory_format=torch.channels_last)
    # stride phases (dilation 1): each phase runs only the taps that reach its pixels
    qh, qw = (int(stride[0]), int(stride[1])) if tuple(dilation) == (1, 1) else (1, 1)
    M = N * _cdiv(H, qh) * _cdiv(W, qw)  # rows of the largest phase
    config = _pick_config("dgrad", grad_out.dtype, M * qh * qw, Cin, grad_out, (Cin, Cout, syn, syh, syw))
    cfg = CONFIGS["dgrad"][width_key(grad_out.dtype)][config]
    tiles = _cdiv(M, cfg.block_m)
    ws = torch.zeros((qh * qw * tiles, 2, Cin), dtype=torch.float32, device=dx.device) if epi else None
    if N * H * W > 0:
        wt = weight.permute(2, 3, 0, 1).contiguous()  # [KH, KW, Cout, Cin]
        grid = (tiles * _cdiv(Cin, cfg.block_n), qh * qw)
        f32 = _fp32_placeholder(dx.device)  # for fp32 pointer arguments the plain mode does not read
        _launch("dgrad", grid, (grad_out, wt, dx, bn_input if epi else dx, affine if epi else f32,
                                bn_stats if epi else f32, ws if epi else f32, N, H, W, Cin, syn, syh, syw, OH, OW,
                                Cout, M, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], KH, KW,
                                qh, qw),
                grad_out.dtype, config, "bn_relu" if epi else "plain", _tf32(grad_out.dtype, allow_tf32))
    if not epi:
        return dx, None
    return dx, ws.sum(0)


def _wgrad_split(rows_tiles: int, M: int, block_k: int, t: Tensor) -> int:
    """Splits of the pixel reduction: enough programs for ~2 per SM, each at least
    8 blocks of pixels long."""
    target = 2 * _sms(t)
    split = max(1, min(_cdiv(target, max(rows_tiles, 1)), _cdiv(M, 8 * block_k)))
    return split


def conv_wgrad(grad_out: Tensor, x: Tensor, weight_shape: Sequence[int], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], prologue: Optional[Tensor] = None,
               allow_tf32: bool = False) -> Tensor:
    """Gradient of the weight, fp32 ``[Cout, Cin, KH, KW]``. With ``prologue`` the conv's
    input was ``relu(x*scale + shift)``, recomputed here while loading x."""
    _check_backward(grad_out, "x", x, x.shape, weight_shape, stride, padding, dilation)
    Cout, Cin, KH, KW = (int(v) for v in weight_shape)
    N, _, H, W = x.shape
    OH, OW = grad_out.shape[2], grad_out.shape[3]
    _per_channel("prologue", prologue, 2, Cin)
    sxn, sxh, sxw = _pixel_strides("x", x)
    M = N * OH * OW
    if M == 0:
        return torch.zeros((Cout, KH, KW, Cin), dtype=torch.float32, device=x.device).permute(0, 3, 1, 2)
    dw = torch.empty((Cout, KH, KW, Cin), dtype=torch.float32, device=x.device)  # every element written
    config = _pick_config("wgrad", x.dtype, Cout, KH * KW * Cin, x, (Cin, Cout, sxn, sxh, sxw))
    cfg = CONFIGS["wgrad"][width_key(x.dtype)][config]
    tiles = _cdiv(Cout, cfg.block_m) * KH * KW * _cdiv(Cin, cfg.block_n)
    split = _wgrad_split(tiles, M, cfg.block_k, x)
    m_per_split = _cdiv(_cdiv(M, split), cfg.block_k) * cfg.block_k
    split = _cdiv(M, m_per_split)
    ws = dw.view(1, Cout, KH * KW * Cin) if split == 1 else \
        torch.empty((split, Cout, KH * KW * Cin), dtype=torch.float32, device=x.device)
    _launch("wgrad", (tiles, split), (grad_out, x, prologue if prologue is not None else ws, ws,
                                      N, H, W, Cin, sxn, sxh, sxw, OH, OW, Cout, M, m_per_split,
                                      stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], KH, KW),
            x.dtype, config, "prologue" if prologue is not None else "plain", _tf32(x.dtype, allow_tf32))
    if split > 1:
        torch.sum(ws, dim=0, out=dw.view(Cout, KH * KW * Cin))
    return dw.permute(0, 3, 1, 2)
