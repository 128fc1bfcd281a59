// Internal interface between the CPU entry points (bn_act.cpp) and the kernel
// bodies, which are compiled twice: once for the baseline ISA (bn_act.cpp) and
// once for AVX2+FMA (bn_act_avx2.cpp, chosen at run time). Plain data only, so
// both translation units agree on it whatever their target flags.
#pragma once

#include <c10/core/ScalarType.h>
#include <cstdint>
#include <functional>

namespace resfused {
namespace cpu {

struct BnArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t N = 0, C = 0, HW = 0;
  bool cl = false;  // channels_last (rows of C channels) else NCHW (rows of HW)
  // x only (fwd, bwd_reduce, bwd_apply): 0 when x is dense, else x is a channel-prefix
  // view of a wider tensor and this is its batch stride (NCHW) or row stride (CL).
  int64_t xs = 0;
  // big tensors (x's dtype, all in x's layout)
  const void* x = nullptr;
  const void* r = nullptr;     // residual
  const void* g = nullptr;     // grad_out
  const void* o_in = nullptr;  // out (for the relu mask)
  void* y = nullptr;           // out / dx / dz (bwd_reduce, when written)
  void* dres = nullptr;
  // per-channel rows, accumulation dtype (double for double x, else float), each [C]:
  //   p[0..3]  scale, shift, res_scale, res_shift   (fwd, and the recomputed relu mask)
  //   p[4..7]  mean, invstd            (bwd_reduce: stats)     / mean, k, mdz, p (bwd_apply: coef)
  //   p[8..11] res mean, res invstd    (bwd_reduce: res_stats) / the same four of res_coef
  const void* p[12] = {};
  // outputs of the reductions ([k, C], accumulation dtype)
  void* red = nullptr;
  void* red2 = nullptr;  // bn_stats: the variance ([C]); red holds the mean
  // modes
  int mask = 0;      // 0: dz = g, 1: dz = (out <= 0 ? 0 : g), 2: the same with z recomputed
  bool has_res = false;
  bool relu = false;
  int rstats = 0;    // bwd_reduce: 1 when res_stats given
  int dres_mode = 0; // bwd_apply: 0 none, 1 dz, 2 BN input grad with res_coef
  // bwd_apply without residual: y (dx) has x's strides (xs) and dx is added to what it holds
  bool acc = false;
};

// relu(x*scale + shift) then max pooling with indices (dilation 1, floor), NCHW.
struct PoolArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t N = 0, C = 0, H = 0, W = 0, OH = 0, OW = 0;
  int64_t kH = 1, kW = 1, sH = 1, sW = 1, pH = 0, pW = 0;
  const void* x = nullptr;
  const void* scale = nullptr;  // [C] then shift [C], accumulation dtype
  void* out = nullptr;          // [N, C, OH, OW], x's dtype
  int64_t* idx = nullptr;       // [N, C, OH, OW]: ih * W + iw of each maximum
};

struct KernelTable {
  void (*stats)(const BnArgs&);
  void (*fwd)(const BnArgs&);
  void (*bwd_reduce)(const BnArgs&);
  void (*bwd_apply)(const BnArgs&);
  void (*relu_maxpool)(const PoolArgs&);
};

// Number of work slots for `work` elements (1 when small, nested, or single-threaded).
int64_t num_slots(int64_t work);
// Runs f(k) for k in [0, n), spread over the intra-op threads. Blocks until done.
void run_slots(int64_t n, const std::function<void(int64_t)>& f);

const KernelTable* kernels_default();
const KernelTable* kernels_avx2();  // nullptr when not built for x86-64 / GCC-compatible compilers

}  // namespace cpu
}  // namespace resfused
