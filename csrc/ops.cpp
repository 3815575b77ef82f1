// posattn CUDA fallback: the operators posattn_cuda::fwd and posattn_cuda::bwd.
//
// The schema is written once, here (TORCH_LIBRARY); the implementation is
// registered for the CUDA dispatch key. Every argument is checked up front with
// TORCH_CHECK, then the kernels (attn_*.cu) are launched on the current CUDA stream.
// posattn/_cuda.py wraps the two operators in an autograd.Function.
//
// Built with POSATTN_EMULATE (tests only, see emulate.h), the same code registers
// the namespace posattn_cuda_emu for CPU tensors and runs the kernels on CPU threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <optional>
#include <tuple>
#include <vector>

#ifndef POSATTN_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "posattn_cuda.h"

namespace posattn_cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#ifdef POSATTN_EMULATE
constexpr const char* kDeviceName = "CPU (emulation)";
bool on_device(const Tensor& t) { return t.device().is_cpu(); }
size_t max_shared_memory(const Tensor&) { return 166912; }  // sm_80's opt-in limit
void* current_stream(const Tensor&) { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const Tensor&) {}
};
#else
constexpr const char* kDeviceName = "CUDA";
bool on_device(const Tensor& t) { return t.is_cuda(); }
size_t max_shared_memory(const Tensor& t) {
  int value = 0;
  cudaError_t e = cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.get_device());
  TORCH_CHECK(e == cudaSuccess, "posattn_cuda: cannot query shared memory: ", cudaGetErrorString(e));
  return static_cast<size_t>(value);
}
void* current_stream(const Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.get_device()).stream());
}
struct DeviceGuard {
  explicit DeviceGuard(const Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
#endif

int dtype_code(const Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "posattn_cuda: q must be float16, bfloat16 or float32, got ", q.scalar_type());
  }
  return -1;
}

void check_on_device(const char* op, const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK(on_device(t), op, ": ", name, " must be a ", kDeviceName, " tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

void check_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// Tensors converted for the kernels, kept alive until the launches are queued
// (a deque: references to its elements stay valid as it grows).
struct Keep {
  std::deque<Tensor> tensors;
  const Tensor& operator()(Tensor t) {
    tensors.push_back(std::move(t));
    return tensors.back();
  }
};

// One setter per encoding (and the positions): its checks and its Params sub-struct.
void set_positions(const char* op, Params& P, Keep& keep, const Tensor& q, const OptTensor& q_pos,
                   const OptTensor& k_pos) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Nk = P.Nk, D = q.size(3);
  (void)B; (void)Hq; (void)Nq; (void)Nk; (void)D;
  TORCH_CHECK(q_pos.has_value() == k_pos.has_value(), op,
              ": pass both q_pos and k_pos or neither (materialise the default of the other side)");
  if (q_pos.has_value()) {
    const std::pair<const OptTensor*, int64_t> sides[] = {{&q_pos, Nq}, {&k_pos, Nk}};
    for (int s = 0; s < 2; ++s) {
      const Tensor& t = **sides[s].first;
      const char* name = s == 0 ? "q_pos" : "k_pos";
      check_on_device(op, name, t, q);
      TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                  " must be int32 or int64, got ", t.scalar_type());
      TORCH_CHECK(t.dim() == 2 && (t.size(0) == 1 || t.size(0) == B) && t.size(1) == sides[s].second, op, ": ", name,
                  " must be [1 or ", B, ", ", sides[s].second, "], got ", t.sizes());
      const Tensor& c = keep(t.to(at::kLong).contiguous());
      const int64_t stride = c.size(0) > 1 ? c.stride(0) : 0;
      if (s == 0) {
        P.pos.q = c.data_ptr<int64_t>();
        P.pos.sqb = stride;
      } else {
        P.pos.k = c.data_ptr<int64_t>();
        P.pos.skb = stride;
      }
    }
  }
}

