"""w8a16.linear_sum_norm: reference vs an fp32 oracle, composition, workspace, opcheck, compile,
bad input, CUDA kernel (up to 32 rows) and its prefill fallback."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linear_oracle import (assert_compiled_equals_eager, assert_cuda_graph_recorded, assert_same_error_eager_and_compiled,
                           assert_within_2x_torch, make_pair, make_weights, oracle, rel_err, reset_compile_counters,
                           torch_same_precision)
from norm_cases import norm_cases

import w8a16_ops
from w8a16_ops import norm_workspace, norm_workspace_numel, reference

LSN, SUM = torch.ops.w8a16.linear_sum_norm, torch.ops.w8a16.linear_sum
EPS = 1e-5
cuda = pytest.mark.cuda


def make_norms(N, dtype, device):
    """(norm_weight1, norm_bias1, norm_weight2, norm_bias2): weights around 1, small biases."""
    out = []
    for _ in range(2):
        out.append((1 + 0.2 * torch.randn(N, device=device)).to(dtype))
        out.append((0.2 * torch.randn(N, device=device)).to(dtype))
    return tuple(out)


def make_args(lead, N, K1, K2, dtype, device, bias=(True, True), x_scale=1.0):
    """The 15 arguments of linear_sum_norm (a random residual, a zeroed workspace)."""
    linears = make_pair(lead, N, K1, N, K2, dtype, device, bias=bias, x_scale=x_scale)
    residual = torch.randn(*lead, N, device=device).to(dtype)
    return (*linears, residual, *make_norms(N, dtype, device), EPS, norm_workspace(N, device))


_NAMES = ("x1", "w1", "s1", "b1", "x2", "w2", "s2", "b2", "residual", "nw1", "nb1", "nw2", "nb2", "eps", "ws")


def with_(args, **kw):
    """args (make_args' order, _NAMES) with some replaced by name."""
    return tuple(kw.get(n, a) for n, a in zip(_NAMES, args))


def h_oracle(args):
    """fp32 residual + both linears from the dequantized weights, unrounded."""
    return oracle(*args[:4]) + oracle(*args[4:8]) + args[8].float()


def h_terms(args):
    """Sum of |every fp32 term| of h: what summation-order differences scale with."""
    total = args[8].float().abs()
    for x, w, s, b in (args[:4], args[4:8]):
        total = total + (x.float().abs() @ w.float().abs().t()) * s
        if b is not None:
            total = total + b.float().abs()
    return total


def ln_oracle(h, w, b, eps=EPS):
    """fp32 layer norm over the last dim, written out: (h - mean) / sqrt(biased var + eps) * w + b."""
    h = h.float()
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) * torch.rsqrt(var + eps) * w.float() + b.float()


def assert_norms_of_own_h(h, ns, args, ulps):
    """n1, n2 against the fp32 oracle norm of the op's own (rounded) h, which isolates the norm's
    error from h's: within ``ulps`` ulps of the output dtype relative to max |n| (plus fp32 slack)."""
    eps_d = torch.finfo(h.dtype).eps
    for i, (n, w, b) in enumerate(zip(ns, args[9:13:2], args[10:13:2])):
        ln = ln_oracle(h, w, b, args[13])
        err, bound = (n.float() - ln).abs().max().item(), (ulps * eps_d + 1e-5) * ln.abs().max().item()
        assert err <= bound, f"n{i + 1}: max error {err:.3e} > {bound:.3e}"


def offset_rows(args, sigmas=48.0):
    """args with the residual shifted so that h's rows have a mean of ``sigmas`` times their
    spread. Rounding h then moves it by up to half an ulp of that mean, many ulps of n: a norm of
    the unrounded fp32 sum instead of the rounded h misses the bar of assert_norms_of_own_h."""
    r = args[8]
    return with_(args, residual=(r.float() + sigmas * h_oracle(args).std()).to(r.dtype))


def unpack_norms(args):
    return ((args[9], args[10]), (args[11], args[12]))


# ----------------------------------------------------------------------------- CPU

CPU_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LEADS = [(), (3,), (2, 3)]
# (N, K1, K2): N not a multiple of 16; a Pythia-14m-like layer end (hidden 128, MLP 512)
CPU_SHAPES = [(40, 48, 160), (128, 128, 512)]


