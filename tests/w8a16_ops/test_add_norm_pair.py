"""w8a16.add_norm_pair: [y = a + b, layer_norm_1(y), layer_norm_2(y)] -- the reference against an
fp32 oracle, the CUDA kernel against both, its fallback widths, overlap (programmatic dependent
launch), opcheck, compile and bad input."""
from __future__ import annotations

import pytest
import torch

from linear_oracle import (assert_compiled_equals_eager, assert_cuda_graph_recorded, assert_same_error_eager_and_compiled,
                           reset_compile_counters)
from norm_cases import norm_cases
from pdl_helpers import late_copies

import w8a16_ops  # noqa: F401  (registers the ops; builds the CUDA kernels on a GPU machine)
from w8a16_ops import reference

ANP = torch.ops.w8a16.add_norm_pair
EPS = 1e-5
cuda = pytest.mark.cuda


def make_args(lead, N, dtype, device, scale=1.0, offset=0.0, g=None):
    """(a, b, weight1, bias1, weight2, bias2, eps): random rows (scaled, shifted by `offset`),
    norm weights around 1, small biases."""
    g = g or torch.Generator().manual_seed(0)
    a = (scale * torch.randn(*lead, N, generator=g) + offset).to(dtype).to(device)
    b = (scale * torch.randn(*lead, N, generator=g)).to(dtype).to(device)
    norms = []
    for _ in range(2):
        norms.append((1 + 0.2 * torch.randn(N, generator=g)).to(dtype).to(device))
        norms.append((0.2 * torch.randn(N, generator=g)).to(dtype).to(device))
    return (a, b, *norms, EPS)


def ln_oracle(y, w, b, eps=EPS):
    """fp64 layer norm of y as given (already rounded), written out."""
    y = y.double()
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    return (y - mean) / torch.sqrt(var + eps) * w.double() + b.double()


def assert_op_output(out, args, ulps=2.0):
    """y is exactly a + b rounded once; n1, n2 are within `ulps` ulps of the output dtype
    (relative to the largest |n|) of the fp64 norm of that y."""
    a, b, w1, c1, w2, c2, eps = args
    y, n1, n2 = out
    assert y.dtype == n1.dtype == n2.dtype == a.dtype and y.shape == n1.shape == n2.shape == a.shape
    assert torch.equal(y, (a.float() + b.float()).to(a.dtype))
    e = torch.finfo(a.dtype).eps
    for i, (n, w, c) in enumerate(((n1, w1, c1), (n2, w2, c2))):
        ref = ln_oracle(y, w, c, eps)
        err = (n.double() - ref).abs().max().item()
        bound = (ulps * e + 1e-6) * ref.abs().max().item()
        assert err <= bound, f"n{i + 1}: max error {err:.3e} > {bound:.3e}"
        assert torch.isfinite(n).all()


# ----------------------------------------------------------------------------- CPU

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("lead,N", [((1,), 2560), ((3, 5), 64), ((7,), 100), ((2,), 1)])
def test_cpu_matches_fp64_oracle(dtype, lead, N):
    args = make_args(lead, N, dtype, "cpu")
    out = ANP(*args)
    assert_op_output(out, args)
    for x, r in zip(out, reference.add_norm_pair(*args)):
        assert torch.equal(x, r)


def test_cpu_norms_are_of_the_rounded_sum():
    # Rows with a mean 48 times their spread: rounding y moves it by up to half an ulp of the
    # mean, many ulps of n. A norm of the unrounded fp32 sum misses the oracle of the rounded y.
    args = make_args((4,), 256, torch.float16, "cpu", offset=48.0)
    assert_op_output(ANP(*args), args)
    a, b = args[:2]
    unrounded = ln_oracle(a.float() + b.float(), *args[2:4])
    assert (ANP(*args)[1].double() - unrounded).abs().max() > 4 * torch.finfo(torch.float16).eps * unrounded.abs().max()


def test_cpu_overlap_changes_nothing_and_opcheck():
    args = make_args((3,), 64, torch.bfloat16, "cpu")
    for x, r in zip(ANP(*args), ANP(*args, overlap=True)):
        assert torch.equal(x, r)
    torch.library.opcheck(ANP, args)
    torch.library.opcheck(ANP, args, {"overlap": True})
    torch.library.opcheck(ANP, make_args((2, 3), 40, torch.float32, "cpu"))


def test_cpu_no_rows_and_noncontiguous():
    args = make_args((0,), 32, torch.float16, "cpu")
    assert all(t.shape == (0, 32) for t in ANP(*args))
    args = make_args((6,), 64, torch.float16, "cpu")
    strided = (args[0].t().contiguous().t(), args[1][::1], *args[2:])  # a column-major view
    for x, r in zip(ANP(*strided), ANP(*args)):
        assert torch.equal(x, r) and x.is_contiguous()


