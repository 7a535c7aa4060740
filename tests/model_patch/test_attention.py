"""model_patch.attention: the policy attention against HF's GPT-NeoX attention."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.models.gpt_neox import modeling_gpt_neox as hf

from model_patch.attention import (apply_rotary, patch_attention, policy_attention, rotary_cos_sin,
                                   sequence_limit, split_heads)
from model_patch.policies import make_cache

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("shape", ["d16", "d80-seq", "d16-rot1"])
def test_rotary_matches_hf_exactly(shape, make_neox):
    model = make_neox(shape)
    rot = model.gpt_neox.rotary_emb
    positions = torch.tensor([0, 1, 7, 300, 511])
    x = torch.randn(1, 5, 8)
    cos_hf, sin_hf = rot(x, positions[None])
    cos, sin = rotary_cos_sin(rot.inv_freq, positions, rot.attention_scaling, x.dtype)
    assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)

    attn = model.gpt_neox.layers[0].attention
    H, D = model.config.num_attention_heads, attn.head_size
    qkv = torch.randn(2, 5, 3 * H * D)
    q_hf, k_hf, v_hf = qkv.view(2, 5, -1, 3 * D).transpose(1, 2).chunk(3, dim=-1)
    q, k, v = split_heads(qkv, H)
    assert torch.equal(q, q_hf) and torch.equal(k, k_hf) and torch.equal(v, v_hf)
    assert cos.shape[-1] == attn.rotary_ndims
    q_ref, k_ref = hf.apply_rotary_pos_emb(q_hf, k_hf, cos_hf, sin_hf)
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)


@pytest.mark.parametrize("kv", ["full", "h2o:64,64", "window:64"])
def test_prefill_then_decode_matches_hf_attention(kv, make_neox):
    # One attention layer: prompt of 6 through cache.prefill, then 4 single-token decodes,
    # against HF's attention over the same tokens with a DynamicCache.
    model = make_neox("d80-seq", layers=1)
    attn = model.gpt_neox.layers[0].attention
    rot = model.gpt_neox.rotary_emb
    B, T, N = 3, 6, 10
    h = torch.randn(B, N, model.config.hidden_size)
    cos_all, sin_all = rot(h, torch.arange(N)[None])
    ref_cache = DynamicCache(config=model.config)
    ref, _ = attn(h, None, layer_past=ref_cache, position_embeddings=(cos_all, sin_all))  # causal by sdpa
    cache = make_cache(kv, 1, B, model.config.num_attention_heads, attn.head_size, 16, h.dtype, "cpu")
    outs = [policy_attention(attn, h[:, :T], cos_all[:, :T], sin_all[:, :T], cache, 0, prefill=True)]
    cache.advance(T)
    for t in range(T, N):
        outs.append(policy_attention(attn, h[:, t:t + 1], cos_all[:, t:t + 1], sin_all[:, t:t + 1], cache, 0,
                                     prefill=False))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-5, atol=1e-5)


def test_decode_rejects_several_tokens(make_neox):
    model = make_neox(layers=1)
    attn = model.gpt_neox.layers[0].attention
    cache = make_cache("full", 1, 1, 4, 16, 8, torch.float32, "cpu")
    cos, sin = rotary_cos_sin(model.gpt_neox.rotary_emb.inv_freq, torch.arange(2), 1.0, torch.float32)
    with pytest.raises(ValueError, match="decode takes one token per row, got T=2"):
        policy_attention(attn, torch.randn(1, 2, 64), cos, sin, cache, 0, prefill=False)


def test_sequence_limit():
    full = make_cache("full", 1, 1, 2, 8, 32, torch.float32, "cpu")
    h2o = make_cache("h2o:4,4", 1, 1, 2, 8, 32, torch.float32, "cpu")
    clipped = make_cache("h2o:40,40", 1, 1, 2, 8, 32, torch.float32, "cpu")
    assert sequence_limit(full) == 32
    assert sequence_limit(h2o) is None  # budget + 1 slots: never full
    assert sequence_limit(clipped) == 32  # clipped to max_len below the budget


def test_patch_attention_is_idempotent_and_falls_back_to_hf(make_neox):
    model = make_neox()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        forward0 = model.gpt_neox.layers[0].attention.forward
        patch_attention(model)
        forward1 = model.gpt_neox.layers[0].attention.forward
        patch_attention(model)
        assert model.gpt_neox.layers[0].attention.forward == forward1 != forward0
        # no cache, and a DynamicCache in two steps: HF's own path, bit for bit
        assert torch.equal(model(ids).logits, before)
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :5], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), before, rtol=1e-5, atol=1e-5)


def test_patch_attention_rejects_other_models():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="patch_attention: model must be a GPT-NeoX causal LM"):
        patch_attention(gpt2)


def test_patched_model_still_compiles_fullgraph_with_hf_caches(make_neox):
    # The HF peer (StaticCache + torch.compile) must keep working on a patched model:
    # the drop-in forward may not break the graph. backend="eager": dynamo tracing only.
    from transformers import StaticCache

    model = patch_attention(make_neox())
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
        cache = StaticCache(config=model.config, max_cache_len=16)
        step = torch.compile(model, fullgraph=True, backend="eager")
        first = step(ids[:, :5], past_key_values=cache, use_cache=True).logits
        second = step(ids[:, 5:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), ref, rtol=1e-5, atol=1e-5)
