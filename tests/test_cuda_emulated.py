"""The CUDA fallback's kernels run on CPU, without a GPU: csrc/ compiled with a host
compiler against csrc/emulate.h (CUDA threads as OS threads, __syncthreads as a
barrier, WMMA fragments with their documented semantics and alignment checks), and
registered as torch.ops.posattn_cuda_emu for CPU tensors. posattn/_cuda.py's
autograd wrapper and csrc/ops.cpp's argument checks run unchanged.

What this does not check: nvcc's code generation, the real tensor-core fragment
layouts, the CUDA launch configuration and shared-memory limits on a device (see
test_cuda_backend.py on a GPU, and test_cuda_build.py for the nvcc compile).
The build (about 15 s) is cached in build/ and skipped, with the reason, when it
fails (e.g. no C++20 compiler).
"""
import threading
from pathlib import Path

import pytest
import torch

import posattn
import test_cuda_backend
import test_kernels as K
from posattn import _cuda
from test_kernels import DTYPES, ENCODINGS, MASKS, SHAPES

ROOT = Path(__file__).resolve().parent.parent
_lock = threading.Lock()
_state = {}


def _build():
    """None when torch.ops.posattn_cuda_emu is loaded, else why not."""
    with _lock:
        if "error" not in _state:
            try:
                from torch.utils import cpp_extension
                out = ROOT / "build" / f"emulated-torch{torch.__version__.replace('+', '_')}"
                out.mkdir(parents=True, exist_ok=True)
                cpp_extension.load(name="posattn_cuda_emu",
                                   sources=[str(ROOT / "csrc" / "ops.cpp"), str(ROOT / "csrc" / "emulate.cpp")],
                                   extra_cflags=["-DPOSATTN_EMULATE", "-O2", "-std=c++20"],
                                   extra_ldflags=["-pthread"], build_directory=str(out),
                                   is_python_module=False)
                _state["error"] = None
            except Exception as e:  # no compiler, no ninja, no C++20, ...
                lines = str(e).strip().splitlines()
                _state["error"] = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        return _state["error"]


@pytest.fixture
def emulated(monkeypatch):
    why = _build()
    if why is not None:
        pytest.skip(f"the emulated CUDA kernels could not be built: {why}")
    # Keep the backend's own feature refusals; only the device and build checks go.
    monkeypatch.setattr(_cuda, "refusal", _cuda.unsupported)
    monkeypatch.setattr(_cuda, "_ops", lambda: torch.ops.posattn_cuda_emu)
    return "cpu"


# The kernel tests (tests/test_kernels.py), called with backend="cuda" on CPU: a
# selection that keeps CI short (every encoding x mask once, the dtype rotating; the
# GPU runs the full matrix).
CUDA = dict(backend="cuda")


@pytest.mark.parametrize("enc,mask", [(e, m) for e in ENCODINGS for m in MASKS])
def test_encoding_mask(enc, mask, emulated):
    dtype = DTYPES[(ENCODINGS.index(enc) + list(MASKS).index(mask)) % len(DTYPES)]
    K.test_encoding_mask_dtype(enc, mask, dtype, emulated, **CUDA)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + ("T" if s[6] else ""))
def test_shapes_all_encodings(shape, emulated):
    dtype = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16][SHAPES.index(shape)]
    K.test_shapes_all_encodings(shape, dtype, emulated, **CUDA)


# Head dims, including those whose tiles shrink to fit shared memory (float32, 256).
@pytest.mark.parametrize("D,dtype", [(8, torch.float16), (40, torch.bfloat16), (80, torch.float32),
                                     (128, torch.float16), (256, torch.bfloat16), (256, torch.float32)],
                         ids=str)
def test_head_dims(D, dtype, emulated):
    K.test_head_dims(D, emulated, dtype=dtype, **CUDA)


def test_explicit_positions_packed(emulated):
    K.test_explicit_positions_packed(torch.bfloat16, emulated, **CUDA)


def test_kv_cache_decoding(emulated):
    K.test_kv_cache_decoding(torch.float32, emulated, **CUDA)


def test_shuffled_positions_window(emulated):
    K.test_shuffled_positions_window(emulated, **CUDA)


