// Host emulation of the CUDA features fastformer's kernels use (csrc/attention.cu, layer_norm.cu, ffn.cu), so that
// they run on the CPU in CI: compiled with g++ -include this-file, the kernels become plain C++ and every thread of a
// block a cooperative context (ucontext).
//
// - Blocks run one after another; the threads of a block run until each reaches a synchronisation point or
//   returns. A __syncthreads completes when every thread of the block waits there (a thread that returned while
//   others wait at one throws); a warp collective (shuffle, ldmatrix, mma, all with the full mask) completes when
//   all 32 lanes of the warp wait at one, a warpgroup collective (wgmma) when all 128 threads of the warpgroup do
//   (a member that returned throws). Nothing left to release while threads still wait is a deadlock and throws.
// - wgmma reads its shared-memory operands through descriptors in the no-swizzle canonical layout (csrc/mma.cuh
//   states it) when issued, and its result reaches the accumulator registers at the wait_group that retires its
//   group, so an accumulator read before its wait sees stale values. Swizzled descriptors are refused.
// - mma.m16n8k16, ldmatrix (.x4, .trans) and the pack to 16 bits follow the fragment layouts of the PTX ISA
//   (csrc/mma.cuh states them). Products are exact and sums are fp32, as on the tensor cores up to summation order.
// - cp.async copies are queued per thread and done only when a cp.async.wait_group lets them complete, so a read of
//   a tile before its wait sees stale data. Dynamic shared memory starts each block filled with 0xff bytes (NaN as
//   half, bfloat16 and float), so a read of shared memory nobody wrote poisons the result.
// - TMA copies (cp.async.bulk.tensor) happen at issue and then complete their bytes on the mbarrier; tensor maps are
//   the emulator's own encoding of what the launcher asked for (the driver's cuTensorMapEncodeTiled is not called,
//   its limits are checked: box sizes, 16-byte strides and alignment). mbarrier phases, arrival counts and
//   transaction bytes are tracked; a wait spins (yielding) until its phase completes, and a round of spinning in
//   which no mbarrier changed is a deadlock and throws. Shared memory starts 16 bytes past a 128-byte boundary, so
//   code that needs 128-byte alignment (TMA destinations) must align it itself.
// - Addresses are checked: ldmatrix rows and cp.async destinations in the block's shared memory, 16-byte aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define FF_HOST_EMULATION 1
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#undef __grid_constant__
#define __grid_constant__

namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 256 * 1024;
constexpr size_t kSmem = 232448;  // the most dynamic shared memory a block may have (sm_90)

// __syncthreads, warp and warpgroup collectives, and a spin (an mbarrier wait: runs again next round)
enum Sync : int { kBarrier = 1, kWarp = 2, kGroup = 3, kSpin = 4 };

struct Pending {  // a wgmma result not yet in its accumulator registers
  float* dst;
  std::vector<float> values;
};

struct Bar {  // an mbarrier
  uint32_t count, pending;
  int64_t tx;
  uint64_t phase;
};

struct Copy {
  void* dst;
  const void* src;
  bool full;
};

struct State {
  uint3 tid[kMaxThreads];
  uint3 bid;
  dim3 bdim, gdim;
  int cur = 0;
  unsigned long gen = 0;
  uint64_t slots[2][kMaxThreads][8];  // what each thread hands to a collective, by generation parity
  ucontext_t sched, ctx[kMaxThreads];
  bool done[kMaxThreads], waiting[kMaxThreads];
  int kind[kMaxThreads];
  std::vector<std::vector<std::vector<Copy>>> groups;  // per thread: committed groups, oldest first
  std::vector<std::vector<Copy>> open;                 // per thread: copies not yet committed
  std::vector<char> stacks;
  alignas(128) unsigned char raw[kSmem + 144];
  unsigned char* smem = raw + 16;  // 16-byte but not 128-byte aligned, as dynamic shared memory may be
  size_t smem_size = 0;
  std::function<void()>* body = nullptr;
  unsigned long syncs = 0;
  std::map<uint64_t*, Bar> bars;  // this block's mbarriers
  unsigned long progress = 0;     // mbarrier state changes: a round of spinning without any is a deadlock
  std::string error;              // what a thread threw
  std::vector<std::vector<Pending>> wgmma_open;                 // per thread: issued, not committed
  std::vector<std::vector<std::vector<Pending>>> wgmma_groups;  // per thread: committed groups, oldest first
};

