"""RoPE: q and k rotated once per call into contiguous workspaces by _rope_rotate (the
attention kernels' loops then read them as plain tiles), and dQ / dK rotated back in
the backward kernels' epilogues; with positions per axis (ROPE_AXES, multi-axis RoPE)
by a second _rope_rotate pass (SIGN = -1) instead."""
import triton
import triton.language as tl

from .common import _INTERLEAVED, _ROPE, _ROPE_AXES, _positions


@triton.jit
def _rope_channels(offs_d, inv_freq_ptr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Per channel: the channel it pairs with, the sign of the partner's sine term
    and the frequency. Channels past ROT_DIM pair with themselves, sign 0."""
    in_rot = offs_d < ROT_DIM
    if INTERLEAVED:
        partner = offs_d ^ 1
        fidx = offs_d // 2
        first = (offs_d % 2) == 0
    else:
        HALF: tl.constexpr = ROT_DIM // 2
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        fidx = tl.where(first, offs_d, offs_d - HALF)
    partner = tl.where(in_rot, partner, offs_d)
    sign = tl.where(in_rot, tl.where(first, -1.0, 1.0), 0.0)
    freq = tl.load(inv_freq_ptr + fidx, mask=in_rot, other=0.0)
    return partner, sign, freq, in_rot


@triton.jit
def _rope_cos_sin(pos, freq, sign, in_rot, factor):
    """cos and signed sin tiles [len(pos), BLOCK_D]: x_rot = x * cos + x[partner] * sin.
    The inverse rotation is the same with -sin (the rotation is orthogonal)."""
    theta = pos.to(tl.float32)[:, None] * freq[None, :]
    cos = tl.where(in_rot[None, :], factor * tl.cos(theta), 1.0)
    sin = (factor * sign)[None, :] * tl.sin(theta)
    return cos, sin


@triton.jit
def _rope_factor(Params, FLAGS: tl.constexpr, ROT_DIM: tl.constexpr):
    """RoPE's attention factor: the float after the ROT_DIM / 2 frequencies that open
    the Params buffer (1.0 without RoPE)."""
    ROPE: tl.constexpr = (FLAGS >> _ROPE.value) & 1
    if ROPE:
        return tl.load(Params + ROT_DIM // 2)
    else:
        return 1.0


@triton.jit
def _unrotate(g, offs_d, pos, inv_freq_ptr, factor, FLAGS: tl.constexpr, ROT_DIM: tl.constexpr):
    """Gradient w.r.t. the rotated rows -> gradient w.r.t. the raw rows (rotate by -theta)."""
    INTERLEAVED: tl.constexpr = (FLAGS >> _INTERLEAVED.value) & 1
    partner, sign, freq, in_rot = _rope_channels(offs_d, inv_freq_ptr, ROT_DIM, INTERLEAVED)
    cos, sin = _rope_cos_sin(pos, freq, sign, in_rot, factor)
    gp = tl.gather(g, tl.broadcast_to(partner[None, :], g.shape), axis=1)
    return g * cos - gp * sin


@triton.jit
def _rope_rotate(X, Out, Pos, Params, RopePos, Axis, sxb, sxh, sxn, sob, soh, son, srb, sra, H, N, OFF, SHIFT,
                 Nq, Nk, D, SIGN, FLAGS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """One program per (row block, head, batch): rows of q (OFF = 0, SHIFT = Nk - Nq) or
    of k (OFF = Nq, SHIFT = 0) rotated at their positions into Out (SIGN = 1), or a
    gradient rotated back (SIGN = -1), in fp32 and rounded to Out's dtype. A pass over
    q and k per call instead of a sin / cos of every key tile in every query block's
    loop. The pairs (x1, x2) (channels i and i + R/2, or 2i and 2i + 1 interleaved) are
    loaded as two tiles, so each angle's sin and cos are computed once:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), times the attention factor.
    ROPE_AXES: pair i's position is RopePos[b, Axis[i], n] (srb = 0: shared by the batch)."""
    INTERLEAVED: tl.constexpr = (FLAGS >> _INTERLEAVED.value) & 1
    ROPE_AXES: tl.constexpr = (FLAGS >> _ROPE_AXES.value) & 1
    HALF: tl.constexpr = ROT_DIM // 2
    BLOCK_H: tl.constexpr = BLOCK_D // 2
    start_n = tl.program_id(0) * BLOCK_N
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, BLOCK_H)
    x_ptr = X + off_b * sxb + off_h * sxh + offs_n[:, None] * sxn
    o_ptr = Out + off_b * sob + off_h * soh + offs_n[:, None] * son
    if INTERLEAVED:
        c1 = 2 * offs_f
        c2 = 2 * offs_f + 1
    else:
        c1 = offs_f
        c2 = offs_f + HALF
    pair = (offs_n[:, None] < N) & (offs_f[None, :] < HALF)
    x1 = tl.load(x_ptr + c1[None, :], mask=pair, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + c2[None, :], mask=pair, other=0.0).to(tl.float32)
    freq = tl.load(Params + offs_f, mask=offs_f < HALF, other=0.0)
    factor = tl.load(Params + HALF)
    if ROPE_AXES:
        axis = tl.load(Axis + offs_f, mask=offs_f < HALF, other=0)
        pos = tl.load(RopePos + off_b * srb + axis[None, :] * sra + offs_n[:, None], mask=pair, other=0)
        theta = pos.to(tl.float32) * freq[None, :]
    else:
        pos = _positions(Pos + off_b * (Nq + Nk) + OFF, offs_n, N, SHIFT, FLAGS)
        theta = pos.to(tl.float32)[:, None] * freq[None, :]
    cos = factor * tl.cos(theta)
    sin = (SIGN * factor) * tl.sin(theta)
    tl.store(o_ptr + c1[None, :], (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=pair)
    tl.store(o_ptr + c2[None, :], (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=pair)
    if ROT_DIM < BLOCK_D:  # channels past the rotary dim are copied
        offs_d = tl.arange(0, BLOCK_D)
        rest = (offs_n[:, None] < N) & (offs_d[None, :] >= ROT_DIM) & (offs_d[None, :] < D)
        tl.store(o_ptr + offs_d[None, :], tl.load(x_ptr + offs_d[None, :], mask=rest), mask=rest)
