"""Pure-torch reference implementations of every op.

They are the CPU implementations of the ops and the oracle of the tests. They
compute in fp32 and cast the result to the activation dtype, so they are exact up
to one final rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
           bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """y = act((x @ weight.T) * scales + bias), accumulated in fp32.

    Args:
        x: [..., K] float16 / bfloat16 (float32 accepted on CPU).
        weight: [N, K] int8.
        scales: [N] float32, one per output channel.
        bias: [N] in x's dtype, or None.
        gelu: apply the exact (erf) GeLU after the bias.
    Returns:
        [..., N] in x's dtype.
    """
    acc = x.float() @ weight.float().t()  # [..., N] fp32
    acc = acc * scales.float()
    if bias is not None:
        acc = acc + bias.float()
    if gelu:
        acc = F.gelu(acc)  # approximate="none": the erf form Pythia uses
    return acc.to(x.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     length: torch.Tensor, scale: float,
                     scores: torch.Tensor | None = None) -> torch.Tensor:
    """Single-query attention over the first ``length[b]`` slots of a KV cache.

    Args:
        q: [B, H, D] float16 / bfloat16 / float32.
        k_cache, v_cache: [B, H, S, D], same dtype as q.
        length: [B] int32, number of valid slots per row (1 <= length <= S).
        scale: softmax scale, usually D ** -0.5.
        scores: optional [B, H, S] float32. When given, the attention probability
            of every valid slot is added to it in place (H2O's accumulated score).
    Returns:
        [B, H, D] in q's dtype.
    """
    S = k_cache.shape[2]
    logits = torch.einsum("bhd,bhsd->bhs", q.float(), k_cache.float()) * scale  # [B, H, S]
    valid = torch.arange(S, device=q.device)[None, :] < length.to(q.device).long()[:, None]  # [B, S]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, H, S]; invalid slots get exactly 0
    if scores is not None:
        scores.add_(probs)
    out = torch.einsum("bhs,bhsd->bhd", probs, v_cache.float())
    return out.to(q.dtype)
