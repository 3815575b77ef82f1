"""posattn as a Hugging Face transformers attention implementation.

    import posattn.integrations.hf
    posattn.integrations.hf.register()          # once, before building the model
    model = AutoModelForCausalLM.from_config(config, attn_implementation="posattn")

``register()`` adds :func:`attention_forward` to transformers' ``AttentionInterface``
and, where transformers has one (>= 4.53), :func:`posattn_mask` to its
``AttentionMaskInterface`` under the same name: the model then hands the
attention function a bool keep-mask ``[B, 1, Nq, Nk]`` or ``None`` (no padding,
plain causal or full attention), exactly as it would to ``"sdpa"``, except for a
padding-free packed row (causal sequences packed end to end: ``position_ids``
restarting), which arrives as :class:`PackedSequences` and runs
``posattn.attention_varlen`` (as do the ``cu_seq_lens_q`` / ``cu_seq_lens_k``
keywords of ``DataCollatorWithFlattening``): no ``[N, N]`` mask.

What the attention function receives, and what it does with it:

- ``query`` ``[B, Hq, Nq, D]``, ``key`` / ``value`` ``[B, Hkv, Nk, D]``: GQA / MQA
  heads are passed through as they are (posattn shares the k/v heads itself, no
  ``repeat_kv``).
- **RoPE**: models rotate q and k in their attention module before calling the
  function. For LLaMA, Mistral, Qwen2, Qwen3 and Qwen2-VL, ``register()`` routes
  their rotary embedding (it returns :class:`RotaryPositions`: its cos / sin plus
  the positions, ``inv_freq``, attention scaling and M-RoPE sections) and their
  attention module (``_rope_attention_forward``: q, k, v projected, q and k passed
  unrotated with ``rope=`` / ``rope_pos=``), so RoPE runs fused in the kernels.
  Decoding from a filled cache, packed rows and ``output_attentions`` take the
  model's own forward (q and k rotated by the model).
- ``attention_mask``: a bool keep-mask or an additive float mask, passed as
  posattn's dense ``bias`` (broadcast, never expanded). ``None`` with a causal
  module (``module.is_causal``) and ``Nq > 1`` means ``causal=True``, like SDPA's
  ``is_causal`` (same alignment rules as transformers' SDPA path).
- ``position_bias`` (T5): with the routed T5 attention (``register()``), a
  :class:`T5PositionBias`: the layer's bucket table as ``DistanceBias.t5``, inside
  the kernels. Otherwise (other T5-style models, or ``fused_encodings=False``) the
  dense relative-position bias ``[1, H, Nq, Nk]``, added as posattn's dense ``bias``
  (combined with the mask as transformers' SDPA path does); its gradient reaches
  the bias table through autograd.
- ``scaling``: posattn's ``scale`` (T5 uses 1.0).
- ``softcap`` (Gemma 2) and ``s_aux`` (gpt-oss's attention sinks, ``[Hq]``):
  posattn's ``softcap=`` and ``sinks=``, fused in the kernels.

- ``dropout``: posattn's ``dropout_p`` (the models pass 0 outside training).

Refused with an error: paged caches.
``output_attentions`` is not supported (the weights are returned as ``None``).

BLOOM computes its attention itself (no AttentionInterface in transformers
5.x): ``register()`` routes the ``BloomAttention`` modules of models built with
``attn_implementation="posattn"`` through posattn's fused ALiBi instead
(``_bloom_attention_forward``). Other ALiBi families that bypass the interface
(Falcon with ``alibi=True``, MPT) are not routed. See README.
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


class PackedSequences:
    """What posattn's mask function hands the attention function for a padding-free
    batch (one row of causal sequences packed end to end, e.g. from
    DataCollatorWithFlattening): the sequences' boundaries, not a [N, N] mask."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int):
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen

    def __repr__(self):
        return f"PackedSequences({self.cu_seqlens.numel() - 1} sequences, longest {self.max_seqlen})"


