"""The Triton backend's autograd layer: ``posattn::attn_fwd`` and ``posattn::attn_bwd``,
``torch.library.triton_op``s over flat arguments (tensors, then scalars and flags),
whose bodies are the Triton backend's launchers (``_triton._forward`` /
``_triton._backward``) with every kernel launched through
``torch.library.wrap_triton``. One autograd path for every call:

- the forward's context and the backward are ``_setup_context`` / ``_backward``,
  registered on ``attn_fwd`` (``register_autograd``); the backward calls
  ``attn_bwd``, wrapped in ``posattn._autograd.FusedBackward`` when the gradients
  are themselves differentiated (double backward);
- under torch.compile posattn.attention calls ``attn_fwd``: the operators
  decompose into the kernels and Inductor calls them from its generated code (no
  graph break, no Python on the hot path); the fake (meta) kernel is the same body
  run on fake tensors (the launches do nothing there; the outputs' shapes, dtypes
  and strides come from the very code that allocates the real ones);
- eager calls go through ``_Attention``, an autograd.Function whose forward calls
  ``attn_fwd`` and whose setup_context / backward are the same two functions
  (torch.func transforms accept a Function with setup_context, not a custom
  operator's registered autograd).

torch < 2.6 has no triton_op: the same bodies then run as plain functions behind
``_Attention`` (torch.compile traces through it).

On CPU the operators run the same kernels under ``TRITON_INTERPRET=1`` (Triton's
interpreter). Interpreted kernels cannot be traced into a graph, so then the
operators stay opaque under torch.compile: the compiled graph calls them like any
extern operator and the fake kernel skips the launches.
"""
import inspect
import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _autograd, _triton, _validate
from .encodings import KERPLE, ALiBi, DenseBias, DistanceBias, GridBias, RelativeEmbeddings, RoPE, Sinks, SoftCap
from .kernels.attention import (_attn_bwd_dbias, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_rel,
                                _attn_decode, _attn_decode_merge, _attn_fwd, _dropout_mask,
                                _rope_rotate)

__all__ = ["attention", "op_args", "fwd", "bwd", "CODECS"]

LOG2E = _triton.LOG2E


class Codec:
    """How one encoding keyword travels through the operators' flat arguments: its
    tensor fields (in the tensors block), its scalar fields (after the common
    scalars), ``encode(e, p)`` -> (tensors, scalars) and ``decode(tensors, scalars)``
    -> the Encoding (or None when absent). Every field is in the schema: an option
    an encoding gains must be added here, or tests/test_design.py's round trip
    (reference output of the decoded problem == the original's) fails."""

    def __init__(self, keyword, types, tensors, scalars, encode, decode):
        self.keyword, self.types = keyword, types
        self.tensors, self.scalars = tensors, scalars      # ((name, schema type), ...)
        self.encode, self.decode = encode, decode


def _rope_encode(e, p):
    if e is None:
        return (None, None, None), (False, 1.0, [])
    axis_pos = e.axis_positions or (None, None)
    return (e.inv_freq_for(p.D, p.q.device), *axis_pos), (e.interleaved, e.attention_factor, list(e.sections or ()))


def _rope_decode(t, sc):
    # the positions per axis (rope_q_pos, rope_k_pos) are checked as rope_pos= by _problem
    (inv_freq, _, _), (interleaved, factor, sections) = t, sc
    if inv_freq is None:
        return None
    if inv_freq.dim() != 1 or not inv_freq.is_floating_point():
        raise ValueError(f"posattn op: inv_freq must be a 1-D float tensor, got {inv_freq.dtype} "
                         f"{tuple(inv_freq.shape)}")
    # The rotary dim is a constexpr of the kernels: a symbolic length is specialised here.
    rope = RoPE(dim=2 * int(inv_freq.shape[0]), interleaved=interleaved, attention_factor=factor,
                sections=tuple(sections) or None)
    rope.inv_freq = inv_freq
    return rope


def _table_encode(e, p):
    if e is None:
        return (None,), (0, 0, 0)
    if isinstance(e, GridBias):
        return (e.table,), (2, *e.window)
    return (e.table,), (1, e.left, e.right)


