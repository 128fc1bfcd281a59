// Kernel entry points of the fused BN-activation ops, one set per backend.
//
// The contract (shapes, layouts, per-channel rows, the relu mask) is the one
// written down, executable, in resfused/ops/eager.py. The Python op layer
// (resfused/ops/bn_act.py) guarantees it before calling these functions:
//   * x is 4-D, NCHW-contiguous or channels_last-contiguous (x.is_contiguous()
//     decides: true means NCHW, else channels_last);
//   * grad_out / residual / out have x's shape, dtype and layout;
//   * per-channel tensors are contiguous [k, C] in the accumulation dtype
//     (double for double x, float otherwise) on x's device.
// Outputs keep x's layout. numel() == 0 is legal.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <tuple>

namespace resfused {

using OptTensor = c10::optional<at::Tensor>;

// (mean, biased var), each [C] in the accumulation dtype. NaN for an empty batch.
std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x);
// out = act(x*scale + shift [+ residual | + residual*res_scale + res_shift])
at::Tensor bn_act_fwd_cpu(const at::Tensor& x, const at::Tensor& affine, const OptTensor& residual,
                          const OptTensor& res_affine, bool relu);
// ([2 or 3, C]: sum dz, sum dz*x_hat [, sum dz*res_hat when res_stats is given],
//  dz in x's dtype and layout when write_dz, else empty)
std::tuple<at::Tensor, at::Tensor> bn_act_bwd_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& affine,
                                 const at::Tensor& stats, const OptTensor& residual,
                                 const OptTensor& res_affine, const OptTensor& res_stats,
                                 const OptTensor& out, bool relu, bool write_dz);
// (dx, dres); dres is empty when residual is not given.
std::tuple<at::Tensor, at::Tensor> bn_act_bwd_apply_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& affine, const at::Tensor& coef,
    const OptTensor& residual, const OptTensor& res_affine, const OptTensor& res_coef,
    const OptTensor& out, bool relu);
// acc += dx in place (the apply pass without residual); acc has x's shape, dtype and
// strides (x may be a channel-prefix view, and acc the same prefix of a like tensor).
void bn_act_bwd_apply_acc_cpu(const at::Tensor& acc, const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& affine, const at::Tensor& coef, const OptTensor& out, bool relu);
// (affine [2, C] = (scale, shift), stats [2, C] = (mean, invstd)) of one BN from its mean and
// variance, all per-channel tensors contiguous [C] in the accumulation dtype; with
// running_mean/running_var, first updates them in place:
//   running_mean = momentum * mean + (1 - momentum) * running_mean
//   running_var  = momentum * (var * unbias) + (1 - momentum) * running_var
// (one pass over C instead of a dozen [C]-sized ops: on a GPU, one launch).
std::tuple<at::Tensor, at::Tensor> bn_coef_cpu(const at::Tensor& mean, const at::Tensor& var, const OptTensor& weight,
                                               const OptTensor& bias, const OptTensor& running_mean,
                                               const OptTensor& running_var, double momentum, double eps,
                                               double unbias);
// The backward's coefficients of one BN from its stats [2, C] = (mean, invstd), affine
// [2, C] = (scale, shift) and reduction sums [2 or 3, C] (row 0: sum dz; ``row``: sum
// dz*x_hat of this BN), n = max(count, 1):
//   coef [4, C] = (mean, scale, sum_dz / n, sum_dz_xhat * invstd / n)
// with the last two rows zero when not training (running statistics are constants), such
// that dx = (dz - coef[2] - (x - coef[0]) * coef[3]) * coef[1] (one launch on a GPU).
at::Tensor bn_grad_coef_cpu(const at::Tensor& stats, const at::Tensor& affine, const at::Tensor& sums, int64_t row,
                            bool training, int64_t count);

// Composites (csrc/composite.cpp, any device): the sequences of the ops above that the
// autograd layer runs per BN, as one call.
// (affine, stats) of one BN: in training the statistics pass then bn_coef (updating the
// running statistics, never on an empty batch); in eval bn_coef of the running statistics.
std::tuple<at::Tensor, at::Tensor> bn_stats_coef(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                 const OptTensor& running_mean, const OptTensor& running_var,
                                                 bool training, double momentum, double eps);
// (dx, dres, sums) of resfused.autograd.bn_act.bn_act_backward (no process group, no
// gradient accumulator): the reduction pass, the gradient coefficients and the apply pass.
// dx / dres are undefined (None) when not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& out, const at::Tensor& affine,
    const at::Tensor& stats, const OptTensor& residual, const OptTensor& res_affine, const OptTensor& res_stats,
    bool training, bool res_training, bool relu, bool need_dx, bool need_sums, bool plain_residual_grad);

#ifdef RESFUSED_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x);
at::Tensor bn_act_fwd_cuda(const at::Tensor& x, const at::Tensor& affine, const OptTensor& residual,
                           const OptTensor& res_affine, bool relu);
std::tuple<at::Tensor, at::Tensor> bn_act_bwd_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& affine,
                                  const at::Tensor& stats, const OptTensor& residual,
                                  const OptTensor& res_affine, const OptTensor& res_stats,
                                  const OptTensor& out, bool relu, bool write_dz);
std::tuple<at::Tensor, at::Tensor> bn_act_bwd_apply_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& affine, const at::Tensor& coef,
    const OptTensor& residual, const OptTensor& res_affine, const OptTensor& res_coef,
    const OptTensor& out, bool relu);
void bn_act_bwd_apply_acc_cuda(const at::Tensor& acc, const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& affine, const at::Tensor& coef, const OptTensor& out, bool relu);
std::tuple<at::Tensor, at::Tensor> bn_coef_cuda(const at::Tensor& mean, const at::Tensor& var, const OptTensor& weight,
                                                const OptTensor& bias, const OptTensor& running_mean,
                                                const OptTensor& running_var, double momentum, double eps,
                                                double unbias);
at::Tensor bn_grad_coef_cuda(const at::Tensor& stats, const at::Tensor& affine, const at::Tensor& sums, int64_t row,
                             bool training, int64_t count);
#endif

}  // namespace resfused
