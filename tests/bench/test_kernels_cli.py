"""`python -m bench kernels`: arguments, byte accounting, the bar summary, a CPU smoke run, a GPU run."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from bench import kernels
from bench.cli import main as cli_main


def _main(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = kernels.main(argv)
    return code, out.getvalue()


def test_default_cases_are_the_issue_grid():
    a = kernels.parse_args(["--dry_run"])
    assert a.ms == [1, 2, 4, 8, 16, 32, 128, 2048]
    assert [(s.name, s.N, s.K, s.op) for s in a.shape_list] == [
        ("qkv", 7680, 2560, "linear"), ("attn_out", 2560, 2560, "linear"), ("mlp_up", 10240, 2560, "linear"),
        ("mlp_up_gelu", 10240, 2560, "linear_gelu"), ("mlp_down", 2560, 10240, "linear"),
        ("lm_head", 50304, 2560, "linear")]
    assert a.replays == 7
    q = kernels.parse_args(["--dry_run", "--quick"])
    assert q.ms == kernels.QUICK_M and q.replays == 3
    c = kernels.parse_args(["--dry_run", "--m", "3,17", "--shapes", "lm_head,qkv"])
    assert c.ms == [3, 17] and [s.name for s in c.shape_list] == ["lm_head", "qkv"]


@pytest.mark.parametrize("argv, needle", [
    (["--m", "0"], "--m: expected comma-separated positive integers, got '0'"),
    (["--m", "1,a"], "--m: expected comma-separated positive integers"),
    (["--shapes", "qkv,embed"], "--shapes: unknown shape(s) ['embed']"),
    (["--dtype", "float32"], "--dtype: invalid choice: 'float32'"),
    (["--replays", "0"], "--replays: must be >= 1, got 0"),
    (["--json", "/no/such/dir/k.json"], "--json /no/such/dir/k.json: directory does not exist"),
])
def test_bad_arguments(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        kernels.parse_args(argv + ["--dry_run"])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_gpu_says_what_to_do(capsys):
    with pytest.raises(SystemExit) as e:
        kernels.parse_args([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU found" in err and "--device cpu" in err and "--dry_run" in err


def test_bytes_counted_per_contender():
    M, N, K = 4, 7680, 2560
    io_bytes = 2 * (M * K + M * N) + 2 * N  # x, y, bias in fp16
    assert kernels.call_bytes("w8a16", M, N, K) == N * K + 4 * N + io_bytes
    assert kernels.call_bytes("dequant", M, N, K) == N * K + 2 * N + io_bytes
    assert kernels.call_bytes("fp16", M, N, K) == 2 * N * K + io_bytes


def test_dry_run_lists_every_case_through_the_cli():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["kernels", "--dry_run"]) == 0
    text = out.getvalue()
    assert "48 cases x 3 contenders" in text
    assert sum(line.startswith("| lm_head ") for line in text.splitlines()) == 8
    assert f" {kernels.call_bytes('w8a16', 1, 50304, 2560)} |" in text


def test_working_set_covers_l2():
    cuda = torch.device("cuda")
    l2 = 50 << 20
    small = kernels.call_bytes("w8a16", 1, 2560, 2560)  # 6.6 MB: needs many copies
    n = kernels.copies_for(small, l2, 4.0, cuda)
    assert n * small >= 4 * l2 and (n - 1) * small < 4 * l2
    assert kernels.copies_for(kernels.call_bytes("fp16", 2048, 50304, 2560), l2, 4.0, cuda) == 2


def _rows(pct, speedup, gelu_us=10.3):
    rows = []
    for s in kernels.SHAPES:
        for m in (1, 16, 2048):
            us = gelu_us if s.gelu else 10.0
            rows.append(dict(shape=s.name, M=m, impl="w8a16", us=us, pct_copy_bw=pct, speedup_vs_fp16=speedup))
    return rows


def test_bar_summary_reads_the_rows():
    good = kernels.bar_summary(_rows(pct=85.0, speedup=2.0, gelu_us=10.2))
    assert good and all(line.startswith("PASS") for line in good), good
    bad = kernels.bar_summary(_rows(pct=70.0, speedup=1.6, gelu_us=10.5))
    assert any(line.startswith("MISS  M 1-8, MLP + LM head, % copy BW: worst 70.0%") for line in bad), bad
    assert any(line.startswith("PASS  M 1-8, qkv + attn_out") for line in bad)
    assert any(line.startswith("MISS  M 1-8, every shape, speed-up vs fp16: worst 1.60x") for line in bad)
    assert any(line.startswith("MISS  linear_gelu vs linear, mlp_up M=1: +5.0%") for line in bad)


def test_cpu_smoke_run_writes_every_column(tmp_path):
    code, text = _main(["--device", "cpu", "--m", "1", "--shapes", "attn_out", "--replays", "1",
                        "--no_progress", "--json", str(tmp_path / "k.json")])
    assert code == 0
    assert "CPU run" in text and "copy bandwidth" in text
    payload = json.loads((tmp_path / "k.json").read_text())
    assert payload["copy_gb_s"] > 0 and payload["environment"]["command"].endswith(
        f"--json {tmp_path / 'k.json'}")
    rows = payload["rows"]
    assert [r["impl"] for r in rows] == ["w8a16", "fp16", "dequant"]
    for r in rows:
        assert set(kernels.KERNEL_FIELDS) <= set(r)
        assert r["us"] > 0 and r["gb_s"] == pytest.approx(r["bytes"] / r["us"] / 1e3)
        assert r["tflops"] == pytest.approx(2 * 2560 * 2560 / r["us"] / 1e6)
    assert rows[1]["speedup_vs_fp16"] == 1.0
    assert rows[0]["speedup_vs_fp16"] == pytest.approx(rows[1]["us"] / rows[0]["us"])
    header = next(line for line in text.splitlines() if line.startswith("| shape"))
    for title in ["µs", "GB/s", "% copy BW", "TFLOP/s", "vs fp16"]:
        assert f" {title} " in header


@pytest.mark.cuda
def test_gpu_quick_run(tmp_path):
    code, text = _main(["--m", "1,16", "--shapes", "attn_out,mlp_up,mlp_up_gelu", "--replays", "3",
                        "--no_progress", "--json", str(tmp_path / "k.json")])
    assert code == 0
    payload = json.loads((tmp_path / "k.json").read_text())
    assert 500 < payload["copy_gb_s"] < 20000
    for r in payload["rows"]:
        assert 0 < r["pct_copy_bw"] < 150, r  # above the copy ceiling would mean the L2 was timed
        assert r["calls_per_graph"] >= r["copies"] >= 2
        assert r["copies"] * r["bytes"] >= 4 * payload["l2_bytes"] or r["copies"] == 512
    assert "Issue 2 bars" in text
