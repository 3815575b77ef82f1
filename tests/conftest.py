"""Shared fixtures. No CUDA query happens at import or collection time: the device
is chosen inside the `device` fixture, when a test runs."""
import os

import pytest
import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _bf16_round_to_nearest_in_interpreter():
    """Triton's interpreter converts float32 to bfloat16 by truncating the mantissa;
    GPUs (cvt.rn) and PyTorch round to nearest even. Truncation doubles every bf16
    rounding error of the kernels under the interpreter, so the precision rule (2x
    PyTorch's error) failed at random on small problems for a reason the GPU does not
    have. The interpreter's cast is patched to round as the GPU does;
    tests/test_no_silent.py::test_bf16_conversion_rounds_to_nearest checks it."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
        builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
        original = builder.cast_impl
    except (ImportError, AttributeError):  # a Triton without this hook: the test above says so
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            lsb = (bits >> np.uint32(16)) & np.uint32(1)
            rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
            nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            rounded = np.where(nan, ((bits >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), rounded)
            return handle(rounded, dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl


if interpreting():
    _bf16_round_to_nearest_in_interpreter()


@pytest.fixture
def device():
    """Where the Triton kernels run: CPU tensors under TRITON_INTERPRET=1, else a CUDA
    GPU; without either the kernel tests skip cleanly."""
    if interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set: the Triton kernels cannot run")


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    """The fused backend a kernel test runs on the `device` fixture's device: triton,
    or cuda (the CUDA C++ fallback: a CUDA GPU and its extension; on CPU
    tests/test_cuda_emulated.py calls the same test functions with backend="cuda")."""
    if request.param == "cuda":
        if interpreting() or not torch.cuda.is_available():
            pytest.skip("the CUDA backend needs a CUDA GPU (tests/test_cuda_emulated.py runs it on CPU)")
        from posattn import _cuda, _validate
        q = torch.zeros(1, 1, 1, 16, device="cuda")
        why = _cuda.refusal(_validate.check(q, q, q))
        if why is not None:
            pytest.skip(f"backend 'cuda' refused: {why}")
    return request.param


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs for every test (the seed is printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_logreport(report):
    if report.failed:
        for name, value in report.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"torch.manual_seed({value})"))
