// CUDA kernels of the fused BN-activation ops (see csrc/bn_act.h and the
// executable contract in resfused/ops/eager.py).
//
// Kernels
//   ew_nchw_kernel<Op, V, kChanPerVec>
//                           flat grid-stride elementwise pass (forward apply or
//                           backward apply). Serves NCHW (channel = (i / HW) % C)
//                           and, with HW = 1, channels_last tensors whose C is not
//                           a multiple of the vector width. The (image, channel,
//                           row offset) of a thread's position is tracked
//                           incrementally: a few 64-bit divisions per thread, none
//                           per element; per-channel parameters are reloaded only
//                           when the channel changes, and looked up once per vector
//                           where HW % V == 0.
//   ew_nhwc_kernel<Op, V>   channels_last elementwise pass, 2-D blocks: threads
//                           along C own V channels each (parameters in registers,
//                           loaded once per thread), rows split over threads.y and
//                           grid.y (grid-stride).
//   stats_nchw/nhwc_kernel  per-block Welford partials (count, mean, M2) per
//                           channel, written to a workspace [3, S, C].
//   reduce_nchw/nhwc_kernel per-block partial sums (sum dz, sum dz*x_hat[, sum
//                           dz*r_hat]) per channel, workspace [K, S, C].
//   stats_finalize_kernel / sum_finalize_kernel: one warp per channel merges the
//                           S partials in a fixed order (deterministic, no atomics).
//
// x may also be a channel-prefix view wide[:, :C] of a wider tensor (a dense block's
// layer reading its prefix of the feature buffer) in the forward apply, the backward
// reduction and the backward apply. channels_last: its pixel rows are xs >= C elements
// apart, read by the channels_last kernels only (row m of x at m*xs, of every other
// tensor at m*C); the entry points copy x contiguous where they would not launch
// those. NCHW: its images are xb >= C*HW elements apart, read by the flat and NCHW
// reduction kernels (vectorised where xb and C*HW resp. HW allow). The accumulating
// apply (bn_act_bwd_apply_acc: dx added into a tensor with x's strides, e.g. the same
// prefix of the dense block's gradient buffer) reads and writes that tensor at x's
// offsets; where x would be copied its entry point runs it on contiguous copies of x
// and acc and copies the result back.
//
// Accumulation is in float (double for double input). Every index that can
// exceed 2^31 is int64. Vector width V = 16 bytes / sizeof(scalar) when all base
// pointers are aligned (and, for the channels_last and NCHW-reduction paths, C
// resp. HW is a multiple of V; for an NCHW prefix view, its image stride and, in the
// flat kernel, C*HW too); otherwise V = 1.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "bn_act.h"

namespace resfused {
namespace {

// ---- kernels begin: tests/test_cuda_sim.py compiles the section down to "kernels end"
// ---- as host C++ and runs it on a simulated GPU (tests/cuda_sim)
constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Vector width for 16-byte accesses.
template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, V>*>(p + i);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p + i) = v;
}

__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return ::fma(a, b, c); }

// torch.relu: NaN propagates (NaN < 0 is false).
template <typename A>
__device__ __forceinline__ A relu_(A z) {
  return z < A(0) ? A(0) : z;
}

// Pre-activation z = x*scale + shift [+ r | + r*rscale + rshift]. The same
// function is used by the forward pass and by the mask recompute of backward.
template <typename A>
__device__ __forceinline__ A preact(A x, A r, A sc, A sh, A rsc, A rsh, bool has_res, bool res_aff) {
  A z = fma_(x, sc, sh);
  if (has_res) z += res_aff ? fma_(r, rsc, rsh) : r;
  return z;
}

// relu's backward keeps g unless m <= 0 (threshold_backward: a NaN m passes g).
template <typename A>
__device__ __forceinline__ bool relu_keeps(A m) {
  return !(m <= A(0));
}

// (x - mean) * p, or 0 where p == 0 (eval: the gradient does not depend on x, so an
// infinite x gives a finite gradient, as eager's).
template <typename A>
__device__ __forceinline__ A x_term(A x, A mean, A p) {
  return p == A(0) ? A(0) : (x - mean) * p;
}

// ---------------------------------------------------------------------------
// Elementwise ops. Op::load<V>(e, xe) loads the inputs of elements [e, e+V)
// (x's at [xe, xe+V): xe == e except for a prefix view, see both kernels);
// Op::finish<V>(e, xe, regs, get) computes and stores them (at e; an accumulated dx of
// ApplyOp<.., true> at xe), calling get(j) exactly once per element, in order
// j = 0..V-1, for that element's channel params.
// ---------------------------------------------------------------------------

template <typename T, typename A>
struct FwdOp {
  const T* x;
  const T* res;
  T* out;
  const A* affine;      // [2, C]
  const A* res_affine;  // [2, C] or nullptr
  int64_t C;
  int64_t xs;  // x's row stride in the channels_last kernel (C unless x is a prefix view)
  bool relu, has_res, res_aff;

  // vector width of the channels_last 2-D kernel
  static constexpr int kNhwcVec = vec16<T>();

  struct Chan {
    A sc, sh, rsc, rsh;
  };

  __device__ __forceinline__ Chan chan(int64_t c) const {
    Chan p;
    p.sc = affine[c];
    p.sh = affine[C + c];
    if (res_aff) {
      p.rsc = res_affine[c];
      p.rsh = res_affine[C + c];
    } else {
      p.rsc = A(1);
      p.rsh = A(0);
    }
    return p;
  }

  template <int V>
  struct Regs {
    Pack<T, V> x, r;
  };

  template <int V>
  __device__ __forceinline__ Regs<V> load(int64_t e, int64_t xe) const {
    Regs<V> R{};
    R.x = load_pack<V>(x, xe);
    if (has_res) R.r = load_pack<V>(res, e);
    return R;
  }

  template <int V, typename Get>
  __device__ __forceinline__ void finish(int64_t e, int64_t, const Regs<V>& R, Get&& get) const {
    Pack<T, V> ov;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Chan p = get(j);
      A z = preact(static_cast<A>(R.x.v[j]), static_cast<A>(R.r.v[j]), p.sc, p.sh, p.rsc, p.rsh, has_res, res_aff);
      if (relu) z = relu_(z);
      ov.v[j] = static_cast<T>(z);
    }
    store_pack<V>(out, e, ov);
  }
};

// ACC: no residual; dx has x's strides (stored at x's offset xe) and dx is added to what
// it holds, rounded once. RBN: the residual may be a BN's input (res_aff, has_rcoef); when
// false those are taken as false at compile time and their per-channel parameters take no
// registers.
template <typename T, typename A, bool ACC = false, bool RBN = true>
struct ApplyOp {
  const T* g;
  const T* x;
  const T* res;  // nullptr when no residual
  const T* out;  // nullptr unless the mask is read from out
  T* dx;
  T* dres;              // nullptr when no residual
  const A* affine;      // [2, C]
  const A* res_affine;  // [2, C] or nullptr
  const A* coef;        // [4, C]: mean, k, mdz, p
  const A* res_coef;    // [4, C] or nullptr
  int64_t C;
  int64_t xs;  // x's row stride in the channels_last kernel (C unless x is a prefix view)
  bool relu, use_out, has_res, res_aff, has_rcoef, need_r;

  // 12 parameters per owned channel (6 without RBN) live in registers in the
  // channels_last kernel: 8-byte accesses for 16-bit types keep it under ~110 registers
  // with RBN, ~80 without (16-byte ones would take 130: one block per SM).
  static constexpr int kNhwcVec = sizeof(T) == 2 ? 4 : vec16<T>();
  __device__ __forceinline__ bool rbn_aff() const { return RBN && res_aff; }
  __device__ __forceinline__ bool rbn_coef() const { return RBN && has_rcoef; }

  struct Chan {
    A sc, sh, rsc, rsh, mean, k, mdz, p, rmean, rk, rmdz, rp;
  };

