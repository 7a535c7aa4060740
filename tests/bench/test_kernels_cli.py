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
        ("lm_head", 50304, 2560, "linear"),
        ("layer_in", 17920, 2560, "linear_pair"), ("layer_out", 2560, 12800, "linear_sum")]
    assert [(s.N_parts, s.K_parts) for s in a.shape_list[-2:]] == [("7680+10240", "2560"), ("2560", "2560+10240")]
    layer_in, layer_out = a.shape_list[-2:]
    assert [(p.name, p.gelu) for p in layer_in.parts] == [("qkv", False), ("mlp_up_gelu", True)]
    assert [p.name for p in layer_out.parts] == ["attn_out", "mlp_down"] and layer_out.summed
    assert a.replays == 7
    q = kernels.parse_args(["--dry_run", "--quick"])
    assert q.ms == kernels.QUICK_M and q.replays == 3
    c = kernels.parse_args(["--dry_run", "--m", "3,17", "--shapes", "lm_head,qkv"])
    assert c.ms == [3, 17] and [s.name for s in c.shape_list] == ["lm_head", "qkv"]
    f = kernels.parse_args(["--dry_run", "--shapes", "layer_in,layer_out"])
    assert [s.name for s in f.shape_list] == ["layer_in", "layer_out"]


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


@pytest.mark.parametrize("impl", ["w8a16", "w8a16 x2", "fp16", "dequant"])
@pytest.mark.parametrize("act", [2, 4])
def test_fused_bytes_are_the_fused_ops_minimum_for_every_contender(impl, act):
    """Both linears' call_bytes in the contender's weight format ('w8a16 x2' as 'w8a16'),
    linear_sum's output [M, N] counted once."""
    M = 16
    layer_in, layer_out = kernels.FUSED_SHAPES
    base = "w8a16" if impl == "w8a16 x2" else impl
    assert kernels.shape_bytes(layer_in, impl, M, act) == (
        kernels.call_bytes(base, M, 7680, 2560, act) + kernels.call_bytes(base, M, 10240, 2560, act))
    assert kernels.shape_bytes(layer_out, impl, M, act) == (
        kernels.call_bytes(base, M, 2560, 2560, act) + kernels.call_bytes(base, M, 2560, 10240, act)
        - act * M * 2560)
    weight = act if base == "fp16" else 1               # bytes per weight element
    scales = {"w8a16": 4, "dequant": act, "fp16": 0}[base]  # bytes per output channel
    # layer_out by hand: both weights, scales and biases, x1 [M, 2560] + x2 [M, 10240] in, y [M, 2560] out once
    assert kernels.shape_bytes(layer_out, impl, M, act) == (
        weight * 2560 * (2560 + 10240) + (scales + act) * 2 * 2560 + act * M * (2560 + 10240) + act * M * 2560)
    assert kernels.shape_bytes(layer_in, "w8a16", M, act) == kernels.shape_bytes(layer_in, "w8a16 x2", M, act)
    single = kernels.SHAPES[0]
    assert kernels.shape_bytes(single, base, M, act) == kernels.call_bytes(base, M, single.N, single.K, act)


def test_dry_run_lists_every_case_through_the_cli():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["kernels", "--dry_run"]) == 0
    text = out.getvalue()
    assert "48 cases x 3 contenders + 16 fused cases x 4 contenders (208 timings)" in text
    assert sum(line.startswith("| lm_head ") for line in text.splitlines()) == 8
    assert f" {kernels.call_bytes('w8a16', 1, 50304, 2560)} |" in text
    header = next(line for line in text.splitlines() if line.startswith("| shape"))
    assert [c.strip() for c in header.strip("|").split("|")][-4:] == [
        "bytes w8a16", "bytes w8a16 x2", "bytes fp16", "bytes dequant"]
    layer_in, layer_out = kernels.FUSED_SHAPES
    for shape, n, k in [(layer_in, "7680+10240", "2560"), (layer_out, "2560", "2560+10240")]:
        lines = [line for line in text.splitlines() if line.startswith(f"| {shape.name} ")]
        assert len(lines) == 8
        cells = [c.strip() for c in lines[0].strip("|").split("|")]
        assert cells[:5] == [shape.name, shape.op, "1", n, k]
        assert cells[5:] == [str(kernels.shape_bytes(shape, i, 1)) for i in kernels.FUSED_IMPLS]
    assert "layer_out's y counted once" in text
    single = _main(["--dry_run", "--shapes", "qkv,attn_out,mlp_up,mlp_up_gelu,mlp_down,lm_head"])[1]
    assert "48 cases x 3 contenders" in single and "bytes w8a16 x2" not in single  # as before the fused shapes
    fused = _main(["--dry_run", "--m", "1,16", "--shapes", "layer_in,layer_out"])[1]
    assert "4 fused cases x 4 contenders, dtype float16" in fused


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


