"""posattn's Triton kernels. This top-level directory of the repository is installed
as the subpackage ``posattn.kernels`` (setup.py's package_dir), never as a top-level
``kernels``: import it only as ``posattn.kernels`` (``from .kernels import ...``
inside posattn). The kernels are in ``posattn.kernels.attention`` (see its docstring
for the modules by concern)."""
