"""The fused backends vs the float64 reference: every encoding x mask x dtype,
awkward shapes, explicit positions, lse, empty rows, determinism. Each test runs
once per backend (the `backend` fixture): Triton on CPU under TRITON_INTERPRET=1 and
on a CUDA GPU; the CUDA C++ fallback on a CUDA GPU with its extension built, and on
CPU through its emulation (tests/test_cuda_emulated.py calls these same functions
with backend="cuda")."""
import pytest
import torch
import triton
import triton.language as tl

import posattn
from attn_check import check
from posattn import _cuda, _triton, _validate
from posattn.kernels.forward import _acc_term
from posattn.kernels.scores import _grid_line, _grid_vec

DECLARATIONS = {"triton": _triton.DECLARATION, "cuda": _cuda.DECLARATION}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, Hq, Hkv, Nq, Nk, D, transposed): none a multiple of the blocks, GQA, Nq != Nk
# both ways, D = 80 and other non-powers of two, [B, N, H, D] storage seen through
# .transpose(1, 2).
SHAPES = [
    (1, 2, 1, 97, 97, 32, False),
    (2, 2, 2, 45, 150, 80, True),
    (1, 4, 2, 130, 70, 48, False),
    (1, 3, 3, 71, 71, 24, True),
]


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch posattn makes in the test, in order: (kernel name, its FLAGS,
    its GRADS or 0)."""
    seen = []
    launch = _triton._Launch.launch

    def spy(self, wrap, kernel, grid, **named):
        seen.append((kernel.__name__, named.get("FLAGS", self.args["FLAGS"]), named.get("GRADS", 0)))
        return launch(self, wrap, kernel, grid, **named)

    monkeypatch.setattr(_triton._Launch, "launch", spy)
    return seen


def make_qkv(shape, dtype, device, requires_grad=True):
    B, Hq, Hkv, Nq, Nk, D, transposed = shape

    def rnd(h, n):
        if transposed:
            x = torch.randn(B, n, h, D, device=device, dtype=dtype).transpose(1, 2)
        else:
            x = torch.randn(B, h, n, D, device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    return rnd(Hq, Nq), rnd(Hkv, Nk), rnd(Hkv, Nk)


def encoding(name, shape, device, dtype):
    B, Hq, Hkv, Nq, Nk, D, _ = shape
    kw = {}
    if "rope" in name:
        kw["rope"] = posattn.RoPE()
    if "ropei" in name:  # interleaved pairs over a partial rotary dim, scaled
        kw["rope"] = posattn.RoPE(dim=16, interleaved=True, base=500.0, attention_factor=1.1)
    if "alibi" in name:
        kw["alibi_slopes"] = (posattn.alibi_slopes(Hq, device=device) *
                              (1 + 0.1 * torch.rand(Hq, device=device))).requires_grad_()
    if "dist" in name:
        kw["rel_bias"] = posattn.DistanceBias(torch.randn(Hq, 11 + 6 + 1, device=device).requires_grad_(), 11, 6)
    if "bias" in name:
        kw["bias"] = torch.randn(B, Hq, Nq, Nk, device=device, dtype=dtype).requires_grad_()
    if "mask" in name:
        kw["bias"] = torch.rand(1, 1, Nq, Nk, device=device) < 0.8
    if "kerple" in name:
        kw["kerple"] = posattn.KERPLE((0.5 + torch.rand(Hq, device=device)).requires_grad_(),
                                      (0.05 + 0.5 * torch.rand(Hq, device=device)).requires_grad_())
    if "softcap" in name:  # a small cap: tanh well away from linear
        kw["softcap"] = 2.5
    if "sinks" in name:
        kw["sinks"] = torch.randn(Hq, device=device).requires_grad_()
    return kw


ENCODINGS = ["none", "rope", "ropei", "alibi", "dist", "bias", "mask", "rope+alibi", "rope+dist",
             "rope+bias", "ropei+mask", "kerple+alibi", "softcap+sinks+dist"]
MASKS = {"full": {}, "causal": {"causal": True}, "window": {"window": (23, 9)}}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("enc", ENCODINGS)
def test_encoding_mask_dtype(enc, mask, dtype, device, backend):
    # Each case takes one of the awkward shapes in turn, so every shape meets every
    # encoding and mask across the matrix without a full cross product.
    i = ENCODINGS.index(enc) + list(MASKS).index(mask) + DTYPES.index(dtype)
    shape = SHAPES[i % len(SHAPES)]
    q, k, v = make_qkv(shape, dtype, device)
    kw = dict(**MASKS[mask], **encoding(enc, shape, device, dtype))
    if DECLARATIONS[backend].refusal(_validate.check(q, k, v, **kw)) is not None:
        # an encoding this backend does not implement (KERPLE on the CUDA fallback): refused, naming it
        with pytest.raises(ValueError, match=rf"backend '{backend}' refused: .*is not implemented by the {backend}"):
            posattn.attention(q, k, v, backend=backend, **kw)
        return
    check(q, k, v, backend=backend, **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + ("T" if s[6] else ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shapes_all_encodings(shape, dtype, device, backend):
    q, k, v = make_qkv(shape, dtype, device)
    check(q, k, v, backend=backend, causal=True, window=(40, None), return_lse=True, grad_lse=True,
          **encoding("rope+alibi+dist+bias", shape, device, dtype))


@pytest.mark.parametrize("D", [8, 16, 40, 64, 80, 112, 128, 256])
def test_head_dims(D, device, backend, dtype=torch.float16):
    q, k, v = make_qkv((1, 2, 1, 50, 67, D, False), dtype, device)
    check(q, k, v, backend=backend, causal=True, rope=posattn.RoPE())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_positions_packed(dtype, device, backend):
    """Packed sequences: per-batch positions that restart, a block-diagonal mask."""
    B, Hq, N, D = 2, 2, 90, 32
    q, k, v = make_qkv((B, Hq, Hq, N, N, D, False), dtype, device)
    pos = torch.cat([torch.arange(40), torch.arange(50)]).to(device)
    pos = torch.stack([pos, torch.arange(N, device=device)])
    seg = torch.stack([torch.cat([torch.zeros(40), torch.ones(50)]), torch.zeros(N)]).to(device)
    same = (seg[:, None, :, None] == seg[:, None, None, :])
    check(q, k, v, backend=backend, causal=True, q_pos=pos, k_pos=pos, bias=same, rope=posattn.RoPE(),
          rel_bias=posattn.DistanceBias(torch.randn(Hq, 9, device=device).requires_grad_(), 5, 3),
          return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kv_cache_decoding(dtype, device, backend):
    """A few new queries against a long cache, int32 positions shared by the batch."""
    Nq, Nk = 3, 181
    q, k, v = make_qkv((2, 4, 1, Nq, Nk, 64, False), dtype, device)
    k_pos = torch.arange(Nk, device=device, dtype=torch.int32)
    q_pos = torch.arange(Nk - Nq, Nk, device=device, dtype=torch.int32)
    check(q, k, v, backend=backend, causal=True, q_pos=q_pos, k_pos=k_pos, rope=posattn.RoPE(),
          alibi_slopes=posattn.alibi_slopes(4, device=device))


def test_shuffled_positions_window(device, backend):
    """Arbitrary (non-monotone) positions: no tile may be skipped by position bounds."""
    q, k, v = make_qkv((1, 2, 2, 77, 66, 32, False), torch.float32, device)
    q_pos = torch.randperm(200, device=device)[:77]
    k_pos = torch.randperm(200, device=device)[:66][None]
    check(q, k, v, backend=backend, window=(30, 10), q_pos=q_pos, k_pos=k_pos, return_lse=True,
          alibi_slopes=torch.rand(1, 2, device=device).requires_grad_(),
          rel_bias=posattn.DistanceBias(torch.randn(2, 41, device=device).requires_grad_(), 20, 20))


@pytest.mark.parametrize("bshape", [(2, 3, 40, 70), (3, 1, 70), (40, 70), (2, 1, 40, 70), (1, 1, 1, 70),
                                    (2, 1, 1, 70), (1, 3, 40, 70)])
def test_dense_bias_broadcast_gradient(bshape, device, backend):
    """The bias gradient is summed over broadcast axes, never expanded in memory.
    (A bias constant along keys has a zero gradient, so shapes vary along Nk.)"""
    q, k, v = make_qkv((2, 3, 1, 40, 70, 32, False), torch.float32, device)
    bias = torch.randn(bshape, device=device).requires_grad_()
    errors = check(q, k, v, backend=backend, causal=True, bias=bias)
    assert "dbias" in errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_bias_gradient_in_its_layout(dtype, device, backend):
    """A [B, H, Nq, Nk] bias stored [B, Nq, H, Nk]: dK/dV write its gradient through
    the bias's own strides (every element one owner; tiles the window hides stay 0)."""
    q, k, v = make_qkv((2, 4, 2, 45, 70, 32, False), dtype, device)
    bias = torch.randn(2, 45, 4, 70, device=device, dtype=dtype).permute(0, 2, 1, 3).detach().requires_grad_()
    errors = check(q, k, v, backend=backend, window=(20, 5), bias=bias)
    assert "dbias" in errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unaligned_bias_copied_to_whole_tiles(dtype, device, backend):
    """A [B, H, Nq, Nk] bias with a row stride of 50 elements, no larger than q once its
    rows are padded: posattn reads a copy whose rows are padded with -inf to whole key
    tiles (BIAS_TILES), which masks the keys past Nk in the boundary tiles (their loads
    unmasked); dK/dV write its gradient into a
    gradient padded the same way (the window leaves tiles unvisited: zeros), returned
    dense. An expanded view stays broadcast."""
    q, k, v = make_qkv((2, 2, 2, 45, 50, 128, False), dtype, device)
    bias = torch.randn(2, 2, 45, 50, device=device, dtype=dtype).requires_grad_()
    errors = check(q, k, v, backend=backend, window=(20, 5), bias=bias)
    assert "dbias" in errors
    out = posattn.attention(q, k, v, backend=backend, window=(20, 5), bias=bias)
    (g,) = torch.autograd.grad(out, bias, torch.randn_like(out))
    assert g.shape == bias.shape and g.is_contiguous()   # not the padded layout
    row = torch.randn(1, 2, 1, 50, device=device, dtype=dtype).requires_grad_()
    errors = check(q, k, v, backend=backend, causal=True, bias=row.expand(2, 2, 45, 50))
    assert "dbias" in errors


