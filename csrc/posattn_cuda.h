// posattn CUDA fallback: what the host side (ops.cpp) and the kernels (*.cu) share.
//
// This header includes neither torch nor CUDA headers: a Params struct of raw
// pointers, strides and scalars, the shared-memory layout of every kernel
// (computed identically on the host, to size the launch, and on the device, to
// carve the buffer), and the launchers exported by the .cu files.
#pragma once

#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define PA_HD __host__ __device__ __forceinline__
#else
#define PA_HD inline
#endif

namespace posattn_cuda {

constexpr int kThreads = 128;  // 4 warps per block, every kernel
constexpr int kWarps = kThreads / 32;

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum BiasKind : int { kNoBias = 0, kMaskBias = 1, kF32Bias = 2, kSameBias = 3 };  // kSameBias: q's dtype
enum TableKind : int { kNoTable = 0, kDistTable = 1, kGridTable = 2 };

// Everything a kernel reads: one struct, passed by value. Strides are in elements.
// Positions are int64 (converted on the host), null for the default bottom-right
// alignment (q_pos = i + Nk - Nq, k_pos = j). Slopes / table / inv_freq are float32.
struct Params {
  // q [B, Hq, Nq, D], k / v [B, Hkv, Nk, D]
  const void* q;
  const void* k;
  const void* v;
  int64_t sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd;
  int B, Hq, Hkv, group, D;
  int64_t Nq, Nk;
  float scale;     // natural-domain score scale
  float qk_scale;  // scale * log2(e): scores are kept in the log2 domain

  bool causal, has_wl, has_wr;
  int64_t win_l, win_r;

  // One sub-struct per encoding (and one for the positions), each filled by its own
  // setter in ops.cpp (set_positions, set_rope, set_alibi, set_table, set_bias).
  struct Positions {
    const int64_t* q = nullptr;  // [1|B, Nq] or null (default alignment)
    const int64_t* k = nullptr;  // [1|B, Nk] or null
    int64_t sqb = 0, skb = 0;    // batch strides (0 when shared by the batch)
  } pos;

  struct Rope {
    bool on = false, interleaved = false;
    int rot_dim = 0;
    float factor = 1.f;
    const float* inv_freq = nullptr;  // [rot_dim / 2]
  } rope;

  struct Alibi {
    const float* slopes = nullptr;  // [1|B, Hq] or null
    int64_t sb = 0, sh = 0;
  } alibi;

  // Per-head bias table [Hq, columns] contiguous float32, or null. kDistTable
  // (DistanceBias): column clamp(rel, -a, b) + a. kGridTable (GridBias, Swin):
  // tokens at (pos / Ww, pos % Ww) with (a, b) = (Wh, Ww).
  struct Table {
    const float* data = nullptr;
    int kind = kNoTable;
    int64_t a = 0, b = 0, columns = 0;
  } table;

  // Dense bias / bool mask, 4-D with stride 0 on broadcast axes; batch b reads
  // bias[b % nb].
  struct Bias {
    const void* data = nullptr;
    int kind = kNoBias;
    int64_t sb = 0, sh = 0, sm = 0, sn = 0;
    int nb = 1;
  } bias;

  // forward outputs
  void* out;  // [B, Hq, Nq, D], q's dtype
  int64_t sob, soh, som, sod;
  float* out32;  // contiguous float32 copy of out (for the backward) or null
  float* lse;    // [B, Hq, Nq] contiguous, natural log

  // backward inputs
  const void* o;  // the saved output (q's dtype, or float32 when o_f32)
  bool o_f32;
  int64_t s_ob, s_oh, s_om, s_od;
  const void* dout;
  int64_t sdob, sdoh, sdom, sdod;
  const float* dlse;  // [B, Hq, Nq] contiguous or null
  float* delta;       // [B, Hq, Nq] contiguous

