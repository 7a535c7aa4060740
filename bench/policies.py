"""`python -m bench policies`: perplexity of every KV-cache policy on a real model.

The table users need to pick a policy and its heavy/recent split. Workload
(teacher-forced, as in the study; ``model_patch.decoder.Decoder.teacher_force``):
prefill ``--prefill_len`` tokens, then ``--decode_len`` decode steps each feeding the
true token; the perplexity is pooled over the ``n_seqs x decode_len`` decode-step
predictions.

Sequences (``--protocol``):

* ``docs`` (the H2O issue's protocol, the default for a multi-document file such as
  the Gutenberg books): one sequence per document for the first ``--n_seqs`` (4)
  documents in file order, characters ``text[10000:400000]`` (``--chars``), tokenized
  without special tokens, the first ``prefill + decode + 1`` (2,177) tokens;
* ``concat`` (the default for a single text such as WikiText-2): ``--n_seqs``
  consecutive slices of the tokenized text, as in the study.

Runs on CPU (fp32, eager decode steps) or on a GPU (``--dtype``, compiled CUDA-graph
decode steps, as in the study). ``--reference`` also runs the readable fp32 oracle
(``model_patch.h2o_reference``, on the CPU) and shows how far the fast path is from it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from . import env, report
from .cli import HelpFormatter
from .data import SHARED, DataError, concat_sequences, document_sequences, load_corpus
from .models import ModelLoadError, check_vocab, load_model

DEFAULT_MODEL = SHARED / "models" / "tiny-neox-a"
DEFAULT_DATASET = SHARED / "data" / "gutenberg-en" / "gutenberg_en_valid.jsonl.xz"
# Budget 504 (the reference study's 252 + 252) and budget 256, several heavy/recent splits each.
DEFAULT_POLICIES = [
    "full",
    "h2o:252,252", "h2o:50,454", "sink:4,500", "window:504",
    "h2o:128,128", "h2o:64,192", "h2o:25,231", "sink:4,252", "window:256",
]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

POLICY_FIELDS = ["policy", "kind", "budget", "heavy", "recent", "n_sink", "window", "ppl", "vs_full_pct",
                 "kv_mb", "seconds", "ref_ppl", "ref_vs_full_pct", "fast_vs_ref_pct", "ppl_per_sequence"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench policies", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model_path", default=str(DEFAULT_MODEL), help="HF id, local directory or random: preset")
    p.add_argument("--dataset", default=str(DEFAULT_DATASET),
                   help="'wikitext', a .raw/.txt/.jsonl/.jsonl.xz file or a directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or directory (for random presets)")
    p.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, metavar="POLICY",
                   help="policies: full | h2o:HEAVY,RECENT | sink:N_SINK,WINDOW | window:W")
    p.add_argument("--prefill_len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--decode_len", type=int, default=2048, help="teacher-forced decode steps per sequence")
    p.add_argument("--n_seqs", type=int, default=4, help="sequences (documents) scored, run as one batch")
    p.add_argument("--protocol", choices=["auto", "docs", "concat"], default="auto",
                   help="auto: docs when the dataset holds >= n_seqs documents, else concat")
    p.add_argument("--chars", default="10000:400000", help="character slice of each document (docs protocol)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=list(_DTYPES), default=None,
                   help="model dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--no_compile", action="store_true", help="run the decode steps eagerly on CUDA too")
    p.add_argument("--reference", action="store_true",
                   help="also run the fp32 oracle (model_patch.h2o_reference, CPU; slow) for every policy")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows and the header as JSON")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    from model_patch.policies import parse_policy

    parser = build_parser()
    a = parser.parse_args(argv)
    for flag in ("prefill_len", "decode_len", "n_seqs"):
        if getattr(a, flag) <= 0:
            parser.error(f"--{flag}: must be a positive integer, got {getattr(a, flag)}")
    try:
        a.policy_specs = list(dict.fromkeys(parse_policy(t) for t in a.policies))
    except ValueError as e:
        parser.error(f"--policies: {e}")
    if not a.policy_specs:
        parser.error("--policies: no policy given")
    try:
        lo, hi = (int(t) for t in a.chars.split(":"))
        if not 0 <= lo < hi:
            raise ValueError
        a.char_range = (lo, hi)
    except ValueError:
        parser.error(f"--chars: expected START:END with 0 <= START < END, got {a.chars!r}")
    try:
        a.device = env.resolve_device(a.device)
    except ValueError as e:
        parser.error(str(e))
    a.dtype = a.dtype or ("float16" if a.device.type == "cuda" else "float32")
    if a.dataset != "wikitext" and not Path(a.dataset).expanduser().exists():
        parser.error(f"--dataset {a.dataset}: no such file or directory")
    if not a.model_path.startswith("random:") and a.model_path.startswith(("/", ".", "~")) \
            and not Path(a.model_path).expanduser().is_dir():
        parser.error(f"--model_path {a.model_path}: no such model directory")
    if a.json and not Path(a.json).expanduser().resolve().parent.is_dir():
        parser.error(f"--json {a.json}: directory does not exist")
    a.parser = parser
    return a


def _sequences(a, tokenizer, corpus) -> tuple[torch.Tensor, str]:
    seq_len = a.prefill_len + a.decode_len + 1
    protocol = a.protocol
    if protocol == "auto":
        protocol = "docs" if len(corpus.docs) >= a.n_seqs else "concat"
    if protocol == "docs":
        lo, hi = a.char_range
        ids = document_sequences(tokenizer, corpus, a.n_seqs, seq_len, lo, hi)
        how = (f"docs: first {a.n_seqs} documents, characters [{lo}:{hi}], first {seq_len} tokens each "
               "(no special tokens)")
    else:
        ids = concat_sequences(tokenizer, corpus, a.n_seqs, seq_len)
        how = f"concat: {a.n_seqs} consecutive slices of {seq_len} tokens of the tokenized text"
    return ids, how


def _reference_logprobs(model, ids: torch.Tensor, prefill_len: int, policy) -> torch.Tensor:
    """fp32 oracle log-probs of the decode-step predictions, [B, decode_len] (CPU)."""
    from model_patch.h2o_reference import ReferenceCache, run_model

    cache = ReferenceCache(policy, model.config.num_hidden_layers, ids.shape[1])
    return run_model(model, ids, prefill_len, cache)[:, 1:]  # drop the prefill's own prediction


def _ppl(logprobs: torch.Tensor) -> float:
    return float(torch.exp(-logprobs.double().mean()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    from model_patch.decoder import Decoder

    dtype = _DTYPES[a.dtype]
    try:
        corpus = load_corpus(a.dataset)
        loaded = load_model(a.model_path, dtype, a.device, a.tokenizer, fallback=False)
        ids, how = _sequences(a, loaded.tokenizer, corpus)
        check_vocab(ids, loaded.model)
    except (DataError, ModelLoadError) as e:
        a.parser.error(str(e))
    model = loaded.model
    command = env.command_line("policies", argv)
    info = env.environment(a.device, command)
    print(env.format_header("python -m bench policies: perplexity of the KV-cache policies", info))
    print(f"{'model':>18}: {loaded.spec}" + ("  (RANDOM WEIGHTS: perplexities mean nothing)"
                                              if loaded.random_weights else ""))
    print(f"{'dataset':>18}: {corpus.source}")
    print(f"{'sequences':>18}: {how}")
    print(f"{'workload':>18}: prefill {a.prefill_len}, decode {a.decode_len} teacher-forced, batch {a.n_seqs}, "
          f"dtype {a.dtype}, decode steps "
          + ("compiled (CUDA graphs)" if a.device.type == "cuda" and not a.no_compile else "eager"))
    for n in corpus.notes + loaded.notes:
        print(f"note: {n}")
    ids_dev = ids.to(a.device)
    ref_model = None
    if a.reference:
        ref_model = model if (a.device.type == "cpu" and dtype == torch.float32) else \
            load_model(a.model_path, torch.float32, torch.device("cpu"), a.tokenizer, fallback=False).model

    rows = []
    for spec in a.policy_specs:
        t0 = time.perf_counter()
        dec = Decoder(model, batch_size=a.n_seqs, max_len=a.prefill_len + a.decode_len, kv=spec,
                      compile=False if a.no_compile else None)
        lp = dec.teacher_force(ids_dev, a.prefill_len, progress=not a.no_progress).cpu()
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        row = dict(policy=str(spec), kind=spec.name,
                   budget=spec.budget if spec.budget is not None else a.prefill_len + a.decode_len,
                   heavy=spec.heavy if spec.name == "h2o" else None,
                   recent=spec.recent if spec.name == "h2o" else None,
                   n_sink=spec.n_sink if spec.name == "sink" else None,
                   window=spec.window if spec.name in ("sink", "window") else None,
                   ppl=_ppl(lp), kv_mb=dec.memory_bytes() / 2**20, seconds=time.perf_counter() - t0,
                   ppl_per_sequence=torch.exp(-lp.double().mean(dim=1)).tolist(),
                   ref_ppl=None, ref_vs_full_pct=None, fast_vs_ref_pct=None)
        del dec
        torch.compiler.reset()
        if ref_model is not None:
            row["ref_ppl"] = _ppl(_reference_logprobs(ref_model, ids, a.prefill_len, spec))
            row["fast_vs_ref_pct"] = 100 * (row["ppl"] / row["ref_ppl"] - 1)
        rows.append(row)
        print(f"  {row['policy']:<14} PPL {row['ppl']:.3f}  ({row['seconds']:.0f} s)", flush=True)

    full = next((r for r in rows if r["kind"] == "full"), None)
    for r in rows:
        r["vs_full_pct"] = 100 * (r["ppl"] / full["ppl"] - 1) if full else None
        if full and full["ref_ppl"] and r["ref_ppl"]:
            r["ref_vs_full_pct"] = 100 * (r["ref_ppl"] / full["ref_ppl"] - 1)

    def pct(v):
        return "n/a" if v is None else f"{v:+.2f}%"

    headers = ["policy", "budget", "PPL", "vs full", "KV MB", "s"]
    cells = []
    for r in rows:
        line = [r["policy"], r["budget"] if r["kind"] != "full" else f"all ({r['budget']})",
                f"{r['ppl']:.3f}" + ("" if not loaded.random_weights else " (random)"),
                "—" if r["kind"] == "full" else pct(r["vs_full_pct"]), f"{r['kv_mb']:.1f}", f"{r['seconds']:.0f}"]
        if a.reference:
            line += [f"{r['ref_ppl']:.3f}", "—" if r["kind"] == "full" else pct(r["ref_vs_full_pct"]),
                     pct(r["fast_vs_ref_pct"])]
        cells.append(line)
    if a.reference:
        headers += ["PPL fp32 oracle", "oracle vs full", "fast vs oracle"]
    print()
    print(tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True))
    print(f"\nPPL pooled over {a.n_seqs} x {a.decode_len} decode-step predictions; KV MB = the policy's cache "
          "buffers (K, V and the policy state) for this batch; s = wall time of the policy's run"
          + (" (incl. compile)" if a.device.type == "cuda" and not a.no_compile else "") + ".")
    if a.json:
        report.write_json(a.json, {"environment": info, "model": loaded.spec, "random_weights": loaded.random_weights,
                                   "dataset": corpus.source, "sequences": how, "dtype": a.dtype,
                                   "prefill_len": a.prefill_len, "decode_len": a.decode_len,
                                   "n_seqs": a.n_seqs, "rows": rows})
        print(f"JSON written to {a.json}")
    return 0 if all(math.isfinite(r["ppl"]) for r in rows) else 1
