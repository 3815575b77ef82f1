"""The methods compared by bench/run.py: posattn and its peers, each built as a
callable over one group's inputs.

Every method computes the same thing as posattn on the same inputs (the run
records max|out - posattn out| per row to show it): standard attention with
scale 1/sqrt(D), optionally causal (top-left = bottom-right since Nq = Nk), with
one positional encoding:

- none:      posattn; SDPA with cuDNN / flash / efficient forced; FlexAttention.
- rope:      posattn (fused, half-split, base 10000); HF-style rotate_half RoPE in
             PyTorch ops then SDPA (each backend forced).
- alibi:     posattn (alibi_slopes), and with its column term as an add per score
             (posattn-alibi-fma); FlexAttention score_mod; a dense bias, then
             SDPA's efficient backend.
- distance:  posattn.DistanceBias(table, L, R); FlexAttention score_mod reading the
             table; a dense bias gathered from the table, then SDPA efficient.
             In fwd+bwd the table gets its gradient in every method.
- softcap:   posattn (softcap=50, Gemma 2's cap); FlexAttention score_mod
             cap * tanh(score / cap).
- dropout:   posattn (dropout_p=0.1); SDPA flash / efficient with dropout_p=0.1
             (each draws its own mask: max|diff| is not a check there).
- decode:    one query per row against N keys, 4 query heads per k/v head: posattn
             (its split-key decoding kernel); SDPA flash and
             FlexAttention with enable_gqa=True.
- reference: posattn.reference.attention (dense float terms), CPU smoke only.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import posattn
import posattn.reference

import harness   # (bench/ is on sys.path: run.py and the tests put it there)

SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class Inputs:
    """One group's inputs (shared by every method of the group) and lazily built,
    cached per-group constants (cos/sin, index matrices, block masks)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    causal: bool
    encoding: str
    mode: str
    slopes: torch.Tensor              # [H] float32, fixed (no gradient)
    table: torch.Tensor               # [H, L + R + 1] float32, a leaf (grad in fwd+bwd)
    left: int
    right: int
    rope_base: float
    cache: Dict[str, object] = field(default_factory=dict)

    @property
    def B(self):
        return self.q.shape[0]

    @property
    def H(self):
        return self.q.shape[1]

    @property
    def N(self):
        return self.q.shape[2]

    @property
    def D(self):
        return self.q.shape[3]

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"

    def leaves(self) -> List[torch.Tensor]:
        """Tensors whose .grad is reset before each timed call."""
        out = [self.q, self.k, self.v]
        if self.encoding == "distance":
            out.append(self.table)
        return [t for t in out if t.requires_grad]

    def get(self, key: str, make: Callable[[], object]):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def make_inputs(B: int, H: int, N: int, D: int, *, causal: bool, encoding: str, mode: str, dtype, device,
                seed: int, left: int = 128, right: int = 128, rope_base: float = 10000.0) -> Inputs:
    """Fresh random inputs (torch.randn, seeded per group), drawn on ``device`` itself."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    grad = mode == "fwd+bwd"

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    if encoding == "decode":   # one query per row, GQA k / v (at least one k / v head)
        hk = max(1, H // harness.DECODE_GROUP)
        q, k, v, dout = rnd(B, H, 1, D), rnd(B, hk, N, D), rnd(B, hk, N, D), rnd(B, H, 1, D)
    else:
        q, k, v, dout = rnd(B, H, N, D), rnd(B, H, N, D), rnd(B, H, N, D), rnd(B, H, N, D)
    for t in (q, k, v):
        t.requires_grad_(grad)
    slopes = posattn.alibi_slopes(H).to(device)
    table = (0.5 * torch.randn(H, left + right + 1, generator=g, device=device)).requires_grad_(grad)
    return Inputs(q, k, v, dout, causal, encoding, mode, slopes, table, left, right, rope_base)


@dataclass
class Bench:
    """What run.py measures: ``fn()`` runs one call (forward, or forward + backward) and
    returns the forward output; ``context()`` is entered around warm-up, timing and the
    memory call (SDPA backend forcing); ``skip`` says why the method cannot run here."""
    fn: Optional[Callable[[], torch.Tensor]]
    backend: str
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    skip: Optional[str] = None


def _call(inp: Inputs, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fwd: forward under no_grad; fwd+bwd: forward, then backward of dout."""
    if inp.backward:
        def fn():
            out = forward()
            out.backward(inp.dout)
            return out.detach()
    else:
        def fn():
            with torch.no_grad():
                return forward()
    return fn


# --------------------------------------------------------------------------
# posattn and its reference
# --------------------------------------------------------------------------

