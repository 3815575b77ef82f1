"""Triton backend: what it declares and refuses, the adapters, and the host launchers of
kernels/attention.py (posattn/_op.py is its autograd layer and torch.library operators)."""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

from . import _tuned
from ._validate import Problem
from .backends import Declaration
from .encodings import KERPLE, ALiBi, DenseBias, DistanceBias, GridBias, RelativeEmbeddings, RoPE, Sinks, SoftCap

_MAX_TABLE_COLUMNS = 8192


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def refusal(p: Problem) -> Optional[str]:
    """Why the Triton backend cannot run this problem (every reason), or None when it can."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e})"
    reasons = []
    dev = p.q.device
    if dev.type == "cpu" and not interpreting():
        reasons.append("CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)")
    elif dev.type not in ("cuda", "cpu"):
        reasons.append(f"tensors on {dev.type} are not supported")
    if not interpreting() and not _fits_shared_memory(p, _arch(dev)):
        reasons.append("relative embeddings with float32 head dims over 128 need more shared memory than "
                       f"this GPU's {_shared_bytes(_arch(dev)) // 1024} KiB per block (bfloat16 / float16 fit)")
    return "; ".join(reasons + DECLARATION.reasons(p)) or None


def _table_columns(e, p: Problem) -> Optional[str]:
    if e.table.numel() // p.Hq > _MAX_TABLE_COLUMNS:
        return (f"{type(e).__name__} with {e.table.numel() // p.Hq} entries per head > {_MAX_TABLE_COLUMNS} "
                f"(the table gradient is reduced in registers)")
    return None


def _relative_positions(e, p: Problem) -> Optional[str]:
    if p.q_pos is not None or p.k_pos is not None:
        return ("rel_emb with explicit q_pos / k_pos (the relative tables are sliced per tile "
                "assuming the default positions)")
    return None


_INT32_LIMIT = 2 ** 31


def _int32_overflow(p: Problem) -> Optional[str]:
    """The kernels index inside one (batch, head) slice with int32 (batch and head
    offsets are int64): refuse a slice whose last element lies at 2^31 or more."""
    if max(p.Nq, p.Nk) >= _INT32_LIMIT:
        return f"sequence lengths Nq={p.Nq}, Nk={p.Nk} reach 2^31 (int32 row indices)"
    tensors = [("q", p.q, (2, 3)), ("k", p.k, (2, 3)), ("v", p.v, (2, 3))]
    if p.bias is not None:
        tensors.append(("bias", p.bias, (2, 3)))
    for name, t, dims in tensors:
        extent = sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims if t.shape[d] > 0)
        if name in "qkv":  # out, dq, dk, dv and the aligned copies: [N, D] per slice, rows padded to 16
            extent = max(extent, t.shape[2] * (-(-t.shape[3] // 16) * 16) - 1)
        if extent >= _INT32_LIMIT:
            return (f"{name} spans {extent + 1} elements within one (batch, head) slice, past 2^31 (the "
                    f"kernels' in-slice offsets are int32)")
    return None


DECLARATION = Declaration(
    name="triton",
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    max_head_dim=256,
    encodings={RoPE: None, ALiBi: None, DistanceBias: _table_columns, GridBias: _table_columns, DenseBias: None,
               RelativeEmbeddings: _relative_positions, KERPLE: None, SoftCap: None, Sinks: None},
    checks=(_int32_overflow,),
)


def _next_pow2(x: int) -> int:
    x = int(x)  # a symbolic size (torch.compile) is specialised here
    return 1 << max(0, (x - 1).bit_length())


# Shared memory one block may use, by compute capability (bytes). sm_86 / sm_89 (RTX
# 30xx / 40xx, A10, L4, L40) have 99 KiB; tests/aot_compile.py compiles every kernel
# for sm_80, sm_86 and sm_90 against these limits.
SHARED_BYTES = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448}
# The compute capability launches are configured for when set (ahead-of-time tools
# on a machine without the GPU: tests/aot_compile.py, bench/sass_model.py).
TARGET_ARCH: Optional[tuple] = None


def _arch(device) -> tuple:
    """The compute capability to configure for: TARGET_ARCH, else the device's (asked at
    launch, never at import), else sm_90 (CPU tensors: the interpreter ignores it)."""
    if TARGET_ARCH is not None:
        return tuple(TARGET_ARCH)
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))
    return (9, 0)


def _shared_bytes(arch) -> int:
    if arch in SHARED_BYTES:
        return SHARED_BYTES[arch]
    return SHARED_BYTES[(9, 0)] if arch >= (9, 0) else 101376   # unknown parts: the smaller budget


def _fits_shared_memory(p: Problem, arch) -> bool:
    """False for what no configuration fits on this architecture: the aK / aV slices of
    256-wide float32 rows need 128-136 KiB even on 16x16 tiles (99 KiB parts)."""
    return not (p.rel_emb is not None and p.q.dtype == torch.float32 and p.D > 128
                and _shared_bytes(arch) < 160 * 1024)


def _config(D: int, backward: bool, rel_emb: bool = False, gpu: bool = None, fp32: bool = False,
            arch: tuple = (9, 0)):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for a head dim on a compute
    capability; the interpreter's unless gpu (default: unless TRITON_INTERPRET is set).
    Sizes follow the tile bytes (float32 counts double) so that shared memory fits the
    architecture (SHARED_BYTES); a configuration measured faster on a GPU by
    bench/tune.py (posattn/_tuned.py) replaces the default for its architecture."""
    block_d = max(16, _next_pow2(D))
    if not (gpu if gpu is not None else not interpreting()):
        return 64, 32, block_d, 4, 1
    width = block_d * (2 if fp32 else 1)
    kind = f"{'bwd' if backward else 'fwd'}{'-rel' if rel_emb else ''}/w{width}"
    tuned = _tuned.TUNED.get(f"sm_{arch[0]}{arch[1]}", {}).get(kind)
    if tuned is not None:
        bm, bn, warps, stages = tuned
        return bm, bn, block_d, warps, stages
    bm, bn, block_d, warps, stages = _default_config(block_d, width, backward, rel_emb)
    if _shared_bytes(arch) < 160 * 1024:
        # 99 KiB parts: one stage fewer (each stage holds a K and a V tile), and smaller
        # tiles for the widest rows (fits checked by tests/aot_compile.py for sm_86)
        stages = max(1, stages - 1)
        if width >= 256 or backward and width >= 128:
            bm, bn = min(bm, 64 if width <= 256 else 32), min(bn, 32)
        if rel_emb and backward and width >= 128:
            bm = min(bm, 32)   # with the aK / aV slices (2 max(bm, bn) rows each): 155 KiB at 64x32
    return bm, bn, block_d, warps, stages