void set_rope(const char* op, Params& P, Keep& keep, const Tensor& q, const OptTensor& inv_freq, int64_t rotary_dim,
              bool interleaved, double rope_factor) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Nk = P.Nk, D = q.size(3);
  (void)B; (void)Hq; (void)Nq; (void)Nk; (void)D;
  P.rope.on = rotary_dim > 0;
  P.rope.interleaved = interleaved;
  P.rope.rot_dim = static_cast<int>(rotary_dim);
  P.rope.factor = static_cast<float>(rope_factor);
  if (P.rope.on) {
    TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= D, op, ": rotary_dim must be even and <= D=", D, ", got ",
                rotary_dim);
    TORCH_CHECK(inv_freq.has_value(), op, ": rotary_dim > 0 needs inv_freq");
    check_on_device(op, "inv_freq", *inv_freq, q);
    check_float(op, "inv_freq", *inv_freq);
    TORCH_CHECK(inv_freq->dim() == 1 && inv_freq->numel() == rotary_dim / 2, op, ": inv_freq must be [",
                rotary_dim / 2, "] (rotary_dim / 2), got ", inv_freq->sizes());
    TORCH_CHECK(std::isfinite(rope_factor), op, ": rope_factor must be finite, got ", rope_factor);
    P.rope.inv_freq = keep(inv_freq->to(at::kFloat).contiguous()).data_ptr<float>();
  } else {
    TORCH_CHECK(rotary_dim == 0, op, ": rotary_dim must be >= 0, got ", rotary_dim);
  }
}

void set_alibi(const char* op, Params& P, Keep& keep, const Tensor& q, const OptTensor& alibi) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Nk = P.Nk, D = q.size(3);
  (void)B; (void)Hq; (void)Nq; (void)Nk; (void)D;
  if (alibi.has_value()) {
    check_on_device(op, "alibi", *alibi, q);
    check_float(op, "alibi", *alibi);
    TORCH_CHECK(alibi->dim() == 2 && (alibi->size(0) == 1 || alibi->size(0) == B) && alibi->size(1) == Hq, op,
                ": alibi slopes must be [1 or ", B, ", ", Hq, "], got ", alibi->sizes());
    const Tensor& s = keep(alibi->to(at::kFloat).contiguous());
    P.alibi.slopes = s.data_ptr<float>();
    P.alibi.sb = s.size(0) > 1 ? s.stride(0) : 0;
    P.alibi.sh = s.stride(1);
  }
}

void set_table(const char* op, Params& P, Keep& keep, const Tensor& q, const OptTensor& table, int64_t table_kind,
               int64_t table_a, int64_t table_b) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Nk = P.Nk, D = q.size(3);
  (void)B; (void)Hq; (void)Nq; (void)Nk; (void)D;
  if (table.has_value()) {
    check_on_device(op, "table", *table, q);
    check_float(op, "table", *table);
    TORCH_CHECK(table_kind == kDistTable || table_kind == kGridTable, op,
                ": table_kind must be 1 (distance) or 2 (grid) with a table, got ", table_kind);
    int64_t columns;
    if (table_kind == kDistTable) {
      TORCH_CHECK(table_a >= 0 && table_b >= 0, op, ": a distance table needs left, right >= 0, got ", table_a,
                  ", ", table_b);
      columns = table_a + table_b + 1;
    } else {
      TORCH_CHECK(table_a >= 1 && table_b >= 1, op, ": a grid table needs a window Wh, Ww >= 1, got ", table_a,
                  ", ", table_b);
      columns = (2 * table_a - 1) * (2 * table_b - 1);
    }
    TORCH_CHECK(table->dim() == 2 && table->size(0) == Hq && table->size(1) == columns, op, ": table must be [Hq=",
                Hq, ", ", columns, "] (", table_kind == kDistTable ? "left + right + 1" : "(2 Wh - 1)(2 Ww - 1)",
                "), got ", table->sizes());
    P.table.data = keep(table->to(at::kFloat).contiguous()).data_ptr<float>();
    P.table.kind = static_cast<int>(table_kind);
    P.table.a = table_a;
    P.table.b = table_b;
    P.table.columns = columns;
  } else {
    TORCH_CHECK(table_kind == kNoTable, op, ": table_kind ", table_kind, " without a table");
  }
}

