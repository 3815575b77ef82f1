"""The Triton backend as torch.library operators, for torch.compile.

``posattn::attn_fwd`` and ``posattn::attn_bwd`` are ``torch.library.triton_op``s
over flat arguments (tensors, then scalars and flags); their bodies are the
Triton backend's launchers (``_triton._forward`` / ``_triton._backward``) with
every kernel launched through ``torch.library.wrap_triton``. So:

- under torch.compile the operators decompose into the kernels themselves and
  Inductor calls them from its generated code (no graph break, no Python on the
  hot path);
- the fake (meta) kernel is the same body run on fake tensors: the launches do
  nothing there, the outputs' shapes, dtypes and strides come from the very
  code that allocates the real ones;
- the gradient is ``register_autograd`` with ``setup_context``: the backward
  calls ``posattn::attn_bwd``.

posattn.attention routes a problem here only when torch.compile traces it and
the backend is ``triton`` (interface.py); eager calls keep the
autograd.Function of _triton.py.

On CPU the operators run the same kernels under ``TRITON_INTERPRET=1``
(Triton's interpreter). Interpreted kernels cannot be traced into a graph, so
then the operators stay opaque under torch.compile: the compiled graph calls
them like any extern operator and the fake kernel skips the launches.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _triton, _validate
from .encodings import DistanceBias, GridBias, RelativeEmbeddings, RoPE
from .kernels.attention import (_attn_bwd_dbias, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_rel,
                                _attn_fwd)

__all__ = ["attention", "op_args", "fwd", "bwd"]

LOG2E = _triton.LOG2E
NUM_TENSORS = 13  # q, k, v, q_pos, k_pos, inv_freq, alibi, table, bias, rel_key, rel_value, rel_u, rel_w
_PARAM_SLOTS = (6, 7, 8, 9, 10, 11, 12)  # positions of _triton._PARAMS among the tensors


def _kernels():
    """Every kernel the operators launch. torch.library.triton_op finds them through
    this function's return value; torch.compile's caches key on their source."""
    return (_attn_fwd, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_rel, _attn_bwd_dbias)


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - depends on the triton version
        return False
    return isinstance(kernel, InterpretedFunction)


INTERPRETED = _interpreted(_attn_fwd)  # fixed when the kernels were defined (TRITON_INTERPRET then)


def _is_fake(t: Tensor) -> bool:
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        return isinstance(t, torch._subclasses.FakeTensor)
    return is_fake(t)


class _NoLaunch:
    """An interpreted kernel on fake tensors: nothing to run, only shapes matter."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


def _launcher(q: Tensor):
    """How the launchers call a kernel: through wrap_triton (which calls the kernel
    directly in eager mode and records it in a graph when traced), or, for
    interpreted kernels, directly with real tensors and not at all with fake ones."""
    fake = _is_fake(q)
    known = _kernels()

    def wrap(kernel):
        if kernel not in known:
            raise AssertionError(f"posattn: kernel {kernel} is not listed in posattn._op._kernels()")
        if _interpreted(kernel):
            return _NoLaunch() if fake else kernel
        return torch.library.wrap_triton(kernel)

    return wrap


