// Runs the kernel section of csrc/cuda/bn_act.cu (kernels.inc, written by
// tests/test_cuda_sim.py) on the simulated GPU of shim.h, against a float64 reference of
// the op contract (resfused/ops/eager.py).
//
// The host side below copies the launchers' decisions from bn_act.cu (vector widths,
// channels_last block shapes, split counts, the prefix-view read_x rule and its asserts);
// the occupancy query is replaced by g_resident (few resident blocks: the grid-stride loops
// wrap). Keep it in step when those launchers change.
//
//   harness SHAPES SEED fixed        the fixed sweep over its first SHAPES shapes (0: all)
//   harness ITERS SEED rand          ITERS random cases (3 in 4 with a channel-prefix x, channels_last or NCHW)
//   harness ITERS SEED randaligned   the same with aligned operands (views kept in place)
// Each case without residual also runs the accumulating apply where its entry point would.
// Prints a summary line "...; launches L fails F"; exits non-zero on any failure.
#include "shim.h"
#include <random>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <limits>
#include <type_traits>
namespace resfused { namespace {
#include "kernels.inc"

// ---- host replicas (resident_blocks -> g_resident) ----
int64_t g_resident = 4;
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
struct Shape { int64_t N, C, HW, numel; bool nchw; int64_t xs, xb; };
#define SIM_ASSERT(c, msg) do { if (!(c)) { fprintf(stderr, "INTERNAL ASSERT: %s\n", msg); _exit(11); } } while (0)
template <typename K> int64_t resident_blocks(K, int, int) { return g_resident; }
template <typename T> inline bool aligned(const void* p, int V) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * static_cast<size_t>(V)) == 0; }
template <typename T> bool all_aligned(std::initializer_list<const void*> ps, int V) {
  for (const void* p : ps) if (!aligned<T>(p, V)) return false; return true; }
void nhwc_block(int64_t Cv, int& bdx, int& bdy, int64_t& gx) {
  if (Cv <= 32) { gx = 1; bdx = static_cast<int>(Cv); } else { gx = ceil_div(Cv, 32); bdx = static_cast<int>(ceil_div(Cv, gx)); }
  bdy = kThreads / bdx; }
