"""W8A16 ops for GPT-NeoX / Pythia decoding.

Importing this package registers

* ``torch.ops.w8a16.linear(x, weight, scales, bias=None)``
* ``torch.ops.w8a16.linear_gelu(x, weight, scales, bias=None)``
* ``torch.ops.w8a16.linear_pair(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2, gelu1=False, gelu2=False)``
* ``torch.ops.w8a16.linear_sum(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2)``
* ``torch.ops.w8a16.linear_sum_norm(x1, weight1, scales1, bias1, x2, weight2, scales2, bias2, residual,
  norm_weight1, norm_bias1, norm_weight2, norm_bias2, eps, workspace)`` -> ``(h, n1, n2)``: linear_sum
  + residual, then two layer norms of the result (``workspace``: ``norm_workspace(N, device)``)
* ``torch.ops.w8a16.add_norm_pair(a, b, weight1, bias1, weight2, bias2, eps)`` -> ``(y, n1, n2)``: y = a + b
  and two layer norms of y
* ``torch.ops.w8a16.decode_attention(q, k_cache, v_cache, length, scale, scores=None)``
* ``torch.ops.w8a16.cache_attention_full(...)`` / ``cache_attention_evict(...)`` (fused cache steps)

``linear_pair``, ``linear_sum``, ``add_norm_pair`` and the cache ops also take ``overlap=False``
(programmatic dependent launch on sm_90+, same results; see ``_ops.py``). Each op comes
with a CPU implementation (the pure-torch reference), a fake kernel for
torch.compile, and, when a CUDA GPU (sm_80+) is present, the CUDA kernels from
``csrc/`` (built on first import; see ``w8a16_ops._build``).
"""
from . import _ops  # noqa: F401  (defines the ops)
from . import reference
from ._checks import norm_workspace_numel
from ._ops import norm_workspace
from ._build import extension_loaded, load_extension
from .quant import dequantize_per_channel, quantize_per_channel

load_extension()

__all__ = [
    "reference",
    "quantize_per_channel",
    "dequantize_per_channel",
    "norm_workspace",
    "norm_workspace_numel",
    "load_extension",
    "extension_loaded",
]
