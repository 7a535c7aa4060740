"""w8a16.linear / w8a16.linear_gelu: reference, fake, opcheck, compile, CUDA kernels, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_oracle import (assert_cuda_graph_recorded, assert_within_2x_torch, child_outputs, oracle, rel_err,
                           reset_compile_counters, torch_same_precision)

import w8a16_ops
from w8a16_ops import quantize_per_channel, reference

OPS = {"linear": torch.ops.w8a16.linear, "linear_gelu": torch.ops.w8a16.linear_gelu}

# Pythia-2.8B shapes (N, K) and the sizes the issue asks for.
PYTHIA_28B = {"qkv": (7680, 2560), "attn_out": (2560, 2560), "mlp_up": (10240, 2560),
              "mlp_down": (2560, 10240), "lm_head": (50304, 2560)}
AWKWARD_N = [(2568, 2560), (50277, 2560), (1, 2560)]
MS = [1, 2, 4, 8, 16, 32, 128, 2048, 3, 17, 33, 100]


def make_inputs(M, N, K, dtype, device, bias=True, x_scale=1.0):
    x = (torch.randn(M, K, device=device) * x_scale).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    s = (torch.rand(N, device=device) * 2e-3 + 1e-4).float()
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return x, w, s, b


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_matches_fp64_formula(name, dtype):
    x, w, s, b = make_inputs(5, 24, 48, dtype, "cpu")
    y = OPS[name](x, w, s, b)
    ref = x.double() @ w.double().t() * s.double() + b.double()
    if name == "linear_gelu":
        ref = F.gelu(ref)
    assert y.dtype == dtype and y.shape == (5, 24)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
    assert rel_err(y, ref.float()) < tol


def test_cpu_leading_dims_and_no_bias():
    x, w, s, _ = make_inputs(6, 40, 32, torch.bfloat16, "cpu")
    x3 = x.view(2, 3, 32)
    y = torch.ops.w8a16.linear(x3, w, s)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y.view(6, 40), reference.linear(x, w, s, None))


def test_gelu_is_exact_erf():
    x, w, s, b = make_inputs(4, 16, 32, torch.float32, "cpu")
    y = torch.ops.w8a16.linear_gelu(x, w, s, b)
    pre = torch.ops.w8a16.linear(x, w, s, b)
    torch.testing.assert_close(y, 0.5 * pre * (1 + torch.erf(pre / 2 ** 0.5)))
    assert not torch.allclose(y, F.gelu(pre, approximate="tanh"), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cpu(name, bias):
    x, w, s, b = make_inputs(3, 32, 64, torch.bfloat16, "cpu", bias=bias)
    torch.library.opcheck(OPS[name], (x, w, s, b))


class TwoOps(torch.nn.Module):
    def __init__(self, K, H, dtype, device):
        super().__init__()
        w1, s1 = quantize_per_channel(torch.randn(H, K, device=device))
        w2, s2 = quantize_per_channel(torch.randn(K, H, device=device))
        self.register_buffer("w1", w1)
        self.register_buffer("s1", s1)
        self.register_buffer("w2", w2)
        self.register_buffer("s2", s2)
        self.register_buffer("b1", torch.randn(H, device=device).to(dtype))

    def forward(self, x):
        h = torch.ops.w8a16.linear_gelu(x, self.w1, self.s1, self.b1)
        return torch.ops.w8a16.linear(h, self.w2, self.s2, None)


def test_compile_fullgraph_equals_eager_cpu():
    torch._dynamo.reset()
    m = TwoOps(64, 128, torch.float32, "cpu")
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), rtol=0, atol=0)


# ------------------------------------------------------------------ quantization


def test_quantize_per_channel_roundtrip_and_zero_rows():
    w = torch.randn(64, 96)
    w[3] = 0.0
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (64,)
    assert q.abs().max() <= 127 and torch.isfinite(s).all()
    assert (q[3] == 0).all() and s[3] == 1.0
    deq = w8a16_ops.dequantize_per_channel(q, s)
    # symmetric rounding: error at most half a step per element
    assert ((deq - w).abs() <= s[:, None] / 2 + 1e-7).all()
    # the largest magnitude of every non-zero row maps to +-127
    nz = torch.arange(64) != 3
    assert (q[nz].abs().amax(dim=1) == 127).all()


def test_quantize_per_channel_rejects_bad_input():
    with pytest.raises(ValueError, match="quantize_per_channel: w must be a floating tensor of shape"):
        quantize_per_channel(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_per_channel(torch.tensor([[1.0, float("nan")]]))


# ---------------------------------------------------------------------- bad input

def _bad_cases(device):
    dt = torch.float16
    x, w, s, b = make_inputs(4, 32, 64, dt, device)
    cases = [
        ("x must be float16 or bfloat16", (x.double(), w, s, b)),
        ("x must have shape \\[..., K\\], got a 0-d tensor", (x[0, 0], w, s, b)),
        ("weight must be int8 \\(or x's dtype, float16\\) of shape \\[N, K\\], got float32 \\[32, 64\\]",
         (x, w.float(), s, b)),
        ("weight must be int8 \\(or x's dtype, float16\\) of shape \\[N, K\\], got int8 \\[2048\\]",
         (x, w.flatten(), s, b)),
        ("weight must be contiguous", (x, w.t().contiguous().t(), s, b)),
        ("K mismatch: x has K=48 in its last dim, weight \\[N, K\\] has K=64", (x[:, :48], w, s, b)),
        ("scales must be float32 of shape \\[32\\], got float16 \\[32\\]", (x, w, s.half(), b)),
        ("scales must be float32 of shape \\[32\\], got float32 \\[31\\]", (x, w, s[:31], b)),
        ("bias must be float16 of shape \\[32\\], got float32 \\[32\\]", (x, w, s, b.float())),
        ("bias must be float16 of shape \\[32\\], got float16 \\[2, 16\\]", (x, w, s, b.view(2, 16))),
    ]
    return cases


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("idx", range(10))
def test_bad_input_same_error_eager_and_compiled(name, idx, device):
    msg, args = _bad_cases(device)[idx]
    op = OPS[name]
    full = f"w8a16.{name}: {msg}"
    if device == "cpu" and "float16 or bfloat16" in msg:  # the CPU reference also takes float32
        full = f"w8a16.{name}: x must be float16, bfloat16 or float32, got float64"
    with pytest.raises(RuntimeError, match=full):
        op(*args)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=full):
        torch.compile(lambda *a: op(*a), fullgraph=True)(*args)


# --------------------------------------------------------------------------- CUDA

cuda = pytest.mark.cuda


def _cases_numerics():
    out = []
    for shape_name, (N, K) in PYTHIA_28B.items():
        for M in MS:
            out.append((shape_name, M, N, K))
    for N, K in AWKWARD_N:
        for M in (1, 5, 16, 33, 100):
            out.append((f"N={N}", M, N, K))
    # 9-16 rows, few channel tiles, long K: on sm_90 the two-block cluster split of K (a partial
    # last tile, K not a multiple of the 128-wide chunk)
    for M in (9, 13, 16):
        out.append(("N=40-K=8208", M, 40, 8208))
    # x staged in shared memory at <= 8 rows (with N = 8192, more than two channel tiles per SM)
    # up to 44 KB, beside the kernel's static buffers (48 KB in all): both sides of that limit,
    # and the 48 KB that once failed to launch
    for M, K in ((8, 2816), (8, 2944), (3, 7424), (6, 4096)):
        out.append((f"x{M * K * 2 / 1024:g}KB", M, 8192, K))
    out.append(("K=320", 7, 1280, 320))  # tiny-neox-a: K not a multiple of the 128-wide chunk
    out.append(("K=80", 40, 96, 80))
    return out


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", _cases_numerics(), ids=lambda c: f"{c[0]}-M{c[1]}")
def test_cuda_numerics_vs_fp32_oracle(case, dtype):
    _, M, N, K = case
    x, w, s, b = make_inputs(M, N, K, dtype, "cuda")
    for name, gelu in (("linear", False), ("linear_gelu", True)):
        ref = oracle(x, w, s, b, gelu)
        ours = OPS[name](x, w, s, b)
        peer = torch_same_precision(x, w, s, b, gelu)
        assert ours.shape == (M, N) and ours.dtype == dtype
        assert torch.isfinite(ours).all()
        assert_within_2x_torch(ours, ref, peer, name)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 16, 256])
def test_cuda_large_magnitude_inputs_stay_finite(M, dtype):
    # x @ w.T reaches ~1e6 before scaling, beyond fp16's range: the kernel scales in
    # fp32 before rounding, so the (in-range) result stays finite.
    N, K = 512, 4096
    x, w, s, b = make_inputs(M, N, K, dtype, "cuda", x_scale=100.0)
    s = torch.full_like(s, 1e-3)
    ref = oracle(x, w, s, b, False)
    assert ref.abs().max() < 6e4  # the true result is in fp16 range
    y = torch.ops.w8a16.linear(x, w, s, b)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < 1e-2


@cuda
def test_cuda_no_bias_and_leading_dims():
    x, w, s, _ = make_inputs(12, 256, 512, torch.float16, "cuda")
    y = torch.ops.w8a16.linear(x.view(3, 4, 512), w, s)
    assert y.shape == (3, 4, 256)
    assert rel_err(y.view(12, 256), oracle(x, w, s, None, False)) < 2e-3


@cuda
def test_cuda_noncontiguous_x_is_accepted():
    x, w, s, b = make_inputs(64, 128, 256, torch.bfloat16, "cuda")
    xt = x.t().contiguous().t()
    torch.testing.assert_close(torch.ops.w8a16.linear(xt, w, s, b), torch.ops.w8a16.linear(x, w, s, b))


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of v (float64), normal range."""
    mant = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    e = torch.floor(torch.log2(v.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(e - mant)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 8, 16, 32, 128, 2048])  # gemv (staged x, 2 tiles, 4 row groups), gemm
