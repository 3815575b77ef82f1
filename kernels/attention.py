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

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jitted code reads no plain globals

# Bit offsets of the FLAGS constexpr (what the problem has: masks, positions, encodings;
# TABLE takes two bits: 0 none, 1 DistanceBias, 2 GridBias) and of GRADS (what the
# backward computes). posattn/_triton.py packs them with these same constants.
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
def _positions(pos_ptr, offs, N, shift, FLAGS: tl.constexpr):
    HAS_POS: tl.constexpr = (FLAGS >> _HAS_POS.value) & 1
    if HAS_POS:
        # int64: the distance of two int32 positions can pass 2^31
        return tl.load(pos_ptr + offs, mask=offs < N, other=0).to(tl.int64)
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
                  FLAGS: tl.constexpr, ROT_DIM: tl.constexpr):
    """Load a [rows, BLOCK_D] tile of q or k, rotated by RoPE at `pos` when ROPE.
    The partner channels are read as a second (cache-hot) load: no rotated copy of
    q or k ever exists in memory."""
    ROPE: tl.constexpr = (FLAGS >> _ROPE.value) & 1
    INTERLEAVED: tl.constexpr = (FLAGS >> _INTERLEAVED.value) & 1
    x = _load_tile(ptr, offs_n, offs_d, stride_n, stride_d, N, D)
    if ROPE:
        partner, sign, freq, in_rot = _rope_channels(offs_d, inv_freq_ptr, ROT_DIM, INTERLEAVED)
        xp = _load_tile(ptr, offs_n, partner, stride_n, stride_d, N, D)
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
def _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows of aK / aV a tile needs (default positions): slice row r stands for
    rel = rel_min + r, clamped to [-K, K]; the tile's rel span is BLOCK_M + BLOCK_N - 1."""
    rel_min = start_n - (start_m + BLOCK_M - 1) - (Nk - Nq)
    rel = rel_min + tl.arange(0, BLOCK_R)
    return tl.minimum(tl.maximum(rel, -rel_k), rel_k) + rel_k


@triton.jit
def _load_rel(ptr, rows, offs_d, D):
    """[BLOCK_R, BLOCK_D] rows of a contiguous [2K+1, D] relative table."""
    return tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _rel_to_keys(x_r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_R] in slice space -> [BLOCK_M, BLOCK_N]: pair (i, j) is slice
    row j - i + BLOCK_M - 1 (a per-row shift, done as one register gather)."""
    r = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None] + (BLOCK_M - 1)
    return tl.gather(x_r, r, axis=1)


@triton.jit
def _keys_to_rel(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The inverse shift: [BLOCK_M, BLOCK_N] -> [BLOCK_M, BLOCK_R], slice row r of row i
    holds x[i, r + i - BLOCK_M + 1] (0 outside the tile). Keys map one to one onto
    slice rows, so the per-row bucket sums of Shaw's value side need no scatter."""
    j = tl.arange(0, BLOCK_R)[None, :] + tl.arange(0, BLOCK_M)[:, None] - (BLOCK_M - 1)
    inside = (j >= 0) & (j < BLOCK_N)
    return tl.where(inside, tl.gather(x, tl.minimum(tl.maximum(j, 0), BLOCK_N - 1), axis=1), 0.0)


