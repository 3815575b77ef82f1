"""dQ and the encodings' parameter gradients (slopes, KERPLE, tables, u / w, the
clipped end rows of aK / aV), reduced per query block into slots the host sums in a
fixed order; with DELTA_PASS, the exact-delta pass."""
import triton
import triton.language as tl

from .common import (LOG2E, _CORRECT, _HAS_POS, _DELTA_PASS, _TABLE_PASS, _ONE_TILE, _D_AK, _D_AV, _D_KERPLE, _D_SLOPE,
                     _D_TABLE, _D_U, _D_W, _DROPOUT, _REL_K, _REL_V, _ROPE, _ROPE_AXES, _SINKS, _SOFTCAP, _TABLE, _UPCAST, _VARLEN, _sequence, _beyond, _dot, _key_range, _part_range,
                     _load_row_stats, _load_tile, _positions, _stats_row)
from .rope import _rope_factor, _unrotate
from .relative import _halves_dot, _keys_to_rel, _row_gather, _rel_end_rows, _row_dot
from .scores import _grid_xy, _head_params, _load_queries, _probs_and_ds, _table_columns, _table_far, _table_index


@triton.jit
def _grad_slot(D, T, GRADS: tl.constexpr):
    """Offsets of each parameter gradient in a DParams slot, and the slot's size."""
    D_SLOPE: tl.constexpr = (GRADS >> _D_SLOPE.value) & 1
    D_KERPLE: tl.constexpr = (GRADS >> _D_KERPLE.value) & 1
    D_U: tl.constexpr = (GRADS >> _D_U.value) & 1
    D_W: tl.constexpr = (GRADS >> _D_W.value) & 1
    D_AK: tl.constexpr = (GRADS >> _D_AK.value) & 1
    D_AV: tl.constexpr = (GRADS >> _D_AV.value) & 1
    D_TABLE: tl.constexpr = (GRADS >> _D_TABLE.value) & 1
    o_slope = 0
    o_kerple = o_slope + D_SLOPE
    o_u = o_kerple + 2 * D_KERPLE
    o_w = o_u + D * D_U
    o_ak = o_w + D * D_W
    o_av = o_ak + 2 * D * D_AK
    o_tab = o_av + 2 * D * D_AV
    return o_slope, o_kerple, o_u, o_w, o_ak, o_av, o_tab, o_tab + T * D_TABLE


