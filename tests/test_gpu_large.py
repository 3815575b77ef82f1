"""Element offsets past 2^31 (GPU only): the kernels must address k / v (and dk / dv)
with 64-bit offsets once a tensor holds more than 2^31 elements.

Two bf16 problems whose k and v hold just over 2^31 elements each (4 GiB apiece;
with dk and dv about 16 GiB of GPU memory per case):

- long_keys: decode-shaped, q [1, 2, 3, 128] against one kv head of Nk = 2^24 + 64
  keys, so Nk * D = 2^31 + 8192: the last keys sit past element 2^31 of their head.
  The Triton kernels index inside a (batch, head) slice with int32 and refuse such
  a slice by name (posattn._triton._int32_overflow): for backend="triton" the test
  checks that refusal (on stride-0 views, no memory) while it stands, and the
  numbers once Triton accepts the problem. The CUDA fallback's offsets are int64:
  it must compute it.
- many_heads: q [1, 16385, 3, 128] against 16385 kv heads of 1024 keys, so
  Hkv * Nk * D = 2^31 + 131072: the last heads start past element 2^31 (the
  kernels' batch / head offsets are int64); both backends must compute it.

Both run causal with window=(WINDOW, 0), so each query sees only the last
WINDOW + 1 keys: the kernels skip every other tile, and the float64 reference on
the last S keys (with the matching explicit positions) is the whole answer. Checked:
out and dq, dk / dv on those keys (docs/SPEC.md's rule, as in attn_check), and dk / dv
exactly zero on every other key. A few seconds per case on an H200.

Skipped without a CUDA GPU, under TRITON_INTERPRET (the interpreter would copy
16 GiB to the host), when the GPU has too little free memory, and for
backend="cuda" when the CUDA fallback refuses (e.g. the extension did not build).
bench/gpu_check.py runs these in its tests step.
"""
import os

import pytest
import torch

import posattn
from attn_check import FLOOR, rel_err

GIB = 2 ** 30
D = 128
WINDOW = 100                      # each query sees keys [q_pos - WINDOW, q_pos]
DTYPE = torch.bfloat16

# name: (B, Hq, Hkv, Nq, Nk)
CASES = {
    "long_keys": (1, 2, 1, 3, 2 ** 24 + 64),
    "many_heads": (1, 16385, 16385, 3, 1024),
}
# kv heads compared with the reference in many_heads (first, middle, last: past 2^31)
CHECKED_HEADS = (0, 1, 8192, 16383, 16384)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _skip_unless_runnable(backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the 2^31-element problems run on a GPU only")
    if backend == "triton" and _interpreting():
        pytest.skip("TRITON_INTERPRET is set: the interpreter would copy 16 GiB to the host")
    if backend == "cuda":
        from posattn import _cuda, _validate
        small = torch.zeros(1, 1, 1, 16, device="cuda", dtype=DTYPE)
        why = _cuda.refusal(_validate.check(small, small, small))
        if why is not None:
            pytest.skip(f"backend 'cuda' refused: {why}")


def _skip_without_memory(B, Hkv, Nk):
    kv_bytes = B * Hkv * Nk * D * 2
    need = 4 * kv_bytes + 3 * GIB          # k, v, dk, dv and room for the checks
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / GIB:.1f} GiB of free GPU memory, {free / GIB:.1f} GiB free")


def _triton_refusal(B, Hq, Hkv, Nq, Nk, kw):
    """Triton's refusal of the problem, if any, and the call that must raise it; on
    stride-0 views (the check reads shapes and strides only)."""
    from posattn import _triton, _validate
    q = torch.zeros(1, 1, 1, D, device="cuda", dtype=DTYPE).expand(B, Hq, Nq, D)
    kv = torch.zeros(1, 1, 1, D, device="cuda", dtype=DTYPE).expand(B, Hkv, Nk, D)
    why = _triton.refusal(_validate.check(q, kv, kv, **kw))
    if why is not None:
        with pytest.raises(ValueError, match=r"triton.*refused"):
            posattn.attention(q, kv, kv, backend="triton", **kw)
    return why


def _within_rule(name, got, ref64, low):
    """docs/SPEC.md's rule (attn_check.check): at most twice PyTorch's own bf16 error, plus
    one bf16 unit roundoff."""
    err = rel_err(got, ref64)
    limit = 2 * rel_err(low, ref64) + FLOOR[DTYPE]
    assert err <= limit, f"{name}: error {err:.3g} > limit {limit:.3g}"