@pytest.mark.parametrize("bias", [(True, True), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "N{}-K{}+K{}".format(*s))
@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_reference_matches_fp32_oracle(dtype, lead, shape, bias):
    N, K1, K2 = shape
    args = make_args(lead, N, K1, K2, dtype, "cpu", bias=bias)
    h, n1, n2 = reference.linear_sum_norm(*args)
    for t in (h, n1, n2):
        assert t.shape == (*lead, N) and t.dtype == dtype
    ref = h_oracle(args)
    # h: one rounding (half an ulp: eps / 2 relative), fp32 summation order, the subnormal floor
    eps_d = torch.finfo(dtype).eps
    bound = eps_d * ref.abs() + 1e-5 * h_terms(args) + torch.finfo(dtype).tiny
    assert ((h.float() - ref).abs() <= bound).all(), f"max h error {(h.float() - ref).abs().max():.3e}"
    # n: one rounding of the norm of the rounded h ...
    assert_norms_of_own_h(h, (n1, n2), args, ulps=1)
    # ... and end to end against the all-fp32 chain
    for n, (w, b) in zip((n1, n2), unpack_norms(args)):
        assert rel_err(n, ln_oracle(ref, w, b)) < CPU_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_norms_are_of_the_rounded_h(dtype):
    args = offset_rows(make_args((6,), 40, 48, 160, dtype, "cpu"))
    h, n1, n2 = LSN(*args)
    assert_norms_of_own_h(h, (n1, n2), args, ulps=1)
    unrounded = [ln_oracle(h_oracle(args), w, b).to(dtype) for w, b in unpack_norms(args)]
    assert not all(torch.equal(n, u) for n, u in zip((n1, n2), unrounded))


@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_op_equals_reference_and_composition(dtype, lead):
    args = make_args(lead, 40, 48, 160, dtype, "cpu")
    out = LSN(*args)
    for a, b in zip(out, reference.linear_sum_norm(*args)):
        assert torch.equal(a, b)
    assert not args[-1].any(), "the CPU op does not write the workspace"
    h = out[0]
    # linear_sum (rounded), then + residual (rounded again): within about one ulp of the terms
    comp = SUM(*args[:8]) + args[8]
    assert ((h.float() - comp.float()).abs() <= 2 * torch.finfo(dtype).eps * h_terms(args)).all()
    for n, (w, b) in zip(out[1:], unpack_norms(args)):
        expect = F.layer_norm(comp.float(), (40,), w.float(), b.float(), EPS)
        assert rel_err(n, expect) < CPU_TOL[dtype]


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_cpu_no_rows(lead):
    out = LSN(*make_args(lead, 40, 48, 32, torch.float16, "cpu"))
    assert all(t.shape == (*lead, 40) and t.dtype == torch.float16 for t in out)


@pytest.mark.parametrize("case", ["bias-bf16-BT", "nobias-fp16-B", "bias2-fp32-B"])
def test_opcheck_cpu(case):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.split("-")[1]]
    lead = (2, 3) if case.endswith("BT") else (3,)
    bias = {"bias": (True, True), "nobias": (False, False), "bias2": (False, True)}[case.split("-")[0]]
    torch.library.opcheck(LSN, make_args(lead, 40, 64, 32, dtype, "cpu", bias=bias))


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 40, 2560, 2561])
def test_norm_workspace(n):
    ws = norm_workspace(n)
    assert norm_workspace_numel(n) == 4 + 64 * math.ceil(n / 16)
    assert ws.shape == (norm_workspace_numel(n),) and ws.dtype == torch.int32 and ws.device.type == "cpu"
    assert ws.is_contiguous() and not ws.any()
    assert w8a16_ops.norm_workspace is norm_workspace and "norm_workspace_numel" in w8a16_ops.__all__