def _problem(q, k, v, q_pos, k_pos, inv_freq, alibi, table, bias, rel_key, rel_value, rel_u, rel_w,
             causal, scale, window_left, window_right, rope_interleaved, rope_factor, table_kind, table_a,
             table_b, rel_clip) -> _validate.Problem:
    """The flat operator arguments back as a validated Problem (the same check as
    posattn.attention's, so a direct caller of the operators gets its errors)."""
    rope = None
    if inv_freq is not None:
        if inv_freq.dim() != 1 or not inv_freq.is_floating_point():
            raise ValueError(f"posattn op: inv_freq must be a 1-D float tensor, got {inv_freq.dtype} "
                             f"{tuple(inv_freq.shape)}")
        # The rotary dim is a constexpr of the kernels: a symbolic length is specialised here.
        rope = RoPE(dim=2 * int(inv_freq.shape[0]), interleaved=rope_interleaved, attention_factor=rope_factor)
        rope.inv_freq = inv_freq
    table_a, table_b, rel_clip = int(table_a), int(table_b), int(rel_clip)
    window = tuple(None if w is None else int(w) for w in (window_left, window_right))
    if table is None:
        rel_bias = None
    elif table_kind == 1:
        rel_bias = DistanceBias(table, table_a, table_b)
    elif table_kind == 2:
        rel_bias = GridBias(table, (table_a, table_b))
    else:
        raise ValueError(f"posattn op: table_kind must be 1 (DistanceBias) or 2 (GridBias) with a table, "
                         f"got {table_kind}")
    rel_emb = None
    if rel_key is not None or rel_value is not None or rel_u is not None:
        rel_emb = RelativeEmbeddings(key=rel_key, value=rel_value, clip=rel_clip, content_bias=rel_u,
                                     position_bias=rel_w)
    elif rel_w is not None:
        raise ValueError("posattn op: rel_w (position_bias) needs rel_key")
    p = _validate.check(q, k, v, causal=causal, scale=scale, window=window, q_pos=q_pos,
                        k_pos=k_pos, rope=rope, alibi_slopes=alibi, rel_bias=rel_bias, bias=bias, rel_emb=rel_emb)
    why = _triton.refusal(p)
    if why is not None and not _is_fake(q):
        raise ValueError(f"posattn op: the Triton backend refused: {why}")
    return p


def _launch_inputs(p: _validate.Problem):
    """The tensors _triton._Launch takes after q (the parameters, in _triton._PARAMS order)."""
    table = p.rel_bias.table if p.rel_bias is not None else None
    re = p.rel_emb
    rel = (re.key, re.value, re.content_bias, re.position_bias) if re is not None else (None,) * 4
    return (p.alibi, table, p.bias, *rel)


@torch.library.triton_op("posattn::attn_fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, q_pos: Optional[Tensor], k_pos: Optional[Tensor],
        inv_freq: Optional[Tensor], alibi: Optional[Tensor], table: Optional[Tensor], bias: Optional[Tensor],
        rel_key: Optional[Tensor], rel_value: Optional[Tensor], rel_u: Optional[Tensor], rel_w: Optional[Tensor],
        causal: bool, scale: float, window_left: Optional[int], window_right: Optional[int],
        rope_interleaved: bool, rope_factor: float, table_kind: int, table_a: int, table_b: int,
        rel_clip: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward: ``(out, lse, lse2)``; lse is natural-log ``[B, Hq, Nq]`` float32, lse2
    the log2-domain row statistics the backward reads (``lse2 = lse * log2(e)``)."""
    p = _problem(q, k, v, q_pos, k_pos, inv_freq, alibi, table, bias, rel_key, rel_value, rel_u, rel_w,
                 causal, scale, window_left, window_right, rope_interleaved, rope_factor, table_kind, table_a,
                 table_b, rel_clip)
    L = _triton._Launch(p, q, *_launch_inputs(p))
    return _triton._forward(L, q, k, v, wrap=_launcher(q))


@torch.library.triton_op("posattn::attn_bwd", mutates_args=())
def bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, dout: Tensor, dlse: Optional[Tensor],
        q_pos: Optional[Tensor], k_pos: Optional[Tensor], inv_freq: Optional[Tensor], alibi: Optional[Tensor],
        table: Optional[Tensor], bias: Optional[Tensor], rel_key: Optional[Tensor], rel_value: Optional[Tensor],
        rel_u: Optional[Tensor], rel_w: Optional[Tensor],
        causal: bool, scale: float, window_left: Optional[int], window_right: Optional[int],
        rope_interleaved: bool, rope_factor: float, table_kind: int, table_a: int, table_b: int,
        rel_clip: int, need_alibi: bool, need_table: bool, need_bias: bool, need_rel_key: bool,
        need_rel_value: bool, need_rel_u: bool, need_rel_w: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                          Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dq, dk, dv, d_alibi, d_table, d_bias, d_rel_key, d_rel_value,
    d_rel_u, d_rel_w)``; a parameter gradient that was not asked for (``need_*``
    false) is an empty tensor. ``dlse`` (natural log) may be None."""
    p = _problem(q, k, v, q_pos, k_pos, inv_freq, alibi, table, bias, rel_key, rel_value, rel_u, rel_w,
                 causal, scale, window_left, window_right, rope_interleaved, rope_factor, table_kind, table_a,
                 table_b, rel_clip)
    flags = (need_alibi, need_table, need_bias, need_rel_key, need_rel_value, need_rel_u, need_rel_w)
    inputs = _launch_inputs(p)
    for name, want, t in zip(_triton._PARAMS, flags, inputs):
        if want and t is None:
            raise ValueError(f"posattn::attn_bwd: need_{name} is set but {name} is None")
    need = dict(zip(_triton._PARAMS, flags))
    if need["bias"] and p.bias_is_mask:
        raise ValueError("posattn::attn_bwd: a bool mask has no gradient (need_bias must be False)")
    L = _triton._Launch(p, q, *inputs)
    grads = _triton._backward(L, q, k, v, out, lse2, dout, dlse, need, wrap=_launcher(q))
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


def _setup_context(ctx, inputs, output):
    tensors, scalars = inputs[:NUM_TENSORS], inputs[NUM_TENSORS:]
    q, k, v = tensors[:3]
    out, _, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2, *tensors[3:])
    ctx.scalars = tuple(scalars)


