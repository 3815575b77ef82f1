"""Positional-encoding objects passed to :func:`posattn.attention` (see SPEC.md).

They only hold parameters; every backend reads the same fields, so the
reference, the Triton kernels and (later) the CUDA kernels agree by construction.
"""
from __future__ import annotations

import math

import torch

__all__ = ["RoPE", "DistanceBias", "GridBias", "alibi_slopes", "t5_relative_bucket"]


class RoPE:
    """Rotary position embedding applied to q and k inside the kernel.

    ``inv_freq``: ``[R/2]`` frequencies over the first ``R`` channels (``R <= D``).
    Without it, ``inv_freq[i] = base ** (-2i / R)`` with ``R = dim`` (or the head
    dimension when ``dim`` is None). ``interleaved`` pairs ``(x[2i], x[2i+1])``
    (GPT-J) instead of ``(x[i], x[i + R/2])`` (GPT-NeoX / LLaMA). Scaled variants
    (linear, NTK, llama3, YaRN, LongRoPE) are a choice of ``inv_freq`` and
    ``attention_factor`` (cos and sin are both multiplied by it).
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
            dim = 2 * inv_freq.numel()
        if dim is not None:
            if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0 or dim % 2:
                raise ValueError(f"RoPE: dim must be a positive even int, got {dim!r}")
        if not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 0:
            raise ValueError(f"RoPE: base must be a positive number, got {base!r}")
        if not isinstance(attention_factor, (int, float)) or isinstance(attention_factor, bool) \
                or not math.isfinite(attention_factor):
            raise ValueError(f"RoPE: attention_factor must be a finite number, got {attention_factor!r}")
        self.inv_freq = inv_freq
        self.dim = dim
        self.base = float(base)
        self.interleaved = bool(interleaved)
        self.attention_factor = float(attention_factor)

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


def alibi_slopes(num_heads: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The standard ALiBi slopes ``[num_heads]`` (Press et al.; BLOOM's list for any H)."""
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")

    def power_of_two(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(p)
    if p < num_heads:
        slopes += power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=dtype, device=device)


def t5_relative_bucket(rel: torch.Tensor, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's bucket of ``rel = k_pos - q_pos`` (HF ``T5Attention._relative_position_bucket``)."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).to(rel.dtype) * num_buckets
        n = rel.abs()
    else:
        n = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(rel.dtype)
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class DistanceBias:
    """Per-head scalar bias by clipped distance: ``table[h, clamp(rel, -L, R) + L]``.

    ``table``: ``[Hq, left + right + 1]`` float tensor; its gradient is returned
    by the backward (deterministically, without an [Nq, Nk] tensor).
    """

    def __init__(self, table: torch.Tensor, left: int, right: int):
        for name, val in (("left", left), ("right", right)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"DistanceBias: {name} must be an int >= 0, got {val!r}")
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"DistanceBias: table must be a torch.Tensor, got {type(table).__name__}")
        if not table.is_floating_point():
            raise TypeError(f"DistanceBias: table must be a float tensor, got {table.dtype}")
        if table.dim() != 2 or table.shape[1] != left + right + 1:
            raise ValueError(f"DistanceBias: table must have shape [H, left + right + 1] = "
                             f"[H, {left + right + 1}], got {tuple(table.shape)}")
        self.table = table
        self.left = left
        self.right = right

    @classmethod
    def t5(cls, weight: torch.Tensor, num_buckets=32, max_distance=128, bidirectional=True):
        """From a T5 ``relative_attention_bias.weight`` ``[num_buckets, Hq]``.

        T5's bucket is constant for ``|rel| >= max_distance``, so it is exactly a
        clipped-distance table with ``L = max_distance`` and ``R = max_distance``
        (``R = 0`` when not bidirectional). The table is an index into ``weight``,
        so the gradient reaches ``weight`` through autograd: build it each step.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != num_buckets:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"DistanceBias.t5: weight must have shape [num_buckets={num_buckets}, H], got {shape}")
        max_exact = num_buckets // 4 if bidirectional else num_buckets // 2
        if num_buckets < 4 or max_distance <= max_exact:
            # Below that, T5's log-spaced buckets are not constant past max_distance.
            raise ValueError(f"DistanceBias.t5: need num_buckets >= 4 and max_distance > {max_exact} "
                             f"(the exact-bucket range), got num_buckets={num_buckets}, "
                             f"max_distance={max_distance}")
        left = max_distance
        right = max_distance if bidirectional else 0
        rel = torch.arange(-left, right + 1, device=weight.device)
        idx = t5_relative_bucket(rel, bidirectional, num_buckets, max_distance)
        return cls(weight[idx].t(), left, right)

    @property
    def num_heads(self):
        return self.table.shape[0]

    def with_table(self, table: torch.Tensor) -> "DistanceBias":
        """The same clipping with another table (e.g. a float64 copy)."""
        return DistanceBias(table, self.left, self.right)

    def __repr__(self):
        return f"DistanceBias(table={tuple(self.table.shape)}, left={self.left}, right={self.right})"


class GridBias:
    """Swin / BEiT 2-D relative position bias inside a ``Wh x Ww`` window.

    Token ``p`` sits at ``(p // Ww, p % Ww)``; the pair ``(i, j)`` reads
    ``table[(y_i - y_j + Wh - 1) * (2 Ww - 1) + (x_i - x_j + Ww - 1), h]``
    (Swin's ``relative_position_index``). ``table``: ``[(2Wh-1)(2Ww-1), H]``,
    the layout of Swin's ``relative_position_bias_table``. Token indices are the
    positions (default: ``0 .. N-1``); explicit positions must lie in
    ``[0, Wh * Ww)``.
    """

    def __init__(self, table: torch.Tensor, window):
        if not isinstance(window, (tuple, list)) or len(window) != 2 or not all(
                isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in window):
            raise ValueError(f"GridBias: window must be a pair of ints >= 1 (Wh, Ww), got {window!r}")
        wh, ww = window
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"GridBias: table must be a torch.Tensor, got {type(table).__name__}")
        if not table.is_floating_point():
            raise TypeError(f"GridBias: table must be a float tensor, got {table.dtype}")
        rows = (2 * wh - 1) * (2 * ww - 1)
        if table.dim() != 2 or table.shape[0] != rows:
            raise ValueError(f"GridBias: table must have shape [(2Wh-1)(2Ww-1), H] = [{rows}, H] for window "
                             f"{(wh, ww)}, got {tuple(table.shape)}")
        self.table = table
        self.window = (wh, ww)

    @property
    def num_heads(self):
        return self.table.shape[1]

    def with_table(self, table: torch.Tensor) -> "GridBias":
        """The same window with another table (e.g. a float64 copy)."""
        return GridBias(table, self.window)

    def index(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Table row for each pair: ``[..., Nq, Nk]`` from ``q_pos [..., Nq]``, ``k_pos [..., Nk]``."""
        wh, ww = self.window
        qy, qx = q_pos // ww, q_pos % ww
        ky, kx = k_pos // ww, k_pos % ww
        dy = qy[..., :, None] - ky[..., None, :] + wh - 1
        dx = qx[..., :, None] - kx[..., None, :] + ww - 1
        return dy * (2 * ww - 1) + dx

    def __repr__(self):
        return f"GridBias(table={tuple(self.table.shape)}, window={self.window})"
