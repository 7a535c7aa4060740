"""model_patch.hf_cache.PolicyCache: model.generate through a KV-cache policy."""
from __future__ import annotations

import pytest
import torch

from model_patch.decoder import Decoder
from model_patch.hf_cache import PolicyCache

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def tiny_a(load_tiny_neox_a):
    return load_tiny_neox_a()


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("shape", ["d16", "d80-seq"])
def test_full_policy_generate_equals_default_cache(shape, B, make_neox, hf_greedy):
    model = make_neox(shape)
    ids = torch.randint(0, 256, (B, 7))
    ref = hf_greedy(model, ids, 12)
    cache = PolicyCache(model, "full", batch_size=B, max_len=32)
    out = hf_greedy(model, ids, 12, past_key_values=cache)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == 7 + 11  # the last token is never fed
    # the patched model still runs HF's own path without our cache
    assert torch.equal(hf_greedy(model, ids, 12), ref)


def test_full_and_big_h2o_equal_default_on_tiny_neox_a(tiny_a, hf_greedy):
    ids = torch.randint(2, 8192, (2, 16))
    ref = hf_greedy(tiny_a, ids, 24)
    for kv in ("full", "h2o:24,24", "sink:4,40", "window:44"):  # budgets >= 40 tokens: nothing evicted
        out = hf_greedy(tiny_a, ids, 24, past_key_values=PolicyCache(tiny_a, kv, batch_size=2, max_len=64))
        assert torch.equal(out, ref), kv


@pytest.mark.parametrize("kv", ["h2o:4,4", "sink:2,5", "window:6"])
def test_evicting_generate_equals_decoder(kv, make_neox, hf_greedy):
    # A small budget really evicts; the HF path and the Decoder share the policy code
    # but not the forward, so equal tokens check the adapter's bookkeeping.
    model = make_neox()
    ids = torch.randint(0, 256, (2, 10))
    out = hf_greedy(model, ids, 16, past_key_values=PolicyCache(model, kv, batch_size=2, max_len=32))
    ref = Decoder(model, batch_size=2, max_len=32, kv=kv, compile=False).generate(ids, 16)
    assert torch.equal(out, ref)
    assert not torch.equal(out, hf_greedy(model, ids, 16))  # eviction changed something


def test_padded_mask_is_refused(make_neox):
    model = make_neox()
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cache = PolicyCache(model, "h2o:8,8", batch_size=2, max_len=16)
    with pytest.raises(ValueError, match="PolicyCache: padded batches are not supported"):
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3, do_sample=False,
                       pad_token_id=0)


def test_bookkeeping_and_errors(make_neox):
    model = make_neox()
    cache = PolicyCache(model, "full", batch_size=2, max_len=12)
    assert cache.get_seq_length() == 0 and cache.get_max_length() == 12 and cache.max_cache_len == 12
    assert not cache.is_compileable
    assert PolicyCache(model, "h2o:3,3", batch_size=2, max_len=12).get_max_length() == -1
    assert cache.memory_bytes() == cache.policy.memory_bytes() > 0
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        with pytest.raises(ValueError, match="built for batch_size=2, got a batch of 3"):
            model(torch.randint(0, 256, (3, 4)), past_key_values=cache, use_cache=True)
        model(ids[:, :4], past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 4
        with pytest.raises(ValueError, match="each forward must feed one token per row, got 2"):
            model(ids[:, 4:6], past_key_values=cache, use_cache=True)
        cache.reset()
        model(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="13 tokens exceed max_len=12"):
            for t in range(5):
                model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([1, 0]))


def test_unpatched_model_gets_a_clear_error(make_neox):
    patched, other = make_neox(), make_neox()
    cache = PolicyCache(patched, "full", batch_size=1, max_len=8)
    with pytest.raises(RuntimeError, match="attention module is not patched"):
        with torch.no_grad():
            other(torch.randint(0, 256, (1, 4)), past_key_values=cache, use_cache=True)
