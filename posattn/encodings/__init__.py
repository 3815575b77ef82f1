"""Positional encodings, one module each (docs/ADDING_AN_ENCODING.md).

Each module holds one encoding's whole vertical slice on the Python side: the
object users pass to :func:`posattn.attention`, its checks (``bind``), its
reference terms and its differentiable tensors, and it registers the keyword it
arrives by. The import order below is the order of the keywords, and so the order
in which the reference adds the terms.
"""
from .base import Encoding, Shape, is_int, is_real, keywords, register, wrap
from .rope import RoPE, apply_rope
from .alibi import ALiBi, alibi_slopes
from .tables import DistanceBias, GridBias, t5_relative_bucket
from .dense import DenseBias
from .relative import RelativeEmbeddings
from .kerple import KERPLE
from .softmax_terms import Sinks, SoftCap

# What posattn exports (posattn.RoPE, ...): the objects users build.
__all__ = ["RoPE", "DistanceBias", "GridBias", "RelativeEmbeddings", "KERPLE", "alibi_slopes"]
