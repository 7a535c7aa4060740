"""`python -m bench`: the reference study (Pythia-2.8B, prefill 128, decode 2048), reproduced.

Modes (``--modes``, comma-separated; ``default`` = the first three, ``all`` = all five):

* ``fp16_full``  our Decoder, unquantized model in ``--dtype``, full KV cache (on CUDA at batch <= 8
  its decode steps run the W8A16 ops with the 16-bit weights, ``Decoder(fuse16)``; above, cuBLAS)
* ``int8_full``  our Decoder, W8A16 model, full KV cache
* ``int8_h2o``   our Decoder, W8A16 model, ``--kv`` policy (default h2o:``--h2o_hh``,``--window``)
* ``hf_eager``   HF eager forward + DynamicCache (what the reference study ran)
* ``hf_compile`` HF StaticCache + torch.compile(mode="reduce-overhead") (what ``generate`` does)

"fp16" stands for the ``--dtype`` of the unquantized weights and activations (the
row labels show the real one: FP16, BF16, or FP32 on CPU). See ``bench.runners``
for the workload and timing, ``bench.data`` for the text.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from . import env, report
from .cli import HelpFormatter
from .data import DataError, concat_sequences, load_corpus
from .models import ModelLoadError, check_vocab, load_model, looks_local

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DT_LABEL = {torch.float16: "FP16", torch.bfloat16: "BF16", torch.float32: "FP32"}


@dataclass(frozen=True)
class Mode:
    key: str
    label: str          # "{dt}" is replaced by FP16 / BF16 / FP32
    int8: bool
    runner: str         # decoder | hf_eager | hf_compile
    policy_flag: bool = False  # the KV policy comes from --kv / --h2o_hh / --window


MODES = {m.key: m for m in [
    Mode("fp16_full", "{dt} Full", False, "decoder"),
    Mode("int8_full", "INT8 Full", True, "decoder"),
    Mode("int8_h2o", "INT8 {policy}", True, "decoder", policy_flag=True),
    Mode("hf_eager", "HF eager {dt}", False, "hf_eager"),
    Mode("hf_compile", "HF compile {dt}", False, "hf_compile"),
]}
DEFAULT_MODES = ["fp16_full", "int8_full", "int8_h2o"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _batch_list(text: str) -> list[int]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a batch size or a list such as 1,16, got {text!r}")
    return list(dict.fromkeys(_positive_int(p) for p in parts))


def parse_modes(text: str) -> list[str]:
    """``fp16_full,hf_eager`` -> keys; ``default`` and ``all`` expand; a leading ``+`` adds to
    the default modes (``+hf_eager`` = ``default,hf_eager``). Raises ValueError."""
    out: list[str] = []
    if text.startswith("+"):
        text = "default," + text[1:]
    for part in (p.strip() for p in text.split(",")):
        if part == "default":
            out += DEFAULT_MODES
        elif part == "all":
            out += list(MODES)
        elif part in MODES:
            out.append(part)
        else:
            raise ValueError(f"unknown mode {part!r}; expected a comma-separated list of "
                             f"{', '.join(MODES)}, or 'default' / 'all'")
    return list(dict.fromkeys(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Teacher-forced decode study of Pythia: FP16 vs INT8 (W8A16) vs INT8 + H2O, "
                    "with HF eager / HF compiled peers. Sub-commands: kernels, policies, attention "
                    "(python -m bench SUBCOMMAND --help).",
        formatter_class=HelpFormatter)
    p.add_argument("--model_path", default="EleutherAI/pythia-2.8b",
                   help="HF id, local checkpoint directory or random preset (random:pythia-2.8b). A Pythia "
                        "hub id that cannot be loaded falls back to the same-shaped random preset, loudly")
    p.add_argument("--ckpt_dir", default=None,
                   help="INT8 checkpoint directory: loaded when it holds one, else made from --model_path "
                        "and saved there. Unset: quantize in memory")
    p.add_argument("--prefill_len", type=_positive_int, default=128, help="prompt tokens per sequence")
    p.add_argument("--decode_len", type=_positive_int, default=2048,
                   help="teacher-forced decode steps per sequence (each scores the next true token)")
    p.add_argument("--window", type=_positive_int, default=252, help="H2O recent window")
    p.add_argument("--h2o_hh", type=_positive_int, default=252, help="H2O heavy hitters")
    p.add_argument("--kv", default=None,
                   help="KV policy of the int8_h2o mode: full | h2o:HEAVY,RECENT | sink:N,WINDOW | window:W "
                        "(default h2o:H2O_HH,WINDOW)")
    p.add_argument("--batch_size", type=_batch_list, default=[1], help="batch size, or a list such as 1,16 (default: 1)")
    p.add_argument("--dataset", default="wikitext",
                   help="'wikitext' (HF datasets, wikitext-2-raw-v1 test; local copy if offline), or a "
                        ".raw/.txt/.jsonl/.jsonl.xz file or a directory of them")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or tokenizer directory (for random presets; overrides the model's)")
    p.add_argument("--dtype", choices=list(_DTYPES), default=None,
                   help="weights/activations dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--modes", default="default",
                   help=f"comma-separated: {', '.join(MODES)}; 'default' (the default) = {','.join(DEFAULT_MODES)}; "
                        "'all' = all five; a leading '+' adds to the default ones (+hf_eager,hf_compile)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--warmup_steps", type=_positive_int, default=3,
                   help="decode steps of the compile/warm-up run (not timed as decode)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows and the header as JSON")
    p.add_argument("--csv", default=None, metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of tok/s and peak memory per mode and batch (needs matplotlib)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    return p


def _check_out_path(parser, flag: str, path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        parser.error(f"{flag} {path}: directory {parent} does not exist")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Turn every bad flag into ``parser.error`` (exit status 2 with a one-line reason)."""
    from model_patch.policies import parse_policy
    from model_patch.sources import PYTHIA_PRESETS

    try:
        args.modes = parse_modes(args.modes)
    except ValueError as e:
        parser.error(f"--modes: {e}")
    try:
        args.device = env.resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.dtype is None:
        args.dtype = "float16" if args.device.type == "cuda" else "float32"
    if args.device.type == "cuda" and args.dtype == "float32" and any(MODES[m].int8 for m in args.modes):
        parser.error("--dtype float32: the CUDA W8A16 ops take float16 or bfloat16 activations")
    kv_text = args.kv if args.kv is not None else f"h2o:{args.h2o_hh},{args.window}"
    try:
        args.kv_policy = parse_policy(kv_text)
    except ValueError as e:
        parser.error(f"--kv: {e}")
    spec = args.model_path
    if spec.startswith("random:"):
        if spec[len("random:"):] not in PYTHIA_PRESETS:
            parser.error(f"--model_path {spec}: unknown random preset; expected random:NAME with NAME in "
                         f"{', '.join(PYTHIA_PRESETS)}")
    elif looks_local(spec) and not Path(spec).expanduser().is_dir():
        parser.error(f"--model_path {spec}: no such model directory")
    if args.dataset != "wikitext" and not Path(args.dataset).expanduser().exists():
        parser.error(f"--dataset {args.dataset}: no such file or directory "
                     "(expected 'wikitext', a .raw/.txt/.jsonl/.jsonl.xz file or a directory)")
    if args.tokenizer is not None and not Path(args.tokenizer).expanduser().exists():
        parser.error(f"--tokenizer {args.tokenizer}: no such file or directory")
    if args.ckpt_dir is not None:
        ckpt = Path(args.ckpt_dir).expanduser()
        if ckpt.exists() and not ckpt.is_dir():
            parser.error(f"--ckpt_dir {args.ckpt_dir}: exists and is not a directory")
        if ckpt.is_dir() and any(ckpt.iterdir()) and not _is_checkpoint(ckpt):
            parser.error(f"--ckpt_dir {args.ckpt_dir}: the directory is not empty and holds no INT8 "
                         "checkpoint (w8a16_manifest.json); refusing to write into it")
    for flag in ("json", "csv", "plot"):
        _check_out_path(parser, "--" + flag, getattr(args, flag))
    if args.plot is not None and (msg := report.matplotlib_missing()):
        parser.error(msg)


