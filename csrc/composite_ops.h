// The calls the device-generic composites (csrc/composite.cpp, block.cpp, dense.cpp)
// make: resfused_C's ops through the dispatcher (so, per device, their kernels, seen by
// profilers and dispatch modes), the library convolutions, and the conversions the
// Python op layer (resfused/ops/bn_act.py) makes before a kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>
#include <vector>

#include "bn_act.h"

namespace resfused {
namespace composite {

using Tensor = at::Tensor;

using Tensor = at::Tensor;

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

inline c10::ScalarType acc_of(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t as the kernels take a per-channel vector: contiguous, in the accumulation dtype
// (no op at all when it already is, as the Python layer's _plain).
inline Tensor per_channel(const Tensor& t, c10::ScalarType acc) {
  return (t.scalar_type() == acc ? t : t.to(acc)).contiguous();
}

inline OptTensor per_channel(const OptTensor& t, c10::ScalarType acc) {
  if (!given(t)) return c10::nullopt;
  return per_channel(*t, acc);
}

template <class Sig>
inline c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using TT = std::tuple<Tensor, Tensor>;

inline TT call_stats(const Tensor& x) {
  static const auto h = op<TT(const Tensor&)>("resfused_C::bn_stats");
  return h.call(x);
}

inline TT call_coef(const Tensor& mean, const Tensor& var, const OptTensor& w, const OptTensor& b, const OptTensor& rm,
             const OptTensor& rv, double momentum, double eps, double unbias) {
  static const auto h = op<TT(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                              const OptTensor&, double, double, double)>("resfused_C::bn_coef");
  return h.call(mean, var, w, b, rm, rv, momentum, eps, unbias);
}

inline TT call_reduce(const Tensor& g, const Tensor& x, const Tensor& affine, const Tensor& stats, const OptTensor& res,
               const OptTensor& res_affine, const OptTensor& res_stats, const OptTensor& out, bool relu,
               bool write_dz) {
  static const auto h = op<TT(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                              const OptTensor&, const OptTensor&, const OptTensor&, bool, bool)>(
      "resfused_C::bn_act_bwd_reduce");
  return h.call(g, x, affine, stats, res, res_affine, res_stats, out, relu, write_dz);
}

inline TT call_apply(const Tensor& g, const Tensor& x, const Tensor& affine, const Tensor& coef, const OptTensor& res,
              const OptTensor& res_affine, const OptTensor& res_coef, const OptTensor& out, bool relu) {
  static const auto h = op<TT(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                              const OptTensor&, const OptTensor&, const OptTensor&, bool)>(
      "resfused_C::bn_act_bwd_apply");
  return h.call(g, x, affine, coef, res, res_affine, res_coef, out, relu);
}

// A big tensor in x's layout (x is dense: NCHW when x.is_contiguous(), else
// channels_last), as the op layer hands it to the kernels: the cuda kernels take only that.
inline Tensor like_x(const Tensor& t, const Tensor& x) {
  return t.contiguous(x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
}

inline OptTensor like_x(const OptTensor& t, const Tensor& x) {
  if (!given(t)) return c10::nullopt;
  return like_x(*t, x);
}

inline OptTensor contiguous(const OptTensor& t) {
  if (!given(t)) return c10::nullopt;
  return t->contiguous();
}

inline int64_t per_channel_count(const Tensor& x) { return x.size(1) ? x.numel() / x.size(1) : 0; }

// resfused.autograd.bn_act._grad_coefficients as one op (bn_grad_coef); ``row`` is the
// row of ``sums`` holding this BN's sum of dz * x_hat.
inline Tensor grad_coefficients(const Tensor& stats, const Tensor& affine, const Tensor& sums, int64_t row, bool training,
                         int64_t count) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, bool, int64_t)>(
      "resfused_C::bn_grad_coef");
  return h.call(stats.contiguous(), affine.contiguous(), sums.contiguous(), row, training, count);
}


inline Tensor call_fwd(const Tensor& x, const Tensor& affine, const OptTensor& res, const OptTensor& res_affine,
                       bool relu) {
  static const auto h =
      op<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool)>("resfused_C::bn_act_fwd");
  return h.call(x, affine, res, res_affine, relu);
}

inline void call_apply_acc(const Tensor& acc, const Tensor& g, const Tensor& x, const Tensor& affine,
                           const Tensor& coef, const OptTensor& out, bool relu) {
  static const auto h = op<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const OptTensor&, bool)>("resfused_C::bn_act_bwd_apply_acc");
  h.call(acc, g, x, affine, coef, out, relu);
}

// A conv's geometry: stride, padding, dilation (h, w each) and groups, read from 7
// consecutive values of a flat list (the composites' `geometry` argument).
struct Geometry {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};
constexpr int64_t kGeometry = 7;

inline Geometry geometry_of(at::IntArrayRef g, int64_t index) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(g.size()) >= kGeometry * (index + 1),
                    "resfused: geometry holds ", g.size(), " values, too few for conv ", index);
  const int64_t* p = g.data() + kGeometry * index;
  return {{p[0], p[1]}, {p[2], p[3]}, {p[4], p[5]}, p[6]};
}

// F.conv2d
inline Tensor conv(const Tensor& h, const Tensor& w, const OptTensor& b, const Geometry& c) {
  return at::conv2d(h, w, b, c.stride, c.padding, c.dilation, c.groups);
}

// (d_inp, dw, db) of a conv (aten.convolution_backward), each undefined unless asked for.
inline std::tuple<Tensor, Tensor, Tensor> conv_backward(const Tensor& grad, const Tensor& inp, const Tensor& w,
                                                        const OptTensor& b, const Geometry& c, bool need_inp,
                                                        bool need_w, bool need_b) {
  need_b = need_b && given(b);
  if (!(need_inp || need_w || need_b)) return {};
  std::vector<int64_t> sizes;
  c10::OptionalIntArrayRef bias_sizes;
  if (given(b)) {
    sizes.push_back(w.size(0));
    bias_sizes = sizes;
  }
  return at::convolution_backward(grad, inp, w, bias_sizes, c.stride, c.padding, c.dilation, /*transposed=*/false,
                                  {0, 0}, c.groups, {need_inp, need_w, need_b});
}

}  // namespace composite
}  // namespace resfused
