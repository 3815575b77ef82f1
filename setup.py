"""Build script for posattn.

The project metadata (name, version, dependencies, extras) lives in
pyproject.toml; this file only gives the package layout and the optional
CUDA extension.

Layout: the repository's top-level directory ``kernels/`` (the Triton
kernels) is installed as the subpackage ``posattn.kernels``. It must never
be installed as a top-level package ``kernels`` in site-packages, hence the
explicit ``packages`` and ``package_dir`` below (no automatic discovery).
This holds for both ``pip install .`` and ``pip install -e .``.

csrc/ holds the CUDA C++ fallback (backend="cuda"). Its sources are installed
as data under posattn/csrc/ so that posattn/_cuda.py can build them just in
time at first use. Ahead of time, the extension ``posattn._C`` is built only
when FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST is set (architectures from
TORCH_CUDA_ARCH_LIST, default "8.0;9.0"); it needs torch importable at build
time, so use ``pip install --no-build-isolation .``. Otherwise this file
imports no torch and compiles nothing. With only TORCH_CUDA_ARCH_LIST set (as
many CUDA images do) and no torch or nvcc, it prints why and skips the
extension; with FORCE_CUDA=1 that is an error.
"""

import os
import sys

from setuptools import setup

CSRC_SOURCES = ["csrc/attn_fwd.cu", "csrc/attn_bwd.cu", "csrc/attn_dbias.cu", "csrc/ops.cpp", "csrc/module.cpp"]


def _cuda_extension():
    """setup() keyword arguments for the CUDA extension, or {} when not requested."""
    forced = os.environ.get("FORCE_CUDA", "0") not in ("", "0")
    if not forced and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return {}
    try:
        import torch  # noqa: F401  (only now: the extension was asked for)
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        why = (f"torch is not importable in the build environment ({e}); "
               f"install torch first and use pip install --no-build-isolation")
        if forced:
            raise RuntimeError(f"FORCE_CUDA=1: cannot build the posattn CUDA extension: {why}") from e
        print(f"posattn: TORCH_CUDA_ARCH_LIST is set but {why}: skipping the CUDA extension", file=sys.stderr)
        return {}
    if CUDA_HOME is None:
        why = "nvcc / the CUDA toolkit was not found (set CUDA_HOME) or torch has no CUDA"
        if forced:
            raise RuntimeError(f"FORCE_CUDA=1: cannot build the posattn CUDA extension: {why}")
        print(f"posattn: TORCH_CUDA_ARCH_LIST is set but {why}: skipping the CUDA extension", file=sys.stderr)
        return {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="posattn._C",
        sources=CSRC_SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    packages=["posattn", "posattn.integrations", "posattn.kernels", "posattn.csrc"],
    package_dir={"posattn": "posattn", "posattn.kernels": "kernels", "posattn.csrc": "csrc"},
    package_data={"posattn.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"]},
    **_cuda_extension(),
)
