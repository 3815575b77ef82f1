"""Build script for posattn.

The project metadata (name, version, dependencies, extras) lives in
pyproject.toml; this file only gives the package layout.

Layout: the repository's top-level directory ``kernels/`` (the Triton
kernels) is installed as the subpackage ``posattn.kernels``. It must never
be installed as a top-level package ``kernels`` in site-packages, hence the
explicit ``packages`` and ``package_dir`` below (no automatic discovery).
This holds for both ``pip install .`` and ``pip install -e .``.

csrc/ is reserved for a later CUDA fallback and nothing in it is built now.
A later issue adds an optional torch.utils.cpp_extension CUDA extension,
built only when FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST is set; until then
this file must not import torch or compile anything.
"""

from setuptools import setup

setup(
    packages=["posattn", "posattn.kernels"],
    package_dir={"posattn": "posattn", "posattn.kernels": "kernels"},
)
