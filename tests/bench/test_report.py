"""bench.report and bench.cli: ratios, PPL marking, failed rows, CSV, dispatch, the header."""
from __future__ import annotations

import contextlib
import csv
import io

import pytest

from bench import cli, env, report, study


def _row(batch, mode, tok_s, peak_mb, ppl=10.0, meaningful=True, error=None):
    return dict(batch=batch, mode=mode, label=study.MODES[mode].label.format(dt="FP16", policy="H2O"), kv="full",
                tok_s=tok_s, peak_mb=peak_mb, ppl=ppl, ppl_meaningful=meaningful, total_s=1.0, compile_s=2.0,
                kv_mb=3.0, error=error)


def test_ratios_are_per_batch_against_fp16_full():
    rows = [_row(1, "fp16_full", 100.0, 6000.0), _row(1, "int8_full", 160.0, 3000.0),
            _row(16, "fp16_full", 1000.0, 20000.0), _row(16, "int8_h2o", 3000.0, 8000.0),
            _row(4, "int8_full", 50.0, None)]
    report.add_ratios(rows)
    assert rows[0]["speedup_vs_fp16_full"] == 1.0
    assert rows[1]["speedup_vs_fp16_full"] == pytest.approx(1.6)
    assert rows[1]["memory_vs_fp16_full"] == pytest.approx(0.5)
    assert rows[3]["speedup_vs_fp16_full"] == pytest.approx(3.0)
    assert rows[3]["memory_vs_fp16_full"] == pytest.approx(0.4)
    assert rows[4]["speedup_vs_fp16_full"] is None and rows[4]["memory_vs_fp16_full"] is None  # no base row


def test_table_marks_random_ppl_and_failures():
    rows = [_row(1, "fp16_full", 100.0, 6000.0, ppl=51234.5, meaningful=False),
            _row(1, "hf_compile", None, None, error="RuntimeError: boom\nmore")]
    report.add_ratios(rows)
    table = report.study_table(rows)
    assert "5.123e+04 (random)" in table
    assert "FAILED: RuntimeError: boom" in table and "more" not in table
    assert report.format_ppl(7.8754, True) == "7.875"
    assert report.format_ppl(None, True) == "n/a"


def test_csv_round_trip(tmp_path):
    rows = [dict(_row(1, "int8_full", 10.0, None), ppl_per_sequence=[1.5, 2.5])]
    report.write_csv(str(tmp_path / "r.csv"), rows, report.STUDY_FIELDS)
    with open(tmp_path / "r.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == report.STUDY_FIELDS
    assert got[0]["ppl_per_sequence"] == "[1.5, 2.5]" and got[0]["peak_mb"] == "" and got[0]["tok_s"] == "10.0"


def test_modes_parsing():
    assert study.parse_modes("default") == ["fp16_full", "int8_full", "int8_h2o"]
    assert study.parse_modes("default,hf_eager,hf_compile") == list(study.MODES)
    assert study.parse_modes("all") == list(study.MODES)
    assert study.parse_modes("+hf_compile") == ["fp16_full", "int8_full", "int8_h2o", "hf_compile"]
    assert study.parse_modes("hf_eager,fp16_full,hf_eager") == ["hf_eager", "fp16_full"]
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        study.parse_modes("fp16_full,fast")


def test_header_names_machine_versions_commit_and_command():
    import torch

    info = env.environment(torch.device("cpu"), env.command_line("kernels", ["--json", "a b.json"]))
    assert info["command"].endswith("-m bench kernels --json 'a b.json'")
    text = env.format_header("t", info)
    for key in ["date", "command", "git_commit", "gpu", "driver", "torch", "transformers", "cuda", "python"]:
        assert f"{key}: " in text
    assert info["git_commit"] != "unknown (not a git checkout)"
    assert len(info["git_commit"].split("-")[0]) == 12


def test_cli_dispatch_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Sub-commands: kernels, policies, attention" in out
    for flag in ["--model_path", "--ckpt_dir", "--prefill_len", "--decode_len", "--window", "--h2o_hh",
                 "--batch_size", "--dataset", "--tokenizer", "--dtype", "--modes", "--kv", "--json", "--csv",
                 "--plot", "--device"]:
        assert flag in out
    for sub in ["kernels", "policies", "attention"]:
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["kernels", "--dry_run", "--quick"]) == 0
    assert "24 cases" in buf.getvalue()


def test_study_bars_compare_rows_of_one_run():
    rows = [_row(1, "fp16_full", 300.0, 6000.0), _row(1, "int8_full", 600.0, 3300.0),
            _row(1, "int8_h2o", 590.0, 3400.0), _row(1, "hf_compile", 250.0, 6100.0),
            _row(16, "fp16_full", 2000.0, 20000.0), _row(16, "int8_full", 2400.0, 17000.0),
            _row(16, "int8_h2o", 4000.0, 8000.0)]
    bars = report.study_bars(rows)
    assert "PASS  batch 1: INT8 Full tok/s vs FP16 Full: 2.00x (bar >= 1.5x)" in bars
    assert "MISS  batch 1: INT8 H2O tok/s vs INT8 Full: 0.98x (bar >= 1x)" in bars
    assert "MISS  batch 1: FP16 Full tok/s vs HF compile (static cache): 1.20x (bar >= 1.3x)" in bars
    assert "PASS  batch 1: INT8 Full peak memory vs FP16 Full: 0.55x (bar <= 0.6x)" in bars
    assert "MISS  batch 16: INT8 Full tok/s vs FP16 Full: 1.20x (bar >= 1.3x)" in bars
    assert "PASS  batch 16: INT8 H2O tok/s vs INT8 Full: 1.67x (bar >= 1.5x)" in bars
    assert "PASS  batch 16: INT8 H2O peak memory vs FP16 Full: 0.40x (bar <= 0.45x)" in bars
    # INT8 Full's <= 0.6x memory bar is a batch-1 bar: at batch 16 the ratio is information
    assert not any(b.startswith(("PASS", "MISS")) and "batch 16: INT8 Full peak memory" in b for b in bars)
    assert any(b.startswith("info  batch 16: INT8 Full peak memory vs FP16 Full: 0.85x (no bar") for b in bars)
    assert not any("batch 16: FP16 Full tok/s vs HF compile" in b for b in bars)  # no hf_compile row at 16
    rows[1]["error"] = "OOM"
    assert not any(b[6:].startswith("batch 1: INT8 Full tok/s") for b in report.study_bars(rows))


def test_plot_title_is_wrapped_to_the_figure():
    cmd = "python -m bench --model_path random:pythia-2.8b --tokenizer " + "/very/long/path" * 20 + " --batch_size 16"
    title = f"NVIDIA H100 | random:pythia-2.8b | prefill 128, decode 2048 | 2026-11-25\n{cmd}"
    lines = report.plot_title_lines(title)
    assert lines[0] == "NVIDIA H100 | random:pythia-2.8b | prefill 128, decode 2048 | 2026-11-25"
    assert len(lines) >= 3 and all(len(x) <= report.PLOT_TITLE_WIDTH for x in lines)
    assert "".join(lines[1:]).replace(" ", "") == cmd.replace(" ", "")  # nothing dropped
    assert report.plot_title_lines("a\n\nb") == ["a", "", "b"]
