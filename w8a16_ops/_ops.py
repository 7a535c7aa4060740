"""Schemas, CPU implementations and fake kernels of the ``w8a16`` ops.

The schemas are defined here, in Python, so that the ops exist on every machine.
Every implementation -- CPU, CUDA and fake -- validates its arguments with the same
functions (``_checks.py``), so a bad call fails with the same message in eager mode
and under torch.compile. The CUDA implementations then call the internal kernels
registered by the compiled extension (csrc/ops.cpp) as ``torch.ops.w8a16_cuda.*``.
"""
from __future__ import annotations

import functools
import math

import torch

from . import reference
from ._build import load_extension
from ._checks import (check_add_norm_pair, check_cache_attention, check_decode_attention, check_linear,
                      check_linear2, check_linear_sum_norm, norm_workspace_numel)

_lib = torch.library.Library("w8a16", "DEF")  # noqa: TOR901 - kept alive for the process
_lib.define("linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias=None) -> Tensor")
_lib.define("linear_gelu(Tensor x, Tensor weight, Tensor scales, Tensor? bias=None) -> Tensor")
_lib.define(
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor length, float scale, "
    "Tensor(a!)? scores=None) -> Tensor"
)


def _linear_cpu(op: str, gelu: bool):
    def impl(x, weight, scales, bias=None):
        check_linear(op, x, weight, scales, bias)
        return reference.linear(x, weight, scales, bias, gelu=gelu)
    return impl


def _linear_fake(op: str):
    def fake(x, weight, scales, bias=None):
        check_linear(op, x, weight, scales, bias)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))
    return fake


def _require_kernels(op: str) -> None:
    if not load_extension():
        raise RuntimeError(f"{op}: the CUDA kernels are not available (W8A16_NO_BUILD=1, or the build "
                           "failed; run `python -m w8a16_ops.build -v` to see why)")


def _linear_cuda(op: str, gelu: bool):
    def impl(x, weight, scales, bias=None):
        check_linear(op, x, weight, scales, bias)
        _require_kernels(op)
        return torch.ops.w8a16_cuda.linear(x, weight, scales, bias, gelu)
    return impl


for _name, _gelu in (("linear", False), ("linear_gelu", True)):
    _op = f"w8a16.{_name}"
    torch.library.impl(f"w8a16::{_name}", "CPU", lib=_lib)(_linear_cpu(_op, _gelu))
    torch.library.impl(f"w8a16::{_name}", "CUDA", lib=_lib)(_linear_cuda(_op, _gelu))
    torch.library.register_fake(f"w8a16::{_name}", lib=_lib)(_linear_fake(_op))


# Two linears in one launch, for GPT-NeoX's parallel residual (x + attn(ln1(x)) + mlp(ln2(x))):
# linear_pair runs the two input projections (query_key_value on ln1(x), dense_h_to_4h + GeLU
# on ln2(x)), linear_sum the two output projections (attention dense + dense_4h_to_h, summed in
# fp32). At decode sizes each W8A16 launch pays a few microseconds of fixed cost (ramp-up,
# tail, launch gap); two launches per layer instead of four save that twice.
_L2 = "Tensor x1, Tensor weight1, Tensor scales1, Tensor? bias1, Tensor x2, Tensor weight2, Tensor scales2, Tensor? bias2"
# overlap=True (CUDA, sm_90+; a scheduling hint with the same result, ignored elsewhere): the kernel
# is launched with programmatic dependent launch and reads its weights, scales and biases (and
# linear_sum's x2) before the kernel launched just before it has finished, overlapping that
# kernel's tail. Pass it only when the previous kernel writes none of those: true of model
# weights, and of x2 in a decoder layer, where the attention runs between the two ops.
_lib.define(f"linear_pair({_L2}, bool gelu1=False, bool gelu2=False, bool overlap=False) -> (Tensor, Tensor)")
_lib.define(f"linear_sum({_L2}, bool overlap=False) -> Tensor")
_LP, _LS = "w8a16.linear_pair", "w8a16.linear_sum"


def _pair_impl(kind: str):
    # kind: "cpu", "cuda" or "fake"
    def impl(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2, gelu1=False, gelu2=False, overlap=False):
        check_linear2(_LP, x1, weight1, scales1, bias1, x2, weight2, scales2, bias2, same_n=False)
        if kind == "fake":
            return (x1.new_empty((*x1.shape[:-1], weight1.shape[0])), x2.new_empty((*x2.shape[:-1], weight2.shape[0])))
        if kind == "cpu":
            return reference.linear_pair(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2, gelu1, gelu2)
        _require_kernels(_LP)
        return torch.ops.w8a16_cuda.linear2(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2,
                                            gelu1, gelu2, False, overlap)
    return impl