def _backward(ctx, dout, dlse, dlse2):
    q, k, v, out, lse2, *encodings = ctx.saved_tensors
    need = tuple(bool(ctx.needs_input_grad[i]) for i in _PARAM_SLOTS)
    if dout is None:
        dout = torch.zeros_like(out)
    # lse2 = lse * log2(e): its gradient folds into lse's.
    if dlse2 is not None:
        dlse = dlse2 * LOG2E if dlse is None else dlse + dlse2 * LOG2E
    grads = bwd(q, k, v, out, lse2, dout, dlse, *encodings, *ctx.scalars, *need)
    dq, dk, dv, *params = grads
    by_slot = dict(zip(_PARAM_SLOTS, params))
    result = [dq, dk, dv]
    for i in range(3, NUM_TENSORS):
        result.append(by_slot[i] if i in by_slot and ctx.needs_input_grad[i] else None)
    return (*result, *(None for _ in ctx.scalars))


fwd.register_autograd(_backward, setup_context=_setup_context)

if INTERPRETED:
    # Interpreted kernels cannot be traced into the graph: keep the operators whole
    # under functionalization (torch.compile then calls them as extern operators).
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    fwd.register_torch_dispatch(FunctionalTensorMode, _opaque)
    bwd.register_torch_dispatch(FunctionalTensorMode, _opaque)


def op_args(p: _validate.Problem) -> tuple:
    """``posattn::attn_fwd``'s arguments for a validated problem."""
    rb = p.rel_bias
    if rb is None:
        kind, tab_a, tab_b = 0, 0, 0
    elif isinstance(rb, GridBias):
        kind, (tab_a, tab_b) = 2, rb.window
    else:
        kind, tab_a, tab_b = 1, rb.left, rb.right
    inv_freq = p.rope.inv_freq_for(p.D, p.q.device) if p.rope is not None else None
    bias = p.bias
    if bias is not None and p.bias_is_mask and bias.requires_grad:
        bias = bias.detach()
    alibi, table, _, *rel = _launch_inputs(p)
    return (p.q, p.k, p.v, p.q_pos, p.k_pos, inv_freq, alibi, table, bias, *rel,
            p.causal, p.scale, p.window_left, p.window_right,
            bool(p.rope is not None and p.rope.interleaved), p.rope.attention_factor if p.rope is not None else 1.0,
            kind, tab_a, tab_b, p.rel_emb.clip if p.rel_emb is not None else 0)


def attention(p: _validate.Problem):
    """posattn.attention's Triton path through the operators (what torch.compile traces)."""
    out, lse, _ = fwd(*op_args(p))
    return (out, lse) if p.return_lse else out
