"""Hugging Face transformers integration (posattn/integrations/hf.py).

Small randomly initialised models built from their configs (no download, no
network), float32 on CPU: logits and every parameter gradient with
attn_implementation="posattn" against "eager". posattn runs on the reference
backend, or the Triton kernels under TRITON_INTERPRET=1. Skipped when
transformers is not installed (pip install -e ".[hf]").
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import posattn  # noqa: E402
from posattn.integrations import hf  # noqa: E402

N = 12


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """Register posattn and count the calls that reach posattn.attention."""
    hf.register()
    calls = []
    orig = posattn.attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return orig(*args, **kwargs)

    monkeypatch.setattr(posattn, "attention", counting)
    return calls


def _llama_config():
    return transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    num_hidden_layers=2, intermediate_size=128, vocab_size=100,
                                    max_position_embeddings=64)


def _t5_config():
    return transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                 num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=16, dropout_rate=0.0)


def _build(cls, config, impl):
    torch.manual_seed(0)  # the same weights for every implementation
    model = cls._from_config(config, attn_implementation=impl).float()
    assert model.config._attn_implementation == impl
    return model.train()


def _run(cls, config, impl, inputs, keep=None):
    """Logits and the gradients of a loss over the kept positions."""
    model = _build(cls, config, impl)
    logits = model(**inputs).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    if keep is not None:
        w = w * keep[..., None]
    (logits * w).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _compare(cls, config, inputs, keep=None):
    l1, g1 = _run(cls, config, "eager", inputs, keep)
    l2, g2 = _run(cls, config, "posattn", inputs, keep)
    if keep is not None:
        l1, l2 = l1[keep.bool()], l2[keep.bool()]
    torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-5)
    assert g1.keys() == g2.keys() and g1
    for name in g1:  # fp32 sums over every (query, key) pair in another order: atol 1e-4
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_llama_gqa_causal(registered):
    """GQA (4 query heads, 2 k/v heads), no padding: the mask is None and posattn runs
    causal=True with the k/v heads as they are, and q, k unrotated: RoPE fused at the
    model's positions (training with the default use_cache: an empty cache, given the
    rotated keys eager would store)."""
    ids = torch.randint(0, 100, (2, N))
    _compare(transformers.LlamaForCausalLM, _llama_config(), dict(input_ids=ids))
    assert len(registered) == 2 * 1 and all(c["causal"] and c["bias"] is None for c in registered)
    assert all(isinstance(c["rope"], posattn.RoPE) for c in registered)


@pytest.mark.parametrize("rope_parameters", [
    dict(rope_type="yarn", rope_theta=500.0, factor=4.0, original_max_position_embeddings=16),
    dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8),
    dict(rope_type="dynamic", rope_theta=500.0, factor=2.0),
    dict(rope_type="longrope", rope_theta=500.0, short_factor=[1.0 + i / 8 for i in range(8)],
         long_factor=[2.0 + i for i in range(8)], original_max_position_embeddings=8)],
    ids=["yarn", "llama3", "dynamic", "longrope"])
def test_llama_fused_rope_types(registered, rope_parameters):
    """HF's scaled RoPE fused in the kernels (YaRN: an attention factor != 1; dynamic NTK
    and LongRoPE: inv_freq updated for a sequence past the original length, read as
    used), with left padding and no cache: logits and every gradient equal eager's."""
    config = _llama_config()
    config.rope_parameters = rope_parameters
    config.max_position_embeddings = 8 if rope_parameters["rope_type"] == "dynamic" else 64
    ids = torch.randint(0, 100, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[0, :3] = 0
    _compare(transformers.LlamaForCausalLM, config, dict(input_ids=ids, attention_mask=mask, use_cache=False),
             keep=mask)
    assert registered and all(c["rope"] is not None for c in registered)
    if rope_parameters["rope_type"] == "yarn":
        assert all(c["rope"].attention_factor > 1 for c in registered)


@pytest.mark.parametrize("family", ["Mistral", "Qwen2", "Qwen3"])
def test_llama_family_fused_rope(registered, family):
    """Mistral and Qwen2 (biased projections), Qwen3 (per-head q / k norms before RoPE):
    fused RoPE, left padding; logits and every gradient equal eager's."""
    kw = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    config = getattr(transformers, f"{family}Config")(**kw, **({"head_dim": 16} if family == "Qwen3" else {}))
    ids = torch.randint(0, 100, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :2] = 0
    _compare(getattr(transformers, f"{family}ForCausalLM"), config, dict(input_ids=ids, attention_mask=mask),
             keep=mask)
    assert registered and all(c["rope"] is not None for c in registered)


def test_qwen2_vl_text_model_fused_mrope(registered):
    """Qwen2-VL's language model at 3-D M-RoPE positions (text, a 2 x 3 image grid, text:
    as get_rope_index lays them out): the positions reach the kernels as multi-axis
    RoPE (mrope_section as sections); last hidden states and every gradient equal
    eager's."""
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel
    config = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                               num_hidden_layers=2, vocab_size=100, max_position_embeddings=64,
                               rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]))
    t = torch.tensor([0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8])               # text, image (t, h, w), text
    h = torch.tensor([0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8])
    w = torch.tensor([0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8])
    pos = torch.stack((t, h, w))[:, None].expand(3, 2, N)
    ids = torch.randint(0, 100, (2, N))
    results = []
    for impl in ("eager", "posattn"):
        model = _build(Qwen2VLTextModel, config, impl)
        out = model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        out.pow(2).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-5)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert registered and all(c["rope"].sections == (2, 3, 3) for c in registered)
    assert torch.equal(registered[0]["rope_pos"][0][0], torch.stack((t, h, w)))