void set_bias(const char* op, Params& P, const Tensor& q, const OptTensor& bias) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Nk = P.Nk, D = q.size(3);
  (void)B; (void)Hq; (void)Nq; (void)Nk; (void)D;
  if (bias.has_value()) {
    const Tensor& t = *bias;
    check_on_device(op, "bias", t, q);
    if (t.scalar_type() == at::kBool) {
      P.bias.kind = kMaskBias;
    } else if (t.scalar_type() == at::kFloat) {
      P.bias.kind = kF32Bias;
    } else {
      TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": bias must be bool, float32 or q's dtype ",
                  q.scalar_type(), ", got ", t.scalar_type());
      P.bias.kind = kSameBias;
    }
    const int64_t full[4] = {B, Hq, Nq, Nk};
    TORCH_CHECK(t.dim() == 4, op, ": bias must be 4-D (size 1 on broadcast axes), got ", t.sizes());
    int64_t strides[4];
    for (int d = 0; d < 4; ++d) {
      // The batch axis may also be periodic: a size nB dividing B, batch b reads bias[b % nB].
      const bool ok = t.size(d) == 1 || t.size(d) == full[d] || (d == 0 && t.size(0) > 0 && B % t.size(0) == 0);
      TORCH_CHECK(ok, op, ": bias must be broadcastable to [", B, ", ", Hq, ", ", Nq, ", ", Nk,
                  "] (its batch size may also divide B), got ", t.sizes());
      strides[d] = t.size(d) == 1 ? 0 : t.stride(d);
    }
    P.bias.nb = static_cast<int>(t.size(0));
    P.bias.data = t.data_ptr();
    P.bias.sb = strides[0]; P.bias.sh = strides[1]; P.bias.sm = strides[2]; P.bias.sn = strides[3];
  }
}