def _posattn_kwargs(inp: Inputs) -> dict:
    kw = {"causal": inp.causal}
    if inp.encoding == "rope":
        kw["rope"] = posattn.RoPE(base=inp.rope_base)
    elif inp.encoding == "alibi":
        kw["alibi_slopes"] = inp.slopes
    elif inp.encoding == "distance":
        kw["rel_bias"] = posattn.DistanceBias(inp.table, left=inp.left, right=inp.right)
    elif inp.encoding == "softcap":
        kw["softcap"] = harness.SOFTCAP
    elif inp.encoding == "dropout":
        kw["dropout_p"] = harness.DROPOUT_P
    return kw


def build_posattn(inp: Inputs) -> Bench:
    name = posattn.select_backend(inp.q, inp.k, inp.v, **_posattn_kwargs(inp))
    if name == "triton" and inp.q.device.type == "cpu":
        name = "triton (interpreter)"
    return Bench(_call(inp, lambda: posattn.attention(inp.q, inp.k, inp.v, **_posattn_kwargs(inp))), name)


def build_posattn_alibi_fma(inp: Inputs) -> Bench:
    """posattn with ALiBi's column term added per score, not as a tensor-core step
    (posattn._triton.ALIBI_COLUMN_MMA off for each call): which is faster is the GPU's call."""
    from posattn import _triton

    def forward():
        was, _triton.ALIBI_COLUMN_MMA = _triton.ALIBI_COLUMN_MMA, False
        try:
            return posattn.attention(inp.q, inp.k, inp.v, **_posattn_kwargs(inp))
        finally:
            _triton.ALIBI_COLUMN_MMA = was
    bench = build_posattn(inp)
    return Bench(_call(inp, forward), bench.backend, skip=bench.skip)


def build_reference(inp: Inputs) -> Bench:
    if inp.q.device.type != "cpu":
        return Bench(None, "reference", skip="the dense reference runs in the CPU smoke run only")
    return Bench(_call(inp, lambda: posattn.reference.attention(inp.q, inp.k, inp.v, **_posattn_kwargs(inp))),
                 "posattn.reference (dense)")


# --------------------------------------------------------------------------
# SDPA and the unfused ways
# --------------------------------------------------------------------------

def _sdpa_context(backend: Optional[str]):
    if backend is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = getattr(SDPBackend, SDPA_BACKENDS[backend])
    return lambda: sdpa_kernel([which])


def rope_tables(N: int, D: int, base: float, dtype, device):
    """HF-style cos/sin [N, D] (cat(freqs, freqs)), angles in float32, cast to dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.int64).to(torch.float32) / D))
    freqs = torch.outer(torch.arange(N, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def torch_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def build_sdpa(inp: Inputs, backend: Optional[str]) -> Bench:
    label = f"sdpa:{SDPA_BACKENDS[backend]}" if backend else "sdpa (default dispatch)"
    drop = harness.DROPOUT_P if inp.encoding == "dropout" else 0.0
    gqa = {"enable_gqa": True} if inp.k.shape[1] != inp.q.shape[1] else {}
    fwd = lambda: F.scaled_dot_product_attention(inp.q, inp.k, inp.v, is_causal=inp.causal, dropout_p=drop, **gqa)
    return Bench(_call(inp, fwd), label, context=_sdpa_context(backend))


def build_torch_rope_sdpa(inp: Inputs, backend: Optional[str]) -> Bench:
    cos, sin = inp.get("rope_tables", lambda: rope_tables(inp.N, inp.D, inp.rope_base, inp.q.dtype, inp.q.device))

    def fwd():
        q = torch_rope(inp.q, cos, sin)
        k = torch_rope(inp.k, cos, sin)
        return F.scaled_dot_product_attention(q, k, inp.v, is_causal=inp.causal)

    label = "rotate_half + " + (f"sdpa:{SDPA_BACKENDS[backend]}" if backend else "sdpa (default dispatch)")
    return Bench(_call(inp, fwd), label, context=_sdpa_context(backend))


def _rel(N: int, device) -> torch.Tensor:
    """rel[i, j] = j - i (k_pos - q_pos) as int32 [N, N]."""
    ar = torch.arange(N, device=device, dtype=torch.int32)
    return ar[None, :] - ar[:, None]


def dense_bias(inp: Inputs) -> torch.Tensor:
    """The [B, H, N, N] bias (an expanded [1, H, N, N]) people build today, in q's dtype."""
    dt, dev = inp.q.dtype, inp.q.device
    if inp.encoding == "alibi":
        negdist = inp.get("negdist", lambda: (-_rel(inp.N, dev).abs()).to(dt))       # -|i - j|
        bias = inp.slopes.to(dt)[:, None, None] * negdist                            # [H, N, N]
    elif inp.encoding == "distance":
        idx = inp.get("dist_idx", lambda: (_rel(inp.N, dev).clamp(-inp.left, inp.right) + inp.left))
        bias = inp.table.to(dt)[:, idx]                                              # [H, N, N]
    else:
        raise ValueError(f"no dense bias for encoding {inp.encoding!r}")
    if inp.causal:
        mask = inp.get("causal_add", lambda: torch.zeros(inp.N, inp.N, device=dev, dtype=dt).masked_fill_(
            _rel(inp.N, dev) > 0, float("-inf")))
        bias = bias + mask
    return bias[None].expand(inp.B, -1, -1, -1)