def _sum_impl(kind: str):
    def impl(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2, overlap=False):
        check_linear2(_LS, x1, weight1, scales1, bias1, x2, weight2, scales2, bias2, same_n=True)
        if kind == "fake":
            return x1.new_empty((*x1.shape[:-1], weight1.shape[0]))
        if kind == "cpu":
            return reference.linear_sum(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2)
        _require_kernels(_LS)
        return torch.ops.w8a16_cuda.linear2(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2,
                                            False, False, True, overlap)[0]
    return impl


# linear_sum_norm: linear_sum plus the residual add that follows it and the next layer's two
# layer norms (GPT-NeoX: input_layernorm, post_attention_layernorm; the final norm after the
# last layer), so a decode step runs one launch per layer end instead of linear_sum, add and two
# norms. The row statistics need every channel of the row: the CUDA kernel's blocks meet through
# the int32 `workspace` (counters, then scratch), mutated, hence Tensor(a!).
_lib.define(f"linear_sum_norm({_L2}, Tensor residual, Tensor norm_weight1, Tensor norm_bias1, "
            "Tensor norm_weight2, Tensor norm_bias2, float eps, Tensor(a!) workspace) -> (Tensor, Tensor, Tensor)")
_LSN = "w8a16.linear_sum_norm"
_MAX_NORM_ROWS = 32  # the CUDA kernel's limit (gemv path); prefill is composed from linear_sum


