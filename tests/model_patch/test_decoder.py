"""model_patch.decoder.Decoder: against HF's own forward and generate, eager vs compiled, CUDA graphs."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import GPT2Config, GPT2LMHeadModel

from model_patch.decoder import Decoder
from model_patch.quant import quantize_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _scored(logprobs: torch.Tensor, ids: torch.Tensor, P: int) -> torch.Tensor:
    """HF log-probs of the tokens teacher_force scores: ids[:, P + 1:] given their prefixes."""
    return logprobs[:, P:-1].gather(2, ids[:, P + 1:, None])[..., 0]


@pytest.mark.parametrize("shape,B", [("d16", 1), ("d16", 3), ("d64", 1), ("d80-seq", 3), ("d16-rot1", 2)])
def test_prefill_and_teacher_force_match_hf_forward(shape, B, make_neox, hf_logprobs):
    model = make_neox(shape)
    ids = torch.randint(0, 256, (B, 24))
    ref = hf_logprobs(model, ids)  # [B, 24, V]
    dec = Decoder(model, batch_size=B, max_len=32, compile=False)
    logits = dec.prefill(ids[:, :9])
    assert logits.dtype == torch.float32 and logits.shape == (B, 256)
    torch.testing.assert_close(torch.log_softmax(logits, -1), ref[:, 8], rtol=0, atol=2e-5)
    lp = dec.teacher_force(ids, prefill_len=9)
    assert lp.shape == (B, 24 - 9 - 1) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, _scored(ref, ids, 9), rtol=0, atol=2e-5)


def test_tiny_neox_a_matches_hf(load_tiny_neox_a, hf_greedy, hf_logprobs):
    model = load_tiny_neox_a()
    ids = torch.randint(2, 8192, (2, 40))
    dec = Decoder(model, batch_size=2, max_len=64, compile=False)
    lp, pred = dec.teacher_force(ids, prefill_len=16, return_predictions=True)
    ref = hf_logprobs(model, ids)
    torch.testing.assert_close(lp, _scored(ref, ids, 16), rtol=0, atol=5e-5)
    assert torch.equal(pred, ref[:, 16:-1].argmax(-1))
    assert torch.equal(dec.generate(ids[:, :12], 20), hf_greedy(model, ids[:, :12], 20))


@pytest.mark.parametrize("B", [1, 3])
def test_generate_matches_hf_greedy(B, make_neox, hf_greedy):
    model = make_neox("d80-seq")
    ids = torch.randint(0, 256, (B, 8))
    dec = Decoder(model, batch_size=B, max_len=32, compile=False)
    assert torch.equal(dec.generate(ids, 16), hf_greedy(model, ids, 16))
    assert torch.equal(dec.generate(ids[:, :5], 0), ids[:, :5])


def test_int8_model_matches_its_hf_forward(make_neox, hf_greedy, hf_logprobs):
    model = quantize_model(make_neox("d64"))
    ids = torch.randint(0, 256, (2, 20))
    dec = Decoder(model, batch_size=2, max_len=32, compile=False)
    torch.testing.assert_close(dec.teacher_force(ids, prefill_len=6), _scored(hf_logprobs(model, ids), ids, 6),
                               rtol=0, atol=2e-5)
    assert torch.equal(dec.generate(ids[:, :6], 12), hf_greedy(model, ids[:, :6], 12))


def _count_op_calls(monkeypatch, names, fn):
    """fn()'s result and how often it called each torch.ops.w8a16.<name> of ``names``."""
    calls = []
    with monkeypatch.context() as mp:
        for name in names:
            op = getattr(torch.ops.w8a16, name)
            mp.setattr(torch.ops.w8a16, name, lambda *a, _op=op, _n=name, **k: calls.append(_n) or _op(*a, **k))
        out = fn()
    return out, tuple(calls.count(n) for n in names)