def _table_decode(t, sc):
    (table,), (kind, a, b) = t, sc
    if table is None:
        return None
    a, b = int(a), int(b)
    if kind == 1:
        return DistanceBias(table, a, b)
    if kind == 2:
        return GridBias(table, (a, b))
    raise ValueError(f"posattn op: table_kind must be 1 (DistanceBias) or 2 (GridBias) with a table, got {kind}")


def _rel_encode(e, p):
    if e is None:
        return (None,) * 4, (0,)
    return (e.key, e.value, e.content_bias, e.position_bias), (e.clip,)


def _rel_decode(t, sc):
    key, value, u, w = t
    if key is None and value is None and u is None:
        if w is not None:
            raise ValueError("posattn op: rel_w (position_bias) needs rel_key")
        return None
    return RelativeEmbeddings(key=key, value=value, clip=int(sc[0]), content_bias=u, position_bias=w)


def _dense_encode(e, p):
    if e is None:
        return (None,), ()
    bias = e.bias_tensor
    return (bias.detach() if e.is_mask and bias.requires_grad else bias,), ()


CODECS = (
    Codec("rope", (RoPE,), (("inv_freq", "Tensor?"), ("rope_q_pos", "Tensor?"), ("rope_k_pos", "Tensor?")),
          (("rope_interleaved", "bool"), ("rope_factor", "float"), ("rope_sections", "int[]")),
          _rope_encode, _rope_decode),
    Codec("alibi_slopes", (ALiBi,), (("alibi", "Tensor?"),), (),
          lambda e, p: ((None if e is None else e.slopes,), ()),
          lambda t, sc: None if t[0] is None else ALiBi(t[0])),
    Codec("rel_bias", (DistanceBias, GridBias), (("table", "Tensor?"),),
          (("table_kind", "int"), ("table_a", "int"), ("table_b", "int")), _table_encode, _table_decode),
    Codec("bias", (DenseBias,), (("bias", "Tensor?"),), (), _dense_encode,
          lambda t, sc: None if t[0] is None else DenseBias(t[0])),
    Codec("rel_emb", (RelativeEmbeddings,),
          (("rel_key", "Tensor?"), ("rel_value", "Tensor?"), ("rel_u", "Tensor?"), ("rel_w", "Tensor?")),
          (("rel_clip", "int"),), _rel_encode, _rel_decode),
    Codec("kerple", (KERPLE,), (("kerple_r1", "Tensor?"), ("kerple_r2", "Tensor?")), (),
          lambda e, p: ((None, None) if e is None else (e.r1, e.r2), ()),
          lambda t, sc: None if t[0] is None else KERPLE(t[0], t[1])),
    Codec("softcap", (SoftCap,), (), (("softcap", "float"),),   # 0.0: none
          lambda e, p: ((), (0.0 if e is None else e.cap,)),
          lambda t, sc: None if sc[0] == 0.0 else SoftCap(sc[0])),
    Codec("sinks", (Sinks,), (("sinks", "Tensor?"),), (),
          lambda e, p: ((None if e is None else e.sinks,), ()),
          lambda t, sc: None if t[0] is None else Sinks(t[0])),
)
_COMMON_TENSORS = (("q", "Tensor"), ("k", "Tensor"), ("v", "Tensor"), ("q_pos", "Tensor?"), ("k_pos", "Tensor?"),
                   ("dropout_rng", "Tensor?"), ("cu_seqlens_q", "Tensor?"), ("cu_seqlens_k", "Tensor?"))
_COMMON_SCALARS = (("causal", "bool"), ("scale", "float"), ("window_left", "int?"), ("window_right", "int?"),
                   ("dropout_p", "float"), ("max_seqlen_q", "int"), ("max_seqlen_k", "int"))
_ENC_TENSORS = tuple(f for c in CODECS for f in c.tensors)
_ENC_SCALARS = tuple(f for c in CODECS for f in c.scalars)
NUM_TENSORS = len(_COMMON_TENSORS) + len(_ENC_TENSORS)
# The differentiable tensors, in _triton._PARAMS order, and their positions among the tensors.
_CONSTANTS = ("inv_freq", "rope_q_pos", "rope_k_pos")   # encoding tensors without a gradient
_PARAM_NAMES = tuple(n for n, _ in _ENC_TENSORS if n not in _CONSTANTS)
assert _PARAM_NAMES == _triton._PARAMS, "the operators' parameter tensors must follow _triton._PARAMS"
_PARAM_SLOTS = tuple(len(_COMMON_TENSORS) + [n for n, _ in _ENC_TENSORS].index(n) for n in _PARAM_NAMES)


