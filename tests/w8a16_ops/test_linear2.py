"""w8a16.linear_pair / w8a16.linear_sum: reference, fake, opcheck, compile, CUDA kernels, bad input."""
from __future__ import annotations

import pytest
import torch

from linear_oracle import (assert_compiled_equals_eager, assert_cuda_graph_recorded, assert_same_error_eager_and_compiled,
                           assert_within_2x_torch, make_pair, make_weights, oracle, rel_err, reset_compile_counters,
                           torch_same_precision)

import w8a16_ops  # noqa: F401  (registers the ops; builds the CUDA kernels on a GPU machine)

PAIR, SUM = torch.ops.w8a16.linear_pair, torch.ops.w8a16.linear_sum
OPS = {"linear_pair": PAIR, "linear_sum": SUM}
MS = [1, 2, 5, 8, 9, 16, 17, 32, 33, 100]  # the CUDA sum path changes at M = 32
cuda = pytest.mark.cuda


# ----------------------------------------------------------------------------- CPU

CPU_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LEADS = [(), (5,), (2, 3)]
# (bias1, bias2, gelu1, gelu2)
VARIANTS = [(True, True, False, False), (False, True, False, True), (True, False, True, False),
            (False, False, True, True)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "b{:d}{:d}-g{:d}{:d}".format(*v))
@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_pair_matches_oracle_and_separate_ops(dtype, lead, variant):
    bias1, bias2, gelu1, gelu2 = variant
    args = make_pair(lead, 24, 48, 40, 32, dtype, "cpu", bias=(bias1, bias2))
    y1, y2 = PAIR(*args, gelu1=gelu1, gelu2=gelu2)
    assert y1.shape == (*lead, 24) and y2.shape == (*lead, 40) and y1.dtype == y2.dtype == dtype
    assert rel_err(y1, oracle(*args[:4], gelu1)) < CPU_TOL[dtype]
    assert rel_err(y2, oracle(*args[4:], gelu2)) < CPU_TOL[dtype]
    sep = {False: torch.ops.w8a16.linear, True: torch.ops.w8a16.linear_gelu}
    assert torch.equal(y1, sep[gelu1](*args[:4]))
    assert torch.equal(y2, sep[gelu2](*args[4:]))


