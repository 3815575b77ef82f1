"""Plain-PyTorch attention with positional encodings: the oracle and the CPU path.

Same signature as :func:`posattn.attention` plus ``upcast``. It builds the dense
``[B, Hq, Nq, Nk]`` terms straight from docs/SPEC.md, on any device, and is
differentiable through ordinary autograd. With ``upcast=True`` everything is
computed in float64 and the results are returned in float64.
"""
from __future__ import annotations

import torch

from . import _validate
from .encodings import DistanceBias, GridBias

__all__ = ["attention", "apply_rope", "relative_positions"]


def relative_positions(p: _validate.Problem, device) -> torch.Tensor:
    """``rel = k_pos[j] - q_pos[i]`` as ``[1 or B, 1, Nq, Nk]`` int64."""
    q_pos, k_pos = p.default_positions(device)
    rel = k_pos.long()[:, None, :] - q_pos.long()[:, :, None]
    return rel[:, None]


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
               attention_factor: float, compute_dtype) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, N, D]`` at positions ``pos`` ``[1 or B, N]`` (docs/SPEC.md's RoPE)."""
    r = 2 * inv_freq.numel()
    theta = pos.to(compute_dtype)[:, None, :, None] * inv_freq.to(compute_dtype)  # [B, 1, N, R/2]
    cos = torch.cos(theta) * attention_factor
    sin = torch.sin(theta) * attention_factor
    xr, rest = x[..., :r].to(compute_dtype), x[..., r:]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
    else:
        a, b = xr[..., : r // 2], xr[..., r // 2:]
    a2 = a * cos - b * sin
    b2 = b * cos + a * sin
    if interleaved:
        rot = torch.stack((a2, b2), dim=-1).flatten(-2)
    else:
        rot = torch.cat((a2, b2), dim=-1)
    return torch.cat((rot.to(x.dtype), rest), dim=-1)


def attention(q, k, v, *, causal=False, scale=None, window=None, q_pos=None, k_pos=None, rope=None,
              alibi_slopes=None, rel_bias=None, bias=None, return_lse=False, rel_emb=None, backend=None,
              upcast=False):
    if backend not in (None, "reference"):
        raise ValueError(f"posattn.reference.attention runs the reference backend only, got backend={backend!r}")
    p = _validate.check(q, k, v, causal=causal, scale=scale, window=window, q_pos=q_pos, k_pos=k_pos,
                        rope=rope, alibi_slopes=alibi_slopes, rel_bias=rel_bias, bias=bias,
                        return_lse=return_lse, rel_emb=rel_emb)
    return _run(p, upcast)


def empty_result(p: _validate.Problem, upcast: bool = False):
    """No query, no key or no batch: zeros (lse = -inf), still attached to the graph."""
    dt = torch.float64 if upcast else p.q.dtype
    zero = sum((x.sum() * 0 for x in (p.q, p.k, p.v) if x.requires_grad), torch.zeros((), device=p.q.device))
    out = torch.zeros(p.B, p.Hq, p.Nq, p.D, device=p.q.device, dtype=dt) + zero.to(dt)
    if not p.return_lse:
        return out
    lse_dt = torch.float64 if upcast or p.q.dtype == torch.float64 else torch.float32
    return out, torch.full((p.B, p.Hq, p.Nq), float("-inf"), device=p.q.device, dtype=lse_dt)


def _run(p: _validate.Problem, upcast: bool):
    if p.B == 0 or p.Hq == 0 or p.Nq == 0 or p.Nk == 0:
        return empty_result(p, upcast)
    dev = p.q.device
    dt = torch.float64 if upcast else p.q.dtype
    # RoPE angles: float64 when upcasting, else float32 (what users' PyTorch code does).
    rope_dt = torch.float64 if dt == torch.float64 else torch.float32
    q, k, v = p.q.to(dt), p.k.to(dt), p.v.to(dt)
    if p.rope is not None:
        q_pos, k_pos = p.default_positions(dev)
        inv_freq = p.rope.inv_freq_for(p.D, dev)
        q = apply_rope(q, q_pos, inv_freq, p.rope.interleaved, p.rope.attention_factor, rope_dt)
        k = apply_rope(k, k_pos, inv_freq, p.rope.interleaved, p.rope.attention_factor, rope_dt)
    if p.group > 1:
        k = k.repeat_interleave(p.group, dim=1)
        v = v.repeat_interleave(p.group, dim=1)

    rel = relative_positions(p, dev)                                # [1|B, 1, Nq, Nk]
    re = p.rel_emb
    if re is not None:  # Shaw / Transformer-XL: c = clamp(rel, -K, K) + K
        c = (rel.clamp(-re.clip, re.clip) + re.clip).expand(p.B, p.Hq, p.Nq, p.Nk)
        u, w = re.content_bias, re.position_bias
        qu = q + u.to(dt)[None, :, None, :] if u is not None else q
        scores = torch.matmul(qu, k.transpose(-1, -2))
        if re.key is not None:
            qw = q + w.to(dt)[None, :, None, :] if w is not None else q
            qa = torch.matmul(qw, re.key.to(dt)[None].transpose(-1, -2))   # [B, Hq, Nq, 2K+1]
            scores = scores + qa.gather(-1, c)
        scores = scores * p.scale
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * p.scale    # [B, Hq, Nq, Nk]
    keep = torch.ones_like(rel, dtype=torch.bool)
    if p.causal:
        keep = keep & (rel <= 0)
    if p.window_left is not None:
        keep = keep & (rel >= -p.window_left)
    if p.window_right is not None:
        keep = keep & (rel <= p.window_right)
    if p.alibi is not None:
        slopes = p.alibi.to(dt)[:, :, None, None]                   # [1|B, Hq, 1, 1]
        scores = scores - slopes * rel.abs().to(dt)
    if isinstance(p.rel_bias, DistanceBias):
        rb = p.rel_bias
        idx = rel[:, 0].clamp(-rb.left, rb.right) + rb.left         # [1|B, Nq, Nk]
        scores = scores + rb.table.to(dt)[:, idx].permute(1, 0, 2, 3)
    elif isinstance(p.rel_bias, GridBias):
        q_pos, k_pos = p.default_positions(dev)
        idx = p.rel_bias.index(q_pos.long(), k_pos.long())         # [1|B, Nq, Nk]
        scores = scores + p.rel_bias.table.to(dt)[idx].permute(0, 3, 1, 2)
    if p.bias is not None:
        bias = p.bias
        if bias.shape[0] not in (1, p.B):  # batch b reads bias[b % nB]
            bias = bias.repeat(p.B // bias.shape[0], 1, 1, 1)
        if p.bias_is_mask:
            keep = keep & bias
        else:
            scores = scores + bias.to(dt)
    scores = scores.masked_fill(~keep, float("-inf"))

    # Softmax by hand so that rows with no visible key give zeros, lse = -inf, no NaN.
    m = scores.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(scores - m)
    l = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(l == 0, torch.ones_like(l), l)
    out = torch.matmul(probs.to(v.dtype), v)
    if re is not None and re.value is not None:  # per-row bucket sums of P times aV
        buckets = torch.zeros(p.B, p.Hq, p.Nq, 2 * re.clip + 1, device=dev, dtype=probs.dtype)
        buckets = buckets.scatter_add(-1, c, probs)
        out = out + torch.matmul(buckets.to(v.dtype), re.value.to(dt)[None])
    if not p.return_lse:
        return out
    lse = (torch.log(l) + m).squeeze(-1)
    return out, lse.to(torch.float64 if dt == torch.float64 else torch.float32)