def _packed_boundaries(q_length, mask_function, device):
    """If ``mask_function`` is causal attention within consecutive segments of one row
    (each row sees its predecessor unless it starts a segment, never its successor, and
    always its segment's first row), the segments' cu_seqlens (int32); else None. O(N)
    evaluations of the mask function (the masks transformers composes: causal, sliding
    window, chunks, packing), never the [N, N] mask."""
    if q_length < 2:
        return None
    i = torch.arange(1, q_length, device=device)
    zero = torch.zeros_like(i)
    with torch.no_grad():
        sees_prev = mask_function(zero, zero, i, i - 1)
        sees_next = mask_function(zero, zero, i - 1, i)
        if bool(sees_next.any()) or bool(sees_prev.all()):
            return None       # not causal, or a single segment (plain causal: no packing)
        starts = torch.cat((torch.zeros(1, dtype=torch.long, device=device), i[~sees_prev]))
        seg = torch.cumsum(torch.cat((torch.ones(1, dtype=torch.long, device=device), (~sees_prev).long())), 0) - 1
        rows = torch.arange(q_length, device=device)
        z = torch.zeros_like(rows)
        if not bool(mask_function(z, z, rows, starts[seg]).all()):
            return None       # a window or another mask inside the segments: keep the dense mask
        later = seg > 0       # nor may a row see the previous segment's last row
        if bool(mask_function(z[later], z[later], rows[later], starts[seg[later]] - 1).any()):
            return None
    return torch.cat((starts, torch.tensor([q_length], device=device))).to(torch.int32)


def posattn_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, allow_is_causal_skip=True, device="cpu", **kwargs):
    """transformers' mask interface for "posattn": SDPA's mask (a bool keep-mask, or None
    for plain causal / full attention), except for a padding-free packed row (batch 1,
    no padding mask, causal segments), which becomes :class:`PackedSequences`: the
    attention then runs posattn.attention_varlen, with no [N, N] mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    mask_function = mask_function or causal_mask_function
    if (batch_size == 1 and attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0
            and not allow_is_causal_skip and torch.device(device).type != "meta"):   # (meta: values unreadable)
        cu = _packed_boundaries(q_length, mask_function, device)
        if cu is not None:
            return PackedSequences(cu, int((cu[1:] - cu[:-1]).max()))
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=allow_is_causal_skip, device=device, **kwargs)


def _packed_from_kwargs(kwargs, q_len):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True)'s cu_seq_lens_q / _k."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or int(cu_q[-1]) != q_len:
        return None
    return cu_q.to(torch.int32), cu_k.to(torch.int32), kwargs.get("max_length_q"), kwargs.get("max_length_k")


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      position_bias=None, **kwargs):
    """transformers' attention-function signature: returns ``(out [B, Nq, Hq, D], None)``."""
    return _attend(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, **kwargs)


def _attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
            position_bias=None, rope=None, rope_pos=None, **kwargs):
    """attention_forward, and with ``rope`` / ``rope_pos`` q and k unrotated (the routed
    attention modules: _rope_attention_forward)."""
    fused = {}
    if isinstance(position_bias, T5PositionBias):   # T5's buckets as DistanceBias.t5 in the kernels
        fused = position_bias.attention_kwargs(query.shape[2], key.shape[2])
        position_bias = None
    if rope is not None:
        fused.update(rope=rope, rope_pos=rope_pos)
    packed = None
    if isinstance(attention_mask, PackedSequences):
        packed = (attention_mask.cu_seqlens, attention_mask.cu_seqlens, attention_mask.max_seqlen,
                  attention_mask.max_seqlen)
    elif (attention_mask is None and query.shape[0] == 1 and position_bias is None
          and getattr(module, "is_causal", True)):   # (a dense mask, e.g. a sliding window, is kept)
        packed = _packed_from_kwargs(kwargs, query.shape[2])
    if packed is not None:   # padding-free packed row: each sequence on its own, no [N, N] mask
        cu_q, cu_k, max_q, max_k = packed
        out = posattn.attention_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                       cu_q, cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, causal=True,
                                       scale=scaling, softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"),
                                       dropout_p=float(dropout or 0.0))
        return out[None].contiguous(), None
    if kwargs.get("cache") is not None:
        raise ValueError("posattn: paged attention caches are not supported")
    if kwargs.get("output_attentions", False):
        warnings.warn("posattn does not return attention weights (output_attentions=True): they are None",
                      stacklevel=2)

    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # transformers' SDPA rule: a None mask means causal only for more than one query
    # (one query attends to the whole cache), with SDPA's top-left alignment: keys
    # past Nq are empty static-cache slots then and are cut.
    causal = bool(causal) and attention_mask is None and q_len > 1
    if causal and kv_len > q_len and not fused:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]

    bias = _combine(attention_mask, position_bias)
    if bias is not None and bias.dtype != torch.bool and bias.dtype not in (query.dtype, torch.float32):
        bias = bias.to(query.dtype)
    # Gemma 2's logit soft-capping and gpt-oss's sinks (s_aux, [Hq]) are posattn's softcap= / sinks=
    # the models pass dropout=0.0 outside training (as to SDPA)
    out = posattn.attention(query, key, value, causal=causal, scale=scaling, bias=bias,
                            softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"), dropout_p=float(dropout or 0.0),
                            **fused)
    return out.transpose(1, 2).contiguous(), None


