"""The CUDA C++ fallback (csrc/, backend="cuda") against the float64 reference: the
cases of test_kernels.py, run through posattn.attention(..., backend="cuda").

On a machine with a CUDA GPU the extension is built (or loaded) at first use and
every case runs; elsewhere they skip (the check happens inside the fixture, never
at import or collection). test_cuda_emulated.py runs the same case functions on CPU
through the kernels' emulation. The dispatch tests at the end run everywhere.
"""
import warnings

import pytest
import torch

import posattn
from attn_check import check
from posattn import _cuda, _validate, interface
from test_kernels import DTYPES, ENCODINGS, MASKS, SHAPES, encoding, make_qkv


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


# ----------------------------------------------------------------------------- cases
# Plain functions of the device, shared with test_cuda_emulated.py.

def case_encoding_mask_dtype(device, enc, mask, dtype):
    i = ENCODINGS.index(enc) + list(MASKS).index(mask) + DTYPES.index(dtype)
    shape = SHAPES[i % len(SHAPES)]
    q, k, v = make_qkv(shape, dtype, device)
    kw = dict(**MASKS[mask], **encoding(enc, shape, device, dtype))
    if _cuda.DECLARATION.refusal(_validate.check(q, k, v, **kw)) is not None:
        # an encoding the CUDA fallback does not implement (KERPLE): refused, naming it
        with pytest.raises(ValueError, match=r"backend 'cuda' refused: .*is not implemented by the cuda backend"):
            attn(q, k, v, **kw)
        return
    check(q, k, v, backend="cuda", **kw)


def case_shapes_all_encodings(device, shape, dtype):
    q, k, v = make_qkv(shape, dtype, device)
    check(q, k, v, backend="cuda", causal=True, window=(40, None), return_lse=True, grad_lse=True,
          **encoding("rope+alibi+dist+bias", shape, device, dtype))


def case_head_dim(device, D, dtype):
    q, k, v = make_qkv((1, 2, 1, 50, 67, D, False), dtype, device)
    check(q, k, v, backend="cuda", causal=True, rope=posattn.RoPE(), return_lse=True)


def case_explicit_positions_packed(device, dtype):
    B, Hq, N, D = 2, 2, 90, 32
    q, k, v = make_qkv((B, Hq, Hq, N, N, D, False), dtype, device)
    pos = torch.cat([torch.arange(40), torch.arange(50)]).to(device)
    pos = torch.stack([pos, torch.arange(N, device=device)])
    seg = torch.stack([torch.cat([torch.zeros(40), torch.ones(50)]), torch.zeros(N)]).to(device)
    same = (seg[:, None, :, None] == seg[:, None, None, :])
    check(q, k, v, backend="cuda", causal=True, q_pos=pos, k_pos=pos, bias=same, rope=posattn.RoPE(),
          rel_bias=posattn.DistanceBias(torch.randn(Hq, 9, device=device).requires_grad_(), 5, 3),
          return_lse=True)


def case_kv_cache_decoding(device, dtype):
    Nq, Nk = 3, 181
    q, k, v = make_qkv((2, 4, 1, Nq, Nk, 64, False), dtype, device)
    k_pos = torch.arange(Nk, device=device, dtype=torch.int32)
    q_pos = torch.arange(Nk - Nq, Nk, device=device, dtype=torch.int32)
    check(q, k, v, backend="cuda", causal=True, q_pos=q_pos, k_pos=k_pos, rope=posattn.RoPE(),
          alibi_slopes=posattn.alibi_slopes(4, device=device))


def case_shuffled_positions_window(device):
    q, k, v = make_qkv((1, 2, 2, 77, 66, 32, False), torch.float32, device)
    q_pos = torch.randperm(200, device=device)[:77]
    k_pos = torch.randperm(200, device=device)[:66][None]
    check(q, k, v, backend="cuda", window=(30, 10), q_pos=q_pos, k_pos=k_pos, return_lse=True,
          alibi_slopes=torch.rand(1, 2, device=device).requires_grad_(),
          rel_bias=posattn.DistanceBias(torch.randn(2, 41, device=device).requires_grad_(), 20, 20))