@pytest.mark.parametrize("bshape", [(2, 3, 40, 70), (3, 1, 70), (1, 1, 1, 70), (2, 1, 1, 70)])
def test_dense_bias_broadcast_gradient(bshape, emulated):
    K.test_dense_bias_broadcast_gradient(bshape, emulated, **CUDA)


@pytest.mark.parametrize("bshape", [(2, 3, 40, 1), (1, 1, 1, 1)])
def test_key_constant_bias_has_zero_gradient(bshape, emulated):
    K.test_key_constant_bias_has_zero_gradient(bshape, emulated, **CUDA)


def test_bias_float32_with_half_inputs(emulated):
    K.test_bias_float32_with_half_inputs(emulated, dtype=torch.float16, **CUDA)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_are_zero_without_nan(dtype, emulated):
    K.test_empty_rows_are_zero_without_nan(dtype, emulated, **CUDA)


def test_huge_windows(emulated):
    K.test_huge_windows(emulated, **CUDA)


def test_fully_masked_everything(emulated):
    K.test_fully_masked_everything(emulated, **CUDA)


def test_lse_and_its_gradient(emulated):
    K.test_lse_and_its_gradient(emulated, **CUDA)


def test_scale_and_t5(emulated):
    K.test_scale_and_t5(emulated, **CUDA)


def test_wide_distance_table(emulated):
    K.test_wide_distance_table(emulated, **CUDA)


def test_parameter_gradients_are_deterministic(emulated):
    K.test_parameter_gradients_are_deterministic(emulated, **CUDA)


def test_inputs_not_mutated(emulated):
    K.test_inputs_not_mutated(emulated, **CUDA)


def test_single_key(emulated):
    K.test_single_key(emulated, **CUDA)


def test_any_strides(emulated):
    K.test_any_strides(emulated, **CUDA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_grid_bias(dtype, emulated):
    K.test_grid_bias(dtype, emulated, **CUDA)


def test_grid_bias_with_masks_and_gqa(emulated):
    K.test_grid_bias_with_masks_and_gqa("window", emulated, **CUDA)


def test_periodic_bias_batch(emulated):
    K.test_periodic_bias_batch(emulated, **CUDA)


def test_operator_checks_arguments(emulated):
    test_cuda_backend.case_operator_checks_arguments(emulated)


def test_double_backward_and_func_grad(emulated):
    """The CUDA backend's backward is differentiable too (posattn._autograd.FusedBackward)."""
    from attn_check import rel_err
    q, k, v = (torch.randn(1, 2, 19, 16, requires_grad=True) for _ in range(3))
    slopes = posattn.alibi_slopes(2).requires_grad_()
    grads = {}
    for backend in ("cuda", "reference"):
        out = posattn.attention(q, k, v, causal=True, rope=posattn.RoPE(), alibi_slopes=slopes, backend=backend)
        first = torch.autograd.grad(out.pow(2).sum(), (q, k, slopes), create_graph=True)
        grads[backend] = torch.autograd.grad(sum(g.pow(2).sum() for g in first), (q, k, v, slopes))
    for a, b in zip(grads["cuda"], grads["reference"]):
        assert rel_err(a, b) < 1e-4
    with pytest.raises(NotImplementedError, match="posattn: torch.func.vmap is not supported by the 'cuda'"):
        torch.func.vmap(lambda x: posattn.attention(x, k.detach(), v.detach(), backend="cuda"))(q.detach()[None])


@pytest.mark.parametrize("window", [(None, 2 ** 31 - 1), (2 ** 31 - 1, 0), (2 ** 32, 3)])
def test_int32_edges(window, emulated):
    """Windows and explicit positions at the int32 edges (the CUDA kernels use int64)."""
    from attn_check import check
    top = 2 ** 31 - 1
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (21, 30, 30))
    check(q, k, v, backend="cuda", window=window, causal=window[1] == 0)
    check(q, k, v, backend="cuda", q_pos=torch.arange(top - 20, top + 1, dtype=torch.int32),
          k_pos=torch.arange(-2 ** 31, -2 ** 31 + 30, dtype=torch.int32), window=(2 ** 32 + 10, None))


def test_rope_large_positions_and_scaled_frequencies(emulated):
    K.test_rope_large_positions_and_scaled_frequencies(True, emulated, **CUDA)
