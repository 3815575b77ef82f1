"""Relative encodings beyond the 1-D distance table: Swin/BEiT 2-D grid bias (with
shifted-window masks), Shaw relative embeddings, Transformer-XL. The reference is
checked against textbook implementations written here; the kernels against the
reference in float64."""
import math

import pytest
import torch

import posattn
import triton
import triton.language as tl
from attn_check import check
from posattn.kernels.relative import _keys_to_rel, _keys_to_rel_halves
from posattn import reference

f64 = torch.float64


def close(a, b, tol=1e-10):
    return ((a - b).norm() / b.norm()).item() < tol


# ----------------------------------------------------------------------------- Swin / BEiT

def swin_relative_position_index(wh, ww):
    """Swin Transformer's WindowAttention.relative_position_index."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = torch.flatten(coords, 1)                                # 2, N
    rel = flat[:, :, None] - flat[:, None, :]                      # 2, N, N
    rel = rel.permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def swin_attention(q, k, v, table, index, mask=None):
    """Swin's window attention: q*scale @ k^T + bias (+ shifted-window mask), softmax, @ v."""
    B_, H, N, D = q.shape
    attn = (q * D ** -0.5) @ k.transpose(-2, -1)
    bias = table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, H, N, N)
    return attn.softmax(-1) @ v


@pytest.mark.parametrize("window", [(7, 7), (3, 5), (1, 4)])
def test_reference_grid_bias_matches_swin(window):
    wh, ww = window
    N, H = wh * ww, 3
    q, k, v = (torch.randn(4, H, N, 8, dtype=f64) for _ in range(3))
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), H, dtype=f64)
    mask = torch.where(torch.rand(2, N, N) < 0.3, -100.0, 0.0).to(f64)
    want = swin_attention(q, k, v, table, swin_relative_position_index(wh, ww), mask)
    got = reference.attention(q, k, v, rel_bias=posattn.GridBias(table, window), bias=mask[:, None])
    assert close(got, want)


