"""Attention dropout (dropout_p): the kernels' keep-mask is Philox from one seed that
torch's generator gives each call. Checked against the reference applying the very
mask the kernels drew (posattn.testing.dropout_keep_mask), forward and every
gradient; reproducible bit for bit from torch.manual_seed; statistically what
dropout must be."""
import pytest
import torch

import posattn
import posattn.nn as pnn
from attn_check import check
from posattn import _cuda, _validate, reference, testing


def _qkv(device, dtype, B=2, Hq=4, Hkv=2, Nq=45, Nk=70, D=24):
    def rnd(h, n):
        return torch.randn(B, h, n, D, device=device, dtype=dtype).requires_grad_()
    return rnd(Hq, Nq), rnd(Hkv, Nk), rnd(Hkv, Nk)


def _encodings(name, device, H=4, Nq=45, Nk=70, D=24):
    r = lambda *s: torch.randn(*s, device=device).requires_grad_()   # noqa: E731
    return {
        "plain": dict(causal=True),
        "alibi+bias+window": dict(alibi_slopes=posattn.alibi_slopes(H, device=device).requires_grad_(),
                                  bias=r(2, H, Nq, Nk), window=(30, 5), return_lse=True),
        "dist+sinks+softcap": dict(rel_bias=posattn.DistanceBias(r(H, 9), 4, 4), sinks=r(H), softcap=3.0),
        "shaw+rope": dict(rel_emb=posattn.RelativeEmbeddings(r(H, 7, D), r(H, 7, D), 3, r(H, D), r(H, D)),
                          rope=posattn.RoPE()),
    }[name]


@pytest.mark.parametrize("enc,dtype", [("plain", torch.float32), ("plain", torch.float16),
                                       ("alibi+bias+window", torch.float32), ("alibi+bias+window", torch.bfloat16),
                                       ("dist+sinks+softcap", torch.float32), ("dist+sinks+softcap", torch.bfloat16),
                                       ("shaw+rope", torch.bfloat16)])
def test_dropout_matches_reference_with_the_kernels_mask(enc, dtype, device):
    q, k, v = _qkv(device, dtype)
    kw = _encodings(enc, device)
    check(q, k, v, dropout_p=0.25, grad_lse=kw.get("return_lse", False), **kw)


def test_dropout_is_reproducible_and_seeded(device):
    q, k, v = _qkv(device, torch.bfloat16, B=2, Hq=2, Hkv=1, Nq=33, Nk=40)
    kw = dict(dropout_p=0.3, causal=True, alibi_slopes=posattn.alibi_slopes(2, device=device))

    def run(seed):
        torch.manual_seed(seed)
        out, lse = posattn.attention(q, k, v, return_lse=True, **kw)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return out, lse, grads

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert not torch.equal(a[0], c[0])
    torch.testing.assert_close(a[1], c[1], rtol=0, atol=0)  # lse ignores dropout
    out0, lse0 = posattn.attention(q, k, v, return_lse=True, causal=True,
                                   alibi_slopes=posattn.alibi_slopes(2, device=device))
    torch.testing.assert_close(a[1], lse0, rtol=1e-6, atol=1e-6)
    # the generator advanced: two calls in a row draw different masks
    torch.manual_seed(3)
    first, second = (posattn.attention(q, k, v, **kw) for _ in range(2))
    assert not torch.equal(first, second)


def test_dropout_statistics(device):
    """The kept fraction is 1 - p; over many seeds the output's mean is the output
    without dropout (z-scores of the mean against the samples' own spread)."""
    p = 0.2
    q, k, v = _qkv(device, torch.float32, B=1, Hq=2, Hkv=1, Nq=64, Nk=96, D=16)
    keep = testing.dropout_keep_mask(q, k, p)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    q, k, v = _qkv(device, torch.float32, B=1, Hq=1, Hkv=1, Nq=8, Nk=24, D=16)
    ref = posattn.attention(q, k, v).detach()
    samples = torch.stack([posattn.attention(q, k, v, dropout_p=p).detach() for _ in range(64)])
    z = (samples.mean(0) - ref) / (samples.std(0) / samples.shape[0] ** 0.5)
    assert z.abs().mean() < 1.3 and z.abs().max() < 6, (z.abs().mean(), z.abs().max())


def test_dropout_double_backward(device):
    """create_graph through the fused backward: the reference's second pass applies
    the kernels' mask."""
    q, k, v = _qkv(device, torch.float32, B=1, Hq=2, Hkv=1, Nq=20, Nk=30, D=16)
    torch.manual_seed(7)
    keep = testing.dropout_keep_mask(q, k, 0.3)

    def second(fn, **extra):
        out = fn(q, k, v, causal=True, dropout_p=0.3, **extra)
        dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return torch.autograd.grad(dq.square().sum(), (q, k, v))

    torch.manual_seed(7)
    got = second(posattn.attention)
    want = second(reference.attention, dropout_mask=keep)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_dropout_argument_errors_and_refusals(device):
    q, k, v = _qkv(device, torch.float32, Nq=4, Nk=4)
    for bad, err in ((1.0, ValueError), (-0.1, ValueError), (True, TypeError), ("0.1", TypeError)):
        with pytest.raises(err, match="dropout_p"):
            posattn.attention(q, k, v, dropout_p=bad)
    why = _cuda.DECLARATION.refusal(_validate.check(q, k, v, dropout_p=0.1))
    assert why is not None and "dropout" in why


def test_multihead_attention_dropout_in_training_only(device):
    torch.manual_seed(0)
    m = pnn.MultiheadAttention(32, 4, dropout=0.5, causal=True).to(device)
    x = torch.randn(2, 10, 32, device=device)
    a, _ = m(x, x, x)
    b, _ = m(x, x, x)
    assert not torch.equal(a, b)
    m.eval()
    c, _ = m(x, x, x)
    d, _ = m(x, x, x)
    assert torch.equal(c, d)