  // backward outputs
  void* dq;
  int64_t sdqb, sdqh, sdqm, sdqd;
  void* dk;
  int64_t sdkb, sdkh, sdkn, sdkd;
  void* dv;
  int64_t sdvb, sdvh, sdvn, sdvd;
  float* dslope;  // [B, Hq, num_m] per-program partial sums, or null
  float* dtable;  // [B, Hq, num_m, table.columns] per-program partial sums (zero-filled), or null
  int num_m;      // query blocks of the dQ kernel

  // dense-bias gradient [bias.nb, bh, bmq, bnk] float32 (block (.., h, b) sums the
  // batches b, b + bias.nb, ...)
  float* dbias;
  int bh;
  int64_t bmq, bnk;
  bool head_bcast, row_bcast, col_bcast;
  int num_n;  // key tiles per output row of tiles (1 when the key axis is broadcast)

  // tiling of the kernel being launched: BM query rows, BN keys, BD = D rounded up to 16
  int BM, BN, BD;
};

// ---------------------------------------------------------------- shared memory

// Leading dimensions: 16-bit tiles get +8 elements (16 bytes) and float tiles +4
// (16 bytes) of padding; every WMMA pointer stays 32-byte aligned (BD, BN, BM are
// multiples of 16 and every region starts on a 128-byte boundary).
PA_HD int ld_elem(int cols) { return cols + 8; }
PA_HD int ld_f32(int cols) { return cols + 4; }

struct SmemPlan {
  size_t off = 0;
  PA_HD size_t take(size_t bytes) {
    size_t o = (off + 127) & ~size_t(127);
    off = o + bytes;
    return o;
  }
};

// Forward: Q, K, V tiles (input dtype), the output accumulator O and the scores S
// (float32), the probabilities P (input dtype), positions and row statistics.
struct FwdLayout {
  int ldt, ldo, lds, ldp;
  size_t q, k, v, o, s, p, qpos, kpos, m, l, total;
  PA_HD FwdLayout(int BM, int BN, int BD, int esz) {
    ldt = ld_elem(BD); ldo = ld_f32(BD); lds = ld_f32(BN); ldp = ld_elem(BN);
    SmemPlan a;
    q = a.take(size_t(BM) * ldt * esz); k = a.take(size_t(BN) * ldt * esz); v = a.take(size_t(BN) * ldt * esz);
    o = a.take(size_t(BM) * ldo * 4); s = a.take(size_t(BM) * lds * 4); p = a.take(size_t(BM) * ldp * esz);
    qpos = a.take(size_t(BM) * 8); kpos = a.take(size_t(BN) * 8);
    m = a.take(size_t(BM) * 4); l = a.take(size_t(BM) * 4);
    total = a.take(0);
  }
};

// dK/dV: per key block K, V and the dK, dV accumulators; per query block Q, dO,
// S and dP (float32), P and dS (input dtype), row statistics.
struct DkDvLayout {
  int ldt, ldf, lds, ldp;
  size_t k, v, dk, dv, q, dout, s, dp, p, ds, qpos, kpos, lse, delta, total;
  PA_HD DkDvLayout(int BM, int BN, int BD, int esz) {
    ldt = ld_elem(BD); ldf = ld_f32(BD); lds = ld_f32(BN); ldp = ld_elem(BN);
    SmemPlan a;
    k = a.take(size_t(BN) * ldt * esz); v = a.take(size_t(BN) * ldt * esz);
    dk = a.take(size_t(BN) * ldf * 4); dv = a.take(size_t(BN) * ldf * 4);
    q = a.take(size_t(BM) * ldt * esz); dout = a.take(size_t(BM) * ldt * esz);
    s = a.take(size_t(BM) * lds * 4); dp = a.take(size_t(BM) * lds * 4);
    p = a.take(size_t(BM) * ldp * esz); ds = a.take(size_t(BM) * ldp * esz);
    qpos = a.take(size_t(BM) * 8); kpos = a.take(size_t(BN) * 8);
    lse = a.take(size_t(BM) * 4); delta = a.take(size_t(BM) * 4);
    total = a.take(0);
  }
};

// dQ: per query block Q, dO, the dQ accumulator; per key block K, V, S and dP
// (float32; dP is overwritten by dS in float32), dS (input dtype), reduction scratch.
struct DqLayout {
  int ldt, ldf, lds, ldp;
  size_t q, dout, dq, k, v, s, dp, ds, qpos, kpos, lse, delta, scratch, total;
  PA_HD DqLayout(int BM, int BN, int BD, int esz) {
    ldt = ld_elem(BD); ldf = ld_f32(BD); lds = ld_f32(BN); ldp = ld_elem(BN);
    SmemPlan a;
    q = a.take(size_t(BM) * ldt * esz); dout = a.take(size_t(BM) * ldt * esz); dq = a.take(size_t(BM) * ldf * 4);
    k = a.take(size_t(BN) * ldt * esz); v = a.take(size_t(BN) * ldt * esz);
    s = a.take(size_t(BM) * lds * 4); dp = a.take(size_t(BM) * lds * 4); ds = a.take(size_t(BM) * ldp * esz);
    qpos = a.take(size_t(BM) * 8); kpos = a.take(size_t(BN) * 8);
    lse = a.take(size_t(BM) * 4); delta = a.take(size_t(BM) * 4);
    scratch = a.take(size_t(kWarps) * 8);
    total = a.take(0);
  }
};

// d(bias): Q, dO, K, V tiles, S and dP, the [BM, BN] float32 accumulator.
struct DBiasLayout {
  int ldt, lds;
  size_t q, dout, k, v, s, dp, acc, qpos, kpos, lse, delta, scratch, total;
  PA_HD DBiasLayout(int BM, int BN, int BD, int esz) {
    ldt = ld_elem(BD); lds = ld_f32(BN);
    SmemPlan a;
    q = a.take(size_t(BM) * ldt * esz); dout = a.take(size_t(BM) * ldt * esz);
    k = a.take(size_t(BN) * ldt * esz); v = a.take(size_t(BN) * ldt * esz);
    s = a.take(size_t(BM) * lds * 4); dp = a.take(size_t(BM) * lds * 4); acc = a.take(size_t(BM) * lds * 4);
    qpos = a.take(size_t(BM) * 8); kpos = a.take(size_t(BN) * 8);
    lse = a.take(size_t(BM) * 4); delta = a.take(size_t(BM) * 4);
    scratch = a.take(size_t(kWarps) * 8);
    total = a.take(0);
  }
};

enum Kernel : int { kFwdKernel, kDkDvKernel, kDqKernel, kDBiasKernel };

PA_HD size_t smem_bytes(int kernel, int BM, int BN, int BD, int esz) {
  switch (kernel) {
    case kFwdKernel: return FwdLayout(BM, BN, BD, esz).total;
    case kDkDvKernel: return DkDvLayout(BM, BN, BD, esz).total;
    case kDqKernel: return DqLayout(BM, BN, BD, esz).total;
    default: return DBiasLayout(BM, BN, BD, esz).total;
  }
}

// The largest tile (BM, BN) whose shared memory fits in max_smem; false if none does.
inline bool choose_tiles(int kernel, int BD, int esz, size_t max_smem, int* BM, int* BN) {
  static const int cand[][2] = {{64, 64}, {64, 32}, {32, 32}, {16, 16}};
  for (const auto& c : cand) {
    if (smem_bytes(kernel, c[0], c[1], BD, esz) <= max_smem) {
      *BM = c[0];
      *BN = c[1];
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------- launchers
// Each launches on `stream` (a cudaStream_t) and returns null, or an error message.
// P.BM / P.BN must come from choose_tiles for the same kernel.
const char* launch_fwd(const Params& P, int dtype, void* stream);
const char* launch_bwd_delta(const Params& P, int dtype, void* stream);
const char* launch_bwd_dkdv(const Params& P, int dtype, void* stream);
const char* launch_bwd_dq(const Params& P, int dtype, void* stream);
const char* launch_bwd_dbias(const Params& P, int dtype, void* stream);

}  // namespace posattn_cuda
