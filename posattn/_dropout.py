"""Attention dropout's random numbers (the Triton kernels' keep-mask).

A call with ``dropout_p > 0`` draws one int64 Philox seed from torch's default
generator for q's device (advancing it, as SDPA's dropout does), so
``torch.manual_seed`` makes runs reproducible. The kernels keep pair (b, h, i, j)
when word ``j % 4`` of ``Philox(key=seed, counter=(j // 4, i, b * Hq + h, 0))``,
as a uniform float, is ``>= p`` (kernels/common.py: _dropout_keep): the forward and
every backward kernel regenerate the same mask, which is never stored.
"""
from __future__ import annotations

import torch

_SEED_LIMIT = 2 ** 62


def draw(device) -> torch.Tensor:
    """The Philox seed of one call: int64 ``[1]`` on ``device``, from torch's default
    generator for it (no host sync on a GPU; traced like any RNG op by torch.compile)."""
    return torch.randint(0, _SEED_LIMIT, (1,), device=device, dtype=torch.int64)


def keep_mask_for(p) -> torch.Tensor:
    """The kernels' keep-mask of a validated Problem: [B, Hq, Nq, Nk]; for packed
    sequences [num_seqs, Hq, max_seqlen_q, max_seqlen_k], sequence s's block at its own
    rows and keys (the kernels' counters are per sequence)."""
    if p.varlen is not None:
        return keep_mask(p.batches, p.Hq, p.rows_q, p.rows_k, p.dropout_p, p.dropout_rng)
    return keep_mask(p.B, p.Hq, p.Nq, p.Nk, p.dropout_p, p.dropout_rng)


def keep_mask(B: int, Hq: int, Nq: int, Nk: int, dropout_p: float, rng: torch.Tensor) -> torch.Tensor:
    """The bool keep-mask ``[B, Hq, Nq, Nk]`` the kernels apply for seed ``rng``
    (O(Nq * Nk): for tests and the double backward's reference pass only)."""
    from .kernels.attention import _dropout_mask
    out = torch.empty(B, Hq, Nq, Nk, device=rng.device, dtype=torch.int8)
    if out.numel():
        bm, bn = 32, 32
        p32 = float(torch.tensor(dropout_p, dtype=torch.float32))   # the kernels read it as float32
        _dropout_mask[(-(-Nq // bm), -(-Nk // bn), B * Hq)](rng, out, Nq, Nk, p32, BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()
