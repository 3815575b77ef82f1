"""RoPE (RoFormer; LLaMA, GPT-NeoX, GPT-J): q and k rotated at their positions."""
from __future__ import annotations

import copy
import math

import torch

from .base import Encoding, Shape, is_int, is_real, register, same_device


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
               attention_factor: float, compute_dtype) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, N, D]`` at positions ``pos`` ``[1 or B, N]``, or ``[1 or B, N, R/2]``
    (a position per frequency pair: multi-axis RoPE) (docs/SPEC.md's RoPE)."""
    r = 2 * inv_freq.numel()
    pos = pos.to(compute_dtype)
    pos = pos[:, :, None] if pos.dim() == 2 else pos
    theta = pos[:, None] * inv_freq.to(compute_dtype)                              # [B, 1, N, R/2]
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

    ``sections``: multi-axis RoPE (Qwen2-VL's M-RoPE, axial 2-D / 3-D RoPE): a tuple of
    positive ints, the number of frequency pairs each position axis owns, in order
    (pairs ``0..s_0-1`` rotate by axis 0's position, the next ``s_1`` by axis 1's, ...;
    they sum to ``R / 2``). The positions per axis are posattn.attention's
    ``rope_pos=(q_rope_pos, k_rope_pos)``, ``[A, N]`` or ``[B, A, N]``; without them
    every axis takes the 1-D positions, which is plain RoPE.
    """

    def __init__(self, inv_freq=None, *, dim=None, base=10000.0, interleaved=False,
                 attention_factor=1.0, sections=None):
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
        if sections is not None:
            if (not isinstance(sections, (tuple, list)) or not sections
                    or not all(is_int(n) and n > 0 for n in sections)):
                raise ValueError(f"RoPE: sections must be a non-empty tuple of positive ints (frequency pairs "
                                 f"per position axis), got {sections!r}")
            sections = tuple(int(n) for n in sections)
            if dim is not None and sum(sections) != dim // 2:
                raise ValueError(f"RoPE: sections {sections} sum to {sum(sections)} pairs, but the rotary dim "
                                 f"{dim} has {dim // 2}")
        self.inv_freq = inv_freq
        self.sections = sections
        # rope_pos=, set by bind_positions: ([1 or B, A, Nq], [1 or B, A, Nk]) int64
        self.axis_positions = None
        self.dim = None if dim is None else int(dim)
        self.base = float(base)
        self.interleaved = bool(interleaved)
        self.attention_factor = float(attention_factor)

    keyword = "rope"

    @property
    def num_axes(self) -> int:
        """A: the number of position axes (1 without ``sections``)."""
        return 1 if self.sections is None else len(self.sections)

    def bind(self, shape: Shape) -> "RoPE":
        r = self.rotary_dim(shape.D)
        if self.sections is not None and sum(self.sections) != r // 2:
            raise ValueError(f"rope: sections {self.sections} sum to {sum(self.sections)} pairs, but the rotary "
                             f"dim {r} (head dim {shape.D}) has {r // 2}")
        if self.inv_freq is not None:
            same_device("rope.inv_freq", self.inv_freq, shape.device)
        return self

    def bind_positions(self, q_rope_pos, k_rope_pos) -> "RoPE":
        """A copy rotating by per-axis positions ``[1 or B, A, N]`` (checked by the caller)."""
        e = copy.copy(self)
        e.axis_positions = (q_rope_pos, k_rope_pos)
        return e

    def pair_axis(self, head_dim: int, device) -> torch.Tensor:
        """``[R/2]`` int64: the position axis of each frequency pair (all 0 without sections)."""
        r = self.rotary_dim(head_dim)
        pair = torch.arange(r // 2, device=device)
        axis = torch.zeros_like(pair)
        end = 0
        for n in (self.sections or ())[:-1]:   # comparisons on the device: no host copy, no sync
            end += n
            axis += pair >= end
        return axis

    def rotate(self, x, pos, head_dim, dt, keys=False):
        # angles in float64 when the reference upcasts, else float32 (what users' PyTorch code does)
        if self.axis_positions is not None:   # each pair at its axis' position: [1 or B, N, R/2]
            pos = self.axis_positions[1 if keys else 0]
            pos = pos[:, self.pair_axis(head_dim, x.device)].transpose(1, 2)
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
        sec = "" if self.sections is None else f", sections={self.sections}"
        return (f"RoPE({src}, dim={self.dim}, interleaved={self.interleaved}, "
                f"attention_factor={self.attention_factor}{sec})")




def _wrap(value):
    if not isinstance(value, RoPE):
        raise TypeError(f"rope must be a posattn.RoPE, got {type(value).__name__}")
    return value


register("rope", _wrap)
