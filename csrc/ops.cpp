// The one translation unit that includes torch/extension.h: registers the
// backend kernels with the dispatcher (namespace resfused_C, one impl per
// device, and the device-generic composites of csrc/composite.cpp) and exposes
// build facts to Python (resfused.info).
#include <torch/extension.h>
#include <torch/library.h>

#include "bn_act.h"

TORCH_LIBRARY(resfused_C, m) {
  m.def("bn_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_act_fwd(Tensor x, Tensor affine, Tensor? residual, Tensor? res_affine, bool relu) -> Tensor");
  m.def(
      "bn_act_bwd_reduce(Tensor grad_out, Tensor x, Tensor affine, Tensor stats, Tensor? residual, "
      "Tensor? res_affine, Tensor? res_stats, Tensor? out, bool relu, bool write_dz=False) -> (Tensor, Tensor)");
  m.def(
      "bn_act_bwd_apply(Tensor grad_out, Tensor x, Tensor affine, Tensor coef, Tensor? residual, "
      "Tensor? res_affine, Tensor? res_coef, Tensor? out, bool relu) -> (Tensor, Tensor)");
  m.def(
      "bn_act_bwd_apply_acc(Tensor(a!) acc, Tensor grad_out, Tensor x, Tensor affine, Tensor coef, "
      "Tensor? out, bool relu) -> ()");
  m.def(
      "bn_coef(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, float unbias) -> (Tensor, Tensor)");
  m.def("bn_grad_coef(Tensor stats, Tensor affine, Tensor sums, int row, bool training, int count) -> Tensor");
  m.def("bn_relu_maxpool(Tensor x, Tensor affine, int[2] kernel_size, int[2] stride, int[2] padding) -> (Tensor, Tensor)");
  m.def(
      "bn_stats_coef(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps) -> (Tensor, Tensor)");
  m.def(
      "bn_act_bwd(Tensor grad_out, Tensor x, Tensor? out, Tensor affine, Tensor stats, Tensor? residual, "
      "Tensor? res_affine, Tensor? res_stats, bool training, bool res_training, bool relu, bool need_dx, "
      "bool need_sums, bool plain_residual_grad) -> (Tensor, Tensor, Tensor)");
  // (block_fwd and dense_fwd update the running statistics among `tensors` in place; like
  // the other composites they are called only in eager execution, never traced)
  m.def(
      "block_fwd(Tensor x, Tensor? identity, Tensor?[] tensors, int[] geometry, int[] training, "
      "float[] momentum, float[] eps, bool downsample, bool keep_acts) -> Tensor[]");
  m.def(
      "block_bwd(Tensor grad_out, Tensor x, Tensor out, Tensor[] ys, Tensor[] affines, Tensor[] stats, "
      "Tensor[] acts, Tensor? y_d, Tensor? aff_d, Tensor? st_d, Tensor[] conv_weights, Tensor?[] conv_biases, "
      "int[] geometry, int[] training, int[] needs, bool identity_given) -> Tensor[]");
  m.def(
      "dense_fwd(Tensor x, Tensor?[] tensors, int[] geometry, int[] training, float[] momentum, float[] eps, "
      "float[] drop_rate, int[] growth, bool channels_last, bool keep) -> Tensor[]");
  m.def(
      "dense_bwd(Tensor grad_out, Tensor buf, Tensor[] y1s, Tensor[] aff1s, Tensor[] st1s, Tensor[] aff2s, "
      "Tensor[] st2s, Tensor?[] masks, Tensor[] conv_weights, Tensor?[] conv_biases, int[] geometry, "
      "int[] training, float[] drop_rate, int[] growth, int c0, int[] needs, bool channels_last) -> Tensor[]");
}

// The composites call the ops above through the dispatcher (so, per device, its kernels).
TORCH_LIBRARY_IMPL(resfused_C, CompositeImplicitAutograd, m) {
  m.impl("bn_stats_coef", &resfused::bn_stats_coef);
  m.impl("bn_act_bwd", &resfused::bn_act_bwd);
  m.impl("block_fwd", &resfused::block_fwd);
  m.impl("block_bwd", &resfused::block_bwd);
  m.impl("dense_fwd", &resfused::dense_fwd);
  m.impl("dense_bwd", &resfused::dense_bwd);
}

TORCH_LIBRARY_IMPL(resfused_C, CPU, m) {
  m.impl("bn_stats", &resfused::bn_stats_cpu);
  m.impl("bn_act_fwd", &resfused::bn_act_fwd_cpu);
  m.impl("bn_act_bwd_reduce", &resfused::bn_act_bwd_reduce_cpu);
  m.impl("bn_act_bwd_apply", &resfused::bn_act_bwd_apply_cpu);
  m.impl("bn_act_bwd_apply_acc", &resfused::bn_act_bwd_apply_acc_cpu);
  m.impl("bn_coef", &resfused::bn_coef_cpu);
  m.impl("bn_grad_coef", &resfused::bn_grad_coef_cpu);
  m.impl("bn_relu_maxpool", &resfused::bn_relu_maxpool_cpu);
}

#ifdef RESFUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(resfused_C, CUDA, m) {
  m.impl("bn_stats", &resfused::bn_stats_cuda);
  m.impl("bn_act_fwd", &resfused::bn_act_fwd_cuda);
  m.impl("bn_act_bwd_reduce", &resfused::bn_act_bwd_reduce_cuda);
  m.impl("bn_act_bwd_apply", &resfused::bn_act_bwd_apply_cuda);
  m.impl("bn_act_bwd_apply_acc", &resfused::bn_act_bwd_apply_acc_cuda);
  m.impl("bn_coef", &resfused::bn_coef_cuda);
  m.impl("bn_grad_coef", &resfused::bn_grad_coef_cuda);
}
#endif

#ifndef RESFUSED_CUDA_ARCHS
#define RESFUSED_CUDA_ARCHS ""
#endif
#ifndef RESFUSED_TORCH_VERSION
#define RESFUSED_TORCH_VERSION ""
#endif
#ifndef RESFUSED_CUDA_VERSION
#define RESFUSED_CUDA_VERSION ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "resfused C++/CUDA kernels (ops are registered under torch.ops.resfused_C)";
#ifdef RESFUSED_WITH_CUDA
  mod.attr("with_cuda") = true;
#else
  mod.attr("with_cuda") = false;
#endif
  mod.attr("cuda_archs") = RESFUSED_CUDA_ARCHS;
  mod.attr("cuda_version") = RESFUSED_CUDA_VERSION;
  mod.attr("torch_version") = RESFUSED_TORCH_VERSION;
}
