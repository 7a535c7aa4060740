"""`python -m bench` (the study) on CPU: every mode, every column, PPL against HF, flags, fallback."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench import report, study
from bench.data import NEOX_TOKENIZER, SHARED

TINY = SHARED / "models" / "tiny-neox-a"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
P, D = 8, 6
BATCHES = (1, 2)


def _need(*paths):
    for p in paths:
        if not p.exists():
            pytest.skip(f"offline data not found: {p} (set W8A16_SHARED to the shared/ folder)")


def run_study(argv: list[str]) -> tuple[int, str]:
    """study.main in-process; returns (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = study.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """The first 20,000 characters of WikiText-2 test, byte-exact (CRLF kept)."""
    _need(WIKI)
    path = tmp_path_factory.mktemp("data") / "wiki.small.raw"
    with open(WIKI, encoding="utf-8", newline="") as f:
        path.write_text(f.read(20_000), encoding="utf-8", newline="")
    return path


@pytest.fixture(scope="module")
def all_modes(small_text, tmp_path_factory):
    """One CPU run of every mode at batch 1 and 2 on tiny-neox-a, with JSON and CSV."""
    _need(TINY)
    out_dir = tmp_path_factory.mktemp("out")
    argv = ["--model_path", str(TINY), "--dataset", str(small_text), "--modes", "all", "--batch_size", "1,2",
            "--prefill_len", str(P), "--decode_len", str(D), "--kv", "h2o:4,4", "--warmup_steps", "2",
            "--json", str(out_dir / "r.json"), "--csv", str(out_dir / "r.csv"), "--no_progress"]
    code, text = run_study(argv)
    payload = json.loads((out_dir / "r.json").read_text())
    return code, text, payload, out_dir / "r.csv"


def test_every_mode_runs(all_modes):
    code, text, payload, _ = all_modes
    assert code == 0, text
    rows = payload["rows"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(b, m) for b in BATCHES for m in study.MODES]
    for r in rows:
        assert r["error"] is None
        assert r["tok_s"] > 0 and r["decode_s"] > 0 and r["prefill_s"] > 0 and r["compile_s"] > 0
        assert r["total_s"] == pytest.approx(r["prefill_s"] + r["decode_s"])
        assert r["tok_s"] == pytest.approx(r["batch"] * D / r["decode_s"])
        assert r["n_scored_tokens"] == r["batch"] * D
        assert r["peak_mb"] is None and r["cuda_graphs"] is False  # CPU
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    by = {(r["batch"], r["mode"]): r for r in rows}
    assert by[1, "int8_h2o"]["kv"] == "h2o:4,4" and by[1, "int8_full"]["kv"] == "full"
    # the H2O cache holds budget + 1 slots, the full one prefill + decode
    assert by[2, "int8_h2o"]["kv_mb"] < by[2, "int8_full"]["kv_mb"]
    assert by[1, "hf_compile"]["compiled"] is True and by[1, "hf_eager"]["compiled"] is False


def test_table_holds_every_column(all_modes):
    _, text, _, _ = all_modes
    header = next(line for line in text.splitlines() if line.startswith("| batch"))
    for title in ["batch", "mode", "tok/s", "peak MB", "PPL", "total s", "compile s",
                  "speed-up vs FP32 Full", "memory vs FP32 Full", "KV policy", "KV MB"]:
        assert f" {title} " in header, title
    for label in ["FP32 Full", "INT8 Full", "INT8 H2O", "HF eager FP32", "HF compile FP32"]:
        rows = [line for line in text.splitlines() if line[:3] in ("| 1", "| 2")]
        assert sum(line.split("|")[2].strip() == label for line in rows) == len(BATCHES), label
    for line in ["git_commit", "torch", "transformers", "command", "date", "gpu", "driver", "cuda"]:
        assert f" {line}: " in text, line
    assert "CUDA graphs: SKIPPED (CPU run)" in text
    assert "(random)" not in text


def test_json_and_csv_hold_every_field(all_modes):
    _, _, payload, csv_path = all_modes
    for key in ["environment", "config", "rows", "notices", "notes", "model", "random_weights", "dataset"]:
        assert key in payload
    for r in payload["rows"]:
        assert set(report.STUDY_FIELDS) <= set(r), set(report.STUDY_FIELDS) - set(r)
    fp = {r["batch"]: r for r in payload["rows"] if r["mode"] == "fp16_full"}
    for r in payload["rows"]:
        assert r["speedup_vs_fp16_full"] == pytest.approx(r["tok_s"] / fp[r["batch"]]["tok_s"])
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == report.STUDY_FIELDS
    assert len(rows) == len(payload["rows"])
    assert float(rows[0]["ppl"]) == pytest.approx(payload["rows"][0]["ppl"])


def _hf_forward_ppl(batch: int, small_text) -> float:
    """Independent oracle: the HF model's own full forward over the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY))
    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    with open(small_text, encoding="utf-8", newline="") as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"]
    L = P + D + 1
    seqs = torch.tensor(ids[:batch * L]).view(batch, L)
    with torch.no_grad():
        logits = model(seqs[:, :-1]).logits.float()  # [B, L - 1, V]
    lp = torch.log_softmax(logits, -1).gather(2, seqs[:, 1:, None])[..., 0]  # predicts tokens 1 .. L-1
    scored = lp[:, P:]  # the decode steps predict tokens P + 1 .. P + D
    assert scored.shape == (batch, D)
    return math.exp(-scored.double().mean().item())


@pytest.mark.parametrize("batch", BATCHES)
def test_ppl_matches_hf_forward(all_modes, small_text, batch):
    _, _, payload, _ = all_modes
    want = _hf_forward_ppl(batch, small_text)
    rows = {r["mode"]: r for r in payload["rows"] if r["batch"] == batch}
    for mode in ("fp16_full", "hf_eager", "hf_compile", "int8_full"):
        assert rows[mode]["ppl"] == pytest.approx(want, rel=0.01), mode
    for mode in ("fp16_full", "hf_eager", "hf_compile"):  # same fp32 weights: far tighter than 1%
        assert rows[mode]["ppl"] == pytest.approx(want, rel=1e-4), mode
    assert rows["int8_full"]["ppl"] != rows["fp16_full"]["ppl"]  # really the quantized model
    assert rows["int8_h2o"]["ppl"] != rows["int8_full"]["ppl"]   # h2o:4,4 < prefill + decode: it evicts


def test_budget_at_least_the_sequence_evicts_nothing(small_text):
    _need(TINY)
    code, text = run_study(["--model_path", str(TINY), "--dataset", str(small_text), "--modes",
                            "int8_full,int8_h2o", "--prefill_len", str(P), "--decode_len", str(D),
                            "--h2o_hh", "7", "--window", str(P + D - 7), "--no_progress"])
    assert code == 0, text
    table = [line for line in text.splitlines() if line.startswith("| 1 ")]
    ppl = {line.split("|")[2].strip(): line.split("|")[5].strip() for line in table}
    assert ppl["INT8 H2O"] == ppl["INT8 Full"]
    assert f"h2o:7,{P + D - 7}" in text


def test_ckpt_dir_is_made_then_reused(small_text, tmp_path):
    _need(TINY)
    ckpt = tmp_path / "ckpt"
    argv = ["--model_path", str(TINY), "--dataset", str(small_text), "--modes", "int8_full", "--prefill_len",
            str(P), "--decode_len", str(D), "--ckpt_dir", str(ckpt), "--no_progress", "--json"]
    code, text = run_study(argv + [str(tmp_path / "a.json")])
    assert code == 0, text
    assert (ckpt / "w8a16_manifest.json").is_file() and "saved the checkpoint to" in text
    code, text = run_study(argv + [str(tmp_path / "b.json")])
    assert code == 0, text
    assert "loaded from --ckpt_dir" in text
    a, b = (json.loads((tmp_path / n).read_text())["rows"][0] for n in ("a.json", "b.json"))
    assert a["ppl"] == b["ppl"]


def _expect_exit2(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        run_study(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("argv, needles", [
    (["--prefill_len", "0"], ["--prefill_len", "must be a positive integer, got 0"]),
    (["--decode_len", "-3"], ["--decode_len", "must be a positive integer, got -3"]),
    (["--decode_len", "lots"], ["--decode_len", "expected a positive integer, got 'lots'"]),
    (["--window", "0"], ["--window", "must be a positive integer, got 0"]),
    (["--h2o_hh", "-1"], ["--h2o_hh", "must be a positive integer, got -1"]),
    (["--batch_size", "0"], ["--batch_size", "must be a positive integer, got 0"]),
    (["--batch_size", "1,x"], ["--batch_size", "got 'x'"]),
    (["--modes", "fp16_full,turbo"], ["--modes: unknown mode 'turbo'", "hf_compile"]),
    (["--kv", "lru:4"], ["--kv: unknown KV-cache policy 'lru:4'"]),
    (["--kv", "h2o:a,b"], ["--kv: KV-cache policy 'h2o:a,b': parameters must be integers"]),
    (["--kv", "window:0"], ["--kv: window policy: the budget must be >= 1 token"]),
    (["--dataset", "/no/such/file.raw"], ["--dataset /no/such/file.raw: no such file or directory"]),
    (["--model_path", "/no/such/model"], ["--model_path /no/such/model: no such model directory"]),
    (["--model_path", "random:pythia-3b"], ["unknown random preset", "pythia-2.8b"]),
    (["--tokenizer", "/no/such/tokenizer.json"], ["--tokenizer /no/such/tokenizer.json: no such file"]),
    (["--dtype", "float64"], ["--dtype: invalid choice: 'float64'"]),
    (["--json", "/no/such/dir/r.json"], ["--json /no/such/dir/r.json: directory /no/such/dir does not exist"]),
    (["--csv", "/no/such/dir/r.csv"], ["--csv /no/such/dir/r.csv: directory /no/such/dir does not exist"]),
    (["--device", "tpu"], ["--device tpu"]),
])
def test_bad_flags(capsys, argv, needles):
    _expect_exit2(capsys, argv, *needles)


def test_bad_ckpt_dir(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    _expect_exit2(capsys, ["--ckpt_dir", str(tmp_path / "file")], "exists and is not a directory")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "other.txt").write_text("x")
    _expect_exit2(capsys, ["--ckpt_dir", str(tmp_path / "junk")], "holds no INT8 checkpoint", "refusing")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_device_without_cuda(capsys):
    _expect_exit2(capsys, ["--device", "cuda"], "CUDA is not available")


def test_plot_flag(capsys, all_modes, tmp_path):
    missing = report.matplotlib_missing()
    if missing:
        _expect_exit2(capsys, ["--plot", str(tmp_path / "p.png")], "--plot needs matplotlib", "pip install")
    else:
        _, _, payload, _ = all_modes
        report.write_plot(str(tmp_path / "p.png"), payload["rows"], "test")
        assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataset_too_short_is_a_clear_error(capsys, tmp_path):
    _need(TINY)
    (tmp_path / "short.txt").write_text("only a few words here", encoding="utf-8")
    _expect_exit2(capsys, ["--model_path", str(TINY), "--dataset", str(tmp_path / "short.txt"),
                           "--prefill_len", "8", "--decode_len", "8", "--no_progress"],
                  "fewer than batch 1 x 17 (prefill + decode + 1)")


def _run_offline(argv, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))  # empty cache
    return subprocess.run([sys.executable, "-m", "bench"] + argv, capture_output=True, text=True, env=env,
                          timeout=600)


def test_unreachable_hub_falls_back_loudly(small_text, tmp_path):
    _need(NEOX_TOKENIZER)
    res = _run_offline(["--model_path", "EleutherAI/pythia-14m", "--tokenizer", str(NEOX_TOKENIZER),
                        "--dataset", str(small_text), "--modes", "fp16_full,int8_full", "--prefill_len", "4",
                        "--decode_len", "3", "--json", str(tmp_path / "r.json"), "--no_progress"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for stream in (res.stdout, res.stderr):
        assert "NOTICE: could not load 'EleutherAI/pythia-14m'" in stream
        assert "random:pythia-14m" in stream and "RANDOM WEIGHTS" in stream
    assert "the PPL column MEANS NOTHING" in res.stdout
    table = [line for line in res.stdout.splitlines() if line.startswith("| 1 ")]
    assert len(table) == 2 and all("(random)" in line for line in table)
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["model"] == "random:pythia-14m" and payload["random_weights"] is True
    assert all(r["ppl_meaningful"] is False for r in payload["rows"])
    assert "NOT cached" not in res.stdout  # no --ckpt_dir given


def test_unreachable_non_pythia_id_is_an_error(small_text, tmp_path):
    res = _run_offline(["--model_path", "some-org/some-model", "--dataset", str(small_text), "--no_progress"],
                       tmp_path)
    assert res.returncode == 2
    assert "'some-org/some-model' was read as a Hugging Face hub id but cannot be loaded" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.cuda
def test_study_on_gpu(small_text, tmp_path):
    """On a GPU: every mode with CUDA graphs, peak memory measured, PPL close to the CPU oracle."""
    _need(TINY)
    code, text = run_study(["--model_path", str(TINY), "--dataset", str(small_text), "--modes", "all",
                            "--batch_size", "1,2", "--prefill_len", "16", "--decode_len", "16", "--kv", "h2o:8,8",
                            "--json", str(tmp_path / "r.json"), "--no_progress"])
    assert code == 0, text
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    for r in rows:
        assert r["error"] is None and r["peak_mb"] > 0 and r["tok_s"] > 0
        assert r["cuda_graphs"] is (r["mode"] != "hf_eager")
    fp = {r["batch"]: r for r in rows if r["mode"] == "fp16_full"}
    for r in rows:
        if r["mode"] in ("hf_eager", "hf_compile", "int8_full"):
            assert r["ppl"] == pytest.approx(fp[r["batch"]]["ppl"], rel=0.02)