@pytest.mark.parametrize("offset", [0, 1])
def test_bfloat16_bias_read_in_pairs(offset, device, launches):
    """A bfloat16 bias read in place at even element offsets: the kernels load two keys
    per 32-bit word and split them with integer ops (BIAS_PAIRS), in the unmasked tiles
    too; at an odd offset (a view one element in) they load by element."""
    from posattn.kernels import attention as A
    q, k, v = make_qkv((1, 2, 2, 70, 100, 16, False), torch.bfloat16, device)
    full = torch.randn(1, 2, 70, 102, device=device, dtype=torch.bfloat16)
    bias = full[..., offset:offset + 100].detach().requires_grad_()
    assert "dbias" in check(q, k, v, backend="triton", bias=bias)
    assert launches and all((f >> A._BIAS_PAIRS.value & 1) == (offset == 0) for _, f, _ in launches)


@pytest.mark.parametrize("scale", [None, 2.0, 0.3])
def test_bias_as_the_products_accumulator(scale, device, launches):
    """bfloat16, a dense bias alone and a power-of-two scale (D = 16's 1 / 4, or 2): the
    forward's interior tiles take q scaled once (exact) and the bias tile as q.k's
    starting accumulator (SCALE_POW2); another scale (0.3) keeps the add per score."""
    from posattn.kernels import attention as A
    q, k, v = make_qkv((1, 2, 2, 70, 100, 16, False), torch.bfloat16, device)
    bias = torch.randn(1, 2, 70, 100, device=device, dtype=torch.bfloat16, requires_grad=True)
    check(q, k, v, backend="triton", bias=bias, scale=scale)
    assert launches and all((f >> A._SCALE_POW2.value & 1) == (scale != 0.3 and n == "_attn_fwd")
                            for n, f, _ in launches)   # (the backward's launches: never)