class T5PositionBias:
    """What a routed T5 attention module passes down its stack as ``position_bias``
    instead of the dense ``[1, H, Nq, Nk]`` tensor: the layer's
    ``relative_attention_bias`` weight and bucketing (posattn's DistanceBias.t5, in the
    kernels: O(N) memory, the gradient reaching the weight), or no bias at all (a
    layer without one: cross-attention, where eager adds zeros). ``past``: the cached
    keys before these queries (decoding)."""

    def __init__(self, weight=None, bidirectional=True, num_buckets=32, max_distance=128, past=0):
        self.weight, self.bidirectional, self.past = weight, bidirectional, past
        self.num_buckets, self.max_distance = num_buckets, max_distance

    @staticmethod
    def supported(num_buckets, max_distance, bidirectional):
        """DistanceBias.t5's condition: T5's buckets constant past max_distance."""
        return num_buckets >= 4 and max_distance > (num_buckets // 4 if bidirectional else num_buckets // 2)

    def attention_kwargs(self, q_len, kv_len):
        if self.weight is None:
            return {}
        # a [H, 2 max_distance + 1] gather per layer, in that layer's graph (shared, it would
        # miss the gradient of layers recomputed by reentrant checkpointing)
        kw = dict(rel_bias=posattn.DistanceBias.t5(self.weight, self.num_buckets, self.max_distance,
                                                   self.bidirectional))
        if not (isinstance(self.past, int) and self.past + q_len == kv_len):   # else posattn's default alignment
            dev = self.weight.device
            kw.update(q_pos=torch.arange(q_len, device=dev) + self.past, k_pos=torch.arange(kv_len, device=dev))
        return kw


def _fused_rope_classes():
    """(rotary embedding class, attention class) of each _FUSED_ROPE family this
    transformers has."""
    import importlib
    for model_type, (rotary_name, attention_name) in _FUSED_ROPE.items():
        try:
            mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
            yield getattr(mod, rotary_name), getattr(mod, attention_name)
        except (ImportError, AttributeError):
            continue


def _unroute(name):
    """Take ``name`` off the fused-encoding routes (register(name, fused_encodings=False))."""
    classes = [cls for pair in _fused_rope_classes() for cls in pair]
    try:
        from transformers.models.t5.modeling_t5 import T5Attention
        classes.append(T5Attention)
    except ImportError:
        pass
    for cls in classes:
        cls.__dict__.get("_posattn_routed", set()).discard(name)


def _route_t5(name):
    """T5 models built with attn_implementation=name: compute_bias returns a
    T5PositionBias, and a layer without a relative bias gets an empty one instead of
    eager's dense zeros."""
    try:
        from transformers.models.t5 import modeling_t5
    except ImportError:
        return
    cls = modeling_t5.T5Attention
    if "_posattn_routed" in cls.__dict__:
        cls._posattn_routed.add(name)
        return
    routed = {name}
    compute_bias, forward = cls.compute_bias, cls.forward

    def routed_compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
        bidirectional = not self.is_decoder
        if _ours(self, routed) and T5PositionBias.supported(self.relative_attention_num_buckets,
                                                            self.relative_attention_max_distance, bidirectional):
            return T5PositionBias(self.relative_attention_bias.weight, bidirectional,
                                  self.relative_attention_num_buckets, self.relative_attention_max_distance,
                                  past_seen_tokens)
        return compute_bias(self, query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)

    def routed_forward(self, *args, **kwargs):
        if (_ours(self, routed) and not self.has_relative_attention_bias and len(args) < 4
                and kwargs.get("position_bias") is None):
            kwargs["position_bias"] = T5PositionBias()
        return forward(self, *args, **kwargs)

    cls.compute_bias, cls.forward, cls._posattn_routed = routed_compute_bias, routed_forward, routed


class RotaryPositions(tuple):
    """What a routed rotary embedding returns: its ``(cos, sin)`` as before (so any code
    unpacking them is unchanged), carrying what posattn's fused RoPE needs: the
    positions it was called with (``[B, N]``, or M-RoPE's ``[3, B, N]``), its
    ``inv_freq`` and ``attention_scaling`` as they were used (after any dynamic update)
    and Qwen2-VL's ``mrope_section``."""

    def __new__(cls, cos, sin, position_ids, inv_freq, attention_scaling, sections):
        t = super().__new__(cls, (cos, sin))
        t.position_ids, t.inv_freq, t.attention_scaling, t.sections = position_ids, inv_freq, attention_scaling, sections
        return t


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope_attention_forward(module, hidden_states, position_embeddings, attention_mask, cache, kwargs):
    """A LLaMA-family attention module's forward with q and k reaching posattn unrotated,
    rotated inside the kernels at the model's positions (its inv_freq, attention
    scaling and M-RoPE sections); None where this route does not apply (the module's
    own forward then runs: q and k rotated by the model, e.g. when decoding from a
    filled cache, for packed rows, or attention weights requested)."""
    rp = position_embeddings
    if (not isinstance(rp, RotaryPositions) or isinstance(attention_mask, PackedSequences)
            or kwargs.get("cu_seq_lens_q") is not None or kwargs.get("output_attentions")):
        return None
    if cache is not None and not (type(cache).__name__ == "DynamicCache"
                                  and cache.get_seq_length(module.layer_idx) == 0):
        return None   # keys already cached (rotated): decode as the model does
    batch, n, _ = hidden_states.shape
    pos = rp.position_ids
    if rp.sections is not None:   # M-RoPE: [3, B, N] (text-only calls may pass [B, N])
        if len(rp.sections) != 3:
            return None
        pos = (pos.expand(3, -1, -1) if pos.dim() == 2 else pos).transpose(0, 1)   # [B, 3, N]
    else:
        pos = pos[:, None]                                                       # [B, 1, N]
    if pos.shape[-1] != n or 2 * rp.inv_freq.numel() != module.head_dim:
        return None
    shape = (batch, n, -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape)
    k = module.k_proj(hidden_states).view(shape)
    v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    if getattr(module, "q_norm", None) is not None:   # Qwen3: per-head norms before RoPE
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cache is not None:   # an empty cache (prefill, or training with use_cache): it stores rotated keys
        cos, sin = rp
        cache.update(k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1), v, module.layer_idx, kwargs=kwargs)
    rope = posattn.RoPE(rp.inv_freq.detach().to(torch.float32), attention_factor=float(rp.attention_scaling),
                        sections=None if rp.sections is None else tuple(int(x) for x in rp.sections))
    kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ not in ("position_ids", "sliding_window", "use_cache")}
    out, _ = _attend(module, q, k, v, attention_mask, dropout=module.attention_dropout if module.training else 0.0,
                     scaling=module.scaling, rope=rope, rope_pos=(pos, pos), **kwargs)
    return module.o_proj(out.reshape(batch, n, -1).contiguous()), None


