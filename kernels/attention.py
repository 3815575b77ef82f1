"""Fused attention with positional encodings: Triton kernels (forward and backward).

Read top-down: helpers shared by every kernel (loads, RoPE, the score tile), then
the forward kernel, then the backward kernels (dK/dV, dQ with the encodings'
parameter gradients, dense-bias gradient). The host side lives in
posattn/_triton.py.

Conventions
- Scores are kept in the log2 domain: s2 = log2(e) * (scale * q.k + bias), so the
  softmax uses exp2 (one MUFU op) and log2(e) is folded into the scale once.
- Positions: rel = k_pos - q_pos. Without explicit positions q_pos = i + Nk - Nq and
  k_pos = j (bottom-right alignment), which also lets the loops skip tiles that
  causal / window masks hide entirely.
- Every encoding is a constexpr flag of the same kernels: a disabled encoding
  costs nothing in the compiled code.
- No [Nq, Nk] tensor is ever written: parameter gradients are reduced per program
  into small buffers that the host sums in a fixed order (deterministic, no atomics).
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # Triton's CPU interpreter multiplies bfloat16 tiles as raw uint16; feeding it
    # float32 gives the same products (bf16 x bf16 is exact in fp32).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _load_tile(ptr, offs_n, offs_d, stride_n, stride_d, N, D):
    return tl.load(ptr + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d,
                   mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _positions(pos_ptr, offs, N, shift, HAS_POS: tl.constexpr):
    if HAS_POS:
        return tl.load(pos_ptr + offs, mask=offs < N, other=0).to(tl.int32)
    else:
        return offs + shift


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
def _load_rotated(ptr, offs_n, offs_d, stride_n, stride_d, N, D, pos, inv_freq_ptr, factor,
                  ROPE: tl.constexpr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Load a [rows, BLOCK_D] tile of q or k, rotated by RoPE at `pos` when ROPE.
    The partner channels are read as a second (cache-hot) load: no rotated copy of
    q or k ever exists in memory."""
    x = _load_tile(ptr, offs_n, offs_d, stride_n, stride_d, N, D)
    if ROPE:
        partner, sign, freq, in_rot = _rope_channels(offs_d, inv_freq_ptr, ROT_DIM, INTERLEAVED)
        xp = _load_tile(ptr, offs_n, partner, stride_n, stride_d, N, D)
        cos, sin = _rope_cos_sin(pos, freq, sign, in_rot, factor)
        x = (x.to(tl.float32) * cos + xp.to(tl.float32) * sin).to(ptr.dtype.element_ty)
    return x


