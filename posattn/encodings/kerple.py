"""KERPLE, logarithmic variant (Chi et al. 2022, "KERPLE: Kernelized Relative
Positional Embedding for Length Extrapolation"): a learned per-head bias
``-r1[h] * log(1 + r2[h] * |k_pos - q_pos|)``."""
from __future__ import annotations

import torch

from .base import Encoding, Shape, readable, register, same_device


class KERPLE(Encoding):
    """KERPLE's logarithmic kernel as a score bias (added after scaling, like every bias)::

        bias_ij = -r1[h] * log(1 + r2[h] * |k_pos[j] - q_pos[i]|)

    ``r1``, ``r2``: ``[Hq]`` float tensors, every entry > 0 (the paper's constraint;
    a clear error otherwise). Both get gradients.
    """

    keyword = "kerple"

    def __init__(self, r1: torch.Tensor, r2: torch.Tensor):
        for name, t in (("r1", r1), ("r2", r2)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"KERPLE: {name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"KERPLE: {name} must be a float tensor, got {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"KERPLE: {name} must have shape [Hq], got {tuple(t.shape)}")
        self.r1, self.r2 = r1, r2

    def bind(self, shape: Shape) -> "KERPLE":
        for name, t in (("r1", self.r1), ("r2", self.r2)):
            same_device(f"kerple.{name}", t, shape.device)
            if tuple(t.shape) != (shape.Hq,):
                raise ValueError(f"kerple.{name} must have shape [Hq] = [{shape.Hq}], got {tuple(t.shape)}")
            # the values (one device sync); under torch.compile they are unknown: not checked
            if readable(t) and t.numel() and not bool((t > 0).all()):
                raise ValueError(f"kerple.{name} must be > 0 everywhere, got a minimum of {float(t.min())}")
        return self

    def tensors(self):
        return {"kerple_r1": self.r1, "kerple_r2": self.r2}

    def replace(self, kerple_r1=None, kerple_r2=None):
        return KERPLE(self.r1 if kerple_r1 is None else kerple_r1, self.r2 if kerple_r2 is None else kerple_r2)

    def score_bias(self, ctx):
        dist = ctx.rel.abs().to(ctx.dt)                                   # [1|B, 1, Nq, Nk]
        r1, r2 = (t.to(ctx.dt)[None, :, None, None] for t in (self.r1, self.r2))
        return -(r1 * torch.log1p(r2 * dist))

    def __repr__(self):
        return f"KERPLE(r1={tuple(self.r1.shape)}, r2={tuple(self.r2.shape)})"


def _wrap(value):
    if not isinstance(value, KERPLE):
        raise TypeError(f"kerple must be a posattn.KERPLE, got {type(value).__name__}")
    return value


register("kerple", _wrap)
