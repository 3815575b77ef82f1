"""The score tile: logits (q.k plus the relative-embedding key term), every additive
encoding term (ALiBi, KERPLE, tables, dense bias) and the masks, in the log2 domain;
the per-head encoding parameters; P and dS recomputed for the backward."""
import triton
import triton.language as tl

from .common import (LOG2E, _BIAS_ROW_TILE, _GRID_LINE_PAD, _GATHER_TIE_FIRST, _ALIBI, _BIAS, _BIAS_KEYS, _BIAS_MASK, _BIAS_PAIRS, _BIAS_TILES, _CAUSAL, _FAST_TANH, _GRID_WW, _HAS_POS, _HAS_WL, _HAS_WR,
                     _KERPLE, _REL_K, _REL_SHARED, _REL_U, _REL_V, _REL_W, _ROPE, _SINKS, _SOFTCAP, _TABLE, _TABLE_PAD, _XL_ROWS,
                     _UPCAST, _DROPOUT, _VARLEN, _beyond, _dot, _dropout_keep, _load_tile, _positions, _tanh)
from .relative import _add_row, _load_rel, _rel_rows, _rel_to_keys


@triton.jit
def _table_index(rel, qp, kp, tab_a, tab_b, TABLE: tl.constexpr):
    """Column of the bias table for each (query, key) pair.
    TABLE == 1, DistanceBias: clamp(rel, -L, R) + L with (tab_a, tab_b) = (L, R).
    TABLE == 2, GridBias (Swin's relative_position_index) with (tab_a, tab_b) =
    (Wh, Ww): tokens at (p // Ww, p % Ww). The host checks that positions lie in the
    window; the rows and columns past it (padding, masked) are clamped into it."""
    if TABLE == 1:
        return tl.minimum(tl.maximum(rel, -tab_a), tab_b) + tab_a
    else:
        # (qy - ky + Wh - 1)(2 Ww - 1) + qx - kx + Ww - 1 = a row term - a column term,
        # each per vector, then one int32 subtraction per element
        return _grid_row_code(qp, tab_a, tab_b)[:, None] - _grid_code(kp, tab_a, tab_b)[None, :]


@triton.jit
def _grid_xy(pos, wh, ww):
    """(p, y): the position p clamped into the window first (padding rows and keys; the
    host checks explicit positions) and its grid row y = p // Ww. Default positions
    (int32, >= 0): p // Ww as floor((p + 0.5) / Ww) in float32, exact for p < 2^20 with
    a reciprocal a few ulp off (the launcher refuses tables of more than 8192 columns,
    so Wh * Ww <= 2^12): a runtime integer division costs some twenty instructions per
    element."""
    if pos.dtype == tl.int64:   # explicit positions (a float conversion of int64 spills
        p = tl.minimum(tl.maximum(pos, 0), wh * ww - 1).to(tl.int32)   # the largest forwards
        y = p // ww                                                      # under Triton 3.6)
    else:
        p = tl.minimum(pos, wh * ww - 1)
        y = ((p.to(tl.float32) + 0.5) * (1.0 / ww)).to(tl.int32)
    return p, y


@triton.jit
def _grid_row_code(pos, wh, ww):
    """A row's code plus the table's offset (Wh - 1)(2 Ww - 1) + Ww - 1: its column is
    this minus the key's _grid_code."""
    return _grid_code(pos, wh, ww) + ((wh - 1) * (2 * ww - 1) + ww - 1)


@triton.jit
def _grid_code(pos, wh, ww):
    """y (2 Ww - 1) + x = p + y (Ww - 1) for the token at (y, x) = (p // Ww, p % Ww)."""
    p, y = _grid_xy(pos, wh, ww)
    return p + y * (ww - 1)


@triton.jit
def _table_columns(tab_a, tab_b, TABLE: tl.constexpr):
    """T, the bias table's columns: L + R + 1 (DistanceBias), (2 Wh - 1)(2 Ww - 1) (GridBias)."""
    if TABLE == 1:
        return tab_a + tab_b + 1
    else:
        return (2 * tab_a - 1) * (2 * tab_b - 1)


