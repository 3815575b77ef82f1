"""Learned bias tables read by relative position: DistanceBias (T5, clipped
distance) and GridBias (Swin / BEiT 2-D window)."""
from __future__ import annotations

import math

import torch

from .base import FLOAT_DTYPES, Encoding, Shape, is_int, readable, register, same_device


def _grid_positions(tokens, **positions):
    """GridBias reads token p at (p // Ww, p % Ww): explicit positions must lie in the
    window, [0, Wh * Ww). This reads the values (one device sync, only for GridBias with
    explicit positions); under torch.compile the values are unknown and not checked."""
    for name, pos in positions.items():
        if pos is None or pos.numel() == 0 or not readable(pos):
            continue
        lo, hi = (int(x) for x in torch.aminmax(pos))  # one device sync
        if lo < 0 or hi >= tokens:
            raise ValueError(f"{name} must lie in [0, Wh * Ww) = [0, {tokens}) with a GridBias (token p sits at "
                             f"(p // Ww, p % Ww) in the window), got values from {lo} to {hi}")


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


class _Table(Encoding):
    """A per-head scalar bias looked up in ``table`` by the pair's relative position."""

    keyword = "rel_bias"

    def bind(self, shape: Shape) -> "_Table":
        t = self.table
        same_device("rel_bias.table", t, shape.device)
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"rel_bias.table must be a floating-point tensor, got {t.dtype}")
        if self.num_heads != shape.Hq:
            what = "rows" if isinstance(self, DistanceBias) else "columns"
            raise ValueError(f"rel_bias.table must have {shape.Hq} {what} (one per query head), got "
                             f"{tuple(t.shape)}")
        return self

    def tensors(self):
        return {"table": self.table}

    def replace(self, table=None):
        return self if table is None else self.with_table(table)

    def score_bias(self, ctx):
        return self.columns(ctx)


class DistanceBias(_Table):
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

    def columns(self, ctx):
        idx = ctx.rel[:, 0].clamp(-self.left, self.right) + self.left      # [1|B, Nq, Nk]
        return self.table.to(ctx.dt)[:, idx].permute(1, 0, 2, 3)

    def with_table(self, table: torch.Tensor) -> "DistanceBias":
        """The same clipping with another table (e.g. a float64 copy)."""
        return DistanceBias(table, self.left, self.right)

    def __repr__(self):
        return f"DistanceBias(table={tuple(self.table.shape)}, left={self.left}, right={self.right})"


class GridBias(_Table):
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

    def bind(self, shape: Shape) -> "GridBias":
        super().bind(shape)
        wh, ww = self.window
        if not shape.Nq <= shape.Nk <= wh * ww:
            raise ValueError(f"rel_bias: GridBias{(wh, ww)} needs Nq <= Nk <= Wh * Ww = {wh * ww} "
                             f"(one window per batch row), got Nq={shape.Nq}, Nk={shape.Nk}")
        _grid_positions(wh * ww, q_pos=shape.q_pos, k_pos=shape.k_pos)
        return self

    def columns(self, ctx):
        q_pos, k_pos = ctx.p.default_positions(ctx.p.q.device)
        idx = self.index(q_pos.long(), k_pos.long())                      # [1|B, Nq, Nk]
        return self.table.to(ctx.dt)[idx].permute(0, 3, 1, 2)

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



def _wrap(value):
    if not isinstance(value, (DistanceBias, GridBias)):
        raise TypeError(f"rel_bias must be a posattn.DistanceBias or posattn.GridBias, got {type(value).__name__}")
    return value


register("rel_bias", _wrap)
