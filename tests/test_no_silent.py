"""No silent wrong answers: what a demanding user's probe found (issue 15), each
either computed right on every backend or refused with an error naming posattn.

double backward, int32 edges of windows and positions, GridBias positions,
autocast, torch.func, torch.jit.trace, numbers from NumPy, float64 lse,
MultiheadAttention's key_padding_mask, int32 offsets inside a head.
"""
import numpy as np
import pytest
import torch

import posattn
import posattn.nn as pnn
from posattn import _triton, _validate
from attn_check import check, rel_err

TOP = 2 ** 31 - 1


def qkv(device, B=1, Hq=2, Hkv=1, Nq=19, Nk=23, D=16, dtype=torch.float32):
    def r(h, n):
        return torch.randn(B, h, n, D, device=device, dtype=dtype).requires_grad_()
    return r(Hq, Nq), r(Hkv, Nk), r(Hkv, Nk)


# --------------------------------------------------------------------------- double backward

def _penalty_grads(backend, q, k, v, kw, params):
    """d/d(inputs) of |d(sum out^2)/d(inputs)|^2: a gradient penalty."""
    out = posattn.attention(q, k, v, backend=backend, **kw)
    first = torch.autograd.grad(out.pow(2).sum(), params, create_graph=True)
    assert all(g.requires_grad for g in first), "first derivatives carry no graph"
    penalty = sum(g.pow(2).sum() for g in first)
    return torch.autograd.grad(penalty, params)


@pytest.mark.parametrize("enc", ["plain", "alibi+table+rope", "bias+causal"])
def test_double_backward_matches_reference(device, enc):
    q, k, v = qkv(device)
    kw = {}
    if "alibi" in enc:
        kw["alibi_slopes"] = posattn.alibi_slopes(2, device=device).requires_grad_()
        kw["rel_bias"] = posattn.DistanceBias(torch.randn(2, 9, device=device, requires_grad=True), 4, 4)
        kw["rope"] = posattn.RoPE()
    if "bias" in enc:
        kw["bias"] = torch.randn(1, 2, 19, 23, device=device, requires_grad=True)
        kw["causal"] = True
    params = [q, k, v] + [t for t in (kw.get("alibi_slopes"), getattr(kw.get("rel_bias"), "table", None),
                                      kw.get("bias")) if t is not None]
    got = _penalty_grads("triton", q, k, v, kw, params)
    ref = _penalty_grads("reference", q, k, v, kw, params)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-4


def test_double_backward_same_tensor_for_k_and_v(device):
    q, k, _ = qkv(device)
    got = _penalty_grads("triton", q, k, k, {}, [q, k])
    ref = _penalty_grads("reference", q, k, k, {}, [q, k])
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-4


def test_gradient_penalty_through_multihead_attention(device):
    """The probe's case: loss + |d out / d x|^2 through posattn.nn.MultiheadAttention."""
    torch.manual_seed(0)
    m = pnn.MultiheadAttention(32, 2, causal=True, positional=pnn.RotaryEmbedding(16)).to(device)
    x = torch.randn(1, 13, 32, device=device, requires_grad=True)
    grads = {}
    for backend in ("triton", "reference"):
        m.backend = backend
        out, _ = m(x)
        dx, = torch.autograd.grad(out.sum(), x, create_graph=True)
        loss = out.pow(2).mean() + dx.pow(2).sum()
        grads[backend], = torch.autograd.grad(loss, m.q_proj.weight)
    assert rel_err(grads["triton"], grads["reference"]) < 1e-4


# --------------------------------------------------------------------------- int32 edges

@pytest.mark.parametrize("window", [(None, TOP), (TOP, 0), (TOP, TOP), (2 ** 31, 0), (None, 2 ** 31),
                                    (2 ** 32, 3), (5, TOP)])
def test_window_sides_at_int32_edges(device, window):
    q, k, v = qkv(device, Hq=2, Hkv=2, Nq=40, Nk=33)
    check(q, k, v, window=window, causal=window[1] == 0)


@pytest.mark.parametrize("case", ["int32-near-top", "int32-distance-overflows", "int64-across-2^31"])
def test_explicit_positions_at_int32_edges(device, case):
    q, k, v = qkv(device, Nq=21, Nk=30)
    if case == "int32-near-top":       # both sides near 2^31 - 1, int32
        q_pos = torch.arange(TOP - 20, TOP + 1, dtype=torch.int32)
        k_pos = torch.arange(TOP - 29, TOP + 1, dtype=torch.int32)
        kw = dict(causal=True, window=(TOP, None), alibi_slopes=posattn.alibi_slopes(2, device=device))
    elif case == "int32-distance-overflows":   # k_pos - q_pos ~ -2^32: wraps in int32
        q_pos = torch.arange(TOP - 20, TOP + 1, dtype=torch.int32)
        k_pos = torch.arange(-2 ** 31, -2 ** 31 + 30, dtype=torch.int32)
        kw = dict(window=(2 ** 32 + 10, None))   # every key is 2^32 - 20 .. 2^32 + 9 to the left
    else:
        q_pos = torch.arange(2 ** 31 - 10, 2 ** 31 + 11)
        k_pos = torch.arange(2 ** 31 - 20, 2 ** 31 + 10)
        kw = dict(causal=True, window=(7, TOP), rel_bias=posattn.DistanceBias(
            torch.randn(2, 9, device=device, requires_grad=True), 4, 4))
    check(q, k, v, q_pos=q_pos.to(device), k_pos=k_pos.to(device), **kw)