_FWD_INPUTS = _COMMON_TENSORS + _ENC_TENSORS + _COMMON_SCALARS + _ENC_SCALARS
_BWD_INPUTS = (_COMMON_TENSORS[:3] + (("out", "Tensor"), ("lse2", "Tensor"), ("dout", "Tensor"), ("dlse", "Tensor?"))
               + _COMMON_TENSORS[3:] + _ENC_TENSORS + _COMMON_SCALARS + _ENC_SCALARS
               + tuple((f"need_{n}", "bool") for n in _PARAM_NAMES))


def _kernels():
    """Every kernel the operators launch. torch.library.triton_op finds them through
    this function's return value; torch.compile's caches key on their source."""
    return (_rope_rotate, _attn_fwd, _attn_decode, _attn_decode_merge, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq,
            _attn_bwd_rel, _attn_bwd_dbias, _dropout_mask)


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
        return torch.library.wrap_triton(kernel) if REGISTERED else kernel

    return wrap


def _split(args, fields):
    """The leading ``len(fields)`` values of ``args`` as a dict by field name, and the rest."""
    return dict(zip((n for n, _ in fields), args)), args[len(fields):]


def _problem(tensors: dict, scalars: dict) -> _validate.Problem:
    """The flat operator arguments back as a validated Problem (the same check as
    posattn.attention's, so a direct caller of the operators gets its errors)."""
    encodings = {}
    for c in CODECS:
        e = c.decode(tuple(tensors[n] for n, _ in c.tensors), tuple(scalars[n] for n, _ in c.scalars))
        if e is not None:
            encodings[c.keyword] = e
    window = tuple(None if w is None else int(w) for w in (scalars["window_left"], scalars["window_right"]))
    q = tensors["q"]
    rope_pos = None
    if tensors["rope_q_pos"] is not None or tensors["rope_k_pos"] is not None:
        rope_pos = (tensors["rope_q_pos"], tensors["rope_k_pos"])
    p = _validate.check(q, tensors["k"], tensors["v"], causal=scalars["causal"], scale=scalars["scale"],
                        window=window, q_pos=tensors["q_pos"], k_pos=tensors["k_pos"], dropout_p=scalars["dropout_p"],
                        dropout_rng=tensors["dropout_rng"], rope_pos=rope_pos, **encodings)
    if p.dropout_p > 0 and p.dropout_rng is None:
        raise ValueError("posattn op: dropout_p > 0 needs dropout_rng (posattn._dropout.draw)")
    if tensors["cu_seqlens_q"] is not None:
        from .interface import _varlen_problem_fields
        p = p.replace(varlen=_varlen_problem_fields(p, tensors["cu_seqlens_q"], tensors["cu_seqlens_k"],
                                                    scalars["max_seqlen_q"], scalars["max_seqlen_k"]))
    why = _triton.refusal(p)
    if why is not None and not _is_fake(q):
        raise ValueError(f"posattn op: the Triton backend refused: {why}")
    return p


# posattn.attention hands the operators the Problem it has just validated: _fwd (and,
# through the saved context, _bwd) reuse it when their tensors are the very objects
# op_args(p) made and their scalars are equal (eager calls), instead of decoding and
# checking them again. Any other call (torch.compile's fake tensors, a direct call of
# an operator) is decoded and checked.
_checked = threading.local()


def _known(tensors: dict, scalars: dict):
    """The stashed Problem if ``tensors`` / ``scalars`` are its flat arguments, else None."""
    known = getattr(_checked, "value", None)
    if known is None:
        return None
    k_tensors, k_scalars, p = known
    if all(tensors[n] is t for n, t in k_tensors.items() if n in tensors) and \
            all(type(scalars[n]) is type(x) and scalars[n] == x for n, x in k_scalars.items()):
        return p
    return None