@triton.jit
def _unrotate(g, offs_d, pos, inv_freq_ptr, factor, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Gradient w.r.t. the rotated rows -> gradient w.r.t. the raw rows (rotate by -theta)."""
    partner, sign, freq, in_rot = _rope_channels(offs_d, inv_freq_ptr, ROT_DIM, INTERLEAVED)
    cos, sin = _rope_cos_sin(pos, freq, sign, in_rot, factor)
    gp = tl.gather(g, tl.broadcast_to(partner[None, :], g.shape), axis=1)
    return g * cos - gp * sin


@triton.jit
def _table_index(rel, qp, kp, tab_a, tab_b, TABLE: tl.constexpr):
    """Column of the bias table for each (query, key) pair.
    TABLE == 1, DistanceBias: clamp(rel, -L, R) + L with (tab_a, tab_b) = (L, R).
    TABLE == 2, GridBias (Swin's relative_position_index) with (tab_a, tab_b) =
    (Wh, Ww): tokens at (p // Ww, p % Ww), clamped into the table for rows and
    columns past the window (they are masked anyway)."""
    if TABLE == 1:
        return tl.minimum(tl.maximum(rel, -tab_a), tab_b) + tab_a
    else:
        dy = qp[:, None] // tab_b - kp[None, :] // tab_b + tab_a - 1
        dx = qp[:, None] % tab_b - kp[None, :] % tab_b + tab_b - 1
        idx = dy * (2 * tab_b - 1) + dx
        return tl.minimum(tl.maximum(idx, 0), (2 * tab_a - 1) * (2 * tab_b - 1) - 1)


@triton.jit
def _scores(q, k, qp, kp, offs_m, offs_n, Nq, Nk, qk_scale, slope, table_ptr, stride_tab,
            tab_l, tab_r, bias_ptr, stride_bm, stride_bn, win_l, win_r,
            CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
            ALIBI: tl.constexpr, TABLE: tl.constexpr, BIAS: tl.constexpr, BIAS_MASK: tl.constexpr,
            UPCAST: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] score tile in the log2 domain, masked entries = -inf."""
    s = _dot(q, tl.trans(k), UPCAST) * qk_scale
    rel = kp[None, :] - qp[:, None]
    keep = (offs_n[None, :] < Nk) & (offs_m[:, None] < Nq)
    if CAUSAL:
        keep = keep & (rel <= 0)
    if HAS_WL:
        keep = keep & (rel >= -win_l)
    if HAS_WR:
        keep = keep & (rel <= win_r)
    if ALIBI:
        s -= (slope * LOG2E) * tl.abs(rel).to(tl.float32)
    if TABLE:
        idx = _table_index(rel, qp, kp, tab_l, tab_r, TABLE)
        s += tl.load(table_ptr + idx * stride_tab).to(tl.float32) * LOG2E
    if BIAS:
        in_b = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        b = tl.load(bias_ptr + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=in_b, other=0)
        if BIAS_MASK:
            keep = keep & (b != 0)
        else:
            s += b.to(tl.float32) * LOG2E
    return tl.where(keep, s, float("-inf")), rel


@triton.jit
def _key_range(start_m, BLOCK_M: tl.constexpr, Nq, Nk, win_l, win_r,
               CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
               HAS_POS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of keys that rows start_m.. can see; with default positions the
    causal / window masks bound it, so hidden tiles are never visited."""
    lo = 0
    hi = Nk
    if not HAS_POS:
        shift = Nk - Nq
        if CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M + shift)
        if HAS_WR:
            hi = tl.minimum(hi, start_m + BLOCK_M + shift + win_r)
        if HAS_WL:
            lo = tl.maximum(0, start_m + shift - win_l)
            lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def _query_range(start_n, BLOCK_N: tl.constexpr, Nq, Nk, win_l, win_r,
                 CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
                 HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr):
    """[lo, hi) of query rows that can see keys start_n.. (the transpose of _key_range)."""
    lo = 0
    hi = Nq
    if not HAS_POS:
        shift = Nk - Nq
        # row i sees key j when j - i - shift <= right and >= -left
        if CAUSAL:
            lo = tl.maximum(lo, start_n - shift)
        if HAS_WR:
            lo = tl.maximum(lo, start_n - shift - win_r)
        lo = (tl.maximum(lo, 0) // BLOCK_M) * BLOCK_M
        if HAS_WL:
            hi = tl.minimum(hi, start_n + BLOCK_N - shift + win_l)
        hi = tl.maximum(hi, lo)
    return lo, hi


# ----------------------------------------------------------------------------- forward

@triton.jit
def _attn_fwd(Q, K, V, Out, Out32, Lse, QPos, KPos, InvFreq, Slopes, Table, Bias,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              sqpb, skpb, ssb, ssh, stab_h, stab_t, sbb, sbh, sbm, sbn, bias_nb,
              Hq, Nq, Nk, D, GROUP, qk_scale, rope_factor, win_l, win_r, tab_l, tab_r,
              CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_POS: tl.constexpr,
              ROPE: tl.constexpr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
              ALIBI: tl.constexpr, TABLE: tl.constexpr, BIAS: tl.constexpr, BIAS_MASK: tl.constexpr,
              STORE_F32: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (query block, head, batch). With STORE_F32 it also writes the
    output unrounded (contiguous float32) for the backward's delta = rowsum(dO * O):
    gradients of slopes, tables and biases weight dS by large factors, and an O
    rounded to 8 bits of mantissa makes their error 10x that of PyTorch."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * Hq + off_h
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    qp = _positions(QPos + off_b * sqpb, offs_m, Nq, Nk - Nq, HAS_POS)
    q = _load_rotated(Q + off_b * sqb + off_h * sqh, offs_m, offs_d, sqm, sqd, Nq, D, qp, InvFreq,
                      rope_factor, ROPE, ROT_DIM, INTERLEAVED)
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh
    slope = 0.0
    if ALIBI:
        slope = tl.load(Slopes + off_b * ssb + off_h * ssh).to(tl.float32)
    table_ptr = Table + off_h * stab_h
    bias_ptr = Bias + (off_b % bias_nb) * sbb + off_h * sbh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, BLOCK_M, Nq, Nk, win_l, win_r, CAUSAL, HAS_WL, HAS_WR, HAS_POS, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kp = _positions(KPos + off_b * skpb, offs_n, Nk, 0, HAS_POS)
        k = _load_rotated(k_base, offs_n, offs_d, skn, skd, Nk, D, kp, InvFreq, rope_factor,
                          ROPE, ROT_DIM, INTERLEAVED)
        s, rel = _scores(q, k, qp, kp, offs_m, offs_n, Nq, Nk, qk_scale, slope, table_ptr, stab_t,
                         tab_l, tab_r, bias_ptr, sbm, sbn, win_l, win_r, CAUSAL, HAS_WL, HAS_WR,
                         ALIBI, TABLE, BIAS, BIAS_MASK, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, offs_d, svn, svd, Nk, D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    # Rows that saw no key: output 0, lse = -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    o_ptrs = Out + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    o_mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
    if STORE_F32:
        tl.store(Out32 + (off_bh * Nq + offs_m[:, None]) * D + offs_d[None, :], out, mask=o_mask)
    tl.store(Lse + off_bh * Nq + offs_m, lse, mask=offs_m < Nq)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_delta(Out, DO, Delta, DLse, sob, soh, som, sod, sdob, sdoh, sdom, sdod,
                    Hq, Nq, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (minus dLse_i when lse is differentiated too)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * Hq + off_h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(Out + off_b * sob + off_h * soh, offs_m, offs_d, som, sod, Nq, D)
    do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, offs_d, sdom, sdod, Nq, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = off_bh * Nq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=offs_m < Nq, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < Nq)


@triton.jit
def _probs_and_ds(q, k, v, do, qp, kp, lse2, delta, offs_m, offs_n, Nq, Nk, qk_scale, slope,
                  table_ptr, stab_t, tab_l, tab_r, bias_ptr, sbm, sbn, win_l, win_r,
                  CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
                  ALIBI: tl.constexpr, TABLE: tl.constexpr, BIAS: tl.constexpr, BIAS_MASK: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Recompute P from the saved log-sum-exp and dS = P * (dP - delta), the gradient
    w.r.t. the natural-domain score scale * q.k + bias."""
    s, rel = _scores(q, k, qp, kp, offs_m, offs_n, Nq, Nk, qk_scale, slope, table_ptr, stab_t,
                     tab_l, tab_r, bias_ptr, sbm, sbn, win_l, win_r, CAUSAL, HAS_WL, HAS_WR,
                     ALIBI, TABLE, BIAS, BIAS_MASK, UPCAST)
    p = tl.math.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), UPCAST)
    ds = p * (dp - delta[:, None])
    return p, ds, rel


@triton.jit
def _load_row_stats(Lse, Delta, row0, offs_m, Nq):
    """lse (log2 domain) and delta of rows; rows with no visible key or past Nq get
    lse = +inf so that their recomputed probabilities are exactly 0."""
    lse = tl.load(Lse + row0 + offs_m, mask=offs_m < Nq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(Delta + row0 + offs_m, mask=offs_m < Nq, other=0.0)
    return lse, delta


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, QPos, KPos, InvFreq, Slopes, Table, Bias,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sdob, sdoh, sdom, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                   sqpb, skpb, ssb, ssh, stab_h, stab_t, sbb, sbh, sbm, sbn, bias_nb,
                   Hq, Hkv, Nq, Nk, D, GROUP, sm_scale, qk_scale, rope_factor, win_l, win_r, tab_l, tab_r,
                   CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_POS: tl.constexpr,
                   ROPE: tl.constexpr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                   ALIBI: tl.constexpr, TABLE: tl.constexpr, BIAS: tl.constexpr, BIAS_MASK: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (key block, batch, kv head): dK and dV summed over the GROUP
    query heads that share this kv head, in registers (no atomics)."""
    start_n = tl.program_id(0) * BLOCK_N
    off_hk = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    kp = _positions(KPos + off_b * skpb, offs_n, Nk, 0, HAS_POS)
    k = _load_rotated(K + off_b * skb + off_hk * skh, offs_n, offs_d, skn, skd, Nk, D, kp, InvFreq,
                      rope_factor, ROPE, ROT_DIM, INTERLEAVED)
    v = _load_tile(V + off_b * svb + off_hk * svh, offs_n, offs_d, svn, svd, Nk, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = _query_range(start_n, BLOCK_N, Nq, Nk, win_l, win_r, CAUSAL, HAS_WL, HAS_WR, HAS_POS, BLOCK_M)
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        q_base = Q + off_b * sqb + off_h * sqh
        do_base = DO + off_b * sdob + off_h * sdoh
        row0 = (off_b * Hq + off_h) * Nq
        slope = 0.0
        if ALIBI:
            slope = tl.load(Slopes + off_b * ssb + off_h * ssh).to(tl.float32)
        table_ptr = Table + off_h * stab_h
        bias_ptr = Bias + (off_b % bias_nb) * sbb + off_h * sbh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            qp = _positions(QPos + off_b * sqpb, offs_m, Nq, Nk - Nq, HAS_POS)
            q = _load_rotated(q_base, offs_m, offs_d, sqm, sqd, Nq, D, qp, InvFreq, rope_factor,
                              ROPE, ROT_DIM, INTERLEAVED)
            do = _load_tile(do_base, offs_m, offs_d, sdom, sdod, Nq, D)
            lse2, delta = _load_row_stats(Lse, Delta, row0, offs_m, Nq)
            p, ds, rel = _probs_and_ds(q, k, v, do, qp, kp, lse2, delta, offs_m, offs_n, Nq, Nk, qk_scale,
                                       slope, table_ptr, stab_t, tab_l, tab_r, bias_ptr, sbm, sbn,
                                       win_l, win_r, CAUSAL, HAS_WL, HAS_WR, ALIBI, TABLE, BIAS,
                                       BIAS_MASK, UPCAST)
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST)

    dk *= sm_scale
    if ROPE:
        dk = _unrotate(dk, offs_d, kp, InvFreq, rope_factor, ROT_DIM, INTERLEAVED)
    mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
    tl.store(DK + off_b * sdkb + off_hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + off_b * sdvb + off_hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, DSlope, DTable, QPos, KPos, InvFreq, Slopes, Table, Bias,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd,
                 sqpb, skpb, ssb, ssh, stab_h, stab_t, sbb, sbh, sbm, sbn, bias_nb,
                 Hq, Nq, Nk, D, GROUP, NUM_M, TAB_T, sm_scale, qk_scale, rope_factor, win_l, win_r, tab_l, tab_r,
                 CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_POS: tl.constexpr,
                 ROPE: tl.constexpr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                 ALIBI: tl.constexpr, TABLE: tl.constexpr, BIAS: tl.constexpr, BIAS_MASK: tl.constexpr,
                 D_SLOPE: tl.constexpr, D_TABLE: tl.constexpr, BLOCK_T: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (query block, batch, q head): dQ, and this program's partial
    sums of d(slope) and d(table), written to its own slot of DSlope / DTable."""
    pid_m = tl.program_id(0)
    start_m = pid_m * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * Hq + off_h
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    qp = _positions(QPos + off_b * sqpb, offs_m, Nq, Nk - Nq, HAS_POS)
    q = _load_rotated(Q + off_b * sqb + off_h * sqh, offs_m, offs_d, sqm, sqd, Nq, D, qp, InvFreq,
                      rope_factor, ROPE, ROT_DIM, INTERLEAVED)
    do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, offs_d, sdom, sdod, Nq, D)
    lse2, delta = _load_row_stats(Lse, Delta, off_bh * Nq, offs_m, Nq)
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh
    slope = 0.0
    if ALIBI:
        slope = tl.load(Slopes + off_b * ssb + off_h * ssh).to(tl.float32)
    table_ptr = Table + off_h * stab_h
    bias_ptr = Bias + (off_b % bias_nb) * sbb + off_h * sbh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    d_slope = tl.zeros([BLOCK_M], tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    d_tab = tl.zeros([BLOCK_T], tl.float32)
    lo, hi = _key_range(start_m, BLOCK_M, Nq, Nk, win_l, win_r, CAUSAL, HAS_WL, HAS_WR, HAS_POS, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kp = _positions(KPos + off_b * skpb, offs_n, Nk, 0, HAS_POS)
        k = _load_rotated(k_base, offs_n, offs_d, skn, skd, Nk, D, kp, InvFreq, rope_factor,
                          ROPE, ROT_DIM, INTERLEAVED)
        v = _load_tile(v_base, offs_n, offs_d, svn, svd, Nk, D)
        p, ds, rel = _probs_and_ds(q, k, v, do, qp, kp, lse2, delta, offs_m, offs_n, Nq, Nk, qk_scale,
                                   slope, table_ptr, stab_t, tab_l, tab_r, bias_ptr, sbm, sbn,
                                   win_l, win_r, CAUSAL, HAS_WL, HAS_WR, ALIBI, TABLE, BIAS,
                                   BIAS_MASK, UPCAST)
        dq += _dot(ds.to(k.dtype), k, UPCAST)
        if D_SLOPE:
            d_slope -= tl.sum(ds * tl.abs(rel).to(tl.float32), 1)
        if D_TABLE:
            # Histogram of dS by table column, over only the columns this tile
            # touches: far from the diagonal every entry clamps to one column.
            idx = _table_index(rel, qp, kp, tab_l, tab_r, TABLE)
            live = ds != 0.0
            c_lo = tl.min(tl.where(live, idx, TAB_T))
            c_hi = tl.max(tl.where(live, idx, -1))
            for c in range(c_lo, c_hi + 1):
                d_tab += tl.where(offs_t == c, tl.sum(tl.sum(tl.where(idx == c, ds, 0.0), 1), 0), 0.0)

    dq *= sm_scale
    if ROPE:
        dq = _unrotate(dq, offs_d, qp, InvFreq, rope_factor, ROT_DIM, INTERLEAVED)
    tl.store(DQ + off_b * sdqb + off_h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D))
    slot = off_bh * NUM_M + pid_m
    if D_SLOPE:
        tl.store(DSlope + slot, tl.sum(d_slope, 0))
    if D_TABLE:
        tl.store(DTable + slot * TAB_T + offs_t, d_tab, mask=offs_t < TAB_T)


@triton.jit
def _attn_bwd_dbias(Q, K, V, DO, Lse, Delta, DBias, QPos, KPos, InvFreq, Slopes, Table, Bias,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    sdob, sdoh, sdom, sdod, sqpb, skpb, ssb, ssh, stab_h, stab_t, sbb, sbh, sbm, sbn, bias_nb,
                    B, Hq, Nq, Nk, D, GROUP, BH, BM_, BN_, NUM_N, qk_scale, rope_factor, win_l, win_r, tab_l, tab_r,
                    CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_POS: tl.constexpr,
                    ROPE: tl.constexpr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                    ALIBI: tl.constexpr, TABLE: tl.constexpr,
                    HEAD_BCAST: tl.constexpr,
                    ROW_BCAST: tl.constexpr, COL_BCAST: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """d(bias) in the bias's own shape [nB, 1|Hq, 1|Nq, 1|Nk] (float32): one program
    per output tile sums dS over every batch, head, row and column that broadcasting
    folds onto it, in a fixed order (deterministic, no atomics)."""
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b in range(ob, B, bias_nb):  # every batch whose bias is bias[ob] (b % nB == ob)
        off_b = tl.cast(b, tl.int64)
        for h in range(h_lo, h_hi):
            off_h = tl.cast(h, tl.int64)
            off_hk = off_h // GROUP
            row0 = (off_b * Hq + off_h) * Nq
            slope = 0.0
            if ALIBI:
                slope = tl.load(Slopes + off_b * ssb + off_h * ssh).to(tl.float32)
            table_ptr = Table + off_h * stab_h
            bias_ptr = Bias + (off_b % bias_nb) * sbb + off_h * sbh
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + offs_m0
                qp = _positions(QPos + off_b * sqpb, offs_m, Nq, Nk - Nq, HAS_POS)
                q = _load_rotated(Q + off_b * sqb + off_h * sqh, offs_m, offs_d, sqm, sqd, Nq, D, qp,
                                  InvFreq, rope_factor, ROPE, ROT_DIM, INTERLEAVED)
                do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, offs_d, sdom, sdod, Nq, D)
                lse2, delta = _load_row_stats(Lse, Delta, row0, offs_m, Nq)
                for start_n in range(n_lo, n_hi, BLOCK_N):
                    offs_n = start_n + offs_n0
                    kp = _positions(KPos + off_b * skpb, offs_n, Nk, 0, HAS_POS)
                    k = _load_rotated(K + off_b * skb + off_hk * skh, offs_n, offs_d, skn, skd, Nk, D, kp,
                                      InvFreq, rope_factor, ROPE, ROT_DIM, INTERLEAVED)
                    v = _load_tile(V + off_b * svb + off_hk * svh, offs_n, offs_d, svn, svd, Nk, D)
                    p, ds, rel = _probs_and_ds(q, k, v, do, qp, kp, lse2, delta, offs_m, offs_n, Nq, Nk,
                                               qk_scale, slope, table_ptr, stab_t, tab_l, tab_r, bias_ptr,
                                               sbm, sbn, win_l, win_r, CAUSAL, HAS_WL, HAS_WR, ALIBI,
                                               TABLE, True, False, UPCAST)
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