inline State& st() {
  static State* s = new State();
  return *s;
}

inline void rendezvous(int kind) {
  State& s = st();
  s.kind[s.cur] = kind;
  s.waiting[s.cur] = true;
  swapcontext(&s.ctx[s.cur], &s.sched);
}

// Hand `n` words to a warp (or warpgroup) collective; returns the slots of this generation for reading every
// participant's words.
inline uint64_t (*exchange(const uint64_t* words, int n, int kind = kWarp))[8] {
  State& s = st();
  std::memcpy(s.slots[s.gen & 1][s.cur], words, n * sizeof(uint64_t));
  rendezvous(kind);
  return s.slots[(s.gen - 1) & 1];
}

inline void entry() {
  State& s = st();
  try {  // an exception cannot unwind past the context's entry: carry it to the scheduler, which rethrows it
    (*s.body)();
  } catch (const std::exception& e) {
    s.error = std::string("thread ") + std::to_string(s.cur) + ": " + e.what();
  }
  s.done[s.cur] = true;
  swapcontext(&s.ctx[s.cur], &s.sched);
}

inline void check_smem(const void* p, size_t bytes, const char* what, size_t align = 16) {
  State& s = st();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < s.smem || c + bytes > s.smem + s.smem_size) throw std::runtime_error(std::string(what) + ": outside shared memory");
  if (reinterpret_cast<uintptr_t>(p) % align) {
    throw std::runtime_error(std::string(what) + ": not " + std::to_string(align) + "-byte aligned");
  }
}

template <class F>
void run(unsigned grid, unsigned block, size_t smem, F fn) {
  State& s = st();
  if (block > kMaxThreads || block % 32) throw std::runtime_error("bad block size");
  if (smem > kSmem) throw std::runtime_error("dynamic shared memory over the sm_90 limit: " + std::to_string(smem));
  std::function<void()> f = fn;
  s.body = &f;
  if (s.stacks.empty()) s.stacks.resize(kStack * kMaxThreads);
  s.gdim = dim3(grid, 1, 1);
  s.bdim = dim3(block, 1, 1);
  s.smem_size = smem;
  for (unsigned b = 0; b < grid; ++b) {
    s.bid = make_uint3(b, 0, 0);
    std::memset(s.smem, 0xff, smem);
    s.bars.clear();
    unsigned long spin_mark = ~0ul;
    s.groups.assign(block, {});
    s.open.assign(block, {});
    s.wgmma_groups.assign(block, {});
    s.wgmma_open.assign(block, {});
    for (unsigned t = 0; t < block; ++t) {
      s.tid[t] = make_uint3(t, 0, 0);
      getcontext(&s.ctx[t]);
      s.ctx[t].uc_stack.ss_sp = s.stacks.data() + t * kStack;
      s.ctx[t].uc_stack.ss_size = kStack;
      s.ctx[t].uc_link = nullptr;
      makecontext(&s.ctx[t], entry, 0);
      s.done[t] = s.waiting[t] = false;
    }
    while (true) {
      for (unsigned t = 0; t < block; ++t) {
        if (s.done[t] || s.waiting[t]) continue;
        s.cur = static_cast<int>(t);
        swapcontext(&s.sched, &s.ctx[t]);
        if (!s.error.empty()) {
          const std::string e = s.error;
          s.error.clear();
          throw std::runtime_error(e);
        }
      }
      unsigned n_done = 0, n_bar = 0, n_spin = 0;
      for (unsigned t = 0; t < block; ++t) {
        n_done += s.done[t];
        n_bar += s.waiting[t] && s.kind[t] == kBarrier;
        n_spin += s.waiting[t] && s.kind[t] == kSpin;
      }
      if (n_done == block) break;
      if (n_bar > 0 && n_done > 0) throw std::runtime_error("__syncthreads reached after some threads returned");
      bool released = false;
      if (n_bar == block) {
        for (unsigned t = 0; t < block; ++t) s.waiting[t] = false;
        released = true;
      } else {
        for (const auto [kind, size] : {std::pair<int, unsigned>{kWarp, 32}, {kGroup, 128}}) {
          for (unsigned w = 0; w < block; w += size) {
            unsigned at = 0, gone = 0;
            for (unsigned t = w; t < w + size && t < block; ++t) {
              at += s.waiting[t] && s.kind[t] == kind;
              gone += s.done[t];
            }
            if (at == 0) continue;
            if (gone > 0) throw std::runtime_error("a collective reached after part of its warp(group) returned");
            if (at != size) continue;  // the others are still on their way (or deadlocked: see below)
            for (unsigned t = w; t < w + size; ++t) s.waiting[t] = false;
            released = true;
          }
        }
      }
      if (n_spin > 0) {  // spinners look again next round, as long as something changes
        if (!released && s.progress == spin_mark) throw std::runtime_error("deadlock: mbarrier waits that never complete");
        spin_mark = s.progress;
        for (unsigned t = 0; t < block; ++t) {
          if (s.waiting[t] && s.kind[t] == kSpin) s.waiting[t] = false;
        }
        released = true;
      }
      if (!released) throw std::runtime_error("deadlock: threads wait at a barrier that cannot complete");
      ++s.gen;
      ++s.syncs;
    }
    for (unsigned t = 0; t < block; ++t) {
      if (!s.groups[t].empty() || !s.open[t].empty()) throw std::runtime_error("a thread returned with cp.async pending");
      if (!s.wgmma_groups[t].empty() || !s.wgmma_open[t].empty()) {
        throw std::runtime_error("a thread returned with wgmma results pending");
      }
    }
  }
}

}  // namespace emu

