"""Shared by every kernel: the constexpr bit layout, loads, positions, the key / query
ranges that causal and window masks leave visible, the row statistics."""
import re

import triton
import triton.language as tl

__all__ = ["LOG2E", "PHILOX_ROUNDS", "_TABLE_PAD", "_BIAS_ROW_TILE", "_GATHER_TIE_FIRST", "_CAUSAL", "_HAS_WL", "_HAS_WR", "_HAS_POS", "_ROPE", "_ROPE_AXES", "_INTERLEAVED", "_ALIBI", "_TABLE",
           "_BIAS", "_BIAS_MASK", "_REL_K", "_REL_V", "_REL_U", "_REL_W", "_UPCAST", "_KERPLE", "_D_SLOPE",
           "_D_TABLE", "_D_U", "_D_W", "_D_AK", "_D_AV", "_DELTA_PASS", "_HEAD_BCAST", "_ROW_BCAST",
           "_COL_BCAST", "_D_KERPLE", "_CORRECT", "_TABLE_PASS", "_ONE_TILE", "_REL_SHARED", "_BIAS_KEYS",
           "_SCALE_POS", "_DBIAS_ROWS", "_SOFTCAP", "_SINKS", "_FAST_TANH", "_DROPOUT", "_VARLEN", "_BIAS_TILES", "_GRID_WW", "_ALIBI_MMA", "_DBIAS_ADD", "_BIAS_PAIRS", "_SCALE_POW2", "_TABLE_ACC", "_XL_ROWS", "_GRID_VEC", "_GRID_LINE", "_GRID_LINE_PAD", "_INTERPRETED"]  # (and the helpers, imported by name)

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jitted code reads no plain globals
# Philox4x32 rounds for dropout's keep-mask: 7, Random123's Crush-resistant count (10 is
# curand's default); the rounds are most of dropout's per-element cost.
PHILOX_ROUNDS = tl.constexpr(7)
# DistanceBias's table row holds this many copies of each end column on both sides
# (posattn/_triton.py pads it): a tile with BLOCK_M + BLOCK_N <= _TABLE_PAD + 2 reads
# its bias as a Toeplitz slice with no per-element clamp (scores._scores).
_TABLE_PAD = tl.constexpr(256)
# Triton lays out a load by its pointer's contiguity, fastest axis first. A gather's is
# unknown on every axis, and the tie goes to the first axis in Triton 3.6 and to the last
# in 3.9 (upstream has switched this default back and forth). GridBias's gather is
# written per version so that each thread holds one key when the rows are fixed over the
# loop, one row when the keys are (scores._scores).
# A dense bias posattn copies has its rows padded to a multiple of this many columns
# (posattn/_triton.py: BIAS_TILES), so that any key tile (BLOCK_N dividing it) reads
# whole in-bounds rows; the padding (-inf, or False for a mask) hides the keys past Nk.
_BIAS_ROW_TILE = tl.constexpr(128)
_GATHER_TIE_FIRST = tl.constexpr(tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2]) <= (3, 6))


@triton.jit
def _jit_probe():
    pass


# Kernels defined under TRITON_INTERPRET are the CPU interpreter's (as triton.jit decides)
_INTERPRETED = tl.constexpr(type(_jit_probe).__name__ == "InterpretedFunction")