// The checks and Params fields that fwd and bwd share.
void fill_common(const char* op, Params& P, Keep& keep, const Tensor& q, const Tensor& k, const Tensor& v,
                 const OptTensor& q_pos, const OptTensor& k_pos, const OptTensor& inv_freq, const OptTensor& alibi,
                 const OptTensor& table, const OptTensor& bias, bool causal, double scale,
                 std::optional<int64_t> window_left, std::optional<int64_t> window_right, int64_t rotary_dim,
                 bool interleaved, double rope_factor, int64_t table_kind, int64_t table_a, int64_t table_b) {
  TORCH_CHECK(on_device(q), op, ": q must be a ", kDeviceName, " tensor, got one on ", q.device());
  check_on_device(op, "k", k, q);
  check_on_device(op, "v", v, q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D [B, H, N, D], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  dtype_code(q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes(), op,
              ": k and v must be [B, Hkv, Nk, D] with q's B and D, got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(B > 0 && Hq > 0 && Nq > 0 && Nk > 0 && Hkv > 0, op,
              ": empty problems (a zero dimension) are handled before dispatch, got q ", q.sizes(), ", k ",
              k.sizes());
  TORCH_CHECK(Hq % Hkv == 0, op, ": q heads (", Hq, ") must be a multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK(D >= 1 && D <= 256, op, ": head dim must be in 1..256, got ", D);
  TORCH_CHECK(B <= 65535 && Hq <= 65535, op, ": at most 65535 batches and heads (CUDA grid), got B=", B,
              ", Hq=", Hq);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  P.q = q.data_ptr();
  P.k = k.data_ptr();
  P.v = v.data_ptr();
  P.sqb = q.stride(0); P.sqh = q.stride(1); P.sqm = q.stride(2); P.sqd = q.stride(3);
  P.skb = k.stride(0); P.skh = k.stride(1); P.skn = k.stride(2); P.skd = k.stride(3);
  P.svb = v.stride(0); P.svh = v.stride(1); P.svn = v.stride(2); P.svd = v.stride(3);
  P.B = static_cast<int>(B);
  P.Hq = static_cast<int>(Hq);
  P.Hkv = static_cast<int>(Hkv);
  P.group = static_cast<int>(Hq / Hkv);
  P.D = static_cast<int>(D);
  P.BD = static_cast<int>((D + 15) / 16 * 16);
  P.Nq = Nq;
  P.Nk = Nk;
  P.scale = static_cast<float>(scale);
  P.qk_scale = static_cast<float>(scale * 1.4426950408889634);

  P.causal = causal;
  P.bias.nb = 1;
  P.has_wl = window_left.has_value();
  P.has_wr = window_right.has_value();
  TORCH_CHECK(!P.has_wl || *window_left >= 0, op, ": window_left must be >= 0, got ", *window_left);
  TORCH_CHECK(!P.has_wr || *window_right >= 0, op, ": window_right must be >= 0, got ", *window_right);
  // Wider than any distance, and small enough that the kernels' range arithmetic
  // (index + tile + window) cannot overflow int64.
  const int64_t kMaxWindow = int64_t(1) << 62;
  P.win_l = std::min(window_left.value_or(0), kMaxWindow);
  P.win_r = std::min(window_right.value_or(0), kMaxWindow);

  set_positions(op, P, keep, q, q_pos, k_pos);
  set_rope(op, P, keep, q, inv_freq, rotary_dim, interleaved, rope_factor);
  set_alibi(op, P, keep, q, alibi);
  set_table(op, P, keep, q, table, table_kind, table_a, table_b);
  set_bias(op, P, q, bias);
}

void check_launch(const char* op, const char* kernel, const char* err) {
  TORCH_CHECK(err == nullptr, op, ": launching ", kernel, " failed: ", err ? err : "");
}

void pick_tiles(const char* op, int kernel, const Tensor& q, Params& P) {
  const int esz = static_cast<int>(q.element_size());
  const size_t limit = max_shared_memory(q);
  TORCH_CHECK(choose_tiles(kernel, P.BD, esz, limit, &P.BM, &P.BN), op, ": head dim ", P.D, " in ", q.scalar_type(),
              " needs ", smem_bytes(kernel, 16, 16, P.BD, esz), " bytes of shared memory, the device allows ", limit);
}

std::tuple<Tensor, Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& q_pos,
                                       const OptTensor& k_pos, const OptTensor& inv_freq, const OptTensor& alibi,
                                       const OptTensor& table, const OptTensor& bias, bool causal, double scale,
                                       std::optional<int64_t> window_left, std::optional<int64_t> window_right,
                                       int64_t rotary_dim, bool interleaved, double rope_factor, int64_t table_kind,
                                       int64_t table_a, int64_t table_b, bool store_f32) {
  const char* op = "posattn_cuda.fwd";
  Params P{};
  Keep keep;
  fill_common(op, P, keep, q, k, v, q_pos, k_pos, inv_freq, alibi, table, bias, causal, scale, window_left,
              window_right, rotary_dim, interleaved, rope_factor, table_kind, table_a, table_b);
  DeviceGuard guard(q);
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor out = at::empty({P.B, P.Hq, P.Nq, P.D}, q.options());
  Tensor lse = at::empty({P.B, P.Hq, P.Nq}, f32);
  const bool keep32 = store_f32 && q.scalar_type() != at::kFloat;
  Tensor out32 = at::empty({keep32 ? P.B : 0, P.Hq, P.Nq, P.D}, f32);
  P.out = out.data_ptr();
  P.sob = out.stride(0); P.soh = out.stride(1); P.som = out.stride(2); P.sod = out.stride(3);
  P.out32 = keep32 ? out32.data_ptr<float>() : nullptr;
  P.lse = lse.data_ptr<float>();
  pick_tiles(op, kFwdKernel, q, P);
  check_launch(op, "the forward kernel", launch_fwd(P, dtype_code(q), current_stream(q)));
  return {out, lse, out32};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse, const Tensor& dout,
    const OptTensor& dlse, const OptTensor& q_pos, const OptTensor& k_pos, const OptTensor& inv_freq,
    const OptTensor& alibi, const OptTensor& table, const OptTensor& bias, bool causal, double scale,
    std::optional<int64_t> window_left, std::optional<int64_t> window_right, int64_t rotary_dim, bool interleaved,
    double rope_factor, int64_t table_kind, int64_t table_a, int64_t table_b, bool want_slope, bool want_table,
    bool want_bias) {
  const char* op = "posattn_cuda.bwd";
  Params P{};
  Keep keep;
  fill_common(op, P, keep, q, k, v, q_pos, k_pos, inv_freq, alibi, table, bias, causal, scale, window_left,
              window_right, rotary_dim, interleaved, rope_factor, table_kind, table_a, table_b);
  const std::vector<int64_t> rows{P.B, P.Hq, P.Nq};
  check_on_device(op, "out", out, q);
  check_on_device(op, "lse", lse, q);
  check_on_device(op, "dout", dout, q);
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() || out.scalar_type() == at::kFloat, op,
              ": out must be q's dtype or float32, got ", out.scalar_type());
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(), op,
              ": dout must have q's shape and dtype ", q.sizes(), " ", q.scalar_type(), ", got ", dout.sizes(), " ",
              dout.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(rows) && lse.scalar_type() == at::kFloat, op,
              ": lse must be float32 [B, Hq, Nq] = ", at::IntArrayRef(rows), ", got ", lse.scalar_type(), " ",
              lse.sizes());
  if (dlse.has_value()) {
    check_on_device(op, "dlse", *dlse, q);
    TORCH_CHECK(dlse->sizes() == at::IntArrayRef(rows), op, ": dlse must be [B, Hq, Nq] = ", at::IntArrayRef(rows),
                ", got ", dlse->sizes());
  }
  TORCH_CHECK(!want_slope || alibi.has_value(), op, ": want_slope needs alibi slopes");
  TORCH_CHECK(!want_table || table.has_value(), op, ": want_table needs a table");
  TORCH_CHECK(!want_bias || (bias.has_value() && P.bias.kind != kMaskBias), op,
              ": want_bias needs a float bias (a bool mask has no gradient)");

  DeviceGuard guard(q);
  const int dt = dtype_code(q);
  void* stream = current_stream(q);
  const auto f32 = q.options().dtype(at::kFloat);

  const Tensor& lse_c = keep(lse.contiguous());
  P.lse = lse_c.data_ptr<float>();
  P.o = out.data_ptr();
  P.o_f32 = out.scalar_type() == at::kFloat;
  P.s_ob = out.stride(0); P.s_oh = out.stride(1); P.s_om = out.stride(2); P.s_od = out.stride(3);
  P.dout = dout.data_ptr();
  P.sdob = dout.stride(0); P.sdoh = dout.stride(1); P.sdom = dout.stride(2); P.sdod = dout.stride(3);
  P.dlse = dlse.has_value() ? keep(dlse->to(at::kFloat).contiguous()).data_ptr<float>() : nullptr;
  Tensor delta = at::empty(rows, f32);
  P.delta = delta.data_ptr<float>();
  check_launch(op, "the delta kernel", launch_bwd_delta(P, dt, stream));

  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  P.dq = dq.data_ptr();
  P.sdqb = dq.stride(0); P.sdqh = dq.stride(1); P.sdqm = dq.stride(2); P.sdqd = dq.stride(3);
  P.dk = dk.data_ptr();
  P.sdkb = dk.stride(0); P.sdkh = dk.stride(1); P.sdkn = dk.stride(2); P.sdkd = dk.stride(3);
  P.dv = dv.data_ptr();
  P.sdvb = dv.stride(0); P.sdvh = dv.stride(1); P.sdvn = dv.stride(2); P.sdvd = dv.stride(3);

  pick_tiles(op, kDkDvKernel, q, P);
  check_launch(op, "the dK/dV kernel", launch_bwd_dkdv(P, dt, stream));

  pick_tiles(op, kDqKernel, q, P);
  P.num_m = static_cast<int>((P.Nq + P.BM - 1) / P.BM);
  Tensor dslope = want_slope ? at::zeros({P.B, P.Hq, P.num_m}, f32) : at::empty({0}, f32);
  Tensor dtable = want_table ? at::zeros({P.B, P.Hq, P.num_m, P.table.columns}, f32) : at::empty({0}, f32);
  P.dslope = want_slope ? dslope.data_ptr<float>() : nullptr;
  P.dtable = want_table ? dtable.data_ptr<float>() : nullptr;
  check_launch(op, "the dQ kernel", launch_bwd_dq(P, dt, stream));

  // Per-program partial sums, added in a fixed order.
  Tensor g_slope = want_slope ? dslope.sum(-1) : at::empty({0}, f32);              // [B, Hq]
  Tensor g_table = want_table ? dtable.sum(at::IntArrayRef{0, 2}) : at::empty({0}, f32);  // [Hq, T]
  Tensor g_bias = at::empty({0}, f32);
  if (want_bias) {
    const Tensor& t = *bias;
    g_bias = at::empty(t.sizes(), f32);  // the bias's own (broadcast) shape
    P.dbias = g_bias.data_ptr<float>();
    P.bh = static_cast<int>(t.size(1));
    P.bmq = t.size(2);
    P.bnk = t.size(3);
    P.head_bcast = P.bh == 1 && P.Hq > 1;
    P.row_bcast = P.bmq == 1 && P.Nq > 1;
    P.col_bcast = P.bnk == 1 && P.Nk > 1;
    pick_tiles(op, kDBiasKernel, q, P);
    P.num_n = P.bnk == 1 ? 1 : static_cast<int>((P.Nk + P.BN - 1) / P.BN);
    check_launch(op, "the d(bias) kernel", launch_bwd_dbias(P, dt, stream));
  }
  return {dq, dk, dv, g_slope, g_table, g_bias};
}

}  // namespace
}  // namespace posattn_cuda