def candidates(D: int, backward: bool, rel_emb: bool = False, fp32: bool = False):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) bench/tune.py times on a GPU for a
    head dim, the default first. Tiles stay within the shapes the tests run (the
    interpreter's 64x32, the defaults): rows of 64 or 128 forward, 32 or 64 backward."""
    block_d = max(16, _next_pow2(D))
    width = block_d * (2 if fp32 else 1)
    bm0, bn0, _, w0, s0 = _default_config(block_d, width, backward, rel_emb)
    out = [(bm0, bn0, w0, s0)]
    if rel_emb:   # the relative tables' slices fill shared memory: stages, and the 64-row tiles
        # wgmma needs, and the earlier mma.sync ones (bench/NOTES.md: Shaw at D=128)
        out += [(bm0, bn0, w0, st) for st in (1, 2) if st != s0]
        return out + [c for c in ((64, 64, 8, 1), (64, 32, 4, 1), (32, 32, 4, 1)) if c not in out]
    for bm in ((32, 64) if backward else (64, 128)):
        for bn in (32, 64):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    c = (bm, bn, warps, stages)
                    if c not in out and (bm + bn) * width * stages <= 3 * 192 * 128:
                        out.append(c)
    return out


def _default_config(block_d, width, backward, rel_emb):
    if rel_emb:  # the aK / aV slices ([BLOCK_M + BLOCK_N, D] each) also live in shared memory
        if width <= 64:
            # backward: one stage (2 CTAs per SM instead of 1, fewer spills; static sm_90
            # model 7379 -> 7303 cycles per 128x128 block at D=64, bench/NOTES.md)
            return 64, 64, block_d, 4, 1 if backward else 2
        if width <= 128:
            # 64x64 tiles on one warpgroup (wgmma), one stage: two pipeline the slices too
            # (240 KiB forward). Static sm_90 model, bf16 D=128, cycles per 128x128 block
            # against the 64x32 forward / 32x32 backward (mma.sync) tiles before: forward
            # near 10240 -> 6144, far 2784 -> 2048; backward dQ near 18432 -> 9328, dK/dV
            # near 16384 -> 8192, d(aK, aV) 28672 -> 8192 (bench/NOTES.md; its spills)
            return 64, 64, block_d, 4, 1
        return (32, 32, block_d, 4, 1) if not backward else (16, 16, block_d, 4, 1)
    if not backward:
        if width <= 64:
            return 128, 64, block_d, 4, 3
        if width <= 128:
            return 128, 64, block_d, 8, 3
        return 64, 32, block_d, 8, 2
    if width <= 64:
        return 64, 64, block_d, 4, 2
    if width <= 128:
        # 4 warps: with 8 on 64-row tiles both warpgroups computed the same 64x64 score
        # tiles (1.5-1.67x the tensor-core work; static sm_90 model: 11264 -> 7168 cycles
        # per 128x128 block for the whole backward at D=128, the tutorial's count)
        return 64, 64, block_d, 4, 2
    return (32, 32, block_d, 4, 1) if width <= 256 else (16, 16, block_d, 4, 1)


def _cdiv(a, b):
    return (a + b - 1) // b


LOG2E = 1.4426950408889634

# float32 backward: always the exact-delta pass (one extra pass over the tiles). In rows
# near one-hot (logits thousands apart) FlashAttention's delta = rowsum(dO * O) and the
# lse round-trip leave dq / dk errors of ~1e-4 where PyTorch's float32 is exact (0);
# float32 is the dtype of gradient checks, so it pays for the pass (bench/NOTES.md).
EXACT_DELTA_FP32 = True
# Otherwise ALiBi / KERPLE / table / dense-bias / Shaw aK, aV gradients are corrected to the
# exact delta inside dQ's pass (no extra pass); False forces the extra pass (tests compare).
CORRECT_IN_PASS = True
# Table columns a GridBias table-gradient program holds (BLOCK_T; 8 registers a thread
# at 4 warps): larger tables run in chunks, one program per chunk and query block.
GRID_TABLE_CHUNK = 1024

# Differentiable inputs of the autograd Function, in order (after q, k, v).
_PARAM_TENSORS = (("alibi", "alibi_slopes", "alibi_slopes"), ("table", "rel_bias", "table"), ("bias", "bias", "bias"),
                  ("rel_key", "rel_emb", "rel_key"), ("rel_value", "rel_emb", "rel_value"),
                  ("rel_u", "rel_emb", "rel_content_bias"), ("rel_w", "rel_emb", "rel_position_bias"),
                  ("kerple_r1", "kerple", "kerple_r1"), ("kerple_r2", "kerple", "kerple_r2"),
                  ("sinks", "sinks", "sinks"))
_PARAMS = tuple(slot for slot, _, _ in _PARAM_TENSORS)                 # the operators' names
_PARAM_NAMES = tuple((kw, name) for _, kw, name in _PARAM_TENSORS)   # (keyword, tensor name): Problem.params()


# ----------------------------------------------------------------------------- adapters
# One per encoding (and one for the positions): the FLAGS bits it sets, the named
# kernel arguments it owns and its segment of Params, the float32 buffer of the
# encodings' small tensors (kernels/scores.py's _head_params reads it, in the order
# _Launch writes it: RoPE, KERPLE, u, w, soft cap, sinks, dropout, ALiBi). Absent: flags off, no segment, and the
# shared dummy pointer, which disabled code never dereferences.

def _positions_args(p: Problem, dummy):
    """Pos [B, Nq + Nk]: the queries' positions then the keys' (int32 or int64); packed
    sequences: cu_seqlens_q then cu_seqlens_k (int32; positions restart per sequence)."""
    if p.varlen is not None:
        return dict(HAS_POS=False, VARLEN=True), dict(Pos=torch.cat((p.varlen[0], p.varlen[1]))), ()
    if p.q_pos is None and p.k_pos is None:
        return dict(HAS_POS=False), dict(Pos=dummy), ()
    qpos, kpos = p.default_positions(dummy.device)  # one side given: the other, O(N)
    dt = torch.promote_types(qpos.dtype, kpos.dtype)
    pos = torch.cat((qpos.to(dt).expand(p.B, p.Nq), kpos.to(dt).expand(p.B, p.Nk)), dim=1)
    return dict(HAS_POS=True), dict(Pos=pos), ()


def _rope_args(p: Problem, dummy):
    """RoPE's frequencies and factor (Params); ROPE_AXES with positions per axis (rope_pos=),
    which only _rope_rotate reads (_Launch.rope_axes)."""
    e = p.rope
    if e is None:
        return dict(ROPE=False, INTERLEAVED=False, ROPE_AXES=False), dict(ROT_DIM=0), ()
    freq = e.inv_freq_for(p.D, dummy.device)
    return (dict(ROPE=True, INTERLEAVED=e.interleaved, ROPE_AXES=e.axis_positions is not None),
            dict(ROT_DIM=p.rotary_dim), (freq, freq.new_full((1,), e.attention_factor)))


# ALiBi's column term on the tensor cores in the forward's side tiles at BLOCK_D <= 64
# (kernels/forward.py, _fwd_tile's COLS == 2): the static sm_90 model's choice (an add
# per score against 12 % more tensor-core work at D = 64). A switch, not API: bench/run.py
# times ALiBi both ways on a GPU ("posattn-alibi-fma" is this off).
ALIBI_COLUMN_MMA = True


def _alibi_args(p: Problem, slopes, dummy):
    if slopes is None:
        return dict(ALIBI=False, ALIBI_MMA=False), {}, ()
    return dict(ALIBI=True, ALIBI_MMA=ALIBI_COLUMN_MMA), {}, (slopes.expand(p.B, p.Hq),)      # [B, Hq]


TABLE_PAD = 256   # kernels/common.py's _TABLE_PAD


def _table_args(e, table, dummy):
    """Table float32 in the log2 domain, a row per head: GridBias's [T, Hq] transposed;
    DistanceBias's [Hq, T] between TABLE_PAD copies of each end column (the kernels
    read a tile's bias as a slice of it: kernels/scores.py). (tab_l, tab_r) = (L, R) or
    (Wh, Ww): the kernels derive T from them. (_Launch may append GridBias's table /
    scale: _acc_terms.)"""
    if table is None:
        return dict(TABLE=0, GRID_WW=0), dict(Table=dummy, tab_l=0, tab_r=0), ()
    t = table.float() * LOG2E
    if isinstance(e, GridBias):
        ww = e.window[1]
        # a power-of-two width: the interior tiles' key codes at compile-time offsets (kernels/scores.py)
        k = ww.bit_length() - 3 if 8 <= ww <= 512 and ww & (ww - 1) == 0 else 0
        return dict(TABLE=2, GRID_WW=k), dict(Table=t.t().contiguous(), tab_l=e.window[0], tab_r=ww), ()
    rows = torch.cat([t[:, :1].expand(-1, TABLE_PAD), t, t[:, -1:].expand(-1, TABLE_PAD)], dim=1)
    return dict(TABLE=1, GRID_WW=0), dict(Table=rows, tab_l=e.left, tab_r=e.right), ()


def _acc_terms(p: Problem, flags, args, table, forward=True):
    """The forward's interior tiles may start q.k's accumulator from their one additive
    term (kernels/forward.py, ACC), with 16-bit inputs; the flags only where it applies,
    so no other problem compiles a variant for them:
    SCALE_POW2 (D <= 64), a dense bias alone (not a mask), bfloat16 inputs and a
    power-of-two scale: scale * q is exact (kept within 2^+-64, far from bfloat16's
    range ends);
    TABLE_ACC (D <= 128), GridBias alone at default positions, read without an index
    per score where it can be (compile-time offsets at a power-of-two width in [8,
    512], GRID_WW; vectors of keys at another even one, GRID_VEC; a line per query
    column at an odd one, GRID_LINE), gathered otherwise: Table gains table / scale in
    q.k's units (as rows, copies or lines) after the heads' log2-domain rows (a scale >=
    2^-8 keeps them finite for any table below 2^120)."""
    others = flags["ALIBI"] or flags["KERPLE"] or flags["SOFTCAP"] or flags["REL_K"] or flags["REL_V"]
    # (a backward's launch: none, nor the copies or lines, which only the forward reads)
    half = forward and p.q.dtype in (torch.bfloat16, torch.float16) and not others
    flags["SCALE_POW2"] = bool(half and p.D <= 64 and p.q.dtype == torch.bfloat16 and flags["BIAS"]
                               and not flags["BIAS_MASK"] and not flags["TABLE"] and 2.0 ** -64 <= p.scale <= 2.0 ** 64
                               and math.frexp(p.scale)[0] == 0.5)
    # (at D = 80 / 128 too since the forward recomputes what its boundary loop needs
    # (AGAIN): 2276 -> 2048 cycles per block in the static model, no spill: bench/NOTES.md)
    flags["TABLE_ACC"] = bool(half and p.D <= 128 and flags["TABLE"] == 2 and not flags["HAS_POS"]
                              and not flags["BIAS"] and p.scale >= 2.0 ** -8)
    window = p.rel_bias.window if flags["TABLE_ACC"] else (1, 1)
    ww = window[1]
    # GRID_VEC: an even width that is not a power of two reads G keys as a vector, G its
    # power-of-two factor up to 8, from copies of the table / scale (_grid_vec_copies)
    flags["GRID_VEC"] = min(3, (ww & -ww).bit_length() - 1) if not flags["GRID_WW"] and GRID_VECTORS else 0
    # GRID_LINE: an odd width reads a line per query column (_grid_line_rows), within a
    # budget of GRID_LINE_FLOATS for all heads (2 Ww Wh Ww per head, against (2 Wh - 1)
    # (2 Ww - 1) for the table); past it, an index per score
    n_line = p.Hq * (GRID_LINE_PAD + 2 * ww * window[0] * ww)
    flags["GRID_LINE"] = bool(flags["TABLE_ACC"] and not flags["GRID_WW"] and ww % 2 and n_line <= GRID_LINE_FLOATS)
    if not flags["TABLE_ACC"]:
        return
    acc = table.float().t() / p.scale   # [Hq, T] in q.k's units
    rows = args["Table"].reshape(-1)
    if flags["GRID_VEC"]:
        copies = _grid_vec_copies(acc, window, min(4, 1 << flags["GRID_VEC"]))
        args["Table"] = torch.cat([rows, rows.new_zeros(-rows.numel() % 4), copies.reshape(-1)])
    elif flags["GRID_LINE"]:
        args["Table"] = torch.cat([rows, _grid_line_rows(acc, window).reshape(-1)])
    else:
        args["Table"] = torch.cat([rows, acc.reshape(-1)])


GRID_LINE_PAD = 128              # kernels/common.py's _GRID_LINE_PAD
GRID_LINE_FLOATS = 1 << 22       # 16 MiB: a 37 x 37 window's lines for 16 heads take 6.5 MiB
# Switches, not API, for a GPU A/B of this session's GridBias paths (bench/NOTES.md, the
# fourteenth session): GRID_VECTORS off (and GRID_LINE_FLOATS = 0) gathers per score at
# every width that is not a power of two; GRID_WIDE_TILES off keeps 128x64 tiles.
GRID_VECTORS = True
GRID_WIDE_TILES = True


def _grid_line_rows(t, window):
    """GridBias's table / scale t [Hq, (2 Wh - 1)(2 Ww - 1)] as kernels/scores.py's
    _grid_line reads it: per head, GRID_LINE_PAD zeros, then for each query column x a
    line of 2N entries (N = Wh Ww), entry (N - 1) - d the bias of a query at column x
    against the key d tokens further on (0 where that key is outside every window):
    [Hq, GRID_LINE_PAD + Ww 2N]."""
    wh, ww = window
    n = wh * ww
    x = torch.arange(ww, device=t.device)[:, None]
    s = x + (n - 1) - torch.arange(2 * n, device=t.device)[None, :]   # the key's column + its rows below * Ww
    dy = -torch.div(s, ww, rounding_mode="floor")                    # query row - key row
    dx = x - (s + dy * ww)                                           # query column - key column
    valid = dy.abs() <= wh - 1
    col = torch.where(valid, (dy + wh - 1) * (2 * ww - 1) + dx + ww - 1, 0)
    lines = torch.where(valid, t[:, col], 0.0)                      # [Hq, Ww, 2N]
    return torch.cat([t.new_zeros(t.shape[0], GRID_LINE_PAD), lines.reshape(t.shape[0], -1)], dim=1)


def _grid_vec_copies(t, window, a):
    """GridBias's table / scale t [Hq, (2 Wh - 1)(2 Ww - 1)] as kernels/scores.py's
    _grid_vec reads it: per head, a copies of its columns with each table row padded to
    2 Ww columns (a zero never read) and the whole row reversed, copy c shifted by c
    elements: [Hq, a, (2 Wh - 1) 2 Ww + a]."""
    wh, ww = window
    h = t.shape[0]
    padded = t.new_zeros(h, 2 * wh - 1, 2 * ww)
    padded[:, :, :-1] = t.reshape(h, 2 * wh - 1, 2 * ww - 1)
    rev = padded.reshape(h, -1).flip(-1)
    out = t.new_zeros(h, a, rev.shape[1] + a)
    for c in range(a):
        out[:, c, c:c + rev.shape[1]] = rev
    return out


BIAS_ROW_TILE = 128   # kernels/common.py's _BIAS_ROW_TILE


def _tiled_width(n):
    """A bias row of n columns padded to whole key tiles: a multiple of BIAS_ROW_TILE."""
    return -(-n // BIAS_ROW_TILE) * BIAS_ROW_TILE


def _bias_rows_tiled(shape, like, dtype=None):
    """An empty tensor of ``shape`` plus, in memory, its rows' padding to _tiled_width
    columns: the full tensor, to be sliced."""
    return torch.empty(*shape[:-1], _tiled_width(shape[-1]), device=like.device, dtype=dtype or like.dtype)


def _word_aligned(t) -> bool:
    """Whether t's first element lies on a 4-byte boundary. A fake tensor (torch.compile
    traces the launchers with them) has no address: its storage offset decides, as
    allocations are aligned."""
    try:
        return t.data_ptr() % 4 == 0
    except RuntimeError:
        return t.storage_offset() * t.element_size() % 4 == 0


def _bias_args(p: Problem, bias, dummy):
    if bias is None:
        return (dict(BIAS=False, BIAS_MASK=False, BIAS_KEYS=False, BIAS_TILES=False, BIAS_PAIRS=False),
                dict(Bias=dummy, sbb=0, sbh=0, sbm=0, bias_nb=1), ())
    # Size-1 axes broadcast (stride 0); the batch axis may also be periodic (batch b
    # reads bias[b % nB], Swin's shifted-window masks); along the keys the kernels
    # read stride 1 (or 0, a size-1 axis).
    keys = bias.shape[3] > 1
    # (axes broadcast with stride 0 stay so: a copy holds one copy of their data)
    src = bias[tuple(slice(0, 1) if n > 1 and st == 0 else slice(None)
                     for n, st in zip(bias.shape[:3], bias.stride()[:3]))]
    unaligned = any(n > 1 and st % 16 for n, st in zip(bias.shape[:3], bias.stride()[:3]))
    padded = src.numel() // max(src.shape[3], 1) * _tiled_width(src.shape[3])
    tiles = keys and (bias.stride(3) != 1 or unaligned) and padded <= p.q.numel()
    if tiles:
        # A copy no larger than q whose rows are padded to whole key tiles:
        # Triton specialises its row stride (with an unaligned one, Swin's 49 x 49
        # masks, the bias was read an element at a time and the forward spilled
        # 316-3960 B), and the boundary tiles read it unmasked (BIAS_TILES;
        # bench/NOTES.md). A larger unaligned bias is read in place: a copy would add
        # twice its bytes to a kernel bound by reading it.
        full = _bias_rows_tiled(src.shape, src)
        # the padding masks the keys past Nk in the kernels' boundary tiles (False, -inf)
        full[..., src.shape[3]:].fill_(False if p.bias_is_mask else float("-inf"))
        bias = full[..., :src.shape[3]].copy_(src).expand(bias.shape)
    elif keys and bias.stride(3) != 1:
        bias = bias.contiguous()
    sbb, sbh, sbm = (st if n > 1 else 0 for n, st in zip(bias.shape[:3], bias.stride()[:3]))
    # bfloat16 at even element offsets (base, strides; the tiles start at even keys)
    pairs = (keys and bias.dtype == torch.bfloat16 and _word_aligned(bias)
             and all(st % 2 == 0 for st in (sbb, sbh, sbm)))
    return (dict(BIAS=True, BIAS_MASK=p.bias_is_mask, BIAS_KEYS=keys, BIAS_TILES=tiles, BIAS_PAIRS=pairs),
            dict(Bias=bias, sbb=sbb, sbh=sbh, sbm=sbm, bias_nb=bias.shape[0]), ())


def _relative_args(p: Problem, rel_key, rel_value, rel_u, rel_w, dummy):
    """Shaw / Transformer-XL: Rel = aK then aV, each [Hr, 2K+1, D] (REL_SHARED when
    Hr = 1: every head reads the one table), u and w [Hq, D] in Params."""
    tables = [t for t in (rel_key, rel_value) if t is not None]
    flags = dict(REL_K=rel_key is not None, REL_V=rel_value is not None, REL_U=rel_u is not None,
                 REL_W=rel_w is not None, REL_SHARED=bool(tables) and tables[0].shape[0] == 1)
    # In the inputs' dtype: the kernels round every slice to it before its products
    # (the same numbers), and a float32 table's [2 max(BLOCK_M, BLOCK_N), D] slices
    # loaded as float32 spilled the bf16 forward at D = 80 / 128: 1048 B (AOT check,
    # Triton 3.6; 16 B in the inputs' dtype)
    if len(tables) == 2:
        rel = torch.stack((rel_key.to(p.q.dtype), rel_value.to(p.q.dtype)))
    else:
        rel = tables[0].to(p.q.dtype).contiguous() if tables else dummy
    segments = tuple(x for x in (rel_u, rel_w) if x is not None)
    return flags, dict(Rel=rel, rel_k=p.rel_emb.clip if p.rel_emb is not None else 0), segments


def _kerple_args(r1, r2, dummy):
    if r1 is None:
        return dict(KERPLE=False), {}, ()
    return dict(KERPLE=True), {}, (r1, r2)


def _softmax_args(p: Problem, sinks, dummy):
    """The soft cap (a float, then a Params segment [1]) and the sinks [Hq]; tanh.approx
    on a GPU for half-precision inputs (its error is below their rounding)."""
    e = p.get("softcap")
    flags = dict(SOFTCAP=e is not None, SINKS=sinks is not None,
                 FAST_TANH=e is not None and not interpreting() and p.q.dtype != torch.float32)
    segments = ((torch.full((1,), e.cap, device=dummy.device),) if e is not None else ()) + \
        ((sinks,) if sinks is not None else ())
    return flags, {}, segments


def _dropout_args(p: Problem, dummy):
    """Dropout: its probability (a Params segment [1]) and the call's Philox seed Rng."""
    if p.dropout_p == 0:
        return dict(DROPOUT=False), dict(Rng=dummy), ()
    return (dict(DROPOUT=True), dict(Rng=p.dropout_rng),
            (torch.full((1,), p.dropout_p, device=dummy.device),))


class _Launch:
    """The kernels' shared arguments, by name, built once per call from a validated
    Problem by the adapters above; every launch passes them by keyword."""

    def __init__(self, p: Problem, q, alibi, table, bias, rel_key, rel_value, rel_u, rel_w, kerple_r1=None,
                 kerple_r2=None, sinks=None, forward=True):
        self.p = p
        dummy = q
        self.upcast = interpreting() and q.dtype == torch.bfloat16
        flags = dict(CAUSAL=p.causal, HAS_WL=p.window_left is not None, HAS_WR=p.window_right is not None,
                     UPCAST=self.upcast, SCALE_POS=p.scale > 0)
        args = dict(Hq=p.Hq, Nq=p.Nq, Nk=p.Nk, D=p.D, GROUP=p.group, sm_scale=p.scale,
                    win_l=p.window_left or 0, win_r=p.window_right or 0)
        # Params' segments in the kernels' order: RoPE, KERPLE, u, w, soft cap, sinks, dropout, ALiBi
        segments = []
        for f, a, seg in (_positions_args(p, dummy), _rope_args(p, dummy), _kerple_args(kerple_r1, kerple_r2, dummy),
                          _relative_args(p, rel_key, rel_value, rel_u, rel_w, dummy), _softmax_args(p, sinks, dummy),
                          _dropout_args(p, dummy), _alibi_args(p, alibi, dummy),
                          _table_args(p.rel_bias, table, dummy), _bias_args(p, bias, dummy)):
            flags.update(f)
            args.update(a)
            segments += seg
        _acc_terms(p, flags, args, table, forward)
        args["Params"] = (torch.cat([x.detach().reshape(-1).to(torch.float32) for x in segments])
                          if segments else dummy)
        args["FLAGS"] = pack_flags(**flags)
        self.args = args
        self.alibi, self.table, self.bias = alibi, table, bias
        self.kerple = (kerple_r1, kerple_r2)
        self.sinks = sinks
        self.grid_table = isinstance(p.rel_bias, GridBias)
        # GridBias alone, default positions, a power-of-two width in [8, 512] (GRID_WW),
        # another even one (GRID_VEC) or an odd one (GRID_LINE): no index per score
        self.grid_alone = flags["TABLE_ACC"] and (flags["GRID_WW"] > 0 or flags["GRID_VEC"] > 0 or flags["GRID_LINE"])
        self.grid_pow2 = flags["TABLE_ACC"] and flags["GRID_WW"] > 0
        self.table_columns = 0 if table is None else table.shape[0 if self.grid_table else 1]
        self.rel_heads = ([t for t in (rel_key, rel_value) if t is not None] or [q])[0].shape[0]
        self.rel_k = args["rel_k"]
        self.rel_uw = (rel_u, rel_w)
        self.has_rel = p.rel_emb is not None
        e = p.rope
        # multi-axis RoPE: each frequency pair's axis [R/2] int32, then the positions per axis
        self.rope_axes = None if e is None or e.axis_positions is None else \
            (e.pair_axis(p.D, dummy.device).to(torch.int32), *e.axis_positions)

    def config(self, backward):
        self.arch = _arch(self.p.q.device)
        bm, bn, bd, warps, stages = _config(self.p.D, backward, self.has_rel, fp32=self.p.q.dtype == torch.float32,
                                            arch=self.arch)
        p = self.p
        width = bd * (2 if p.q.dtype == torch.float32 else 1)   # a tile row's bytes / 2
        masked = p.causal or p.window_left is not None or p.window_right is not None
        positions = p.q_pos is not None or p.k_pos is not None   # a table index per element
        if (not backward and not self.has_rel and width <= 64
                and (self.grid_table and not self.grid_pow2 or self.table is not None and positions
                     or masked and (self.table is not None or self.bias is not None or self.alibi is not None
                                    or self.kerple[0] is not None))):
            # Two warpgroups for 128-row tiles: one runs out of registers with a masked
            # boundary loop next to a table, a dense bias or ALiBi's two interior loops
            # (static sm_90 model at D=64: 4-24 bytes of spills with 4 warps, none with 8).
            # GridBias and a table at explicit positions (an index and a gather per
            # element) need two as well, but GridBias alone at a power-of-two width and
            # default positions (compile-time offsets, no index: 0 spills, 1302 cycles
            # against 1444 with 8 warps at D=64; on Hopper the 128x128 tiles below, on two,
            # unless GRID_WIDE_TILES is off). Masks alone, an unmasked dense bias or a
            # DistanceBias at default positions fit one (0 spills; causal interior tiles
            # 1098 cycles per 128x128 block with 4 warps, 1208 with 8; dense bias 1652
            # against 1740; DistanceBias far tiles 1090 against 1208).
            warps = 8
        if not backward and p.dropout_p > 0 and width <= 64:
            warps = 8   # the Philox words of a 128x64 tile spill one warpgroup (static sm_90 model: 28 B)
        if not backward and p.get("softcap") is not None and width <= 64:
            # the soft cap's tanh makes the tiles MUFU-bound (2112 cycles per 128x128 block
            # at D=64 on one warpgroup or two); one spilled 4 B with sinks and a causal
            # mask (static sm_90 model; none on two)
            warps = 8
        if (not backward and bm == 128 and width <= 64
                and 10 * _cdiv(p.rows_q, 64) * 64 <= 9 * _cdiv(p.rows_q, 128) * 128):
            # Short queries (Swin's windows of 49, 144 or 576 tokens): 64-row blocks compute
            # at least 10 % fewer padding rows (49 rows: 64 instead of 128; 144: 192 instead
            # of 256; not 4160: 1.5 %, against twice the K / V reads), on one warpgroup (a
            # 64-row tile over two would split the keys between them). Rows of at most 64
            # columns: wider ones spill there with the heaviest encodings (AOT check, D=80 /
            # 128 with causal + RoPE + ALiBi + table + bias: 56 B)
            bm, warps = 64, 4
        if not backward and self.grid_alone and bm == 128 and width <= 64 and self.arch[0] == 9 and GRID_WIDE_TILES:
            # GridBias from its table / scale without an index per score (TABLE_ACC with
            # GRID_WW, GRID_VEC or GRID_LINE): 128x128 tiles on two warpgroups, 144 KiB of shared
            # memory (Hopper). Static sm_90 model at D=64, cycles per 128x128 block against
            # 128x64 on one: a 32 x 64 window 1302 -> 1198; 51 x 40 (vectors of 8) 1358
            # with 128 B of spills -> 1204 (bench/NOTES.md)
            bn, warps = 128, 8
        if not backward and (self.table is not None or self.bias is not None):
            # Triton pipelines the per-element table / bias gathers too ([BLOCK_M, BLOCK_N]
            # per stage): with 3 stages the bf16 D=64 forward needs 172 KiB of shared
            # memory, past an A100's 163 KiB, and float32 D=256 with 2 stages 208-246 KiB,
            # past an H100's 227 KiB (found by the AOT check with launch specialisation).
            stages = min(stages, 2 if width <= 256 else 1)
            if width >= 128 and _shared_bytes(self.arch) < 160 * 1024:
                stages = 1   # 99 KiB parts: bf16 D=128 with 2 stages needs 112 KiB
        return bm, bn, bd, dict(num_warps=warps, num_stages=stages)

    def launch(self, wrap, kernel, grid, **named):
        """Launch ``kernel`` by keyword: its own arguments (``named``, each must be one of
        its parameters) over the shared ones; a parameter supplied by neither is an error."""
        names = kernel.arg_names
        options = {n: named.pop(n) for n in ("num_warps", "num_stages") if n in named}
        stray = set(named) - set(names)
        missing = [n for n in names if n not in named and n not in self.args]
        if stray or missing:
            raise AssertionError(f"posattn: launching {kernel.__name__}: unknown arguments {sorted(stray)}, "
                                 f"missing {missing}")
        wrap(kernel)[grid](**{n: named[n] if n in named else self.args[n] for n in names}, **options)


def _pack(bits, values):
    word = 0
    for name, value in values.items():
        word |= int(value) << getattr(bits, "_" + name).value
    return word


def pack_flags(**values) -> int:
    """The FLAGS constexpr of the kernels (bit offsets: kernels/attention.py)."""
    from .kernels import attention as A
    return _pack(A, values)


def pack_grads(**values) -> int:
    """The GRADS constexpr of the backward kernels."""
    from .kernels import attention as A
    return _pack(A, values)


def _direct(kernel):
    """The default launcher: the kernel itself (posattn/_op.py passes torch.library.wrap_triton)."""
    return kernel


def _strides(prefix, t, varlen=False):
    """A tensor's batch, head and row strides by the kernels' names: prefix + b, h, m or n
    (packed sequences: batch stride 0, grid axis 2 being a sequence of the one batch)."""
    st = t.stride()[:3]
    if varlen:
        st = (0,) + tuple(st[1:])
    return dict(zip((prefix + c for c in ("b", "h", "m" if prefix in ("sq", "so", "sdo", "sdq") else "n")), st))


def _aligned(B, H, N, D, like):
    """An empty [B, H, N, D] tensor whose rows start 16 elements apart (the head dim is
    padded in memory only): Triton specialises strides divisible by 16 (aligned vector
    loads); at D = 72 the static sm_90 model measured the plain forward 1.39x slower
    without it (bench/NOTES.md)."""
    width = -(-D // 16) * 16
    return torch.empty(B, H, N, width, device=like.device, dtype=like.dtype)[..., :D]


def _unit_last(x):
    """x as the kernels read it: a contiguous head dim and batch / head / row strides
    divisible by 16 (a copy otherwise, O(N * D), as FlashAttention copies a strided
    head dim)."""
    if x.stride(-1) == 1 and all(st % 16 == 0 for n, st in zip(x.shape[:3], x.stride()[:3]) if n > 1):
        return x
    out = _aligned(*x.shape, like=x)
    out.copy_(x)
    return out


def _rotated(L: _Launch, x, keys: bool, wrap, out=None, sign=1.0):
    """q or k rotated by RoPE into a workspace (kernels/rope.py, rows 16-aligned); x without
    RoPE. ``sign=-1``: a gradient rotated back, into ``out`` (multi-axis RoPE's dQ / dK)."""
    from .kernels.attention import _rope_rotate
    p = L.p
    if p.rope is None:
        return x
    B, H, N, D = x.shape
    if out is None:
        out = _aligned(B, H, N, D, like=x)
    bd = max(16, _next_pow2(D))
    rows = 64 if interpreting() else max(16, 2048 // bd)  # memory-bound: small tiles, many CTAs per SM
    extra = dict(RopePos=x, Axis=x, srb=0, sra=0)
    if p.varlen is not None:   # positions restart in each packed sequence: explicit per-row positions
        extra.update(Pos=_packed_positions(p),
                     FLAGS=L.args["FLAGS"] & ~pack_flags(VARLEN=True) | pack_flags(HAS_POS=True))
    if L.rope_axes is not None:   # [1 or B, A, N] int64, a row per axis
        axis, pos = L.rope_axes[0], L.rope_axes[2 if keys else 1]
        pos = pos.contiguous()
        extra.update(RopePos=pos, Axis=axis, srb=pos.stride(0) if pos.shape[0] > 1 else 0, sra=pos.stride(1))
    L.launch(wrap, _rope_rotate, (_cdiv(N, rows), H, B), X=x, Out=out, sxb=x.stride(0), sxh=x.stride(1),
             sxn=x.stride(2), sob=out.stride(0), soh=out.stride(1), son=out.stride(2), H=H, N=N,
             OFF=p.Nq if keys else 0, SHIFT=0 if keys else p.Nk - p.Nq, SIGN=sign, BLOCK_N=rows, BLOCK_D=bd,
             num_warps=4, **extra)
    return out


# Transformer-XL's q + u and q + w added by the host for the forward and dK / dV
# (_xl_rows), not in the kernels: a switch, not API (tests compare the two; a GPU A/B:
# the static sm_90 model prices the masked forward loop lower without it, whose 50 local
# loads an iteration it cannot price, and dK / dV higher: bench/NOTES.md).
XL_HOST_ROWS = True


def _xl_rows(L: _Launch, q):
    """Transformer-XL's q + u and, with Shaw's key table (the only reader of q + w), q + w
    (q where u or w is absent), each rounded to q's dtype as the kernels round them on a
    GPU (float32 sum, one rounding to nearest; Triton's interpreter truncates to
    bfloat16, which tests/conftest.py patches), in one [2 or 1, B, H, N, D] workspace
    with 16-aligned rows: the forward reads them as loaded operands (XL_ROWS), which
    stay in shared memory (the forward, dK / dV); computed in the kernel, both were held
    in registers and the masked forward and dK / dV spilled (bench/NOTES.md). Returns the workspace and the second
    half's offset from the first, in elements (0 without it)."""
    B, H, N, D = q.shape
    n = 2 if L.args["FLAGS"] & pack_flags(REL_K=True) else 1
    ws = _aligned(n * B, H, N, D, like=q).view(n, B, H, N, D)
    with torch.no_grad():
        for i, vec in enumerate(L.rel_uw[:n]):
            if vec is None:
                ws[i].copy_(q)
            else:
                torch.add(q, vec.to(torch.float32).reshape(1, H, 1, D), out=ws[i])
    return ws, (ws[1].storage_offset() - ws[0].storage_offset() if n == 2 else 0)


def _xl_launch(L: _Launch, q, varlen: bool):
    """The launch arguments of a kernel that reads q + u / q + w from _xl_rows (the
    forward, dK / dV): Q, its strides and sqw, and the XL_ROWS bit to add to FLAGS;
    sqw = 0 alone (and no bit) without u and w or with XL_HOST_ROWS off."""
    if not (XL_HOST_ROWS and any(x is not None for x in L.rel_uw)):
        return dict(sqw=0), 0
    ws, sqw = _xl_rows(L, q)
    return dict(Q=ws, sqw=sqw, **_strides("sq", ws[0], varlen)), pack_flags(XL_ROWS=True)


def _packed_positions(p: Problem):
    """[1, total_q + total_k] int32: each packed row's position within its sequence,
    bottom-right aligned per sequence (queries at Nk_s - Nq_s + i), as the kernels'
    default positions are (no host sync: the totals are the tensors' lengths)."""
    cu_q, cu_k = (c.to(torch.int64) for c in p.varlen[:2])
    dev = cu_q.device

    def rows(cu, total):
        r = torch.arange(total, device=dev)
        return r, torch.searchsorted(cu, r, right=True) - 1   # each row's sequence
    rq, sq = rows(cu_q, p.Nq)
    rk, sk = rows(cu_k, p.Nk)
    shift = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])
    return torch.cat((rq - cu_q[sq] + shift[sq], rk - cu_k[sk])).to(torch.int32)[None]


# Decoding: at most this many queries per row (and keys at least DECODE_KEYS_PER_QUERY times
# as many) run _attn_decode (keys split over programs, merged by lse) instead of _attn_fwd.
DECODE_MAX_QUERIES = 16
DECODE_KEYS_PER_QUERY = 8
DECODE_MERGE_CHUNKS = 32   # chunks the merge reads at a time (a running max over more)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132   # the interpreter: plan as for an H100


def _decode_plan(L: _Launch, p: Problem):
    """(splits, chunk, BLOCK_M, BLOCK_N, heads) for _attn_decode, or None (packed
    sequences; more queries). Its rows are a k/v head's GROUP * Nq queries (at most
    128), or with Shaw / Transformer-XL terms one query head's Nq (heads: the grid's
    axis 1, Hkv or Hq). Enough chunks of whole tiles that B * heads * splits programs fill
    the GPU about twice over (B=1, Hkv=8, Nk=32k on an H100: 32 chunks of 1024 keys, 256
    programs)."""
    packed = not L.has_rel
    rows = p.group * p.Nq if packed else p.Nq
    if (p.Nq > DECODE_MAX_QUERIES or p.Nk < DECODE_KEYS_PER_QUERY * p.Nq or rows > 128
            or p.varlen is not None):
        return None
    heads = p.Hkv if packed else p.Hq
    # (Shaw: aK / aV slices of 2 * BLOCK_N rows per stage; float32 D=256: 64 KiB per K or V tile)
    wide = max(16, _next_pow2(p.D)) * (2 if p.q.dtype == torch.float32 else 1) >= 512
    bn = 32 if interpreting() or not packed or wide else 64
    tiles = _cdiv(p.Nk, bn)
    splits = max(1, min(tiles, _cdiv(2 * _multiprocessors(p.q.device), p.B * heads)))
    chunk = _cdiv(tiles, splits) * bn
    return _cdiv(p.Nk, chunk), chunk, max(16, _next_pow2(rows)), bn, heads


def _decode(L: _Launch, q, k, v, plan, wrap):
    """_attn_decode's chunks, then _attn_decode_merge: out, lse, lse2 as _attn_fwd's."""
    from .kernels.attention import _attn_decode, _attn_decode_merge
    p = L.p
    splits, chunk, bm, bn, heads = plan
    bd = max(16, _next_pow2(p.D))
    width = bd * (2 if q.dtype == torch.float32 else 1)
    # one stage (one K and one V tile in shared memory) for the relative tables' slices, and
    # for rows of 256 bytes or more on the 99 KiB parts
    stages = 1 if interpreting() or L.has_rel or width >= 256 and _shared_bytes(_arch(q.device)) < 160 * 1024 else 2
    f32 = dict(device=q.device, dtype=torch.float32)
    part = torch.empty(p.B, p.Hq, splits * p.Nq, p.D, **f32)
    part_lse = torch.empty(p.B, p.Hq, splits * p.Nq, **f32)
    L.launch(wrap, _attn_decode, (splits, heads, p.B), Q=q, K=k, V=v, Part=part, PartLse=part_lse,
             **_strides("sq", q), **_strides("sk", k), **_strides("sv", v), chunk=chunk, BLOCK_M=bm, BLOCK_N=bn,
             BLOCK_D=bd, num_warps=4, num_stages=stages)
    out = torch.empty(p.B, p.Hq, p.Nq, p.D, device=q.device, dtype=q.dtype)
    lse = torch.empty(p.B, p.Hq, p.Nq, **f32)
    lse2 = torch.empty_like(lse)
    L.launch(wrap, _attn_decode_merge, (p.Nq, p.Hq, p.B), Part=part, PartLse=part_lse, Out=out, Lse=lse, Lse2=lse2,
             **_strides("so", out), S=splits, BLOCK_S=min(DECODE_MERGE_CHUNKS, _next_pow2(splits)), BLOCK_D=bd,
             num_warps=4)
    return out, lse, lse2


def _forward(L: _Launch, q, k, v, wrap=_direct):
    from .kernels.attention import _attn_fwd
    p = L.p
    q, k, v = (_unit_last(x) for x in (q, k, v))
    q, k = _rotated(L, q, False, wrap), _rotated(L, k, True, wrap)
    plan = _decode_plan(L, p)
    if plan is not None:
        return _decode(L, q, k, v, plan, wrap)
    out = torch.empty(p.B, p.Hq, p.Nq, p.D, device=q.device, dtype=q.dtype)
    lse = torch.empty(p.B, p.Hq, p.Nq, device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(lse)
    bm, bn, bd, launch = L.config(backward=False)
    vl = p.varlen is not None
    xl, xl_flag = _xl_launch(L, q, vl)
    L.launch(wrap, _attn_fwd, (_cdiv(p.rows_q, bm), p.Hq, p.batches),
             **{**dict(Q=q, **_strides("sq", q, vl)), **xl}, K=k, V=v, Out=out, Lse=lse, Lse2=lse2,
             **_strides("sk", k, vl), **_strides("sv", v, vl), **_strides("so", out, vl),
             BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ACC_STAGES=launch["num_stages"],
             FLAGS=L.args["FLAGS"] | xl_flag, **launch)
    return out, lse, lse2


# The parameter gradients' partial sums in a DParams slot, in kernels/params.py's
# _grad_slot order; each present only when wanted.
_GRAD_SLOT = (("alibi", lambda D, T: 1), ("kerple", lambda D, T: 2), ("rel_u", lambda D, T: D),
              ("rel_w", lambda D, T: D), ("rel_key", lambda D, T: 2 * D), ("rel_value", lambda D, T: 2 * D),
              ("table", lambda D, T: T))


def _grad_layout(want, D, T):
    """{name: (offset, size)} of the wanted gradients in a DParams slot, and the slot size."""
    layout, offset = {}, 0
    for name, size in _GRAD_SLOT:
        if want[name]:
            layout[name] = (offset, size(D, T))
            offset += size(D, T)
    return layout, offset


def _dbias_rows(L: _Launch, p: Problem):
    """(g, shared): the dense bias's float32 gradient in the kernels' bias strides, when
    dK/dV can write dS into it (DBIAS_ROWS): the bias has every row and key, and one
    row per (batch, head), or shared by batches (bias[b % nB]) or heads, whose dS
    dK/dV then adds atomically (shared: DBIAS_ADD) unless torch's deterministic mode is
    on. (None, False) otherwise: the dBias kernel sums over the broadcast axes in a
    fixed order."""
    bias = L.args["Bias"]
    nb, bh, rows, keys = bias.shape
    if (rows, keys) != (p.Nq, p.Nk) or p.B % nb or bh not in (1, p.Hq):
        return None, False
    shared = (nb, bh) != (p.B, p.Hq)
    if shared and torch.are_deterministic_algorithms_enabled():
        return None, False
    kernel = (L.args["sbb"], L.args["sbh"], L.args["sbm"], 1)

    def mismatch(g):
        return any(n > 1 and a != b for n, a, b in zip(g.shape, g.stride(), kernel))

    g = torch.empty_like(bias, dtype=torch.float32)   # keeps the strides of a dense layout
    if mismatch(g):   # or _bias_args's rows padded to whole key tiles (the padding never read)
        g = _bias_rows_tiled(bias.shape, bias, torch.float32)[..., :bias.shape[3]]
        if mismatch(g):
            return None, False   # an overlapping or gapped layout: not written through the bias strides
    if shared or p.causal or p.window_left is not None or p.window_right is not None:
        g.zero_()     # the adds' start; tiles the masks hide are never visited
    return g, shared


def _backward(L: _Launch, q, k, v, out, lse, do, dlse, need, wrap=_direct):
    # lse: the log2-domain row statistics saved by the forward
    """need: {name in _PARAMS: whether its gradient is wanted}. Returns dq, dk, dv and
    the parameter gradients in _PARAMS order (None where not wanted)."""
    from .kernels.attention import (_attn_bwd_dbias, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq,
                                    _attn_bwd_rel)
    p = L.p
    dev = q.device
    q, k, v, do = (_unit_last(x) for x in (q, k, v, do))
    q, k = _rotated(L, q, False, wrap), _rotated(L, k, True, wrap)   # dq, dk are rotated back in the kernels
    axes = L.rope_axes is not None   # (except with positions per axis: float32 dq, dk, rotated back after)
    bm, bn, bd, launch = L.config(backward=True)
    blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    f32 = dict(device=dev, dtype=torch.float32)

    # Row statistics [B, Hq, 2, Nq]: lse (log2 domain, a copy: the exact-delta pass
    # renormalises it and a second backward must see the original), then delta.
    stats = torch.empty(p.B, p.Hq, 2, p.Nq, **f32)
    stats[:, :, 0].copy_(lse)
    has_dlse = dlse is not None
    exact_delta = any(need.values()) or EXACT_DELTA_FP32 and q.dtype == torch.float32
    # Parameter gradients need the exact delta (see _attn_bwd_dq). For ALiBi, KERPLE,
    # tables, the dense bias and Shaw's aK / aV, dQ's own pass corrects them and writes
    # it for the kernels after it (CORRECT), so the extra pass runs only for float32, a
    # differentiated lse, Transformer-XL's u / w (their correction is a P @ K product
    # per row) and aK through a soft cap.
    correct = (CORRECT_IN_PASS and exact_delta and not has_dlse and not (EXACT_DELTA_FP32 and q.dtype == torch.float32)
               and not need["rel_u"] and not need["rel_w"] and not (need["rel_key"] and p.get("softcap") is not None))
    exact_delta = exact_delta and not correct
    if not exact_delta:
        L.launch(wrap, _attn_bwd_delta, (_cdiv(p.Nq, 64), p.Hq, p.B), Out=out, DO=do, Stats=stats,
                 DLse=dlse.contiguous() if has_dlse else stats, **_strides("so", out), **_strides("sdo", do),
                 HAS_DLSE=has_dlse, BLOCK_M=64, BLOCK_D=bd)

    num_m = _cdiv(p.rows_q, bm)
    vl = p.varlen is not None
    nb = p.batches
    inputs = dict(Q=q, K=k, V=v, DO=do, Stats=stats, **_strides("sq", q, vl), **_strides("sk", k, vl),
                  **_strides("sv", v, vl), **_strides("sdo", do, vl), **blocks, **launch)
    if exact_delta:
        # Parameter gradients weight dS by large factors (|rel|, table columns), so
        # delta is summed from the same P and dP tiles the gradient uses, and lse is
        # renormalised with them.
        L.launch(wrap, _attn_bwd_dq, (num_m, p.Hq, nb), **inputs, DQ=q, DParams=stats, **_strides("sdq", q, vl),
                 GRADS=pack_grads(DELTA_PASS=True), BLOCK_T=16)
        if has_dlse:
            stats[:, :, 1] -= dlse.to(torch.float32)

    dq = torch.empty_like(q, dtype=torch.float32 if axes else q.dtype)

    # dQ and each program's partial sums of the small parameters' gradients.
    want = dict(need, kerple=need["kerple_r1"] or need["kerple_r2"])
    tab_t = max(L.table_columns, 1)
    layout, slot = _grad_layout(want, p.D, tab_t)
    work = torch.empty(nb, p.Hq, num_m, slot, **f32) if slot else stats

    def part(name, *shape):  # [B, Hq, num_m, *shape]
        offset, size = layout[name]
        return work[..., offset:offset + size].reshape(nb, p.Hq, num_m, *shape)

    grads_bits = dict(D_SLOPE=want["alibi"], D_TABLE=want["table"], D_U=want["rel_u"], D_W=want["rel_w"],
                      D_AK=want["rel_key"], D_AV=want["rel_value"], D_KERPLE=want["kerple"])
    block_t = _next_pow2(tab_t) if want["table"] else 16
    # every row's keys in one tile: dQ sums d(table) itself (kernels/params.py ONE_TILE),
    # for a GridBias table of at most one chunk (dQ holds all its columns)
    chunked = L.grid_table and not L.args["FLAGS"] & pack_flags(HAS_POS=True)
    one_tile = correct and want["table"] and not vl and p.Nk <= bn and not (chunked and block_t > GRID_TABLE_CHUNK)
    L.launch(wrap, _attn_bwd_dq, (num_m, p.Hq, nb), **inputs, DQ=dq, DParams=work, **_strides("sdq", dq, vl),
             GRADS=pack_grads(CORRECT=correct, ONE_TILE=one_tile, **grads_bits), BLOCK_T=block_t)
    if correct and want["table"] and not one_tile:
        # d(table) over the tiles near the diagonal, from the exact delta just written;
        # GridBias at default positions over chunks of the table (kernels/params.py CHUNKED)
        chunk_t = min(block_t, GRID_TABLE_CHUNK) if chunked else block_t
        L.launch(wrap, _attn_bwd_dq, (num_m * _cdiv(tab_t, chunk_t) if chunked else num_m, p.Hq, nb), **inputs,
                 DQ=dq, DParams=work, **_strides("sdq", dq, vl), GRADS=pack_grads(TABLE_PASS=True, **grads_bits),
                 BLOCK_T=chunk_t)

    # dK / dV after dQ: with CORRECT they read the exact delta dQ wrote. A dense bias
    # with a row per (batch, head) gets its gradient (dS itself) from the same tiles;
    # one shared whole by batches or heads, their sum (atomic adds, _dbias_rows).
    dk = torch.empty_like(k, dtype=torch.float32 if axes else k.dtype)
    dv = torch.empty_strided(dk.shape, dk.stride(), device=dev, dtype=v.dtype)   # dK's strides serve both
    dbias, shared = _dbias_rows(L, p) if need["bias"] else (None, False)
    # q + u and q + w as loaded operands here too: dK / dV loads a query tile per
    # iteration, and the sums computed in registers spilled 3604 B at D=128 (AOT check,
    # Triton 3.6; dQ and d(aK, aV) measured no better with them: in-kernel). Rebuilt,
    # not kept from the forward: O(N * D), against holding 2 B H N D until the backward.
    xl, xl_flag = _xl_launch(L, q, vl)
    L.launch(wrap, _attn_bwd_dkdv, (_cdiv(p.rows_k, bn), p.Hkv, nb), **{**inputs, **xl}, DK=dk, DV=dv,
             DBias=stats if dbias is None else dbias, **_strides("sdk", dk, vl),
             FLAGS=L.args["FLAGS"] | pack_flags(DBIAS_ROWS=dbias is not None, DBIAS_ADD=shared) | xl_flag)

    if axes:
        dq = _rotated(L, dq, False, wrap, out=torch.empty_like(q), sign=-1.0)
        dk = _rotated(L, dk, True, wrap, out=torch.empty_like(k), sign=-1.0)

    grads = dict.fromkeys(_PARAMS)
    if need["sinks"]:
        # d sink_h = sum_i P_sink,i (0 - delta_i): the sink has no value and no dS of its
        # own; Stats hold the exact delta and the renormalised lse (log2) by now.
        p_sink = torch.exp2(L.sinks.detach().to(torch.float32)[None, :, None] * LOG2E - stats[:, :, 0])
        grads["sinks"] = (-(p_sink * stats[:, :, 1]).sum(dim=(0, 2))).to(L.sinks.dtype)
    for i, name in enumerate(("kerple_r1", "kerple_r2")):
        if need[name]:  # each its own sum: the operators' outputs must not alias
            grads[name] = part("kerple", 2)[..., i].sum(dim=(0, 2)).to(L.kerple[i].dtype)   # [Hq]
    if need["alibi"]:
        g = part("alibi").sum(-1)                                       # [B, Hq]
        if L.alibi.shape[0] == 1:
            g = g.sum(0, keepdim=True)
        grads["alibi"] = g.to(L.alibi.dtype)
    if need["table"]:
        g = part("table", tab_t).sum(dim=(0, 2))                        # [Hq, T]
        grads["table"] = (g.t() if L.grid_table else g).to(L.table.dtype)
    if dbias is not None:
        g = dbias.to(L.bias.dtype)
        # (rows padded to whole key tiles: the gradient is returned dense)
        grads["bias"] = g.contiguous() if g.untyped_storage().nbytes() > g.numel() * g.element_size() else g
    elif need["bias"]:
        bias = L.bias
        bb, bh, bmq, bnk = bias.shape  # size-1 axes are summed over (broadcast)
        g = torch.empty(bb, bh, bmq, bnk, **f32)
        num_n = 1 if bnk == 1 else _cdiv(p.Nk, bn)
        L.launch(wrap, _attn_bwd_dbias, ((1 if bmq == 1 else _cdiv(p.Nq, bm)) * num_n, bh, bb), **inputs,
                 DBias=g, B=p.B, BH=bh, BM_=bmq, BN_=bnk, NUM_N=num_n,
                 GRADS=pack_grads(HEAD_BCAST=bh == 1 and p.Hq > 1, ROW_BCAST=bmq == 1 and p.Nq > 1,
                                  COL_BCAST=bnk == 1 and p.Nk > 1))
        grads["bias"] = g.to(bias.dtype)
    re = p.rel_emb
    for name in ("rel_u", "rel_w"):
        if need[name]:
            grads[name] = part(name, p.D).sum(dim=(0, 2)).to(
                getattr(re, "content_bias" if name == "rel_u" else "position_bias").dtype)
    if need["rel_key"] or need["rel_value"]:
        K = L.rel_k
        ha = L.rel_heads
        # interior rows -K < rel < K that some (query, key) pair reaches: rel in [1 - Nk, Nq - 1]
        rel_first, rel_last = max(1 - K, 1 - p.rows_k), min(K - 1, p.rows_q - 1)
        tables = {n: torch.zeros(nb, ha, 2 * K + 1, p.D, **f32) if need[n] else stats
                  for n in ("rel_key", "rel_value")}
        if rel_last >= rel_first:
            L.launch(wrap, _attn_bwd_rel, (_cdiv(rel_last - rel_first + 1, bn), ha, nb), **inputs,
                     DAK=tables["rel_key"], DAV=tables["rel_value"], rel_first=rel_first,
                     head_step=p.Hq if ha > 1 else 1, GRADS=pack_grads(D_AK=need["rel_key"], D_AV=need["rel_value"]))
        for name, attr in (("rel_key", "key"), ("rel_value", "value")):
            if not need[name]:
                continue
            g = tables[name].sum(0)                                 # [Ha, 2K+1, D]
            e = part(name, 2, p.D).sum(dim=(0, 2))                  # [Hq, 2, D]: rows 0 and 2K
            if ha == 1:
                e = e.sum(0, keepdim=True)
            g[:, 0] += e[:, 0]
            g[:, 2 * K] += e[:, 1]
            grads[name] = g.to(getattr(re, attr).dtype)
    return (dq, dk, dv, *(grads[n] for n in _PARAMS))


def _launch_params(p: Problem):
    """The problem's tensors in _PARAMS order (None where absent)."""
    table = p.rel_bias.table if p.rel_bias is not None else None
    bias = p.bias
    if bias is not None and p.bias_is_mask and bias.requires_grad:
        bias = bias.detach()
    re = p.rel_emb
    rel = (re.key, re.value, re.content_bias, re.position_bias) if re is not None else (None,) * 4
    ke = p.get("kerple")
    sk = p.get("sinks")
    return (p.alibi, table, bias, *rel, *((ke.r1, ke.r2) if ke is not None else (None, None)),
            sk.sinks if sk is not None else None)