#define threadIdx (emu::st().tid[emu::st().cur])
#define blockIdx (emu::st().bid)
#define blockDim (emu::st().bdim)
#define gridDim (emu::st().gdim)

inline void __syncthreads() { emu::rendezvous(emu::kBarrier); }
inline float __uint_as_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline void __syncwarp() {
  const uint64_t none = 0;
  emu::exchange(&none, 1);
}
inline float __shfl_xor_sync(unsigned, float v, int o) {
  uint64_t w = 0;
  std::memcpy(&w, &v, 4);
  auto slots = emu::exchange(&w, 1);
  const int me = emu::st().cur, src = (me & ~31) | ((me & 31) ^ o);
  float out;
  std::memcpy(&out, &slots[src][0], 4);
  return out;
}

namespace fastformer {

inline unsigned char* dynamic_smem() { return emu::st().smem; }
inline void store_global16(void* p, uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  if (reinterpret_cast<uintptr_t>(p) % 16) throw std::runtime_error("st.global.v4 address not 16-byte aligned");
  const uint32_t w[4] = {w0, w1, w2, w3};
  std::memcpy(p, w, 16);
}
inline int64_t opaque(int64_t x) { return x; }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem, cudaStream_t, Args&&... args) {
  emu::run(grid, block, smem, [&] { kernel(static_cast<Params>(args)...); });
}

template <typename T>
inline uint16_t bits16(float x) {
  T h;
  if constexpr (std::is_same_v<T, __half>) {
    h = __float2half_rn(x);
  } else {
    h = __float2bfloat16_rn(x);
  }
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

template <typename T>
inline float from16(uint16_t b) {
  T h;
  std::memcpy(&h, &b, 2);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(h);
  } else {
    return __bfloat162float(h);
  }
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits16<T>(lo)) | static_cast<uint32_t>(bits16<T>(hi)) << 16;
}

