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
#include <ATen/core/List.h>
#include <tuple>
#include <vector>

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
// relu(x*scale + shift) then max pooling (dilation 1, floor), one pass over x (NCHW):
// (out, indices) as bn_act_fwd followed by aten::max_pool2d_with_indices gives them.
std::tuple<at::Tensor, at::Tensor> bn_relu_maxpool_cpu(const at::Tensor& x, const at::Tensor& affine,
                                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                       at::IntArrayRef padding);
at::Tensor bn_grad_coef_cpu(const at::Tensor& stats, const at::Tensor& affine, const at::Tensor& sums, int64_t row,
                            bool training, int64_t count);

// Composites (csrc/composite.cpp, any device): the sequences of the ops above that the
// autograd layer runs per BN, as one call.
// (affine, stats) of one BN: in training the statistics pass then bn_coef (updating the
// running statistics, never on an empty batch); in eval bn_coef of the running statistics.
std::tuple<at::Tensor, at::Tensor> bn_stats_coef(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                 const OptTensor& running_mean, const OptTensor& running_var,
                                                 bool training, double momentum, double eps);
// (affine, stats) of one BN from its batch (mean, biased var) over `count` values per
// channel, updating the running statistics when given and count > 0 (bn_coef, with the
// conversions of the op layer: per-channel tensors to mean's dtype, running statistics of
// another dtype updated through copies).
std::tuple<at::Tensor, at::Tensor> bn_coef_batch(const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                                 const OptTensor& weight, const OptTensor& bias,
                                                 const OptTensor& running_mean, const OptTensor& running_var,
                                                 double momentum, double eps);
// (affine, stats) of one BN in eval: bn_coef of the running statistics, in dtype `acc`.
std::tuple<at::Tensor, at::Tensor> bn_coef_running(const at::Tensor& running_mean, const at::Tensor& running_var,
                                                   const OptTensor& weight, const OptTensor& bias, double eps,
                                                   c10::ScalarType acc);
// (dx, dres, sums) of resfused.autograd.bn_act.bn_act_backward (no process group, no
// gradient accumulator): the reduction pass, the gradient coefficients and the apply pass.
// dx / dres are undefined (None) when not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& out, const at::Tensor& affine,
    const at::Tensor& stats, const OptTensor& residual, const OptTensor& res_affine, const OptTensor& res_stats,
    bool training, bool res_training, bool relu, bool need_dx, bool need_sums, bool plain_residual_grad);

// A ResNet block on the library convolutions (csrc/block.cpp, any device): the
// forward and backward of resfused.autograd.block.ResidualBlockFunction, one call each.
// block_fwd returns [out, (y_d, aff_d, st_d when downsample), ys..., affines...,
// stats..., acts... (when keep_acts)]; block_bwd returns [dx, d_identity, then 6 per
// unit], undefined where not asked for (argument layout: csrc/block.cpp).
std::vector<at::Tensor> block_fwd(const at::Tensor& x, const OptTensor& identity,
                                  const c10::List<OptTensor>& tensors, at::IntArrayRef geometry,
                                  at::IntArrayRef training, at::ArrayRef<double> momentum,
                                  at::ArrayRef<double> eps, bool downsample, bool keep_acts);
std::vector<at::Tensor> block_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                                  at::TensorList ys, at::TensorList affines, at::TensorList stats,
                                  at::TensorList acts, const OptTensor& y_d, const OptTensor& aff_d,
                                  const OptTensor& st_d, at::TensorList conv_weights,
                                  const c10::List<OptTensor>& conv_biases, at::IntArrayRef geometry,
                                  at::IntArrayRef training, at::IntArrayRef needs, bool identity_given);

// A DenseNet dense block on the library convolutions (csrc/dense.cpp, any device): the
// forward and backward of resfused.autograd.dense.DenseBlockFunction, one call each.
// dense_fwd returns [buf, then when keep: y1s..., aff1s..., st1s..., aff2s..., st2s...,
// dropout masks... (layers with drop_rate > 0)]; dense_bwd returns [dx, then 12 per
// layer], undefined where not asked for (argument layout: csrc/dense.cpp).
std::vector<at::Tensor> dense_fwd(const at::Tensor& x, const c10::List<OptTensor>& tensors,
                                  at::IntArrayRef geometry, at::IntArrayRef training,
                                  at::ArrayRef<double> momentum, at::ArrayRef<double> eps,
                                  at::ArrayRef<double> drop_rate, at::IntArrayRef growth, bool channels_last,
                                  bool keep);
std::vector<at::Tensor> dense_bwd(const at::Tensor& grad_out, const at::Tensor& buf, at::TensorList y1s,
                                  at::TensorList aff1s, at::TensorList st1s, at::TensorList aff2s,
                                  at::TensorList st2s, const c10::List<OptTensor>& masks,
                                  at::TensorList conv_weights, const c10::List<OptTensor>& conv_biases,
                                  at::IntArrayRef geometry, at::IntArrayRef training, at::ArrayRef<double> drop_rate,
                                  at::IntArrayRef growth, int64_t c0, at::IntArrayRef needs, bool channels_last);

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
