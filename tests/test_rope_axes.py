"""Multi-axis RoPE (RoPE(sections=...), rope_pos=): the reference against independent
implementations (a hand-written axial 2-D RoPE, transformers' Qwen2-VL M-RoPE at the
positions its get_rope_index gives), the kernels against the reference, the reduction
to plain RoPE, and the errors."""
import pytest
import torch

import posattn
from posattn import _validate

from attn_check import check


def _qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, device="cpu"):
    return (torch.randn(B, Hq, Nq, D, device=device, dtype=dtype, requires_grad=True),
            *(torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2)))


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def test_reference_is_axial_2d_rope():
    """A ViT grid: the first half of the frequency pairs rotate by the patch's row, the
    second half by its column (EVA-02's axial RoPE, written out here by hand)."""
    torch.manual_seed(0)
    Hp, Wp, D = 3, 5, 16
    N = Hp * Wp
    rows = torch.arange(Hp).repeat_interleave(Wp)
    cols = torch.arange(Wp).repeat(Hp)
    inv_freq = 1.0 / 100.0 ** (torch.arange(0, D // 2, dtype=torch.float64) / (D // 2))
    theta = torch.cat((rows[:, None] * inv_freq[: D // 4], cols[:, None] * inv_freq[D // 4:]), dim=-1)
    cos, sin = torch.cat((theta.cos(), theta.cos()), -1), torch.cat((theta.sin(), theta.sin()), -1)
    q, k, v = (x.detach().double() for x in _qkv(2, 2, 2, N, N, D))
    want = torch.nn.functional.scaled_dot_product_attention(q * cos + _rotate_half(q) * sin,
                                                            k * cos + _rotate_half(k) * sin, v)
    grid = torch.stack((rows, cols))                                   # [2, N]
    rope = posattn.RoPE(inv_freq.float(), sections=(D // 4, D // 4))
    got = posattn.attention(q, k, v, rope=rope, rope_pos=(grid, grid), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_reference_and_kernels_are_qwen2_vl_mrope(device):
    """transformers' Qwen2-VL M-RoPE (its rotary embedding and its apply_rotary_pos_emb)
    at the 3-D positions of text, image, text tokens from its own get_rope_index."""
    pytest.importorskip("transformers")
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl as M
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         num_hidden_layers=1, vocab_size=64, rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                                                   mrope_section=[2, 3, 3])),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=64, num_heads=2, spatial_merge_size=2, patch_size=2,
                           temporal_patch_size=1, in_chans=3),
        image_token_id=60, vision_start_token_id=61, video_token_id=62)
    model = M.Qwen2VLModel(config).eval()
    image = [60] * 6                                         # grid 1 x 4 x 6 patches, merged 2 x 2: 1 x 2 x 3
    ids = torch.tensor([[5, 7, 61, *image, 9, 11, 3]])
    types = (ids == 60).int()
    pos, _ = model.get_rope_index(ids, types, image_grid_thw=torch.tensor([[1, 4, 6]]))   # [3, B, N]
    assert pos[1].unique().numel() > 1 and not torch.equal(pos[1], pos[2])            # really 3-D
    rotary = M.Qwen2VLRotaryEmbedding(config.text_config)
    N, D = ids.shape[1], 16
    q, k, v = (x.detach() for x in _qkv(1, 4, 2, N, N, D))
    cos, sin = rotary(q, pos)
    qr, kr = M.apply_rotary_pos_emb(q, k, cos, sin)
    want = torch.nn.functional.scaled_dot_product_attention(qr, kr.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    rope = posattn.RoPE(rotary.inv_freq, sections=tuple(rotary.mrope_section),
                        attention_factor=rotary.attention_scaling)
    axes = pos.transpose(0, 1)                               # [B, 3, N]
    for backend in ("reference", "triton"):
        q_, k_, v_ = (x.to(device) for x in (q, k, v))
        got = posattn.attention(q_, k_, v_, rope=rope, rope_pos=(axes.to(device),) * 2, causal=True,
                                backend=backend)
        torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_kernels_match_the_reference(dtype, interleaved, device):
    """Forward and every gradient: three axes over a partial rotary dim, per-batch query
    positions and batch-shared key positions, GQA, Nq != Nk, with causal masking and
    ALiBi on separate 1-D positions."""
    torch.manual_seed(1)
    B, Nq, Nk, D = 2, 13, 19, 32
    q, k, v = (x.to(device) for x in _qkv(B, 4, 2, Nq, Nk, D, dtype))
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    rope = posattn.RoPE(dim=24, base=300.0, sections=(5, 4, 3), interleaved=interleaved, attention_factor=1.1)
    rope_pos = (torch.randint(0, 40, (B, 3, Nq), device=device), torch.randint(0, 40, (3, Nk), device=device))
    check(q, k, v, rope=rope, rope_pos=rope_pos, causal=True,
          alibi_slopes=torch.rand(4, device=device).requires_grad_())


def test_default_positions_are_plain_rope(device):
    """sections without rope_pos is plain RoPE, bit for bit; the 1-D positions given on
    every axis as rope_pos rotate the same way (forward bit for bit; the gradients are
    rotated back by a separate pass, so to float32 rounding)."""
    torch.manual_seed(2)
    q, k, v = (x.to(device).detach().requires_grad_() for x in _qkv(1, 2, 2, 10, 10, 16))
    plain, axes = posattn.RoPE(base=50.0), posattn.RoPE(base=50.0, sections=(3, 1, 4))
    pos = torch.arange(10, device=device)
    outs, grads = [], []
    for kw in (dict(rope=plain), dict(rope=axes), dict(rope=axes, rope_pos=(pos.expand(3, 10),) * 2)):
        out = posattn.attention(q, k, v, causal=True, **kw)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for a, b, c in zip(*grads):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_a_missing_side_takes_its_1d_positions():
    torch.manual_seed(3)
    q, k, v = (x.detach().double() for x in _qkv(1, 2, 2, 6, 8, 8))
    rope = posattn.RoPE(sections=(1, 3))
    k_axes = torch.randint(0, 9, (2, 8))
    q_pos = torch.tensor([2, 3, 5, 6, 7, 9])
    a = posattn.attention(q, k, v, rope=rope, q_pos=q_pos, rope_pos=(None, k_axes), backend="reference")
    b = posattn.attention(q, k, v, rope=rope, q_pos=q_pos, rope_pos=(q_pos.expand(2, 6), k_axes), backend="reference")
    assert torch.equal(a, b)


def test_errors():
    q, k, v = (x.detach() for x in _qkv(1, 2, 2, 5, 5, 8))
    pos = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="rope_pos needs rope="):
        posattn.attention(q, k, v, rope_pos=(pos, pos))
    with pytest.raises(ValueError, match=r"q_rope_pos must have shape \[3, 5\]"):
        posattn.attention(q, k, v, rope=posattn.RoPE(sections=(1, 2, 1)), rope_pos=(pos, pos))
    with pytest.raises(TypeError, match="k_rope_pos must be int32 or int64"):
        posattn.attention(q, k, v, rope=posattn.RoPE(sections=(2, 2)), rope_pos=(pos, pos.float()))
    with pytest.raises(ValueError, match="rope_pos must be a pair"):
        posattn.attention(q, k, v, rope=posattn.RoPE(sections=(2, 2)), rope_pos=pos)
    with pytest.raises(ValueError, match=r"sections \(1, 2\) sum to 3 pairs, but the rotary dim 8"):
        posattn.attention(q, k, v, rope=posattn.RoPE(sections=(1, 2)))
    with pytest.raises(ValueError, match="sections must be a non-empty tuple of positive ints"):
        posattn.RoPE(sections=(2, 0))
    with pytest.raises(ValueError, match="sum to 3 pairs, but the rotary dim 8 has 4"):
        posattn.RoPE(dim=8, sections=(1, 2))
    with pytest.raises(ValueError, match="rope_pos= is not supported"):
        posattn.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                 torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32),
                                 rope=posattn.RoPE(sections=(2, 2)), rope_pos=(pos, pos))


def test_the_cuda_backend_refuses_by_name():
    from posattn import _cuda
    q, k, v = (x.detach() for x in _qkv(1, 2, 2, 5, 5, 8))
    pos = torch.zeros(2, 5, dtype=torch.long)
    p = _validate.check(q, k, v, rope=posattn.RoPE(sections=(2, 2)), rope_pos=(pos, pos))
    assert "rope_pos" in _cuda.unsupported(p)
    assert _cuda.unsupported(_validate.check(q, k, v, rope=posattn.RoPE(sections=(2, 2)))) is None
