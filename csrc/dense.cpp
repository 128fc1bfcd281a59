// A whole DenseNet dense block on the library convolutions, forward and backward, each
// as one call from Python: resfused.autograd.dense's DenseBlockFunction (library path)
// in C++ for the cpu and cuda backends.
//
// A dense layer is about ten op calls each way (norm1's coefficients from the statistics
// cache, the prefix's BN-ReLU, conv1, norm2, conv2, the buffer write and the cache
// update); DenseNet-121 has 58 of them. Here the same ops run in the same order (the
// Python path's result bit for bit: a test checks it) with one Python call per direction.
// Each layer reads its prefix of the feature buffer as a view, which the cpu and cuda
// kernels take in place (where the cuda ones do not, the layer copies its prefix, as the
// Python path's scratch does).
//
// Called under no_grad inside the autograd.Function (or for a forward that keeps
// nothing), never with synchronized batch statistics or the fused convolutions.
//
// Arguments, per layer (12 tensors: norm1 weight, bias, running mean, running var,
// conv1 weight, bias, norm2 weight, bias, running mean, running var, conv2 weight,
// bias; the optional ones None): geometry 7 values for conv1 then 7 for conv2 (see
// composite_ops.h); training, momentum, eps: norm1's then norm2's; drop_rate; growth.
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "bn_act.h"
#include "composite_ops.h"

namespace resfused {
namespace {

using namespace composite;
constexpr int64_t kPerLayer = 12;
enum : int64_t { N1W, N1B, N1RM, N1RV, C1W, C1B, N2W, N2B, N2RM, N2RV, C2W, C2B };

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Whether the kernels of x's device take the channel-prefix view x = buf[:, :C] as it is
// (resfused.ops.bn_act.reads_as_is): the cpu ones always; the cuda ones an NCHW view, and
// a channels_last one (as their entry point takes an ambiguous view first) whose C and
// row stride are multiples of 16 bytes. Where they do not, the layer works on a copy of
// its prefix, as the Python path's scratch does (same kernels, same summation order).
bool reads_in_place(const Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) || !x.is_cuda()) return true;
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const auto s = x.strides();
  const int64_t rs = w > 1 ? s[3] : h > 1 ? s[2] : s[0];
  const bool cl = (c == 1 || s[1] == 1) && rs > c && (h == 1 || s[2] == w * rs) && (n == 1 || s[0] == h * w * rs);
  const int64_t e = x.element_size();
  return !cl || (c * e % 16 == 0 && rs * e % 16 == 0);
}

// Channels [0, cl) of buf as the kernels read them: the view, or a copy in fmt.
Tensor prefix(const Tensor& buf, int64_t cl, at::MemoryFormat fmt) {
  Tensor view = buf.slice(1, 0, cl);
  return reads_in_place(view) ? view : view.contiguous(fmt);
}

void check_layers(const char* fn, int64_t layers, size_t n_tensors, at::IntArrayRef geometry, at::IntArrayRef training,
                  size_t n_momentum, size_t n_eps, size_t n_drop, size_t n_growth) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(n_tensors) == kPerLayer * layers, "resfused ", fn, ": expected ", kPerLayer,
                    " tensors per layer, got ", n_tensors, " for ", layers, " layers");
  TORCH_CHECK_VALUE(static_cast<int64_t>(geometry.size()) == 2 * kGeometry * layers &&
                        static_cast<int64_t>(training.size()) == 2 * layers &&
                        static_cast<int64_t>(n_momentum) == 2 * layers && static_cast<int64_t>(n_eps) == 2 * layers,
                    "resfused ", fn, ": expected two convs' geometry and two BNs' training flag, momentum and eps "
                    "per layer");
  TORCH_CHECK_VALUE(static_cast<int64_t>(n_drop) == layers && static_cast<int64_t>(n_growth) == layers,
                    "resfused ", fn, ": expected one drop rate and growth per layer");
}

}  // namespace