def _assert_zero(name, x, upto, chunk=2 ** 27):
    """x[:, :, :upto] == 0 exactly, a chunk of at most `chunk` elements at a time."""
    B, H, _, Dx = x.shape
    step = max(1, chunk // max(1, B * H * Dx))
    if step < upto:   # chunks along the keys
        for s in range(0, upto, step):
            assert not x[:, :, s:min(upto, s + step)].any(), f"{name}: non-zero outside the window (keys {s}..)"
    else:             # chunks along the heads
        hstep = max(1, chunk // max(1, B * upto * Dx))
        for h in range(0, H, hstep):
            assert not x[:, h:h + hstep, :upto].any(), f"{name}: non-zero outside the window (heads {h}..)"


@pytest.mark.parametrize("backend, case", [("triton", "long_keys"), ("triton", "many_heads"),
                                           ("cuda", "long_keys"), ("cuda", "many_heads")],
                         ids=["triton-long_keys", "triton-many_heads", "cuda-long_keys", "cuda-many_heads"])
def test_offsets_past_2_31_elements(backend, case):
    B, Hq, Hkv, Nq, Nk = CASES[case]
    assert Hkv * Nk * D > 2 ** 31
    _skip_unless_runnable(backend)
    kw = dict(causal=True, window=(WINDOW, 0))
    if backend == "triton":
        why = _triton_refusal(B, Hq, Hkv, Nq, Nk, kw)
        if why is not None:
            # refused by name, never computed wrong: what long_keys expects of Triton
            assert case == "long_keys" and "2^31" in why, why
            return
    _skip_without_memory(B, Hkv, Nk)
    dev = "cuda"
    S = WINDOW + Nq + 1                        # the keys any query can see, and one more
    try:
        q = torch.randn(B, Hq, Nq, D, device=dev, dtype=DTYPE, requires_grad=True)
        k = torch.randn(B, Hkv, Nk, D, device=dev, dtype=DTYPE, requires_grad=True)
        v = torch.randn(B, Hkv, Nk, D, device=dev, dtype=DTYPE, requires_grad=True)
        g = torch.randn(B, Hq, Nq, D, device=dev, dtype=DTYPE)

        out = posattn.attention(q, k, v, backend=backend, **kw)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.isfinite(dq).all(), "non-finite out / dq"

        # dk, dv: exactly zero on every key no query sees (the kernels never visit them)
        _assert_zero("dk", dk, Nk - S)
        _assert_zero("dv", dv, Nk - S)

        # The reference on the visible slice, with the default positions written out.
        if case == "many_heads":
            kv_heads = torch.tensor(CHECKED_HEADS, device=dev)
            group = Hq // Hkv
            q_heads = (kv_heads[:, None] * group + torch.arange(group, device=dev)).flatten()
        else:
            kv_heads = torch.arange(Hkv, device=dev)
            q_heads = torch.arange(Hq, device=dev)
        q_pos = torch.arange(Nk - Nq, Nk, device=dev)
        k_pos = torch.arange(Nk - S, Nk, device=dev)
        small = [x.detach()[:, idx] for x, idx in ((q, q_heads), (k[:, :, Nk - S:], kv_heads),
                                                   (v[:, :, Nk - S:], kv_heads))]
        g_small = g[:, q_heads]

        def reference(dt):
            qs, ks, vs = (x.to(dt).requires_grad_() for x in small)
            o = posattn.reference.attention(qs, ks, vs, q_pos=q_pos, k_pos=k_pos, **kw)
            return (o, *torch.autograd.grad(o, (qs, ks, vs), g_small.to(dt)))

        ref64, low = reference(torch.float64), reference(DTYPE)
        got = (out[:, q_heads], dq[:, q_heads], dk[:, kv_heads, Nk - S:], dv[:, kv_heads, Nk - S:])
        for name, x, r, lo in zip(("out", "dq", "dk", "dv"), got, ref64, low):
            _within_rule(name, x, r, lo)
    finally:
        q = k = v = g = out = dq = dk = dv = None  # noqa: F841  (free 16 GiB for the next test)
        torch.cuda.empty_cache()
