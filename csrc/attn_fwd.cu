// Forward kernel (online softmax) and the backward's delta = rowsum(dO * O) pass.
#include "kernels.cuh"

namespace posattn_cuda {

// One block per (query block, head, batch). Per key block: S = Q K^T (tensor cores
// for 16-bit types), then one warp per row turns its scores into probabilities with
// the running max / sum, rescales its output row, then O += P V.
template <typename T>
PA_KERNEL attn_fwd_kernel(const Params P) {
  unsigned char* sm = dyn_smem();
  const FwdLayout L(P.BM, P.BN, P.BD, sizeof(T));
  T* Qs = reinterpret_cast<T*>(sm + L.q);
  T* Ks = reinterpret_cast<T*>(sm + L.k);
  T* Vs = reinterpret_cast<T*>(sm + L.v);
  float* Os = reinterpret_cast<float*>(sm + L.o);
  float* Ss = reinterpret_cast<float*>(sm + L.s);
  T* Ps = reinterpret_cast<T*>(sm + L.p);
  int64_t* qpos = reinterpret_cast<int64_t*>(sm + L.qpos);
  int64_t* kpos = reinterpret_cast<int64_t*>(sm + L.kpos);
  float* row_m = reinterpret_cast<float*>(sm + L.m);
  float* row_l = reinterpret_cast<float*>(sm + L.l);

  const int tid = thread_x(), lane = lane_id(), warp = warp_id();
  const int64_t m0 = static_cast<int64_t>(block_x()) * P.BM;
  const int64_t h = block_y(), b = block_z(), hk = h / P.group;
  const T* q = static_cast<const T*>(P.q) + b * P.sqb + h * P.sqh;
  const T* k = static_cast<const T*>(P.k) + b * P.skb + hk * P.skh;
  const T* v = static_cast<const T*>(P.v) + b * P.svb + hk * P.svh;

  for (int r = tid; r < P.BM; r += kThreads) {
    qpos[r] = q_position(P, b, m0 + r);
    row_m[r] = -kInf;
    row_l[r] = 0.f;
  }
  for (int e = tid; e < P.BM * P.BD; e += kThreads) Os[(e / P.BD) * L.ldo + e % P.BD] = 0.f;
  block_sync();
  load_tile<T>(Qs, L.ldt, q, P.sqm, P.sqd, m0, P.BM, P.Nq, qpos, P, P.rope.on);
  const float slope = slope_of(P, b, h);

  int64_t lo, hi;
  key_range(P, m0, &lo, &hi);
  for (int64_t n0 = lo; n0 < hi; n0 += P.BN) {
    block_sync();  // the previous tile's readers of Ks, Vs, kpos are done
    for (int c = tid; c < P.BN; c += kThreads) kpos[c] = k_position(P, b, n0 + c);
    block_sync();
    load_tile<T>(Ks, L.ldt, k, P.skn, P.skd, n0, P.BN, P.Nk, kpos, P, P.rope.on);
    load_tile<T>(Vs, L.ldt, v, P.svn, P.svd, n0, P.BN, P.Nk, kpos, P, false);
    block_sync();
    mm<T, false, true>(P.BM, P.BN, P.BD, Qs, L.ldt, Ks, L.ldt, Ss, L.lds, false);
    block_sync();
    for (int r = warp; r < P.BM; r += kWarps) {  // warp-uniform: BM is a multiple of kWarps
      const float m_old = row_m[r];
      float mx = -kInf;
      for (int c = lane; c < P.BN; c += 32) {
        const float s = score2<T>(P, Ss[r * L.lds + c], b, h, m0 + r, n0 + c, qpos[r], kpos[c], slope);
        Ss[r * L.lds + c] = s;
        mx = fmaxf(mx, s);
      }
      const float m_new = fmaxf(m_old, warp_max(mx));
      // A row with nothing visible yet keeps m = -inf: subtract 0 instead, so that
      // exp2(-inf - -inf) never makes a NaN.
      const float m_safe = m_new == -kInf ? 0.f : m_new;
      float sum = 0.f;
      for (int c = lane; c < P.BN; c += 32) {
        const float p = exp2f(Ss[r * L.lds + c] - m_safe);
        Ps[r * L.ldp + c] = from_float<T>(p);
        sum += p;
      }
      sum = warp_sum(sum);
      const float alpha = exp2f(m_old - m_safe);
      for (int d = lane; d < P.BD; d += 32) Os[r * L.ldo + d] *= alpha;
      warp_sync();  // every lane has read row_m[r] and row_l[r]
      if (lane == 0) {
        row_l[r] = row_l[r] * alpha + sum;
        row_m[r] = m_new;
      }
    }
    block_sync();
    mm<T, false, false>(P.BM, P.BD, P.BN, Ps, L.ldp, Vs, L.ldt, Os, L.ldo, true);
  }
  block_sync();

  // Rows that saw no key: output 0, lse = -inf.
  const int64_t row0 = (b * P.Hq + h) * P.Nq;
  T* out = static_cast<T*>(P.out) + b * P.sob + h * P.soh;
  for (int e = tid; e < P.BM * P.BD; e += kThreads) {
    const int r = e / P.BD, d = e % P.BD;
    const int64_t i = m0 + r;
    if (i >= P.Nq || d >= P.D) continue;
    const float l = row_l[r];
    const float o = l == 0.f ? 0.f : Os[r * L.ldo + d] / l;
    out[i * P.som + d * P.sod] = from_float<T>(o);
    if (P.out32) P.out32[(row0 + i) * P.D + d] = o;
  }
  for (int r = tid; r < P.BM; r += kThreads) {
    const int64_t i = m0 + r;
    if (i >= P.Nq) continue;
    const float l = row_l[r];
    P.lse[row0 + i] = l == 0.f ? -kInf : (row_m[r] + log2f(l)) / kLog2e;
  }
}

// delta_i = sum_d dO_id * O_id (minus dLse_i when lse is differentiated): one warp
// per row, kWarps rows per block, grid (rows / kWarps, Hq, B).
template <typename T>
PA_KERNEL attn_bwd_delta_kernel(const Params P) {
  const int lane = lane_id();
  const int64_t i = static_cast<int64_t>(block_x()) * kWarps + warp_id();
  const int64_t h = block_y(), b = block_z();
  if (i >= P.Nq) return;  // warp-uniform; no block-wide synchronisation below
  const T* dout = static_cast<const T*>(P.dout) + b * P.sdob + h * P.sdoh + i * P.sdom;
  const int64_t o_off = b * P.s_ob + h * P.s_oh + i * P.s_om;
  float acc = 0.f;
  for (int d = lane; d < P.D; d += 32) {
    const float o = P.o_f32 ? static_cast<const float*>(P.o)[o_off + d * P.s_od]
                            : to_float(static_cast<const T*>(P.o)[o_off + d * P.s_od]);
    acc += o * to_float(dout[d * P.sdod]);
  }
  acc = warp_sum(acc);
  if (lane == 0) {
    const int64_t row = (b * P.Hq + h) * P.Nq + i;
    P.delta[row] = P.dlse ? acc - P.dlse[row] : acc;
  }
}

template <typename T>
static const char* run_fwd(const Params& P, void* stream) {
  const size_t smem = FwdLayout(P.BM, P.BN, P.BD, sizeof(T)).total;
  return launch_kernel(attn_fwd_kernel<T>, Grid{cdiv(P.Nq, P.BM), unsigned(P.Hq), unsigned(P.B)}, smem, stream, P);
}

template <typename T>
static const char* run_delta(const Params& P, void* stream) {
  return launch_kernel(attn_bwd_delta_kernel<T>, Grid{cdiv(P.Nq, kWarps), unsigned(P.Hq), unsigned(P.B)}, 0, stream,
                       P);
}

const char* launch_fwd(const Params& P, int dtype, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) { return run_fwd<typename decltype(t)::type>(P, stream); });
}

const char* launch_bwd_delta(const Params& P, int dtype, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) { return run_delta<typename decltype(t)::type>(P, stream); });
}

}  // namespace posattn_cuda