# model type -> (rotary embedding class, attention class): the families whose attention
# projects q, k, v (Qwen3: then a per-head norm), rotates q and k with rotate_half by the
# model's rotary embedding over the whole head, and calls the attention interface.
_FUSED_ROPE = {"llama": ("LlamaRotaryEmbedding", "LlamaAttention"),
               "mistral": ("MistralRotaryEmbedding", "MistralAttention"),
               "qwen2": ("Qwen2RotaryEmbedding", "Qwen2Attention"),
               "qwen3": ("Qwen3RotaryEmbedding", "Qwen3Attention"),
               "qwen2_vl": ("Qwen2VLRotaryEmbedding", "Qwen2VLAttention")}


def _route_rope(name):
    """Route the rotary embeddings and attention modules of the _FUSED_ROPE families,
    for models built with attn_implementation=name only (others are untouched)."""
    for rotary, attention in _fused_rope_classes():
        for cls, make in ((rotary, _routed_rotary), (attention, _routed_attention)):
            if getattr(cls, "_posattn_routed", None) is not None:
                if "_posattn_routed" in cls.__dict__:
                    cls._posattn_routed.add(name)
                    continue
            routed = {name}
            cls.forward = make(cls.forward, routed)
            cls._posattn_routed = routed


def _ours(module, routed):
    return getattr(getattr(module, "config", None), "_attn_implementation", None) in routed


def _routed_rotary(forward, routed):
    def rotary_forward(self, x, position_ids, *args, **kwargs):
        cos, sin = forward(self, x, position_ids, *args, **kwargs)
        if args or kwargs or not _ours(self, routed):
            return cos, sin
        return RotaryPositions(cos, sin, position_ids, self.inv_freq, self.attention_scaling,
                               getattr(self, "mrope_section", None))
    return rotary_forward