def _fwd(*args):
    """Forward: ``(out, lse, lse2)``; lse is natural-log ``[B, Hq, Nq]`` float32, lse2
    the log2-domain row statistics the backward reads (``lse2 = lse * log2(e)``)."""
    tensors, rest = _split(args, _COMMON_TENSORS + _ENC_TENSORS)
    scalars, _ = _split(rest, _COMMON_SCALARS + _ENC_SCALARS)
    p = _known(tensors, scalars) or _problem(tensors, scalars)
    q = tensors["q"]
    L = _triton._Launch(p, q, *_triton._launch_params(p))
    return _triton._forward(L, q, tensors["k"], tensors["v"], wrap=_launcher(q))


def _bwd(*args):
    """Backward: ``(dq, dk, dv, *d_params)`` in _triton._PARAMS order; a parameter
    gradient that was not asked for (``need_*`` false) is an empty tensor. ``dlse``
    (natural log) may be None."""
    head, rest = _split(args, _BWD_INPUTS[:7])
    tensors, rest = _split(rest, _COMMON_TENSORS[3:] + _ENC_TENSORS)
    scalars, rest = _split(rest, _COMMON_SCALARS + _ENC_SCALARS)
    flags = tuple(bool(x) for x in rest)
    tensors.update(q=head["q"], k=head["k"], v=head["v"])
    p = _known(tensors, scalars) or _problem(tensors, scalars)
    inputs = _triton._launch_params(p)
    for name, want, t in zip(_triton._PARAMS, flags, inputs):
        if want and t is None:
            raise ValueError(f"posattn::attn_bwd: need_{name} is set but {name} is None")
    need = dict(zip(_triton._PARAMS, flags))
    if need["bias"] and p.bias_is_mask:
        raise ValueError("posattn::attn_bwd: a bool mask has no gradient (need_bias must be False)")
    q = head["q"]
    L = _triton._Launch(p, q, *inputs, forward=False)
    grads = _triton._backward(L, q, head["k"], head["v"], head["out"], head["lse2"], head["dout"], head["dlse"],
                              need, wrap=_launcher(q))
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


def _signed(fn, inputs, n_returns):
    """``fn(*args)`` with the signature ``inputs`` (what torch.library reads the schema from)."""
    types = {"Tensor": Tensor, "Tensor?": Optional[Tensor], "bool": bool, "float": float, "int": int,
             "int?": Optional[int], "int[]": List[int]}
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=types[t]) for n, t in inputs],
        return_annotation=Tuple[(Tensor,) * n_returns])
    return fn


# The schemas are generated from the codecs: an encoding's fields cannot be left out.
# torch.library.triton_op / wrap_triton: torch >= 2.6. Older torch runs the same
# bodies as plain functions (eager; torch.compile then traces through _Attention).
REGISTERED = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
if REGISTERED:
    fwd = torch.library.triton_op("posattn::attn_fwd", _signed(_fwd, _FWD_INPUTS, 3), mutates_args=())
    bwd = torch.library.triton_op("posattn::attn_bwd", _signed(_bwd, _BWD_INPUTS, 3 + len(_PARAM_NAMES)),
                                  mutates_args=())
else:  # pragma: no cover - torch < 2.6
    fwd, bwd = _fwd, _bwd


