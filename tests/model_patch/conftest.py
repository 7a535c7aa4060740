"""Fixtures for the attention / hf_cache / decoder tests: tiny GPT-NeoX models and HF oracles."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

# head_dim 16 (fast default), 64 and 80 (Pythia-2.8B) with a sequential residual, full rotary.
NEOX_SHAPES = {
    "d16": dict(hidden_size=64, num_attention_heads=4),
    "d64": dict(hidden_size=128, num_attention_heads=2),
    "d80-seq": dict(hidden_size=160, num_attention_heads=2, use_parallel_residual=False),
    "d16-rot1": dict(hidden_size=64, num_attention_heads=4,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}),
}


def _tiny_neox(shape: str = "d16", dtype=torch.float32, device="cpu", layers: int = 2, vocab: int = 256,
               seed: int = 0) -> GPTNeoXForCausalLM:
    """A random GPT-NeoX in eval mode. A larger init than HF's 0.02 keeps the top logits apart,
    so greedy tokens do not hinge on last-bit rounding."""
    kw = dict(vocab_size=vocab, num_hidden_layers=layers, intermediate_size=4 * NEOX_SHAPES[shape]["hidden_size"],
              max_position_embeddings=512, initializer_range=0.08, eos_token_id=None, bos_token_id=None,
              pad_token_id=None, tie_word_embeddings=False)
    kw.update(NEOX_SHAPES[shape])
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**kw))
    return model.to(device=device, dtype=dtype).eval()


@pytest.fixture(scope="session")
def make_neox():
    """Factory: make_neox(shape="d16", dtype=fp32, device="cpu", layers=2, vocab=256) -> random GPT-NeoX."""
    return _tiny_neox


@pytest.fixture
def load_tiny_neox_a(tiny_neox_path):
    """Factory: load_tiny_neox_a(dtype=fp32) -> the trained tiny-neox-a (eos disabled for fixed-length greedy)."""
    def load(dtype=torch.float32) -> GPTNeoXForCausalLM:
        model = AutoModelForCausalLM.from_pretrained(tiny_neox_path, dtype=dtype).eval()
        model.generation_config.eos_token_id = None  # greedy runs of a fixed length, like the decoder's
        return model
    return load


@torch.no_grad()
def _hf_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(ids).logits.float(), dim=-1)


@torch.no_grad()
def _hf_greedy(model, ids: torch.Tensor, new: int, **kw) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=0, **kw)
    assert out.shape == (ids.shape[0], ids.shape[1] + new), "generate stopped early (eos?)"
    return out


@pytest.fixture(scope="session")
def hf_logprobs():
    """hf_logprobs(model, ids [B, N]) -> fp32 log-softmax of HF's own full forward, [B, N, V]."""
    return _hf_logprobs


@pytest.fixture(scope="session")
def hf_greedy():
    """hf_greedy(model, ids [B, T], new, **generate_kwargs) -> HF greedy generate of unpadded rows, [B, T + new]."""
    return _hf_greedy


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny models run faster on one thread; OpenMP threads spinning against other processes
    on a small, loaded machine made them up to 25x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
