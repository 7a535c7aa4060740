"""Quantization helpers."""
from __future__ import annotations

import torch


@torch.no_grad()
def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per output channel (row).

    Args:
        w: [N, K] floating weight (any float dtype, any device).
    Returns:
        (q, scales): q is int8 [N, K] in [-127, 127], scales is float32 [N] with
        ``w ~= q * scales[:, None]``. All-zero rows get scale 1.0 and q = 0, so
        no NaN or inf can appear.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_per_channel: w must be a floating tensor of shape [N, K], "
                         f"got {w.dtype} {list(w.shape)}")
    w32 = w.float()
    amax = w32.abs().amax(dim=1)  # [N]
    if not torch.isfinite(amax).all():
        raise ValueError("quantize_per_channel: w contains NaN or inf")
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w32 / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_per_channel: int8 [N, K], float32 [N] -> [N, K] in ``dtype``."""
    return (q.float() * scales.float()[:, None]).to(dtype)
