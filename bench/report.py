"""Tables, JSON, CSV and the plot of the study."""
from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path

from tabulate import tabulate

# (key in the row dict, column title); the first six are the reference study's columns.
STUDY_COLUMNS = [
    ("batch", "batch"),
    ("label", "mode"),
    ("tok_s", "tok/s"),
    ("peak_mb", "peak MB"),
    ("ppl", "PPL"),
    ("total_s", "total s"),
    ("compile_s", "compile s"),
    ("speedup_vs_fp16_full", "speed-up vs {base}"),
    ("memory_vs_fp16_full", "memory vs {base}"),
    ("kv", "KV policy"),
    ("kv_mb", "KV MB"),
]

# Every field a study row carries (JSON and CSV).
STUDY_FIELDS = [
    "batch", "mode", "label", "kv", "weights", "dtype", "tok_s", "peak_mb", "ppl", "ppl_meaningful",
    "total_s", "prefill_s", "decode_s", "compile_s", "speedup_vs_fp16_full", "memory_vs_fp16_full",
    "kv_mb", "prefill_len", "decode_len", "n_scored_tokens", "nll", "ppl_per_sequence", "compiled", "cuda_graphs",
    "start_mb", "model", "random_weights", "error",
]


def _num(x, fmt: str) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, fmt)


def format_ppl(ppl, meaningful: bool) -> str:
    if ppl is None:
        return "n/a"
    text = _num(ppl, ".4g")
    return text if meaningful else f"{text} (random)"


def add_ratios(rows: list[dict]) -> None:
    """speed-up and memory of each row relative to the FP16 Full row of the same batch."""
    base = {r["batch"]: r for r in rows if r["mode"] == "fp16_full" and r.get("tok_s")}
    for r in rows:
        b = base.get(r["batch"])
        r["speedup_vs_fp16_full"] = (r["tok_s"] / b["tok_s"]) if b and r.get("tok_s") else None
        r["memory_vs_fp16_full"] = (r["peak_mb"] / b["peak_mb"]) if b and r.get("peak_mb") and b.get("peak_mb") \
            else None


def study_table(rows: list[dict], base: str = "FP16 Full") -> str:
    """The study's table; ``base`` names the FP16 Full row (FP32 Full on CPU, BF16 Full with bf16)."""
    cells = []
    for r in rows:
        if r.get("error"):
            cells.append([r["batch"], r["label"], "FAILED: " + r["error"].splitlines()[0][:60]]
                         + [""] * (len(STUDY_COLUMNS) - 3))
            continue
        cells.append([
            r["batch"], r["label"], _num(r["tok_s"], ".1f"),
            "n/a (CPU)" if r["peak_mb"] is None else _num(r["peak_mb"], ".0f"),
            format_ppl(r["ppl"], r["ppl_meaningful"]), _num(r["total_s"], ".2f"), _num(r["compile_s"], ".1f"),
            "" if r["speedup_vs_fp16_full"] is None else f"{r['speedup_vs_fp16_full']:.2f}x",
            "" if r["memory_vs_fp16_full"] is None else f"{r['memory_vs_fp16_full']:.2f}x",
            r["kv"], _num(r["kv_mb"], ".1f"),
        ])
    headers = [t.format(base=base) for _, t in STUDY_COLUMNS]
    return tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True)


def write_json(path: str, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})


def matplotlib_missing() -> str | None:
    """None when matplotlib can be imported, else the message to show."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("--plot needs matplotlib, an optional extra: pip install matplotlib "
                "(or pip install -e '.[plot]')")
    return None


PLOT_TITLE_WIDTH = 150  # characters per title line at fontsize 9 across the 12-inch figure


def plot_title_lines(title: str, width: int = PLOT_TITLE_WIDTH) -> list[str]:
    """The plot's title as lines of at most ``width`` characters: each given line wrapped (the
    command line is long), long words broken rather than cut off at the figure's edge."""
    return [w for line in title.splitlines()
            for w in (textwrap.wrap(line, width, break_on_hyphens=False) or [""])]


def write_plot(path: str, rows: list[dict], title: str) -> None:
    """PNG with two panels: decode tok/s and peak memory, one bar group per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    batches = sorted({r["batch"] for r in ok})
    labels = list(dict.fromkeys(r["label"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / max(1, len(labels))
    for ax, key, ylabel in ((axes[0], "tok_s", "decode tok/s"), (axes[1], "peak_mb", "peak GPU memory (MB)")):
        for j, label in enumerate(labels):
            xs, ys = [], []
            for i, b in enumerate(batches):
                r = next((r for r in ok if r["batch"] == b and r["label"] == label), None)
                if r is not None and r.get(key) is not None:
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(r[key])
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        values = [r[key] for r in ok if r.get(key)]
        if values and max(values) / min(values) > 20:  # batch 1 next to batch 16: keep both readable
            ax.set_yscale("log")
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    if all(r.get("peak_mb") is None for r in ok):
        axes[1].text(0.5, 0.5, "no GPU memory figures (CPU run)", ha="center", va="center",
                     transform=axes[1].transAxes)
    lines = plot_title_lines(title)
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()  # makes room for the (multi-line) suptitle
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study_bars(rows: list[dict]) -> list[str]:
    """The speed / memory bars of issues 3, 4 and 5, read off one run's rows (informative only).

    Every ratio compares rows of this run. A bar whose rows are missing is skipped. INT8 Full's
    memory at batch sizes other than 1 is an ``info`` line: its bar is a batch-1 bar.
    """
    ok = {(r["batch"], r["mode"]): r for r in rows if not r.get("error")}
    out = []

    def ratio(batch, a, b, key):
        ra, rb = ok.get((batch, a)), ok.get((batch, b))
        if ra is None or rb is None or not ra.get(key) or not rb.get(key):
            return None
        return ra[key] / rb[key]

    def line(value, target, higher, text):
        if value is None:
            return
        good = value >= target if higher else value <= target
        out.append(f"{'PASS' if good else 'MISS'}  {text}: {value:.2f}x (bar {'>=' if higher else '<='} "
                   f"{target:g}x)")

    batches = sorted({b for b, _ in ok})
    for b in batches:
        line(ratio(b, "int8_full", "fp16_full", "tok_s"), 1.5 if b == 1 else 1.3, True,
             f"batch {b}: INT8 Full tok/s vs FP16 Full")
        line(ratio(b, "int8_h2o", "int8_full", "tok_s"), 1.5 if b >= 16 else 1.0, True,
             f"batch {b}: INT8 H2O tok/s vs INT8 Full")
        line(ratio(b, "fp16_full", "hf_compile", "tok_s"), 1.3, True,
             f"batch {b}: FP16 Full tok/s vs HF compile (static cache)")
        mem = ratio(b, "int8_full", "fp16_full", "peak_mb")
        if b == 1:  # issue 3's memory bar sits with its batch-1 bullet
            line(mem, 0.6, False, f"batch {b}: INT8 Full peak memory vs FP16 Full")
        elif mem is not None:
            out.append(f"info  batch {b}: INT8 Full peak memory vs FP16 Full: {mem:.2f}x (no bar: the <= 0.6x "
                       "bar is set at batch 1; the fp16 KV cache is the same size in both rows)")
        if b >= 16:
            line(ratio(b, "int8_h2o", "fp16_full", "peak_mb"), 0.45, False,
                 f"batch {b}: INT8 H2O peak memory vs FP16 Full")
    return out
