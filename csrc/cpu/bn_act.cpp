// CPU backend of the fused BN-activation ops (contract: resfused/ops/eager.py).
//
// This file holds the entry points (argument checks, allocation, mode
// selection), the thread-slot runner, and the baseline-ISA copy of the kernel
// bodies (bn_act_kernels.h). bn_act_avx2.cpp holds an AVX2+FMA copy of the same
// bodies; it is chosen at run time when the CPU supports it.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "bn_act.h"
#include "bn_act_cpu.h"

#include <ATen/cpu/vec/vec.h>
#define RESFUSED_KNS generic
#include "bn_act_kernels.h"
#undef RESFUSED_KNS

namespace resfused {
namespace cpu {

// ------------------------------------------------------------------ threads
// Work is cut into slots that depend only on the problem size (never on the
// thread count), so every reduction is combined in the same order however many
// threads run it: results are bitwise reproducible across thread counts.
namespace {
constexpr int64_t kGrain = 32768;       // below this many elements: one slot
constexpr int64_t kSlotWork = 1 << 18;  // elements per slot above it
constexpr int64_t kMaxSlots = 64;
}  // namespace

int64_t num_slots(int64_t work) {
  if (work <= kGrain) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(kMaxSlots, (work + kSlotWork - 1) / kSlotWork));
}

void run_slots(int64_t n, const std::function<void(int64_t)>& f) {
  if (n <= 0) return;
  const int64_t nt = (n == 1 || at::in_parallel_region()) ? 1 : std::max(1, at::get_num_threads());
  if (nt == 1) {
    for (int64_t k = 0; k < n; ++k) f(k);
    return;
  }
  // setup.py compiles with -fopenmp, so this is the OpenMP team ATen's own kernels use.
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(k);
  });
}

const KernelTable* kernels_default() {
  static const KernelTable t{&generic::k_stats, &generic::k_fwd, &generic::k_bwd_reduce, &generic::k_bwd_apply,
                             &generic::k_relu_maxpool};
  return &t;
}

