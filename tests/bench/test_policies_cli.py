"""`python -m bench policies`: arguments, and a short run on tiny-neox-a + Gutenberg against the oracle."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from bench import policies
from bench.cli import main as cli_main


@pytest.mark.parametrize("argv, needle", [
    (["--policies", "full", "lru:4"], "--policies: unknown KV-cache policy 'lru:4'"),
    (["--policies", "h2o:1"], "h2o takes 2 integer parameter(s), got 1"),
    (["--decode_len", "0"], "--decode_len: must be a positive integer, got 0"),
    (["--n_seqs", "-1"], "--n_seqs: must be a positive integer, got -1"),
    (["--chars", "9:3"], "--chars: expected START:END with 0 <= START < END, got '9:3'"),
    (["--dataset", "/no/such.jsonl"], "--dataset /no/such.jsonl: no such file or directory"),
    (["--model_path", "/no/such/model"], "--model_path /no/such/model: no such model directory"),
])
def test_bad_arguments(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        policies.parse_args(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_default_policies_cover_both_budgets():
    a = policies.parse_args(["--device", "cpu"])
    budgets = {str(s): s.budget for s in a.policy_specs}
    assert budgets["full"] is None
    for name in ["h2o:252,252", "sink:4,500", "window:504", "h2o:50,454"]:
        assert budgets[name] == 504
    for name in ["h2o:128,128", "h2o:64,192", "h2o:25,231", "window:256", "sink:4,252"]:
        assert budgets[name] == 256
    assert (a.prefill_len, a.decode_len, a.n_seqs, a.char_range) == (128, 2048, 4, (10000, 400000))
    assert a.dtype == "float32"


def test_short_run_matches_the_oracle(tiny_neox_path, gutenberg_path, tmp_path):
    P, D = 12, 10
    argv = ["policies", "--model_path", str(tiny_neox_path), "--dataset", str(gutenberg_path), "--device", "cpu",
            "--prefill_len", str(P), "--decode_len", str(D), "--n_seqs", "2",
            "--policies", "full", "h2o:3,5", "window:8", "h2o:40,40",
            "--reference", "--no_progress", "--json", str(tmp_path / "p.json")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(argv) == 0
    text = out.getvalue()
    payload = json.loads((tmp_path / "p.json").read_text())
    assert payload["sequences"].startswith("docs: first 2 documents, characters [10000:400000]")
    rows = {r["policy"]: r for r in payload["rows"]}
    assert list(rows) == ["full", "h2o:3,5", "window:8", "h2o:40,40"]
    for r in rows.values():
        assert set(policies.POLICY_FIELDS) <= set(r)
        assert r["ppl"] == pytest.approx(r["ref_ppl"], rel=1e-3)  # fp32 fast path vs fp32 oracle
        assert len(r["ppl_per_sequence"]) == 2
    assert rows["full"]["vs_full_pct"] == 0
    assert rows["h2o:40,40"]["ppl"] == pytest.approx(rows["full"]["ppl"], rel=1e-5)  # budget >= sequence
    assert rows["h2o:3,5"]["ppl"] != rows["full"]["ppl"] and rows["window:8"]["ppl"] != rows["full"]["ppl"]
    assert rows["h2o:3,5"]["vs_full_pct"] == pytest.approx(100 * (rows["h2o:3,5"]["ppl"] / rows["full"]["ppl"] - 1))
    assert rows["h2o:3,5"]["kv_mb"] < rows["full"]["kv_mb"]
    assert rows["h2o:3,5"]["budget"] == 8 and rows["full"]["budget"] == P + D
    header = next(line for line in text.splitlines() if line.startswith("| policy"))
    for title in ["budget", "PPL", "vs full", "KV MB", "PPL fp32 oracle", "fast vs oracle"]:
        assert f" {title} " in header


@pytest.mark.cuda
def test_gpu_fp16_compiled_path_is_close_to_the_oracle(tiny_neox_path, gutenberg_path, tmp_path):
    """The fp16 CUDA-graph decode path against the fp32 CPU oracle (issue 4 asks for 0.5% at full length)."""
    argv = ["policies", "--model_path", str(tiny_neox_path), "--dataset", str(gutenberg_path), "--device", "cuda",
            "--prefill_len", "64", "--decode_len", "128", "--n_seqs", "2", "--policies", "full", "h2o:16,32",
            "--reference", "--no_progress", "--json", str(tmp_path / "p.json")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(argv) == 0
    text = out.getvalue()
    assert "decode steps compiled (CUDA graphs)" in text and "dtype float16" in text
    for r in json.loads((tmp_path / "p.json").read_text())["rows"]:
        assert abs(r["fast_vs_ref_pct"]) < 1.0, r