def test_fused_encodings_can_be_switched_off(registered):
    """register(name, fused_encodings=False): the model rotates q and k itself (no rope=
    reaches posattn), with the same logits."""
    name = hf.register("posattn_unfused", fused_encodings=False)
    ids = torch.randint(0, 100, (1, N))
    logits = []
    for impl in ("posattn", name):
        model = _build(transformers.LlamaForCausalLM, _llama_config(), impl)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert [c.get("rope") is not None for c in registered] == [True] * 2 + [False] * 2
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def _greedy_tokens(cls, config, impls=("eager", "posattn"), **inputs):
    """Greedy generate() of six tokens with a KV cache, per attention implementation."""
    tokens = []
    for impl in impls:
        model = _build(cls, config, impl).eval()
        tokens.append(model.generate(**inputs, max_new_tokens=6, do_sample=False))
    return tokens


def test_llama_greedy_generate_with_cache(registered):
    """generate() with a KV cache: the prompt (left-padded) through fused RoPE into an
    empty cache, then each step decoding from the cache as the model does; the same
    tokens as eager."""
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    tokens = _greedy_tokens(transformers.LlamaForCausalLM, _llama_config(), input_ids=ids, attention_mask=mask,
                            pad_token_id=0)
    assert torch.equal(tokens[1], tokens[0])
    assert registered[0]["rope"] is not None and registered[-1].get("rope") is None   # prefill fused, steps not


def test_llama_left_padding(registered):
    """A padding mask: SDPA's bool keep-mask [B, 1, Nq, Nk] as posattn's bias. Padded
    query rows that see no key are not compared (posattn gives zeros there, eager an
    average): the loss only reads real positions."""
    ids = torch.randint(0, 100, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :4] = 0
    _compare(transformers.LlamaForCausalLM, _llama_config(), dict(input_ids=ids, attention_mask=mask), keep=mask)
    assert registered and all(c["bias"] is not None and c["bias"].dtype == torch.bool for c in registered)


def test_t5_relative_bias_and_padding(registered):
    """T5: the relative-position bias runs in the kernels as DistanceBias.t5 built from
    each stack's relative_attention_bias (its gradient reaching the weight), no dense
    position_bias and no dense zeros for cross-attention; scale 1, a padded encoder, a
    causal decoder and cross-attention."""
    ids = torch.randint(0, 100, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[0, 9:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.randint(0, 100, (2, N - 2)))
    _compare(transformers.T5ForConditionalGeneration, _t5_config(), inputs)
    assert len(registered) == 2 + 2 * 2  # encoder self, decoder self and cross, per layer
    assert all(c["scale"] == 1.0 for c in registered)
    assert all(c["bias"] is None or c["bias"].dtype == torch.bool for c in registered)   # masks only
    tables = [c.get("rel_bias") for c in registered]
    assert sum(t is not None for t in tables) == 4                          # the self-attention calls
    assert (tables[0].left, tables[0].right, tables[2].left, tables[2].right) == (16, 16, 16, 0)


def test_t5_reentrant_checkpointing(registered):
    """Reentrant gradient checkpointing recomputes each layer with the stack's position
    bias object: every layer's share of the relative_attention_bias gradient arrives."""
    ids = torch.randint(0, 100, (2, N))
    inputs = dict(input_ids=ids, decoder_input_ids=torch.randint(0, 100, (2, N - 2)))
    grads = []
    for impl in ("eager", "posattn"):
        model = _build(transformers.T5ForConditionalGeneration, _t5_config(), impl)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model(**inputs, use_cache=False).logits.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "relative_attention_bias" in n})
    assert len(grads[0]) == 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_register_without_fused_encodings_turns_them_off(registered):
    """register(name, fused_encodings=False) after register(name): the models of that name
    rotate q and k themselves again."""
    name = hf.register("posattn_toggle")
    hf.register("posattn_toggle", fused_encodings=False)
    model = _build(transformers.LlamaForCausalLM, _llama_config(), name)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 8)))
    assert registered and all(c.get("rope") is None for c in registered)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dense"])