@triton.jit
def _acc_term_zeroed(start_n, bias_ptr, offs_m, offs_n0, Nq, sbm, acc_table, qp, tab_l, tab_r, FLAGS: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return _acc_term(start_n, bias_ptr, offs_m, offs_n0, Nq, sbm, acc_table, qp, tab_l, tab_r, FLAGS, ACC,
                     BLOCK_M, BLOCK_N) * 0


@pytest.mark.parametrize("term", ["bias", "grid", "grid-vectors", "grid-odd-width", "grid-vectors-boundary",
                                  "grid-lines-boundary"])
def test_accumulator_term_is_read(term, device, monkeypatch):
    """The forward's interior tiles read their one additive term through
    kernels/forward.py's _acc_term and start q.k from it (ACC: a bf16 dense bias at a
    power-of-two scale, GridBias alone, at a power-of-two width or not), and so do the
    boundary tiles with GridBias's vectors or lines (the "-boundary" cases: 30 keys, one
    masked key tile and no interior one): that term zeroed must change the output. (A
    path never taken would leave the reference tests passing.) Interpreter only: it
    looks the helper up at each call."""
    if not _triton.interpreting():
        pytest.skip("monkeypatches a jitted helper")
    from posattn.kernels import forward as F
    nq, nk = (20, 30) if term.endswith("boundary") else (70, 100)
    q, k, v = make_qkv((1, 2, 2, nq, nk, 16, False), torch.bfloat16, device, requires_grad=False)
    if term == "grid-vectors-boundary":
        kw = dict(rel_bias=posattn.GridBias(torch.randn(5 * 19, 2, device=device) * 4, (3, 10)))
    elif term == "grid-lines-boundary":
        kw = dict(rel_bias=posattn.GridBias(torch.randn(7 * 17, 2, device=device) * 4, (4, 9)))
    elif term == "bias":
        kw = dict(bias=torch.randn(1, 2, 70, 100, device=device, dtype=torch.bfloat16) * 4)
    elif term == "grid":
        kw = dict(rel_bias=posattn.GridBias(torch.randn(15 * 31, 2, device=device) * 4, (8, 16)))
    elif term == "grid-vectors":
        kw = dict(rel_bias=posattn.GridBias(torch.randn(19 * 19, 2, device=device) * 4, (10, 10)))
    else:
        kw = dict(rel_bias=posattn.GridBias(torch.randn(23 * 17, 2, device=device) * 4, (12, 9)))
    out = posattn.attention(q, k, v, **kw)
    monkeypatch.setattr(F, "_acc_term", _acc_term_zeroed)
    assert (posattn.attention(q, k, v, **kw).float() - out.float()).abs().max() > 0.1


def test_expanded_bias_gradient(device, backend):
    """A bias passed as a stride-0 expanded view: its gradient is per element of the
    view (autograd then sums it into the leaf). Pass the unexpanded broadcastable
    tensor to keep the gradient small."""
    q, k, v = make_qkv((2, 2, 2, 40, 50, 16, False), torch.float32, device)
    row = torch.randn(50, device=device, requires_grad=True)
    check(q, k, v, backend=backend, bias=row.expand(2, 2, 40, 50))
    g = torch.randn(2, 2, 40, 16, device=device)
    out = posattn.attention(q, k, v, bias=row.expand(2, 2, 40, 50), backend=backend)
    (got,) = torch.autograd.grad(out, row, g)
    out = posattn.attention(q, k, v, bias=row, backend=backend)
    (want,) = torch.autograd.grad(out, row, g)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bshape", [(2, 3, 40, 1), (1, 1, 1, 1)])
def test_key_constant_bias_has_zero_gradient(bshape, device, backend):
    """A bias constant along the keys shifts each softmax row by a constant: the output
    does not change and its gradient is exactly 0 (the kernels sum dS over the keys,
    which cancels to rounding noise; a relative error is meaningless there)."""
    q, k, v = make_qkv((2, 3, 1, 40, 70, 32, False), torch.float32, device)
    bias = torch.randn(bshape, device=device).requires_grad_()
    out = posattn.attention(q, k, v, causal=True, bias=bias, backend=backend)
    ref = posattn.reference.attention(q, k, v, causal=True)
    assert torch.allclose(out, ref, atol=1e-5)
    (g,) = torch.autograd.grad(out, bias, torch.randn_like(out))
    assert g.shape == bias.shape and g.abs().max() < 1e-3


def test_softcap_float32_logits_inside_the_cap(device):
    """A soft cap far above the logits (tanh's argument ~0.02): the kernels' precise
    tanh keeps float32's relative precision there (its 1 - 2 / (e^2x + 1) form alone
    lost it: out / dq / dk / dv errors ~2e-6, 10x PyTorch's float32, and a d(sinks) with
    dropout over the property test's tolerance); the tolerance's floor is 1e-6 here."""
    q, k, v = make_qkv((1, 2, 2, 50, 40, 32, False), torch.float32, device)
    check(q, k, v, softcap=50.0, fp32_tol=1e-6)


def test_bias_float32_with_half_inputs(device, backend, dtype=torch.bfloat16):
    q, k, v = make_qkv((1, 2, 2, 60, 60, 32, False), dtype, device)
    check(q, k, v, backend=backend, bias=torch.randn(2, 60, 60, device=device).requires_grad_())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_are_zero_without_nan(dtype, device, backend):
    """Rows with no visible key: out = 0, lse = -inf, every gradient finite."""
    q, k, v = make_qkv((1, 2, 1, 70, 50, 32, False), dtype, device)
    # q_pos beyond every key with window right = 0 and left small: rows 0..19 see nothing.
    q_pos = torch.cat([torch.full((20,), 1000), torch.arange(50)]).to(device)
    table = torch.randn(2, 7, device=device).requires_grad_()
    out, lse = posattn.attention(q, k, v, causal=True, window=(3, None), q_pos=q_pos,
                                 rel_bias=posattn.DistanceBias(table, 3, 3), return_lse=True,
                                 backend=backend)
    assert torch.all(out[:, :, :20] == 0)
    assert torch.all(lse[:, :, :20] == float("-inf"))
    assert torch.isfinite(lse[:, :, 20:]).all()
    (out.float().square().sum()).backward()
    for x in (q, k, v, table):
        assert torch.isfinite(x.grad).all()
    assert torch.all(q.grad[:, :, :20] == 0)
    check(q, k, v, backend=backend, causal=True, window=(3, None), q_pos=q_pos, rel_bias=posattn.DistanceBias(table, 3, 3),
          return_lse=True)


def test_fully_masked_everything(device, backend):
    q, k, v = make_qkv((1, 1, 1, 20, 30, 16, False), torch.float32, device)
    mask = torch.zeros(20, 30, dtype=torch.bool, device=device)
    out, lse = posattn.attention(q, k, v, bias=mask, return_lse=True, backend=backend)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert torch.all(q.grad == 0) and torch.all(k.grad == 0) and torch.all(v.grad == 0)


def test_lse_and_its_gradient(device, backend):
    q, k, v = make_qkv((1, 2, 1, 66, 99, 48, True), torch.float32, device)
    check(q, k, v, backend=backend, return_lse=True, grad_lse=True, rope=posattn.RoPE(), causal=True)


def test_scale_and_t5(device, backend):
    """T5: no score scaling, bucketed bias built from an embedding weight."""
    q, k, v = make_qkv((2, 4, 4, 100, 100, 32, False), torch.float32, device)
    weight = torch.randn(32, 4, device=device, requires_grad=True)
    rb = posattn.DistanceBias.t5(weight, num_buckets=32, max_distance=40)
    out = posattn.attention(q, k, v, scale=1.0, rel_bias=rb, backend=backend)
    w64 = weight.detach().double().requires_grad_()
    ref = posattn.reference.attention(*(x.detach().double() for x in (q, k, v)), scale=1.0,
                                      rel_bias=posattn.DistanceBias.t5(w64, 32, 40))
    tol = 1e-5 if device == "cpu" else 5e-3  # the GPU floor of attn_check (tf32-free, reordered sums)
    assert (out.double() - ref).norm() / ref.norm() < tol
    g = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, weight, g)
    (gw64,) = torch.autograd.grad(ref, w64, g.double())
    assert (gw.double() - gw64).norm() / gw64.norm() < tol


