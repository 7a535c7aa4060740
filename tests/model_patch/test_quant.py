"""model_patch.quant: W8A16Linear / W8A16MLP, quantize_model, and the accuracy of the result."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from model_patch import W8A16Linear, W8A16MLP, is_quantized, load_model, quantize_model
from w8a16_ops import dequantize_per_channel


def tiny_config(**kw) -> GPTNeoXConfig:
    base = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                max_position_embeddings=128, hidden_act="gelu", tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    base.update(kw)
    return GPTNeoXConfig(**base)


def tiny_model(dtype=torch.float32, **kw) -> GPTNeoXForCausalLM:
    model = GPTNeoXForCausalLM(tiny_config(**kw)).eval().to(dtype)
    with torch.no_grad():  # HF zeroes biases; random ones make bias bugs visible
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("N,K", [(24, 40), (96, 64), (7, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dequantized_reference(N, K, bias):
    lin = nn.Linear(K, N, bias=bias)
    q = W8A16Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (N, K) and q.weight.is_contiguous()
    assert q.scales.dtype == torch.float32 and q.scales.shape == (N,)
    assert (q.bias is None) == (not bias)
    x = torch.randn(3, 5, K)
    ref = F.linear(x, dequantize_per_channel(q.weight, q.scales), lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    # The quantization error itself is small compared with the output.
    err = (q(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert 0 < err < 0.02


def test_linear_half_keeps_fp32_scales_exactly():
    lin = nn.Linear(48, 32).half()
    q = W8A16Linear.from_linear(lin)
    scales = q.scales.clone()
    q.half()
    assert q.scales.dtype == torch.float32 and torch.equal(q.scales, scales)
    assert q.bias.dtype == torch.float16 and q.weight.dtype == torch.int8
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float32 and torch.equal(q.scales, scales) and q.bias.dtype == torch.bfloat16
    assert "in_features=48, out_features=32, bias=True, weight=int8, scales=float32" in repr(q)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match=r"W8A16Linear.from_linear: linear must be an nn.Linear, got Conv1d"):
        W8A16Linear.from_linear(nn.Conv1d(2, 2, 1))


def test_mlp_matches_dequantized_reference():
    model = tiny_model()
    mlp = model.gpt_neox.layers[0].mlp
    qmlp = W8A16MLP(W8A16Linear.from_linear(mlp.dense_h_to_4h), W8A16Linear.from_linear(mlp.dense_4h_to_h))
    x = torch.randn(2, 9, 64)
    up, down = qmlp.dense_h_to_4h, qmlp.dense_4h_to_h
    h = F.gelu(F.linear(x, dequantize_per_channel(up.weight, up.scales), up.bias))
    ref = F.linear(h, dequantize_per_channel(down.weight, down.scales), down.bias)
    torch.testing.assert_close(qmlp(x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(qmlp(x), down(up(x)))  # the GeLU is really applied


def test_quantize_model_swaps_every_linear_and_keeps_names():
    model = tiny_model()
    ref_keys = set(model.state_dict())
    quantize_model(model)
    assert is_quantized(model)
    for layer in model.gpt_neox.layers:
        assert isinstance(layer.attention.query_key_value, W8A16Linear)
        assert isinstance(layer.attention.dense, W8A16Linear)
        assert isinstance(layer.mlp, W8A16MLP)
    assert isinstance(model.get_output_embeddings(), nn.Linear)
    keys = set(model.state_dict())
    scales = {k for k in keys if k.endswith(".scales")}
    assert len(scales) == 2 * 4
    assert keys - scales == ref_keys  # same HF names; only the scales are new
    assert "gpt_neox.layers.1.mlp.dense_h_to_4h.scales" in scales


def test_quantize_model_lm_head():
    model = quantize_model(tiny_model(), lm_head=True)
    head = model.get_output_embeddings()
    assert isinstance(head, W8A16Linear) and head.bias is None and head.out_features == 96


def test_quantize_model_twice_is_refused():
    model = quantize_model(tiny_model())
    with pytest.raises(ValueError, match=r"quantize_model: model is already quantized \(8 W8A16Linear"):
        quantize_model(model, lm_head=True)


def test_non_gelu_activation_is_refused():
    with pytest.raises(ValueError, match=r"hidden_act must be 'gelu' .*got 'gelu_new'"):
        quantize_model(tiny_model(hidden_act="gelu_new"))


def test_non_gpt_neox_model_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match=r"quantize_model: model must be a GPT-NeoX causal LM.*GPT2LMHeadModel "
                                         r"with model_type 'gpt2'"):
        quantize_model(gpt2)


def test_patched_forward_close_to_float():
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 17))
    ref = model(ids).logits
    out = quantize_model(model, lm_head=True)(ids).logits
    assert not torch.equal(out, ref)  # something really changed
    torch.testing.assert_close(out, ref, rtol=0, atol=0.05 * ref.abs().max().item())


@pytest.mark.parametrize("B", [1, 2, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_random_patched(cache, dtype, B):
    model, _ = load_model("random:pythia-14m", dtype=dtype)
    quantize_model(model, lm_head=True)
    ids = torch.randint(2, 50000, (B, 6))
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=0, **kw)
    assert out.shape == (B, 11) and torch.equal(out[:, :6], ids)


def _static_cache_steps(model, ids, n_steps, step_fn, feed=None):
    """Eager prefill of ids [B, T] into a fresh StaticCache, then n_steps decode steps through
    step_fn (the model or a compiled model), greedy or feeding feed [B, n_steps]; returns the
    step logits [n, B, V]."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + n_steps + 1)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        logits = []
        for _ in range(n_steps):
            lg = step_fn(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].float().clone()
            logits.append(lg)
            tok = lg.argmax(-1, keepdim=True) if feed is None else feed[:, len(logits) - 1:len(logits)]
    return torch.stack(logits)


