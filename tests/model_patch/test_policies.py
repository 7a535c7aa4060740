"""parse_policy / PolicySpec / make_cache: accepted spellings, errors, buffer sizes and memory."""
from __future__ import annotations

import pytest
import torch

from model_patch.kv_cache import FullCache, H2OCache, SinkCache, WindowCache
from model_patch.policies import PolicySpec, make_cache, parse_policy


@pytest.mark.parametrize("text, spec", [
    ("full", PolicySpec("full")),
    ("h2o", PolicySpec("h2o", heavy=252, recent=252)),
    ("h2o:25,231", PolicySpec("h2o", heavy=25, recent=231)),
    (" H2O:0, 16 ", PolicySpec("h2o", heavy=0, recent=16)),
    ("h2o:16,0", PolicySpec("h2o", heavy=16, recent=0)),
    ("sink:4,500", PolicySpec("sink", n_sink=4, window=500)),
    ("sink:0,8", PolicySpec("sink", n_sink=0, window=8)),
    ("window:504", PolicySpec("window", window=504)),
])
def test_parse_policy_accepts(text, spec):
    parsed = parse_policy(text)
    assert parsed == spec
    assert parse_policy(str(parsed)) == parsed  # str() round-trips
    assert parse_policy(parsed) is parsed


def test_budgets():
    assert parse_policy("full").budget is None
    assert parse_policy("h2o").budget == 504
    assert parse_policy("h2o:25,231").budget == 256
    assert parse_policy("sink:4,500").budget == 504
    assert parse_policy("window:256").budget == 256


@pytest.mark.parametrize("text, match", [
    ("h2O2", "unknown KV-cache policy 'h2O2'"),
    ("streaming:4,500", "unknown KV-cache policy"),
    ("", "unknown KV-cache policy"),
    ("h2o:1", "h2o takes 2 integer parameter"),
    ("h2o:1,2,3", "h2o takes 2 integer parameter"),
    ("h2o:a,b", "parameters must be integers"),
    ("window:1.5", "parameters must be integers"),
    ("h2o:0,0", r"budget must be >= 1 token, got 0"),
    ("h2o:-1,5", "heavy must be >= 0, got -1"),
    ("h2o:5,-1", "recent must be >= 0, got -1"),
    ("window:0", r"budget must be >= 1 token, got 0"),
    ("window:-3", "window must be >= 0, got -3"),
    ("sink:4,0", "sink policy: window must be >= 1, got 0"),
    ("sink:-1,8", "n_sink must be >= 0, got -1"),
    ("sink", "needs parameters"),
    ("window", "needs parameters"),
    ("full:3", "takes no parameters"),
])
def test_parse_policy_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_policy(text)


def test_policy_spec_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown KV-cache policy 'lru'"):
        PolicySpec("lru")


@pytest.mark.parametrize("text, cls, capacity", [
    ("full", FullCache, 300),
    ("h2o:25,231", H2OCache, 257),
    ("sink:4,12", SinkCache, 17),
    ("window:16", WindowCache, 17),
    ("h2o:252,252", H2OCache, 300),  # the budget covers max_len: never evicts, max_len slots suffice
])
def test_make_cache(text, cls, capacity):
    cache = make_cache(text, n_layers=2, batch_size=3, n_heads=4, head_dim=8, max_len=300,
                       dtype=torch.float16, device="cpu")
    assert type(cache) is cls
    assert cache.capacity == capacity
    assert cache.k.shape == cache.v.shape == (2, 3, 4, capacity, 8)
    assert cache.k.dtype == torch.float16
    if cls is not FullCache:
        assert cache.pos.shape == (2, 3, 4, capacity)
        assert (cache.pos == -1).all()
        assert hasattr(cache, "scores") == (cls is H2OCache)


def _formula(L, B, H, D, S, dtype_bytes, scores):
    kv = B * L * 2 * S * (H * D) * dtype_bytes
    per_slot = B * L * H * S * (4 + (4 if scores else 0))  # pos int32 (+ scores fp32)
    return kv + per_slot + B * L * H * 8 + B * 4 + 8  # free int64, length int32, seen int64


@pytest.mark.parametrize("text, scores", [("h2o:252,252", True), ("sink:4,500", False), ("window:504", False)])
def test_memory_follows_the_formula_and_not_the_decode_length(text, scores):
    L, B, H, D = 3, 2, 4, 16
    sizes = {make_cache(text, L, B, H, D, max_len, torch.float16, "cpu").memory_bytes() for max_len in (600, 4096)}
    assert sizes == {_formula(L, B, H, D, 505, 2, scores)}


def test_full_memory_grows_with_max_len():
    L, B, H, D = 3, 2, 4, 16
    small = make_cache("full", L, B, H, D, 600, torch.float16, "cpu").memory_bytes()
    big = make_cache("full", L, B, H, D, 4096, torch.float16, "cpu").memory_bytes()
    assert big - small == B * L * 2 * (4096 - 600) * H * D * 2


def test_cache_constructor_errors():
    with pytest.raises(ValueError, match="H2OCache: heavy and recent must be >= 0"):
        H2OCache(1, 1, 1, 8, 64, torch.float32, "cpu", heavy=-1, recent=4)
    with pytest.raises(ValueError, match="H2OCache: budget must be >= 1 token, got 0"):
        H2OCache(1, 1, 1, 8, 64, torch.float32, "cpu", heavy=0, recent=0)
    with pytest.raises(ValueError, match="WindowCache: window must be >= 1, got 0"):
        WindowCache(1, 1, 1, 8, 64, torch.float32, "cpu", window=0)
    cache = WindowCache(1, 1, 1, 8, 16, torch.float32, "cpu", window=4)
    q = torch.randn(1, 1, 17, 8)
    with pytest.raises(ValueError, match="WindowCache: prompt of 17 tokens exceeds max_len=16"):
        cache.prefill(0, q, q, q)
