"""KV-cache policies with static shapes, usable inside a CUDA-graph decode step.

Every policy is an ``nn.Module`` that owns the cache of *all* layers in fixed
device buffers (so their addresses never change and CUDA graphs can replay):

* ``k``, ``v``: ``[L, B, H, S, D]`` in the model dtype, ``S = capacity`` slots.
* ``length``: ``[B]`` int32, the number of valid slots (slots ``[0, length)``).
* ``seen``: ``[1]`` int64, the number of tokens consumed so far, which is also
  the rotary position of the next token.

The decoder calls, per layer, ``prefill(layer, q, k, v)`` once with the whole
prompt and then ``decode(layer, q, k, v)`` once per generated token, each
returning the attention output; after all layers it calls ``advance(n)``.
``q, k, v`` are ``[B, H, T, D]``, keys already rotated (rotary applied before
caching, so positions keep their original encoding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import w8a16_ops  # noqa: F401  (registers torch.ops.w8a16)


class KVCache(nn.Module):
    """Base class: the buffers and bookkeeping every policy shares."""

    name = "base"

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        if min(n_layers, batch_size, n_heads, head_dim, capacity) <= 0:
            raise ValueError(f"{type(self).__name__}: all sizes must be positive, got layers={n_layers}, "
                             f"batch={batch_size}, heads={n_heads}, head_dim={head_dim}, capacity={capacity}")
        self.n_layers, self.batch_size, self.n_heads, self.head_dim = n_layers, batch_size, n_heads, head_dim
        self.capacity = capacity
        self.scale = head_dim ** -0.5
        shape = (n_layers, batch_size, n_heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("length", torch.zeros(batch_size, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("seen", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
        self._mark_static()

    def _mark_static(self) -> None:
        # Buffers that the compiled decode step mutates must have static addresses,
        # otherwise inductor skips CUDA graphs ("mutated inputs").
        for buf in self.buffers():
            torch._dynamo.mark_static_address(buf)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the cache in place (buffers keep their addresses)."""
        self.length.zero_()
        self.seen.zero_()

    def memory_bytes(self) -> int:
        """Bytes held by the cache's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def advance(self, n: int) -> None:
        """Called once after all layers have consumed ``n`` new tokens."""
        self.seen.add_(n)

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FullCache(KVCache):
    """Keeps every token (no eviction). Decode attention reads only the filled slots."""

    name = "full"

    def __init__(self, n_layers, batch_size, n_heads, head_dim, max_len, dtype, device):
        super().__init__(n_layers, batch_size, n_heads, head_dim, max_len, dtype, device)

    def prefill(self, layer, q, k, v):
        T = q.shape[2]
        if T > self.capacity:
            raise ValueError(f"FullCache: prompt of {T} tokens exceeds max_len={self.capacity}")
        self.k[layer, :, :, :T].copy_(k)
        self.v[layer, :, :, :T].copy_(v)
        if layer == self.n_layers - 1:
            self.length.fill_(T)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)

    def decode(self, layer, q, k, v):
        # q, k, v: [B, H, 1, D]. Slot of the new token = tokens seen so far.
        slot = self.seen  # [1] int64
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        length = (slot + 1).to(torch.int32).expand(self.batch_size)
        out = torch.ops.w8a16.decode_attention(q[:, :, 0], self.k[layer], self.v[layer], length, self.scale)
        if layer == self.n_layers - 1:
            self.length.copy_(length)
        return out.unsqueeze(2)
