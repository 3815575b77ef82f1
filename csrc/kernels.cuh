// Device helpers shared by the forward and backward kernels: reductions, tile
// matrix products in shared memory, positions, RoPE, the score of one (query, key)
// pair, and the key / query ranges that causal and window masks leave visible.
//
// The algorithm mirrors kernels/attention.py (the Triton kernels): scores in the
// log2 domain (log2(e) folded into the scale), online softmax, RoPE applied while a
// q or k tile is loaded (the partner channel is a second load), rows with no
// visible key give out = 0 and lse = -inf. One block of kThreads threads works on
// one tile; every intermediate lives in shared memory; nothing [Nq, Nk] is written.
#pragma once

#include "device.cuh"

namespace posattn_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInf = INFINITY;

PA_DEV int lane_id() { return thread_x() & 31; }
PA_DEV int warp_id() { return thread_x() >> 5; }

// Butterfly reductions: every lane ends with the same value, in a fixed order.
PA_DEV float warp_sum(float v) {
  for (int m = 16; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}
PA_DEV float warp_max(float v) {
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
  return v;
}
PA_DEV int64_t warp_min_i64(int64_t v) {
  for (int m = 16; m > 0; m >>= 1) {
    int64_t o = shfl_xor(v, m);
    v = o < v ? o : v;
  }
  return v;
}
PA_DEV int64_t warp_max_i64(int64_t v) {
  for (int m = 16; m > 0; m >>= 1) {
    int64_t o = shfl_xor(v, m);
    v = o > v ? o : v;
  }
  return v;
}

// Block-wide reductions (call from every thread; scratch holds kWarps values).
// Every thread returns the same value, summed in the same order on every run.
PA_DEV float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (lane_id() == 0) scratch[warp_id()] = v;
  block_sync();
  float r = 0.f;
  for (int w = 0; w < kWarps; ++w) r += scratch[w];
  block_sync();
  return r;
}
PA_DEV int64_t block_min_i64(int64_t v, int64_t* scratch) {
  v = warp_min_i64(v);
  if (lane_id() == 0) scratch[warp_id()] = v;
  block_sync();
  int64_t r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = scratch[w] < r ? scratch[w] : r;
  block_sync();
  return r;
}
PA_DEV int64_t block_max_i64(int64_t v, int64_t* scratch) {
  v = warp_max_i64(v);
  if (lane_id() == 0) scratch[warp_id()] = v;
  block_sync();
  int64_t r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = scratch[w] > r ? scratch[w] : r;
  block_sync();
  return r;
}

// ------------------------------------------------------------------ tile products
//
// C[M, N] (float32, row-major, ldc) = (accum ? C : 0) + op(A) op(B) with
//   op(A) [M, K]: A[m * lda + k], or A[k * lda + m] when A_T (A stored as [K, M]);
//   op(B) [K, N]: B[k * ldb + n], or B[n * ldb + k] when B_T (B stored as [N, K]).
// M, N, K are multiples of 16. The caller synchronises the block around it.