def test_distance_table_tiles_past_the_padding(device, backend):
    """The Triton kernels read a DistanceBias tile as a slice of a padded table row
    and clamp the tile's offset once (kernels/scores.py): rows long enough that
    boundary tiles (keys past a multiple of the tile), the batch-shared bias's
    gradient pass and the decoding kernel's chunks lie past the padding too."""
    t = torch.randn(2, 6, device=device, requires_grad=True)
    bias = torch.randn(1, 2, 8, 470, device=device, requires_grad=True)
    q, k, v = make_qkv((2, 2, 2, 8, 470, 16, False), torch.float32, device)
    check(q, k, v, backend=backend, rel_bias=posattn.DistanceBias(t, 3, 2), bias=bias)
    q, k, v = make_qkv((1, 4, 2, 1, 470, 16, False), torch.float32, device)   # decoding
    check(q, k, v, backend=backend, rel_bias=posattn.DistanceBias(t[:1].expand(4, 6), 3, 2))
    if backend == "triton":   # the host's pad is the kernels' (a mismatch shifts every read)
        from posattn.kernels.common import _TABLE_PAD
        assert _triton.TABLE_PAD == _TABLE_PAD.value


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_parameter_gradients_corrected_in_pass(dtype, device, backend, monkeypatch):
    """bf16 / fp16 parameter gradients come from dQ's own pass, corrected to the exact
    delta at its end (_triton.CORRECT_IN_PASS); they must equal the extra exact-delta
    pass's to float32 rounding, in peaked rows where rowsum(dO * O) is far off, and
    for the tiles far from the diagonal (DistanceBias) and the dense bias after it."""
    if backend != "triton":
        pytest.skip("a Triton launch plan")
    g = torch.Generator().manual_seed(3)
    B, H, Nq, Nk, D = 1, 2, 150, 170, 32
    q = (6 * torch.randn(B, H, Nq, D, generator=g)).to(device, dtype).requires_grad_()
    k = torch.randn(B, H, Nk, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, H, Nk, D, generator=g).to(device, dtype).requires_grad_()
    params = [(posattn.alibi_slopes(H) * (1 + 0.1 * torch.rand(H, generator=g))).to(device).requires_grad_(),
              torch.randn(H, 9, generator=g).to(device).requires_grad_(),
              torch.randn(1, H, Nq, Nk, generator=g).to(device, dtype).requires_grad_(),
              (0.5 + torch.rand(H, generator=g)).to(device).requires_grad_(),
              (0.05 + torch.rand(H, generator=g)).to(device).requires_grad_()]
    dout = torch.randn(B, H, Nq, D, generator=g).to(device, dtype)
    grads = []
    for corrected in (True, False):
        monkeypatch.setattr(_triton, "CORRECT_IN_PASS", corrected)
        sl, tab, bias, r1, r2 = params
        out = posattn.attention(q, k, v, causal=True, alibi_slopes=sl, rel_bias=posattn.DistanceBias(tab, 5, 3),
                                bias=bias, kerple=posattn.KERPLE(r1, r2), backend="triton")
        grads.append(torch.autograd.grad(out, params, dout))
    for name, a, b in zip(("slopes", "table", "bias", "r1", "r2"), *grads):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert err < 2e-4, (name, err)


