"""The forward kernel: online softmax over the key tiles."""
import triton
import triton.language as tl

from .common import (LOG2E, _ALIBI, _ALIBI_MMA, _BIAS, _BIAS_MASK, _CAUSAL, _HAS_POS, _KERPLE, _REL_K, _REL_V, _SCALE_POS, _SCALE_POW2, _SINKS, _GRID_LINE, _GRID_LINE_PAD, _GRID_VEC, _GRID_WW, _TABLE_ACC,
                     _SOFTCAP, _TABLE, _UPCAST, _DROPOUT, _VARLEN, _beyond, _dot, _dropout_keep, _key_range, _load_tile,
                     _positions, _program_id_again, _sequence, _split_keys)
from .relative import _halves_dot, _keys_to_rel, _load_rel, _rel_end_rows, _rel_rows, _row_dot
from .scores import _bias_raw, _bias_value, _grid_gather, _grid_line, _grid_tile, _grid_vec, _head_params, _table_row, _load_queries, _logits, _scores, _table_far


@triton.jit
def _fwd_tile(acc, m_i, l_i, start_m, start_n, qu, qw, qp, pos_k, k_base, v_base, ak_ptr, av_ptr,
              offs_m, offs_n0, offs_d, Nq, Nk, D, skn, svn, rel_k, qk_scale, slope, r1, r2, table_ptr,
              tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, seed, rng_row, drop_p, col_add, row_add, v_add,
              FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              COLS: tl.constexpr = 0, V_ADD: tl.constexpr = 0, ACC: tl.constexpr = 0, acc_raw=None):
    """One key tile of the online softmax: scores, running max and sum, P @ V.
    row_add [BLOCK_M] (or a scalar) and, with COLS == 1, col_add [BLOCK_N]: terms (log2
    domain) outside FLAGS added to the tile's scores, row_add folded into the row max
    and the exponent: 0.0, a far DistanceBias tile's column, or ALiBi's bias on one
    side of the diagonal, slope * (j - i) = column term + row term.
    COLS == 2: ALiBi's column term on the tensor cores, as one more K=16 step of q.k:
    col_add is the [BLOCK_M, 16] row operand (_alibi_ext) and the keys' operand holds
    the key's offset j in its first three columns, so the step adds slope / scale * j
    to every logit: no add per score (the tiles at BLOCK_D <= 64, whose time is
    instruction issue, not the tensor cores). With V_ADD (Shaw's tiles beyond the clip,
    whose value term is rowsum(P) times aV's end row), v_add [BLOCK_M, 2] sums rowsum(P)
    over the tiles below (column 0) and above (column 1) the clip, rescaled with acc; the
    tile adds to column col_add, and the caller adds the sums times the end rows once,
    after its loop. Returned as the fourth value (v_add as given without V_ADD). With
    DROPOUT, P @ V takes P * keep (the 1 / (1 - p) is applied once, at the end); the row
    sum l does not.
    ACC: the tile's one additive term, acc_raw (_acc_term's load, which the loops'
    pipelining issues a stage ahead), is q.k's starting accumulator, so the tensor cores
    add it, with no add per score. 1 (unmasked tiles): a dense bias as _bias_raw loads
    it, qu holding scale * q (the natural-domain score); 2: GridBias's table / scale (in
    q.k's units), by _grid_tile's compile-time offsets at a power-of-two width, from
    _grid_vec's copies at another even one or _grid_line's lines at an odd one (these
    two in masked tiles too, given FLAGS without the table: _scores then only masks),
    else by _grid_gather."""
    REL_V: tl.constexpr = (FLAGS >> _REL_V.value) & 1
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    DROPOUT: tl.constexpr = (FLAGS >> _DROPOUT.value) & 1
    ADDITIVE: tl.constexpr = ((FLAGS >> _ALIBI.value) & 1 | (FLAGS >> _KERPLE.value) & 1 | (FLAGS >> _TABLE.value) & 3
                              | (FLAGS >> _REL_K.value) & 1 | (FLAGS >> _BIAS.value) & 1 & ~(FLAGS >> _BIAS_MASK.value))
    SOFTCAP: tl.constexpr = (FLAGS >> _SOFTCAP.value) & 1
    FUSED_SCALE: tl.constexpr = (FLAGS >> _SCALE_POS.value) & 1 if (ADDITIVE == 0 or ACC == 2) and SOFTCAP == 0 else 0
    # a dense bias alone: scale * qk + bias in one FMA per element, log2(e) in the exponent's
    NATURAL: tl.constexpr = ((FLAGS >> _BIAS.value) & 1 & ~(FLAGS >> _BIAS_MASK.value)) * (1 - SOFTCAP) * (
        ((FLAGS >> _ALIBI.value) & 1 | (FLAGS >> _KERPLE.value) & 1 | (FLAGS >> _TABLE.value) & 3
         | (FLAGS >> _REL_K.value) & 1) == 0)
    # GridBias's rows' codes held per thread over the loop (scores._scores): at default
    # positions, in the unmasked tiles and, for rows of at most 64 columns, the masked
    # ones (Swin's windows of 49-144 tokens are all boundary tiles); in masked tiles of
    # wider rows or at given positions (an integer division each) the heaviest
    # combinations then spill (tests/aot_compile.py)
    ROWS_HELD: tl.constexpr = (1 - MASKED * (offs_d.shape[0] > 64)) * (1 - ((FLAGS >> _HAS_POS.value) & 1))
    KEY_OFFSETS: tl.constexpr = offs_d.shape[0] <= 64
    # GridBias's gather from a pointer per key in 64-row blocks (Swin's windows: every
    # tile a boundary tile); 128-row ones spill so in their boundary loop (bench/NOTES.md)
    KEY_POINTERS: tl.constexpr = KEY_OFFSETS * (BLOCK_M <= 64)
    offs_n = start_n + offs_n0
    kp = _positions(pos_k, offs_n, Nk, 0, FLAGS)
    k = _load_tile(k_base, offs_n, offs_d, skn, Nk, D)
    if ACC:
        # (a masked tile takes GridBias's vectors, with FLAGS free of the table: _scores masks only)
        tl.static_assert(COLS == 0 and (MASKED == 0 or ACC == 2 and (FLAGS >> _TABLE.value) & 3 == 0))
        if ACC == 1:
            tl.static_assert(NATURAL == 1)
            init = _bias_value(acc_raw, FLAGS, BLOCK_M, BLOCK_N).to(tl.float32)
        else:
            tl.static_assert(FUSED_SCALE == 1)
            init = acc_raw
        if UPCAST:
            qk = tl.dot(qu.to(tl.float32), tl.trans(k).to(tl.float32), init)
        else:
            qk = tl.dot(qu, tl.trans(k), init)
    else:
        qk, ak = _logits(qu, qw, k, ak_ptr, start_m, start_n, Nq, Nk, rel_k, offs_d, D, FLAGS, BLOCK_M, BLOCK_N)
    if COLS == 2:
        tl.static_assert(BLOCK_N <= 256)   # the keys' offsets exact in bfloat16
        # (the offsets through float32: the interpreter converts int32 to bfloat16 wrongly)
        j = tl.arange(0, BLOCK_N)[:, None] + tl.zeros([BLOCK_N, 16], tl.int32)
        keys = tl.where(tl.arange(0, 16)[None, :] < 3, j.to(tl.float32), 0.0).to(col_add.dtype)
        qk += _dot(col_add, tl.trans(keys), UPCAST)
    if FUSED_SCALE:
        # No additive term and scale > 0: the row max is scale * max(qk), and
        # scale * qk - m is one FMA per element (Triton's tutorial 06).
        if ACC == 2 and MASKED == 0:
            s = qk
        else:
            s, rel, t = _scores(qk, qp, kp, start_m, start_n, offs_m, offs_n, Nq, Nk, 1.0, slope, r1, r2, table_ptr,
                                tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, FLAGS, MASKED, ROWS_HELD=ROWS_HELD,
                                KEY_OFFSETS=KEY_OFFSETS, ROWS_BOUND=0, KEY_POINTERS=KEY_POINTERS)
        if COLS == 1:  # scale * qk + column term: one FMA per element, then the row's
            s = s * qk_scale + col_add[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1) + row_add)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - (m_safe - row_add)[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale + row_add)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # as below
            p = tl.math.exp2(s * qk_scale - (m_safe - row_add)[:, None])
    elif NATURAL:
        tl.static_assert(COLS == 0)
        if ACC == 1:
            s = qk
        else:
            s, rel, t = _scores(qk, qp, kp, start_m, start_n, offs_m, offs_n, Nq, Nk, qk_scale / LOG2E, slope, r1,
                                r2, table_ptr, tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, FLAGS, MASKED, 1,
                                ROWS_HELD=ROWS_HELD, KEY_OFFSETS=KEY_OFFSETS, ROWS_BOUND=0, KEY_POINTERS=KEY_POINTERS)
        m_new = tl.maximum(m_i, tl.max(s, 1) * LOG2E + row_add)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # as below
        p = tl.math.exp2(s * LOG2E - (m_safe - row_add)[:, None])
    else:
        s, rel, t = _scores(qk, qp, kp, start_m, start_n, offs_m, offs_n, Nq, Nk, qk_scale, slope, r1, r2, table_ptr,
                         tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, FLAGS, MASKED, ROWS_HELD=ROWS_HELD,
                         KEY_OFFSETS=KEY_OFFSETS, ROWS_BOUND=0, KEY_POINTERS=KEY_POINTERS)
        tl.static_assert(COLS != 2)
        if COLS:
            s += col_add[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1) + row_add)
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - (m_safe - row_add)[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    p_sum = tl.sum(p, 1)
    l_i = l_i * alpha + p_sum
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, rng_row, offs_m, start_n, drop_p, BLOCK_M, BLOCK_N), p, 0.0)
    v = _load_tile(v_base, offs_n, offs_d, svn, Nk, D)
    acc = acc * alpha[:, None]
    if V_ADD:
        v_add = v_add * alpha[:, None] + tl.where(tl.arange(0, 2)[None, :] == col_add, p_sum[:, None], 0.0)
    acc += _dot(p.to(v.dtype), v, UPCAST)
    if REL_V:  # Shaw's value side: sum_j p_ij aV[c(i, j)], bucketed per row
        if BLOCK_M == BLOCK_N:   # the slice's two halves, each shifted without clamp or mask
            acc = _halves_dot(acc, p.to(v.dtype), av_ptr, start_m, start_n, Nq, Nk, rel_k, offs_d, D, BLOCK_N, UPCAST)
        else:
            av = _load_rel(av_ptr, _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_M, BLOCK_N), offs_d, D)
            acc += _dot(_keys_to_rel(p, BLOCK_M, BLOCK_N).to(v.dtype), av.to(v.dtype), UPCAST)
    return acc, m_new, l_i, v_add


