"""What every encoding is: a user object, its checks, its reference terms and its
differentiable tensors (docs/ADDING_AN_ENCODING.md).

An encoding enters :func:`posattn.attention` through one keyword. ``bind`` checks
it against the problem's shapes once, at the boundary, and returns the object the
backends read (never re-checked). The reference (posattn/reference.py) is a loop
over the bound encodings calling the hooks below; a backend supports an encoding
only where it declares so (posattn/backends.py): anything undeclared is refused
with a reason naming it.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch

# float64: reference only; checked by posattn/_validate.py for q, reused here for tables
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_int(x) -> bool:
    """A Python or NumPy integer (or a 0-d integer tensor, as torch.jit.trace hands out
    sizes), not a bool: the numbers the API accepts wherever it takes an int."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def is_real(x) -> bool:
    """A Python or NumPy real number (ints included), not a bool."""
    return (isinstance(x, numbers.Real) and not isinstance(x, bool) and type(x).__name__ != "bool_") or is_int(x)


def readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read for a check: not while torch.compile traces,
    not for meta or fake tensors (opcheck, the operators' fake kernels)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        return True
    return not is_fake(t)


def same_device(name, x, device):
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}: all tensors must be on one device")


@dataclass(frozen=True)
class Shape:
    """What ``bind`` may check an encoding against."""
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    dtype: torch.dtype
    device: torch.device
    q_pos: Optional[torch.Tensor]      # [1 or B, Nq] or None (default alignment)
    k_pos: Optional[torch.Tensor]


class Encoding:
    """Base of every positional encoding. Subclasses set ``keyword`` (the argument of
    posattn.attention they come from) and override what applies."""

    keyword: ClassVar[str]

    def bind(self, shape: Shape) -> "Encoding":
        """Check against the problem; return the object the backends read."""
        return self

    # -- differentiable tensors: name -> tensor (None when absent), in a fixed order; the
    #    names are unique across encodings (the tests name gradients "d" + name)
    def tensors(self) -> Dict[str, Optional[torch.Tensor]]:
        return {}

    def replace(self, **tensors) -> "Encoding":
        """The same encoding with some of its tensors replaced (None keeps the current)."""
        return self

    # -- reference terms (docs/SPEC.md's order: rotate, logits, scale, cap, bias, mask, softmax with sinks, value)
    def rotate(self, x: torch.Tensor, pos: torch.Tensor, head_dim: int, dt: torch.dtype,
               keys: bool = False) -> torch.Tensor:
        """q (``keys=False``) or k ``[B, H, N, D]`` at positions ``pos`` ``[1 or B, N]`` -> transformed."""
        return x

    def content_query(self, ctx: "ReferenceTerms", q: torch.Tensor) -> torch.Tensor:
        """The query that multiplies the keys (Transformer-XL adds its u)."""
        return q

    def add_logits(self, ctx: "ReferenceTerms") -> None:
        """Add to ``ctx.logits`` (before scaling) terms that are products with q."""

    def cap_scores(self, ctx: "ReferenceTerms", scores: torch.Tensor) -> torch.Tensor:
        """The scaled logits, transformed before any bias is added (soft-capping)."""
        return scores

    def score_bias(self, ctx: "ReferenceTerms") -> Optional[torch.Tensor]:
        """An additive score term (after scaling), broadcastable to [B, Hq, Nq, Nk]."""
        return None

    def keep_mask(self, ctx: "ReferenceTerms") -> Optional[torch.Tensor]:
        """A bool keep-mask broadcastable to [B, Hq, Nq, Nk]."""
        return None

    def sink_logits(self, ctx: "ReferenceTerms") -> Optional[torch.Tensor]:
        """Logits broadcastable to [B, Hq, Nq, 1] that join the softmax's denominator only."""
        return None

    def value_term(self, ctx: "ReferenceTerms", probs: torch.Tensor) -> Optional[torch.Tensor]:
        """An additive output term from the probabilities ``[B, Hq, Nq, Nk]``."""
        return None


class ReferenceTerms:
    """What the reference hands every encoding's hooks: the problem, the compute
    dtype, the relative positions and the (rotated, GQA-expanded) q, k, v."""

    def __init__(self, p, dt, rel, q, k, v):
        self.p, self.dt, self.rel, self.q, self.k, self.v = p, dt, rel, q, k, v
        self.logits = None     # [B, Hq, Nq, Nk] before scaling, set by the reference


# keyword -> how the user's value becomes an Encoding, in posattn.attention's order
_KEYWORDS: Dict[str, object] = {}


def register(keyword: str, wrap):
    """Register the posattn.attention keyword ``keyword``; ``wrap(value)`` returns its
    Encoding (or raises TypeError naming the keyword)."""
    if keyword in _KEYWORDS:
        raise ValueError(f"posattn: encoding keyword {keyword!r} is registered twice")
    _KEYWORDS[keyword] = wrap


def keywords():
    return tuple(_KEYWORDS)


def wrap(keyword: str, value) -> Encoding:
    """The Encoding for ``keyword=value``; an Encoding of that keyword passes as it is
    (so a rebuilt encoding, e.g. ``ALiBi(slopes)``, may be passed back in)."""
    if isinstance(value, Encoding) and getattr(value, "keyword", None) == keyword:
        return value
    return _KEYWORDS[keyword](value)
