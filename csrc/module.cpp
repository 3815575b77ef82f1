// The Python module posattn._C built ahead of time by setup.py (FORCE_CUDA=1 or
// TORCH_CUDA_ARCH_LIST): importing it loads the library, whose static initialisers
// register the posattn_cuda operators (ops.cpp). It defines no Python functions.
// The just-in-time build (posattn/_cuda.py) leaves this file out and loads the
// library with torch.ops.load_library instead.
#include <Python.h>

static struct PyModuleDef posattn_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "posattn CUDA fallback: registers torch.ops.posattn_cuda.fwd / bwd", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&posattn_c_module); }
