// Backward kernels: dK / dV per key block (summed over the GQA group inside the
// block), and dQ per query block with this block's partial sums of d(slope) and
// d(table). No atomics: every output element, and every partial-sum slot, has one
// writer, and every sum runs in a fixed order (bitwise deterministic run to run).
#include "kernels.cuh"

namespace posattn_cuda {

// One block per (key block, kv head, batch).
template <typename T>
PA_KERNEL attn_bwd_dkdv_kernel(const Params P) {
  unsigned char* sm = dyn_smem();
  const DkDvLayout L(P.BM, P.BN, P.BD, sizeof(T));
  T* Ks = reinterpret_cast<T*>(sm + L.k);
  T* Vs = reinterpret_cast<T*>(sm + L.v);
  float* dKs = reinterpret_cast<float*>(sm + L.dk);
  float* dVs = reinterpret_cast<float*>(sm + L.dv);
  T* Qs = reinterpret_cast<T*>(sm + L.q);
  T* dOs = reinterpret_cast<T*>(sm + L.dout);
  float* Ss = reinterpret_cast<float*>(sm + L.s);
  float* dPs = reinterpret_cast<float*>(sm + L.dp);
  T* Ps = reinterpret_cast<T*>(sm + L.p);
  T* dSs = reinterpret_cast<T*>(sm + L.ds);
  int64_t* qpos = reinterpret_cast<int64_t*>(sm + L.qpos);
  int64_t* kpos = reinterpret_cast<int64_t*>(sm + L.kpos);
  float* lse_s = reinterpret_cast<float*>(sm + L.lse);
  float* delta_s = reinterpret_cast<float*>(sm + L.delta);

  const int tid = thread_x();
  const int64_t n0 = static_cast<int64_t>(block_x()) * P.BN;
  const int64_t hk = block_y(), b = block_z();

  for (int c = tid; c < P.BN; c += kThreads) kpos[c] = k_position(P, b, n0 + c);
  for (int e = tid; e < P.BN * P.BD; e += kThreads) {
    dKs[(e / P.BD) * L.ldf + e % P.BD] = 0.f;
    dVs[(e / P.BD) * L.ldf + e % P.BD] = 0.f;
  }
  block_sync();
  load_tile<T>(Ks, L.ldt, static_cast<const T*>(P.k) + b * P.skb + hk * P.skh, P.skn, P.skd, n0, P.BN, P.Nk, kpos, P,
               P.rope.on);
  load_tile<T>(Vs, L.ldt, static_cast<const T*>(P.v) + b * P.svb + hk * P.svh, P.svn, P.svd, n0, P.BN, P.Nk, kpos, P,
               false);

  int64_t lo, hi;
  query_range(P, n0, &lo, &hi);
  for (int g = 0; g < P.group; ++g) {
    const int64_t h = hk * P.group + g;
    const T* q = static_cast<const T*>(P.q) + b * P.sqb + h * P.sqh;
    const T* dout = static_cast<const T*>(P.dout) + b * P.sdob + h * P.sdoh;
    const int64_t row0 = (b * P.Hq + h) * P.Nq;
    const float slope = slope_of(P, b, h);
    for (int64_t m0 = lo; m0 < hi; m0 += P.BM) {
      block_sync();  // the previous tile's readers are done
      for (int r = tid; r < P.BM; r += kThreads) qpos[r] = q_position(P, b, m0 + r);
      load_row_stats(P, row0, m0, lse_s, delta_s);
      block_sync();
      load_tile<T>(Qs, L.ldt, q, P.sqm, P.sqd, m0, P.BM, P.Nq, qpos, P, P.rope.on);
      load_tile<T>(dOs, L.ldt, dout, P.sdom, P.sdod, m0, P.BM, P.Nq, qpos, P, false);
      block_sync();
      mm<T, false, true>(P.BM, P.BN, P.BD, Qs, L.ldt, Ks, L.ldt, Ss, L.lds, false);
      mm<T, false, true>(P.BM, P.BN, P.BD, dOs, L.ldt, Vs, L.ldt, dPs, L.lds, false);
      block_sync();
      // P = exp2(s - lse) recomputed; dS = P * (dP - delta), the gradient w.r.t. the
      // natural-domain score scale * q.k + bias.
      for (int e = tid; e < P.BM * P.BN; e += kThreads) {
        const int r = e / P.BN, c = e % P.BN;
        const float s = score2<T>(P, Ss[r * L.lds + c], b, h, m0 + r, n0 + c, qpos[r], kpos[c], slope);
        const float p = exp2f(s - lse_s[r]);
        const float ds = p * (dPs[r * L.lds + c] - delta_s[r]);
        Ps[r * L.ldp + c] = from_float<T>(p);
        dSs[r * L.ldp + c] = from_float<T>(ds);
      }
      block_sync();
      mm<T, true, false>(P.BN, P.BD, P.BM, Ps, L.ldp, dOs, L.ldt, dVs, L.ldf, true);   // dV += P^T dO
      mm<T, true, false>(P.BN, P.BD, P.BM, dSs, L.ldp, Qs, L.ldt, dKs, L.ldf, true);  // dK += dS^T Q
    }
  }
  block_sync();
  store_unrotated<T>(static_cast<T*>(P.dk) + b * P.sdkb + hk * P.sdkh, P.sdkn, P.sdkd, n0, P.BN, P.Nk, dKs, L.ldf,
                     P.scale, kpos, P);
  T* dv = static_cast<T*>(P.dv) + b * P.sdvb + hk * P.sdvh;
  for (int e = tid; e < P.BN * P.BD; e += kThreads) {
    const int c = e / P.BD, d = e % P.BD;
    const int64_t n = n0 + c;
    if (n < P.Nk && d < P.D) dv[n * P.sdvn + d * P.sdvd] = from_float<T>(dVs[c * L.ldf + d]);
  }
}

// One block per (query block, q head, batch): dQ, plus this block's partial sums
// of d(slope) (a scalar) and d(table) (one row of the [B, Hq, num_m, table.columns] buffer,
// each column owned by one thread for the whole block).
template <typename T>
PA_KERNEL attn_bwd_dq_kernel(const Params P) {
  unsigned char* sm = dyn_smem();
  const DqLayout L(P.BM, P.BN, P.BD, sizeof(T));
  T* Qs = reinterpret_cast<T*>(sm + L.q);
  T* dOs = reinterpret_cast<T*>(sm + L.dout);
  float* dQs = reinterpret_cast<float*>(sm + L.dq);
  T* Ks = reinterpret_cast<T*>(sm + L.k);
  T* Vs = reinterpret_cast<T*>(sm + L.v);
  float* Ss = reinterpret_cast<float*>(sm + L.s);
  float* dPs = reinterpret_cast<float*>(sm + L.dp);  // holds dS in float32 after the elementwise step
  T* dSs = reinterpret_cast<T*>(sm + L.ds);
  int64_t* qpos = reinterpret_cast<int64_t*>(sm + L.qpos);
  int64_t* kpos = reinterpret_cast<int64_t*>(sm + L.kpos);
  float* lse_s = reinterpret_cast<float*>(sm + L.lse);
  float* delta_s = reinterpret_cast<float*>(sm + L.delta);
  float* scratch_f = reinterpret_cast<float*>(sm + L.scratch);
  int64_t* scratch_i = reinterpret_cast<int64_t*>(sm + L.scratch);

  const int tid = thread_x();
  const int64_t m_blk = block_x();
  const int64_t m0 = m_blk * P.BM;
  const int64_t h = block_y(), b = block_z(), hk = h / P.group;
  const int64_t row0 = (b * P.Hq + h) * P.Nq;
  const int64_t slot = (b * P.Hq + h) * P.num_m + m_blk;
  const T* k = static_cast<const T*>(P.k) + b * P.skb + hk * P.skh;
  const T* v = static_cast<const T*>(P.v) + b * P.svb + hk * P.svh;
  const float slope = slope_of(P, b, h);
  const bool want_table = P.dtable != nullptr;

  for (int r = tid; r < P.BM; r += kThreads) qpos[r] = q_position(P, b, m0 + r);
  load_row_stats(P, row0, m0, lse_s, delta_s);
  for (int e = tid; e < P.BM * P.BD; e += kThreads) dQs[(e / P.BD) * L.ldf + e % P.BD] = 0.f;
  block_sync();
  load_tile<T>(Qs, L.ldt, static_cast<const T*>(P.q) + b * P.sqb + h * P.sqh, P.sqm, P.sqd, m0, P.BM, P.Nq, qpos, P,
               P.rope.on);
  load_tile<T>(dOs, L.ldt, static_cast<const T*>(P.dout) + b * P.sdob + h * P.sdoh, P.sdom, P.sdod, m0, P.BM, P.Nq,
               qpos, P, false);

  float d_slope = 0.f;  // this thread's share, summed over the block at the end
  int64_t lo, hi;
  key_range(P, m0, &lo, &hi);
  for (int64_t n0 = lo; n0 < hi; n0 += P.BN) {
    block_sync();
    for (int c = tid; c < P.BN; c += kThreads) kpos[c] = k_position(P, b, n0 + c);
    block_sync();
    load_tile<T>(Ks, L.ldt, k, P.skn, P.skd, n0, P.BN, P.Nk, kpos, P, P.rope.on);
    load_tile<T>(Vs, L.ldt, v, P.svn, P.svd, n0, P.BN, P.Nk, kpos, P, false);
    block_sync();
    mm<T, false, true>(P.BM, P.BN, P.BD, Qs, L.ldt, Ks, L.ldt, Ss, L.lds, false);
    mm<T, false, true>(P.BM, P.BN, P.BD, dOs, L.ldt, Vs, L.ldt, dPs, L.lds, false);
    block_sync();
    int64_t c_lo = INT64_MAX, c_hi = INT64_MIN;  // table columns this tile touches
    for (int e = tid; e < P.BM * P.BN; e += kThreads) {
      const int r = e / P.BN, c = e % P.BN;
      const float s = score2<T>(P, Ss[r * L.lds + c], b, h, m0 + r, n0 + c, qpos[r], kpos[c], slope);
      const float p = exp2f(s - lse_s[r]);
      const float ds = p * (dPs[r * L.lds + c] - delta_s[r]);
      dPs[r * L.lds + c] = ds;
      dSs[r * L.ldp + c] = from_float<T>(ds);
      const int64_t rel = kpos[c] - qpos[r];
      if (P.dslope) d_slope -= ds * static_cast<float>(rel < 0 ? -rel : rel);
      if (want_table && ds != 0.f) {
        const int64_t col = table_column(P, qpos[r], kpos[c]);
        c_lo = col < c_lo ? col : c_lo;
        c_hi = col > c_hi ? col : c_hi;
      }
    }
    if (want_table) {  // block-uniform; these also synchronise the block
      c_lo = block_min_i64(c_lo, scratch_i);
      c_hi = block_max_i64(c_hi, scratch_i);
    } else {
      block_sync();
    }
    mm<T, false, false>(P.BM, P.BD, P.BN, dSs, L.ldp, Ks, L.ldt, dQs, L.ldf, true);  // dQ += dS K
    if (want_table && c_lo <= c_hi) {
      // Histogram of dS by table column. Column c is owned by one thread, which
      // scans the tile in a fixed order; far from the diagonal every entry clamps to
      // one column and the range is a single column.
      float* dtab = P.dtable + slot * P.table.columns;
      for (int64_t col = c_lo + tid; col <= c_hi; col += kThreads) {
        float acc = 0.f;
        for (int r = 0; r < P.BM; ++r)
          for (int c = 0; c < P.BN; ++c)
            if (table_column(P, qpos[r], kpos[c]) == col) acc += dPs[r * L.lds + c];
        dtab[col] += acc;
      }
    }
  }
  block_sync();
  store_unrotated<T>(static_cast<T*>(P.dq) + b * P.sdqb + h * P.sdqh, P.sdqm, P.sdqd, m0, P.BM, P.Nq, dQs, L.ldf,
                     P.scale, qpos, P);
  if (P.dslope) {
    const float total = block_sum(d_slope, scratch_f);
    if (tid == 0) P.dslope[slot] = total;
  }
}

template <typename T>
static const char* run_dkdv(const Params& P, void* stream) {
  const size_t smem = DkDvLayout(P.BM, P.BN, P.BD, sizeof(T)).total;
  return launch_kernel(attn_bwd_dkdv_kernel<T>, Grid{cdiv(P.Nk, P.BN), unsigned(P.Hkv), unsigned(P.B)}, smem, stream,
                       P);
}

template <typename T>
static const char* run_dq(const Params& P, void* stream) {
  const size_t smem = DqLayout(P.BM, P.BN, P.BD, sizeof(T)).total;
  return launch_kernel(attn_bwd_dq_kernel<T>, Grid{unsigned(P.num_m), unsigned(P.Hq), unsigned(P.B)}, smem, stream, P);
}

const char* launch_bwd_dkdv(const Params& P, int dtype, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) { return run_dkdv<typename decltype(t)::type>(P, stream); });
}

const char* launch_bwd_dq(const Params& P, int dtype, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) { return run_dq<typename decltype(t)::type>(P, stream); });
}

}  // namespace posattn_cuda
