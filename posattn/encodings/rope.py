"""RoPE (RoFormer; LLaMA, GPT-NeoX, GPT-J): q and k rotated at their positions."""
from __future__ import annotations

import math

import torch

from .base import Encoding, Shape, is_int, is_real, register, same_device


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


class RoPE(Encoding):
    """Rotary position embedding applied to q and k inside the kernel.

    ``inv_freq``: ``[R/2]`` frequencies over the first ``R`` channels (``R <= D``).
    Without it, ``inv_freq[i] = base ** (-2i / R)`` with ``R = dim`` (or the head
    dimension when ``dim`` is None). ``interleaved`` pairs ``(x[2i], x[2i+1])``
    (GPT-J) instead of ``(x[i], x[i + R/2])`` (GPT-NeoX / LLaMA). Scaled variants
    (linear, NTK, llama3, YaRN, LongRoPE) are a choice of ``inv_freq`` and
    ``attention_factor`` (cos and sin are both multiplied by it). ``inv_freq`` is a
    constant: one that requires grad is detached (no gradient reaches it).
    """

    def __init__(self, inv_freq=None, *, dim=None, base=10000.0, interleaved=False,
                 attention_factor=1.0):
        if inv_freq is not None:
            if not isinstance(inv_freq, torch.Tensor):
                raise TypeError(f"RoPE: inv_freq must be a torch.Tensor, got {type(inv_freq).__name__}")
            if inv_freq.dim() != 1 or inv_freq.numel() == 0:
                raise ValueError(f"RoPE: inv_freq must have shape [R/2], got {tuple(inv_freq.shape)}")
            if not inv_freq.is_floating_point():
                raise TypeError(f"RoPE: inv_freq must be a float tensor, got {inv_freq.dtype}")
            if dim is not None and dim != 2 * inv_freq.numel():
                raise ValueError(f"RoPE: dim={dim} does not match inv_freq of length {inv_freq.numel()} "
                                 f"(expected dim = 2 * len(inv_freq))")
            dim = 2 * int(inv_freq.numel())
        if dim is not None:
            if not is_int(dim) or dim <= 0 or dim % 2:
                raise ValueError(f"RoPE: dim must be a positive even int, got {dim!r}")
        if not is_real(base) or not base > 0:
            raise ValueError(f"RoPE: base must be a positive number, got {base!r}")
        if not is_real(attention_factor) or not math.isfinite(attention_factor):
            raise ValueError(f"RoPE: attention_factor must be a finite number, got {attention_factor!r}")
        self.inv_freq = inv_freq
        self.dim = None if dim is None else int(dim)
        self.base = float(base)
        self.interleaved = bool(interleaved)
        self.attention_factor = float(attention_factor)

    keyword = "rope"

    def bind(self, shape: Shape) -> "RoPE":
        self.rotary_dim(shape.D)
        if self.inv_freq is not None:
            same_device("rope.inv_freq", self.inv_freq, shape.device)
        return self

    def rotate(self, x, pos, head_dim, dt):
        # angles in float64 when the reference upcasts, else float32 (what users' PyTorch code does)
        return apply_rope(x, pos, self.inv_freq_for(head_dim, x.device), self.interleaved, self.attention_factor,
                          torch.float64 if dt == torch.float64 else torch.float32)

    def rotary_dim(self, head_dim: int) -> int:
        """R: the number of rotated channels for heads of size ``head_dim``."""
        r = head_dim if self.dim is None else self.dim
        if r > head_dim:
            raise ValueError(f"rope: rotary dim {r} > head dim {head_dim}")
        if r % 2:
            raise ValueError(f"rope: rotary dim must be even, got {r} (head dim {head_dim})")
        return r

    def inv_freq_for(self, head_dim: int, device) -> torch.Tensor:
        """The ``[R/2]`` float32 frequencies on ``device``."""
        r = self.rotary_dim(head_dim)
        if self.inv_freq is not None:
            return self.inv_freq.detach().to(device=device, dtype=torch.float32)
        exponent = torch.arange(0, r, 2, dtype=torch.int64).to(torch.float32) / r
        return (1.0 / (self.base ** exponent)).to(device)

    def __repr__(self):
        src = "inv_freq=<tensor>" if self.inv_freq is not None else f"base={self.base}"
        return (f"RoPE({src}, dim={self.dim}, interleaved={self.interleaved}, "
                f"attention_factor={self.attention_factor})")




def _wrap(value):
    if not isinstance(value, RoPE):
        raise TypeError(f"rope must be a posattn.RoPE, got {type(value).__name__}")
    return value


register("rope", _wrap)
