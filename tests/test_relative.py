"""Relative encodings beyond the 1-D distance table: Swin/BEiT 2-D grid bias (with
shifted-window masks), Shaw relative embeddings, Transformer-XL. The reference is
checked against textbook implementations written here; the kernels against the
reference in float64."""
import math

import pytest
import torch

import posattn
from attn_check import check
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_grid_bias_kernel(dtype, device):
    """Swin block: 7x7 windows, 2 windows per image, a shifted-window mask that
    repeats over the batch of windows, gradients to q, k, v and the table."""
    wh, ww = 7, 7
    q, k, v = make(4, 3, 3, 49, 32, dtype, device)
    table = (0.5 * torch.randn(13 * 13, 3, device=device)).requires_grad_()
    mask = torch.where(torch.rand(2, 1, 49, 49, device=device) < 0.3, -100.0, 0.0).to(dtype)
    check(q, k, v, rel_bias=posattn.GridBias(table, (wh, ww)), bias=mask)


@pytest.mark.parametrize("mask", ["causal", "window"])
def test_grid_bias_with_masks_and_gqa(mask, device):
    q, k, v = make(2, 4, 2, 30, 16, torch.float32, device, Nk=35)
    table = torch.randn(9 * 13, 4, device=device, requires_grad=True)
    kw = {"causal": True} if mask == "causal" else {"window": (6, 3)}
    check(q, k, v, rel_bias=posattn.GridBias(table, (5, 7)), return_lse=True, **kw)


def test_periodic_bias_batch(device):
    """bias [nB, ...] with B % nB == 0: batch b reads bias[b % nB]; its gradient sums
    over the batches that share it."""
    q, k, v = make(6, 2, 2, 20, 16, torch.float32, device)
    bias = torch.randn(3, 1, 20, 20, device=device, requires_grad=True)
    check(q, k, v, bias=bias)


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
