"""posattn.attention_varlen: packed sequences in FlashAttention's varlen layout. The
Triton kernels (grid: sequences x query blocks) against the reference run on each
sequence alone, in float64, for the output, the lse and every gradient; argument
errors name the argument."""
import pytest
import torch

import posattn
from attn_check import FLOOR, PARAM_FLOOR_ROUNDOFFS, rel_err


def _packed(lens_q, lens_k, Hq, Hkv, D, dtype, device):
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)  # noqa
    q = torch.randn(sum(lens_q), Hq, D, device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), Hkv, D, device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), Hkv, D, device=device, dtype=dtype)
    return q, k, v, cu(lens_q), cu(lens_k)


def _run(q, k, v, cu_q, cu_k, kw, params, dout, dlse, backend, dt):
    x = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
    ps = {n: t.detach().to(dt if dt == torch.float64 else t.dtype).requires_grad_() for n, t in params.items()}
    kw = {n: (f(ps) if callable(f) else f) for n, f in kw.items()}
    out, lse = posattn.attention_varlen(*x, cu_q, cu_k, return_lse=True, backend=backend, **kw)
    grads = torch.autograd.grad((out, lse), x + list(ps.values()), (dout.to(dt), dlse.to(lse.dtype)))
    res = dict(out=out, lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
    res.update({"d" + n: g for n, g in zip(ps, grads[3:])})
    return res


def _check(q, k, v, cu_q, cu_k, kw, params, device):
    dtype = q.dtype
    dout = torch.randn(q.shape, device=device, dtype=dtype)
    dlse = torch.randn(q.shape[1], q.shape[0], device=device)
    got = _run(q, k, v, cu_q, cu_k, kw, params, dout, dlse, "triton", dtype)
    ref = _run(q, k, v, cu_q, cu_k, kw, params, dout, dlse, "reference", torch.float64)
    low = _run(q, k, v, cu_q, cu_k, kw, params, dout, dlse, "reference", dtype)
    floor = 1e-5 if dtype == torch.float32 else FLOOR[dtype]
    for name, r in ref.items():
        x, lx = got[name], low[name]
        if name == "lse":
            fin = torch.isfinite(r)
            assert torch.equal(torch.isfinite(x), fin)
            x, lx, r = x[fin], lx[fin], r[fin]
        is_param = name not in ("out", "lse", "dq", "dk", "dv")
        limit = 2 * rel_err(lx, r) + floor * (PARAM_FLOOR_ROUNDOFFS if is_param and dtype != torch.float32 else 1)
        assert rel_err(x, r) <= limit, f"{name}: {rel_err(x, r):.3g} > {limit:.3g}"


CASES = {
    "causal+rope": (dict(causal=True, rope=posattn.RoPE(base=100.0, dim=16, interleaved=True)), {}),
    "alibi+window": (dict(alibi_slopes=lambda p: p["alibi_slopes"], window=(9, 4)),
                     {"alibi_slopes": posattn.alibi_slopes(4) * 1.5}),
    "table+sinks+softcap": (dict(rel_bias=lambda p: posattn.DistanceBias(p["table"], 6, 6),
                                 sinks=lambda p: p["sinks"], softcap=4.0),
                            {"table": torch.randn(4, 13), "sinks": torch.randn(4)}),
    # (Transformer-XL's u and w: the forward reads q + u and q + w from a host workspace)
    "shaw+kerple": (dict(rel_emb=lambda p: posattn.RelativeEmbeddings(p["ak"], p["av"], 3, p["u"], p["w"]),
                         kerple=lambda p: posattn.KERPLE(p["r1"], p["r2"]), causal=True),
                    {"ak": 0.3 * torch.randn(4, 7, 24), "av": 0.3 * torch.randn(4, 7, 24),
                     "u": 0.3 * torch.randn(4, 24), "w": 0.3 * torch.randn(4, 24),
                     "r1": 0.5 + torch.rand(4), "r2": 0.1 + torch.rand(4)}),
}


@pytest.mark.parametrize("case,dtype", [(c, d) for c in CASES for d in (torch.float32, torch.bfloat16)]
                         + [("alibi+window", torch.float16)], ids=str)
def test_varlen_matches_each_sequence_alone(case, dtype, device):
    # sequences longer than a tile, shorter, empty on either side, Nq != Nk; GQA
    q, k, v, cu_q, cu_k = _packed([37, 0, 70, 5, 9], [45, 3, 70, 0, 17], 4, 2, 24, dtype, device)
    kw, params = CASES[case]
    _check(q, k, v, cu_q, cu_k, kw, {n: t.to(device) for n, t in params.items()}, device)


@pytest.mark.parametrize("case", ["alibi+window", "shaw+kerple"])
def test_varlen_wide_heads(case, device):
    """D = 80: the forward recomputes the boundary tiles' range and the epilogue's
    offsets from the program ids (kernels/forward.py AGAIN): each sequence's first row
    read again, its lse rows at batch 0; the Shaw loop's range too."""
    q, k, v, cu_q, cu_k = _packed([37, 0, 70, 5], [45, 3, 70, 0], 4, 2, 80, torch.bfloat16, device)
    kw, params = CASES[case]
    if case == "shaw+kerple":
        params = dict(params, ak=0.3 * torch.randn(4, 7, 80), av=0.3 * torch.randn(4, 7, 80),
                      u=0.3 * torch.randn(4, 80), w=0.3 * torch.randn(4, 80))
    _check(q, k, v, cu_q, cu_k, kw, {n: t.to(device) for n, t in params.items()}, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_dropout_matches_reference_with_the_kernels_mask(dtype, device):
    """Each sequence's dropout mask (the kernels' counters are per sequence): forward,
    gradients, and the double backward (the reference's second pass reads it too)."""
    lens_q, lens_k = [20, 0, 33, 7], [25, 4, 33, 7]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 2, 1, 16, dtype, device)
    torch.manual_seed(3)
    keep = posattn.testing.dropout_keep_mask_varlen(q, cu_q, cu_k, 0.3, max(lens_q), max(lens_k))
    kw = dict(causal=True, dropout_p=0.3, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))

    def run(backend, dt, **extra):
        x = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        torch.manual_seed(3)
        out = posattn.attention_varlen(*x, cu_q, cu_k, backend=backend, **kw, **extra)
        g = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
        gg = torch.autograd.grad(sum(t.float().square().sum() for t in g), x)
        return [out, *g, *gg]

    got = run("triton", dtype)
    ref = run("reference", torch.float64, dropout_mask=keep)
    low = run("reference", dtype, dropout_mask=keep)
    floor = 1e-5 if dtype == torch.float32 else FLOOR[dtype]
    for i, (x, r, lx) in enumerate(zip(got, ref, low)):
        limit = 2 * rel_err(lx, r) + floor * (1 if i < 4 else 4)
        assert rel_err(x, r) <= limit, f"output {i}: {rel_err(x, r):.3g} > {limit:.3g}"


