"""RoPE inside the kernels: q and k tiles rotated at their positions on load (the
partner channels are a second, cache-hot load), and gradients rotated back."""
import triton
import triton.language as tl

from .common import _INTERLEAVED, _ROPE, _load_tile


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
def _load_rotated(ptr, offs_n, offs_d, stride_n, N, D, pos, inv_freq_ptr, factor,
                  FLAGS: tl.constexpr, ROT_DIM: tl.constexpr):
    """Load a [rows, BLOCK_D] tile of q or k, rotated by RoPE at `pos` when ROPE.
    The partner channels are read as a second (cache-hot) load: no rotated copy of
    q or k ever exists in memory."""
    ROPE: tl.constexpr = (FLAGS >> _ROPE.value) & 1
    INTERLEAVED: tl.constexpr = (FLAGS >> _INTERLEAVED.value) & 1
    x = _load_tile(ptr, offs_n, offs_d, stride_n, N, D)
    if ROPE:
        partner, sign, freq, in_rot = _rope_channels(offs_d, inv_freq_ptr, ROT_DIM, INTERLEAVED)
        xp = _load_tile(ptr, offs_n, partner, stride_n, N, D)
        cos, sin = _rope_cos_sin(pos, freq, sign, in_rot, factor)
        x = (x.to(tl.float32) * cos + xp.to(tl.float32) * sin).to(ptr.dtype.element_ty)
    return x


@triton.jit
def _unrotate(g, offs_d, pos, inv_freq_ptr, factor, FLAGS: tl.constexpr, ROT_DIM: tl.constexpr):
    """Gradient w.r.t. the rotated rows -> gradient w.r.t. the raw rows (rotate by -theta)."""
    INTERLEAVED: tl.constexpr = (FLAGS >> _INTERLEAVED.value) & 1
    partner, sign, freq, in_rot = _rope_channels(offs_d, inv_freq_ptr, ROT_DIM, INTERLEAVED)
    cos, sin = _rope_cos_sin(pos, freq, sign, in_rot, factor)
    gp = tl.gather(g, tl.broadcast_to(partner[None, :], g.shape), axis=1)
    return g * cos - gp * sin
