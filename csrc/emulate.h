// CPU emulation of the part of the CUDA execution model that the posattn kernels
// use: for tests on machines without a GPU (tests/test_cuda_emulated.py). Not
// part of the CUDA build.
//
// A launch runs every block of the grid, one after the other, on kThreads OS
// threads (one per CUDA thread): __syncthreads is a barrier of the block's threads,
// __syncwarp and __shfl_xor_sync a barrier (and an exchange) of a warp's 32 threads.
// WMMA fragments are emulated with their documented semantics (each thread of the
// warp holds the whole 16x16 tile; one thread stores it) and the documented
// requirements are checked: 256-bit aligned pointers, ldm a multiple of 16 bytes.
// Shared memory is poisoned (0xff bytes: NaN floats, -1 integers) before each block.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace posattn_emu {

struct Block {
  std::barrier<>* all = nullptr;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> xch;  // one exchange slot per thread (shuffles)
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::mutex mu;
  std::string error;
};

struct Ctx {
  int tid = 0, bx = 0, by = 0, bz = 0;
  Block* block = nullptr;
};
inline thread_local Ctx ctx;

inline void fail(const std::string& msg) {
  std::lock_guard<std::mutex> g(ctx.block->mu);
  if (ctx.block->error.empty()) ctx.block->error = msg;
}

inline void syncthreads() { ctx.block->all->arrive_and_wait(); }
inline void syncwarp() { ctx.block->warps[ctx.tid / 32]->arrive_and_wait(); }

template <typename V>
V shfl_xor(V v, int mask) {
  static_assert(sizeof(V) <= 8, "shfl_xor: value too large");
  Block* b = ctx.block;
  const int lane = ctx.tid % 32, base = ctx.tid - lane;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  b->xch[ctx.tid] = bits;
  syncwarp();
  const uint64_t other = b->xch[base + (lane ^ mask)];
  syncwarp();
  V r;
  std::memcpy(&r, &other, sizeof(V));
  return r;
}

template <typename F>
const char* launch(unsigned gx, unsigned gy, unsigned gz, int threads, size_t smem_bytes, F&& body) {
  static thread_local std::string last_error;
  std::vector<unsigned char> buf(smem_bytes + 256);
  Block blk;
  std::barrier<> all(threads);
  blk.all = &all;
  for (int w = 0; w < threads / 32; ++w) blk.warps.emplace_back(new std::barrier<>(32));
  blk.xch.assign(threads, 0);
  blk.smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(buf.data()) + 127) & ~uintptr_t(127));
  blk.smem_bytes = smem_bytes;
  auto run = [&](int t) {
    ctx.tid = t;
    ctx.block = &blk;
    for (unsigned z = 0; z < gz; ++z)
      for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
          if (t == 0) std::memset(blk.smem, 0xff, smem_bytes);
          all.arrive_and_wait();
          ctx.bx = x;
          ctx.by = y;
          ctx.bz = z;
          body();
          all.arrive_and_wait();
        }
    ctx.block = nullptr;
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(run, t);
  for (auto& th : pool) th.join();
  if (blk.error.empty()) return nullptr;
  last_error = blk.error;
  return last_error.c_str();
}

namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 tiles are emulated");
  T x[256];  // row-major [16][16]: A (m, k), B (k, n), C (m, n)
};

inline void check(const void* p, unsigned ldm, size_t esz, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32)
    fail(std::string("wmma::") + what + ": pointer is not 256-bit aligned");
  if ((ldm * esz) % 16)
    fail(std::string("wmma::") + what + ": ldm is not a multiple of 16 bytes");
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < ctx.block->smem || c >= ctx.block->smem + ctx.block->smem_bytes)
    fail(std::string("wmma::") + what + ": pointer outside shared memory");
}

template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check(p, ldm, sizeof(T), "load_matrix_sync");
  constexpr bool col = std::is_same<L, col_major>::value;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = col ? p[i + j * ldm] : p[i * ldm + j];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t l) {
  check(p, ldm, sizeof(float), "load_matrix_sync");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = l == mem_col_major ? p[i + j * ldm] : p[i * ldm + j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t l) {
  check(p, ldm, sizeof(float), "store_matrix_sync");
  syncwarp();  // every lane has read what it needed
  if (ctx.tid % 32 == 0)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) (l == mem_col_major ? p[i + j * ldm] : p[i * ldm + j]) = f.x[i * 16 + j];
  syncwarp();
}

template <typename Use, typename T, typename L, typename V>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, V v) {
  for (auto& e : f.x) e = T(v);
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float r[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) s += static_cast<float>(a.x[m * 16 + k]) * static_cast<float>(b.x[k * 16 + n]);
      r[m * 16 + n] = s;
    }
  std::memcpy(d.x, r, sizeof(r));
}

}  // namespace wmma
}  // namespace posattn_emu
