// Dense-bias gradient: d(bias) in the bias's own shape [1|B, 1|Hq, 1|Nq, 1|Nk]
// (float32). One block per output tile sums dS over every batch, head, row and
// column that broadcasting folds onto it, in a fixed order (no atomics).
#include "kernels.cuh"

namespace posattn_cuda {

// Grid (row tiles * num_n, bh, bias.nb). Row tiles: 1 when the query axis is
// broadcast; num_n: 1 when the key axis is broadcast. Block (.., oh, ob) sums the
// batches ob, ob + bias.nb, ... (all of them for a batch-broadcast bias).
template <typename T>
PA_KERNEL attn_bwd_dbias_kernel(const Params P) {
  unsigned char* sm = dyn_smem();
  const DBiasLayout L(P.BM, P.BN, P.BD, sizeof(T));
  T* Qs = reinterpret_cast<T*>(sm + L.q);
  T* dOs = reinterpret_cast<T*>(sm + L.dout);
  T* Ks = reinterpret_cast<T*>(sm + L.k);
  T* Vs = reinterpret_cast<T*>(sm + L.v);
  float* Ss = reinterpret_cast<float*>(sm + L.s);
  float* dPs = reinterpret_cast<float*>(sm + L.dp);
  float* acc = reinterpret_cast<float*>(sm + L.acc);
  int64_t* qpos = reinterpret_cast<int64_t*>(sm + L.qpos);
  int64_t* kpos = reinterpret_cast<int64_t*>(sm + L.kpos);
  float* lse_s = reinterpret_cast<float*>(sm + L.lse);
  float* delta_s = reinterpret_cast<float*>(sm + L.delta);
  float* scratch = reinterpret_cast<float*>(sm + L.scratch);

  const int tid = thread_x();
  const int64_t pid_m = block_x() / P.num_n, pid_n = block_x() % P.num_n;
  const int64_t oh = block_y(), ob = block_z();
  const int64_t h_lo = P.head_bcast ? 0 : oh, h_hi = P.head_bcast ? P.Hq : oh + 1;
  const int64_t m_lo = P.row_bcast ? 0 : pid_m * P.BM, m_hi = P.row_bcast ? P.Nq : m_lo + 1;
  const int64_t n_lo = P.col_bcast ? 0 : pid_n * P.BN, n_hi = P.col_bcast ? P.Nk : n_lo + 1;

  for (int e = tid; e < P.BM * P.BN; e += kThreads) acc[(e / P.BN) * L.lds + e % P.BN] = 0.f;
  for (int64_t b = ob; b < P.B; b += P.bias.nb) {
    for (int64_t h = h_lo; h < h_hi; ++h) {
      const int64_t hk = h / P.group;
      const int64_t row0 = (b * P.Hq + h) * P.Nq;
      const float slope = slope_of(P, b, h);
      const T* q = static_cast<const T*>(P.q) + b * P.sqb + h * P.sqh;
      const T* dout = static_cast<const T*>(P.dout) + b * P.sdob + h * P.sdoh;
      const T* k = static_cast<const T*>(P.k) + b * P.skb + hk * P.skh;
      const T* v = static_cast<const T*>(P.v) + b * P.svb + hk * P.svh;
      for (int64_t m0 = m_lo; m0 < m_hi; m0 += P.BM) {
        block_sync();
        for (int r = tid; r < P.BM; r += kThreads) qpos[r] = q_position(P, b, m0 + r);
        load_row_stats(P, row0, m0, lse_s, delta_s);
        block_sync();
        load_tile<T>(Qs, L.ldt, q, P.sqm, P.sqd, m0, P.BM, P.Nq, qpos, P, P.rope.on);
        load_tile<T>(dOs, L.ldt, dout, P.sdom, P.sdod, m0, P.BM, P.Nq, qpos, P, false);
        for (int64_t n0 = n_lo; n0 < n_hi; n0 += P.BN) {
          block_sync();
          for (int c = tid; c < P.BN; c += kThreads) kpos[c] = k_position(P, b, n0 + c);
          block_sync();
          load_tile<T>(Ks, L.ldt, k, P.skn, P.skd, n0, P.BN, P.Nk, kpos, P, P.rope.on);
          load_tile<T>(Vs, L.ldt, v, P.svn, P.svd, n0, P.BN, P.Nk, kpos, P, false);
          block_sync();
          mm<T, false, true>(P.BM, P.BN, P.BD, Qs, L.ldt, Ks, L.ldt, Ss, L.lds, false);
          mm<T, false, true>(P.BM, P.BN, P.BD, dOs, L.ldt, Vs, L.ldt, dPs, L.lds, false);
          block_sync();
          for (int e = tid; e < P.BM * P.BN; e += kThreads) {  // each thread owns the same entries throughout
            const int r = e / P.BN, c = e % P.BN;
            const float s = score2<T>(P, Ss[r * L.lds + c], b, h, m0 + r, n0 + c, qpos[r], kpos[c], slope);
            const float p = exp2f(s - lse_s[r]);
            acc[r * L.lds + c] += p * (dPs[r * L.lds + c] - delta_s[r]);
          }
        }
      }
    }
  }
  block_sync();

  const int64_t offs_m = pid_m * P.BM, offs_n = pid_n * P.BN;
  float* out = P.dbias + (ob * P.bh + oh) * P.bmq * P.bnk;
  if (P.row_bcast && P.col_bcast) {
    float part = 0.f;
    for (int e = tid; e < P.BM * P.BN; e += kThreads) part += acc[(e / P.BN) * L.lds + e % P.BN];
    const float total = block_sum(part, scratch);
    if (tid == 0) out[0] = total;
  } else if (P.row_bcast) {
    for (int c = tid; c < P.BN; c += kThreads) {
      float s = 0.f;
      for (int r = 0; r < P.BM; ++r) s += acc[r * L.lds + c];
      if (offs_n + c < P.Nk) out[offs_n + c] = s;
    }
  } else if (P.col_bcast) {
    for (int r = tid; r < P.BM; r += kThreads) {
      float s = 0.f;
      for (int c = 0; c < P.BN; ++c) s += acc[r * L.lds + c];
      if (offs_m + r < P.Nq) out[offs_m + r] = s;
    }
  } else {
    for (int e = tid; e < P.BM * P.BN; e += kThreads) {
      const int r = e / P.BN, c = e % P.BN;
      if (offs_m + r < P.Nq && offs_n + c < P.Nk) out[(offs_m + r) * P.Nk + offs_n + c] = acc[r * L.lds + c];
    }
  }
}

template <typename T>
static const char* run_dbias(const Params& P, void* stream) {
  const size_t smem = DBiasLayout(P.BM, P.BN, P.BD, sizeof(T)).total;
  const unsigned row_tiles = P.bmq == 1 ? 1u : cdiv(P.Nq, P.BM);
  return launch_kernel(attn_bwd_dbias_kernel<T>, Grid{row_tiles * unsigned(P.num_n), unsigned(P.bh), unsigned(P.bias.nb)},
                       smem, stream, P);
}

const char* launch_bwd_dbias(const Params& P, int dtype, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) { return run_dbias<typename decltype(t)::type>(P, stream); });
}

}  // namespace posattn_cuda
