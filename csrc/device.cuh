// The few CUDA primitives the kernels use, behind one small interface, so that the
// same kernel source compiles with nvcc for the GPU and, with POSATTN_EMULATE
// defined, with a host C++ compiler against a CPU emulation (emulate.h) used by the
// test suite on machines without a GPU.
//
//   PA_KERNEL / PA_DEV            kernel / device-function qualifiers
//   thread_x(), block_x/y/z()     thread and block indices
//   block_sync(), warp_sync()     __syncthreads / __syncwarp
//   shfl_xor(v, lane_mask)        __shfl_xor_sync over the full warp
//   dyn_smem()                    the dynamic shared-memory buffer
//   to_float(x), from_float<T>()  conversions (round to nearest even)
//   wmma::                        nvcuda::wmma (16x16x16 tiles)
//   launch_kernel(...)            launch with dynamic shared memory on a stream
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "posattn_cuda.h"

#ifdef POSATTN_EMULATE
#include "emulate.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

namespace posattn_cuda {

#ifndef POSATTN_EMULATE

#define PA_KERNEL __global__ void __launch_bounds__(kThreads)
#define PA_DEV __device__ __forceinline__

using half_t = __half;
using bf16_t = __nv_bfloat16;
namespace wmma = nvcuda::wmma;

PA_DEV int thread_x() { return threadIdx.x; }
PA_DEV int block_x() { return blockIdx.x; }
PA_DEV int block_y() { return blockIdx.y; }
PA_DEV int block_z() { return blockIdx.z; }
PA_DEV void block_sync() { __syncthreads(); }
PA_DEV void warp_sync() { __syncwarp(); }
template <typename V>
PA_DEV V shfl_xor(V v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
PA_DEV unsigned char* dyn_smem() {
  extern __shared__ __align__(128) unsigned char pa_dyn_smem[];
  return pa_dyn_smem;
}

PA_DEV float to_float(float x) { return x; }
PA_DEV float to_float(half_t x) { return __half2float(x); }
PA_DEV float to_float(bf16_t x) { return __bfloat162float(x); }
template <typename T> PA_DEV T from_float(float x);
template <> PA_DEV float from_float<float>(float x) { return x; }
template <> PA_DEV half_t from_float<half_t>(float x) { return __float2half_rn(x); }
template <> PA_DEV bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }

// Tensor-core tiles for 16-bit types (bfloat16 WMMA needs sm_80; below it, and for
// float32, the plain path).
template <typename T> struct UseTensorCores { static constexpr bool value = false; };
template <> struct UseTensorCores<half_t> { static constexpr bool value = true; };
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <> struct UseTensorCores<bf16_t> { static constexpr bool value = true; };
#endif

struct Grid { unsigned x, y, z; };

template <typename Kern>
inline const char* launch_kernel(Kern kern, Grid g, size_t smem, void* stream, const Params& P) {
  cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(kern),
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return cudaGetErrorString(e);
  kern<<<dim3(g.x, g.y, g.z), kThreads, smem, static_cast<cudaStream_t>(stream)>>>(P);
  e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

#else  // POSATTN_EMULATE

#define PA_KERNEL inline void
#define PA_DEV inline

using half_t = c10::Half;
using bf16_t = c10::BFloat16;
namespace wmma = posattn_emu::wmma;

inline int thread_x() { return posattn_emu::ctx.tid; }
inline int block_x() { return posattn_emu::ctx.bx; }
inline int block_y() { return posattn_emu::ctx.by; }
inline int block_z() { return posattn_emu::ctx.bz; }
inline void block_sync() { posattn_emu::syncthreads(); }
inline void warp_sync() { posattn_emu::syncwarp(); }
template <typename V>
inline V shfl_xor(V v, int mask) { return posattn_emu::shfl_xor(v, mask); }
inline unsigned char* dyn_smem() { return posattn_emu::ctx.block->smem; }

inline float to_float(float x) { return x; }
inline float to_float(half_t x) { return static_cast<float>(x); }
inline float to_float(bf16_t x) { return static_cast<float>(x); }
template <typename T> inline T from_float(float x) { return T(x); }

template <typename T> struct UseTensorCores { static constexpr bool value = !std::is_same<T, float>::value; };

struct Grid { unsigned x, y, z; };

template <typename Kern>
inline const char* launch_kernel(Kern kern, Grid g, size_t smem, void*, const Params& P) {
  return posattn_emu::launch(g.x, g.y, g.z, kThreads, smem, [&] { kern(P); });
}

#endif  // POSATTN_EMULATE

inline unsigned cdiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// The one dtype dispatch: calls run(Tag<T>{}) for the element type of a DType code.
template <typename T> struct Tag { using type = T; };

template <typename Run>
inline const char* dispatch_dtype(int dtype, Run&& run) {
  switch (dtype) {
    case kF32: return run(Tag<float>{});
    case kF16: return run(Tag<half_t>{});
    case kBF16: return run(Tag<bf16_t>{});
  }
  return "posattn_cuda: unknown dtype code";
}

}  // namespace posattn_cuda