@pytest.mark.parametrize("bias", [(True, True), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_sum_matches_oracle_and_separate_ops(dtype, lead, bias):
    args = make_pair(lead, 24, 48, 24, 32, dtype, "cpu", bias=bias)
    y = SUM(*args)
    assert y.shape == (*lead, 24) and y.dtype == dtype
    assert rel_err(y, oracle(*args[:4]) + oracle(*args[4:])) < CPU_TOL[dtype]
    # One rounding of the fp32 sum vs two rounded terms: within about one ulp of the terms.
    l1, l2 = torch.ops.w8a16.linear(*args[:4]).float(), torch.ops.w8a16.linear(*args[4:]).float()
    terms = sum(((x.float() @ w.float().t()) * s).abs() + (0 if b is None else b.float().abs())
                for x, w, s, b in (args[:4], args[4:]))
    bound = 2 * torch.finfo(dtype).eps * terms
    assert ((y.float() - (l1 + l2)).abs() <= bound).all()


@pytest.mark.parametrize("case", ["pair-bias", "pair-nobias-gelu1", "pair-gelu2", "sum-bias", "sum-nobias"])
def test_opcheck_cpu(case):
    bias = "nobias" not in case
    if case.startswith("pair"):
        args = make_pair((2, 3), 32, 64, 48, 32, torch.bfloat16, "cpu", bias=(bias, bias))
        kwargs = {"gelu1": "gelu1" in case, "gelu2": "gelu2" in case}
        torch.library.opcheck(PAIR, args, kwargs)
    else:
        args = make_pair((3,), 32, 64, 32, 48, torch.bfloat16, "cpu", bias=(bias, False))
        torch.library.opcheck(SUM, args)


class ParallelBlock(torch.nn.Module):
    """GPT-NeoX's parallel-residual projections: linear_pair in (qkv, mlp up + GeLU), linear_sum
    out (attention dense + mlp down)."""

    def __init__(self, H, dtype, device):
        super().__init__()
        shapes = {"qkv": (3 * H, H), "up": (4 * H, H), "dense": (H, 3 * H), "down": (H, 4 * H)}
        for name, (N, K) in shapes.items():
            for part, t in zip("wsb", make_weights(N, K, dtype, device)):
                self.register_buffer(f"{name}_{part}", t)

    def p(self, name):
        return getattr(self, f"{name}_w"), getattr(self, f"{name}_s"), getattr(self, f"{name}_b")

    def forward(self, x1, x2):
        q, h = PAIR(x1, *self.p("qkv"), x2, *self.p("up"), gelu2=True)
        return SUM(q, *self.p("dense"), h, *self.p("down")), q


def test_compile_fullgraph_equals_eager_cpu():
    # the second shape recompiles with dynamic leading dims
    inputs = [(torch.randn(*lead, 32), torch.randn(*lead, 32)) for lead in ((2, 5), (3, 7))]
    assert_compiled_equals_eager(ParallelBlock(32, torch.float32, "cpu"), inputs)


# ---------------------------------------------------------------------- bad input

# case -> (ops it applies to, message after "w8a16.<op>: ")
BAD = {
    "leading_dims": (OPS, "x1 and x2 must have the same leading dims [...], got [4, 64] and [3, 48]"),
    "x_dtypes": (OPS, "x1 and x2 must have the same dtype, got float16 and bfloat16"),
    "n_mismatch": (["linear_sum"],
                   "weight1 and weight2 must have the same N (their outputs are summed), got N=32 and N=48"),
    "k_weight2": (OPS, "K mismatch: x2 has K=48 in its last dim, weight2 [N, K] has K=32"),
    "scales2_dtype": (OPS, "scales2 must be float32 of shape [32], got float16 [32]"),
    "weight1_strided": (OPS, "weight1 must be contiguous (row-major [N, K]), got strides [1, 32]"),
    "bias2_dtype": (OPS, "bias2 must be float16 of shape [32], got float32 [32]"),
}


def _bad_args(case, device):
    x1, w1, s1, b1, x2, w2, s2, b2 = make_pair((4,), 32, 64, 32, 48, torch.float16, device)
    a = dict(x1=x1, w1=w1, s1=s1, b1=b1, x2=x2, w2=w2, s2=s2, b2=b2)
    a.update({
        "leading_dims": lambda: dict(x2=x2[:3]),
        "x_dtypes": lambda: dict(x2=x2.bfloat16(), b2=b2.bfloat16()),
        "n_mismatch": lambda: dict(zip(("w2", "s2", "b2"), make_weights(48, 48, torch.float16, device))),
        "k_weight2": lambda: dict(w2=w2[:, :32].contiguous()),
        "scales2_dtype": lambda: dict(s2=s2.half()),
        "weight1_strided": lambda: dict(w1=w1.t().contiguous().t()),
        "bias2_dtype": lambda: dict(b2=b2.float()),
    }[case]())
    return tuple(a[k] for k in ("x1", "w1", "s1", "b1", "x2", "w2", "s2", "b2"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("name,case", [(n, c) for c, (ops, _) in BAD.items() for n in ops])
def test_bad_input_same_error_eager_and_compiled(name, case, device):
    assert_same_error_eager_and_compiled(OPS[name], _bad_args(case, device), f"w8a16.{name}: {BAD[case][1]}")


def test_pair_accepts_different_n():
    y1, y2 = PAIR(*make_pair((4,), 32, 64, 48, 48, torch.float16, "cpu"))
    assert y1.shape == (4, 32) and y2.shape == (4, 48)


# --------------------------------------------------------------------------- CUDA

# (name, kind, N1, K1, N2, K2, bias1, bias2, gelu1, gelu2); kind "sum" needs N1 == N2
PYTHIA_PAIR = ("pythia-qkv+up", "pair", 7680, 2560, 10240, 2560, True, True, False, True)
PYTHIA_SUM = ("pythia-dense+down", "sum", 2560, 2560, 2560, 10240, True, True, False, False)
AWKWARD = [
    ("N1+N24-K1024", "pair", 1, 2560, 24, 1024, True, False, True, False),
    ("N2568+N24-K240", "pair", 2568, 2560, 24, 240, False, True, False, True),
    ("N24-K240+N2568", "pair", 24, 240, 2568, 2560, True, True, True, True),
    ("N2568-K1024", "sum", 2568, 2560, 2568, 1024, True, False, False, False),
    ("N1-K320+K1280", "sum", 1, 320, 1, 1280, False, True, False, False),
    ("N24-K320+K1280", "sum", 24, 320, 24, 1280, False, False, False, False),
    # at M = 5, x of 43.9 KB (both segments; the pair: its larger problem) staged in shared
    # memory, next to the 44 KB limit beside the kernel's static buffers
    ("N8192-K1024+K3472", "sum", 8192, 1024, 8192, 3472, True, True, False, False),
    ("N8192-K4496+N24-K320", "pair", 8192, 4496, 24, 320, True, False, False, True),
    # the two-block cluster split of K at 9-16 rows (sm_90): a partial tile, segment 0 ending
    # inside a 128-wide chunk
    ("N40-K2576+K8192", "sum", 40, 2576, 40, 8192, True, True, False, False),
]


def _cases_numerics():
    out = [(c, M) for c in (PYTHIA_PAIR, PYTHIA_SUM) for M in MS]
    return out + [(c, M) for c in AWKWARD for M in (1, 5, 9, 17, 32, 33, 100)]


def _run_case(case, lead, dtype, x_scale=1.0):
    """Inputs, our outputs, the fp32 oracle and the same-precision torch outputs (tuples for pair)."""
    _, kind, N1, K1, N2, K2, bias1, bias2, gelu1, gelu2 = case
    args = make_pair(lead, N1, K1, N2, K2, dtype, "cuda", bias=(bias1, bias2), x_scale=x_scale)
    if kind == "pair":
        ours = PAIR(*args, gelu1=gelu1, gelu2=gelu2)
        ref = oracle(*args[:4], gelu1), oracle(*args[4:], gelu2)
        peer = torch_same_precision(*args[:4], gelu1), torch_same_precision(*args[4:], gelu2)
        return args, ours, ref, peer
    ours = SUM(*args)
    ref = oracle(*args[:4]) + oracle(*args[4:])
    return args, (ours,), (ref,), (torch_same_precision(*args[:4]) + torch_same_precision(*args[4:]),)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case,M", _cases_numerics(), ids=lambda v: v[0] if isinstance(v, tuple) else f"M{v}")
def test_cuda_numerics_vs_fp32_oracle(case, M, dtype):
    _, ours, ref, peer = _run_case(case, (M,), dtype)
    for i, (o, r, p) in enumerate(zip(ours, ref, peer)):
        assert o.shape == r.shape and o.dtype == dtype
        assert torch.isfinite(o).all()
        assert_within_2x_torch(o, r, p, f"{case[0]} output {i + 1}")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("kind", ["pair", "sum"])
def test_cuda_large_magnitude_inputs_stay_finite(kind, M, dtype):
    # x @ w.T reaches ~5e5 before scaling, beyond fp16's range: the kernel scales in fp32
    # before rounding, so the (in-range) result stays finite.
    args = make_pair((M,), 512, 4096, 512, 2048 if kind == "sum" else 4096, dtype, "cuda", x_scale=100.0)
    args = tuple(torch.full_like(t, 1e-3) if i in (2, 6) else t for i, t in enumerate(args))
    if kind == "pair":
        ours, ref = PAIR(*args, gelu2=True), (oracle(*args[:4]), oracle(*args[4:], True))
    else:
        ours, ref = (SUM(*args),), (oracle(*args[:4]) + oracle(*args[4:]),)
    for o, r in zip(ours, ref):
        assert r.abs().max() < 6e4  # the true result is in fp16 range
        assert torch.isfinite(o).all()
        assert rel_err(o, r) < 1e-2


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 2, 5, 16, 32])
@pytest.mark.parametrize("case", [PYTHIA_PAIR, AWKWARD[2]], ids=lambda c: c[0])
def test_cuda_pair_equals_separate_ops(case, M, dtype):
    # Both accumulate in fp32 and round once; only the fp32 summation order may differ, so
    # the outputs agree to one ulp (plus a little slack for elements that nearly cancel).
    args, (y1, y2), _, _ = _run_case(case, (M,), dtype)
    sep = {False: torch.ops.w8a16.linear, True: torch.ops.w8a16.linear_gelu}
    eps = torch.finfo(dtype).eps
    for y, lin, gelu in ((y1, args[:4], case[8]), (y2, args[4:], case[9])):
        s = sep[gelu](*lin).float()
        bound = eps * (s.abs() + 0.05 * s.abs().max())
        assert ((y.float() - s).abs() <= bound).all(), f"max diff {(y.float() - s).abs().max():.3e}"


@cuda
@pytest.mark.parametrize("lead", [(), (2, 3), (0,)], ids=str)
def test_cuda_leading_dims(lead):
    for case in (PYTHIA_PAIR, PYTHIA_SUM):
        args, ours, _, _ = _run_case(case, lead, torch.float16)
        flat = [t.reshape(-1, t.shape[-1]) if i in (0, 4) else t for i, t in enumerate(args)]
        ref = PAIR(*flat, gelu2=True) if case[1] == "pair" else (SUM(*flat),)
        for o, r in zip(ours, ref):
            assert o.shape == (*lead, r.shape[-1])
            torch.testing.assert_close(o.reshape(r.shape), r, rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("M", [6, 40])
@pytest.mark.parametrize("kind", ["pair", "sum"])
def test_cuda_noncontiguous_x_is_accepted(kind, M):
    op = PAIR if kind == "pair" else SUM
    args = make_pair((2, M // 2), 256, 512, 256, 1024, torch.bfloat16, "cuda")
    x1 = torch.randn(M // 2, 2, 512 + 64, device="cuda").to(torch.bfloat16)[..., :512].transpose(0, 1)
    x2 = args[4].reshape(M, 1024).t().contiguous().t().reshape(2, M // 2, 1024)
    assert not x1.is_contiguous() and not x2.is_contiguous()
    strided = (x1, *args[1:4], x2, *args[5:])
    contiguous = (x1.contiguous(), *args[1:4], x2.contiguous(), *args[5:])
    ys, zs = op(*strided), op(*contiguous)
    for a, b in zip(ys, zs) if kind == "pair" else [(ys, zs)]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("M", [1, 12, 30, 40])
def test_cuda_deterministic(M):
    pair = make_pair((M,), 7680, 2560, 10240, 2560, torch.float16, "cuda")
    sum_ = make_pair((M,), 2560, 2560, 2560, 10240, torch.bfloat16, "cuda")
    y1, y2 = PAIR(*pair, gelu2=True)
    ys = SUM(*sum_)
    for _ in range(3):
        z1, z2 = PAIR(*pair, gelu2=True)
        assert torch.equal(z1, y1) and torch.equal(z2, y2)
        assert torch.equal(SUM(*sum_), ys)


@cuda
@pytest.mark.parametrize("M", [1, 40])
@pytest.mark.parametrize("case", ["pair", "pair-gelu-nobias", "sum", "sum-nobias"])
def test_opcheck_cuda(case, M):
    bias = "nobias" not in case
    if case.startswith("pair"):
        args = make_pair((M,), 256, 512, 384, 256, torch.bfloat16, "cuda", bias=(bias, bias))
        torch.library.opcheck(PAIR, args, {"gelu1": "gelu" in case, "gelu2": True})
    else:
        torch.library.opcheck(SUM, make_pair((M,), 256, 512, 256, 1024, torch.bfloat16, "cuda", bias=(bias, bias)))


@cuda
def test_compile_fullgraph_equals_eager_cuda():
    inputs = [tuple(torch.randn(M, 256, device="cuda", dtype=torch.float16) for _ in range(2)) for M in (1, 9, 64)]
    assert_compiled_equals_eager(ParallelBlock(256, torch.float16, "cuda"), inputs)


@cuda
@pytest.mark.parametrize("M", [4, 40])
def test_reduce_overhead_really_captures_cuda_graph(M):
    reset_compile_counters()
    m = ParallelBlock(256, torch.float16, "cuda")
    x1, x2 = (torch.randn(M, 256, device="cuda", dtype=torch.float16) for _ in range(2))
    f = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = f(x1, x2)
    for a, b in zip(out, m(x1, x2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_cuda_graph_recorded(x1.device)


@cuda
@pytest.mark.parametrize("M", [5, 64])
def test_cuda_runs_on_current_stream(M):
    # A side stream (non-blocking: no implicit sync with the default stream) first sleeps, then
    # rewrites the inputs, then runs the ops. Kernels launched anywhere but on that stream would
    # race ahead of the sleep and read the old inputs.
    pair = make_pair((M,), 256, 512, 384, 256, torch.float16, "cuda")
    sum_ = make_pair((M,), 256, 512, 256, 1024, torch.float16, "cuda")
    new = [torch.randn_like(t) for t in (pair[0], pair[4], sum_[0], sum_[4])]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        for dst, src in zip((pair[0], pair[4], sum_[0], sum_[4]), new):
            dst.copy_(src)
        y1, y2 = PAIR(*pair, gelu2=True)
        ys = SUM(*sum_)
    torch.cuda.synchronize()
    z1, z2 = PAIR(*pair, gelu2=True)
    assert torch.equal(y1, z1) and torch.equal(y2, z2)
    assert torch.equal(ys, SUM(*sum_))


@cuda
@pytest.mark.parametrize("M", [4, 40])
def test_raw_cuda_graph_replay(M):
    pair = make_pair((M,), 2560, 2560, 1024, 2560, torch.float16, "cuda")
    sum_ = make_pair((M,), 2560, 2560, 2560, 1024, torch.float16, "cuda")
    PAIR(*pair), SUM(*sum_)  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y1, y2 = PAIR(*pair, gelu1=True)
        ys = SUM(*sum_)
    for _ in range(3):
        for x in (pair[0], pair[4], sum_[0], sum_[4]):
            x.copy_(torch.randn_like(x))
        g.replay()
        z1, z2 = PAIR(*pair, gelu1=True)
        assert torch.equal(y1, z1) and torch.equal(y2, z2) and torch.equal(ys, SUM(*sum_))


@cuda
@pytest.mark.parametrize("name", list(OPS))
def test_cuda_only_errors(name):
    # K % 16 == 0 per weight, and one device for all eight tensors.
    args = make_pair((4,), 32, 64, 32, 40, torch.float16, "cuda")
    assert_same_error_eager_and_compiled(OPS[name], args, f"w8a16.{name}: K must be a multiple of 16 on CUDA, "
                                                          "got K=40 (weight2)")
    args = make_pair((4,), 32, 64, 32, 48, torch.float16, "cuda")
    args = args[:5] + (args[5].cpu(),) + args[6:]
    assert_same_error_eager_and_compiled(OPS[name], args, f"w8a16.{name}: all tensors must be on the same device, "
                                                          "got x1 on cuda:0, weight1 on cuda:0, scales1 on cuda:0, "
                                                          "bias1 on cuda:0, x2 on cuda:0, weight2 on cpu")