@pytest.mark.parametrize("B", [1, 16])
def test_compiled_static_cache_decode_step_has_no_graph_breaks(B):
    # What `torch.compile(model)` + generate(cache_implementation="static") runs per token, on a
    # patched model: fullgraph=True raises on any graph break; the logits match eager's.
    torch._dynamo.reset()
    model, _ = load_model("random:pythia-14m", dtype=torch.float32)
    quantize_model(model, lm_head=True)
    ids = torch.randint(2, 50000, (B, 5))
    ref = _static_cache_steps(model, ids, 3, model)
    step = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = _static_cache_steps(model, ids, 3, step)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_reduce_overhead_compile_of_patched_model(B):
    # torch.compile(model, mode="reduce-overhead") on a patched fp16 model with a static cache:
    # one graph (fullgraph=True), replayed as a CUDA graph (no cudagraph skips), logits = eager's
    # (teacher-forced: fused and unfused fp16 kernels round differently, so greedy tokens could
    # part at a near-tie of the random model).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, _ = load_model("random:pythia-70m", dtype=torch.float16, device="cuda")
    quantize_model(model, lm_head=True)
    ids = torch.randint(2, 50000, (B, 7), device="cuda")
    feed = torch.randint(2, 50000, (B, 6), device="cuda")
    ref = _static_cache_steps(model, ids, 6, model, feed)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    skips = counters["inductor"]["cudagraph_skips"]

    def step(**kw):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(**kw)

    out = _static_cache_steps(model, ids, 6, step, feed)
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs (see its log)"
    torch.testing.assert_close(out, ref, rtol=0, atol=0.05 * ref.abs().max().item())


@functools.lru_cache(maxsize=1)
def _load_fp32(path: str):
    return load_model(path, dtype=torch.float32)  # shared by the tests below; they quantize copies


@pytest.fixture
def tiny_neox_fp32(tiny_neox_path):
    return _load_fp32(str(tiny_neox_path))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_unpatched_greedy(tiny_neox_fp32, cache):
    model, tok = tiny_neox_fp32
    rows = [tok(t).input_ids for t in ("The old man looked at the sea and said to the boy",
                                        "It was late in the evening when the doctor came home")]
    n = min(map(len, rows))
    ids = torch.tensor([r[:n] for r in rows])  # [2, n], no padding needed
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    kw.update(attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=8, do_sample=False)
    ref = model.generate(ids, **kw)
    qmodel = quantize_model(copy.deepcopy(model))
    out = qmodel.generate(ids, **kw)
    assert out.shape == ref.shape == (2, ids.shape[1] + 8)
    assert torch.equal(out, ref), (out[:, ids.shape[1]:].tolist(), ref[:, ids.shape[1]:].tolist())


def _wikitext_window(tok, path, n=2049) -> torch.Tensor:
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read(40_000)  # a prefix long enough for n tokens; only its first n tokens are used
    ids = tok(text, return_tensors="pt").input_ids[0]
    assert ids.numel() > n + 100, ids.numel()
    return ids[:n]


def _ppl_and_top1(model, ids):
    with torch.no_grad():
        logits = model(ids[None, :-1]).logits[0].float()  # [2048, V]
    nll = F.cross_entropy(logits, ids[1:])
    return math.exp(nll.item()), logits.argmax(-1)


@pytest.mark.parametrize("lm_head", [False, True])
def test_wikitext_perplexity_int8_vs_float(tiny_neox_fp32, wikitext_path, lm_head):
    model, tok = tiny_neox_fp32
    ids = _wikitext_window(tok, wikitext_path)  # 2049 tokens: 2048 inputs, 2048 targets
    ppl_fp, top_fp = _ppl_and_top1(model, ids)
    ppl_q, top_q = _ppl_and_top1(quantize_model(copy.deepcopy(model), lm_head=lm_head), ids)
    rel = ppl_q / ppl_fp - 1
    agree = (top_q == top_fp).float().mean().item()
    print(f"\ntiny-neox-a WikiText-2 test, 2048 tokens, fp32 activations, lm_head={'int8' if lm_head else 'fp32'}: "
          f"ppl fp {ppl_fp:.3f}, int8 {ppl_q:.3f} ({100 * rel:+.3f}%), top-1 agreement {100 * agree:.2f}%")
    assert 100 < ppl_fp < 1000  # README: 347 on WikiText-2 (out of domain); a broken model is far off
    assert abs(rel) < 0.005
    assert agree >= 0.98