def test_fused_linears_match_unfused(make_neox, monkeypatch):
    # Decoder(fuse=True) runs a W8A16 parallel-residual layer as w8a16.linear_pair +
    # w8a16.linear_sum; fuse=False as four linears. In decode steps, add_norm=True (the default)
    # runs each residual add and the next layer's norms as w8a16.add_norm_pair (not after the
    # last layer), fuse_norm=True folds them into w8a16.linear_sum_norm. Same numbers up to rounding.
    model = quantize_model(make_neox("d64", layers=3))
    ids = torch.randint(0, 256, (2, 20))
    plain = Decoder(model, batch_size=2, max_len=32, compile=False, fuse=False)
    lp_plain = plain.teacher_force(ids, prefill_len=6)
    names = ("linear_pair", "linear_sum", "linear_sum_norm", "add_norm_pair")
    for kw, counts in ((dict(add_norm=False), (3 * 14, 3 * 14, 0, 0)),
                       (dict(), (3 * 14, 3 * 14, 0, 2 * 13)),
                       (dict(fuse_norm=True), (3 * 14, 3, 3 * 13, 0))):
        fused = Decoder(model, batch_size=2, max_len=32, compile=False, **kw)
        assert (fused.fused_layers, plain.fused_layers) == (3, 0)
        lp_fused, got = _count_op_calls(monkeypatch, names, lambda: fused.teacher_force(ids, prefill_len=6))
        # layers x (prefill + 13 steps); the norm ops per step: between layers / after each layer
        assert got == counts, kw
        torch.testing.assert_close(lp_fused, lp_plain, rtol=0, atol=2e-5)
        assert torch.equal(fused.generate(ids[:, :6], 12), plain.generate(ids[:, :6], 12))


def test_fuse16_matches_hf_forward(make_neox, hf_logprobs, hf_greedy, monkeypatch):
    # Decoder(fuse16=True) on an unquantized model: decode steps run each layer as linear_pair +
    # linear_sum with the 16-bit weights and unit scales, add_norm_pair between layers, and the LM
    # head as w8a16.linear; prefill keeps the nn.Linear modules. Against HF's own forward.
    model = make_neox("d64", layers=3)
    ids = torch.randint(0, 256, (2, 20))
    dec = Decoder(model, batch_size=2, max_len=32, compile=False, fuse16=True)
    assert dec.fused16 and dec.fused_layers == 3 and not dec._norm_fused
    names = ("linear", "linear_pair", "linear_sum", "add_norm_pair")
    lp, got = _count_op_calls(monkeypatch, names, lambda: dec.teacher_force(ids, prefill_len=6))
    # 13 decode steps: 3 layers each, add_norm_pair between layers, the LM head; none in prefill
    assert got == (13, 3 * 13, 3 * 13, 2 * 13)
    torch.testing.assert_close(lp, _scored(hf_logprobs(model, ids), ids, 6), rtol=0, atol=2e-5)
    assert torch.equal(dec.generate(ids[:, :6], 12), hf_greedy(model, ids[:, :6], 12))
    # fuse_norm needs int8 weights (linear_sum_norm): the 16-bit layers keep add_norm_pair
    assert not Decoder(model, batch_size=2, max_len=32, compile=False, fuse16=True, fuse_norm=True)._norm_fused


def test_fuse16_defaults_and_refusals(make_neox):
    model = make_neox("d64")
    assert not Decoder(model, batch_size=1, max_len=8, compile=False).fused16  # CPU: off by default
    assert Decoder(model, batch_size=1, max_len=8, compile=False, fuse16=True).fused_layers == 2
    assert Decoder(model, batch_size=1, max_len=8, compile=False, fuse=False, fuse16=True).fused_layers == 0
    seq = make_neox("d80-seq")  # sequential residual
    assert Decoder(seq, batch_size=1, max_len=8, compile=False, fuse16=True).fused_layers == 0
    gelu_tanh = make_neox("d64")
    gelu_tanh.config.hidden_act = "gelu_new"  # not the exact GeLU linear_pair computes
    assert Decoder(gelu_tanh, batch_size=1, max_len=8, compile=False, fuse16=True).fused_layers == 0
    mixed = make_neox("d64")
    mixed.gpt_neox.layers[0].mlp.dense_4h_to_h.to(torch.float64)  # not the model's dtype
    assert Decoder(mixed, batch_size=1, max_len=8, compile=False, fuse16=True).fused_layers == 1