constexpr int64_t kMaxGridY = 65535;
template <typename Op, int V>
void launch_ew_flat(const Op& op, int64_t numel, int64_t HW, int64_t C, int64_t xgap, int dev) {
  auto kernel = ew_nchw_kernel<Op, V, true>;
  if constexpr (V > 1) {
    if (HW % V != 0) kernel = ew_nchw_kernel<Op, V, false>;
  }
  const int64_t nvec = numel / V;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(nvec, kThreads), resident_blocks(kernel, kThreads, dev)));
  launch(dim3(blocks), dim3(kThreads), [&] { kernel(op, numel, HW, static_cast<int>(C), xgap); });
}
template <typename Op, int V>
void launch_ew_nhwc(const Op& op, int64_t M, int64_t C, int dev) {
  auto kernel = ew_nhwc_kernel<Op, V>;
  int bdx, bdy; int64_t gx;
  nhwc_block(C / V, bdx, bdy, gx);
  const int64_t target = resident_blocks(kernel, bdx * bdy, dev);
  const int64_t gy = std::max<int64_t>(1, std::min({ceil_div(M, bdy), std::max<int64_t>(1, target / gx), kMaxGridY}));
  launch(dim3(gx, gy), dim3(bdx, bdy), [&] { kernel(op, M, static_cast<int>(C)); });
}
int g_path = 0;  // which path ran (for coverage)
int g_rpath = 0;
template <typename T, typename Op>
void launch_ew(const Op& op, const Shape& s, std::initializer_list<const void*> ptrs, int dev) {
  constexpr int VV = vec16<T>();
  constexpr int VN = Op::kNhwcVec;
  if (!s.nchw && s.C % VN == 0 && all_aligned<T>(ptrs, VN)) { g_path = 1; launch_ew_nhwc<Op, VN>(op, s.N * s.HW, s.C, dev); return; }
  SIM_ASSERT(s.xs == s.C, "resfused: a channels_last prefix view reached the flat elementwise kernel");
  const int64_t xgap = s.xb - s.C * s.HW;
  const bool al = all_aligned<T>(ptrs, VV) && (xgap == 0 || (s.C * s.HW % VV == 0 && s.xb % VV == 0));
  const int64_t HW = s.nchw ? s.HW : 1;
  if (al) { g_path = 2; launch_ew_flat<Op, VV>(op, s.numel, HW, s.C, xgap, dev); }
  else { g_path = 3; launch_ew_flat<Op, 1>(op, s.numel, HW, s.C, xgap, dev); }
}
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
void stats_impl(const T* xp, const Shape& s, typename AccOf<T>::type* mean, typename AccOf<T>::type* var, int dev) {
  using A = typename AccOf<T>::type;
  constexpr int VV = vec16<T>();
  constexpr int VM = VV > 4 ? 4 : VV;
  const bool al = aligned<T>(xp, VV);
  std::vector<A> ws; int64_t S;
  if (s.nchw) {
    const int V = (al && s.HW % VV == 0) ? VV : (aligned<T>(xp, VM) && s.HW % VM == 0) ? VM : 1;
    auto kernel = V == VV ? stats_nchw_kernel<T, A, VV> : V == VM ? stats_nchw_kernel<T, A, VM> : stats_nchw_kernel<T, A, 1>;
    const int64_t nvc = s.N * s.HW / V;
    int64_t chunk;
    S = nchw_splits(nvc, s.C, resident_blocks(kernel, kThreads, dev), chunk);
    ws.assign(3 * S * s.C, A(NAN));
    A* w = ws.data();
    launch(dim3(s.C, S), dim3(kThreads), [&] { kernel(xp, static_cast<int>(s.C), s.HW, nvc, chunk, w); });
  } else {
    const bool vec = al && s.C % VV == 0;
    auto kernel = vec ? stats_nhwc_kernel<T, A, VV> : stats_nhwc_kernel<T, A, 1>;
    const int V = vec ? VV : 1;
    const int64_t M = s.N * s.HW;
    int bdx, bdy; int64_t gx;
    nhwc_block(s.C / V, bdx, bdy, gx);
    S = nhwc_splits(M, bdy, gx, resident_blocks(kernel, bdx * bdy, dev));
    ws.assign(3 * S * s.C, A(NAN));
    A* w = ws.data();
    launch(dim3(gx, S), dim3(bdx, bdy), [&] { kernel(xp, static_cast<int>(s.C), M, w); });
  }
  const A* w = ws.data();
  launch(dim3(ceil_div(s.C, kWarps)), dim3(kThreads), [&] {
    stats_finalize_kernel<A>(w, static_cast<int>(S), static_cast<int>(s.C), static_cast<A>(s.N * s.HW), mean, var); });
}
template <typename T, bool RBN>
void reduce_impl(const RedArgs<T, typename AccOf<T>::type>& a, const Shape& s, typename AccOf<T>::type* out, int K, int dev) {
  using A = typename AccOf<T>::type;
  constexpr int VV = vec16<T>();
  constexpr int VN = sizeof(T) == 2 && RBN ? 4 : VV;
  std::vector<A> ws; int64_t S;
  SIM_ASSERT(s.xs == s.C || (!s.nchw && s.C % VN == 0 && s.xs % VN == 0), "resfused: a prefix view reached a reduction kernel that cannot read it");
  if (s.nchw) {
    g_rpath = 4;
    constexpr int VM = VV > 4 ? 4 : VV;
    const int V = (s.HW % VV == 0 && s.xb % VV == 0 && all_aligned<T>({a.g, a.x, a.res, a.out, a.dz}, VV)) ? VV
                  : (s.HW % VM == 0 && s.xb % VM == 0 && all_aligned<T>({a.g, a.x, a.res, a.out, a.dz}, VM)) ? VM : 1;
    auto kernel = V == VV ? reduce_nchw_kernel<T, A, VV, RBN> : V == VM ? reduce_nchw_kernel<T, A, VM, RBN> : reduce_nchw_kernel<T, A, 1, RBN>;
    const int64_t nvc = s.N * s.HW / V;
    int64_t chunk;
    S = nchw_splits(nvc, s.C, resident_blocks(kernel, kThreads, dev), chunk);
    ws.assign(3 * S * s.C, A(NAN));
    A* w = ws.data();
    launch(dim3(s.C, S), dim3(kThreads), [&] { kernel(a, s.HW, nvc, chunk, w); });
  } else {
    const bool vec = s.C % VN == 0 && all_aligned<T>({a.g, a.x, a.res, a.out, a.dz}, VN);
    auto kernel = vec ? reduce_nhwc_kernel<T, A, VN, RBN> : reduce_nhwc_kernel<T, A, 1, RBN>;
    g_rpath = vec ? 5 : 6;
    const int V = vec ? VN : 1;
    const int64_t M = s.N * s.HW;
    int bdx, bdy; int64_t gx;
    nhwc_block(s.C / V, bdx, bdy, gx);
    S = nhwc_splits(M, bdy, gx, resident_blocks(kernel, bdx * bdy, dev));
    ws.assign(3 * S * s.C, A(NAN));
    A* w = ws.data();
    launch(dim3(gx, S), dim3(bdx, bdy), [&] { kernel(a, M, w); });
  }
  const A* w = ws.data();
  launch(dim3(ceil_div(s.C, kWarps)), dim3(kThreads), [&] {
    sum_finalize_kernel<A>(w, static_cast<int>(S), static_cast<int>(s.C), K, out); });
}
}}  // namespaces
using namespace resfused;

// ---------------- test driver ----------------
std::mt19937_64 rng(1234);
double urand() { return std::uniform_real_distribution<double>(-2, 2)(rng); }
struct Buf {  // storage with an element offset
  std::vector<char> raw; size_t off;
  template <typename T> T* p() { return reinterpret_cast<T*>(raw.data() + 64) + off; }
};
template <typename T> Buf mk(int64_t n, size_t off) { Buf b; b.raw.assign(64 + (n + off) * sizeof(T) + 64, 0); b.off = off; return b; }
inline bool al16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int g_fail = 0;
long g_cases = 0, g_acc = 0, g_pref = 0, g_pref_nchw = 0, g_view[3] = {0, 0, 0}, g_copy[3] = {0, 0, 0}, g_pathcnt[8] = {0};
template <typename T>
bool close(double got, double want, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= tol * (1 + std::fabs(want));
}
template <typename T> const char* tname() {
  return std::is_same<T, float>::value ? "f32" : std::is_same<T, double>::value ? "f64" : std::is_same<T, c10::Half>::value ? "f16" : "bf16"; }