def test_shaw_gradients_corrected_in_pass(device, backend, monkeypatch):
    """Shaw's d(aK) / d(aV) in bf16 from dQ's corrected pass (their end rows there, the
    interior rows from _attn_bwd_rel after it, at the exact delta dQ wrote) equal the
    extra exact-delta pass's, in peaked rows, with key tiles beyond the clip on both
    sides of the diagonal."""
    if backend != "triton":
        pytest.skip("a Triton launch plan")
    g = torch.Generator().manual_seed(5)
    B, H, Nq, Nk, D, K = 1, 2, 150, 170, 16, 5
    q = (6 * torch.randn(B, H, Nq, D, generator=g)).to(device, torch.bfloat16).requires_grad_()
    k, v = (torch.randn(B, H, Nk, D, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
    tables = [(0.5 * torch.randn(H, 2 * K + 1, D, generator=g)).to(device).requires_grad_() for _ in range(2)]
    dout = torch.randn(B, H, Nq, D, generator=g).to(device, torch.bfloat16)
    grads = []
    for corrected in (True, False):
        monkeypatch.setattr(_triton, "CORRECT_IN_PASS", corrected)
        out = posattn.attention(q, k, v, rel_emb=posattn.RelativeEmbeddings(*tables, K), backend="triton")
        grads.append(torch.autograd.grad(out, [q, k, v, *tables], dout))
    for name, a, b in zip(("q", "k", "v", "aK", "aV"), *grads):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert err < (1e-2 if name in "qkv" else 2e-4), (name, err)


def test_wide_distance_table(device, backend):
    """More columns than the Triton backend reduces in registers (8192): it refuses,
    saying so; the CUDA fallback's per-program histogram in global memory has no limit."""
    q, k, v = make_qkv((1, 2, 1, 40, 60, 32, False), torch.float32, device)
    table = torch.randn(2, 5001 + 5000 + 1, device=device).requires_grad_()
    kw = dict(rel_bias=posattn.DistanceBias(table, 5001, 5000), q_pos=torch.arange(40, device=device) * 97,
              k_pos=torch.arange(60, device=device) * 131)
    if backend == "triton":
        with pytest.raises(ValueError, match="10002 entries per head > 8192"):
            posattn.attention(q, k, v, backend=backend, **kw)
        return
    check(q, k, v, backend=backend, **kw)


def test_parameter_gradients_are_deterministic(device, backend):
    """Bitwise the same gradients twice; a dense bias shared by the batch under torch's
    deterministic mode (without it, the Triton dK/dV adds its dS atomically)."""
    q, k, v = make_qkv((2, 2, 1, 80, 90, 32, False), torch.float32, device)
    table = torch.randn(2, 31, device=device, requires_grad=True)
    slopes = torch.rand(2, device=device, requires_grad=True)
    bias = torch.randn(2, 80, 90, device=device, requires_grad=True)
    g = torch.randn(2, 2, 80, 32, device=device)

    def grads():
        out = posattn.attention(q, k, v, rel_bias=posattn.DistanceBias(table, 15, 15), causal=True,
                                alibi_slopes=slopes, bias=bias, backend=backend)
        return torch.autograd.grad(out, (table, slopes, bias, q, k, v), g)

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bshape,window", [((1, 3, 40, 70), None), ((2, 1, 40, 70), (25, 9))])
def test_shared_bias_gradient_added_by_dkdv(bshape, window, device, monkeypatch, launches):
    """A dense bias shared by the batch or the heads: dK/dV adds each dS tile to its
    gradient atomically (DBIAS_ADD, no pass of its own) into a zeroed buffer (fresh
    buffers are filled with NaN here: one not zeroed fails); under torch's
    deterministic mode the dBias kernel sums it in a fixed order instead. Both against
    the reference."""
    from posattn.kernels import attention as A
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: empty_like(*a, **kw).fill_(float("nan")))
    q, k, v = make_qkv((4, 3, 1, 40, 70, 16, False), torch.bfloat16, device)
    bias = torch.randn(bshape, device=device).requires_grad_()
    assert "dbias" in check(q, k, v, backend="triton", window=window, bias=bias)
    names = [n for n, _, _ in launches]
    assert "_attn_bwd_dbias" not in names
    assert all(f >> A._DBIAS_ADD.value & 1 and f >> A._DBIAS_ROWS.value & 1
               for n, f, _ in launches if n == "_attn_bwd_dkdv")
    launches.clear()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert "dbias" in check(q, k, v, backend="triton", window=window, bias=bias)
    names = [n for n, _, _ in launches]
    assert "_attn_bwd_dbias" in names
    assert not any(f >> A._DBIAS_ADD.value & 1 for n, f, _ in launches if n == "_attn_bwd_dkdv")


def test_inputs_not_mutated(device, backend):
    q, k, v = make_qkv((1, 2, 1, 50, 50, 32, True), torch.float32, device)
    table = torch.randn(2, 5, device=device, requires_grad=True)
    before = [x.detach().clone() for x in (q, k, v, table)]
    out = posattn.attention(q, k, v, rope=posattn.RoPE(), rel_bias=posattn.DistanceBias(table, 2, 2),
                            backend=backend)
    out.sum().backward()
    for x, b in zip((q, k, v, table), before):
        assert torch.equal(x.detach(), b)


def test_empty_sequences(device, backend):
    q, k, v = make_qkv((1, 2, 1, 5, 0, 16, False), torch.float32, device)
    out, lse = posattn.attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == (1, 2, 5, 16) and torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert torch.all(q.grad == 0)


def test_single_key(device, backend):
    """One key: out = v for every row and dq = dk = 0 exactly in exact arithmetic,
    so this is checked in absolute terms."""
    q, k, v = make_qkv((1, 2, 1, 40, 1, 32, False), torch.float32, device)
    out = posattn.attention(q, k, v, rope=posattn.RoPE(), backend=backend)
    assert torch.allclose(out, v.expand(1, 2, 40, 32), atol=1e-6)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    assert dq.abs().max() < 1e-4 and dk.abs().max() < 1e-4
    assert torch.allclose(dv, g.sum(dim=(1, 2), keepdim=True), atol=1e-5)


def test_huge_windows_and_int64_positions(device, backend):
    """A window of 2^63 - 1 is unbounded (no int64 overflow in the tile ranges), and
    int64 positions beyond int32 keep their distances."""
    q, k, v = make_qkv((1, 2, 1, 40, 50, 16, False), torch.float32, device)
    for big in (2 ** 63 - 1, 10 ** 30):
        out = posattn.attention(q, k, v, window=(big, big), backend=backend)
        ref = posattn.attention(q, k, v, backend=backend)
        assert torch.allclose(out, ref, atol=1e-6)
        assert torch.allclose(posattn.reference.attention(q, k, v, window=(big, big)),
                              posattn.reference.attention(q, k, v), atol=1e-6)
    base = 3 * 2 ** 32
    check(q, k, v, backend=backend, q_pos=torch.arange(base + 10, base + 50, device=device),
          k_pos=torch.arange(base, base + 50, device=device), causal=True, window=(7, None),
          alibi_slopes=posattn.alibi_slopes(2, device=device))  # no RoPE: fp32 angles lose 2^33


def test_any_strides(device, backend):
    """A head dim with stride != 1 (q, k, v and the output gradient) and a dense bias
    transposed in memory: the launcher hands the kernels copies in the layout they
    read (contiguous head dim, keys at stride 1), so the results equal those of the
    same values stored contiguously, bit for bit."""
    B, H, Nq, Nk, D = 1, 2, 37, 45, 24
    wide = [torch.randn(B, H, n, 2 * D, device=device, requires_grad=True) for n in (Nq, Nk, Nk)]
    strided = [x[..., ::2] for x in wide]
    dense = [x.detach().contiguous().requires_grad_() for x in strided]
    bias_t = torch.randn(1, H, Nk, Nq, device=device).transpose(-1, -2)
    g_t = torch.randn(B, H, D, Nq, device=device).transpose(-1, -2)
    assert strided[0].stride(-1) == 2 and bias_t.stride(-1) == Nq and g_t.stride(-1) == Nq
    kw = dict(rope=posattn.RoPE(), causal=True, backend=backend)
    out_s = posattn.attention(*strided, bias=bias_t, **kw)
    out_d = posattn.attention(*dense, bias=bias_t.contiguous(), **kw)
    assert torch.equal(out_s, out_d)
    out_s.backward(g_t)
    out_d.backward(g_t.contiguous())
    for w, d in zip(wide, dense):
        assert torch.equal(w.grad[..., ::2], d.grad) and torch.all(w.grad[..., 1::2] == 0)


def test_huge_windows(device, backend):
    """Windows as wide as int64 allows behave as unbounded (no overflow in the
    kernels' tile ranges: index + tile + window)."""
    q, k, v = make_qkv((1, 2, 1, 50, 70, 32, False), torch.float32, device)
    check(q, k, v, backend=backend, window=(2 ** 63 - 1, 2 ** 63 - 1), return_lse=True)
    check(q, k, v, backend=backend, window=(2 ** 62 + 5, 3), causal=True)


def _qkv(B, Hq, Hkv, N, D, dtype, device, Nk=None):
    Nk = N if Nk is None else Nk
    return (torch.randn(B, Hq, N, D, device=device, dtype=dtype, requires_grad=True),
            torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, requires_grad=True),
            torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_bias(dtype, device, backend):
    """Swin block: 7x7 windows, a shifted-window mask repeating over the batch of
    windows (periodic bias batch), gradients to q, k, v and the [T, H] table."""
    q, k, v = _qkv(4, 3, 3, 49, 32, dtype, device)
    table = (0.5 * torch.randn(13 * 13, 3, device=device)).requires_grad_()
    mask = torch.where(torch.rand(2, 1, 49, 49, device=device) < 0.3, -100.0, 0.0).to(dtype)
    check(q, k, v, backend=backend, rel_bias=posattn.GridBias(table, (7, 7)), bias=mask)


@pytest.mark.parametrize("window,nq,nk,causal,dtype,D", [((16, 8), 100, 128, False, torch.bfloat16, 16),
                                                         ((3, 32), 70, 96, False, torch.bfloat16, 16),
                                                         ((2, 128), 70, 200, False, torch.bfloat16, 16),
                                                         ((5, 16), 75, 75, True, torch.float16, 16),
                                                         ((6, 12), 60, 72, False, torch.bfloat16, 16),
                                                         ((4, 14), 50, 56, False, torch.float16, 16),
                                                         ((3, 40), 70, 120, False, torch.bfloat16, 16),
                                                         ((5, 9), 40, 45, False, torch.bfloat16, 16),
                                                         ((6, 12), 60, 72, True, torch.bfloat16, 16),
                                                         ((5, 9), 40, 45, True, torch.bfloat16, 16),
                                                         ((3, 40), 70, 120, False, torch.float16, 80),
                                                         ((5, 9), 40, 45, True, torch.bfloat16, 80),
                                                         ((16, 8), 100, 128, False, torch.bfloat16, 80)],
                         ids=["narrower-than-tile", "tile-wide", "wider-than-tile", "causal-fp16", "vectors-of-4",
                              "vectors-of-2", "vectors-of-8", "odd-width", "vectors-causal", "odd-width-causal",
                              "vectors-of-8-D80", "odd-width-causal-D80", "narrower-than-tile-D80"])
def test_grid_bias_accumulator_tiles(window, nq, nk, causal, dtype, D, device, backend, launches):
    """GridBias alone in 16 bits at D <= 128: the forward's interior tiles start q.k from
    the table / scale copy (TABLE_ACC). At a power-of-two Ww >= 8 every tile reads it at
    key offsets fixed at compile time (kernels/scores.py): rows of Ww keys narrower than a
    key tile (each tile starts a grid row), as wide (the interpreter's 32-key tiles;
    narrower on a GPU's 64 or 128), or wider than the interpreter's; interior tiles past
    the first (their first key's code); queries shifted (Nq < Nk); a last partial key
    tile (200 keys; its keys past Nk read nothing); causal diagonal tiles (float16).
    Other even widths read G keys at a time from shifted, reversed copies (GRID_VEC: 12,
    14 and 40 have G = 4, 2, 8: a row whose copy or column is one off fails); odd ones
    (9) a line per query column (GRID_LINE); both in the boundary tiles too (the causal
    cases have no interior tile). At D = 80 too (BLOCK_D 128: the forward's AGAIN)."""
    from posattn.kernels import attention as A
    q, k, v = _qkv(1, 2, 2, nq, D, dtype, device, Nk=nk)
    wh, ww = window
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), 2, device=device, requires_grad=True)
    check(q, k, v, backend=backend, causal=causal, rel_bias=posattn.GridBias(table, window))
    fwd = [f for n, f, _ in launches if n == "_attn_fwd"]
    # (the backward's launches carry none of these bits: it never reads the copies or lines)
    assert backend != "triton" or fwd and all(f >> A._TABLE_ACC.value & 1 for f in fwd) and not any(
        f >> A._TABLE_ACC.value & 1 for n, f, _ in launches if n != "_attn_fwd")
    vec = {12: 2, 14: 1, 40: 3}.get(ww, 0)
    assert backend != "triton" or all(f >> A._GRID_VEC.value & 3 == vec and f >> A._GRID_LINE.value & 1 == ww % 2
                                      for f in fwd if ww & (ww - 1))


