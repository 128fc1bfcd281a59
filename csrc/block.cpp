// A whole ResNet block (BasicBlock or Bottleneck) on the library convolutions, forward
// and backward, each as one call from Python: resfused.autograd.block's
// ResidualBlockFunction in C++ for the cpu and cuda backends.
//
// The Python forward of a Bottleneck is about twenty op calls (convs, each BN's
// statistics and coefficients, the apply passes), its backward about thirty; on a GPU
// each call's argument handling took longer than the kernel it launched, so a fused
// block ran host-bound (benchmarks/results/gpu-check-nvidia-h200.md). Here the same
// ops run in the same order (the result is the Python path's, bit for bit: a test
// checks it) with one Python call per direction. Every inner op goes through the
// dispatcher, so each runs on x's device and is seen by profilers and dispatch modes.
//
// Called under no_grad inside the autograd.Function, with autocast off (the module
// casts before), never with synchronized batch statistics or the fused convolutions
// (the Python path keeps those, and torch.compile, which traces the Python path).
//
// Layout of the arguments (one "unit" is a conv and the BN after it; units 0..n-1 are
// the main branch in order, then the fused downsample branch when there is one):
//   tensors   : 6 per unit: conv weight, conv bias, bn weight, bn bias, running mean,
//               running var (the optional ones None)
//   geometry  : 7 per unit: stride h, w, padding h, w, dilation h, w, groups
//   training  : per unit, 1 where its BN normalises with batch statistics
//   momentum, eps : per unit
#include <ATen/ATen.h>

#include <vector>

#include "bn_act.h"
#include "composite_ops.h"

