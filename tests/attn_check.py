"""Kernel-vs-reference checking with docs/SPEC.md's precision rule.

The error of every output and gradient is ||x - ref64|| / ||ref64|| against the
reference run in float64. A kernel in float16/bfloat16 may be at most twice as far
from it as plain PyTorch run in that same dtype (the reference with upcast=False),
plus a small floor. The same rule holds for float32 with a floor of 1e-5 in the
interpreter and 5e-3 on a GPU (tf32 matmuls); PyTorch's own float32 error is
~1e-7 on well-conditioned cases, so that is "under 1e-5" there, and it leaves
room only where cancellation (a parameter gradient summing dS * |rel|) makes
float32 itself lose digits.
"""
import torch

import posattn
import posattn.testing
from posattn import reference
from posattn.encodings import keywords, wrap

# The floor is one unit roundoff of the dtype (2^-11, 2^-8): the result is rounded to
# it at least once. Gradients of the encodings' own parameters (slopes, tables, bias,
# relative embeddings) are sums over all Nq x Nk pairs that cancel almost exactly
# (each row of dS sums to 0), so a single sample of PyTorch's error there ranges over
# 50x (measured: rope+alibi bf16, 41 draws, 1e-3 to 5e-2) and they get two.
FLOOR = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
PARAM_FLOOR_ROUNDOFFS = 2


# A reference whose RMS is below this is "zero" (e.g. dq when every row sees a single
# key): relative error is undefined there, so the error is measured against this
# RMS instead, i.e. as an absolute per-element error.
ZERO_RMS = 0.05


def rel_err(x, ref):
    x = x.double()
    ref = ref.double()
    denom = max(ref.norm().item(), ZERO_RMS * max(ref.numel(), 1) ** 0.5)
    return (x - ref).norm().item() / denom


def _clone(x, dtype=None):
    y = x.detach().clone()
    if dtype is not None and y.is_floating_point():
        y = y.to(dtype)
    return y.requires_grad_(x.requires_grad)


def _encodings(kw):
    """The encodings among the keyword arguments, as posattn binds them (the registry:
    an encoding added to posattn.encodings is picked up here with no edit)."""
    return {name: wrap(name, value) for name, value in kw.items() if name in keywords() and value is not None}


def _rebuild(kw, params):
    """kw with the differentiable encoding tensors replaced by `params`."""
    kw = dict(kw)
    for keyword, enc in _encodings(kw).items():
        new = {n: params[n] for n in enc.tensors() if n in params}
        if new:
            kw[keyword] = enc.replace(**new)
    return kw


def _params(kw):
    """Every tensor of every encoding that requires grad, by its name (unique across
    encodings: "alibi_slopes", "table", "bias", "rel_key", ...)."""
    out = {}
    for enc in _encodings(kw).values():
        for n, t in enc.tensors().items():
            if t is not None and t.requires_grad:
                assert n not in out, f"two encodings name a tensor {n!r}"
                out[n] = t
    return out


def _run(fn, q, k, v, kw, dout, dlse):
    params = _params(kw)
    res = fn(q, k, v, **kw)
    out, lse = res if kw.get("return_lse") else (res, None)
    inputs = [q, k, v, *params.values()]
    names = ["dq", "dk", "dv", *("d" + n for n in params)]
    outs, grads_out = [out], [dout]
    if lse is not None and dlse is not None:
        outs.append(lse)
        grads_out.append(torch.where(torch.isfinite(lse), dlse.to(lse.dtype), torch.zeros_like(lse)))
    grads = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True)
    result = {"out": out}
    if lse is not None:
        result["lse"] = lse
    for n, g, x in zip(names, grads, inputs):
        result[n] = g if g is not None else torch.zeros_like(x)
    return result


def check(q, k, v, *, backend="triton", grad_lse=False, fp32_tol=None, **kw):
    """Run posattn.attention on (q, k, v, **kw) and assert every output and gradient
    is within tolerance of the float64 reference. Returns the error table."""
    dtype = q.dtype
    params = _params(kw)
    ref_kw = {}
    if kw.get("dropout_p"):
        # The kernels' keep-mask for a seed (posattn.testing's hook), and the call reseeded
        # to it: the reference applies the very mask the kernels drew.
        seed = int(torch.randint(2 ** 62, (1,)))
        torch.manual_seed(seed)
        ref_kw["dropout_mask"] = posattn.testing.dropout_keep_mask(q, k, kw["dropout_p"])

        def fused(*a, **k_):
            torch.manual_seed(seed)
            return posattn.attention(*a, backend=backend, **k_)
    else:
        def fused(*a, **k_):
            return posattn.attention(*a, backend=backend, **k_)
    got = _run(fused, q, k, v, kw,
               dout := torch.randn(q.shape[:3] + (q.shape[3],), device=q.device, dtype=dtype),
               dlse := (torch.randn(q.shape[:3], device=q.device) if grad_lse else None))

    def reference_in(dt):
        cq, ck, cv = (_clone(x, dt) for x in (q, k, v))
        cp = {n: _clone(x, dt if dt == torch.float64 else None) for n, x in params.items()}
        kw2 = _rebuild(kw, cp)
        return _run(lambda *a, **k_: reference.attention(*a, **k_, **ref_kw), cq, ck, cv, kw2,
                    dout.to(dt), dlse)

    ref64 = reference_in(torch.float64)
    errors = {}
    for name, ref in ref64.items():
        x = got[name]
        assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
        assert x.dtype == (torch.float32 if name == "lse" else ref_dtype(name, q, params)), \
            f"{name}: dtype {x.dtype}"
        assert torch.isfinite(x[torch.isfinite(ref)]).all(), f"{name}: non-finite values"
        if name == "lse":  # compare where the reference is finite; -inf must match exactly
            assert torch.equal(torch.isfinite(x), torch.isfinite(ref)), "lse: -inf rows differ"
            x, ref = x[torch.isfinite(ref)], ref[torch.isfinite(ref)]
        errors[name] = rel_err(x, ref)

    if dtype == torch.float32:
        floor = fp32_tol if fp32_tol is not None else (1e-5 if q.device.type == "cpu" else 5e-3)
    else:
        floor = FLOOR[dtype]
    low = reference_in(dtype)
    limits = {}
    for name in errors:
        lx, ref = low[name], ref64[name]
        if name == "lse":
            lx, ref = lx[torch.isfinite(ref)], ref[torch.isfinite(ref)]
        is_param = name not in ("out", "lse", "dq", "dk", "dv")
        limits[name] = 2 * rel_err(lx, ref) + floor * (PARAM_FLOOR_ROUNDOFFS if is_param and dtype != torch.float32
                                                       else 1)
    bad = {n: (errors[n], limits[n]) for n in errors if not errors[n] <= limits[n]}
    assert not bad, "errors above tolerance (err, limit): " + ", ".join(
        f"{n}: {e:.3g} > {l:.3g}" for n, (e, l) in bad.items())
    return errors


def ref_dtype(name, q, params):
    key = name[1:] if name.startswith("d") else None
    if key in params:
        return params[key].dtype
    return q.dtype
