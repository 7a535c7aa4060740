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
from ._checks import check_decode_attention, check_linear

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
