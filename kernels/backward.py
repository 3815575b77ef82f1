"""The backward kernels: delta, dK / dV, the interior rows of d(aK) / d(aV), and
the dense-bias gradient. Arguments as in _attn_fwd; Stats is the [B, Hq, 2, Nq]
float32 row statistics (lse in the log2 domain, then delta), dO has out's
conventions (strides by batch, head, row; head dim contiguous). With RoPE, q and k
are the rotated copies and dQ / dK are rotated back in the epilogues."""
import triton
import triton.language as tl

from .common import (LOG2E, _COL_BCAST, _D_AK, _D_AV, _DBIAS_ADD, _DBIAS_ROWS, _DROPOUT, _HAS_POS, _HEAD_BCAST, _REL_K, _REL_V, _ROPE, _ROPE_AXES,
                     _SOFTCAP,
                     _ROW_BCAST, _TABLE, _UPCAST, _VARLEN, _beyond, _dot, _key_range, _load_row_stats, _load_tile, _part_range,
                     _positions, _query_range, _sequence, _stats_row)
from .rope import _rope_factor, _unrotate
from .relative import _rel_end_rows, _row_dot, _row_gather
from .scores import _head_params, _load_queries, _probs_and_ds, _table_far


@triton.jit
def _attn_bwd_delta(Out, DO, Stats, DLse, sob, soh, som, sdob, sdoh, sdom,
                    Hq, Nq, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (minus dLse_i when lse is differentiated too),
    FlashAttention's shortcut for sum_j P_ij dP_ij (see _attn_bwd_dq's DELTA_PASS)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * Hq + off_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(Out + off_b * sob + off_h * soh, offs_m, offs_d, som, Nq, D)
    do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, offs_d, sdom, Nq, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + off_bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    tl.store(_stats_row(Stats, off_bh, Nq) + Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Stats, DK, DV, DBias, Pos, Params, Table, Bias, Rel, Rng,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                   sdkb, sdkh, sdkn, sbb, sbh, sbm, bias_nb,
                   Hq, Nq, Nk, D, GROUP, sm_scale, win_l, win_r, tab_l, tab_r, rel_k, sqw,
                   FLAGS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """One program per (key block, kv head, batch): dK and dV summed over the GROUP
    query heads that share this kv head, in registers (no atomics). With XL_ROWS, Q
    holds Transformer-XL's q + u and Q + sqw q + w, as in _attn_fwd. With DBIAS_ROWS
    (a dense bias whose rows and keys are not broadcast, float32 DBias in its strides),
    each dS tile is also written there, with no second pass: stored when the bias has
    a row per batch and head (every element has one owner), added atomically with
    DBIAS_ADD when batches or heads share it (float32 adds in no fixed order: the host
    takes this path unless torch's deterministic mode is on)."""
    ROPE: tl.constexpr = (FLAGS >> _ROPE.value) & 1
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    DBIAS_ROWS: tl.constexpr = (FLAGS >> _DBIAS_ROWS.value) & 1
    DBIAS_ADD: tl.constexpr = (FLAGS >> _DBIAS_ADD.value) & 1
    FAR: tl.constexpr = (((FLAGS >> _TABLE.value) & 3) == 1) * (1 - ((FLAGS >> _HAS_POS.value) & 1))
    NO_TABLE: tl.constexpr = FLAGS & ~(3 << _TABLE.value)
    REL_K: tl.constexpr = (FLAGS >> _REL_K.value) & 1
    REL_V: tl.constexpr = (FLAGS >> _REL_V.value) & 1
    SHAW_FAR: tl.constexpr = ((REL_K | REL_V) * (1 - FAR)
                              * (1 - ((FLAGS >> _SOFTCAP.value) & 1 | (FLAGS >> _DROPOUT.value) & 1)))  # as in dQ
    NO_REL: tl.constexpr = FLAGS & ~(1 << _REL_K.value) & ~(1 << _REL_V.value)
    start_n = tl.program_id(0) * BLOCK_N
    off_hk = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qk_scale = sm_scale * LOG2E
    seed = tl.load(Rng) if (FLAGS >> _DROPOUT.value) & 1 else 0
    NQ_T = Nq   # the row statistics' length (packed sequences: every sequence's rows)
    q0 = 0
    k0 = 0
    pb = off_b
    if (FLAGS >> _VARLEN.value) & 1:  # (a call only when packed: Triton's mutation analysis sees Pos)
        q0, k0, Nq, Nk = _sequence(Pos, off_b)
        pb = off_b * 0

    pos_q = Pos + off_b * (Nq + Nk)
    kp = _positions(pos_q + Nq, offs_n, Nk, 0, FLAGS)
    k = _load_tile(K + off_b * skb + off_hk * skh + k0 * skn, offs_n, offs_d, skn, Nk, D)
    v = _load_tile(V + off_b * svb + off_hk * svh + k0 * svn, offs_n, offs_d, svn, Nk, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = _query_range(start_n, BLOCK_N, Nq, Nk, win_l, win_r, FLAGS, BLOCK_M)
    if (FLAGS >> _VARLEN.value) & 1:  # a block past its sequence's keys
        hi = tl.where(start_n < Nk, hi, lo)
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr, cap2, sink2, drop_p = _head_params(
            pb, off_h, Params, Table, tab_l, tab_r, Bias, sbb, sbh, bias_nb, Rel, rel_k, Hq, D, FLAGS, ROT_DIM)
        q_base = Q + off_b * sqb + off_h * sqh + q0 * sqm
        do_base = DO + off_b * sdob + off_h * sdoh + q0 * sdom
        stats = _stats_row(Stats, pb * Hq + off_h, NQ_T) + q0
        # DistanceBias with default positions: the query tiles far from the diagonal
        # read one table column; they are scored as plain tiles, lse shifted by it.
        b_lo = lo
        b_hi = hi
        c_low = 0.0
        c_high = 0.0
        if FAR:
            b_lo, b_hi, n_low, n_far, c_low, c_high = _table_far(start_n, lo, hi, Nq, Nk, tab_l, tab_r, table_ptr,
                                                                 False, BLOCK_M, BLOCK_N)
        if SHAW_FAR:  # rows i <= start_n - shift - K: rel >= K (row 2K); i >= last key - shift + K: rel <= -K (row 0)
            b_lo, b_hi, n_low, n_far = _beyond(start_n, lo, hi, Nq, Nk, rel_k, rel_k, False, BLOCK_M, BLOCK_N)
            ak_end0, ak_end2k, av_end0, av_end2k = _rel_end_rows(ak_ptr, av_ptr, rel_k, offs_d, D, k, REL_K, REL_V)
        for part in tl.static_range(1 + 2 * (FAR | SHAW_FAR)):  # the near tiles (all without a split), then the far ones
            p_lo, p_hi = _part_range(part, lo, hi, b_lo, b_hi)
            far_c = 0.0 if part == 0 else c_low if part == 1 else c_high
            for start_m in range(p_lo, p_hi, BLOCK_M):
                offs_m = start_m + offs_m0
                qp, q, qu, qw = _load_queries(q_base, pos_q, offs_m, offs_d, sqm, Nq, Nk, D, u_ptr, w_ptr, FLAGS,
                                              sqw)
                do = _load_tile(do_base, offs_m, offs_d, sdom, Nq, D)
                lse2, delta = _load_row_stats(stats, offs_m, Nq, NQ_T)
                if SHAW_FAR and part > 0:   # logits + (q + w) . aK[end], dP + dO . aV[end], per row
                    tile_c = _row_dot(qw, ak_end2k if part == 1 else ak_end0, REL_K) * qk_scale
                    tile_d = _row_dot(do, av_end2k if part == 1 else av_end0, REL_V)
                else:
                    tile_c = far_c
                    tile_d = 0.0
                p, ds, rel, ak, ds_qk, p_v = _probs_and_ds(
                    qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2 - tile_c, delta - tile_d, start_m, start_n, offs_m,
                    offs_n, offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, tab_l, tab_r, bias_ptr, sbm,
                    win_l, win_r, cap2, seed, off_b * Hq + off_h, drop_p,
                    FLAGS if part == 0 else NO_REL if SHAW_FAR else NO_TABLE, BLOCK_M, BLOCK_N, ROWS_HELD=0)
                dv += _dot(tl.trans(p_v.to(do.dtype)), do, UPCAST)
                dk += _dot(tl.trans(ds_qk.to(qu.dtype)), qu, UPCAST)
                if DBIAS_ROWS:
                    at = DBias + (off_b % bias_nb) * sbb + off_h * sbh + offs_m[:, None] * sbm + offs_n[None, :]
                    inside = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
                    if DBIAS_ADD:   # (relaxed: nothing in this kernel reads the sums)
                        tl.atomic_add(at, ds, mask=inside, sem="relaxed")
                    else:
                        tl.store(at, ds, mask=inside)

    dk *= sm_scale
    if ROPE and not (FLAGS >> _ROPE_AXES.value) & 1:  # (ROPE_AXES: a pass after)
        dk = _unrotate(dk, offs_d, kp, Params, _rope_factor(Params, FLAGS, ROT_DIM), FLAGS, ROT_DIM)
    mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
    tl.store(DK + off_b * sdkb + off_hk * sdkh + (k0 + offs_n[:, None]) * sdkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + off_b * sdkb + off_hk * sdkh + (k0 + offs_n[:, None]) * sdkn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_rel(Q, K, V, DO, Stats, DAK, DAV, Pos, Params, Table, Bias, Rel, Rng,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sbb, sbh, sbm, bias_nb,
                  Hq, Nq, Nk, D, GROUP, rel_first, head_step, sm_scale, win_l, win_r, tab_l, tab_r, rel_k,
                  FLAGS: tl.constexpr, GRADS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Interior rows of d(aK) and d(aV) (-K < rel < K), organised by distance: one
    program per (BLOCK_N consecutive distances, table head, batch) visits, for every
    query block, only the key tiles on those diagonals, and sums
    dS_ij (q_i + w) and P_ij dO_i over the pairs at each distance. Each pair has one
    distance, so each row is owned by one program: no atomics, O(K * D) memory."""
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    D_AK: tl.constexpr = (GRADS >> _D_AK.value) & 1
    D_AV: tl.constexpr = (GRADS >> _D_AV.value) & 1
    rel0 = rel_first + tl.program_id(0) * BLOCK_N
    ha = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    NQ_T = Nq
    q0 = 0
    k0 = 0
    pb = off_b
    if (FLAGS >> _VARLEN.value) & 1:  # (a call only when packed: Triton's mutation analysis sees Pos)
        q0, k0, Nq, Nk = _sequence(Pos, off_b)
        pb = off_b * 0
    shift = Nk - Nq
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qk_scale = sm_scale * LOG2E
    seed = tl.load(Rng) if (FLAGS >> _DROPOUT.value) & 1 else 0
    pos_q = Pos + off_b * (Nq + Nk)
    acc_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for h in range(ha, Hq, head_step):  # this table head's query heads
        off_h = tl.cast(h, tl.int64)
        off_hk = off_h // GROUP
        slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr, cap2, sink2, drop_p = _head_params(
            pb, off_h, Params, Table, tab_l, tab_r, Bias, sbb, sbh, bias_nb, Rel, rel_k, Hq, D, FLAGS, ROT_DIM)
        stats = _stats_row(Stats, pb * Hq + off_h, NQ_T) + q0
        for start_m in range(0, Nq, BLOCK_M):
            # keys j = i + shift + rel for rows i of the block and rel in [rel0, rel0 + BLOCK_N)
            lo, hi = _key_range(start_m, BLOCK_M, Nq, Nk, win_l, win_r, FLAGS, BLOCK_N)
            j_lo = tl.maximum(lo, start_m + shift + rel0)
            j_hi = tl.minimum(hi, start_m + BLOCK_M + shift + rel0 + BLOCK_N - 1)
            offs_m = start_m + offs_m0
            qp, q, qu, qw = _load_queries(Q + off_b * sqb + off_h * sqh + q0 * sqm, pos_q, offs_m, offs_d, sqm, Nq,
                                          Nk, D, u_ptr, w_ptr, FLAGS)
            do = _load_tile(DO + off_b * sdob + off_h * sdoh + q0 * sdom, offs_m, offs_d, sdom, Nq, D)
            lse2, delta = _load_row_stats(stats, offs_m, Nq, NQ_T)
            for start_n in range((tl.maximum(j_lo, 0) // BLOCK_N) * BLOCK_N, j_hi, BLOCK_N):
                offs_n = start_n + offs_n0
                kp = _positions(pos_q + Nq, offs_n, Nk, 0, FLAGS)
                k = _load_tile(K + off_b * skb + off_hk * skh + k0 * skn, offs_n, offs_d, skn, Nk, D)
                v = _load_tile(V + off_b * svb + off_hk * svh + k0 * svn, offs_n, offs_d, svn, Nk, D)
                p, ds, rel, ak, ds_qk, p_v = _probs_and_ds(
                    qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2, delta, start_m, start_n, offs_m,
                    offs_n, offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, tab_l, tab_r,
                    bias_ptr, sbm, win_l, win_r, cap2, seed, off_b * Hq + off_h, drop_p, FLAGS, BLOCK_M, BLOCK_N)
                # column r of row i: the key at distance rel0 + r, if it is in this tile
                jl = (start_m + shift + rel0 - start_n) + offs_n0[None, :] + offs_m0[:, None]
                inside = (jl >= 0) & (jl < BLOCK_N)
                jl = tl.minimum(tl.maximum(jl, 0), BLOCK_N - 1)
                if D_AK:
                    ds_r = tl.where(inside, _row_gather(ds_qk, jl), 0.0)
                    acc_k += _dot(tl.trans(ds_r.to(qw.dtype)), qw, UPCAST)
                if D_AV:
                    p_r = tl.where(inside, _row_gather(p_v, jl), 0.0)
                    acc_v += _dot(tl.trans(p_r.to(do.dtype)), do, UPCAST)

    rel = rel0 + offs_n0
    rows = rel + rel_k
    mask = (rel <= rel_k - 1)[:, None] & (offs_d[None, :] < D)
    base = (off_b * tl.num_programs(1) + ha) * (2 * rel_k + 1) * D
    if D_AK:
        tl.store(DAK + base + rows[:, None] * D + offs_d[None, :], acc_k * sm_scale, mask=mask)
    if D_AV:
        tl.store(DAV + base + rows[:, None] * D + offs_d[None, :], acc_v, mask=mask)


@triton.jit
def _attn_bwd_dbias(Q, K, V, DO, Stats, DBias, Pos, Params, Table, Bias, Rel, Rng,
                    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sbb, sbh, sbm, bias_nb,
                    B, Hq, Nq, Nk, D, GROUP, BH, BM_, BN_, NUM_N, sm_scale, win_l, win_r, tab_l, tab_r, rel_k,
                    FLAGS: tl.constexpr, GRADS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """d(bias) in the bias's own shape [nB, 1|Hq, 1|Nq, 1|Nk] (float32): one program
    per output tile sums dS over every batch, head, row and column that broadcasting
    folds onto it, in a fixed order (deterministic, no atomics)."""
    HEAD_BCAST: tl.constexpr = (GRADS >> _HEAD_BCAST.value) & 1
    ROW_BCAST: tl.constexpr = (GRADS >> _ROW_BCAST.value) & 1
    COL_BCAST: tl.constexpr = (GRADS >> _COL_BCAST.value) & 1
    pid_m = tl.program_id(0) // NUM_N
    pid_n = tl.program_id(0) % NUM_N
    oh = tl.program_id(1)
    ob = tl.program_id(2)
    off_bias = ob.to(tl.int64) * BH + oh
    if HEAD_BCAST:
        h_lo = 0
        h_hi = Hq
    else:
        h_lo = oh
        h_hi = oh + 1
    if ROW_BCAST:
        m_lo = 0
        m_hi = Nq
    else:
        m_lo = pid_m * BLOCK_M
        m_hi = m_lo + 1
    if COL_BCAST:
        n_lo = 0
        n_hi = Nk
    else:
        n_lo = pid_n * BLOCK_N
        n_hi = n_lo + 1
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qk_scale = sm_scale * LOG2E
    seed = tl.load(Rng) if (FLAGS >> _DROPOUT.value) & 1 else 0
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b in range(ob, B, bias_nb):  # every batch whose bias is bias[ob] (b % nB == ob)
        off_b = tl.cast(b, tl.int64)
        pos_q = Pos + off_b * (Nq + Nk)
        for h in range(h_lo, h_hi):
            off_h = tl.cast(h, tl.int64)
            off_hk = off_h // GROUP
            stats = _stats_row(Stats, off_b * Hq + off_h, Nq)
            slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr, cap2, sink2, drop_p = _head_params(
                off_b, off_h, Params, Table, tab_l, tab_r, Bias, sbb, sbh, bias_nb, Rel, rel_k, Hq, D, FLAGS,
                ROT_DIM)
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + offs_m0
                qp, q, qu, qw = _load_queries(Q + off_b * sqb + off_h * sqh, pos_q, offs_m, offs_d, sqm, Nq, Nk,
                                              D, u_ptr, w_ptr, FLAGS)
                do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, offs_d, sdom, Nq, D)
                lse2, delta = _load_row_stats(stats, offs_m, Nq, Nq)
                for start_n in range(n_lo, n_hi, BLOCK_N):
                    offs_n = start_n + offs_n0
                    kp = _positions(pos_q + Nq, offs_n, Nk, 0, FLAGS)
                    k = _load_tile(K + off_b * skb + off_hk * skh, offs_n, offs_d, skn, Nk, D)
                    v = _load_tile(V + off_b * svb + off_hk * svh, offs_n, offs_d, svn, Nk, D)
                    p, ds, rel, ak, ds_qk, p_v = _probs_and_ds(
                        qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2, delta, start_m, start_n, offs_m,
                        offs_n, offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, tab_l, tab_r,
                        bias_ptr, sbm, win_l, win_r, cap2, seed, off_b * Hq + off_h, drop_p, FLAGS, BLOCK_M,
                        BLOCK_N)
                    acc += ds

    offs_m = pid_m * BLOCK_M + offs_m0
    offs_n = pid_n * BLOCK_N + offs_n0
    base = DBias + off_bias * BM_ * BN_
    if ROW_BCAST and COL_BCAST:
        tl.store(base, tl.sum(tl.sum(acc, 1), 0))
    elif ROW_BCAST:
        tl.store(base + offs_n, tl.sum(acc, 0), mask=offs_n < Nk)
    elif COL_BCAST:
        tl.store(base + offs_m, tl.sum(acc, 1), mask=offs_m < Nq)
    else:
        tl.store(base + offs_m[:, None] * Nk + offs_n[None, :], acc,
                 mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk))