@triton.jit
def _grid_vec_probe(Out, Copies, wh, ww, NQ: tl.constexpr, NK: tl.constexpr, VEC_LOG: tl.constexpr):
    i, j = tl.arange(0, NQ), tl.arange(0, NK)
    tl.store(Out + i[:, None] * NK + j[None, :], _grid_vec(Copies, i, j, wh, ww, VEC_LOG))


@pytest.mark.parametrize("window", [(3, 12), (2, 40), (5, 14), (7, 4), (9, 2)],
                         ids=["vectors-of-4", "vectors-of-8", "vectors-of-2", "width-4", "width-2"])
def test_grid_vectors_read_their_column_aligned(window, device):
    """kernels/scores.py's _grid_vec, from the copies posattn/_triton.py writes, for every
    query and key of the window and past it: each pair in the window reads its table
    column (GridBias.index); each vector of G keys from a multiple of G, past the window
    too (a boundary tile's masked keys), reads G consecutive addresses from a multiple of
    min(G, 4) elements, as the GPU's 16-byte vector reads need (the interpreter reads
    element by element: a misaligned vector would pass everything else)."""
    wh, ww = window
    g = (ww & -ww).bit_length() - 1
    G, A, n = 1 << g, min(4, 1 << g), wh * ww
    NQ = NK = triton.next_power_of_2(n + 8)
    cols = (2 * wh - 1) * (2 * ww - 1)
    ids = torch.arange(cols, device=device, dtype=torch.float32)[None]          # [1 head, T]: a column's id
    copies = _triton._grid_vec_copies(ids, window, A).reshape(-1)
    out = torch.empty(NQ, NK, device=device)
    _grid_vec_probe[(1,)](out, copies, wh, ww, NQ, NK, g)
    pos = torch.arange(n, device=device)
    want = posattn.GridBias(torch.zeros(cols, 1), window).index(pos, pos).float()
    assert torch.equal(out[:n, :n], want)
    addr = torch.empty(NQ, NK, device=device)
    _grid_vec_probe[(1,)](addr, torch.arange(copies.numel(), device=device, dtype=torch.float32), wh, ww, NQ, NK, g)
    vec = addr.view(NQ, NK // G, G)
    assert torch.equal(vec - vec[..., :1], torch.arange(G, device=device, dtype=torch.float32).expand_as(vec))
    assert (vec[..., 0] % A == 0).all() and (addr >= 0).all() and (addr < copies.numel()).all()


@pytest.mark.parametrize("window", [(5, 9), (4, 14)], ids=["odd", "even"])
def test_grid_bias_gathered_past_the_line_budget_or_switched_off(window, device, backend, launches, monkeypatch):
    """An odd width whose lines would pass posattn/_triton.py's GRID_LINE_FLOATS, or an
    even one with GRID_VECTORS off (a GPU A/B's switch), gathers the table / scale copy
    with an index per score instead (TABLE_ACC, neither GRID_LINE nor GRID_VEC)."""
    from posattn.kernels import attention as A
    monkeypatch.setattr(_triton, "GRID_LINE_FLOATS", 0)
    monkeypatch.setattr(_triton, "GRID_VECTORS", False)
    wh, ww = window
    q, k, v = _qkv(1, 2, 2, 40, 16, torch.bfloat16, device, Nk=45)
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), 2, device=device, requires_grad=True)
    check(q, k, v, backend=backend, rel_bias=posattn.GridBias(table, window))
    assert backend != "triton" or launches and all(
        f >> A._TABLE_ACC.value & 1 and not f >> A._GRID_LINE.value & 1 and not f >> A._GRID_VEC.value & 3
        for n, f, _ in launches if n == "_attn_fwd")


