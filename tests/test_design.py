"""The places where a half-added encoding used to fail silently (issue 10) now fail
loudly: an encoding registered in posattn.encodings but not declared by a backend is
refused by it with a reason naming it; the kernel tests compare the gradient of every
differentiable tensor an encoding lists; the torch.compile operators are imported
unguarded. The probe is a test-only encoding, registered for the test."""
import dataclasses

import pytest
import torch

import posattn
from posattn import _cuda, _triton, _validate, interface
from posattn.encodings import base
from attn_check import _params, check
from cases import CASES
from posattn.encodings import keywords


class SignBias(base.Encoding):
    """Test-only: bias_ij = c[h] * sign(rel_ij), c: [Hq] (differentiable)."""

    keyword = "sign_bias"

    def __init__(self, c):
        self.c = c

    def bind(self, shape):
        if not isinstance(self.c, torch.Tensor) or tuple(self.c.shape) != (shape.Hq,):
            raise ValueError(f"sign_bias must have shape [{shape.Hq}]")
        return self

    def tensors(self):
        return {"c": self.c}

    def replace(self, c=None):
        return self if c is None else SignBias(c)

    def score_bias(self, ctx):
        return self.c.to(ctx.dt)[None, :, None, None] * ctx.rel.sign().to(ctx.dt)


@pytest.fixture
def sign_bias(monkeypatch):
    monkeypatch.setitem(base._KEYWORDS, "sign_bias", SignBias)
    return SignBias


def qkv(device="cpu", Nq=9, Nk=11):
    return (torch.randn(1, 2, n, 8, device=device, requires_grad=True) for n in (Nq, Nk, Nk))


def test_undeclared_encoding_is_refused_by_name(sign_bias):
    q, k, v = qkv()
    p = _validate.check(q, k, v, sign_bias=SignBias(torch.randn(2)), causal=True)
    assert "SignBias (sign_bias=) is not implemented by the cuda backend" in _cuda.unsupported(p)
    assert "SignBias (sign_bias=) is not implemented by the triton backend" in _triton.DECLARATION.refusal(p)
    with pytest.raises(ValueError, match=r"backend 'triton' refused: .*SignBias \(sign_bias=\) is not implemented"):
        posattn.attention(q, k, v, sign_bias=SignBias(torch.randn(2)), backend="triton")


def test_every_reason_is_given():
    q, k, v = (x.double() for x in qkv())
    emb = posattn.RelativeEmbeddings(key=torch.randn(2, 5, 8, dtype=torch.float64), clip=2)
    p = _validate.check(q, k, v, rel_emb=emb, q_pos=torch.arange(9))
    reasons = _cuda.DECLARATION.reasons(p)
    assert len(reasons) == 2 and "float64" in reasons[0] and "RelativeEmbeddings (rel_emb=)" in reasons[1]
    assert len(_triton.DECLARATION.reasons(p)) == 2


def test_reference_computes_a_registered_encoding_and_its_gradient(sign_bias):
    q, k, v = qkv()
    c = torch.randn(2, requires_grad=True)
    out = posattn.attention(q, k, v, sign_bias=SignBias(c), backend="reference")
    rel = torch.arange(11)[None, :] - torch.arange(2, 11)[:, None]
    by_hand = posattn.attention(q, k, v, bias=(c[:, None, None] * rel.sign())[None], backend="reference")
    torch.testing.assert_close(out, by_hand)
    assert torch.autograd.grad(out.sum(), c)[0].abs().sum() > 0


def test_the_kernel_check_compares_every_differentiable_tensor(sign_bias):
    """attn_check reads the registry: a new encoding's tensors are compared with no
    edit of the check (here the reference against itself: it must include d(c))."""
    q, k, v = qkv()
    kw = dict(sign_bias=SignBias(torch.randn(2, requires_grad=True)))
    assert list(_params(kw)) == ["c"]
    errors = check(q, k, v, backend="reference", **kw)
    assert "dc" in errors


def test_unknown_keyword_names_the_encodings():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['alibi_slope'\]: the encodings are"):
        posattn.attention(q, k, v, alibi_slope=torch.ones(2))


def test_problem_is_frozen_and_keyword_only():
    q, k, v = qkv()
    p = _validate.check(q, k, v)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.causal = True
    with pytest.raises(TypeError):
        _validate.Problem(q, k, v)


def test_operators_are_imported_unguarded():
    """The torch.compile operators are skipped only for the two documented reasons
    (no torch.library.triton_op, no triton); here both are present, so _op is loaded
    and any error importing it would have been raised, not turned into skips."""
    assert interface._op_unavailable() is None
    assert interface._op is not None


def test_every_encoding_has_a_case():
    used = {kw for build in CASES.values() for kw in build(2, 8, 9, 11, "cpu", torch.float32)}
    missing = set(keywords()) - used
    assert not missing, f"tests/cases.py has no case for {sorted(missing)}"