  __device__ __forceinline__ Chan chan(int64_t c) const {
    Chan q;
    q.sc = affine[c];
    q.sh = affine[C + c];
    q.rsc = A(1);
    q.rsh = A(0);
    if (rbn_aff()) {
      q.rsc = res_affine[c];
      q.rsh = res_affine[C + c];
    }
    q.mean = coef[c];
    q.k = coef[C + c];
    q.mdz = coef[2 * C + c];
    q.p = coef[3 * C + c];
    q.rmean = q.rk = q.rmdz = q.rp = A(0);
    if (rbn_coef()) {
      q.rmean = res_coef[c];
      q.rk = res_coef[C + c];
      q.rmdz = res_coef[2 * C + c];
      q.rp = res_coef[3 * C + c];
    }
    return q;
  }

  template <int V>
  struct Regs {
    Pack<T, V> g, x, r, o, d;
  };

  template <int V>
  __device__ __forceinline__ Regs<V> load(int64_t e, int64_t xe) const {
    Regs<V> R{};
    R.g = load_pack<V>(g, e);
    R.x = load_pack<V>(x, xe);
    if (need_r) R.r = load_pack<V>(res, e);
    if (use_out) R.o = load_pack<V>(out, e);
    if constexpr (ACC) R.d = load_pack<V>(static_cast<const T*>(dx), xe);
    return R;
  }

  template <int V, typename Get>
  __device__ __forceinline__ void finish(int64_t e, int64_t xe, const Regs<V>& R, Get&& get) const {
    Pack<T, V> dxv, drv;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Chan q = get(j);
      const A xj = static_cast<A>(R.x.v[j]);
      const A rj = static_cast<A>(R.r.v[j]);
      A dz = static_cast<A>(R.g.v[j]);
      if (relu) {
        const bool m = relu_keeps(use_out ? static_cast<A>(R.o.v[j])
                                          : preact(xj, rj, q.sc, q.sh, q.rsc, q.rsh, has_res, rbn_aff()));
        dz = m ? dz : A(0);
      }
      A d = ((dz - q.mdz) - x_term(xj, q.mean, q.p)) * q.k;
      if constexpr (ACC) d = static_cast<A>(R.d.v[j]) + d;
      dxv.v[j] = static_cast<T>(d);
      drv.v[j] = static_cast<T>(rbn_coef() ? ((dz - q.rmdz) - x_term(rj, q.rmean, q.rp)) * q.rk : dz);
    }
    store_pack<V>(dx, ACC ? xe : e, dxv);
    if (has_res) store_pack<V>(dres, e, drv);
  }
};

// Flat elementwise kernel. Element i has channel (i / HW) % C (NCHW; HW = 1 for
// channels_last). Vectors of V elements may straddle rows/channels. x is dense like
// every other tensor here (op.xs is not used), or, in NCHW, a channel-prefix view
// whose images are C*HW + xgap elements apart: element i of x is at i + n*xgap,
// n = i / (C*HW); then a vector never straddles two images (C*HW % V == 0).
//
// kChanPerVec (HW % V == 0, always so for V == 1): no vector straddles two channels, so a
// channel's params are looked up once per vector and the per-element work is the op's
// arithmetic alone (for 16-bit types, 8 elements per vector, the per-element channel
// tracking costs more issue slots than the memory traffic leaves).
template <typename Op, int V, bool kChanPerVec>
__global__ void __launch_bounds__(kThreads) ew_nchw_kernel(Op op, int64_t numel, int64_t HW, int C, int64_t xgap) {
  using Chan = typename Op::Chan;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthr = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / V;
  const int64_t CHW = HW * C;
  // The numel % V (< V <= 8) trailing elements, one per thread: the grid has at
  // least kThreads >= V threads (a loop here costs a spill on sm_80).
  static_assert(kThreads >= 16, "tail handling needs blockDim >= V");
  if (V > 1) {
    const int64_t i = nvec * V + tid;
    if (i < numel) {
      const Chan p = op.chan((i / HW) % C);
      const int64_t xi = i + (i / CHW) * xgap;
      op.template finish<1>(i, xi, op.template load<1>(i, xi), [&](int) -> Chan { return p; });
    }
  }
  if (tid >= nvec) return;
  // Each iteration handles the vectors v and v + nthr (loads of both issued
  // before either is computed), then advances by 2*nthr vectors.
  const int64_t step = nthr * V;  // elements between the two vectors
  const int64_t step_r = step % HW;
  const int step_c = static_cast<int>((step / HW) % C);
  const int64_t step_n = step / CHW;
  // (n, c, off) += step elements; off + step_r < 2HW, c + step_c + 1 <= 2C - 1
  auto advance = [&](int64_t& off, int& c, int64_t& n) {
    off += step_r;
    c += step_c;
    n += step_n;
    if (off >= HW) {
      off -= HW;
      ++c;
    }
    if (c >= C) {
      c -= C;
      ++n;
    }
  };
  int64_t off = (tid * V) % HW;                        // position inside the (n, c) row
  int c = static_cast<int>(((tid * V) / HW) % C);      // channel of element tid*V
  int64_t n = (tid * V) / CHW;                         // its image
  int cur_c = -1;
  Chan cur{};
  // channel params for elements e, e+1, ... starting at (o, cc); reloaded on change
  auto run = [&](int64_t e, int64_t xe, const typename Op::template Regs<V>& R, int64_t o, int cc) {
    if constexpr (kChanPerVec) {
      if (cc != cur_c) {
        cur = op.chan(cc);
        cur_c = cc;
      }
      op.template finish<V>(e, xe, R, [&](int) -> Chan { return cur; });
      return;
    }
    op.template finish<V>(e, xe, R, [&](int) -> Chan {
      if (cc != cur_c) {
        cur = op.chan(cc);
        cur_c = cc;
      }
      if (++o == HW) {
        o = 0;
        if (++cc == C) cc = 0;
      }
      return cur;
    });
  };
  for (int64_t v = tid; v < nvec; v += 2 * nthr) {
    const int64_t e0 = v * V, e1 = e0 + step;
    const bool two = v + nthr < nvec;
    int64_t off1 = off, n1 = n;
    int c1 = c;
    advance(off1, c1, n1);
    const int64_t xe0 = e0 + n * xgap, xe1 = e1 + n1 * xgap;
    const auto R0 = op.template load<V>(e0, xe0);
    typename Op::template Regs<V> R1{};
    if (two) R1 = op.template load<V>(e1, xe1);
    run(e0, xe0, R0, off, c);
    if (two) run(e1, xe1, R1, off1, c1);
    off = off1;
    c = c1;
    n = n1;
    advance(off, c, n);
  }
}

// channels_last elementwise kernel: element (m, c) at m*C + c (x's at m*op.xs + c),
// C % V == 0 and op.xs % V == 0.
template <typename Op, int V>
__global__ void __launch_bounds__(kThreads) ew_nhwc_kernel(Op op, int64_t M, int C) {
  using Chan = typename Op::Chan;
  const int Cv = C / V;
  const int cg = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (cg >= Cv) return;
  const int c0 = cg * V;
  Chan ps[V];
#pragma unroll
  for (int j = 0; j < V; ++j) ps[j] = op.chan(c0 + j);
  auto get = [&](int j) -> Chan { return ps[j]; };
  // rows m and m + rstride per iteration, loads of both issued first
  const int64_t rstride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; m < M; m += 2 * rstride) {
    const int64_t e0 = m * C + c0, e1 = e0 + rstride * C;
    const int64_t xe0 = m * op.xs + c0, xe1 = xe0 + rstride * op.xs;
    const bool two = m + rstride < M;
    const auto R0 = op.template load<V>(e0, xe0);
    typename Op::template Regs<V> R1{};
    if (two) R1 = op.template load<V>(e1, xe1);
    op.template finish<V>(e0, xe0, R0, get);
    if (two) op.template finish<V>(e1, xe1, R1, get);
  }
}

// ---------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------

template <typename A>
struct Welford {
  A n, mean, m2;
};

