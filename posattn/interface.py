"""posattn.attention: the public entry point, with backend dispatch."""
from __future__ import annotations

import contextlib
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
              sinks=None, dropout_p=0.0, rope_pos=None, backend=None, **encodings):
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
        rope_pos: ``(q_rope_pos, k_rope_pos)``: RoPE's own positions per axis, int32 /
            int64 ``[A, N]`` or ``[B, A, N]`` with ``A = len(rope.sections)`` (1 without
            sections), for multi-axis RoPE (Qwen2-VL's M-RoPE, axial 2-D RoPE): frequency
            pair ``i`` rotates by the position of the axis whose section holds it. A None
            side takes its 1-D positions on every axis (the default for both, which is
            plain RoPE). Only RoPE reads them; masks and every other encoding read
            ``q_pos`` / ``k_pos``.
        alibi_slopes: ``[Hq]`` or ``[B, Hq]`` float: ``-slope * |k_pos - q_pos|``
            (:func:`posattn.alibi_slopes` gives the standard ones); differentiable.
        rel_bias: :class:`posattn.DistanceBias` (T5 / clipped distance table) or
            :class:`posattn.GridBias` (Swin / BEiT 2-D table); the table is differentiable.
        bias: float (float32 or q's dtype) tensor broadcastable to ``[B, Hq, Nq, Nk]``
            (never expanded; its batch may divide ``B``: batch ``b`` reads
            ``bias[b % nB]``), added to the scores and differentiable; or a bool
            keep-mask (True = attend). Its gradient is summed over the axes it
            broadcasts; when batches or heads share every row of it, the Triton
            backward adds them with float32 atomics (last-bit differences run to run
            on a GPU) unless ``torch.use_deterministic_algorithms(True)`` is on, which
            sums them in a fixed order in a pass of their own.
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

    Decoding: with at most 16 queries per row and at least 8 keys per query (a KV-cache
    step) the Triton backend splits the keys over programs, a k/v head's query heads
    sharing each K / V tile, and merges the parts by their lse: the same result.

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
                             dropout_p=dropout_p, rope_pos=rope_pos, backend=backend, **encodings)
    p = _validate.check(q, k, v, causal=causal, scale=scale, window=window, q_pos=q_pos, k_pos=k_pos,
                        rope=rope, alibi_slopes=alibi_slopes, rel_bias=rel_bias, bias=bias,
                        return_lse=return_lse, rel_emb=rel_emb, softcap=softcap, sinks=sinks,
                        dropout_p=dropout_p, rope_pos=rope_pos, **encodings)
    return _run(p, backend)


def _run(p: _validate.Problem, backend, dropout_mask=None):
    """A validated problem on its backend (attention and attention_varlen)."""
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
    return reference._run(p, upcast=False, dropout_mask=dropout_mask)


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


def _cu_seqlens(name, cu, total, device):
    """Check one cu_seqlens tensor (values read once: a device sync)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's varlen layout), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D [num_seqs + 1], got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    from .encodings.base import readable
    if readable(cu):
        if int(cu[0]) != 0:
            raise ValueError(f"{name} must start at 0, got {int(cu[0])}")
        if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing")
        if int(cu[-1]) != total:
            raise ValueError(f"{name} must end at the total number of rows ({total}), got {int(cu[-1])}")


def _varlen_problem_fields(p, cu_q, cu_k, max_q, max_k):
    """The Problem's varlen field: (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
    the maxima computed (one sync) when not given, and checked against the lengths."""
    if cu_k is None or cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (one entry per sequence + 1), "
                         f"got {None if cu_q is None else tuple(cu_q.shape)} and "
                         f"{None if cu_k is None else tuple(cu_k.shape)}")
    from .encodings.base import readable
    maxima = []
    for name, cu, m in (("max_seqlen_q", cu_q, max_q), ("max_seqlen_k", cu_k, max_k)):
        longest = int((cu[1:] - cu[:-1]).max()) if readable(cu) and cu.numel() > 1 else None
        if (m is None or m == 0) and longest is None and cu.numel() > 1:
            raise ValueError(f"{name} must be given when cu_seqlens cannot be read (torch.compile, fake tensors): "
                             f"the kernels' grid is sized by it")
        if m is None or m == 0 and longest:
            m = longest or 0
        if not _validate._is_int(m) or m < 0:
            raise ValueError(f"{name} must be an int >= 0, got {m!r}")
        if longest is not None and m < longest:
            raise ValueError(f"{name}={m} is shorter than the longest sequence ({longest})")
        maxima.append(int(m))
    return (cu_q, cu_k, *maxima)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     scale=None, window=None, rope=None, alibi_slopes=None, rel_bias=None, return_lse=False,
                     rel_emb=None, softcap=None, sinks=None, dropout_p=0.0, backend=None, dropout_mask=None,
                     **encodings):
    """:func:`attention` over packed sequences (padding-free batches), in FlashAttention's
    varlen layout: ``q`` ``[total_q, Hq, D]``, ``k`` / ``v`` ``[total_k, Hkv, D]`` (any
    strides), ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 ``[num_seqs + 1]`` (0, then each
    sequence's end row; non-decreasing, ending at the totals). Sequence ``s`` is rows
    ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` of q against rows ``cu_seqlens_k[s]:...`` of
    k and v, a problem of its own: positions restart in it (bottom-right aligned, as
    FlashAttention), and causal, window, RoPE, ALiBi (``[Hq]`` slopes), DistanceBias,
    KERPLE, relative embeddings, softcap, sinks and dropout act within it. Empty
    sequences are allowed. ``max_seqlen_*``: the longest sequence (computed, one host
    sync, when None). Refused: a dense ``bias`` (no [total, total] tensor exists) and
    GridBias.

    The Triton kernels' grid is sequences x query blocks of the longest sequence:
    no tile outside a sequence is visited.

    Returns ``out`` ``[total_q, Hq, D]`` (and ``lse`` ``[Hq, total_q]`` with
    ``return_lse``); gradients to q, k, v and every encoding parameter.

    ``dropout_mask`` (reference backend only, for tests): the keep-mask to apply,
    ``[num_seqs, Hq, max_seqlen_q, max_seqlen_k]``, each sequence's block at its own rows
    and keys (posattn.testing.dropout_keep_mask_varlen gives the kernels').
    """
    if dropout_mask is not None and backend != "reference":
        raise ValueError("attention_varlen: dropout_mask is for backend='reference' (the kernels draw their own)")
    for name in ("bias", "q_pos", "k_pos", "rope_pos"):
        if encodings.get(name) is not None:
            raise ValueError(f"attention_varlen: {name}= is not supported (each sequence's positions restart at "
                             f"0; a dense bias would be [total, total])")
    encodings = {n: e for n, e in encodings.items() if n not in ("bias", "q_pos", "k_pos", "rope_pos")}
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D [total, H, D] (the varlen layout), got shape {tuple(x.shape)}")
    _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    from .encodings import GridBias
    if isinstance(rel_bias, GridBias):
        raise ValueError("attention_varlen: rel_bias=GridBias is not supported (a window grid per packed sequence)")
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))     # [1, H, total, D] views
    amp = _autocast_dtype(q4)
    if amp is not None:
        q4, k4, v4 = (x.to(amp) if x.dtype != amp else x for x in (q4, k4, v4))
    with torch.autocast(q4.device.type, enabled=False) if amp is not None else contextlib.nullcontext():
        p = _validate.check(q4, k4, v4, causal=causal, scale=scale, window=window, rope=rope,
                            alibi_slopes=alibi_slopes, rel_bias=rel_bias, return_lse=True, rel_emb=rel_emb,
                            softcap=softcap, sinks=sinks, dropout_p=dropout_p, **encodings)
        p = p.replace(varlen=_varlen_problem_fields(p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
        out, lse = _run(p, backend, dropout_mask)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out

