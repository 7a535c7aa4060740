"""A lean GPT-NeoX decode loop: static KV-cache policy, eager prefill, one compiled decode step.

    dec = Decoder(model, batch_size=1, max_len=640, kv="h2o:252,252")
    out = dec.generate(input_ids, max_new_tokens=512)        # [B, T + 512] greedy
    logprobs = dec.teacher_force(tokens, prefill_len=128)    # [B, N - 129] fp32

The decoder runs its own forward over the HF model's modules (``embed_in``, the
layer norms, ``query_key_value``/``dense`` through ``attention.policy_attention``,
``mlp`` as it is, ``final_layer_norm``, ``get_output_embeddings()``), so it serves
FP16/BF16/FP32 models and W8A16-quantized ones alike. In a W8A16 parallel-residual
layer (every Pythia) the four linears run as two ops by default: ``w8a16.linear_pair``
(QKV and MLP-up + GeLU) and ``w8a16.linear_sum`` (attention dense + MLP-down); see
``Decoder(fuse=...)``; in decode steps each residual add and the next layer's two layer norms
run as one ``w8a16.add_norm_pair`` (``Decoder(add_norm=...)``).

The decode step (``decode_step``) is one function, compiled once per decoder with
``torch.compile(mode="reduce-overhead", fullgraph=True)`` on CUDA (passed as that mode's
inductor options plus a guard filter, ``_keep_guard``, that leaves the per-step guard
check to the step's arguments), so every step replays one CUDA graph. It holds: the token embedding, the rotary cos/sin computed
from ``cache.seen`` (a device tensor), every layer (QKV, rotary, the policy's
``decode`` incl. its eviction, dense, MLP, residuals), ``cache.advance(1)``, the
final norm, the LM head, the greedy argmax and, when targets are given, the target
log-probability (``logit[target] - logsumexp(logits)``, fp32). The full logits never
leave the graph. Two variants exist (with and without targets), each compiled once.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn

from .attention import (MAX_POSITION, policy_attention, policy_attention_core, prompt_limit, rotary_cos_sin,
                        sequence_limit)
from .kv_cache import KVCache
from .policies import PolicySpec, make_cache, parse_policy

# rope types whose inv_freq changes with the sequence length (HF's dynamic_rope_update):
# the decode step computes its angles in-graph from a fixed inv_freq, so they are refused.
_DYNAMIC_ROPE = ("dynamic", "longrope")


def _keep_guard(entry) -> bool:
    # Tensor-metadata guards (TENSOR_MATCH: dtype, device, shape, strides, plus the aliasing
    # check between them) are kept even under skip_guard_eval_unsafe for every tensor that
    # is not an nn.Parameter. In the decode step those are every int8 weight, scale and bias
    # and every KV-cache buffer: hundreds of tensors reached through ``self``. Measured on
    # H100 (INT8 Pythia-2.8B, batch 1): with them, an H2O step spent 1.8-3.5 ms of host time
    # (full: ~1.7 ms), more than its 1.9 ms of GPU time; without them, 0.27 ms (full: 0.24).
    # None of these tensors may change while the decoder lives (see Decoder), so their
    # guards are dropped; the step's arguments (tokens, targets) keep theirs, and every
    # other guard stays. Guard names come without their frame prefix ("self.cache.k.layers[0]").
    return not (entry.guard_type == "TENSOR_MATCH" and entry.name.startswith(("self.", "self[")))


def _step_options(cuda_graphs: bool) -> dict:
    """torch.compile options of the decode step: ``mode="reduce-overhead"`` on CUDA (spelled
    as its inductor options, since torch.compile takes a mode or options, not both) plus
    the guard filter."""
    options = dict(torch._inductor.list_mode_options("reduce-overhead" if cuda_graphs else "default"))
    options["guard_filter_fn"] = lambda entries: [_keep_guard(e) for e in entries]
    return options


def _fusable(layer: nn.Module) -> bool:
    """A parallel-residual layer whose four linears are W8A16 (``Decoder(fuse=True)``)."""
    from .quant import W8A16Linear, W8A16MLP

    attn = layer.attention
    return (bool(getattr(layer, "use_parallel_residual", False)) and isinstance(layer.mlp, W8A16MLP)
            and isinstance(attn.query_key_value, W8A16Linear) and isinstance(attn.dense, W8A16Linear))


def _linear_modules(layer: nn.Module) -> tuple:
    """A GPT-NeoX layer's query_key_value, dense_h_to_4h, dense and dense_4h_to_h, in the order of the
    decoder's table of fused linears (None where a module is missing)."""
    attn, mlp = layer.attention, layer.mlp
    return tuple(getattr(mod, name, None) for mod, name in (
        (attn, "query_key_value"), (mlp, "dense_h_to_4h"), (attn, "dense"), (mlp, "dense_4h_to_h")))


