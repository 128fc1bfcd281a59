// Device-generic composites of the BN-activation ops: the per-BN sequences the
// autograd layer (resfused/autograd/bn_act.py) runs, as one call from Python.
//
// On a GPU a fused BN's small steps cost more host time than its kernels take
// (benchmarks/results/gpu-check-nvidia-h200.md): each Python-level op call is a few
// microseconds of argument handling and dispatch before its launch. These
// composites run the same ops in the same order from C++. They are registered as
// CompositeImplicitAutograd, so each inner op still goes through the dispatcher
// (to the CPU or CUDA kernel of x's device, and visible to dispatch modes as the
// separate ops it is). The backward's per-channel coefficients are one op here
// (bn_grad_coef: one launch where the Python sequence has three).
// They are called under no_grad (inside an autograd.Function), on a dense x (the
// other big tensors are brought into its layout here, as the op layer does);
// the Python layer keeps the general path (prefix views, synchronized statistics,
// torch.compile, the triton and eager backends).
#include <ATen/ATen.h>

#include <algorithm>

#include "bn_act.h"
#include "composite_ops.h"

namespace resfused {

using namespace composite;

TT bn_coef_running(const Tensor& running_mean, const Tensor& running_var, const OptTensor& weight,
                   const OptTensor& bias, double eps, c10::ScalarType acc) {
  return call_coef(per_channel(running_mean, acc), per_channel(running_var, acc), per_channel(weight, acc),
                   per_channel(bias, acc), c10::nullopt, c10::nullopt, 0.0, eps, 1.0);
}

TT bn_coef_batch(const Tensor& mean, const Tensor& var, int64_t count, const OptTensor& weight, const OptTensor& bias,
                 const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
  TORCH_CHECK_VALUE(given(running_mean) == given(running_var),
                    "resfused bn_coef_batch: running_mean and running_var go together");
  const auto acc = mean.scalar_type();
  const OptTensor w = per_channel(weight, acc), b = per_channel(bias, acc);
  const Tensor m = mean.contiguous(), v = per_channel(var, acc);
  const double unbias = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
  if (!given(running_mean) || count == 0) {  // never update on an empty batch
    return call_coef(m, v, w, b, c10::nullopt, c10::nullopt, momentum, eps, unbias);
  }
  const Tensor& rm = *running_mean;
  const Tensor& rv = *running_var;
  if (rm.scalar_type() == acc && rv.scalar_type() == acc && rm.is_contiguous() && rv.is_contiguous()) {
    return call_coef(m, v, w, b, rm, rv, momentum, eps, unbias);
  }
  // running statistics of another dtype: updated through copies in the accumulation dtype
  const Tensor wm = rm.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const Tensor wv = rv.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  auto result = call_coef(m, v, w, b, wm, wv, momentum, eps, unbias);
  rm.copy_(wm);
  rv.copy_(wv);
  return result;
}

TT bn_stats_coef(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                 const OptTensor& running_var, bool training, double momentum, double eps) {
  TORCH_CHECK(x.dim() == 4, "resfused bn_stats_coef: x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resfused bn_stats_coef: x must be NCHW-contiguous or channels_last-contiguous");
  TORCH_CHECK_VALUE(given(running_mean) == given(running_var),
                    "resfused bn_stats_coef: running_mean and running_var go together");
  if (!training) {
    TORCH_CHECK_VALUE(given(running_mean), "resfused bn_stats_coef: eval mode needs running statistics");
    return bn_coef_running(*running_mean, *running_var, weight, bias, eps, acc_of(x));
  }
  const auto [mean, var] = call_stats(x);
  return bn_coef_batch(mean, var, per_channel_count(x), weight, bias, running_mean, running_var, momentum, eps);
}

std::tuple<Tensor, Tensor, Tensor> bn_act_bwd(const Tensor& grad_out_, const Tensor& x, const OptTensor& out_,
                                              const Tensor& affine_, const Tensor& stats_, const OptTensor& residual_,
                                              const OptTensor& res_affine_, const OptTensor& res_stats_,
                                              bool training, bool res_training, bool relu, bool need_dx,
                                              bool need_sums, bool plain_residual_grad) {
  TORCH_CHECK(x.dim() == 4, "resfused bn_act_bwd: x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resfused bn_act_bwd: x must be NCHW-contiguous or channels_last-contiguous");
  // the op layer's conversions (no-ops for what the autograd layer saved)
  const Tensor grad_out = like_x(grad_out_, x);
  const OptTensor out = like_x(out_, x), residual = like_x(residual_, x);
  const Tensor affine = affine_.contiguous(), stats = stats_.contiguous();
  const OptTensor res_affine = contiguous(res_affine_), res_stats = contiguous(res_stats_);
  const bool res_bn = given(res_stats);
  TORCH_CHECK_VALUE(!res_bn || (given(res_affine) && given(residual)),
                    "resfused bn_act_bwd: a BN'd residual needs residual, res_affine and res_stats");
  const int64_t count = per_channel_count(x);
  if (need_sums && plain_residual_grad && relu && given(out)) {
    // the plain-residual join: the reduction pass also writes dz, the residual's gradient
    auto [sums, dz] = call_reduce(grad_out, x, affine, stats, c10::nullopt, c10::nullopt, c10::nullopt, out, true,
                                  true);
    Tensor dx;
    if (need_dx) {
      const Tensor coef = grad_coefficients(stats, affine, sums, 1, training, count);
      dx = std::get<0>(call_apply(dz, x, affine, coef, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt,
                                  false));
    }
    return {dx, dz, sums};
  }
  Tensor sums;
  if (need_sums) {
    sums = std::get<0>(call_reduce(grad_out, x, affine, stats, residual, res_affine, res_stats, out, relu, false));
  } else {
    sums = at::zeros({res_bn ? 3 : 2, x.size(1)}, affine.options());
  }
  Tensor dx, dres;
  if (need_dx || plain_residual_grad || res_bn) {
    const Tensor coef = grad_coefficients(stats, affine, sums, 1, training, count);
    OptTensor res_coef;
    if (res_bn) {
      res_coef = grad_coefficients(*res_stats, *res_affine, sums, 2, res_training, count);
    }
    // a plain residual only asks the apply pass for dres = dz (its mask comes from out)
    const OptTensor res_arg = res_bn ? residual : (plain_residual_grad ? OptTensor(grad_out) : c10::nullopt);
    TORCH_CHECK_VALUE(!(relu && !given(out) && given(res_arg) && !res_bn),
                      "resfused bn_act_bwd: a plain residual needs `out` for the relu mask");
    auto [gx, gres] = call_apply(grad_out, x, affine, coef, res_arg, res_affine, res_coef, out, relu);
    if (need_dx) dx = gx;
    if (given(res_arg)) dres = gres;
  }
  return {dx, dres, sums};
}

}  // namespace resfused