def case_dense_bias_broadcast_gradient(device, bshape):
    q, k, v = make_qkv((2, 3, 1, 40, 70, 32, False), torch.float32, device)
    bias = torch.randn(bshape, device=device).requires_grad_()
    errors = check(q, k, v, backend="cuda", causal=True, bias=bias)
    assert "dbias" in errors


def case_key_constant_bias_has_zero_gradient(device, bshape):
    """A bias constant along the keys shifts each softmax row by a constant: the output
    does not change and its gradient is exactly 0 (the kernel sums dS over the keys,
    which cancels to rounding noise; a relative error is meaningless there)."""
    q, k, v = make_qkv((2, 3, 1, 40, 70, 32, False), torch.float32, device)
    bias = torch.randn(bshape, device=device).requires_grad_()
    out = attn(q, k, v, causal=True, bias=bias)
    ref = posattn.reference.attention(q, k, v, causal=True)
    assert torch.allclose(out, ref, atol=1e-5)
    (g,) = torch.autograd.grad(out, bias, torch.randn_like(out))
    assert g.shape == bias.shape and g.abs().max() < 1e-3


def case_bias_float32_with_half_inputs(device, dtype):
    q, k, v = make_qkv((1, 2, 2, 60, 60, 32, False), dtype, device)
    check(q, k, v, backend="cuda", bias=torch.randn(2, 60, 60, device=device).requires_grad_())


def case_empty_rows_are_zero_without_nan(device, dtype):
    q, k, v = make_qkv((1, 2, 1, 70, 50, 32, False), dtype, device)
    q_pos = torch.cat([torch.full((20,), 1000), torch.arange(50)]).to(device)
    table = torch.randn(2, 7, device=device).requires_grad_()
    out, lse = attn(q, k, v, causal=True, window=(3, None), q_pos=q_pos,
                    rel_bias=posattn.DistanceBias(table, 3, 3), return_lse=True)
    assert torch.all(out[:, :, :20] == 0)
    assert torch.all(lse[:, :, :20] == float("-inf"))
    assert torch.isfinite(lse[:, :, 20:]).all()
    (out.float().square().sum()).backward()
    for x in (q, k, v, table):
        assert torch.isfinite(x.grad).all()
    assert torch.all(q.grad[:, :, :20] == 0)
    check(q, k, v, backend="cuda", causal=True, window=(3, None), q_pos=q_pos,
          rel_bias=posattn.DistanceBias(table, 3, 3), return_lse=True)


def case_huge_windows(device):
    """Windows as wide as int64 allows behave as unbounded (no overflow in the
    kernels' tile ranges: index + tile + window)."""
    q, k, v = make_qkv((1, 2, 1, 50, 70, 32, False), torch.float32, device)
    check(q, k, v, backend="cuda", window=(2 ** 63 - 1, 2 ** 63 - 1), return_lse=True)
    check(q, k, v, backend="cuda", window=(2 ** 62 + 5, 3), causal=True)


def case_fully_masked_everything(device):
    q, k, v = make_qkv((1, 1, 1, 20, 30, 16, False), torch.float32, device)
    mask = torch.zeros(20, 30, dtype=torch.bool, device=device)
    out, lse = attn(q, k, v, bias=mask, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert torch.all(q.grad == 0) and torch.all(k.grad == 0) and torch.all(v.grad == 0)


def case_lse_and_its_gradient(device):
    q, k, v = make_qkv((1, 2, 1, 66, 99, 48, True), torch.float32, device)
    check(q, k, v, backend="cuda", return_lse=True, grad_lse=True, rope=posattn.RoPE(), causal=True)


def case_scale_and_t5(device):
    q, k, v = make_qkv((2, 4, 4, 100, 100, 32, False), torch.float32, device)
    weight = torch.randn(32, 4, device=device, requires_grad=True)
    rb = posattn.DistanceBias.t5(weight, num_buckets=32, max_distance=40)
    out = attn(q, k, v, scale=1.0, rel_bias=rb)
    w64 = weight.detach().double().requires_grad_()
    ref = posattn.reference.attention(*(x.detach().double() for x in (q, k, v)), scale=1.0,
                                      rel_bias=posattn.DistanceBias.t5(w64, 32, 40))
    tol = 1e-5 if device == "cpu" else 5e-3  # tf32-free here, but keep the GPU floor of attn_check
    assert (out.double() - ref).norm() / ref.norm() < tol
    g = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, weight, g)
    (gw64,) = torch.autograd.grad(ref, w64, g.double())
    assert (gw.double() - gw64).norm() / gw64.norm() < tol


