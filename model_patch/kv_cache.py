"""KV-cache policies with static shapes, usable inside a CUDA-graph decode step.

Every policy is an ``nn.Module`` that owns the cache of *all* layers in fixed
device buffers (so their addresses never change and CUDA graphs can replay):

* ``k``, ``v``: ``[L, B, H, S, D]`` in the model dtype, ``S = capacity`` slots,
  stored as one buffer per layer (a ``LayerStack``): a compiled step that
  writes into a *view* of one ``[L, ...]`` buffer gets functionalized into a copy
  of the whole buffer per write (measured on H100: 0.2-3 ms per decode step).
* ``length``: ``[B]`` int32, the number of tokens held (valid slots).
* ``seen``: ``[1]`` int64, the number of tokens consumed so far, which is also
  the rotary position of the next token.

The decoder calls, per layer, ``prefill(layer, q, k, v)`` once with the whole
prompt and then ``decode(layer, q, k, v)`` once per generated token, each
returning the attention output; after all layers it calls ``advance(n)``.
``q, k, v`` are ``[B, H, T, D]``, keys already rotated (rotary applied before
caching, so positions keep their original encoding).

Policies
--------
``FullCache`` keeps every token. ``H2OCache(heavy, recent)``, ``SinkCache(n_sink,
window)`` and ``WindowCache(window)`` hold at most ``budget`` tokens between steps
(``heavy + recent``, ``n_sink + window``, ``window``). They share one mechanism,
``EvictingCache``, and differ only in their *eviction key*: the accumulated
attention score for H2O, the position (oldest first) for sink and window, plus
the set of tokens they protect (the ``recent`` / ``window`` newest, the first
``n_sink``). ``model_patch.h2o_reference`` is the readable oracle they are
tested against.

Decode step of an evicting cache, per layer (all rows and heads at once), one
fused op, ``w8a16.cache_attention_evict`` (one CUDA kernel launch)::

    0. rotate q and k (rotary) when the caller passes the cos/sin tables
    1. write k, v of the new token into its row's/head's free slot; pos[slot] =
       its position, score[slot] = 0
    2. attend over the min(seen + 1, S) held slots (adding this query's
       probabilities into ``scores``; H2O only)
    3. if more than ``budget`` tokens are now held: victim = argmin of the key
       over the evictable slots, ties to the oldest position; pos[victim] = -1
       and the victim becomes the next free slot; otherwise the next free slot
       is the next unused one.

``FullCache`` uses ``w8a16.cache_attention_full`` (steps 0-2, slot = ``seen``).

So the new token sees ``budget`` older tokens plus itself, and ``budget`` tokens
remain after the step. The step has static shapes, no ``.item()`` and no host
sync: the "is the cache full" test is a device-side ``torch.where``.

Prefill runs eagerly: full causal attention over the prompt (fp32 column sums of
the probability matrix give H2O's initial scores); if the prompt is longer than
the budget, the same key picks the tokens to keep (the protected ones plus, for
H2O, the top ``heavy`` by prefill score).

Memory
------
Evicting policies allocate ``S = min(budget + 1, max_len)`` slots (one spare
slot for the incoming token), independent of how many tokens are decoded::

    bytes = B * L * 2 * S * hidden * dtype_bytes        # K and V (hidden = H * D)
          + B * L * H * S * 4                           # pos, int32
          + B * L * H * S * 4                           # scores, fp32 (H2O only)
          + B * L * H * 8 + B * 4 + 8                   # free slot (int64), length, seen

``FullCache`` has ``S = max_len`` and only the K/V, ``length`` and ``seen`` terms.
Example, Pythia-2.8B (L=32, H=32, D=80) fp16, batch 16: H2O 252/252 holds
2.65 GB of K/V + 66 MB of scores and positions; ``full`` at 2,176 tokens holds
11.4 GB.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import w8a16_ops  # noqa: F401  (registers torch.ops.w8a16)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     column_sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal self-attention over a prompt, optionally with H2O's prefill scores.

    Args:
        q, k, v: [B, H, T, D], one dtype.
        scale: softmax scale.
        column_sums: also return, per key, the fp32 sum of the probability it
            receives from all queries (the column sums of the attention matrix).
    Returns:
        out [B, H, T, D] in q's dtype, and column sums [B, H, T] fp32 or None.
    """
    if not column_sums:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), None
    B, H, T, _ = q.shape
    out = torch.empty_like(q)
    sums = torch.zeros(B, H, T, dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    # Blocks of queries bound the probability matrix to ~64M fp32 values (256 MB).
    block = max(1, (1 << 26) // (B * H * T))
    for lo in range(0, T, block):
        hi = min(T, lo + block)
        logits = (q[:, :, lo:hi].float() @ kf[:, :, :hi].transpose(-1, -2)) * scale  # [B, H, hi-lo, hi]
        future = torch.arange(lo, hi, device=q.device)[:, None] < torch.arange(hi, device=q.device)[None, :]
        probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        sums[:, :, :hi] += probs.sum(dim=-2)
        out[:, :, lo:hi] = (probs @ vf[:, :, :hi]).to(q.dtype)
    return out, sums


class LayerStack:
    """Per-layer tensors that index like one ``[L, ...]`` tensor.

    ``stack[l]`` and ``stack[l, ...rest]`` return (views of) layer ``l``'s own
    tensor, so every in-place write in the decode step mutates a whole graph input
    in place. Whole-stack reads (``shape``, comparisons, ``stacked()``) are for
    tests and tools; they copy.
    """

    def __init__(self, tensors: list[torch.Tensor]):
        self.layers = list(tensors)

    def __getitem__(self, idx):
        first, rest = (idx[0], idx[1:]) if isinstance(idx, tuple) else (idx, ())
        if isinstance(first, int):
            t = self.layers[first]
            return t[rest] if rest else t
        return self.stacked()[idx]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.layers), *self.layers[0].shape))

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def fill_(self, value) -> "LayerStack":
        for t in self.layers:
            t.fill_(value)
        return self

    def zero_(self) -> "LayerStack":
        return self.fill_(0)

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.layers)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # torch.equal(stack, other) and friends see the stacked copy.
        def unwrap(a):
            return a.stacked() if isinstance(a, LayerStack) else a
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def __eq__(self, other):
        return self.stacked() == other

    def __ge__(self, other):
        return self.stacked() >= other

    __hash__ = None


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
        # Decode ops launched with overlap=True (programmatic dependent launch, see
        # w8a16_ops): set by a Decoder, whose QKV projection, the kernel before each cache op,
        # writes none of the buffers here.
        self.overlap = False
        shape = (batch_size, n_heads, capacity, head_dim)
        self.k = self._layer_buffers("k", shape, 0, dtype, device)
        self.v = self._layer_buffers("v", shape, 0, dtype, device)
        self.register_buffer("length", torch.zeros(batch_size, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("seen", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
        self._mark_static()

    def _layer_buffers(self, name: str, shape: tuple, fill, dtype: torch.dtype, device) -> LayerStack:
        """One non-persistent buffer ``{name}_{l}`` of ``shape`` per layer, as a LayerStack."""
        for layer in range(self.n_layers):
            self.register_buffer(f"{name}_{layer}", torch.full(shape, fill, dtype=dtype, device=device),
                                 persistent=False)
        return LayerStack([getattr(self, f"{name}_{layer}") for layer in range(self.n_layers)])

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

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row: q, k, v [B, H, 1, D] -> attention output [B, H, 1, D].

        With ``cos, sin`` ([R] rotary tables of the token's position), q and k are
        rotated here (inside the fused op); without them they must be rotated already.
        """
        raise NotImplementedError

    @staticmethod
    def _rotary(cos, sin):
        if cos is None or cos.numel() == 0:
            return None, None
        return cos.reshape(-1), sin.reshape(-1)


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

    def decode(self, layer, q, k, v, cos=None, sin=None):
        # q, k, v: [B, H, 1, D]. One fused op (rotary,) writes the new token into slot
        # `seen` and attends over the seen + 1 filled slots.
        cos, sin = self._rotary(cos, sin)
        out = torch.ops.w8a16.cache_attention_full(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.k[layer],
                                                   self.v[layer], self.seen, self.scale, cos, sin,
                                                   overlap=self.overlap)
        if layer == self.n_layers - 1:
            self.length.copy_((self.seen + 1).to(torch.int32).expand(self.batch_size))
        return out.unsqueeze(2)


class EvictingCache(KVCache):
    """Shared mechanism of the fixed-budget policies (see the module docstring).

    Subclasses set ``n_sink`` and ``recent`` (the protected oldest and newest tokens)
    and pass ``budget``; H2O also sets ``uses_scores`` so that its key is the
    accumulated attention instead of the position. ``eviction_key`` (prefill) and the
    decode op (``w8a16.cache_attention_evict``) read the policy from these alone.

    Extra buffers: ``pos`` ``[L, B, H, S]`` int32 (position held in each slot,
    -1 for an empty or evicted slot), ``free`` ``[L, B, H]`` int64 (the slot the
    next token goes to) and, for H2O, ``scores`` ``[L, B, H, S]`` fp32.
    """

    uses_scores = False

    def __init__(self, n_layers, batch_size, n_heads, head_dim, max_len, dtype, device, *, budget: int):
        if budget < 1:
            raise ValueError(f"{type(self).__name__}: budget must be >= 1 token, got {budget}")
        if max_len < 1:
            raise ValueError(f"{type(self).__name__}: max_len must be >= 1, got {max_len}")
        # One spare slot receives the incoming token before the eviction; a budget
        # that covers the whole sequence never evicts and needs no more than max_len.
        super().__init__(n_layers, batch_size, n_heads, head_dim, min(budget + 1, max_len), dtype, device)
        self.budget, self.max_len = budget, max_len
        slots = (batch_size, n_heads, self.capacity)
        self.pos = self._layer_buffers("pos", slots, -1, torch.int32, device)
        self.free = self._layer_buffers("free", slots[:2], 0, torch.int64, device)
        if self.uses_scores:
            self.scores = self._layer_buffers("scores", slots, 0, torch.float32, device)
        self._mark_static()

    def eviction_key(self, scores: torch.Tensor | None, pos: torch.Tensor,
                     newest: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """The eviction order and the evictable set of held tokens.

        Args:
            scores: [B, H, N] fp32 accumulated scores (H2O) or None.
            pos: [B, H, N] integer positions of the slots (-1 = empty).
            newest: position of the newest token held (int or [1] int64 tensor).
        Returns:
            key [B, H, N] fp32 (the smallest evictable key goes first, ties to the
            oldest position) and evictable [B, H, N] bool (protected tokens False):
            ``n_sink <= pos <= newest - recent``, as in the decode op.
        """
        key = scores if self.uses_scores else pos.float()
        return key, (pos >= self.n_sink) & (pos <= newest - self.recent)

    @torch.no_grad()
    def reset(self) -> None:
        super().reset()
        self.pos.fill_(-1)
        self.free.zero_()
        if self.uses_scores:
            self.scores.zero_()

    def prefill(self, layer, q, k, v):
        B, H, T, D = q.shape
        if T > self.max_len:
            raise ValueError(f"{type(self).__name__}: prompt of {T} tokens exceeds max_len={self.max_len}")
        out, colsum = causal_attention(q, k, v, self.scale, column_sums=self.uses_scores)
        pos = torch.arange(T, device=q.device).expand(B, H, T)  # [B, H, T]
        n = min(T, self.budget)
        keep = pos
        if T > self.budget:
            # Evicting one token at a time would not change the keys or the protected
            # set, so the tokens to drop are the T - budget smallest keys; a stable
            # sort of position-ordered slots sends ties to the oldest.
            key, evictable = self.eviction_key(colsum, pos, T - 1)
            key = key.masked_fill(~evictable, float("inf"))
            order = torch.sort(key, dim=-1, stable=True).indices
            keep = order[..., T - self.budget:].sort(dim=-1).values  # [B, H, budget], by position
        self.k[layer, :, :, :n].copy_(k.gather(2, keep[..., None].expand(B, H, n, D)))
        self.v[layer, :, :, :n].copy_(v.gather(2, keep[..., None].expand(B, H, n, D)))
        self.pos[layer].fill_(-1)
        self.pos[layer, :, :, :n].copy_(keep)
        if self.uses_scores:
            self.scores[layer].zero_()
            self.scores[layer, :, :, :n].copy_(colsum.gather(2, keep))
        self.free[layer].fill_(n)
        if layer == self.n_layers - 1:
            self.length.fill_(n)
        return out

    def decode(self, layer, q, k, v, cos=None, sin=None):
        # One fused op per layer: (rotary,) write the new token into its free slot, attend (H2O:
        # accumulate the probabilities into the scores), and, once more than `budget`
        # tokens are held, evict the argmin of the key (see the module docstring and
        # w8a16_ops.reference.cache_attention_evict). The "is the cache full" test
        # happens on the device, without a host sync.
        B = q.shape[0]
        cos, sin = self._rotary(cos, sin)
        out = torch.ops.w8a16.cache_attention_evict(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], self.k[layer], self.v[layer], self.pos[layer], self.free[layer],
            self.seen, self.scale, self.budget, self.n_sink, self.recent,
            self.scores[layer] if self.uses_scores else None, cos, sin, overlap=self.overlap)
        if layer == self.n_layers - 1:
            self.length.copy_(torch.clamp(self.seen + 1, max=self.budget).to(torch.int32).expand(B))
        return out.unsqueeze(2)

    def held_mask(self) -> torch.Tensor:
        """Which positions are held: bool [L, B, H, seen] (host sync; for tests and tools)."""
        n = int(self.seen.item())
        pos = self.pos.stacked()  # [L, B, H, S]
        mask = torch.zeros(*pos.shape[:3], n + 1, dtype=torch.bool, device=pos.device)
        idx = torch.where(pos >= 0, pos.long(), n)  # empty slots go to the extra column
        return mask.scatter_(-1, idx, True)[..., :n]


class H2OCache(EvictingCache):
    """Heavy-Hitter Oracle: keep the ``recent`` newest tokens plus the ``heavy``
    older tokens with the largest accumulated attention probability."""

    name = "h2o"
    uses_scores = True

    def __init__(self, n_layers, batch_size, n_heads, head_dim, max_len, dtype, device, *,
                 heavy: int = 252, recent: int = 252):
        if heavy < 0 or recent < 0:
            raise ValueError(f"H2OCache: heavy and recent must be >= 0, got heavy={heavy}, recent={recent}")
        self.heavy, self.recent, self.n_sink = heavy, recent, 0
        super().__init__(n_layers, batch_size, n_heads, head_dim, max_len, dtype, device, budget=heavy + recent)


class SinkCache(EvictingCache):
    """StreamingLLM: keep the first ``n_sink`` tokens (attention sinks) and the
    ``window`` newest; evict the oldest token in between."""

    name = "sink"

    def __init__(self, n_layers, batch_size, n_heads, head_dim, max_len, dtype, device, *,
                 n_sink: int = 4, window: int = 500):
        if n_sink < 0 or window < 1:
            raise ValueError(f"SinkCache: need n_sink >= 0 and window >= 1, got n_sink={n_sink}, window={window}")
        self.n_sink, self.window, self.recent = n_sink, window, window
        super().__init__(n_layers, batch_size, n_heads, head_dim, max_len, dtype, device, budget=n_sink + window)


class WindowCache(EvictingCache):
    """Sliding window: keep the ``window`` newest tokens."""

    name = "window"

    def __init__(self, n_layers, batch_size, n_heads, head_dim, max_len, dtype, device, *, window: int = 504):
        if window < 1:
            raise ValueError(f"WindowCache: window must be >= 1, got {window}")
        self.window, self.n_sink, self.recent = window, 0, window
        super().__init__(n_layers, batch_size, n_heads, head_dim, max_len, dtype, device, budget=window)
