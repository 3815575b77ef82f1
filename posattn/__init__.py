"""posattn: fused attention kernels with positional encodings built in."""
from . import reference
from .encodings import *  # noqa: F401,F403  (the encodings' user objects: posattn.encodings.__all__)
from .encodings import __all__ as _encodings
from .interface import attention, attention_varlen, select_backend
from . import nn, testing

__all__ = ["attention", "attention_varlen", "select_backend", "reference", *_encodings]
__version__ = "0.1.0"