def test_fusion_only_where_it_applies(make_neox):
    assert Decoder(make_neox("d64"), batch_size=1, max_len=8, compile=False).fused_layers == 0  # not W8A16
    seq = quantize_model(make_neox("d80-seq"))  # sequential residual: ln2 reads x + attn
    assert Decoder(seq, batch_size=1, max_len=8, compile=False).fused_layers == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("int8", [False, True])
def test_half_precision_runs_on_cpu(dtype, int8, make_neox):
    model = make_neox("d64", dtype=dtype)
    if int8:
        quantize_model(model)
    ids = torch.randint(0, 256, (2, 12))
    dec = Decoder(model, batch_size=2, max_len=16, kv="h2o:3,3", compile=False)
    out = dec.generate(ids[:, :6], 8)
    assert out.shape == (2, 14) and out.dtype == torch.long and int(out.max()) < 256
    lp = dec.teacher_force(ids, prefill_len=4)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all() and (lp <= 0).all()


def test_budget_covering_the_sequence_equals_full(make_neox):
    model = make_neox()
    ids = torch.randint(0, 256, (3, 30))
    full = Decoder(model, batch_size=3, max_len=32, compile=False).teacher_force(ids, prefill_len=10)
    for kv in ("h2o:16,16", "sink:4,28", "window:32"):
        lp = Decoder(model, batch_size=3, max_len=32, kv=kv, compile=False).teacher_force(ids, prefill_len=10)
        torch.testing.assert_close(lp, full, rtol=0, atol=1e-6, msg=kv)
    small = Decoder(model, batch_size=3, max_len=32, kv="h2o:4,4", compile=False).teacher_force(ids, 10)
    assert (small - full).abs().max() > 1e-3  # a real eviction changes the scores


def test_evicting_policy_decodes_past_max_len_in_bounded_memory(make_neox):
    model = make_neox()
    ids = torch.randint(0, 256, (1, 8))
    dec = Decoder(model, batch_size=1, max_len=16, kv="window:6", compile=False)
    assert dec.generate(ids, 40).shape == (1, 48)  # 48 tokens > max_len: only the prompt is bounded
    full = Decoder(model, batch_size=1, max_len=16, compile=False)
    assert dec.memory_bytes() < full.memory_bytes() == full.cache.memory_bytes()
    with pytest.raises(ValueError, match="48 tokens exceed max_len=16 of the 'full' cache"):
        full.generate(ids, 40)