inline uint16_t half_of(uint64_t reg, int k) { return static_cast<uint16_t>(reg >> (16 * k)); }

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint64_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  auto slots = emu::exchange(mine, 6);
  const int lane = emu::st().cur & 31, warp0 = emu::st().cur & ~31, g = lane >> 2, t = lane & 3;
  auto A = [&](int r, int k) {  // element (r, k) of the 16 x 16 A: lane (r % 8) * 4 + (k % 8) / 2
    const int reg = (r >= 8) + 2 * (k >= 8);
    return from16<T>(half_of(slots[warp0 + (r % 8) * 4 + (k % 8) / 2][reg], k % 2));
  };
  auto B = [&](int k, int n) {  // element (k, n) of the 16 x 8 B: lane n * 4 + (k % 8) / 2
    return from16<T>(half_of(slots[warp0 + n * 4 + (k % 8) / 2][4 + (k >= 8)], k % 2));
  };
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    d[e] = acc;
  }
}

inline void ldsm(uint32_t (&r)[4], const void* row, bool trans) {
  emu::check_smem(row, 16, "ldmatrix row");
  const uint64_t mine = reinterpret_cast<uintptr_t>(row);
  auto slots = emu::exchange(&mine, 1);
  const int lane = emu::st().cur & 31, warp0 = emu::st().cur & ~31;
  for (int m = 0; m < 4; ++m) {
    uint16_t h[2];
    for (int u = 0; u < 2; ++u) {
      // plain: row lane / 4 of matrix m, element 2 (lane % 4) + u; trans: row 2 (lane % 4) + u, element lane / 4
      const int rr = trans ? 2 * (lane & 3) + u : lane >> 2, cc = trans ? lane >> 2 : 2 * (lane & 3) + u;
      const auto* p = reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>(slots[warp0 + 8 * m + rr][0]));
      h[u] = p[cc];
    }
    r[m] = static_cast<uint32_t>(h[0]) | static_cast<uint32_t>(h[1]) << 16;
  }
}
inline void ldsm_x4(uint32_t (&r)[4], const void* row) { ldsm(r, row, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* row) { ldsm(r, row, true); }

inline uint64_t wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  emu::check_smem(smem, 16, "wgmma descriptor start");
  const uint64_t a = static_cast<uint64_t>(static_cast<const unsigned char*>(smem) - emu::st().smem);
  return ((a >> 4) & 0x3FFF) | static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
}
// wgmma results land in the accumulator registers only at the wait_group that retires their group: until then the
// registers keep their old values, so a kernel that reads an accumulator early computes with stale numbers. A chain of
// wgmmas on one accumulator (the k steps of one product) accumulates from its own pending result.
inline void wgmma_fence() {}
inline void wgmma_commit() {
  emu::State& s = emu::st();
  s.wgmma_groups[s.cur].push_back(std::move(s.wgmma_open[s.cur]));
  s.wgmma_open[s.cur].clear();
}
template <int N>
inline void wgmma_wait() {
  emu::State& s = emu::st();
  auto& groups = s.wgmma_groups[s.cur];
  if (!s.wgmma_open[s.cur].empty()) throw std::runtime_error("wgmma.wait_group with uncommitted wgmmas");
  while (groups.size() > static_cast<size_t>(N)) {
    for (const emu::Pending& r : groups.front()) std::memcpy(r.dst, r.values.data(), r.values.size() * sizeof(float));
    groups.erase(groups.begin());
  }
}
inline void fence_proxy_async() {}
template <int N>
inline void wgmma_hold(float (&)[N][4]) {}