def make(B, Hq, Hkv, N, D, dtype, device, Nk=None):
    Nk = N if Nk is None else Nk
    q = torch.randn(B, Hq, N, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


# The GridBias kernel cases (Swin windows with a periodic mask, masks and GQA, the
# periodic bias batch) are in test_kernels.py, run once per backend.


def test_grid_bias_errors():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    with pytest.raises(ValueError, match="window"):
        posattn.GridBias(torch.randn(9, 2), (0, 2))
    with pytest.raises(ValueError, match=r"\(2Wh-1\)\(2Ww-1\)"):
        posattn.GridBias(torch.randn(10, 2), (2, 2))
    with pytest.raises(TypeError, match="table"):
        posattn.GridBias(torch.zeros(9, 2, dtype=torch.long), (2, 2))
    with pytest.raises(ValueError, match="Wh \\* Ww"):
        posattn.attention(q, k, v, rel_bias=posattn.GridBias(torch.randn(9, 2), (2, 2)))
    with pytest.raises(ValueError, match="rel_bias.table"):
        posattn.attention(q, k, v, rel_bias=posattn.GridBias(torch.randn(7 * 7, 3), (4, 4)))
    with pytest.raises(ValueError, match="bias"):
        posattn.attention(torch.randn(4, 2, 10, 8), *(torch.randn(4, 2, 10, 8) for _ in range(2)),
                          bias=torch.randn(3, 1, 10, 10))


# ----------------------------------------------------------------------------- Shaw et al.

def shaw_textbook(q, k, v, aK, aV, K):
    """Shaw et al. (2018) as the seed documents write it: materialise the [N, N, D]
    clipped relative embeddings a_ij, then e_ij = q_i.(k_j + aK_ij) / sqrt(D) and
    z_i = sum_j softmax(e)_ij (v_j + aV_ij). One head, no batch."""
    Nq, D = q.shape
    Nk = k.shape[0]
    off = Nk - Nq
    idx = torch.tensor([[min(max(j - (i + off), -K), K) + K for j in range(Nk)] for i in range(Nq)])
    a_k, a_v = aK[idx], aV[idx]                                    # [Nq, Nk, D]
    e = (q[:, None, :] * (k[None, :, :] + a_k)).sum(-1) / math.sqrt(D)
    p = e.softmax(-1)
    return (p[:, :, None] * (v[None, :, :] + a_v)).sum(1)


@pytest.mark.parametrize("K", [0, 2, 6, 40])
def test_reference_shaw_matches_textbook(K):
    H, Nq, Nk, D = 2, 9, 13, 8
    q, k, v = torch.randn(1, H, Nq, D, dtype=f64), torch.randn(1, H, Nk, D, dtype=f64), torch.randn(1, H, Nk, D, dtype=f64)
    aK, aV = torch.randn(H, 2 * K + 1, D, dtype=f64), torch.randn(H, 2 * K + 1, D, dtype=f64)
    got = reference.attention(q, k, v, rel_emb=posattn.RelativeEmbeddings(aK, aV, K))
    want = torch.stack([shaw_textbook(q[0, h], k[0, h], v[0, h], aK[h], aV[h], K) for h in range(H)])[None]
    assert close(got, want)


def txl_textbook(q, k, v, r_proj, r_w_bias, r_r_bias):
    """Transformer-XL's RelPartialLearnableMultiHeadAttn without memory: AC + BD with
    the _rel_shift trick, causal mask, 1/sqrt(d_head) scale. q, k, v: [N, H, D]."""
    N, H, D = q.shape
    d_model = r_proj.shape[1]
    pos_seq = torch.arange(N - 1, -1, -1.0, dtype=f64)
    inv_freq = 1 / (10000 ** (torch.arange(0.0, d_model, 2.0, dtype=f64) / d_model))
    sinusoid = torch.outer(pos_seq, inv_freq)
    r = torch.cat([sinusoid.sin(), sinusoid.cos()], -1)           # [N, d_model]
    r_head_k = (r @ r_proj.T).view(N, H, D)
    ac = torch.einsum("ibnd,jbnd->ijbn", (q + r_w_bias)[:, None], k[:, None])
    bd = torch.einsum("ibnd,jnd->ijbn", (q + r_r_bias)[:, None], r_head_k)
    zero_pad = torch.zeros((bd.size(0), 1, *bd.size()[2:]), dtype=f64)
    bd = torch.cat([zero_pad, bd], 1).view(bd.size(1) + 1, bd.size(0), *bd.size()[2:])[1:].view_as(bd)
    score = (ac + bd) / math.sqrt(D)
    mask = torch.triu(torch.ones(N, N, dtype=torch.bool), diagonal=1)[:, :, None, None]
    prob = score.masked_fill(mask, float("-inf")).softmax(1)
    return torch.einsum("ijbn,jbnd->ibnd", prob, v[:, None])[:, 0]   # [N, H, D]


def test_reference_transformer_xl_matches_rel_shift():
    N, H, D, d_model = 11, 2, 8, 12
    q, k, v = (torch.randn(N, H, D, dtype=f64) for _ in range(3))
    r_proj = torch.randn(H * D, d_model, dtype=f64)
    u, w = torch.randn(H, D, dtype=f64), torch.randn(H, D, dtype=f64)
    want = txl_textbook(q, k, v, r_proj, u, w)
    rel = posattn.RelativeEmbeddings.transformer_xl(r_proj, u, w, clip=N - 1)
    got = reference.attention(*(x.permute(1, 0, 2)[None] for x in (q, k, v)), causal=True, rel_emb=rel)
    assert close(got[0].permute(1, 0, 2), want)


@triton.jit
def _halves_probe(X, Out, BLOCK: tl.constexpr):
    i, j = tl.arange(0, BLOCK), tl.arange(0, BLOCK)
    x = tl.load(X + i[:, None] * BLOCK + j[None, :])
    lo, hi = _keys_to_rel_halves(x, BLOCK)
    r = tl.arange(0, 2 * BLOCK)
    tl.store(Out + i[:, None] * 2 * BLOCK + j[None, :], lo)
    tl.store(Out + i[:, None] * 2 * BLOCK + BLOCK + j[None, :], hi)
    tl.store(Out + BLOCK * 2 * BLOCK + i[:, None] * 2 * BLOCK + r[None, :], _keys_to_rel(x, BLOCK, BLOCK))


def shaw(Hq, K, D, device, shared=False, value=True, u=False, w=False):
    h = 1 if shared else Hq
    rnd = lambda *s: (0.5 * torch.randn(*s, device=device)).requires_grad_()  # noqa: E731
    return posattn.RelativeEmbeddings(rnd(h, 2 * K + 1, D), rnd(h, 2 * K + 1, D) if value else None, K,
                                      rnd(Hq, D) if u else None, rnd(Hq, D) if w else None)


MASKS = {"full": {}, "causal": {"causal": True}, "window": {"window": (9, 4)}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", list(MASKS))
def test_shaw_kernel(mask, dtype, device):
    q, k, v = make(2, 4, 2, 45, 24, dtype, device, Nk=70)
    check(q, k, v, rel_emb=shaw(4, 6, 24, device), **MASKS[mask])


@pytest.mark.parametrize("K", [0, 1, 16, 300])
def test_shaw_clips_and_shared_tables(K, device):
    q, k, v = make(1, 2, 2, 70, 16, torch.float32, device, Nk=60)
    check(q, k, v, rel_emb=shaw(2, K, 16, device, shared=K % 2 == 0), return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shaw_tiles_beyond_the_clip(dtype, device):
    """Key tiles wholly at rel <= -K or >= K read aK / aV's end rows only (the forward
    runs them as plain tiles plus a row constant and rowsum(P) aV[0 or 2K]): long
    enough rows for such tiles on both sides of the diagonal, u and w too."""
    q, k, v = make(1, 2, 2, 150, 16, dtype, device, Nk=170)
    check(q, k, v, rel_emb=shaw(2, 5, 16, device, u=True, w=True), return_lse=True)


@pytest.mark.parametrize("D,causal,xl", [(16, False, False), (80, True, True)], ids=["D16", "D80-causal-xl"])
def test_shaw_square_tiles(D, causal, xl, device, monkeypatch):
    """Forward and backward on a GPU's square Shaw tiles (64x64; the interpreter's are
    64x32): P (and at D <= 64 dQ's dS) shifted into slice space as two halves without
    clamp or mask (kernels/relative.py _keys_to_rel_halves), each against its half of
    the aV (aK) slice;
    tiles beyond the clip on both sides (their rowsum(P) summed per side, times aV's end
    rows after the loop; 200 queries against 130 keys put tiles above the clip in the
    first blocks, below it in the last); at D = 80 the masked loop's range and the
    epilogue's offsets recomputed from the program ids (kernels/forward.py AGAIN)."""
    from posattn import _triton
    config = _triton._config

    def square(D_, backward, rel_emb=False, **kw):
        c = config(D_, backward, rel_emb, **kw)
        return (64, 64, *c[2:]) if rel_emb else c
    monkeypatch.setattr(_triton, "_config", square)
    q, k, v = make(1, 2, 2, 200, D, torch.bfloat16, device, Nk=130)
    check(q, k, v, rel_emb=shaw(2, 5, D, device, u=xl, w=xl), causal=causal, return_lse=True)


@pytest.mark.parametrize("BLOCK", [16, 64])
def test_keys_to_rel_halves_match_the_clamped_shift(BLOCK, device):
    """_keys_to_rel_halves against _keys_to_rel on random tiles: the two halves side by
    side are the whole slice, bit for bit (every row's zeros outside the tile too)."""
    x = torch.randn(BLOCK, BLOCK, device=device)
    out = torch.empty(2, BLOCK, 2 * BLOCK, device=device)
    _halves_probe[(1,)](x, out, BLOCK)
    assert torch.equal(out[0], out[1])
    i, r = torch.arange(BLOCK)[:, None], torch.arange(2 * BLOCK)[None, :]
    j = r + i - BLOCK + 1
    want = torch.where((j >= 0) & (j < BLOCK), x.cpu()[i, j.clamp(0, BLOCK - 1)], 0.0)
    assert torch.equal(out[0].cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transformer_xl_kernel(dtype, device):
    """u, w and a key table spanning every distance (K = Nk - 1), causal, GQA."""
    N, H, D = 67, 4, 32
    q, k, v = make(1, H, 2, N, D, dtype, device)
    r_proj = (0.1 * torch.randn(H * D, 48, device=device)).requires_grad_()
    u, w = (torch.randn(H, D, device=device) * 0.3).requires_grad_(), (torch.randn(H, D, device=device) * 0.3).requires_grad_()
    rel = posattn.RelativeEmbeddings.transformer_xl(r_proj, u, w, clip=N - 1)
    check(q, k, v, causal=True, rel_emb=rel, return_lse=True)
    # the gradient reaches W_R through the table, like the textbook
    out = posattn.attention(q, k, v, causal=True, rel_emb=rel, backend="triton")
    (g,) = torch.autograd.grad(out.float().sum(), r_proj)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_transformer_xl_host_rows_round_as_the_kernels(dtype, device, monkeypatch):
    """The forward and dK / dV read q + u and q + w from the host's workspace
    (_triton._xl_rows); dQ, d(aK, aV) and decoding add them in the kernel, and the
    backward reuses the forward's lse, so both must round alike: the output, lse and
    every gradient are the same bits either way (to nearest: a GPU's rounding, and the
    interpreter's as tests/conftest.py patches it)."""
    from posattn import _triton
    q, k, v = make(1, 2, 2, 40, 24, dtype, device)
    rel = shaw(2, 5, 24, device, u=True, w=True)
    leaves = (q, k, v, rel.key, rel.value, rel.content_bias, rel.position_bias)

    def run():
        out, lse = posattn.attention(q, k, v, causal=True, rel_emb=rel, return_lse=True, backend="triton")
        g = torch.randn_like(out, generator=torch.Generator(out.device).manual_seed(0))
        return (out, lse, *torch.autograd.grad(out, leaves, g))

    host = run()
    monkeypatch.setattr(_triton, "XL_HOST_ROWS", False)
    kernel = run()
    assert all(torch.equal(a, b) for a, b in zip(host, kernel))


def test_shaw_with_rope_alibi_and_dense_bias(device):
    q, k, v = make(2, 2, 1, 40, 32, torch.float32, device, Nk=52)
    bias = torch.randn(2, 1, 40, 52, device=device, requires_grad=True)
    check(q, k, v, rel_emb=shaw(2, 5, 32, device, u=True, w=True), rope=posattn.RoPE(dim=16),
          alibi_slopes=posattn.alibi_slopes(2, device=device), bias=bias, causal=True)


def test_shaw_only_content_bias(device):
    q, k, v = make(1, 2, 2, 30, 16, torch.float32, device)
    u = torch.randn(2, 16, device=device, requires_grad=True)
    check(q, k, v, rel_emb=posattn.RelativeEmbeddings(content_bias=u, clip=0))


def test_shaw_explicit_positions_fall_back_to_reference(device):
    q, k, v = make(1, 2, 2, 10, 16, torch.float32, device)
    pos = torch.arange(10, device=device)
    rel = shaw(2, 3, 16, device)
    with pytest.raises(ValueError, match="triton.*refused.*rel_emb"):
        posattn.attention(q, k, v, rel_emb=rel, q_pos=pos, backend="triton")
    assert posattn.select_backend(q, k, v, rel_emb=rel, q_pos=pos) != "triton"


def test_relative_embeddings_errors():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    with pytest.raises(ValueError, match="clip"):
        posattn.RelativeEmbeddings(torch.randn(2, 5, 8), clip=-1)
    with pytest.raises(ValueError, match="2K\\+1"):
        posattn.RelativeEmbeddings(torch.randn(2, 6, 8), clip=2)
    with pytest.raises(ValueError, match="same number of heads"):
        posattn.RelativeEmbeddings(torch.randn(2, 5, 8), torch.randn(1, 5, 8), clip=2)
    with pytest.raises(ValueError, match="at least one"):
        posattn.RelativeEmbeddings(clip=2)
    with pytest.raises(ValueError, match="position_bias"):
        posattn.RelativeEmbeddings(value=torch.randn(2, 5, 8), clip=2, position_bias=torch.randn(2, 8))
    with pytest.raises(TypeError, match="key"):
        posattn.RelativeEmbeddings(torch.zeros(2, 5, 8, dtype=torch.long), clip=2)
    with pytest.raises(TypeError, match="rel_emb"):
        posattn.attention(q, k, v, rel_emb=torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="rel_emb.key"):
        posattn.attention(q, k, v, rel_emb=posattn.RelativeEmbeddings(torch.randn(3, 5, 8), clip=2))
    with pytest.raises(ValueError, match="rel_emb.key"):
        posattn.attention(q, k, v, rel_emb=posattn.RelativeEmbeddings(torch.randn(2, 5, 4), clip=2))
    with pytest.raises(ValueError, match="rel_emb.content_bias"):
        posattn.attention(q, k, v, rel_emb=posattn.RelativeEmbeddings(content_bias=torch.randn(3, 8), clip=0))
    with pytest.raises(ValueError, match="r_proj"):
        posattn.RelativeEmbeddings.transformer_xl(torch.randn(15, 4), torch.randn(2, 8), torch.randn(2, 8), 3)