class LayerEnds(torch.nn.Module):
    """``layers`` parallel-residual layer ends in a row on one workspace, as in a model: each takes
    the previous one's norms as its x1, x2 (K1 = K2 = N) and its h as the residual."""

    def __init__(self, N, dtype, device, layers=2):
        super().__init__()
        self.layers = layers
        for i in range(layers):
            tensors = (*make_weights(N, N, dtype, device), *make_weights(N, N, dtype, device),
                       *make_norms(N, dtype, device))
            for name, t in zip(("w1", "s1", "b1", "w2", "s2", "b2", "nw1", "nb1", "nw2", "nb2"), tensors):
                self.register_buffer(f"l{i}_{name}", t)
        self.register_buffer("ws", norm_workspace(N, device))

    def forward(self, n1, n2, h):
        for i in range(self.layers):
            w1, s1, b1, w2, s2, b2, nw1, nb1, nw2, nb2 = (
                getattr(self, f"l{i}_{name}") for name in ("w1", "s1", "b1", "w2", "s2", "b2", "nw1", "nb1", "nw2",
                                                           "nb2"))
            h, n1, n2 = LSN(n1, w1, s1, b1, n2, w2, s2, b2, h, nw1, nb1, nw2, nb2, EPS, self.ws)
        return h, n1, n2


def layer_inputs(lead, N, dtype, device):
    return tuple(torch.randn(*lead, N, device=device).to(dtype) for _ in range(3))


def test_compile_fullgraph_equals_eager_cpu():
    # the second shape recompiles with dynamic leading dims
    inputs = [layer_inputs(lead, 32, torch.float32, "cpu") for lead in ((2, 5), (3, 7))]
    assert_compiled_equals_eager(LayerEnds(32, torch.float32, "cpu"), inputs)


# ---------------------------------------------------------------------- bad input

_OP = "w8a16.linear_sum_norm: "
NORM_CASES = norm_cases(("norm_weight1", "norm_bias1", "norm_weight2", "norm_bias2"), ("nw1", "nb1", "nw2", "nb2"),
                        "x")
_WS_MSG = "workspace must be int32 of shape [n] with n >= 132 (w8a16_ops.norm_workspace(32)), got "
# case -> message after "w8a16.linear_sum_norm: " (N = 32, x [4, K], float16)
BAD = {
    "residual_shape": "residual must be float16 of shape [4, 32] (x's leading dims, then N), got float16 [4, 16]",
    "residual_lead": "residual must be float16 of shape [4, 32] (x's leading dims, then N), got float16 [1, 4, 32]",
    "residual_dtype": "residual must be float16 of shape [4, 32] (x's leading dims, then N), got bfloat16 [4, 32]",
    **{case: msg for case, (msg, _, _) in NORM_CASES.items()},
    "workspace_dtype": _WS_MSG + "int64 [132]",
    "workspace_small": _WS_MSG + "int32 [131]",
    "workspace_2d": _WS_MSG + "int32 [2, 132]",
    "workspace_strided": "workspace must be contiguous, got strides [2]",
    "n_mismatch": "weight1 and weight2 must have the same N (their outputs are summed), got N=32 and N=48",
    "bias2_dtype": "bias2 must be float16 of shape [32], got float32 [32]",
}
def _bad_args(case, device):
    args = make_args((4,), 32, 64, 48, torch.float16, device)
    _, _, _, _, x2, _, _, b2, r, nw1, nb1, nw2, nb2, _, ws = args
    if case in NORM_CASES:
        _, key, change = NORM_CASES[case]
        return with_(args, **{key: change(args[_NAMES.index(key)])})
    zeros = lambda *shape, dtype=torch.int32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    change = {
        "residual_shape": lambda: dict(residual=r[:, :16]),
        "residual_lead": lambda: dict(residual=r[None]),
        "residual_dtype": lambda: dict(residual=r.bfloat16()),
        "workspace_dtype": lambda: dict(ws=zeros(132, dtype=torch.int64)),
        "workspace_small": lambda: dict(ws=ws[:131]),
        "workspace_2d": lambda: dict(ws=zeros(2, 132)),
        "workspace_strided": lambda: dict(ws=zeros(264)[::2]),
        "n_mismatch": lambda: dict(zip(("w2", "s2", "b2"), make_weights(48, 48, torch.float16, device))),
        "bias2_dtype": lambda: dict(b2=b2.float()),
    }[case]()
    return with_(args, **change)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_same_error_eager_and_compiled(case, device):
    assert_same_error_eager_and_compiled(LSN, _bad_args(case, device), _OP + BAD[case])


