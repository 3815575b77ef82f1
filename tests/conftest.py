"""Shared fixtures. No CUDA query happens at import or collection time: the device
is chosen inside the `device` fixture, when a test runs."""
import os

import pytest
import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
