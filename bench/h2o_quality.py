"""Perplexity of the KV-cache policies on tiny-neox-a with the fp32 oracle (issue 4's quality table).

    python -m bench.h2o_quality            # the table (about 7 minutes on one CPU core)
    python -m bench.h2o_quality --study    # every reading of the ambiguous points below
    python -m bench.h2o_quality --fast     # also run the kv_cache policies (fp32) through the same loop

Setup (from the issue): the first 4 Gutenberg validation books in file order,
characters ``text[10000:400000]`` of each, tokenized without special tokens,
the first 2,177 tokens; prefill 128, then 2,048 teacher-forced decode steps, in
fp32, with ``h2o_reference.run_model`` and ``h2o_reference.ReferenceCache``.
The 4 books run as one batch of 4 (rows are independent).

Readings the issue leaves open, and the choices that reproduce its table
(``--study`` prints all of them; docs/h2o.md has the figures):

* Step order: attend first, then evict (the new token sees ``budget`` old
  tokens plus itself). Evict-first also lands within the issue's +-0.3 pp but
  misses its perplexities by 0.01-0.03; attend-then-evict matches all of them
  to two decimals.
* Tokens scored: the 2,048 predictions made by the decode steps, i.e. tokens
  129..2176 (the decode step that consumes token t predicts t + 1); the
  prefill's own prediction of token 128 is not counted (with it, full
  attention gives 31.14 instead of the issue's 31.16).
* Aggregation: one perplexity over all 4 x 2,048 tokens, exp(mean NLL); the
  mean of the per-book perplexities misses the issue's figures by up to 0.9 pp.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from model_patch.h2o_reference import ReferenceCache, run_model
from model_patch.policies import make_cache, parse_policy

from . import data

SHARED = Path(os.environ.get("W8A16_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
MODEL = SHARED / "models" / "tiny-neox-a"
DATA = SHARED / "data" / "gutenberg-en" / "gutenberg_en_valid.jsonl.xz"

# (label, policy, the issue's "vs full" in percent)
TABLE = [
    ("full", "full", None),
    ("h2o 252/252", "h2o:252,252", 2.5),
    ("sink(4)+window, budget 504", "sink:4,500", 1.8),
    ("window 504", "window:504", 1.7),
    ("h2o 128/128", "h2o:128,128", 9.8),
    ("h2o 25/231 (heavy/recent)", "h2o:25,231", 5.3),
    ("window 256", "window:256", 5.9),
]
ISSUE_FULL_PPL = 31.16
TOLERANCE_PP = 0.3


def perplexity(logprobs: torch.Tensor, tokens: str = "decode", aggregate: str = "pooled") -> float:
    """Perplexity from ``run_model``'s log-probs [B, 1 + n_decode] (the first column is
    the prefill's prediction).

    tokens: ``decode`` (the predictions of the decode steps, the default),
        ``with_prefill`` (also the prefill's prediction) or ``first`` (as many
        tokens as decode steps, starting with the prefill's prediction).
    aggregate: ``pooled`` (exp of the mean NLL over all rows, the default) or
        ``mean_of_rows`` (mean of the per-row perplexities).
    """
    lp = {"decode": logprobs[:, 1:], "with_prefill": logprobs, "first": logprobs[:, :-1]}[tokens].double()
    if aggregate == "pooled":
        return math.exp(-lp.mean().item())
    return torch.exp(-lp.mean(dim=1)).mean().item()


def main(argv: list[str] | None = None) -> None:
    from model_patch.sources import ModelSourceError, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL),
                    help="a hub id, a local checkpoint directory or a random: preset (default: tiny-neox-a)")
    ap.add_argument("--tokenizer", help="tokenizer.json or directory (needed by random: presets)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--books", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=2048)
    ap.add_argument("--policies", nargs="*", help="policy strings (default: the issue's table)")
    ap.add_argument("--study", action="store_true", help="also evict-first, and every token/aggregation reading")
    ap.add_argument("--fast", action="store_true", help="also run the kv_cache policies (fp32) in the same loop")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the per-token ops are tiny, more threads only add overhead)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        model, tok = load_model(args.model, dtype=torch.float32, device="cpu", tokenizer=args.tokenizer)
    except ModelSourceError as err:
        ap.error(str(err))
    if tok is None:
        ap.error(f"--model {args.model} comes without a tokenizer: pass --tokenizer")
    ids = data.document_sequences(tok, data.load_corpus(args.data), args.books,
                                  args.prefill + args.decode + 1)  # 10000:400000, the issue's slice
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    head_dim = model.config.hidden_size // n_heads
    rows = [(str(parse_policy(p)), str(parse_policy(p)), None) for p in args.policies] if args.policies else TABLE
    print(f"# {args.model}, {args.books} books x (prefill {args.prefill} + decode {args.decode}), fp32 oracle, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    runs = {}  # (policy, variant) -> logprobs [B, 1 + decode]
    variants = ["attend_then_evict"] + (["evict_first"] if args.study else []) + (["fast_path"] if args.fast else [])
    for _, policy, _ in rows:
        for variant in variants:
            if policy == "full" and variant == "evict_first":
                continue
            t0 = time.perf_counter()
            if variant == "fast_path":
                cache = make_cache(policy, n_layers, ids.shape[0], n_heads, head_dim, ids.shape[1],
                                   torch.float32, "cpu")
            else:
                cache = ReferenceCache(policy, n_layers, ids.shape[1], evict_first=variant == "evict_first")
            runs[policy, variant] = run_model(model, ids, args.prefill, cache)
            print(f"  {policy:<12} {variant:<18} ppl {perplexity(runs[policy, variant]):8.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def vs_full(policy, variant, **how):
        base = perplexity(runs["full", "attend_then_evict"], **how)
        return 100 * (perplexity(runs[policy, variant], **how) / base - 1)

    print("\n| policy | perplexity | vs full | issue | diff (pp) |")
    print("| --- | --- | --- | --- | --- |")
    for label, policy, target in rows:
        ppl = perplexity(runs[policy, "attend_then_evict"])
        if policy == "full":
            print(f"| {label} | {ppl:.2f} | — | {ISSUE_FULL_PPL:.2f} | |")
            continue
        d = vs_full(policy, "attend_then_evict")
        issue = "" if target is None else f"+{target:.1f}%"
        diff = "" if target is None else f"{d - target:+.2f}" + ("" if abs(d - target) <= TOLERANCE_PP else " (!)")
        print(f"| {label} | {ppl:.2f} | {d:+.2f}% | {issue} | {diff} |")

    if args.study or args.fast:
        readings = [(v, t, a) for v in variants for t in ("decode", "with_prefill", "first")
                    for a in ("pooled", "mean_of_rows")]
        print("\n| reading (order, tokens, aggregation) | full ppl | "
              + " | ".join(label for label, p, _ in rows if p != "full") + " | max |diff| (pp) |")
        print("| --- " * (len(rows) + 2) + "|")
        for v, t, a in readings:
            cells, worst = [], 0.0
            for label, policy, target in rows:
                if policy == "full":
                    continue
                d = vs_full(policy, v, tokens=t, aggregate=a)
                cells.append(f"{d:+.2f}%")
                if target is not None:
                    worst = max(worst, abs(d - target))
            full = perplexity(runs["full", "attend_then_evict"], tokens=t, aggregate=a)
            print(f"| {v}, {t}, {a} | {full:.2f} | " + " | ".join(cells) + f" | {worst:.2f} |")

    if args.json:
        out = {f"{p}|{v}": {"ppl": perplexity(lp), "logprobs_mean": lp.mean().item()} for (p, v), lp in runs.items()}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
