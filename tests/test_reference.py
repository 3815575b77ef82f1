"""posattn.reference against straightforward textbook implementations, written here
independently, so that the oracle is never checked only against itself."""
import math

import pytest
import torch

import posattn
from posattn import reference

f64 = torch.float64


def rnd(*shape):
    return torch.randn(*shape, dtype=f64)


def textbook(q, k, v, scale, bias_fn=None, keep_fn=None):
    """softmax(scale q k^T + bias) v with per-element Python callbacks (no broadcasting
    tricks), rows with nothing visible give 0."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.zeros(B, H, Nq, D, dtype=f64)
    for b in range(B):
        for h in range(H):
            s = scale * q[b, h] @ k[b, h].T
            for i in range(Nq):
                for j in range(Nk):
                    if keep_fn is not None and not keep_fn(b, h, i, j):
                        s[i, j] = -math.inf
                    elif bias_fn is not None:
                        s[i, j] += bias_fn(b, h, i, j)
            row_ok = torch.isfinite(s).any(-1, keepdim=True)
            p = torch.softmax(torch.where(row_ok, s, torch.zeros_like(s)), -1) * row_ok
            out[b, h] = p @ v[b, h]
    return out


def close(a, b, tol=1e-10):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item() < tol


def test_plain_matches_sdpa():
    q, k, v = rnd(2, 3, 17, 8), rnd(2, 3, 17, 8), rnd(2, 3, 17, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert close(reference.attention(q, k, v), sdpa(q, k, v))
    assert close(reference.attention(q, k, v, causal=True), sdpa(q, k, v, is_causal=True))


def test_bottom_right_alignment_and_window():
    Nq, Nk = 5, 12
    q, k, v = rnd(1, 2, Nq, 8), rnd(1, 2, Nk, 8), rnd(1, 2, Nk, 8)
    off = Nk - Nq  # query i sits at position off + i
    got = reference.attention(q, k, v, causal=True, window=(3, None))
    want = textbook(q, k, v, 8 ** -0.5, keep_fn=lambda b, h, i, j: 0 >= j - (off + i) >= -3)
    assert close(got, want)
    got = reference.attention(q, k, v, window=(1, 2))
    want = textbook(q, k, v, 8 ** -0.5, keep_fn=lambda b, h, i, j: -1 <= j - (off + i) <= 2)
    assert close(got, want)


def rotate_half_rope(x, pos, dim, base):
    """GPT-NeoX / HF LLaMA: cos/sin over cat(freqs, freqs), rotate_half."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).double() / dim))
    freqs = pos.double()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)
    xr, rest = x[..., :dim], x[..., dim:]
    x1, x2 = xr[..., : dim // 2], xr[..., dim // 2:]
    rot = torch.cat((-x2, x1), -1)
    return torch.cat((xr * emb.cos() + rot * emb.sin(), rest), -1)


def complex_rope(x, pos, dim, base):
    """Meta LLaMA / RoFormer: consecutive pairs as complex numbers times e^{i theta}."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).double() / dim))
    z = torch.view_as_complex(x[..., :dim].reshape(*x.shape[:-1], dim // 2, 2).contiguous())
    w = torch.polar(torch.ones_like(inv), pos.double()[:, None] * inv[None])
    return torch.cat((torch.view_as_real(z * w).flatten(-2), x[..., dim:]), -1)


@pytest.mark.parametrize("dim", [16, 10])
def test_rope_half_split_matches_rotate_half(dim):
    q, k, v = rnd(1, 2, 9, 16), rnd(1, 2, 13, 16), rnd(1, 2, 13, 16)
    qp, kp = torch.arange(4, 13), torch.arange(13)
    want = reference.attention(rotate_half_rope(q, qp, dim, 100.0), rotate_half_rope(k, kp, dim, 100.0), v)
    got = reference.attention(q, k, v, rope=posattn.RoPE(dim=dim, base=100.0))
    assert close(got, want, 1e-6)  # inv_freq is float32 by definition (SPEC)


@pytest.mark.parametrize("dim", [16, 8])
def test_rope_interleaved_matches_complex_form(dim):
    q, k, v = rnd(2, 1, 7, 16), rnd(2, 1, 7, 16), rnd(2, 1, 7, 16)
    p = torch.arange(7)
    want = reference.attention(complex_rope(q, p, dim, 10000.0), complex_rope(k, p, dim, 10000.0), v,
                               causal=True)
    got = reference.attention(q, k, v, causal=True, rope=posattn.RoPE(dim=dim, interleaved=True))
    assert close(got, want, 1e-6)


def test_rope_inv_freq_and_attention_factor():
    """Scaled variants: cos and sin multiplied by m == scores multiplied by m^2."""
    q, k, v = rnd(1, 2, 6, 8), rnd(1, 2, 6, 8), rnd(1, 2, 6, 8)
    inv = torch.tensor([1.0, 0.25, 0.0625, 0.015625])  # exact in float32
    m = 1.3
    got = reference.attention(q, k, v, rope=posattn.RoPE(inv, attention_factor=m))
    plain = posattn.RoPE(inv)
    want = reference.attention(q, k, v, rope=plain, scale=m * m / math.sqrt(8))
    assert close(got, want)


def test_rope_depends_only_on_relative_position():
    q, k, v = rnd(1, 2, 6, 16), rnd(1, 2, 6, 16), rnd(1, 2, 6, 16)
    r = posattn.RoPE()
    p = torch.arange(6)
    a = reference.attention(q, k, v, rope=r, q_pos=p, k_pos=p, upcast=True)
    b = reference.attention(q, k, v, rope=r, q_pos=p + 57, k_pos=p + 57, upcast=True)
    assert close(a, b, 1e-9)


def bloom_slopes(n):
    """BLOOM's build_alibi_tensor slope list."""
    closest = 2 ** math.floor(math.log2(n))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != n:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        n_rem = min(closest, n - closest)
        slopes += [extra_base ** p for p in range(1, 1 + 2 * n_rem, 2)]
    return slopes


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 8, 12, 16, 20, 40, 64])
def test_alibi_slopes_match_bloom(n):
    got = posattn.alibi_slopes(n)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.allclose(got.double(), torch.tensor(bloom_slopes(n), dtype=f64), rtol=1e-6, atol=0)