std::vector<Tensor> dense_fwd(const Tensor& x, const c10::List<OptTensor>& tensors, at::IntArrayRef geometry,
                              at::IntArrayRef training, at::ArrayRef<double> momentum, at::ArrayRef<double> eps,
                              at::ArrayRef<double> drop_rate, at::IntArrayRef growth, bool channels_last,
                              bool keep) {
  const int64_t n = static_cast<int64_t>(growth.size());
  check_layers("dense_fwd", n, tensors.size(), geometry, training, momentum.size(), eps.size(), drop_rate.size(),
               growth.size());
  TORCH_CHECK_VALUE(x.dim() == 4, "resfused dense_fwd: x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  const auto fmt = format_of(channels_last);
  const int64_t N = x.size(0), c0 = x.size(1), H = x.size(2), W = x.size(3);
  int64_t total = c0;
  for (int64_t k : growth) total += k;
  Tensor buf = at::empty({N, total, H, W}, x.options().memory_format(fmt));
  Tensor xd = x.contiguous(fmt);  // layer 0's input (released once its BN-ReLU has read it)
  buf.slice(1, 0, c0).copy_(x);
  auto t = [&](int64_t layer, int64_t j) -> OptTensor { return tensors.get(layer * kPerLayer + j); };

  // Statistics cache: each channel's batch (mean, var), computed once when it is written,
  // for as long as some later layer's norm1 normalises with batch statistics.
  int64_t last_batch_norm1 = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (training[2 * i] != 0) last_batch_norm1 = i;
  }
  const int64_t count = N * H * W;
  Tensor cache_mean, cache_var;
  if (last_batch_norm1 >= 0) {
    const auto acc_opts = x.options().dtype(acc_of(x)).memory_format(at::MemoryFormat::Contiguous);
    cache_mean = at::empty({total}, acc_opts);
    cache_var = at::empty({total}, acc_opts);
    auto [m, v] = call_stats(xd);
    cache_mean.slice(0, 0, c0).copy_(m);
    cache_var.slice(0, 0, c0).copy_(v);
  }

  std::vector<Tensor> y1s, aff1s, st1s, aff2s, st2s, masks;
  int64_t cl = c0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = growth[i];
    Tensor aff1, st1;
    if (training[2 * i] != 0) {
      std::tie(aff1, st1) = bn_coef_batch(cache_mean.slice(0, 0, cl), cache_var.slice(0, 0, cl), count, t(i, N1W),
                                          t(i, N1B), t(i, N1RM), t(i, N1RV), momentum[2 * i], eps[2 * i]);
    } else {
      TORCH_CHECK_VALUE(given(t(i, N1RM)) && given(t(i, N1RV)), "resfused dense_fwd: layer ", i + 1,
                        "'s norm1 in eval mode needs running statistics");
      std::tie(aff1, st1) = bn_coef_running(*t(i, N1RM), *t(i, N1RV), t(i, N1W), t(i, N1B), eps[2 * i], acc_of(x));
    }
    Tensor y1;
    {
      Tensor a1;  // a transient, never saved
      if (i == 0) {  // layer 0 reads the input; later ones their prefix of the buffer
        a1 = call_fwd(xd, aff1, c10::nullopt, c10::nullopt, true);
        xd = Tensor();
      } else {
        a1 = call_fwd(prefix(buf, cl, fmt), aff1, c10::nullopt, c10::nullopt, true);
      }
      y1 = conv(a1, *t(i, C1W), t(i, C1B), geometry_of(geometry, 2 * i));
    }
    auto [aff2, st2] = bn_stats_coef(y1, t(i, N2W), t(i, N2B), t(i, N2RM), t(i, N2RV), training[2 * i + 1] != 0,
                                     momentum[2 * i + 1], eps[2 * i + 1]);
    Tensor y2;
    {
      const Tensor a2 = call_fwd(y1, aff2, c10::nullopt, c10::nullopt, true);
      y2 = conv(a2, *t(i, C2W), t(i, C2B), geometry_of(geometry, 2 * i + 1));
    }
    TORCH_CHECK_VALUE(y2.dim() == 4 && y2.size(0) == N && y2.size(1) == k && y2.size(2) == H && y2.size(3) == W,
                      "dense block: layer ", i + 1, " produced new features of shape ", y2.sizes(),
                      "; a dense layer must keep the spatial size, expected [", N, ", ", k, ", ", H, ", ", W, "]");
    if (drop_rate[i] > 0) {
      // torchvision's F.dropout, on ones: the same random stream and values
      const Tensor noise = at::dropout(at::ones_like(y2), drop_rate[i], /*train=*/true);
      y2 = y2 * noise;
      if (keep) masks.push_back(noise != 0);
    }
    buf.slice(1, cl, cl + k).copy_(y2);
    if (i < last_batch_norm1) {
      auto [m, v] = call_stats(y2);
      cache_mean.slice(0, cl, cl + k).copy_(m);
      cache_var.slice(0, cl, cl + k).copy_(v);
    }
    if (keep) {
      y1s.push_back(std::move(y1));
      aff1s.push_back(std::move(aff1));
      st1s.push_back(std::move(st1));
      aff2s.push_back(std::move(aff2));
      st2s.push_back(std::move(st2));
    }
    cl += k;
  }
  std::vector<Tensor> result{buf};
  for (auto* list : {&y1s, &aff1s, &st1s, &aff2s, &st2s, &masks}) {
    result.insert(result.end(), list->begin(), list->end());
  }
  return result;
}

