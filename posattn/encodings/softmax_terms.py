"""Terms of the softmax that are not positional: logit soft-capping (Gemma 2) and
attention sinks (gpt-oss). Each is a slice like the encodings (docs/ADDING_AN_ENCODING.md):
a keyword, its checks, its reference terms, its differentiable tensors."""
from __future__ import annotations

import math

import torch

from .base import FLOAT_DTYPES, Encoding, Shape, is_real, readable, register, same_device


class SoftCap(Encoding):
    """``softcap=c`` (a float > 0): the scaled logits are capped before any bias is added,
    ``s = c * tanh(scale * logit / c) + bias`` (Gemma 2's attention soft-capping)."""

    keyword = "softcap"

    def __init__(self, cap):
        if not is_real(cap) or isinstance(cap, torch.Tensor):
            raise TypeError(f"softcap must be a float > 0 or None, got {type(cap).__name__} {cap!r}")
        cap = float(cap)
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"softcap must be a finite float > 0, got {cap!r}")
        self.cap = cap

    def cap_scores(self, ctx, scores):
        return self.cap * torch.tanh(scores / self.cap)

    def __repr__(self):
        return f"SoftCap({self.cap})"


class Sinks(Encoding):
    """``sinks=[Hq]`` float tensor: one logit per query head that joins every row's softmax
    denominator and nothing else (gpt-oss's ``s_aux``)::

        p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij)),   lse_i = log(exp(sink_h) + sum_j exp(s_ij))

    A row with no visible key then gives zeros and ``lse = sink_h``. Finite values;
    differentiable."""

    keyword = "sinks"

    def __init__(self, sinks: torch.Tensor):
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(f"sinks must be a torch.Tensor, got {type(sinks).__name__}")
        if sinks.dtype not in FLOAT_DTYPES:
            raise TypeError(f"sinks must be a float tensor, got {sinks.dtype}")
        self.sinks = sinks

    def bind(self, shape: Shape) -> "Sinks":
        same_device("sinks", self.sinks, shape.device)
        if tuple(self.sinks.shape) != (shape.Hq,):
            raise ValueError(f"sinks must have shape [Hq] = [{shape.Hq}], got {tuple(self.sinks.shape)}")
        if readable(self.sinks) and self.sinks.numel() and not bool(torch.isfinite(self.sinks).all()):
            raise ValueError("sinks must be finite")
        return self

    def tensors(self):
        return {"sinks": self.sinks}

    def replace(self, sinks=None):
        return self if sinks is None else Sinks(sinks)

    def sink_logits(self, ctx):
        return self.sinks.to(ctx.dt)[None, :, None, None]

    def __repr__(self):
        return f"Sinks({tuple(self.sinks.shape)})"


def _wrap_softcap(value):
    return value if isinstance(value, SoftCap) else SoftCap(value)


def _wrap_sinks(value):
    return value if isinstance(value, Sinks) else Sinks(value)


register("softcap", _wrap_softcap)
register("sinks", _wrap_sinks)
