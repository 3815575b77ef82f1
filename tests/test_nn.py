"""posattn.nn: the modules against torch.nn.MultiheadAttention and hand-written
versions of each paper's computation.

CPU only. The modules use the automatic backend: the reference without
TRITON_INTERPRET, the Triton kernels in the interpreter with it (as under
``make test``), so the shapes stay tiny (N <= 24, D = 8, 2 heads).
"""
import math

import pytest
import torch

import posattn
from posattn import nn as pnn

E, H, D = 16, 2, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def manual_attention(q, k, v, bias=None, scale=None):
    """softmax(scale * q k^T + bias) v in float64, q/k/v [B, H, N, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q.double() @ k.double().transpose(-1, -2)
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, -1) @ v.double()


def heads(x, lin, nh):
    B, N, _ = x.shape
    return lin(x).view(B, N, nh, -1).transpose(1, 2)


def merge(o, m):
    B, nh, N, d = o.shape
    return m.out_proj(o.transpose(1, 2).reshape(B, N, nh * d).to(m.out_proj.weight.dtype))


def causal_keep(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


# --------------------------------------------------------------------------
# shapes, repr, construction errors
# --------------------------------------------------------------------------

def test_shapes_and_extra_repr():
    rot = pnn.RotaryEmbedding(6, base=500.0, interleaved=True)
    assert rot.inv_freq.shape == (3,) and isinstance(rot(), posattn.RoPE)
    assert repr(rot) == "RotaryEmbedding(dim=6, base=500.0, interleaved=True)"
    ali = pnn.ALiBi(3)
    assert ali().shape == (3,) and "num_heads=3, learnable=False" in repr(ali)
    assert "slopes" in dict(ali.named_buffers()) and not list(ali.parameters())
    assert isinstance(pnn.ALiBi(3, learnable=True).slopes, torch.nn.Parameter)
    t5 = pnn.T5RelativeBias(H, num_buckets=8, max_distance=12, bidirectional=False)
    assert t5.relative_attention_bias.weight.shape == (8, H)
    db = t5()
    assert isinstance(db, posattn.DistanceBias) and db.table.shape == (H, 13) and (db.left, db.right) == (12, 0)
    assert "num_buckets=8, max_distance=12, bidirectional=False" in repr(t5)
    sw = pnn.SwinRelativeBias((3, 4), H)
    assert sw.relative_position_bias_table.shape == (5 * 7, H) and isinstance(sw(), posattn.GridBias)
    assert "window=(3, 4), num_heads=2" in repr(sw)
    # Swin's trunc_normal_(std=.02) keeps the default cut at +-2 (absolute), i.e. a plain N(0, .02^2)
    assert 0.005 < sw.relative_position_bias_table.std() < 0.05
    shaw = pnn.ShawRelativeEmbeddings(H, D, clip=3)
    assert shaw.key.shape == (H, 7, D) and shaw.value.shape == (H, 7, D)
    assert pnn.ShawRelativeEmbeddings(H, D, 3, value=False, shared_heads=True)().value is None
    assert pnn.ShawRelativeEmbeddings(H, D, 3, shared_heads=True).key.shape == (1, 7, D)
    assert "clip=3, value=True, shared_heads=False" in repr(shaw)
    txl = pnn.TransformerXLRelativeEmbeddings(E, H, D, clip=5)
    re = txl()
    assert re.key.shape == (H, 11, D) and re.content_bias.shape == (H, D) and re.position_bias.shape == (H, D)
    assert txl.r_net.weight.shape == (H * D, E) and "d_model=16, num_heads=2, head_dim=8, clip=5" in repr(txl)
    assert "d_model=16, max_len=None" in repr(pnn.SinusoidalPositionalEncoding(E))
    assert pnn.LearnedPositionalEncoding(10, E).weight.shape == (10, E)
    assert "max_len=10, d_model=16" in repr(pnn.LearnedPositionalEncoding(10, E))
    m = pnn.MultiheadAttention(E, 4, num_kv_heads=2, causal=True, positional=pnn.ALiBi(4), backend="reference")
    assert m.k_proj.weight.shape == (2 * 4, E) and m.q_proj.weight.shape == (E, E)
    assert "embed_dim=16, num_heads=4, num_kv_heads=2, head_dim=4, causal=True" in repr(m)
    assert "backend='reference'" in repr(m) and "(positional): ALiBi(num_heads=4" in repr(m)


def test_construction_errors():
    with pytest.raises(ValueError, match="dropout"):
        pnn.MultiheadAttention(E, H, dropout=1.0)
    with pytest.raises(TypeError, match="absolute encoding"):
        pnn.MultiheadAttention(E, H, positional=pnn.SinusoidalPositionalEncoding(E))
    with pytest.raises(TypeError, match="positional must be"):
        pnn.MultiheadAttention(E, H, positional=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="heads"):
        pnn.MultiheadAttention(E, H, positional=pnn.ALiBi(4))
    with pytest.raises(ValueError, match="head_dim"):
        pnn.MultiheadAttention(E, H, positional=pnn.ShawRelativeEmbeddings(H, 4, 2))
    with pytest.raises(ValueError, match="dim=16 > head dim 8"):
        pnn.MultiheadAttention(E, H, positional=pnn.RotaryEmbedding(16))
    with pytest.raises(ValueError, match="multiple"):
        pnn.MultiheadAttention(E, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        pnn.MultiheadAttention(E, 3)
    with pytest.raises(ValueError, match="scaling"):
        pnn.RotaryEmbedding(8, scaling={"type": "yarn", "factor": 2})
    with pytest.raises(ValueError, match="max_distance"):
        pnn.T5RelativeBias(H, num_buckets=32, max_distance=8)
    m = pnn.MultiheadAttention(E, H)
    with pytest.raises(ValueError, match="need_weights"):
        m(torch.randn(1, 4, E), need_weights=True)


# --------------------------------------------------------------------------
# MultiheadAttention vs torch.nn.MultiheadAttention
# --------------------------------------------------------------------------

def torch_twin(m: pnn.MultiheadAttention, batch_first):
    t = torch.nn.MultiheadAttention(E, H, bias=True, batch_first=batch_first)
    with torch.no_grad():
        t.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        t.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        t.out_proj.weight.copy_(m.out_proj.weight)
        t.out_proj.bias.copy_(m.out_proj.bias)
    return t


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float", "torch3d", "causal"])
def test_matches_torch_mha(batch_first, mask):
    B, Nq, Nk = 2, 5, 7
    m = pnn.MultiheadAttention(E, H, batch_first=batch_first, causal=mask == "causal")
    with torch.no_grad():   # non-zero biases, so that copying them is tested too
        for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
            lin.bias.normal_()
    t = torch_twin(m, batch_first)
    shape = lambda n: (B, n, E) if batch_first else (n, B, E)  # noqa: E731
    q, k, v = torch.randn(shape(Nq)), torch.randn(shape(Nk)), torch.randn(shape(Nk))
    ours_kw, torch_kw = {}, {}
    if mask == "bool":
        keep = torch.rand(Nq, Nk) < 0.7
        keep[:, 0] = True                       # no empty row (torch gives NaN there)
        # posattn: True = attend. torch.nn.MultiheadAttention: True = NOT allowed.
        ours_kw["attn_mask"], torch_kw["attn_mask"] = keep, ~keep
    elif mask == "float":
        f = torch.randn(Nq, Nk)
        ours_kw["attn_mask"] = torch_kw["attn_mask"] = f
    elif mask == "torch3d":                    # torch's [B * H, Nq, Nk]
        f = torch.randn(B * H, Nq, Nk)
        ours_kw["attn_mask"] = torch_kw["attn_mask"] = f
    elif mask == "causal":                      # posattn: bottom-right aligned causal
        torch_kw["attn_mask"] = ~torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    out, w = m(q, k, v, **ours_kw)
    ref, _ = t(q, k, v, need_weights=False, **torch_kw)
    assert w is None
    assert out.shape == ref.shape == shape(Nq)
    torch.testing.assert_close(out, ref, **TOL)


def test_bool_mask_convention_is_keep():
    """The same bool tensor means opposite things in torch and here: check that
    passing torch's mask unchanged gives a different result, and ~mask the same."""
    m = pnn.MultiheadAttention(E, H)
    t = torch_twin(m, True)
    x = torch.randn(1, 6, E)
    torch_mask = torch.zeros(6, 6, dtype=torch.bool)
    torch_mask[:, 3:] = True                    # torch: keys 3.. masked out
    ref, _ = t(x, x, x, attn_mask=torch_mask, need_weights=False)
    torch.testing.assert_close(m(x, attn_mask=~torch_mask)[0], ref, **TOL)
    assert not torch.allclose(m(x, attn_mask=torch_mask)[0], ref, atol=1e-3)


