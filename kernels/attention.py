"""Fused attention with positional encodings: Triton kernels (forward and backward).

The kernels, split by concern (read in this order):

- common.py   the FLAGS / GRADS bit layout, loads, positions, key / query ranges
- rope.py     _rope_rotate (q and k rotated once per call), gradients rotated back
- relative.py Shaw / Transformer-XL table slices and per-row shifts
- scores.py   the score tile (logits, every additive term, masks), per-head
              parameters, P and dS recomputed for the backward
- forward.py  _attn_fwd
- backward.py _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_rel, _attn_bwd_dbias
- params.py   _attn_bwd_dq: dQ and the encodings' parameter gradients
- decode.py   _attn_decode, _attn_decode_merge: few queries (KV-cache steps), keys
              split over programs, a k/v head's query heads sharing its tiles

This module is the entry point the host side (posattn/_triton.py) imports.

Conventions
- Scores are kept in the log2 domain: s2 = log2(e) * (scale * q.k + bias), so the
  softmax uses exp2 (one MUFU op) and log2(e) is folded into the scale once (a
  forward tile whose only term is a dense bias is scored in the natural domain and
  log2(e) folded into its exponent instead: forward._fwd_tile's NATURAL).
- Positions: rel = k_pos - q_pos. Without explicit positions q_pos = i + Nk - Nq and
  k_pos = j (bottom-right alignment), which also lets the loops skip tiles that
  causal / window masks hide entirely, and lets the forward score the tiles every
  row sees whole without any mask (common.py: _split_keys).
- Tiles beyond a band around the diagonal run as plain tiles (common.py: _band):
  where a DistanceBias reads one end column, Shaw's tables one end row, or ALiBi's
  |rel| is linear, the encoding's term is a per-row constant (folded into the row
  max, the lse or delta) plus, for ALiBi, a per-column one; only the band's tiles
  pay for gathers and per-row shifts.
- Every encoding is a bit of the FLAGS constexpr of the same kernels (common.py):
  a disabled encoding costs nothing in the compiled code. Its runtime arguments are
  one group: a segment of the float32 Params buffer (scores.py: _head_params), or
  one tensor argument (Pos, Table, Bias, Rel); no kernel takes more than 50.
- No [Nq, Nk] tensor is ever written: parameter gradients are reduced per program
  into small buffers that the host sums in a fixed order (deterministic, no atomics).
  The one exception: a dense bias (already [Nq, Nk]) shared by batches or heads gets
  dK/dV's dS tiles added atomically, unless torch's deterministic mode is on.
- Packed sequences (VARLEN): grid axis 2 is a sequence of one packed batch; each
  program loads its rows and lengths (common.py: _sequence), after which it is the
  same kernel on a smaller problem.
- Dropout regenerates its keep-mask from (seed, pair) in every kernel that needs it
  (common.py: _dropout_keep): never stored.
"""
from .backward import _attn_bwd_dbias, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_rel  # noqa: F401
from .common import *  # noqa: F401,F403
from .decode import _attn_decode, _attn_decode_merge  # noqa: F401  (LOG2E and the bit offsets: posattn/_triton.py packs with them)
from .common import __all__ as _common
from .forward import _attn_fwd, _dropout_mask  # noqa: F401
from .params import _attn_bwd_dq  # noqa: F401
from .rope import _rope_rotate  # noqa: F401

__all__ = ["_rope_rotate", "_attn_fwd", "_attn_decode", "_attn_decode_merge", "_dropout_mask", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_rel", "_attn_bwd_dbias",
           *_common]