def test_t5_greedy_generate_with_cache(registered, fused):
    """T5 generate() with the encoder-decoder cache: each decoding step's relative bias
    at its offset (fused) or the dense bias (fused_encodings=False); the same tokens as
    eager."""
    name = hf.register() if fused else hf.register("posattn_unfused", fused_encodings=False)
    ids = torch.randint(3, 100, (2, 9))
    tokens = _greedy_tokens(transformers.T5ForConditionalGeneration, _t5_config(), ("eager", name), input_ids=ids,
                            decoder_start_token_id=0)
    assert torch.equal(tokens[1], tokens[0])
    dense = [c["bias"] is not None and c["bias"].is_floating_point() for c in registered]
    tables = [c.get("rel_bias") is not None for c in registered]
    assert (not any(dense) and any(tables)) if fused else (any(dense) and not any(tables))


def test_llama_compiled_fullgraph(registered):
    """torch.compile(fullgraph=True) of a LLaMA forward+backward with posattn: no graph
    break (the custom operators under TRITON_INTERPRET=1, plain PyTorch on the
    reference backend), same loss and gradients as eager posattn."""
    model = _build(transformers.LlamaForCausalLM, _llama_config(), "posattn")
    ids = torch.randint(0, 100, (2, N))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(ids):
        return model(input_ids=ids).logits.pow(2).mean()

    l1 = loss(ids)
    g1 = torch.autograd.grad(l1, params)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    l2 = compiled(ids)
    g2 = torch.autograd.grad(l2, params)
    torch._dynamo.reset()
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _bloom_config():
    return transformers.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4,
                                    attention_dropout=0.0, hidden_dropout=0.0)


def test_bloom_alibi(registered):
    """BLOOM computes attention itself (no AttentionInterface); register() routes its
    modules through posattn's fused ALiBi (slopes from posattn.alibi_slopes,
    BLOOM's positions), no padding: logits and every gradient equal eager's."""
    ids = torch.randint(0, 100, (2, N))
    _compare(transformers.BloomForCausalLM, _bloom_config(), dict(input_ids=ids))
    assert len(registered) == 2 and all(c["causal"] and c["alibi_slopes"] is not None for c in registered)


def test_bloom_left_padding(registered):
    """Left padding: BLOOM counts positions over real tokens only; the keep-mask is
    the dense mask and those positions go to posattn as q_pos / k_pos."""
    ids = torch.randint(0, 100, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[0, :5] = 0
    _compare(transformers.BloomForCausalLM, _bloom_config(), dict(input_ids=ids, attention_mask=mask), keep=mask)
    assert registered and all(c["k_pos"] is not None for c in registered)


def test_bloom_greedy_generate_with_cache(registered):
    """BLOOM generate() with a KV cache and left padding: fused ALiBi at BLOOM's
    positions for the prompt and every one-query step (the decoding kernels); the same
    tokens as eager."""
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    tokens = _greedy_tokens(transformers.BloomForCausalLM, _bloom_config(), input_ids=ids, attention_mask=mask,
                            pad_token_id=0)
    assert torch.equal(tokens[1], tokens[0])
    assert any(c["k_pos"] is not None and c["k_pos"].shape[-1] > c["q_pos"].shape[-1] == 1 for c in registered)


def test_bloom_eager_models_untouched(registered):
    """Routing is per model: a BLOOM built with "eager" never calls posattn."""
    model = _build(transformers.BloomForCausalLM, _bloom_config(), "eager")
    model(input_ids=torch.randint(0, 100, (1, 8)))
    assert registered == []


def test_refusals():
    """What posattn cannot do is an error, not a silent difference."""
    q = torch.randn(1, 2, 4, 8)

    class Module(torch.nn.Module):
        is_causal = True

    m = Module()
    out, weights = hf.attention_forward(m.eval(), q, q, q, None)
    assert out.shape == (1, 4, 2, 8) and weights is None
    with pytest.raises(ValueError, match="dropout_p"):
        hf.attention_forward(m, q, q, q, None, dropout=1.5)
    with pytest.raises(ValueError, match="softcap"):
        hf.attention_forward(m, q, q, q, None, softcap=-1.0)
    with pytest.raises(ValueError, match="sinks"):
        hf.attention_forward(m, q, q, q, None, s_aux=torch.zeros(3))


def test_gemma2_softcap(registered):
    """Gemma 2: logit soft-capping (a small cap, so that tanh is far from linear), its
    query_pre_attn_scalar scaling and sliding-window layers: fused softcap=."""
    config = transformers.Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                                       final_logit_softcapping=None, sliding_window=5,
                                       max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, N))
    _compare(transformers.Gemma2ForCausalLM, config, dict(input_ids=ids))
    assert registered and all(c["softcap"] == 2.0 for c in registered)