def test_bar_summary_takes_the_gelu_bar_from_the_interleaved_pairs():
    rows = _rows(pct=85.0, speedup=2.0, gelu_us=10.5)  # the table rows: +5.0% at every M
    pairs = [dict(M=2048, linear_us=400.0, gelu_us=405.0, extra_pct=1.2, pairs=7),
             dict(M=16, linear_us=20.0, gelu_us=21.0, extra_pct=4.0, pairs=7)]
    lines = [line for line in kernels.bar_summary(rows, pairs) if "linear_gelu" in line]
    assert lines == [
        "MISS  linear_gelu vs linear, mlp_up M=1: +5.0% time (bar <= +3%)",
        "MISS  linear_gelu vs linear, mlp_up M=16: +4.0% time (median of 7 interleaved replay pairs; "
        "table rows +5.0%) (bar <= +3%)",
        "PASS  linear_gelu vs linear, mlp_up M=2048: +1.2% time (median of 7 interleaved replay pairs; "
        "table rows +5.0%) (bar <= +3%)",
    ]
    # A paired M the table lacks still gets its line; without pairs the table decides, as before.
    only = kernels.bar_summary(rows, [dict(M=4, linear_us=1.0, gelu_us=1.0, extra_pct=0.5, pairs=3)])
    assert "PASS  linear_gelu vs linear, mlp_up M=4: +0.5% time (median of 3 interleaved replay pairs) " \
           "(bar <= +3%)" in only
    assert kernels.bar_summary(rows, []) == kernels.bar_summary(rows)


def test_paired_timer_interleaves_and_times_each_side():
    import time

    calls = []

    def fast(i):
        calls.append("a")
        time.sleep(0.001)

    def slow(i):
        calls.append("b")
        time.sleep(0.003)

    timer = kernels.Timer(torch.device("cpu"), replays=4)
    pairs = timer.paired(fast, slow, copies=2)
    assert len(pairs) == 4 and all(b > 1.5 * a > 0 for a, b in pairs), pairs
    # warm-up a, b; then pairs in alternating order: ab, ba, ab, ba (2 calls each, one per copy)
    assert "".join(calls) == "ab" + "aabb" + "bbaa" + "aabb" + "bbaa"


def test_gelu_pairs_times_both_ops_on_the_same_tensors():
    import w8a16_ops  # noqa: F401  (registers the ops)

    seen = {"linear": [], "linear_gelu": []}

    def spy(name):
        op = getattr(torch.ops.w8a16, name)

        def call(x, *rest):
            seen[name].append(x.data_ptr())
            return op(x, *rest)
        return call

    timer = kernels.Timer(torch.device("cpu"), replays=3)
    out = kernels.gelu_pairs([1], torch.float16, torch.device("cpu"), timer, 0, 4.0, progress=False,
                             ops=(spy("linear"), spy("linear_gelu")))
    assert len(out) == 1 and out[0]["M"] == 1 and out[0]["pairs"] == 3
    assert out[0]["linear_us"] > 0 and out[0]["gelu_us"] > 0 and abs(out[0]["extra_pct"]) < 1e4
    # both ops ran on the same inputs (every copy), the same number of times
    assert seen["linear"] and sorted(seen["linear"]) == sorted(seen["linear_gelu"])


def _fused_rows(fused_us, split_us, ms=(1, 16, 2048)):
    rows = []
    for s in kernels.FUSED_SHAPES:
        for m in ms:
            for impl, us in [("w8a16", fused_us), ("w8a16 x2", split_us), ("fp16", 30.0), ("dequant", 90.0)]:
                rows.append(dict(shape=s.name, M=m, impl=impl, us=us, pct_copy_bw=1.0, speedup_vs_fp16=0.1))
    return rows


