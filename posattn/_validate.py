"""The one place where posattn.attention's arguments are checked.

Every backend calls :func:`check` and receives a :class:`Problem`: normalised,
validated fields, so kernels and the reference never re-check anything.
"""
from __future__ import annotations

import math
import numbers
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import encodings as _encodings
from .encodings import Encoding, RelativeEmbeddings, RoPE, Shape, is_int
from .encodings.base import FLOAT_DTYPES, same_device

MAX_HEAD_DIM = 256
WINDOW_MAX = 2 ** 62
_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True, kw_only=True)
class Problem:
    """A validated call: shapes, masks, positions and the bound encodings (in the
    order of posattn.attention's keywords). Frozen: change it with ``replace``."""
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
    return_lse: bool
    encodings: Tuple[Encoding, ...] = ()
    dropout_p: float = 0.0
    dropout_rng: Optional[torch.Tensor] = None   # int64 [1]: the Philox seed (posattn._dropout.draw)
    # Packed sequences (posattn.attention_varlen): (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    # max_seqlen_k); q, k, v are then one batch [1, H, total, D] of the sequences' rows.
    varlen: Optional[tuple] = None

    @property
    def batches(self) -> int:
        """The kernels' grid axis 2: the batch, or the packed sequences."""
        return self.B if self.varlen is None else self.varlen[0].shape[0] - 1

    @property
    def rows_q(self) -> int:
        """Query rows per batch for the grid: Nq, or the longest packed sequence."""
        return self.Nq if self.varlen is None else self.varlen[2]

    @property
    def rows_k(self) -> int:
        return self.Nk if self.varlen is None else self.varlen[3]

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv

    def default_positions(self, device):
        """(q_pos, k_pos) as [1, N] int64 tensors, defaults filled in."""
        k_pos = self.k_pos if self.k_pos is not None else torch.arange(self.Nk, device=device)[None]
        q_pos = self.q_pos if self.q_pos is not None else \
            torch.arange(self.Nk - self.Nq, self.Nk, device=device)[None]
        return q_pos, k_pos

    def get(self, keyword: str) -> Optional[Encoding]:
        """The bound encoding given by ``keyword`` (e.g. "rope"), or None."""
        for e in self.encodings:
            if e.keyword == keyword:
                return e
        return None

    def replace(self, **fields) -> "Problem":
        return dataclasses.replace(self, **fields)

    def with_tensors(self, q, k, v, params: dict) -> "Problem":
        """The same problem at other q, k, v and encoding tensors: ``params`` maps
        ``(keyword, name)`` (as in :meth:`params`) to a tensor; absent keeps the current."""
        encs = tuple(e.replace(**{n: params[(e.keyword, n)] for n in e.tensors() if (e.keyword, n) in params})
                     for e in self.encodings)
        return dataclasses.replace(self, q=q, k=k, v=v, encodings=encs)

    def params(self):
        """The encodings' differentiable tensors: ``[((keyword, name), tensor)]`` in order."""
        return [((e.keyword, n), t) for e in self.encodings for n, t in e.tensors().items() if t is not None]

    # Shorthands for the backends (None when absent).
    @property
    def rope(self) -> Optional[RoPE]:
        return self.get("rope")

    @property
    def rotary_dim(self) -> int:
        return self.rope.rotary_dim(self.D) if self.rope is not None else 0

    @property
    def alibi(self) -> Optional[torch.Tensor]:        # [1 or B, Hq]
        e = self.get("alibi_slopes")
        return e.slopes if e is not None else None

    @property
    def rel_bias(self):                                 # DistanceBias or GridBias
        return self.get("rel_bias")

    @property
    def bias(self) -> Optional[torch.Tensor]:         # 4-D, each axis 1 or full (never expanded)
        e = self.get("bias")
        return e.bias_tensor if e is not None else None

    @property
    def bias_is_mask(self) -> bool:
        e = self.get("bias")
        return e is not None and e.is_mask

    @property
    def rel_emb(self) -> Optional[RelativeEmbeddings]:
        return self.get("rel_emb")


def _is_int(x):
    """A Python or NumPy integer, not a bool."""
    return is_int(x) and not isinstance(x, torch.Tensor)


def _is_bool(x):
    return isinstance(x, bool) or type(x).__name__ == "bool_"


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _index_tensor(name, pos, device):
    """An int32 / int64 tensor on q's device (positions of any layout)."""
    _tensor(name, pos)
    same_device(name, pos, device)
    if pos.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {pos.dtype}")
    return pos


def _positions(name, pos, B, N, device):
    if pos is None:
        return None
    _index_tensor(name, pos, device)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() != 2 or pos.shape[1] != N or pos.shape[0] not in (1, B):
        raise ValueError(f"{name} must have shape [{N}] or [{B}, {N}], got {tuple(pos.shape)}")
    return pos