def test_self_attention_defaults_and_unbatched():
    m = pnn.MultiheadAttention(E, H, causal=True)
    x = torch.randn(3, 9, E)
    full = m(x, x, x)[0]
    torch.testing.assert_close(m(x)[0], full)
    torch.testing.assert_close(m(x, x)[0], full)
    torch.testing.assert_close(m(x[1])[0], full[1], **TOL)      # [N, E] unbatched


def test_gqa_equals_repeated_heads():
    """num_kv_heads=1 equals full multi-head attention with the k/v projection repeated."""
    m = pnn.MultiheadAttention(E, H, num_kv_heads=1, causal=True)
    full = pnn.MultiheadAttention(E, H, causal=True)
    with torch.no_grad():
        full.q_proj.load_state_dict(m.q_proj.state_dict())
        full.out_proj.load_state_dict(m.out_proj.state_dict())
        for a, b in ((full.k_proj, m.k_proj), (full.v_proj, m.v_proj)):
            a.weight.copy_(b.weight.repeat(H, 1))
            a.bias.copy_(b.bias.repeat(H))
    x = torch.randn(2, 8, E)
    torch.testing.assert_close(m(x)[0], full(x)[0], **TOL)


# --------------------------------------------------------------------------
# gradients reach every parameter
# --------------------------------------------------------------------------