// Chan et al. merge; empty sides are exact no-ops.
template <typename A>
__device__ __forceinline__ Welford<A> wf_merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == A(0)) return a;
  if (a.n == A(0)) return b;
  const A n = a.n + b.n;
  const A f = b.n / n;
  const A d = b.mean - a.mean;
  Welford<A> r;
  r.n = n;
  r.mean = a.mean + d * f;
  r.m2 = a.m2 + b.m2 + d * d * a.n * f;
  return r;
}

template <typename A>
__device__ __forceinline__ Welford<A> wf_warp_reduce(Welford<A> s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Welford<A> o;
    o.n = __shfl_down_sync(kFullMask, s.n, off);
    o.mean = __shfl_down_sync(kFullMask, s.mean, off);
    o.m2 = __shfl_down_sync(kFullMask, s.m2, off);
    s = wf_merge(s, o);
  }
  return s;  // valid in lane 0
}

// 1-D block of kThreads; result valid in thread 0.
template <typename A>
__device__ __forceinline__ Welford<A> wf_block_reduce(Welford<A> s) {
  __shared__ A sm[3][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  s = wf_warp_reduce(s);
  if (lane == 0) {
    sm[0][warp] = s.n;
    sm[1][warp] = s.mean;
    sm[2][warp] = s.m2;
  }
  __syncthreads();
  if (warp == 0) {
    if (lane < kWarps) {
      s.n = sm[0][lane];
      s.mean = sm[1][lane];
      s.m2 = sm[2][lane];
    } else {
      s.n = s.mean = s.m2 = A(0);
    }
    s = wf_warp_reduce(s);
  }
  return s;
}

// 1-D block of kThreads; sums of K values, result valid in thread 0.
template <typename A, int K>
__device__ __forceinline__ void sum_block_reduce(A (&v)[K]) {
  __shared__ A sm[K][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(kFullMask, v[k], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sm[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = lane < kWarps ? sm[k][lane] : A(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(kFullMask, v[k], off);
    }
  }
}

__device__ __forceinline__ int pow2_ceil(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// ---- statistics ----------------------------------------------------------

// NCHW: block (c = blockIdx.x, split s = blockIdx.y) reduces vectors
// [s*chunk, min(nvc, (s+1)*chunk)) of channel c, where the channel's vector v
// is (n = v / HWv, hv = v % HWv), at element n*C*HW + c*HW + hv*V. HW % V == 0.
template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    stats_nchw_kernel(const T* __restrict__ x, int C, int64_t HW, int64_t nvc, int64_t chunk, A* __restrict__ ws) {
  const int c = blockIdx.x;
  const int s = blockIdx.y;
  const int S = gridDim.y;
  const int64_t HWv = HW / V;
  const int64_t CHW = static_cast<int64_t>(C) * HW;
  const T* xc = x + static_cast<int64_t>(c) * HW;
  const int64_t v0 = static_cast<int64_t>(s) * chunk;
  const int64_t v1 = min(nvc, v0 + chunk);
  const int64_t q = kThreads / HWv, r = kThreads % HWv;
  Welford<A> st{A(0), A(0), A(0)};
  int64_t v = v0 + threadIdx.x;
  int64_t n = v / HWv, hv = v - n * HWv;
  for (; v < v1; v += kThreads) {
    const Pack<T, V> p = load_pack<V>(xc, n * CHW + hv * V);
    // exact-ish stats of the V values, then one Chan merge
    A vals[V];
    A sum = A(0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      vals[j] = static_cast<A>(p.v[j]);
      sum += vals[j];
    }
    const A mv = sum * (A(1) / A(V));  // V is a power of two: exact
    A m2v = A(0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A d = vals[j] - mv;
      m2v += d * d;
    }
    const A nn = st.n + A(V);
    const A f = A(V) / nn;
    const A d = mv - st.mean;
    st.mean += d * f;
    st.m2 += m2v + d * d * st.n * f;
    st.n = nn;
    hv += r;
    n += q;
    if (hv >= HWv) {
      hv -= HWv;
      ++n;
    }
  }
  st = wf_block_reduce(st);
  if (threadIdx.x == 0) {
    const int64_t o = static_cast<int64_t>(s) * C + c;
    const int64_t SC = static_cast<int64_t>(S) * C;
    ws[o] = st.n;
    ws[SC + o] = st.mean;
    ws[2 * SC + o] = st.m2;
  }
}

// channels_last: block (bdx, bdy); thread (tx, ty) of block (bx, by) owns channels
// [cg*V, cg*V+V), cg = bx*bdx + tx, and rows by*bdy + ty + k*gridDim.y*bdy.
template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    stats_nhwc_kernel(const T* __restrict__ x, int C, int64_t M, A* __restrict__ ws) {
  __shared__ A sm_n[kThreads];
  __shared__ A sm_mean[kThreads * V];
  __shared__ A sm_m2[kThreads * V];
  const int tx = threadIdx.x, ty = threadIdx.y, bdx = blockDim.x, bdy = blockDim.y;
  const int Cv = C / V;
  const int cg = static_cast<int>(blockIdx.x) * bdx + tx;
  const bool active = cg < Cv;
  const int64_t c0 = static_cast<int64_t>(cg) * V;
  int cnt = 0;
  A mean[V], m2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = A(0);
  if (active) {
    const int64_t rstride = static_cast<int64_t>(gridDim.y) * bdy;
    for (int64_t m = static_cast<int64_t>(blockIdx.y) * bdy + ty; m < M; m += rstride) {
      const Pack<T, V> p = load_pack<V>(x, m * C + c0);
      ++cnt;
      const A rc = A(1) / static_cast<A>(cnt);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A xv = static_cast<A>(p.v[j]);
        const A d = xv - mean[j];
        mean[j] += d * rc;
        m2[j] += d * (xv - mean[j]);
      }
    }
  }
  const int t = ty * bdx + tx;
  sm_n[t] = static_cast<A>(cnt);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sm_mean[t * V + j] = mean[j];
    sm_m2[t * V + j] = m2[j];
  }
  __syncthreads();
  for (int off = pow2_ceil(bdy) >> 1; off > 0; off >>= 1) {
    if (ty < off && ty + off < bdy) {
      const int u = (ty + off) * bdx + tx;
      const A na = sm_n[t], nb = sm_n[u];
      if (nb != A(0)) {
        if (na == A(0)) {
          sm_n[t] = nb;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            sm_mean[t * V + j] = sm_mean[u * V + j];
            sm_m2[t * V + j] = sm_m2[u * V + j];
          }
        } else {
          const A nn = na + nb;
          const A f = nb / nn;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const A d = sm_mean[u * V + j] - sm_mean[t * V + j];
            sm_mean[t * V + j] += d * f;
            sm_m2[t * V + j] += sm_m2[u * V + j] + d * d * na * f;
          }
          sm_n[t] = nn;
        }
      }
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
    const int64_t SC = static_cast<int64_t>(gridDim.y) * C;
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + c0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      ws[o + j] = sm_n[t];
      ws[SC + o + j] = sm_mean[t * V + j];
      ws[2 * SC + o + j] = sm_m2[t * V + j];
    }
  }
}

// One warp per channel merges the S partials (count, mean, M2) of ws [3, S, C].
template <typename A>
__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(const A* __restrict__ ws, int S, int C, A count, A* __restrict__ mean, A* __restrict__ var) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (c >= C) return;  // uniform per warp
  const int64_t SC = static_cast<int64_t>(S) * C;
  Welford<A> st{A(0), A(0), A(0)};
  for (int i = lane; i < S; i += 32) {
    const int64_t o = static_cast<int64_t>(i) * C + c;
    Welford<A> b{ws[o], ws[SC + o], ws[2 * SC + o]};
    st = wf_merge(st, b);
  }
  st = wf_warp_reduce(st);
  if (lane == 0) {
    mean[c] = st.mean;
    var[c] = st.m2 / count;
  }
}

// ---- backward reduction -------------------------------------------------------