@triton.jit
def _grid_line_probe(Out, Lines, wh, ww, NQ: tl.constexpr, NK: tl.constexpr):
    i, j = tl.arange(0, NQ), tl.arange(0, NK)
    tl.store(Out + i[:, None] * NK + j[None, :], _grid_line(Lines, i, 0, j, wh, ww))


@pytest.mark.parametrize("window", [(3, 9), (4, 7), (2, 1)])
def test_grid_line_reads_its_column(window, device):
    """kernels/scores.py's _grid_line on the lines posattn/_triton.py writes (odd widths),
    for every query and key of the window and past it: each pair in the window reads its
    table column (GridBias.index); keys past it (a boundary tile's, masked) and rows past
    it stay inside the buffer (the padding in front)."""
    wh, ww = window
    n = wh * ww
    NQ = NK = triton.next_power_of_2(n + 8)
    cols = (2 * wh - 1) * (2 * ww - 1)
    ids = torch.arange(1, cols + 1, device=device, dtype=torch.float32)[None]   # [1 head, T]: a column's id + 1
    lines = _triton._grid_line_rows(ids, window).reshape(-1)
    out = torch.empty(NQ, NK, device=device)
    _grid_line_probe[(1,)](out, lines, wh, ww, NQ, NK)
    pos = torch.arange(n, device=device)
    want = posattn.GridBias(torch.zeros(cols, 1), window).index(pos, pos).float() + 1
    assert torch.equal(out[:n, :n], want)
    addr = torch.empty(NQ, NK, device=device)
    _grid_line_probe[(1,)](addr, torch.arange(lines.numel(), device=device, dtype=torch.float32), wh, ww, NQ, NK)
    assert (addr >= 0).all() and (addr < lines.numel()).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi_column_on_tensor_cores_matches_the_add(causal, device, monkeypatch):
    """bfloat16 ALiBi at D <= 64 adds its column term (slope / scale * j) as a tensor-core
    step of q.k, slope / scale in three bf16 parts (kernels/forward.py _alibi_ext): the
    lse must match the add per score (_triton.ALIBI_COLUMN_MMA off) to float32's rounding;
    the split's lower parts matter (slope / scale not a bf16 number; small slopes, so the
    tiles far from the diagonal carry weight). Nq < Nk, both sides of the diagonal."""
    q, k, v = _qkv(1, 2, 2, 150, 32, torch.bfloat16, device, Nk=200)
    slopes = torch.tensor([0.07, 0.013], device=device)
    kw = dict(alibi_slopes=slopes, causal=causal, return_lse=True)
    out, lse = posattn.attention(q, k, v, **kw)
    monkeypatch.setattr(_triton, "ALIBI_COLUMN_MMA", False)
    out_add, lse_add = posattn.attention(q, k, v, **kw)
    assert (lse - lse_add).abs().max().item() < 1e-4
    assert (out.float() - out_add.float()).abs().max().item() < 2e-2


def _table_grad_error(q, k, v, table, window, backend, **kw):
    """d(table) of the backend against the float64 reference on the same inputs, as the
    largest column error over the largest column: the columns are fp32 sums of dS, close
    to the float64 ones whatever the input dtype (1e-7 measured), so one wrong column
    shows where a norm over the whole gradient (check's) would not. window: GridBias's,
    or a function of the table giving the encoding."""
    enc = window if callable(window) else (lambda t: posattn.GridBias(t, window))
    out = posattn.attention(q, k, v, backend=backend, rel_bias=enc(table), **kw)
    g = torch.randn_like(out)
    got, = torch.autograd.grad(out, table, g)
    t64 = table.detach().double().requires_grad_()
    up = {n: x.detach().double() if torch.is_tensor(x) else x for n, x in kw.items()}
    ref = posattn.reference.attention(q.detach().double(), k.detach().double(), v.detach().double(),
                                      rel_bias=enc(t64), **up)
    want, = torch.autograd.grad(ref, t64, g.double())
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("window,nq,nk", [((3, 64), 170, 170), ((6, 64), 170, 170), ((12, 40), 120, 150),
                                          ((24, 24), 100, 120), ((5, 7), 35, 35), ((9, 9), 70, 81)],
                         ids=["one-dy", "one-dy-chunks", "dy-sums-chunks", "code-rounds-chunks", "full-window",
                              "code-window-edge"])