def test_varlen_dropout_is_seeded(device):
    q, k, v, cu_q, cu_k = _packed([20, 0, 33], [25, 4, 33], 2, 1, 16, torch.bfloat16, device)

    def run(seed, p):
        torch.manual_seed(seed)
        return posattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, dropout_p=p)

    a, b, c = run(1, 0.3), run(1, 0.3), run(2, 0.3)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, run(1, 0.0))


def test_varlen_visits_no_tile_outside_a_sequence(device):
    """Two sequences: perturbing the keys of one changes nothing in the other's output."""
    q, k, v, cu_q, cu_k = _packed([40, 30], [40, 30], 2, 2, 16, torch.float32, device)
    out = posattn.attention_varlen(q, k, v, cu_q, cu_k)
    k2 = k.clone()
    k2[40:] += 10.0
    out2 = posattn.attention_varlen(q, k2, v, cu_q, cu_k)
    assert torch.equal(out[:40], out2[:40]) and not torch.equal(out[40:], out2[40:])


def test_varlen_argument_errors(device):
    q, k, v, cu_q, cu_k = _packed([4, 4], [4, 4], 2, 2, 16, torch.float32, device)
    bad = {
        "must be int32": dict(cu_seqlens_q=cu_q.long()),
        "must start at 0": dict(cu_seqlens_q=torch.tensor([1, 4, 8], dtype=torch.int32, device=device)),
        "non-decreasing": dict(cu_seqlens_k=torch.tensor([0, 5, 4, 8], dtype=torch.int32, device=device)),
        "must end at": dict(cu_seqlens_k=torch.tensor([0, 4, 7], dtype=torch.int32, device=device)),
        "same length": dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32, device=device)),
    }
    for match, over in bad.items():
        args = {**dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), **over}
        with pytest.raises((ValueError, TypeError), match=match):
            posattn.attention_varlen(q, k, v, args["cu_seqlens_q"], args["cu_seqlens_k"])
    with pytest.raises(ValueError, match="bias"):
        posattn.attention_varlen(q, k, v, cu_q, cu_k, bias=torch.zeros(8, 8))
    with pytest.raises(ValueError, match="3-D"):
        posattn.attention_varlen(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="shorter than the longest"):
        posattn.attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=2)
