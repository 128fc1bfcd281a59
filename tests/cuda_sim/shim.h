// A simulated GPU for running the CUDA kernels of csrc/cuda/bn_act.cu as host C++
// (tests/test_cuda_sim.py). The CUDA qualifiers become nothing, __shared__ becomes static
// (one block runs at a time), and each thread of a block is a cooperative ucontext:
// __syncthreads waits for the whole block, __shfl_down_sync for its warp (full mask only;
// a partial warp aborts), and a barrier some thread never reaches is reported as a
// deadlock. launch() runs the blocks of a grid one by one after checking the block size
// (<= 1024) and grid.y/z (<= 65535); sim_check_align() checks a vector access for
// alignment and for lying inside one of the registered tensors (g_ranges).
#pragma once
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <unistd.h>
#include <mutex>
#include <condition_variable>
#include <thread>
#include <vector>
#include <chrono>
#include <functional>
#include <algorithm>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __shared__ static
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#include <ucontext.h>
// cooperative simulated threads (ucontext): deterministic, cheap barriers
struct SimThread { ucontext_t ctx; std::vector<char> stack; int state = 0; /*0 run,1 wait,2 done*/ int wait_group = -1; unsigned tx, ty, tz; };
inline std::vector<SimThread> g_thr;
inline ucontext_t g_sched;
inline int g_cur;
inline int g_nthreads;
inline thread_local int t_lin;
inline std::function<void()>* g_fn;
inline double g_shfl[64][32];
inline void sim_wait(int group) {  // group -1: block, w>=0: warp w
  g_thr[g_cur].state = 1; g_thr[g_cur].wait_group = group;
  swapcontext(&g_thr[g_cur].ctx, &g_sched);
}
inline void __syncthreads() { sim_wait(-1); }
template <typename T>
T __shfl_down_sync(unsigned mask, T v, int off) {
  if (mask != 0xffffffffu) { fprintf(stderr, "partial mask\n"); _exit(4); }
  int w = t_lin / 32, lane = t_lin % 32;
  int inwarp = std::min(32, g_nthreads - w * 32);
  if (inwarp != 32) { fprintf(stderr, "shfl with full mask in a partial warp (%d lanes)\n", inwarp); _exit(5); }
  g_shfl[w][lane] = static_cast<double>(v);
  sim_wait(w);
  T r = lane + off < 32 ? static_cast<T>(g_shfl[w][lane + off]) : v;
  sim_wait(w);
  return r;
}
inline void sim_entry() {
  g_thr[g_cur].state = 0;
  (*g_fn)();
  g_thr[g_cur].state = 2;
  swapcontext(&g_thr[g_cur].ctx, &g_sched);
}
inline void run_block(int nt, dim3 block) {
  g_thr.resize(std::max<size_t>(g_thr.size(), nt));
  for (int t = 0; t < nt; ++t) {
    auto& th = g_thr[t];
    if (th.stack.empty()) th.stack.resize(1 << 17);
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = th.stack.data(); th.ctx.uc_stack.ss_size = th.stack.size(); th.ctx.uc_link = nullptr;
    makecontext(&th.ctx, sim_entry, 0);
    th.state = 0; th.wait_group = -2;
  }
  for (;;) {
    bool ran = false;
    for (int t = 0; t < nt; ++t) if (g_thr[t].state == 0) {
      g_cur = t; t_lin = t;
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      swapcontext(&g_sched, &g_thr[t].ctx);
      ran = true;
    }
    if (ran) continue;
    // everyone is waiting or done: release complete groups
    bool all_done = true, released = false;
    for (int t = 0; t < nt; ++t) if (g_thr[t].state != 2) all_done = false;
    if (all_done) return;
    // block barrier: all threads waiting at -1
    bool blk = true; for (int t = 0; t < nt; ++t) if (!(g_thr[t].state == 1 && g_thr[t].wait_group == -1)) blk = false;
    if (blk) { for (int t = 0; t < nt; ++t) g_thr[t].state = 0; continue; }
    for (int w = 0; w * 32 < nt; ++w) {
      bool ok = true, any = false;
      for (int t = w * 32; t < std::min(nt, w * 32 + 32); ++t) { if (!(g_thr[t].state == 1 && g_thr[t].wait_group == w)) ok = false; }
      if (ok) { for (int t = w * 32; t < std::min(nt, w * 32 + 32); ++t) g_thr[t].state = 0; released = true; any = true; }
      (void)any;
    }
    if (!released) { fprintf(stderr, "DEADLOCK block (%u,%u): barrier/shuffle not reached by all threads\n", blockIdx.x, blockIdx.y); _exit(3); }
  }
}
template <typename A, typename B> inline auto min(A a, B b) { return a < b ? a : b; }
inline std::vector<std::pair<const char*, const char*>> g_ranges;
inline void sim_check_align(const void* p, size_t a) {
  { const char* q = (const char*)p; bool ok = false;
    for (auto& r : g_ranges) if (q >= r.first && q + a <= r.second) ok = true;
    if (!ok) { fprintf(stderr, "OUT OF BOUNDS access %p (%zu bytes)\n", p, a); _exit(9); } }
  if (reinterpret_cast<uintptr_t>(p) % a) { fprintf(stderr, "MISALIGNED %p %% %zu\n", p, a); _exit(6); }
}
inline long g_launches = 0;
template <typename F>
void launch(dim3 grid, dim3 block, F f) {
  ++g_launches;
  if (block.x * block.y * block.z > 1024 || block.x * block.y * block.z == 0) { fprintf(stderr, "bad block\n"); _exit(7); }
  if (grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0) { fprintf(stderr, "bad grid %u %u %u\n", grid.x, grid.y, grid.z); _exit(8); }
  blockDim = block; gridDim = grid;
  int nt = block.x * block.y * block.z;
  g_nthreads = nt;
  std::function<void()> fn = f; g_fn = &fn;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) { blockIdx = dim3(bx, by, bz); run_block(nt, block); }
}