def test_eps_nan_is_refused():
    with pytest.raises(RuntimeError, match=r"w8a16\.linear_sum_norm: eps must be > 0, got nan"):
        LSN(*with_(make_args((2,), 32, 64, 48, torch.float16, "cpu"), eps=float("nan")))


# --------------------------------------------------------------------------- CUDA

MS = [1, 2, 5, 8, 9, 13, 16, 17, 32, 33, 100]  # above 32 rows: the composed (prefill) path
CUDA_SHAPES = {  # name -> (N, K1, K2)
    "pythia-2.8b": (2560, 2560, 10240),
    "N40-K2576+K8208": (40, 2576, 8208),  # one partial channel tile, K not a multiple of 128
    "N512-K512+K2048": (512, 512, 2048),
    "N8192-K1024+K3072": (8192, 1024, 3072),  # M = 5: x of 40 KB staged, the limit beside the norm tail's buffers
}


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", list(CUDA_SHAPES))
def test_cuda_numerics_vs_fp32_oracle(shape, M, dtype):
    N, K1, K2 = CUDA_SHAPES[shape]
    args = make_args((M,), N, K1, K2, dtype, "cuda")
    h, n1, n2 = LSN(*args)
    for t in (h, n1, n2):
        assert t.shape == (M, N) and t.dtype == dtype and torch.isfinite(t).all()
    # h: linear_sum's bar (2x the error of the same-precision torch composition)
    peer = torch_same_precision(*args[:4]) + torch_same_precision(*args[4:8]) + args[8]
    assert_within_2x_torch(h, h_oracle(args), peer, f"{shape} M={M} h")
    assert_norms_of_own_h(h, (n1, n2), args, ulps=2)
    assert not args[-1][:4].any(), "the arrival counters must be back at zero"


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 9, 17, 32, 33])
@pytest.mark.parametrize("shape", ["pythia-2.8b", "N40-K2576+K8208"])
def test_cuda_norms_are_of_the_rounded_h(shape, M, dtype):
    N, K1, K2 = CUDA_SHAPES[shape]
    args = offset_rows(make_args((M,), N, K1, K2, dtype, "cuda"))
    h, n1, n2 = LSN(*args)
    assert_norms_of_own_h(h, (n1, n2), args, ulps=2)


@cuda
@pytest.mark.parametrize("M", [1, 5, 16, 32, 40])
def test_cuda_workspace_reuse_and_determinism(M):
    # Two problems of different N share one workspace sized for the larger, as a model's layers
    # (and its final norm) do; 20 calls back to back with no sync, each set feeding its own h on
    # as the next residual. Each must equal the same call on a fresh workspace, bitwise.
    sets = [make_args((M,), N, K1, K2, torch.float16, "cuda") for N, K1, K2 in
            (CUDA_SHAPES["pythia-2.8b"], CUDA_SHAPES["N40-K2576+K8208"])]
    ws = norm_workspace(2560, "cuda")
    first = LSN(*with_(sets[0], ws=ws))
    assert not ws[:4].any()
    again = LSN(*with_(sets[0], ws=ws))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    calls, residuals = [], [s[8] for s in sets]
    for i in range(20):
        args = with_(sets[i % 2], residual=residuals[i % 2], ws=ws)
        out = LSN(*args)
        calls.append((args, out))
        residuals[i % 2] = out[0]
    torch.cuda.synchronize()
    assert not ws[:4].any()
    if M > 32:
        assert not ws.any(), "the composed path does not touch the workspace"
    for i, (args, out) in enumerate(calls):
        fresh = LSN(*with_(args, ws=norm_workspace(2560, "cuda")))
        for a, b in zip(out, fresh):
            assert torch.equal(a, b), f"call {i}"