class _LayerEnds(torch.nn.Module):
    """Two layer ends in a row, as the decoder chains them."""

    def forward(self, s1, s2, x, w1, c1, w2, c2):
        x, n1, n2 = ANP(s1, x, w1, c1, w2, c2, EPS, overlap=True)
        x, m1, m2 = ANP(s2 + n1, x, w1, c1, w2, c2, EPS, overlap=True)
        return x, m1, m2 + n2


def _chain_inputs(lead, N, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    a, b, *norms, _ = make_args(lead, N, dtype, device, g=g)
    return (a, (torch.randn(*lead, N, generator=g)).to(dtype).to(device), b, *norms)


def test_compile_fullgraph_equals_eager_cpu():
    inputs = [_chain_inputs(lead, 48, torch.float32, "cpu", s) for s, lead in enumerate(((2, 3), (4, 5)))]
    assert_compiled_equals_eager(_LayerEnds(), inputs)


# ---------------------------------------------------------------------- bad input

_OP = "w8a16.add_norm_pair: "
NORM_CASES = norm_cases(("weight1", "bias1", "weight2", "bias2"), ("w1", "c1", "w2", "c2"), "a")
BAD = {
    "a_int": "a must be float16, bfloat16 or float32, got int32",
    "a_scalar": "a must have shape [..., N] with N >= 1, got float16 []",
    "a_empty_n": "a must have shape [..., N] with N >= 1, got float16 [4, 0]",
    "b_shape": "b must be float16 of shape [4, 32] (like a), got float16 [4, 16]",
    "b_lead": "b must be float16 of shape [4, 32] (like a), got float16 [1, 4, 32]",
    "b_dtype": "b must be float16 of shape [4, 32] (like a), got bfloat16 [4, 32]",
    **{case: msg for case, (msg, _, _) in NORM_CASES.items()},
}


def _bad_args(case, device):
    a, b, w1, c1, w2, c2, eps = make_args((4,), 32, torch.float16, device)
    args = dict(a=a, b=b, w1=w1, c1=c1, w2=w2, c2=c2, eps=eps)
    if case in NORM_CASES:
        _, key, change = NORM_CASES[case]
        args[key] = change(args[key])
    else:
        args.update({
            "a_int": lambda: dict(a=a.int()),
            "a_scalar": lambda: dict(a=a[0, 0]),
            "a_empty_n": lambda: dict(a=a[:, :0]),
            "b_shape": lambda: dict(b=b[:, :16]),
            "b_lead": lambda: dict(b=b[None]),
            "b_dtype": lambda: dict(b=b.bfloat16()),
        }[case]())
    return tuple(args.values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_same_error_eager_and_compiled(case, device):
    msg = BAD[case]
    if device == "cuda" and case == "a_int":
        msg = "a must be float16 or bfloat16, got int32"
    assert_same_error_eager_and_compiled(ANP, _bad_args(case, device), _OP + msg)


def test_eps_nan_is_refused():
    with pytest.raises(RuntimeError, match=r"w8a16\.add_norm_pair: eps must be > 0, got nan"):
        ANP(*make_args((2,), 32, torch.float16, "cpu")[:-1], float("nan"))


# ----------------------------------------------------------------------------- CUDA

@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("N", [8, 264, 2560, 5120, 8192])
def test_cuda_kernel_matches_oracle_and_reference(N, M, dtype):
    args = make_args((M,), N, dtype, "cuda")
    out = ANP(*args)
    assert_op_output(out, args)
    ref = reference.add_norm_pair(*args)
    assert torch.equal(out[0], ref[0])
    e = torch.finfo(dtype).eps
    for n, r in zip(out[1:], ref[1:]):  # torch's fp32 layer norm: within one ulp
        assert ((n.float() - r.float()).abs() <= e * r.float().abs() + 1e-6).all()


@cuda
@pytest.mark.parametrize("N", [1, 100, 2568 + 4, 10240])
def test_cuda_widths_the_kernel_does_not_take(N):
    # N % 8 != 0 or N > 8192: the op falls back to the reference, same contract.
    assert not torch.ops.w8a16_cuda.add_norm_pair_supported(N)  # the extension owns the limit
    args = make_args((5,), N, torch.float16, "cuda")
    out = ANP(*args)
    assert_op_output(out, args)


@cuda
def test_cuda_kernel_width_limit():
    takes = torch.ops.w8a16_cuda.add_norm_pair_supported
    assert [takes(n) for n in (8, 264, 2560, 8184, 8192)] == [True] * 5
    assert [takes(n) for n in (0, 4, 12, 8200, 16384)] == [False] * 5


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_rounded_sum_offset_rows_and_large_magnitude(dtype):
    args = make_args((16,), 2560, dtype, "cuda", offset=48.0)
    assert_op_output(ANP(*args), args)
    # a + b in range; for bf16, rows whose statistics stay in fp32's range (like torch's layer
    # norm, the kernel sums squares in fp32: |y| beyond ~1e18 overflows them)
    big = 2.0e4 if dtype == torch.float16 else 1.0e15
    args = make_args((16,), 2560, dtype, "cuda", scale=big / 4)
    out = ANP(*args)
    assert all(torch.isfinite(t).all() for t in out)
    assert_op_output(out, args)


@cuda
def test_cuda_leading_dims_noncontiguous_and_no_rows():
    args = make_args((2, 3, 1), 2560, torch.float16, "cuda")
    out = ANP(*args)
    assert out[0].shape == (2, 3, 1, 2560)
    assert_op_output(out, args)
    a, b, *rest = make_args((6,), 2560, torch.float16, "cuda")
    strided = (a.t().contiguous().t(), torch.cat([b, b], 1)[:, :2560], *rest)
    for x, r in zip(ANP(*strided), ANP(a, b, *rest)):
        assert torch.equal(x, r)
    assert all(t.shape == (0, 2560) for t in ANP(*make_args((0,), 2560, torch.float16, "cuda")))


@cuda
@pytest.mark.parametrize("M", [1, 16])
def test_cuda_overlap_reads_a_and_b_after_the_previous_kernel(M):
    # a and b are written by the kernel just before the op (one long copy, their values last):
    # with overlap=True they must still be read after it. Same bits as the plain launch.
    args = make_args((M,), 2560, torch.float16, "cuda")
    for _ in range(2):
        new = [torch.randn(M, 2560, device="cuda").half() for _ in range(2)]
        (a, b), rewrite = late_copies(list(args[:2]))
        rewrite(new)
        out = ANP(a, b, *args[2:], overlap=True)
        torch.cuda.synchronize()
        for x, r in zip(out, ANP(*new, *args[2:])):
            assert torch.equal(x, r)


@cuda
def test_cuda_overlap_in_a_cuda_graph_chained_with_linear_ops():
    # The decoder's order: linear_sum -> add_norm_pair -> linear_pair, all with overlap=True.
    from linear_oracle import make_pair

    M, N = 16, 512
    sum_ = list(make_pair((M,), N, 256, N, 1024, torch.float16, "cuda"))
    pair = list(make_pair((M,), 768, N, 2048, N, torch.float16, "cuda"))
    x = torch.randn(M, N, device="cuda").half()
    _, _, *norms, eps = make_args((M,), N, torch.float16, "cuda")

    def step(overlap):
        s = torch.ops.w8a16.linear_sum(*sum_, overlap=overlap)
        y, n1, n2 = ANP(s, x, *norms, eps, overlap=overlap)
        q, h = torch.ops.w8a16.linear_pair(n1, *pair[1:4], n2, *pair[5:], gelu2=True, overlap=overlap)
        return y, q, h
    ref = [t.clone() for t in step(False)]
    step(True)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step(True)
    for _ in range(3):
        sum_[0].copy_(torch.randn_like(sum_[0]))
        g.replay()
        torch.cuda.synchronize()
        for a_, b_ in zip(out, step(False)):
            assert torch.equal(a_, b_)
    assert not torch.equal(out[0], ref[0])  # the replays did see the new inputs


@cuda
@pytest.mark.parametrize("M", [1, 40])
def test_opcheck_cuda(M):
    torch.library.opcheck(ANP, make_args((M,), 2560, torch.bfloat16, "cuda"))
    torch.library.opcheck(ANP, make_args((M,), 2560, torch.float16, "cuda"), {"overlap": True})
    torch.library.opcheck(ANP, make_args((M,), 100, torch.float16, "cuda"))


@cuda
def test_reduce_overhead_equals_eager_and_captures_cuda_graph():
    reset_compile_counters()
    m = _LayerEnds()
    f = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    for seed in range(3):
        inputs = _chain_inputs((16,), 2560, torch.float16, "cuda", seed)
        out = [t.clone() for t in f(*inputs)]
        for a, b in zip(out, m(*inputs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_cuda_graph_recorded(inputs[0].device)


@cuda
def test_cuda_only_errors():
    a, b, *rest = make_args((4,), 32, torch.float16, "cuda")
    assert_same_error_eager_and_compiled(ANP, (a, b.cpu(), *rest),
                                         _OP + "all tensors must be on the same device, got a on cuda:0, b on cpu, "
                                         "weight1 on cuda:0, bias1 on cuda:0, weight2 on cuda:0, bias2 on cuda:0")
