"""Save and load W8A16 GPT-NeoX checkpoints (safetensors only, never pickle).

A checkpoint directory holds

* ``model.w8a16.safetensors``: int8 ``weight`` [N, K] and fp32 ``scales`` [N] of every
  quantized linear; everything else (biases, layer norms, embeddings, an unquantized
  LM head) in the model dtype. Keys are the HF module names of the running
  transformers version. The file is deliberately not named ``model.safetensors``: a
  plain ``from_pretrained`` on this directory then fails loudly instead of casting the
  int8 values to float and yielding garbage.
* ``config.json`` (and ``generation_config.json``): the HF GPT-NeoX config.
* ``w8a16_manifest.json``: format version, source model, the quantized module names,
  whether the LM head is quantized, the dtype, creation time, the weight file's size,
  every tensor's dtype and shape, and the config values that change the computation
  without changing any tensor's shape (heads, rotary, residual form, activation, ...),
  so that an edited ``config.json`` is refused rather than loaded into wrong logits.
* the tokenizer files, when a tokenizer is given.

``load_quantized`` builds the module skeleton on the meta device and streams each
tensor from the file to the target device, checking every key, dtype and shape against
the config and the manifest first.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig

from w8a16_ops._checks import dtype_name

from .quant import W8A16Linear, activation_problem, check_gpt_neox_model, lm_head_name, swap_linears
from .sources import (MANIFEST_NAME, build_empty_model, check_gpt_neox_config, finalize_model,
                      materialize_buffers)

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.w8a16.safetensors"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt")


# Config values recorded in the manifest and compared at load (those present in the config).
# Shapes catch most config edits (sizes, layer count); these are the ones that do not show in
# any tensor's shape but change the logits: head split, rotary, residual form, activation, ...
COMPUTE_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "hidden_act", "rotary_pct", "partial_rotary_factor", "rotary_emb_base", "rope_theta",
                       "rope_parameters", "rope_scaling", "use_parallel_residual", "layer_norm_eps",
                       "vocab_size", "tie_word_embeddings", "attention_bias")


class CheckpointError(RuntimeError):
    """A W8A16 checkpoint is missing, corrupt, or does not match its config / manifest."""


def _compute_config(config) -> dict:
    """The COMPUTE_CONFIG_KEYS of ``config`` as JSON values (what the manifest stores)."""
    d = config.to_dict()
    return {k: json.loads(json.dumps(d[k])) for k in COMPUTE_CONFIG_KEYS if k in d}


def _head_tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    w = getattr(head, "weight", None)
    return isinstance(w, torch.Tensor) and w is getattr(embed, "weight", None)


def _state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if _head_tied(model):
        # safetensors refuses shared storage; the tie is restored on load from the config.
        sd.pop(lm_head_name(model) + ".weight")
    return sd


def save_quantized(model: nn.Module, out_dir, source: str | None = None, tokenizer=None) -> Path:
    """Write a quantized GPT-NeoX model to ``out_dir`` (created if needed).

    Args:
        model: a GPTNeoXForCausalLM converted by ``quantize_model`` (int8 weight [N, K],
            fp32 scales [N] in each W8A16Linear; the other tensors all in one dtype).
        out_dir: target directory. Files of an earlier checkpoint there are overwritten.
        source: where the model came from (hub id, path or preset), for the manifest;
            defaults to ``config._name_or_path``.
        tokenizer: a HF tokenizer object (saved with ``save_pretrained``), or a path to
            a ``tokenizer.json`` / tokenizer directory whose files are copied, or None.
    Returns:
        The checkpoint directory.
    """
    check_gpt_neox_model("save_quantized", model)
    quantized = [n for n, m in model.named_modules() if isinstance(m, W8A16Linear)]
    if not quantized:
        raise ValueError("save_quantized: model holds no W8A16Linear; call quantize_model(model) first")
    sd = _state_dict_to_save(model)
    q_keys = {f"{n}.{b}" for n in quantized for b in ("weight", "scales")}
    float_dtypes = {t.dtype for k, t in sd.items() if k not in q_keys and t.is_floating_point()}
    if len(float_dtypes) != 1:
        raise ValueError(f"save_quantized: the non-quantized tensors must share one dtype, found "
                         f"{sorted(dtype_name(d) for d in float_dtypes)}")
    dtype = float_dtypes.pop()
    if any(t.is_meta for t in sd.values()):
        raise ValueError("save_quantized: model has tensors on the meta device (no values to save)")

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in sd.items()}
    weights = out / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": "pt", "w8a16_format_version": str(FORMAT_VERSION)})

    config = model.config
    config.dtype = dtype
    config.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    _save_tokenizer(tokenizer, out)

    head = lm_head_name(model)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source_model": source if source is not None else (getattr(config, "_name_or_path", "") or "unknown"),
        "quantized_modules": quantized,
        "lm_head_quantized": head in quantized,
        "lm_head_module": head,
        "dtype": dtype_name(dtype),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights_file": WEIGHTS_NAME,
        "weights_bytes": weights.stat().st_size,
        "tensors": {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for k, t in tensors.items()},
        "config": _compute_config(config),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def _save_tokenizer(tokenizer, out: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        return
    src = Path(tokenizer)
    if src.is_file():
        shutil.copy2(src, out / "tokenizer.json")
    elif src.is_dir():
        found = [src / f for f in _TOKENIZER_FILES if (src / f).exists()]
        if not found:
            raise ValueError(f"save_quantized: tokenizer directory {str(src)!r} holds none of {_TOKENIZER_FILES}")
        for f in found:
            shutil.copy2(f, out / f.name)
    else:
        raise ValueError(f"save_quantized: tokenizer must be a tokenizer object, a tokenizer.json or a "
                         f"directory, got {str(tokenizer)!r} (not found)")


def read_manifest(ckpt_dir) -> dict:
    """The parsed ``w8a16_manifest.json`` of ``ckpt_dir``, with its required fields checked."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"load_quantized: {str(ckpt_dir)!r} is not a W8A16 checkpoint "
                              f"({MANIFEST_NAME} not found)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"load_quantized: {path} is not valid JSON: {err}") from err
    required = ("format_version", "quantized_modules", "lm_head_quantized", "dtype")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise CheckpointError(f"load_quantized: {path} lacks the field(s) {missing}")
    names = manifest["quantized_modules"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"load_quantized: {path} field quantized_modules must be a list of module names, "
                              f"got {type(names).__name__}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"load_quantized: {path} has format_version {manifest['format_version']!r}, "
                              f"this library reads version {FORMAT_VERSION}")
    if manifest["dtype"] not in _DTYPES:
        raise CheckpointError(f"load_quantized: {path} has dtype {manifest['dtype']!r}, expected one of "
                              f"{list(_DTYPES)}")
    return manifest


