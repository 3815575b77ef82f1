"""The one place where posattn.attention's arguments are checked.

Every backend calls :func:`check` and receives a :class:`Problem`: normalised,
validated fields, so kernels and the reference never re-check anything.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .encodings import DistanceBias, GridBias, RelativeEmbeddings, RoPE, is_int

MAX_HEAD_DIM = 256
WINDOW_MAX = 2 ** 62
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: reference only
_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    causal: bool
    scale: float
    window_left: Optional[int]
    window_right: Optional[int]
    q_pos: Optional[torch.Tensor]       # [1 or B, Nq] int, None = default alignment
    k_pos: Optional[torch.Tensor]       # [1 or B, Nk]
    rope: Optional[RoPE]
    rotary_dim: int                     # 0 without rope
    alibi: Optional[torch.Tensor]       # [1 or B, Hq] float
    rel_bias: Optional[object]          # DistanceBias or GridBias
    bias: Optional[torch.Tensor]        # 4-D, each dim 1 or full (not expanded)
    bias_is_mask: bool
    return_lse: bool
    rel_emb: Optional[RelativeEmbeddings] = None

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv

    def default_positions(self, device):
        """(q_pos, k_pos) as [1, N] int64 tensors, defaults filled in."""
        k_pos = self.k_pos if self.k_pos is not None else torch.arange(self.Nk, device=device)[None]
        q_pos = self.q_pos if self.q_pos is not None else \
            torch.arange(self.Nk - self.Nq, self.Nk, device=device)[None]
        return q_pos, k_pos


def _is_int(x):
    """A Python or NumPy integer, not a bool."""
    return is_int(x) and not isinstance(x, torch.Tensor)


def _is_bool(x):
    return isinstance(x, (bool, np.bool_))


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _same_device(name, x, device):
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}: all tensors must be on one device")


def _positions(name, pos, B, N, device):
    if pos is None:
        return None
    _tensor(name, pos)
    _same_device(name, pos, device)
    if pos.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {pos.dtype}")
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() != 2 or pos.shape[1] != N or pos.shape[0] not in (1, B):
        raise ValueError(f"{name} must have shape [{N}] or [{B}, {N}], got {tuple(pos.shape)}")
    return pos


def _grid_positions(tokens, **positions):
    """GridBias reads token p at (p // Ww, p % Ww): explicit positions must lie in the
    window, [0, Wh * Ww). This reads the values (one device sync, only for GridBias with
    explicit positions); under torch.compile the values are unknown and not checked."""
    for name, pos in positions.items():
        if pos is None or pos.numel() == 0 or torch.compiler.is_compiling():
            continue
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= tokens:
            raise ValueError(f"{name} must lie in [0, Wh * Ww) = [0, {tokens}) with a GridBias (token p sits at "
                             f"(p // Ww, p % Ww) in the window), got values from {lo} to {hi}")


def check(q, k, v, *, causal=False, scale=None, window=None, q_pos=None, k_pos=None, rope=None,
          alibi_slopes=None, rel_bias=None, bias=None, return_lse=False, rel_emb=None) -> Problem:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 (float64: reference backend), got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}: q, k and v must share a dtype")
        _same_device(name, x, q.device)
    B, Hq, Nq, D = q.shape
    _, Hkv, Nk, _ = k.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"head dims differ: q {D}, k {k.shape[3]}, v {v.shape[3]}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"head dim D={D} is not supported (1 <= D <= {MAX_HEAD_DIM})")

    if not _is_bool(causal):
        raise TypeError(f"causal must be True or False, got {type(causal).__name__} {causal!r}")
    if not _is_bool(return_lse):
        raise TypeError(f"return_lse must be True or False, got {type(return_lse).__name__} {return_lse!r}")
    causal, return_lse = bool(causal), bool(return_lse)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if _is_bool(scale) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}")
        try:
            scale = float(scale)
        except OverflowError:
            scale = math.inf
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")

    wl = wr = None
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be a pair (left, right), got {window!r}")
        for name, w in zip(("left", "right"), window):
            if w is not None and (not _is_int(w) or w < 0):
                raise ValueError(f"window {name} must be an int >= 0 or None, got {w!r}")
        # A side wider than any int64 distance is unbounded: clamping keeps every
        # backend's arithmetic (tile ranges, tensor comparisons) inside int64.
        wl, wr = (None if w is None else min(int(w), WINDOW_MAX) for w in window)

    q_pos = _positions("q_pos", q_pos, B, Nq, q.device)
    k_pos = _positions("k_pos", k_pos, B, Nk, q.device)

    rotary_dim = 0
    if rope is not None:
        if not isinstance(rope, RoPE):
            raise TypeError(f"rope must be a posattn.RoPE, got {type(rope).__name__}")
        rotary_dim = rope.rotary_dim(D)
        if rope.inv_freq is not None:
            _same_device("rope.inv_freq", rope.inv_freq, q.device)

    if alibi_slopes is not None:
        _tensor("alibi_slopes", alibi_slopes)
        _same_device("alibi_slopes", alibi_slopes, q.device)
        if alibi_slopes.dtype not in _DTYPES:
            raise TypeError(f"alibi_slopes must be a floating-point tensor, got {alibi_slopes.dtype}")
        if alibi_slopes.dim() == 1:
            alibi_slopes = alibi_slopes[None]
        if alibi_slopes.dim() != 2 or alibi_slopes.shape[1] != Hq or alibi_slopes.shape[0] not in (1, B):
            raise ValueError(f"alibi_slopes must have shape [{Hq}] or [{B}, {Hq}], got "
                             f"{tuple(alibi_slopes.shape)}")

    if rel_bias is not None:
        if not isinstance(rel_bias, (DistanceBias, GridBias)):
            raise TypeError(f"rel_bias must be a posattn.DistanceBias or posattn.GridBias, got "
                            f"{type(rel_bias).__name__}")
        t = rel_bias.table
        _same_device("rel_bias.table", t, q.device)
        if t.dtype not in _DTYPES:
            raise TypeError(f"rel_bias.table must be a floating-point tensor, got {t.dtype}")
        if rel_bias.num_heads != Hq:
            what = "rows" if isinstance(rel_bias, DistanceBias) else "columns"
            raise ValueError(f"rel_bias.table must have {Hq} {what} (one per query head), got {tuple(t.shape)}")
        if isinstance(rel_bias, GridBias):
            wh, ww = rel_bias.window
            if not Nq <= Nk <= wh * ww:
                raise ValueError(f"rel_bias: GridBias{(wh, ww)} needs Nq <= Nk <= Wh * Ww = {wh * ww} "
                                 f"(one window per batch row), got Nq={Nq}, Nk={Nk}")
            _grid_positions(wh * ww, q_pos=q_pos, k_pos=k_pos)

    bias_is_mask = False
    if bias is not None:
        _tensor("bias", bias)
        _same_device("bias", bias, q.device)
        if bias.dtype == torch.bool:
            bias_is_mask = True
        elif bias.dtype not in (q.dtype, torch.float32) and not (
                q.dtype == torch.float64 and bias.is_floating_point()):  # float64: the oracle
            raise TypeError(f"bias must be bool, float32 or q's dtype {q.dtype}, got {bias.dtype}")
        full = (B, Hq, Nq, Nk)
        if bias.dim() > 4:
            raise ValueError(f"bias must be broadcastable to [B, Hq, Nq, Nk] = {list(full)}, "
                             f"got shape {tuple(bias.shape)}")
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)) if bias.dim() < 4 else bias
        batch_ok = bias.shape[0] >= 1 and B % bias.shape[0] == 0
        if not batch_ok or any(s not in (1, f) for s, f in zip(bias.shape[1:], full[1:])):
            raise ValueError(f"bias must be broadcastable to [B, Hq, Nq, Nk] = {list(full)} (its batch "
                             f"size may also divide B: batch b reads bias[b % nB]), got shape "
                             f"{tuple(bias.shape)}")

    if rel_emb is not None:
        if not isinstance(rel_emb, RelativeEmbeddings):
            raise TypeError(f"rel_emb must be a posattn.RelativeEmbeddings, got {type(rel_emb).__name__}")
        for name in ("key", "value"):
            t = getattr(rel_emb, name)
            if t is None:
                continue
            _same_device(f"rel_emb.{name}", t, q.device)
            if t.shape[0] not in (1, Hq) or t.shape[2] != D:
                raise ValueError(f"rel_emb.{name} must have shape [1 or Hq={Hq}, 2K+1, D={D}], got "
                                 f"{tuple(t.shape)}")
        for name in ("content_bias", "position_bias"):
            t = getattr(rel_emb, name)
            if t is None:
                continue
            _same_device(f"rel_emb.{name}", t, q.device)
            if tuple(t.shape) != (Hq, D):
                raise ValueError(f"rel_emb.{name} must have shape [Hq, D] = [{Hq}, {D}], got {tuple(t.shape)}")

    return Problem(q, k, v, B, Hq, Hkv, Nq, Nk, D, causal, float(scale), wl, wr, q_pos, k_pos,
                   rope, rotary_dim, alibi_slopes, rel_bias, bias, bias_is_mask, return_lse, rel_emb)
