"""Plain-PyTorch attention with positional encodings: the oracle and the CPU path.

Same signature as :func:`posattn.attention` plus ``upcast``. It builds the dense
``[B, Hq, Nq, Nk]`` terms straight from docs/SPEC.md, on any device, and is
differentiable through ordinary autograd. With ``upcast=True`` everything is
computed in float64 and the results are returned in float64.
"""
from __future__ import annotations

import torch

from . import _validate
from .encodings import apply_rope  # noqa: F401  (re-exported: posattn.reference.apply_rope)
from .encodings.base import ReferenceTerms

__all__ = ["attention", "apply_rope", "relative_positions"]


def relative_positions(p: _validate.Problem, device) -> torch.Tensor:
    """``rel = k_pos[j] - q_pos[i]`` as ``[1 or B, 1, Nq, Nk]`` int64."""
    q_pos, k_pos = p.default_positions(device)
    rel = k_pos.long()[:, None, :] - q_pos.long()[:, :, None]
    return rel[:, None]


def attention(q, k, v, *, causal=False, scale=None, window=None, q_pos=None, k_pos=None, rope=None,
              alibi_slopes=None, rel_bias=None, bias=None, return_lse=False, rel_emb=None, backend=None,
              upcast=False, dropout_p=0.0, dropout_mask=None, **encodings):
    """posattn.attention's computation in plain PyTorch (O(Nq * Nk) memory): the oracle
    of the tests. ``upcast``: compute in float64. ``dropout_mask``: a bool keep-mask
    broadcastable to ``[B, Hq, Nq, Nk]`` to apply with ``dropout_p`` (e.g.
    posattn.testing.dropout_keep_mask, the Triton kernels' mask); without it a mask is
    drawn with torch.rand."""
    if backend not in (None, "reference"):
        raise ValueError(f"posattn.reference.attention runs the reference backend only, got backend={backend!r}")
    p = _validate.check(q, k, v, causal=causal, scale=scale, window=window, q_pos=q_pos, k_pos=k_pos,
                        rope=rope, alibi_slopes=alibi_slopes, rel_bias=rel_bias, bias=bias,
                        return_lse=return_lse, rel_emb=rel_emb, dropout_p=dropout_p, **encodings)
    return _run(p, upcast, dropout_mask)


def empty_result(p: _validate.Problem, upcast: bool = False):
    """No query, no key or no batch: zeros (lse = -inf), still attached to the graph."""
    dt = torch.float64 if upcast else p.q.dtype
    zero = sum((x.sum() * 0 for x in (p.q, p.k, p.v) if x.requires_grad), torch.zeros((), device=p.q.device))
    out = torch.zeros(p.B, p.Hq, p.Nq, p.D, device=p.q.device, dtype=dt) + zero.to(dt)
    if not p.return_lse:
        return out
    lse_dt = torch.float64 if upcast or p.q.dtype == torch.float64 else torch.float32
    lse = torch.full((p.B, p.Hq, p.Nq), float("-inf"), device=p.q.device, dtype=lse_dt)
    sk = p.get("sinks")
    if sk is not None:  # no key: the sink alone is the denominator
        lse = sk.sinks.to(lse_dt)[None, :, None].expand(p.B, p.Hq, p.Nq)
    return out, lse


