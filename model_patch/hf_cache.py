"""A ``transformers`` Cache over one of our KV-cache policies, for ``model.generate``.

    from model_patch import PolicyCache
    cache = PolicyCache(model, "h2o:252,252", batch_size=1, max_len=4096)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=256, do_sample=False)

The constructor patches the model's attention (``patch_attention``, idempotent): while
``layer_past`` is a ``PolicyCache``, each attention layer hands its rotated ``q, k, v``
to the policy (``attention.policy_attention``) instead of HF's ``update`` + attention.
The first forward is the prefill (any number of tokens into the empty cache); every
later forward must feed one token per row, which is what greedy or sampled
``generate`` does. Rows must be unpadded and of equal length.

The cache is not ``is_compileable``: ``generate`` then runs every step eagerly (the
compiled, CUDA-graph path is ``model_patch.Decoder``); the prefill/decode choice is
made on the host from the token count this cache keeps, with no device sync.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import patch_attention, policy_attention, prompt_limit, sequence_limit
from .kv_cache import KVCache
from .policies import PolicySpec, make_cache, parse_policy


class _PolicyLayer(CacheLayerMixin):
    """Per-layer face that HF's Cache API expects; the data lives in the shared policy."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "PolicyCache"):
        super().__init__()
        self.owner = owner
        self.is_initialized = True
        policy = owner.policy
        self.batch_size, self.dtype, self.device = policy.batch_size, policy.k.dtype, policy.k.device

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("PolicyCache.update was called: this attention module is not patched. Build the cache "
                           "with PolicyCache(model, ...) or call model_patch.patch_attention(model) first")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The patched attention ignores the mask; keep HF's mask bookkeeping consistent.
        return self.owner.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_max_length(self) -> int:
        limit = sequence_limit(self.owner.policy)
        return -1 if limit is None else limit

    def reset(self) -> None:
        return None


class PolicyCache(Cache):
    """HF ``Cache`` whose attention runs through a KV-cache policy (full, h2o, sink, window).

    Args:
        model: an HF GPT-NeoX causal LM (FP16/BF16/FP32, plain or W8A16-quantized).
            Its attention is patched in place (``patch_attention``).
        kv: a policy string (``"full"``, ``"h2o:252,252"``, ``"sink:4,500"``,
            ``"window:504"``) or a ``PolicySpec``.
        batch_size: rows per ``generate`` call; must equal the input's batch.
        max_len: longest sequence (prompt + new tokens) for ``full``, and longest
            prompt for the evicting policies (whose memory is bounded by their budget).

    One generation per cache: call ``reset()`` (or build a new one) before reusing it.
    Beam search and other batch-reordering strategies are not supported.
    """

    is_policy_cache = True

    def __init__(self, model: nn.Module, kv: str | PolicySpec = "full", *, batch_size: int, max_len: int):
        patch_attention(model)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PolicyCache: batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"PolicyCache: max_len must be a positive int, got {max_len!r}")
        config = model.config
        weight = model.gpt_neox.embed_in.weight
        self.spec = parse_policy(kv)
        self.policy: KVCache = make_cache(
            self.spec, config.num_hidden_layers, batch_size, config.num_attention_heads,
            config.hidden_size // config.num_attention_heads, max_len, weight.dtype, weight.device)
        self.seen = 0  # tokens consumed per row, on the host
        self._prefill = False
        super().__init__(layers=[_PolicyLayer(self) for _ in range(config.num_hidden_layers)])

    def attend(self, attn: nn.Module, hidden_states: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Called by the patched attention: hidden_states [B, T, hidden] -> [B, T, hidden]."""
        layer = attn.layer_idx
        B, T, _ = hidden_states.shape
        policy = self.policy
        if layer == 0:
            if B != policy.batch_size:
                raise ValueError(f"PolicyCache: built for batch_size={policy.batch_size}, got a batch of {B}")
            if hidden_states.dtype != policy.k.dtype or hidden_states.device != policy.k.device:
                raise ValueError(f"PolicyCache: built for {policy.k.dtype} on {policy.k.device}, the model runs "
                                 f"{hidden_states.dtype} on {hidden_states.device}")
            if self.seen == 0:
                if T > prompt_limit(policy):
                    raise ValueError(f"PolicyCache: prompt of {T} tokens exceeds max_len={prompt_limit(policy)}")
                self._prefill = True
            elif T == 1:
                self._prefill = False
            else:
                raise ValueError(f"PolicyCache: after the prefill, each forward must feed one token per row, got "
                                 f"{T}; call reset() to start a new sequence")
            limit = sequence_limit(policy)
            if limit is not None and self.seen + T > limit:
                raise ValueError(f"PolicyCache: {self.seen + T} tokens exceed max_len={limit} of the "
                                 f"{self.spec.name!r} cache; build it with a larger max_len")
        cos, sin = position_embeddings
        out = policy_attention(attn, hidden_states, cos, sin, policy, layer, self._prefill)
        if layer == policy.n_layers - 1:
            policy.advance(T)
            self.seen += T
        return out

    @property
    def max_cache_len(self) -> int:
        """Slots per layer, row and head (``max_len`` for ``full``, ``budget + 1`` or less otherwise)."""
        return self.policy.capacity

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        """Empty the cache in place for a new sequence."""
        self.policy.reset()
        self.seen = 0

    def memory_bytes(self) -> int:
        return self.policy.memory_bytes()

    def _unsupported(self, what: str):
        raise NotImplementedError(f"PolicyCache: {what} is not supported (greedy or sampled decoding of "
                                  "unpadded rows only)")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("crop (assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._unsupported("reorder_cache (beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("batch_repeat_interleave (num_return_sequences > 1 or beams)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported("batch_select_indices")

    def __repr__(self) -> str:
        return (f"PolicyCache(policy={self.spec}, batch_size={self.policy.batch_size}, "
                f"capacity={self.policy.capacity}, seen={self.seen})")