def norm_workspace(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A zeroed int32 workspace of ``norm_workspace_numel(n)`` elements for w8a16.linear_sum_norm
    with N = ``n`` output channels, on ``device``.

    It must be all zeros on first use. The CUDA kernel counts its blocks in the first 4 ints and
    puts them back to zero before it ends, and uses the rest as scratch, so the workspace stays
    usable without being cleared again (the CPU op and the composed path above 32 rows do not
    write it). One workspace may therefore serve calls that run one after another on one stream
    (every layer of a model, CUDA graph replays; any N up to ``n``), but never two calls that can
    run at the same time (on two streams): their counters would mix. Under torch.compile with
    CUDA graphs, pass it as a buffer or mark it with ``torch._dynamo.mark_static_address``.
    """
    return torch.zeros(norm_workspace_numel(n), dtype=torch.int32, device=device)


def _sum_norm_impl(kind: str):
    # kind: "cpu", "cuda" or "fake"
    def impl(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2, residual, norm_weight1, norm_bias1,
             norm_weight2, norm_bias2, eps, workspace):
        linears = (x1, weight1, scales1, bias1, x2, weight2, scales2, bias2)
        norms = (norm_weight1, norm_bias1, norm_weight2, norm_bias2)
        check_linear_sum_norm(_LSN, *linears, residual, *norms, eps, workspace)
        if kind == "fake":  # the workspace is scratch: no output aliases it
            return tuple(x1.new_empty((*x1.shape[:-1], weight1.shape[0])) for _ in range(3))
        if kind == "cpu":
            return reference.linear_sum_norm(*linears, residual, *norms, eps)
        _require_kernels(_LSN)
        M = math.prod(x1.shape[:-1])  # rows; also right when K1 == 0
        if 0 < M <= _MAX_NORM_ROWS and weight1.shape[1] + weight2.shape[1] > 0:
            h, n1, n2 = torch.ops.w8a16_cuda.linear_sum_norm(*linears, residual, *norms, eps, workspace)
            return h, n1, n2
        # Prefill (or no rows): linear_sum, rounded, then the residual (a second rounding) and
        # the norms as the reference computes them. The workspace is not touched.
        h = torch.ops.w8a16.linear_sum(*linears) + residual
        return (h, *reference.layer_norm_pair(h, *norms, eps))
    return impl


for _name, _make in (("linear_pair", _pair_impl), ("linear_sum", _sum_impl), ("linear_sum_norm", _sum_norm_impl)):
    torch.library.impl(f"w8a16::{_name}", "CPU", lib=_lib)(_make("cpu"))
    torch.library.impl(f"w8a16::{_name}", "CUDA", lib=_lib)(_make("cuda"))
    torch.library.register_fake(f"w8a16::{_name}", lib=_lib)(_make("fake"))

# add_norm_pair: the residual add at the end of a parallel-residual layer and the next layer's two
# layer norms, [y = a + b, norm1(y), norm2(y)], as one launch. The decoder runs it between
# linear_sum and linear_pair; with overlap=True (same meaning as above: CUDA sm_90+, same result)
# it reads the norm weights and biases before the previous kernel ends, and lets linear_pair start
# on its own tail. Pass overlap only when the previous kernel writes none of the four.
_lib.define("add_norm_pair(Tensor a, Tensor b, Tensor weight1, Tensor bias1, Tensor weight2, Tensor bias2, "
            "float eps, bool overlap=False) -> (Tensor, Tensor, Tensor)")
_ANP = "w8a16.add_norm_pair"


@functools.lru_cache(maxsize=None)
def _norm_kernel_takes(N: int) -> bool:
    """Whether the CUDA kernel takes rows of N channels (N % 8 == 0 and N <= 8192 today: one thread
    per 8 channels, one block of <= 1024 per row); asked of the extension, which owns the limit."""
    return bool(torch.ops.w8a16_cuda.add_norm_pair_supported(N))


def _add_norm_impl(kind: str):
    # kind: "cpu", "cuda" or "fake"
    def impl(a, b, weight1, bias1, weight2, bias2, eps, overlap=False):
        check_add_norm_pair(_ANP, a, b, weight1, bias1, weight2, bias2, eps)
        if kind == "fake":
            return tuple(torch.empty_like(a, memory_format=torch.contiguous_format) for _ in range(3))
        if kind == "cuda":
            _require_kernels(_ANP)
            if _norm_kernel_takes(a.shape[-1]):
                y, n1, n2 = torch.ops.w8a16_cuda.add_norm_pair(a, b, weight1, bias1, weight2, bias2, eps, overlap)
                return y, n1, n2
        # CPU, and widths the kernel does not take: the reference.
        y, n1, n2 = reference.add_norm_pair(a, b, weight1, bias1, weight2, bias2, eps)
        return y.contiguous(), n1.contiguous(), n2.contiguous()
    return impl


torch.library.impl("w8a16::add_norm_pair", "CPU", lib=_lib)(_add_norm_impl("cpu"))
torch.library.impl("w8a16::add_norm_pair", "CUDA", lib=_lib)(_add_norm_impl("cuda"))
torch.library.register_fake("w8a16::add_norm_pair", lib=_lib)(_add_norm_impl("fake"))

# decode_attention is one public op with an optional, mutated `scores`. Inductor
# cannot functionalize an optional mutable argument that is None (torch 2.11-2.13:
# "getitem is not an OpOverload"), so the public op is a composite that picks one
# of two internal ops with plain schemas; each has CPU, CUDA and fake kernels.
_lib.define("_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor length, float scale) -> Tensor")
_lib.define(
    "_decode_attention_scored(Tensor q, Tensor k_cache, Tensor v_cache, Tensor length, float scale, "
    "Tensor(a!) scores) -> Tensor"
)
_DA = "w8a16.decode_attention"


@torch.library.impl("w8a16::decode_attention", "CompositeImplicitAutograd", lib=_lib)
def _decode_attention(q, k_cache, v_cache, length, scale, scores=None):
    if scores is None:
        return torch.ops.w8a16._decode_attention(q, k_cache, v_cache, length, scale)
    return torch.ops.w8a16._decode_attention_scored(q, k_cache, v_cache, length, scale, scores)


def _da_cpu(q, k_cache, v_cache, length, scale, scores=None):
    check_decode_attention(_DA, q, k_cache, v_cache, length, scores)
    return reference.decode_attention(q, k_cache, v_cache, length, scale, scores)


def _da_cuda(q, k_cache, v_cache, length, scale, scores=None):
    check_decode_attention(_DA, q, k_cache, v_cache, length, scores)
    _require_kernels(_DA)
    return torch.ops.w8a16_cuda.decode_attention(q, k_cache, v_cache, length, scale, scores)


def _da_fake(q, k_cache, v_cache, length, scale, scores=None):
    check_decode_attention(_DA, q, k_cache, v_cache, length, scores)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


for _name in ("_decode_attention", "_decode_attention_scored"):
    torch.library.impl(f"w8a16::{_name}", "CPU", lib=_lib)(_da_cpu)
    torch.library.impl(f"w8a16::{_name}", "CUDA", lib=_lib)(_da_cuda)
    torch.library.register_fake(f"w8a16::{_name}", lib=_lib)(_da_fake)


# Fused decode steps of the KV-cache policies: write the new token into the cache,
# attend, and (evicting policies) pick and free the victim -- one op, so one kernel
# launch (two when S is split) per layer instead of a dozen small ones. Same
# composite pattern as decode_attention for the optional, mutated `scores`.
_lib.define(
    "cache_attention_full(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor seen, float scale, Tensor? cos=None, Tensor? sin=None, bool overlap=False) -> Tensor"
)
_EVICT_ARGS = ("Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) pos, "
               "Tensor(d!) free, Tensor seen, float scale, int budget, int n_sink, int recent")
_ROT = "Tensor? cos=None, Tensor? sin=None, bool overlap=False"
_lib.define(f"cache_attention_evict({_EVICT_ARGS}, Tensor(e!)? scores=None, {_ROT}) -> Tensor")
_lib.define(f"_cache_attention_evict({_EVICT_ARGS}, {_ROT}) -> Tensor")
_lib.define(f"_cache_attention_evict_scored({_EVICT_ARGS}, Tensor(e!) scores, {_ROT}) -> Tensor")
_CF = "w8a16.cache_attention_full"
_CE = "w8a16.cache_attention_evict"


@torch.library.impl("w8a16::cache_attention_evict", "CompositeImplicitAutograd", lib=_lib)
def _cache_attention_evict(q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent,
                           scores=None, cos=None, sin=None, overlap=False):
    args = (q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent)
    if scores is None:
        return torch.ops.w8a16._cache_attention_evict(*args, cos, sin, overlap)
    return torch.ops.w8a16._cache_attention_evict_scored(*args, scores, cos, sin, overlap)


def _full_impl(kind: str):
    # kind: "cpu", "cuda" or "fake"
    def impl(q, k_new, v_new, k_cache, v_cache, seen, scale, cos=None, sin=None, overlap=False):
        check_cache_attention(_CF, q, k_new, v_new, k_cache, v_cache, seen, None, cos, sin)
        if kind == "fake":
            return torch.empty_like(q, memory_format=torch.contiguous_format)
        if kind == "cpu":
            return reference.cache_attention_full(q, k_new, v_new, k_cache, v_cache, seen, scale, cos, sin)
        _require_kernels(_CF)
        return torch.ops.w8a16_cuda.cache_attention(q, k_new, v_new, k_cache, v_cache, seen, scale,
                                                    None, None, None, 0, 0, 0, cos, sin, overlap)
    return impl


torch.library.impl("w8a16::cache_attention_full", "CPU", lib=_lib)(_full_impl("cpu"))
torch.library.impl("w8a16::cache_attention_full", "CUDA", lib=_lib)(_full_impl("cuda"))
torch.library.register_fake("w8a16::cache_attention_full", lib=_lib)(_full_impl("fake"))


def _evict_run(kind, q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent, scores,
               cos, sin, overlap):
    # kind: "cpu", "cuda" or "fake"
    check_cache_attention(_CE, q, k_new, v_new, k_cache, v_cache, seen, (pos, free, scores, budget, n_sink, recent),
                          cos, sin)
    if kind == "fake":
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if kind == "cpu":
        return reference.cache_attention_evict(q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget,
                                               n_sink, recent, scores, cos, sin)
    _require_kernels(_CE)
    return torch.ops.w8a16_cuda.cache_attention(q, k_new, v_new, k_cache, v_cache, seen, scale, pos, free, scores,
                                                budget, n_sink, recent, cos, sin, overlap)


def _evict_impls(kind: str):
    def plain(q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent, cos=None, sin=None,
              overlap=False):
        return _evict_run(kind, q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent,
                          None, cos, sin, overlap)

    def scored(q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent, scores, cos=None,
               sin=None, overlap=False):
        return _evict_run(kind, q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent,
                          scores, cos, sin, overlap)
    return plain, scored


for _kind, _key in (("cpu", "CPU"), ("cuda", "CUDA"), ("fake", None)):
    for _name, _fn in zip(("_cache_attention_evict", "_cache_attention_evict_scored"), _evict_impls(_kind)):
        if _key is None:
            torch.library.register_fake(f"w8a16::{_name}", lib=_lib)(_fn)
        else:
            torch.library.impl(f"w8a16::{_name}", _key, lib=_lib)(_fn)
