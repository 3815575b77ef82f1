"""Decoding (few queries per row: KV-cache steps): the keys are split over programs
(flash-decoding) and every query head of a k/v head shares its K / V tiles (one query
head per program with Shaw / Transformer-XL terms); the partial results are merged by
their log-sum-exp."""
import triton
import triton.language as tl

from .common import LOG2E, _DROPOUT, _REL_K, _REL_U, _REL_V, _REL_W, _SINKS, _TABLE, _key_range, _positions
from .forward import _fwd_tile
from .scores import _head_params, _load_queries


@triton.jit
def _attn_decode(Q, K, V, Part, PartLse, Pos, Params, Table, Bias, Rel, Rng,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, bias_nb,
                 Hq, Nq, Nk, D, GROUP, sm_scale, win_l, win_r, tab_l, tab_r, rel_k, chunk,
                 FLAGS: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """One program per (key chunk, k/v head, batch). Its rows are the GROUP query heads'
    queries, r = g * Nq + i (head off_hk * GROUP + g, query i), so one K / V tile
    serves the whole group (GQA) and a single query fills a tensor-core tile. Every
    per-head term (ALiBi slope, KERPLE, table row, dense bias row, sink, dropout
    counter) is a per-row column here, which the score tile broadcasts as it does a scalar.
    With Shaw / Transformer-XL terms (per-head tables of vectors) a program is one query
    head instead (grid axis 1: the query head). Either way each tile is the forward's
    (_fwd_tile, masked), at rows offs_i.
    Chunk c covers keys [lo + c * chunk, lo + (c + 1) * chunk) of the rows' key range
    (chunk a multiple of BLOCK_N, so no tile crosses into the next chunk); the sink
    joins chunk 0 only. Writes the chunk's normalised output Part [B, Hq, S * Nq, D]
    (float32) and its log2-domain lse PartLse [B, Hq, S * Nq] (-inf: no key)."""
    SINKS: tl.constexpr = (FLAGS >> _SINKS.value) & 1
    DROPOUT: tl.constexpr = (FLAGS >> _DROPOUT.value) & 1
    TABLE: tl.constexpr = (FLAGS >> _TABLE.value) & 3
    PACKED: tl.constexpr = 1 - ((FLAGS >> _REL_K.value) & 1 | (FLAGS >> _REL_V.value) & 1
                                | (FLAGS >> _REL_U.value) & 1 | (FLAGS >> _REL_W.value) & 1)
    split = tl.program_id(0)
    n_split = tl.num_programs(0)
    off_b = tl.program_id(2).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qk_scale = sm_scale * LOG2E
    pos_q = Pos + off_b * (Nq + Nk)
    seed = tl.load(Rng) if DROPOUT else 0
    if PACKED:
        off_hk = tl.program_id(1).to(tl.int64)
        grp = offs_r // Nq
        offs_i = offs_r % Nq                    # each row's query
        live = grp < GROUP                      # rows past the group (padding to BLOCK_M) are never stored
        off_h = off_hk * GROUP + tl.minimum(grp, GROUP - 1)   # each row's query head
        # _head_params at a vector of heads: per-row values (no relative embeddings here)
        slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr, cap2, sink2, drop_p = _head_params(
            off_b, off_h, Params, Table, tab_l, tab_r, Bias, sbb, sbh, bias_nb, Rel, rel_k, Hq, D, FLAGS, ROT_DIM)
        zero = tl.zeros([BLOCK_M], tl.float32)   # (a scalar where the encoding is off)
        slope, r1, r2 = (slope + zero)[:, None], (r1 + zero)[:, None], (r2 + zero)[:, None]
        bias_ptr = bias_ptr[:, None]
        if TABLE:
            table_ptr = table_ptr[:, None]
        qp = _positions(pos_q, offs_i, Nq, Nk - Nq, FLAGS)
        q = tl.load(Q + off_b * sqb + off_h[:, None] * sqh + offs_i[:, None] * sqm + offs_d[None, :],
                    mask=live[:, None] & (offs_d[None, :] < D), other=0.0)
        qu = q
        qw = q
        rng_row = (off_b * Hq + off_h)[:, None]   # dropout's counter word for (batch, head), per row
    else:
        off_h = tl.program_id(1).to(tl.int64)
        off_hk = off_h // GROUP
        offs_i = offs_r
        live = offs_r < Nq
        slope, r1, r2, table_ptr, bias_ptr, ak_ptr, av_ptr, u_ptr, w_ptr, cap2, sink2, drop_p = _head_params(
            off_b, off_h, Params, Table, tab_l, tab_r, Bias, sbb, sbh, bias_nb, Rel, rel_k, Hq, D, FLAGS, ROT_DIM)
        qp, q, qu, qw = _load_queries(Q + off_b * sqb + off_h * sqh, pos_q, offs_r, offs_d, sqm, Nq, Nk, D,
                                      u_ptr, w_ptr, FLAGS)
        rng_row = off_b * Hq + off_h
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh

    if SINKS:
        m_i = tl.where(split == 0, sink2, float("-inf")) + tl.zeros([BLOCK_M], tl.float32)
        l_i = tl.where(split == 0, 1.0, 0.0) + tl.zeros([BLOCK_M], tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_lo, k_hi = _key_range(0, BLOCK_M, Nq, Nk, win_l, win_r, FLAGS, BLOCK_N)   # (BLOCK_M >= Nq: every row's)
    lo = k_lo + split * chunk
    hi = tl.minimum(lo + chunk, k_hi)
    for start_n in range(lo, hi, BLOCK_N):   # the forward's tile, masked: decoding is bound by the K / V reads
        acc, m_i, l_i, _ = _fwd_tile(acc, m_i, l_i, 0, start_n, qu, qw, qp, pos_q + Nq, k_base, v_base, ak_ptr, av_ptr,
                                  offs_i, offs_n0, offs_d, Nq, Nk, D, skn, svn, rel_k, qk_scale, slope, r1, r2,
                                  table_ptr, tab_l, tab_r, bias_ptr, sbm, win_l, win_r, cap2, seed, rng_row, drop_p,
                                  0.0, 0.0, 0.0, FLAGS, BLOCK_M, BLOCK_N, 1)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - drop_p))
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    row = (off_b * Hq + off_h) * n_split * Nq + split * Nq + offs_i    # [B, Hq, S, Nq]
    tl.store(Part + row[:, None] * D + offs_d[None, :], out, mask=live[:, None] & (offs_d[None, :] < D))
    tl.store(PartLse + row, lse2, mask=live)