# --------------------------------------------------------------------------- GridBias positions

@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("bad", [("q_pos", -1), ("k_pos", 12), ("k_pos", -5)])
def test_grid_bias_positions_outside_the_window_raise(device, backend, bad):
    q, k, v = qkv(device, Nq=5, Nk=12)
    grid = posattn.GridBias(torch.randn(5 * 7, 2, device=device), (3, 4))
    pos = {"q_pos": torch.arange(7, 12, device=device), "k_pos": torch.arange(12, device=device)}
    name, value = bad
    pos[name] = pos[name].clone()
    pos[name][1] = value
    with pytest.raises(ValueError, match=rf"{name} must lie in \[0, Wh \* Ww\) = \[0, 12\)"):
        posattn.attention(q, k, v, rel_bias=grid, backend=backend, **pos)


def test_grid_bias_positions_at_the_window_edges(device):
    q, k, v = qkv(device, Nq=6, Nk=12)
    grid = posattn.GridBias(torch.randn(5 * 7, 2, device=device, requires_grad=True), (3, 4))
    q_pos = torch.tensor([0, 11, 0, 11, 4, 7], device=device)
    k_pos = torch.tensor([11, 0, 0, 11, 3, 8, 11, 0, 5, 6, 1, 10], device=device)
    check(q, k, v, rel_bias=grid, q_pos=q_pos, k_pos=k_pos)


# --------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_behaves_like_sdpa(device, backend):
    q, k, v = qkv(device, Hq=2, Hkv=2)
    with torch.autocast(device if isinstance(device, str) else device.type, dtype=torch.bfloat16):
        out = posattn.attention(q, k, v, backend=backend, alibi_slopes=posattn.alibi_slopes(2, device=device))
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.dtype == sdpa.dtype == torch.bfloat16
    ref = posattn.reference.attention(*(x.to(torch.bfloat16) for x in (q, k, v)),
                                      alibi_slopes=posattn.alibi_slopes(2, device=device), upcast=True)
    assert rel_err(out, ref) < 2 ** -7
    dq, = torch.autograd.grad(out.float().sum(), q)
    assert dq.dtype == torch.float32      # the cast is differentiable, as SDPA's


# --------------------------------------------------------------------------- torch.func

@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_torch_func_grad(device, backend):
    q, k, v = (x.detach() for x in qkv(device))
    slopes = posattn.alibi_slopes(2, device=device)

    def loss(q, k, slopes):
        return posattn.attention(q, k, v, causal=True, alibi_slopes=slopes, backend=backend).pow(2).sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, slopes)
    q2, k2, s2 = (x.clone().requires_grad_() for x in (q, k, slopes))
    ref = torch.autograd.grad(posattn.reference.attention(q2, k2, v, causal=True, alibi_slopes=s2)
                              .pow(2).sum(), (q2, k2, s2))
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-5


def test_torch_func_grad_of_grad(device):
    q, k, v = (x.detach() for x in qkv(device))

    def penalty(q, backend):
        inner = torch.func.grad(lambda x: posattn.attention(x, k, v, causal=True, backend=backend).pow(2).sum())
        return inner(q).pow(2).sum()

    got = torch.func.grad(lambda x: penalty(x, "triton"))(q)
    ref = torch.func.grad(lambda x: penalty(x, "reference"))(q)
    assert rel_err(got, ref) < 1e-4


def test_torch_func_vmap_and_jvp_are_refused_by_name(device):
    q, k, v = (x.detach() for x in qkv(device))
    with pytest.raises(NotImplementedError, match="posattn: torch.func.vmap .* backend='reference'"):
        torch.func.vmap(lambda q: posattn.attention(q, k, v, backend="triton"))(q[None])
    with pytest.raises(NotImplementedError, match="posattn: torch.func.jvp"):
        torch.func.jvp(lambda q: posattn.attention(q, k, v, backend="triton"), (q,), (torch.ones_like(q),))
    # the reference backend is plain PyTorch: both work there
    torch.func.vmap(lambda q: posattn.attention(q, k, v, backend="reference"))(q[None])


# --------------------------------------------------------------------------- TorchScript

class _OutputOnly(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)[0]


def test_jit_trace_reference_works_and_kernels_refuse(device):
    m = pnn.MultiheadAttention(32, 2, positional=pnn.RotaryEmbedding(16), backend="reference").to(device)
    x = torch.randn(1, 9, 32, device=device)
    with torch.no_grad():
        traced = torch.jit.trace(_OutputOnly(m), (x,), check_trace=False)
        torch.testing.assert_close(traced(x), m(x)[0])
        m.backend = "triton"
        with pytest.raises(RuntimeError, match="posattn: torch.jit.trace cannot record the 'triton' backend"):
            torch.jit.trace(_OutputOnly(m), (x,), check_trace=False)