@triton.jit
def _add_row(x, ptr, offs_d, D, FLAG: tl.constexpr):
    """x + vec[None, :] (a [D] vector, Transformer-XL's u or w), kept in x's dtype."""
    if FLAG:
        vec = tl.load(ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        return (x.to(tl.float32) + vec[None, :]).to(x.dtype)
    else:
        return x


@triton.jit
def _load_queries(q_ptr, pos_ptr, offs_m, offs_d, sqm, sqd, Nq, Nk, D, InvFreq, rope_factor, u_ptr, w_ptr,
                  FLAGS: tl.constexpr, ROT_DIM: tl.constexpr):
    """A query block: its positions, its tile (rotated by RoPE) and the tile plus
    Transformer-XL's u (for the content term) and w (for the position term)."""
    REL_U: tl.constexpr = (FLAGS >> _REL_U.value) & 1
    REL_W: tl.constexpr = (FLAGS >> _REL_W.value) & 1
    qp = _positions(pos_ptr, offs_m, Nq, Nk - Nq, FLAGS)
    q = _load_rotated(q_ptr, offs_m, offs_d, sqm, sqd, Nq, D, qp, InvFreq, rope_factor, FLAGS, ROT_DIM)
    return qp, q, _add_row(q, u_ptr, offs_d, D, REL_U), _add_row(q, w_ptr, offs_d, D, REL_W)


@triton.jit
def _logits(qu, qw, k, ak_ptr, start_m, start_n, Nq, Nk, rel_k, offs_d, D,
            FLAGS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """(q + u) . k, plus (q + w) . aK[c(i, j)] with Shaw's key table: one product of
    the q tile with the tile's BLOCK_R-row slice of aK, then a per-row shift.
    Returns the logits and the aK slice (0.0 without a key table)."""
    REL_K: tl.constexpr = (FLAGS >> _REL_K.value) & 1
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    qk = _dot(qu, tl.trans(k), UPCAST)
    ak = 0.0
    if REL_K:
        ak = _load_rel(ak_ptr, _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_M, BLOCK_R), offs_d, D)
        ak = ak.to(qw.dtype)
        qk += _rel_to_keys(_dot(qw, tl.trans(ak), UPCAST), BLOCK_M, BLOCK_N)
    return qk, ak


@triton.jit
def _scores(qk, qp, kp, offs_m, offs_n, Nq, Nk, qk_scale, slope, r1, r2, table_ptr, stride_tab,
            tab_l, tab_r, bias_ptr, stride_bm, stride_bn, win_l, win_r,
            FLAGS: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] score tile in the log2 domain, masked entries = -inf."""
    CAUSAL: tl.constexpr = (FLAGS >> _CAUSAL.value) & 1
    HAS_WL: tl.constexpr = (FLAGS >> _HAS_WL.value) & 1
    HAS_WR: tl.constexpr = (FLAGS >> _HAS_WR.value) & 1
    ALIBI: tl.constexpr = (FLAGS >> _ALIBI.value) & 1
    KERPLE: tl.constexpr = (FLAGS >> _KERPLE.value) & 1
    TABLE: tl.constexpr = (FLAGS >> _TABLE.value) & 3
    BIAS: tl.constexpr = (FLAGS >> _BIAS.value) & 1
    BIAS_MASK: tl.constexpr = (FLAGS >> _BIAS_MASK.value) & 1
    s = qk * qk_scale
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
    if KERPLE:  # -r1 log(1 + r2 |rel|), in the log2 domain: -r1 log2(1 + r2 |rel|)
        s -= r1 * tl.math.log2(1.0 + r2 * tl.abs(rel).to(tl.float32))
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
def _head_params(off_b, off_h, Slopes, ssb, ssh, Table, stab_h, Bias, sbb, sbh, bias_nb,
                 AK, AV, U, W, rel_hs, rel_k, D, R1, R2, FLAGS: tl.constexpr):
    """Per (batch, query head): ALiBi slope, KERPLE's r1 / r2, and the bases of the
    bias table, the dense bias, the relative tables (shared by all heads when
    rel_hs == 0) and u / w."""
    ALIBI: tl.constexpr = (FLAGS >> _ALIBI.value) & 1
    KERPLE: tl.constexpr = (FLAGS >> _KERPLE.value) & 1
    slope = 0.0
    if ALIBI:
        slope = tl.load(Slopes + off_b * ssb + off_h * ssh).to(tl.float32)
    r1 = 0.0
    r2 = 0.0
    if KERPLE:
        r1 = tl.load(R1 + off_h).to(tl.float32)
        r2 = tl.load(R2 + off_h).to(tl.float32)
    rel_base = off_h * rel_hs * (2 * rel_k + 1) * D
    return (slope, r1, r2, Table + off_h * stab_h, Bias + (off_b % bias_nb) * sbb + off_h * sbh,
            AK + rel_base, AV + rel_base, U + off_h * D, W + off_h * D)


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


# ----------------------------------------------------------------------------- forward

@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, Lse2,
              QPos, KPos, InvFreq, Slopes, Table, Bias, AK, AV, U, W, R1, R2,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              sqpb, skpb, ssb, ssh, stab_h, stab_t, sbb, sbh, sbm, sbn, bias_nb, rel_hs,
              Hq, Nq, Nk, D, GROUP, qk_scale, rope_factor, win_l, win_r, tab_l, tab_r, rel_k,
              FLAGS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per (query block, head, batch): out, the natural-log lse (returned)
    and the log2-domain one the backward recomputes P from (no round trip)."""
    REL_V: tl.constexpr = (FLAGS >> _REL_V.value) & 1
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * Hq + off_h
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr = _head_params(
        off_b, off_h, Slopes, ssb, ssh, Table, stab_h, Bias, sbb, sbh, bias_nb, AK, AV, U, W,
        rel_hs, rel_k, D, R1, R2, FLAGS)
    qp, q, qu, qw = _load_queries(Q + off_b * sqb + off_h * sqh, QPos + off_b * sqpb, offs_m, offs_d, sqm, sqd,
                                  Nq, Nk, D, InvFreq, rope_factor, u_ptr, w_ptr,
                                  FLAGS, ROT_DIM)
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, BLOCK_M, Nq, Nk, win_l, win_r, FLAGS, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kp = _positions(KPos + off_b * skpb, offs_n, Nk, 0, FLAGS)
        k = _load_rotated(k_base, offs_n, offs_d, skn, skd, Nk, D, kp, InvFreq, rope_factor,
                          FLAGS, ROT_DIM)
        qk, ak = _logits(qu, qw, k, ak_ptr, start_m, start_n, Nq, Nk, rel_k, offs_d, D, FLAGS,
                         BLOCK_M, BLOCK_N, BLOCK_R)
        s, rel = _scores(qk, qp, kp, offs_m, offs_n, Nq, Nk, qk_scale, slope, r1, r2, table_ptr, stab_t,
                         tab_l, tab_r, bias_ptr, sbm, sbn, win_l, win_r, FLAGS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, offs_d, svn, svd, Nk, D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        if REL_V:  # Shaw's value side: sum_j p_ij aV[c(i, j)], bucketed per row
            av = _load_rel(av_ptr, _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_M, BLOCK_R), offs_d, D)
            acc += _dot(_keys_to_rel(p, BLOCK_M, BLOCK_N, BLOCK_R).to(v.dtype), av.to(v.dtype), UPCAST)
        m_i = m_new

    # Rows that saw no key: output 0, lse = -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = Out + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D))
    tl.store(Lse + off_bh * Nq + offs_m, lse2 / LOG2E, mask=offs_m < Nq)
    tl.store(Lse2 + off_bh * Nq + offs_m, lse2, mask=offs_m < Nq)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_delta(Out, DO, Delta, DLse, sob, soh, som, sod, sdob, sdoh, sdom, sdod,
                    Hq, Nq, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (minus dLse_i when lse is differentiated too),
    FlashAttention's shortcut for sum_j P_ij dP_ij (see _attn_bwd_dq's DELTA_PASS)."""
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
def _load_row_stats(Lse2, Delta, row0, offs_m, Nq):
    """lse (log2 domain) and delta of rows; rows with no visible key or past Nq get
    lse = +inf so that their recomputed probabilities are exactly 0."""
    lse = tl.load(Lse2 + row0 + offs_m, mask=offs_m < Nq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + row0 + offs_m, mask=offs_m < Nq, other=0.0)
    return lse, delta


@triton.jit
def _probs_and_ds(qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2, delta, start_m, start_n, offs_m, offs_n,
                  offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, stab_t, tab_l, tab_r,
                  bias_ptr, sbm, sbn, win_l, win_r,
                  FLAGS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Recompute P from the saved log-sum-exp and dS = P * (dP - delta), the gradient
    w.r.t. the natural-domain score scale * q.k + bias. dP_ij = dO_i . (v_j + aV[c]).
    Also returns rel and the aK slice (for dQ's position term)."""
    REL_V: tl.constexpr = (FLAGS >> _REL_V.value) & 1
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    qk, ak = _logits(qu, qw, k, ak_ptr, start_m, start_n, Nq, Nk, rel_k, offs_d, D, FLAGS,
                     BLOCK_M, BLOCK_N, BLOCK_R)
    s, rel = _scores(qk, qp, kp, offs_m, offs_n, Nq, Nk, qk_scale, slope, r1, r2, table_ptr, stab_t,
                     tab_l, tab_r, bias_ptr, sbm, sbn, win_l, win_r, FLAGS)
    p = tl.math.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), UPCAST)
    if REL_V:
        av = _load_rel(av_ptr, _rel_rows(start_m, start_n, Nq, Nk, rel_k, BLOCK_M, BLOCK_R), offs_d, D)
        dp += _rel_to_keys(_dot(do, tl.trans(av.to(do.dtype)), UPCAST), BLOCK_M, BLOCK_N)
    ds = p * (dp - delta[:, None])
    return p, ds, rel, ak


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV,
                   QPos, KPos, InvFreq, Slopes, Table, Bias, AK, AV, U, W, R1, R2,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sdob, sdoh, sdom, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                   sqpb, skpb, ssb, ssh, stab_h, stab_t, sbb, sbh, sbm, sbn, bias_nb, rel_hs,
                   Hq, Hkv, Nq, Nk, D, GROUP, sm_scale, qk_scale, rope_factor, win_l, win_r, tab_l, tab_r, rel_k,
                   FLAGS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per (key block, kv head, batch): dK and dV summed over the GROUP
    query heads that share this kv head, in registers (no atomics)."""
    ROPE: tl.constexpr = (FLAGS >> _ROPE.value) & 1
    UPCAST: tl.constexpr = (FLAGS >> _UPCAST.value) & 1
    start_n = tl.program_id(0) * BLOCK_N
    off_hk = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    kp = _positions(KPos + off_b * skpb, offs_n, Nk, 0, FLAGS)
    k = _load_rotated(K + off_b * skb + off_hk * skh, offs_n, offs_d, skn, skd, Nk, D, kp, InvFreq,
                      rope_factor, FLAGS, ROT_DIM)
    v = _load_tile(V + off_b * svb + off_hk * svh, offs_n, offs_d, svn, svd, Nk, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = _query_range(start_n, BLOCK_N, Nq, Nk, win_l, win_r, FLAGS, BLOCK_M)
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr = _head_params(
            off_b, off_h, Slopes, ssb, ssh, Table, stab_h, Bias, sbb, sbh, bias_nb, AK, AV, U, W,
            rel_hs, rel_k, D, R1, R2, FLAGS)
        q_base = Q + off_b * sqb + off_h * sqh
        do_base = DO + off_b * sdob + off_h * sdoh
        row0 = (off_b * Hq + off_h) * Nq
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            qp, q, qu, qw = _load_queries(q_base, QPos + off_b * sqpb, offs_m, offs_d, sqm, sqd, Nq, Nk, D,
                                          InvFreq, rope_factor, u_ptr, w_ptr,
                                          FLAGS, ROT_DIM)
            do = _load_tile(do_base, offs_m, offs_d, sdom, sdod, Nq, D)
            lse2, delta = _load_row_stats(Lse, Delta, row0, offs_m, Nq)
            p, ds, rel, ak = _probs_and_ds(
                qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2, delta, start_m, start_n, offs_m, offs_n,
                offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, stab_t, tab_l, tab_r, bias_ptr, sbm, sbn,
                win_l, win_r, FLAGS,
                BLOCK_M, BLOCK_N, BLOCK_R)
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST)
            dk += _dot(tl.trans(ds.to(qu.dtype)), qu, UPCAST)

    dk *= sm_scale
    if ROPE:
        dk = _unrotate(dk, offs_d, kp, InvFreq, rope_factor, FLAGS, ROT_DIM)
    mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
    tl.store(DK + off_b * sdkb + off_hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + off_b * sdvb + off_hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, DSlope, DTable, DU, DW, DAKEnd, DAVEnd, DKerple,
                 QPos, KPos, InvFreq, Slopes, Table, Bias, AK, AV, U, W, R1, R2,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd,
                 sqpb, skpb, ssb, ssh, stab_h, stab_t, sbb, sbh, sbm, sbn, bias_nb, rel_hs,
                 Hq, Nq, Nk, D, GROUP, NUM_M, TAB_T, sm_scale, qk_scale, rope_factor,
                 win_l, win_r, tab_l, tab_r, rel_k,
                 FLAGS: tl.constexpr, GRADS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per (query block, q head, batch): dQ, and this program's partial
    sums of d(slope), d(table), du, dw and the two clipped end rows of d(aK), d(aV),
    each written to its own slot (the host adds the slots in a fixed order).

    With DELTA_PASS it only computes, from the same P and dP tiles the gradient
    uses, l_i = sum_j P_ij and delta_i = sum_j P_ij dP_ij / l_i, and folds log2(l_i)
    into the row's lse: the recomputed P then sums to 1 to float32 rounding and
    delta is the exact sum the softmax gradient subtracts. In rows where attention
    is nearly one-hot, rowsum(dO * O) or an lse off by eps * |lse| differ from it
    by as much as dS itself, and slope / table gradients inherit that error."""
    ROPE: tl.constexpr = (FLAGS >> _ROPE.value) & 1
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
    pid_m = tl.program_id(0)
    start_m = pid_m * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_bh = off_b * Hq + off_h
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr = _head_params(
        off_b, off_h, Slopes, ssb, ssh, Table, stab_h, Bias, sbb, sbh, bias_nb, AK, AV, U, W,
        rel_hs, rel_k, D, R1, R2, FLAGS)
    qp, q, qu, qw = _load_queries(Q + off_b * sqb + off_h * sqh, QPos + off_b * sqpb, offs_m, offs_d, sqm, sqd,
                                  Nq, Nk, D, InvFreq, rope_factor, u_ptr, w_ptr,
                                  FLAGS, ROT_DIM)
    do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, offs_d, sdom, sdod, Nq, D)
    lse2, delta = _load_row_stats(Lse, Delta, off_bh * Nq, offs_m, Nq)
    if DELTA_PASS:
        delta = tl.zeros([BLOCK_M], tl.float32)   # then dS = P * dP
        p_dp = tl.zeros([BLOCK_M], tl.float32)
        p_sum = tl.zeros([BLOCK_M], tl.float32)
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh

    dq_c = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # from (q + u) . k
    dq_p = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # from (q + w) . aK
    d_slope = tl.zeros([BLOCK_M], tl.float32)
    d_r1 = tl.zeros([BLOCK_M], tl.float32)
    d_r2 = tl.zeros([BLOCK_M], tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    d_tab = tl.zeros([BLOCK_T], tl.float32)
    # dS and P summed over the keys clipped to aK / aV row 0 (rel <= -K) and row 2K.
    ds_left = tl.zeros([BLOCK_M], tl.float32)
    ds_right = tl.zeros([BLOCK_M], tl.float32)
    p_left = tl.zeros([BLOCK_M], tl.float32)
    p_right = tl.zeros([BLOCK_M], tl.float32)
    lo, hi = _key_range(start_m, BLOCK_M, Nq, Nk, win_l, win_r, FLAGS, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kp = _positions(KPos + off_b * skpb, offs_n, Nk, 0, FLAGS)
        k = _load_rotated(k_base, offs_n, offs_d, skn, skd, Nk, D, kp, InvFreq, rope_factor,
                          FLAGS, ROT_DIM)
        v = _load_tile(v_base, offs_n, offs_d, svn, svd, Nk, D)
        p, ds, rel, ak = _probs_and_ds(
            qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2, delta, start_m, start_n, offs_m, offs_n,
            offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, stab_t, tab_l, tab_r, bias_ptr, sbm, sbn,
            win_l, win_r, FLAGS,
            BLOCK_M, BLOCK_N, BLOCK_R)
        if DELTA_PASS:
            p_dp += tl.sum(ds, 1)
            p_sum += tl.sum(p, 1)
        else:
            dq_c += _dot(ds.to(k.dtype), k, UPCAST)
            if REL_K:
                dq_p += _dot(_keys_to_rel(ds, BLOCK_M, BLOCK_N, BLOCK_R).to(k.dtype), ak, UPCAST)
            if D_SLOPE:
                d_slope -= tl.sum(ds * tl.abs(rel).to(tl.float32), 1)
            if D_KERPLE:  # d/dr1 = -log(1 + r2 a), d/dr2 = -r1 a / (1 + r2 a), a = |rel|
                dist = tl.abs(rel).to(tl.float32)
                grow = 1.0 + r2 * dist
                d_r1 -= tl.sum(ds * (tl.math.log2(grow) / LOG2E), 1)
                d_r2 -= tl.sum(ds * (r1 * dist / grow), 1)
            if D_TABLE:
                # Histogram of dS by table column, over only the columns this tile
                # touches: far from the diagonal every entry clamps to one column.
                idx = _table_index(rel, qp, kp, tab_l, tab_r, TABLE)
                live = ds != 0.0
                c_lo = tl.min(tl.where(live, idx, TAB_T))
                c_hi = tl.max(tl.where(live, idx, -1))
                for c in range(c_lo, c_hi + 1):
                    d_tab += tl.where(offs_t == c, tl.sum(tl.sum(tl.where(idx == c, ds, 0.0), 1), 0), 0.0)
            if D_AK or D_AV:
                left = rel <= -rel_k
                right = (rel >= rel_k) & (rel > -rel_k)
                if D_AK:
                    ds_left += tl.sum(tl.where(left, ds, 0.0), 1)
                    ds_right += tl.sum(tl.where(right, ds, 0.0), 1)
                if D_AV:
                    p_left += tl.sum(tl.where(left, p, 0.0), 1)
                    p_right += tl.sum(tl.where(right, p, 0.0), 1)

    if DELTA_PASS:
        live = (offs_m < Nq) & (p_sum > 0.0)
        tl.store(Delta + off_bh * Nq + offs_m, p_dp / tl.where(live, p_sum, 1.0), mask=offs_m < Nq)
        tl.store(Lse + off_bh * Nq + offs_m, lse2 + tl.math.log2(tl.where(live, p_sum, 1.0)), mask=live)
    else:
        slot = off_bh * NUM_M + pid_m
        in_d = offs_d < D
        if D_U:
            tl.store(DU + slot * D + offs_d, tl.sum(dq_c, 0) * sm_scale, mask=in_d)
        if D_W:
            tl.store(DW + slot * D + offs_d, tl.sum(dq_p, 0) * sm_scale, mask=in_d)
        if D_AK:
            qw32 = qw.to(tl.float32)
            tl.store(DAKEnd + slot * 2 * D + offs_d, tl.sum(ds_left[:, None] * qw32, 0) * sm_scale, mask=in_d)
            tl.store(DAKEnd + (slot * 2 + 1) * D + offs_d, tl.sum(ds_right[:, None] * qw32, 0) * sm_scale,
                     mask=in_d)
        if D_AV:
            do32 = do.to(tl.float32)
            tl.store(DAVEnd + slot * 2 * D + offs_d, tl.sum(p_left[:, None] * do32, 0), mask=in_d)
            tl.store(DAVEnd + (slot * 2 + 1) * D + offs_d, tl.sum(p_right[:, None] * do32, 0), mask=in_d)
        if D_SLOPE:
            tl.store(DSlope + slot, tl.sum(d_slope, 0))
        if D_KERPLE:
            tl.store(DKerple + slot * 2, tl.sum(d_r1, 0))
            tl.store(DKerple + slot * 2 + 1, tl.sum(d_r2, 0))
        if D_TABLE:
            tl.store(DTable + slot * TAB_T + offs_t, d_tab, mask=offs_t < TAB_T)

        dq = (dq_c + dq_p) * sm_scale
        if ROPE:
            dq = _unrotate(dq, offs_d, qp, InvFreq, rope_factor, FLAGS, ROT_DIM)
        tl.store(DQ + off_b * sdqb + off_h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Nq) & in_d[None, :])


@triton.jit
def _attn_bwd_rel(Q, K, V, DO, Lse, Delta, DAK, DAV,
                  QPos, KPos, InvFreq, Slopes, Table, Bias, AK, AV, U, W, R1, R2,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
                  sqpb, skpb, ssb, ssh, stab_h, stab_t, sbb, sbh, sbm, sbn, bias_nb, rel_hs,
                  Hq, Nq, Nk, D, GROUP, rel_first, head_step, sm_scale, qk_scale, rope_factor,
                  win_l, win_r, tab_l, tab_r, rel_k,
                  FLAGS: tl.constexpr, GRADS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
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
    shift = Nk - Nq
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    acc_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for h in range(ha, Hq, head_step):  # this table head's query heads
        off_h = tl.cast(h, tl.int64)
        off_hk = off_h // GROUP
        slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr = _head_params(
            off_b, off_h, Slopes, ssb, ssh, Table, stab_h, Bias, sbb, sbh, bias_nb, AK, AV, U, W,
            rel_hs, rel_k, D, R1, R2, FLAGS)
        row0 = (off_b * Hq + off_h) * Nq
        for start_m in range(0, Nq, BLOCK_M):
            # keys j = i + shift + rel for rows i of the block and rel in [rel0, rel0 + BLOCK_N)
            lo, hi = _key_range(start_m, BLOCK_M, Nq, Nk, win_l, win_r, FLAGS, BLOCK_N)
            j_lo = tl.maximum(lo, start_m + shift + rel0)
            j_hi = tl.minimum(hi, start_m + BLOCK_M + shift + rel0 + BLOCK_N - 1)
            offs_m = start_m + offs_m0
            qp, q, qu, qw = _load_queries(Q + off_b * sqb + off_h * sqh, QPos + off_b * sqpb, offs_m, offs_d,
                                          sqm, sqd, Nq, Nk, D, InvFreq, rope_factor, u_ptr, w_ptr,
                                          FLAGS, ROT_DIM)
            do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, offs_d, sdom, sdod, Nq, D)
            lse2, delta = _load_row_stats(Lse, Delta, row0, offs_m, Nq)
            for start_n in range((tl.maximum(j_lo, 0) // BLOCK_N) * BLOCK_N, j_hi, BLOCK_N):
                offs_n = start_n + offs_n0
                kp = _positions(KPos + off_b * skpb, offs_n, Nk, 0, FLAGS)
                k = _load_rotated(K + off_b * skb + off_hk * skh, offs_n, offs_d, skn, skd, Nk, D, kp,
                                  InvFreq, rope_factor, FLAGS, ROT_DIM)
                v = _load_tile(V + off_b * svb + off_hk * svh, offs_n, offs_d, svn, svd, Nk, D)
                p, ds, rel, ak = _probs_and_ds(
                    qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2, delta, start_m, start_n, offs_m,
                    offs_n, offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, stab_t, tab_l, tab_r,
                    bias_ptr, sbm, sbn, win_l, win_r, FLAGS, BLOCK_M, BLOCK_N, BLOCK_R)
                # column r of row i: the key at distance rel0 + r, if it is in this tile
                jl = (start_m + shift + rel0 - start_n) + offs_n0[None, :] + offs_m0[:, None]
                inside = (jl >= 0) & (jl < BLOCK_N)
                jl = tl.minimum(tl.maximum(jl, 0), BLOCK_N - 1)
                if D_AK:
                    ds_r = tl.where(inside, tl.gather(ds, jl, axis=1), 0.0)
                    acc_k += _dot(tl.trans(ds_r.to(qw.dtype)), qw, UPCAST)
                if D_AV:
                    p_r = tl.where(inside, tl.gather(p, jl, axis=1), 0.0)
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
def _attn_bwd_dbias(Q, K, V, DO, Lse, Delta, DBias,
                    QPos, KPos, InvFreq, Slopes, Table, Bias, AK, AV, U, W, R1, R2,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
                    sqpb, skpb, ssb, ssh, stab_h, stab_t, sbb, sbh, sbm, sbn, bias_nb, rel_hs,
                    B, Hq, Nq, Nk, D, GROUP, BH, BM_, BN_, NUM_N, qk_scale, rope_factor,
                    win_l, win_r, tab_l, tab_r, rel_k,
                    FLAGS: tl.constexpr, GRADS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b in range(ob, B, bias_nb):  # every batch whose bias is bias[ob] (b % nB == ob)
        off_b = tl.cast(b, tl.int64)
        for h in range(h_lo, h_hi):
            off_h = tl.cast(h, tl.int64)
            off_hk = off_h // GROUP
            row0 = (off_b * Hq + off_h) * Nq
            slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr = _head_params(
                off_b, off_h, Slopes, ssb, ssh, Table, stab_h, Bias, sbb, sbh, bias_nb, AK, AV, U, W,
                rel_hs, rel_k, D, R1, R2, FLAGS)
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + offs_m0
                qp, q, qu, qw = _load_queries(Q + off_b * sqb + off_h * sqh, QPos + off_b * sqpb, offs_m,
                                              offs_d, sqm, sqd, Nq, Nk, D, InvFreq, rope_factor, u_ptr, w_ptr,
                                              FLAGS, ROT_DIM)
                do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, offs_d, sdom, sdod, Nq, D)
                lse2, delta = _load_row_stats(Lse, Delta, row0, offs_m, Nq)
                for start_n in range(n_lo, n_hi, BLOCK_N):
                    offs_n = start_n + offs_n0
                    kp = _positions(KPos + off_b * skpb, offs_n, Nk, 0, FLAGS)
                    k = _load_rotated(K + off_b * skb + off_hk * skh, offs_n, offs_d, skn, skd, Nk, D, kp,
                                      InvFreq, rope_factor, FLAGS, ROT_DIM)
                    v = _load_tile(V + off_b * svb + off_hk * svh, offs_n, offs_d, svn, svd, Nk, D)
                    p, ds, rel, ak = _probs_and_ds(
                        qu, qw, k, v, do, ak_ptr, av_ptr, qp, kp, lse2, delta, start_m, start_n, offs_m,
                        offs_n, offs_d, Nq, Nk, D, rel_k, qk_scale, slope, r1, r2, table_ptr, stab_t, tab_l, tab_r,
                        bias_ptr, sbm, sbn, win_l, win_r, FLAGS, BLOCK_M, BLOCK_N, BLOCK_R)
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