def test_bar_summary_ignores_the_fused_shapes():
    for base in (_rows(pct=85.0, speedup=2.0, gelu_us=10.2), _rows(pct=70.0, speedup=1.6, gelu_us=10.5)):
        alone = kernels.bar_summary(base)
        assert len(alone) == 5 + 3 and all(line[:4] in ("PASS", "MISS") for line in alone)
        assert kernels.bar_summary(base + _fused_rows(20.0, 25.0)) == alone
        assert kernels.bar_summary(_fused_rows(20.0, 25.0) + base) == alone


def test_fused_summary_is_info_at_m_1_and_16():
    lines = kernels.fused_summary(_fused_rows(fused_us=20.0, split_us=25.0))
    assert len(lines) == 4 and all(line.startswith("info  ") for line in lines)
    assert not any("PASS" in line or "MISS" in line for line in lines)
    assert lines[0] == ("info  layer_in (linear_pair: qkv + mlp_up_gelu) M=1: fused 20.00 µs vs 25.00 µs for the "
                        "two separate w8a16 calls (1.25x, -5.00 µs)")
    assert [line.split(" M=")[1].split(":")[0] for line in lines] == ["1", "16", "1", "16"]
    assert "layer_out (linear_sum: attn_out + mlp_down) M=16" in lines[3]
    assert kernels.fused_summary(_rows(pct=85.0, speedup=2.0)) == []


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


def _small_fused(monkeypatch):
    """The fused shapes at toy sizes (same names, ops and structure), so the CPU run stays fast."""
    qkv, up = kernels.Shape("qkv", 96, 64), kernels.Shape("mlp_up_gelu", 128, 64, gelu=True)
    attn, down = kernels.Shape("attn_out", 64, 64), kernels.Shape("mlp_down", 64, 128)
    small = [kernels.FusedShape("layer_in", qkv, up), kernels.FusedShape("layer_out", attn, down, summed=True)]
    monkeypatch.setattr(kernels, "ALL_SHAPES", kernels.SHAPES + small)
    return small


def test_cpu_run_times_the_fused_shapes(tmp_path, monkeypatch):
    layer_in, layer_out = _small_fused(monkeypatch)
    code, text = _main(["--device", "cpu", "--m", "1,3", "--shapes", "layer_in,layer_out", "--replays", "1",
                        "--no_progress", "--json", str(tmp_path / "k.json")])
    assert code == 0
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert [(r["shape"], r["M"], r["impl"]) for r in rows] == [
        (s, m, i) for s in ("layer_in", "layer_out") for m in (1, 3) for i in ["w8a16", "w8a16 x2", "fp16", "dequant"]]
    for r in rows:
        shape = layer_in if r["shape"] == "layer_in" else layer_out
        assert set(kernels.KERNEL_FIELDS) <= set(r)
        assert r["op"] == shape.op and (r["N"], r["K"]) == (shape.N, shape.K)
        assert (r["N_parts"], r["K_parts"]) == ((("96+128", "64") if shape is layer_in else ("64", "64+128")))
        assert r["bytes"] == kernels.shape_bytes(shape, r["impl"], r["M"])
        assert r["us"] > 0 and r["gb_s"] == pytest.approx(r["bytes"] / r["us"] / 1e3)
        assert r["tflops"] == pytest.approx(2 * r["M"] * r["N"] * r["K"] / r["us"] / 1e6)
        assert r["pct_copy_bw"] > 0
    for i in range(0, len(rows), 4):
        fp16 = rows[i + 2]["us"]
        assert [r["speedup_vs_fp16"] for r in rows[i:i + 4]] == pytest.approx([fp16 / r["us"] for r in rows[i:i + 4]])
    table = [line for line in text.splitlines() if line.startswith("| layer_")]
    assert len(table) == 16 and "| 96+128 " in table[0] and "| 64+128 " in table[-1] and "| w8a16 x2 " in table[1]
    assert "layer_out's y counted once" in text


