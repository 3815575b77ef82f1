"""Context parallelism: one long sequence split over the ranks of a torch.distributed
process group, with every positional encoding at the sequence's global positions.

Algorithm (Llama 3's): each rank all-gathers K and V over the group, then runs
posattn's fused attention for its own queries against the whole sequence at global
positions. Backward: the gradients of the gathered K and V are reduce-scattered
(summed over the ranks, each rank keeping its shard's rows); q's gradient and the
encodings' parameter gradients stay local.

Per rank, for a local shard of n tokens of a W * n sequence (B batches, Hkv key/value
heads, head dim D, e bytes per element):
- memory: the gathered K and V, 2 * B * Hkv * W * n * D * e (and their gradients, the
  same again, during the backward), plus posattn's O(n) row statistics; no
  [n, W * n] tensor;
- communication: forward, an all-gather of K and V (each rank receives
  2 * B * Hkv * (W - 1) * n * D elements); backward, a reduce-scatter of their
  gradients of the same volume (NCCL), or an all-reduce of the whole gathered
  gradient with other backends (gloo has no reduce-scatter: twice the volume).
- compute: a contiguous causal layout skips the keys after the rank's last token
  (rank r attends to (r + 1) n keys, so later ranks work more); the zigzag layout
  balances it (each rank holds an early and a late chunk) but runs with explicit
  positions, which visit every key tile and mask (about 2x the causal work).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .interface import attention

__all__ = ["context_parallel_attention", "shard_positions"]

LAYOUTS = ("contiguous", "zigzag")


def shard_positions(rank: int, world: int, n: int, layout: str = "contiguous", device=None) -> torch.Tensor:
    """The global positions (int64 ``[n]``) of the tokens rank ``rank`` of ``world`` holds
    for local shards of ``n`` tokens: ``contiguous``, ``rank * n .. (rank + 1) * n - 1``;
    ``zigzag``, chunk ``rank`` then chunk ``2 * world - 1 - rank`` of ``2 * world`` chunks
    of ``n / 2`` tokens."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    if n % 2:
        raise ValueError(f"layout='zigzag' needs an even local length n (2 * world chunks of n / 2), got n={n}")
    h = n // 2
    return torch.cat((torch.arange(rank * h, (rank + 1) * h, device=device),
                      torch.arange((2 * world - 1 - rank) * h, (2 * world - rank) * h, device=device)))


class _GatherSequence(torch.autograd.Function):
    """[B, H, n, D] shards -> [B, H, W * n, D] in rank order; backward: each rank's rows of
    the gradient summed over the ranks."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.group, ctx.rank, ctx.world, ctx.n = group, rank, world, x.shape[2]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, g):
        n, r = ctx.n, ctx.rank
        if dist.get_backend(ctx.group) == "nccl":   # reduce-scatter along the sequence (rows lead)
            rows = g.movedim(2, 0).contiguous()                      # [W n, B, H, D]
            out = torch.empty_like(rows[:n])
            dist.reduce_scatter_tensor(out, rows, group=ctx.group)
            return out.movedim(0, 2), None, None, None
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g[:, :, r * n:(r + 1) * n], None, None, None


def context_parallel_attention(q, k, v, *, group=None, layout: str = "contiguous", causal=False, scale=None,
                               window=None, rope=None, alibi_slopes=None, rel_bias=None, return_lse=False,
                               rel_emb=None, softcap=None, sinks=None, dropout_p=0.0, backend=None, **encodings):
    """:func:`posattn.attention` over one sequence sharded across ``group`` (default: the
    world): each rank passes its shard ``q`` ``[B, Hq, n, D]``, ``k`` / ``v``
    ``[B, Hkv, n, D]`` of a global sequence of ``W * n`` tokens laid out by ``layout``
    (see :func:`shard_positions`: ``"contiguous"`` or ``"zigzag"``, which balances causal
    work and needs an even ``n``), and gets its output shard ``[B, Hq, n, D]`` (and its lse
    ``[B, Hq, n]`` with ``return_lse``). Every mask and encoding acts at global positions
    (causal, window, RoPE, ALiBi, tables, KERPLE, relative embeddings, softcap, sinks,
    dropout) with the keywords of :func:`posattn.attention`; ``bias``, ``q_pos`` and
    ``k_pos`` are refused (positions come from the layout).

    Autograd: gradients reach this rank's q, k, v (K and V's through the gather's
    reduce-scatter). The encodings' parameters are replicated: each rank's gradient is
    its own queries' contribution; sum them over the group (as data parallelism sums
    gradients, e.g. ``dist.all_reduce(p.grad)``) to get the gradient of the whole
    sequence's loss. Algorithm, memory and communication: the module docstring.
    """
    for name in ("bias", "q_pos", "k_pos"):
        if name in encodings:
            raise ValueError(f"context_parallel_attention: {name}= is not supported (positions come from the "
                             f"layout; a dense bias would be [n, W * n] per rank)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs an initialised torch.distributed process group")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, n, D]")
    n = q.shape[2]
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"q, k and v must hold the same local tokens: n = {n}, {k.shape[2]}, {v.shape[2]}")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    q_pos = shard_positions(rank, world, n, layout, q.device)      # checks layout and n
    K = _GatherSequence.apply(k, group, rank, world)
    V = _GatherSequence.apply(v, group, rank, world)
    kw = dict(causal=causal, scale=scale, window=window, rope=rope, alibi_slopes=alibi_slopes, rel_bias=rel_bias,
              return_lse=return_lse, rel_emb=rel_emb, softcap=softcap, sinks=sinks, dropout_p=dropout_p,
              backend=backend, **encodings)
    if layout == "contiguous" and causal:
        # keys after this rank's last token are hidden: drop them, and the positions are
        # then the default bottom-right alignment (tile skipping, every encoding)
        return attention(q, K[:, :, :(rank + 1) * n], V[:, :, :(rank + 1) * n], **kw)
    k_pos = torch.cat([shard_positions(r, world, n, layout, q.device) for r in range(world)])
    return attention(q, K, V, q_pos=q_pos, k_pos=k_pos, **kw)
