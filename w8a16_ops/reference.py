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
    acc = _affine(x, weight, scales, bias)
    if gelu:
        acc = F.gelu(acc)  # approximate="none": the erf form Pythia uses
    return acc.to(x.dtype)


def _affine(x, weight, scales, bias):
    """(x @ weight.T) * scales + bias in fp32, before any activation or rounding."""
    acc = (x.float() @ weight.float().t()) * scales.float()  # [..., N]
    return acc if bias is None else acc + bias.float()


def linear_pair(x1: torch.Tensor, weight1: torch.Tensor, scales1: torch.Tensor, bias1: torch.Tensor | None,
                x2: torch.Tensor, weight2: torch.Tensor, scales2: torch.Tensor, bias2: torch.Tensor | None,
                gelu1: bool = False, gelu2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent linears (one kernel launch on CUDA): ``(linear(x1, ...), linear(x2, ...))``,
    each with its own optional exact GeLU. x1 [..., K1] and x2 [..., K2] share their leading dims."""
    return (linear(x1, weight1, scales1, bias1, gelu=gelu1), linear(x2, weight2, scales2, bias2, gelu=gelu2))


def linear_sum(x1: torch.Tensor, weight1: torch.Tensor, scales1: torch.Tensor, bias1: torch.Tensor | None,
               x2: torch.Tensor, weight2: torch.Tensor, scales2: torch.Tensor,
               bias2: torch.Tensor | None) -> torch.Tensor:
    """``y = (x1 @ weight1.T) * scales1 + bias1 + (x2 @ weight2.T) * scales2 + bias2``, all in fp32
    with one final rounding: the two output projections of a parallel-residual block
    (GPT-NeoX's attention ``dense`` and MLP ``dense_4h_to_h``) as one op.

    x1 [..., K1], x2 [..., K2] (same leading dims and dtype); weight1 [N, K1], weight2 [N, K2]
    int8; scales fp32 [N]; biases [N] in x's dtype or None. Returns [..., N] in x's dtype.

    The CUDA op matches this up to 32 rows (one gemv launch, one rounding). Above (prefill)
    it runs two GEMMs and adds their outputs, each rounded to x's dtype first, as the
    unfused model does: a term beyond x's range is then inf, not cancelled.
    """
    return (_affine(x1, weight1, scales1, bias1) + _affine(x2, weight2, scales2, bias2)).to(x1.dtype)


def layer_norm_pair(h: torch.Tensor, norm_weight1: torch.Tensor, norm_bias1: torch.Tensor,
                    norm_weight2: torch.Tensor, norm_bias2: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two layer norms of h's rows over its last dim, each in fp32 from h as it is (already
    rounded), then rounded to h's dtype: GPT-NeoX's ``input_layernorm`` and
    ``post_attention_layernorm`` of one input."""
    hf, shape = h.float(), (h.shape[-1],)
    return tuple(F.layer_norm(hf, shape, w.float(), b.float(), eps).to(h.dtype)
                 for w, b in ((norm_weight1, norm_bias1), (norm_weight2, norm_bias2)))


def add_norm_pair(a: torch.Tensor, b: torch.Tensor, norm_weight1: torch.Tensor, norm_bias1: torch.Tensor,
                  norm_weight2: torch.Tensor, norm_bias2: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual add that ends a parallel-residual layer and the next layer's two norms:
    ``y = a + b`` (in fp32, rounded once to a's dtype, like torch's add of two fp16 tensors), then
    ``layer_norm_pair(y, ...)``. Returns (y, n1, n2), each shaped and typed like a."""
    y = (a.float() + b.float()).to(a.dtype)
    return (y, *layer_norm_pair(y, norm_weight1, norm_bias1, norm_weight2, norm_bias2, eps))


def linear_sum_norm(x1: torch.Tensor, weight1: torch.Tensor, scales1: torch.Tensor, bias1: torch.Tensor | None,
                    x2: torch.Tensor, weight2: torch.Tensor, scales2: torch.Tensor, bias2: torch.Tensor | None,
                    residual: torch.Tensor, norm_weight1: torch.Tensor, norm_bias1: torch.Tensor,
                    norm_weight2: torch.Tensor, norm_bias2: torch.Tensor, eps: float,
                    workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The end of a parallel-residual layer and the two norms of the next one, as one op:

    * ``h = residual + (x1 @ weight1.T) * scales1 + bias1 + (x2 @ weight2.T) * scales2 + bias2``,
      summed in fp32 and rounded once to x's dtype (``linear_sum`` with the residual inside);
    * ``n1 = layer_norm(h, norm_weight1, norm_bias1, eps)`` and ``n2`` likewise with the second
      norm, in fp32 from the rounded h, each rounded to x's dtype (``layer_norm_pair``).

    x1 [..., K1], x2 [..., K2], weights, scales and biases as in ``linear_sum``; residual [..., N]
    and the norm weights and biases [N], all in x's dtype. Returns (h, n1, n2), each [..., N] in
    x's dtype. ``workspace`` (the CUDA kernel's counters and scratch) is not used here.

    The CUDA op matches this up to 32 rows (one launch). Above (prefill) it adds the residual to
    ``linear_sum``'s output, which is rounded before (twice there: see ``linear_sum``), then
    normalises as here.
    """
    acc = _affine(x1, weight1, scales1, bias1) + _affine(x2, weight2, scales2, bias2) + residual.float()
    h = acc.to(x1.dtype)
    return (h, *layer_norm_pair(h, norm_weight1, norm_bias1, norm_weight2, norm_bias2, eps))


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


def rotate(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """GPT-NeoX's rotary embedding on the first R = cos.numel() dims of each head.

    ``x * cos + rotate_half(x) * sin`` over those dims, computed in fp32 and rounded
    once to x's dtype (as the compiled decoder does); the other dims pass through.
    x: [..., D]; cos, sin: [R] (R even, R <= D) or both None (x is returned as is).
    """
    if cos is None:
        return x
    R = cos.numel()
    xf = x.float()
    r = xf[..., :R]
    rot = torch.cat((-r[..., R // 2:], r[..., :R // 2]), dim=-1)
    out = torch.cat((r * cos.float() + rot * sin.float(), xf[..., R:]), dim=-1)
    return out.to(x.dtype)


def _write_new_token(k_new, v_new, k_cache, v_cache, slot):
    """k_cache[b, h, slot[b, h]] = k_new[b, h] (and v); slot [B, H] int64."""
    B, H, S, D = k_cache.shape
    idx = slot.clamp(max=S - 1)[:, :, None, None].expand(B, H, 1, D)
    inside = (slot < S)[:, :, None, None]  # a slot past the cache is not written
    k_cache.scatter_(2, idx, torch.where(inside, k_new[:, :, None].to(k_cache.dtype), k_cache.gather(2, idx)))
    v_cache.scatter_(2, idx, torch.where(inside, v_new[:, :, None].to(v_cache.dtype), v_cache.gather(2, idx)))


def cache_attention_full(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, seen: torch.Tensor,
                         scale: float, cos: torch.Tensor | None = None,
                         sin: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of the ``full`` policy: append the new token, then attend.

    Writes ``k_new``/``v_new`` into slot ``seen[0]`` of every (b, h) -- nothing is
    written if ``seen[0] >= S`` (the caller keeps sequences within the cache) -- and
    returns single-query attention over the first ``min(seen[0] + 1, S)`` slots.

    Args:
        q, k_new, v_new: [B, H, D], the new token (keys after rotary).
        k_cache, v_cache: [B, H, S, D], same dtype as q; mutated.
        seen: [1] int64, tokens already cached (the new token's position).
        scale: softmax scale.
        cos, sin: optional [R] rotary tables of the new token's position, q's dtype:
            q and k_new are first rotated (``rotate``), so the cache holds rotated keys.
    Returns:
        [B, H, D] in q's dtype.
    """
    B, H, S, _ = k_cache.shape
    q, k_new = rotate(q, cos, sin), rotate(k_new, cos, sin)
    newest = seen.reshape(1).long()
    _write_new_token(k_new, v_new, k_cache, v_cache, newest.expand(B, H))
    held = torch.clamp(newest + 1, max=S).to(torch.int32).expand(B)
    return decode_attention(q, k_cache, v_cache, held, scale)


def cache_attention_evict(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          free: torch.Tensor, seen: torch.Tensor, scale: float, budget: int,
                          n_sink: int, recent: int, scores: torch.Tensor | None = None,
                          cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of a fixed-budget policy: append, attend, evict (per b, h).

    1. The new token goes into slot ``free[b, h]``: its K/V, ``pos = seen[0]`` and,
       with ``scores``, a score of 0.
    2. Attention over the ``min(seen[0] + 1, S)`` held slots; with ``scores``, every
       slot's probability is added to its score (H2O).
    3. If ``seen[0] >= budget`` the cache now holds ``budget + 1`` tokens: the victim
       is the evictable slot with the smallest key (``scores`` if given, else the
       position: oldest first), ties to the oldest position. Evictable means
       ``n_sink <= pos <= seen[0] - recent``. ``pos[victim] = -1`` and
       ``free = victim``; otherwise ``free`` = the next unused slot.

    H2O(heavy, recent) is ``budget = heavy + recent, n_sink = 0`` with scores;
    sink(n, w) is ``budget = n + w, n_sink = n, recent = w``; window(w) is
    ``budget = w, n_sink = 0, recent = w``.

    Args:
        q, k_new, v_new: [B, H, D].
        k_cache, v_cache: [B, H, S, D]; mutated.
        pos: [B, H, S] int32, position held in each slot (-1: empty); mutated.
        free: [B, H] int64, the slot the new token goes to; mutated.
        seen: [1] int64, the new token's position.
        scale: softmax scale.
        budget, n_sink, recent: the policy (see above).
        scores: [B, H, S] float32 accumulated probabilities, or None; mutated.
        cos, sin: optional rotary tables, as in ``cache_attention_full``.
    Returns:
        [B, H, D] in q's dtype.
    """
    B, H, S, _ = k_cache.shape
    q, k_new = rotate(q, cos, sin), rotate(k_new, cos, sin)
    newest = seen.reshape(1).long()
    slot = free.long()
    _write_new_token(k_new, v_new, k_cache, v_cache, slot)
    inside = slot.clamp(max=S - 1)[..., None]
    pos.scatter_(2, inside, torch.where(slot[..., None] < S, newest.to(pos.dtype).expand(B, H, 1),
                                        pos.gather(2, inside)))
    if scores is not None:
        scores.scatter_(2, inside, torch.where(slot[..., None] < S, 0.0, scores.gather(2, inside)))
    held = torch.clamp(newest + 1, max=S)  # [1]
    out = decode_attention(q, k_cache, v_cache, held.to(torch.int32).expand(B), scale, scores)
    over = newest >= budget  # [1] bool
    evictable = (pos >= 0) & (pos >= n_sink) & (pos <= newest - recent)
    key = scores if scores is not None else pos.float()
    key = key.masked_fill(~evictable, float("inf"))
    tied = evictable & (key == key.amin(dim=-1, keepdim=True))
    victim = pos.masked_fill(~tied, torch.iinfo(pos.dtype).max).argmin(dim=-1, keepdim=True)  # [B, H, 1]
    pos.scatter_(2, victim, torch.where(over, -1, pos.gather(2, victim)))
    free.copy_(torch.where(over, victim[..., 0], held))
    return out
