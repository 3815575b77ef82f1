"""ALiBi (Press et al.; BLOOM, MPT): ``bias = -slope[h] * |k_pos - q_pos|``."""
from __future__ import annotations

import math

import torch

from .base import FLOAT_DTYPES, Encoding, Shape, is_int, register, same_device


def alibi_slopes(num_heads: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The standard ALiBi slopes ``[num_heads]`` (Press et al.; BLOOM's list for any H)."""
    if not is_int(num_heads) or num_heads <= 0:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")
    num_heads = int(num_heads)

    def power_of_two(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(p)
    if p < num_heads:
        slopes += power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=dtype, device=device)



class ALiBi(Encoding):
    """The bound form of ``alibi_slopes=``: ``slopes`` ``[1 or B, Hq]`` (differentiable)."""

    keyword = "alibi_slopes"

    def __init__(self, slopes: torch.Tensor):
        self.slopes = slopes

    def bind(self, shape: Shape) -> "ALiBi":
        s = self.slopes
        same_device("alibi_slopes", s, shape.device)
        if s.dtype not in FLOAT_DTYPES:
            raise TypeError(f"alibi_slopes must be a floating-point tensor, got {s.dtype}")
        if s.dim() == 1:
            s = s[None]
        if s.dim() != 2 or s.shape[1] != shape.Hq or s.shape[0] not in (1, shape.B):
            raise ValueError(f"alibi_slopes must have shape [{shape.Hq}] or [{shape.B}, {shape.Hq}], got "
                             f"{tuple(self.slopes.shape)}")
        return ALiBi(s)

    def tensors(self):
        return {"alibi_slopes": self.slopes}

    def replace(self, alibi_slopes=None):
        return self if alibi_slopes is None else ALiBi(alibi_slopes)

    def score_bias(self, ctx):
        return -(self.slopes.to(ctx.dt)[:, :, None, None] * ctx.rel.abs().to(ctx.dt))  # a + (-b) == a - b exactly


def _wrap(value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor, got {type(value).__name__}")
    return ALiBi(value)


register("alibi_slopes", _wrap)