namespace {
const KernelTable* pick() {
  static const KernelTable* t = [] {
    const char* env = std::getenv("RESFUSED_CPU_ISA");
    const bool force_default = env && (std::strcmp(env, "default") == 0 || std::strcmp(env, "DEFAULT") == 0);
    const KernelTable* k = force_default ? nullptr : kernels_avx2();
    return k ? k : kernels_default();
  }();
  return t;
}

c10::ScalarType acc_type(c10::ScalarType t) {
  return t == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

struct Layout {
  bool cl;
  at::MemoryFormat fmt;
  int64_t xs = 0;  // BnArgs::xs: 0, or the batch (NCHW) / row (CL) stride of a channel-prefix view
};

// x[:, :C] of a wider dense tensor: NCHW-dense within each image (batch stride > C*H*W),
// or channels_last rows of C channels with a row stride > C. Returns that stride, or 0.
int64_t prefix_view_stride(const at::Tensor& x, bool cl) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (N * C * H * W == 0) return 0;
  if (!cl) {
    const bool inner = (W == 1 || x.stride(3) == 1) && (H == 1 || x.stride(2) == W) &&
                       (C == 1 || x.stride(1) == H * W);
    return inner && N > 1 && x.stride(0) > C * H * W ? x.stride(0) : 0;
  }
  const int64_t rs = x.stride(3);
  const bool ok = (C == 1 || x.stride(1) == 1) && rs > C && (H == 1 || x.stride(2) == W * rs) &&
                  (N == 1 || x.stride(0) == H * W * rs);
  return ok && H * W * N > 1 ? rs : 0;
}

// allow_prefix: the kernel reads x through BnArgs::xs (fwd, bwd_reduce, bwd_apply).
Layout layout_of(const at::Tensor& x, bool allow_prefix = false) {
  TORCH_CHECK(x.dim() == 4, "resfused cpu: x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), "resfused cpu: x must be a CPU tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "resfused cpu: unsupported dtype ", dt);
  if (x.is_contiguous()) return {false, at::MemoryFormat::Contiguous};
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {true, at::MemoryFormat::ChannelsLast};
  if (allow_prefix) {
    if (const int64_t s = prefix_view_stride(x, false)) return {false, at::MemoryFormat::Contiguous, s};
    if (const int64_t s = prefix_view_stride(x, true)) return {true, at::MemoryFormat::ChannelsLast, s};
  }
  TORCH_CHECK(false, "resfused cpu: x must be NCHW-contiguous or channels_last-contiguous",
              allow_prefix ? " (or a channel-prefix view of such a tensor)" : "");
  return {false, at::MemoryFormat::Contiguous};
}

// x as the kernel reads it: a prefix view as it is, else contiguous in L.fmt.
at::Tensor kernel_x(const at::Tensor& x, const Layout& L) { return L.xs ? x : x.contiguous(L.fmt); }

// A big tensor in x's layout (a no-op for tensors the op layer prepared).
at::Tensor big(const at::Tensor& t, const at::Tensor& x, const Layout& L, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "resfused cpu: ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "resfused cpu: ", name, " must have x's dtype");
  TORCH_CHECK(t.device().is_cpu(), "resfused cpu: ", name, " must be a CPU tensor");
  return t.contiguous(L.fmt);
}

at::Tensor chan(const at::Tensor& t, const at::Tensor& x, int64_t rows, const char* name) {
  const int64_t C = x.size(1);
  TORCH_CHECK(t.dim() == 2 && t.size(0) >= rows && t.size(1) == C, "resfused cpu: ", name, " must be [",
              rows, ", ", C, "], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "resfused cpu: ", name, " must be a CPU tensor");
  return t.to(acc_type(x.scalar_type())).contiguous();
}

// A dense x gives its exact strides (a tensor contiguous both ways, [N, C, 1, 1], keeps the
// layout only its strides tell); a prefix view its layout.
at::Tensor out_like(const at::Tensor& x, const Layout& L) {
  if (!L.xs) return at::empty_like(x);
  return at::empty(x.sizes(), x.options().memory_format(L.fmt));
}

void set_rows(BnArgs& a, int first, const at::Tensor& t, int rows) {
  const int64_t C = t.size(1);
  const auto es = t.element_size();
  for (int i = 0; i < rows; ++i) a.p[first + i] = static_cast<const char*>(t.data_ptr()) + i * C * es;
}

BnArgs base_args(const at::Tensor& x, const Layout& L) {
  BnArgs a;
  a.dtype = x.scalar_type();
  a.N = x.size(0);
  a.C = x.size(1);
  a.HW = x.size(2) * x.size(3);
  a.cl = L.cl;
  a.xs = L.xs;
  a.x = x.data_ptr();
  return a;
}

// res_affine, or the identity (1, 0) for a plain residual in the recomputed mask.
at::Tensor res_affine_or_identity(const OptTensor& res_affine, const at::Tensor& x) {
  if (res_affine.has_value() && res_affine->defined()) return chan(*res_affine, x, 2, "res_affine");
  const auto opt = x.options().dtype(acc_type(x.scalar_type()));
  const int64_t C = x.size(1);
  return at::stack({at::ones({C}, opt), at::zeros({C}, opt)});
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
}  // namespace
}  // namespace cpu

using cpu::BnArgs;

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_) {
  const auto L = cpu::layout_of(x_);
  const at::Tensor x = x_.contiguous(L.fmt);
  const int64_t C = x.size(1);
  const auto opt = x.options().dtype(cpu::acc_type(x.scalar_type()));
  at::Tensor mean = at::empty({C}, opt), var = at::empty({C}, opt);
  if (x.numel() == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    BnArgs a = cpu::base_args(x, L);
    a.red = mean.data_ptr();
    a.red2 = var.data_ptr();
    cpu::pick()->stats(a);
  }
  return std::make_tuple(mean, var);
}