std::vector<Tensor> dense_bwd(const Tensor& grad_out, const Tensor& buf, at::TensorList y1s, at::TensorList aff1s,
                              at::TensorList st1s, at::TensorList aff2s, at::TensorList st2s,
                              const c10::List<OptTensor>& masks, at::TensorList conv_weights,
                              const c10::List<OptTensor>& conv_biases, at::IntArrayRef geometry,
                              at::IntArrayRef training, at::ArrayRef<double> drop_rate, at::IntArrayRef growth,
                              int64_t c0, at::IntArrayRef needs, bool channels_last) {
  const int64_t n = static_cast<int64_t>(growth.size());
  check_layers("dense_bwd", n, kPerLayer * n, geometry, training, 2 * n, 2 * n, drop_rate.size(), growth.size());
  for (at::TensorList list : {y1s, aff1s, st1s, aff2s, st2s}) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(list.size()) == n, "resfused dense_bwd: expected one y1, affine and "
                      "stats per layer and BN");
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(masks.size()) == n && static_cast<int64_t>(conv_weights.size()) == 2 * n &&
                        static_cast<int64_t>(conv_biases.size()) == 2 * n,
                    "resfused dense_bwd: expected one mask (or None) per layer and two conv weights and biases");
  TORCH_CHECK_VALUE(static_cast<int64_t>(needs.size()) == 1 + kPerLayer * n,
                    "resfused dense_bwd: needs holds x's flag and ", kPerLayer, " per layer");
  const auto fmt = format_of(channels_last);
  const int64_t count = buf.size(0) * buf.size(2) * buf.size(3);
  auto need = [&](int64_t layer, int64_t j) { return needs[1 + layer * kPerLayer + j] != 0; };
  std::vector<Tensor> grads(1 + kPerLayer * n);
  auto put = [&](int64_t layer, int64_t j, const Tensor& value) {
    if (value.defined() && need(layer, j)) grads[1 + layer * kPerLayer + j] = value;
  };
  const bool need_x = needs[0] != 0;

  Tensor gbuf = at::empty_like(buf, fmt);
  gbuf.copy_(grad_out);
  std::vector<int64_t> widths(n);
  for (int64_t i = 0, c = c0; i < n; c += growth[i], ++i) widths[i] = c;
  for (int64_t i = n - 1; i >= 0; --i) {
    const int64_t cl = widths[i], k = growth[i];
    const bool need_prefix = i > 0 || need_x;
    const bool need_norm1 = need_prefix || need(i, N1W) || need(i, N1B);
    const bool need_conv1 = need_norm1 || need(i, C1W) || need(i, C1B);
    const bool need_norm2 = need_conv1 || need(i, N2W) || need(i, N2B);
    if (!(need_norm2 || need(i, C2W) || need(i, C2B))) continue;
    const Tensor& y1 = y1s[i];
    Tensor d_a2;
    {
      Tensor g = gbuf.slice(1, cl, cl + k);  // complete: every later layer has added its share
      const OptTensor mask = masks.get(i);
      if (given(mask)) {
        Tensor noise = mask->to(g.scalar_type());
        if (drop_rate[i] < 1) noise.div_(1.0 - drop_rate[i]);
        g = g * noise;
      }
      g = g.contiguous(fmt);
      const Tensor a2 = call_fwd(y1, aff2s[i], c10::nullopt, c10::nullopt, true);  // recompute relu2
      auto [da, dw2, db2] = conv_backward(g, a2, conv_weights[2 * i + 1], conv_biases.get(2 * i + 1),
                                          geometry_of(geometry, 2 * i + 1), need_norm2, need(i, C2W), need(i, C2B));
      put(i, C2W, dw2);
      put(i, C2B, db2);
      d_a2 = std::move(da);
    }
    if (!need_norm2) continue;
    // the relu mask is recomputed from y1 (z <= 0): one read fewer per pass
    const bool train2 = training[2 * i + 1] != 0;
    auto [dy1, unused, sums2] = bn_act_bwd(d_a2, y1, c10::nullopt, aff2s[i], st2s[i], c10::nullopt, c10::nullopt,
                                           c10::nullopt, train2, false, /*relu=*/true, need_conv1,
                                           train2 || need(i, N2W) || need(i, N2B), false);
    put(i, N2W, sums2[1]);
    put(i, N2B, sums2[0]);
    d_a2 = Tensor();
    if (!need_conv1) continue;
    const Tensor xp = prefix(buf, cl, fmt);
    Tensor d_a1;
    {
      const Tensor a1 = call_fwd(xp, aff1s[i], c10::nullopt, c10::nullopt, true);  // recompute relu(bn1(prefix))
      auto [da, dw1, db1] = conv_backward(dy1, a1, conv_weights[2 * i], conv_biases.get(2 * i),
                                          geometry_of(geometry, 2 * i), need_norm1, need(i, C1W), need(i, C1B));
      put(i, C1W, dw1);
      put(i, C1B, db1);
      d_a1 = std::move(da);
    }
    dy1 = Tensor();
    if (!need_norm1) continue;
    const bool train1 = training[2 * i] != 0;
    const Tensor g1 = d_a1.contiguous(fmt);
    Tensor sums1 = (train1 || need(i, N1W) || need(i, N1B))
                       ? std::get<0>(call_reduce(g1, xp, aff1s[i], st1s[i], c10::nullopt, c10::nullopt, c10::nullopt,
                                                 c10::nullopt, true, false))
                       : at::zeros({2, cl}, aff1s[i].options());
    if (need_prefix) {  // the prefix's input gradient, added into the gradient buffer by the apply pass
      const Tensor coef = grad_coefficients(st1s[i], aff1s[i], sums1, 1, train1, count);
      const Tensor acc = gbuf.slice(1, 0, cl);
      if (acc.strides() == xp.strides()) {
        call_apply_acc(acc, g1, xp, aff1s[i], coef, c10::nullopt, true);
      } else {  // a copied prefix: the pass on a copy of the gradient's prefix, copied back
        Tensor dense = at::empty_like(xp);  // xp's exact strides, which the kernels require
        dense.copy_(acc);
        call_apply_acc(dense, g1, xp, aff1s[i], coef, c10::nullopt, true);
        acc.copy_(dense);
      }
    }
    put(i, N1W, sums1[1]);
    put(i, N1B, sums1[0]);
  }
  if (need_x) grads[0] = gbuf.slice(1, 0, c0).contiguous(fmt);
  return grads;
}

}  // namespace resfused
