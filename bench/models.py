"""Model and tokenizer loading for the benchmarks, with the study's random-weight fallback."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import NEOX_TOKENIZER

# Hub ids that have a same-shaped random preset (`random:pythia-2.8b`, ...).
_PYTHIA_ID = re.compile(r"^EleutherAI/pythia-(\d+(?:\.\d+)?[mb])(?:-deduped)?(?:-v0)?$", re.IGNORECASE)


class ModelLoadError(ValueError):
    """The model (or its tokenizer) cannot be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str                      # what was actually loaded
    requested: str                 # what --model_path asked for
    random_weights: bool
    notices: list[str] = field(default_factory=list)   # loud, shown in the header and after the table
    notes: list[str] = field(default_factory=list)     # quiet, shown in the header


def is_random(spec: str) -> bool:
    return spec.startswith("random:")


def looks_local(spec: str) -> bool:
    """True for a spelling that can only be a local path (not a hub id, not a preset)."""
    return spec.startswith(("/", "./", "../", "~")) or Path(spec).expanduser().exists()


def fallback_preset(spec: str) -> str | None:
    """``random:pythia-2.8b`` for ``EleutherAI/pythia-2.8b`` (same shapes), else None."""
    m = _PYTHIA_ID.match(spec)
    return f"random:pythia-{m.group(1).lower()}" if m else None


def load_tokenizer(path: str):
    """A tokenizer from a ``tokenizer.json`` file or a directory holding one."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"--tokenizer {path}: no such file or directory")
    if p.is_file():
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(p))


def fallback_notice(requested: str, used: str, reason: str) -> str:
    bar = "!" * 100
    return "\n".join([
        bar,
        f"!!! NOTICE: could not load {requested!r}:",
        f"!!!   {reason}",
        f"!!! Carrying on with {used!r}: RANDOM WEIGHTS with the same shapes.",
        "!!! Speed and memory figures are valid for these shapes; the PPL column MEANS NOTHING",
        "!!! (random weights predict nothing). It is shown only marked with '(random)'.",
        "!!! For real perplexities pass --model_path with a cached hub id or a local checkpoint.",
        bar,
    ])


def _source_error_type():
    try:
        from model_patch.sources import ModelSourceError
        return ModelSourceError
    except ImportError:  # older checkouts: catch nothing special
        return ()


def load_model(spec: str, dtype: torch.dtype, device: torch.device, tokenizer_path: str | None = None,
               fallback: bool = True, need_tokenizer: bool = True) -> LoadedModel:
    """Load ``spec`` (hub id, local directory or ``random:`` preset) in ``dtype`` on ``device``.

    When a Pythia hub id cannot be loaded and ``fallback`` is set, the same-shaped
    random preset is loaded instead and a loud notice is attached.
    """
    from model_patch.sources import load_model as _load

    source_error = _source_error_type()
    notices: list[str] = []
    used = spec
    try:
        model, tokenizer = _load(spec, dtype, device, tokenizer=tokenizer_path)
    except source_error as e:
        preset = fallback_preset(spec)
        if not (fallback and preset and not looks_local(spec)):
            raise ModelLoadError(str(e)) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        used = preset
        notices.append(fallback_notice(spec, preset, reason))
        print(notices[-1], file=sys.stderr, flush=True)
        model, tokenizer = _load(preset, dtype, device, tokenizer=tokenizer_path)
    notes = []
    if tokenizer is None and tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer is None and need_tokenizer:
        if NEOX_TOKENIZER.exists() and model.config.vocab_size >= 50277:
            tokenizer = load_tokenizer(str(NEOX_TOKENIZER))
            notes.append(f"tokenizer: {used} has none; using the GPT-NeoX tokenizer {NEOX_TOKENIZER}")
        else:
            raise ModelLoadError(f"{used} comes without a tokenizer; pass --tokenizer PATH "
                                 "(a tokenizer.json file or a directory)")
    model.eval()
    return LoadedModel(model, tokenizer, used, spec, is_random(used), notices, notes)


def check_vocab(token_ids: torch.Tensor, model) -> None:
    """Token ids must index the model's embedding (a tokenizer for another model would not)."""
    vocab = model.config.vocab_size
    top = int(token_ids.max())
    if top >= vocab:
        raise ModelLoadError(f"the tokenizer produced id {top}, but the model's vocab_size is {vocab}: "
                             "the tokenizer does not belong to this model (check --tokenizer)")


def checkpoint_source(ckpt_dir: Path) -> str | None:
    """The source model recorded in an INT8 checkpoint's manifest, if any."""
    manifest = ckpt_dir / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    for key in ("source_model", "source", "model"):
        if isinstance(data.get(key), str):
            return data[key]
    return None


def free_model(*objs) -> None:
    """Drop references and give cached device memory back (between modes, for clean peaks)."""
    import gc

    for o in objs:
        del o
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