def _fail(msg: str) -> None:
    raise CheckpointError(f"load_quantized: {msg}")


@torch.no_grad()
def load_quantized(ckpt_dir, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a directory written by ``save_quantized`` as a patched GPTNeoXForCausalLM.

    Args:
        ckpt_dir: the checkpoint directory.
        device: where the tensors go; they are read from the file straight to it.
        dtype: float16 / bfloat16 / float32 for the non-quantized tensors (and the
            biases); None keeps the stored dtype. int8 weights and fp32 scales are
            never cast.
    Returns:
        The model in eval mode, grad disabled, sdpa attention.
    Raises:
        CheckpointError: missing or corrupt manifest / config / weight file, a missing or
        extra tensor, a wrong dtype or shape (also what a config that does not match the
        weights looks like), a config.json whose computation-relevant values differ from
        those saved in the manifest, or a truncated file.
    """
    ckpt = Path(ckpt_dir)
    manifest = read_manifest(ckpt)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # safetensors wants an index
    stored_dtype = _DTYPES[manifest["dtype"]]
    if dtype is None:
        dtype = stored_dtype
    elif dtype not in _DTYPES.values():
        raise ValueError(f"load_quantized: dtype must be float16, bfloat16 or float32, got {dtype!r}")

    try:
        config = AutoConfig.from_pretrained(str(ckpt))
    except Exception as err:  # OSError / ValueError from HF
        raise CheckpointError(f"load_quantized: cannot read {ckpt / 'config.json'}: {err}") from err
    check_gpt_neox_config("load_quantized", config, f"checkpoint {str(ckpt)!r}")
    problem = activation_problem(config)
    if problem:
        _fail(problem)

    model = build_empty_model(config, dtype)
    head = lm_head_name(model)
    saved_head = manifest.get("lm_head_module", head)
    # The LM head is 'embed_out' in some transformers versions and 'lm_head' in others.
    rename = (lambda k: head + k[len(saved_head):] if k == saved_head or k.startswith(saved_head + ".")
              else k) if saved_head != head else (lambda k: k)
    quantized = [rename(n) for n in manifest["quantized_modules"]]
    try:
        swap_linears(model, quantized, lambda name, lin: W8A16Linear(
            lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=dtype, device="meta"))
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"load_quantized: manifest quantized_modules do not fit config.json "
                              f"(num_hidden_layers={config.num_hidden_layers}): {err}") from err
    tied = bool(getattr(config, "tie_word_embeddings", False)) and head not in quantized
    expected = {k: t for k, t in model.state_dict().items()
                if not (tied and k == head + ".weight")}
    q_keys = {f"{n}.{b}": b for n in quantized for b in ("weight", "scales")}

    weights = ckpt / manifest.get("weights_file", WEIGHTS_NAME)
    if not weights.is_file():
        _fail(f"weight file {weights} not found")
    size, want = weights.stat().st_size, manifest.get("weights_bytes")
    if want is not None and size != want:
        _fail(f"weight file {weights} is truncated or altered: manifest says {want} bytes, found {size}")

    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    try:
        f = safe_open(str(weights), framework="pt", device=str(device))
    except Exception as err:  # safetensors raises SafetensorError on a bad header / short file
        raise CheckpointError(f"load_quantized: cannot read {weights} (corrupt or truncated): {err}") from err
    with f:
        keys = {rename(k): k for k in f.keys()}
        missing = sorted(set(expected) - set(keys))
        extra = sorted(set(keys) - set(expected))
        if missing:
            _fail(f"{weights.name} is missing {len(missing)} tensor(s) the config and manifest need: "
                  f"{missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if extra:
            _fail(f"{weights.name} has {len(extra)} unexpected tensor(s) (not in the config / manifest): "
                  f"{extra[:6]}{' ...' if len(extra) > 6 else ''}")
        for name, ref in expected.items():
            sl = f.get_slice(keys[name])
            shape, file_dtype = list(sl.get_shape()), sl.get_dtype()
            want_dtype = {"weight": "int8", "scales": "float32"}.get(q_keys.get(name), manifest["dtype"])
            if _SAFETENSORS_DTYPES.get(file_dtype) != want_dtype:
                _fail(f"tensor {name!r} must be {want_dtype}, found {_SAFETENSORS_DTYPES.get(file_dtype, file_dtype)}")
            if shape != list(ref.shape):
                _fail(f"tensor {name!r} must have shape {list(ref.shape)} (from config.json), found {shape}; "
                      f"config.json does not match the weights")
            try:
                t = f.get_tensor(keys[name])
            except Exception as err:
                raise CheckpointError(f"load_quantized: cannot read tensor {name!r} from {weights}: {err}") from err
            if name in q_keys and q_keys[name] == "scales" and not (torch.isfinite(t).all() and (t > 0).all()):
                _fail(f"tensor {name!r} (per-channel scales) must be finite and positive")
            state[name] = t if name in q_keys else t.to(dtype)
    # Edits of config.json that change no tensor's shape (those above name the tensor) but
    # would change the logits: compared with the values the manifest saved (checkpoints written
    # before that field have only the shape checks).
    saved = manifest.get("config")
    if saved is not None:
        if not isinstance(saved, dict):
            _fail(f"{ckpt / MANIFEST_NAME} field 'config' must be an object, got {type(saved).__name__}")
        now = _compute_config(config)
        changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if changed:
            _fail("config.json does not match the config the checkpoint was saved with: "
                  + "; ".join(f"{k}: saved {saved.get(k, '(absent)')!r}, config.json {now.get(k, '(absent)')!r}"
                              for k in changed))
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    materialize_buffers(model, device)

    gen_path = ckpt / "generation_config.json"
    if gen_path.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(ckpt))
    config.dtype = dtype
    config._name_or_path = str(ckpt)
    return finalize_model(model)


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                       "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
                       "BOOL": "bool"}