def test_errors(make_neox):
    model = make_neox()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Decoder: model must be a GPT-NeoX causal LM"):
        Decoder(gpt2, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        Decoder(model, batch_size=0, max_len=8)
    with pytest.raises(ValueError, match="unknown KV-cache policy"):
        Decoder(model, batch_size=1, max_len=8, kv="lru:4")
    dec = Decoder(model, batch_size=2, max_len=8, compile=False)
    ids = torch.randint(0, 256, (2, 10))
    with pytest.raises(RuntimeError, match="call prefill"):
        dec.decode_step(ids[:, 0])
    with pytest.raises(ValueError, match="built for batch_size=2, got a batch of 3"):
        dec.generate(torch.randint(0, 256, (3, 4)), 2)
    with pytest.raises(ValueError, match="must be int64"):
        dec.prefill(ids.int())
    with pytest.raises(ValueError, match="prompt of 10 tokens exceeds max_len=8"):
        dec.prefill(ids)
    with pytest.raises(ValueError, match="9 tokens exceed max_len=8"):
        dec.generate(ids[:, :4], 5)
    with pytest.raises(ValueError, match=r"prefill_len must be in \[1, N - 1\]"):
        dec.teacher_force(ids[:, :6], prefill_len=6)
    dec.prefill(ids[:, :7])
    dec.decode_step(ids[:, 7])
    with pytest.raises(ValueError, match="the cache is full"):
        dec.decode_step(ids[:, 8])


@pytest.fixture(scope="module", params=["full", "h2o:4,4"])
def eager_and_compiled(request, make_neox):
    model = make_neox("d16")
    return (Decoder(model, batch_size=2, max_len=48, kv=request.param, compile=False),
            Decoder(model, batch_size=2, max_len=48, kv=request.param, compile=True))


def _compiled_entries(dec: Decoder) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    per_code = [len(_debug_get_cache_entry_list(code)) for code in dec._step_codes]
    # One code object per variant, each compiled at most once (a single cache entry keeps
    # the skipped-guard lookup of decode_step cheap).
    assert len(per_code) == 2 and max(per_code) <= 1, per_code
    return sum(per_code)


def test_compiled_equals_eager_and_compiles_once(eager_and_compiled):
    eager, compiled = eager_and_compiled
    ids = torch.randint(0, 256, (2, 40))
    assert torch.equal(compiled.generate(ids[:, :8], 24), eager.generate(ids[:, :8], 24))
    torch.testing.assert_close(compiled.teacher_force(ids, 12), eager.teacher_force(ids, 12), rtol=0, atol=1e-5)
    assert _compiled_entries(compiled) == 2  # the step with and without targets
    graphs = counters["stats"]["unique_graphs"]
    for T, new in ((3, 30), (11, 5)):  # other prompt lengths, fresh sequences: no recompile
        assert torch.equal(compiled.generate(ids[:, :T], new), eager.generate(ids[:, :T], new))
        compiled.teacher_force(ids[:, :T + new], T)
    assert counters["stats"]["unique_graphs"] == graphs
    assert _compiled_entries(compiled) == 2


def test_batch_one_strided_inputs_compile_once(make_neox):
    # At batch 1, teacher_force and a caller's ids[:, j] feed [1] views with a stride of N,
    # generate feeds stride-1 rows: the step must not recompile (nor fail) on either.
    model = make_neox("d16")
    eager = Decoder(model, batch_size=1, max_len=40, compile=False)
    dec = Decoder(model, batch_size=1, max_len=40, compile=True)
    ids = torch.randint(0, 256, (1, 30))
    torch.testing.assert_close(dec.teacher_force(ids, 6), eager.teacher_force(ids, 6), rtol=0, atol=1e-5)
    assert torch.equal(dec.generate(ids[:, :5], 10), eager.generate(ids[:, :5], 10))
    dec.prefill(ids[:, :4])
    eager.prefill(ids[:, :4])
    for tokens in (ids[:, 4], torch.tensor([7]), ids[0, 5:6]):
        assert torch.equal(dec.decode_step(tokens)[0], eager.decode_step(tokens)[0])
    assert _compiled_entries(dec) == 2


def test_two_decoders_compile_independently(eager_and_compiled):
    eager, compiled = eager_and_compiled
    other = Decoder(eager.model, batch_size=2, max_len=48, kv=eager.policy, compile=True)
    ids = torch.randint(0, 256, (2, 8))
    assert torch.equal(other.generate(ids, 6), eager.generate(ids, 6))
    assert _compiled_entries(other) == 1 and _compiled_entries(compiled) == 2


def test_step_drops_the_tensor_guards_of_model_and_cache(make_neox, monkeypatch):
    # The decode step's guard filter drops the tensor-metadata guards of everything reached
    # through `self` (weights, scales, biases, cache buffers: hundreds of tensors whose
    # guards cost ~1.5 ms of host time per step even under skip_guard_eval_unsafe) and keeps
    # those of the step's arguments. Spy on the filter with the names dynamo really passes.
    import model_patch.decoder as decoder_mod

    seen = []
    keep = decoder_mod._keep_guard

    def spy(entry):
        kept = keep(entry)
        if entry.guard_type == "TENSOR_MATCH":
            seen.append((entry.name, kept))
        return kept

    monkeypatch.setattr(decoder_mod, "_keep_guard", spy)
    model = quantize_model(make_neox("d16"))
    dec = Decoder(model, batch_size=1, max_len=24, kv="h2o:4,4", compile=True)
    dec.generate(torch.randint(0, 256, (1, 6)), 4)
    dropped = {name for name, kept in seen if not kept}
    kept = {name for name, kept in seen if kept}
    assert kept == {"tokens"}, kept
    layers = model.config.num_hidden_layers
    for part in ("k", "v", "pos", "free", "scores"):
        assert {f"self.cache.{part}.layers[{i}]" for i in range(layers)} <= dropped, part
    # the fused layers' weights, scales and biases, reached through the decoder's table of them
    # (query_key_value, dense_h_to_4h, dense, dense_4h_to_h of each layer)
    assert {f"self._lin[{i}][{j}][{k}]" for i in range(layers) for j in range(4) for k in range(3)} <= dropped, \
        sorted(dropped)


# ---- CUDA ----


@pytest.fixture
def cuda_neox(make_neox):
    """Factory: cuda_neox(int8) -> a random fp16 GPT-NeoX (head_dim 64) on the GPU, optionally W8A16."""
    def make(int8: bool) -> torch.nn.Module:
        model = make_neox("d64", dtype=torch.float16, device="cuda")
        return quantize_model(model) if int8 else model
    return make


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["full", "h2o:6,6"])
@pytest.mark.parametrize("int8", [False, True])
def test_decode_step_replays_a_cuda_graph(kv, int8, cuda_neox):
    from torch.profiler import ProfilerActivity, profile

    dec = Decoder(cuda_neox(int8), batch_size=2, max_len=64, kv=kv)  # compile=None: compiled on CUDA
    assert dec.compiled
    skips = counters["inductor"]["cudagraph_skips"]
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    dec.teacher_force(ids, prefill_len=8)  # warm-up and recording of both variants
    out = dec.generate(ids[:, :8], 20)
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs (see its log)"
    tokens = out[:, -1].clone()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            tokens, _ = dec.decode_step(tokens)  # a graph output fed straight back
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    launches = sum("GraphLaunch" in n for n in names)
    assert launches >= 3, f"no CUDA graph replay seen; events: {sorted(set(names))[:40]}"


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["full", "h2o:6,6"])
@pytest.mark.parametrize("B", [2, 12])
def test_cuda_overlap_changes_no_result(kv, B, cuda_neox):
    # overlap=True (programmatic dependent launch of the decode step's linears and cache op,
    # sm_90+) is a scheduling change only: same log-probs and tokens, bit for bit.
    model = cuda_neox(True)
    ids = torch.randint(0, 256, (B, 48), device="cuda")
    runs = []
    for overlap in (False, True):
        dec = Decoder(model, batch_size=B, max_len=64, kv=kv, overlap=overlap)
        runs.append((dec.teacher_force(ids, prefill_len=8), dec.generate(ids[:, :8], 24)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def _assert_same_greedy(eager_dec: Decoder, eager: torch.Tensor, out: torch.Tensor, T: int) -> None:
    """out == eager, except where a row first diverges at a near-tie of the eager distribution:
    fused (compiled) and unfused (eager) fp16 kernels round differently."""
    diff = out != eager
    for r in diff.any(1).nonzero()[:, 0].tolist():
        p = int(diff[r].int().argmax())  # first differing position of row r (>= T + 1: prefill is shared)
        alt = eager[:, :p + 1].clone()
        alt[r, p] = out[r, p]
        lp_eager = float(eager_dec.teacher_force(eager[:, :p + 1], T)[r, -1])
        lp_other = float(eager_dec.teacher_force(alt, T)[r, -1])
        assert lp_eager - lp_other < 0.05, (f"compiled and eager greedy tokens differ at row {r}, position {p}: "
                                            f"log-probs {lp_eager:.4f} vs {lp_other:.4f}, not a near-tie")


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_fused_linears_match_unfused(load_tiny_neox_a, B):
    # The fused kernels (one gemv launch per pair) against four separate w8a16 linears, both
    # eager, on the trained model in fp16, each measured against the same int8 model run in
    # fp32 on the CPU: the fused path is no further from it than the unfused one.
    import copy

    model = quantize_model(load_tiny_neox_a(torch.float16))
    ref_model = copy.deepcopy(model).float()  # int8 weights and fp32 scales unchanged
    model.cuda()
    ids = torch.randint(2, 8192, (B, 40))
    ref = Decoder(ref_model, batch_size=B, max_len=64, compile=False).teacher_force(ids, 8)
    fused = Decoder(model, batch_size=B, max_len=64, compile=False)
    plain = Decoder(model, batch_size=B, max_len=64, compile=False, fuse=False)
    assert fused.fused_layers == len(model.gpt_neox.layers) and plain.fused_layers == 0
    err = {}
    for name, dec in (("fused", fused), ("plain", plain)):
        lp = dec.teacher_force(ids.cuda(), 8).cpu()
        assert torch.isfinite(lp).all()
        err[name] = (lp - ref).abs()
    assert err["fused"].mean() <= 1.5 * err["plain"].mean() + 1e-4, err
    assert err["fused"].max() <= 1.5 * err["plain"].max() + 1e-3, err


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["full", "h2o:12,12"])
@pytest.mark.parametrize("int8", [False, True])
def test_cuda_compiled_generate_equals_eager(load_tiny_neox_a, kv, int8):
    model = load_tiny_neox_a(torch.float16).cuda()
    if int8:
        quantize_model(model)
    T = 16
    ids = torch.randint(2, 8192, (3, T), device="cuda")
    eager_dec = Decoder(model, batch_size=3, max_len=64, kv=kv, compile=False)
    eager = eager_dec.generate(ids, 40)
    compiled = Decoder(model, batch_size=3, max_len=64, kv=kv)
    for _ in range(2):  # warm-up and recording, then replays
        _assert_same_greedy(eager_dec, eager, compiled.generate(ids, 40), T)


@pytest.mark.parametrize("norm", ["fuse_norm", "add_norm"])
def test_norm_ops_compiled_equals_eager(make_neox, norm):
    # fuse_norm=True: the decode step's residual adds and norms run in w8a16.linear_sum_norm;
    # add_norm (the default): in w8a16.add_norm_pair (their CPU references here), traced whole
    # by torch.compile.
    model = quantize_model(make_neox("d16", layers=3))
    kw = dict(fuse_norm=True) if norm == "fuse_norm" else {}
    eager = Decoder(model, batch_size=2, max_len=48, compile=False, **kw)
    compiled = Decoder(model, batch_size=2, max_len=48, compile=True, **kw)
    assert all(getattr(d, "_norm_fused" if norm == "fuse_norm" else "_add_norm") for d in (eager, compiled))
    ids = torch.randint(0, 256, (2, 30))
    torch.testing.assert_close(compiled.teacher_force(ids, 8), eager.teacher_force(ids, 8), rtol=0, atol=1e-5)
    assert torch.equal(compiled.generate(ids[:, :8], 16), eager.generate(ids[:, :8], 16))


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["full", "h2o:6,6"])
def test_cuda_norm_fused_step_replays_and_matches_eager(kv, cuda_neox):
    model = cuda_neox(True)
    eager = Decoder(model, batch_size=2, max_len=64, kv=kv, compile=False, fuse_norm=True)
    compiled = Decoder(model, batch_size=2, max_len=64, kv=kv, fuse_norm=True)
    assert compiled.compiled and compiled._norm_fused
    skips = counters["inductor"]["cudagraph_skips"]
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    torch.testing.assert_close(compiled.teacher_force(ids, 8), eager.teacher_force(ids, 8), rtol=0, atol=2e-3)
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs (see its log)"
    assert not compiled._norm_ws[:4].any(), "linear_sum_norm left its counters set"
    _assert_same_greedy(eager, eager.generate(ids[:, :8], 20), compiled.generate(ids[:, :8], 20), 8)