template <typename T, typename A>
struct RedArgs {
  const T* g;
  const T* x;
  const T* res;  // needed for the mask recompute or res_stats, else nullptr
  const T* out;  // nullptr unless use_out
  const A* affine;      // [2, C]
  const A* stats;       // [2, C]: mean, invstd
  const A* res_affine;  // [2, C] or nullptr
  const A* res_stats;   // [2, C] or nullptr
  T* dz;                // written (dz in x's layout) when not nullptr
  int C;
  int64_t xs;  // x's row stride in reduce_nhwc_kernel (C unless x is a prefix view)
  int64_t xb;  // x's image stride in reduce_nchw_kernel (C*HW unless x is a prefix view)
  bool relu, use_out, has_res, res_aff, has_rstats, need_r;
};

template <typename T, typename A>
struct RedChan {
  A mean, inv, sc, sh, rsc, rsh, rmean, rinv;
};

// RBN (as ApplyOp's): the residual may be a BN's input (res_aff, has_rstats); when false
// those are false at compile time and take no registers.
template <typename T, typename A, bool RBN>
__device__ __forceinline__ RedChan<T, A> red_chan(const RedArgs<T, A>& a, int64_t c) {
  RedChan<T, A> q;
  const int64_t C = a.C;
  q.mean = a.stats[c];
  q.inv = a.stats[C + c];
  q.sc = a.affine[c];
  q.sh = a.affine[C + c];
  q.rsc = A(1);
  q.rsh = A(0);
  if (RBN && a.res_aff) {
    q.rsc = a.res_affine[c];
    q.rsh = a.res_affine[C + c];
  }
  q.rmean = q.rinv = A(0);
  if (RBN && a.has_rstats) {
    q.rmean = a.res_stats[c];
    q.rinv = a.res_stats[C + c];
  }
  return q;
}

// Accumulate one element into (s0, s1, s2); returns dz.
template <typename T, typename A, bool RBN>
__device__ __forceinline__ A red_elem(const RedArgs<T, A>& a, const RedChan<T, A>& q, A g, A x, A r, A o, A& s0,
                                      A& s1, A& s2) {
  A dz = g;
  if (a.relu) {
    const bool m = relu_keeps(a.use_out ? o : preact(x, r, q.sc, q.sh, q.rsc, q.rsh, a.has_res, RBN && a.res_aff));
    dz = m ? dz : A(0);
  }
  s0 += dz;
  s1 += dz * ((x - q.mean) * q.inv);
  if (RBN && a.has_rstats) s2 += dz * ((r - q.rmean) * q.rinv);
  return dz;
}

// Same partition as stats_nchw_kernel; ws is [3, S, C] (row 2 zero when unused).
// x's image n at n * a.xb.
template <typename T, typename A, int V, bool RBN>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(RedArgs<T, A> a, int64_t HW, int64_t nvc, int64_t chunk, A* __restrict__ ws) {
  const int C = a.C;
  const int c = blockIdx.x;
  const int s = blockIdx.y;
  const int S = gridDim.y;
  const int64_t HWv = HW / V;
  const int64_t CHW = static_cast<int64_t>(C) * HW;
  const int64_t cbase = static_cast<int64_t>(c) * HW;
  const int64_t v0 = static_cast<int64_t>(s) * chunk;
  const int64_t v1 = min(nvc, v0 + chunk);
  const int64_t q = kThreads / HWv, r = kThreads % HWv;
  const RedChan<T, A> cp = red_chan<T, A, RBN>(a, c);
  A acc[3] = {A(0), A(0), A(0)};
  int64_t v = v0 + threadIdx.x;
  int64_t n = v / HWv, hv = v - n * HWv;
  for (; v < v1; v += kThreads) {
    const int64_t e = n * CHW + cbase + hv * V;
    const Pack<T, V> gv = load_pack<V>(a.g, e);
    const Pack<T, V> xv = load_pack<V>(a.x, n * a.xb + cbase + hv * V);
    Pack<T, V> rv{}, ov{};
    if (a.need_r) rv = load_pack<V>(a.res, e);
    if (a.use_out) ov = load_pack<V>(a.out, e);
    Pack<T, V> dzv;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      dzv.v[j] = static_cast<T>(red_elem<T, A, RBN>(a, cp, static_cast<A>(gv.v[j]), static_cast<A>(xv.v[j]),
                                         static_cast<A>(rv.v[j]), static_cast<A>(ov.v[j]), acc[0], acc[1], acc[2]));
    }
    if (a.dz) store_pack<V>(a.dz, e, dzv);
    hv += r;
    n += q;
    if (hv >= HWv) {
      hv -= HWv;
      ++n;
    }
  }
  sum_block_reduce(acc);
  if (threadIdx.x == 0) {
    const int64_t o = static_cast<int64_t>(s) * C + c;
    const int64_t SC = static_cast<int64_t>(S) * C;
    ws[o] = acc[0];
    ws[SC + o] = acc[1];
    ws[2 * SC + o] = acc[2];
  }
}

// channels_last, same block shape as stats_nhwc_kernel; x's row m at m * a.xs. ws as
// reduce_nchw_kernel's (row 2 not written without RBN: the finalize reads K = 2 rows).
template <typename T, typename A, int V, bool RBN>
__global__ void __launch_bounds__(kThreads) reduce_nhwc_kernel(RedArgs<T, A> a, int64_t M, A* __restrict__ ws) {
  constexpr int K = RBN ? 3 : 2;
  __shared__ A sm[K][kThreads * V];
  const int C = a.C;
  const int tx = threadIdx.x, ty = threadIdx.y, bdx = blockDim.x, bdy = blockDim.y;
  const int Cv = C / V;
  const int cg = static_cast<int>(blockIdx.x) * bdx + tx;
  const bool active = cg < Cv;
  const int64_t c0 = static_cast<int64_t>(cg) * V;
  A s0[V], s1[V], s2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) s0[j] = s1[j] = s2[j] = A(0);
  if (active) {
    RedChan<T, A> ps[V];
#pragma unroll
    for (int j = 0; j < V; ++j) ps[j] = red_chan<T, A, RBN>(a, c0 + j);
    const int64_t rstride = static_cast<int64_t>(gridDim.y) * bdy;
    for (int64_t m = static_cast<int64_t>(blockIdx.y) * bdy + ty; m < M; m += rstride) {
      const int64_t e = m * C + c0;
      const Pack<T, V> gv = load_pack<V>(a.g, e);
      const Pack<T, V> xv = load_pack<V>(a.x, m * a.xs + c0);
      Pack<T, V> rv{}, ov{};
      if (a.need_r) rv = load_pack<V>(a.res, e);
      if (a.use_out) ov = load_pack<V>(a.out, e);
      Pack<T, V> dzv;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        dzv.v[j] = static_cast<T>(red_elem<T, A, RBN>(a, ps[j], static_cast<A>(gv.v[j]), static_cast<A>(xv.v[j]),
                                           static_cast<A>(rv.v[j]), static_cast<A>(ov.v[j]), s0[j], s1[j], s2[j]));
      }
      if (a.dz) store_pack<V>(a.dz, e, dzv);
    }
  }
  const int t = ty * bdx + tx;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sm[0][t * V + j] = s0[j];
    sm[1][t * V + j] = s1[j];
    if constexpr (RBN) sm[K - 1][t * V + j] = s2[j];
  }
  __syncthreads();
  for (int off = pow2_ceil(bdy) >> 1; off > 0; off >>= 1) {
    if (ty < off && ty + off < bdy) {
      const int u = (ty + off) * bdx + tx;
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int j = 0; j < V; ++j) sm[k][t * V + j] += sm[k][u * V + j];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
    const int64_t SC = static_cast<int64_t>(gridDim.y) * C;
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + c0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      ws[o + j] = sm[0][t * V + j];
      ws[SC + o + j] = sm[1][t * V + j];
      if constexpr (RBN) ws[2 * SC + o + j] = sm[K - 1][t * V + j];
    }
  }
}

