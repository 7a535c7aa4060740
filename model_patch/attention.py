"""GPT-NeoX attention computed through a KV-cache policy (``model_patch.kv_cache``).

``policy_attention`` is the one implementation, used by the ``Decoder``'s own
forward and, through ``patch_attention``, by the HF model when it is given a
``PolicyCache``. It takes the HF ``GPTNeoXAttention`` module for its weights
(``query_key_value`` and ``dense``, ``nn.Linear`` or ``W8A16Linear`` alike) and
does what HF does up to the cache, then hands ``q, k, v`` to the policy:

    qkv = query_key_value(h)                          # [B, T, 3 * H * D]
    q, k, v = per-head interleaved split              # [B, H, T, D] each
    q, k = rotary on the first rotary_ndims dims      # keys are cached after rotary
    out = cache.prefill(layer, q, k, v)  or  cache.decode(layer, q, k, v, cos, sin)
                                                      # (decode: the rotary is fused into the op)
    return dense(out reshaped to [B, T, H * D])

The policy attention is causal by construction, so HF's attention mask is not used.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .kv_cache import KVCache

# Largest position whose rotary angle is exact: positions are turned into fp32.
MAX_POSITION = 1 << 24


def split_heads(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split GPT-NeoX's fused QKV output, which is interleaved per head.

    Args:
        qkv: [B, T, 3 * H * D], laid out as [B, T, H, (q | k | v) * D].
        n_heads: H.
    Returns:
        q, k, v: [B, H, T, D] views.
    """
    B, T, _ = qkv.shape
    qkv = qkv.view(B, T, n_heads, -1).transpose(1, 2)  # [B, H, T, 3 * D]
    q, k, v = qkv.chunk(3, dim=-1)
    return q, k, v


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial rotary embedding, the same arithmetic as HF's ``apply_rotary_pos_emb``.

    Args:
        q, k: [B, H, T, D].
        cos, sin: [B or 1, T, R] in q's dtype, R = rotary_ndims <= D (HF's
            ``position_embeddings``). Only the first R dims of each head rotate.
    Returns:
        q, k: [B, H, T, D].
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, R]
    r = cos.shape[-1]
    q_rot, q_pass = q[..., :r], q[..., r:]
    k_rot, k_pass = k[..., :r], k[..., r:]
    q = torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q_pass], dim=-1)
    k = torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k_pass], dim=-1)
    return q, k


