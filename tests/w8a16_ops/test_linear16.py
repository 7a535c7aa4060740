"""The w8a16 linear ops with 16-bit weights (weight in x's dtype, fp32 scales): the unquantized form
that ``Decoder(fuse16=True)`` runs an FP16 / BF16 model's decode steps through. Up to 32 rows the
CUDA ops run the same gemv as the int8 weights (128 bytes of each weight row a chunk, no
dequantization); above, torch's matmul into fp32 and the one-pass epilogue kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_oracle import (assert_cuda_graph_recorded, assert_same_error_eager_and_compiled, assert_within_2x_torch,
                           rel_err, reset_compile_counters)

import w8a16_ops  # noqa: F401  (registers the ops; builds the CUDA kernels on a GPU machine)

LIN, GELU = torch.ops.w8a16.linear, torch.ops.w8a16.linear_gelu
PAIR, SUM = torch.ops.w8a16.linear_pair, torch.ops.w8a16.linear_sum
cuda = pytest.mark.cuda

PYTHIA_28B = {"qkv": (7680, 2560), "attn_out": (2560, 2560), "mlp_up": (10240, 2560),
              "mlp_down": (2560, 10240), "lm_head": (50304, 2560)}


def make16(lead, N, K, dtype, device, bias=True, x_scale=1.0, unit=False):
    """(x [*lead, K], weight [N, K] in x's dtype, scales fp32 [N], bias [N] or None); weights
    ~ N(0, 1/K) like a trained layer's; scales 1 (``unit``) or random in [0.5, 1.5]."""
    x = (torch.randn(*lead, K, device=device) * x_scale).to(dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    s = torch.ones(N, device=device) if unit else torch.rand(N, device=device) + 0.5
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return x, w, s, b


def oracle16(x, w, s, b, gelu=False):
    y = (x.double() @ w.double().t()) * s.double()
    if b is not None:
        y = y + b.double()
    return (F.gelu(y) if gelu else y).float()


def peer16(x, w, s, b, gelu=False):
    """What a user would write in torch at the activation precision."""
    y = F.linear(x, w) * s
    if b is not None:
        y = y + b
    y = y.to(x.dtype)
    return F.gelu(y) if gelu else y


# ----------------------------------------------------------------------------- CPU

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cpu_matches_oracle(dtype):
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    x, w, s, b = make16((2, 3), 24, 48, dtype, "cpu")
    for op, gelu in ((LIN, False), (GELU, True)):
        y = op(x, w, s, b)
        assert y.shape == (2, 3, 24) and y.dtype == dtype
        assert rel_err(y, oracle16(x, w, s, b, gelu)) < tol
    a, c = make16((5,), 24, 48, dtype, "cpu"), make16((5,), 40, 32, dtype, "cpu")
    y1, y2 = PAIR(*a, *c, gelu2=True)
    assert rel_err(y1, oracle16(*a)) < tol and rel_err(y2, oracle16(*c, True)) < tol
    c = make16((5,), 24, 32, dtype, "cpu")
    assert rel_err(SUM(*a, *c), oracle16(*a) + oracle16(*c)) < tol


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cpu(bias):
    x, w, s, b = make16((3,), 32, 64, torch.bfloat16, "cpu", bias=bias)
    for op in (LIN, GELU):
        torch.library.opcheck(op, (x, w, s, b))
    a, c = make16((3,), 32, 64, torch.bfloat16, "cpu", bias=bias), make16((3,), 32, 48, torch.bfloat16, "cpu")
    torch.library.opcheck(PAIR, (*a, *c), {"gelu2": True})
    torch.library.opcheck(SUM, (*a, *c))


def test_compile_fullgraph_equals_eager_cpu():
    a, c = make16((4,), 32, 64, torch.float32, "cpu"), make16((4,), 32, 48, torch.float32, "cpu")

    def f(*args):
        y1, y2 = PAIR(*args, gelu2=True)
        return y1, y2, SUM(*args), GELU(*args[:4])

    torch._dynamo.reset()
    for u, v in zip(torch.compile(f, fullgraph=True)(*a, *c), f(*a, *c)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_bad_weight_dtypes_same_error_eager_and_compiled(device):
    dt = torch.float16
    x, w, s, b = make16((4,), 32, 64, dt, device)
    q = torch.randint(-127, 128, (32, 64), dtype=torch.int8, device=device)
    assert_same_error_eager_and_compiled(
        LIN, (x, w.bfloat16(), s, b),
        "w8a16.linear: weight must be int8 (or x's dtype, float16) of shape [N, K], got bfloat16 [32, 64]")
    assert_same_error_eager_and_compiled(
        PAIR, (x, q, s, b, x, w, s, b),
        "w8a16.linear_pair: weight1 and weight2 must have the same dtype, got int8 and float16")
    ws = w8a16_ops.norm_workspace(32, device=device)
    nrm = torch.ones(32, dtype=dt, device=device)
    assert_same_error_eager_and_compiled(
        torch.ops.w8a16.linear_sum_norm, (x, w, s, b, x, w, s, b, torch.zeros(4, 32, dtype=dt, device=device),
                                          nrm, nrm, nrm, nrm, 1e-5, ws),
        "w8a16.linear_sum_norm: weight1 and weight2 must be int8 (16-bit weights are not supported by this op), "
        "got float16")


# --------------------------------------------------------------------------- CUDA

def _numerics_cases():
    out = [(name, M, N, K) for name, (N, K) in PYTHIA_28B.items() for M in (1, 2, 4, 8, 16, 32, 3, 17, 33, 100)]
    out += [(f"N={N}", M, N, 2560) for N in (2568, 50277, 1) for M in (1, 5, 16, 33)]
    out += [("K=320", 7, 1280, 320), ("K=80", 3, 96, 80), ("K=8208", 13, 40, 8208), ("x44KB", 8, 8192, 2816)]
    return out


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", _numerics_cases(), ids=lambda c: f"{c[0]}-M{c[1]}")
def test_cuda_numerics_vs_fp64_oracle(case, dtype):
    _, M, N, K = case
    x, w, s, b = make16((M,), N, K, dtype, "cuda")
    for op, gelu in ((LIN, False), (GELU, True)):
        ours = op(x, w, s, b)
        assert ours.shape == (M, N) and ours.dtype == dtype and torch.isfinite(ours).all()
        assert_within_2x_torch(ours, oracle16(x, w, s, b, gelu), peer16(x, w, s, b, gelu), f"gelu={gelu}")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 4, 8, 9, 16, 32, 40])
def test_cuda_pair_and_sum_vs_oracle(M, dtype):
    # Decoder shapes: QKV + MLP-up (GeLU) on two inputs, attention dense + MLP-down summed.
    qkv, up = make16((M,), 7680, 2560, dtype, "cuda"), make16((M,), 10240, 2560, dtype, "cuda")
    y1, y2 = PAIR(*qkv, *up, gelu2=True)
    assert_within_2x_torch(y1, oracle16(*qkv), peer16(*qkv), "pair 1")
    assert_within_2x_torch(y2, oracle16(*up, True), peer16(*up, True), "pair 2")
    dense, down = make16((M,), 2560, 2560, dtype, "cuda"), make16((M,), 2560, 10240, dtype, "cuda")
    ref = oracle16(*dense) + oracle16(*down)
    assert_within_2x_torch(SUM(*dense, *down), ref, peer16(*dense) + peer16(*down), "sum")
    if M <= 32:  # one gemv launch: the same kernel as the separate calls, so overlap changes nothing
        assert torch.equal(SUM(*dense, *down, overlap=True), SUM(*dense, *down))


@cuda
@pytest.mark.parametrize("M", [1, 16, 256])
def test_cuda_large_magnitude_inputs_stay_finite(M):
    # x @ w.T exceeds fp16's range before the scale: the gemv scales in fp32 before rounding.
    x, w, s, b = make16((M,), 512, 4096, torch.float16, "cuda", x_scale=100.0)
    w = (w.float() * 64).half()
    s = torch.full_like(s, 1 / 256)
    ref = oracle16(x, w, s, b)
    assert ref.abs().max() < 6e4
    y = LIN(x, w, s, b)
    if M <= 32 or hasattr(torch.ops.aten.mm, "dtype"):  # the gemv, or torch's matmul into fp32
        assert torch.isfinite(y).all() and rel_err(y, ref) < 1e-2
    else:  # a torch without mm.dtype: the product is rounded to fp16 first, as F.linear(x, w) * s is
        assert torch.equal(torch.isfinite(y), torch.isfinite(peer16(x, w, s, b)))


@cuda
@pytest.mark.parametrize("M", [1, 12, 16])
def test_cuda_repeated_calls_are_bitwise_identical(M):
    for N, K in ((40, 8208), (2560, 10240), (7680, 2560)):
        x, w, s, b = make16((M,), N, K, torch.float16, "cuda")
        first = LIN(x, w, s, b)
        for _ in range(3):
            assert torch.equal(LIN(x, w, s, b), first)


@cuda
@pytest.mark.parametrize("M", [1, 40])
def test_opcheck_cuda(M):
    x, w, s, b = make16((M,), 256, 512, torch.bfloat16, "cuda")
    for op in (LIN, GELU):
        torch.library.opcheck(op, (x, w, s, b))
    c = make16((M,), 256, 384, torch.bfloat16, "cuda")
    torch.library.opcheck(PAIR, (x, w, s, b, *c), {"gelu2": True})
    torch.library.opcheck(SUM, (x, w, s, b, *c))


@cuda
def test_reduce_overhead_really_captures_cuda_graph():
    reset_compile_counters()
    a, c = make16((4,), 1024, 512, torch.float16, "cuda"), make16((4,), 512, 1024, torch.float16, "cuda")

    def f(x):
        h = GELU(x, *a[1:])
        return LIN(h, *c[1:])

    g = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        y = g(a[0])
    torch.testing.assert_close(y, f(a[0]), rtol=0, atol=0)
    assert_cuda_graph_recorded(a[0].device)