// out[k, c] = sum over s of ws[k, s, c], k < K; one warp per channel, fixed order.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_finalize_kernel(const A* __restrict__ ws, int S, int C, int K, A* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (c >= C) return;  // uniform per warp
  const int64_t SC = static_cast<int64_t>(S) * C;
  for (int k = 0; k < K; ++k) {
    A v = A(0);
    for (int i = lane; i < S; i += 32) v += ws[k * SC + static_cast<int64_t>(i) * C + c];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
    if (lane == 0) out[static_cast<int64_t>(k) * C + c] = v;
  }
}

// BN coefficients from a channel's mean and variance (one thread per channel), updating
// the running statistics first when given: the per-channel step between the statistics
// pass and the apply pass in one launch (resfused/ops/eager.py: bn_coef).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    bn_coef_kernel(const A* __restrict__ mean, const A* __restrict__ var, const A* __restrict__ w,
                   const A* __restrict__ b, A* __restrict__ rm, A* __restrict__ rv, A* __restrict__ affine,
                   A* __restrict__ stats, int64_t C, A momentum, A keep, A eps, A unbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const A m = mean[c], v = var[c];
  if (rm != nullptr) {
    rm[c] = momentum * m + keep * rm[c];
    rv[c] = momentum * (v * unbias) + keep * rv[c];
  }
  const A invstd = A(1) / sqrt(v + eps);
  const A scale = w != nullptr ? w[c] * invstd : invstd;
  affine[c] = scale;
  affine[C + c] = b != nullptr ? b[c] - m * scale : -(m * scale);
  stats[c] = m;
  stats[C + c] = invstd;
}

// The backward's per-channel step between its reduction and apply passes (resfused/autograd/
// bn_act.py: _grad_coefficients): coef = (mean, scale, sum_dz / n, sum_dz_xhat * invstd / n), the
// last two zero for running statistics (eval), in one launch instead of three. "/ n" is a
// product with inv_n = 1 / n, rounded as ATen's CUDA division by a scalar rounds (it multiplies
// by the reciprocal), so that this op and the Python sequence give the same bits on a GPU.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    bn_grad_coef_kernel(const A* __restrict__ stats, const A* __restrict__ affine, const A* __restrict__ sum_dz,
                        const A* __restrict__ sum_dz_xhat, A* __restrict__ coef, int64_t C, bool training,
                        A inv_n) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  coef[c] = stats[c];
  coef[C + c] = affine[c];
  const A p = sum_dz_xhat[c] * stats[C + c];  // (rounded here: the Python sequence's mul_)
  coef[2 * C + c] = training ? sum_dz[c] * inv_n : A(0);
  coef[3 * C + c] = training ? p * inv_n : A(0);
}

// ---- kernels end

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct TypeTag {  // a type as a value (a generic lambda's argument)
  using type = T;
};

struct Shape {
  int64_t N, C, HW, numel;
  bool nchw;
  int64_t xs;  // x's row stride when channels_last: C, or more for a channel-prefix view
  int64_t xb;  // x's image stride when NCHW: C*HW, or more for a channel-prefix view
  bool dense_x() const { return xs == C && xb == C * HW; }
};

// The row stride rs > C of x when x is a channel-prefix view wide[:, :C] of a
// channels_last tensor (channels adjacent, pixel rows rs apart), else 0.
int64_t cl_prefix_stride(const at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (x.numel() == 0) return 0;
  const auto st = x.strides();
  const int64_t rs = w > 1 ? st[3] : h > 1 ? st[2] : st[0];
  const bool ok = (c == 1 || st[1] == 1) && rs > c && (h == 1 || st[2] == w * rs) && (n == 1 || st[0] == h * w * rs);
  return ok ? rs : 0;
}

// The image stride xb > C*H*W of x when x is a channel-prefix view wide[:, :C] of an
// NCHW tensor (each image's C planes dense, images xb apart; N > 1), else 0.
int64_t nchw_prefix_stride(const at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (x.numel() == 0 || n == 1) return 0;
  const auto st = x.strides();
  const bool inner = (w == 1 || st[3] == 1) && (h == 1 || st[2] == w) && (c == 1 || st[1] == h * w);
  return inner && st[0] > c * h * w ? st[0] : 0;
}

// x: CUDA, 4-D, NCHW-contiguous or channels_last-contiguous (or, with
// allow_prefix, a channel-prefix view of either), supported dtype.
Shape check_x(const at::Tensor& x, const char* op, bool allow_prefix = false) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": unsupported dtype ", st);
  Shape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = x.size(2) * x.size(3);
  s.numel = x.numel();
  s.nchw = x.is_contiguous();
  s.xs = s.C;
  s.xb = s.C * s.HW;
  if (!s.nchw && !x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    const int64_t rs = allow_prefix ? cl_prefix_stride(x) : 0;
    const int64_t xb = allow_prefix && rs == 0 ? nchw_prefix_stride(x) : 0;
    TORCH_CHECK(rs > 0 || xb > 0, op, ": x must be NCHW-contiguous or channels_last-contiguous",
                allow_prefix ? " (or a channel-prefix view of such a tensor)" : "");
    if (rs > 0) {
      s.xs = rs;
    } else {
      s.nchw = true;
      s.xb = xb;
    }
  }
  TORCH_CHECK(s.C < (int64_t(1) << 30), op, ": too many channels (", s.C, ")");
  return s;
}

// A big tensor sharing x's shape, dtype, device and layout.
void check_like_x(const at::Tensor& t, const at::Tensor& x, const Shape& s, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(s.nchw ? t.is_contiguous() : t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ", name,
              " must have x's memory layout (", s.nchw ? "NCHW" : "channels_last", "-contiguous)");
}

// A per-channel tensor: contiguous [k, C] in the accumulation dtype on x's device.
void check_chan(const at::Tensor& t, const at::Tensor& x, int64_t k, int64_t C, const char* op, const char* name) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == k && t.size(1) == C, op, ": ", name, " must have shape [", k, ", ", C,
              "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// Whether the kernels read x as it is. An NCHW prefix view (s.xb > C*HW) always: the
// flat and NCHW reduction kernels take any image stride. A channels_last one (s.xs > C)
// where the channels_last kernels, the only ones that read it, are sure to run for every
// op: C and xs multiples of the widest vector (16 bytes), x and the other big inputs
// 16-byte aligned (outputs are fresh allocations).
bool x_in_place(const at::Tensor& x, const Shape& s, std::initializer_list<const OptTensor*> inputs) {
  if (s.xs == s.C) return true;
  const int64_t V = 16 / static_cast<int64_t>(x.element_size());
  bool ok = s.C % V == 0 && s.xs % V == 0 && aligned16(x);
  for (const OptTensor* t : inputs) ok = ok && (!has(*t) || aligned16(**t));
  return ok;
}

// x as the kernels read it: as it is (x_in_place), else copied channels_last-contiguous
// (s.xs becomes C).
at::Tensor read_x(const at::Tensor& x, Shape& s, std::initializer_list<const OptTensor*> inputs) {
  if (x_in_place(x, s, inputs)) return x;
  s.xs = s.C;
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

// A new tensor like x in x's layout (x may be a prefix view: its layout, not its strides).
at::Tensor new_like_x(const at::Tensor& x, const Shape& s) {
  if (s.dense_x()) return at::empty_like(x);
  return at::empty(x.sizes(), x.options().memory_format(s.nchw ? at::MemoryFormat::Contiguous
                                                               : at::MemoryFormat::ChannelsLast));
}

int sm_count(int dev) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  return std::max(v, 1);
}

// Blocks that fit on the whole device at once. The two driver queries cost
// microseconds, every launch: the answer is kept per (kernel, block size, device).
template <typename K>
int64_t resident_blocks(K kernel, int threads, int dev) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int>, int64_t> known;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, dev);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  int nb = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, threads, 0));
  const int64_t blocks = static_cast<int64_t>(std::max(nb, 1)) * sm_count(dev);
  std::lock_guard<std::mutex> lock(mu);
  known.emplace(key, blocks);
  return blocks;
}

template <typename T>
inline bool aligned(const void* p, int V) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * static_cast<size_t>(V)) == 0;
}