@pytest.mark.parametrize("case", list(CASES))
def test_operator_arguments_round_trip(case):
    """torch.compile's operators carry every field of every encoding: the problem
    rebuilt from the flat arguments gives the reference the same output, bit for bit
    (an option an encoding gains but its codec drops fails here)."""
    from posattn import _op, reference
    q, k, v = (x.detach() for x in qkv())
    p = _validate.check(q, k, v, **CASES[case](2, 8, 9, 11, "cpu", torch.float32))
    args = _op.op_args(p)
    tensors = dict(zip((n for n, _ in _op._COMMON_TENSORS + _op._ENC_TENSORS), args))
    scalars = dict(zip((n for n, _ in _op._COMMON_SCALARS + _op._ENC_SCALARS), args[_op.NUM_TENSORS:]))
    p2 = _op._problem(tensors, scalars)
    assert [type(e) for e in p2.encodings] == [type(e) for e in p.encodings]
    assert torch.equal(reference._run(p2, upcast=True), reference._run(p, upcast=True))


def test_operators_refuse_an_encoding_without_codec(sign_bias):
    from posattn import _op
    q, k, v = qkv()
    p = _validate.check(q, k, v, sign_bias=SignBias(torch.randn(2)))
    with pytest.raises(ValueError, match=r"SignBias \(sign_bias=\) has no operator codec"):
        _op.op_args(p)


@pytest.mark.parametrize("case", list(CASES))
def test_cases_on_the_triton_backend(case, device):
    """Every case of the registry through the Triton kernels against the float64
    reference, forward and every gradient (float32, GQA, Nq != Nk)."""
    q = torch.randn(1, 2, 9, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 1, 11, 16, device=device, requires_grad=True) for _ in range(2))
    check(q, k, v, **CASES[case](2, 16, 9, 11, device, torch.float32))


def test_kerple_is_refused_by_the_cuda_backend_by_name():
    q, k, v = qkv()
    p = _validate.check(q, k, v, kerple=posattn.KERPLE(torch.rand(2) + 0.1, torch.rand(2) + 0.1))
    assert "KERPLE (kerple=) is not implemented by the cuda backend" in _cuda.unsupported(p)
    assert _triton.DECLARATION.refusal(p) is None


@pytest.mark.parametrize("bad,err,match", [
    (lambda: posattn.KERPLE([1.0, 2.0], torch.ones(2)), TypeError, "KERPLE: r1 must be a torch.Tensor"),
    (lambda: posattn.KERPLE(torch.ones(2, dtype=torch.int64), torch.ones(2)), TypeError, "r1 must be a float"),
    (lambda: posattn.KERPLE(torch.ones(2), torch.ones(2, 1)), ValueError, r"r2 must have shape \[Hq\]"),
])
def test_kerple_bad_objects(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


@pytest.mark.parametrize("r1,r2,match", [
    (torch.ones(3), torch.ones(2), r"kerple.r1 must have shape \[Hq\] = \[2\]"),
    (torch.tensor([1.0, 0.0]), torch.ones(2), "kerple.r1 must be > 0 everywhere"),
    (torch.ones(2), torch.tensor([1.0, -2.0]), "kerple.r2 must be > 0 everywhere"),
])
def test_kerple_bad_values(r1, r2, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        posattn.attention(q, k, v, kerple=posattn.KERPLE(r1, r2), backend="reference")


def test_kernels_take_at_most_50_parameters():
    """An encoding's runtime arguments travel as a segment of Params (or of a DParams
    slot), not as new kernel parameters: every kernel stays at 50 or fewer."""
    from posattn import _op
    counts = {k.__name__: len(k.arg_names) for k in _op._kernels()}
    assert len(counts) == 10 and max(counts.values()) <= 50, counts


def test_params_segments_follow_the_kernels_order():
    """_Launch writes Params in _head_params' order (RoPE, KERPLE, u, w, ALiBi): with
    every segment present, each value lands where the kernels read it."""
    B, Hq, D = 2, 3, 8
    q = torch.randn(B, Hq, 5, D)
    rel_u, rel_w = torch.randn(Hq, D), torch.randn(Hq, D)
    r1, r2 = torch.rand(Hq) + 0.5, torch.rand(Hq) + 0.5
    slopes = torch.rand(B, Hq)
    p = _validate.check(q, q, q, rope=posattn.RoPE(attention_factor=1.5), alibi_slopes=slopes,
                        kerple=posattn.KERPLE(r1, r2),
                        rel_emb=posattn.RelativeEmbeddings(key=torch.randn(Hq, 5, D), clip=2, content_bias=rel_u,
                                                           position_bias=rel_w))
    L = _triton._Launch(p, q, *_triton._launch_params(p))
    params = L.args["Params"]
    freq = p.rope.inv_freq_for(D, q.device)
    expected = torch.cat([freq, torch.tensor([1.5]), r1, r2, rel_u.reshape(-1), rel_w.reshape(-1),
                          slopes.reshape(-1)])
    assert torch.equal(params, expected)