def rotary_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles, as HF's ``GPTNeoXRotaryEmbedding.forward`` computes them.

    Args:
        inv_freq: [R / 2] the model's ``rotary_emb.inv_freq`` (any float dtype; used as fp32).
        positions: [T] int64 positions (a device tensor: no host sync).
        scaling: ``rotary_emb.attention_scaling``.
        dtype: the activation dtype.
    Returns:
        cos, sin: [1, T, R] in ``dtype``.
    """
    freqs = positions[:, None].float() * inv_freq.float()[None, :]  # [T, R / 2], fp32 like HF
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, R]
    cos = (emb.cos() * scaling).to(dtype)
    sin = (emb.sin() * scaling).to(dtype)
    return cos[None], sin[None]


def policy_attention(attn: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: KVCache, layer: int, prefill: bool) -> torch.Tensor:
    """One GPT-NeoX attention block, with the attention itself done by a cache policy.

    Args:
        attn: the layer's HF ``GPTNeoXAttention`` (uses ``query_key_value``, ``dense``,
            ``head_size`` and ``config.num_attention_heads``).
        hidden_states: [B, T, hidden], the input layer norm's output, model dtype.
        cos, sin: [B or 1, T, rotary_ndims] rotary tables for the T positions, model dtype.
        cache: the policy holding every layer's cache.
        layer: the layer index.
        prefill: True: ``cache.prefill`` (T tokens into an empty cache, causal
            attention among them); False: ``cache.decode`` (T must be 1). The caller
            knows which, so no device value is read here.
    Returns:
        [B, T, hidden] attention output after ``dense``. The caller calls
        ``cache.advance(T)`` after the last layer.
    """
    qkv = attn.query_key_value(hidden_states)  # [B, T, 3 * hidden]
    return attn.dense(policy_attention_core(attn, qkv, cos, sin, cache, layer, prefill))


def policy_attention_core(attn: nn.Module, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          cache: KVCache, layer: int, prefill: bool) -> torch.Tensor:
    """``policy_attention`` between the two projections: from the fused ``qkv`` [B, T, 3 * hidden]
    (the output of ``query_key_value``) to the attention output [B, T, hidden] before ``dense``.
    Same arguments otherwise."""
    B, T, _ = qkv.shape
    q, k, v = split_heads(qkv, attn.config.num_attention_heads)  # [B, H, T, D]
    if prefill:
        q, k = apply_rotary(q, k, cos, sin)
        out = cache.prefill(layer, q, k, v)
    else:
        if T != 1:
            raise ValueError(f"policy_attention: decode takes one token per row, got T={T}")
        # Rows share their position (no padding), so row 0's tables serve all; the cache's
        # fused decode op rotates q and k itself, reading them straight from `qkv`.
        out = cache.decode(layer, q, k, v, cos[0, 0], sin[0, 0])
    return out.transpose(1, 2).reshape(B, T, -1)  # [B, T, H * D]


def sequence_limit(cache: KVCache) -> int | None:
    """Most tokens (prompt + decoded) one sequence may feed through ``cache``; None: no limit.

    ``full`` holds every token in ``capacity`` slots. An evicting policy whose
    capacity exceeds its budget (the spare slot for the incoming token) never runs
    out of slots; one clipped to a ``max_len`` below ``budget + 1`` is bounded by it.
    """
    budget = getattr(cache, "budget", None)
    if budget is not None and cache.capacity > budget:
        return None
    return cache.capacity


def prompt_limit(cache: KVCache) -> int:
    """Longest prompt ``cache.prefill`` accepts (``max_len`` for every policy)."""
    return getattr(cache, "max_len", cache.capacity)


def _patched_forward(self, hidden_states, attention_mask=None, layer_past=None, position_embeddings=None,
                     **kwargs):
    # Drop-in GPTNeoXAttention.forward: a PolicyCache routes the attention through
    # its policy; any other cache (or none) gets HF's own forward, unchanged.
    if getattr(layer_past, "is_policy_cache", False):
        return layer_past.attend(self, hidden_states, position_embeddings), None
    return type(self).forward(self, hidden_states, attention_mask, layer_past, position_embeddings, **kwargs)


def _check_mask(module, args, kwargs):
    # Forward pre-hook of GPTNeoXModel: the policy caches are causal and unpadded,
    # so a padded 2-D mask (or a custom 4-D one) would be silently ignored. Refuse it.
    names = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "past_key_values")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    cache, mask = bound.get("past_key_values"), bound.get("attention_mask")
    if not getattr(cache, "is_policy_cache", False) or mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"PolicyCache: attention_mask must be a 2-D padding mask [B, S], got {mask.dim()}-D "
                         f"{list(mask.shape)}; the policy caches are causal and take no custom masks")
    if not bool(mask.all()):
        raise ValueError("PolicyCache: padded batches are not supported (attention_mask has zeros); the policy "
                         "caches hold rows of equal length: batch prompts of the same length, or run them one by one")
    return None


def patch_attention(model: nn.Module) -> nn.Module:
    """Make an HF GPT-NeoX model's attention honour a ``PolicyCache``, in place.

    Every layer's ``attention.forward`` becomes a drop-in that runs
    ``policy_attention`` when ``layer_past`` is a ``PolicyCache`` and HF's original
    forward otherwise, so the model keeps working with ``DynamicCache``,
    ``StaticCache`` or no cache. A pre-hook on ``model.gpt_neox`` rejects padded
    attention masks when a ``PolicyCache`` is used. Idempotent. Returns ``model``.
    """
    from .quant import check_gpt_neox_model

    check_gpt_neox_model("patch_attention", model)
    for layer in model.gpt_neox.layers:
        attn = layer.attention
        if not getattr(attn, "_policy_patched", False):
            attn.forward = types.MethodType(_patched_forward, attn)
            attn._policy_patched = True
    neox = model.gpt_neox
    if not getattr(neox, "_policy_mask_hook", None):
        neox._policy_mask_hook = neox.register_forward_pre_hook(_check_mask, with_kwargs=True)
    return model