template <typename T>
bool all_aligned(std::initializer_list<const void*> ps, int V) {
  for (const void* p : ps)
    if (!aligned<T>(p, V)) return false;
  return true;
}

// channels_last block shape: bdx threads along the Cv channel groups, bdy rows.
void nhwc_block(int64_t Cv, int& bdx, int& bdy, int64_t& gx) {
  if (Cv <= 32) {
    gx = 1;
    bdx = static_cast<int>(Cv);
  } else {
    gx = ceil_div(Cv, 32);
    bdx = static_cast<int>(ceil_div(Cv, gx));
  }
  bdy = kThreads / bdx;
}

constexpr int64_t kMaxGridY = 65535;

template <typename Op, int V>
void launch_ew_flat(const Op& op, int64_t numel, int64_t HW, int64_t C, int64_t xgap, int dev, cudaStream_t stream) {
  auto kernel = ew_nchw_kernel<Op, V, true>;
  if constexpr (V > 1) {
    if (HW % V != 0) kernel = ew_nchw_kernel<Op, V, false>;
  }
  const int64_t nvec = numel / V;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(nvec, kThreads), resident_blocks(kernel, kThreads, dev)));
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, numel, HW, static_cast<int>(C), xgap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Op, int V>
void launch_ew_nhwc(const Op& op, int64_t M, int64_t C, int dev, cudaStream_t stream) {
  auto kernel = ew_nhwc_kernel<Op, V>;
  int bdx, bdy;
  int64_t gx;
  nhwc_block(C / V, bdx, bdy, gx);
  const int64_t target = resident_blocks(kernel, bdx * bdy, dev);
  const int64_t gy = std::max<int64_t>(1, std::min({ceil_div(M, bdy), std::max<int64_t>(1, target / gx), kMaxGridY}));
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(bdx, bdy), 0, stream>>>(
      op, M, static_cast<int>(C));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Elementwise dispatch over layout and vector width. ptrs: every big-tensor base.
template <typename T, typename Op>
void launch_ew(const Op& op, const Shape& s, std::initializer_list<const void*> ptrs, int dev, cudaStream_t stream) {
  constexpr int VV = vec16<T>();
  constexpr int VN = Op::kNhwcVec;
  if (!s.nchw && s.C % VN == 0 && all_aligned<T>(ptrs, VN)) {
    launch_ew_nhwc<Op, VN>(op, s.N * s.HW, s.C, dev, stream);
    return;
  }
  TORCH_INTERNAL_ASSERT(s.xs == s.C, "resfused: a channels_last prefix view reached the flat elementwise kernel");
  // an NCHW prefix view: vectors must not straddle images, nor x's vectors be misaligned
  const int64_t xgap = s.xb - s.C * s.HW;
  const bool al = all_aligned<T>(ptrs, VV) && (xgap == 0 || (s.C * s.HW % VV == 0 && s.xb % VV == 0));
  const int64_t HW = s.nchw ? s.HW : 1;  // channels_last: channel = i % C
  if (al)
    launch_ew_flat<Op, VV>(op, s.numel, HW, s.C, xgap, dev, stream);
  else
    launch_ew_flat<Op, 1>(op, s.numel, HW, s.C, xgap, dev, stream);
}

// Split count for the NCHW reductions: fill the device, >= ~8 vectors per thread.
int64_t nchw_splits(int64_t nvc, int64_t C, int64_t target, int64_t& chunk) {
  int64_t S = std::max<int64_t>(1, ceil_div(target, C));
  S = std::min({S, std::max<int64_t>(1, ceil_div(nvc, int64_t(kThreads) * 8)), kMaxGridY});
  chunk = ceil_div(nvc, S);
  return ceil_div(nvc, chunk);
}

int64_t nhwc_splits(int64_t M, int bdy, int64_t gx, int64_t target) {
  const int64_t by_fill = std::max<int64_t>(1, ceil_div(target, gx));
  const int64_t by_work = std::max<int64_t>(1, ceil_div(M, int64_t(bdy) * 8));
  return std::min({by_fill, by_work, kMaxGridY});
}

template <typename T>
void stats_impl(const at::Tensor& x, const Shape& s, at::Tensor& mean, at::Tensor& var, int dev, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int VV = vec16<T>();
  const T* xp = x.const_data_ptr<T>();
  constexpr int VM = VV > 4 ? 4 : VV;  // middle width for 16-bit types (HW = 14*14, ...)
  const bool al = aligned<T>(xp, VV);
  at::Tensor ws;
  int64_t S;
  if (s.nchw) {
    const int V = (al && s.HW % VV == 0) ? VV : (aligned<T>(xp, VM) && s.HW % VM == 0) ? VM : 1;
    auto kernel = V == VV ? stats_nchw_kernel<T, A, VV> : V == VM ? stats_nchw_kernel<T, A, VM> : stats_nchw_kernel<T, A, 1>;
    const int64_t nvc = s.N * s.HW / V;
    int64_t chunk;
    S = nchw_splits(nvc, s.C, resident_blocks(kernel, kThreads, dev), chunk);
    ws = at::empty({3, S, s.C}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
    kernel<<<dim3(static_cast<unsigned>(s.C), static_cast<unsigned>(S)), kThreads, 0, stream>>>(
        xp, static_cast<int>(s.C), s.HW, nvc, chunk, ws.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const bool vec = al && s.C % VV == 0;
    auto kernel = vec ? stats_nhwc_kernel<T, A, VV> : stats_nhwc_kernel<T, A, 1>;
    const int V = vec ? VV : 1;
    const int64_t M = s.N * s.HW;
    int bdx, bdy;
    int64_t gx;
    nhwc_block(s.C / V, bdx, bdy, gx);
    S = nhwc_splits(M, bdy, gx, resident_blocks(kernel, bdx * bdy, dev));
    ws = at::empty({3, S, s.C}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
    kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(S)), dim3(bdx, bdy), 0, stream>>>(
        xp, static_cast<int>(s.C), M, ws.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  stats_finalize_kernel<A><<<static_cast<unsigned>(ceil_div(s.C, kWarps)), kThreads, 0, stream>>>(
      ws.const_data_ptr<A>(), static_cast<int>(S), static_cast<int>(s.C), static_cast<A>(s.N * s.HW),
      mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool RBN>
void reduce_impl(const RedArgs<T, typename AccOf<T>::type>& a, const Shape& s, const at::TensorOptions& acc_opts,
                 at::Tensor& out, int K, int dev, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int VV = vec16<T>();
  // channels_last keeps 8 parameters + 3 sums per owned channel in registers (4 + 2
  // without RBN): with RBN, 8-byte accesses for 16-bit types.
  constexpr int VN = sizeof(T) == 2 && RBN ? 4 : VV;
  at::Tensor ws;
  int64_t S;
  TORCH_INTERNAL_ASSERT(s.xs == s.C || (!s.nchw && s.C % VN == 0 && s.xs % VN == 0),
                        "resfused: a prefix view reached a reduction kernel that cannot read it");
  if (s.nchw) {
    constexpr int VM = VV > 4 ? 4 : VV;  // middle width for 16-bit types (HW = 14*14, ...)
    // (x's image stride too: an NCHW prefix view's xb)
    const int V = (s.HW % VV == 0 && s.xb % VV == 0 && all_aligned<T>({a.g, a.x, a.res, a.out, a.dz}, VV)) ? VV
                  : (s.HW % VM == 0 && s.xb % VM == 0 && all_aligned<T>({a.g, a.x, a.res, a.out, a.dz}, VM)) ? VM
                                                                                                        : 1;
    auto kernel = V == VV   ? reduce_nchw_kernel<T, A, VV, RBN>
                  : V == VM ? reduce_nchw_kernel<T, A, VM, RBN>
                            : reduce_nchw_kernel<T, A, 1, RBN>;
    const int64_t nvc = s.N * s.HW / V;
    int64_t chunk;
    S = nchw_splits(nvc, s.C, resident_blocks(kernel, kThreads, dev), chunk);
    ws = at::empty({3, S, s.C}, acc_opts);
    kernel<<<dim3(static_cast<unsigned>(s.C), static_cast<unsigned>(S)), kThreads, 0, stream>>>(
        a, s.HW, nvc, chunk, ws.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const bool vec = s.C % VN == 0 && all_aligned<T>({a.g, a.x, a.res, a.out, a.dz}, VN);
    auto kernel = vec ? reduce_nhwc_kernel<T, A, VN, RBN> : reduce_nhwc_kernel<T, A, 1, RBN>;
    const int V = vec ? VN : 1;
    const int64_t M = s.N * s.HW;
    int bdx, bdy;
    int64_t gx;
    nhwc_block(s.C / V, bdx, bdy, gx);
    S = nhwc_splits(M, bdy, gx, resident_blocks(kernel, bdx * bdy, dev));
    ws = at::empty({3, S, s.C}, acc_opts);
    kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(S)), dim3(bdx, bdy), 0, stream>>>(
        a, M, ws.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sum_finalize_kernel<A><<<static_cast<unsigned>(ceil_div(s.C, kWarps)), kThreads, 0, stream>>>(
      ws.const_data_ptr<A>(), static_cast<int>(S), static_cast<int>(s.C), K, out.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x) {
  const char* op = "resfused bn_stats (cuda)";
  const Shape s = check_x(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({s.C}, x.options().dtype(acc));
  at::Tensor var = at::empty({s.C}, x.options().dtype(acc));
  if (s.C == 0) return {mean, var};
  if (s.numel == 0) {  // empty batch: NaN, as eager
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cuda",
                                  [&] { stats_impl<scalar_t>(x, s, mean, var, dev, stream); });
  return {mean, var};
}

at::Tensor bn_act_fwd_cuda(const at::Tensor& x, const at::Tensor& affine, const OptTensor& residual,
                           const OptTensor& res_affine, bool relu) {
  const char* op = "resfused bn_act_fwd (cuda)";
  Shape s = check_x(x, op, /*allow_prefix=*/true);
  check_chan(affine, x, 2, s.C, op, "affine");
  const bool has_res = has(residual);
  const bool res_aff = has_res && has(res_affine);
  if (has_res) check_like_x(*residual, x, s, op, "residual");
  if (res_aff) check_chan(*res_affine, x, 2, s.C, op, "res_affine");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_like_x(x, s);
  if (s.numel == 0) return out;
  const at::Tensor xr = read_x(x, s, {&residual});
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_fwd_cuda", [&] {
    using A = typename AccOf<scalar_t>::type;
    FwdOp<scalar_t, A> fop;
    fop.x = xr.const_data_ptr<scalar_t>();
    fop.res = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    fop.out = out.mutable_data_ptr<scalar_t>();
    fop.affine = affine.const_data_ptr<A>();
    fop.res_affine = res_aff ? res_affine->const_data_ptr<A>() : nullptr;
    fop.C = s.C;
    fop.xs = s.xs;
    fop.relu = relu;
    fop.has_res = has_res;
    fop.res_aff = res_aff;
    launch_ew<scalar_t>(fop, s, {fop.x, fop.res, fop.out}, dev, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& affine, const at::Tensor& stats,
                                                          const OptTensor& residual, const OptTensor& res_affine,
                                                          const OptTensor& res_stats, const OptTensor& out, bool relu,
                                                          bool write_dz) {
  const char* op = "resfused bn_act_bwd_reduce (cuda)";
  Shape s = check_x(x, op, /*allow_prefix=*/true);
  check_like_x(grad_out, x, s, op, "grad_out");
  check_chan(affine, x, 2, s.C, op, "affine");
  check_chan(stats, x, 2, s.C, op, "stats");
  const bool has_res = has(residual);
  const bool res_aff = has_res && has(res_affine);
  const bool has_rstats = has(res_stats);
  const bool use_out = relu && has(out);
  TORCH_CHECK(!has_rstats || has_res, op, ": res_stats needs residual");
  if (has_res) check_like_x(*residual, x, s, op, "residual");
  if (res_aff) check_chan(*res_affine, x, 2, s.C, op, "res_affine");
  if (has_rstats) check_chan(*res_stats, x, 2, s.C, op, "res_stats");
  if (use_out) check_like_x(*out, x, s, op, "out");
  const int K = has_rstats ? 3 : 2;
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc_opts = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor result = at::empty({K, s.C}, acc_opts);
  at::Tensor dz = write_dz ? new_like_x(x, s) : at::empty({0}, x.options());
  if (s.C == 0) return std::make_tuple(result, dz);
  if (s.numel == 0) {  // sums over an empty batch
    result.zero_();
    return std::make_tuple(result, dz);
  }
  const OptTensor g_opt(grad_out);
  const at::Tensor xr = read_x(x, s, {&g_opt, &residual, &out});
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_bwd_reduce_cuda", [&] {
    using A = typename AccOf<scalar_t>::type;
    RedArgs<scalar_t, A> a;
    a.relu = relu;
    a.use_out = use_out;
    a.has_res = has_res;
    a.res_aff = res_aff;
    a.has_rstats = has_rstats;
    a.need_r = has_res && ((relu && !use_out) || has_rstats);
    a.g = grad_out.const_data_ptr<scalar_t>();
    a.x = xr.const_data_ptr<scalar_t>();
    a.res = a.need_r ? residual->const_data_ptr<scalar_t>() : nullptr;
    a.out = use_out ? out->const_data_ptr<scalar_t>() : nullptr;
    a.affine = affine.const_data_ptr<A>();
    a.stats = stats.const_data_ptr<A>();
    a.res_affine = res_aff ? res_affine->const_data_ptr<A>() : nullptr;
    a.res_stats = has_rstats ? res_stats->const_data_ptr<A>() : nullptr;
    a.dz = write_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr;
    a.C = static_cast<int>(s.C);
    a.xs = s.xs;
    a.xb = s.xb;
    if (res_aff || has_rstats)
      reduce_impl<scalar_t, true>(a, s, acc_opts, result, K, dev, stream);
    else
      reduce_impl<scalar_t, false>(a, s, acc_opts, result, K, dev, stream);
  });
  return std::make_tuple(result, dz);
}

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_apply_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& affine, const at::Tensor& coef,
                                                         const OptTensor& residual, const OptTensor& res_affine,
                                                         const OptTensor& res_coef, const OptTensor& out, bool relu) {
  const char* op = "resfused bn_act_bwd_apply (cuda)";
  Shape s = check_x(x, op, /*allow_prefix=*/true);
  check_like_x(grad_out, x, s, op, "grad_out");
  check_chan(affine, x, 2, s.C, op, "affine");
  check_chan(coef, x, 4, s.C, op, "coef");
  const bool has_res = has(residual);
  const bool res_aff = has_res && has(res_affine);
  const bool has_rcoef = has_res && has(res_coef);
  const bool use_out = relu && has(out);
  if (has_res) check_like_x(*residual, x, s, op, "residual");
  if (res_aff) check_chan(*res_affine, x, 2, s.C, op, "res_affine");
  if (has_rcoef) check_chan(*res_coef, x, 4, s.C, op, "res_coef");
  if (use_out) check_like_x(*out, x, s, op, "out");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = new_like_x(x, s);
  at::Tensor dres = has_res ? new_like_x(x, s) : at::empty({0}, x.options());
  if (s.numel == 0) return {dx, dres};
  const OptTensor g_opt(grad_out);
  const at::Tensor xr = read_x(x, s, {&g_opt, &residual, &out});
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_bwd_apply_cuda", [&] {
    using A = typename AccOf<scalar_t>::type;
    auto run = [&](auto op_tag) {  // (a BN'd residual or not: ApplyOp's RBN)
      using Op = typename decltype(op_tag)::type;
      Op aop;
      aop.relu = relu;
      aop.use_out = use_out;
      aop.has_res = has_res;
      aop.res_aff = res_aff;
      aop.has_rcoef = has_rcoef;
      aop.need_r = has_res && ((relu && !use_out) || has_rcoef);
      aop.g = grad_out.const_data_ptr<scalar_t>();
      aop.x = xr.const_data_ptr<scalar_t>();
      aop.res = aop.need_r ? residual->const_data_ptr<scalar_t>() : nullptr;
      aop.out = use_out ? out->const_data_ptr<scalar_t>() : nullptr;
      aop.dx = dx.mutable_data_ptr<scalar_t>();
      aop.dres = has_res ? dres.mutable_data_ptr<scalar_t>() : nullptr;
      aop.affine = affine.const_data_ptr<A>();
      aop.res_affine = res_aff ? res_affine->const_data_ptr<A>() : nullptr;
      aop.coef = coef.const_data_ptr<A>();
      aop.res_coef = has_rcoef ? res_coef->const_data_ptr<A>() : nullptr;
      aop.C = s.C;
      aop.xs = s.xs;
      launch_ew<scalar_t>(aop, s, {aop.g, aop.x, aop.res, aop.out, aop.dx, aop.dres}, dev, stream);
    };
    if (res_aff || has_rcoef)
      run(TypeTag<ApplyOp<scalar_t, A, false, true>>{});
    else
      run(TypeTag<ApplyOp<scalar_t, A, false, false>>{});
  });
  return {dx, dres};
}

void bn_act_bwd_apply_acc_cuda(const at::Tensor& acc, const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& affine, const at::Tensor& coef, const OptTensor& out, bool relu) {
  const char* op = "resfused bn_act_bwd_apply_acc (cuda)";
  Shape s = check_x(x, op, /*allow_prefix=*/true);
  TORCH_CHECK(acc.device() == x.device() && acc.scalar_type() == x.scalar_type() && acc.sizes() == x.sizes() &&
                  acc.strides() == x.strides(),
              op, ": acc must match x in device, dtype, shape and strides");
  check_like_x(grad_out, x, s, op, "grad_out");
  check_chan(affine, x, 2, s.C, op, "affine");
  check_chan(coef, x, 4, s.C, op, "coef");
  const bool use_out = relu && has(out);
  if (use_out) check_like_x(*out, x, s, op, "out");
  at::assert_no_overlap(acc, x);
  at::assert_no_overlap(acc, grad_out);
  if (use_out) at::assert_no_overlap(acc, *out);
  c10::cuda::CUDAGuard guard(x.device());
  if (s.numel == 0) return;
  // One pass reading and writing acc at x's offsets wherever x is read in place (acc
  // then too: same strides, checked for alignment with the inputs); otherwise the same
  // pass on channels_last-contiguous copies of x and acc (always read in place), and acc
  // takes the result: rounded once either way.
  const OptTensor g_opt(grad_out), acc_opt(acc);
  if (!x_in_place(x, s, {&g_opt, &out, &acc_opt})) {
    // (a copy of acc with exactly xc's strides: [N, C, 1, 1] is contiguous both ways, so
    // acc.contiguous(ChannelsLast) may keep strides that differ from xc's)
    const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor dense = at::empty_like(xc);
    dense.copy_(acc);
    bn_act_bwd_apply_acc_cuda(dense, grad_out, xc, affine, coef, out, relu);
    acc.copy_(dense);
    return;
  }
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_bwd_apply_acc_cuda", [&] {
    using A = typename AccOf<scalar_t>::type;
    ApplyOp<scalar_t, A, true, false> aop;
    aop.relu = relu;
    aop.use_out = use_out;
    aop.has_res = aop.res_aff = aop.has_rcoef = aop.need_r = false;
    aop.g = grad_out.const_data_ptr<scalar_t>();
    aop.x = x.const_data_ptr<scalar_t>();
    aop.res = nullptr;
    aop.out = use_out ? out->const_data_ptr<scalar_t>() : nullptr;
    aop.dx = acc.mutable_data_ptr<scalar_t>();
    aop.dres = nullptr;
    aop.affine = affine.const_data_ptr<A>();
    aop.res_affine = nullptr;
    aop.coef = coef.const_data_ptr<A>();
    aop.res_coef = nullptr;
    aop.C = s.C;
    aop.xs = s.xs;
    launch_ew<scalar_t>(aop, s, {aop.g, aop.x, aop.out, aop.dx}, dev, stream);
  });
}

std::tuple<at::Tensor, at::Tensor> bn_coef_cuda(const at::Tensor& mean, const at::Tensor& var, const OptTensor& weight,
                                                const OptTensor& bias, const OptTensor& running_mean,
                                                const OptTensor& running_var, double momentum, double eps,
                                                double unbias) {
  const char* op = "resfused bn_coef (cuda)";
  const int64_t C = mean.numel();
  const bool update = has(running_mean);
  TORCH_CHECK(update == has(running_var), op, ": running_mean and running_var go together");
  TORCH_CHECK(mean.is_cuda() && (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble), op,
              ": mean must be a float32 or float64 CUDA tensor");
  for (const at::Tensor* t : {&var, has(weight) ? &*weight : nullptr, has(bias) ? &*bias : nullptr,
                              update ? &*running_mean : nullptr, update ? &*running_var : nullptr}) {
    if (t != nullptr) {
      TORCH_CHECK(t->device() == mean.device() && t->scalar_type() == mean.scalar_type() && t->numel() == C &&
                      t->is_contiguous(),
                  op, ": per-channel tensors must be contiguous [C] tensors of mean's dtype and device");
    }
  }
  TORCH_CHECK(mean.is_contiguous(), op, ": mean must be contiguous");
  c10::cuda::CUDAGuard guard(mean.device());
  at::Tensor affine = at::empty({2, C}, mean.options());
  at::Tensor stats = at::empty({2, C}, mean.options());
  if (C == 0) return {affine, stats};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(mean.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_coef_cuda", [&] {
    using A = scalar_t;
    bn_coef_kernel<A><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
        mean.const_data_ptr<A>(), var.const_data_ptr<A>(), has(weight) ? weight->const_data_ptr<A>() : nullptr,
        has(bias) ? bias->const_data_ptr<A>() : nullptr, update ? running_mean->mutable_data_ptr<A>() : nullptr,
        update ? running_var->mutable_data_ptr<A>() : nullptr, affine.mutable_data_ptr<A>(),
        stats.mutable_data_ptr<A>(), C, static_cast<A>(momentum), static_cast<A>(1.0 - momentum),
        static_cast<A>(eps), static_cast<A>(unbias));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {affine, stats};
}

at::Tensor bn_grad_coef_cuda(const at::Tensor& stats, const at::Tensor& affine, const at::Tensor& sums, int64_t row,
                             bool training, int64_t count) {
  const char* op = "resfused bn_grad_coef (cuda)";
  TORCH_CHECK(stats.is_cuda() && (stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble), op,
              ": stats must be a float32 or float64 CUDA tensor");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.is_contiguous(), op, ": stats must be contiguous [2, C]");
  const int64_t C = stats.size(1);
  TORCH_CHECK(row == 1 || row == 2, op, ": row must be 1 or 2, got ", row);
  for (const at::Tensor* t : {&affine, &sums}) {
    TORCH_CHECK(t->device() == stats.device() && t->scalar_type() == stats.scalar_type() && t->dim() == 2 &&
                    t->size(1) == C && t->is_contiguous(),
                op, ": affine and sums must be contiguous [k, C] tensors of stats' dtype and device");
  }
  TORCH_CHECK(affine.size(0) >= 2 && sums.size(0) > row, op, ": affine needs 2 rows and sums ", row + 1);
  c10::cuda::CUDAGuard guard(stats.device());
  at::Tensor coef = at::empty({4, C}, stats.options());
  if (C == 0) return coef;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(stats.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "bn_grad_coef_cuda", [&] {
    using A = scalar_t;
    const A* s = sums.const_data_ptr<A>();
    bn_grad_coef_kernel<A><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
        stats.const_data_ptr<A>(), affine.const_data_ptr<A>(), s, s + row * C, coef.mutable_data_ptr<A>(), C,
        training, A(1) / static_cast<A>(std::max<int64_t>(count, 1)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return coef;
}

}  // namespace resfused
