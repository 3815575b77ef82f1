"""posattn.attention: the public entry point, with backend dispatch."""
from __future__ import annotations

import os

import torch

from . import _triton, _validate, reference

BACKENDS = ("triton", "reference")


def _select(p: _validate.Problem, backend=None) -> str:
    """The backend that will run ``p``: the requested one (error if it refuses),
    else POSATTN_BACKEND, else triton when it accepts the problem, else reference."""
    requested = backend if backend is not None else (os.environ.get("POSATTN_BACKEND") or None)
    if requested is not None and requested not in BACKENDS:
        src = "backend" if backend is not None else "POSATTN_BACKEND"
        raise ValueError(f"{src} must be one of {BACKENDS} or None, got {requested!r}")
    if requested == "reference":
        return "reference"
    why = _triton.refusal(p)
    if requested == "triton":
        if why is not None:
            src = "" if backend is not None else " (from POSATTN_BACKEND)"
            raise ValueError(f"backend 'triton'{src} refused: {why}")
        return "triton"
    return "triton" if why is None else "reference"


def attention(q, k, v, *, causal=False, scale=None, window=None, q_pos=None, k_pos=None, rope=None,
              alibi_slopes=None, rel_bias=None, bias=None, return_lse=False, rel_emb=None, backend=None):
    """Fused attention with positional encodings (SPEC.md).

    q ``[B, Hq, Nq, D]``, k and v ``[B, Hkv, Nk, D]`` (any strides, ``Hq % Hkv == 0``).
    Returns ``out [B, Hq, Nq, D]`` and, with ``return_lse``, the natural-log
    log-sum-exp ``[B, Hq, Nq]`` in float32. See README for every argument.
    """
    p = _validate.check(q, k, v, causal=causal, scale=scale, window=window, q_pos=q_pos, k_pos=k_pos,
                        rope=rope, alibi_slopes=alibi_slopes, rel_bias=rel_bias, bias=bias,
                        return_lse=return_lse, rel_emb=rel_emb)
    name = _select(p, backend)
    if p.B == 0 or p.Hq == 0 or p.Nq == 0 or p.Nk == 0:
        return reference.empty_result(p)
    if name == "triton":
        return _triton.attention(p)
    return reference._run(p, upcast=False)


def select_backend(q, k, v, *, backend=None, **kwargs) -> str:
    """The name of the backend ``attention(q, k, v, backend=backend, **kwargs)`` would
    run; raises the same error as ``attention`` when a forced backend refuses."""
    return _select(_validate.check(q, k, v, **kwargs), backend)
