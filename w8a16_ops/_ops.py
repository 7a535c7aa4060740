"""Schemas, CPU implementations and fake kernels of the ``w8a16`` ops.

The schemas are defined here, in Python, so that the ops exist on every machine.
Every implementation -- CPU, CUDA and fake -- validates its arguments with the same
functions (``_checks.py``), so a bad call fails with the same message in eager mode
and under torch.compile. The CUDA implementations then call the internal kernels
registered by the compiled extension (csrc/ops.cpp) as ``torch.ops.w8a16_cuda.*``.
"""
from __future__ import annotations

import torch

from . import reference
from ._build import load_extension
from ._checks import check_cache_attention, check_decode_attention, check_linear

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
    "Tensor seen, float scale, Tensor? cos=None, Tensor? sin=None) -> Tensor"
)
_EVICT_ARGS = ("Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) pos, "
               "Tensor(d!) free, Tensor seen, float scale, int budget, int n_sink, int recent")
_ROT = "Tensor? cos=None, Tensor? sin=None"
_lib.define(f"cache_attention_evict({_EVICT_ARGS}, Tensor(e!)? scores=None, {_ROT}) -> Tensor")
_lib.define(f"_cache_attention_evict({_EVICT_ARGS}, {_ROT}) -> Tensor")
_lib.define(f"_cache_attention_evict_scored({_EVICT_ARGS}, Tensor(e!) scores, {_ROT}) -> Tensor")
_CF = "w8a16.cache_attention_full"
_CE = "w8a16.cache_attention_evict"


@torch.library.impl("w8a16::cache_attention_evict", "CompositeImplicitAutograd", lib=_lib)
def _cache_attention_evict(q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent,
                           scores=None, cos=None, sin=None):
    args = (q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent)
    if scores is None:
        return torch.ops.w8a16._cache_attention_evict(*args, cos, sin)
    return torch.ops.w8a16._cache_attention_evict_scored(*args, scores, cos, sin)


def _full_impl(kind: str):
    # kind: "cpu", "cuda" or "fake"
    def impl(q, k_new, v_new, k_cache, v_cache, seen, scale, cos=None, sin=None):
        check_cache_attention(_CF, q, k_new, v_new, k_cache, v_cache, seen, None, cos, sin)
        if kind == "fake":
            return torch.empty_like(q, memory_format=torch.contiguous_format)
        if kind == "cpu":
            return reference.cache_attention_full(q, k_new, v_new, k_cache, v_cache, seen, scale, cos, sin)
        _require_kernels(_CF)
        return torch.ops.w8a16_cuda.cache_attention(q, k_new, v_new, k_cache, v_cache, seen, scale,
                                                    None, None, None, 0, 0, 0, cos, sin)
    return impl


torch.library.impl("w8a16::cache_attention_full", "CPU", lib=_lib)(_full_impl("cpu"))
torch.library.impl("w8a16::cache_attention_full", "CUDA", lib=_lib)(_full_impl("cuda"))
torch.library.register_fake("w8a16::cache_attention_full", lib=_lib)(_full_impl("fake"))


def _evict_run(kind, q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent, scores,
               cos, sin):
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
                                                budget, n_sink, recent, cos, sin)


def _evict_impls(kind: str):
    def plain(q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent, cos=None, sin=None):
        return _evict_run(kind, q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent,
                          None, cos, sin)

    def scored(q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent, scores, cos=None,
               sin=None):
        return _evict_run(kind, q, k_new, v_new, k_cache, v_cache, pos, free, seen, scale, budget, n_sink, recent,
                          scores, cos, sin)
    return plain, scored


for _kind, _key in (("cpu", "CPU"), ("cuda", "CUDA"), ("fake", None)):
    for _name, _fn in zip(("_cache_attention_evict", "_cache_attention_evict_scored"), _evict_impls(_kind)):
        if _key is None:
            torch.library.register_fake(f"w8a16::{_name}", lib=_lib)(_fn)
        else:
            torch.library.impl(f"w8a16::{_name}", _key, lib=_lib)(_fn)
