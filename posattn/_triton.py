"""Triton backend: host launchers and the autograd wrapper around kernels/attention.py."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._validate import Problem
from .encodings import GridBias

_MAX_TABLE_COLUMNS = 8192


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def refusal(p: Problem) -> Optional[str]:
    """Why the Triton backend cannot run this problem, or None when it can."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e})"
    dev = p.q.device
    if p.q.dtype == torch.float64:
        return "float64 is not supported (float16, bfloat16, float32)"
    if dev.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
    if dev.type not in ("cuda", "cpu"):
        return f"tensors on {dev.type} are not supported"
    if p.rel_bias is not None and p.rel_bias.table.numel() // p.Hq > _MAX_TABLE_COLUMNS:
        return (f"{type(p.rel_bias).__name__} with {p.rel_bias.table.numel() // p.Hq} entries per head "
                f"> {_MAX_TABLE_COLUMNS} (the table gradient is reduced in registers)")
    return None


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _config(D: int, backward: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for a head dim."""
    block_d = max(16, _next_pow2(D))
    if interpreting():
        return 64, 32, block_d, 4, 1
    if not backward:
        if block_d <= 64:
            return 128, 64, block_d, 4, 3
        if block_d <= 128:
            return 128, 64, block_d, 8, 3
        return 64, 32, block_d, 8, 2
    if block_d <= 64:
        return 64, 64, block_d, 4, 2
    if block_d <= 128:
        return 64, 64, block_d, 8, 2
    return 32, 32, block_d, 4, 1


def _cdiv(a, b):
    return (a + b - 1) // b


class _Launch:
    """Everything the kernels share: pointers, strides, scalars and constexpr flags,
    built once per call from a validated Problem."""

    def __init__(self, p: Problem, q, k, v, alibi, table, bias):
        dev = q.device
        self.p = p
        dummy = q
        self.qpos = p.q_pos.contiguous() if p.q_pos is not None else dummy
        self.kpos = p.k_pos.contiguous() if p.k_pos is not None else dummy
        has_pos = p.q_pos is not None or p.k_pos is not None
        if has_pos:  # one explicit side: materialise the other's default (O(N))
            dq_pos, dk_pos = p.default_positions(dev)
            self.qpos, self.kpos = dq_pos.contiguous(), dk_pos.contiguous()
        self.inv_freq = p.rope.inv_freq_for(p.D, dev).contiguous() if p.rope is not None else dummy
        grid_table = isinstance(p.rel_bias, GridBias)
        # (head stride, column stride): DistanceBias is [Hq, T], GridBias [T, Hq].
        table_strides = (0, 0) if table is None else \
            (table.stride(1), table.stride(0)) if grid_table else (table.stride(0), table.stride(1))
        self.table_columns = 0 if table is None else table.shape[0 if grid_table else 1]
        self.grid_table = grid_table
        self.alibi = alibi if alibi is not None else dummy
        self.table = table if table is not None else dummy
        self.bias = bias if bias is not None else dummy
        # Size-1 axes broadcast (stride 0); the batch axis may also be periodic
        # (batch b reads bias[b % nB], Swin's shifted-window masks).
        bias_strides = tuple(st if n > 1 else 0 for n, st in zip(bias.shape, bias.stride())) \
            if bias is not None else (0, 0, 0, 0)
        bias_nb = bias.shape[0] if bias is not None else 1
        self.ptrs = (self.qpos, self.kpos, self.inv_freq, self.alibi, self.table, self.bias)
        self.enc_strides = (
            self.qpos.stride(0) if has_pos and self.qpos.shape[0] > 1 else 0,
            self.kpos.stride(0) if has_pos and self.kpos.shape[0] > 1 else 0,
            alibi.stride(0) if alibi is not None and alibi.shape[0] > 1 else 0,
            alibi.stride(1) if alibi is not None else 0,
            *table_strides,
            *bias_strides, bias_nb,
        )
        self.flags = dict(
            CAUSAL=p.causal, HAS_WL=p.window_left is not None, HAS_WR=p.window_right is not None,
            HAS_POS=has_pos, ROPE=p.rope is not None, ROT_DIM=p.rotary_dim,
            INTERLEAVED=bool(p.rope is not None and p.rope.interleaved),
            ALIBI=alibi is not None, TABLE=0 if table is None else 2 if grid_table else 1,
        )
        self.bias_flags = dict(BIAS=bias is not None, BIAS_MASK=p.bias_is_mask)
        self.upcast = interpreting() and q.dtype == torch.bfloat16
        self.rope_factor = p.rope.attention_factor if p.rope is not None else 1.0
        rb = p.rel_bias
        tab_a, tab_b = (0, 0) if rb is None else rb.window if grid_table else (rb.left, rb.right)
        self.scalars = (p.window_left or 0, p.window_right or 0, tab_a, tab_b)


LOG2E = 1.4426950408889634


def _forward(L: _Launch, q, k, v, keep_f32=False):
    """out, lse, and the float32 output for the backward when keep_f32 (else out)."""
    from .kernels.attention import _attn_fwd
    p = L.p
    out = torch.empty(p.B, p.Hq, p.Nq, p.D, device=q.device, dtype=q.dtype)
    lse = torch.empty(p.B, p.Hq, p.Nq, device=q.device, dtype=torch.float32)
    store_f32 = keep_f32 and q.dtype != torch.float32
    out32 = torch.empty(p.B, p.Hq, p.Nq, p.D, device=q.device, dtype=torch.float32) if store_f32 else out
    bm, bn, bd, warps, stages = _config(p.D, backward=False)
    grid = (_cdiv(p.Nq, bm), p.Hq, p.B)
    _attn_fwd[grid](q, k, v, out, out32, lse, *L.ptrs,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(), *L.enc_strides,
                    p.Hq, p.Nq, p.Nk, p.D, p.group, p.scale * LOG2E, L.rope_factor, *L.scalars,
                    **L.flags, **L.bias_flags, STORE_F32=store_f32, UPCAST=L.upcast,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    return out, lse, out32


def _backward(L: _Launch, q, k, v, out, lse, do, dlse, need):
    """need: which of (alibi, table, bias) gradients are wanted."""
    from .kernels.attention import _attn_bwd_dbias, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq
    p = L.p
    dev = q.device
    bm, bn, bd, warps, stages = _config(p.D, backward=True)
    launch = dict(num_warps=warps, num_stages=stages)
    common_scalars = (p.scale * LOG2E, L.rope_factor, *L.scalars)

    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    _attn_bwd_delta[(_cdiv(p.Nq, 64), p.Hq, p.B)](
        out, do, delta, dlse.contiguous() if has_dlse else delta, *out.stride(), *do.stride(),
        p.Hq, p.Nq, p.D, HAS_DLSE=has_dlse, BLOCK_M=64, BLOCK_D=bd)

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _attn_bwd_dkdv[(_cdiv(p.Nk, bn), p.Hkv, p.B)](
        q, k, v, do, lse, delta, dk, dv, *L.ptrs,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *L.enc_strides,
        p.Hq, p.Hkv, p.Nq, p.Nk, p.D, p.group, p.scale, *common_scalars,
        **L.flags, **L.bias_flags, UPCAST=L.upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **launch)

    num_m = _cdiv(p.Nq, bm)
    want_slope, want_table, want_bias = need
    tab_t = max(L.table_columns, 1)
    d_slope = torch.zeros(p.B, p.Hq, num_m, device=dev, dtype=torch.float32) if want_slope else delta
    d_table = torch.zeros(p.B, p.Hq, num_m, tab_t, device=dev, dtype=torch.float32) if want_table else delta
    _attn_bwd_dq[(num_m, p.Hq, p.B)](
        q, k, v, do, lse, delta, dq, d_slope, d_table, *L.ptrs,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *L.enc_strides,
        p.Hq, p.Nq, p.Nk, p.D, p.group, num_m, tab_t, p.scale, *common_scalars,
        **L.flags, **L.bias_flags, D_SLOPE=want_slope, D_TABLE=want_table,
        BLOCK_T=_next_pow2(tab_t) if want_table else 16,
        UPCAST=L.upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **launch)

    g_slope = g_table = g_bias = None
    if want_slope:
        g = d_slope.sum(-1)                                         # [B, Hq]
        if L.alibi.shape[0] == 1:
            g = g.sum(0, keepdim=True)
        g_slope = g.to(L.alibi.dtype)
    if want_table:
        g_table = d_table.sum(dim=(0, 2))                           # [Hq, T]
        g_table = (g_table.t() if L.grid_table else g_table).to(L.table.dtype)
    if want_bias:
        bias = L.bias
        bb, bh, bmq, bnk = bias.shape  # size-1 axes are summed over (broadcast)
        g = torch.empty(bb, bh, bmq, bnk, device=dev, dtype=torch.float32)
        num_n = 1 if bnk == 1 else _cdiv(p.Nk, bn)
        grid = ((1 if bmq == 1 else _cdiv(p.Nq, bm)) * num_n, bh, bb)
        _attn_bwd_dbias[grid](
            q, k, v, do, lse, delta, g, *L.ptrs,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *L.enc_strides,
            p.B, p.Hq, p.Nq, p.Nk, p.D, p.group, bh, bmq, bnk, num_n, *common_scalars,
            **L.flags, HEAD_BCAST=bh == 1 and p.Hq > 1,
            ROW_BCAST=bmq == 1 and p.Nq > 1, COL_BCAST=bnk == 1 and p.Nk > 1,
            UPCAST=L.upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **launch)
        g_bias = g.to(bias.dtype)
    return dq, dk, dv, g_slope, g_table, g_bias


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alibi, table, bias, p: Problem):
        L = _Launch(p, q, k, v, alibi, table, bias)
        params_need_grad = any(x is not None and x.requires_grad for x in (alibi, table, bias))
        out, lse, out_saved = _forward(L, q, k, v, keep_f32=params_need_grad)
        ctx.launch = L
        ctx.save_for_backward(q, k, v, out_saved, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        L = ctx.launch
        need = (ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        if dout is None:
            dout = torch.zeros(out.shape, device=q.device, dtype=q.dtype)
        dq, dk, dv, g_slope, g_table, g_bias = _backward(L, q, k, v, out, lse, dout, dlse, need)
        return dq, dk, dv, g_slope, g_table, g_bias, None


def attention(p: Problem):
    table = p.rel_bias.table if p.rel_bias is not None else None
    bias = p.bias
    if bias is not None and p.bias_is_mask and bias.requires_grad:
        bias = bias.detach()
    out, lse = _TritonAttention.apply(p.q, p.k, p.v, p.alibi, table, bias, p)
    return (out, lse) if p.return_lse else out