at::Tensor bn_act_fwd_cpu(const at::Tensor& x_, const at::Tensor& affine_, const OptTensor& residual,
                          const OptTensor& res_affine, bool relu) {
  const auto L = cpu::layout_of(x_, true);
  const at::Tensor x = cpu::kernel_x(x_, L);
  const at::Tensor affine = cpu::chan(affine_, x, 2, "affine");
  const bool has_res = cpu::given(residual);
  at::Tensor r, ra;
  if (has_res) {
    r = cpu::big(*residual, x, L, "residual");
    ra = cpu::res_affine_or_identity(res_affine, x);
  }
  at::Tensor out = cpu::out_like(x, L);
  if (x.numel() == 0) return out;
  BnArgs a = cpu::base_args(x, L);
  a.y = out.data_ptr();
  a.has_res = has_res;
  a.relu = relu;
  cpu::set_rows(a, 0, affine, 2);
  if (has_res) {
    a.r = r.data_ptr();
    cpu::set_rows(a, 2, ra, 2);
  }
  cpu::pick()->fwd(a);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_relu_maxpool_cpu(const at::Tensor& x, const at::Tensor& affine_,
                                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                       at::IntArrayRef padding) {
  const char* op = "resfused cpu bn_relu_maxpool";
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(), op,
              ": x must be an NCHW-contiguous 4-D CPU tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": unsupported dtype ", dt);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding must have two values each");
  std::array<int64_t, 6> win{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(win[d] > 0 && win[2 + d] > 0 && win[4 + d] >= 0 && win[4 + d] <= win[d] / 2, op,
                ": needs kernel_size > 0, stride > 0 and 0 <= padding <= kernel_size / 2, got kernel_size ",
                kernel_size, ", stride ", stride, ", padding ", padding);
  }
  // (the kernel numbers a window's elements in the compute dtype: exact up to 2^24)
  TORCH_CHECK(win[0] * win[1] <= (int64_t{1} << 24), op, ": a window of at most 2^24 elements, got kernel_size ",
              kernel_size);
  const at::Tensor affine = cpu::chan(affine_, x, 2, "affine");
  auto extent = [](int64_t size, int64_t k, int64_t s, int64_t p) {  // floor division, as aten's
    const int64_t span = size + 2 * p - k;
    return (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
  };
  const int64_t OH = extent(x.size(2), win[0], win[2], win[4]), OW = extent(x.size(3), win[1], win[3], win[5]);
  TORCH_CHECK(OH > 0 && OW > 0, op, ": the output would be empty (input ", x.sizes(), ", kernel_size ", kernel_size,
              ", stride ", stride, ", padding ", padding, ")");
  at::Tensor out = at::empty({x.size(0), x.size(1), OH, OW}, x.options());
  at::Tensor idx = at::empty({x.size(0), x.size(1), OH, OW}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return std::make_tuple(out, idx);
  cpu::PoolArgs a;
  a.dtype = dt;
  a.N = x.size(0);
  a.C = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  a.OH = OH;
  a.OW = OW;
  a.kH = win[0];
  a.kW = win[1];
  a.sH = win[2];
  a.sW = win[3];
  a.pH = win[4];
  a.pW = win[5];
  a.x = x.const_data_ptr();
  a.scale = affine.const_data_ptr();
  a.out = out.mutable_data_ptr();
  a.idx = idx.mutable_data_ptr<int64_t>();
  cpu::pick()->relu_maxpool(a);
  return std::make_tuple(out, idx);
}

namespace cpu {
namespace {
// Common setup of the two backward ops: dz's mask source.
struct BwdCommon {
  at::Tensor g, x, r, o, affine, ra;
  bool has_res = false;
  int mask = 0;
};

BwdCommon bwd_common(const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& affine,
                     const OptTensor& residual, const OptTensor& res_affine, const OptTensor& out, bool relu,
                     const Layout& L) {
  BwdCommon b;
  b.x = kernel_x(x_, L);
  b.g = big(grad_out, b.x, L, "grad_out");
  b.has_res = given(residual);
  if (b.has_res) b.r = big(*residual, b.x, L, "residual");
  if (!relu) {
    b.mask = 0;
  } else if (given(out)) {
    b.mask = 1;
    b.o = big(*out, b.x, L, "out");
  } else {
    b.mask = 2;
    b.affine = chan(affine, b.x, 2, "affine");
    if (b.has_res) b.ra = res_affine_or_identity(res_affine, b.x);
  }
  return b;
}

void fill_common(BnArgs& a, const BwdCommon& b) {
  a.g = b.g.data_ptr();
  a.mask = b.mask;
  a.has_res = b.has_res;
  if (b.has_res) a.r = b.r.data_ptr();
  if (b.mask == 1) a.o_in = b.o.data_ptr();
  if (b.mask == 2) {
    set_rows(a, 0, b.affine, 2);
    if (b.has_res) set_rows(a, 2, b.ra, 2);
  }
}
}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& x_,
                                                         const at::Tensor& affine, const at::Tensor& stats_,
                                                         const OptTensor& residual, const OptTensor& res_affine,
                                                         const OptTensor& res_stats, const OptTensor& out, bool relu,
                                                         bool write_dz) {
  const auto L = cpu::layout_of(x_, true);
  const auto b = cpu::bwd_common(grad_out, x_, affine, residual, res_affine, out, relu, L);
  const bool rst = cpu::given(res_stats);
  TORCH_CHECK(!rst || b.has_res, "resfused cpu: res_stats needs a residual");
  const int64_t C = b.x.size(1);
  at::Tensor red = at::empty({rst ? 3 : 2, C}, b.x.options().dtype(cpu::acc_type(b.x.scalar_type())));
  const at::Tensor stats = cpu::chan(stats_, b.x, 2, "stats");
  at::Tensor rstats;
  if (rst) rstats = cpu::chan(*res_stats, b.x, 2, "res_stats");
  at::Tensor dz = write_dz ? cpu::out_like(b.x, L) : at::empty({0}, b.x.options());
  if (b.x.numel() == 0) {
    red.zero_();
    return std::make_tuple(red, dz);
  }
  BnArgs a = cpu::base_args(b.x, L);
  cpu::fill_common(a, b);
  a.red = red.data_ptr();
  if (write_dz) a.y = dz.data_ptr();
  a.rstats = rst ? 1 : 0;
  cpu::set_rows(a, 4, stats, 2);
  if (rst) cpu::set_rows(a, 8, rstats, 2);
  cpu::pick()->bwd_reduce(a);
  return std::make_tuple(red, dz);
}

namespace cpu {
namespace {
// The apply pass; with acc (no residual) dx is added into *acc, which has x's strides.
std::tuple<at::Tensor, at::Tensor> bwd_apply(const at::Tensor& grad_out, const at::Tensor& x_,
                                             const at::Tensor& affine, const at::Tensor& coef_,
                                             const OptTensor& residual, const OptTensor& res_affine,
                                             const OptTensor& res_coef, const OptTensor& out, bool relu,
                                             const at::Tensor* acc) {
  const auto L = layout_of(x_, true);
  const auto b = bwd_common(grad_out, x_, affine, residual, res_affine, out, relu, L);
  const bool rc = given(res_coef);
  TORCH_CHECK(!rc || b.has_res, "resfused cpu: res_coef needs a residual");
  const at::Tensor coef = chan(coef_, b.x, 4, "coef");
  at::Tensor rcoef;
  if (rc) rcoef = chan(*res_coef, b.x, 4, "res_coef");
  if (acc) {
    TORCH_CHECK(!b.has_res, "resfused cpu: acc is without residual");
    TORCH_CHECK(acc->sizes() == b.x.sizes() && acc->strides() == b.x.strides() &&
                    acc->scalar_type() == b.x.scalar_type() && acc->device().is_cpu(),
                "resfused cpu: acc must match x in shape, strides, dtype and device");
    at::assert_no_overlap(*acc, b.x);
    at::assert_no_overlap(*acc, b.g);
    if (b.mask == 1) at::assert_no_overlap(*acc, b.o);
  }
  at::Tensor dx = acc ? *acc : out_like(b.x, L);
  at::Tensor dres = b.has_res ? out_like(b.x, L) : at::empty({0}, b.x.options());
  if (b.x.numel() == 0) return std::make_tuple(dx, dres);
  BnArgs a = base_args(b.x, L);
  fill_common(a, b);
  a.y = dx.data_ptr();
  a.acc = acc != nullptr;
  if (b.has_res) a.dres = dres.data_ptr();
  a.dres_mode = !b.has_res ? 0 : (rc ? 2 : 1);
  set_rows(a, 4, coef, 4);
  if (rc) set_rows(a, 8, rcoef, 4);
  pick()->bwd_apply(a);
  return std::make_tuple(dx, dres);
}
}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_apply_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& affine, const at::Tensor& coef,
                                                        const OptTensor& residual, const OptTensor& res_affine,
                                                        const OptTensor& res_coef, const OptTensor& out,
                                                        bool relu) {
  return cpu::bwd_apply(grad_out, x, affine, coef, residual, res_affine, res_coef, out, relu, nullptr);
}

void bn_act_bwd_apply_acc_cpu(const at::Tensor& acc, const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& affine, const at::Tensor& coef, const OptTensor& out, bool relu) {
  cpu::bwd_apply(grad_out, x, affine, coef, c10::nullopt, c10::nullopt, c10::nullopt, out, relu, &acc);
}

std::tuple<at::Tensor, at::Tensor> bn_coef_cpu(const at::Tensor& mean, const at::Tensor& var, const OptTensor& weight,
                                               const OptTensor& bias, const OptTensor& running_mean,
                                               const OptTensor& running_var, double momentum, double eps,
                                               double unbias) {
  const int64_t C = mean.numel();
  const bool update = cpu::given(running_mean);
  TORCH_CHECK(update == cpu::given(running_var), "resfused cpu bn_coef: running_mean and running_var go together");
  for (const OptTensor* t : {&weight, &bias, &running_mean, &running_var}) {
    if (cpu::given(*t)) {
      TORCH_CHECK((*t)->scalar_type() == mean.scalar_type() && (*t)->numel() == C && (*t)->is_contiguous() &&
                      (*t)->device().is_cpu(),
                  "resfused cpu bn_coef: per-channel tensors must be contiguous [C] CPU tensors of mean's dtype");
    }
  }
  TORCH_CHECK(var.scalar_type() == mean.scalar_type() && var.numel() == C && mean.is_contiguous() &&
                  var.is_contiguous(),
              "resfused cpu bn_coef: mean and var must be contiguous [C] tensors of one dtype");
  at::Tensor affine = at::empty({2, C}, mean.options());
  at::Tensor stats = at::empty({2, C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_coef_cpu", [&] {
    using A = scalar_t;
    const A* m = mean.const_data_ptr<A>();
    const A* v = var.const_data_ptr<A>();
    const A* w = cpu::given(weight) ? weight->const_data_ptr<A>() : nullptr;
    const A* b = cpu::given(bias) ? bias->const_data_ptr<A>() : nullptr;
    A* rm = update ? running_mean->mutable_data_ptr<A>() : nullptr;
    A* rv = update ? running_var->mutable_data_ptr<A>() : nullptr;
    A* aff = affine.mutable_data_ptr<A>();
    A* st = stats.mutable_data_ptr<A>();
    const A mom = static_cast<A>(momentum), keep = static_cast<A>(1.0 - momentum);
    const A e = static_cast<A>(eps), ub = static_cast<A>(unbias);
    for (int64_t c = 0; c < C; ++c) {
      const A mc = m[c], vc = v[c];
      if (update) {
        rm[c] = mom * mc + keep * rm[c];
        rv[c] = mom * (vc * ub) + keep * rv[c];
      }
      const A invstd = A(1) / std::sqrt(vc + e);
      const A scale = w ? w[c] * invstd : invstd;
      aff[c] = scale;
      aff[C + c] = b ? b[c] - mc * scale : -(mc * scale);
      st[c] = mc;
      st[C + c] = invstd;
    }
  });
  return std::make_tuple(affine, stats);
}

at::Tensor bn_grad_coef_cpu(const at::Tensor& stats, const at::Tensor& affine, const at::Tensor& sums, int64_t row,
                            bool training, int64_t count) {
  TORCH_CHECK(stats.device().is_cpu() && (stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble),
              "resfused cpu bn_grad_coef: stats must be a float32 or float64 CPU tensor");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.is_contiguous(),
              "resfused cpu bn_grad_coef: stats must be contiguous [2, C]");
  const int64_t C = stats.size(1);
  TORCH_CHECK(row == 1 || row == 2, "resfused cpu bn_grad_coef: row must be 1 or 2, got ", row);
  for (const at::Tensor* t : {&affine, &sums}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == stats.scalar_type() && t->dim() == 2 &&
                    t->size(1) == C && t->is_contiguous(),
                "resfused cpu bn_grad_coef: affine and sums must be contiguous [k, C] CPU tensors of stats' dtype");
  }
  TORCH_CHECK(affine.size(0) >= 2 && sums.size(0) > row, "resfused cpu bn_grad_coef: affine needs 2 rows and sums ",
              row + 1);
  at::Tensor coef = at::empty({4, C}, stats.options());
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "bn_grad_coef_cpu", [&] {
    using A = scalar_t;
    const A* st = stats.const_data_ptr<A>();
    const A* aff = affine.const_data_ptr<A>();
    const A* s0 = sums.const_data_ptr<A>();
    const A* s1 = s0 + row * C;
    A* k = coef.mutable_data_ptr<A>();
    const A n = static_cast<A>(std::max<int64_t>(count, 1));
    for (int64_t c = 0; c < C; ++c) {
      k[c] = st[c];
      k[C + c] = aff[c];
      k[2 * C + c] = training ? s0[c] / n : A(0);
      k[3 * C + c] = training ? (s1[c] * st[C + c]) / n : A(0);
    }
  });
  return coef;
}

}  // namespace resfused