def test_grid_bias_table_gradient_by_grid_row(window, nq, nk, device, backend):
    """d(table) sums dS per grid-row difference dy, each dy's diagonals at once: tiles
    whose rows and keys lie in one grid row each (Ww = 64), tiles over several grid
    rows (Ww = 40: a sum per dy; Ww = 24: keys gathered by code), padding rows / keys
    past Nq < Nk < Wh * Ww, every column used (a full window); tables of more than
    GRID_TABLE_CHUNK columns (1397 to 2209) summed by chunk. bfloat16: float32 inputs
    take the exact-delta pass and sum the table in dQ's pass, not in chunks. Rounds
    read dS moved into key-code space when a tile's codes fit 2 BLOCK_N - 1 columns
    (Ww = 9: some 32-key tiles span exactly that many; one more and their last column
    is a key's), and divide each slot's code otherwise (the 12 x 40 window's tiles)."""
    q, k, v = _qkv(1, 2, 2, nq, 16, torch.bfloat16, device, Nk=nk)
    wh, ww = window
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), 2, device=device, requires_grad=True)
    assert _table_grad_error(q, k, v, table, window, backend) < 1e-4


@pytest.mark.parametrize("kind", ["grid", "grid+causal+sinks", "grid+softcap+fp16", "distance", "distance-far"])
def test_table_gradient_when_every_row_is_one_tile(kind, device, launches):
    """Every row's keys in one tile (Nk <= BLOCK_N: Swin's 49 tokens on a GPU, 24 keys
    against the interpreter's 32-key tiles here), half precision: dQ's pass corrects the
    tile's dS to the exact delta with that tile's own row sums and sums d(table) itself;
    no table pass follows (kernels/params.py ONE_TILE). DistanceBias with 100 queries
    against 16 keys: whole query blocks are far tiles (one end column, corrected at the
    end of the pass)."""
    dtype = torch.float16 if "fp16" in kind else torch.bfloat16
    q, k, v = _qkv(2, 2, 2, 100 if kind == "distance-far" else 20, 16, dtype, device,
                   Nk=16 if kind == "distance-far" else 24)
    kw = {}
    if kind == "distance":
        table = torch.randn(2, 9 + 1 + 6, device=device, requires_grad=True)
        enc = lambda t: posattn.DistanceBias(t, 9, 6)   # noqa: E731
    elif kind == "distance-far":
        table = torch.randn(2, 3 + 1 + 2, device=device, requires_grad=True)
        enc = lambda t: posattn.DistanceBias(t, 3, 2)   # noqa: E731
    else:
        table = torch.randn(7 * 11, 2, device=device, requires_grad=True)
        enc = lambda t: posattn.GridBias(t, (4, 6))   # noqa: E731
        if "sinks" in kind:
            kw = dict(causal=True, sinks=torch.randn(2, device=device))
        if "softcap" in kind:
            kw = dict(softcap=5.0)
    assert _table_grad_error(q, k, v, table, enc, "triton", **kw) < 1e-4
    from posattn.kernels import attention as A
    dq = [grads for name, _, grads in launches if name == "_attn_bwd_dq"]
    assert len(dq) == 1 and dq[0] >> A._ONE_TILE.value & 1 and dq[0] >> A._CORRECT.value & 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_grid_bias_table_gradient_with_shaw(dtype, device, backend):
    """GridBias with Shaw's embeddings: key tiles beyond Shaw's clip run as plain tiles
    in dQ's pass, but their pairs still read (and differentiate) the table's own
    columns (they once landed on DistanceBias's end columns, or nowhere)."""
    q, k, v = _qkv(1, 2, 2, 100, 16, dtype, device)

    def emb():  # representable in the input dtype, which the kernels round aK / aV to
        return torch.randn(2, 7, 16, device=device).to(dtype).float().requires_grad_()
    rel = posattn.RelativeEmbeddings(key=emb(), value=emb(), clip=3)
    table = torch.randn(15 * 39, 2, device=device, requires_grad=True)
    check(q, k, v, backend=backend, rel_emb=rel, rel_bias=posattn.GridBias(table, (8, 20)))
    assert _table_grad_error(q, k, v, table, (8, 20), backend, rel_emb=rel) < 1e-4


@pytest.mark.parametrize("mask", ["causal", "window"])
def test_grid_bias_with_masks_and_gqa(mask, device, backend):
    q, k, v = _qkv(2, 4, 2, 30, 16, torch.float32, device, Nk=35)
    table = torch.randn(9 * 13, 4, device=device, requires_grad=True)
    kw = {"causal": True} if mask == "causal" else {"window": (6, 3)}
    check(q, k, v, backend=backend, rel_bias=posattn.GridBias(table, (5, 7)), return_lse=True, **kw)


def test_periodic_bias_batch(device, backend):
    """bias [nB, ...] with B % nB == 0: batch b reads bias[b % nB]; the gradient sums
    over the batches that share it."""
    q, k, v = _qkv(6, 2, 2, 20, 16, torch.float32, device)
    bias = torch.randn(3, 1, 20, 20, device=device, requires_grad=True)
    check(q, k, v, backend=backend, bias=bias)
    mask = torch.rand(3, 2, 20, 20, device=device) < 0.7
    check(q, k, v, backend=backend, bias=mask, causal=True)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_large_positions_and_scaled_frequencies(interleaved, device, backend):
    """Positions near 2^20 (explicit, per batch) and llama3-style scaled frequencies
    over a partial rotary dim, with an attention factor: the rotation meets the
    precision rule (angles in float32, as PyTorch's own RoPE computes them)."""
    q, k, v = make_qkv((2, 2, 1, 40, 50, 64, False), torch.float32, device)
    top = 2 ** 20
    k_pos = torch.stack([torch.arange(top - 50, top), torch.arange(top - 80, top - 30)]).to(device)
    q_pos = k_pos[:, 10:]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 48, 2, dtype=torch.float32) / 48))
    inv_freq = torch.where(inv_freq < 2 * torch.pi / 64, inv_freq / 8, inv_freq).to(device)  # long wavelengths / 8
    check(q, k, v, backend=backend, causal=True, q_pos=q_pos, k_pos=k_pos,
          rope=posattn.RoPE(inv_freq, interleaved=interleaved, attention_factor=1.2))


@pytest.mark.parametrize("scale", [-0.4, 0.0, 2.5])
def test_any_scale_sign(scale, device, backend):
    """The forward takes max(scale * q.k) as scale * max(q.k) only for scale > 0:
    a negative or zero scale must give the same answers as the reference."""
    q, k, v = make_qkv((1, 2, 1, 37, 45, 16, False), torch.float32, device)
    check(q, k, v, backend=backend, causal=True, scale=scale, return_lse=True)