namespace resfused {
namespace {

using namespace composite;
constexpr int64_t kPerUnit = 6;

// resfused.autograd.block._pointwise_grid: on the CPU a 1x1, unpadded, strided conv (the
// downsample) runs its backward as the stride-1 backward of x[:, :, ::s, ::s], faster
// there than the library's strided backward. Returns whether it applies.
bool pointwise_grid(const Tensor& inp, const Tensor& w, const Geometry& c) {
  return inp.device().is_cpu() && w.size(2) == 1 && w.size(3) == 1 && c.padding[0] == 0 && c.padding[1] == 0 &&
         !(c.stride[0] == 1 && c.stride[1] == 1);
}

void check_layout(const char* fn, int64_t units, int64_t n_tensors, at::IntArrayRef geometry, at::IntArrayRef training,
                  size_t n_momentum, size_t n_eps) {
  TORCH_CHECK_VALUE(units >= 1 && n_tensors == kPerUnit * units, "resfused ", fn, ": expected ", kPerUnit,
                    " tensors per unit, got ", n_tensors);
  TORCH_CHECK_VALUE(static_cast<int64_t>(geometry.size()) == kGeometry * units, "resfused ", fn, ": expected ",
                    kGeometry, " geometry values per unit, got ", geometry.size(), " for ", units, " units");
  TORCH_CHECK_VALUE(static_cast<int64_t>(training.size()) == units &&
                        static_cast<int64_t>(n_momentum) == units && static_cast<int64_t>(n_eps) == units,
                    "resfused ", fn, ": expected one training flag, momentum and eps per unit");
}

}  // namespace

std::vector<Tensor> block_fwd(const Tensor& x, const OptTensor& identity, const c10::List<OptTensor>& tensors,
                              at::IntArrayRef geometry, at::IntArrayRef training, at::ArrayRef<double> momentum,
                              at::ArrayRef<double> eps, bool downsample, bool keep_acts) {
  const int64_t units = static_cast<int64_t>(tensors.size()) / kPerUnit;
  check_layout("block_fwd", units, tensors.size(), geometry, training, momentum.size(), eps.size());
  const int64_t n = units - (downsample ? 1 : 0);
  TORCH_CHECK_VALUE(n >= 1, "resfused block_fwd: the main branch needs at least one unit");
  TORCH_CHECK_VALUE(!(downsample && given(identity)),
                    "resfused block_fwd: give either an identity tensor or a fused downsample branch, not both");
  auto t = [&](int64_t unit, int64_t j) -> OptTensor { return tensors.get(unit * kPerUnit + j); };
  auto bn = [&](const Tensor& y, int64_t unit) {
    return bn_stats_coef(y, t(unit, 2), t(unit, 3), t(unit, 4), t(unit, 5), training[unit] != 0, momentum[unit],
                         eps[unit]);
  };
  std::vector<Tensor> ys, affines, stats, acts;
  Tensor h = x;
  for (int64_t i = 0; i < n; ++i) {
    Tensor y = conv(h, *t(i, 0), t(i, 1), geometry_of(geometry, i));
    auto [affine, st] = bn(y, i);
    if (i < n - 1) {
      h = call_fwd(y, affine, c10::nullopt, c10::nullopt, true);
      if (keep_acts) acts.push_back(h);
    }
    ys.push_back(std::move(y));
    affines.push_back(std::move(affine));
    stats.push_back(std::move(st));
  }
  std::vector<Tensor> result;
  const Tensor& y_last = ys.back();
  if (downsample) {
    Tensor y_d = conv(x, *t(n, 0), t(n, 1), geometry_of(geometry, n));
    auto [aff_d, st_d] = bn(y_d, n);
    result.push_back(call_fwd(y_last, affines.back(), like_x(y_d, y_last), aff_d, true));
    result.insert(result.end(), {y_d, aff_d, st_d});
  } else {
    result.push_back(call_fwd(y_last, affines.back(), like_x(given(identity) ? *identity : x, y_last),
                              c10::nullopt, true));
  }
  for (auto* list : {&ys, &affines, &stats, &acts}) result.insert(result.end(), list->begin(), list->end());
  return result;
}

std::vector<Tensor> block_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& out, at::TensorList ys,
                              at::TensorList affines, at::TensorList stats, at::TensorList acts,
                              const OptTensor& y_d, const OptTensor& aff_d, const OptTensor& st_d,
                              at::TensorList conv_weights, const c10::List<OptTensor>& conv_biases,
                              at::IntArrayRef geometry, at::IntArrayRef training, at::IntArrayRef needs,
                              bool identity_given) {
  const int64_t n = static_cast<int64_t>(ys.size());
  const bool ds = given(y_d);
  const int64_t units = n + (ds ? 1 : 0);
  TORCH_CHECK_VALUE(n >= 1 && static_cast<int64_t>(affines.size()) == n && static_cast<int64_t>(stats.size()) == n,
                    "resfused block_bwd: expected one y, affine and stats per main-branch unit");
  TORCH_CHECK_VALUE(acts.empty() || static_cast<int64_t>(acts.size()) == n - 1,
                    "resfused block_bwd: kept activations are one per inner BN-ReLU, or none");
  TORCH_CHECK_VALUE(!ds || (given(aff_d) && given(st_d)), "resfused block_bwd: y_d needs aff_d and st_d");
  TORCH_CHECK_VALUE(static_cast<int64_t>(conv_weights.size()) == units &&
                        static_cast<int64_t>(conv_biases.size()) == units,
                    "resfused block_bwd: expected one conv weight and bias per unit");
  TORCH_CHECK_VALUE(static_cast<int64_t>(needs.size()) == 2 + kPerUnit * units,
                    "resfused block_bwd: needs holds x's, identity's and ", kPerUnit, " flags per unit");
  check_layout("block_bwd", units, kPerUnit * units, geometry, training, units, units);

  auto need = [&](int64_t unit, int64_t j) { return needs[2 + unit * kPerUnit + j] != 0; };
  std::vector<Tensor> grads(2 + kPerUnit * units);
  auto put = [&](int64_t unit, int64_t j, const Tensor& value) {
    if (value.defined() && need(unit, j)) grads[2 + unit * kPerUnit + j] = value;
  };
  bool any_param_grad = false;
  for (size_t k = 2; k < needs.size(); ++k) any_param_grad = any_param_grad || needs[k] != 0;
  const bool need_x = needs[0] != 0;
  const int64_t last = n - 1;
  auto weight = [&](int64_t unit) -> const Tensor& { return conv_weights[unit]; };

  // The join: relu(bn_last(y_last) + identity | bn_d(y_d)).
  const bool need_sums = training[last] != 0 || need(last, 2) || need(last, 3) ||
                         (ds && (training[n] != 0 || need(n, 2) || need(n, 3)));
  const bool want_identity = !ds && (identity_given ? needs[1] != 0 : need_x);
  bool want_ds = false;
  for (int64_t j = 0; ds && j < 4; ++j) want_ds = want_ds || need(n, j);
  want_ds = ds && (want_ds || need_x);
  auto [dy, dres, sums] = bn_act_bwd(grad_out, ys[last], out, affines[last], stats[last],
                                     ds ? y_d : c10::nullopt, aff_d, st_d, training[last] != 0,
                                     ds && training[n] != 0, /*relu=*/true, /*need_dx=*/true,
                                     need_sums || any_param_grad, want_identity);
  put(last, 2, sums[1]);
  put(last, 3, sums[0]);

  Tensor dx;
  std::vector<int64_t> grid;  // (sh, sw) when dx holds only the gradient of x[:, :, ::sh, ::sw]
  if (ds) {
    put(n, 2, sums[2]);
    // both BNs' bias gradient is sum(dy): a tensor of its own for each parameter's .grad
    put(n, 3, need(last, 3) ? sums[0].clone() : sums[0]);
    if (want_ds) {
      Geometry c = geometry_of(geometry, n);
      Tensor inp = x;
      if (pointwise_grid(x, weight(n), c)) {
        inp = x.slice(2, 0, c10::nullopt, c.stride[0]).slice(3, 0, c10::nullopt, c.stride[1]);
        grid = c.stride;
        c.stride = {1, 1};
      }
      auto [dx_d, dw_d, db_d] = conv_backward(dres, inp, weight(n), conv_biases.get(n), c, need_x, need(n, 0),
                                              need(n, 1));
      put(n, 0, dw_d);
      put(n, 1, db_d);
      dx = dx_d;
    }
  } else if (want_identity && !identity_given) {
    dx = dres;
  }
  if (identity_given && needs[1] != 0) grads[1] = dres;
  dres = Tensor();  // (kept only as dx or d_identity, if at all: the downsample branch is done)

  // Units from last to first: conv backward, then the BN-ReLU that produced its input.
  for (int64_t i = last; i >= 0; --i) {
    Tensor d_inp;
    {
      Tensor inp;
      if (i == 0) {
        inp = x;
      } else if (!acts.empty()) {
        inp = acts[i - 1];
      } else {  // recompute a_{i-1} = relu(bn(y_{i-1})): one elementwise pass
        inp = call_fwd(ys[i - 1], affines[i - 1], c10::nullopt, c10::nullopt, true);
      }
      auto [di, dw, db] = conv_backward(dy, inp, weight(i), conv_biases.get(i), geometry_of(geometry, i),
                                        i > 0 || need_x, need(i, 0), need(i, 1));
      put(i, 0, dw);
      put(i, 1, db);
      d_inp = std::move(di);
    }  // (a recomputed activation is freed before the BN backward allocates)
    if (i == 0) {
      if (need_x && d_inp.defined()) {
        if (!dx.defined()) {
          dx = d_inp;
        } else if (grid.empty()) {
          dx.add_(d_inp);
        } else {
          d_inp.slice(2, 0, c10::nullopt, grid[0]).slice(3, 0, c10::nullopt, grid[1]).add_(dx);
          dx = d_inp;
        }
      }
      break;
    }
    // The relu mask is recomputed from y (z <= 0, rounded as in forward), not read from a.
    auto [dyi, unused, s] = bn_act_bwd(d_inp, ys[i - 1], c10::nullopt, affines[i - 1], stats[i - 1], c10::nullopt,
                                       c10::nullopt, c10::nullopt, training[i - 1] != 0, false, /*relu=*/true,
                                       /*need_dx=*/true, /*need_sums=*/true, /*plain_residual_grad=*/false);
    put(i - 1, 2, s[1]);
    put(i - 1, 3, s[0]);
    dy = std::move(dyi);
  }
  if (need_x) grads[0] = dx;
  return grads;
}

}  // namespace resfused
