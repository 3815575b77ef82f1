// The CUDA kernels compiled for the CPU emulation (emulate.h), for the tests on
// machines without a GPU: tests/test_cuda_emulated.py builds this file with ops.cpp,
// both with -DPOSATTN_EMULATE. Not part of the CUDA build.
#ifndef POSATTN_EMULATE
#error "emulate.cpp is built only with -DPOSATTN_EMULATE"
#endif

#include "attn_fwd.cu"
#include "attn_bwd.cu"
#include "attn_dbias.cu"
