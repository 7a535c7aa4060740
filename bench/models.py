"""Model and tokenizer loading for the benchmarks, with the study's random-weight fallback."""
from __future__ import annotations

import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import NEOX_TOKENIZER, _hub_reachable

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


def fallback_notice(requested: str, used: str, reason: str) -> str:
    bar = "!" * 100
    return "\n".join([
        bar,
        f"!!! NOTICE: could not load {requested!r}:",
        *textwrap.wrap(reason, 100, initial_indent="!!!   ", subsequent_indent="!!!   "),
        f"!!! Carrying on with {used!r}: RANDOM WEIGHTS with the same shapes.",
        "!!! Speed and memory figures are valid for these shapes; the PPL column MEANS NOTHING",
        "!!! (random weights predict nothing). It is shown only marked with '(random)'.",
        "!!! For real perplexities pass --model_path with a cached hub id or a local checkpoint.",
        bar,
    ])


def load_model(spec: str, dtype: torch.dtype, device: torch.device, tokenizer_path: str | None = None,
               fallback: bool = True, need_tokenizer: bool = True) -> LoadedModel:
    """Load ``spec`` (hub id, local directory or ``random:`` preset) in ``dtype`` on ``device``.

    When a Pythia hub id cannot be loaded and ``fallback`` is set, the same-shaped
    random preset is loaded instead and a loud notice is attached.
    """
    from model_patch.sources import ModelSourceError
    from model_patch.sources import load_model as _load

    notices: list[str] = []
    notes: list[str] = []
    used = spec
    if not is_random(spec) and not looks_local(spec) and not _hub_reachable():
        # Without this, huggingface_hub retries for about 30 s before giving up.
        import huggingface_hub.constants

        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            huggingface_hub.constants.HF_HUB_OFFLINE = True
            notes.append("the Hugging Face hub is unreachable from this machine: hub ids are read from the "
                         "local cache only (offline mode switched on)")
    try:
        model, tokenizer = _load(spec, dtype, device, tokenizer=tokenizer_path)
    except ModelSourceError as e:
        preset = fallback_preset(spec)
        if not (fallback and preset and not looks_local(spec)):
            raise ModelLoadError(str(e)) from None
        reason = str(e).strip().splitlines()[0][:600] if str(e).strip() else type(e).__name__
        used = preset
        notices.append(fallback_notice(spec, preset, reason))
        print(notices[-1], file=sys.stderr, flush=True)
        model, tokenizer = _load(preset, dtype, device, tokenizer=tokenizer_path)
    if tokenizer is None and need_tokenizer:
        if NEOX_TOKENIZER.exists() and model.config.vocab_size >= 50277:
            from model_patch.sources import load_tokenizer

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