// Element (mn, k) of a no-swizzle shared-memory operand: K-major (8 consecutive k per 16-byte core-matrix row) or
// MN-major (8 consecutive mn per row); core matrices LBO bytes apart along K, SBO along M/N.
template <typename T>
inline float desc_elem(uint64_t desc, int mn, int k, bool mn_major) {
  if (desc >> 62) throw std::runtime_error("wgmma: swizzled descriptors are not emulated");
  const size_t start = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
  const size_t off = mn_major ? start + (mn % 8) * 2 + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                              : start + (mn % 8) * 16 + (mn / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo;
  if (off + 2 > emu::st().smem_size) throw std::runtime_error("wgmma: operand outside shared memory");
  uint16_t b;
  std::memcpy(&b, emu::st().smem + off, 2);
  return from16<T>(b);
}

// wgmma.m64nNk16, A from registers (a != nullptr; the A layout per warp) or from shared memory (K-major, da), B from
// shared memory (K-major, or MN-major when b_mn_major).
template <typename T, int N>
inline void wgmma_emulated(float (&d)[N / 8][4], const uint32_t* a, uint64_t da, uint64_t db, bool acc,
                           bool b_mn_major) {
  const uint64_t mine[7] = {a ? a[0] : 0, a ? a[1] : 0, a ? a[2] : 0, a ? a[3] : 0, a ? 0 : da, db, acc};
  auto slots = emu::exchange(mine, 7, emu::kGroup);
  const int me = emu::st().cur, group0 = me & ~127, w = (me & 127) >> 5, g = (me & 31) >> 2, t = me & 3;
  for (int o = group0; o < group0 + 128; ++o) {
    if (slots[o][4] != slots[me][4] || slots[o][5] != slots[me][5] || slots[o][6] != slots[me][6]) {
      throw std::runtime_error("wgmma: the warpgroup's threads disagree on descriptors or accumulation");
    }
  }
  auto A = [&](int m, int k) {
    if (a == nullptr) return desc_elem<T>(da, m, k, false);
    const int r = m % 16, lane = (r % 8) * 4 + (k % 8) / 2, reg = (r >= 8) + 2 * (k >= 8);
    return from16<T>(half_of(slots[group0 + (m / 16) * 32 + lane][reg], k % 2));
  };
  // the accumulator this wgmma adds to: the latest pending result for d if a chained wgmma is still in flight
  emu::State& st = emu::st();
  const float* in = &d[0][0];
  for (const auto* list : {&st.wgmma_open[me]}) {
    for (const emu::Pending& r : *list) {
      if (r.dst == &d[0][0]) in = r.values.data();
    }
  }
  if (in == &d[0][0]) {
    for (const auto& group : st.wgmma_groups[me]) {
      for (const emu::Pending& r : group) {
        if (r.dst == &d[0][0]) in = r.values.data();
      }
    }
  }
  emu::Pending result{&d[0][0], std::vector<float>(N / 2)};
  for (int i = 0; i < N / 8; ++i) {
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * w + g + 8 * (e >> 1), col = 8 * i + 2 * t + (e & 1);
      float v = acc ? in[4 * i + e] : 0.f;
      for (int k = 0; k < 16; ++k) v += A(row, k) * desc_elem<T>(db, col, k, b_mn_major);
      result.values[4 * i + e] = v;
    }
  }
  st.wgmma_open[me].push_back(std::move(result));
}
template <typename T>
inline void wgmma_ss_n64(float (&d)[8][4], uint64_t da, uint64_t db, bool acc) {
  wgmma_emulated<T, 64>(d, nullptr, da, db, acc, false);
}
template <typename T>
inline void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db, bool acc) {
  wgmma_emulated<T, 64>(d, a, 0, db, acc, true);
}
template <typename T>
inline void wgmma_rs_n128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db, bool acc) {
  wgmma_emulated<T, 128>(d, a, 0, db, acc, true);
}

// ---- TMA and mbarriers -------------------------------------------------------------------------------------------
// An emulated tensor map: what make_tensor_map_5d was given, in the 128 bytes of a CUtensorMap.
struct EmuMap {
  const unsigned char* base;
  uint64_t dims[5];
  uint64_t strides[4];  // bytes, dims 1..4
  uint32_t box[5];
  uint32_t elem;
};
static_assert(sizeof(EmuMap) <= sizeof(CUtensorMap), "an emulated map fits a CUtensorMap");

inline CUtensorMap make_tensor_map_5d(const void* base, int dtype, const uint64_t (&dims)[5],
                                      const uint64_t (&strides)[4], const uint32_t (&box)[5]) {
  (void)dtype;
  EmuMap e{static_cast<const unsigned char*>(base), {}, {}, {}, 2};
  for (int i = 0; i < 5; ++i) {
    e.dims[i] = dims[i];
    e.box[i] = box[i];
    if (dims[i] == 0 || dims[i] > (uint64_t{1} << 32)) throw std::runtime_error("tensor map: bad dimension");
    if (box[i] == 0 || box[i] > 256) throw std::runtime_error("tensor map: bad box");
  }
  for (int i = 0; i < 4; ++i) {
    e.strides[i] = strides[i];
    if (strides[i] % 16 || strides[i] >= (uint64_t{1} << 40)) throw std::runtime_error("tensor map: bad stride");
  }
  if (reinterpret_cast<uintptr_t>(base) % 16 || box[0] * 2 % 16) throw std::runtime_error("tensor map: alignment");
  CUtensorMap m;
  std::memset(&m, 0, sizeof(m));
  std::memcpy(&m, &e, sizeof(e));
  return m;
}