POSITIONALS = {
    "none": lambda: None,
    "rotary": lambda: pnn.RotaryEmbedding(D),
    "alibi_learnable": lambda: pnn.ALiBi(H, learnable=True),
    "t5": lambda: pnn.T5RelativeBias(H, num_buckets=8, max_distance=12),
    "swin": lambda: pnn.SwinRelativeBias((3, 4), H),
    "shaw": lambda: pnn.ShawRelativeEmbeddings(H, D, clip=3),
    "txl": lambda: pnn.TransformerXLRelativeEmbeddings(E, H, D, clip=11),
}


@pytest.mark.parametrize("name", list(POSITIONALS))
def test_gradients_reach_every_parameter(name):
    pos = POSITIONALS[name]()
    m = pnn.MultiheadAttention(E, H, positional=pos, causal=name != "swin")
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().max() == 0:              # zero-initialised biases, u and w
                p.normal_(std=0.1)
    x = torch.randn(2, 12, E)
    out, _ = m(x)
    (out * torch.randn_like(out)).sum().backward()
    names = [n for n, _ in m.named_parameters()]
    assert len(names) == 8 + {"none": 0, "rotary": 0, "alibi_learnable": 1, "t5": 1, "swin": 1,
                              "shaw": 2, "txl": 3}[name]
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        assert p.grad.abs().max() > 0, n


# --------------------------------------------------------------------------
# each encoding against a hand-written version of the paper's computation
# --------------------------------------------------------------------------

