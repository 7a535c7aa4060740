"""Quantize a GPT-NeoX model to W8A16 and save it.

    python -m model_patch.quantize --model EleutherAI/pythia-2.8b --out ckpt/pythia-2.8b-w8a16
    python -m model_patch.quantize --model random:pythia-70m --out /tmp/p70m --lm-head \\
        --tokenizer ../shared/data/gpt-neox-20b/tokenizer.json

Prints the size of the weights before and after (MB and ratio). Bad arguments, an
unresolvable model and an unsupported model exit with status 2 and a message.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import WEIGHTS_NAME, save_quantized
from .quant import quantizable_names, quantize_model
from .sources import ModelSourceError, load_model

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and persistent buffers (what a checkpoint stores)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:  # tied weights are counted once
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_patch.quantize", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="hub id (EleutherAI/pythia-2.8b), local checkpoint directory, or random:pythia-<size>")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                   help="dtype of activations and of the non-quantized tensors (default float16)")
    p.add_argument("--lm-head", action="store_true", help="quantize the LM head too")
    p.add_argument("--tokenizer", help="tokenizer.json or tokenizer directory to save with the checkpoint")
    p.add_argument("--device", default="auto",
                   help="device to quantize on: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="seed of random:* presets")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out!r} is not empty (pass --overwrite to write into it)")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        parser.error(f"--tokenizer {args.tokenizer!r} does not exist")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r} is not a device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: CUDA is not available on this machine")

    try:
        model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=device,
                                      tokenizer=args.tokenizer, seed=args.seed)
    except ModelSourceError as err:
        parser.error(str(err))
    before = tensor_bytes(model)
    print(f"loaded {args.model}: {before / 1e6:.1f} MB of weights ({args.dtype}) on {device}")
    names = quantizable_names(model, lm_head=args.lm_head)
    linears_before = sum(tensor_bytes(model.get_submodule(n)) for n in names)
    try:
        quantize_model(model, lm_head=args.lm_head, progress=True)
    except ValueError as err:
        parser.error(str(err))
    after = tensor_bytes(model)
    linears_after = sum(tensor_bytes(model.get_submodule(n)) for n in names)
    save_quantized(model, out, source=args.model, tokenizer=tokenizer)
    on_disk = (out / WEIGHTS_NAME).stat().st_size
    print(f"quantized linears ({len(names)}): {linears_before / 1e6:.1f} MB -> {linears_after / 1e6:.1f} MB "
          f"({linears_before / linears_after:.2f}x smaller)")
    print(f"weights: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({before / after:.2f}x smaller, "
          f"LM head {'int8' if args.lm_head else args.dtype})")
    print(f"saved {out} ({WEIGHTS_NAME}: {on_disk / 1e6:.1f} MB{', with tokenizer' if tokenizer is not None else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
