"""The score tile: logits (q.k plus the relative-embedding key term), every additive
encoding term (ALiBi, KERPLE, tables, dense bias) and the masks, in the log2 domain;
the per-head encoding parameters; P and dS recomputed for the backward."""
import triton
import triton.language as tl

from .common import (LOG2E, _ALIBI, _BIAS, _BIAS_MASK, _CAUSAL, _HAS_WL, _HAS_WR, _KERPLE, _REL_K, _REL_U, _REL_V, _REL_W, _TABLE, _UPCAST, _dot, _positions)
from .rope import _load_rotated
from .relative import _add_row, _load_rel, _rel_rows, _rel_to_keys


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
