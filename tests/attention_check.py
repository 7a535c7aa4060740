"""Output check shared by the decode-attention tests (tests/w8a16_ops/test_decode_attention.py,
test_cache_attention.py). Importable because pyproject's pytest options put tests/ on the path."""
from __future__ import annotations

import torch


def check_out(out, ref32, o64, dtype):
    """The op's error vs fp64 is at most ~2x that of the fp32 reference rounded to dtype."""
    assert out.dtype == dtype and out.shape == o64.shape
    assert torch.isfinite(out).all(), "non-finite output (unwritten element or NaN leak)"
    err = (out.double() - o64).abs().max().item()
    err_ref = (ref32.double() - o64).abs().max().item()
    assert err <= 2 * err_ref + 1e-6, f"max abs error {err:.3g} vs reference {err_ref:.3g}"
    rel = ((out.double() - o64).norm() / o64.norm().clamp_min(1e-30)).item()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 2e-3), f"relative error {rel:.3g}"