// extra <= 0: dense x. Else x = wide[:, xoff:xoff+C] view of a wider buffer: channels_last
// with row stride xs = C + extra, or NCHW with image stride xb = (C + extra)*HW (xoff is the
// view's element offset in its buffer). An NCHW view with N == 1 is contiguous (dense), one
// with HW == 1 is a channels_last view as the entry point sees it.
template <typename T>
void run_case(int64_t N, int64_t C, int64_t H, int64_t W, bool cl, size_t offmask, int flags, int64_t resident, int64_t extra = -1, int64_t xoff = 0) {
  using A = typename AccOf<T>::type;
  g_resident = resident; ++g_cases;
  const double tol = sizeof(T) == 2 ? (std::is_same<T, c10::BFloat16>::value ? 1e-2 : 2e-3) : sizeof(T) == 4 ? 2e-5 : 1e-12;
  const int64_t HW = H * W, numel = N * C * HW, M = N * HW;
  auto idx = [&](int64_t n, int64_t c, int64_t hw) { return cl ? (n * HW + hw) * C + c : (n * C + c) * HW + hw; };
  if (!cl && HW == 1 && extra > 0) cl = true;  // the same memory as a channels_last view
  // a prefix view with N == HW == 1 (or N == 1 in NCHW) is NCHW-contiguous in torch (dense)
  const bool pref_cl = cl && extra > 0 && !(N == 1 && HW == 1);
  const bool pref_nchw = !cl && extra > 0 && N > 1;
  const bool pref = pref_cl || pref_nchw;
  const int64_t xs = pref_cl ? C + extra : C;
  const int64_t xb = pref_nchw ? (C + extra) * HW : C * HW;
  if (pref) ++g_pref;
  if (pref_nchw) ++g_pref_nchw;
  const bool nchw = pref_cl ? false : (!cl || C == 1 || HW == 1);
  const bool relu = flags & 1, has_res = flags & 2, res_aff = has_res && (flags & 4), pass_out = flags & 8, use_out = relu && pass_out;
  const bool has_r2 = has_res && (flags & 16), write_dz = flags & 32;
  // flags & 64: NaN/inf in x and the residual, and eval coefficients (mdz = p = 0) on every
  // other channel: relu's backward passes g where its input is NaN, and p == 0 drops x's term
  const bool nonfinite = flags & 64;
  char desc[256];
  snprintf(desc, sizeof desc, "%s N%ld C%ld H%ld W%ld cl%d xs%ld xb%ld xoff%ld off%zu fl%d rb%ld", tname<T>(), (long)N, (long)C, (long)H, (long)W, (int)cl, (long)xs, (long)xb, (long)xoff, offmask, flags, (long)resident);
  // big tensors
  const int64_t xalloc = pref_cl ? M * xs : pref_nchw ? N * xb : numel;
  const int64_t xext = pref_cl ? (M > 0 ? (M - 1) * xs + C : 0) : pref_nchw ? (N - 1) * xb + C * HW : numel;
  Buf bx = mk<T>(xalloc, pref ? xoff : (offmask & 1 ? 1 : 0)), br = mk<T>(numel, offmask & 2 ? 1 : 0), bg = mk<T>(numel, offmask & 4 ? 2 : 0);
  Buf bo = mk<T>(numel, 0), bdz = mk<T>(numel, 0), bdx = mk<T>(numel, 0), bdr = mk<T>(numel, 0);
  T* x = bx.p<T>(); T* r = br.p<T>(); T* g = bg.p<T>(); T* o = bo.p<T>();
  // whole wide buffer: NaN sentinels (catch reads of the other channels)
  { T* w0 = reinterpret_cast<T*>(bx.raw.data()); size_t nn = bx.raw.size() / sizeof(T); for (size_t i = 0; i < nn; ++i) w0[i] = T(NAN); }
  auto xi = [&](int64_t n, int64_t c, int64_t k) -> int64_t {
    return pref_cl ? (n * HW + k) * xs + c : pref_nchw ? n * xb + c * HW + k : idx(n, c, k); };
  auto X = [&](int64_t n, int64_t c, int64_t k) -> double { return double(x[xi(n, c, k)]); };
  g_ranges.clear();
  g_ranges.push_back({(const char*)x, (const char*)(x + xext)});
  for (T* q : {r, g, o, bdz.p<T>(), bdx.p<T>(), bdr.p<T>()}) g_ranges.push_back({(const char*)q, (const char*)(q + numel)});
  for (int64_t n = 0; n < N; ++n) for (int64_t c = 0; c < C; ++c) for (int64_t k = 0; k < HW; ++k) x[xi(n, c, k)] = T(urand() + 0.3);
  for (int64_t i = 0; i < numel; ++i) { r[i] = T(urand()); g[i] = T(urand()); }
  std::vector<A> aff(2 * C), raff(2 * C), st(2 * C), rst(2 * C), coef(4 * C), rcoef(4 * C);
  for (auto* v : {&aff, &raff, &st, &rst, &coef, &rcoef}) for (auto& e : *v) e = A(urand());
  if (nonfinite) {
    const double bad[] = {NAN, INFINITY, -INFINITY};
    for (int64_t n = 0; n < N; ++n) for (int64_t c = 0; c < C; ++c) for (int64_t k = 0; k < HW; ++k) {
      const int64_t j = (n * C + c) * HW + k;
      if (j % 7 == 3) x[xi(n, c, k)] = T(bad[(j / 7) % 3]);
      if (j % 11 == 5) r[idx(n, c, k)] = T(bad[(j / 11 + 1) % 3]);
    }
    for (int64_t c = 0; c < C; c += 2) coef[2 * C + c] = coef[3 * C + c] = rcoef[2 * C + c] = rcoef[3 * C + c] = A(0);
    // and a non-finite running mean where p == 0 (a training batch with an inf made it so): unread
    for (int64_t c = 0; c < C; c += 4) coef[c] = rcoef[c] = A(c % 8 ? INFINITY : NAN);
  }
  // the op contract's relu backward mask and x term of dx (resfused/ops/eager.py)
  auto keep = [](double m) { return !(m <= 0); };
  auto xterm = [](double v, double mean, double p) { return p == 0 ? 0.0 : (v - mean) * p; };
  // read_x replica: keep the view or compact it (xs -> C). inputs: the other big inputs handed to read_x.
  Buf bxc; bool have_copy = false;
  auto read_x = [&](Shape& s, std::initializer_list<const void*> inputs, int opk) -> const T* {
    if (s.xs == s.C) return x;
    const int64_t V = 16 / (int64_t)sizeof(T);
    bool ok = s.C % V == 0 && s.xs % V == 0 && al16(x);
    for (const void* q : inputs) ok = ok && (q == nullptr || al16(q));
    if (ok) { ++g_view[opk]; return x; }
    ++g_copy[opk];
    s.xs = s.C;
    if (!have_copy) {  // x.contiguous(channels_last): a fresh aligned allocation
      bxc = mk<T>(numel, 0); have_copy = true;
      T* xc = bxc.p<T>();
      for (int64_t n = 0; n < N; ++n) for (int64_t c = 0; c < C; ++c) for (int64_t k = 0; k < HW; ++k) xc[(n * HW + k) * C + c] = x[xi(n, c, k)];
      g_ranges.push_back({(const char*)xc, (const char*)(xc + numel)});
    }
    return bxc.p<T>();
  };
  // ---- stats (bn_stats never takes a prefix view)
  if (!pref) {
    Shape s{N, C, HW, numel, nchw, C, C * HW};
    std::vector<A> mean(C), var(C);
    stats_impl<T>(x, s, mean.data(), var.data(), 0);
    for (int64_t c = 0; c < C; ++c) {
      double sm = 0, sq = 0;
      for (int64_t n = 0; n < N; ++n) for (int64_t k = 0; k < HW; ++k) sm += X(n, c, k);
      double mu = sm / M;
      for (int64_t n = 0; n < N; ++n) for (int64_t k = 0; k < HW; ++k) { double d = X(n, c, k) - mu; sq += d * d; }
      double tv = sizeof(T) == 8 ? 1e-12 : 1e-5;
      // a channel with an inf: the sum's mean is inf where a Welford mean is NaN
      auto ok = [&](double got, double want) { return std::isfinite(want) ? close<T>(got, want, tv) : !std::isfinite(got); };
      if (!ok(mean[c], mu) || !ok(var[c], sq / M)) {
        if (g_fail++ < 20) printf("STATS FAIL %s c%ld got %g %g want %g %g\n", desc, (long)c, (double)mean[c], (double)var[c], mu, sq / M);
        break;
      }
    }
  }
  // ---- fwd
  {
    Shape s{N, C, HW, numel, nchw, xs, xb};
    const T* xk = read_x(s, {has_res ? (const void*)r : nullptr}, 0);
    FwdOp<T, A> f;
    f.x = xk; f.res = has_res ? r : nullptr; f.out = o; f.affine = aff.data(); f.res_affine = res_aff ? raff.data() : nullptr;
    f.C = C; f.xs = s.xs; f.relu = relu; f.has_res = has_res; f.res_aff = res_aff;
    launch_ew<T>(f, s, {f.x, f.res, f.out}, 0);
    if (pref) ++g_pathcnt[g_path];
  }
  auto pre = [&](int64_t n, int64_t c, int64_t k) {
    const int64_t i = idx(n, c, k);
    double z = X(n, c, k) * aff[c] + aff[C + c];
    if (has_res) z += res_aff ? double(r[i]) * raff[c] + raff[C + c] : double(r[i]);
    return z; };
  for (int64_t n = 0; n < N; ++n) for (int64_t c = 0; c < C; ++c) for (int64_t k = 0; k < HW; ++k) {
    int64_t i = idx(n, c, k);
    double z = pre(n, c, k); if (relu && z < 0) z = 0;
    if (!close<T>(double(o[i]), z, tol)) {
      if (g_fail++ < 20) printf("FWD FAIL %s path%d at n%ld c%ld k%ld got %g want %g\n", desc, g_path, (long)n, (long)c, (long)k, double(o[i]), z);
      goto fwd_done;
    }
  }
fwd_done:
  // ---- bwd reduce
  {
    Shape s{N, C, HW, numel, nchw, xs, xb};
    const T* xk = read_x(s, {g, has_res ? (const void*)r : nullptr, pass_out ? (const void*)o : nullptr}, 1);
    RedArgs<T, A> a;
    a.relu = relu; a.use_out = use_out; a.has_res = has_res; a.res_aff = res_aff; a.has_rstats = has_r2;
    a.need_r = has_res && ((relu && !use_out) || has_r2);
    a.g = g; a.x = xk; a.res = a.need_r ? r : nullptr; a.out = use_out ? o : nullptr;
    a.affine = aff.data(); a.stats = st.data(); a.res_affine = res_aff ? raff.data() : nullptr;
    a.res_stats = has_r2 ? rst.data() : nullptr; a.dz = write_dz ? bdz.p<T>() : nullptr; a.C = (int)C; a.xs = s.xs; a.xb = s.xb;
    int K = has_r2 ? 3 : 2;
    std::vector<A> res(K * C, A(NAN));
    if (res_aff || has_r2) reduce_impl<T, true>(a, s, res.data(), K, 0);
    else reduce_impl<T, false>(a, s, res.data(), K, 0);
    if (pref) ++g_pathcnt[g_rpath];
    for (int64_t c = 0; c < C; ++c) {
      double s0 = 0, s1 = 0, s2 = 0, a0 = 0, a1 = 0, a2 = 0;
      bool dzbad = false;
      for (int64_t n = 0; n < N; ++n) for (int64_t k = 0; k < HW; ++k) {
        int64_t i = idx(n, c, k);
        double dz = double(g[i]);
        if (relu && !keep(use_out ? double(o[i]) : pre(n, c, k))) dz = 0;
        if (write_dz && !dzbad && double(bdz.p<T>()[i]) != double(T(dz))) { dzbad = true; if (g_fail++ < 20) printf("DZ FAIL %s c%ld n%ld k%ld got %g want %g\n", desc, (long)c, (long)n, (long)k, double(bdz.p<T>()[i]), dz); }
        double xh = (X(n, c, k) - st[c]) * st[C + c];
        s0 += dz; s1 += dz * xh; a0 += std::fabs(dz); a1 += std::fabs(dz * xh);
        if (has_r2) { double rh = (double(r[i]) - rst[c]) * rst[C + c]; s2 += dz * rh; a2 += std::fabs(dz * rh); }
      }
      double tr = sizeof(T) == 8 ? 1e-12 : 1e-5;
      auto near = [&](double got, double want, double mag) {
        return std::isnan(want) ? std::isnan(got) : std::isinf(want) ? got == want : std::fabs(got - want) <= tr * (1 + mag); };
      bool ok = near(res[c], s0, a0) && near(res[C + c], s1, a1) && (!has_r2 || near(res[2 * C + c], s2, a2));
      if (!ok) { if (g_fail++ < 20) printf("RED FAIL %s rpath%d c%ld got %g %g want %g %g\n", desc, g_rpath, (long)c, (double)res[c], (double)res[C + c], s0, s1); break; }
      if (dzbad) break;
    }
  }
  // ---- bwd apply
  {
    Shape s{N, C, HW, numel, nchw, xs, xb};
    const T* xk = read_x(s, {g, has_res ? (const void*)r : nullptr, pass_out ? (const void*)o : nullptr}, 2);
    const bool has_rc = has_res && (flags & 16);
    auto run = [&](auto op) {  // ApplyOp<T, A, false, RBN>, RBN as the entry point picks it
      auto p = op;
      p.relu = relu; p.use_out = use_out; p.has_res = has_res; p.res_aff = res_aff; p.has_rcoef = has_rc;
      p.need_r = has_res && ((relu && !use_out) || has_rc);
      p.g = g; p.x = xk; p.res = p.need_r ? r : nullptr; p.out = use_out ? o : nullptr;
      p.dx = bdx.p<T>(); p.dres = has_res ? bdr.p<T>() : nullptr;
      p.affine = aff.data(); p.res_affine = res_aff ? raff.data() : nullptr; p.coef = coef.data(); p.res_coef = has_rc ? rcoef.data() : nullptr;
      p.C = C; p.xs = s.xs;
      launch_ew<T>(p, s, {p.g, p.x, p.res, p.out, p.dx, p.dres}, 0);
    };
    if (res_aff || has_rc) run(ApplyOp<T, A, false, true>{});
    else run(ApplyOp<T, A, false, false>{});
    const T* got_dx = bdx.p<T>();
    const T* got_dr = has_res ? bdr.p<T>() : nullptr;
    if (pref) ++g_pathcnt[g_path];
    for (int64_t n = 0; n < N; ++n) for (int64_t c = 0; c < C; ++c) for (int64_t k = 0; k < HW; ++k) {
      int64_t i = idx(n, c, k);
      double dz = double(g[i]);
      if (relu && !keep(use_out ? double(o[i]) : pre(n, c, k))) dz = 0;
      double dx = (dz - coef[2 * C + c] - xterm(X(n, c, k), coef[c], coef[3 * C + c])) * coef[C + c];
      double dr = has_rc ? (dz - rcoef[2 * C + c] - xterm(double(r[i]), rcoef[c], rcoef[3 * C + c])) * rcoef[C + c] : dz;
      double ta = tol * 20;
      if (!close<T>(double(got_dx[i]), dx, ta) || (has_res && !close<T>(double(got_dr[i]), dr, ta))) {
        if (g_fail++ < 20) printf("APPLY FAIL %s path%d at n%ld c%ld k%ld got %g %g want %g %g\n", desc, g_path, (long)n, (long)c, (long)k, double(got_dx[i]), has_res ? double(got_dr[i]) : 0., dx, dr);
        goto ap_done;
      }
    }
  ap_done:;
  }
  // ---- bwd apply accumulating into acc, a tensor with x's strides (no residual): the
  // entry point runs ApplyOp<.., true> through launch_ew where x is read in place (acc
  // included in the alignment check); else it adds a plain apply's dx (no kernel of its own)
  if (!has_res) {
    using Op = ApplyOp<T, A, true, false>;
    const int64_t V16 = 16 / (int64_t)sizeof(T);
    // acc has x's strides; its base is misaligned on its own when offmask has bit 8
    Buf bacc = mk<T>(xalloc, (pref ? xoff : (offmask & 1 ? 1 : 0)) + (offmask & 8 ? 1 : 0));
    T* acc = bacc.p<T>();
    const bool in_place = !pref_cl || (C % V16 == 0 && xs % V16 == 0 && al16(x) && al16(g) && (!pass_out || al16(o)) && al16(acc));
    if (in_place) {
      ++g_acc;
      { T* w0 = reinterpret_cast<T*>(bacc.raw.data()); size_t nn = bacc.raw.size() / sizeof(T); for (size_t i = 0; i < nn; ++i) w0[i] = T(NAN); }
      for (int64_t n = 0; n < N; ++n) for (int64_t c = 0; c < C; ++c) for (int64_t k = 0; k < HW; ++k) acc[xi(n, c, k)] = T(urand());
      std::vector<double> acc0(bacc.raw.size() / sizeof(T));
      { T* w0 = reinterpret_cast<T*>(bacc.raw.data()); for (size_t i = 0; i < acc0.size(); ++i) acc0[i] = double(w0[i]); }
      g_ranges.push_back({(const char*)acc, (const char*)(acc + xext)});
      Op p;
      p.relu = relu; p.use_out = use_out; p.has_res = p.res_aff = p.has_rcoef = p.need_r = false;
      p.g = g; p.x = x; p.res = nullptr; p.out = use_out ? o : nullptr; p.dx = acc; p.dres = nullptr;
      p.affine = aff.data(); p.res_affine = nullptr; p.coef = coef.data(); p.res_coef = nullptr;
      p.C = C; p.xs = xs;
      Shape s{N, C, HW, numel, nchw, xs, xb};
      launch_ew<T>(p, s, {p.g, p.x, p.out, p.dx}, 0);
      const size_t base = (reinterpret_cast<char*>(acc) - bacc.raw.data()) / sizeof(T);
      T* w0 = reinterpret_cast<T*>(bacc.raw.data());
      for (size_t i = 0; i < acc0.size(); ++i) {  // everything outside the prefix untouched
        bool inside = false;
        if (i >= base) { const int64_t j = int64_t(i - base); inside = j < xext && (pref_cl ? j % xs < C : pref_nchw ? j % xb < C * HW : true); }
        if (!inside && !(std::isnan(double(w0[i])) && std::isnan(acc0[i]))) {
          if (g_fail++ < 20) printf("ACC FAIL %s wrote outside the prefix at %zu\n", desc, i);
          goto acc_done;
        }
      }
      for (int64_t n = 0; n < N; ++n) for (int64_t c = 0; c < C; ++c) for (int64_t k = 0; k < HW; ++k) {
        int64_t i = idx(n, c, k);
        double dz = double(g[i]);
        if (relu && !keep(use_out ? double(o[i]) : pre(n, c, k))) dz = 0;
        double want = acc0[base + xi(n, c, k)] + (dz - coef[2 * C + c] - xterm(X(n, c, k), coef[c], coef[3 * C + c])) * coef[C + c];
        if (!close<T>(double(acc[xi(n, c, k)]), want, tol * 20)) {
          if (g_fail++ < 20) printf("ACC FAIL %s at n%ld c%ld k%ld got %g want %g\n", desc, (long)n, (long)c, (long)k, double(acc[xi(n, c, k)]), want);
          goto acc_done;
        }
      }
    }
  acc_done:;
  }
}

