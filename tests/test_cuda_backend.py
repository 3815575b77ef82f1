"""The CUDA C++ fallback (csrc/, backend="cuda"): what is particular to it. Its
numerics are the kernel tests' (tests/test_kernels.py runs every case once per
backend: on a CUDA GPU with the extension built here, on CPU through the kernels'
emulation in test_cuda_emulated.py). Here: the operators' own argument checks, the
stream it runs on, the fallback warnings, and the dispatch tests, which run anywhere.

On a machine with a CUDA GPU the extension is built (or loaded) at first use;
elsewhere the GPU tests skip (the check happens inside the fixture, never at import
or collection).
"""
import warnings

import pytest
import torch

import posattn
from posattn import _cuda, _validate, interface
from test_kernels import make_qkv


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the CUDA backend cannot run (test_cuda_emulated.py covers its kernels on CPU)")
    q = torch.zeros(1, 1, 1, 16, device="cuda")
    why = _cuda.refusal(_validate.check(q, q, q))
    if why is not None:
        pytest.skip(f"backend 'cuda' refused: {why}")
    return "cuda"


def attn(*args, **kwargs):
    return posattn.attention(*args, backend="cuda", **kwargs)


def case_operator_checks_arguments(device):
    """The operators check their arguments themselves (TORCH_CHECK), with clear messages."""
    ops = _cuda._ops()
    q, k, v = make_qkv((1, 2, 1, 8, 8, 16, False), torch.float32, device, requires_grad=False)
    none = (None,) * 6
    scalars = (False, 0.25, None, None, 0, False, 1.0, 0, 0, 0, False)
    ops.fwd(q, k, v, *none, *scalars)
    with pytest.raises(RuntimeError, match="multiple of k/v heads"):
        ops.fwd(q, k[:, :, :, :].repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1), *none, *scalars)
    with pytest.raises(RuntimeError, match="head dim"):
        x = torch.zeros(1, 1, 4, 300, device=device)
        ops.fwd(x, x, x, *none, *scalars)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.fwd(q, k.double(), v, *none, *scalars)
    with pytest.raises(RuntimeError, match="both q_pos and k_pos"):
        ops.fwd(q, k, v, torch.arange(8, device=device)[None], *none[1:], *scalars)
    with pytest.raises(RuntimeError, match="needs inv_freq"):
        ops.fwd(q, k, v, *none, False, 0.25, None, None, 16, False, 1.0, 0, 0, 0, False)
    with pytest.raises(RuntimeError, match=r"table must be \[Hq=2, 9\]"):
        ops.fwd(q, k, v, *none[:4], torch.zeros(2, 8, device=device), None, False, 0.25, None, None, 0,
                False, 1.0, 2, 2, 2, False)
    with pytest.raises(RuntimeError, match="bias must be broadcastable"):
        ops.fwd(q, k, v, *none[:5], torch.zeros(1, 1, 3, 8, device=device), *scalars)
    with pytest.raises(RuntimeError, match="bias must be broadcastable"):  # batch 2 does not divide B = 1
        ops.fwd(q, k, v, *none[:5], torch.zeros(2, 1, 8, 8, device=device), *scalars)


# ----------------------------------------------------------------------------- on a GPU

def test_operator_checks_arguments(cuda_device):
    case_operator_checks_arguments(cuda_device)


def test_runs_on_the_current_stream(cuda_device):
    """Launched on the current stream: work queued on a side stream sees its inputs."""
    q, k, v = make_qkv((1, 2, 1, 300, 300, 64, False), torch.float16, cuda_device, requires_grad=False)
    ref = attn(q, k, v, causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = attn(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(out, ref)


def test_automatic_fallback_warns(cuda_device, monkeypatch):
    """Automatic dispatch: triton -> cuda -> reference, each fallback says who refused and why."""
    q, k, v = make_qkv((1, 2, 1, 30, 30, 16, False), torch.float16, cuda_device, requires_grad=False)
    monkeypatch.setattr(posattn._triton, "refusal", lambda p: "pretend triton is missing")
    with pytest.warns(UserWarning, match=r"backend 'triton' refused: pretend triton is missing; using backend 'cuda'"):
        assert posattn.select_backend(q, k, v) == "cuda"
    monkeypatch.setattr(_cuda, "refusal", lambda p: "extension not built: pretend")
    with pytest.warns(UserWarning, match=r"backend 'cuda' refused: extension not built: pretend; using the reference"):
        out = posattn.attention(q, k, v)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match=r"backend 'cuda' refused: extension not built: pretend"):
        posattn.attention(q, k, v, backend="cuda")


# ----------------------------------------------------------------------------- dispatch, anywhere

def _cpu_qkv():
    return make_qkv((1, 2, 1, 10, 10, 16, False), torch.float32, "cpu", requires_grad=False)


def test_cuda_is_a_backend():
    assert "cuda" in interface.BACKENDS


def test_forced_cuda_on_cpu_tensors_says_why(monkeypatch):
    q, k, v = _cpu_qkv()
    with pytest.raises(ValueError, match=r"backend 'cuda' refused: tensors are not on a CUDA device"):
        posattn.attention(q, k, v, backend="cuda")
    monkeypatch.setenv("POSATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"backend 'cuda' \(from POSATTN_BACKEND\) refused: tensors are not"):
        posattn.select_backend(q, k, v)


def test_cpu_tensors_stay_on_the_reference_silently(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take the documented reference path: no warning."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("POSATTN_BACKEND", raising=False)
    q, k, v = _cpu_qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert posattn.select_backend(q, k, v) == "reference"
        posattn.attention(q, k, v)


def test_refusal_reasons():
    q, k, v = _cpu_qkv()
    assert _cuda.refusal(_validate.check(q, k, v)) == "tensors are not on a CUDA device"
    assert "float64" in _cuda.unsupported(_validate.check(q.double(), k.double(), v.double()))
    assert _cuda.unsupported(_validate.check(q, k, v, rope=posattn.RoPE(), causal=True)) is None
