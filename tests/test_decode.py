"""Decoding (few queries, a long cache): _attn_decode splits the keys over programs and
merges by lse, a k/v head's query heads sharing its tiles. Out, lse and every
gradient against the float64 reference, across the encodings it takes; the same
numbers as the one-pass kernel; the launch plan for a large cache."""
import types

import pytest
import torch

import posattn
from posattn import _triton, _validate

from attn_check import check


@pytest.fixture
def decoded(monkeypatch):
    """Counts the calls that took the decoding kernels."""
    calls = []
    orig = _triton._decode

    def counting(L, q, k, v, plan, wrap):
        calls.append(plan)
        return orig(L, q, k, v, plan, wrap)

    monkeypatch.setattr(_triton, "_decode", counting)
    return calls


def _qkv(B, Hq, Hkv, Nq, Nk, D, dtype, device):
    return (torch.randn(B, Hq, Nq, D, device=device, dtype=dtype, requires_grad=True),
            *(torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2)))


def _kw(name, Hq, Nq, Nk, device):
    r = lambda *s: torch.randn(*s, device=device)   # noqa: E731
    if name == "gqa":
        return {}
    if name == "causal+alibi+sinks":
        return dict(causal=True, alibi_slopes=torch.rand(Hq, device=device).requires_grad_(),
                    sinks=r(Hq).requires_grad_())
    if name == "table+bias+softcap+window":   # most chunks lie outside the window: empty partial results
        return dict(rel_bias=posattn.DistanceBias(r(Hq, 9).requires_grad_(), 4, 4), window=(40, 0), softcap=5.0,
                    bias=r(1, Hq, Nq, Nk).requires_grad_())
    if name == "rope+kerple+positions+mask":
        keep = torch.rand(Nq, Nk, device=device) < 0.8
        keep[:, 0] = True
        return dict(rope=posattn.RoPE(base=100.0), q_pos=torch.arange(Nq, device=device) + Nk - 2,
                    k_pos=torch.arange(Nk, device=device), causal=True, bias=keep,
                    kerple=posattn.KERPLE((0.5 + torch.rand(Hq, device=device)).requires_grad_(),
                                          (0.1 + torch.rand(Hq, device=device)).requires_grad_()))
    if name == "grid+bias":   # a table row per packed query head (one per row of the tile); a bf16
        # key bias per batch (97 columns: copied into whole key tiles, read two keys per word: BIAS_PAIRS)
        return dict(rel_bias=posattn.GridBias(r(13 * 27, Hq).requires_grad_(), (7, 14)),
                    bias=r(2, 1, 1, Nk).to(torch.bfloat16).requires_grad_())
    if name == "dropout":
        return dict(dropout_p=0.3, causal=True)
    if name == "shaw+xl":   # a query head per program
        def t(*shape):
            return (0.3 * torch.randn(*shape, device=device)).requires_grad_()
        return dict(rel_emb=posattn.RelativeEmbeddings(t(Hq, 9, 32), t(Hq, 9, 32), 4, t(Hq, 32), t(Hq, 32)),
                    causal=True, sinks=r(Hq).requires_grad_())
    raise AssertionError(name)


@pytest.mark.parametrize("name,dtype", [("gqa", torch.float32), ("causal+alibi+sinks", torch.bfloat16),
                                        ("table+bias+softcap+window", torch.float32),
                                        ("rope+kerple+positions+mask", torch.float16),
                                        ("dropout", torch.float32), ("shaw+xl", torch.float32),
                                        ("grid+bias", torch.bfloat16)])
def test_decode_matches_the_reference(name, dtype, device, decoded):
    """1-3 queries, 4 query heads per k/v head, a cache of 97-181 keys in 32-key
    chunks; every gradient (the backward kernels read the merged out and lse)."""
    torch.manual_seed(0)
    Nq, Nk = (3, 150) if name == "rope+kerple+positions+mask" else (1, 97) if name in ("dropout", "shaw+xl", "grid+bias") \
        else (1, 181)
    q, k, v = _qkv(2, 8, 2, Nq, Nk, 32, dtype, device)
    check(q, k, v, return_lse=True, grad_lse=True, **_kw(name, 8, Nq, Nk, device))
    assert decoded and all(plan[0] > 1 for plan in decoded)


def test_decode_equals_the_one_pass_kernel(device, decoded, monkeypatch):
    """A full group of 16 queries x 8 heads (128 rows): the split kernel's out and lse
    against _attn_fwd's on the same problem, to float32 rounding (the merge reading
    its 7 chunks 2 at a time)."""
    torch.manual_seed(1)
    monkeypatch.setattr(_triton, "DECODE_MERGE_CHUNKS", 2)
    q, k, v = (x.detach() for x in _qkv(1, 8, 1, 16, 200, 16, torch.float32, device))
    kw = dict(causal=True, alibi_slopes=torch.rand(8, device=device), return_lse=True)
    out, lse = posattn.attention(q, k, v, **kw)
    assert decoded and decoded[0][2] == 128
    monkeypatch.setattr(_triton, "DECODE_MAX_QUERIES", 0)
    out1, lse1 = posattn.attention(q, k, v, **kw)
    assert len(decoded) == 1
    torch.testing.assert_close(out, out1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, lse1, rtol=1e-6, atol=1e-5)


def test_plan_fills_an_h100():
    """B=1, Hkv=8 (32 query heads), one query, 32k keys: 32 chunks of 1024 keys, 256
    programs for 132 SMs; a k/v head's 4 query heads share one 16-row tile."""
    q = torch.empty(1, 32, 1, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 8, 32768, 128, device="meta", dtype=torch.bfloat16)
    p = _validate.check(q, k, k, causal=True, rope=posattn.RoPE())
    launch = types.SimpleNamespace(has_rel=False)
    splits, chunk, bm, bn, heads = _triton._decode_plan(launch, p)
    assert splits * 8 >= 132 and splits * chunk >= 32768 > (splits - 1) * chunk and bm == 16 and heads == 8
    assert chunk % bn == 0
    # Shaw / Transformer-XL: a program per query head; many queries: the one-pass kernel
    splits, chunk, bm, bn, heads = _triton._decode_plan(types.SimpleNamespace(has_rel=True), p)
    assert heads == 32 and bm == 16 and splits * 32 >= 132
    q17 = torch.empty(1, 32, 17, 128, device="meta", dtype=torch.bfloat16)
    assert _triton._decode_plan(launch, _validate.check(q17, k, k)) is None
