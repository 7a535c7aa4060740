"""Where models come from: a hub id, a local checkpoint directory, or a random Pythia preset.

``load_model(spec, dtype, device, tokenizer)`` accepts

* ``"EleutherAI/pythia-2.8b"``: a Hugging Face hub id, resolved through the local HF
  cache or the hub (``from_pretrained``). Offline and not cached raises ``ModelSourceError``.
* ``"/path/to/dir"``: a local HF checkpoint directory, or one of our quantized
  checkpoints (it holds ``w8a16_manifest.json``), loaded with
  ``model_patch.checkpoint.load_quantized``.
* ``"random:pythia-2.8b"``: the exact Pythia shapes from ``PYTHIA_PRESETS`` with
  seeded random weights, built straight on the target device in the target dtype.

Every loader refuses a model whose ``config.model_type`` is not ``gpt_neox``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, GPTNeoXConfig, GPTNeoXForCausalLM, PretrainedConfig

RANDOM_PREFIX = "random:"
MANIFEST_NAME = "w8a16_manifest.json"  # marks a directory written by checkpoint.save_quantized
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelSourceError(RuntimeError):
    """A model spec could not be resolved to a GPT-NeoX model (bad path, not cached, wrong type)."""


def _pythia(hidden: int, layers: int, heads: int, vocab: int = 50304) -> dict:
    # Values of the EleutherAI/pythia-* config.json files. The vocabulary is padded for
    # model-parallel training, so 6.9b and 12b use 50432 and 50688 rather than 50304.
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "hidden_act": "gelu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
    }


PYTHIA_PRESETS: dict[str, dict] = {
    "pythia-14m": _pythia(128, 6, 4),
    "pythia-31m": _pythia(256, 6, 8),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "pythia-6.9b": _pythia(4096, 32, 32, vocab=50432),
    "pythia-12b": _pythia(5120, 36, 40, vocab=50688),
}


def is_random_spec(spec) -> bool:
    """True when ``spec`` names a random preset (``"random:pythia-70m"``)."""
    return isinstance(spec, str) and spec.startswith(RANDOM_PREFIX)


def pythia_config(name: str) -> GPTNeoXConfig:
    """GPTNeoXConfig of a preset, e.g. ``pythia_config("pythia-2.8b")`` (``random:`` prefix allowed)."""
    key = name[len(RANDOM_PREFIX):] if is_random_spec(name) else name
    if key not in PYTHIA_PRESETS:
        raise ModelSourceError(f"pythia_config: unknown preset {name!r}; expected one of "
                               f"{', '.join(PYTHIA_PRESETS)} (optionally prefixed with '{RANDOM_PREFIX}')")
    config = GPTNeoXConfig(**PYTHIA_PRESETS[key])
    config.architectures = ["GPTNeoXForCausalLM"]
    config._name_or_path = RANDOM_PREFIX + key
    return config


def _as_dtype(fn: str, dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype in _DTYPES.values():
        return dtype
    raise ValueError(f"{fn}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def check_gpt_neox_config(fn: str, config: PretrainedConfig, where: str) -> None:
    """Raise ModelSourceError unless ``config`` describes a GPT-NeoX model."""
    model_type = getattr(config, "model_type", None)
    if model_type != "gpt_neox":
        raise ModelSourceError(f"{fn}: {where} has config.model_type {model_type!r}, expected 'gpt_neox' "
                               f"(only GPT-NeoX / Pythia models are supported)")


def build_empty_model(config: GPTNeoXConfig, dtype: torch.dtype) -> GPTNeoXForCausalLM:
    """GPTNeoXForCausalLM with every parameter and persistent buffer on the meta device.

    The module tree is built on ``meta`` (no memory, no init kernels) and cast to
    ``dtype``; callers then fill the weights (``to_empty`` + init, or
    ``load_state_dict(assign=True)``) and call ``materialize_buffers(model, device)``
    to rebuild the non-persistent buffers (the rotary ``inv_freq``).
    """
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    return model.to(dtype)


def materialize_buffers(model: nn.Module, device) -> None:
    """Rebuild the non-persistent buffers, which a state dict does not carry, on ``device``.

    In GPT-NeoX that is the rotary embedding (``inv_freq`` fp32, computed from the
    config). It is rebuilt by constructing a fresh module, as ``from_pretrained`` does,
    so it stays fp32 whatever the model dtype, and so that values left uninitialized by
    ``to_empty`` are never used. Raises if any tensor is still on the meta device.
    """
    device = torch.device(device)
    for name, module in list(model.named_modules()):
        if "inv_freq" in module._buffers:
            with torch.device(device):
                fresh = type(module)(config=getattr(module, "config", None) or model.config)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"materialize_buffers: tensors still on the meta device after loading: "
                           f"{', '.join(leftover[:8])}{' ...' if len(leftover) > 8 else ''}")


def finalize_model(model: GPTNeoXForCausalLM, attn_implementation: str = "sdpa") -> GPTNeoXForCausalLM:
    """Inference settings shared by every loader: attention backend, eval mode, no grad."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"finalize_model: attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                         f"got {attn_implementation!r}")
    # Read by every attention layer at each forward; sdpa is supported by GPT-NeoX on
    # CPU and CUDA, eager is only needed to return attention probabilities.
    model.config._attn_implementation = attn_implementation
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def random_model(name: str, dtype: torch.dtype = torch.float16, device="cpu", seed: int = 0,
                 attn_implementation: str = "sdpa") -> GPTNeoXForCausalLM:
    """A Pythia-shaped GPTNeoXForCausalLM with seeded random weights, built on ``device``.

    Weights and biases of linears and embeddings are N(0, 0.02) (the Pythia
    initializer range, which keeps fp16 activations far from overflow; biases are
    random rather than zero so that bias handling is exercised), layer norms are
    weight 1 / bias 0. Values are drawn directly in ``dtype`` on ``device`` from a
    generator seeded with ``seed``: the same (seed, device, dtype) gives the same
    model. A 2.8B model builds in seconds on a GPU.
    """
    dtype = _as_dtype("random_model", dtype)
    device = torch.device(device)
    config = pythia_config(name)
    model = build_empty_model(config, dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    norms = {id(m) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(module) in norms:
                p.fill_(1.0 if pname == "weight" else 0.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)
    materialize_buffers(model, device)
    config.dtype = dtype
    return finalize_model(model, attn_implementation)


def load_tokenizer(path):
    """A tokenizer from a ``tokenizer.json`` file or a directory holding tokenizer files.

    A bare ``tokenizer.json`` gets ``<|endoftext|>`` as bos/eos and ``<|padding|>`` as
    pad when it defines them (the GPT-NeoX / Pythia convention).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(p))
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ModelSourceError(f"load_tokenizer: tokenizer must be a tokenizer.json file or a directory "
                               f"with tokenizer files, got {str(path)!r} (not found)")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
    vocab = tok.get_vocab()
    if "<|endoftext|>" in vocab:
        tok.bos_token = tok.eos_token = "<|endoftext|>"
    if "<|padding|>" in vocab:
        tok.pad_token = "<|padding|>"
    return tok


def _has_tokenizer_files(d: Path) -> bool:
    return (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists()


def _offline() -> bool:
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return True
    except Exception:  # very old or very new huggingface_hub: fall back to the environment
        pass
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_error(spec: str, err: Exception) -> ModelSourceError:
    why = ("offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache"
           if _offline() else
           "it is not in the local Hugging Face cache and could not be downloaded "
           "(no network, a typo, or a private repository)")
    return ModelSourceError(
        f"load_model: spec {spec!r} was read as a Hugging Face hub id but cannot be loaded: {why}. "
        f"Pass a local checkpoint directory instead, or a random preset such as 'random:pythia-2.8b' "
        f"(presets: {', '.join(PYTHIA_PRESETS)}). Cause: {type(err).__name__}: {err}")


def _load_hf(spec: str, dtype: torch.dtype, device, attn_implementation: str, is_local: bool):
    where = f"local directory {spec!r}" if is_local else f"hub model {spec!r}"
    try:
        config = AutoConfig.from_pretrained(spec)
    except Exception as err:  # HF raises OSError, ValueError or hub-client errors here
        if is_local:
            raise ModelSourceError(f"load_model: {where} is not a Hugging Face checkpoint "
                                   f"(config.json missing or unreadable): {err}") from err
        raise _hub_error(spec, err) from err
    check_gpt_neox_config("load_model", config, where)
    try:
        model = GPTNeoXForCausalLM.from_pretrained(spec, config=config, dtype=dtype,
                                                   attn_implementation=attn_implementation)
    except Exception as err:
        if is_local:
            raise ModelSourceError(f"load_model: could not load the weights of {where}: {err}") from err
        raise _hub_error(spec, err) from err
    return model.to(device)


def load_model(spec: str, dtype: torch.dtype = torch.float16, device="cpu", tokenizer=None, *,
               seed: int = 0, attn_implementation: str = "sdpa"):
    """Load a GPT-NeoX model for inference.

    Args:
        spec: a hub id (``"EleutherAI/pythia-2.8b"``), a local checkpoint directory (HF
            format, or a quantized directory written by ``save_quantized``), or a random
            preset (``"random:pythia-70m"``; see ``PYTHIA_PRESETS``).
        dtype: float16, bfloat16 or float32: the dtype of the floating weights and of the
            activations (int8 weights and fp32 scales of a quantized checkpoint stay as
            they are).
        device: where the model lives.
        tokenizer: optional path to a ``tokenizer.json`` or a tokenizer directory; it
            overrides the tokenizer that comes with the checkpoint.
        seed: seed of the random presets.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
    Returns:
        ``(model, tokenizer)``: the model in eval mode with grad disabled; the tokenizer
        from ``tokenizer`` or the checkpoint, or None (random presets without one).
    Raises:
        ModelSourceError: the spec cannot be resolved, the hub id is not available
        offline, or the model is not GPT-NeoX.
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise ModelSourceError(f"load_model: spec must be a hub id, a local directory or "
                               f"'{RANDOM_PREFIX}<preset>', got {spec!r}")
    spec = str(spec)
    dtype = _as_dtype("load_model", dtype)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None

    if is_random_spec(spec):
        model = random_model(spec, dtype=dtype, device=device, seed=seed,
                             attn_implementation=attn_implementation)
        return model, tok

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / MANIFEST_NAME).exists():
            from .checkpoint import load_quantized  # checkpoint imports this module
            model = load_quantized(path, device=device, dtype=dtype)
            finalize_model(model, attn_implementation)
        else:
            model = _load_hf(str(path), dtype, device, attn_implementation, is_local=True)
            finalize_model(model, attn_implementation)
        if tok is None and _has_tokenizer_files(path):
            tok = load_tokenizer(path)
        return model, tok

    if path.exists():
        raise ModelSourceError(f"load_model: spec {spec!r} is a file; expected a checkpoint directory, "
                               f"a hub id or '{RANDOM_PREFIX}<preset>'")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise ModelSourceError(f"load_model: local path {spec!r} does not exist (and it is not a hub id "
                               f"of the form 'org/name')")

    model = _load_hf(spec, dtype, device, attn_implementation, is_local=False)
    finalize_model(model, attn_implementation)
    if tok is None:
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(spec)
        except Exception:  # weights without a tokenizer are still usable: the caller gets None
            tok = None
    return model, tok
