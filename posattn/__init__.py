"""posattn: fused attention kernels with positional encodings built in."""
from . import reference
from .encodings import DistanceBias, GridBias, RelativeEmbeddings, RoPE, alibi_slopes
from .interface import attention, select_backend
from . import nn

__all__ = ["attention", "select_backend", "reference", "RoPE", "DistanceBias", "GridBias", "RelativeEmbeddings", "alibi_slopes"]
__version__ = "0.1.0"