# Bit offsets of the FLAGS constexpr (what the problem has: masks, positions, encodings,
# and two layout facts: REL_SHARED, one relative table for every head; BIAS_KEYS, the
# dense bias varies along the keys (stride 1; else it broadcasts, stride 0); TABLE
# takes two bits: 0 none, 1 DistanceBias, 2 GridBias) and of GRADS (what the backward
# computes). posattn/_triton.py packs them with these same constants.
_CAUSAL = tl.constexpr(0)
_HAS_WL = tl.constexpr(1)
_HAS_WR = tl.constexpr(2)
_HAS_POS = tl.constexpr(3)
_ROPE = tl.constexpr(4)
_INTERLEAVED = tl.constexpr(5)
_ALIBI = tl.constexpr(6)
_TABLE = tl.constexpr(7)
_BIAS = tl.constexpr(9)
_BIAS_MASK = tl.constexpr(10)
_REL_K = tl.constexpr(11)
_REL_V = tl.constexpr(12)
_REL_U = tl.constexpr(13)
_REL_W = tl.constexpr(14)
_UPCAST = tl.constexpr(15)
_KERPLE = tl.constexpr(16)
_REL_SHARED = tl.constexpr(17)
_BIAS_KEYS = tl.constexpr(18)
_SCALE_POS = tl.constexpr(19)  # scale > 0: max(scale * qk) = scale * max(qk)
_DBIAS_ROWS = tl.constexpr(20)  # backward: the dense bias has every row and key; dK/dV writes its dS (or adds: _DBIAS_ADD)
_SOFTCAP = tl.constexpr(21)     # scaled logits capped: cap * tanh(scale * logit / cap)
_SINKS = tl.constexpr(22)       # a per-head logit in every row's softmax denominator
_FAST_TANH = tl.constexpr(23)   # softcap's tanh by the GPU's tanh.approx (half-precision inputs)
_DROPOUT = tl.constexpr(24)     # attention dropout: a Philox keep-mask drawn per (batch, head, row, key)
_VARLEN = tl.constexpr(25)      # packed sequences: grid axis 2 is a sequence, Pos holds cu_seqlens_q, cu_seqlens_k
_ROPE_AXES = tl.constexpr(26)   # RoPE at positions per axis: _rope_rotate rotates dQ / dK back, not the epilogues
_BIAS_TILES = tl.constexpr(27)  # the dense bias's rows hold whole key tiles (posattn/_triton.py pads them with -inf / False)
_GRID_WW = tl.constexpr(28)     # three bits: GridBias's Ww = 2^(k + 2) when a power of two in [8, 512], else 0
_ALIBI_MMA = tl.constexpr(31)   # ALiBi's column term may take a K=16 step of q.k (forward side tiles, BLOCK_D <= 64)
_DBIAS_ADD = tl.constexpr(32)   # backward, with DBIAS_ROWS: the bias is shared by batches or heads; dK/dV adds dS atomically
_BIAS_PAIRS = tl.constexpr(33)  # a bfloat16 dense bias at even element offsets: read as 32-bit words of two keys
_SCALE_POW2 = tl.constexpr(34)  # the scale is a power of two: scale * q is exact in bfloat16 (the forward's bias accumulator)
_TABLE_ACC = tl.constexpr(35)   # GridBias alone: Table also holds table / scale, after the heads' rows
_XL_ROWS = tl.constexpr(36)     # forward, dK/dV: Transformer-XL's q + u at Q and q + w at Q + sqw, added by the host
_GRID_VEC = tl.constexpr(37)    # two bits, with TABLE_ACC at an even width that is not a power of two: log2 G, G keys
                                # at consecutive addresses (Ww's power-of-two factor, at most 8; vectors of min(G, 4)), else 0
_GRID_LINE = tl.constexpr(39)   # with TABLE_ACC at an odd width: Table holds a line of table / scale per query column
_GRID_LINE_PAD = tl.constexpr(128)   # (zeros before the lines: a boundary tile's keys past the window read there)
_D_SLOPE = tl.constexpr(0)
_D_TABLE = tl.constexpr(1)
_D_U = tl.constexpr(2)
_D_W = tl.constexpr(3)
_D_AK = tl.constexpr(4)
_D_AV = tl.constexpr(5)
_DELTA_PASS = tl.constexpr(6)
_HEAD_BCAST = tl.constexpr(7)
_ROW_BCAST = tl.constexpr(8)
_COL_BCAST = tl.constexpr(9)
_D_KERPLE = tl.constexpr(10)
_CORRECT = tl.constexpr(11)     # dQ: Stats hold rowsum(dO * O); correct in-pass, then write the exact delta
_TABLE_PASS = tl.constexpr(12)  # dQ: only d(table) over the near tiles, from the exact Stats
_ONE_TILE = tl.constexpr(13)    # dQ with CORRECT: every row's keys are one tile, d(table) summed in-pass


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # Triton's CPU interpreter multiplies bfloat16 tiles as raw uint16; feeding it
    # float32 gives the same products (bf16 x bf16 is exact in fp32).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:  # one MUFU op; max relative error ~2^-11, below bf16 / fp16 rounding of the scores
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        # 1 - 2 / (e^2x + 1): +-1 at the limits, but its absolute error ~ float32 eps is
        # a relative one of eps / |x| near 0 (logits well inside the cap: 3e-6 at x =
        # 0.02, and a float32 d(sinks) 20x PyTorch's error); there the odd series to x^15
        # (relative error < 1e-7 for |x| < 0.5)
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (
            62.0 / 2835 + x2 * (-1382.0 / 155925 + x2 * (21844.0 / 6081075 + x2 * (-929569.0 / 638512875))))))))
        return tl.where(tl.abs(x) < 0.5, series, 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0))