def test_cuda_gelu_epilogue_is_faithful_to_float64_erf(M, dtype):
    # Identity int8 weight, scale 1, no bias: the epilogue's pre-activation is x itself, exactly,
    # so the kernel's GeLU is compared value by value with float64 y * erfc(-y / sqrt 2) / 2 on a
    # sweep of [-14, 14] (the normal CDF down to ~1e-44, where bf16 values still exist).
    K = N = 256
    x = torch.linspace(-14, 14, M * K, dtype=torch.float64)[torch.randperm(M * K)].reshape(M, K).to(dtype)
    w = torch.eye(N, K, dtype=torch.int8)
    s = torch.ones(N, dtype=torch.float32)
    y = torch.ops.w8a16.linear_gelu(x.cuda(), w.cuda(), s.cuda()).cpu().double()
    xd = x.double()
    exact = xd * torch.special.erfc(-xd / 2 ** 0.5) / 2
    # ex2.approx.ftz flushes 2^e below 2^-126: results under ~4x the smallest normal (bf16 only,
    # y < -13) may come out as 0, so the ulp check covers |result| >= 8x the smallest normal.
    tiny = 8 * torch.finfo(dtype).tiny
    normal = exact.abs() >= tiny
    err = (y - exact).abs()
    # faithful: within one unit in the last place wherever the result is a normal number ...
    worst = (err[normal] / _ulp(exact[normal], dtype)).max().item()
    assert worst <= 1.0, f"{worst:.3f} ulp"
    # ... rounded to nearest for all but a few values near a rounding boundary ...
    rounded = exact.to(dtype).double()
    assert (y[normal] != rounded[normal]).double().mean().item() < 1e-3
    # ... and no larger than that below it.
    assert (y[~normal].abs() <= tiny).all()
    assert torch.equal(y[xd >= 6], xd[xd >= 6])  # Phi rounds to 1


