"""W8A16 module swaps for HF GPT-NeoX: int8 weights, fp16/bf16 activations.

``quantize_model(model)`` replaces, in every layer, ``attention.query_key_value`` and
``attention.dense`` by ``W8A16Linear`` and the whole ``mlp`` by ``W8A16MLP`` (whose
``dense_h_to_4h`` runs as one fused ``w8a16.linear_gelu``), and optionally the LM head.
Module names stay those of HF, so state-dict keys read
``gpt_neox.layers.0.mlp.dense_h_to_4h.weight`` / ``...scales`` / ``...bias``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import w8a16_ops  # noqa: F401  (registers torch.ops.w8a16)
from w8a16_ops import quantize_per_channel

# The per-layer linears, relative to gpt_neox.layers[i].
LAYER_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
# hidden_act values that mean the exact erf GeLU, which linear_gelu computes.
EXACT_GELU = ("gelu",)


def activation_problem(config) -> str | None:
    """Why a config's MLP activation cannot run as W8A16MLP (whose ``linear_gelu`` computes the
    exact erf GeLU), or None when it can."""
    act = getattr(config, "hidden_act", None)
    if act in EXACT_GELU:
        return None
    return f"config.hidden_act must be 'gelu' (exact erf GeLU, fused into w8a16.linear_gelu), got {act!r}"


class W8A16Linear(nn.Module):
    """``y = (x @ weight.T) * scales + bias`` with int8 weights, through ``torch.ops.w8a16.linear``.

    Buffers (not parameters: int8 tensors cannot require grad, and this module is for
    inference only):
        weight: int8 [N, K] contiguous, N = out_features, K = in_features.
        scales: float32 [N], one per output channel. Kept fp32 under ``model.half()``
            and ``model.to(dtype)``: only device moves reach them.
        bias: [N] in the activation dtype, or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "W8A16Linear":
        """Quantize an ``nn.Linear`` (weight [N, K] float) per output channel; bias kept in its dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W8A16Linear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.is_meta:
            raise ValueError("W8A16Linear.from_linear: linear.weight is on the meta device (no values to "
                             "quantize); load the weights first")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features = linear.in_features, linear.out_features
        q, scales = quantize_per_channel(w)
        mod.register_buffer("weight", q)
        mod.register_buffer("scales", scales)
        mod.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(w.dtype))
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] float16 / bfloat16 (float32 on CPU) -> [..., N] in x's dtype."""
        return torch.ops.w8a16.linear(x, self.weight, self.scales, self.bias)

    def _apply(self, fn, recurse=True):
        old = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            # A dtype cast (model.half(), model.to(bf16)) reached the scales. The op needs
            # them fp32, and re-widening the cast values would lose precision, so take the
            # original values and follow only the device move.
            self.scales = (torch.empty_like(self.scales, dtype=torch.float32) if old.is_meta
                           else old.to(self.scales.device))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=int8, scales=float32")


