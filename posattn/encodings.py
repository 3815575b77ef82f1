"""Positional-encoding objects passed to :func:`posattn.attention` (see docs/SPEC.md).

They only hold parameters; every backend reads the same fields, so the
reference, the Triton kernels and (later) the CUDA kernels agree by construction.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["RoPE", "DistanceBias", "GridBias", "RelativeEmbeddings", "alibi_slopes", "t5_relative_bucket"]


def is_int(x) -> bool:
    """A Python or NumPy integer (or a 0-d integer tensor, as torch.jit.trace hands out
    sizes), not a bool: the numbers the API accepts wherever it takes an int."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def is_real(x) -> bool:
    """A Python or NumPy real number (ints included), not a bool."""
    return (isinstance(x, numbers.Real) and not isinstance(x, bool) and type(x).__name__ != "bool_") or is_int(x)


class RoPE:
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
            if not is_int(val) or val < 0:
                raise ValueError(f"DistanceBias: {name} must be an int >= 0, got {val!r}")
        left, right = int(left), int(right)
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
                is_int(w) and w >= 1 for w in window):
            raise ValueError(f"GridBias: window must be a pair of ints >= 1 (Wh, Ww), got {window!r}")
        wh, ww = int(window[0]), int(window[1])
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


def _sinusoid(pos: torch.Tensor, d_model: int) -> torch.Tensor:
    """Transformer-XL's PositionalEmbedding: [sin(p * f), cos(p * f)] with
    f_i = 1 / 10000 ** (2i / d_model), concatenated (not interleaved)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=pos.device, dtype=torch.float64) / d_model))
    x = pos.to(torch.float64)[:, None] * inv_freq[None, :]  # float64, then cast by the caller
    return torch.cat([x.sin(), x.cos()], dim=-1)


class RelativeEmbeddings:
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