def _routed_attention(forward, routed):
    def attention_forward_(self, *args, **kwargs):
        if not args and _ours(self, routed):   # (the decoder layers pass every argument by keyword)
            rest = dict(kwargs)
            hidden = rest.pop("hidden_states", None)
            pe = rest.pop("position_embeddings", None)
            mask = rest.pop("attention_mask", None)
            cache = rest.pop("cache", None)
            if cache is None:
                cache = rest.pop("past_key_values", None)
            if hidden is not None:
                out = _rope_attention_forward(self, hidden, pe, mask, cache, rest)
                if out is not None:
                    return out
        if isinstance(kwargs.get("position_embeddings"), RotaryPositions):
            kwargs["position_embeddings"] = tuple(kwargs["position_embeddings"])
        return forward(self, *args, **kwargs)
    return attention_forward_


def _bloom_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                             use_cache=False, output_attentions=False, **kwargs):
    """BloomAttention.forward through posattn: BLOOM computes its attention itself
    (no AttentionInterface), so register() routes its modules here when their
    model was built with attn_implementation="posattn".

    BLOOM adds ``slope * k_pos`` (positions counted over real tokens) to every row;
    under its causal mask that equals ALiBi's ``-slope * |k_pos - q_pos|`` plus a
    per-row constant, which softmax ignores: posattn's fused ALiBi with those
    positions, the mask as the dense keep-mask, no [N, N] bias."""
    from transformers.models.bloom.modeling_bloom import dropout_add

    if output_attentions:
        warnings.warn("posattn does not return attention weights (output_attentions=True): they are None",
                      stacklevel=2)
    batch, q_len, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    kv_len = key.shape[2]
    slopes = posattn.alibi_slopes(self.num_heads, device=query.device)   # BLOOM's list (tested)
    if attention_mask is None:  # no padding: positions 0..Nk-1, queries last
        kw = dict(causal=True)
    else:
        keep = attention_mask if attention_mask.dtype == torch.bool else \
            attention_mask > torch.finfo(attention_mask.dtype).min / 2
        real = keep.expand(batch, 1, q_len, kv_len)[:, 0, -1].long()         # the last query sees every real key
        k_pos = (real.cumsum(-1) - 1) * real                                  # BLOOM's build_alibi_tensor
        kw = dict(bias=attention_mask, q_pos=k_pos[:, kv_len - q_len:], k_pos=k_pos)
    out = posattn.attention(query, key, value, scale=self.inv_norm_factor, alibi_slopes=slopes,
                            dropout_p=self.attention_dropout.p if self.training else 0.0, **kw)
    context = out.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
    return dropout_add(self.dense(context), residual, self.hidden_dropout, self.training), None


def _route_bloom(name):
    """Make BloomAttention modules of models built with attn_implementation=name run
    through posattn (they keep their config; others are untouched)."""
    try:
        from transformers.models.bloom import modeling_bloom
    except ImportError:
        return
    cls = modeling_bloom.BloomAttention
    if getattr(cls, "_posattn_routed", None) is not None:
        cls._posattn_routed.add(name)
        return
    init, forward = cls.__init__, cls.forward

    def __init__(self, config, *args, **kwargs):
        init(self, config, *args, **kwargs)
        self._posattn_config = config

    def routed_forward(self, *args, **kwargs):
        config = getattr(self, "_posattn_config", None)
        if config is not None and getattr(config, "_attn_implementation", None) in cls._posattn_routed:
            return _bloom_attention_forward(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    cls.__init__, cls.forward, cls._posattn_routed = __init__, routed_forward, {name}


def register(name: str = NAME, *, fused_encodings: bool = True) -> str:
    """Register posattn with transformers under ``name`` (default ``"posattn"``);
    returns the name to pass as ``attn_implementation``. Idempotent.

    ``fused_encodings``: in models built with ``attn_implementation=name``,
    - LLaMA, Mistral, Qwen2, Qwen3 and Qwen2-VL hand posattn q and k unrotated and
      RoPE runs inside the kernels at the model's positions (Qwen2-VL's M-RoPE as
      multi-axis RoPE), except when decoding from a filled KV cache, for packed rows
      and with attention weights requested (the model rotates q and k then);
    - T5's relative attention bias runs inside the kernels as DistanceBias.t5 (no
      dense ``position_bias``, no dense zeros for cross-attention).
    False: the models compute both themselves, as with SDPA (register a second name
    to compare)."""
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("posattn.integrations.hf needs transformers with AttentionInterface (>= 4.48): "
                          "pip install 'posattn[hf]'") from e
    AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401 (availability)
    except ImportError:  # older transformers: the models build their masks themselves
        pass
    else:
        AttentionMaskInterface.register(name, posattn_mask)
    _route_bloom(name)
    if fused_encodings:
        _route_rope(name)
        _route_t5(name)
    else:
        _unroute(name)
    return name