def _run(p: _validate.Problem, upcast: bool, dropout_mask=None):
    if p.varlen is not None:
        return _run_packed(p, upcast, dropout_mask)
    if p.B == 0 or p.Hq == 0 or p.Nq == 0 or p.Nk == 0:
        return empty_result(p, upcast)
    dev = p.q.device
    dt = torch.float64 if upcast else p.q.dtype
    q, k, v = p.q.to(dt), p.k.to(dt), p.v.to(dt)
    q_pos, k_pos = p.default_positions(dev)
    for e in p.encodings:                                           # RoPE: rotate q and k
        q = e.rotate(q, q_pos, p.D, dt)
        k = e.rotate(k, k_pos, p.D, dt, keys=True)
    if p.group > 1:
        k = k.repeat_interleave(p.group, dim=1)
        v = v.repeat_interleave(p.group, dim=1)

    ctx = ReferenceTerms(p, dt, relative_positions(p, dev), q, k, v)     # rel: [1|B, 1, Nq, Nk]
    qc = q
    for e in p.encodings:                                           # Transformer-XL's u
        qc = e.content_query(ctx, qc)
    ctx.logits = torch.matmul(qc, k.transpose(-1, -2))              # [B, Hq, Nq, Nk]
    for e in p.encodings:                                           # Shaw's key term
        e.add_logits(ctx)
    scores = ctx.logits * p.scale
    for e in p.encodings:                                           # soft-capping
        scores = e.cap_scores(ctx, scores)
    rel = ctx.rel
    keep = torch.ones_like(rel, dtype=torch.bool)
    if p.causal:
        keep = keep & (rel <= 0)
    if p.window_left is not None:
        keep = keep & (rel >= -p.window_left)
    if p.window_right is not None:
        keep = keep & (rel <= p.window_right)
    for e in p.encodings:                                           # additive terms, then masks
        term = e.score_bias(ctx)
        if term is not None:
            scores = scores + term
        mask = e.keep_mask(ctx)
        if mask is not None:
            keep = keep & mask
    scores = scores.masked_fill(~keep, float("-inf"))

    # Softmax by hand so that rows with no visible key give zeros, lse = -inf, no NaN.
    # Sinks join the denominator only (such rows then have lse = sink).
    sink = None
    for e in p.encodings:
        s = e.sink_logits(ctx)
        if s is not None:
            sink = s
    m = scores.amax(dim=-1, keepdim=True).detach()
    if sink is not None:
        m = torch.maximum(m, sink.detach())
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(scores - m)
    l = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        l = l + torch.exp(sink - m)
    probs = e / torch.where(l == 0, torch.ones_like(l), l)
    if p.dropout_p > 0:  # on the probabilities that multiply the values (lse unchanged)
        keep = dropout_mask if dropout_mask is not None else \
            torch.rand(probs.shape, device=dev) >= p.dropout_p
        probs = probs * keep.to(probs.dtype) / (1.0 - p.dropout_p)
    out = torch.matmul(probs.to(v.dtype), v)
    for e in p.encodings:                                           # Shaw's value term
        term = e.value_term(ctx, probs)
        if term is not None:
            out = out + term
    if not p.return_lse:
        return out
    lse = (torch.log(l) + m).squeeze(-1)
    return out, lse.to(torch.float64 if dt == torch.float64 else torch.float32)


def _run_packed(p: _validate.Problem, upcast: bool, dropout_mask=None):
    """Packed sequences (posattn.attention_varlen): each sequence on its own, its rows
    concatenated (q, k, v are one batch [1, H, total, D]; dropout_mask, if given,
    [num_seqs, Hq, max_seqlen_q, max_seqlen_k]: sequence s reads its own block at its
    own rows and keys, as the kernels draw it)."""
    cu_q, cu_k = (c.tolist() for c in p.varlen[:2])
    outs, lses = [], []
    for s in range(len(cu_q) - 1):
        (q0, q1), (k0, k1) = (cu_q[s], cu_q[s + 1]), (cu_k[s], cu_k[s + 1])
        sub = p.replace(q=p.q[:, :, q0:q1], k=p.k[:, :, k0:k1], v=p.v[:, :, k0:k1], Nq=q1 - q0, Nk=k1 - k0,
                        varlen=None, return_lse=True)
        mask = None if dropout_mask is None else dropout_mask[s, :, :q1 - q0, :k1 - k0][None]
        o, l = _run(sub, upcast, mask)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs, dim=2) if outs else p.q.new_zeros(p.q.shape)
    if not p.return_lse:
        return out
    return out, torch.cat(lses, dim=2)