@triton.jit
def _acc_term(start_n, bias_ptr, offs_m, offs_n0, Nq, sbm, acc_table, qp, tab_l, tab_r, FLAGS: tl.constexpr,
              ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The additive term _fwd_tile's ACC path starts q.k from, for the key tile at
    start_n: a dense bias as loaded (1), GridBias's tile in q.k's units (2); 0.0 without ACC."""
    if ACC == 1:
        return _bias_raw(bias_ptr, offs_m, start_n + offs_n0, start_n, Nq, sbm, FLAGS, BLOCK_M, BLOCK_N)
    elif ACC == 2 and (FLAGS >> _GRID_WW.value) & 7:
        return _grid_tile(acc_table, qp, start_n, tab_l, tab_r, (FLAGS >> _GRID_WW.value) & 7, BLOCK_N)
    elif ACC == 2 and (FLAGS >> _GRID_VEC.value) & 3:   # other even widths: G keys a vector
        return _grid_vec(acc_table, qp, start_n + offs_n0, tab_l, tab_r, (FLAGS >> _GRID_VEC.value) & 3)
    elif ACC == 2 and (FLAGS >> _GRID_LINE.value) & 1:   # odd widths: a line per query column
        return _grid_line(acc_table, qp, start_n, offs_n0, tab_l, tab_r)
    elif ACC == 2:  # odd widths past the lines' budget: an index per score (the rows' codes held over the loop)
        return _grid_gather(acc_table, qp, start_n + offs_n0, tab_l, tab_r, 1, KEY_POINTERS=1)
    else:
        return 0.0


@triton.jit
def _alibi_ext(x, BLOCK_M: tl.constexpr, dtype: tl.constexpr):
    """The [BLOCK_M, 16] row operand of ALiBi's K=16 step: every row holds x = slope /
    scale split into three bfloat16 parts (hi + mid + lo: 24 bits, float32's; the
    products with the keys' integer offsets are exact, their sum float32's)."""
    hi = x.to(dtype)
    mid = (x - hi.to(tl.float32)).to(dtype)
    lo = (x - hi.to(tl.float32) - mid.to(tl.float32)).to(dtype)
    c = tl.arange(0, 16)[None, :] + tl.zeros([BLOCK_M, 16], tl.int32)
    # (selected in float32: the interpreter would do arithmetic on bfloat16's raw bits)
    return tl.where(c == 0, hi.to(tl.float32), tl.where(c == 1, mid.to(tl.float32),
                                                       tl.where(c == 2, lo.to(tl.float32), 0.0))).to(dtype)


@triton.jit
def _block_keys(start_m, Nq, Nk, win_l, win_r, FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                LO_CONST: tl.constexpr = 0):
    """The key tiles of the query block at start_m (_key_range), split into the unmasked
    interior [f_lo, f_hi) and the others (_split_keys): lo, f_lo, f_hi, n_low, n_masked."""
    lo, hi = _key_range(start_m, BLOCK_M, Nq, Nk, win_l, win_r, FLAGS, BLOCK_N)
    if (FLAGS >> _VARLEN.value) & 1:  # a block past its sequence's rows (the grid fits the longest)
        hi = tl.where(start_m < Nq, hi, lo)
    f_lo, f_hi, n_low, n_masked = _split_keys(start_m, BLOCK_M, Nq, Nk, lo, hi, win_l, win_r, FLAGS, BLOCK_N,
                                              LO_CONST=LO_CONST)
    return lo, f_lo, f_hi, n_low, n_masked


@triton.jit
def _block_keys_again(pos_q, Nq, Nk, win_l, win_r, FLAGS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, LO_CONST: tl.constexpr = 0):
    """The query block's rows, positions and _block_keys from its program id read again
    (_program_id_again): what a loop after the first needs, not held across the first
    (_attn_fwd's AGAIN). Returns start_m, offs_m, qp, then _block_keys'."""
    start_m = _program_id_again(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    qp = _positions(pos_q, offs_m, Nq, Nk - Nq, FLAGS)
    lo, f_lo, f_hi, n_low, n_masked = _block_keys(start_m, Nq, Nk, win_l, win_r, FLAGS, BLOCK_M, BLOCK_N, LO_CONST)
    return start_m, offs_m, qp, lo, f_lo, f_hi, n_low, n_masked


@triton.jit
def _shaw_band(start_m, f_lo, f_hi, Nq, Nk, rel_k, SHAW_FAR: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Shaw's near band [b_lo, b_hi) of the interior [f_lo, f_hi) and the tiles beyond the
    clip (_beyond): b_lo, b_hi, n_side_low, n_side; without SHAW_FAR, all interior tiles
    are near."""
    if SHAW_FAR:
        b_lo, b_hi, n_side_low, n_side = _beyond(start_m, f_lo, f_hi, Nq, Nk, rel_k, rel_k, True, BLOCK_N, BLOCK_M)
        if CAUSAL:
            # no interior key is at or past the clip above the diagonal (j <= i + shift <
            # i + shift + K): the band ends with the interior, said so that the compiler
            # holds one scalar fewer over the loops (the D=128 masked loop spilled it)
            return b_lo, f_hi, n_side_low, n_side_low
        return b_lo, b_hi, n_side_low, n_side
    else:
        return f_lo, f_hi, 0, 0


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, Lse2, Pos, Params, Table, Bias, Rel, Rng,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sbb, sbh, sbm, bias_nb,
              Hq, Nq, Nk, D, GROUP, sm_scale, win_l, win_r, tab_l, tab_r, rel_k, sqw,
              FLAGS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, ACC_STAGES: tl.constexpr):
    """One program per (query block, head, batch): out, the natural-log lse (returned)
    and the log2-domain one the backward recomputes P from (no round trip).

    The key tiles that every row sees whole are scored without a mask (Triton's
    tutorial 06), the boundary tiles after them with one.

    Arguments: q, k, v and out by (batch, head, row) strides (the head dim is
    contiguous; with RoPE, q and k are _rope_rotate's rotated copies); Pos [B, Nq + Nk] the positions of the queries then of the keys (with
    HAS_POS); Params, Table, Rel the encodings' tensors (see _head_params); the dense
    bias by its (batch, head, query) strides, batch b reading bias[b % bias_nb]; with
    XL_ROWS, Q holds q + u and Q + sqw q + w (_load_queries)."""
    REL_K: tl.constexpr = (FLAGS >> _REL_K.value) & 1
    REL_V: tl.constexpr = (FLAGS >> _REL_V.value) & 1
    FAR: tl.constexpr = (((FLAGS >> _TABLE.value) & 3) == 1) * (1 - ((FLAGS >> _HAS_POS.value) & 1))
    NO_TABLE: tl.constexpr = FLAGS & ~(3 << _TABLE.value)
    # ALiBi as the only additive term, default positions: split at the diagonal
    ALIBI_SIDES: tl.constexpr = (((FLAGS >> _ALIBI.value) & 1) * (1 - ((FLAGS >> _HAS_POS.value) & 1))
                                 * (((FLAGS >> _KERPLE.value) & 1 | (FLAGS >> _TABLE.value) & 3
                                     | (FLAGS >> _BIAS.value) & 1 & ~(FLAGS >> _BIAS_MASK.value)) == 0))
    NO_ALIBI: tl.constexpr = FLAGS & ~(1 << _ALIBI.value)
    NO_REL: tl.constexpr = FLAGS & ~(1 << _REL_K.value) & ~(1 << _REL_V.value)
    CAUSAL: tl.constexpr = (FLAGS >> _CAUSAL.value) & 1
    SINKS: tl.constexpr = (FLAGS >> _SINKS.value) & 1
    DROPOUT: tl.constexpr = (FLAGS >> _DROPOUT.value) & 1
    # Shaw's tiles beyond the clip fold the key term into the row max and rowsum(P) aV:
    # not through a soft cap, nor under dropout
    SHAW_FAR: tl.constexpr = 1 - ((FLAGS >> _SOFTCAP.value) & 1 | DROPOUT)
    # At D = 80 / 128 (255 registers in the key loops), what is needed only after a key
    # loop (the boundary tiles' range and rows, the epilogue's offsets) is recomputed there
    # from the program ids read again (_program_id_again), not held across the loop: held,
    # it was spilled (bench/NOTES.md). At D <= 64 the compiler does better without.
    AGAIN: tl.constexpr = BLOCK_D > 64
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * Hq + off_h
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qk_scale = sm_scale * LOG2E
    NQ_T = Nq   # the lse rows' length (packed sequences: every sequence's rows)
    q0 = 0
    k0 = 0
    pb = off_b
    if (FLAGS >> _VARLEN.value) & 1:  # (a call only when packed: Triton's mutation analysis sees Pos)
        q0, k0, Nq, Nk = _sequence(Pos, off_b)
        pb = off_b * 0
    stat_bh = pb * Hq + off_h

    slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr, cap2, sink2, drop_p = _head_params(
        pb, off_h, Params, Table, tab_l, tab_r, Bias, sbb, sbh, bias_nb, Rel, rel_k, Hq, D, FLAGS, ROT_DIM)
    pos_q = Pos + off_b * (Nq + Nk)
    qp, q, qu, qw = _load_queries(Q + off_b * sqb + off_h * sqh + q0 * sqm, pos_q, offs_m, offs_d, sqm, Nq, Nk, D,
                                  u_ptr, w_ptr, FLAGS, sqw)
    k_base = K + off_b * skb + off_hk * skh + k0 * skn
    v_base = V + off_b * svb + off_hk * svh + k0 * svn
    seed = tl.load(Rng) if DROPOUT else 0
    rng_row = off_bh   # dropout's counter word for (batch, head)

    if SINKS:  # the sink as the first "key": exp2(sink2 - m) with m = sink2, no value
        m_i = tl.zeros([BLOCK_M], tl.float32) + sink2
        l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # (Shaw's split with n_low constant: with AGAIN, see _split_keys' LO_CONST)
    lo, f_lo, f_hi, n_low, n_masked = _block_keys(start_m, Nq, Nk, win_l, win_r, FLAGS, BLOCK_M, BLOCK_N,
                                                  LO_CONST=AGAIN * (REL_K | REL_V))
    if REL_K or REL_V:
        # Shaw (default positions): interior tiles wholly beyond the clip (rel <= -K or
        # >= K) read aK / aV's end rows only: the key term is a per-row constant
        # (q + w) . aK[0 or 2K], folded into the row max, and the value term adds
        # rowsum(P) aV[0 or 2K]. They run as plain tiles; the others (near the
        # diagonal, boundaries) in one masked loop (two copies of its large body spill).
        b_lo, b_hi, n_side_low, n_side = _shaw_band(start_m, f_lo, f_hi, Nq, Nk, rel_k, SHAW_FAR, BLOCK_M, BLOCK_N, CAUSAL)
        ak_low, ak_high, av_low, av_high = _rel_end_rows(ak_ptr, av_ptr, rel_k, offs_d, D, q, REL_K, REL_V)
        r_low = _row_dot(qw, ak_low, REL_K) * qk_scale
        r_high = _row_dot(qw, ak_high, REL_K) * qk_scale
        sums = tl.zeros([BLOCK_M, 2], tl.float32)   # rowsum(P) beyond the clip, below / above
        for t in range(0, n_side):
            low = t < n_side_low
            start_n = tl.where(low, f_lo + t * BLOCK_N, b_hi + (t - n_side_low) * BLOCK_N)
            acc, m_i, l_i, sums = _fwd_tile(acc, m_i, l_i, start_m, start_n, qu, qw, qp, pos_q + Nq, k_base, v_base,
                                      ak_ptr, av_ptr, offs_m, offs_n0, offs_d, Nq, Nk, D, skn, svn, rel_k, qk_scale,
                                      slope, r1, r2, table_ptr, tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, seed, rng_row, drop_p,
                                      tl.where(low, 0, 1), tl.where(low, r_low, r_high), sums, NO_REL,
                                      BLOCK_M, BLOCK_N, 0, 0, REL_V)
        if REL_V:
            s_low, s_high = tl.split(sums)
            acc += s_low[:, None] * av_low[None, :] + s_high[:, None] * av_high[None, :]
        if AGAIN:  # the masked loop's range and rows, recomputed
            start_m, offs_m, qp, lo, f_lo, f_hi, n_low, n_masked = _block_keys_again(
                pos_q, Nq, Nk, win_l, win_r, FLAGS, BLOCK_M, BLOCK_N, LO_CONST=AGAIN)
            b_lo, b_hi, n_side_low, n_side = _shaw_band(start_m, f_lo, f_hi, Nq, Nk, rel_k, SHAW_FAR, BLOCK_M,
                                                        BLOCK_N, CAUSAL)
        n_near = (b_hi - b_lo) // BLOCK_N
        for t in range(0, n_masked + n_near):  # boundary tiles below, near tiles, boundary tiles above
            start_n = tl.where(t < n_low, lo + t * BLOCK_N,
                               tl.where(t < n_low + n_near, b_lo + (t - n_low) * BLOCK_N,
                                        f_hi + (t - n_low - n_near) * BLOCK_N))
            acc, m_i, l_i, _ = _fwd_tile(acc, m_i, l_i, start_m, start_n, qu, qw, qp, pos_q + Nq, k_base, v_base,
                                      ak_ptr, av_ptr, offs_m, offs_n0, offs_d, Nq, Nk, D, skn, svn, rel_k, qk_scale,
                                      slope, r1, r2, table_ptr, tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, seed, rng_row, drop_p, 0.0, 0.0, 0.0,
                                      FLAGS, BLOCK_M, BLOCK_N, 1)
    else:
        b_lo = f_lo
        b_hi = f_hi
        if FAR or ALIBI_SIDES:
            # Interior tiles wholly on one side of a band around the diagonal, where the
            # bias is separable: far DistanceBias tiles read one table column; with
            # ALiBi alone, |rel| is rel or -rel. Scored as plain tiles plus row and
            # column terms; the band's tiles (below) gather / take |rel| per element.
            slope2 = slope * LOG2E
            c_low = 0.0
            c_high = 0.0
            if FAR:
                b_lo, b_hi, n_side_low, n_side, c_low, c_high = _table_far(start_m, f_lo, f_hi, Nq, Nk, tab_l,
                                                                           tab_r, table_ptr, True, BLOCK_N, BLOCK_M)
            else:  # ALiBi: rel <= 0 for every pair below the diagonal's tiles, >= 0 above
                b_lo, b_hi, n_side_low, n_side = _beyond(start_m, f_lo, f_hi, Nq, Nk, 0, 0, True, BLOCK_N, BLOCK_M)
            # ALiBi's column term as a K=16 step of q.k (_fwd_tile's COLS == 2) where the
            # tiles cost instruction issue (BLOCK_D <= 64), scale > 0, bfloat16 inputs (the
            # operands hold slope / scale: float16's range would end at 65504)
            EXT: tl.constexpr = ALIBI_SIDES * ((FLAGS >> _ALIBI_MMA.value) & 1) * (BLOCK_D <= 64) * (
                Q.dtype.element_ty == tl.bfloat16) * ((FLAGS >> _SCALE_POS.value) & 1) * (1 - ((FLAGS >> _SOFTCAP.value) & 1))
            if EXT:  # below the diagonal, and negated for above it
                ext = _alibi_ext(slope / sm_scale, BLOCK_M, Q.dtype.element_ty)
                ext_neg = _alibi_ext(-slope / sm_scale, BLOCK_M, Q.dtype.element_ty)
            for t in range(0, n_side):
                low = t < n_side_low
                start_n = tl.where(low, f_lo + t * BLOCK_N, b_hi + (t - n_side_low) * BLOCK_N)
                if FAR:
                    col = 0.0
                    row = tl.where(low, c_low, c_high)
                else:  # -slope |rel| = sign * slope * ((j - start_n) - (q_pos - start_n)), sign = +1 below
                    sign = 1.0 if CAUSAL else tl.where(low, 1.0, -1.0)
                    if EXT:
                        col = ext if CAUSAL else tl.where(low, ext, ext_neg)
                    else:
                        col = (sign * slope2) * offs_n0.to(tl.float32)
                    row = (-sign * slope2) * (qp - start_n).to(tl.float32)
                acc, m_i, l_i, _ = _fwd_tile(acc, m_i, l_i, start_m, start_n, qu, qw, qp, pos_q + Nq, k_base, v_base,
                                          ak_ptr, av_ptr, offs_m, offs_n0, offs_d, Nq, Nk, D, skn, svn, rel_k,
                                          qk_scale, slope, r1, r2, table_ptr, tab_l, tab_r, bias_ptr, sbm, win_l,
                                          win_r, cap2, seed, rng_row, drop_p, col, row, 0.0, NO_TABLE if FAR else NO_ALIBI, BLOCK_M, BLOCK_N, 0,
                                          0 if FAR else 1 + EXT)
        # The interior tiles' one additive term as q.k's starting accumulator (_fwd_tile's
        # ACC), where posattn/_triton.py's _acc_terms sets its bit (the term alone, 16-bit
        # inputs): SCALE_POW2, D <= 64 (where instruction issue, not the tensor cores,
        # bounds the tiles), a dense bias with q scaled once here (exactly: a power-of-two
        # scale, bfloat16); TABLE_ACC, D <= 128 (the gather's issue beyond the tensor
        # cores' time at 80 / 128 too), GridBias from the host's table / scale (rows,
        # vector copies or lines, after the heads' log2-domain rows)
        BIAS_ACC: tl.constexpr = (FLAGS >> _SCALE_POW2.value) & 1
        GRID_ACC: tl.constexpr = (FLAGS >> _TABLE_ACC.value) & 1
        tl.static_assert(BIAS_ACC == 0 or BLOCK_D <= 64)
        tl.static_assert(GRID_ACC == 0 or BLOCK_D <= 128)
        tl.static_assert(BIAS_ACC == 0 or Q.dtype.element_ty == tl.bfloat16)
        ACC: tl.constexpr = 1 if BIAS_ACC else 2 if GRID_ACC else 0
        q_in = qu
        if BIAS_ACC:
            q_in = (qu.to(tl.float32) * sm_scale).to(qu.dtype)
        # the head's table / scale, after the heads' rows (posattn/_triton.py _acc_terms)
        acc_table = table_ptr
        if GRID_ACC and (FLAGS >> _GRID_VEC.value) & 3:
            # its vector copies (scores._grid_vec): A copies of (2 Wh - 1) 2 Ww + A columns
            # after the heads' rows rounded up to 4 floats, so 16-byte aligned, written so
            # that the compiler can tell (A * A divides it)
            VA: tl.constexpr = min(1 << ((FLAGS >> _GRID_VEC.value) & 3), 4)
            acc_table = Table + ((Hq * _table_row(tab_l, tab_r, 2) + 3) // 4) * 4 \
                + off_h * (VA * VA) * ((2 * tab_r // VA) * (2 * tab_l - 1) + 1)
        elif GRID_ACC and (FLAGS >> _GRID_LINE.value) & 1:
            # its lines (scores._grid_line)
            acc_table = Table + Hq * _table_row(tab_l, tab_r, 2) \
                + off_h * (_GRID_LINE_PAD + tab_r * (2 * tab_l * tab_r))
        elif GRID_ACC:   # its row of table / scale
            acc_table = table_ptr + Hq * _table_row(tab_l, tab_r, 2)
        i_hi = b_lo if ALIBI_SIDES and CAUSAL else b_hi
        # interior tiles: no mask (none left here for causal ALiBi: all are below the diagonal).
        # With ACC, the launch's stage count given to the loop itself: Triton's pipeliner then
        # prefetches the ACC term as well (by default only a product's operands, not its
        # accumulator)
        for start_n in tl.range(b_lo, i_hi, BLOCK_N, num_stages=ACC_STAGES if ACC else None):
            cur = _acc_term(start_n, bias_ptr, offs_m, offs_n0, Nq, sbm, acc_table, qp, tab_l, tab_r, FLAGS, ACC,
                            BLOCK_M, BLOCK_N)
            acc, m_i, l_i, _ = _fwd_tile(acc, m_i, l_i, start_m, start_n, q_in, qw, qp, pos_q + Nq, k_base, v_base,
                                      ak_ptr, av_ptr, offs_m, offs_n0, offs_d, Nq, Nk, D, skn, svn, rel_k, qk_scale,
                                      slope, r1, r2, table_ptr, tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, seed, rng_row, drop_p, 0.0, 0.0, 0.0,
                                      FLAGS, BLOCK_M, BLOCK_N, 0, ACC=ACC, acc_raw=cur)
        if AGAIN:  # the boundary tiles' range and rows, recomputed
            start_m, offs_m, qp, lo, f_lo, f_hi, n_low, n_masked = _block_keys_again(
                pos_q, Nq, Nk, win_l, win_r, FLAGS, BLOCK_M, BLOCK_N)
        # GridBias's vectors or lines start the boundary tiles' q.k too (the general gather's
        # 64-bit address per score, pipelined, spilled beside 128x128 tiles), masks after
        VEC_ACC: tl.constexpr = 2 * GRID_ACC * (((FLAGS >> _GRID_VEC.value) & 3 | (FLAGS >> _GRID_LINE.value) & 1) > 0)
        for t in range(0, n_masked):  # boundary tiles (bounds, causal diagonal, window edges), masked
            start_n = tl.where(t < n_low, lo + t * BLOCK_N, f_hi + (t - n_low) * BLOCK_N)
            cur = _acc_term(start_n, bias_ptr, offs_m, offs_n0, Nq, sbm, acc_table, qp, tab_l, tab_r, FLAGS, VEC_ACC,
                            BLOCK_M, BLOCK_N)
            acc, m_i, l_i, _ = _fwd_tile(acc, m_i, l_i, start_m, start_n, qu, qw, qp, pos_q + Nq, k_base, v_base,
                                      ak_ptr, av_ptr, offs_m, offs_n0, offs_d, Nq, Nk, D, skn, svn, rel_k, qk_scale,
                                      slope, r1, r2, table_ptr, tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, seed, rng_row, drop_p, 0.0, 0.0, 0.0,
                                      NO_TABLE if VEC_ACC else FLAGS, BLOCK_M, BLOCK_N, 1, ACC=VEC_ACC, acc_raw=cur)

    if AGAIN:  # the epilogue's offsets, recomputed
        start_m = _program_id_again(0) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        off_h = _program_id_again(1).to(tl.int64)
        off_b = _program_id_again(2).to(tl.int64)
        stat_bh = off_b * Hq + off_h
        if (FLAGS >> _VARLEN.value) & 1:
            q0 = tl.load(Pos + off_b)
            stat_bh = off_h
    # Rows that saw no key: output 0, lse = -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - drop_p))
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = Out + off_b * sob + off_h * soh + (q0 + offs_m[:, None]) * som + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D))
    tl.store(Lse + stat_bh * NQ_T + q0 + offs_m, lse2 / LOG2E, mask=offs_m < Nq)
    tl.store(Lse2 + stat_bh * NQ_T + q0 + offs_m, lse2, mask=offs_m < Nq)


@triton.jit
def _dropout_mask(Rng, Out, Nq, Nk, drop_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask [B * Hq, Nq, Nk] (int8) of seed Rng[0]: posattn.testing's hook, and
    the double backward's reference pass (the attention kernels never store it)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2).to(tl.int64)
    keep = _dropout_keep(tl.load(Rng), bh, offs_m, tl.program_id(1) * BLOCK_N, drop_p, BLOCK_M, BLOCK_N)
    tl.store(Out + (bh * Nq + offs_m[:, None]) * Nk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk))
