"""Readable fp32 oracle of the KV-cache policies (H2O, sink, window, full).

The specification (issue 4), applied independently to every layer, row and head:

* ``score[token]`` is the fp32 sum of the attention probability the token has
  received from every query so far, prefill queries included (the column sums
  of the prefill attention matrix).
* The current token always attends to itself. Keys are cached after rotary.
* Once more than ``budget`` tokens are held, evict the token with the smallest
  key among the evictable ones, ties to the oldest; an evicted token never
  comes back. For H2O the key is the score and the ``recent`` newest tokens are
  protected (budget = heavy + recent); for ``sink(n_sink, window)`` the key is the
  position and the first ``n_sink`` and the ``window`` newest are protected; for
  ``window(w)`` the key is the position and the ``w`` newest are protected.
* A prefill longer than the budget attends causally over the whole prompt, then
  evicts down to the budget (for H2O: the recent window plus the top ``heavy``
  by prefill score).

Choice where the spec is silent (the decode step order). By default a step
*attends first, then evicts*: the new token sees the ``budget`` held tokens plus
itself, its probabilities are added to the scores, then, if ``budget + 1``
tokens are held, one is evicted (the ``recent`` newest, which include the new
token, are protected). ``evict_first=True`` gives the other reading (evict down
to ``budget - 1`` old tokens before the new one arrives, so it sees ``budget``
tokens in all); ``bench.h2o_quality`` measured both and the default is the
one that reproduces the issue's table (see docs/h2o.md).

This module keeps every key and value ever seen and a ``held`` mask, so it
shares no slot bookkeeping with ``model_patch.kv_cache``; it is slow and simple.
``run_model`` is a per-token fp32 GPT-NeoX forward over a Hugging Face
``GPTNeoXForCausalLM`` that drives any cache with the ``prefill / decode /
advance`` interface (this oracle or a ``kv_cache`` policy).
"""
from __future__ import annotations

import torch
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from .policies import PolicySpec, parse_policy


class ReferenceCache:
    """The oracle cache of all layers.

    Per layer it keeps every key and value in fp32 ``[B, H, max_len, D]``, the
    score fp32 ``[B, H, max_len]`` and a ``held`` mask bool ``[B, H, max_len]``;
    entry ``t`` is position ``t``, and only ``[0, seen)`` is in use.
    """

    def __init__(self, policy: str | PolicySpec, n_layers: int, max_len: int, evict_first: bool = False):
        self.policy = parse_policy(policy)
        self.budget = self.policy.budget  # None = full
        self.max_len, self.evict_first = max_len, evict_first
        self.k, self.v, self.score, self.held = ([None] * n_layers for _ in range(4))
        self.seen = 0  # tokens consumed so far = position of the next token

    def advance(self, n: int) -> None:
        self.seen += n

    def _evict_one(self, layer: int, n: int, newest: int) -> None:
        """Among positions [0, n), drop one token per (row, head): the smallest key among the evictable ones."""
        p = self.policy
        held, score = self.held[layer][..., :n], self.score[layer][..., :n]
        pos = torch.arange(n)
        if p.name == "h2o":
            key, protected = score.double(), pos > newest - p.recent
        elif p.name == "sink":
            key, protected = pos.double().expand_as(score), (pos < p.n_sink) | (pos > newest - p.window)
        else:  # window
            key, protected = pos.double().expand_as(score), pos > newest - p.window
        key = key.masked_fill(~held | protected, float("inf"))
        victim = key.argmin(dim=-1, keepdim=True)  # first minimum = oldest position, since index == position
        assert bool(held.gather(-1, victim).all()), "no evictable token"
        held.scatter_(-1, victim, False)

    def _over_budget(self, layer: int, n: int, spare: int = 0) -> bool:
        """Whether some (row, head) holds more than ``budget - spare`` of the positions [0, n)."""
        return self.budget is not None and int(self.held[layer][..., :n].sum(-1).max()) > self.budget - spare

    def prefill(self, layer: int, q, k, v):
        """q, k, v [B, H, T, D] (keys after rotary) -> attention output [B, H, T, D] fp32."""
        B, H, T, D = q.shape
        logits = q.float() @ k.float().transpose(-1, -2) * D ** -0.5  # [B, H, T, T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        self.k[layer], self.v[layer] = torch.zeros(2, B, H, self.max_len, D)
        self.score[layer] = torch.zeros(B, H, self.max_len)
        self.held[layer] = torch.zeros(B, H, self.max_len, dtype=torch.bool)
        self.k[layer][:, :, :T], self.v[layer][:, :, :T] = k.float(), v.float()
        self.score[layer][..., :T] = probs.sum(dim=-2)  # column sums
        self.held[layer][..., :T] = True
        while self._over_budget(layer, T):
            self._evict_one(layer, T, newest=T - 1)
        return probs @ v.float()

    def decode(self, layer: int, q, k, v):
        """q, k, v [B, H, 1, D] (keys after rotary) -> attention output [B, H, 1, D] fp32."""
        t = self.seen  # position of the new token
        if self.evict_first and self._over_budget(layer, t, spare=1):
            self._evict_one(layer, t, newest=t)  # the incoming token counts as the newest
        self.k[layer][:, :, t], self.v[layer][:, :, t] = k[:, :, 0].float(), v[:, :, 0].float()
        self.held[layer][..., t] = True
        keys, values, held = self.k[layer][:, :, :t + 1], self.v[layer][:, :, :t + 1], self.held[layer][..., :t + 1]
        logits = q.float() @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, 1, t + 1]
        probs = torch.softmax(logits.masked_fill(~held[:, :, None], float("-inf")), dim=-1)
        self.score[layer][..., :t + 1] += probs[:, :, 0]
        if not self.evict_first and self._over_budget(layer, t + 1):
            self._evict_one(layer, t + 1, newest=t)
        return probs @ values

    def held_mask(self) -> torch.Tensor:
        """bool [L, B, H, seen]: which positions each layer, row and head holds."""
        return torch.stack(self.held)[..., :self.seen]


