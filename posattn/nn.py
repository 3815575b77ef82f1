"""``torch.nn`` modules around :func:`posattn.attention`: they own the parameters.

Two kinds of positional modules:

- **Attention-side** encodings (:class:`RotaryEmbedding`, :class:`ALiBi`,
  :class:`T5RelativeBias`, :class:`SwinRelativeBias`,
  :class:`ShawRelativeEmbeddings`, :class:`TransformerXLRelativeEmbeddings`).
  Calling one (``module()``) returns the object that :func:`posattn.attention`
  takes (``posattn.RoPE``, a slopes tensor, ``posattn.DistanceBias``,
  ``posattn.GridBias``, ``posattn.RelativeEmbeddings``), built from the
  module's parameters in that call so that gradients reach them; its class
  attribute ``attention_keyword`` names the keyword it goes to. Give one to
  :class:`MultiheadAttention` as ``positional=``.
- **Absolute** encodings (:class:`SinusoidalPositionalEncoding`,
  :class:`LearnedPositionalEncoding`), added to the token embeddings
  (``x + PE[positions]``) before the first layer; they never enter the kernel.

See docs/SPEC.md for what each encoding computes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import encodings as _enc
from .encodings import SoftCap
from .interface import attention as _attention

__all__ = [
    "RotaryEmbedding", "ALiBi", "KERPLE", "T5RelativeBias", "SwinRelativeBias", "ShawRelativeEmbeddings",
    "TransformerXLRelativeEmbeddings", "SinusoidalPositionalEncoding", "LearnedPositionalEncoding",
    "MultiheadAttention", "sinusoidal_encoding",
]


def _pos_int(name, value, owner, minimum=1):
    if not _enc.is_int(value) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class _AttentionEncoding(nn.Module):
    """Base of the encodings that :class:`MultiheadAttention` passes to the kernel."""

    attention_keyword: str = ""
    num_heads: Optional[int] = None   # None: any head count (RoPE)


# --------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------

class RotaryEmbedding(_AttentionEncoding):
    """Rotary position embedding (Su et al. 2021, RoFormer; GPT-NeoX, LLaMA).

    ``dim``: the number of rotated channels ``R`` of each head (even, ``R <= D``;
    ``R < D`` is partial rotary). ``inv_freq[i] = base ** (-2i / R)``,
    ``i = 0 .. R/2-1``, kept as a float32 buffer ``[R/2]`` (not trained; it stays
    float32 when the module is cast to another dtype). ``interleaved`` pairs
    ``(x[2i], x[2i+1])`` (GPT-J / RoFormer) instead of ``(x[i], x[i + R/2])``
    (GPT-NeoX / LLaMA). ``scaling``, for context extension, is None or a dict:

    - ``{"type": "linear", "factor": f}``: position interpolation (Chen et al.
      2023), ``inv_freq / f``;
    - ``{"type": "ntk", "factor": f}``: NTK-aware scaling, ``base * f ** (R / (R - 2))``;
    - ``{"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
      "original_max_position_embeddings": 8192}``: Llama 3.1's frequency bands;
    - ``{"type": "yarn", "factor": f, "original_max_position_embeddings": L,
      "beta_fast": 32, "beta_slow": 1}`` (Peng et al. 2023; Hugging Face's key names and
      defaults, plus optional ``attention_factor``, ``mscale``, ``mscale_all_dim``,
      ``truncate=True``): pairs that turn fewer than ``beta_slow`` times over ``L``
      positions are interpolated (``inv_freq / f``), those that turn more than
      ``beta_fast`` times are kept, with a linear ramp between; the attention factor
      is ``0.1 ln f + 1`` unless given (or the ratio of the two ``mscale`` terms).

    ``attention_factor`` multiplies cos and sin (scores by its square); YaRN sets it.
    ``module()`` returns a :class:`posattn.RoPE` (keyword ``rope=``); q and k are
    rotated at their positions inside the kernel.
    """

    attention_keyword = "rope"

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, scaling: Optional[dict] = None,
                 attention_factor: float = 1.0, device=None):
        super().__init__()
        if not _enc.is_int(dim) or dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even int, got {dim!r}")
        dim = int(dim)
        if not _enc.is_real(base) or not base > 0:
            raise ValueError(f"RotaryEmbedding: base must be a positive number, got {base!r}")
        if scaling is not None:
            if not isinstance(scaling, dict) or scaling.get("type") not in ("linear", "ntk", "llama3", "yarn"):
                raise ValueError(f"RotaryEmbedding: scaling must be None or a dict with type 'linear', 'ntk', "
                                 f"'llama3' or 'yarn', got {scaling!r}")
            factor = scaling.get("factor")
            if not _enc.is_real(factor) or not factor > 0:
                raise ValueError(f"RotaryEmbedding: scaling['factor'] must be a positive number, got {factor!r}")
            scaling = dict(scaling)
            if scaling["type"] == "yarn":
                attention_factor = self._yarn_attention_factor(scaling, attention_factor)
        self.dim = dim
        self.base = float(base)
        self.interleaved = bool(interleaved)
        self.scaling = scaling
        self.attention_factor = float(attention_factor)
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)

    def _compute_inv_freq(self, device=None) -> torch.Tensor:
        r, base, s = self.dim, self.base, self.scaling
        if s is not None and s["type"] == "ntk":
            base = base * s["factor"] ** (r / (r - 2)) if r > 2 else base
        inv = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
        if s is not None and s["type"] == "linear":
            inv = inv / s["factor"]
        elif s is not None and s["type"] == "yarn":
            inv = self._yarn_inv_freq(inv, s, r, base)
        elif s is not None and s["type"] == "llama3":
            factor = s["factor"]
            low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
            old_len = s.get("original_max_position_embeddings", 8192)
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = torch.where(medium, smoothed, scaled)
        return inv.to(device=device, dtype=torch.float32)

    @staticmethod
    def _yarn_attention_factor(s, given):
        f = s["factor"]
        old = s.get("original_max_position_embeddings")
        if not _enc.is_int(old) or old <= 0:
            raise ValueError(f"RotaryEmbedding: yarn scaling needs original_max_position_embeddings, a positive "
                             f"int, got {old!r}")
        if given != 1.0:
            raise ValueError("RotaryEmbedding: with yarn scaling the attention factor comes from the scaling dict "
                             "(its 'attention_factor', or mscale / mscale_all_dim); leave attention_factor=1.0")
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])

        def m(scale, k=1.0):   # YaRN's mscale: 0.1 k ln(scale) + 1, for scale > 1
            return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0
        if s.get("mscale") and s.get("mscale_all_dim"):
            return m(f, s["mscale"]) / m(f, s["mscale_all_dim"])
        return m(f)

    @staticmethod
    def _yarn_inv_freq(inv, s, r, base):
        """YaRN's blend of interpolated (inv / f) and original frequencies: pair i keeps its
        frequency when it turns more than beta_fast times over the original length L,
        is interpolated below beta_slow turns, linearly in i between (in float32, as
        Hugging Face computes it)."""
        f, old = s["factor"], s["original_max_position_embeddings"]
        fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def pair_turning(turns):   # the (fractional) pair index whose frequency turns `turns` times over L
            return r * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = pair_turning(fast), pair_turning(slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, r - 1)
        if lo == hi:
            hi += 0.001
        theta = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
        keep = 1 - ((torch.arange(r // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        return (theta / f * (1 - keep) + theta * keep).to(inv.dtype)

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype) / .half() would round the frequencies: recompute them in float32
        # on whatever device the buffer went to.
        out = super()._apply(fn, *args, **kwargs)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = self._compute_inv_freq(self.inv_freq.device)
        return out

    def forward(self) -> _enc.RoPE:
        return _enc.RoPE(self.inv_freq, interleaved=self.interleaved, attention_factor=self.attention_factor)

    def extra_repr(self):
        s = f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}"
        if self.scaling is not None:
            s += f", scaling={self.scaling}"
        if self.attention_factor != 1.0:
            s += f", attention_factor={self.attention_factor}"
        return s


# --------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------

class ALiBi(_AttentionEncoding):
    """Attention with linear biases (Press et al. 2022, "Train Short, Test Long"; BLOOM, MPT).

    Adds ``-slope[h] * |k_pos - q_pos|`` to the scores. ``slopes``: ``[num_heads]``,
    the standard geometric list (:func:`posattn.alibi_slopes`); a buffer, or a
    trained parameter with ``learnable=True`` (the kernel returns its gradient).
    ``module()`` returns the slopes (keyword ``alibi_slopes=``).
    """

    attention_keyword = "alibi_slopes"

    def __init__(self, num_heads: int, learnable: bool = False, device=None, dtype=None):
        super().__init__()
        self.num_heads = _pos_int("num_heads", num_heads, "ALiBi")
        self.learnable = bool(learnable)
        slopes = _enc.alibi_slopes(num_heads, device=device, dtype=dtype or torch.float32)
        if self.learnable:
            self.slopes = nn.Parameter(slopes)
        else:
            self.register_buffer("slopes", slopes)

    def forward(self) -> torch.Tensor:
        return self.slopes

    def extra_repr(self):
        return f"num_heads={self.num_heads}, learnable={self.learnable}"


class KERPLE(_AttentionEncoding):
    """KERPLE, logarithmic variant (Chi et al. 2022, "KERPLE: Kernelized Relative
    Positional Embedding for Length Extrapolation").

    Adds ``-r1[h] * log(1 + r2[h] * |k_pos - q_pos|)`` to the scores. ``r1``, ``r2``:
    ``[num_heads]`` parameters (initialised to ``r1_init``, ``r2_init``); the kernel
    returns their gradients. They must stay positive: ``module()`` hands the kernel
    ``clamp(r, min=eps)`` (the gradient passes above ``eps``), as the paper's code
    clamps its parameters. Returns a :class:`posattn.KERPLE` (keyword ``kerple=``).
    """

    attention_keyword = "kerple"

    def __init__(self, num_heads: int, r1_init: float = 1.0, r2_init: float = 1.0, eps: float = 1e-2,
                 device=None, dtype=None):
        super().__init__()
        self.num_heads = _pos_int("num_heads", num_heads, "KERPLE")
        for name, x in (("r1_init", r1_init), ("r2_init", r2_init), ("eps", eps)):
            if not _enc.is_real(x) or not x > 0:
                raise ValueError(f"KERPLE: {name} must be a positive number, got {x!r}")
        self.eps = float(eps)
        fk = dict(device=device, dtype=dtype or torch.float32)
        self.r1 = nn.Parameter(torch.full((num_heads,), float(r1_init), **fk))
        self.r2 = nn.Parameter(torch.full((num_heads,), float(r2_init), **fk))

    def forward(self) -> _enc.KERPLE:
        return _enc.KERPLE(self.r1.clamp(min=self.eps), self.r2.clamp(min=self.eps))

    def extra_repr(self):
        return f"num_heads={self.num_heads}, eps={self.eps}"


# --------------------------------------------------------------------------
# Relative bias tables
# --------------------------------------------------------------------------

class T5RelativeBias(_AttentionEncoding):
    """T5's bucketed relative position bias (Raffel et al. 2020, section 2.1).

    ``relative_attention_bias``: ``nn.Embedding(num_buckets, num_heads)``, weight
    ``[num_buckets, H]``, the layout of HF ``T5Attention.relative_attention_bias``
    (so a T5 checkpoint's weight loads as is), initialised ``N(0, 0.02^2)``. The
    bias of a pair is ``weight[bucket(k_pos - q_pos), h]`` with HF's
    ``_relative_position_bucket`` (log-spaced buckets up to ``max_distance``;
    ``bidirectional=False`` for decoders). ``module()`` builds
    ``posattn.DistanceBias.t5(weight, ...)`` (a ``[H, 2 * max_distance + 1]``
    table, keyword ``rel_bias=``) in each call, so the gradient reaches the
    weight. T5 itself uses no score scaling: give ``MultiheadAttention(scale=1.0)``
    to match it.
    """

    attention_keyword = "rel_bias"

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.num_heads = _pos_int("num_heads", num_heads, "T5RelativeBias")
        self.num_buckets = _pos_int("num_buckets", num_buckets, "T5RelativeBias", 4)
        self.max_distance = _pos_int("max_distance", max_distance, "T5RelativeBias")
        self.bidirectional = bool(bidirectional)
        max_exact = num_buckets // 4 if bidirectional else num_buckets // 2
        if max_distance <= max_exact:
            raise ValueError(f"T5RelativeBias: max_distance must exceed the exact-bucket range {max_exact}, "
                             f"got {max_distance}")
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads, device=device, dtype=dtype)
        nn.init.normal_(self.relative_attention_bias.weight, std=0.02)

    def forward(self) -> _enc.DistanceBias:
        return _enc.DistanceBias.t5(self.relative_attention_bias.weight, num_buckets=self.num_buckets,
                                    max_distance=self.max_distance, bidirectional=self.bidirectional)

    def extra_repr(self):
        return (f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")


class SwinRelativeBias(_AttentionEncoding):
    """Swin Transformer's 2-D relative position bias (Liu et al. 2021; also BEiT).

    ``relative_position_bias_table``: ``[(2Wh-1)(2Ww-1), H]``, truncated-normal
    initialised with std 0.02 as in Swin. Token ``p`` of a ``Wh x Ww`` window sits
    at ``(p // Ww, p % Ww)``; the pair reads Swin's ``relative_position_index``.
    ``module()`` returns a :class:`posattn.GridBias` (keyword ``rel_bias=``). The
    attention needs ``Nq <= Nk <= Wh * Ww``: one window per batch row (pass
    windows as the batch, shifted-window masks as ``attn_mask``).
    """

    attention_keyword = "rel_bias"

    def __init__(self, window, num_heads: int, device=None, dtype=None):
        super().__init__()
        if not isinstance(window, (tuple, list)) or len(window) != 2 or not all(
                _enc.is_int(w) and w >= 1 for w in window):
            raise ValueError(f"SwinRelativeBias: window must be a pair of ints >= 1 (Wh, Ww), got {window!r}")
        self.window = (int(window[0]), int(window[1]))
        self.num_heads = _pos_int("num_heads", num_heads, "SwinRelativeBias")
        wh, ww = self.window
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * wh - 1) * (2 * ww - 1), num_heads, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self) -> _enc.GridBias:
        return _enc.GridBias(self.relative_position_bias_table, self.window)

    def extra_repr(self):
        return f"window={self.window}, num_heads={self.num_heads}"


# --------------------------------------------------------------------------
# Relative embeddings
# --------------------------------------------------------------------------

class ShawRelativeEmbeddings(_AttentionEncoding):
    """Relative position representations (Shaw, Uszkoreit and Vaswani 2018).

    With ``c = clamp(k_pos - q_pos, -clip, clip) + clip``: scores
    ``scale * q_i . (k_j + aK[c])`` and outputs ``sum_j p_ij (v_j + aV[c])``.
    ``key`` (aK) and ``value`` (aV, with ``value=True``): ``[H, 2*clip+1, head_dim]``,
    or ``[1, 2*clip+1, head_dim]`` with ``shared_heads=True`` (the paper shares
    them across heads), Xavier-uniform initialised. ``module()`` returns a
    :class:`posattn.RelativeEmbeddings` (keyword ``rel_emb=``).
    """

    attention_keyword = "rel_emb"

    def __init__(self, num_heads: int, head_dim: int, clip: int, value: bool = True, shared_heads: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.num_heads = _pos_int("num_heads", num_heads, "ShawRelativeEmbeddings")
        self.head_dim = _pos_int("head_dim", head_dim, "ShawRelativeEmbeddings")
        self.clip = _pos_int("clip", clip, "ShawRelativeEmbeddings", 0)
        self.shared_heads = bool(shared_heads)
        shape = (1 if shared_heads else num_heads, 2 * clip + 1, head_dim)
        self.key = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.value = nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) if value else None
        for t in (self.key, self.value):
            if t is not None:
                nn.init.xavier_uniform_(t.view(-1, head_dim))

    def forward(self) -> _enc.RelativeEmbeddings:
        return _enc.RelativeEmbeddings(key=self.key, value=self.value, clip=self.clip)

    def extra_repr(self):
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, clip={self.clip}, "
                f"value={self.value is not None}, shared_heads={self.shared_heads}")


class TransformerXLRelativeEmbeddings(_AttentionEncoding):
    """Transformer-XL's relative attention (Dai et al. 2019, section 3.3).

    Scores ``scale * ((q_i + u) . k_j + (q_i + w) . W_R R_{i-j})`` where ``R`` is
    the sinusoid of the distance (``[sin(d f), cos(d f)]``, ``d_model`` wide)
    clipped to ``[-clip, clip]`` (``clip >= Nk - 1`` is the paper's unclipped
    form). ``r_net``: ``nn.Linear(d_model, num_heads * head_dim, bias=False)``
    (``W_R``); ``u``, ``w``: ``[num_heads, head_dim]`` (zero-initialised).
    ``module()`` returns ``posattn.RelativeEmbeddings.transformer_xl(...)``
    (keyword ``rel_emb=``), built in each call (O(clip * D) memory).
    """

    attention_keyword = "rel_emb"

    def __init__(self, d_model: int, num_heads: int, head_dim: int, clip: int, device=None, dtype=None):
        super().__init__()
        self.d_model = _pos_int("d_model", d_model, "TransformerXLRelativeEmbeddings")
        if d_model % 2:
            raise ValueError(f"TransformerXLRelativeEmbeddings: d_model must be even, got {d_model}")
        self.num_heads = _pos_int("num_heads", num_heads, "TransformerXLRelativeEmbeddings")
        self.head_dim = _pos_int("head_dim", head_dim, "TransformerXLRelativeEmbeddings")
        self.clip = _pos_int("clip", clip, "TransformerXLRelativeEmbeddings", 0)
        self.r_net = nn.Linear(d_model, num_heads * head_dim, bias=False, device=device, dtype=dtype)
        self.u = nn.Parameter(torch.zeros(num_heads, head_dim, device=device, dtype=dtype))
        self.w = nn.Parameter(torch.zeros(num_heads, head_dim, device=device, dtype=dtype))

    def forward(self) -> _enc.RelativeEmbeddings:
        return _enc.RelativeEmbeddings.transformer_xl(self.r_net.weight, self.u, self.w, self.clip)

    def extra_repr(self):
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"clip={self.clip}")


# --------------------------------------------------------------------------
# Absolute encodings
# --------------------------------------------------------------------------

def sinusoidal_encoding(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """Vaswani et al.'s table for integer ``positions [...]``: ``[..., d_model]`` float64,
    ``PE[p, 2i] = sin(p / 10000 ** (2i / d))``, ``PE[p, 2i+1] = cos(p / 10000 ** (2i / d))``."""
    i2 = torch.arange(0, d_model, 2, dtype=torch.float64, device=positions.device)
    angle = positions.to(torch.float64)[..., None] / 10000.0 ** (i2 / d_model)
    pe = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)   # sin, cos interleaved
    return pe[..., :d_model]


class _AbsoluteEncoding(nn.Module):
    """``forward(x, positions=None)``: ``x [B, N, d_model]`` (or ``[N, d_model]``) plus
    the encoding of ``positions`` (``[N]`` or ``[B, N]`` ints, default ``0 .. N-1``)."""

    max_len: Optional[int] = None

    def _positions(self, x, positions):
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__}: x must be [B, N, {self.d_model}] or [N, {self.d_model}] "
                             f"(batch first), got {tuple(x.shape)}")
        n = x.shape[-2]
        if positions is None:
            if self.max_len is not None and n > self.max_len:
                raise ValueError(f"{type(self).__name__}: sequence of length {n} has positions up to {n - 1}, "
                                 f"past max_len={self.max_len} (there is no encoding for position >= "
                                 f"{self.max_len}; use a longer max_len or a relative encoding)")
            return torch.arange(n, device=x.device)
        if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{type(self).__name__}: positions must be an int32/int64 tensor")
        if positions.shape[-1] != n or positions.dim() > 2:
            raise ValueError(f"{type(self).__name__}: positions must be [N] or [B, N] with N={n}, "
                             f"got {tuple(positions.shape)}")
        if self.max_len is not None and positions.numel():   # (a learned table must not wrap around)
            lo, hi = int(positions.min()), int(positions.max())
            if lo < 0:
                raise ValueError(f"{type(self).__name__}: positions must be >= 0, got {lo}")
            if self.max_len is not None and hi >= self.max_len:
                raise ValueError(f"{type(self).__name__}: position {hi} is past max_len={self.max_len} "
                                 f"(there is no encoding for position >= {self.max_len}; use a longer "
                                 f"max_len or a relative encoding)")
        return positions

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x + self.encode(self._positions(x, positions)).to(x.dtype)


class SinusoidalPositionalEncoding(_AbsoluteEncoding):
    """Fixed sinusoidal absolute encoding (Vaswani et al. 2017, section 3.5).

    ``PE[p, 2i] = sin(p / 10000 ** (2i / d_model))``,
    ``PE[p, 2i+1] = cos(p / 10000 ** (2i / d_model))``, added to the token
    embeddings: ``forward(x [B, N, d_model], positions=None) -> x + PE[positions]``.
    With ``max_len=None`` the rows are computed for any position; with an int the
    table ``[max_len, d_model]`` is a (non-persistent) buffer and positions past it
    are an error. ``encode(positions)`` returns the rows (float32).
    """

    def __init__(self, d_model: int, max_len: Optional[int] = None, device=None):
        super().__init__()
        self.d_model = _pos_int("d_model", d_model, "SinusoidalPositionalEncoding")
        self.max_len = None if max_len is None else _pos_int("max_len", max_len, "SinusoidalPositionalEncoding")
        if max_len is not None:
            table = sinusoidal_encoding(torch.arange(max_len, device=device), d_model).to(torch.float32)
        else:
            table = None
        self.register_buffer("pe", table, persistent=False)

    def encode(self, positions: torch.Tensor) -> torch.Tensor:
        if self.pe is not None:
            return self.pe[positions]
        return sinusoidal_encoding(positions, self.d_model).to(torch.float32)

    def extra_repr(self):
        return f"d_model={self.d_model}, max_len={self.max_len}"


class LearnedPositionalEncoding(_AbsoluteEncoding):
    """Learned absolute position embeddings (BERT, GPT-2; Gehring et al. 2017).

    ``weight``: ``[max_len, d_model]`` parameter, ``N(0, 0.02^2)`` as in GPT-2.
    ``forward(x [B, N, d_model], positions=None) -> x + weight[positions]``. A
    position ``>= max_len`` has no row: it raises ``ValueError`` saying so.
    """

    def __init__(self, max_len: int, d_model: int, device=None, dtype=None):
        super().__init__()
        self.max_len = _pos_int("max_len", max_len, "LearnedPositionalEncoding")
        self.d_model = _pos_int("d_model", d_model, "LearnedPositionalEncoding")
        self.weight = nn.Parameter(torch.empty(max_len, d_model, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)

    def encode(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]

    def extra_repr(self):
        return f"max_len={self.max_len}, d_model={self.d_model}"


# --------------------------------------------------------------------------
# Multi-head attention
# --------------------------------------------------------------------------

class MultiheadAttention(nn.Module):
    """Multi-head attention whose core is the fused :func:`posattn.attention`.

    ``embed_dim = E``, ``num_heads = H`` query heads of size ``D = E // H``,
    ``num_kv_heads`` key/value heads (GQA/MQA, Ainslie et al. 2023; default ``H``).
    Parameters: ``q_proj`` ``Linear(E, H*D)``, ``k_proj`` / ``v_proj``
    ``Linear(E, Hkv*D)``, ``out_proj`` ``Linear(H*D, E)`` (biases with ``bias=True``),
    initialised as ``torch.nn.MultiheadAttention`` (Xavier-uniform projections, zero
    biases), plus the ``positional`` module's parameters: one of
    :class:`RotaryEmbedding`, :class:`ALiBi`, :class:`T5RelativeBias`,
    :class:`SwinRelativeBias`, :class:`ShawRelativeEmbeddings`,
    :class:`TransformerXLRelativeEmbeddings` or None (absolute encodings belong on
    the token embeddings, not here). The same positional module may be shared by
    several layers.

    ``forward(query, key=None, value=None, *, attn_mask=None, need_weights=False,
    q_pos=None, k_pos=None, key_padding_mask=None) -> (out, None)``:

    - ``query [B, Nq, E]``, ``key`` / ``value [B, Nk, E]`` with ``batch_first=True``
      (``[N, B, E]`` otherwise; ``[N, E]`` unbatched); ``key`` defaults to
      ``query`` (self-attention) and ``value`` to ``key``. ``out`` has the
      layout of ``query``.
    - ``attn_mask``: a float bias added to the scaled scores, or a **bool
      keep-mask where True = attend**. That is the opposite of
      ``torch.nn.MultiheadAttention``, whose bool ``attn_mask`` is True where
      attention is *not* allowed: pass ``~torch_mask``. Shapes: broadcastable to
      ``[B, H, Nq, Nk]``, or torch's ``[B*H, Nq, Nk]``. A query row with no key
      left gives zeros (torch gives NaN).
    - ``key_padding_mask``: ``[B, Nk]``, as in ``torch.nn.MultiheadAttention``: bool
      **True = padding** (that key is ignored), or float (added to every row).
      Combined with ``attn_mask`` (a float mask then; a bool and a float mask add
      as ``-inf`` / the float values).
    - ``q_pos`` / ``k_pos``: token positions (``[N]`` or ``[B, N]`` ints) used by
      causality and the positional encoding; default ``k_pos = 0..Nk-1`` and
      ``q_pos`` bottom-right aligned (see :func:`posattn.attention`).
    - The second result is always None: the fused kernels never form the
      attention weights, so ``need_weights=True`` raises ``ValueError``.
    - ``dropout``: attention dropout probability, applied in training mode only
      (as torch's): :func:`posattn.attention`'s ``dropout_p``.
    - ``softcap``: Gemma 2's logit cap (:func:`posattn.attention`'s ``softcap``);
      ``sinks=True``: a learned sink logit per head (``self.sinks`` ``[num_heads]``,
      zeros at init; gpt-oss's), :func:`posattn.attention`'s ``sinks``.

    ``causal``, ``window=(left, right)`` and ``scale`` (default ``1/sqrt(D)``) are
    fixed per module; ``backend`` is passed to :func:`posattn.attention` (None:
    automatic).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None, bias: bool = True,
                 positional: Optional[nn.Module] = None, causal: bool = False, window=None,
                 scale: Optional[float] = None, batch_first: bool = True, dropout: float = 0.0,
                 softcap: Optional[float] = None, sinks: bool = False,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        _pos_int("embed_dim", embed_dim, "MultiheadAttention")
        _pos_int("num_heads", num_heads, "MultiheadAttention")
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _pos_int("num_kv_heads", num_kv_heads, "MultiheadAttention")
        if num_heads % num_kv_heads:
            raise ValueError(f"MultiheadAttention: num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadAttention: dropout must be a float in [0, 1), got {dropout!r}")
        if positional is not None:
            if isinstance(positional, _AbsoluteEncoding):
                raise TypeError(f"MultiheadAttention: {type(positional).__name__} is an absolute encoding: add "
                                f"it to the token embeddings (x = pe(x)), not to the attention")
            if not isinstance(positional, _AttentionEncoding):
                raise TypeError(f"MultiheadAttention: positional must be a posattn.nn encoding module "
                                f"(RotaryEmbedding, ALiBi, KERPLE, T5RelativeBias, SwinRelativeBias, "
                                f"ShawRelativeEmbeddings, TransformerXLRelativeEmbeddings) or None, got "
                                f"{type(positional).__name__}")
            if positional.num_heads is not None and positional.num_heads != num_heads:
                raise ValueError(f"MultiheadAttention: {type(positional).__name__} has {positional.num_heads} "
                                 f"heads but the attention has num_heads={num_heads}")
            hd = getattr(positional, "head_dim", None)
            if hd is not None and hd != embed_dim // num_heads:
                raise ValueError(f"MultiheadAttention: {type(positional).__name__} has head_dim={hd} but "
                                 f"embed_dim // num_heads = {embed_dim // num_heads}")
            if isinstance(positional, RotaryEmbedding) and positional.dim > embed_dim // num_heads:
                raise ValueError(f"MultiheadAttention: RotaryEmbedding dim={positional.dim} > head dim "
                                 f"{embed_dim // num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal = bool(causal)
        self.window = None if window is None else tuple(window)
        self.scale = scale
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        if softcap is not None:
            SoftCap(softcap)   # checks it (a float > 0)
        self.softcap = None if softcap is None else float(softcap)
        self.backend = backend
        fk = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.positional = positional
        # gpt-oss's learned sink logit per head (zeros at init: each row's softmax then
        # has one extra unit of mass that its values never see)
        self.sinks = nn.Parameter(torch.zeros(num_heads, **fk)) if sinks else None
        self._reset_parameters()

    def _reset_parameters(self):
        # torch.nn.MultiheadAttention: xavier_uniform_ over the packed [3E, E] in_proj
        # weight, zero biases. The bound of the packed matrix is sqrt(6 / (E + 3E)).
        bound = math.sqrt(6.0 / (self.embed_dim + self.embed_dim + 2 * self.num_kv_heads * self.head_dim))
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(lin.weight, -bound, bound)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def _mask(self, attn_mask, B, Nq, Nk, dtype):
        if attn_mask is None:
            return None
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"MultiheadAttention: attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dim() == 3 and attn_mask.shape[0] == B * self.num_heads and B * self.num_heads > 1:
            attn_mask = attn_mask.view(B, self.num_heads, *attn_mask.shape[1:])   # torch's [B*H, Nq, Nk]
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (dtype, torch.float32):
            if not attn_mask.is_floating_point():
                raise TypeError(f"MultiheadAttention: attn_mask must be bool (True = attend) or float, "
                                f"got {attn_mask.dtype}")
            attn_mask = attn_mask.to(dtype)
        return attn_mask

    @staticmethod
    def _with_padding(bias, key_padding_mask, B, Nk, dtype):
        """Fold torch's key_padding_mask ([B, Nk]; bool True = padding, ignored; float:
        added) into the keep-mask / bias passed to the kernel as [B, 1, 1, Nk]."""
        if key_padding_mask is None:
            return bias
        kpm = key_padding_mask
        if not isinstance(kpm, torch.Tensor):
            raise TypeError(f"MultiheadAttention: key_padding_mask must be a tensor, got {type(kpm).__name__}")
        if kpm.dim() == 1 and B == 1:
            kpm = kpm[None]
        if tuple(kpm.shape) != (B, Nk):
            raise ValueError(f"MultiheadAttention: key_padding_mask must have shape [B, Nk] = [{B}, {Nk}], got "
                             f"{tuple(kpm.shape)}")
        if kpm.dtype != torch.bool and not kpm.is_floating_point():
            raise TypeError(f"MultiheadAttention: key_padding_mask must be bool (True = padding) or float, got "
                            f"{kpm.dtype}")
        kpm = kpm[:, None, None, :]
        if kpm.dtype == torch.bool and (bias is None or bias.dtype == torch.bool):
            return ~kpm if bias is None else bias & ~kpm
        pad = torch.zeros(kpm.shape, dtype=torch.float32, device=kpm.device).masked_fill(kpm, float("-inf")) \
            if kpm.dtype == torch.bool else kpm.to(torch.float32)
        if bias is None:
            return pad
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill(~bias, float("-inf"))
        return bias.to(torch.float32) + pad

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                *, attn_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None):
        if need_weights:
            raise ValueError("MultiheadAttention: need_weights=True is not supported: the fused kernels never "
                             "form the attention weights (use posattn.reference.attention to inspect them)")
        key = query if key is None else key
        value = key if value is None else value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)   # [N, 1, E]
            batch_first = False
        else:
            batch_first = self.batch_first
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3 or x.shape[-1] != self.embed_dim:
                raise ValueError(f"MultiheadAttention: {name} must be [B, N, {self.embed_dim}] "
                                 f"(batch_first={self.batch_first}) or [N, {self.embed_dim}], got {tuple(x.shape)}")
        if not batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f"MultiheadAttention: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                             f"{tuple(value.shape)} do not agree (same batch; key and value same length)")
        B, Nq, _ = query.shape
        Nk = key.shape[1]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(query).view(B, Nq, H, D).transpose(1, 2)
        k = self.k_proj(key).view(B, Nk, Hkv, D).transpose(1, 2)
        v = self.v_proj(value).view(B, Nk, Hkv, D).transpose(1, 2)
        kwargs = {}
        if self.positional is not None:
            kwargs[self.positional.attention_keyword] = self.positional()
        bias = self._with_padding(self._mask(attn_mask, B, Nq, Nk, q.dtype), key_padding_mask, B, Nk, q.dtype)
        out = _attention(q, k, v, causal=self.causal, scale=self.scale, window=self.window, q_pos=q_pos,
                         k_pos=k_pos, bias=bias, backend=self.backend, softcap=self.softcap, sinks=self.sinks,
                         dropout_p=self.dropout if self.training else 0.0, **kwargs)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Nq, H * D))
        if not batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        return out, None

    def extra_repr(self):
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.num_kv_heads != self.num_heads:
            s += f", num_kv_heads={self.num_kv_heads}"
        s += f", head_dim={self.head_dim}, causal={self.causal}"
        if self.window is not None:
            s += f", window={self.window}"
        if self.scale is not None:
            s += f", scale={self.scale}"
        s += f", batch_first={self.batch_first}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.softcap is not None:
            s += f", softcap={self.softcap}"
        if self.sinks is not None:
            s += ", sinks=True"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s
