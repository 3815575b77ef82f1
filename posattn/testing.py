"""Testing hooks (FlagAttention-style): what the kernels draw, exposed for checks
against the reference."""
from __future__ import annotations

import torch

from . import _dropout

__all__ = ["dropout_keep_mask", "dropout_keep_mask_varlen"]


def dropout_keep_mask(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The bool keep-mask ``[B, Hq, Nq, Nk]`` that the Triton backend applies in a call
    ``posattn.attention(q, k, v, dropout_p=dropout_p, ...)`` made with torch's RNG in
    its current state. It draws the call's seed as the call would (advancing the
    generator), so reseed before the call::

        torch.manual_seed(0); keep = dropout_keep_mask(q, k, 0.1)
        torch.manual_seed(0); out = posattn.attention(q, k, v, dropout_p=0.1)
        ref = posattn.reference.attention(q, k, v, dropout_p=0.1, dropout_mask=keep)
    """
    if not 0.0 < float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in (0, 1), got {dropout_p!r}")
    B, Hq, Nq, _ = q.shape
    return _dropout.keep_mask(B, Hq, Nq, k.shape[2], dropout_p, _dropout.draw(q.device))


def dropout_keep_mask_varlen(q: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                             dropout_p: float, max_seqlen_q: int, max_seqlen_k: int) -> torch.Tensor:
    """The keep-mask ``[num_seqs, Hq, max_seqlen_q, max_seqlen_k]`` that the Triton backend
    applies in ``posattn.attention_varlen(q, ..., dropout_p=dropout_p)`` called with
    torch's RNG in its current state (sequence s's block at its own rows and keys); as
    :func:`dropout_keep_mask`, it draws the seed the call would draw: reseed before the
    call. ``posattn.attention_varlen(..., backend="reference", dropout_mask=keep)``
    applies it."""
    if not 0.0 < float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in (0, 1), got {dropout_p!r}")
    return _dropout.keep_mask(cu_seqlens_q.shape[0] - 1, q.shape[1], int(max_seqlen_q), int(max_seqlen_k), dropout_p,
                              _dropout.draw(q.device))