def _is_checkpoint(path: Path) -> bool:
    from model_patch.sources import MANIFEST_NAME
    return (path / MANIFEST_NAME).is_file()


def release_memory(device: torch.device) -> None:
    """Forget compiled graphs and free cached memory, so each row's peak is its own."""
    import gc

    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Study:
    def __init__(self, args: argparse.Namespace, command: str):
        self.args = args
        self.device: torch.device = args.device
        self.dtype = _DTYPES[args.dtype]
        self.dt_label = _DT_LABEL[self.dtype]
        self.command = command
        self.info = env.environment(self.device, command)
        self.notices: list[str] = []   # loud
        self.notes: list[str] = []     # informative
        self.warnings: list[str] = []  # loud, repeated after the table
        self.rows: list[dict] = []
        self.random_weights = args.model_path.startswith("random:")
        self.model_used = args.model_path
        self.int8_source = None

    # models ---------------------------------------------------------------------------------
    def load_fp(self):
        a = self.args
        loaded = load_model(a.model_path, self.dtype, self.device, a.tokenizer)
        self.notices += loaded.notices
        self.notes += loaded.notes
        self.random_weights = loaded.random_weights
        self.model_used = loaded.spec
        return loaded

    def load_int8(self, fp):
        """The W8A16 model: from --ckpt_dir, or ``fp`` quantized in place (and saved to --ckpt_dir)."""
        from model_patch import quantize_model, save_quantized
        from model_patch.checkpoint import read_manifest

        a = self.args
        ckpt = Path(a.ckpt_dir).expanduser() if a.ckpt_dir else None
        if ckpt is not None and _is_checkpoint(ckpt):
            loaded = load_model(str(ckpt), self.dtype, self.device, a.tokenizer, fallback=False,
                                need_tokenizer=False)
            source = read_manifest(ckpt).get("source_model", "unknown")
            self.int8_source = f"{ckpt} (made from {source})"
            self.notes.append(f"INT8 model: loaded from --ckpt_dir {ckpt}, made from {source}")
            if fp is not None and source != self.model_used:
                self.warnings.append(
                    f"!!! WARNING: the INT8 checkpoint {ckpt} was made from {source!r}, but the FP rows use "
                    f"{self.model_used!r}: the INT8 and FP rows are different models")
                print(self.warnings[-1], file=sys.stderr, flush=True)
            if fp is None:
                self.random_weights = source.startswith("random:")
                self.model_used = source
            return loaded.model, loaded.tokenizer
        if fp is None:
            fp = self.load_fp()
        # The LM head is quantized too: at batch 1 it is ~5% of the weight bytes (and of
        # the step time); on tiny-neox-a it moved perplexity by -0.09% (tests/model_patch).
        model = quantize_model(fp.model, lm_head=True)
        self.int8_source = f"{self.model_used}, quantized in memory (all linears and the LM head)"
        if ckpt is not None:
            if self.model_used != a.model_path:
                self.notes.append(f"INT8 model: quantized in memory; NOT cached in --ckpt_dir {ckpt} because "
                                  f"{a.model_path} could not be loaded ({self.model_used} was used instead)")
            else:
                save_quantized(model, ckpt, source=self.model_used, tokenizer=fp.tokenizer)
                self.int8_source = f"{self.model_used}, quantized and saved to {ckpt}"
                self.notes.append(f"INT8 model: quantized {self.model_used} and saved the checkpoint to {ckpt} "
                                  "(later runs load it)")
        else:
            self.notes.append(f"INT8 model: {self.model_used} quantized in memory (pass --ckpt_dir to cache it)")
        return model, fp.tokenizer

    # rows -----------------------------------------------------------------------------------
    def label(self, mode: Mode) -> str:
        policy = self.args.kv_policy
        name = {"full": "Full", "h2o": "H2O", "sink": "Sink", "window": "Window"}[policy.name]
        return mode.label.format(dt=self.dt_label, policy=name)

    def kv_of(self, mode: Mode) -> str:
        return str(self.args.kv_policy) if mode.policy_flag else "full"

    def make_peer(self, mode: Mode, model, batch: int, max_len: int):
        from .runners import DecoderPeer, HFCompilePeer, HFEagerPeer

        if mode.runner == "decoder":
            kv = self.args.kv_policy if mode.policy_flag else "full"
            return DecoderPeer(model, batch, max_len, kv=kv)
        if mode.runner == "hf_eager":
            return HFEagerPeer(model)
        backend = "inductor" if self.device.type == "cuda" else "eager"
        return HFCompilePeer(model, max_len, backend=backend)

    def run_row(self, mode: Mode, model, seqs: torch.Tensor) -> dict:
        from .runners import run_teacher_forced

        a = self.args
        batch = seqs.shape[0]
        label = self.label(mode)
        row = dict(batch=batch, mode=mode.key, label=label, kv=self.kv_of(mode),
                   weights="int8" if mode.int8 else self.dt_label.lower(), dtype=a.dtype,
                   prefill_len=a.prefill_len, decode_len=a.decode_len, model=self.model_used,
                   random_weights=self.random_weights, ppl_meaningful=not self.random_weights,
                   cuda_graphs=None, compiled=None, error=None,
                   tok_s=None, peak_mb=None, ppl=None, total_s=None, prefill_s=None, decode_s=None,
                   compile_s=None, kv_mb=None, n_scored_tokens=None, nll=None, ppl_per_sequence=None,
                   start_mb=None)
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            row["start_mb"] = torch.cuda.memory_allocated(self.device) / 2**20  # weights + tokens
        peer = None
        try:
            peer = self.make_peer(mode, model, batch, a.prefill_len + a.decode_len)
            row.update(compiled=peer.compiled, cuda_graphs=peer.cuda_graphs)
            run = run_teacher_forced(peer, seqs, a.prefill_len, a.warmup_steps, not a.no_progress,
                                     desc=f"{label} b={batch}")
        except Exception as e:  # keep the other rows; the table shows the failure, the exit status is 1
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
            return row
        finally:
            del peer
        if self.device.type == "cuda":
            row["peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        row.update(
            tok_s=batch * a.decode_len / run.decode_s, ppl=run.ppl, total_s=run.prefill_s + run.decode_s,
            prefill_s=run.prefill_s, decode_s=run.decode_s, compile_s=run.compile_s,
            kv_mb=None if run.kv_bytes is None else run.kv_bytes / 2**20, n_scored_tokens=run.n_tokens,
            nll=run.nll, ppl_per_sequence=run.ppl_per_sequence())
        return row

    def report_row(self, row: dict) -> None:
        if row["error"]:
            print(f"  {row['label']:<18} batch {row['batch']:>3}: FAILED ({row['error'].splitlines()[0]})",
                  flush=True)
            return
        peak = "n/a" if row["peak_mb"] is None else f"{row['peak_mb']:.0f} MB"
        print(f"  {row['label']:<18} batch {row['batch']:>3}: {row['tok_s']:9.1f} tok/s  peak {peak:>9}  "
              f"PPL {report.format_ppl(row['ppl'], row['ppl_meaningful'])}  compile {row['compile_s']:.1f} s",
              flush=True)

    # main -----------------------------------------------------------------------------------
    def header_lines(self) -> list[str]:
        a = self.args
        lines = [env.format_header("python -m bench: teacher-forced decode study", self.info)]
        lines.append(f"{'model':>18}: {self.model_used}" + ("  (RANDOM WEIGHTS)" if self.random_weights else ""))
        if self.int8_source:
            lines.append(f"{'int8 model':>18}: {self.int8_source}")
        lines.append(f"{'workload':>18}: batch {','.join(map(str, a.batch_size))}, prefill {a.prefill_len}, "
                     f"decode {a.decode_len} teacher-forced, dtype {a.dtype}, int8_h2o KV {a.kv_policy}")
        lines.append(f"{'dataset':>18}: {self.dataset_source}")
        if "hf_eager" in a.modes or "hf_compile" in a.modes:
            lines.append(f"{'HF peers':>18}: teacher-forced like our rows; hf_eager = HF forward + DynamicCache, one "
                         "call per token; hf_compile = HF StaticCache + torch.compile(model.__call__, "
                         "mode='reduce-overhead'), the compiled decode call of generate(cache_implementation="
                         "'static'); both prefill eagerly")
        if self.device.type == "cpu":
            lines.append(f"{'CUDA graphs':>18}: SKIPPED (CPU run): our decoder runs its decode steps eagerly "
                         "(it compiles on CUDA only), hf_compile is traced by dynamo with backend=eager (no "
                         "inductor, no graphs); the timings are a smoke test, not speed figures")
        else:
            lines.append(f"{'CUDA graphs':>18}: decode steps of fp16_full / int8_* / hf_compile replay as "
                         "CUDA graphs; hf_eager runs eagerly")
        return lines

    def payload(self) -> dict:
        a = self.args
        config = {k: (str(v) if isinstance(v, (torch.device, Path)) else v) for k, v in vars(a).items()}
        config["kv_policy"] = str(a.kv_policy)
        return {"environment": self.info, "config": config, "model": self.model_used,
                "random_weights": self.random_weights, "int8_model": self.int8_source,
                "dataset": self.dataset_source, "notices": self.notices + self.warnings, "notes": self.notes,
                "wall_s": getattr(self, "wall_s", None), "rows": self.rows}

    def save_outputs(self) -> None:
        report.add_ratios(self.rows)
        if self.args.json:
            report.write_json(self.args.json, self.payload())
        if self.args.csv:
            report.write_csv(self.args.csv, self.rows, report.STUDY_FIELDS)

    def run(self) -> int:
        t_start = time.perf_counter()
        a = self.args
        corpus = load_corpus(a.dataset)
        self.dataset_source = corpus.source
        self.notes += corpus.notes
        for n in corpus.notes:
            print(f"note: {n}", file=sys.stderr, flush=True)
        modes = [MODES[m] for m in a.modes]
        fp_modes = [m for m in modes if not m.int8]
        int8_modes = [m for m in modes if m.int8]
        seq_len = a.prefill_len + a.decode_len + 1

        fp = None
        ckpt_ready = a.ckpt_dir is not None and _is_checkpoint(Path(a.ckpt_dir).expanduser())
        if fp_modes or not ckpt_ready:
            fp = self.load_fp()
            tokenizer = fp.tokenizer
        int8_model = None
        if not fp_modes:
            int8_model, tokenizer = self.load_int8(fp)
            fp = None
        if tokenizer is None:
            raise ModelLoadError("no tokenizer: pass --tokenizer PATH (a tokenizer.json or a directory)")
        seqs = concat_sequences(tokenizer, corpus, max(a.batch_size), seq_len)
        check_vocab(seqs, fp.model if fp is not None else int8_model)
        seqs = seqs.to(self.device)

        print("\n".join(self.header_lines()), flush=True)
        for n in self.notices + self.warnings:
            print(n, flush=True)
        for n in self.notes:
            print(f"note: {n}", flush=True)

        for phase_modes, is_int8 in ((fp_modes, False), (int8_modes, True)):
            if not phase_modes:
                continue
            if is_int8 and int8_model is None:
                int8_model, _ = self.load_int8(fp)
                fp = None
                print(f"{'int8 model':>18}: {self.int8_source}", flush=True)
            model = int8_model if is_int8 else fp.model
            for batch in a.batch_size:
                for mode in phase_modes:
                    row = self.run_row(mode, model, seqs[:batch])
                    self.rows.append(row)
                    self.report_row(row)
                    self.save_outputs()
            if not is_int8:
                model = None
        order = {k: i for i, k in enumerate(MODES)}
        self.rows.sort(key=lambda r: (r["batch"], order[r["mode"]]))
        self.save_outputs()

        print()
        print(report.study_table(self.rows, f"{self.dt_label} Full"))
        print()
        print("tok/s = batch x decode_len / decode seconds (after the compile/warm-up run); peak MB = "
              "torch.cuda.max_memory_allocated (weights included), reset before each row; PPL over the "
              f"{a.decode_len} decode-step predictions of each sequence, pooled; total s = prefill + decode; "
              "compile s = the separate warm-up run (prefill + "
              f"{a.warmup_steps} decode steps).")
        if self.random_weights:
            print(f"!!! PPL marked '(random)': the model ({self.model_used}) has RANDOM WEIGHTS, so its perplexity "
                  "means nothing (at most it shows whether INT8 and FP agree). Speed and memory figures are valid.")
        for n in self.warnings:
            print(n)
        if a.plot:
            report.write_plot(a.plot, self.rows, f"{self.info.get('gpu')} | {self.model_used} | "
                              f"prefill {a.prefill_len}, decode {a.decode_len} | {self.info['date']}\n{self.command}")
            print(f"plot written to {a.plot}")
        if a.json:
            print(f"JSON written to {a.json}")
        if a.csv:
            print(f"CSV written to {a.csv}")
        bars = report.study_bars(self.rows) if self.device.type == "cuda" else []
        if bars:
            print("\nBars of issues 3-5 read off this run (ratios within this run; informative):")
            for line in bars:
                print("  " + line)
        self.wall_s = time.perf_counter() - t_start
        print(f"\nwhole run: {self.wall_s:.0f} s (loading, tokenizing, compiling and every row)")
        self.save_outputs()
        failed = [r for r in self.rows if r["error"]]
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    study = Study(args, env.command_line(None, argv))
    try:
        return study.run()
    except (DataError, ModelLoadError) as e:
        parser.error(str(e))
    except Exception as e:
        from model_patch.checkpoint import CheckpointError
        from model_patch.sources import ModelSourceError
        if isinstance(e, (ModelSourceError, CheckpointError)):
            parser.error(str(e))
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