template <typename T, bool A_T, bool B_T>
PA_DEV void mm_tensor_cores(int M, int N, int K, const T* A, int lda, const T* B, int ldb, float* C, int ldc,
                            bool accum) {
  using LA = typename std::conditional<A_T, wmma::col_major, wmma::row_major>::type;
  using LB = typename std::conditional<B_T, wmma::col_major, wmma::row_major>::type;
  const int tiles_n = N / 16, tiles = (M / 16) * tiles_n;
  for (int t = warp_id(); t < tiles; t += kWarps) {  // warp-uniform
    const int m0 = (t / tiles_n) * 16, n0 = (t % tiles_n) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    if (accum)
      wmma::load_matrix_sync(c, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
    else
      wmma::fill_fragment(c, 0.0f);
    for (int k0 = 0; k0 < K; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
      wmma::load_matrix_sync(a, A_T ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
      wmma::load_matrix_sync(b, B_T ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(C + m0 * ldc + n0, c, ldc, wmma::mem_row_major);
  }
}

template <typename T, bool A_T, bool B_T>
PA_DEV void mm_plain(int M, int N, int K, const T* A, int lda, const T* B, int ldb, float* C, int ldc, bool accum) {
  for (int e = thread_x(); e < M * N; e += kThreads) {
    const int m = e / N, n = e % N;
    float s = accum ? C[m * ldc + n] : 0.f;
    for (int k = 0; k < K; ++k) {
      const float a = to_float(A_T ? A[k * lda + m] : A[m * lda + k]);
      const float b = to_float(B_T ? B[n * ldb + k] : B[k * ldb + n]);
      s = fmaf(a, b, s);
    }
    C[m * ldc + n] = s;
  }
}

template <typename T, bool A_T, bool B_T>
PA_DEV void mm(int M, int N, int K, const T* A, int lda, const T* B, int ldb, float* C, int ldc, bool accum) {
  if constexpr (UseTensorCores<T>::value)
    mm_tensor_cores<T, A_T, B_T>(M, N, K, A, lda, B, ldb, C, ldc, accum);
  else
    mm_plain<T, A_T, B_T>(M, N, K, A, lda, B, ldb, C, ldc, accum);
}

// ------------------------------------------------------------------ positions

PA_DEV int64_t q_position(const Params& P, int64_t b, int64_t i) {
  if (P.pos.q) return i < P.Nq ? P.pos.q[b * P.pos.sqb + i] : 0;
  return i + P.Nk - P.Nq;
}
PA_DEV int64_t k_position(const Params& P, int64_t b, int64_t j) {
  if (P.pos.k) return j < P.Nk ? P.pos.k[b * P.pos.skb + j] : 0;
  return j;
}

// ------------------------------------------------------------------ RoPE
//
// Channel d at position pos: x'[d] = x[d] * cs + x[partner] * sn (sn carries the
// sign: -sin for the first channel of a pair, +sin for the second). Channels past
// rot_dim pair with themselves with cs = 1, sn = 0. The inverse rotation (for the
// gradients) is g[d] * cs - g[partner] * sn.
struct Rot {
  int partner;
  float cs, sn;
};

PA_DEV Rot rope_at(const Params& P, int d, int64_t pos) {
  Rot r{d, 1.f, 0.f};
  if (!P.rope.on || d >= P.rope.rot_dim) return r;
  int fidx;
  bool first;
  if (P.rope.interleaved) {
    r.partner = d ^ 1;
    fidx = d >> 1;
    first = (d & 1) == 0;
  } else {
    const int half = P.rope.rot_dim / 2;
    first = d < half;
    r.partner = first ? d + half : d - half;
    fidx = first ? d : d - half;
  }
  const float theta = static_cast<float>(pos) * P.rope.inv_freq[fidx];
  float s, c;
  sincosf(theta, &s, &c);
  r.cs = P.rope.factor * c;
  r.sn = (first ? -P.rope.factor : P.rope.factor) * s;
  return r;
}

// Rows [row0, row0 + rows) of an [N, D] slice (strides sn, sd) into dst [rows, BD]
// (leading dimension ld), rotated at pos[r] when rotate, zero-padded past N and D.
// The rotated values are rounded to T, as the Triton kernels do.
template <typename T>
PA_DEV void load_tile(T* dst, int ld, const T* src, int64_t sn, int64_t sd, int64_t row0, int rows, int64_t N,
                      const int64_t* pos, const Params& P, bool rotate) {
  for (int e = thread_x(); e < rows * P.BD; e += kThreads) {
    const int r = e / P.BD, d = e % P.BD;
    const int64_t n = row0 + r;
    float x = 0.f;
    if (n < N && d < P.D) {
      const T* row = src + n * sn;
      x = to_float(row[d * sd]);
      if (rotate) {
        const Rot ro = rope_at(P, d, pos[r]);
        x = x * ro.cs + to_float(row[static_cast<int64_t>(ro.partner) * sd]) * ro.sn;
      }
    }
    dst[r * ld + d] = from_float<T>(x);
  }
}

// Gradient w.r.t. rotated rows (float32 tile g, ld) -> w.r.t. the raw rows, times
// `mul`, stored to global rows [row0, row0 + rows) (strides sn, sd).
template <typename T>
PA_DEV void store_unrotated(T* dst, int64_t sn, int64_t sd, int64_t row0, int rows, int64_t N, const float* g, int ld,
                            float mul, const int64_t* pos, const Params& P) {
  for (int e = thread_x(); e < rows * P.BD; e += kThreads) {
    const int r = e / P.BD, d = e % P.BD;
    const int64_t n = row0 + r;
    if (n >= N || d >= P.D) continue;
    float x = g[r * ld + d] * mul;
    if (P.rope.on) {
      const Rot ro = rope_at(P, d, pos[r]);
      x = x * ro.cs - g[r * ld + ro.partner] * mul * ro.sn;
    }
    dst[n * sn + d * sd] = from_float<T>(x);
  }
}

// ------------------------------------------------------------------ scores

// The table column of a (query, key) pair at positions (qp, kp).
PA_DEV int64_t table_column(const Params& P, int64_t qp, int64_t kp) {
  if (P.table.kind == kDistTable) {
    const int64_t rel = kp - qp;
    return (rel < -P.table.a ? -P.table.a : (rel > P.table.b ? P.table.b : rel)) + P.table.a;
  }
  // Swin's relative_position_index; clamped into the table for positions outside
  // the window (validation keeps them inside; this only keeps loads in bounds).
  const int64_t wh = P.table.a, ww = P.table.b;
  const int64_t dy = qp / ww - kp / ww + wh - 1, dx = qp % ww - kp % ww + ww - 1;
  const int64_t c = dy * (2 * ww - 1) + dx;
  return c < 0 ? 0 : (c >= P.table.columns ? P.table.columns - 1 : c);
}

template <typename T>
PA_DEV float bias_value(const Params& P, int64_t off) {
  if (P.bias.kind == kF32Bias) return static_cast<const float*>(P.bias.data)[off];
  return to_float(static_cast<const T*>(P.bias.data)[off]);
}

// The log2-domain score of query row i and key j of head h, batch b, from the raw
// dot product of the (rotated) rows; -inf where masked or out of range.
template <typename T>
PA_DEV float score2(const Params& P, float dot, int64_t b, int64_t h, int64_t i, int64_t j, int64_t qp, int64_t kp,
                    float slope) {
  if (i >= P.Nq || j >= P.Nk) return -kInf;
  const int64_t rel = kp - qp;
  if (P.causal && rel > 0) return -kInf;
  if (P.has_wl && rel < -P.win_l) return -kInf;
  if (P.has_wr && rel > P.win_r) return -kInf;
  float s = dot * P.qk_scale;
  if (P.alibi.slopes) s -= (slope * kLog2e) * static_cast<float>(rel < 0 ? -rel : rel);
  if (P.table.data) s += P.table.data[h * P.table.columns + table_column(P, qp, kp)] * kLog2e;
  if (P.bias.kind != kNoBias) {
    const int64_t off = (b % P.bias.nb) * P.bias.sb + h * P.bias.sh + i * P.bias.sm + j * P.bias.sn;
    if (P.bias.kind == kMaskBias) {
      if (!static_cast<const uint8_t*>(P.bias.data)[off]) return -kInf;
    } else {
      s += bias_value<T>(P, off) * kLog2e;
    }
  }
  return s;
}

PA_DEV float slope_of(const Params& P, int64_t b, int64_t h) {
  return P.alibi.slopes ? P.alibi.slopes[b * P.alibi.sb + h * P.alibi.sh] : 0.f;
}

// ------------------------------------------------------------------ visible ranges

// [lo, hi) of the keys that query rows m0 .. m0 + BM - 1 can see. With default
// positions, causal and window masks bound it, so hidden key tiles are skipped.
PA_DEV void key_range(const Params& P, int64_t m0, int64_t* lo, int64_t* hi) {
  int64_t l = 0, h = P.Nk;
  if (!P.pos.q) {
    const int64_t shift = P.Nk - P.Nq;
    if (P.causal) h = h < m0 + P.BM + shift ? h : m0 + P.BM + shift;
    if (P.has_wr) h = h < m0 + P.BM + shift + P.win_r ? h : m0 + P.BM + shift + P.win_r;
    if (P.has_wl) {
      l = m0 + shift - P.win_l;
      l = l > 0 ? l : 0;
      l = (l / P.BN) * P.BN;
    }
    h = h > l ? h : l;
  }
  *lo = l;
  *hi = h;
}

// [lo, hi) of the query rows that can see keys n0 .. n0 + BN - 1 (its transpose).
PA_DEV void query_range(const Params& P, int64_t n0, int64_t* lo, int64_t* hi) {
  int64_t l = 0, h = P.Nq;
  if (!P.pos.q) {
    const int64_t shift = P.Nk - P.Nq;
    if (P.causal) l = l > n0 - shift ? l : n0 - shift;
    if (P.has_wr) l = l > n0 - shift - P.win_r ? l : n0 - shift - P.win_r;
    l = ((l > 0 ? l : 0) / P.BM) * P.BM;
    if (P.has_wl) h = h < n0 + P.BN - shift + P.win_l ? h : n0 + P.BN - shift + P.win_l;
    h = h > l ? h : l;
  }
  *lo = l;
  *hi = h;
}

// Row statistics for the backward: lse in the log2 domain, with rows that saw no key
// (lse = -inf) and rows past Nq at +inf so that their recomputed P is exactly 0.
PA_DEV void load_row_stats(const Params& P, int64_t row0, int64_t m0, float* lse_s, float* delta_s) {
  for (int r = thread_x(); r < P.BM; r += kThreads) {
    const int64_t i = m0 + r;
    float l = kInf, dl = 0.f;
    if (i < P.Nq) {
      l = P.lse[row0 + i];
      l = l == -kInf ? kInf : l * kLog2e;
      dl = P.delta[row0 + i];
    }
    lse_s[r] = l;
    delta_s[r] = dl;
  }
}

}  // namespace posattn_cuda