def test_gpt_oss_sinks(registered):
    """gpt-oss: a learned sink logit per head (s_aux) in the softmax denominator, with
    its gradient, and left padding."""
    config = transformers.GptOssConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                                       max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :3] = 0
    _compare(transformers.GptOssForCausalLM, config, dict(input_ids=ids, attention_mask=mask), keep=mask)
    assert registered and all(c["sinks"] is not None for c in registered)


def test_mask_and_position_bias_combined():
    """A bool mask with a position bias: -inf where masked, the bias elsewhere (as the
    mask alone would mask), against eager's formula on the kept entries."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    pb = torch.randn(1, 2, 5, 5, requires_grad=True)
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False

    class Module(torch.nn.Module):
        is_causal = False

    out, _ = hf.attention_forward(Module(), q, k, v, keep, scaling=1.0, position_bias=pb)
    scores = q @ k.transpose(-1, -2) + pb
    ref = (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_t5_attention_dropout_in_training(registered):
    """T5 trains with dropout_rate > 0 on posattn (attention dropout in the kernels):
    the same seed gives the same logits and gradients; over seeds, the mean logits
    agree with eager's at the same rate (z-scores of the difference of the means)."""
    config = _t5_config()
    config.dropout_rate, config.num_layers, config.num_decoder_layers = 0.2, 1, 1
    ids = torch.randint(0, 100, (1, 8))
    labels = torch.randint(0, 100, (1, 6))
    inputs = dict(input_ids=ids, decoder_input_ids=labels)
    models = {impl: _build(transformers.T5ForConditionalGeneration, config, impl) for impl in ("eager", "posattn")}

    def logits(impl, seed, grads=False):
        torch.manual_seed(seed)
        model = models[impl]
        model.zero_grad()
        out = model(**inputs).logits
        if not grads:
            return out.detach()
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    a, b = logits("posattn", 3, True), logits("posattn", 3, True)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert any(c["dropout_p"] == 0.2 for c in registered)
    n = 10
    s = {impl: torch.stack([logits(impl, 100 + i) for i in range(n)]) for impl in models}
    se = ((s["eager"].var(0) + s["posattn"].var(0)) / n).sqrt()
    z = (s["eager"].mean(0) - s["posattn"].mean(0)) / se
    assert z.abs().mean() < 1.3 and z.abs().max() < 8, (z.abs().mean(), z.abs().max())   # t tails, n = 10


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_llama_padding_free_packed_row(registered, monkeypatch, flash_kwargs):
    """A padding-free batch (DataCollatorWithFlattening: one row, position_ids restarting
    per sequence, optionally the cu_seq_lens_* / max_length_* keywords) runs
    posattn.attention_varlen with no [N, N] mask; logits and every gradient equal
    eager's on the same packed row (eager masks each sequence off the others)."""
    varlen_calls = []
    orig = posattn.attention_varlen

    def counting(*args, **kwargs):
        varlen_calls.append(args[3])
        return orig(*args, **kwargs)

    monkeypatch.setattr(posattn, "attention_varlen", counting)
    lens = [5, 9, 6]
    ids = torch.randint(0, 100, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    inputs = dict(input_ids=ids, position_ids=pos, use_cache=False)   # (a cache turns packing detection off)
    if flash_kwargs:
        cu = torch.tensor([0, 5, 14, 20], dtype=torch.int32)
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    _compare(transformers.LlamaForCausalLM, _llama_config(), inputs)
    assert len(varlen_calls) == 2 and registered == []        # every layer packed, no dense-mask call
    assert varlen_calls[0].tolist() == [0, 5, 14, 20]