@triton.jit
def _table_row(tab_a, tab_b, TABLE: tl.constexpr):
    """A head's row length in Table: DistanceBias's T columns between _TABLE_PAD copies
    of each end column; GridBias's T columns."""
    return _table_columns(tab_a, tab_b, TABLE) + (2 * _TABLE_PAD if TABLE == 1 else 0)


@triton.jit
def _table_far(start, lo, hi, Nq, Nk, tab_l, tab_r, table_ptr,
               KEYS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    """DistanceBias with default positions: the tiles of [lo, hi) whose pairs all read
    one end column of the table (rel <= -L: column 0, rel >= R: column T - 1), so
    they are scored as plain tiles plus a constant. The tiles are keys for the query
    block at `start` (KEYS) or queries for the key block at `start`. Returns the near
    tiles [b_lo, b_hi), n_low and n_far as in _band, and the constants (log2 domain)
    of the far tiles below b_lo and above b_hi."""
    first = tl.load(table_ptr + _TABLE_PAD)
    last = tl.load(table_ptr + _TABLE_PAD + tab_l + tab_r)
    b_lo, b_hi, n_low, n_far = _beyond(start, lo, hi, Nq, Nk, tab_l, tab_r, KEYS, BLOCK, BLOCK_OTHER)
    if KEYS:  # keys below the band: rel <= -L (column 0)
        return b_lo, b_hi, n_low, n_far, first, last
    else:     # rows below the band: rel >= R (column T - 1)
        return b_lo, b_hi, n_low, n_far, last, first


@triton.jit
def _head_params(off_b, off_h, Params, Table, tab_l, tab_r, Bias, sbb, sbh, bias_nb, Rel, rel_k, Hq, D,
                 FLAGS: tl.constexpr, ROT_DIM: tl.constexpr):
    """Per (batch, query head): ALiBi slope, KERPLE's r1 / r2, the bases of the
    bias table row, the dense bias, the relative tables aK / aV and u / w, and (log2
    domain) the soft cap and the sink logit.

    Params (float32) holds the encodings' small tensors, each present only with its
    flag, in this order (posattn/_triton.py writes it): RoPE's ROT_DIM / 2 frequencies
    and attention factor, KERPLE's r1 [Hq] and r2 [Hq], Transformer-XL's u [Hq, D] and
    w [Hq, D], the soft cap [1], the sinks [Hq], the dropout probability [1], ALiBi's slopes
    [B, Hq]. Rel holds aK then aV, each [Hr, 2K+1, D] (Hr = 1 with REL_SHARED, else Hq);
    Table is float32 in the log2 domain, a row of _table_row per head (with TABLE_ACC,
    then GridBias's table / scale as rows, vector copies or lines: the forward's _acc_term)."""
    ROPE: tl.constexpr = (FLAGS >> _ROPE.value) & 1
    ALIBI: tl.constexpr = (FLAGS >> _ALIBI.value) & 1
    KERPLE: tl.constexpr = (FLAGS >> _KERPLE.value) & 1
    REL_U: tl.constexpr = (FLAGS >> _REL_U.value) & 1
    REL_W: tl.constexpr = (FLAGS >> _REL_W.value) & 1
    REL_K: tl.constexpr = (FLAGS >> _REL_K.value) & 1
    REL_SHARED: tl.constexpr = (FLAGS >> _REL_SHARED.value) & 1
    TABLE: tl.constexpr = (FLAGS >> _TABLE.value) & 3
    SOFTCAP: tl.constexpr = (FLAGS >> _SOFTCAP.value) & 1
    SINKS: tl.constexpr = (FLAGS >> _SINKS.value) & 1
    DROPOUT: tl.constexpr = (FLAGS >> _DROPOUT.value) & 1
    ptr = Params
    if ROPE:
        ptr += ROT_DIM // 2 + 1
    r1 = 0.0
    r2 = 0.0
    if KERPLE:
        r1 = tl.load(ptr + off_h)
        r2 = tl.load(ptr + Hq + off_h)
        ptr += 2 * Hq
    u_ptr = ptr + off_h * D
    if REL_U:
        ptr += Hq * D
    w_ptr = ptr + off_h * D
    if REL_W:
        ptr += Hq * D
    cap2 = 0.0
    if SOFTCAP:
        cap2 = tl.load(ptr) * LOG2E
        ptr += 1
    sink2 = 0.0
    if SINKS:
        sink2 = tl.load(ptr + off_h) * LOG2E
        ptr += Hq
    drop_p = 0.0
    if DROPOUT:
        drop_p = tl.load(ptr)
        ptr += 1
    slope = 0.0
    if ALIBI:  # last: the only segment whose size depends on B
        slope = tl.load(ptr + off_b * Hq + off_h)
    table_ptr = Table
    if TABLE:
        table_ptr += off_h * _table_row(tab_l, tab_r, TABLE)
    rel_rows = (2 * rel_k + 1) * D
    if REL_SHARED:
        ak_ptr = Rel
        av_ptr = Rel + rel_rows if REL_K else Rel
    else:
        ak_ptr = Rel + off_h * rel_rows
        av_ptr = ak_ptr + Hq * rel_rows if REL_K else ak_ptr
    return (slope, r1, r2, table_ptr, Bias + (off_b % bias_nb) * sbb + off_h * sbh, ak_ptr, av_ptr,
            u_ptr, w_ptr, cap2, sink2, drop_p)


@triton.jit
def _load_queries(q_ptr, pos_ptr, offs_m, offs_d, sqm, Nq, Nk, D, u_ptr, w_ptr, FLAGS: tl.constexpr, sqw=0):
    """A query block: its positions, its tile (already rotated with RoPE: _rope_rotate)
    and the tile plus Transformer-XL's u (for the content term) and w (for the
    position term), each rounded to the inputs' dtype. With XL_ROWS (the forward, dK /
    dV) the host has added them: q + u is read at q_ptr (returned as the tile too: its
    dtype is what is used), q + w at q_ptr + sqw (with a key table). Loaded, not
    computed, both stay in shared memory as the products' operands; computed here, each
    was reloaded into registers per key tile, and the masked Shaw forward spilled 204 B
    inside its loop (Triton 3.6, D = 80 / 128: bench/NOTES.md)."""
    REL_U: tl.constexpr = (FLAGS >> _REL_U.value) & 1
    REL_W: tl.constexpr = (FLAGS >> _REL_W.value) & 1
    qp = _positions(pos_ptr, offs_m, Nq, Nk - Nq, FLAGS)
    q = _load_tile(q_ptr, offs_m, offs_d, sqm, Nq, D)
    if (FLAGS >> _XL_ROWS.value) & 1:
        qu = q
        qw = q   # (read by Shaw's key term only)
        if (FLAGS >> _REL_K.value) & 1:
            qw = _load_tile(q_ptr + sqw, offs_m, offs_d, sqm, Nq, D)
    else:
        qu = _add_row(q, u_ptr, offs_d, D, REL_U)
        qw = _add_row(q, w_ptr, offs_d, D, REL_W)
    return qp, q, qu, qw


@triton.jit
def _logits(qu, qw, k, ak_ptr, start_m, start_n, Nq, Nk, rel_k, offs_d, D,
            FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(q + u) . k, plus (q + w) . aK[c(i, j)] with Shaw's key table: one product of
    the q tile with the tile's BLOCK_R-row slice of aK, then a per-row shift.
    Returns the logits and the aK slice (0.0 without a key table)."""
    REL_K: tl.constexpr = (FLAGS >> _REL_K.value) & 1
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    qk = _dot(qu, tl.trans(k), UPCAST)
    ak = 0.0
    if REL_K:
        ak = _load_rel(ak_ptr, _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_M, BLOCK_N), offs_d, D)
        ak = ak.to(qw.dtype)
        qk += _rel_to_keys(_dot(qw, tl.trans(ak), UPCAST), BLOCK_M, BLOCK_N)
    return qk, ak


@triton.jit
def _grid_gather(table_ptr, qp, kp, wh, ww, ROWS_HELD: tl.constexpr, KEY_POINTERS: tl.constexpr = 0):
    """GridBias's [BLOCK_M, BLOCK_N] tile read at any width or positions: an index per
    score, the row's code minus the key's. With ROWS_HELD and a Triton that lays a
    gather out first axis fastest (_GATHER_TIE_FIRST), gathered as the transposed tile:
    each thread then holds 1 key x BLOCK_M / 4 rows, a key's code once per tile and the
    rows' codes loop-invariant (untransposed, every score computed its key's code). The
    other way round without ROWS_HELD or with the last axis fastest.
    KEY_POINTERS: a 64-bit pointer per key (table - key code) plus the row's code, so the
    subtraction per score folds into the address (one instruction fewer a score: the
    forward's ACC tiles (BLOCK_D <= 128), and its 64-row blocks at BLOCK_D <= 64; the
    boundary tiles of 128-row blocks and D = 80 / 128 spilled so, bench/NOTES.md)."""
    rc = _grid_row_code(qp, wh, ww)
    kc = _grid_code(kp, wh, ww)
    if ROWS_HELD == _GATHER_TIE_FIRST:
        if KEY_POINTERS:
            return tl.trans(tl.load((table_ptr - kc)[:, None] + rc[None, :]))
        return tl.trans(tl.load(table_ptr + (rc[None, :] - kc[:, None])))
    else:
        if KEY_POINTERS:
            return tl.load((table_ptr - kc)[None, :] + rc[:, None])
        return tl.load(table_ptr + (rc[:, None] - kc[None, :]))


@triton.jit
def _grid_vec(vec_ptr, qp, kp, wh, ww, VEC_LOG: tl.constexpr):
    """GridBias's [BLOCK_M, BLOCK_N] tile from the host's vector copies (_triton.py
    _grid_vec_copies) at an even width Ww, G = 2^VEC_LOG its power-of-two factor (at most
    8): G keys from a multiple of G share a grid row, so their columns are consecutive.
    The copies turn them into consecutive, aligned addresses, read as one vector: each
    table row is padded to S = 2 Ww columns (key codes y S + x, multiples of G at such
    keys), the columns reversed (a key further right, a column further left: the next
    address), and A = min(G, 4) copies shifted by 0 .. A - 1 elements, a row reading the
    copy that aligns its reversed code to A (16 bytes at most: a copy's vector size).
    Rows past the window are clamped into it (_grid_xy)."""
    G: tl.constexpr = 1 << VEC_LOG
    A: tl.constexpr = min(G, 4)
    S = 2 * ww
    TP = (2 * wh - 1) * S                         # a copy's columns, padded
    p, y = _grid_xy(qp, wh, ww)
    o = (TP - 1) - (p + y * ww + (wh - 1) * S + ww - 1)   # the reversed column at key code 0
    c = (-o) & (A - 1)                            # the copy that aligns it: c elements further on
    row = tl.multiple_of(o + c * (TP + A + 1), A)
    # keys past the window (a boundary tile's, masked) read the last G keys', so that
    # every vector stays aligned and in the table
    kp_, ky = _grid_xy(tl.where(kp < wh * ww, kp, wh * ww - G + (kp & (G - 1))), wh, ww)
    kc = tl.max_contiguous(tl.multiple_of(kp_ + ky * ww, A), G)
    return tl.load((vec_ptr + kc)[None, :] + row[:, None])


@triton.jit
def _grid_line(line_ptr, qp, start_n, offs_n0, wh, ww):
    """GridBias's [BLOCK_M, BLOCK_N] tile from the host's lines (_triton.py
    _grid_line_rows) at an odd width, where no G keys from a multiple of G stay in one
    grid row: the bias of a query at column x against the key d tokens further on
    depends on x and d only, so line x holds it at _GRID_LINE_PAD + x 2N + (N - 1) - d
    (N = Wh Ww). A row's keys then read decreasing consecutive addresses: one pointer a
    row and a tile, the keys' offsets immediates of its loads (as _grid_tile's). Keys
    past the window (a boundary tile's, masked) read the padding or the line before;
    rows past it are clamped into it (_grid_xy)."""
    tl.static_assert(offs_n0.shape[0] <= _GRID_LINE_PAD)
    n = wh * ww
    p, y = _grid_xy(qp, wh, ww)
    rows = line_ptr + (_GRID_LINE_PAD + (p - y * ww) * (2 * n) + (n - 1) + p - start_n)
    if _GATHER_TIE_FIRST:   # (laid out a row a thread, its keys' offsets immediates, either way)
        return tl.load(rows[:, None] - offs_n0[None, :])
    else:
        return tl.trans(tl.load(rows[None, :] - offs_n0[:, None]))


@triton.jit
def _grid_tile(table_ptr, qp, start_n, tab_l, tab_r, GRID_LOG: tl.constexpr, BLOCK_N: tl.constexpr, Nk=None):
    """GridBias's [BLOCK_M, BLOCK_N] tile at default positions, Ww = 2^(GRID_LOG + 2): key
    start_n + j has code c0 + j + (Ww - 1)(j // Ww), c0 the tile's first key's (it starts
    a grid row when BLOCK_N >= Ww, else j // Ww = 0). A thread's columns are its lane's
    low bits plus multiples of 8, so these offsets are immediates of its loads from one
    pointer per row: no index per score. Rows past the window are clamped into it
    (_grid_xy); with Nk, keys past it (a boundary tile) read nothing (0.0)."""
    WW: tl.constexpr = 1 << (GRID_LOG + 2)
    j = tl.arange(0, BLOCK_N)
    rows = table_ptr + (_grid_row_code(qp, tab_l, tab_r) - (start_n + (start_n // WW) * (WW - 1)))
    ptrs = rows[:, None] - (j + (j // WW) * (WW - 1))[None, :]
    if Nk is None:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(start_n + j < Nk)[None, :], other=0.0)


@triton.jit
def _bias_tile(bias_ptr, offs_m, offs_n, start_n, Nq, Nk, stride_bm, FLAGS: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dense bias's [BLOCK_M, BLOCK_N] tile (its dtype; float32 when read in pairs)."""
    BIAS_KEYS: tl.constexpr = (FLAGS >> _BIAS_KEYS.value) & 1
    BIAS_TILES: tl.constexpr = (FLAGS >> _BIAS_TILES.value) & 1   # (set with BIAS_KEYS only)
    cols = offs_n if BIAS_KEYS else offs_n * 0  # stride 1 along the keys, or broadcast
    if MASKED and not BIAS_TILES:
        in_b = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        b = tl.load(bias_ptr + offs_m[:, None] * stride_bm + cols[None, :], mask=in_b, other=0)
    else:  # an interior tile: every key in bounds (rows past Nq read row Nq - 1's bias),
        # or rows padded to whole key tiles: a masked tile reads its keys unmasked too
        # (-inf / False past Nk: the keys' mask), as vectors: with a mask on
        # a key count not known to be a multiple of 16, Triton loads the tile an element
        # at a time and computed the softmax twice, in two layouts (bench/NOTES.md)
        tl.static_assert(BIAS_TILES == 0 or _BIAS_ROW_TILE % BLOCK_N == 0)
        b = _bias_value(_bias_raw(bias_ptr, offs_m, offs_n, start_n, Nq, stride_bm, FLAGS, BLOCK_M, BLOCK_N),
                        FLAGS, BLOCK_M, BLOCK_N)
    return b


@triton.jit
def _bias_raw(bias_ptr, offs_m, offs_n, start_n, Nq, stride_bm, FLAGS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """An in-bounds tile's bias as loaded (rows past Nq read row Nq - 1's): its elements,
    or with BIAS_PAIRS [BLOCK_M, BLOCK_N / 2] 32-bit words of two keys (_bias_value
    splits them)."""
    BIAS_KEYS: tl.constexpr = (FLAGS >> _BIAS_KEYS.value) & 1
    BIAS_MASK: tl.constexpr = (FLAGS >> _BIAS_MASK.value) & 1
    rows = tl.minimum(offs_m, Nq - 1)
    if (FLAGS >> _BIAS_PAIRS.value) & 1 and BIAS_KEYS and BIAS_MASK == 0:
        ptrs = (bias_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_bm // 2)
                + (start_n // 2 + tl.arange(0, BLOCK_N // 2))[None, :])
    else:
        ptrs = bias_ptr + rows[:, None] * stride_bm + (offs_n if BIAS_KEYS else offs_n * 0)[None, :]
    return tl.load(ptrs)


@triton.jit
def _bias_value(raw, FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_bias_raw's tile as values: bfloat16 is float32's upper half, so a word's low key is
    (w << 16) and its high key (w & 0xffff0000), one integer op per key, no conversion."""
    if (FLAGS >> _BIAS_PAIRS.value) & 1 and (FLAGS >> _BIAS_KEYS.value) & 1 and (FLAGS >> _BIAS_MASK.value) & 1 == 0:
        return tl.reshape(tl.join((raw << 16).to(tl.float32, bitcast=True),
                                  (raw & -65536).to(tl.float32, bitcast=True)), [BLOCK_M, BLOCK_N])
    else:
        return raw


@triton.jit
def _scores(qk, qp, kp, start_m, start_n, offs_m, offs_n, Nq, Nk, qk_scale, slope, r1, r2, table_ptr,
            tab_l, tab_r, bias_ptr, stride_bm, win_l, win_r, cap2,
            FLAGS: tl.constexpr, MASKED: tl.constexpr, NATURAL: tl.constexpr = 0, ROWS_HELD: tl.constexpr = 1,
            KEY_OFFSETS: tl.constexpr = 0, ROWS_BOUND: tl.constexpr = 1, KEY_POINTERS: tl.constexpr = 0):
    """The [BLOCK_M, BLOCK_N] score tile in the log2 domain, masked entries = -inf, its
    relative positions, and with SOFTCAP t = tanh(scale * logit / cap) (the capped
    logit is cap2 * t, cap2 = cap * log2(e)).
    MASKED: the tile may hold pairs out of bounds or hidden by causal / window (the
    loops pass 0 for the interior tiles they know to be fully visible: Triton's
    tutorial 06 masks the diagonal block only); a bool bias masks every tile.
    NATURAL: a dense bias is the only additive term, and the tile is returned in the
    natural domain, qk_scale * qk + bias (the caller folds log2(e) into its exponent).
    ROWS_HELD: a GridBias layout choice: the rows are fixed over the caller's loop and
    each thread may hold many rows' codes (0 for dK / dV, whose keys are fixed, and in
    the forward's masked boundary tiles or at given positions, where held row codes
    spill at D >= 80).
    KEY_OFFSETS: GridBias at a power-of-two Ww may read a tile from one pointer per row
    at compile-time key offsets (the forward's tiles here at BLOCK_D <= 64: at 80 / 128,
    Triton 3.9 spilled a register across the interior loop; its ACC tiles read the
    table / scale so at any BLOCK_D, _grid_tile).
    KEY_POINTERS: GridBias's gather (other widths) from a pointer per key
    (_grid_gather), with ROWS_HELD."""
    CAUSAL: tl.constexpr = (FLAGS >> _CAUSAL.value) & 1
    HAS_WL: tl.constexpr = (FLAGS >> _HAS_WL.value) & 1
    HAS_WR: tl.constexpr = (FLAGS >> _HAS_WR.value) & 1
    ALIBI: tl.constexpr = (FLAGS >> _ALIBI.value) & 1
    KERPLE: tl.constexpr = (FLAGS >> _KERPLE.value) & 1
    TABLE: tl.constexpr = (FLAGS >> _TABLE.value) & 3
    GRID_LOG: tl.constexpr = (FLAGS >> _GRID_WW.value) & 7
    HAS_POS: tl.constexpr = (FLAGS >> _HAS_POS.value) & 1
    BIAS: tl.constexpr = (FLAGS >> _BIAS.value) & 1
    BIAS_MASK: tl.constexpr = (FLAGS >> _BIAS_MASK.value) & 1
    BIAS_KEYS: tl.constexpr = (FLAGS >> _BIAS_KEYS.value) & 1
    BIAS_TILES: tl.constexpr = (FLAGS >> _BIAS_TILES.value) & 1   # (set with BIAS_KEYS only)
    SOFTCAP: tl.constexpr = (FLAGS >> _SOFTCAP.value) & 1
    FAST_TANH: tl.constexpr = (FLAGS >> _FAST_TANH.value) & 1
    if SOFTCAP:
        t = _tanh(qk * (qk_scale / cap2), FAST_TANH)
        s = cap2 * t
    else:
        t = 0.0
        s = qk * qk_scale
    rel = kp[None, :] - qp[:, None]
    if ALIBI:
        s -= (slope * LOG2E) * tl.abs(rel).to(tl.float32)
    if KERPLE:  # -r1 log(1 + r2 |rel|), in the log2 domain: -r1 log2(1 + r2 |rel|)
        s -= r1 * tl.math.log2(1.0 + r2 * tl.abs(rel).to(tl.float32))
    if TABLE == 1 and HAS_POS == 0:
        # rel = d + (j - i) for the tile's offsets i, j and d = start_n - start_m - shift:
        # one pointer per row, the columns at fixed offsets from it. d is clamped once per
        # tile: a tile wholly past L (or R) then reads only the padding, which repeats the
        # end column, and any other tile lies inside the padded row.
        tl.static_assert(qk.shape[0] + qk.shape[1] <= _TABLE_PAD + 2)
        d = tl.minimum(tl.maximum(start_n - start_m - (Nk - Nq), qk.shape[0] - 1 - tab_l - _TABLE_PAD),
                       tab_r + _TABLE_PAD + 1 - qk.shape[1])
        rows = table_ptr + (tab_l + _TABLE_PAD + d - (offs_m - start_m))[:, None]
        s += tl.load(rows + (offs_n - start_n)[None, :])
    elif TABLE == 1:
        s += tl.load(table_ptr + (_table_index(rel, qp, kp, tab_l, tab_r, TABLE) + _TABLE_PAD))
    elif TABLE and GRID_LOG and KEY_OFFSETS and HAS_POS == 0 and len(table_ptr.shape) == 0:
        # GridBias, Ww a power of two >= 8 (a boundary tile's keys past Nk read nothing)
        s += _grid_tile(table_ptr, qp, start_n, tab_l, tab_r, GRID_LOG, qk.shape[1], Nk if MASKED else None)
    elif TABLE and len(table_ptr.shape) > 0:
        # (a table row per tile row, decoding's heads packed as rows: this orientation)
        s += tl.load(table_ptr + _table_index(rel, qp, kp, tab_l, tab_r, TABLE))
    elif TABLE:
        s += _grid_gather(table_ptr, qp, kp, tab_l, tab_r, ROWS_HELD, KEY_POINTERS * ROWS_HELD)
    if BIAS:
        b = _bias_tile(bias_ptr, offs_m, offs_n, start_n, Nq, Nk, stride_bm, FLAGS, MASKED, qk.shape[0], qk.shape[1])
        if BIAS_MASK:
            visible = b != 0
        elif NATURAL:
            s += b.to(tl.float32)
        else:
            s += b.to(tl.float32) * LOG2E
    if MASKED:
        # Keys past Nk: a bias copied into whole key tiles hides them itself (its padding
        # is -inf, or False for a mask: posattn/_triton.py; packed sequences, which take
        # no dense bias today, would keep the compare: their Nk is per sequence). Rows
        # past Nq: the backward's sums need them masked; the forward never stores them
        # (ROWS_BOUND = 0)
        KEYS_BOUND: tl.constexpr = 1 - BIAS_TILES * (1 - ((FLAGS >> _VARLEN.value) & 1))
        keep = tl.full([1, 1], 1, tl.int1)
        if KEYS_BOUND:
            keep = keep & (offs_n[None, :] < Nk)
        if ROWS_BOUND:
            keep = keep & (offs_m[:, None] < Nq)
        if BIAS_MASK:
            keep = keep & visible
        if CAUSAL:
            keep = keep & (rel <= 0)
        if HAS_WL:
            keep = keep & (rel >= -win_l)
        if HAS_WR:
            keep = keep & (rel <= win_r)
        if KEYS_BOUND or ROWS_BOUND or BIAS_MASK or CAUSAL or HAS_WL or HAS_WR:
            s = tl.where(keep, s, float("-inf"))
    elif BIAS_MASK:
        s = tl.where(visible, s, float("-inf"))
    return s, rel, t


@triton.jit
def _probs_and_ds(qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2, delta, start_m, start_n, offs_m, offs_n,
                  offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, tab_l, tab_r,
                  bias_ptr, sbm, win_l, win_r, cap2, seed, rng_row, drop_p,
                  FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr = 1,
                  ROWS_HELD: tl.constexpr = 1):
    """Recompute P from the saved log-sum-exp and dS = P * (dP - delta), the gradient
    w.r.t. the natural-domain score scale * q.k + bias. dP_ij = dO_i . (v_j + aV[c]).
    Also returns rel, the aK slice (for dQ's position term) and dS_qk, the gradient
    w.r.t. scale * logit (dS; with SOFTCAP, dS * (1 - t^2)) that dQ, dK and d(aK) use, and
    the probabilities that multiplied the values (P; with DROPOUT, P * keep / (1 - p):
    dV and d(aV) use them). With DROPOUT, dP is masked and scaled the same way; delta =
    rowsum(dO * O) is unchanged (FlashAttention 2's dropout backward)."""
    REL_V: tl.constexpr = (FLAGS >> _REL_V.value) & 1
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    qk, ak = _logits(qu, qw, k, ak_ptr, start_m, start_n, Nq, Nk, rel_k, offs_d, D, FLAGS, BLOCK_M, BLOCK_N)
    SOFTCAP: tl.constexpr = (FLAGS >> _SOFTCAP.value) & 1
    DROPOUT: tl.constexpr = (FLAGS >> _DROPOUT.value) & 1
    s, rel, t = _scores(qk, qp, kp, start_m, start_n, offs_m, offs_n, Nq, Nk, qk_scale, slope, r1, r2, table_ptr,
                        tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, FLAGS, MASKED, ROWS_HELD=ROWS_HELD)
    p = tl.math.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), UPCAST)
    if REL_V:
        av = _load_rel(av_ptr, _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_M, BLOCK_N), offs_d, D)
        dp += _rel_to_keys(_dot(do, tl.trans(av.to(do.dtype)), UPCAST), BLOCK_M, BLOCK_N)
    if DROPOUT:
        keep = _dropout_keep(seed, rng_row, offs_m, start_n, drop_p, BLOCK_M, BLOCK_N)
        inv_keep = 1.0 / (1.0 - drop_p)
        dp = tl.where(keep, dp * inv_keep, 0.0)
        p_v = tl.where(keep, p * inv_keep, 0.0)
    else:
        p_v = p
    ds = p * (dp - delta[:, None])
    ds_qk = ds * (1.0 - t * t) if SOFTCAP else ds
    return p, ds, rel, ak, ds_qk, p_v
