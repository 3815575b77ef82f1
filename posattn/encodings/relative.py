"""Relative position representations (Shaw et al. 2018) and Transformer-XL's
relative attention: vector embeddings on the key and the value side."""
from __future__ import annotations

import torch

from .base import Encoding, Shape, is_int, register, same_device


def _sinusoid(pos: torch.Tensor, d_model: int) -> torch.Tensor:
    """Transformer-XL's PositionalEmbedding: [sin(p * f), cos(p * f)] with
    f_i = 1 / 10000 ** (2i / d_model), concatenated (not interleaved)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=pos.device, dtype=torch.float64) / d_model))
    x = pos.to(torch.float64)[:, None] * inv_freq[None, :]  # float64, then cast by the caller
    return torch.cat([x.sin(), x.cos()], dim=-1)


class RelativeEmbeddings(Encoding):
    """Vector relative position representations (Shaw et al. 2018; Transformer-XL).

    With ``c = clamp(rel, -K, K) + K``::

        s_ij = scale * ((q_i + u) . k_j + (q_i + w) . aK[c])
        o_i  = sum_j p_ij (v_j + aV[c])

    ``key`` (aK) and ``value`` (aV): ``[H or 1, 2K+1, D]``; ``content_bias`` (u)
    and ``position_bias`` (w): ``[H, D]`` (H = query heads). Any of them may be
    None (w needs a key table). Gradients reach all of them.
    """

    def __init__(self, key=None, value=None, clip=None, content_bias=None, position_bias=None):
        if not is_int(clip) or clip < 0:
            raise ValueError(f"RelativeEmbeddings: clip must be an int K >= 0, got {clip!r}")
        clip = int(clip)
        for name, t in (("key", key), ("value", value)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"RelativeEmbeddings: {name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"RelativeEmbeddings: {name} must be a float tensor, got {t.dtype}")
            if t.dim() != 3 or t.shape[1] != 2 * clip + 1:
                raise ValueError(f"RelativeEmbeddings: {name} must have shape [H or 1, 2K+1, D] = "
                                 f"[H, {2 * clip + 1}, D] for clip K={clip}, got {tuple(t.shape)}")
        for name, t in (("content_bias", content_bias), ("position_bias", position_bias)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"RelativeEmbeddings: {name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point() or t.dim() != 2:
                raise ValueError(f"RelativeEmbeddings: {name} must be a float tensor [H, D], got "
                                 f"{t.dtype} {tuple(t.shape)}")
        if key is not None and value is not None and key.shape[0] != value.shape[0]:
            raise ValueError(f"RelativeEmbeddings: key and value must have the same number of heads, got "
                             f"{key.shape[0]} and {value.shape[0]}")
        if key is None and value is None and content_bias is None:
            raise ValueError("RelativeEmbeddings: give at least one of key, value or content_bias")
        if position_bias is not None and key is None:
            raise ValueError("RelativeEmbeddings: position_bias (w) multiplies the key table; give key too")
        self.key, self.value, self.clip = key, value, clip
        self.content_bias, self.position_bias = content_bias, position_bias

    @classmethod
    def transformer_xl(cls, r_proj: torch.Tensor, content_bias: torch.Tensor, position_bias: torch.Tensor,
                       clip: int):
        """Transformer-XL's relative attention (Dai et al. 2019).

        ``r_proj``: ``W_R`` as the weight of ``nn.Linear(d_model, H * D, bias=False)``,
        ``[H * D, d_model]``; ``content_bias`` / ``position_bias``: ``u`` / ``w`` ``[H, D]``.
        ``aK[h, c] = W_R sinusoid(q_pos - k_pos)`` for the clipped distance; ``clip``
        should cover the longest distance (``Nk - 1``) to match the paper exactly.
        Memory is O(K * D); build it each step so that gradients reach ``r_proj``.
        """
        if not isinstance(r_proj, torch.Tensor) or r_proj.dim() != 2:
            raise ValueError("RelativeEmbeddings.transformer_xl: r_proj must be [H * D, d_model]")
        if not isinstance(content_bias, torch.Tensor) or content_bias.dim() != 2:
            raise ValueError("RelativeEmbeddings.transformer_xl: content_bias must be [H, D]")
        H, D = content_bias.shape
        if r_proj.shape[0] != H * D:
            raise ValueError(f"RelativeEmbeddings.transformer_xl: r_proj has {r_proj.shape[0]} rows, "
                             f"expected H * D = {H * D}")
        if not is_int(clip) or clip < 0:
            raise ValueError(f"RelativeEmbeddings.transformer_xl: clip must be an int >= 0, got {clip!r}")
        clip = int(clip)
        d_model = r_proj.shape[1]
        if d_model % 2:
            raise ValueError(f"RelativeEmbeddings.transformer_xl: d_model must be even, got {d_model}")
        # row c is rel = c - K, the distance q_pos - k_pos = K - c
        dist = torch.arange(clip, -clip - 1, -1, device=r_proj.device)
        emb = _sinusoid(dist, d_model).to(r_proj.dtype)                # [2K+1, d_model]
        key = (emb @ r_proj.t()).view(2 * clip + 1, H, D).transpose(0, 1)
        return cls(key=key, clip=clip, content_bias=content_bias, position_bias=position_bias)

    keyword = "rel_emb"

    def bind(self, shape: Shape) -> "RelativeEmbeddings":
        Hq, D = shape.Hq, shape.D
        for name in ("key", "value"):
            t = getattr(self, name)
            if t is None:
                continue
            same_device(f"rel_emb.{name}", t, shape.device)
            if t.shape[0] not in (1, Hq) or t.shape[2] != D:
                raise ValueError(f"rel_emb.{name} must have shape [1 or Hq={Hq}, 2K+1, D={D}], got "
                                 f"{tuple(t.shape)}")
        for name in ("content_bias", "position_bias"):
            t = getattr(self, name)
            if t is None:
                continue
            same_device(f"rel_emb.{name}", t, shape.device)
            if tuple(t.shape) != (Hq, D):
                raise ValueError(f"rel_emb.{name} must have shape [Hq, D] = [{Hq}, {D}], got {tuple(t.shape)}")
        return self

    def tensors(self):
        return {"rel_key": self.key, "rel_value": self.value, "rel_content_bias": self.content_bias,
                "rel_position_bias": self.position_bias}

    def replace(self, rel_key=None, rel_value=None, rel_content_bias=None, rel_position_bias=None):
        return self.with_tensors(rel_key, rel_value, rel_content_bias, rel_position_bias)

    # reference terms: c = clamp(rel, -K, K) + K
    def _columns(self, ctx):
        p = ctx.p
        return (ctx.rel.clamp(-self.clip, self.clip) + self.clip).expand(p.B, p.Hq, p.Nq, p.Nk)

    def content_query(self, ctx, q):
        u = self.content_bias
        return q + u.to(ctx.dt)[None, :, None, :] if u is not None else q

    def add_logits(self, ctx):
        if self.key is not None:
            w = self.position_bias
            qw = ctx.q + w.to(ctx.dt)[None, :, None, :] if w is not None else ctx.q
            qa = torch.matmul(qw, self.key.to(ctx.dt)[None].transpose(-1, -2))   # [B, Hq, Nq, 2K+1]
            ctx.logits = ctx.logits + qa.gather(-1, self._columns(ctx))

    def value_term(self, ctx, probs):
        if self.value is None:
            return None
        p = ctx.p
        buckets = torch.zeros(p.B, p.Hq, p.Nq, 2 * self.clip + 1, device=probs.device, dtype=probs.dtype)
        buckets = buckets.scatter_add(-1, self._columns(ctx), probs)   # per-row bucket sums of P
        return torch.matmul(buckets.to(ctx.v.dtype), self.value.to(ctx.dt)[None])

    @property
    def tables(self):
        return [t for t in (self.key, self.value) if t is not None]

    def with_tensors(self, key=None, value=None, content_bias=None, position_bias=None):
        """The same clip with other tensors (None keeps the current one)."""
        pick = lambda new, old: old if new is None else new  # noqa: E731
        return RelativeEmbeddings(pick(key, self.key), pick(value, self.value), self.clip,
                                  pick(content_bias, self.content_bias), pick(position_bias, self.position_bias))

    def __repr__(self):
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        return (f"RelativeEmbeddings(key={shape(self.key)}, value={shape(self.value)}, clip={self.clip}, "
                f"content_bias={shape(self.content_bias)}, position_bias={shape(self.position_bias)})")


def _wrap(value):
    if not isinstance(value, RelativeEmbeddings):
        raise TypeError(f"rel_emb must be a posattn.RelativeEmbeddings, got {type(value).__name__}")
    return value


register("rel_emb", _wrap)
