"""Numerics helpers of the W8A16 linear tests (tests/w8a16_ops/test_linear*.py): the fp32 oracle,
the same-precision torch peer and the relative error the bars compare. Importable because
pyproject's pytest options put tests/ on the path."""
from __future__ import annotations

import torch.nn.functional as F


def oracle(x, w, s, b, gelu=False):
    """fp32 reference from the dequantized weights."""
    y = x.float() @ (w.float() * s[:, None]).t()
    if b is not None:
        y = y + b.float()
    return F.gelu(y) if gelu else y


def torch_same_precision(x, w, s, b, gelu=False):
    """What a user would write in torch at the activation precision."""
    y = F.linear(x, w.to(x.dtype)) * s
    if b is not None:
        y = y + b
    y = y.to(x.dtype)
    return F.gelu(y) if gelu else y


def rel_err(a, ref):
    return ((a.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