def hf_t5_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """HF transformers' T5Attention._relative_position_bucket, verbatim in substance."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return relative_buckets + torch.where(is_small, relative_position, large)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_matches_hf_computation(bidirectional):
    n, nb, md = 24, 8, 10                      # distances past max_distance are included
    t5 = pnn.T5RelativeBias(H, num_buckets=nb, max_distance=md, bidirectional=bidirectional)
    with torch.no_grad():
        t5.relative_attention_bias.weight.normal_()
    m = pnn.MultiheadAttention(E, H, positional=t5, scale=1.0, causal=not bidirectional)
    x = torch.randn(2, n, E)
    ctx = torch.arange(n)[:, None]
    mem = torch.arange(n)[None, :]
    buckets = hf_t5_bucket(mem - ctx, bidirectional, nb, md)              # [n, n]
    position_bias = t5.relative_attention_bias(buckets).permute(2, 0, 1)  # [H, n, n]
    if not bidirectional:
        position_bias = position_bias.masked_fill(~causal_keep(n), -math.inf)
    ref = merge(manual_attention(heads(x, m.q_proj, H), heads(x, m.k_proj, H), heads(x, m.v_proj, H),
                                 position_bias, scale=1.0), m)
    torch.testing.assert_close(m(x)[0], ref.float(), **TOL)


def swin_relative_position_index(wh, ww):
    """Swin's WindowAttention.relative_position_index."""
    coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def test_swin_matches_swin_computation_and_reference():
    wh, ww = 3, 4
    sw = pnn.SwinRelativeBias((wh, ww), H)
    with torch.no_grad():
        sw.relative_position_bias_table.normal_()
    m = pnn.MultiheadAttention(E, H, positional=sw)
    x = torch.randn(3, wh * ww, E)              # three windows
    idx = swin_relative_position_index(wh, ww)
    bias = sw.relative_position_bias_table[idx.view(-1)].view(wh * ww, wh * ww, H).permute(2, 0, 1)
    q, k, v = heads(x, m.q_proj, H), heads(x, m.k_proj, H), heads(x, m.v_proj, H)
    out = m(x)[0]
    torch.testing.assert_close(out, merge(manual_attention(q, k, v, bias), m).float(), **TOL)
    ref = posattn.reference.attention(q, k, v, rel_bias=posattn.GridBias(sw.relative_position_bias_table,
                                                                          (wh, ww)))
    torch.testing.assert_close(out, merge(ref, m), **TOL)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("rdim", [D, 4])
def test_rotary_matches_hf_llama(rdim):
    m = pnn.MultiheadAttention(E, H, positional=pnn.RotaryEmbedding(rdim, base=100.0), causal=True)
    n = 10
    x = torch.randn(2, n, E)
    q, k, v = (heads(x, lin, H).double() for lin in (m.q_proj, m.k_proj, m.v_proj))
    inv_freq = 1.0 / 100.0 ** (torch.arange(0, rdim, 2, dtype=torch.float64) / rdim)
    freqs = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    rot = lambda t: torch.cat([t[..., :rdim] * cos + rotate_half(t[..., :rdim]) * sin, t[..., rdim:]], -1)  # noqa
    bias = torch.zeros(n, n, dtype=torch.float64).masked_fill(~causal_keep(n), -math.inf)
    ref = merge(manual_attention(rot(q), rot(k), v, bias), m)
    torch.testing.assert_close(m(x)[0], ref.float(), **TOL)


def test_rotary_inv_freq_and_scalings():
    r = 8
    base = 1.0 / 10000.0 ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    torch.testing.assert_close(pnn.RotaryEmbedding(r).inv_freq, base.float())
    lin = pnn.RotaryEmbedding(r, scaling={"type": "linear", "factor": 4.0})
    torch.testing.assert_close(lin.inv_freq, (base / 4).float())
    ntk = pnn.RotaryEmbedding(r, scaling={"type": "ntk", "factor": 4.0})
    ntk_base = 10000.0 * 4.0 ** (r / (r - 2))
    torch.testing.assert_close(ntk.inv_freq, (1.0 / ntk_base ** (torch.arange(0, r, 2) / r)).float())
    # llama3: wavelengths shorter than original_len / high_freq_factor keep their
    # frequency, longer than original_len / low_freq_factor are divided by factor.
    ll = pnn.RotaryEmbedding(64, base=500000.0, scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192})
    b64 = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    wl = 2 * math.pi / b64
    hi, lo = wl < 8192 / 4, wl > 8192
    assert hi.any() and lo.any() and (~hi & ~lo).any()
    torch.testing.assert_close(ll.inv_freq[hi], b64[hi].float())
    torch.testing.assert_close(ll.inv_freq[lo], (b64[lo] / 8).float())
    mid = ll.inv_freq[~hi & ~lo].double()
    assert ((mid <= b64[~hi & ~lo]) & (mid >= b64[~hi & ~lo] / 8)).all()
    # casting the module does not round the frequencies
    m = pnn.RotaryEmbedding(r).to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32
    torch.testing.assert_close(m.inv_freq, base.float())


