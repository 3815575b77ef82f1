"""posattn.attention: the public entry point, with backend dispatch."""
from __future__ import annotations

import os
import warnings

import torch

from . import _cuda, _dropout, _triton, _validate, reference



def _op_unavailable():
    """Why posattn/_op.py (the Triton backend's autograd layer and torch.library
    operators) cannot be used here, or None. Only this reason: any other error
    importing it is a bug, raised at import, never a silent skip."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    return None


_OP_ERROR = _op_unavailable()
if _OP_ERROR is None:
    from . import _op
else:  # the Triton backend then refuses (triton_refusal says why)
    _op = None

BACKENDS = ("triton", "cuda", "reference")
_REFUSALS = {"triton": lambda p: _triton.refusal(p), "cuda": lambda p: _cuda.refusal(p)}


def _select(p: _validate.Problem, backend=None) -> str:
    """The backend that will run ``p``: the requested one (error if it refuses),
    else POSATTN_BACKEND, else the first of triton, cuda that accepts the problem,
    else reference. Falling back for CUDA tensors warns, naming each refused backend
    and why; CPU tensors (without TRITON_INTERPRET) and float64 go to the reference
    silently, as documented."""
    requested = backend if backend is not None else (os.environ.get("POSATTN_BACKEND") or None)
    if requested is not None and requested not in BACKENDS:
        src = "backend" if backend is not None else "POSATTN_BACKEND"
        raise ValueError(f"{src} must be one of {BACKENDS} or None, got {requested!r}")
    if requested == "reference":
        return "reference"
    if requested is not None:
        why = _REFUSALS[requested](p)
        if why is not None:
            src = "" if backend is not None else " (from POSATTN_BACKEND)"
            raise ValueError(f"backend {requested!r}{src} refused: {why}")
        return requested
    refused = []
    for name in ("triton", "cuda"):
        if name == "cuda" and (p.q.device.type != "cuda" or p.q.dtype == torch.float64):
            break  # the documented reference cases: no fused backend was expected
        why = _REFUSALS[name](p)
        if why is None:
            if refused:
                warnings.warn(f"posattn: {'; '.join(refused)}; using backend {name!r}", stacklevel=3)
            return name
        refused.append(f"backend {name!r} refused: {why}")
    if refused and p.q.device.type == "cuda" and p.q.dtype != torch.float64:
        warnings.warn(f"posattn: {'; '.join(refused)}; using the reference backend (plain PyTorch, "
                      f"O(Nq * Nk) memory)", stacklevel=3)
    return "reference"


def attention(q, k, v, *, causal=False, scale=None, window=None, q_pos=None, k_pos=None, rope=None,
              alibi_slopes=None, rel_bias=None, bias=None, return_lse=False, rel_emb=None, softcap=None,
              sinks=None, dropout_p=0.0, backend=None, **encodings):
    """Fused attention with positional encodings: ``softmax(scale * q'k'^T + bias) v``
    with the encodings computed inside the kernel (docs/SPEC.md defines each term).

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]``. Any strides; float16,
            bfloat16 or float32 (float64 on the reference backend); ``Hq % Hkv == 0``
            (GQA / MQA); ``1 <= D <= 256``; ``Nq`` may differ from ``Nk``.
        causal: keep keys with ``k_pos - q_pos <= 0``.
        scale: multiplies ``q . k`` (default ``1 / sqrt(D)``); biases are added after it.
        window: ``(left, right)``: keep ``-left <= k_pos - q_pos <= right``; ints
            ``>= 0`` or None (unbounded side).
        q_pos, k_pos: int32 / int64 positions, ``[N]`` or ``[B, N]``; default
            ``k_pos = arange(Nk)``, ``q_pos = arange(Nk - Nq, Nk)`` (bottom-right).
            Masks and every relative encoding read them.
        rope: :class:`posattn.RoPE`: q and k rotated at their positions.
        alibi_slopes: ``[Hq]`` or ``[B, Hq]`` float: ``-slope * |k_pos - q_pos|``
            (:func:`posattn.alibi_slopes` gives the standard ones); differentiable.
        rel_bias: :class:`posattn.DistanceBias` (T5 / clipped distance table) or
            :class:`posattn.GridBias` (Swin / BEiT 2-D table); the table is differentiable.
        bias: float (float32 or q's dtype) tensor broadcastable to ``[B, Hq, Nq, Nk]``
            (never expanded; its batch may divide ``B``: batch ``b`` reads
            ``bias[b % nB]``), added to the scores and differentiable; or a bool
            keep-mask (True = attend).
        return_lse: also return the natural-log log-sum-exp ``[B, Hq, Nq]``
            (float32; float64 for float64 inputs; ``-inf`` for rows with no key, or
            the row's sink with ``sinks``), differentiable.
        rel_emb: :class:`posattn.RelativeEmbeddings`: Shaw's key / value relative
            embeddings and Transformer-XL's ``u`` / ``w``; all differentiable.
        softcap: a float ``c > 0``: the scaled logits become ``c * tanh(scale * logit / c)``
            before the biases are added and the masks applied (Gemma 2).
        sinks: ``[Hq]`` float tensor of finite per-head logits that join each row's
            softmax denominator and nothing else (gpt-oss): ``p_ij = exp(s_ij) /
            (exp(sinks[h]) + sum_j exp(s_ij))``, so rows may sum to less than 1;
            lse includes it; a row with no visible key gives zeros and ``lse =
            sinks[h]``. Differentiable.
        dropout_p: attention dropout (SDPA's name; apply it in training only): each
            probability is kept with probability ``1 - dropout_p`` and scaled by
            ``1 / (1 - dropout_p)``, after the lse (which it leaves unchanged). The
            Triton kernels draw a Philox keep-mask from one seed taken from torch's
            default generator for the device (``torch.manual_seed`` reproduces a
            run bit for bit; the backward regenerates the mask, never stored); the
            reference backend draws its own with ``torch.rand``; the CUDA fallback
            refuses it. ``posattn.testing.dropout_keep_mask`` returns the kernels' mask.
        **encodings: any further encoding registered in posattn.encodings, by its
            keyword (an unknown keyword raises ``TypeError`` listing them):
            ``kerple=`` :class:`posattn.KERPLE` (KERPLE's logarithmic bias
            ``-r1[h] log(1 + r2[h] |k_pos - q_pos|)``; r1 and r2 differentiable).
        backend: ``"triton"``, ``"cuda"``, ``"reference"`` or None (automatic:
            Triton for CUDA tensors, else the CUDA fallback, else the reference;
            ``POSATTN_BACKEND`` overrides; a forced backend that cannot run the
            problem raises ``ValueError`` with its reasons).

    Returns:
        ``out [B, Hq, Nq, D]`` in q's dtype, or ``(out, lse)`` with ``return_lse``.
        Rows with no visible key give zeros (and ``lse = -inf``), never NaN.

    Autograd: gradients to q, k, v and every float tensor of the encodings; double
    backward (through the reference's ops on the fused backends); ``torch.func.grad``.
    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as SDPA does.
    Invalid arguments raise ``ValueError`` / ``TypeError`` naming the argument.
    """
    amp = _autocast_dtype(q)
    if amp is not None:  # as SDPA under autocast: q, k, v (and a half-precision bias) in the autocast dtype
        q, k, v = (x.to(amp) if x.dtype != amp else x for x in (q, k, v))
        if isinstance(bias, torch.Tensor) and bias.dtype in (torch.float16, torch.bfloat16):
            bias = bias.to(amp)
        with torch.autocast(q.device.type, enabled=False):
            return attention(q, k, v, causal=causal, scale=scale, window=window, q_pos=q_pos, k_pos=k_pos,
                             rope=rope, alibi_slopes=alibi_slopes, rel_bias=rel_bias, bias=bias,
                             return_lse=return_lse, rel_emb=rel_emb, softcap=softcap, sinks=sinks,
                             dropout_p=dropout_p, backend=backend, **encodings)
    p = _validate.check(q, k, v, causal=causal, scale=scale, window=window, q_pos=q_pos, k_pos=k_pos,
                        rope=rope, alibi_slopes=alibi_slopes, rel_bias=rel_bias, bias=bias,
                        return_lse=return_lse, rel_emb=rel_emb, softcap=softcap, sinks=sinks,
                        dropout_p=dropout_p, **encodings)
    name = _select(p, backend)
    if name != "reference" and torch.jit.is_tracing():
        raise RuntimeError(f"posattn: torch.jit.trace cannot record the {name!r} backend's kernels (the trace "
                           f"would silently leave them out); use torch.compile, or backend='reference' to trace "
                           f"plain PyTorch ops")
    if p.B == 0 or p.Hq == 0 or p.Nq == 0 or p.Nk == 0:
        return reference.empty_result(p)
    if name == "triton":
        if p.dropout_p > 0:  # the call's Philox seed, from torch's generator for the device
            p = p.replace(dropout_rng=_dropout.draw(p.q.device))
        return _op.attention(p)
    if name == "cuda":
        return _cuda.attention(p)
    return reference._run(p, upcast=False)


def _autocast_dtype(q):
    """The autocast dtype that applies to q's device, or None: float32 (and float16 /
    bfloat16 of the other kind) inputs are cast to it; float64 is left alone, as
    autocast does."""
    if not isinstance(q, torch.Tensor) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    dev = q.device.type
    try:
        if not torch.is_autocast_enabled(dev):
            return None
        amp = torch.get_autocast_dtype(dev)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None
    return amp


def select_backend(q, k, v, *, backend=None, **kwargs) -> str:
    """The name of the backend ``attention(q, k, v, backend=backend, **kwargs)`` would
    run; raises the same error as ``attention`` when a forced backend refuses."""
    return _select(_validate.check(q, k, v, **kwargs), backend)