@cuda
def test_cuda_writes_every_output():
    # Poisoning the caching allocator's next block: outputs must all be overwritten.
    for M in (1, 9, 20, 77):
        junk = torch.full((M, 1000), float("nan"), device="cuda", dtype=torch.float16)
        del junk
        x, w, s, b = make_inputs(M, 1000, 256, torch.float16, "cuda")
        y = torch.ops.w8a16.linear(x, w, s, b)
        assert torch.isfinite(y).all()


@cuda
@pytest.mark.parametrize("M", [1, 12, 16])
def test_cuda_repeated_calls_are_bitwise_identical(M):
    # Every reduction order is fixed (warps, then the cluster ranks of the K split at 9-16 rows
    # on sm_90), so a call does not depend on the schedule: the decoder's compiled and eager
    # tokens rely on it.
    for N, K in ((40, 8208), (2560, 10240), (7680, 2560)):
        x, w, s, b = make_inputs(M, N, K, torch.float16, "cuda")
        first = torch.ops.w8a16.linear(x, w, s, b)
        for _ in range(3):
            assert torch.equal(torch.ops.w8a16.linear(x, w, s, b), first)


@cuda
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("M", [1, 40])
def test_opcheck_cuda(name, M):
    x, w, s, b = make_inputs(M, 256, 512, torch.bfloat16, "cuda")
    torch.library.opcheck(OPS[name], (x, w, s, b))