template <typename F> void by_type(int t, F f) {
  switch (t) { case 0: f(float()); break; case 1: f(c10::Half()); break; case 2: f(double()); break; default: f(c10::BFloat16()); }
}

void report(const char* tag) {
  printf("%s: cases %ld (prefix %ld, NCHW prefix %ld, accumulating %ld) view kept fwd/red/apply %ld/%ld/%ld copied %ld/%ld/%ld; prefix-case paths nhwc-ew %ld flat-vec %ld flat-1 %ld red-nhwc-vec %ld red-nhwc-1 %ld red-nchw %ld; launches %ld fails %d\n",
         tag, g_cases, g_pref, g_pref_nchw, g_acc, g_view[0], g_view[1], g_view[2], g_copy[0], g_copy[1], g_copy[2], g_pathcnt[1], g_pathcnt[2], g_pathcnt[3], g_pathcnt[5], g_pathcnt[6], g_pathcnt[4], g_launches, g_fail);
}

// bn_coef_kernel (bn_coef_cuda's launch: ceil(C / kThreads) blocks of kThreads) against
// a float64 reference, with and without weight, bias and the running-statistics update.
template <typename A> void check_coef() {
  const double mom = 0.1, eps = 1e-5, ub = 1.25;
  const double tol = std::is_same<A, double>::value ? 1e-12 : 1e-5;
  for (int64_t C : {1, 5, 255, 256, 600}) for (int fl = 0; fl < 8; ++fl) {
    const bool hw = fl & 1, hb = fl & 2, up = fl & 4;
    std::vector<A> m(C), v(C), w(C), b(C), rm(C), rv(C), aff(2 * C), st(2 * C);
    for (int64_t c = 0; c < C; ++c) {
      m[c] = A(urand()); v[c] = A(urand() + 2.5); w[c] = A(urand()); b[c] = A(urand());
      rm[c] = A(urand()); rv[c] = A(urand() + 2.5);
    }
    const std::vector<A> rm0 = rm, rv0 = rv;
    ++g_cases;
    launch(dim3(static_cast<unsigned>(ceil_div(C, kThreads))), dim3(kThreads), [&] {
      bn_coef_kernel<A>(m.data(), v.data(), hw ? w.data() : nullptr, hb ? b.data() : nullptr,
                        up ? rm.data() : nullptr, up ? rv.data() : nullptr, aff.data(), st.data(), C, A(mom),
                        A(1.0 - mom), A(eps), A(ub)); });
    for (int64_t c = 0; c < C; ++c) {
      const double inv = 1.0 / std::sqrt(double(v[c]) + eps), sc = hw ? double(w[c]) * inv : inv;
      const double want[6] = {sc, (hb ? double(b[c]) : 0.0) - double(m[c]) * sc, double(m[c]), inv,
                              up ? mom * double(m[c]) + (1 - mom) * double(rm0[c]) : double(rm0[c]),
                              up ? mom * double(v[c]) * ub + (1 - mom) * double(rv0[c]) : double(rv0[c])};
      const double got[6] = {double(aff[c]), double(aff[C + c]), double(st[c]), double(st[C + c]), double(rm[c]),
                             double(rv[c])};
      for (int k = 0; k < 6; ++k)
        if (!(std::fabs(got[k] - want[k]) <= tol * (1 + std::fabs(want[k])))) {
          if (g_fail++ < 20) printf("COEF FAIL C%ld flags%d c%ld k%d got %g want %g\n", (long)C, fl, (long)c, k, got[k], want[k]);
          break;
        }
    }
  }
}

