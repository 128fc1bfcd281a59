// Kernel bodies of the CPU backend. Not a public header: included once by
// bn_act.cpp (baseline ISA) and once by bn_act_avx2.cpp (AVX2+FMA), each time
// after <ATen/cpu/vec/vec.h> and with RESFUSED_KNS naming a namespace private
// to that translation unit, so the two copies never meet (no ODR mixing).
//
// Layouts: NCHW = N*C rows of HW contiguous elements (per-channel values are
// broadcast per row); channels_last = N*H*W rows of C contiguous channels
// (per-channel values are loaded as vectors). Work is split into contiguous
// slots whose number depends only on the size (bn_act.cpp: num_slots); the
// reductions keep one partial per slot and channel, in double, and combine them
// in slot order, so every result is bitwise the same for any thread count.
//
// Locals: the hot loops read only local variables. The vector stores (_mm256_storeu_ps
// and kin) are declared may-alias, so after each one the compiler must reload any
// value it reaches through a pointer or reference: a lambda's by-reference captures,
// a BnArgs field, a std::vector's data pointer. Each slot's lambda therefore starts
// from a copy of BnArgs and plain pointers; that made the channels_last loops 2-3x
// faster on the target machine (they had reloaded the row bounds and base pointers
// once per vector).
//
// Statistics: each piece of at most kPiece elements of one channel is reduced
// in two passes (sum, then sums of deviations about the piece mean) in the
// compute dtype while it is hot in L1, and pieces are merged in double with
// Chan's formula. No Σx² − M·mean² anywhere.

#ifndef RESFUSED_KNS
#error "define RESFUSED_KNS before including bn_act_kernels.h"
#endif

namespace resfused {
namespace cpu {
namespace RESFUSED_KNS {
namespace {

using at::vec::Vectorized;

template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

constexpr int64_t kPiece = 2048;   // elements of one channel reduced in the compute dtype

template <typename scalar_t>
struct IO {
  using acc_t = typename AccT<scalar_t>::type;
  using V = Vectorized<acc_t>;
  static constexpr int64_t L = V::size();
  static constexpr int64_t B = Vectorized<scalar_t>::size();  // elements per block
  static constexpr int NV = static_cast<int>(B / L);          // compute vectors per block
  static_assert(NV == 1 || NV == 2, "unexpected vector widths");

