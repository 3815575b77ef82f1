"""A dense additive bias or bool keep-mask, broadcast to [B, Hq, Nq, Nk] (never expanded)."""
from __future__ import annotations

import torch

from .base import Encoding, Shape, register, same_device


class DenseBias(Encoding):
    """The bound form of ``bias=``: a 4-D tensor whose axes are 1 or full (its batch
    may also divide B: batch b reads bias[b % nB]); ``is_mask`` for a bool keep-mask."""

    keyword = "bias"

    def __init__(self, bias: torch.Tensor):
        self.bias_tensor = bias
        self.is_mask = bias.dtype == torch.bool

    def bind(self, shape: Shape) -> "DenseBias":
        bias = self.bias_tensor
        same_device("bias", bias, shape.device)
        if not self.is_mask and bias.dtype not in (shape.dtype, torch.float32) and not (
                shape.dtype == torch.float64 and bias.is_floating_point()):  # float64: the oracle
            raise TypeError(f"bias must be bool, float32 or q's dtype {shape.dtype}, got {bias.dtype}")
        full = (shape.B, shape.Hq, shape.Nq, shape.Nk)
        if bias.dim() > 4:
            raise ValueError(f"bias must be broadcastable to [B, Hq, Nq, Nk] = {list(full)}, "
                             f"got shape {tuple(bias.shape)}")
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)) if bias.dim() < 4 else bias
        batch_ok = bias.shape[0] >= 1 and shape.B % bias.shape[0] == 0
        if not batch_ok or any(s not in (1, f) for s, f in zip(bias.shape[1:], full[1:])):
            raise ValueError(f"bias must be broadcastable to [B, Hq, Nq, Nk] = {list(full)} (its batch "
                             f"size may also divide B: batch b reads bias[b % nB]), got shape "
                             f"{tuple(self.bias_tensor.shape)}")
        return DenseBias(bias)

    def tensors(self):
        return {} if self.is_mask else {"bias": self.bias_tensor}

    def replace(self, bias=None):
        return self if bias is None else DenseBias(bias)

    def _batched(self, p):
        bias = self.bias_tensor
        if bias.shape[0] not in (1, p.B):  # batch b reads bias[b % nB]
            bias = bias.repeat(p.B // bias.shape[0], 1, 1, 1)
        return bias

    def score_bias(self, ctx):
        return None if self.is_mask else self._batched(ctx.p).to(ctx.dt)

    def keep_mask(self, ctx):
        return self._batched(ctx.p) if self.is_mask else None


def _wrap(value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor, got {type(value).__name__}")
    return DenseBias(value)


register("bias", _wrap)