def _linear16(m: nn.Module, dtype: torch.dtype) -> bool:
    """A plain ``nn.Linear`` with 16-bit weights in the model's dtype (float32 too on CPU, where the ops
    run their reference), whose K the CUDA gemv takes (a multiple of 16)."""
    return (type(m) is nn.Linear and m.weight.dtype == dtype and m.weight.is_contiguous()
            and (dtype in (torch.float16, torch.bfloat16) or m.weight.device.type == "cpu")
            and m.in_features % 16 == 0)


def _fusable16(layer: nn.Module, config, dtype: torch.dtype) -> bool:
    """A parallel-residual layer with the four linears unquantized (``nn.Linear`` in the model's dtype)
    and the exact GeLU, which ``linear_pair``'s epilogue computes (``Decoder(fuse16=True)``)."""
    from .quant import EXACT_GELU

    return (bool(getattr(layer, "use_parallel_residual", False)) and getattr(config, "hidden_act", None) in EXACT_GELU
            and all(_linear16(m, dtype) for m in _linear_modules(layer)))


def _register_inductor_fallbacks() -> None:
    """Register inductor's fallback lowering for the w8a16 ops up front.

    Inductor registers a custom op's fallback the first time it meets the op in a graph, and
    first formats a log line that prints the op's arguments as IR, recursively through every
    producer (torch 2.11). With ``linear_sum_norm`` or ``add_norm_pair`` the layers form one
    unbroken chain of custom ops, so that text for the LM head's ``w8a16.linear`` (first met
    after the last layer) grows exponentially with the depth: a 32-layer compile did not finish
    in minutes. Registered here, no such text is built. Private inductor API, hence the guard:
    without it, compiling still works on shallow models."""
    try:
        from torch._inductor.lowering import lowerings, make_fallback
    except ImportError:  # pragma: no cover - another torch layout
        return
    for name in ("linear", "linear_gelu", "linear_pair", "linear_sum", "linear_sum_norm", "add_norm_pair"):
        op = getattr(torch.ops.w8a16, name).default
        if op not in lowerings:
            make_fallback(op, warn=False)


def _next_norms(neox: nn.Module, i: int) -> tuple[nn.Module, nn.Module]:
    """The two norms applied to layer i's output: layer i + 1's input norms, or the final norm
    (twice) after the last layer."""
    layers = neox.layers
    if i + 1 < len(layers):
        return layers[i + 1].input_layernorm, layers[i + 1].post_attention_layernorm
    return neox.final_layer_norm, neox.final_layer_norm


def _norms_fusable(neox: nn.Module) -> bool:
    """Every norm the decode step applies after a layer is an affine ``nn.LayerNorm`` over the
    hidden size, and the two share their eps (``w8a16.linear_sum_norm`` takes one)."""
    for a, b in (_next_norms(neox, i) for i in range(len(neox.layers))):
        for n in (a, b):
            if (type(n) is not nn.LayerNorm or n.weight is None or n.bias is None
                    or len(n.normalized_shape) != 1):
                return False
        if a.eps != b.eps:
            return False
    return True