def test_alibi_matches_manual():
    m = pnn.MultiheadAttention(E, H, positional=pnn.ALiBi(H), causal=True)
    n = 9
    x = torch.randn(2, n, E)
    rel = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).double()
    slopes = torch.tensor([2.0 ** -4, 2.0 ** -8], dtype=torch.float64)   # 2 heads
    bias = (-slopes[:, None, None] * rel.abs()).masked_fill(~causal_keep(n), -math.inf)
    q, k, v = heads(x, m.q_proj, H), heads(x, m.k_proj, H), heads(x, m.v_proj, H)
    torch.testing.assert_close(m(x)[0], merge(manual_attention(q, k, v, bias), m).float(), **TOL)


def test_shaw_matches_manual():
    clip, n = 3, 10
    shaw = pnn.ShawRelativeEmbeddings(H, D, clip)
    m = pnn.MultiheadAttention(E, H, positional=shaw, causal=True)
    x = torch.randn(2, n, E)
    q, k, v = (heads(x, lin, H).double() for lin in (m.q_proj, m.k_proj, m.v_proj))
    c = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).clamp(-clip, clip) + clip   # [i, j]
    aK, aV = shaw.key.double()[:, c], shaw.value.double()[:, c]                          # [H, n, n, D]
    s = (q @ k.transpose(-1, -2) + torch.einsum("bhid,hijd->bhij", q, aK)) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~causal_keep(n), -math.inf), -1)
    o = p @ v + torch.einsum("bhij,hijd->bhid", p, aV)
    torch.testing.assert_close(m(x)[0], merge(o, m).float(), **TOL)


def test_transformer_xl_matches_manual():
    n = 10
    txl = pnn.TransformerXLRelativeEmbeddings(E, H, D, clip=n - 1)
    with torch.no_grad():
        txl.u.normal_()
        txl.w.normal_()
    m = pnn.MultiheadAttention(E, H, positional=txl, causal=True)
    x = torch.randn(2, n, E)
    q, k, v = (heads(x, lin, H).double() for lin in (m.q_proj, m.k_proj, m.v_proj))
    # Transformer-XL: R_{i-j} = [sin((i-j) f), cos((i-j) f)], f_t = 1 / 10000^(2t/d_model)
    f = 1.0 / 10000 ** (torch.arange(0, E, 2, dtype=torch.float64) / E)
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).double()            # i - j
    R = torch.cat([(dist[..., None] * f).sin(), (dist[..., None] * f).cos()], -1)    # [i, j, E]
    r = (R @ txl.r_net.weight.double().t()).view(n, n, H, D)                         # W_R R
    u, w = txl.u.double()[None, :, None], txl.w.double()[None, :, None]
    s = ((q + u) @ k.transpose(-1, -2) + torch.einsum("bhid,ijhd->bhij", q + w, r)) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~causal_keep(n), -math.inf), -1)
    torch.testing.assert_close(m(x)[0], merge(p @ v, m).float(), **TOL)


# --------------------------------------------------------------------------
# absolute encodings
# --------------------------------------------------------------------------