@cuda
@pytest.mark.parametrize("lead", [(), (1, 1), (2, 3), (4, 10), (0,)], ids=str)
def test_cuda_leading_dims(lead):
    args = make_args(lead, 256, 512, 1024, torch.bfloat16, "cuda")
    flat = tuple(t.reshape(-1, t.shape[-1]) if i in (0, 4, 8) else t for i, t in enumerate(args))
    for o, r in zip(LSN(*args), LSN(*flat)):
        assert o.shape == (*lead, 256)
        torch.testing.assert_close(o.reshape(r.shape), r, rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("M", [6, 40])
def test_cuda_noncontiguous_inputs_are_accepted(M):
    args = make_args((M,), 256, 512, 1024, torch.float16, "cuda")
    r = args[8].t().contiguous().t()
    x1 = torch.randn(M, 512 + 64, device="cuda").half()[:, :512]
    nw1 = torch.randn(256, 2, device="cuda").half()[:, 1]
    nb2 = torch.randn(512, device="cuda").half()[::2]
    strided = with_(args, x1=x1, residual=r, nw1=nw1, nb2=nb2)
    assert not any(t.is_contiguous() for t in (x1, r, nw1, nb2))
    contiguous = with_(strided, x1=x1.contiguous(), residual=r.contiguous(), nw1=nw1.contiguous(),
                       nb2=nb2.contiguous())
    for a, b in zip(LSN(*strided), LSN(*contiguous)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 16, 64])
def test_cuda_large_magnitude_inputs_stay_finite(M, dtype):
    # x @ w.T reaches ~5e5 before scaling, beyond fp16's range: the kernel scales in fp32 before
    # rounding, so the (in-range) h, and its norms, stay finite.
    args = make_args((M,), 512, 4096, 2048, dtype, "cuda", x_scale=100.0)
    args = with_(args, s1=torch.full_like(args[2], 1e-3), s2=torch.full_like(args[6], 1e-3))
    ref = h_oracle(args)
    assert ref.abs().max() < 6e4  # the true result is in fp16 range
    h, n1, n2 = LSN(*args)
    assert all(torch.isfinite(t).all() for t in (h, n1, n2))
    assert rel_err(h, ref) < 1e-2
    for n, (w, b) in zip((n1, n2), unpack_norms(args)):
        assert rel_err(n, ln_oracle(ref, w, b)) < 1e-2


@cuda
@pytest.mark.parametrize("M", [1, 40])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_cuda(bias, M):
    torch.library.opcheck(LSN, make_args((M,), 256, 512, 1024, torch.bfloat16, "cuda", bias=(bias, bias)))


@cuda
def test_compile_fullgraph_equals_eager_cuda():
    m = LayerEnds(256, torch.float16, "cuda")
    assert_compiled_equals_eager(m, [layer_inputs((M, 1), 256, torch.float16, "cuda") for M in (1, 9, 64)])
    assert not m.ws[:4].any()


@cuda
@pytest.mark.parametrize("M", [4, 40])
def test_reduce_overhead_equals_eager_and_captures_cuda_graph(M):
    reset_compile_counters()
    m = LayerEnds(256, torch.float16, "cuda", layers=3)
    torch._dynamo.mark_static_address(m.ws)  # as model_patch's decoder does with its workspace
    f = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        inputs = layer_inputs((M, 1), 256, torch.float16, "cuda")
        out = [t.clone() for t in f(*inputs)]
        for a, b in zip(out, m(*inputs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not m.ws[:4].any()
    assert_cuda_graph_recorded(inputs[0].device)


@cuda
def test_cuda_only_errors():
    args = make_args((4,), 32, 64, 48, torch.float16, "cuda")
    assert_same_error_eager_and_compiled(LSN, with_(args, ws=args[-1].cpu()),
                                         _OP + "all tensors must be on the same device, got x1 on cuda:0, weight1 on "
                                         "cuda:0, scales1 on cuda:0, bias1 on cuda:0, x2 on cuda:0, weight2 on cuda:0, "
                                         "scales2 on cuda:0, bias2 on cuda:0, residual on cuda:0, norm_weight1 on "
                                         "cuda:0, norm_bias1 on cuda:0, norm_weight2 on cuda:0, norm_bias2 on cuda:0, "
                                         "workspace on cpu")
    bad_k = make_args((4,), 32, 64, 40, torch.float16, "cuda")
    assert_same_error_eager_and_compiled(LSN, bad_k, _OP + "K must be a multiple of 16 on CUDA, got K=40 (weight2)")