inline void mbar_init(uint64_t* bar, uint32_t count) {
  emu::check_smem(bar, 8, "mbarrier", 8);
  emu::st().bars[bar] = {count, count, 0, 0};
  ++emu::st().progress;
}
inline void mbar_init_fence() {}
inline emu::Bar& bar_of(uint64_t* bar) {
  auto it = emu::st().bars.find(bar);
  if (it == emu::st().bars.end()) throw std::runtime_error("mbarrier used before mbarrier.init");
  return it->second;
}
inline void bar_check(emu::Bar& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.count;
  }
  ++emu::st().progress;
}
inline void mbar_arrive(uint64_t* bar) {
  emu::Bar& b = bar_of(bar);
  if (b.pending == 0) throw std::runtime_error("mbarrier: more arrivals than expected");
  --b.pending;
  bar_check(b);
}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  bar_of(bar).tx += bytes;
  mbar_arrive(bar);
}
inline void mbar_wait(uint64_t* bar, uint32_t parity) {
  while ((bar_of(bar).phase & 1) == parity) emu::rendezvous(emu::kSpin);
}
// The box at c of a map, copied in box order (dimension 0 fastest) into dst; elements outside the tensor are 0.
inline void tma_load_5d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3, int c4, uint64_t* bar) {
  EmuMap e;
  std::memcpy(&e, map, sizeof(e));
  if (reinterpret_cast<uintptr_t>(dst) % 128) throw std::runtime_error("TMA destination not 128-byte aligned");
  const int c[5] = {c0, c1, c2, c3, c4};
  const uint64_t n = uint64_t{e.box[0]} * e.box[1] * e.box[2] * e.box[3] * e.box[4];
  emu::check_smem(dst, n * e.elem, "TMA destination");
  auto* out = static_cast<unsigned char*>(dst);
  for (uint64_t idx = 0; idx < n; ++idx) {
    uint64_t rest = idx, off = 0;
    bool inside = true;
    for (int d = 0; d < 5; ++d) {
      const int64_t x = c[d] + static_cast<int64_t>(rest % e.box[d]);
      rest /= e.box[d];
      inside = inside && x >= 0 && static_cast<uint64_t>(x) < e.dims[d];
      off += d == 0 ? x * e.elem : x * e.strides[d - 1];
    }
    if (inside) {
      std::memcpy(out + idx * e.elem, e.base + off, e.elem);
    } else {
      std::memset(out + idx * e.elem, 0, e.elem);
    }
  }
  emu::Bar& b = bar_of(bar);
  b.tx -= static_cast<int64_t>(n * e.elem);
  bar_check(b);
}

template <int N>
inline void setmaxnreg_dec() {}
template <int N>
inline void setmaxnreg_inc() {}

inline void cp_async16(void* dst, const void* src, bool full) {
  emu::check_smem(dst, 16, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(src) % 16) throw std::runtime_error("cp.async source not 16-byte aligned");
  emu::st().open[emu::st().cur].push_back({dst, src, full});
}
inline void cp_async_commit() {
  emu::State& s = emu::st();
  s.groups[s.cur].push_back(std::move(s.open[s.cur]));
  s.open[s.cur].clear();
}
template <int N>
inline void cp_async_wait() {
  emu::State& s = emu::st();
  auto& g = s.groups[s.cur];
  while (g.size() > static_cast<size_t>(N)) {
    for (const emu::Copy& c : g.front()) {
      if (c.full) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    g.erase(g.begin());
  }
}

}  // namespace fastformer
