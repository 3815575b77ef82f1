"""Shaw / Transformer-XL relative embeddings: the per-tile slice of aK / aV and the
per-row shifts between key space and distance space."""
import triton
import triton.language as tl

from .common import _dot



@triton.jit
def _row_gather(x, idx):
    """out[i, j] = x[i, idx[i, j]] (idx in [0, x.shape[1])), through shared memory: the
    tile is flattened, so its gather axis spans the warps and Triton stores it once and
    loads each output by address, instead of the warp-local gather's shuffles and
    selects over every register of the row."""
    W: tl.constexpr = x.shape[1]
    flat = tl.reshape(x, [x.shape[0] * W])
    at = tl.arange(0, x.shape[0])[:, None] * W + idx
    return tl.reshape(tl.gather(flat, tl.reshape(at, [idx.shape[0] * idx.shape[1]]), axis=0), idx.shape)


@triton.jit
def _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              FIRST: tl.constexpr = 0, ROWS: tl.constexpr = 0):
    """Rows of aK / aV a tile needs (default positions): slice row r stands for
    rel = rel_min + r, clamped to [-K, K]; the tile's rel span is BLOCK_M + BLOCK_N - 1.
    With ROWS, only slice rows FIRST .. FIRST + ROWS."""
    # BLOCK_R, the slice's rows: the power of two >= BLOCK_M + BLOCK_N - 1 (both are powers of two)
    BLOCK_R: tl.constexpr = 2 * BLOCK_M if BLOCK_M >= BLOCK_N else 2 * BLOCK_N
    rel_min = start_n - (start_m + BLOCK_M - 1) - (Nk - Nq)
    rel = rel_min + FIRST + tl.arange(0, ROWS if ROWS else BLOCK_R)
    return tl.minimum(tl.maximum(rel, -rel_k), rel_k) + rel_k


@triton.jit
def _load_rel(ptr, rows, offs_d, D):
    """[BLOCK_R, BLOCK_D] rows of a contiguous [2K+1, D] relative table (aK or aV)."""
    return tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _rel_to_keys(x_r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_R] in slice space -> [BLOCK_M, BLOCK_N]: pair (i, j) is slice
    row j - i + BLOCK_M - 1 (a per-row shift: _row_gather)."""
    r = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None] + (BLOCK_M - 1)
    return _row_gather(x_r, r)


@triton.jit
def _keys_to_rel(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The inverse shift: [BLOCK_M, BLOCK_N] -> [BLOCK_M, BLOCK_R], slice row r of row i
    holds x[i, r + i - BLOCK_M + 1] (0 outside the tile). Keys map one to one onto
    slice rows, so the per-row bucket sums of Shaw's value side need no scatter."""
    BLOCK_R: tl.constexpr = 2 * BLOCK_M if BLOCK_M >= BLOCK_N else 2 * BLOCK_N  # as in _rel_rows
    j = tl.arange(0, BLOCK_R)[None, :] + tl.arange(0, BLOCK_M)[:, None] - (BLOCK_M - 1)
    inside = (j >= 0) & (j < BLOCK_N)
    return tl.where(inside, _row_gather(x, tl.minimum(tl.maximum(j, 0), BLOCK_N - 1)), 0.0)


@triton.jit
def _cat_cols(a, b):
    """[M, N] and [M, N] -> [M, 2N]: a's columns, then b's."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [a.shape[0], 2 * a.shape[1]])


@triton.jit
def _keys_to_rel_halves(x, BLOCK_N: tl.constexpr):
    """_keys_to_rel for square tiles, as its two [BLOCK_N, BLOCK_N] halves of slice rows
    (r < BLOCK_N, r >= BLOCK_N), each by an affine gather without clamp or mask: row i
    of the low half reads column r + i + 1 of [0 | x], of the high half the same column of
    [x | 0], always inside row i's 2 BLOCK_N columns. (The clamped indices and masks of
    _keys_to_rel are loop-invariant per element: held in registers across the key loop.)"""
    at = tl.arange(0, BLOCK_N)[:, None] * (2 * BLOCK_N + 1) + tl.arange(0, BLOCK_N)[None, :] + 1
    at = tl.reshape(at, [BLOCK_N * BLOCK_N])
    z = tl.zeros_like(x)
    lo = tl.gather(tl.reshape(_cat_cols(z, x), [2 * BLOCK_N * BLOCK_N]), at, axis=0)
    hi = tl.gather(tl.reshape(_cat_cols(x, z), [2 * BLOCK_N * BLOCK_N]), at, axis=0)
    return tl.reshape(lo, [BLOCK_N, BLOCK_N]), tl.reshape(hi, [BLOCK_N, BLOCK_N])


@triton.jit
def _halves_dot(acc, x, ptr, start_m, start_n, Nq, Nk, rel_k, offs_d, D, BLOCK_N: tl.constexpr,
                UPCAST: tl.constexpr):
    """acc + sum_j x_ij table[c(i, j)] for a square tile: x [BLOCK_N, BLOCK_N] (x's dtype)
    shifted into slice space as _keys_to_rel_halves' two halves, each against its half of
    the table's slice (_rel_rows' FIRST / ROWS): the forward's P . aV, dQ's dS . aK. Each
    product adds to acc in turn (the tensor cores' accumulator; their sum first spills)."""
    x_lo, x_hi = _keys_to_rel_halves(x, BLOCK_N)
    t_lo = _load_rel(ptr, _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_N, BLOCK_N, 0, BLOCK_N), offs_d, D)
    t_hi = _load_rel(ptr, _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_N, BLOCK_N, BLOCK_N, BLOCK_N), offs_d, D)
    acc += _dot(x_lo, t_lo.to(x.dtype), UPCAST)
    acc += _dot(x_hi, t_hi.to(x.dtype), UPCAST)
    return acc


@triton.jit
def _add_row(x, ptr, offs_d, D, FLAG: tl.constexpr):
    """x + vec[None, :] (a [D] vector, Transformer-XL's u or w), kept in x's dtype."""
    if FLAG:
        vec = tl.load(ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        return (x.to(tl.float32) + vec[None, :]).to(x.dtype)
    else:
        return x


@triton.jit
def _rel_end_rows(ak_ptr, av_ptr, rel_k, offs_d, D, like, REL_K: tl.constexpr, REL_V: tl.constexpr):
    """aK's and aV's end rows, row 0 (rel <= -K) and row 2K (rel >= K), as float32
    [BLOCK_D] vectors rounded to the input dtype as the slices are (0.0 when absent):
    a tile beyond the clip reads only these."""
    in_d = offs_d < D
    ak_lo = 0.0
    ak_hi = 0.0
    av_lo = 0.0
    av_hi = 0.0
    if REL_K:
        ak_lo = tl.load(ak_ptr + offs_d, mask=in_d, other=0.0).to(like.dtype).to(tl.float32)
        ak_hi = tl.load(ak_ptr + 2 * rel_k * D + offs_d, mask=in_d, other=0.0).to(like.dtype).to(tl.float32)
    if REL_V:
        av_lo = tl.load(av_ptr + offs_d, mask=in_d, other=0.0).to(like.dtype).to(tl.float32)
        av_hi = tl.load(av_ptr + 2 * rel_k * D + offs_d, mask=in_d, other=0.0).to(like.dtype).to(tl.float32)
    return ak_lo, ak_hi, av_lo, av_hi


@triton.jit
def _row_dot(x, vec, HAS: tl.constexpr):
    """x [M, D] . vec [D] for each row, float32; 0.0 without HAS."""
    if HAS:
        return tl.sum(x.to(tl.float32) * vec[None, :], 1)
    else:
        return 0.0