@cuda
def test_compile_fullgraph_equals_eager_cuda():
    torch._dynamo.reset()
    m = TwoOps(512, 1024, torch.float16, "cuda")
    for M in (1, 64):
        x = torch.randn(M, 512, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=0, atol=0)


@cuda
def test_reduce_overhead_really_captures_cuda_graph():
    reset_compile_counters()
    m = TwoOps(512, 1024, torch.float16, "cuda")
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    f = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        y = f(x)
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)
    assert_cuda_graph_recorded(x.device)


@cuda
@pytest.mark.parametrize("name", list(OPS))
def test_mixed_devices_error(name):
    x, w, s, b = make_inputs(4, 32, 64, torch.float16, "cuda")
    msg = (f"w8a16.{name}: all tensors must be on the same device, got x on cuda:0, weight on cpu, "
           "scales on cuda:0, bias on cuda:0")
    with pytest.raises(RuntimeError, match=msg):
        OPS[name](x, w.cpu(), s, b)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=msg):
        torch.compile(lambda *a: OPS[name](*a), fullgraph=True)(x, w.cpu(), s, b)


@cuda
@pytest.mark.parametrize("name", list(OPS))
def test_k_multiple_of_16_error(name):
    x, w, s, b = make_inputs(4, 32, 40, torch.float16, "cuda")
    msg = f"w8a16.{name}: K must be a multiple of 16 on CUDA, got K=40"
    with pytest.raises(RuntimeError, match=msg):
        OPS[name](x, w, s, b)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=msg):
        torch.compile(lambda *a: OPS[name](*a), fullgraph=True)(x, w, s, b)


@cuda
def test_old_gpu_gate(monkeypatch):
    # Pretend the GPU is a Turing (sm_75) card: eager and compiled calls both refuse it.
    import w8a16_ops._checks as checks

    monkeypatch.setattr(checks.torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    x, w, s, b = make_inputs(4, 32, 64, torch.float16, "cuda")
    msg = "w8a16.linear: requires compute capability >= 8.0, found 7.5"
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.w8a16.linear(x, w, s, b)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=msg):
        torch.compile(lambda *a: torch.ops.w8a16.linear(*a), fullgraph=True)(x, w, s, b)


@cuda
@pytest.mark.parametrize("M", [1, 12, 30])
def test_split_k_is_deterministic_and_resets(M):
    # Shapes whose launch is split over K (the last block reduces the partials):
    # repeated and interleaved calls must give bit-identical results.
    a = make_inputs(M, 2560, 10240, torch.float16, "cuda")
    b = make_inputs(M, 2568, 2560, torch.bfloat16, "cuda")
    ya = torch.ops.w8a16.linear(*a)
    yb = torch.ops.w8a16.linear_gelu(*b)
    for _ in range(3):
        assert torch.equal(torch.ops.w8a16.linear(*a), ya)
        assert torch.equal(torch.ops.w8a16.linear_gelu(*b), yb)
    assert rel_err(ya, oracle(*a, False)) <= 2 * rel_err(torch_same_precision(*a, False), oracle(*a, False)) + 1e-6


