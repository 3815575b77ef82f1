"""posattn as a Hugging Face transformers attention implementation.

    import posattn.integrations.hf
    posattn.integrations.hf.register()          # once, before building the model
    model = AutoModelForCausalLM.from_config(config, attn_implementation="posattn")

``register()`` adds :func:`attention_forward` to transformers' ``AttentionInterface``
and, where transformers has one (>= 4.53), SDPA's mask builder to its
``AttentionMaskInterface`` under the same name: the model then hands the
attention function a bool keep-mask ``[B, 1, Nq, Nk]`` or ``None`` (no padding,
plain causal or full attention), exactly as it would to ``"sdpa"``.

What the attention function receives, and what it does with it:

- ``query`` ``[B, Hq, Nq, D]``, ``key`` / ``value`` ``[B, Hkv, Nk, D]``: GQA / MQA
  heads are passed through as they are (posattn shares the k/v heads itself, no
  ``repeat_kv``).
- **RoPE is already applied** (LLaMA, Mistral, Qwen, ... rotate q and k in the
  attention module before calling the function), so no ``rope=`` is passed.
  Fused RoPE is available to code calling ``posattn.attention(..., rope=...)``
  directly.
- ``attention_mask``: a bool keep-mask or an additive float mask, passed as
  posattn's dense ``bias`` (broadcast, never expanded). ``None`` with a causal
  module (``module.is_causal``) and ``Nq > 1`` means ``causal=True``, like SDPA's
  ``is_causal`` (same alignment rules as transformers' SDPA path).
- ``position_bias`` (T5-style models): the dense relative-position bias
  ``[1, H, Nq, Nk]``, added as posattn's dense ``bias`` (combined with the mask as
  transformers' SDPA path does); its gradient reaches the bias table through
  autograd.
- ``scaling``: posattn's ``scale`` (T5 uses 1.0).

Refused with an error: attention dropout while training (``dropout > 0``;
posattn has no dropout), ``softcap``, attention sinks (``s_aux``) and paged caches.
``output_attentions`` is not supported (the weights are returned as ``None``).

Models that compute attention themselves do not route through the interface
and are unaffected by ``attn_implementation="posattn"``: in transformers 5.x
the ALiBi families (BLOOM, Falcon with ``alibi=True``, MPT) do; use
``posattn.attention(..., alibi_slopes=...)`` directly there. See README.
"""
from __future__ import annotations

import warnings

import torch

import posattn

__all__ = ["register", "attention_forward", "NAME"]

NAME = "posattn"


def _combine(attention_mask, position_bias):
    """The one dense bias posattn adds: the mask, the position bias, or both."""
    if position_bias is None:
        return attention_mask
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:  # -inf where masked: the same keys as the bool mask alone
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      position_bias=None, **kwargs):
    """transformers' attention-function signature: returns ``(out [B, Nq, Hq, D], None)``."""
    if kwargs.get("softcap") is not None:
        raise ValueError("posattn: attention logit softcapping (softcap) is not supported")
    if kwargs.get("s_aux") is not None:
        raise ValueError("posattn: attention sinks (s_aux) are not supported")
    if kwargs.get("cache") is not None:
        raise ValueError("posattn: paged attention caches are not supported")
    if dropout and getattr(module, "training", False):
        raise ValueError(f"posattn: attention dropout is not supported (dropout={dropout} in training mode); "
                         f"set the model's attention dropout to 0 or call model.eval()")
    if kwargs.get("output_attentions", False):
        warnings.warn("posattn does not return attention weights (output_attentions=True): they are None",
                      stacklevel=2)

    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # transformers' SDPA rule: a None mask means causal only for more than one query
    # (one query attends to the whole cache), with SDPA's top-left alignment: keys
    # past Nq are empty static-cache slots then and are cut.
    causal = bool(causal) and attention_mask is None and q_len > 1
    if causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]

    bias = _combine(attention_mask, position_bias)
    if bias is not None and bias.dtype != torch.bool and bias.dtype not in (query.dtype, torch.float32):
        bias = bias.to(query.dtype)
    out = posattn.attention(query, key, value, causal=causal, scale=scaling, bias=bias)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register posattn with transformers under ``name`` (default ``"posattn"``);
    returns the name to pass as ``attn_implementation``. Idempotent."""
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("posattn.integrations.hf needs transformers with AttentionInterface (>= 4.48): "
                          "pip install 'posattn[hf]'") from e
    AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers: the models build their masks themselves
        pass
    else:
        AttentionMaskInterface.register(name, sdpa_mask)
    return name
