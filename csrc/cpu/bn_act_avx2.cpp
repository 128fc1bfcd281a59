// AVX2+FMA copy of the CPU kernel bodies (bn_act_kernels.h), selected at run
// time by bn_act.cpp when the CPU supports it. The extension is built without
// -mavx2, so this file turns the target on with a pragma *after* every header
// that defines code outside ATen's per-ISA namespace has been included with
// the baseline target; ATen's vector headers are then included with
// CPU_CAPABILITY=AVX2, which puts them in at::vec::AVX2 (distinct symbols from
// the baseline copy in bn_act.cpp), and our kernels live in an anonymous
// namespace. Nothing compiled for AVX2 can be picked by the linker for a
// baseline caller.
#include "bn_act_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CPU_CAPABILITY)

#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// sleef.h (declarations only) declares its 256-bit functions under __AVX__,
// which GCC's target pragma does not define; ATen's AVX2 headers name them.
#if !defined(__AVX__)
#define __AVX__ 1
#define RESFUSED_UNDEF_AVX
#endif
#include <sleef.h>
#ifdef RESFUSED_UNDEF_AVX
#undef __AVX__
#undef RESFUSED_UNDEF_AVX
#endif
#include <ATen/cpu/vec/vec.h>
#define RESFUSED_KNS avx2
#define RESFUSED_CAN_CONTRACT
#include "bn_act_kernels.h"
#undef RESFUSED_CAN_CONTRACT
#undef RESFUSED_KNS
#pragma GCC pop_options

namespace resfused {
namespace cpu {
const KernelTable* kernels_avx2() {
  static const KernelTable* t = []() -> const KernelTable* {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
      return nullptr;
    static const KernelTable k{&avx2::k_stats, &avx2::k_fwd, &avx2::k_bwd_reduce, &avx2::k_bwd_apply,
                               &avx2::k_relu_maxpool};
    return &k;
  }();
  return t;
}
}  // namespace cpu
}  // namespace resfused

#else

namespace resfused {
namespace cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace resfused

#endif