#ifdef POSATTN_EMULATE
#define PA_LIBRARY posattn_cuda_emu
#define PA_DISPATCH_KEY CPU
#else
#define PA_LIBRARY posattn_cuda
#define PA_DISPATCH_KEY CUDA
#endif
// One level of indirection so that the macros above expand before TORCH_LIBRARY pastes them.
#define PA_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define PA_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

PA_TORCH_LIBRARY(PA_LIBRARY, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? q_pos, Tensor? k_pos, Tensor? inv_freq, Tensor? alibi, "
      "Tensor? table, Tensor? bias, bool causal, float scale, int? window_left, int? window_right, "
      "int rotary_dim, bool interleaved, float rope_factor, int table_kind, int table_a, int table_b, "
      "bool store_f32) "
      "-> (Tensor out, Tensor lse, Tensor out32)");
  m.def(
      "bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, Tensor? dlse, Tensor? q_pos, "
      "Tensor? k_pos, Tensor? inv_freq, Tensor? alibi, Tensor? table, Tensor? bias, bool causal, float scale, "
      "int? window_left, int? window_right, int rotary_dim, bool interleaved, float rope_factor, int table_kind, "
      "int table_a, int table_b, bool want_slope, bool want_table, bool want_bias) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dslope, Tensor dtable, Tensor dbias)");
}

PA_TORCH_LIBRARY_IMPL(PA_LIBRARY, PA_DISPATCH_KEY, m) {
  m.impl("fwd", &posattn_cuda::fwd);
  m.impl("bwd", &posattn_cuda::bwd);
}