@triton.jit
def _distance_histogram(d_tab, ds, start_m, start_n, Nq, Nk, tab_l, tab_r, T, offs_t,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """d_tab += dS summed by DistanceBias column, default positions: a column is a
    diagonal (rel = j - i - (Nk - Nq)) clamped to [-L, R]. The tile's diagonals are
    summed at once (Shaw's per-row shift, then a column sum: [BLOCK_R] sums), then
    land on the columns: the clamped ends on 0 and T - 1, the rest on consecutive
    columns by one register gather (no per-column loop)."""
    BLOCK_R: tl.constexpr = 2 * BLOCK_M if BLOCK_M >= BLOCK_N else 2 * BLOCK_N  # as in _keys_to_rel
    diag = tl.sum(_keys_to_rel(ds, BLOCK_M, BLOCK_N), 0)          # [BLOCK_R]: slice row r
    rel0 = start_n - start_m - (BLOCK_M - 1) - (Nk - Nq)         # rel of slice row 0
    rel_r = rel0 + tl.arange(0, BLOCK_R)
    left = tl.sum(tl.where(rel_r <= -tab_l, diag, 0.0), 0)
    right = tl.sum(tl.where((rel_r >= tab_r) & (rel_r > -tab_l), diag, 0.0), 0)
    r = offs_t - tab_l - rel0                                      # slice row of column t (rel = t - L)
    inside = (offs_t >= 1) & (offs_t <= T - 2) & (r >= 0) & (r < BLOCK_R)
    mid = tl.gather(diag, tl.minimum(tl.maximum(r, 0), BLOCK_R - 1), axis=0)
    return d_tab + tl.where(inside, mid, 0.0) + tl.where(offs_t == 0, left, 0.0) + tl.where(offs_t == T - 1, right, 0.0)


@triton.jit
def _land(d_tab, diag, r, BLOCK_R: tl.constexpr):
    """d_tab[t] += diag[r[t]] where r[t] lies in [0, BLOCK_R) (one unsigned comparison;
    r wrapped into it for the register gather)."""
    return d_tab + tl.where(r.to(tl.uint32) < BLOCK_R, tl.gather(diag, r & (BLOCK_R - 1), axis=0), 0.0)


@triton.jit
def _code_key(c, ww, start_n, BLOCK_N: tl.constexpr):
    """For GridBias key codes c = y (2 Ww - 1) + x: the tile's key with that code (its
    index from start_n, wrapped into [0, BLOCK_N)) and whether there is one. The grid
    row y = c // (2 Ww - 1) in float32 (the quotient is at most 2 Wh - 1 and the table
    has at most 8192 columns: its error stays far below 1 / (2 (2 Ww - 1))); a code is
    a key's when x = c - y (2 Ww - 1) < Ww (negative codes never are), at position
    c - y (Ww - 1)."""
    y = ((c.to(tl.float32) + 0.5) * (1.0 / (2 * ww - 1))).to(tl.int32)
    j = c - y * (ww - 1) - start_n
    hit = ((c - y * (2 * ww - 1)).to(tl.uint32) < ww) & (j.to(tl.uint32) < BLOCK_N)
    return j & (BLOCK_N - 1), hit


@triton.jit
def _grid_histogram(d_tab, ds, qp, start_m, start_n, Nq, Nk, wh, ww, offs_t, t_first,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """d_tab += dS summed by GridBias column, default positions. Pair (i, j) adds to
    column t = R_i - C_j, a row code minus a key code (_table_index); equally
    t = K0 + dy (Ww - 1) - rel (rel = kp - qp, dy = yq - yk the grid rows' difference,
    K0 = (Wh - 1)(2 Ww - 1) + Ww - 1). Each tile takes the cheapest of these sums, each
    landing on consecutive columns by one register gather (_land):
    - one dy (rows and keys each in one grid row): t is a diagonal; the tile is shifted
      onto its diagonals (Shaw's per-row shift, as _distance_histogram does) and summed;
    - several dy over a narrow span of t (small windows): each row gathers, for each t
      of the span in turn, the key whose code is R_i - t (if any), and the slots are
      summed: BLOCK_N columns per round, span / BLOCK_N rounds (three for Swin's 7 x 7),
      from dS moved into key-code space when the tile's codes fit 2 BLOCK_N columns;
    - otherwise the diagonal shift once, summed once per dy (its keys masked per row).
    Rows and keys past Nq / Nk have dS = 0: wherever their clamped positions put them,
    they add nothing. d_tab holds columns offs_t = t_first + [0, BLOCK_T): the sums
    reaching no column of them are skipped."""
    BLOCK_R: tl.constexpr = 2 * BLOCK_M if BLOCK_M >= BLOCK_N else 2 * BLOCK_N  # as in _keys_to_rel
    # a code-space round's columns: BLOCK_N, not BLOCK_R (static sm_90 model, 64x64 tiles:
    # a 128-column round 1693 cycles, a 64-column one 794, a 32-column one 751)
    ROUND: tl.constexpr = BLOCK_N
    k_last = tl.minimum(start_n + BLOCK_N, Nk) - 1               # the last key in bounds (keys lie in the window)
    p_q, yq = _grid_xy(qp, wh, ww)
    live = qp < Nk                                               # rows in bounds (qp = row + Nk - Nq)
    # y and the codes grow with the position: the first and last rows / keys hold the ends
    y_lo = tl.min(yq, 0) - k_last // ww
    y_hi = tl.max(tl.where(live, yq, 0), 0) - start_n // ww
    row = p_q + yq * (ww - 1) + ((wh - 1) * (2 * ww - 1) + ww - 1)  # R_i
    t_hi = tl.max(tl.where(live, row, 0), 0) - (start_n + (start_n // ww) * (ww - 1))
    t_lo = tl.min(row, 0) - (k_last + (k_last // ww) * (ww - 1))
    BLOCK_T: tl.constexpr = offs_t.shape[0]
    CW: tl.constexpr = 2 * BLOCK_N                                # the code-space rounds' window
    c_first = start_n + (start_n // ww) * (ww - 1)               # the first and last keys' codes
    c_last = k_last + (k_last // ww) * (ww - 1)
    t_hi = tl.minimum(t_hi, t_first + BLOCK_T - 1)
    t_lo = tl.maximum(t_lo, t_first)
    rounds = tl.maximum(t_hi - t_lo + ROUND, 0) // ROUND
    # the dy whose table rows (2 Ww - 1 columns each) meet d_tab's columns
    d_lo = tl.maximum(y_lo, t_first // (2 * ww - 1) - (wh - 1))
    d_hi = tl.minimum(y_hi, (t_first + BLOCK_T - 1) // (2 * ww - 1) - (wh - 1))
    rel0 = start_n - start_m - (BLOCK_M - 1) - (Nk - Nq)          # rel of slice row 0
    base = (wh - 1) * (2 * ww - 1) + ww - 1 - rel0 - offs_t       # slice row of column t, less dy (Ww - 1)
    if y_lo == y_hi:
        d_tab = _land(d_tab, tl.sum(_keys_to_rel(ds, BLOCK_M, BLOCK_N), 0), base + y_lo * (ww - 1), BLOCK_R)
    elif c_last - c_first < CW - 1 and rounds <= 2 * (d_hi - d_lo + 1):
        # The tile's key codes fit a window of CW - 1 columns: dS is moved into key-code
        # space once (column c - c_first holds the key whose code is c, 0 where none has
        # it; the last column never does), and slot s of a round (t = t_hi - h ROUND - s)
        # reads row i's column R_i - t - c_first, clamped into the window (a code outside
        # it reads the last column's 0): an offset and a clamp per slot, where the rounds
        # below divide. (Static sm_90 model, 64x64 tiles: a round 259-302 cycles against
        # 616-658, the move about 120; a dy sum 611-700.)
        jk, key = _code_key(c_first + tl.arange(0, CW), ww, start_n, BLOCK_N)
        dsc = tl.where(key[None, :], _row_gather(ds, tl.broadcast_to(jk[None, :], [BLOCK_M, CW])), 0.0)
        for h in range(0, rounds):
            off = ((row - t_hi + h * ROUND - c_first)[:, None] + tl.arange(0, ROUND)[None, :]).to(tl.uint32)
            sums = tl.sum(_row_gather(dsc, tl.minimum(off, CW - 1).to(tl.int32)), 0)
            d_tab = _land(d_tab, sums, t_hi - h * ROUND - offs_t, ROUND)
    elif 5 * rounds <= 4 * (d_hi - d_lo + 1):   # a round costs about 1.25 dy sums (static sm_90 model)
        for h in range(0, rounds):
            # slot s: t = t_hi - h ROUND - s, the key code c = R_i - t
            j, hit = _code_key((row - t_hi + h * ROUND)[:, None] + tl.arange(0, ROUND)[None, :], ww, start_n,
                               BLOCK_N)
            sums = tl.sum(tl.where(hit, _row_gather(ds, j), 0.0), 0)
            d_tab = _land(d_tab, sums, t_hi - h * ROUND - offs_t, ROUND)
    else:
        x = _keys_to_rel(ds, BLOCK_M, BLOCK_N)                    # [BLOCK_M, BLOCK_R]: key at rel0 + r
        # slot r of row i holds the key at kp = qp + rel0 + r: it is in grid row yq - d
        # when kp - (yq - d) Ww lies in [0, Ww) (one unsigned comparison per entry)
        x0 = qp - yq * ww + rel0
        for d in range(d_lo, d_hi + 1):
            in_d = ((x0 + d * ww)[:, None] + tl.arange(0, BLOCK_R)[None, :]).to(tl.uint32) < ww
            d_tab = _land(d_tab, tl.sum(tl.where(in_d, x, 0.0), 0), base + d * (ww - 1), BLOCK_R)
    return d_tab


@triton.jit
def _delta_shift(row_s, row_l, delta, lse2, sink2, offs_m, Nq, SINKS: tl.constexpr):
    """CORRECT's correction from a row's sums of dS (row_s) and P (row_l), delta being
    rowsum(dO * O): the live rows, 1 / l (0 elsewhere), shift = delta_exact - delta and
    l. The sink's probability joins the total, with no dS of its own:
    s_i = L delta_exact - delta (L - P_sink)."""
    p_sink = tl.math.exp2(sink2 - lse2) if SINKS else 0.0
    row_l = row_l + p_sink
    live = (offs_m < Nq) & (row_l > 0.0)
    inv_l = tl.where(live, 1.0 / tl.where(live, row_l, 1.0), 0.0)
    return live, inv_l, (row_s - delta * p_sink) * inv_l, row_l


@triton.jit
def _table_histogram(d_tab, ds, rel, qp, kp, start_m, start_n, Nq, Nk, tab_l, tab_r, T, offs_t,
                     FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, t_first=0):
    """d_tab += the tile's dS summed by table column (d_tab holds columns offs_t, from
    t_first: GridBias's chunks)."""
    HAS_POS: tl.constexpr = (FLAGS >> _HAS_POS.value) & 1
    TABLE: tl.constexpr = (FLAGS >> _TABLE.value) & 3
    if TABLE == 1 and not HAS_POS:
        d_tab = _distance_histogram(d_tab, ds, start_m, start_n, Nq, Nk, tab_l, tab_r, T, offs_t, BLOCK_M, BLOCK_N)
    elif TABLE == 2 and not HAS_POS:
        d_tab = _grid_histogram(d_tab, ds, qp, start_m, start_n, Nq, Nk, tab_l, tab_r, offs_t, t_first, BLOCK_M,
                                BLOCK_N)
    else:
        # Over only the columns this tile touches: far from the diagonal every entry
        # clamps to one column.
        idx = _table_index(rel, qp, kp, tab_l, tab_r, TABLE)
        live = ds != 0.0
        c_lo = tl.min(tl.where(live, idx, T))
        c_hi = tl.max(tl.where(live, idx, -1))
        for c in range(c_lo, c_hi + 1):
            d_tab += tl.where(offs_t == c, tl.sum(tl.sum(tl.where(idx == c, ds, 0.0), 1), 0), 0.0)
    return d_tab


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, Stats, DQ, DParams, Pos, Params, Table, Bias, Rel, Rng,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                 sbb, sbh, sbm, bias_nb,
                 Hq, Nq, Nk, D, GROUP, sm_scale, win_l, win_r, tab_l, tab_r, rel_k,
                 FLAGS: tl.constexpr, GRADS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (query block, q head, batch): dQ, and this program's partial
    sums of the encodings' parameter gradients, written to this program's slot of
    DParams (float32; the host adds the slots in a fixed order). A slot holds, each
    only when its GRADS bit is set and in this order (_grad_slot; the host reads it
    with posattn/_triton.py's _grad_layout): d(slope) 1, d(r1), d(r2) 2, du D, dw D,
    the two clipped end rows of d(aK) 2D and of d(aV) 2D, d(table) T.

    With DELTA_PASS it only computes, from the same P and dP tiles the gradient
    uses, l_i = sum_j P_ij and delta_i = sum_j P_ij dP_ij / l_i, and folds log2(l_i)
    into the row's lse: the recomputed P then sums to 1 to float32 rounding and
    delta is the exact sum the softmax gradient subtracts. In rows where attention
    is nearly one-hot, rowsum(dO * O) or an lse off by eps * |lse| differ from it
    by as much as dS itself, and slope / table gradients inherit that error.

    With CORRECT (no DELTA_PASS before it: Stats hold delta_a = rowsum(dO * O), which
    dQ uses as FlashAttention does), the same sums l_i and s_i = sum_j dS_ij come out
    of this pass, and each parameter gradient sum_j c_ij dS_ij is corrected to the
    exact delta at the end: (G_i - (s_i / l_i) sum_j c_ij P_ij) / l_i. The exact
    delta (delta_a + s_i / l_i) and the renormalised lse are then written to Stats
    for the kernels that follow. d(table) is corrected so for the far tiles (one
    column each); the near tiles are summed by a TABLE_PASS launch afterwards, from
    the exact Stats, into the same slot (with ONE_TILE, by this pass: see below). So
    are d(aK) and d(aV)'s end rows (per-row sums); their interior rows come from
    _attn_bwd_rel, after this pass."""
    ROPE: tl.constexpr = (FLAGS >> _ROPE.value) & 1
    HAS_POS: tl.constexpr = (FLAGS >> _HAS_POS.value) & 1
    TABLE: tl.constexpr = (FLAGS >> _TABLE.value) & 3
    REL_K: tl.constexpr = (FLAGS >> _REL_K.value) & 1
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    D_SLOPE: tl.constexpr = (GRADS >> _D_SLOPE.value) & 1
    D_KERPLE: tl.constexpr = (GRADS >> _D_KERPLE.value) & 1
    D_TABLE: tl.constexpr = (GRADS >> _D_TABLE.value) & 1
    D_U: tl.constexpr = (GRADS >> _D_U.value) & 1
    D_W: tl.constexpr = (GRADS >> _D_W.value) & 1
    D_AK: tl.constexpr = (GRADS >> _D_AK.value) & 1
    D_AV: tl.constexpr = (GRADS >> _D_AV.value) & 1
    DELTA_PASS: tl.constexpr = (GRADS >> _DELTA_PASS.value) & 1
    CORRECT: tl.constexpr = (GRADS >> _CORRECT.value) & 1
    # (Transformer-XL's du / dw would need P @ K per row; d(aK) through a soft cap, P (1 - t^2))
    tl.static_assert(CORRECT == 0 or D_U + D_W + D_AK * ((FLAGS >> _SOFTCAP.value) & 1) == 0)
    TABLE_PASS: tl.constexpr = (GRADS >> _TABLE_PASS.value) & 1
    # every row's keys in one tile (the host: Nk <= BLOCK_N): that tile's row sums are the
    # row's, so its dS is corrected to the exact delta in the loop and d(table) summed
    # here, with no TABLE_PASS launch after (Swin's 49-token windows)
    ONE_TILE: tl.constexpr = (GRADS >> _ONE_TILE.value) & 1 & CORRECT
    FAR: tl.constexpr = (TABLE == 1) * (1 - HAS_POS)
    NO_TABLE: tl.constexpr = FLAGS & ~(3 << _TABLE.value)
    REL_V: tl.constexpr = (FLAGS >> _REL_V.value) & 1
    # Shaw (default positions, no DistanceBias split): key tiles beyond the clip read
    # aK / aV's end rows only and run as plain tiles (see _attn_fwd)
    # (not through a soft cap, nor under dropout: see _attn_fwd)
    # (nor when a table without that split wants its gradient: GridBias, or positions
    # given; its far tiles need the table's own columns, not DistanceBias's end columns)
    SHAW_FAR: tl.constexpr = ((REL_K | REL_V) * (1 - FAR) * (1 - D_TABLE)
                              * (1 - ((FLAGS >> _SOFTCAP.value) & 1 | (FLAGS >> _DROPOUT.value) & 1)))
    SINKS: tl.constexpr = (FLAGS >> _SINKS.value) & 1
    NO_REL: tl.constexpr = FLAGS & ~(1 << _REL_K.value) & ~(1 << _REL_V.value)
    # GridBias's table pass (default positions) runs over the table in BLOCK_T-column
    # chunks, grid axis 0 = query blocks x chunks: a program lands its sums on its chunk
    # only (BLOCK_T registers, not T) and visits only the key tiles whose grid rows reach it
    GRID_DEFAULT: tl.constexpr = (TABLE == 2) * (1 - HAS_POS)   # (posattn/_triton.py: the same test)
    CHUNKED: tl.constexpr = TABLE_PASS * GRID_DEFAULT
    pid_m = tl.program_id(0)
    num_m = tl.num_programs(0)
    chunk = 0
    if CHUNKED:
        num_m = num_m // tl.cdiv(_table_columns(tab_l, tab_r, TABLE), BLOCK_T)
        chunk = pid_m // num_m
        pid_m = pid_m % num_m
    start_m = pid_m * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * Hq + off_h
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qk_scale = sm_scale * LOG2E
    seed = tl.load(Rng) if (FLAGS >> _DROPOUT.value) & 1 else 0
    T = 0  # the bias table's columns
    if TABLE:
        T = _table_columns(tab_l, tab_r, TABLE)
    NQ_T = Nq   # the row statistics' length (packed sequences: every sequence's rows)
    q0 = 0
    k0 = 0
    pb = off_b
    if (FLAGS >> _VARLEN.value) & 1:  # (a call only when packed: Triton's mutation analysis sees Pos)
        q0, k0, Nq, Nk = _sequence(Pos, off_b)
        pb = off_b * 0

    slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr, cap2, sink2, drop_p = _head_params(
        pb, off_h, Params, Table, tab_l, tab_r, Bias, sbb, sbh, bias_nb, Rel, rel_k, Hq, D, FLAGS, ROT_DIM)
    pos_q = Pos + off_b * (Nq + Nk)
    qp, q, qu, qw = _load_queries(Q + off_b * sqb + off_h * sqh + q0 * sqm, pos_q, offs_m, offs_d, sqm, Nq, Nk, D,
                                  u_ptr, w_ptr, FLAGS)
    do = _load_tile(DO + off_b * sdob + off_h * sdoh + q0 * sdom, offs_m, offs_d, sdom, Nq, D)
    stats = _stats_row(Stats, pb * Hq + off_h, NQ_T) + q0
    lse2, delta = _load_row_stats(stats, offs_m, Nq, NQ_T)
    if DELTA_PASS:
        delta = tl.zeros([BLOCK_M], tl.float32)   # then dS = P * dP
        p_dp = tl.zeros([BLOCK_M], tl.float32)
        p_sum = tl.zeros([BLOCK_M], tl.float32)
    k_base = K + off_b * skb + off_hk * skh + k0 * skn
    v_base = V + off_b * svb + off_hk * svh + k0 * svn

    dq_c = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # from (q + u) . k
    dq_p = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # from (q + w) . aK
    d_slope = tl.zeros([BLOCK_M], tl.float32)
    d_r1 = tl.zeros([BLOCK_M], tl.float32)
    d_r2 = tl.zeros([BLOCK_M], tl.float32)
    offs_t = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    d_tab = tl.zeros([BLOCK_T], tl.float32)
    # dS and P summed over the keys clipped to aK / aV row 0 (rel <= -K) and row 2K.
    ds_left = tl.zeros([BLOCK_M], tl.float32)
    ds_right = tl.zeros([BLOCK_M], tl.float32)
    p_left = tl.zeros([BLOCK_M], tl.float32)
    p_right = tl.zeros([BLOCK_M], tl.float32)
    if CORRECT:  # row sums of dS and P; the P-weighted sums of each gradient's factor
        row_s = tl.zeros([BLOCK_M], tl.float32)
        row_l = tl.zeros([BLOCK_M], tl.float32)
        b_slope = tl.zeros([BLOCK_M], tl.float32)
        b_r1 = tl.zeros([BLOCK_M], tl.float32)
        b_r2 = tl.zeros([BLOCK_M], tl.float32)
        far_ds = tl.zeros([BLOCK_M], tl.float32)   # dS, P over the far tiles: below, then above
        far_p = tl.zeros([BLOCK_M], tl.float32)
        far_ds2 = tl.zeros([BLOCK_M], tl.float32)
        far_p2 = tl.zeros([BLOCK_M], tl.float32)
        pk_left = tl.zeros([BLOCK_M], tl.float32)   # P over the keys clipped to aK's end rows
        pk_right = tl.zeros([BLOCK_M], tl.float32)
    lo, hi = _key_range(start_m, BLOCK_M, Nq, Nk, win_l, win_r, FLAGS, BLOCK_N)
    if (FLAGS >> _VARLEN.value) & 1:  # a block past its sequence's rows (the grid fits the longest)
        hi = tl.where(start_m < Nq, hi, lo)
    if CHUNKED:
        # the chunk's table rows dy, and the key grid rows yq - dy they reach from this
        # block's rows (positions clamped into the window as _grid_xy does)
        d_first = (chunk * BLOCK_T) // (2 * tab_r - 1) - (tab_l - 1)
        d_last = (chunk * BLOCK_T + BLOCK_T - 1) // (2 * tab_r - 1) - (tab_l - 1)
        last_p = tab_l * tab_r - 1
        yq_lo = tl.minimum(start_m + Nk - Nq, last_p) // tab_r
        yq_hi = tl.minimum(tl.minimum(start_m + BLOCK_M, Nq) - 1 + Nk - Nq, last_p) // tab_r
        lo = tl.maximum(lo, (tl.maximum(yq_lo - d_last, 0) * tab_r // BLOCK_N) * BLOCK_N)
        hi = tl.maximum(tl.minimum(hi, (yq_hi - d_first + 1) * tab_r), lo)
    # DistanceBias with default positions: the key tiles far from the diagonal read one
    # table column; they are scored as plain tiles, lse shifted by that column.
    b_lo = lo
    b_hi = hi
    c_low = 0.0
    c_high = 0.0
    d_low = 0.0
    d_high = 0.0
    if FAR:
        b_lo, b_hi, n_low, n_far, c_low, c_high = _table_far(start_m, lo, hi, Nq, Nk, tab_l, tab_r, table_ptr,
                                                             True, BLOCK_N, BLOCK_M)
    if SHAW_FAR:  # logits + (q + w) . aK[end], dP + dO . aV[end]: lse and delta shifted per row
        b_lo, b_hi, n_low, n_far = _beyond(start_m, lo, hi, Nq, Nk, rel_k, rel_k, True, BLOCK_N, BLOCK_M)
        ak_low, ak_high, av_low, av_high = _rel_end_rows(ak_ptr, av_ptr, rel_k, offs_d, D, q, REL_K, REL_V)
        c_low = _row_dot(qw, ak_low, REL_K) * qk_scale
        c_high = _row_dot(qw, ak_high, REL_K) * qk_scale
        d_low = _row_dot(do, av_low, REL_V)
        d_high = _row_dot(do, av_high, REL_V)
        ds_far_low = tl.zeros([BLOCK_M], tl.float32)
        ds_far_high = tl.zeros([BLOCK_M], tl.float32)
    FAR_PARTS: tl.constexpr = 0 if TABLE_PASS else 2 * (FAR | SHAW_FAR)
    for part in tl.static_range(1 + FAR_PARTS):  # the near tiles (all without a split), the far ones below, above
        p_lo, p_hi = _part_range(part, lo, hi, b_lo, b_hi)
        far_c = 0.0 if part == 0 else c_low if part == 1 else c_high   # lse shift (log2 domain)
        far_d = 0.0 if part == 0 else d_low if part == 1 else d_high   # delta shift
        for start_n in range(p_lo, p_hi, BLOCK_N):
            offs_n = start_n + offs_n0
            kp = _positions(pos_q + Nq, offs_n, Nk, 0, FLAGS)
            k = _load_tile(k_base, offs_n, offs_d, skn, Nk, D)
            v = _load_tile(v_base, offs_n, offs_d, svn, Nk, D)
            p, ds, rel, ak, ds_qk, p_v = _probs_and_ds(
                qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2 - far_c, delta - far_d, start_m, start_n, offs_m,
                offs_n, offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, tab_l, tab_r, bias_ptr, sbm,
                win_l, win_r, cap2, seed, off_bh, drop_p, FLAGS if part == 0 else NO_REL if SHAW_FAR else NO_TABLE,
                BLOCK_M, BLOCK_N)
            if DELTA_PASS:
                p_dp += tl.sum(ds, 1)
                p_sum += tl.sum(p, 1)
            elif TABLE_PASS:
                d_tab = _table_histogram(d_tab, ds, rel, qp, kp, start_m, start_n, Nq, Nk, tab_l, tab_r, T, offs_t,
                                         FLAGS, BLOCK_M, BLOCK_N, chunk * BLOCK_T)
            else:
                dq_c += _dot(ds_qk.to(k.dtype), k, UPCAST)
                if SHAW_FAR and part > 0:   # the position term reads aK[end]: summed per row, applied once
                    if part == 1:
                        ds_far_low += tl.sum(ds_qk, 1)
                    else:
                        ds_far_high += tl.sum(ds_qk, 1)
                if CORRECT:
                    row_s += tl.sum(ds, 1)
                    row_l += tl.sum(p, 1)
                if REL_K and (part == 0 or not SHAW_FAR):
                    # at D <= 64 on square tiles, the slice's two halves, each shifted without clamp
                    # or mask (static sm_90 model, D=64 near loop: 1998 -> 1476 instructions; at
                    # D=128 the spills grow instead: bench/NOTES.md)
                    if BLOCK_M == BLOCK_N and BLOCK_D <= 64:
                        dq_p = _halves_dot(dq_p, ds_qk.to(k.dtype), ak_ptr, start_m, start_n, Nq, Nk, rel_k, offs_d, D,
                                            BLOCK_N, UPCAST)
                    else:
                        dq_p += _dot(_keys_to_rel(ds_qk, BLOCK_M, BLOCK_N).to(k.dtype), ak, UPCAST)
                if D_SLOPE:
                    dist = tl.abs(rel).to(tl.float32)
                    d_slope -= tl.sum(ds * dist, 1)
                    if CORRECT:
                        b_slope -= tl.sum(p * dist, 1)
                if D_KERPLE:  # d/dr1 = -log(1 + r2 a), d/dr2 = -r1 a / (1 + r2 a), a = |rel|
                    dist = tl.abs(rel).to(tl.float32)
                    grow = 1.0 + r2 * dist
                    c1 = tl.math.log2(grow) / LOG2E
                    c2 = r1 * dist / grow
                    d_r1 -= tl.sum(ds * c1, 1)
                    d_r2 -= tl.sum(ds * c2, 1)
                    if CORRECT:
                        b_r1 -= tl.sum(p * c1, 1)
                        b_r2 -= tl.sum(p * c2, 1)
                if D_TABLE:
                    if part > 0:  # a far tile: one column
                        if not CORRECT:
                            d_tab += tl.where(offs_t == (0 if part == 1 else T - 1), tl.sum(tl.sum(ds, 1), 0), 0.0)
                        elif part == 1:
                            far_ds += tl.sum(ds, 1)
                            far_p += tl.sum(p, 1)
                        else:
                            far_ds2 += tl.sum(ds, 1)
                            far_p2 += tl.sum(p, 1)
                    elif not CORRECT:  # (with CORRECT, the TABLE_PASS launch sums the near tiles)
                        d_tab = _table_histogram(d_tab, ds, rel, qp, kp, start_m, start_n, Nq, Nk, tab_l, tab_r, T,
                                                 offs_t, FLAGS, BLOCK_M, BLOCK_N)
                    elif ONE_TILE:  # the end's correction with this tile's sums: (dS - shift P) / l
                        _, t_inv, t_shift, _ = _delta_shift(tl.sum(ds, 1), tl.sum(p, 1), delta, lse2, sink2,
                                                            offs_m, Nq, SINKS)
                        d_tab = _table_histogram(d_tab, (ds - t_shift[:, None] * p) * t_inv[:, None], rel, qp, kp,
                                                 start_m, start_n, Nq, Nk, tab_l, tab_r, T, offs_t, FLAGS, BLOCK_M,
                                                 BLOCK_N)
                if D_AK or D_AV:
                    if SHAW_FAR and part > 0:  # a tile beyond the clip: every pair on one side
                        left = part == 1
                        right = part == 2
                    else:
                        left = rel <= -rel_k
                        right = (rel >= rel_k) & (rel > -rel_k)
                    if D_AK:
                        ds_left += tl.sum(tl.where(left, ds_qk, 0.0), 1)
                        ds_right += tl.sum(tl.where(right, ds_qk, 0.0), 1)
                        if CORRECT:  # (no soft cap here: dS_qk = dS)
                            pk_left += tl.sum(tl.where(left, p, 0.0), 1)
                            pk_right += tl.sum(tl.where(right, p, 0.0), 1)
                    if D_AV:
                        p_left += tl.sum(tl.where(left, p_v, 0.0), 1)
                        p_right += tl.sum(tl.where(right, p_v, 0.0), 1)

    if DELTA_PASS:
        if SINKS:  # the sink's probability joins the row's total
            p_sum += tl.math.exp2(sink2 - lse2)
        live = (offs_m < Nq) & (p_sum > 0.0)
        tl.store(stats + NQ_T + offs_m, p_dp / tl.where(live, p_sum, 1.0), mask=offs_m < Nq)
        tl.store(stats + offs_m, lse2 + tl.math.log2(tl.where(live, p_sum, 1.0)), mask=live)
    elif TABLE_PASS:
        o_slope, o_kerple, o_u, o_w, o_ak, o_av, o_tab, size = _grad_slot(D, T, GRADS)
        slot = DParams + (off_bh * num_m + pid_m) * size
        if not CHUNKED:   # (chunked: dQ's pass left GridBias's columns to this one)
            d_tab += tl.load(slot + o_tab + offs_t, mask=offs_t < T, other=0.0)   # the far tiles' part
        tl.store(slot + o_tab + offs_t, d_tab, mask=offs_t < T)
    else:
        o_slope, o_kerple, o_u, o_w, o_ak, o_av, o_tab, size = _grad_slot(D, T, GRADS)
        slot = DParams + (off_bh * num_m + pid_m) * size
        in_d = offs_d < D
        if SHAW_FAR and REL_K:  # the far tiles' position term: their dS row sums times aK's end rows
            dq_p += ds_far_low[:, None] * ak_low[None, :] + ds_far_high[:, None] * ak_high[None, :]
        if CORRECT:
            live, inv_l, shift, row_l = _delta_shift(row_s, row_l, delta, lse2, sink2, offs_m, Nq, SINKS)
            d_slope = (d_slope - shift * b_slope) * inv_l
            d_r1 = (d_r1 - shift * b_r1) * inv_l
            d_r2 = (d_r2 - shift * b_r2) * inv_l
            if D_AK:
                ds_left = (ds_left - shift * pk_left) * inv_l
                ds_right = (ds_right - shift * pk_right) * inv_l
            if D_AV:  # no delta in P_ij dO_i: renormalised only
                p_left = p_left * inv_l
                p_right = p_right * inv_l
            if D_TABLE:
                d_tab += (tl.where(offs_t == 0, tl.sum((far_ds - shift * far_p) * inv_l, 0), 0.0)
                          + tl.where(offs_t == T - 1, tl.sum((far_ds2 - shift * far_p2) * inv_l, 0), 0.0))
            tl.store(stats + NQ_T + offs_m, delta + shift, mask=offs_m < Nq)
            tl.store(stats + offs_m, lse2 + tl.math.log2(tl.where(live, row_l, 1.0)), mask=live)
        if D_SLOPE:
            tl.store(slot + o_slope, tl.sum(d_slope, 0))
        if D_KERPLE:
            tl.store(slot + o_kerple, tl.sum(d_r1, 0))
            tl.store(slot + o_kerple + 1, tl.sum(d_r2, 0))
        if D_U:
            tl.store(slot + o_u + offs_d, tl.sum(dq_c, 0) * sm_scale, mask=in_d)
        if D_W:
            tl.store(slot + o_w + offs_d, tl.sum(dq_p, 0) * sm_scale, mask=in_d)
        if D_AK:
            qw32 = qw.to(tl.float32)
            tl.store(slot + o_ak + offs_d, tl.sum(ds_left[:, None] * qw32, 0) * sm_scale, mask=in_d)
            tl.store(slot + o_ak + D + offs_d, tl.sum(ds_right[:, None] * qw32, 0) * sm_scale, mask=in_d)
        if D_AV:
            do32 = do.to(tl.float32)
            tl.store(slot + o_av + offs_d, tl.sum(p_left[:, None] * do32, 0), mask=in_d)
            tl.store(slot + o_av + D + offs_d, tl.sum(p_right[:, None] * do32, 0), mask=in_d)
        if D_TABLE and not (CORRECT and GRID_DEFAULT and not ONE_TILE):   # (else all the chunked pass's)
            tl.store(slot + o_tab + offs_t, d_tab, mask=offs_t < T)

        dq = (dq_c + dq_p) * sm_scale
        if ROPE and not (FLAGS >> _ROPE_AXES.value) & 1:  # (ROPE_AXES: a pass after)
            dq = _unrotate(dq, offs_d, qp, Params, _rope_factor(Params, FLAGS, ROT_DIM), FLAGS, ROT_DIM)
        tl.store(DQ + off_b * sdqb + off_h * sdqh + (q0 + offs_m[:, None]) * sdqm + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Nq) & in_d[None, :])