@triton.jit
def _dropout_keep(seed, bh, offs_m, start_n, drop_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout's keep-mask of the tile of keys start_n.. (a multiple of 4): Philox with
    key `seed` and counter (j // 4, row i, b * Hq + h, 0), whose four 32-bit words are
    keys 4 (j // 4) .. + 3 (one Philox call per 4 pairs; 32-bit words: no 64-bit index
    arithmetic per element). Every kernel draws the same mask whatever its tiling;
    a pair is kept with probability 1 - drop_p."""
    grp = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    zero = (offs_m[:, None] * 0 + grp[None, :] * 0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, zero + grp[None, :].to(tl.uint32), zero + offs_m[:, None].to(tl.uint32),
                               zero + bh.to(tl.uint32), zero, PHILOX_ROUNDS)
    # join appends its axis last: (r0, r2) and (r1, r3) paired, then joined, flatten to r0 r1 r2 r3
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_M, BLOCK_N])  # word c -> key 4t + c
    # kept when the word, as a fraction of 2^32, is >= drop_p: an unsigned compare
    return r >= tl.cast(drop_p * 4294967296.0, tl.uint32)


@triton.jit
def _load_tile(ptr, offs_n, offs_d, stride_n, N, D):
    # rows of q, k, v, dO: the head dim is contiguous (the launcher copies otherwise)
    return tl.load(ptr + offs_n[:, None] * stride_n + offs_d[None, :],
                   mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _positions(pos_ptr, offs, N, shift, FLAGS: tl.constexpr):
    HAS_POS: tl.constexpr = (FLAGS >> _HAS_POS.value) & 1
    if HAS_POS:
        # int64: the distance of two int32 positions can pass 2^31
        return tl.load(pos_ptr + offs, mask=offs < N, other=0).to(tl.int64)
    else:
        return offs + shift


@triton.jit
def _program_id_again(AXIS: tl.constexpr):
    """tl.program_id(AXIS) read again from its special register, not kept from the
    prologue: a volatile read the compiler cannot merge with the first, so what is needed
    only after a key loop (the boundary tiles' range, the epilogue's offsets) is
    recomputed there instead of being held, or spilled, across the loop (at 255
    registers, D = 80 / 128: bench/NOTES.md). The interpreter has no inline assembly."""
    if _INTERPRETED:
        return tl.program_id(AXIS)
    elif AXIS == 0:
        return tl.inline_asm_elementwise("mov.u32 $0, %ctaid.x;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    elif AXIS == 1:
        return tl.inline_asm_elementwise("mov.u32 $0, %ctaid.y;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    else:
        return tl.inline_asm_elementwise("mov.u32 $0, %ctaid.z;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _key_range(start_m, BLOCK_M: tl.constexpr, Nq, Nk, win_l, win_r,
               FLAGS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of keys that rows start_m.. can see; with default positions the
    causal / window masks bound it, so hidden tiles are never visited."""
    CAUSAL: tl.constexpr = (FLAGS >> _CAUSAL.value) & 1
    HAS_WL: tl.constexpr = (FLAGS >> _HAS_WL.value) & 1
    HAS_WR: tl.constexpr = (FLAGS >> _HAS_WR.value) & 1
    HAS_POS: tl.constexpr = (FLAGS >> _HAS_POS.value) & 1
    lo = 0
    hi = Nk
    if not HAS_POS:
        shift = Nk - Nq
        if CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M + shift)
        # A window side may be as wide as 2^62: sum it in int64, clamp into [0, Nk],
        # and keep the loop bounds int32.
        if HAS_WR:
            hi = tl.minimum(hi, tl.minimum(start_m + BLOCK_M + shift + tl.cast(win_r, tl.int64), Nk).to(tl.int32))
        if HAS_WL:
            lo = tl.maximum(start_m + shift - tl.cast(win_l, tl.int64), 0).to(tl.int32)
            lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def _query_range(start_n, BLOCK_N: tl.constexpr, Nq, Nk, win_l, win_r,
                 FLAGS: tl.constexpr, BLOCK_M: tl.constexpr):
    """[lo, hi) of query rows that can see keys start_n.. (the transpose of _key_range)."""
    CAUSAL: tl.constexpr = (FLAGS >> _CAUSAL.value) & 1
    HAS_WL: tl.constexpr = (FLAGS >> _HAS_WL.value) & 1
    HAS_WR: tl.constexpr = (FLAGS >> _HAS_WR.value) & 1
    HAS_POS: tl.constexpr = (FLAGS >> _HAS_POS.value) & 1
    lo = 0
    hi = Nq
    if not HAS_POS:
        shift = Nk - Nq
        # row i sees key j when j - i - shift <= right and >= -left
        if CAUSAL:
            lo = tl.maximum(lo, start_n - shift)
        if HAS_WR:  # int64 and clamped, as in _key_range
            lo = tl.maximum(lo, tl.maximum(start_n - shift - tl.cast(win_r, tl.int64), 0).to(tl.int32))
        lo = (tl.maximum(lo, 0) // BLOCK_M) * BLOCK_M
        if HAS_WL:
            hi = tl.minimum(hi, tl.minimum(start_n + BLOCK_N - shift + tl.cast(win_l, tl.int64), Nq).to(tl.int32))
        hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def _interior(lo, hi, bottom, top, BLOCK: tl.constexpr, BOTTOM_IS_LO: tl.constexpr = 0):
    """Split [lo, hi), walked in BLOCK steps from lo, into the tiles that lie inside
    [bottom, top) (an interval of whole tiles [f_lo, f_hi)) and the others; returns
    f_lo, f_hi, the number of other tiles below f_lo, and the number of others.
    Other tile t starts at lo + t * BLOCK below f_lo, else at f_hi + (t - n_low) * BLOCK.
    BOTTOM_IS_LO: bottom is lo (and hi >= lo), so f_lo = lo and n_low = 0, as constants
    (a scalar fewer held across the loops)."""
    if BOTTOM_IS_LO:
        f_lo = lo
        n_low = 0
    else:
        hi_grid = lo + tl.cdiv(hi - lo, BLOCK) * BLOCK
        f_lo = tl.minimum(lo + tl.cdiv(tl.maximum(bottom - lo, 0), BLOCK) * BLOCK, hi_grid)
        n_low = (f_lo - lo) // BLOCK
    f_hi = tl.maximum(f_lo + (tl.maximum(tl.minimum(top, hi) - f_lo, 0) // BLOCK) * BLOCK, f_lo)
    return f_lo, f_hi, n_low, n_low + tl.cdiv(tl.maximum(hi - f_hi, 0), BLOCK)


@triton.jit
def _band(lo, hi, x_lo, x_hi, BLOCK: tl.constexpr):
    """Split [lo, hi), walked in BLOCK steps from lo, into the tiles that meet the
    open index interval (x_lo, x_hi), [b_lo, b_hi), and the others: n_low tiles lying
    wholly at or below x_lo (from lo), then those wholly at or above x_hi (from b_hi).
    Returns b_lo, b_hi, n_low and the number of others."""
    n = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK)
    n_low = tl.minimum(tl.maximum(x_lo - lo + 1, 0) // BLOCK, n)   # last index <= x_lo
    t_high = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(x_hi - lo, 0), BLOCK), n_low), n)  # first >= x_hi
    return lo + n_low * BLOCK, lo + t_high * BLOCK, n_low, n_low + n - t_high


@triton.jit
def _beyond(start, lo, hi, Nq, Nk, left, right, KEYS: tl.constexpr, BLOCK: tl.constexpr,
            BLOCK_OTHER: tl.constexpr):
    """Default positions: split the tiles of [lo, hi) (keys of the query block at
    `start` when KEYS, else queries of the key block at `start`) into the band that
    meets -left < rel < right, [b_lo, b_hi), and the tiles wholly beyond it (as in
    _band): below b_lo every pair has rel <= -left (KEYS) or rel >= right (queries),
    above b_hi the other side."""
    shift = Nk - Nq
    if KEYS:  # keys j <= start + shift - left; j >= last row + shift + right
        return _band(lo, hi, start + shift - left, start + BLOCK_OTHER - 1 + shift + right, BLOCK)
    else:  # rows i <= start - shift - right; i >= last key - shift + left
        return _band(lo, hi, start - shift - right, start + BLOCK_OTHER - 1 - shift + left, BLOCK)


@triton.jit
def _part_range(part: tl.constexpr, lo, hi, b_lo, b_hi):
    """The tiles of a _beyond split's part: 0 the band, 1 those below it, 2 above."""
    if part == 0:
        return b_lo, b_hi
    elif part == 1:
        return lo, b_lo
    else:
        return b_hi, hi


@triton.jit
def _split_keys(start_m, BLOCK_M: tl.constexpr, Nq, Nk, lo, hi, win_l, win_r,
                FLAGS: tl.constexpr, BLOCK_N: tl.constexpr, LO_CONST: tl.constexpr = 0):
    """The key tiles of [lo, hi) that every row of the block sees whole (in bounds,
    not hidden by causal or window): they are scored without a mask. See _interior.
    LO_CONST: without a left window edge (or at given positions, whose tiles are all
    boundary tiles), n_low = 0 as a constant (_interior's BOTTOM_IS_LO; lo, hi from
    _key_range). Where register pressure is not the limit
    the compiler schedules the kernels better without it (bench/NOTES.md)."""
    CAUSAL: tl.constexpr = (FLAGS >> _CAUSAL.value) & 1
    HAS_WL: tl.constexpr = (FLAGS >> _HAS_WL.value) & 1
    HAS_WR: tl.constexpr = (FLAGS >> _HAS_WR.value) & 1
    HAS_POS: tl.constexpr = (FLAGS >> _HAS_POS.value) & 1
    bottom = lo
    top = Nk
    if HAS_POS:
        if CAUSAL or HAS_WL or HAS_WR:  # visibility depends on the positions' values
            top = lo
    else:
        shift = Nk - Nq
        if CAUSAL:  # key j <= i + shift for the block's first row
            top = tl.minimum(top, start_m + shift + 1)
        if HAS_WR:  # int64 and clamped, as in _key_range
            top = tl.minimum(top, tl.minimum(start_m + shift + 1 + tl.cast(win_r, tl.int64), Nk).to(tl.int32))
        if HAS_WL:  # key j >= i + shift - left for the block's last row
            bottom = tl.maximum(start_m + BLOCK_M - 1 + shift - tl.cast(win_l, tl.int64), 0).to(tl.int32)
    return _interior(lo, hi, bottom, top, BLOCK_N, BOTTOM_IS_LO=LO_CONST * (HAS_POS | (1 - HAS_WL)))


@triton.jit
def _split_queries(start_n, BLOCK_N: tl.constexpr, Nq, Nk, lo, hi, win_l, win_r,
                   FLAGS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query tiles of [lo, hi) whose rows see the whole key block start_n.. (the
    transpose of _split_keys). Bounds need no mask here: rows past Nq have lse = +inf
    (P = 0) and keys past Nk only feed dK / dV rows that are never stored."""
    CAUSAL: tl.constexpr = (FLAGS >> _CAUSAL.value) & 1
    HAS_WL: tl.constexpr = (FLAGS >> _HAS_WL.value) & 1
    HAS_WR: tl.constexpr = (FLAGS >> _HAS_WR.value) & 1
    HAS_POS: tl.constexpr = (FLAGS >> _HAS_POS.value) & 1
    bottom = lo
    top = hi
    if HAS_POS:
        if CAUSAL or HAS_WL or HAS_WR:
            top = lo
    else:
        shift = Nk - Nq
        if CAUSAL:  # row i >= j - shift for the block's last key
            bottom = tl.maximum(bottom, start_n + BLOCK_N - 1 - shift)
        if HAS_WR:
            bottom = tl.maximum(bottom, tl.maximum(start_n + BLOCK_N - 1 - shift - tl.cast(win_r, tl.int64),
                                                   0).to(tl.int32))
        if HAS_WL:  # row i <= j - shift + left for the block's first key
            top = tl.minimum(top, tl.minimum(start_n - shift + 1 + tl.cast(win_l, tl.int64), Nq).to(tl.int32))
    return _interior(lo, hi, bottom, top, BLOCK_M)


@triton.jit
def _sequence(Pos, off_b):
    """Packed sequences (VARLEN): program axis 2 is sequence off_b of a packed batch, Pos
    its cu_seqlens_q then cu_seqlens_k (int32, num_programs(2) + 1 each), the tensors
    one [1, H, total, D] batch. Returns the sequence's first query and key rows and its
    lengths: every mask, position and encoding then acts within it (the row statistics
    and per-batch parameters use batch 0)."""
    cu_k = Pos + tl.num_programs(2) + 1
    q0 = tl.load(Pos + off_b)
    k0 = tl.load(cu_k + off_b)
    return q0, k0, tl.load(Pos + off_b + 1) - q0, tl.load(cu_k + off_b + 1) - k0


@triton.jit
def _stats_row(Stats, off_bh, Nq):
    """The backward's row statistics, [B, Hq, 2, Nq] float32: this (batch, head)'s lse
    (log2 domain) row; its delta row follows at + Nq."""
    return Stats + off_bh * 2 * Nq


@triton.jit
def _load_row_stats(stats_row, offs_m, Nq, NQ_T):
    """lse (log2 domain) and delta of rows (the delta row NQ_T after the lse row: the
    statistics' row length, Nq but for packed sequences); rows with no visible key or
    past Nq get lse = +inf so that their recomputed probabilities are exactly 0."""
    lse = tl.load(stats_row + offs_m, mask=offs_m < Nq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(stats_row + NQ_T + offs_m, mask=offs_m < Nq, other=0.0)
    return lse, delta