@pytest.mark.parametrize("max_len", [None, 40])
@pytest.mark.parametrize("d", [16, 7])
def test_sinusoidal_matches_formula(max_len, d):
    pe = pnn.SinusoidalPositionalEncoding(d, max_len=max_len)
    n = 33
    x = torch.randn(2, n, d)
    out = pe(x)
    expect = torch.empty(n, d, dtype=torch.float64)
    for p in range(n):
        for j in range(d):
            i2 = j - j % 2                      # 2i
            angle = p / 10000.0 ** (i2 / d)
            expect[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    torch.testing.assert_close(out, x + expect.float(), **TOL)
    pos = torch.tensor([[5, 0, 32], [1, 2, 3]])
    torch.testing.assert_close(pe(x[:, :3], pos), x[:, :3] + expect[pos].float(), **TOL)
    assert pe(x[0]).shape == (n, d)


def test_absolute_past_max_len_raises():
    pe = pnn.LearnedPositionalEncoding(8, E)
    x = torch.randn(2, 8, E)
    out = pe(x)
    torch.testing.assert_close(out, x + pe.weight[None])
    with pytest.raises(ValueError, match=r"length 9 has positions up to 8, past max_len=8"):
        pe(torch.randn(2, 9, E))
    with pytest.raises(ValueError, match=r"position 8 is past max_len=8"):
        pe(x[:, :2], torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"positions must be >= 0"):
        pe(x[:, :2], torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="past max_len=8"):
        pnn.SinusoidalPositionalEncoding(E, max_len=8)(torch.randn(1, 9, E))
    pnn.SinusoidalPositionalEncoding(E)(torch.randn(1, 100, E))   # no max_len: any length
    out.sum().backward()
    assert pe.weight.grad is not None



def test_kerple_module_trains_through_multihead_attention():
    """posattn.nn.KERPLE: the module's r1 / r2 reach the kernel as posattn.KERPLE and get
    gradients; the same problem through posattn.attention by hand gives the same output."""
    kerple = pnn.KERPLE(H, r1_init=0.7, r2_init=0.3)
    m = pnn.MultiheadAttention(E, H, causal=True, positional=kerple, backend="reference")
    x = torch.randn(2, 9, E)
    out, _ = m(x)
    out.pow(2).sum().backward()
    assert kerple.r1.grad is not None and kerple.r1.grad.abs().sum() > 0
    assert kerple.r2.grad is not None and kerple.r2.grad.abs().sum() > 0
    enc = kerple()
    assert isinstance(enc, posattn.KERPLE) and torch.equal(enc.r1, torch.full((H,), 0.7))
    with torch.no_grad():
        kerple.r2.fill_(-1.0)
    assert torch.equal(kerple().r2, torch.full((H,), 1e-2))   # clamped positive
    with pytest.raises(ValueError, match="r1_init must be a positive number"):
        pnn.KERPLE(H, r1_init=0.0)


def test_multihead_attention_softcap_and_sinks(device):
    """posattn.nn.MultiheadAttention(softcap=, sinks=True): the module's output equals the
    reference backend's, and the learned sinks get their gradient."""
    torch.manual_seed(0)
    fused = pnn.MultiheadAttention(32, 4, causal=True, softcap=2.0, sinks=True).to(device)
    ref = pnn.MultiheadAttention(32, 4, causal=True, softcap=2.0, sinks=True, backend="reference").to(device)
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():
        fused.sinks.normal_()
        ref.sinks.copy_(fused.sinks)
    assert "softcap=2.0, sinks=True" in repr(fused)
    x = torch.randn(2, 10, 32, device=device)
    outs = [m(x, x, x)[0] for m in (fused, ref)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for o in outs:
        o.square().sum().backward()
    torch.testing.assert_close(fused.sinks.grad, ref.sinks.grad, rtol=1e-4, atol=1e-5)
    assert fused.sinks.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="softcap"):
        pnn.MultiheadAttention(32, 4, softcap=0.0)


@pytest.mark.parametrize("extra", [{}, {"beta_fast": 16, "beta_slow": 2, "truncate": False},
                                   {"mscale": 1.0, "mscale_all_dim": 0.707}, {"attention_factor": 1.25}],
                         ids=["defaults", "betas+no-truncate", "mscale", "attention_factor"])
@pytest.mark.parametrize("head_dim,base,factor", [(64, 10000.0, 4.0), (128, 500000.0, 16.0)])
def test_yarn_matches_hugging_face(head_dim, base, factor, extra):
    """RotaryEmbedding(scaling={"type": "yarn", ...}) gives the inv_freq and attention
    factor of transformers' YaRN initialisation for the same values."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = dict(factor=factor, original_max_position_embeddings=4096, **extra)
    config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=int(4096 * factor),
                                      rope_parameters=dict(rope_type="yarn", rope_theta=base, **params))
    inv_hf, att_hf = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    m = pnn.RotaryEmbedding(head_dim, base=base, scaling=dict(type="yarn", **params))
    torch.testing.assert_close(m.inv_freq, inv_hf.float(), rtol=2e-7, atol=0)
    assert m.attention_factor == pytest.approx(att_hf, rel=1e-12)
    assert m().attention_factor == m.attention_factor
    with pytest.raises(ValueError, match="attention factor"):
        pnn.RotaryEmbedding(head_dim, base=base, scaling=dict(type="yarn", **params), attention_factor=2.0)
