"""model_patch.sources: random presets, local checkpoints, hub ids and the errors around them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXForCausalLM

from model_patch.sources import (PYTHIA_PRESETS, ModelSourceError, is_random_spec, load_model,
                                 pythia_config)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Parameter counts of the released Pythia models (EleutherAI/pythia README, untied
# embeddings), checked against the counts computed from our configs below.
PYTHIA_PARAMS = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
}


def count_params(cfg) -> int:
    """Parameters of a GPT-NeoX causal LM with untied embeddings, from its config."""
    H, L, V, F = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    attn = H * 3 * H + 3 * H + H * H + H  # query_key_value + dense, with biases
    mlp = H * F + F + F * H + H
    norms = 2 * 2 * H
    return L * (attn + mlp + norms) + 2 * V * H + 2 * H  # + embed_in, head, final norm


@pytest.mark.parametrize("name", list(PYTHIA_PRESETS))
def test_preset_config_has_pythia_shape(name):
    cfg = pythia_config("random:" + name)
    assert cfg.model_type == "gpt_neox"
    assert cfg.intermediate_size == 4 * cfg.hidden_size
    assert cfg.hidden_size % cfg.num_attention_heads == 0
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.max_position_embeddings == 2048
    assert cfg.use_parallel_residual is True and cfg.tie_word_embeddings is False
    assert cfg.attention_bias is True and cfg.hidden_act == "gelu" and cfg.layer_norm_eps == 1e-5
    if name in PYTHIA_PARAMS:
        assert count_params(cfg) == PYTHIA_PARAMS[name], name


@pytest.mark.parametrize("name", ["pythia-70m", "pythia-160m"])
def test_count_formula_matches_built_module(name):
    # Build on meta (no memory, no init) so the formula above is checked against HF's module tree.
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(pythia_config(name))
    assert sum(p.numel() for p in model.parameters()) == count_params(model.config) == PYTHIA_PARAMS[name]
    assert model.gpt_neox.layers[0].attention.rotary_ndims == model.config.hidden_size // \
        model.config.num_attention_heads // 4


def test_pythia_2_8b_head_dim():
    cfg = pythia_config("pythia-2.8b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (2560, 32, 32, 50304)
    assert cfg.hidden_size // cfg.num_attention_heads == 80


def test_is_random_spec():
    assert is_random_spec("random:pythia-70m")
    assert not is_random_spec("EleutherAI/pythia-70m")
    assert not is_random_spec(None)


def test_unknown_preset_is_refused():
    with pytest.raises(ModelSourceError, match=r"unknown preset 'random:pythia-7b'.*pythia-6\.9b"):
        load_model("random:pythia-7b")


def test_random_model_is_seeded_sane_and_typed():
    a, tok = load_model("random:pythia-14m", dtype=torch.float16)
    b, _ = load_model("random:pythia-14m", dtype=torch.float16)
    c, _ = load_model("random:pythia-14m", dtype=torch.float16, seed=1)
    assert tok is None
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["gpt_neox.layers.0.attention.query_key_value.weight"],
                           sc["gpt_neox.layers.0.attention.query_key_value.weight"])
    w = sa["gpt_neox.layers.3.mlp.dense_h_to_4h.weight"].float()
    assert w.dtype == torch.float32 and sa["gpt_neox.layers.3.mlp.dense_h_to_4h.weight"].dtype == torch.float16
    assert 0.018 < w.std().item() < 0.022 and abs(w.mean().item()) < 1e-3
    assert torch.equal(sa["gpt_neox.layers.0.input_layernorm.weight"], torch.ones(128, dtype=torch.float16))
    assert a.gpt_neox.rotary_emb.inv_freq.dtype == torch.float32
    assert a.config._attn_implementation == "sdpa" and not a.training
    assert not any(p.requires_grad for p in a.parameters())
    logits = a(torch.randint(0, 50304, (2, 12))).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all() and logits.float().std() > 0.1


def test_random_model_matches_a_normally_built_model():
    # The meta-device build must give the same forward as HF's ordinary constructor with the
    # same weights; this catches rotary buffers left uninitialized by to_empty.
    fast, _ = load_model("random:pythia-14m", dtype=torch.float32)
    slow = GPTNeoXForCausalLM(pythia_config("pythia-14m")).eval()
    slow.load_state_dict(fast.state_dict())
    assert torch.equal(slow.gpt_neox.rotary_emb.inv_freq, fast.gpt_neox.rotary_emb.inv_freq)
    ids = torch.randint(0, 50304, (1, 20))
    torch.testing.assert_close(fast(ids).logits, slow(ids).logits)


def test_random_model_bfloat16():
    model, _ = load_model("random:pythia-14m", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.gpt_neox.embed_in.weight.dtype == torch.bfloat16


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match=r"load_model: dtype must be one of float16, bfloat16, float32, "
                                         r"got torch.int8"):
        load_model("random:pythia-14m", dtype=torch.int8)


def test_local_checkpoint(tiny_neox_path):
    model, tok = load_model(str(tiny_neox_path), dtype=torch.float32)
    assert isinstance(model, GPTNeoXForCausalLM)
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert not model.training
    ids = tok("The old house", return_tensors="pt").input_ids
    assert ids.shape[1] >= 2 and int(ids.max()) < model.config.vocab_size
    assert torch.isfinite(model(ids).logits).all()


def test_tokenizer_file_override(neox_tokenizer_path):
    _, tok = load_model("random:pythia-14m", tokenizer=neox_tokenizer_path)
    assert tok("Hello world").input_ids == [12092, 1533]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0


def test_missing_local_path():
    with pytest.raises(ModelSourceError, match=r"local path './no/such/checkpoint' does not exist"):
        load_model("./no/such/checkpoint")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match=r"is not a Hugging Face checkpoint \(config.json missing"):
        load_model(str(tmp_path))


def test_non_gpt_neox_checkpoint_is_refused(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match=r"config.model_type 'gpt2', expected 'gpt_neox'"):
        load_model(str(tmp_path))


def test_hub_id_offline_and_not_cached(tmp_path):
    # A fresh interpreter, so that HF_HUB_OFFLINE and HF_HOME are read at import as in real use.
    code = ("from model_patch.sources import load_model, ModelSourceError\n"
            "try:\n    load_model('EleutherAI/pythia-70m-not-cached-anywhere')\n"
            "except ModelSourceError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    msg = out.stdout
    assert msg.startswith("ERR load_model: spec 'EleutherAI/pythia-70m-not-cached-anywhere'"), msg
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in msg and "not in the local Hugging Face cache" in msg
    assert "local checkpoint directory" in msg and "random:pythia-2.8b" in msg
