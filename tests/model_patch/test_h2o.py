"""The static-shape policies (model_patch.kv_cache) against the fp32 oracle (model_patch.h2o_reference)."""
from __future__ import annotations

import functools
import json
import lzma

import pytest
import torch

from model_patch.h2o_reference import ReferenceCache, run_model
from model_patch.kv_cache import FullCache, H2OCache
from model_patch.policies import make_cache, parse_policy

L, H, D = 2, 3, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Per-token loops of tiny ops: extra threads only add synchronization (and on a
    # loaded 2-core machine they made these tests ~10x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _stream(B, N, sharp=3.0, seed=0):
    """Random per-layer q, k, v [B, H, N, D] fp32; ``sharp`` scales q so attention is peaked."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(B, H, N, D, generator=g) * s for s in (sharp, 1.0, 1.0)) for _ in range(L)]


def _drive(cache, stream, n_prefill):
    """Feed a stream through a cache: per step the outputs [L, B, H, T, D] and held masks [L, B, H, seen]."""
    N = stream[0][0].shape[2]
    outs, held = [], []
    for lo, hi in [(0, n_prefill)] + [(t, t + 1) for t in range(n_prefill, N)]:
        step = [(cache.prefill if lo == 0 else cache.decode)(i, *(x[:, :, lo:hi] for x in stream[i]))
                for i in range(L)]
        cache.advance(hi - lo)
        outs.append(torch.stack(step).float())
        held.append(cache.held_mask() if hasattr(cache, "held_mask") else None)
    return outs, held


def _fast(policy, B, max_len):
    return make_cache(policy, L, B, H, D, max_len, torch.float32, "cpu")


@pytest.mark.parametrize("policy", ["h2o:5,7", "h2o:0,6", "h2o:9,0", "h2o:1,3", "sink:2,6", "sink:0,5",
                                    "window:5", "h2o:40,40", "window:64"])
@pytest.mark.parametrize("n_prefill", [4, 20])
def test_random_stream_keeps_the_oracles_token_sets(policy, n_prefill):
    B, N = 2, 48
    stream = _stream(B, N)
    ref_out, ref_held = _drive(ReferenceCache(policy, L, N), stream, n_prefill)
    out, held = _drive(_fast(policy, B, N), stream, n_prefill)
    budget = parse_policy(policy).budget
    for step, (a, b) in enumerate(zip(ref_held, held)):
        assert torch.equal(a, b), f"{policy}: held tokens differ after step {step}"
        assert (b.sum(-1) == min(b.shape[-1], budget)).all()
    for a, b in zip(ref_out, out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if budget < N:
        assert not held[-1].all()  # something was evicted
    spec = parse_policy(policy)
    if spec.name == "h2o" and spec.heavy > 0 and budget < N:  # content decides: rows keep different tokens
        assert not torch.equal(held[-1][:, 0], held[-1][:, 1])


@pytest.mark.parametrize("policy", ["h2o:30,34", "sink:4,60", "window:64", "h2o:1000,1000"])
def test_budget_covering_the_sequence_equals_full(policy):
    B, N, n_prefill = 2, 64, 16
    stream = _stream(B, N)
    full_out, _ = _drive(FullCache(L, B, H, D, N, torch.float32, "cpu"), stream, n_prefill)
    cache = _fast(policy, B, N)
    out, held = _drive(cache, stream, n_prefill)
    assert cache.capacity == N
    assert held[-1].all()
    torch.testing.assert_close(out[0], full_out[0], rtol=1e-5, atol=1e-6)  # prefill: another kernel
    for a, b in zip(out[1:], full_out[1:]):
        assert torch.equal(a, b)  # decode: same op on the same slots


@pytest.mark.parametrize("policy", ["h2o:4,6", "sink:2,5", "window:7"])
def test_batch_rows_are_independent(policy):
    B, N, n_prefill = 3, 40, 12
    stream = _stream(B, N, seed=1)
    out, held = _drive(_fast(policy, B, N), stream, n_prefill)
    for b in range(B):
        row = [tuple(x[b:b + 1] for x in layer) for layer in stream]
        out_b, held_b = _drive(_fast(policy, 1, N), row, n_prefill)
        for x, y in zip(held, held_b):
            assert torch.equal(x[:, b:b + 1], y)
        for x, y in zip(out, out_b):
            torch.testing.assert_close(x[:, b:b + 1], y, rtol=1e-6, atol=1e-6)
    if policy.startswith("h2o"):
        assert not torch.equal(held[-1][:, 0], held[-1][:, 1])


def test_prefill_longer_than_budget_keeps_recent_plus_top_heavy():
    B, T, heavy, recent = 2, 30, 4, 6
    (q, k, v), = _stream(B, T)[:1]
    cache = H2OCache(1, B, H, D, T, torch.float32, "cpu", heavy=heavy, recent=recent)
    cache.prefill(0, q, k, v)
    cache.advance(T)
    probs = torch.softmax((q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(
        torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
    colsum = probs.sum(-2)  # [B, H, T]
    expected = torch.zeros(B, H, T, dtype=torch.bool)
    expected[..., T - recent:] = True
    expected.scatter_(-1, colsum[..., :T - recent].topk(heavy, dim=-1).indices, True)
    assert torch.equal(cache.held_mask()[0], expected)
    slots = heavy + recent
    torch.testing.assert_close(cache.scores[0][..., :slots], colsum.gather(-1, cache.pos[0, ..., :slots].long()),
                               rtol=1e-6, atol=1e-6)


def test_prefill_longer_than_budget_sink_and_window():
    B, T = 1, 25
    stream = _stream(B, T)[:1]
    for policy, expected in (("sink:3,5", [0, 1, 2] + list(range(20, 25))), ("window:6", list(range(19, 25)))):
        cache = make_cache(policy, 1, B, H, D, T, torch.float32, "cpu")
        cache.prefill(0, *stream[0])
        cache.advance(T)
        held = cache.held_mask()[0, 0]  # [H, T]
        assert (held.nonzero()[:, 1].view(H, -1) == torch.tensor(expected)).all()


def _tied_stream():
    """Token 0 absorbs all attention; every other key gets probability exactly 0.0 in fp32,
    so tokens 1.. all have score 0 and only the tie rule decides."""
    u = torch.zeros(D)
    u[0] = 1.0
    N = 12
    q = (20 * u).expand(1, 1, N, D).clone()
    k = (-20 * u).expand(1, 1, N, D).clone()
    k[:, :, 0] = 20 * u
    v = torch.randn(1, 1, N, D)
    return [(q, k, v)], N


@pytest.mark.parametrize("make", [lambda: ReferenceCache("h2o:3,1", 1, 12),
                                  lambda: H2OCache(1, 1, 1, D, 12, torch.float32, "cpu", heavy=3, recent=1)])
def test_ties_go_to_the_oldest(make):
    (stream,), N = _tied_stream()
    cache = make()
    cache.prefill(0, *(x[:, :, :8] for x in stream))
    cache.advance(8)
    # recent {7}; heavy: token 0 (score 8) and, among the zero-score tokens 1..6, the two newest.
    assert cache.held_mask()[0, 0, 0].nonzero().flatten().tolist() == [0, 5, 6, 7]
    # Each new token lands in the slot just freed, so from t = 10 on the slot order is
    # no longer the age order (slots hold 0, 9, 10, 7, 8): the rule must look at positions.
    for t, kept in ((8, [0, 6, 7, 8]), (9, [0, 7, 8, 9]), (10, [0, 8, 9, 10]), (11, [0, 9, 10, 11])):
        cache.decode(0, *(x[:, :, t:t + 1] for x in stream))
        cache.advance(1)
        assert cache.held_mask()[0, 0, 0].nonzero().flatten().tolist() == kept, f"after token {t}"


def test_decode_compiles_without_graph_breaks():
    """The decode step has static shapes and no host sync: fullgraph tracing must succeed,
    and the compiled step must match eager (scores, positions, outputs)."""
    B, N, n_prefill = 2, 24, 6
    stream = _stream(B, N)
    eager, compiled = _fast("h2o:3,4", B, N), _fast("h2o:3,4", B, N)
    step = torch.compile(compiled.decode, fullgraph=True, backend="aot_eager")
    for c in (eager, compiled):
        for i in range(L):
            c.prefill(i, *(x[:, :, :n_prefill] for x in stream[i]))
        c.advance(n_prefill)
    for t in range(n_prefill, N):
        for i in range(L):
            x = [s[:, :, t:t + 1] for s in stream[i]]
            torch.testing.assert_close(step(i, *x), eager.decode(i, *x), rtol=0, atol=0)
        eager.advance(1)
        compiled.advance(1)
    assert torch.equal(compiled.pos, eager.pos) and torch.equal(compiled.free, eager.free)
    assert torch.equal(compiled.scores, eager.scores)


def test_reset_reuses_buffers():
    B, N = 2, 20
    stream = _stream(B, N)
    cache = _fast("h2o:3,4", B, N)
    ptrs = [b.data_ptr() for b in cache.buffers()]
    first, held1 = _drive(cache, stream, 5)
    cache.reset()
    second, held2 = _drive(cache, stream, 5)
    assert [b.data_ptr() for b in cache.buffers()] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(held1, held2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# tiny-neox-a: the same per-token model loop drives the oracle and the fast path.

@functools.lru_cache(maxsize=1)
def _load_tiny(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=1)
def _book_slices(path, tiny_path):
    """Two different 128-token slices of the first Gutenberg validation book, [2, 128]."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    tok = _load_tiny(tiny_path)[1]
    rows = [tok(text[a:a + 3000], add_special_tokens=False)["input_ids"][:128] for a in (10_000, 50_000)]
    return torch.tensor(rows)


@pytest.fixture
def tiny_model(tiny_neox_path):
    return _load_tiny(str(tiny_neox_path))


@pytest.fixture
def book_ids(gutenberg_path, tiny_neox_path):
    return _book_slices(str(gutenberg_path), str(tiny_neox_path))


@functools.lru_cache(maxsize=1)
def _full_logprobs(model, book_ids):
    return run_model(model, book_ids, 32, ReferenceCache("full", model.config.num_hidden_layers, 128))


def test_oracle_model_loop_matches_hf(tiny_model, book_ids):
    model, _ = tiny_model
    lp = _full_logprobs(model, book_ids)
    with torch.no_grad():
        logits = model(book_ids).logits
    ref = torch.log_softmax(logits[:, 31:-1], -1).gather(-1, book_ids[:, 32:, None])[..., 0]
    torch.testing.assert_close(lp, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["h2o:8,8", "h2o:3,13", "sink:2,14", "window:16"])
def test_tiny_neox_fast_path_keeps_the_oracles_token_sets(tiny_model, book_ids, policy):
    model, _ = tiny_model
    cfg = model.config
    H_, D_ = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    lp_ref, held_ref = run_model(model, book_ids, 32, ReferenceCache(policy, cfg.num_hidden_layers, 128), record=True)
    cache = make_cache(policy, cfg.num_hidden_layers, 2, H_, D_, 128, torch.float32, "cpu")
    lp, held = run_model(model, book_ids, 32, cache, record=True)
    for step, (a, b) in enumerate(zip(held_ref, held)):
        assert torch.equal(a, b), f"{policy}: held tokens differ after step {step}"
    torch.testing.assert_close(lp, lp_ref, rtol=1e-4, atol=1e-4)
    assert (lp - _full_logprobs(model, book_ids)).abs().max() > 1e-2  # the evictions changed the predictions


def test_tiny_neox_batch_of_3_equals_rows_alone(tiny_model, book_ids):
    model, _ = tiny_model
    cfg = model.config
    H_, D_ = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = torch.cat([book_ids, book_ids[:1].roll(7, dims=1)])[:, :96]  # 3 different rows

    def run(x):
        cache = make_cache("h2o:6,10", cfg.num_hidden_layers, x.shape[0], H_, D_, 96, torch.float32, "cpu")
        return run_model(model, x, 24, cache, record=True)

    lp, held = run(ids)
    for b in range(3):
        lp_b, held_b = run(ids[b:b + 1])
        torch.testing.assert_close(lp[b:b + 1], lp_b, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(x[:, b:b + 1], y) for x, y in zip(held, held_b))


@pytest.mark.parametrize("policy", ["h2o:64,64", "sink:4,124", "window:128"])
def test_tiny_neox_budget_covering_the_sequence_equals_full(tiny_model, book_ids, policy):
    model, _ = tiny_model
    cfg = model.config
    H_, D_ = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = book_ids[:, :64]
    caches = [make_cache(p, cfg.num_hidden_layers, 2, H_, D_, 64, torch.float32, "cpu") for p in (policy, "full")]
    lp, full = (run_model(model, ids, 16, c) for c in caches)
    torch.testing.assert_close(lp, full, rtol=1e-5, atol=1e-5)
