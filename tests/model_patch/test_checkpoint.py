"""model_patch.checkpoint: bit-exact round trips, and loud failures on every kind of bad checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPTNeoXConfig, GPTNeoXForCausalLM

from model_patch import W8A16Linear, W8A16MLP, load_model, load_quantized, quantize_model, save_quantized
from model_patch.checkpoint import WEIGHTS_NAME, CheckpointError
from model_patch.sources import MANIFEST_NAME, materialize_buffers


def tiny_model(dtype=torch.float16, **kw) -> GPTNeoXForCausalLM:
    cfg = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(kw)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)).eval().to(dtype)
    # .to(dtype) also cast the rotary inv_freq; rebuild it in fp32 as from_pretrained (and
    # load_quantized) have it, so that logits can be compared bit for bit.
    materialize_buffers(model, "cpu")
    model.requires_grad_(False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.05)
    return model


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_tiny_neox_is_bit_exact(tiny_neox_path, tmp_path):
    model, tok = load_model(str(tiny_neox_path), dtype=torch.float16)
    quantize_model(model)
    save_quantized(model, tmp_path, source=str(tiny_neox_path), tokenizer=tok)
    loaded = load_quantized(tmp_path)
    assert_same_state(model, loaded)
    assert isinstance(loaded.gpt_neox.layers[5].mlp, W8A16MLP)
    assert isinstance(loaded.gpt_neox.layers[5].attention.dense, W8A16Linear)
    assert isinstance(loaded.get_output_embeddings(), nn.Linear)
    assert not loaded.training and loaded.config._attn_implementation == "sdpa"
    ids = tok("Call me Ishmael. Some years ago, never mind how long", return_tensors="pt").input_ids
    ref, out = model(ids).logits, loaded(ids).logits
    assert out.dtype == torch.float16 and torch.equal(out, ref)
    assert torch.isfinite(out).all() and out.float().std() > 0.5

    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1 and manifest["source_model"] == str(tiny_neox_path)
    assert manifest["dtype"] == "float16" and manifest["lm_head_quantized"] is False
    assert len(manifest["quantized_modules"]) == 6 * 4
    assert manifest["created"] and manifest["weights_bytes"] == (tmp_path / WEIGHTS_NAME).stat().st_size
    assert (tmp_path / "tokenizer.json").exists()
    # load_model recognises the directory and brings the tokenizer along.
    again, tok2 = load_model(str(tmp_path))
    assert_same_state(model, again)
    assert tok2(" the sea").input_ids == tok(" the sea").input_ids


def test_round_trip_lm_head_bfloat16(tmp_path):
    model = quantize_model(tiny_model(torch.bfloat16), lm_head=True)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.get_output_embeddings(), W8A16Linear)
    assert loaded.gpt_neox.embed_in.weight.dtype == torch.bfloat16
    assert_same_state(model, loaded)
    ids = torch.randint(0, 96, (2, 11))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["lm_head_quantized"] is True


def test_load_with_other_dtype_casts_only_float_tensors(tmp_path):
    model = quantize_model(tiny_model(torch.float16))
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, dtype=torch.float32)
    qkv, ref = loaded.gpt_neox.layers[0].attention.query_key_value, model.gpt_neox.layers[0].attention.query_key_value
    assert torch.equal(qkv.weight, ref.weight) and torch.equal(qkv.scales, ref.scales)
    assert qkv.bias.dtype == torch.float32 and torch.equal(qkv.bias, ref.bias.float())
    assert loaded.gpt_neox.embed_in.weight.dtype == torch.float32


def test_tied_embeddings_round_trip(tmp_path):
    model = quantize_model(tiny_model(torch.float16, tie_word_embeddings=True))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    ids = torch.randint(0, 96, (1, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_plain_from_pretrained_does_not_silently_load_int8(tmp_path):
    save_quantized(quantize_model(tiny_model()), tmp_path)
    with pytest.raises(OSError):
        GPTNeoXForCausalLM.from_pretrained(tmp_path)


def test_save_requires_a_quantized_gpt_neox_model(tmp_path):
    with pytest.raises(ValueError, match=r"save_quantized: model holds no W8A16Linear; call quantize_model"):
        save_quantized(tiny_model(), tmp_path)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    save_quantized(quantize_model(tiny_model()), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def rewrite_weights(ckpt: Path, edit) -> None:
    """Apply ``edit(state) -> state`` to the weight file and keep the manifest's byte count in step,
    so that the check under test, not the size check, is what fires."""
    path = ckpt / WEIGHTS_NAME
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["weights_bytes"] = path.stat().st_size
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _drop(key):
    def edit(sd):
        del sd[key]
        return sd
    return edit


def _set(key, fn):
    def edit(sd):
        sd[key] = fn(sd.get(key))
        return sd
    return edit


@pytest.mark.parametrize("edit, match", [
    (_drop("gpt_neox.layers.1.mlp.dense_h_to_4h.scales"),
     r"missing 1 tensor\(s\).*'gpt_neox.layers.1.mlp.dense_h_to_4h.scales'"),
    (_drop("gpt_neox.final_layer_norm.weight"), r"missing 1 tensor\(s\).*'gpt_neox.final_layer_norm.weight'"),
    (_set("gpt_neox.layers.0.attention.extra.weight", lambda _: torch.randn(4)),
     r"1 unexpected tensor\(s\).*'gpt_neox.layers.0.attention.extra.weight'"),
    (_set("gpt_neox.layers.0.attention.dense.weight", lambda t: t.half()),
     r"tensor 'gpt_neox.layers.0.attention.dense.weight' must be int8, found float16"),
    (_set("gpt_neox.layers.1.attention.query_key_value.scales", lambda t: t.half()),
     r"tensor 'gpt_neox.layers.1.attention.query_key_value.scales' must be float32, found float16"),
    (_set("gpt_neox.layers.0.mlp.dense_4h_to_h.bias", lambda t: t.float()),
     r"tensor 'gpt_neox.layers.0.mlp.dense_4h_to_h.bias' must be float16, found float32"),
    (_set("gpt_neox.layers.0.mlp.dense_4h_to_h.scales", lambda t: t[:-1].clone()),
     r"'gpt_neox.layers.0.mlp.dense_4h_to_h.scales' must have shape \[64\] .*found \[63\]"),
    (_set("gpt_neox.layers.0.mlp.dense_h_to_4h.scales", lambda t: t.clone().fill_(float("nan"))),
     r"'gpt_neox.layers.0.mlp.dense_h_to_4h.scales' \(per-channel scales\) must be finite and positive"),
])
def test_corrupt_tensors_are_named(ckpt, edit, match):
    rewrite_weights(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"load_quantized: .*" + match):
        load_quantized(ckpt)


def test_truncated_file_fails_size_check(ckpt):
    path = ckpt / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"is truncated or altered: manifest says \d+ bytes, found \d+"):
        load_quantized(ckpt)


def test_truncated_file_without_size_in_manifest(ckpt):
    # Even with the size check gone, safetensors' own header check must stop it.
    path = ckpt / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    del manifest["weights_bytes"]
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"cannot read .*model.w8a16.safetensors \(corrupt or truncated\)"):
        load_quantized(ckpt)


def test_config_that_does_not_match_the_weights(ckpt):
    edit_json(ckpt / "config.json", intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"must have shape \[128, 64\] \(from config.json\), found \[256, 64\]; "
                                              r"config.json does not match the weights"):
        load_quantized(ckpt)


def test_config_with_fewer_layers_than_the_weights(ckpt):
    edit_json(ckpt / "config.json", num_hidden_layers=1)
    with pytest.raises(CheckpointError,
                       match=r"manifest quantized_modules do not fit config.json \(num_hidden_layers=1\)"):
        load_quantized(ckpt)


def test_config_with_more_layers_than_the_weights(ckpt):
    edit_json(ckpt / "config.json", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing \d+ tensor\(s\).*gpt_neox.layers.2"):
        load_quantized(ckpt)


def test_manifest_dtype_disagrees_with_tensors(ckpt):
    edit_json(ckpt / MANIFEST_NAME, dtype="bfloat16")
    with pytest.raises(CheckpointError, match=r"must be bfloat16, found float16"):
        load_quantized(ckpt)


def test_non_gpt_neox_config_is_refused(ckpt):
    (ckpt / "config.json").write_text(GPT2Config(n_layer=1, n_embd=32, n_head=2).to_json_string())
    with pytest.raises(RuntimeError, match=r"load_quantized: checkpoint .* has config.model_type 'gpt2', "
                                           r"expected 'gpt_neox'"):
        load_quantized(ckpt)


def test_missing_manifest_and_bad_version(ckpt):
    manifest = (ckpt / MANIFEST_NAME).read_text()
    (ckpt / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"is not a W8A16 checkpoint \(w8a16_manifest.json not found\)"):
        load_quantized(ckpt)
    (ckpt / MANIFEST_NAME).write_text(manifest)
    edit_json(ckpt / MANIFEST_NAME, format_version=99)
    with pytest.raises(CheckpointError, match=r"has format_version 99, this library reads version 1"):
        load_quantized(ckpt)


def test_missing_weight_file(ckpt):
    (ckpt / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"weight file .*model.w8a16.safetensors not found"):
        load_quantized(ckpt)


def test_lm_head_saved_under_another_name_is_mapped(tmp_path):
    # transformers versions differ in the head's attribute name ('lm_head' vs 'embed_out');
    # the manifest records the name used at save time and the loader maps it.
    model = quantize_model(tiny_model(), lm_head=True)
    save_quantized(model, tmp_path)
    head = json.loads((tmp_path / MANIFEST_NAME).read_text())["lm_head_module"]
    other = "embed_out" if head != "embed_out" else "lm_head"
    rewrite_weights(tmp_path, lambda sd: {(other + k[len(head):] if k.startswith(head + ".") else k): v
                                          for k, v in sd.items()})
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["quantized_modules"] = [other if n == head else n for n in manifest["quantized_modules"]]
    manifest["lm_head_module"] = other
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    loaded = load_quantized(tmp_path)
    assert_same_state(model, loaded)


@pytest.mark.parametrize("edit,key", [
    (dict(num_attention_heads=2), "num_attention_heads"),
    (dict(use_parallel_residual=False), "use_parallel_residual"),
    (dict(partial_rotary_factor=1.0), "rope_parameters"),  # transformers 5 keeps it there
    (dict(layer_norm_eps=1e-3), "layer_norm_eps"),
], ids=["heads", "residual", "rotary", "eps"])
def test_shape_preserving_config_edit_is_refused(ckpt, edit, key):
    # These edits leave every tensor's shape as it was but change the logits: the manifest's
    # saved config values catch them.
    if key == "rope_parameters":
        rope = json.loads((ckpt / "config.json").read_text())[key]
        edit = {key: {**rope, **edit}}
    edit_json(ckpt / "config.json", **edit)
    with pytest.raises(CheckpointError, match=rf"config.json does not match the config the checkpoint was saved "
                                              rf"with: .*{key}: saved"):
        load_quantized(ckpt)


def test_non_gelu_activation_checkpoint_is_refused(ckpt):
    edit_json(ckpt / "config.json", hidden_act="relu")
    with pytest.raises(CheckpointError, match=r"config.hidden_act must be 'gelu' .* got 'relu'"):
        load_quantized(ckpt)


def test_manifest_records_the_compute_config(ckpt):
    saved = json.loads((ckpt / MANIFEST_NAME).read_text())["config"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert saved["num_attention_heads"] == cfg["num_attention_heads"]
    assert saved["hidden_act"] == "gelu" and "use_parallel_residual" in saved