@cuda
@pytest.mark.parametrize("splits", ["1", "3", "7", "auto"])
@pytest.mark.parametrize("shape", [(128, 2560, 10240), (100, 1, 2560), (33, 40, 8208), (77, 2568, 512),
                                   (64, 50277, 256)],
                         ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_cuda_gemm_split_k_numerics(shape, splits, monkeypatch):
    # The M > 32 GEMM splits K over blocks when its tiles leave SMs idle; the partial sums
    # are added in split order by a second kernel that applies the epilogue. Every forced
    # split count must meet the oracle bar, and repeat bit for bit.
    if splits == "auto":
        monkeypatch.delenv("W8A16_GEMM_SPLITS", raising=False)
    else:
        monkeypatch.setenv("W8A16_GEMM_SPLITS", splits)
    M, N, K = shape
    for dtype, gelu in ((torch.float16, False), (torch.bfloat16, True)):
        x, w, s, b = make_inputs(M, N, K, dtype, "cuda")
        op = OPS["linear_gelu" if gelu else "linear"]
        y = op(x, w, s, b)
        ref = oracle(x, w, s, b, gelu)
        e_ours, e_peer = rel_err(y, ref), rel_err(torch_same_precision(x, w, s, b, gelu), ref)
        assert torch.isfinite(y).all()
        assert e_ours <= 2 * e_peer + 1e-6, f"splits={splits} {dtype}: ours {e_ours:.3e} vs torch {e_peer:.3e}"
        assert torch.equal(op(x, w, s, b), y)


@cuda
def test_cuda_gemm_split_counts_agree():
    # Different split counts only reorder fp32 additions: results agree to rounding.
    import os
    x, w, s, b = make_inputs(128, 2560, 10240, torch.float16, "cuda")
    old = os.environ.get("W8A16_GEMM_SPLITS")
    try:
        outs = []
        for n in ("1", "2", "13"):
            os.environ["W8A16_GEMM_SPLITS"] = n
            outs.append(torch.ops.w8a16.linear(x, w, s, b).float())
    finally:
        if old is None:
            os.environ.pop("W8A16_GEMM_SPLITS", None)
        else:
            os.environ["W8A16_GEMM_SPLITS"] = old
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=2e-3, atol=2e-3)


_KTILE_SCRIPT = """
import sys, torch, w8a16_ops
cases = torch.load(sys.argv[1])
out = [(torch.ops.w8a16.linear_gelu if gelu else torch.ops.w8a16.linear)(*a).cpu() for a, gelu in cases]
torch.save(out, sys.argv[2])
"""


@cuda
def test_cuda_gemm_k_tile_widths_agree_bit_for_bit(tmp_path):
    # An unsplit GEMM launch copies 64-wide k-tiles where two such blocks fit an SM (sm_90), else
    # 32-wide ones (sm_80); the k16 steps accumulate in the same order either way, so the results
    # are identical. W8A16_GEMM_KTILE (read once per process, hence the children) forces a width.
    torch.manual_seed(0)
    cases = []
    for (M, N, K), dtype, bias, gelu in (((2048, 2560, 2560), torch.float16, True, False),
                                         ((33, 2568, 2576), torch.bfloat16, True, True),  # K % 64 == 16
                                         ((200, 50277, 80), torch.float16, False, True),  # one partial k-tile
                                         ((129, 1, 10240), torch.bfloat16, False, False),
                                         ((300, 1280, 320), torch.float16, True, True)):
        cases.append((make_inputs(M, N, K, dtype, "cuda", bias=bias), gelu))
    # unsplit launches only (the split ones always take 32-wide tiles)
    y32, y64 = (child_outputs(tmp_path, _KTILE_SCRIPT, cases, f"ktile{width}",
                              W8A16_GEMM_KTILE=width, W8A16_GEMM_SPLITS="1") for width in ("32", "64"))
    assert len(y32) == len(y64) == len(cases)
    for (args, gelu), a, b in zip(cases, y32, y64):
        assert torch.equal(a, b)
        ref = oracle(*args, gelu)
        assert rel_err(b.cuda(), ref) <= 2 * rel_err(torch_same_precision(*args, gelu), ref) + 1e-6


@cuda
@pytest.mark.parametrize("value", ["0", "-2", "abc", "3x"])
def test_cuda_gemm_splits_env_rejects_bad_values(value, monkeypatch):
    monkeypatch.setenv("W8A16_GEMM_SPLITS", value)
    x, w, s, b = make_inputs(64, 256, 512, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="W8A16_GEMM_SPLITS must be an integer"):
        torch.ops.w8a16.linear(x, w, s, b)


@cuda
@pytest.mark.parametrize("M, N, K, name", [(4, 2560, 2560, "linear"), (128, 2560, 10240, "linear_gelu")],
                         ids=["gemv", "gemm-split-k"])
def test_raw_cuda_graph_replay(M, N, K, name):
    # gemm-split-k: the split-K workspace comes from the caching allocator, so it is capturable.
    x, w, s, b = make_inputs(M, N, K, torch.float16, "cuda")
    op = OPS[name]
    op(x, w, s, b)  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = op(x, w, s, b)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.testing.assert_close(y, op(x, w, s, b), rtol=0, atol=0)