# --------------------------------------------------------------------------- numbers, dtypes

def test_numpy_numbers_are_accepted():
    t = torch.randn(2, 7)
    assert posattn.DistanceBias(t, np.int64(4), np.int32(2)).left == 4
    assert posattn.GridBias(torch.randn(5 * 7, 2), (np.int64(3), np.int16(4))).window == (3, 4)
    assert posattn.RelativeEmbeddings(torch.randn(1, 5, 8), clip=np.int64(2)).clip == 2
    assert posattn.RoPE(dim=np.int64(8), base=np.float32(100.0)).dim == 8
    assert posattn.alibi_slopes(np.int64(4)).shape == (4,)
    assert pnn.T5RelativeBias(np.int64(2)).num_heads == 2
    for bad in (True, 2.0, np.bool_(True)):
        with pytest.raises(ValueError, match="left must be an int"):
            posattn.DistanceBias(t, bad, 5)


def test_float64_lse_is_float64_and_gradchecks():
    q, k, v = qkv("cpu", Nq=4, Nk=5, D=3, dtype=torch.float64)
    _, lse = posattn.attention(q, k, v, return_lse=True, backend="reference")
    assert lse.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda q, k: posattn.attention(q, k, v, return_lse=True,
                                                                    backend="reference")[1], (q, k))


# --------------------------------------------------------------------------- nn key_padding_mask

@pytest.mark.parametrize("attn_mask", [None, "bool", "float"])
def test_key_padding_mask_matches_torch(attn_mask):
    E, H, B, N = 16, 2, 2, 6
    m = pnn.MultiheadAttention(E, H, backend="reference")
    t = torch.nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        t.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        t.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        t.out_proj.weight.copy_(m.out_proj.weight)
        t.out_proj.bias.copy_(m.out_proj.bias)
    x = torch.randn(B, N, E)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    ours, theirs = {}, {}
    if attn_mask == "bool":
        keep = torch.rand(N, N) < 0.7
        keep[:, 0] = True
        ours["attn_mask"], theirs["attn_mask"] = keep, ~keep
    elif attn_mask == "float":
        ours["attn_mask"] = theirs["attn_mask"] = torch.randn(N, N)
    out, _ = m(x, key_padding_mask=pad, **ours)
    ref, _ = t(x, x, x, key_padding_mask=pad, need_weights=False, **theirs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, Nk\] = \[2, 6\]"):
        m(x, key_padding_mask=pad[:, :5])


# --------------------------------------------------------------------------- int32 offsets

def test_triton_refuses_heads_whose_offsets_pass_int32():
    """Inside one (batch, head) slice the kernels use int32 offsets: a slice of 2^31
    elements or more is refused with the reason (checked on meta tensors: no memory)."""
    def problem(Nq, Nk, D, **kw):
        q = torch.empty(1, 1, Nq, D, device="meta")
        k = torch.empty(1, 1, Nk, D, device="meta")
        return _validate.check(q, k, k, **kw)
    assert _triton._int32_overflow(problem(8, 2 ** 23, 256)) is None          # last offset 2^31 - 1
    assert "k spans 2147483904 elements" in _triton._int32_overflow(problem(8, 2 ** 23 + 1, 256))
    assert "q spans" in _triton._int32_overflow(problem(2 ** 24 + 1, 8, 128))
    big_bias = torch.empty(1, 1, 2 ** 16, 2 ** 15 + 1, device="meta")
    assert "bias spans" in _triton._int32_overflow(problem(2 ** 16, 2 ** 15 + 1, 8, bias=big_bias))
    many_heads = torch.empty(64, 64, 1024, 128, device="meta")   # 2^29 elements per batch: fine
    assert _triton._int32_overflow(_validate.check(many_heads, many_heads, many_heads)) is None


def test_bf16_conversion_rounds_to_nearest(device):
    """float32 -> bfloat16 inside a kernel (a cast and a store) rounds to nearest even, as
    on the GPU and in PyTorch; under the interpreter this holds through conftest's patch,
    without which every bf16 rounding error of the kernels is doubled."""
    import triton
    import triton.language as tl

    @triton.jit
    def _cast(X, Y, Z, N: tl.constexpr):
        offs = tl.arange(0, N)
        x = tl.load(X + offs)
        tl.store(Y + offs, x.to(tl.bfloat16))
        tl.store(Z + offs, x)  # implicit conversion by the store

    x = torch.randn(1024) * torch.logspace(-40, 38, 1024)
    x[:8] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.4e38, float("inf"),
                          -float("inf"), float("nan"), 1e-40])  # ties (to even), overflow, subnormal
    x = x.to(device)
    y, z = (torch.empty(1024, device=device, dtype=torch.bfloat16) for _ in range(2))
    _cast[(1,)](x, y, z, 1024)
    want = x.to(torch.bfloat16)
    for got in (y, z):
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(got[ok].view(torch.int16), want[ok].view(torch.int16))