// bn_grad_coef_kernel (bn_grad_coef_cuda's launch) against a float64 reference, training
// and eval, with the x row (1) and a residual BN's row (2) of the sums.
template <typename A> void check_grad_coef() {
  const double tol = std::is_same<A, double>::value ? 1e-12 : 1e-6;
  for (int64_t C : {1, 5, 255, 256, 600}) for (int fl = 0; fl < 4; ++fl) {
    const bool training = fl & 1;
    const int row = (fl & 2) ? 2 : 1;
    const int64_t count = training ? 37 : 1;
    std::vector<A> st(2 * C), aff(2 * C), sums(3 * C), coef(4 * C, A(-7));
    for (auto* v : {&st, &aff, &sums}) for (auto& e : *v) e = A(urand());
    ++g_cases;
    launch(dim3(static_cast<unsigned>(ceil_div(C, kThreads))), dim3(kThreads), [&] {
      bn_grad_coef_kernel<A>(st.data(), aff.data(), sums.data(), sums.data() + row * C, coef.data(), C, training,
                             A(1) / A(count)); });  // (the launch passes 1 / count, rounded in A)
    // and bit for bit against the Python sequence on a GPU, in A: coef[3] = sums[row] * invstd
    // (rounded), then coef[2:] times 1 / count as ATen's CUDA division by a scalar rounds it
    const A inv = A(1) / A(count);
    for (int64_t c = 0; c < C; ++c) {
      const double want[4] = {double(st[c]), double(aff[c]), training ? double(sums[c]) / count : 0.0,
                              training ? double(sums[row * C + c]) * double(st[C + c]) / count : 0.0};
      volatile A p = sums[row * C + c] * st[C + c];  // (volatile: rounded to A, never contracted)
      const A exact[4] = {st[c], aff[c], training ? A(sums[c] * inv) : A(0), training ? A(p * inv) : A(0)};
      for (int k = 0; k < 4; ++k)
        if (!(std::fabs(double(coef[k * C + c]) - want[k]) <= tol * (1 + std::fabs(want[k]))) ||
            !(coef[k * C + c] == exact[k])) {
          if (g_fail++ < 20) printf("GRAD COEF FAIL C%ld flags%d c%ld k%d got %.17g want %.17g (bits %.17g)\n", (long)C,
                                    fl, (long)c, k, double(coef[k * C + c]), want[k], double(exact[k]));
          break;
        }
    }
  }
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  int iters = atoi(argv[1]); rng.seed(atoi(argv[2]));
  check_coef<float>();
  check_coef<double>();
  check_grad_coef<float>();
  check_grad_coef<double>();
  const char* mode = argc > 3 ? argv[3] : "rand";
  auto ri = [&](int a, int b) { return std::uniform_int_distribution<int>(a, b)(rng); };
  const int extras[] = {0, 1, 4, 8, 16, 3, 5, 7, 13, 24, 32};
  if (!strcmp(mode, "fixed")) {
    // fixed sweep: shapes x dtypes x extras x x-offsets x flag sets
    struct Sh { int n, c, h, w; } shapes[] = {{2, 32, 3, 5}, {1, 64, 7, 7}, {3, 16, 1, 1}, {2, 8, 4, 1}, {1, 1, 5, 3}, {2, 24, 2, 3}, {4, 40, 3, 3}, {2, 96, 2, 2}, {1, 48, 1, 9}, {2, 12, 3, 2}, {2, 256, 2, 3}, {3, 6, 2, 2}};
    const int flagsets[] = {0, 1, 3, 7, 11, 15, 19, 23, 27, 31, 32, 33, 35, 39, 43, 47, 51, 55, 59, 63};
    int si = 0;
    for (auto sh : shapes) {
      if (iters > 0 && si >= iters) break;  // iters > 0: the first `iters` shapes only
      for (int t = 0; t < 4; ++t) for (int e : extras) for (int xo : {0, 1, 2, 4, 8}) {
        if (xo > e && xo != 0) continue;
        int fl = flagsets[(si * 7 + t * 3 + e + xo) % 20];
        int64_t rb = (e + xo + t) % 3 == 0 ? 1 : (e + t) % 3 == 1 ? 3 : 500;
        size_t off = (xo == 1 && e == 16) ? 6 : 0;  // residual/grad misaligned sometimes
        const bool cl = sh.n == 1 || (e + xo + t) % 4 != 0;  // 1 in 4 an NCHW view
        by_type(t, [&](auto z) { run_case<decltype(z)>(sh.n, sh.c, sh.h, sh.w, cl, off, fl, rb, e, xo); });
      }
      // every flag combination once per dtype on a view that stays in place and one that is copied
      for (int t = 0; t < 4; ++t) for (int fl = 0; fl < 64; ++fl) {
        // half the flag sets again with non-finite values, on a dense tensor: per dtype, by
        // the parity of the higher flags (so every relu/residual combination), in both layouts
        if ((__builtin_popcount(fl >> 2) + t) % 2 == 0) {
          const bool nf_cl = (fl ^ (fl >> 3) ^ (t >> 1)) & 1;
          by_type(t, [&](auto z) { run_case<decltype(z)>(sh.n, sh.c, sh.h, sh.w, nf_cl, 0, fl | 64, fl % 2 ? 2 : 300); });
        }
        by_type(t, [&](auto z) { run_case<decltype(z)>(sh.n, sh.c, sh.h, sh.w, true, 0, fl, fl % 2 ? 2 : 300, 16, 0); });
        by_type(t, [&](auto z) { run_case<decltype(z)>(sh.n, sh.c, sh.h, sh.w, true, fl & 4, fl, fl % 2 ? 2 : 300, 5, fl % 3); });
        if (fl % 4 == fl / 16 && sh.n > 1)  // an NCHW view for a quarter of them (its reduction is slow to simulate)
          by_type(t, [&](auto z) { run_case<decltype(z)>(sh.n, sh.c, sh.h, sh.w, false, fl & 4, fl, fl % 2 ? 2 : 300, fl % 8 ? 8 : 3, fl % 5); });
      }
      printf("shape %d fails so far %d\n", si++, g_fail);
    }
    report("fixed");
    return g_fail != 0;
  }
  for (int it = 0; it < iters; ++it) {
    int n = ri(1, 6), c = ri(1, 3) == 1 ? ri(1, 9) : ri(1, 3) == 1 ? 8 * ri(1, 12) : ri(10, 130);
    int h = ri(1, 3) == 1 ? 1 : ri(1, 40), w = ri(1, 40);
    while ((long)n * c * h * w > 60000) { if (h > 1) h /= 2; else if (w > 1) w /= 2; else c = std::max(1, c / 2); }
    int cl = ri(0, 1); size_t off = ri(0, 15); int flags = ri(0, 127); int64_t rb = ri(0, 1) ? ri(1, 6) : ri(7, 600);
    int64_t extra = -1, xo = 0;
    if (ri(0, 3) != 0) {  // prefix view (3 in 4; 1 in 3 of those NCHW)
      cl = ri(0, 2) != 0; extra = extras[ri(0, 10)];
      if (ri(0, 1)) c = 8 * ri(1, 16);  // C multiple of 16 bytes for every dtype: the view is kept where xs allows
      while ((long)n * (c + extra) * h * w > 60000) { if (h > 1) h /= 2; else if (w > 1) w /= 2; else n = std::max(1, n / 2); if (n == 1 && h == 1 && w == 1) break; }
      xo = ri(0, 2) == 0 ? ri(0, std::max<int>(0, extra)) : 0;
      if (ri(0, 2)) off &= ~size_t(1);
      if (!strcmp(mode, "randaligned")) { off = 0; xo = 0; if (ri(0, 2)) extra = 8 * ri(1, 4); }
    }
    by_type(ri(0, 3), [&](auto z) { run_case<decltype(z)>(n, c, h, w, cl, off, flags, rb, extra, xo); });
    if (it % 50 == 0) printf("it %d fails %d\n", it, g_fail);
  }
  report("rand");
  return g_fail != 0;
}