@triton.jit
def _attn_decode_merge(Part, PartLse, Out, Lse, Lse2, sob, soh, som, Hq, Nq, D, S,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (query, head, batch): the chunks' outputs weighted by
    exp2(lse_c - lse), lse = log2 sum_c exp2(lse_c), BLOCK_S chunks at a time with a
    running max; no key anywhere: 0 and -inf."""
    i = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    base = (off_b * Hq + off_h) * S * Nq + i
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        row = base + (s0 + offs_s) * Nq
        in_s = s0 + offs_s < S
        lse_c = tl.load(PartLse + row, mask=in_s, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse_c, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(lse_c - m_safe)
        alpha = tl.math.exp2(m - m_safe)
        part = tl.load(Part + row[:, None] * D + offs_d[None, :], mask=in_s[:, None] & (offs_d[None, :] < D),
                       other=0.0)
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(part * w[:, None], 0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    out = acc / tl.where(total == 0.0, 1.0, total)
    lse2 = tl.where(total == 0.0, float("-inf"), m_safe + tl.math.log2(tl.where(total == 0.0, 1.0, total)))
    tl.store(Out + off_b * sob + off_h * soh + i * som + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)
    stat = (off_b * Hq + off_h) * Nq + i
    tl.store(Lse + stat, lse2 / LOG2E)
    tl.store(Lse2 + stat, lse2)
