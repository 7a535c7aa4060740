"""`python -m model_patch.quantize`: output, sizes, and exit status 2 with a message on bad input."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model_patch import W8A16Linear, load_model, load_quantized, quantize_model
from model_patch.checkpoint import WEIGHTS_NAME
from model_patch.quantize import main
from model_patch.sources import MANIFEST_NAME

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_random_preset_matches_in_process_quantization(tmp_path, capsys):
    out = tmp_path / "p14m"
    assert main(["--model", "random:pythia-14m", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    sizes = re.search(r"weights: ([\d.]+) MB -> ([\d.]+) MB \(([\d.]+)x smaller", text)
    assert sizes, text
    before, after, ratio = map(float, sizes.groups())
    assert before > after > 0 and abs(before / after - ratio) < 0.01
    assert re.search(r"quantized linears \(24\): [\d.]+ MB -> [\d.]+ MB \(1\.9\dx smaller\)", text), text

    loaded = load_quantized(out)
    ref, _ = load_model("random:pythia-14m", dtype=torch.float16, device="cpu")
    quantize_model(ref)
    sa, sb = ref.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source_model"] == "random:pythia-14m" and manifest["dtype"] == "float16"
    assert manifest["quantized_modules"] and manifest["format_version"] == 1
    # Tensors only in safetensors, never pickle: every file is JSON, text or the one weight file.
    files = sorted(p.name for p in out.iterdir())
    assert [f for f in files if not f.endswith((".json", ".txt"))] == [WEIGHTS_NAME], files
    from safetensors import safe_open
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:  # parses as safetensors
        assert set(f.keys()) == set(manifest["tensors"])


def test_local_model_bfloat16_lm_head_tokenizer(tiny_neox_path, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["--model", str(tiny_neox_path), "--out", str(out), "--dtype", "bfloat16", "--lm-head",
                 "--device", "cpu"]) == 0
    assert "LM head int8" in capsys.readouterr().out
    model, tok = load_model(str(out), dtype=torch.bfloat16)
    assert isinstance(model.get_output_embeddings(), W8A16Linear)
    assert model.gpt_neox.embed_in.weight.dtype == torch.bfloat16
    assert tok is not None and (out / "tokenizer.json").exists()
    assert json.loads((out / MANIFEST_NAME).read_text())["lm_head_quantized"] is True
    # A quantized checkpoint as input is refused rather than quantized twice.
    err = _exit2(["--model", str(out), "--out", str(tmp_path / "again"), "--device", "cpu"], capsys)
    assert "quantize_model: model is already quantized" in err


def test_tokenizer_option(neox_tokenizer_path, tmp_path):
    out = tmp_path / "p14m"
    assert main(["--model", "random:pythia-14m", "--out", str(out), "--tokenizer", str(neox_tokenizer_path),
                 "--device", "cpu"]) == 0
    _, tok = load_model(str(out))
    assert tok("Hello world").input_ids == [12092, 1533]


def _exit2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "--model" in _exit2(["--out", out], capsys)
    assert "invalid choice: 'float8'" in _exit2(["--model", "random:pythia-14m", "--out", out, "--dtype", "float8"],
                                                capsys)
    err = _exit2(["--model", "./missing/model/dir", "--out", out], capsys)
    assert "local path './missing/model/dir' does not exist" in err
    err = _exit2(["--model", "random:pythia-7b", "--out", out], capsys)
    assert "unknown preset 'random:pythia-7b'" in err
    err = _exit2(["--model", "random:pythia-14m", "--out", out, "--tokenizer", str(tmp_path / "nope.json")], capsys)
    assert "--tokenizer" in err and "does not exist" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    err = _exit2(["--model", "random:pythia-14m", "--out", str(tmp_path / "full")], capsys)
    assert "is not empty (pass --overwrite" in err and (tmp_path / "full" / "x").read_text() == "keep me"


def test_non_gpt_neox_model_exits_2(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    err = _exit2(["--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")], capsys)
    assert "config.model_type 'gpt2', expected 'gpt_neox'" in err


def test_module_entry_point(tmp_path):
    # The real command line, once: `python -m model_patch.quantize` from the repository root.
    env = dict(os.environ, PYTHONPATH=REPO)
    ok = subprocess.run([sys.executable, "-m", "model_patch.quantize", "--model", "random:pythia-14m",
                         "--out", str(tmp_path / "o"), "--device", "cpu", "--lm-head"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "MB ->" in ok.stdout and (tmp_path / "o" / WEIGHTS_NAME).exists()
    bad = subprocess.run([sys.executable, "-m", "model_patch.quantize", "--model", "random:pythia-14m",
                          "--out", str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "is not empty" in bad.stderr