def _setup_context(ctx, inputs, output):
    tensors, scalars = inputs[:NUM_TENSORS], inputs[NUM_TENSORS:]
    q, k, v = tensors[:3]
    out, _, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2, *tensors[3:])
    ctx.scalars = tuple(scalars)
    ctx.known = getattr(_checked, "value", None)  # this call's validated Problem (eager), for _bwd
    # An output nobody differentiated gets None, not zeros: an lse that is not used
    # must not cost the backward its shortcuts (posattn/_triton.py: CORRECT_IN_PASS).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, dlse2):
    q, k, v, out, lse2, *encodings = ctx.saved_tensors
    need = tuple(bool(ctx.needs_input_grad[i]) for i in _PARAM_SLOTS)
    if dout is None:
        dout = torch.zeros_like(out)
    # lse2 = lse * log2(e): its gradient folds into lse's.
    if dlse2 is not None:
        dlse = dlse2 * LOG2E if dlse is None else dlse + dlse2 * LOG2E
    params = [encodings[i - 3] for i in _PARAM_SLOTS]

    def first(out, lse2, q, k, v, dout, dlse, *params):
        tensors = list(encodings)
        for i, t in zip(_PARAM_SLOTS, params):
            tensors[i - 3] = t
        return bwd(q, k, v, out, lse2, dout, dlse, *tensors, *ctx.scalars, *need)

    _checked.value = ctx.known
    try:
        if torch.is_grad_enabled():
            # create_graph (or torch.func.grad): the first derivatives are themselves
            # differentiated, through the reference's ops (posattn._autograd.FusedBackward).
            tensors, _ = _split((q, k, v, *encodings), _COMMON_TENSORS + _ENC_TENSORS)
            scalars, _ = _split(ctx.scalars, _COMMON_SCALARS + _ENC_SCALARS)
            p = _known(tensors, scalars) or _problem(tensors, scalars)
            grads = _autograd.FusedBackward.apply(p, _triton._PARAM_NAMES, first, out, lse2, q, k, v, dout, dlse,
                                                  *params)
        else:
            grads = first(out, lse2, q, k, v, dout, dlse, *params)
    finally:
        _checked.value = None
    dq, dk, dv, *params = grads
    by_slot = dict(zip(_PARAM_SLOTS, params))
    result = [dq, dk, dv]
    for i in range(3, NUM_TENSORS):
        result.append(by_slot[i] if i in by_slot and ctx.needs_input_grad[i] else None)
    return (*result, *(None for _ in ctx.scalars))


class _Attention(torch.autograd.Function):
    """Eager calls: the operator's forward with its registered setup_context and
    backward (the same functions: one autograd path). A Function rather than the
    operator itself because torch.func transforms accept only Functions with
    setup_context (a custom operator's registered autograd is refused by
    torch.func.grad); vmap and jvp are refused naming posattn."""

    @staticmethod
    def forward(*args):
        return fwd(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
    vmap = staticmethod(_autograd.refuse_vmap("triton"))
    jvp = staticmethod(_autograd.refuse_jvp("triton"))


if REGISTERED:
    fwd.register_autograd(_backward, setup_context=_setup_context)

if REGISTERED and INTERPRETED:
    # Interpreted kernels cannot be traced into the graph: keep the operators whole
    # under functionalization (torch.compile then calls them as extern operators).
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    fwd.register_torch_dispatch(FunctionalTensorMode, _opaque)
    bwd.register_torch_dispatch(FunctionalTensorMode, _opaque)


def op_args(p: _validate.Problem) -> tuple:
    """``posattn::attn_fwd``'s arguments for a validated problem."""
    by_keyword = {e.keyword: e for e in p.encodings}
    known = {t for c in CODECS for t in c.types}
    for e in p.encodings:
        if type(e) not in known:
            raise ValueError(f"posattn op: {type(e).__name__} ({e.keyword}=) has no operator codec in posattn/_op.py")
    tensors, scalars = [], []
    for c in CODECS:
        t, sc = c.encode(by_keyword.get(c.keyword), p)
        tensors += t
        scalars += sc
    cu_q, cu_k, max_q, max_k = p.varlen if p.varlen is not None else (None, None, 0, 0)
    return (p.q, p.k, p.v, p.q_pos, p.k_pos, p.dropout_rng, cu_q, cu_k, *tensors, p.causal, p.scale, p.window_left,
            p.window_right, p.dropout_p, max_q, max_k, *scalars)


def attention(p: _validate.Problem):
    """posattn.attention's Triton path: the operator under torch.compile, the same
    forward and backward through _Attention in eager calls."""
    args = op_args(p)
    tensors, rest = _split(args, _COMMON_TENSORS + _ENC_TENSORS)
    scalars, _ = _split(rest, _COMMON_SCALARS + _ENC_SCALARS)
    _checked.value = (tensors, scalars, p)
    try:
        if REGISTERED and torch.compiler.is_compiling():
            out, lse, _ = fwd(*args)  # the operator: no graph break, its registered backward
        else:
            out, lse, _ = _Attention.apply(*args)
    finally:
        _checked.value = None
    return (out, lse) if p.return_lse else out