def test_alibi_slopes_power_of_two_values():
    assert posattn.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]


def test_alibi_bias():
    q, k, v = rnd(2, 3, 5, 8), rnd(2, 3, 9, 8), rnd(2, 3, 9, 8)
    slopes = torch.rand(2, 3, dtype=f64)
    got = reference.attention(q, k, v, alibi_slopes=slopes)
    want = textbook(q, k, v, 8 ** -0.5, bias_fn=lambda b, h, i, j: -slopes[b, h].item() * abs(j - (4 + i)))
    assert close(got, want)


def t5_bucket_scalar(rel, bidirectional, num_buckets, max_distance):
    """T5's bucket of one relative position, element by element."""
    ret = 0
    n = -rel
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets(bidirectional):
    rel = torch.arange(-300, 301)
    got = posattn.encodings.t5_relative_bucket(rel, bidirectional, 32, 128)
    want = [t5_bucket_scalar(r, bidirectional, 32, 128) for r in rel.tolist()]
    assert got.tolist() == want
    if bidirectional:  # a few values worked out by hand
        b = dict(zip(rel.tolist(), got.tolist()))
        assert (b[0], b[1], b[-1], b[10], b[200], b[-200]) == (0, 17, 1, 24, 31, 15)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_distance_bias(bidirectional):
    Nq = Nk = 50
    q, k, v = rnd(1, 2, Nq, 8), rnd(1, 2, Nk, 8), rnd(1, 2, Nk, 8)
    weight = rnd(32, 2)
    rb = posattn.DistanceBias.t5(weight, num_buckets=32, max_distance=40, bidirectional=bidirectional)
    got = reference.attention(q, k, v, scale=1.0, rel_bias=rb)
    want = textbook(q, k, v, 1.0, bias_fn=lambda b, h, i, j: weight[
        t5_bucket_scalar(j - i, bidirectional, 32, 40), h].item())
    assert close(got, want)


def test_t5_gradient_reaches_weight():
    q, k, v = rnd(1, 2, 10, 8), rnd(1, 2, 10, 8), rnd(1, 2, 10, 8)
    weight = rnd(32, 2).requires_grad_()
    out = reference.attention(q, k, v, rel_bias=posattn.DistanceBias.t5(weight))
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_distance_bias_and_dense_bias_and_mask():
    q, k, v = rnd(2, 2, 6, 8), rnd(2, 2, 8, 8), rnd(2, 2, 8, 8)
    table = rnd(2, 3 + 2 + 1)
    bias = rnd(2, 1, 6, 8)
    keep = torch.rand(6, 8) < 0.7
    pos_q = torch.tensor([[5, 3, 9, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    pos_k = torch.arange(8)

    def bias_fn(b, h, i, j):
        rel = min(max(pos_k[j].item() - pos_q[b, i].item(), -3), 2)
        return table[h, rel + 3].item() + bias[b, 0, i, j].item()

    got = reference.attention(q, k, v, q_pos=pos_q, k_pos=pos_k, rel_bias=posattn.DistanceBias(table, 3, 2),
                              bias=bias)
    assert close(got, textbook(q, k, v, 8 ** -0.5, bias_fn=bias_fn))
    got = reference.attention(q, k, v, bias=keep)
    assert close(got, textbook(q, k, v, 8 ** -0.5, keep_fn=lambda b, h, i, j: bool(keep[i, j])))


def test_gqa_shares_kv_heads():
    q, k, v = rnd(1, 4, 5, 8), rnd(1, 2, 5, 8), rnd(1, 2, 5, 8)
    got = reference.attention(q, k, v)
    want = reference.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert close(got, want)


def test_lse_and_empty_rows():
    q, k, v = rnd(1, 1, 4, 8), rnd(1, 1, 6, 8), rnd(1, 1, 6, 8)
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[1] = False
    q.requires_grad_()
    out, lse = reference.attention(q, k, v, bias=keep, return_lse=True, scale=0.3)
    s = 0.3 * q[0, 0] @ k[0, 0].T
    assert torch.allclose(lse[0, 0, [0, 2, 3]], torch.logsumexp(s[[0, 2, 3]], -1))  # float64 in, float64 lse
    assert lse[0, 0, 1] == -math.inf and torch.all(out[0, 0, 1] == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_upcast_returns_float64():
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.bfloat16) for _ in range(3))
    assert reference.attention(q, k, v, upcast=True).dtype == f64
    assert reference.attention(q, k, v).dtype == torch.bfloat16