def test_cpu_w16_contender(tmp_path, monkeypatch):
    # --w16 adds the ops with 16-bit weights after the usual contenders, single and fused shapes alike,
    # counted with 2-byte weights and fp32 scales; without the flag the rows are as before.
    _small_fused(monkeypatch)
    code, text = _main(["--device", "cpu", "--m", "2", "--shapes", "attn_out,layer_out", "--replays", "1", "--w16",
                        "--no_progress", "--json", str(tmp_path / "k.json")])
    assert code == 0
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert [(r["shape"], r["impl"]) for r in rows] == (
        [("attn_out", i) for i in ["w8a16", "fp16", "dequant", "w16"]]
        + [("layer_out", i) for i in ["w8a16", "w8a16 x2", "fp16", "dequant", "w16"]])
    assert rows[3]["bytes"] == 2 * 2560 * 2560 + 4 * 2560 + 2 * (2 * 2560 + 2 * 2560 + 2560)
    assert rows[-1]["bytes"] == kernels.shape_bytes(kernels.ALL_SHAPES[-1], "w16", 2)
    assert rows[3]["speedup_vs_fp16"] == pytest.approx(rows[1]["us"] / rows[3]["us"])
    assert "| w16 " in text
    code, text = _main(["--dry_run", "--m", "1", "--shapes", "attn_out", "--w16"])
    assert code == 0 and "x 4 contenders" in text and "bytes w16" in text


def test_w16_contender_computes_the_layer_op(monkeypatch):
    """The w16 contender's fused op equals its two separate calls on the reference (CPU)."""
    cpu = torch.device("cpu")
    for shape in _small_fused(monkeypatch):
        torch.manual_seed(2)
        sets = [kernels._tensors("w16", 3, p.N, p.K, torch.float32, cpu) for p in shape.parts]
        assert sets[0][1].dtype == torch.float32 and torch.equal(sets[0][2], torch.ones(shape.first.N))
        torch.manual_seed(2)
        fused = kernels._contender("w16", shape, 3, torch.float32, cpu, 1)(0)
        one, two = (kernels._single_call("w16", p)(t) for p, t in zip(shape.parts, sets))
        if shape.summed:
            torch.testing.assert_close(fused, one + two, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(fused[0], one) and torch.testing.assert_close(fused[1], two)


def test_fused_contenders_compute_the_same_layer_op(monkeypatch):
    """On CPU (the reference ops), with the same tensors, the fused op, its two separate w8a16 calls and
    the dequant recipe give the same outputs: GeLU on layer_in's second output, layer_out summed."""
    cpu = torch.device("cpu")
    for shape in _small_fused(monkeypatch):
        outs = {}
        for impl in ["w8a16", "w8a16 x2", "dequant"]:
            torch.manual_seed(1)  # same x, weights and biases for every contender
            outs[impl] = kernels._contender(impl, shape, 3, torch.float32, cpu, 1)(0)
        if shape.summed:
            assert outs["w8a16"].shape == (3, 64)
            for impl in ["w8a16 x2", "dequant"]:
                torch.testing.assert_close(outs[impl], outs["w8a16"], rtol=1e-5, atol=1e-5)
        else:
            assert [t.shape for t in outs["w8a16"]] == [(3, 96), (3, 128)]
            assert outs["w8a16"][1].min() >= -0.2  # GeLU applied to the second output
            for impl in ["w8a16 x2", "dequant"]:
                for got, want in zip(outs[impl], outs["w8a16"]):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_gpu_quick_run(tmp_path):
    code, text = _main(["--m", "1,16", "--shapes", "attn_out,mlp_up,mlp_up_gelu,layer_in,layer_out", "--replays", "3",
                        "--no_progress", "--json", str(tmp_path / "k.json")])
    assert code == 0
    payload = json.loads((tmp_path / "k.json").read_text())
    assert 500 < payload["copy_gb_s"] < 20000
    for r in payload["rows"]:
        assert 0 < r["pct_copy_bw"] < 150, r  # above the copy ceiling would mean the L2 was timed
        assert r["calls_per_graph"] >= r["copies"] >= 2
        assert r["copies"] * r["bytes"] >= 4 * payload["l2_bytes"] or r["copies"] == 512
    assert "Issue 2 bars" in text
    assert [p["M"] for p in payload["gelu_pairs"]] == [1, 16]
    assert all(p["pairs"] == 3 and p["linear_us"] > 0 and p["gelu_us"] > 0 for p in payload["gelu_pairs"])
    gelu_lines = [line for line in payload["bars"] if "linear_gelu vs linear" in line]
    assert len(gelu_lines) == 2 and all("median of 3 interleaved replay pairs; table rows" in x for x in gelu_lines)
    assert len(payload["fused_info"]) == 4 and all(line.startswith("info  layer_") for line in payload["fused_info"])
    assert "Fused layer ops" in text