class Decoder:
    """Greedy generation and teacher forcing of a GPT-NeoX model through a KV-cache policy.

    Args:
        model: an HF ``GPTNeoXForCausalLM``, plain or W8A16-quantized, in eval mode.
        batch_size: rows per call (every call must use exactly this batch).
        max_len: longest sequence (prompt + new tokens) for ``kv="full"``; for the
            evicting policies, the longest prompt (their memory is bounded by the budget,
            so decoding is not limited by ``max_len``).
        kv: ``"full"``, ``"h2o:HEAVY,RECENT"``, ``"sink:N_SINK,WINDOW"``, ``"window:W"``
            or a ``PolicySpec``.
        compile: compile the decode step with ``torch.compile(fullgraph=True)``;
            None (default) compiles on CUDA only, with ``mode="reduce-overhead"``
            (CUDA graphs). ``compile=True`` on CPU uses inductor's default mode.
        fuse: in W8A16 layers with GPT-NeoX's parallel residual (every Pythia), run the
            four linears as two ops: ``w8a16.linear_pair`` (``query_key_value`` on ln1(x) and
            ``dense_h_to_4h`` + GeLU on ln2(x), one launch) and ``w8a16.linear_sum``
            (``dense`` + ``dense_4h_to_h``, summed in fp32, one launch). At decode sizes
            each launch has a fixed cost of a few microseconds, paid twice per layer
            instead of four times. The sum is rounded once instead of after each
            projection, so logits differ from ``fuse=False`` by rounding only.
        fuse_norm: with ``fuse`` and every layer fused, decode steps also fold each residual
            add and the next layer's two layer norms (the final norm after the last layer)
            into the ``linear_sum`` launch: ``w8a16.linear_sum_norm``, one kernel fewer per
            layer. Off by default: on an H100 (Pythia-2.8B shapes) it measured ~1% slower per
            step than the inductor norm kernels it replaces (docs/kernels.md).
        add_norm: with ``fuse`` and every layer fused (and ``fuse_norm`` off), decode steps run
            each residual add and the next layer's two layer norms as one
            ``w8a16.add_norm_pair`` launch instead of an inductor kernel, so that with
            ``overlap`` it too starts on ``linear_sum``'s tail and ``linear_pair`` on its own
            (the final norm after the last layer stays a torch op). Norms in fp32 from the
            rounded residual sum, like torch's; the rounding of their outputs may differ from
            inductor's by one unit in the last place.
        fuse16: the same two-op layers for an unquantized (FP16 / BF16) model, with the ops' 16-bit
            weights (unit scales), in decode steps only (prefill keeps the ``nn.Linear`` modules), and
            the LM head as ``w8a16.linear`` in decode steps too. None (default): on CUDA when
            ``batch_size <= 8``, where the gemv streams 16-bit weights faster than cuBLAS's GEMV and
            the launches overlap (H100, Pythia-2.8B shapes, docs/results.md); at 9-16 rows it does
            not, so larger batches keep cuBLAS.
        overlap: in decode steps, launch the fused linears, ``add_norm_pair`` and the cache op
            with programmatic dependent launch (``overlap=True`` of ``w8a16.linear_pair``,
            ``linear_sum``, ``add_norm_pair`` and the ``cache_attention`` ops; CUDA sm_90+,
            ignored elsewhere). Each kernel then
            starts on the previous kernel's tail: the cache op requests its first K/V tiles
            while the QKV projection finishes, and ``linear_sum`` runs the MLP down
            projection while the attention finishes. Same results either way (H100,
            Pythia-2.8B shapes, batch 16: -4% per H2O step, docs/results.md).

    Attributes: ``model``, ``cache`` (the ``KVCache``), ``policy`` (the ``PolicySpec``),
    ``batch_size``, ``max_len``, ``dtype``, ``device``, ``compiled``, ``fused_layers``
    (how many layers run the fused linears: W8A16 layers, or with ``fuse16`` 16-bit ones),
    ``fused16`` (whether the 16-bit layers and LM head run through the ops in decode steps).

    The model must not be modified (weights swapped, re-quantized, moved) once a decoder
    is built on it: the compiled step skips the guards that would notice. Build a new
    decoder instead.
    """

    def __init__(self, model: nn.Module, *, batch_size: int, max_len: int, kv: str | PolicySpec = "full",
                 compile: bool | None = None, fuse: bool = True, fuse_norm: bool = False, add_norm: bool = True,
                 overlap: bool = True, fuse16: bool | None = None):
        from .quant import check_gpt_neox_model

        check_gpt_neox_model("Decoder", model)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Decoder: batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"Decoder: max_len must be a positive int, got {max_len!r}")
        config = model.config
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type in _DYNAMIC_ROPE:
            raise ValueError(f"Decoder: rope_type {rope_type!r} changes its frequencies with the sequence length; "
                             "only fixed-frequency rotary embeddings are supported")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"Decoder: hidden_size={config.hidden_size} is not a multiple of "
                             f"num_attention_heads={config.num_attention_heads}")

        self.model = model
        self.neox = model.gpt_neox
        self.lm_head = model.get_output_embeddings()
        weight = self.neox.embed_in.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.batch_size, self.max_len = batch_size, max_len
        self.policy = parse_policy(kv)
        self.cache: KVCache = make_cache(
            self.policy, config.num_hidden_layers, batch_size, config.num_attention_heads,
            config.hidden_size // config.num_attention_heads, max_len, self.dtype, self.device)
        # What the cache op reads early under overlap (the cache, pos, scores, seen, free) is written
        # by the previous step or by cache.advance(), never by the QKV projection just before it.
        self.cache.overlap = bool(overlap)  # also read by the fused linears (one setting)
        self._seq_limit = sequence_limit(self.cache)
        self._prompt_limit = prompt_limit(self.cache)
        self._rope_scaling = float(getattr(self.neox.rotary_emb, "attention_scaling", 1.0))
        self._fused = [bool(fuse) and _fusable(layer) for layer in self.neox.layers]
        # 16-bit layers through the same ops (fuse16), decode steps only; their unit scales.
        self.fused16 = (self.device.type == "cuda" and batch_size <= 8) if fuse16 is None else bool(fuse16)
        self._ones: dict[int, torch.Tensor] = {}
        self._is16 = [bool(fuse) and self.fused16 and not f and _fusable16(layer, config, self.dtype)
                      for f, layer in zip(self._fused, self.neox.layers)]
        self._fused = [a or b for a, b in zip(self._fused, self._is16)]
        self._lin = [self._layer_linears(layer) if f else None for f, layer in zip(self._fused, self.neox.layers)]
        self._lm16 = None  # (weight, unit scales, bias) of a 16-bit LM head run as w8a16.linear
        if self.fused16 and _linear16(self.lm_head, self.dtype):
            self._lm16 = (self.lm_head.weight, self._unit_scales(self.lm_head.out_features), self.lm_head.bias)
        self.fused_layers = sum(self._fused)
        # Decode steps fold the residual and the next norms into linear_sum (linear_sum_norm, int8
        # weights only), or run them as their own op (add_norm_pair): every layer fused, every norm a
        # plain LayerNorm.
        chainable = self.fused_layers == len(self._fused) > 0 and _norms_fusable(self.neox)
        self._norm_fused = bool(fuse_norm) and chainable and not any(self._is16)
        self._add_norm = bool(add_norm) and chainable and not self._norm_fused
        if self._norm_fused:
            import w8a16_ops

            # Counters and scratch of linear_sum_norm, shared by the layers (they run one after
            # another on one stream); the kernel leaves the counters at zero.
            self._norm_ws = w8a16_ops.norm_workspace(config.hidden_size, device=self.device)
            torch._dynamo.mark_static_address(self._norm_ws)

        self.compiled = (self.device.type == "cuda") if compile is None else bool(compile)
        self._cuda_graphs = self.compiled and self.device.type == "cuda"
        # One step function per variant (greedy: targets is None; teacher forcing: targets).
        self._steps = {True: self._step_eager, False: self._step_eager}
        self._step_codes = []
        if self.compiled:
            if self._norm_fused or self._add_norm:
                _register_inductor_fallbacks()
            # Private copies of the step's code object, one per variant: dynamo caches
            # compiled graphs per code object, so each decoder compiles each variant once,
            # many decoders in one process never pile up entries (or hit the recompile limit)
            # on a shared one, and each code object holds exactly one cache entry (so
            # skip_guard_eval_unsafe has no entries to tell apart). The guard filter keeps
            # the per-step guard check to the step's arguments (see _keep_guard).
            for variant in (True, False):
                name = f"decode_step_{'greedy' if variant else 'scored'}_{id(self):x}"
                code = Decoder._step_eager.__code__.replace(co_name=name)
                fn = types.FunctionType(code, Decoder._step_eager.__globals__, name)
                self._steps[variant] = torch.compile(types.MethodType(fn, self), fullgraph=True, dynamic=False,
                                                     options=_step_options(self._cuda_graphs))
                self._step_codes.append(code)
        self._warm: set[bool] = set()  # step variants (targets is None) already run once
        # The step reads its tokens from these fixed buffers: one layout (contiguous [B]) and
        # one address whatever the caller passes (a strided column, a row view), so neither
        # dynamo (which guards on strides) recompiles nor the CUDA graph copies its inputs.
        self._tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._targets = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        torch._dynamo.mark_static_address(self._tokens)
        torch._dynamo.mark_static_address(self._targets)
        self._pos = 0  # tokens consumed per row, tracked on the host
        self._started = False

    def _unit_scales(self, n: int) -> torch.Tensor:
        """fp32 ones [n]: the per-channel scales of 16-bit weights (one tensor per n, at a fixed address)."""
        if n not in self._ones:
            self._ones[n] = torch.ones(n, dtype=torch.float32, device=self.device)
            torch._dynamo.mark_static_address(self._ones[n])
        return self._ones[n]

    def _layer_linears(self, layer: nn.Module) -> tuple:
        """(weight, scales, bias) of a fused layer's query_key_value, dense_h_to_4h, dense and
        dense_4h_to_h, in that order: W8A16 ones as stored, 16-bit ones with unit scales."""
        out = []
        for m in _linear_modules(layer):
            scales = m.scales if m.weight.dtype == torch.int8 else self._unit_scales(m.out_features)
            out.append((m.weight, scales, m.bias))
        return tuple(out)

    def _forward(self, input_ids: torch.Tensor, prefill: bool) -> torch.Tensor:
        """input_ids [B, T] long -> final hidden states [B, T, hidden]. Advances the cache by T."""
        T = input_ids.shape[1]
        positions = self.cache.seen + torch.arange(T, device=input_ids.device)  # [T] int64
        # inv_freq is read through its module so that dynamo treats it as a static buffer
        # (a plain attribute would be copied into the CUDA graph's inputs every step).
        inv_freq = self.neox.rotary_emb.inv_freq  # [R / 2], used as fp32 like HF
        cos, sin = rotary_cos_sin(inv_freq, positions, self._rope_scaling, self.dtype)  # [1, T, R]
        x = self.neox.embed_in(input_ids)  # [B, T, hidden]
        if (self._norm_fused or self._add_norm) and not prefill:
            return self._forward_norm_chain(x, cos, sin, T)
        for i, layer in enumerate(self.neox.layers):
            if self._fused[i] and not (prefill and self._is16[i]):  # 16-bit prefill: nn.Linear (cuBLAS)
                x = self._fused_layer(layer, i, x, cos, sin, prefill)
                continue
            attn = policy_attention(layer.attention, layer.input_layernorm(x), cos, sin, self.cache, i, prefill)
            if layer.use_parallel_residual:
                # x + attn(ln1(x)) + mlp(ln2(x)), summed in HF's order
                x = layer.mlp(layer.post_attention_layernorm(x)) + attn + x
            else:
                attn = attn + x
                x = layer.mlp(layer.post_attention_layernorm(attn)) + attn
        self.cache.advance(T)
        return self.neox.final_layer_norm(x)

    def _fused_layer(self, layer: nn.Module, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     prefill: bool) -> torch.Tensor:
        """x + attn(ln1(x)) + mlp(ln2(x)) of a W8A16 parallel-residual layer, in two linear ops."""
        ctx, h = self._pair_and_attention(layer, i, layer.input_layernorm(x), layer.post_attention_layernorm(x),
                                          cos, sin, prefill)
        return self._output_projections(i, ctx, h, prefill) + x

    def _output_projections(self, i: int, ctx: torch.Tensor, h: torch.Tensor, prefill: bool) -> torch.Tensor:
        """``linear_sum``: layer i's attention dense on ctx plus its MLP down projection on h."""
        dense, down = self._lin[i][2], self._lin[i][3]
        # overlap: h (x2) comes from linear_pair, before the attention kernel that runs just
        # before this one, so it may be read early (w8a16_ops linear_sum).
        return torch.ops.w8a16.linear_sum(ctx, *dense, h, *down, overlap=self.cache.overlap and not prefill)

    def _pair_and_attention(self, layer: nn.Module, i: int, n1: torch.Tensor, n2: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, prefill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A fused layer up to its output projections: ``linear_pair`` (QKV on n1, MLP-up + GeLU on
        n2) and the attention through the cache policy. Returns (attention context, MLP hidden)."""
        qkv_m, up = self._lin[i][0], self._lin[i][1]
        qkv, h = torch.ops.w8a16.linear_pair(n1, *qkv_m, n2, *up, gelu2=True,
                                              overlap=self.cache.overlap and not prefill)
        return policy_attention_core(layer.attention, qkv, cos, sin, self.cache, i, prefill), h  # ctx [B, T, hidden]

    def _forward_norm_chain(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, T: int) -> torch.Tensor:
        """The decode-step layers when each layer's end also applies the next layer's two norms:
        ``linear_sum_norm`` (``fuse_norm``: x + attn + mlp and the norms in one op, the final norm
        after the last layer) or ``linear_sum`` then ``add_norm_pair`` (``add_norm``: after the
        last layer, the add and the final norm as torch ops)."""
        layers = self.neox.layers
        n1, n2 = layers[0].input_layernorm(x), layers[0].post_attention_layernorm(x)
        for i, layer in enumerate(layers):
            ctx, h = self._pair_and_attention(layer, i, n1, n2, cos, sin, False)
            a, b = _next_norms(self.neox, i)
            if self._norm_fused:
                dense, down = layer.attention.dense, layer.mlp.dense_4h_to_h
                x, n1, n2 = torch.ops.w8a16.linear_sum_norm(
                    ctx, dense.weight, dense.scales, dense.bias, h, down.weight, down.scales, down.bias,
                    x, a.weight, a.bias, b.weight, b.bias, a.eps, self._norm_ws)
            elif i + 1 < len(layers):
                # overlap: the norm weights are parameters, never written by linear_sum.
                x, n1, n2 = torch.ops.w8a16.add_norm_pair(self._output_projections(i, ctx, h, False), x,
                                                          a.weight, a.bias, b.weight, b.bias, a.eps,
                                                          overlap=self.cache.overlap)
            else:
                x = self._output_projections(i, ctx, h, False) + x
                n1 = self.neox.final_layer_norm(x)
        self.cache.advance(T)
        return n1

    def _step_eager(self, tokens: torch.Tensor, targets: torch.Tensor | None):
        # The decode step. Compiled as one graph (a private copy of this code, see __init__).
        h = self._forward(tokens[:, None], prefill=False)  # [B, 1, hidden]
        if self._lm16 is not None:
            logits = torch.ops.w8a16.linear(h[:, 0], *self._lm16).float()  # [B, V]
        else:
            logits = self.lm_head(h[:, 0]).float()  # [B, V]
        next_tokens = logits.argmax(dim=-1)
        if targets is None:
            return next_tokens, None
        target_logprobs = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return next_tokens, target_logprobs

    def _check_ids(self, fn: str, ids: torch.Tensor, dims: int) -> None:
        what = "[B, T]" if dims == 2 else "[B]"
        if not isinstance(ids, torch.Tensor) or ids.dim() != dims:
            raise ValueError(f"Decoder.{fn}: token ids must be a {dims}-D tensor {what}, got "
                             f"{getattr(ids, 'shape', type(ids).__name__)}")
        if ids.dtype != torch.long:
            raise ValueError(f"Decoder.{fn}: token ids must be int64, got {ids.dtype}")
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"Decoder.{fn}: built for batch_size={self.batch_size}, got a batch of {ids.shape[0]}")
        if ids.device != self.device:
            raise ValueError(f"Decoder.{fn}: token ids are on {ids.device}, the model is on {self.device}")

    def _check_length(self, fn: str, total: int, prompt: int) -> None:
        if prompt < 1:
            raise ValueError(f"Decoder.{fn}: the prompt must hold at least one token")
        if prompt > self._prompt_limit:
            raise ValueError(f"Decoder.{fn}: prompt of {prompt} tokens exceeds max_len={self._prompt_limit}")
        limit = MAX_POSITION if self._seq_limit is None else self._seq_limit
        if total > limit:
            raise ValueError(f"Decoder.{fn}: {total} tokens exceed max_len={limit} of the {self.policy.name!r} "
                             "cache; build the decoder with a larger max_len")

    def memory_bytes(self) -> int:
        """Bytes held by the KV cache's buffers."""
        return self.cache.memory_bytes()

    def reset(self) -> None:
        """Empty the cache in place (buffer addresses, hence CUDA graphs, stay valid)."""
        self.cache.reset()
        self._pos = 0
        self._started = False

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence: run the prompt eagerly and fill the cache.

        Args:
            input_ids: [B, T] int64 on the model's device, 1 <= T <= max_len.
        Returns:
            [B, V] fp32 logits of the last position.
        """
        self._check_ids("prefill", input_ids, 2)
        self._check_length("prefill", input_ids.shape[1], input_ids.shape[1])
        self.reset()
        h = self._forward(input_ids, prefill=True)  # [B, T, hidden]
        self._pos = input_ids.shape[1]
        self._started = True
        return self.lm_head(h[:, -1]).float()

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor,
                    targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed one token per row (after ``prefill``) and take the greedy next token.

        Args:
            tokens: [B] int64, the token at position ``seen`` of each row.
            targets: optional [B] int64; when given, their log-probabilities under this
                step's distribution are returned too.
        Returns:
            next_tokens [B] int64 (argmax) and target_logprobs [B] fp32 (or None).
            With CUDA graphs these are graph outputs, overwritten by the next step:
            copy them (``.clone()`` or into your own buffer) to keep them. Passing
            ``next_tokens`` straight back as the next ``tokens`` is fine (inputs are
            copied into the step's own buffers before the replay).
        """
        if not self._started:
            raise RuntimeError("Decoder.decode_step: call prefill() first")
        self._check_ids("decode_step", tokens, 1)
        if targets is not None:
            self._check_ids("decode_step", targets, 1)
        limit = MAX_POSITION if self._seq_limit is None else self._seq_limit
        if self._pos + 1 > limit:
            raise ValueError(f"Decoder.decode_step: the cache is full ({self._pos} tokens, max_len={limit} "
                             f"for the {self.policy.name!r} cache)")
        # Copy first: `tokens` may be the previous step's output, which the next replay overwrites.
        tokens = self._tokens.copy_(tokens)
        if targets is not None:
            targets = self._targets.copy_(targets)
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        variant = targets is None
        if self.compiled and variant in self._warm:
            # This variant is compiled: skip its guards. The full set (every module,
            # parameter and buffer the step reads) costs host time on every step, and none
            # of it may change while the decoder lives (the model is not to be modified
            # after). What the stance still checks is cut down by _keep_guard.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                out = self._steps[variant](tokens, targets)
        else:
            out = self._steps[variant](tokens, targets)
            self._warm.add(variant)
        self._pos += 1
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: prefill ``input_ids`` then ``max_new_tokens - 1`` decode steps.

        Args:
            input_ids: [B, T] int64 prompt (unpadded).
            max_new_tokens: tokens to generate (>= 0). For ``full``, T + max_new_tokens <= max_len.
        Returns:
            [B, T + max_new_tokens] int64: the prompt followed by the generated tokens.
        """
        self._check_ids("generate", input_ids, 2)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"Decoder.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        T = input_ids.shape[1]
        self._check_length("generate", T + max_new_tokens, T)
        if max_new_tokens == 0:
            return input_ids.clone()
        new = torch.empty(max_new_tokens, self.batch_size, dtype=torch.long, device=self.device)  # [N, B]
        new[0] = self.prefill(input_ids).argmax(dim=-1)
        for j in range(1, max_new_tokens):
            next_tokens, _ = self.decode_step(new[j - 1])
            new[j].copy_(next_tokens)
        return torch.cat([input_ids, new.t()], dim=1)

    @torch.no_grad()
    def teacher_force(self, input_ids: torch.Tensor, prefill_len: int,
                      progress: bool | Callable[[int, int], None] | None = None,
                      return_predictions: bool = False):
        """Score a given continuation token by token through the decode step (for perplexity).

        The first ``prefill_len`` tokens are the prompt (prefilled at once). Then decode
        step ``j`` feeds the true token ``input_ids[:, prefill_len + j]`` and scores the
        next true token ``input_ids[:, prefill_len + j + 1]``, for
        ``j = 0 .. N - prefill_len - 2``. So ``N - prefill_len - 1`` tokens are decoded and
        scored; the prefill's own prediction (of token ``prefill_len``) is not scored.
        E.g. N = 2177, prefill_len = 128: 2048 decode steps scoring tokens 129 .. 2176.

        Args:
            input_ids: [B, N] int64.
            prefill_len: 1 <= prefill_len <= N - 1.
            progress: True for a tqdm bar, or a callable ``progress(steps_done, steps_total)``
                called after each step (it must not sync the device if speed matters).
            return_predictions: also return the greedy prediction of each step.
        Returns:
            logprobs [B, N - prefill_len - 1] fp32 (natural log), and with
            ``return_predictions`` also predictions [B, N - prefill_len - 1] int64 (the argmax
            at each step, to compare with ``input_ids[:, prefill_len + 1:]``).
        """
        self._check_ids("teacher_force", input_ids, 2)
        N = input_ids.shape[1]
        if not isinstance(prefill_len, int) or not 1 <= prefill_len <= N - 1:
            raise ValueError(f"Decoder.teacher_force: prefill_len must be in [1, N - 1] = [1, {N - 1}], "
                             f"got {prefill_len!r}")
        # The last token is only scored, never fed.
        self._check_length("teacher_force", N - 1, prefill_len)
        steps = N - prefill_len - 1
        feed = input_ids[:, prefill_len:].t().contiguous()  # [steps + 1, B]: row j is fed at step j
        logprobs = torch.empty(steps, self.batch_size, dtype=torch.float32, device=self.device)
        predictions = (torch.empty(steps, self.batch_size, dtype=torch.long, device=self.device)
                       if return_predictions else None)
        self.prefill(input_ids[:, :prefill_len])
        bar = None
        if progress is True:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="teacher forcing", unit="tok")
        for j in range(steps):
            next_tokens, lp = self.decode_step(feed[j], feed[j + 1])
            logprobs[j].copy_(lp)
            if predictions is not None:
                predictions[j].copy_(next_tokens)
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(j + 1, steps)
        if bar is not None:
            bar.close()
        if return_predictions:
            return logprobs.t().contiguous(), predictions.t().contiguous()
        return logprobs.t().contiguous()

    def __repr__(self) -> str:
        return (f"Decoder(policy={self.policy}, batch_size={self.batch_size}, max_len={self.max_len}, "
                f"dtype={self.dtype}, device={self.device}, compiled={self.compiled}, "
                f"fused_layers={self.fused_layers}/{len(self._fused)}, fused16={self.fused16}, "
                f"cache={self.memory_bytes() / 2**20:.1f} MiB)")