def _rope_positions(rope_pos, rope, B, Nq, Nk, q_pos, k_pos, device):
    """rope_pos=(q_rope_pos, k_rope_pos) -> ([1 or B, A, Nq], [1 or B, A, Nk]) int64; a None
    side takes its 1-D positions (given or default) on every axis."""
    if rope is None:
        raise ValueError("rope_pos needs rope= (a posattn.RoPE): it holds RoPE's positions per axis")
    if not isinstance(rope_pos, (tuple, list)) or len(rope_pos) != 2:
        raise ValueError(f"rope_pos must be a pair (q_rope_pos, k_rope_pos), got {type(rope_pos).__name__}")
    A = rope.num_axes
    defaults = (q_pos if q_pos is not None else torch.arange(Nk - Nq, Nk, device=device)[None],
                k_pos if k_pos is not None else torch.arange(Nk, device=device)[None])
    out = []
    for name, pos, N, default in (("q_rope_pos", rope_pos[0], Nq, defaults[0]),
                                  ("k_rope_pos", rope_pos[1], Nk, defaults[1])):
        if pos is None:
            out.append(default.to(torch.int64)[:, None].expand(-1, A, N))
            continue
        _index_tensor(name, pos, device)
        if pos.dim() == 2:
            pos = pos[None]
        if pos.dim() != 3 or pos.shape[1:] != (A, N) or pos.shape[0] not in (1, B):
            raise ValueError(f"{name} must have shape [{A}, {N}] or [{B}, {A}, {N}] (A = {A} position axes: "
                             f"len(rope.sections)), got {tuple(pos.shape)}")
        out.append(pos.to(torch.int64))
    return tuple(out)


def check(q, k, v, *, causal=False, scale=None, window=None, q_pos=None, k_pos=None, rope=None,
          alibi_slopes=None, rel_bias=None, bias=None, return_lse=False, rel_emb=None, softcap=None,
          sinks=None, dropout_p=0.0, dropout_rng=None, rope_pos=None, **encodings) -> Problem:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
    if q.dtype not in FLOAT_DTYPES:  # float64: reference only
        raise TypeError(f"q must be float16, bfloat16 or float32 (float64: reference backend), got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}: q, k and v must share a dtype")
        same_device(name, x, q.device)
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

    if _is_bool(dropout_p) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__} {dropout_p!r}")
    dropout_p = float(dropout_p)
    # the kernels read it as float32, which rounds [1 - 2^-25, 1) up to 1.0
    if not 0.0 <= dropout_p < 1.0 - 2.0 ** -25:
        raise ValueError(f"dropout_p must be in [0, 1) (as float32 too), got {dropout_p!r}")
    if dropout_p > 0 and dropout_rng is not None:
        _tensor("dropout_rng", dropout_rng)
        if dropout_rng.dtype != torch.int64 or dropout_rng.shape != (1,):
            raise ValueError(f"dropout_rng must be an int64 tensor of shape [1], got {dropout_rng.dtype} "
                             f"{tuple(dropout_rng.shape)}")
        same_device("dropout_rng", dropout_rng, q.device)
    if dropout_p == 0:
        dropout_rng = None

    q_pos = _positions("q_pos", q_pos, B, Nq, q.device)
    k_pos = _positions("k_pos", k_pos, B, Nk, q.device)

    shape = Shape(B, Hq, Hkv, Nq, Nk, D, q.dtype, q.device, q_pos, k_pos)
    given = dict(rope=rope, alibi_slopes=alibi_slopes, rel_bias=rel_bias, bias=bias, rel_emb=rel_emb,
                 softcap=softcap, sinks=sinks, **encodings)
    unknown = set(given) - set(_encodings.keywords())
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}: the encodings are "
                        f"{list(_encodings.keywords())}")
    bound = tuple(_encodings.wrap(kw, given[kw]).bind(shape) for kw in _encodings.keywords()
                  if given.get(kw) is not None)
    if rope_pos is not None:   # RoPE's own positions per axis (multi-axis RoPE)
        rope_e = next((e for e in bound if e.keyword == "rope"), None)
        axis_pos = _rope_positions(rope_pos, rope_e, B, Nq, Nk, q_pos, k_pos, q.device)
        bound = tuple(e.bind_positions(*axis_pos) if e is rope_e else e for e in bound)

    return Problem(q=q, k=k, v=v, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, causal=causal, scale=float(scale),
                   window_left=wl, window_right=wr, q_pos=q_pos, k_pos=k_pos, return_lse=return_lse,
                   encodings=bound, dropout_p=dropout_p, dropout_rng=dropout_rng)