def case_wide_distance_table(device):
    """More columns than the Triton backend accepts (8192): the table gradient is a
    per-program histogram in global memory here, with no size limit."""
    q, k, v = make_qkv((1, 2, 1, 40, 60, 32, False), torch.float32, device)
    table = torch.randn(2, 5001 + 5000 + 1, device=device).requires_grad_()
    check(q, k, v, backend="cuda", rel_bias=posattn.DistanceBias(table, 5001, 5000),
          q_pos=torch.arange(40, device=device) * 97, k_pos=torch.arange(60, device=device) * 131)


def case_parameter_gradients_are_deterministic(device):
    q, k, v = make_qkv((2, 2, 1, 80, 90, 32, False), torch.float32, device)
    table = torch.randn(2, 31, device=device, requires_grad=True)
    slopes = torch.rand(2, device=device, requires_grad=True)
    bias = torch.randn(2, 80, 90, device=device, requires_grad=True)
    g = torch.randn(2, 2, 80, 32, device=device)

    def grads():
        out = attn(q, k, v, rel_bias=posattn.DistanceBias(table, 15, 15), causal=True, alibi_slopes=slopes,
                   bias=bias)
        return torch.autograd.grad(out, (table, slopes, bias, q, k, v), g)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def case_inputs_not_mutated(device):
    q, k, v = make_qkv((1, 2, 1, 50, 50, 32, True), torch.float32, device)
    table = torch.randn(2, 5, device=device, requires_grad=True)
    before = [x.detach().clone() for x in (q, k, v, table)]
    out = attn(q, k, v, rope=posattn.RoPE(), rel_bias=posattn.DistanceBias(table, 2, 2))
    out.sum().backward()
    for x, b in zip((q, k, v, table), before):
        assert torch.equal(x.detach(), b)


def case_single_key(device):
    q, k, v = make_qkv((1, 2, 1, 40, 1, 32, False), torch.float32, device)
    out = attn(q, k, v, rope=posattn.RoPE())
    assert torch.allclose(out, v.expand(1, 2, 40, 32), atol=1e-6)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    assert dq.abs().max() < 1e-4 and dk.abs().max() < 1e-4
    assert torch.allclose(dv, g.sum(dim=(1, 2), keepdim=True), atol=1e-5)


def _qkv(B, Hq, Hkv, N, D, dtype, device, Nk=None):
    Nk = N if Nk is None else Nk
    return (torch.randn(B, Hq, N, D, device=device, dtype=dtype, requires_grad=True),
            torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, requires_grad=True),
            torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, requires_grad=True))


def case_grid_bias(device, dtype):
    """Swin block: 7x7 windows, a shifted-window mask repeating over the batch of
    windows (periodic bias batch), gradients to q, k, v and the [T, H] table."""
    q, k, v = _qkv(4, 3, 3, 49, 32, dtype, device)
    table = (0.5 * torch.randn(13 * 13, 3, device=device)).requires_grad_()
    mask = torch.where(torch.rand(2, 1, 49, 49, device=device) < 0.3, -100.0, 0.0).to(dtype)
    check(q, k, v, backend="cuda", rel_bias=posattn.GridBias(table, (7, 7)), bias=mask)