  static inline void load(const scalar_t* p, V* v) {
    if constexpr (NV == 1) {
      v[0] = V::loadu(p);
    } else {
      auto t = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
      v[0] = std::get<0>(t);
      v[1] = std::get<1>(t);
    }
  }
  static inline void store(scalar_t* p, const V* v) {
    if constexpr (NV == 1) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    }
  }
  static inline acc_t ld(const scalar_t* p) { return static_cast<acc_t>(*p); }
  static inline void st(scalar_t* p, acc_t v) { *p = static_cast<scalar_t>(v); }
};

// relu that propagates NaN (like torch.relu): z < 0 ? 0 : z
template <typename V> inline V vrelu(const V& z) {
  const V zero(typename V::value_type(0));
  return V::blendv(z, zero, z < zero);
}
template <typename A> inline A srelu(A z) { return z < A(0) ? A(0) : z; }
// m <= 0 ? 0 : g, as relu's backward (threshold_backward): a NaN m passes g.
template <typename V> inline V vmask(const V& g, const V& m) {
  const V zero(typename V::value_type(0));
  return V::blendv(g, zero, m <= zero);
}
template <typename A> inline A smask(A g, A m) { return m <= A(0) ? A(0) : g; }

// Keeps a product rounded on its own: the compiler may not contract
// `nc(a * b) + c` into an FMA. The elementwise maths (pre-activation, relu mask,
// input gradients) thus rounds exactly like eager PyTorch's separate mul and
// add, so fp32/fp64 outputs and relu masks match eager bit for bit (an FMA
// flips the mask of the rare z within an ulp of 0). Only the AVX2 copy can
// contract (the baseline x86-64 ISA has no FMA).
template <typename T> inline T nc(T v) {
#if defined(RESFUSED_CAN_CONTRACT)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    asm("" : "+x"(v));
  } else if constexpr (std::is_same_v<T, Vectorized<float>>) {
    __m256 r = v;
    asm("" : "+x"(r));
    v = T(r);
  } else if constexpr (std::is_same_v<T, Vectorized<double>>) {
    __m256d r = v;
    asm("" : "+x"(r));
    v = T(r);
  }
#endif
  return v;
}
// (x - mean) * p, or 0 where p == 0 (eval: the gradient does not depend on x, so an
// infinite x gives a finite gradient, as eager's).
template <typename V> inline V vxterm(const V& x, const V& mean, const V& p) {
  const V zero(typename V::value_type(0));
  return V::blendv(nc((x - mean) * p), zero, p == zero);
}
template <typename A> inline A sxterm(A x, A mean, A p) { return p == A(0) ? A(0) : nc((x - mean) * p); }

template <typename V> inline double hsum(const V& v) {
  using A = typename V::value_type;
  A buf[V::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += static_cast<double>(buf[i]);
  return s;
}

inline void chan_merge(double& n, double& mean, double& m2, double nb, double meanb, double m2b) {
  if (nb <= 0) return;
  const double nn = n + nb;
  const double delta = meanb - mean;
  mean += delta * (nb / nn);
  m2 += m2b + delta * delta * (n * nb / nn);
  n = nn;
}

inline void slot_range(int64_t total, int64_t nslots, int64_t k, int64_t align, int64_t& b, int64_t& e) {
  int64_t per = (total + nslots - 1) / nslots;
  per = (per + align - 1) / align * align;
  b = std::min(total, k * per);
  e = std::min(total, b + per);
}

// Calls f(row, flat_offset, len) for each piece of a row that lies in [e0, e1).
template <typename F>
inline void for_segments(int64_t e0, int64_t e1, int64_t len_row, const F& f) {
  if (e0 >= e1 || len_row <= 0) return;
  int64_t row = e0 / len_row;
  int64_t e = e0;
  while (e < e1) {
    const int64_t row_end = (row + 1) * len_row;
    const int64_t len = std::min(row_end, e1) - e;
    f(row, e, len);
    e += len;
    ++row;
  }
}

template <typename scalar_t>
struct K {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using V = typename io::V;
  static constexpr int64_t L = io::L;
  static constexpr int64_t B = io::B;
  static constexpr int NV = io::NV;

  static const acc_t* P(const BnArgs& a, int i) { return static_cast<const acc_t*>(a.p[i]); }

  // ---------------------------------------------------------------- stats
  // mean and M2 of n contiguous elements (two passes, compute dtype).
  static void piece_stats(const scalar_t* x, int64_t n, double& mean, double& m2, double& total) {
    V s0(0), s1(0);
    int64_t i = 0;
    V v[NV];
    for (; i + 2 * B <= n; i += 2 * B) {
      io::load(x + i, v);
      for (int j = 0; j < NV; ++j) s0 = s0 + v[j];
      io::load(x + i + B, v);
      for (int j = 0; j < NV; ++j) s1 = s1 + v[j];
    }
    for (; i + B <= n; i += B) {
      io::load(x + i, v);
      for (int j = 0; j < NV; ++j) s0 = s0 + v[j];
    }
    double sum = hsum(s0 + s1);
    for (; i < n; ++i) sum += static_cast<double>(io::ld(x + i));
    total = sum;
    const acc_t m = static_cast<acc_t>(sum / static_cast<double>(n));
    const V mv(m);
    V d1(0), d2(0), e1(0), e2(0);
    i = 0;
    for (; i + 2 * B <= n; i += 2 * B) {
      io::load(x + i, v);
      for (int j = 0; j < NV; ++j) {
        V d = v[j] - mv;
        d1 = d1 + d;
        d2 = at::vec::fmadd(d, d, d2);
      }
      io::load(x + i + B, v);
      for (int j = 0; j < NV; ++j) {
        V d = v[j] - mv;
        e1 = e1 + d;
        e2 = at::vec::fmadd(d, d, e2);
      }
    }
    for (; i + B <= n; i += B) {
      io::load(x + i, v);
      for (int j = 0; j < NV; ++j) {
        V d = v[j] - mv;
        d1 = d1 + d;
        d2 = at::vec::fmadd(d, d, d2);
      }
    }
    double sd1 = hsum(d1 + e1), sd2 = hsum(d2 + e2);
    for (; i < n; ++i) {
      const double d = static_cast<double>(io::ld(x + i) - m);
      sd1 += d;
      sd2 += d * d;
    }
    const double dn = static_cast<double>(n);
    mean = static_cast<double>(m) + sd1 / dn;
    m2 = std::max(0.0, sd2 - sd1 * sd1 / dn);
  }

  // B-blocks per chunk of channels that the channels_last reductions keep in registers
  static constexpr int kChunkB = NV == 1 ? 4 : 2;
  // channels_last channel counts up to which those reductions run chunk by chunk (rows
  // strided); above it, row after row, which reads memory sequentially
  static constexpr int64_t kChunkMaxC = 128;

  // channels_last statistics of channels [c, c + NB*B) over rows [rb, re) (row stride C),
  // in registers: pass 1 the sums, pass 2 the deviations about the block mean (the rows
  // still cached). Writes s, m (sum / cnt), d1 (sum of deviations), d2 (of their squares).
  template <int NB>
  static inline void cl_stats_chunk(const scalar_t* x, int64_t C, int64_t rb, int64_t re, int64_t c, acc_t cnt,
                                    acc_t* s, acc_t* m, acc_t* d1, acc_t* d2) {
    constexpr int W = NB * NV;
    V sum[W], v[NV];
    for (int q = 0; q < W; ++q) sum[q] = V(acc_t(0));
    const scalar_t* xc = x + c;
    for (int64_t r = rb; r < re; ++r) {
      const scalar_t* xr = xc + r * C;
      for (int b = 0; b < NB; ++b) {
        io::load(xr + b * B, v);
        for (int j = 0; j < NV; ++j) sum[b * NV + j] = sum[b * NV + j] + v[j];
      }
    }
    V mv[W], e1[W], e2[W];
    const V cv(cnt);
    for (int q = 0; q < W; ++q) {
      sum[q].store(s + c + q * L);
      mv[q] = sum[q] / cv;
      mv[q].store(m + c + q * L);
      e1[q] = e2[q] = V(acc_t(0));
    }
    for (int64_t r = rb; r < re; ++r) {
      const scalar_t* xr = xc + r * C;
      for (int b = 0; b < NB; ++b) {
        io::load(xr + b * B, v);
        for (int j = 0; j < NV; ++j) {
          const int q = b * NV + j;
          const V d = v[j] - mv[q];
          e1[q] = e1[q] + d;
          e2[q] = at::vec::fmadd(d, d, e2[q]);
        }
      }
    }
    for (int q = 0; q < W; ++q) {
      e1[q].store(d1 + c + q * L);
      e2[q].store(d2 + c + q * L);
    }
  }

  static void stats(const BnArgs& a) {
    const int64_t C = a.C, HW = a.HW, total = a.N * C * HW;
    const int64_t nslots = num_slots(total);
    // per slot and channel: count, mean, M2, plain sum (the mean when inf/NaN is involved)
    std::vector<double> part(static_cast<size_t>(nslots * 4 * C), 0.0);
    double* const part0 = part.data();
    run_slots(nslots, [&a, part0, nslots](int64_t k) {
      const BnArgs al = a;  // by value: see "Locals" at the top
      const scalar_t* x = static_cast<const scalar_t*>(al.x);
      const int64_t C = al.C, HW = al.HW, total = al.N * C * HW, rows = al.N * HW;
      const bool cl = al.cl;
      double* Pn = part0 + k * 4 * C;
      double* Pm = Pn + C;
      double* P2 = Pm + C;
      double* Ps = P2 + C;
      if (!cl) {
        int64_t e0, e1;
        slot_range(total, nslots, k, B, e0, e1);
        for_segments(e0, e1, HW, [&](int64_t row, int64_t e, int64_t len) {
          const int64_t c = row % C;
          for (int64_t q = 0; q < len; q += kPiece) {
            const int64_t n = std::min(kPiece, len - q);
            double pm, pm2, ps;
            piece_stats(x + e + q, n, pm, pm2, ps);
            chan_merge(Pn[c], Pm[c], P2[c], static_cast<double>(n), pm, pm2);
            Ps[c] += ps;
          }
        });
        return;
      }
      const int64_t Cv = C / B * B;
      // blocks of rows (~128 KiB of fp32, L2-resident for the second pass)
      const int64_t blk = std::max<int64_t>(8, std::min<int64_t>(256, 32768 / std::max<int64_t>(C, 1)));
      int64_t r0, r1;
      slot_range(rows, nslots, k, 1, r0, r1);
      std::vector<acc_t> buf(static_cast<size_t>(4 * C));
      acc_t* const s = buf.data();
      acc_t* const m = s + C;
      acc_t* const d1 = m + C;
      acc_t* const d2 = d1 + C;
      double nslot = 0;  // rows merged so far (the same for every channel)
      for (int64_t rb = r0; rb < r1; rb += blk) {
        const int64_t re = std::min(r1, rb + blk);
        const acc_t cnt = static_cast<acc_t>(re - rb);
        if (C <= kChunkMaxC) {
          // few channels: chunks of them held in registers over the block's rows
          int64_t c = 0;
          for (; c + kChunkB * B <= Cv; c += kChunkB * B) cl_stats_chunk<kChunkB>(x, C, rb, re, c, cnt, s, m, d1, d2);
          for (; c < Cv; c += B) cl_stats_chunk<1>(x, C, rb, re, c, cnt, s, m, d1, d2);
          for (; c < C; ++c) {
            acc_t sc = 0;
            for (int64_t r = rb; r < re; ++r) sc += io::ld(x + r * C + c);
            s[c] = sc;
            m[c] = sc / cnt;
            acc_t e1 = 0, e2 = 0;
            for (int64_t r = rb; r < re; ++r) {
              const acc_t d = io::ld(x + r * C + c) - m[c];
              e1 += d;
              e2 += d * d;
            }
            d1[c] = e1;
            d2[c] = e2;
          }
        } else {
          // many channels: row after row (sequential reads), the sums in memory
          std::fill(s, s + C, acc_t(0));
          std::fill(d1, d1 + 2 * C, acc_t(0));
          V v[NV];
          for (int64_t r = rb; r < re; ++r) {
            const scalar_t* xr = x + r * C;
            int64_t c = 0;
            for (; c < Cv; c += B) {
              io::load(xr + c, v);
              for (int j = 0; j < NV; ++j) (V::loadu(s + c + j * L) + v[j]).store(s + c + j * L);
            }
            for (; c < C; ++c) s[c] += io::ld(xr + c);
          }
          for (int64_t c = 0; c < C; ++c) m[c] = s[c] / cnt;
          for (int64_t r = rb; r < re; ++r) {
            const scalar_t* xr = x + r * C;
            int64_t c = 0;
            for (; c < Cv; c += B) {
              io::load(xr + c, v);
              for (int j = 0; j < NV; ++j) {
                const int64_t cc = c + j * L;
                V d = v[j] - V::loadu(m + cc);
                (V::loadu(d1 + cc) + d).store(d1 + cc);
                at::vec::fmadd(d, d, V::loadu(d2 + cc)).store(d2 + cc);
              }
            }
            for (; c < C; ++c) {
              const acc_t d = io::ld(xr + c) - m[c];
              d1[c] += d;
              d2[c] += d * d;
            }
          }
        }
        for (int64_t cc = 0; cc < C; ++cc) Ps[cc] += static_cast<double>(s[cc]);
        // Chan merge of this block into the slot, with the count-only factors hoisted.
        const double nb = static_cast<double>(re - rb);
        const double nn = nslot + nb;
        const double fa = nb / nn, fb = nslot * nb / nn, inv_nb = 1.0 / nb;
        for (int64_t c = 0; c < C; ++c) {
          const double sd1 = d1[c];
          const double mb = static_cast<double>(m[c]) + sd1 * inv_nb;
          const double m2b = std::max(0.0, static_cast<double>(d2[c]) - sd1 * sd1 * inv_nb);
          const double delta = mb - Pm[c];
          Pm[c] += delta * fa;
          P2[c] += m2b + delta * delta * fb;
        }
        nslot = nn;
      }
      for (int64_t c = 0; c < C; ++c) Pn[c] = nslot;
    });
    acc_t* mean_out = static_cast<acc_t*>(a.red);
    acc_t* var_out = static_cast<acc_t*>(a.red2);
    for (int64_t c = 0; c < C; ++c) {
      double n = 0, m = 0, m2 = 0, sum = 0;
      for (int64_t k = 0; k < nslots; ++k) {
        const double* Pn = part.data() + k * 4 * C;
        chan_merge(n, m, m2, Pn[c], Pn[C + c], Pn[2 * C + c]);
        sum += Pn[3 * C + c];
      }
      if (!std::isfinite(m)) m = sum / n;  // inf/NaN input: the plain mean, as torch gives
      if (n > 0) {
        mean_out[c] = static_cast<acc_t>(m);
        var_out[c] = static_cast<acc_t>(m2 / n);
      } else {
        mean_out[c] = var_out[c] = std::numeric_limits<acc_t>::quiet_NaN();
      }
    }
  }

  // ---------------------------------------------------------------- forward
  template <bool RES, bool RELU>
  static inline void fwd_vec(const scalar_t* x, const scalar_t* r, scalar_t* o, const V* s, const V* b,
                             const V* rs, const V* rb) {
    V xv[NV], rv[NV], z[NV];
    io::load(x, xv);
    if constexpr (RES) io::load(r, rv);
    for (int j = 0; j < NV; ++j) {
      z[j] = nc(xv[j] * s[j]) + b[j];
      if constexpr (RES) z[j] = z[j] + (nc(rv[j] * rs[j]) + rb[j]);
      if constexpr (RELU) z[j] = vrelu(z[j]);
    }
    io::store(o, z);
  }
  template <bool RES, bool RELU>
  static inline void fwd_one(const scalar_t* x, const scalar_t* r, scalar_t* o, acc_t s, acc_t b, acc_t rs,
                             acc_t rb) {
    acc_t z = nc(io::ld(x) * s) + b;
    if constexpr (RES) z = z + (nc(io::ld(r) * rs) + rb);
    if constexpr (RELU) z = srelu(z);
    io::st(o, z);
  }

  template <bool RES, bool RELU>
  static void fwd(const BnArgs& args) {
    const int64_t nslots = num_slots(args.N * args.C * args.HW);
    run_slots(nslots, [&args, nslots](int64_t k) {
      const BnArgs a = args;  // by value: see "Locals" at the top
      const scalar_t* x = static_cast<const scalar_t*>(a.x);
      const scalar_t* r = static_cast<const scalar_t*>(a.r);
      scalar_t* o = static_cast<scalar_t*>(a.y);
      const acc_t *ps = P(a, 0), *pb = P(a, 1), *prs = P(a, 2), *prb = P(a, 3);
      const int64_t C = a.C, HW = a.HW, total = a.N * C * HW;
      // x may be a channel-prefix view: batch stride a.xs (NCHW) or row stride a.xs (CL)
      const int64_t xdn = a.xs ? a.xs - C * HW : 0, xdr = a.xs ? a.xs - C : 0;
      if (!a.cl) {
        int64_t e0, e1;
        slot_range(total, nslots, k, B, e0, e1);
        for_segments(e0, e1, HW, [&](int64_t row, int64_t e, int64_t len) {
          const scalar_t* xq = x + (row / C) * xdn + e;  // x may be a channel-prefix view
          const scalar_t* rq = RES ? r + e : nullptr;
          scalar_t* oq = o + e;
          const int64_t c = row % C;
          const acc_t s = ps[c], b = pb[c], rs = RES ? prs[c] : acc_t(0), rb = RES ? prb[c] : acc_t(0);
          V sv[NV], bv[NV], rsv[NV], rbv[NV];
          for (int j = 0; j < NV; ++j) {
            sv[j] = V(s); bv[j] = V(b); rsv[j] = V(rs); rbv[j] = V(rb);
          }
          int64_t i = 0;
          for (; i + B <= len; i += B)
            fwd_vec<RES, RELU>(xq + i, RES ? rq + i : nullptr, oq + i, sv, bv, rsv, rbv);
          for (; i < len; ++i)
            fwd_one<RES, RELU>(xq + i, RES ? rq + i : nullptr, oq + i, s, b, rs, rb);
        });
        return;
      }
      const int64_t rows = a.N * HW, Cv = C / B * B;
      int64_t r0, r1;
      slot_range(rows, nslots, k, 1, r0, r1);
      for (int64_t row = r0; row < r1; ++row) {
        const scalar_t* xr = x + row * (C + xdr);
        const scalar_t* rr = RES ? r + row * C : nullptr;
        scalar_t* orow = o + row * C;
        int64_t c = 0;
        for (; c < Cv; c += B) {
          V sv[NV], bv[NV], rsv[NV], rbv[NV];
          for (int j = 0; j < NV; ++j) {
            sv[j] = V::loadu(ps + c + j * L);
            bv[j] = V::loadu(pb + c + j * L);
            if constexpr (RES) {
              rsv[j] = V::loadu(prs + c + j * L);
              rbv[j] = V::loadu(prb + c + j * L);
            }
          }
          fwd_vec<RES, RELU>(xr + c, RES ? rr + c : nullptr, orow + c, sv, bv, rsv, rbv);
        }
        for (; c < C; ++c)
          fwd_one<RES, RELU>(xr + c, RES ? rr + c : nullptr, orow + c, ps[c], pb[c], RES ? prs[c] : acc_t(0),
                             RES ? prb[c] : acc_t(0));
      }
    });
  }

  // ---------------------------------------------------------------- backward
  // Per-channel values used by the backward kernels, as vectors (NV each) or scalars.
  // idx: 0 s, 1 b, 2 rs, 3 rb, 4..7 p[4..7], 8..11 p[8..11]
  struct ParV { V v[12][NV]; };
  struct ParS { acc_t v[12]; };

  template <int MASK, bool RES>
  static inline void dz_vec(const scalar_t* g, const scalar_t* x, const scalar_t* r, const scalar_t* oin,
                            const ParV& p, V* xv, V* rv, V* dz) {
    io::load(g, dz);
    io::load(x, xv);
    if constexpr (RES) io::load(r, rv);
    if constexpr (MASK == 1) {
      V ov[NV];
      io::load(oin, ov);
      for (int j = 0; j < NV; ++j) dz[j] = vmask(dz[j], ov[j]);
    } else if constexpr (MASK == 2) {
      for (int j = 0; j < NV; ++j) {
        V z = nc(xv[j] * p.v[0][j]) + p.v[1][j];
        if constexpr (RES) z = z + (nc(rv[j] * p.v[2][j]) + p.v[3][j]);
        dz[j] = vmask(dz[j], z);
      }
    }
  }
  template <int MASK, bool RES>
  static inline acc_t dz_one(const scalar_t* g, const scalar_t* x, const scalar_t* r, const scalar_t* oin,
                             const ParS& p, acc_t& xs, acc_t& rs) {
    acc_t dz = io::ld(g);
    xs = io::ld(x);
    if constexpr (RES) rs = io::ld(r);
    if constexpr (MASK == 1) {
      dz = smask(dz, io::ld(oin));
    } else if constexpr (MASK == 2) {
      acc_t z = nc(xs * p.v[0]) + p.v[1];
      if constexpr (RES) z = z + (nc(rs * p.v[2]) + p.v[3]);
      dz = smask(dz, z);
    }
    return dz;
  }

  static void par_bcast(const BnArgs& a, int64_t c, ParV& pv, ParS& ps) {
    for (int i = 0; i < 12; ++i) {
      const acc_t v = a.p[i] ? P(a, i)[c] : acc_t(0);
      ps.v[i] = v;
      for (int j = 0; j < NV; ++j) pv.v[i][j] = V(v);
    }
  }
  // Vector loads of the per-channel entries a kernel reads (bit i of USED: entry i),
  // chosen at compile time so the channels_last loops load only those per channel block.
  template <unsigned USED>
  static inline void par_load_used(const BnArgs& a, int64_t c, ParV& pv) {
    for (int i = 0; i < 12; ++i) {
      if (!((USED >> i) & 1u) || !a.p[i]) continue;
      for (int j = 0; j < NV; ++j) pv.v[i][j] = V::loadu(P(a, i) + c + j * L);
    }
  }
  static void par_one(const BnArgs& a, int64_t c, ParS& ps) {
    for (int i = 0; i < 12; ++i) ps.v[i] = a.p[i] ? P(a, i)[c] : acc_t(0);
  }

  // sums: acc[0] += dz, acc[1] += dz*x_hat, acc[2] += dz*r_hat; WDZ: also store dz
  template <int MASK, bool RES, bool RST, bool WDZ>
  static inline void red_vec(const scalar_t* g, const scalar_t* x, const scalar_t* r, const scalar_t* oin,
                             scalar_t* dzo, const ParV& p, V* a0, V* a1, V* a2) {
    V xv[NV], rv[NV], dz[NV];
    dz_vec<MASK, RES || RST>(g, x, r, oin, p, xv, rv, dz);
    if constexpr (WDZ) io::store(dzo, dz);
    for (int j = 0; j < NV; ++j) {
      a0[j] = a0[j] + dz[j];
      a1[j] = at::vec::fmadd(dz[j], (xv[j] - p.v[4][j]) * p.v[5][j], a1[j]);
      if constexpr (RST) a2[j] = at::vec::fmadd(dz[j], (rv[j] - p.v[8][j]) * p.v[9][j], a2[j]);
    }
  }
  template <int MASK, bool RES, bool RST, bool WDZ>
  static inline void red_one(const scalar_t* g, const scalar_t* x, const scalar_t* r, const scalar_t* oin,
                             scalar_t* dzo, const ParS& p, double& a0, double& a1, double& a2) {
    acc_t xs, rs = 0;
    const acc_t dz = dz_one<MASK, RES || RST>(g, x, r, oin, p, xs, rs);
    if constexpr (WDZ) io::st(dzo, dz);
    a0 += dz;
    a1 += dz * ((xs - p.v[4]) * p.v[5]);
    if constexpr (RST) a2 += dz * ((rs - p.v[8]) * p.v[9]);
  }

  // channels_last backward sums of channels [c, c + NB*B) over rows [rb, re), in
  // registers: acc[c..], acc[C + c..], acc[2C + c..] (see bwd_reduce).
  template <int NB, int MASK, bool RES, bool RST, bool WDZ>
  static inline void cl_red_chunk(const BnArgs& al, const scalar_t* g, const scalar_t* x, const scalar_t* r,
                                  const scalar_t* oin, scalar_t* dzo, int64_t C, int64_t xrs, int64_t rb,
                                  int64_t re, int64_t c, acc_t* acc) {
    constexpr bool NEED_R = RES || RST;
    constexpr unsigned kUsed = (MASK == 2 ? (0x3u | (NEED_R ? 0xCu : 0u)) : 0u) | 0x30u | (RST ? 0x300u : 0u);
    ParV pv[NB];
    V a0[NB][NV], a1[NB][NV], a2[NB][NV];
    for (int b = 0; b < NB; ++b) {
      par_load_used<kUsed>(al, c + b * B, pv[b]);
      for (int j = 0; j < NV; ++j) a0[b][j] = a1[b][j] = a2[b][j] = V(acc_t(0));
    }
    for (int64_t row = rb; row < re; ++row) {
      const int64_t o = row * C + c, xo = row * xrs + c;
      for (int b = 0; b < NB; ++b) {
        const int64_t d = b * B;
        red_vec<MASK, RES, RST, WDZ>(g + o + d, x + xo + d, NEED_R ? r + o + d : nullptr,
                                     MASK == 1 ? oin + o + d : nullptr, WDZ ? dzo + o + d : nullptr, pv[b], a0[b],
                                     a1[b], a2[b]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      for (int j = 0; j < NV; ++j) {
        const int64_t cc = c + b * B + j * L;
        a0[b][j].store(acc + cc);
        a1[b][j].store(acc + C + cc);
        if constexpr (RST) a2[b][j].store(acc + 2 * C + cc);
      }
    }
  }

  // channels_last backward sums of channels [0, C / B * B) over rows [rb, re), row after
  // row, accumulated in acc (see bwd_reduce).
  template <int MASK, bool RES, bool RST, bool WDZ>
  static inline void cl_red_rows(const BnArgs& al, const scalar_t* g, const scalar_t* x, const scalar_t* r,
                                 const scalar_t* oin, scalar_t* dzo, int64_t C, int64_t xrs, int64_t rb, int64_t re,
                                 acc_t* acc, ParV& pv) {
    constexpr bool NEED_R = RES || RST;
    constexpr unsigned kUsed = (MASK == 2 ? (0x3u | (NEED_R ? 0xCu : 0u)) : 0u) | 0x30u | (RST ? 0x300u : 0u);
    const int64_t Cv = C / B * B;
    std::fill(acc, acc + 3 * C, acc_t(0));
    for (int64_t row = rb; row < re; ++row) {
      const int64_t o = row * C;
      const scalar_t *gr = g + o, *xr = x + row * xrs, *rr = NEED_R ? r + o : nullptr;
      const scalar_t* orr = MASK == 1 ? oin + o : nullptr;
      scalar_t* dr = WDZ ? dzo + o : nullptr;
      for (int64_t c = 0; c < Cv; c += B) {
        par_load_used<kUsed>(al, c, pv);
        V a0[NV], a1[NV], a2[NV];
        for (int j = 0; j < NV; ++j) {
          a0[j] = V::loadu(acc + c + j * L);
          a1[j] = V::loadu(acc + C + c + j * L);
          if constexpr (RST) a2[j] = V::loadu(acc + 2 * C + c + j * L);
        }
        red_vec<MASK, RES, RST, WDZ>(gr + c, xr + c, NEED_R ? rr + c : nullptr, MASK == 1 ? orr + c : nullptr,
                                     WDZ ? dr + c : nullptr, pv, a0, a1, a2);
        for (int j = 0; j < NV; ++j) {
          a0[j].store(acc + c + j * L);
          a1[j].store(acc + C + c + j * L);
          if constexpr (RST) a2[j].store(acc + 2 * C + c + j * L);
        }
      }
    }
  }

  // WDZ: also writes dz (exact: grad_out or 0) to a.y, in x's layout.
  template <int MASK, bool RES, bool RST, bool WDZ>
  static void bwd_reduce(const BnArgs& a) {
    constexpr bool NEED_R = RES || RST;
    const int64_t C = a.C, total = a.N * C * a.HW;
    const int64_t nslots = num_slots(total);
    std::vector<double> part(static_cast<size_t>(nslots * 3 * C), 0.0);
    double* const part0 = part.data();
    run_slots(nslots, [&a, part0, nslots](int64_t k) {
      const BnArgs al = a;  // by value: see "Locals" at the top
      scalar_t* dzo = static_cast<scalar_t*>(al.y);
      const scalar_t* g = static_cast<const scalar_t*>(al.g);
      const scalar_t* x = static_cast<const scalar_t*>(al.x);
      const scalar_t* r = static_cast<const scalar_t*>(al.r);
      const scalar_t* oin = static_cast<const scalar_t*>(al.o_in);
      const int64_t C = al.C, HW = al.HW, total = al.N * C * HW;
      // x may be a channel-prefix view: batch stride xs (NCHW) or row stride xs (CL)
      const int64_t xdn = al.xs ? al.xs - C * HW : 0, xdr = al.xs ? al.xs - C : 0;
      double* Q = part0 + k * 3 * C;
      ParV pv;
      ParS ps;
      if (!al.cl) {
        int64_t e0, e1;
        slot_range(total, nslots, k, B, e0, e1);
        int64_t cur = -1;
        for_segments(e0, e1, HW, [&](int64_t row, int64_t e, int64_t len) {
          const int64_t c = row % C;
          if (c != cur) {
            par_bcast(al, c, pv, ps);
            cur = c;
          }
          // x may be a channel-prefix view
          const scalar_t *gq = g + e, *xq = x + (row / C) * xdn + e, *rq = NEED_R ? r + e : nullptr;
          const scalar_t* oq = MASK == 1 ? oin + e : nullptr;
          scalar_t* dq = WDZ ? dzo + e : nullptr;
          for (int64_t q0 = 0; q0 < len; q0 += kPiece) {
            const int64_t n = std::min(kPiece, len - q0);
            V a0[NV], a1[NV], a2[NV];
            for (int j = 0; j < NV; ++j) a0[j] = a1[j] = a2[j] = V(acc_t(0));
            int64_t i = q0;
            for (; i + B <= q0 + n; i += B)
              red_vec<MASK, RES, RST, WDZ>(gq + i, xq + i, NEED_R ? rq + i : nullptr, MASK == 1 ? oq + i : nullptr,
                                           WDZ ? dq + i : nullptr, pv, a0, a1, a2);
            double s0 = 0, s1 = 0, s2 = 0;
            for (int j = 0; j < NV; ++j) {
              s0 += hsum(a0[j]);
              s1 += hsum(a1[j]);
              if constexpr (RST) s2 += hsum(a2[j]);
            }
            for (; i < q0 + n; ++i)
              red_one<MASK, RES, RST, WDZ>(gq + i, xq + i, NEED_R ? rq + i : nullptr, MASK == 1 ? oq + i : nullptr,
                                           WDZ ? dq + i : nullptr, ps, s0, s1, s2);
            Q[c] += s0;
            Q[C + c] += s1;
            Q[2 * C + c] += s2;
          }
        });
        return;
      }
      const int64_t rows = al.N * HW, Cv = C / B * B;
      const int64_t flush = 256;  // rows accumulated in the compute dtype before going to double
      const int64_t xrs = C + xdr;  // x's row stride
      int64_t r0, r1;
      slot_range(rows, nslots, k, 1, r0, r1);
      std::vector<acc_t> acc_buf(static_cast<size_t>(3 * C));
      acc_t* const acc = acc_buf.data();
      for (int64_t rb = r0; rb < r1; rb += flush) {
        const int64_t re = std::min(r1, rb + flush);
        if (C > kChunkMaxC) {  // many channels: row after row (sequential reads), the sums in memory
          cl_red_rows<MASK, RES, RST, WDZ>(al, g, x, r, oin, dzo, C, xrs, rb, re, acc, pv);
        } else {  // few: chunks of them whose sums (and per-channel values) stay in registers
          int64_t c = 0;
          for (; c + kChunkB * B <= Cv; c += kChunkB * B)
            cl_red_chunk<kChunkB, MASK, RES, RST, WDZ>(al, g, x, r, oin, dzo, C, xrs, rb, re, c, acc);
          for (; c < Cv; c += B) cl_red_chunk<1, MASK, RES, RST, WDZ>(al, g, x, r, oin, dzo, C, xrs, rb, re, c, acc);
        }
        for (int64_t c = Cv; c < C; ++c) {
          par_one(al, c, ps);
          double t0 = 0, t1 = 0, t2 = 0;
          for (int64_t row = rb; row < re; ++row) {
            const int64_t o = row * C + c;
            red_one<MASK, RES, RST, WDZ>(g + o, x + row * xrs + c, NEED_R ? r + o : nullptr,
                                         MASK == 1 ? oin + o : nullptr, WDZ ? dzo + o : nullptr, ps, t0, t1, t2);
          }
          Q[c] += t0;  // (the tail channels sum in double)
          Q[C + c] += t1;
          Q[2 * C + c] += t2;
        }
        for (int j = 0; j < (RST ? 3 : 2); ++j)
          for (int64_t cc = 0; cc < Cv; ++cc) Q[j * C + cc] += static_cast<double>(acc[j * C + cc]);
      }
    });
    acc_t* out = static_cast<acc_t*>(a.red);
    for (int64_t c = 0; c < C; ++c) {
      double s0 = 0, s1 = 0, s2 = 0;
      for (int64_t k = 0; k < nslots; ++k) {
        const double* Q = part.data() + k * 3 * C;
        s0 += Q[c];
        s1 += Q[C + c];
        s2 += Q[2 * C + c];
      }
      out[c] = static_cast<acc_t>(s0);
      out[C + c] = static_cast<acc_t>(s1);
      if constexpr (RST) out[2 * C + c] = static_cast<acc_t>(s2);
    }
  }

  // dx = (dz - mdz - (x - mean)*p) * k ; dres = dz, or the same with res_coef.
  // ACC: dx is added to what *dx holds (rounded once).
  template <int MASK, int DRES, bool ACC = false>
  static inline void app_vec(const scalar_t* g, const scalar_t* x, const scalar_t* r, const scalar_t* oin,
                             scalar_t* dx, scalar_t* dr, const ParV& p) {
    constexpr bool RLOAD = (MASK == 2 && DRES > 0) || DRES == 2;
    V xv[NV], rv[NV], dz[NV], out[NV], prev[NV];
    if constexpr (ACC) io::load(dx, prev);
    dz_vec<MASK, RLOAD>(g, x, r, oin, p, xv, rv, dz);
    for (int j = 0; j < NV; ++j) {
      out[j] = (dz[j] - p.v[6][j] - vxterm(xv[j], p.v[4][j], p.v[7][j])) * p.v[5][j];
      if constexpr (ACC) out[j] = prev[j] + out[j];
    }
    io::store(dx, out);
    if constexpr (DRES == 1) {
      io::store(dr, dz);
    } else if constexpr (DRES == 2) {
      for (int j = 0; j < NV; ++j)
        out[j] = (dz[j] - p.v[10][j] - vxterm(rv[j], p.v[8][j], p.v[11][j])) * p.v[9][j];
      io::store(dr, out);
    }
  }
  template <int MASK, int DRES, bool ACC = false>
  static inline void app_one(const scalar_t* g, const scalar_t* x, const scalar_t* r, const scalar_t* oin,
                             scalar_t* dx, scalar_t* dr, const ParS& p) {
    constexpr bool RLOAD = (MASK == 2 && DRES > 0) || DRES == 2;
    acc_t xs, rs = 0;
    const acc_t prev = ACC ? io::ld(dx) : acc_t(0);
    const acc_t dz = dz_one<MASK, RLOAD>(g, x, r, oin, p, xs, rs);
    const acc_t d = (dz - p.v[6] - sxterm(xs, p.v[4], p.v[7])) * p.v[5];
    io::st(dx, ACC ? prev + d : d);
    if constexpr (DRES == 1) {
      io::st(dr, dz);
    } else if constexpr (DRES == 2) {
      io::st(dr, (dz - p.v[10] - sxterm(rs, p.v[8], p.v[11])) * p.v[9]);
    }
  }

  // ACC (a.acc, no residual): dx has x's strides and dx is added to what it holds.
  template <int MASK, int DRES, bool ACC = false>
  static void bwd_apply(const BnArgs& a) {
    const int64_t nslots = num_slots(a.N * a.C * a.HW);
    run_slots(nslots, [&a, nslots](int64_t k) {
      constexpr bool RES = DRES > 0;
      static_assert(!(ACC && RES), "acc is without residual");
      const BnArgs al = a;  // by value: see "Locals" at the top
      const scalar_t* g = static_cast<const scalar_t*>(al.g);
      const scalar_t* x = static_cast<const scalar_t*>(al.x);
      const scalar_t* r = static_cast<const scalar_t*>(al.r);
      const scalar_t* oin = static_cast<const scalar_t*>(al.o_in);
      scalar_t* dx = static_cast<scalar_t*>(al.y);
      scalar_t* dr = static_cast<scalar_t*>(al.dres);
      const int64_t C = al.C, HW = al.HW, total = al.N * C * HW;
      // x may be a channel-prefix view: batch stride xs (NCHW) or row stride xs (CL)
      const int64_t xdn = al.xs ? al.xs - C * HW : 0, xdr = al.xs ? al.xs - C : 0;
      ParV pv;
      ParS ps;
      if (!al.cl) {
        int64_t e0, e1;
        slot_range(total, nslots, k, B, e0, e1);
        int64_t cur = -1;
        for_segments(e0, e1, HW, [&](int64_t row, int64_t e, int64_t len) {
          const int64_t c = row % C;
          if (c != cur) {
            par_bcast(al, c, pv, ps);
            cur = c;
          }
          const int64_t xo = (row / C) * xdn + e;  // x may be a channel-prefix view, and so may an accumulated dx
          const scalar_t *gq = g + e, *xq = x + xo, *rq = RES ? r + e : nullptr;
          const scalar_t* oq = MASK == 1 ? oin + e : nullptr;
          scalar_t* dxq = dx + (ACC ? xo : e);
          scalar_t* drq = RES ? dr + e : nullptr;
          int64_t i = 0;
          for (; i + B <= len; i += B)
            app_vec<MASK, DRES, ACC>(gq + i, xq + i, RES ? rq + i : nullptr, MASK == 1 ? oq + i : nullptr, dxq + i,
                                     RES ? drq + i : nullptr, pv);
          for (; i < len; ++i)
            app_one<MASK, DRES, ACC>(gq + i, xq + i, RES ? rq + i : nullptr, MASK == 1 ? oq + i : nullptr, dxq + i,
                                     RES ? drq + i : nullptr, ps);
        });
        return;
      }
      const int64_t rows = al.N * HW, Cv = C / B * B;
      int64_t r0, r1;
      slot_range(rows, nslots, k, 1, r0, r1);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t o = row * C, xo = o + row * xdr;
        const scalar_t *gr = g + o, *xr = x + xo, *rr = RES ? r + o : nullptr;
        const scalar_t* orr = MASK == 1 ? oin + o : nullptr;
        scalar_t* dxr = dx + (ACC ? xo : o);
        scalar_t* drr = RES ? dr + o : nullptr;
        int64_t c = 0;
        for (; c < Cv; c += B) {
          constexpr bool kRLoad = (MASK == 2 && DRES > 0) || DRES == 2;
          constexpr unsigned kUsed = (MASK == 2 ? (0x3u | (kRLoad ? 0xCu : 0u)) : 0u) | 0xF0u |
                                     (DRES == 2 ? 0xF00u : 0u);
          par_load_used<kUsed>(al, c, pv);
          app_vec<MASK, DRES, ACC>(gr + c, xr + c, RES ? rr + c : nullptr, MASK == 1 ? orr + c : nullptr, dxr + c,
                                   RES ? drr + c : nullptr, pv);
        }
        for (; c < C; ++c) {
          par_one(al, c, ps);
          app_one<MASK, DRES, ACC>(gr + c, xr + c, RES ? rr + c : nullptr, MASK == 1 ? orr + c : nullptr, dxr + c,
                                   RES ? drr + c : nullptr, ps);
        }
      }
    });
  }
};

// ------------------------------------------------------------------ dispatch
#define RESFUSED_DISPATCH_DTYPE(DT, ...)                                      \
  switch (DT) {                                                               \
    case c10::ScalarType::Float: { using scalar_t = float; __VA_ARGS__(); break; }      \
    case c10::ScalarType::Double: { using scalar_t = double; __VA_ARGS__(); break; }    \
    case c10::ScalarType::BFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; } \
    case c10::ScalarType::Half: { using scalar_t = c10::Half; __VA_ARGS__(); break; }   \
    default: break;                                                           \
  }

void k_stats(const BnArgs& a) {
  RESFUSED_DISPATCH_DTYPE(a.dtype, [&] { K<scalar_t>::stats(a); })
}

void k_fwd(const BnArgs& a) {
  RESFUSED_DISPATCH_DTYPE(a.dtype, [&] {
    if (a.has_res) {
      if (a.relu) K<scalar_t>::template fwd<true, true>(a); else K<scalar_t>::template fwd<true, false>(a);
    } else {
      if (a.relu) K<scalar_t>::template fwd<false, true>(a); else K<scalar_t>::template fwd<false, false>(a);
    }
  })
}

template <typename Kt, bool WDZ>
void k_bwd_reduce_w(const BnArgs& a) {
  const bool rst = a.rstats != 0;
  if (a.mask == 0) {
    if (rst) Kt::template bwd_reduce<0, false, true, WDZ>(a); else Kt::template bwd_reduce<0, false, false, WDZ>(a);
  } else if (a.mask == 1) {
    if (rst) Kt::template bwd_reduce<1, false, true, WDZ>(a); else Kt::template bwd_reduce<1, false, false, WDZ>(a);
  } else {
    if (a.has_res) {
      if (rst) Kt::template bwd_reduce<2, true, true, WDZ>(a); else Kt::template bwd_reduce<2, true, false, WDZ>(a);
    } else {
      Kt::template bwd_reduce<2, false, false, WDZ>(a);
    }
  }
}

void k_bwd_reduce(const BnArgs& a) {
  RESFUSED_DISPATCH_DTYPE(a.dtype, [&] {
    if (a.y) k_bwd_reduce_w<K<scalar_t>, true>(a); else k_bwd_reduce_w<K<scalar_t>, false>(a);
  })
}

template <typename Kt, int MASK>
void k_bwd_apply_m(const BnArgs& a) {
  if (a.dres_mode == 0) {
    if (a.acc) Kt::template bwd_apply<MASK, 0, true>(a); else Kt::template bwd_apply<MASK, 0>(a);
  }
  else if (a.dres_mode == 1) Kt::template bwd_apply<MASK, 1>(a);
  else Kt::template bwd_apply<MASK, 2>(a);
}

void k_bwd_apply(const BnArgs& a) {
  RESFUSED_DISPATCH_DTYPE(a.dtype, [&] {
    using Kt = K<scalar_t>;
    if (a.mask == 0) k_bwd_apply_m<Kt, 0>(a);
    else if (a.mask == 1) k_bwd_apply_m<Kt, 1>(a);
    else k_bwd_apply_m<Kt, 2>(a);
  })
}

// ---------------------------------------------------------------- BN-ReLU + max pool
// One (image, channel) plane per step. Each input row a window reaches is written as
// a = relu(x*scale + shift) by the forward apply's own code (K::fwd_vec / fwd_one: the
// values bn_act_fwd writes, rounded to x's dtype), then split into sW column phases in
// the compute dtype, padded with -inf, so that tap (kh, kw) of the outputs ow..ow+L-1 is
// one contiguous vector. Each output keeps the first maximum of its window in row-major
// order, a NaN winning (the last one), as ATen's CPU max pooling: `v > best || isnan(v)`.
template <typename scalar_t>
void relu_maxpool(const PoolArgs& args) {
  using Kt = K<scalar_t>;
  using acc_t = typename Kt::acc_t;
  using V = typename Kt::V;
  constexpr int64_t L = Kt::L, B = Kt::B;
  constexpr int NV = Kt::NV;
  const int64_t planes = args.N * args.C;
  const int64_t nslots = std::min<int64_t>(planes, num_slots(planes * args.H * args.W));
  run_slots(nslots, [&args, planes, nslots](int64_t k) {
    const PoolArgs a = args;  // by value: see "Locals" at the top
    const int64_t C = a.C, H = a.H, W = a.W, OH = a.OH, OW = a.OW, kH = a.kH, kW = a.kW, sH = a.sH, sW = a.sW,
                  pH = a.pH, pW = a.pW;
    const scalar_t* xp = static_cast<const scalar_t*>(a.x);
    const acc_t* scale = static_cast<const acc_t*>(a.scale);
    const acc_t* shift = scale + C;
    scalar_t* op = static_cast<scalar_t*>(a.out);
    int64_t* ip = a.idx;
    const int64_t OWv = (OW + L - 1) / L * L;       // outputs per row, vector-padded
    const int64_t span = OWv + (kW - 1) / sW + 1;   // phase length: every tap of every padded output
    std::vector<scalar_t> row(static_cast<size_t>(W));
    std::vector<acc_t> phases(static_cast<size_t>(kH * sW * span));
    std::vector<acc_t> best_buf(static_cast<size_t>(OWv)), sel_buf(static_cast<size_t>(OWv));
    acc_t* ph = phases.data();
    acc_t* bb = best_buf.data();
    acc_t* sb = sel_buf.data();
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    const int64_t q0 = planes * k / nslots, q1 = planes * (k + 1) / nslots;
    for (int64_t p = q0; p < q1; ++p) {
      const acc_t s = scale[p % C], b = shift[p % C];
      V sv[NV], bv[NV];
      for (int j = 0; j < NV; ++j) {
        sv[j] = V(s);
        bv[j] = V(b);
      }
      const scalar_t* xq = xp + p * H * W;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const int64_t ih0 = std::max<int64_t>(oh * sH - pH, 0), ih1 = std::min(oh * sH - pH + kH, H);
        for (int64_t ih = ih0; ih < ih1; ++ih) {
          const scalar_t* src = xq + ih * W;
          scalar_t* dst = row.data();
          int64_t i = 0;
          for (; i + B <= W; i += B) Kt::template fwd_vec<false, true>(src + i, nullptr, dst + i, sv, bv, sv, bv);
          for (; i < W; ++i) Kt::template fwd_one<false, true>(src + i, nullptr, dst + i, s, b, s, b);
          // phase q, element j: padded column j*sW + q, input column j*sW + q - pW
          acc_t* rp = ph + (ih - ih0) * sW * span;
          for (int64_t q = 0; q < sW; ++q) {
            acc_t* dq = rp + q * span;
            for (int64_t j = 0; j < span; ++j) {
              const int64_t iw = j * sW + q - pW;
              dq[j] = (iw >= 0 && iw < W) ? static_cast<acc_t>(dst[iw]) : ninf;
            }
          }
        }
        const int64_t rows_in = ih1 - ih0;
        for (int64_t ow = 0; ow < OWv; ow += L) {
          V best(ninf), sel(0);
          for (int64_t r = 0; r < rows_in; ++r) {
            const acc_t* rp = ph + r * sW * span;
            for (int64_t kw = 0; kw < kW; ++kw) {
              const V v = V::loadu(rp + (kw % sW) * span + kw / sW + ow);
              const V take = (v > best) | v.isnan();
              best = V::blendv(best, v, take);
              sel = V::blendv(sel, V(static_cast<acc_t>(r * kW + kw)), take);
            }
          }
          best.store(bb + ow);
          sel.store(sb + ow);
        }
        scalar_t* orow = op + (p * OH + oh) * OW;
        int64_t* irow = ip + (p * OH + oh) * OW;
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t t = static_cast<int64_t>(sb[ow]);
          orow[ow] = static_cast<scalar_t>(bb[ow]);
          irow[ow] = (ih0 + t / kW) * W + ow * sW - pW + t % kW;
        }
      }
    }
  });
}

void k_relu_maxpool(const PoolArgs& a) {
  RESFUSED_DISPATCH_DTYPE(a.dtype, [&] { relu_maxpool<scalar_t>(a); })
}

#undef RESFUSED_DISPATCH_DTYPE

}  // namespace
}  // namespace RESFUSED_KNS
}  // namespace cpu
}  // namespace resfused