class W8A16MLP(nn.Module):
    """GPT-NeoX MLP with int8 weights: ``dense_4h_to_h(gelu(dense_h_to_4h(x)))``.

    The up projection, its bias and the exact (erf) GeLU run as one
    ``torch.ops.w8a16.linear_gelu`` call, so the [.., 4H] pre-activation never round-trips
    through memory.
    """

    def __init__(self, dense_h_to_4h: W8A16Linear, dense_4h_to_h: W8A16Linear):
        super().__init__()
        for name, m in (("dense_h_to_4h", dense_h_to_4h), ("dense_4h_to_h", dense_4h_to_h)):
            if not isinstance(m, W8A16Linear):
                raise TypeError(f"W8A16MLP: {name} must be a W8A16Linear, got {type(m).__name__}")
        if dense_h_to_4h.out_features != dense_4h_to_h.in_features:
            raise ValueError(f"W8A16MLP: dense_h_to_4h has out_features={dense_h_to_4h.out_features} but "
                             f"dense_4h_to_h has in_features={dense_4h_to_h.in_features}")
        self.dense_h_to_4h = dense_h_to_4h
        self.dense_4h_to_h = dense_4h_to_h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] float16 / bfloat16 (float32 on CPU) -> [..., H] in x's dtype."""
        up = self.dense_h_to_4h
        h = torch.ops.w8a16.linear_gelu(x, up.weight, up.scales, up.bias)  # [..., 4H]
        return self.dense_4h_to_h(h)


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds at least one W8A16Linear."""
    return any(isinstance(m, W8A16Linear) for m in model.modules())


def check_gpt_neox_model(fn: str, model: nn.Module) -> None:
    """Raise ValueError unless ``model`` is a GPT-NeoX causal LM (``model.gpt_neox.layers``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "gpt_neox" or not hasattr(model, "gpt_neox"):
        raise ValueError(f"{fn}: model must be a GPT-NeoX causal LM (config.model_type 'gpt_neox' with a "
                         f"'gpt_neox' submodule), got {type(model).__name__} with model_type {model_type!r}")


def lm_head_name(model: nn.Module) -> str:
    """Qualified name of ``model.get_output_embeddings()`` (``lm_head`` or ``embed_out``, by version)."""
    head = model.get_output_embeddings()
    for name, m in model.named_modules():
        if m is head:
            return name
    raise ValueError(f"lm_head_name: the output embeddings of {type(model).__name__} are not a submodule")


def quantizable_names(model: nn.Module, lm_head: bool) -> list[str]:
    """Names of the linears that quantize_model converts, in model order."""
    names = [f"gpt_neox.layers.{i}.{suffix}"
             for i in range(len(model.gpt_neox.layers)) for suffix in LAYER_LINEARS]
    return names + ([lm_head_name(model)] if lm_head else [])


def swap_linears(model: nn.Module, names: list[str], make: Callable[[str, nn.Linear], W8A16Linear],
                 progress: bool = False) -> nn.Module:
    """Replace the ``nn.Linear`` modules named in ``names`` by ``make(name, linear)``, in place.

    Each layer's MLP becomes a W8A16MLP when both its linears are in ``names``
    (quantize_model always converts them together). The original linears are dropped as
    they are replaced, so peak memory grows by one layer, not one model.
    Used by quantize_model (make = from_linear) and by checkpoint.load_quantized
    (make = an empty W8A16Linear on the meta device).
    """
    wanted = set(names)
    head = lm_head_name(model)
    unknown = wanted - set(quantizable_names(model, lm_head=True))
    if unknown:
        raise ValueError(f"swap_linears: names that are not GPT-NeoX linears: {sorted(unknown)}")
    layers = model.gpt_neox.layers
    it = range(len(layers))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="quantize", unit="layer")
    for i in it:
        layer = layers[i]
        prefix = f"gpt_neox.layers.{i}."
        for attr in ("query_key_value", "dense"):
            if prefix + "attention." + attr in wanted:
                setattr(layer.attention, attr, make(prefix + "attention." + attr, getattr(layer.attention, attr)))
        mlp_names = [prefix + "mlp.dense_h_to_4h", prefix + "mlp.dense_4h_to_h"]
        present = [n in wanted for n in mlp_names]
        if all(present):
            layer.mlp = W8A16MLP(make(mlp_names[0], layer.mlp.dense_h_to_4h),
                                 make(mlp_names[1], layer.mlp.dense_4h_to_h))
        elif any(present):
            raise ValueError(f"swap_linears: {prefix}mlp must have both dense_h_to_4h and dense_4h_to_h "
                             f"quantized (fused W8A16MLP), got only {mlp_names[present.index(True)]}")
    if head in wanted:
        model.set_output_embeddings(make(head, model.get_output_embeddings()))
        # A quantized head can no longer share its weight with embed_in; keep HF from re-tying.
        model.config.tie_word_embeddings = False
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, lm_head: bool = False, progress: bool = False) -> nn.Module:
    """Convert an HF GPTNeoXForCausalLM to W8A16 in place and return it.

    Every layer's ``query_key_value``, ``dense``, ``dense_h_to_4h`` and ``dense_4h_to_h``
    (and the LM head when ``lm_head``) get symmetric per-output-channel int8 weights
    (``w8a16_ops.quantize_per_channel``: int8 [N, K], fp32 scales [N]); biases, layer
    norms and embeddings keep the model dtype. The model must hold real weights in
    float16, bfloat16 or float32 (float32 runs on CPU only).

    Not idempotent by design: a model that already holds W8A16 modules is refused
    (``ValueError``), since re-quantizing would compound rounding error, and a partial
    re-run (e.g. adding the head later) would make the saved manifest ambiguous.
    Quantize the original model with the options you want instead.

    Raises:
        ValueError: not a GPT-NeoX model, already quantized, or ``hidden_act`` is not the
        exact erf GeLU that the fused ``w8a16.linear_gelu`` computes.
    """
    check_gpt_neox_model("quantize_model", model)
    done = [n for n, m in model.named_modules() if isinstance(m, W8A16Linear)]
    if done:
        raise ValueError(f"quantize_model: model is already quantized ({len(done)} W8A16Linear modules, "
                         f"e.g. {done[0]!r}); quantize the original floating-point model instead")
    problem = activation_problem(model.config)
    if problem:
        raise ValueError(f"quantize_model: {problem}")
    return swap_linears(model, quantizable_names(model, lm_head),
                        lambda name, linear: W8A16Linear.from_linear(linear), progress=progress)