def build_dense_bias_sdpa(inp: Inputs, backend: Optional[str]) -> Bench:
    def fwd():
        return F.scaled_dot_product_attention(inp.q, inp.k, inp.v, attn_mask=dense_bias(inp))

    label = "dense bias + " + (f"sdpa:{SDPA_BACKENDS[backend]}" if backend else "sdpa (default dispatch)")
    return Bench(_call(inp, fwd), label, context=_sdpa_context(backend))


# --------------------------------------------------------------------------
# FlexAttention
# --------------------------------------------------------------------------

_FLEX = None


def raise_recompile_limits(limit: int = 4096) -> None:
    """Every (shape, score_mod, mask) is a recompilation of flex_attention; past dynamo's
    default limit (8) it would silently fall back to eager (dense, slow): raise it."""
    import torch._dynamo.config as dc
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            try:
                setattr(dc, name, max(limit, getattr(dc, name)))
            except Exception:
                pass


def compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        raise_recompile_limits()
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_score_mod(inp: Inputs):
    if inp.encoding == "alibi":
        slopes = inp.slopes

        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * torch.abs(q_idx - kv_idx)
        return alibi
    if inp.encoding == "distance":
        table, left, right = inp.table, inp.left, inp.right

        def distance(score, b, h, q_idx, kv_idx):
            return score + table[h, torch.clamp(kv_idx - q_idx, -left, right) + left]
        return distance
    if inp.encoding == "softcap":
        cap = harness.SOFTCAP

        def softcap(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
        return softcap
    if inp.encoding in ("none", "decode"):
        return None
    raise ValueError(f"FlexAttention has no score_mod for {inp.encoding!r} (it cannot touch q or k)")


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_block_mask(inp: Inputs):
    if not inp.causal:
        return None
    from torch.nn.attention.flex_attention import create_block_mask
    return inp.get("block_mask", lambda: create_block_mask(_causal_mask, None, None, inp.N, inp.N,
                                                           device=inp.q.device))


def build_flex(inp: Inputs, compiled: bool = True) -> Bench:
    if inp.q.device.type == "cpu" and inp.backward:
        return Bench(None, "flex", skip="FlexAttention has no backward on CPU")
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as e:  # pragma: no cover - torch < 2.5
        return Bench(None, "flex", skip=f"torch.nn.attention.flex_attention not importable ({type(e).__name__})")
    fa = compiled_flex() if compiled else flex_attention
    score_mod = flex_score_mod(inp)
    block_mask = flex_block_mask(inp)
    gqa = {"enable_gqa": True} if inp.k.shape[1] != inp.q.shape[1] else {}
    fwd = lambda: fa(inp.q, inp.k, inp.v, score_mod=score_mod, block_mask=block_mask, **gqa)
    return Bench(_call(inp, fwd), "flex_attention (torch.compile)" if compiled else "flex_attention (eager)")


# --------------------------------------------------------------------------

def build(method: str, inp: Inputs, *, force_backends: bool = True) -> Bench:
    """The Bench for ``method`` (a name from harness.METHODS, or 'reference').
    ``force_backends=False`` lets SDPA dispatch freely (tests on CPU)."""
    def be(name):
        return name if force_backends else None

    if method == "posattn":
        return build_posattn(inp)
    if method == "posattn-alibi-fma":
        return build_posattn_alibi_fma(inp)
    if method == "reference":
        return build_reference(inp)
    if method == "flex":
        return build_flex(inp)
    for b in SDPA_BACKENDS:
        if method == f"sdpa-{b}":
            return build_sdpa(inp, be(b))
        if method == f"torch-rope+sdpa-{b}":
            return build_torch_rope_sdpa(inp, be(b))
        if method == f"dense-bias+sdpa-{b}":
            return build_dense_bias_sdpa(inp, be(b))
    raise ValueError(f"unknown method {method!r}")