@torch.no_grad()
def run_model(model, input_ids: torch.Tensor, n_prefill: int, cache, record: bool = False):
    """Teacher-forced prefill + per-token decode of a GPT-NeoX model through ``cache``.

    Args:
        model: a ``GPTNeoXForCausalLM`` in fp32 (on CPU for the oracle).
        input_ids: [B, N] int64. Tokens [0, n_prefill) are the prompt; every
            later token except the last is fed as one decode step.
        n_prefill: prompt length, >= 1.
        cache: ``ReferenceCache`` or a ``model_patch.kv_cache`` policy.
        record: also return ``cache.held_mask()`` after every step.
    Returns:
        logprobs [B, N - n_prefill] fp32, the log-probability of token ``t`` given
        the tokens before it, for ``t`` in ``[n_prefill, N)`` (the first one comes
        from the prefill's last position), and the list of held masks
        ([L, B, H, n_prefill + step] bool, prefill first) if ``record``.
    """
    neox = model.gpt_neox
    cfg = model.config
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H
    B, N = input_ids.shape
    logprobs, history = [], []
    spans = [(0, n_prefill)] + [(t, t + 1) for t in range(n_prefill, N - 1)]
    for lo, hi in spans:
        x = neox.embed_in(input_ids[:, lo:hi]).float()  # [B, T, hidden]
        positions = torch.arange(lo, hi)[None]  # [1, T]
        cos, sin = neox.rotary_emb(x, positions)
        for i, layer in enumerate(neox.layers):
            a = layer.attention
            h = layer.input_layernorm(x)
            qkv = a.query_key_value(h).view(B, hi - lo, H, 3 * D).transpose(1, 2)  # [B, H, T, 3D]
            q, k, v = qkv.chunk(3, dim=-1)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            attn = cache.prefill(i, q, k, v) if lo == 0 else cache.decode(i, q, k, v)
            attn = a.dense(attn.float().transpose(1, 2).reshape(B, hi - lo, H * D))
            if layer.use_parallel_residual:  # Pythia: x + attn(ln1(x)) + mlp(ln2(x))
                x = x + attn + layer.mlp(layer.post_attention_layernorm(x))
            else:
                x = x + attn
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.advance(hi - lo)
        logits = model.get_output_embeddings()(neox.final_layer_norm(x[:, -1]))  # [B, vocab]
        logprobs.append(torch.log_softmax(logits.float(), dim=-1).gather(1, input_ids[:, hi, None])[:, 0])
        if record:
            history.append(cache.held_mask().cpu())
    logprobs = torch.stack(logprobs, dim=1)
    return (logprobs, history) if record else logprobs