def case_grid_bias_with_masks_and_gqa(device, mask):
    q, k, v = _qkv(2, 4, 2, 30, 16, torch.float32, device, Nk=35)
    table = torch.randn(9 * 13, 4, device=device, requires_grad=True)
    kw = {"causal": True} if mask == "causal" else {"window": (6, 3)}
    check(q, k, v, backend="cuda", rel_bias=posattn.GridBias(table, (5, 7)), return_lse=True, **kw)


def case_periodic_bias_batch(device):
    """bias [nB, ...] with B % nB == 0: batch b reads bias[b % nB]; the gradient sums
    over the batches that share it."""
    q, k, v = _qkv(6, 2, 2, 20, 16, torch.float32, device)
    bias = torch.randn(3, 1, 20, 20, device=device, requires_grad=True)
    check(q, k, v, backend="cuda", bias=bias)
    mask = torch.rand(3, 2, 20, 20, device=device) < 0.7
    check(q, k, v, backend="cuda", bias=mask, causal=True)


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

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("enc", ENCODINGS)
def test_encoding_mask_dtype(enc, mask, dtype, cuda_device):
    case_encoding_mask_dtype(cuda_device, enc, mask, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + ("T" if s[6] else ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shapes_all_encodings(shape, dtype, cuda_device):
    case_shapes_all_encodings(cuda_device, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [8, 16, 40, 64, 80, 112, 128, 256])
def test_head_dims(D, dtype, cuda_device):
    case_head_dim(cuda_device, D, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_positions_packed(dtype, cuda_device):
    case_explicit_positions_packed(cuda_device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kv_cache_decoding(dtype, cuda_device):
    case_kv_cache_decoding(cuda_device, dtype)


def test_shuffled_positions_window(cuda_device):
    case_shuffled_positions_window(cuda_device)


@pytest.mark.parametrize("bshape", [(2, 3, 40, 70), (3, 1, 70), (40, 70), (2, 1, 40, 70), (1, 1, 1, 70),
                                    (2, 1, 1, 70), (1, 3, 40, 70)])
def test_dense_bias_broadcast_gradient(bshape, cuda_device):
    case_dense_bias_broadcast_gradient(cuda_device, bshape)


@pytest.mark.parametrize("bshape", [(2, 3, 40, 1), (1, 1, 1, 1)])
def test_key_constant_bias_has_zero_gradient(bshape, cuda_device):
    case_key_constant_bias_has_zero_gradient(cuda_device, bshape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bias_float32_with_half_inputs(dtype, cuda_device):
    case_bias_float32_with_half_inputs(cuda_device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_are_zero_without_nan(dtype, cuda_device):
    case_empty_rows_are_zero_without_nan(cuda_device, dtype)


def test_huge_windows(cuda_device):
    case_huge_windows(cuda_device)


def test_fully_masked_everything(cuda_device):
    case_fully_masked_everything(cuda_device)


def test_lse_and_its_gradient(cuda_device):
    case_lse_and_its_gradient(cuda_device)


def test_scale_and_t5(cuda_device):
    case_scale_and_t5(cuda_device)


def test_wide_distance_table(cuda_device):
    case_wide_distance_table(cuda_device)


def test_parameter_gradients_are_deterministic(cuda_device):
    case_parameter_gradients_are_deterministic(cuda_device)


def test_inputs_not_mutated(cuda_device):
    case_inputs_not_mutated(cuda_device)


def test_single_key(cuda_device):
    case_single_key(cuda_device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_bias(dtype, cuda_device):
    case_grid_bias(cuda_device, dtype)


@pytest.mark.parametrize("mask", ["causal", "window"])
def test_grid_bias_with_masks_and_gqa(mask, cuda_device):
    case_grid_bias_with_masks_and_gqa(cuda_device, mask)


def test_periodic_bias_batch(cuda_device):
    case_periodic_bias_batch(cuda_device)


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
