"""Schemas, CPU implementations and fake kernels of the ``w8a16`` ops.

The schemas are defined here, in Python, so that the ops exist on every machine.
The CUDA implementations are registered by the compiled extension
(csrc/ops.cpp, ``TORCH_LIBRARY_IMPL(w8a16, CUDA, m)``) when it is loaded.
"""
from __future__ import annotations

import torch

from . import reference
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


for _name, _gelu in (("linear", False), ("linear_gelu", True)):
    _op = f"w8a16.{_name}"
    torch.library.impl(f"w8a16::{_name}", "CPU", lib=_lib)(_linear_cpu(_op, _gelu))
    torch.library.register_fake(f"w8a16::{_name}", lib=_lib)(_linear_fake(_op))


@torch.library.impl("w8a16::decode_attention", "CPU", lib=_lib)
def _decode_attention_cpu(q, k_cache, v_cache, length, scale, scores=None):
    check_decode_attention("w8a16.decode_attention", q, k_cache, v_cache, length, scores)
    return reference.decode_attention(q, k_cache, v_cache, length, scale, scores)


@torch.library.register_fake("w8a16::decode_attention", lib=_lib)
def _decode_attention_fake(q, k_cache, v_cache, length, scale, scores=None):
    check_decode_attention("w8a16.decode_attention", q, k_cache, v_cache, length, scores)
    return torch.empty_like(q, memory_format=torch.contiguous_format)
