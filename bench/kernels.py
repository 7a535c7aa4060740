"""`python -m bench kernels`: W8A16 linear vs torch fp16 F.linear vs torch dequantize + F.linear.

Cases: M in {1, 2, 4, 8, 16, 32, 128, 2048} x Pythia-2.8B's linears (N, K):
qkv (7680, 2560), attn_out (2560, 2560), mlp_up (10240, 2560) as ``linear`` and as
``linear_gelu``, mlp_down (2560, 10240), lm_head (50304, 2560); then the two fused
layer ops of the decoder (GPT-NeoX's parallel residual), each two of those linears:

* ``layer_in``:  ``linear_pair(gelu2=True)`` = qkv on x1 and mlp_up_gelu on x2, two outputs;
* ``layer_out``: ``linear_sum`` = attn_out on x1 plus mlp_down on x2, one summed output.

Every single-linear case is timed three ways, all with the layer's bias:

* ``w8a16``:  ``torch.ops.w8a16.linear`` / ``linear_gelu`` (int8 weight, fp32 scales);
* ``fp16``:   ``F.linear(x, w_fp16, b)`` (cuBLAS), then ``F.gelu`` for the GeLU case;
* ``dequant``: ``F.linear(x, w_int8.to(x.dtype)) * scales + b`` (gpt-fast's eager
  form: the int8 -> fp16 cast materializes the weight, then cuBLAS; scales kept in x's dtype);
* ``w16`` (with ``--w16``): the same w8a16 ops with 16-bit weights (x's dtype) and unit fp32
  scales, the unquantized form ``Decoder(fuse16=True)`` runs an FP16 model's decode steps
  through: our gemv up to 32 rows, torch's matmul into fp32 and our epilogue kernel above.

A fused case is timed four ways, each doing what the layer needs (layer_in: both outputs,
GeLU on the second; layer_out: the sum of the two linears):

* ``w8a16``:    the fused op, one call (``torch.ops.w8a16.linear_pair`` / ``linear_sum``);
* ``w8a16 x2``: the two separate W8A16 calls (``linear`` + ``linear_gelu``; ``linear`` + ``linear``
  and the add of their outputs, as the unfused model does);
* ``fp16``:     two ``F.linear`` (+ ``F.gelu`` on the second for layer_in, + the add for layer_out);
* ``dequant``:  the dequant recipe above, twice (+ the GeLU / the add likewise);
* ``w16`` (with ``--w16``): the fused op with 16-bit weights.

In the table a fused case's N and K are per linear ("7680+10240" and "2560"); in the JSON
``N`` and ``K`` are those of the equivalent single GEMM (layer_in: weights stacked along N,
17920 x 2560; layer_out: along K, 2560 x 12800), so TFLOP/s = 2 M N K holds for every row,
and ``N_parts`` / ``K_parts`` hold the per-linear text. On a GPU, after issue 2's bars
(read off the single-linear shapes only), info lines give each fused op's time against
its two separate w8a16 calls at M = 1 and 16 (JSON ``fused_info``).

("fp16" means ``--dtype``; bf16 with ``--dtype bfloat16``.)

Timing (why it looks like this):

* Weights that fit in the 50 MB L2 would time the cache, not HBM. Each contender
  cycles through enough independent copies of its weight / scales / bias / input
  that the working set is at least ``--l2_factor`` (4) x the L2 size (and at least 2 copies).
* One CUDA graph holds many calls cycling through the copies, so launch gaps are
  gone for all three contenders alike; the graph is replayed ``--replays`` times,
  each timed with CUDA events, and the median per-call time is reported. Everything
  is warmed up (eager calls, then one replay) first.
* Bytes are what the call must move: weight + scales + bias + x in + y out, each
  contender its own (fp16 weight for ``fp16``; int8 weight + scales for the others,
  whose temporaries are not counted). A fused case counts the fused op's minimum
  traffic for every contender, in the contender's weight format: the sum over its
  two linears of the single-linear count, minus one output (M x N) for layer_out, whose
  y is written once (``w8a16 x2`` counts like ``w8a16``; the unfused contenders' two
  outputs before their add are temporaries, not counted). The ceiling is the device-to-device copy
  bandwidth measured in the same run (best of two copy methods at three sizes up to
  1 GiB, bytes read + written).
* The GeLU bar compares two of our kernels, so it is timed on its own (``gelu_pairs``, GPU only):
  ``linear`` and ``linear_gelu`` on the same mlp_up tensors, their graphs replayed in
  ``--replays`` interleaved pairs (AB, BA, ...), and the median per-pair ratio is reported. Read
  off the table instead, the two rows are timed minutes apart with other contenders in between,
  and clock / power drift moved that ratio by several percent between runs of the same kernels.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tabulate import tabulate

from . import env, report
from .cli import HelpFormatter

M_VALUES = [1, 2, 4, 8, 16, 32, 128, 2048]
QUICK_M = [1, 8, 16, 2048]


@dataclass(frozen=True)
class Shape:
    name: str
    N: int
    K: int
    gelu: bool = False

    @property
    def op(self) -> str:
        return "linear_gelu" if self.gelu else "linear"

    @property
    def parts(self) -> tuple[Shape, ...]:
        return (self,)

    @property
    def impls(self) -> list[str]:
        return IMPLS

    @property
    def N_parts(self) -> str:
        return str(self.N)

    @property
    def K_parts(self) -> str:
        return str(self.K)


@dataclass(frozen=True)
class FusedShape:
    """Two linears of one layer in one op: ``linear_pair`` (two outputs) or, ``summed``, ``linear_sum``.

    ``first`` runs on x1, ``second`` on x2; their ``gelu`` flags are linear_pair's gelu1 / gelu2.
    ``N``, ``K`` are the equivalent single GEMM's: a pair shares K (N adds up), a sum shares N
    (K adds up).
    """
    name: str
    first: Shape
    second: Shape
    summed: bool = False
    gelu = False  # not a field: no single GeLU flag (see first.gelu / second.gelu)

    def __post_init__(self):
        if self.summed and (self.first.N != self.second.N or self.first.gelu or self.second.gelu):
            raise ValueError(f"{self.name}: linear_sum needs the same N and no GeLU")
        if not self.summed and self.first.K != self.second.K:
            raise ValueError(f"{self.name}: a pair is benchmarked with one K")

    @property
    def op(self) -> str:
        return "linear_sum" if self.summed else "linear_pair"

    @property
    def parts(self) -> tuple[Shape, ...]:
        return (self.first, self.second)

    @property
    def impls(self) -> list[str]:
        return FUSED_IMPLS

    @property
    def N(self) -> int:
        return self.first.N if self.summed else self.first.N + self.second.N

    @property
    def K(self) -> int:
        return self.first.K + self.second.K if self.summed else self.first.K

    @property
    def N_parts(self) -> str:
        return str(self.N) if self.summed else f"{self.first.N}+{self.second.N}"

    @property
    def K_parts(self) -> str:
        return f"{self.first.K}+{self.second.K}" if self.summed else str(self.K)


SHAPES = [
    Shape("qkv", 7680, 2560),
    Shape("attn_out", 2560, 2560),
    Shape("mlp_up", 10240, 2560),
    Shape("mlp_up_gelu", 10240, 2560, gelu=True),
    Shape("mlp_down", 2560, 10240),
    Shape("lm_head", 50304, 2560),
]
_BY_NAME = {s.name: s for s in SHAPES}
FUSED_SHAPES = [
    FusedShape("layer_in", _BY_NAME["qkv"], _BY_NAME["mlp_up_gelu"]),
    FusedShape("layer_out", _BY_NAME["attn_out"], _BY_NAME["mlp_down"], summed=True),
]
ALL_SHAPES = SHAPES + FUSED_SHAPES  # the default list; issue 2's bars read SHAPES only
IMPLS = ["w8a16", "fp16", "dequant"]
SPLIT = "w8a16 x2"  # a fused case's two separate W8A16 calls
FUSED_IMPLS = ["w8a16", SPLIT, "fp16", "dequant"]
W16 = "w16"  # --w16: the ops with 16-bit weights and unit scales
FUSED_NOTE = ("fused shapes: layer_in = linear_pair(qkv on x1, mlp_up_gelu on x2, gelu2=True), layer_out = "
              "linear_sum(attn_out on x1 + mlp_down on x2);\n"
              "  w8a16 = the fused op, 'w8a16 x2' = the two separate w8a16 calls (+ the add for layer_out), "
              "fp16 / dequant = two calls each (+ GeLU / add);\n"
              "  bytes, every contender alike: both linears' weight + scales + bias + x + y in the contender's "
              "weight format, "
              "layer_out's y counted once (intermediate outputs are temporaries, not counted).")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

KERNEL_FIELDS = ["shape", "op", "M", "N", "K", "N_parts", "K_parts", "impl", "us", "gb_s", "pct_copy_bw", "tflops",
                 "speedup_vs_fp16", "bytes", "copies", "calls_per_graph"]


def call_bytes(impl: str, M: int, N: int, K: int, act_bytes: int = 2) -> int:
    """Bytes one call must move: weight + scales + bias + x + y (see the module doc)."""
    activations = act_bytes * (M * K + M * N) + act_bytes * N  # x, y, bias
    if impl == "fp16":
        return act_bytes * N * K + activations
    if impl == W16:
        return act_bytes * N * K + 4 * N + activations
    scales = 4 * N if impl == "w8a16" else act_bytes * N
    return N * K + scales + activations


def shape_bytes(shape: Shape | FusedShape, impl: str, M: int, act_bytes: int = 2) -> int:
    """Bytes one call of ``impl`` on ``shape`` must move: ``call_bytes`` for a single linear; for a
    fused shape the sum over its two linears (``w8a16 x2`` counted as ``w8a16``), less one output
    [M, N] for linear_sum (its y is written once; every contender is counted alike)."""
    base = "w8a16" if impl == SPLIT else impl
    total = sum(call_bytes(base, M, p.N, p.K, act_bytes) for p in shape.parts)
    if isinstance(shape, FusedShape) and shape.summed:
        total -= act_bytes * M * shape.N
    return total


def _median_us(times_s: list[float]) -> float:
    return statistics.median(times_s) * 1e6


class Timer:
    """Per-call time of ``fn(i)`` (``i`` cycles over the copies): CUDA graph + events, or a CPU loop."""

    def __init__(self, device: torch.device, replays: int, graph_ms: float = 20.0, max_calls: int = 2000):
        self.device, self.replays, self.graph_ms, self.max_calls = device, replays, graph_ms, max_calls

    def __call__(self, fn, copies: int) -> tuple[float, int]:
        if self.device.type != "cuda":
            return self._cpu(fn, copies)
        graph, calls = self._capture(fn, copies)
        times = [self._replay_s(graph) / calls for _ in range(self.replays)]
        del graph
        return _median_us(times), calls

    def paired(self, fn_a, fn_b, copies: int) -> list[tuple[float, float]]:
        """Per-call seconds of ``fn_a`` and ``fn_b`` in ``replays`` interleaved pairs of replays.

        For a ratio of two contenders: timed minutes apart (the table's order), clock and power
        drift between them shows in the ratio; here each pair runs back to back, in alternating
        order (AB, BA, ...), so the per-pair ratios see the same conditions."""
        if self.device.type != "cuda":
            fn_a(0)  # warm-up
            fn_b(0)
            pairs = []
            for r in range(self.replays):
                first, second = (fn_a, fn_b) if r % 2 == 0 else (fn_b, fn_a)
                t = [self._cpu_once(first, copies), self._cpu_once(second, copies)]
                pairs.append((t[0], t[1]) if r % 2 == 0 else (t[1], t[0]))
            return pairs
        (ga, ca), (gb, cb) = self._capture(fn_a, copies), self._capture(fn_b, copies)
        pairs = []
        for r in range(self.replays):
            if r % 2 == 0:
                ta = self._replay_s(ga)
                tb = self._replay_s(gb)
            else:
                tb = self._replay_s(gb)
                ta = self._replay_s(ga)
            pairs.append((ta / ca, tb / cb))
        del ga, gb
        return pairs

    def _replay_s(self, graph) -> float:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3

    def _capture(self, fn, copies: int):
        """(graph, calls): ``fn`` warmed up, then ~``graph_ms`` of calls cycling over the copies in one
        CUDA graph, replayed once."""
        for i in range(copies):  # warm-up: first-call setup, cuBLAS heuristics, allocator
            fn(i)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for i in range(copies):
            fn(i)
        e1.record()
        e1.synchronize()
        est_ms = max(e0.elapsed_time(e1) / copies, 1e-4)
        calls = min(self.max_calls, max(copies, math.ceil(self.graph_ms / est_ms)))
        calls = max(copies, calls - calls % copies)  # whole cycles over the copies
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(min(copies, 3)):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(calls):
                fn(j % copies)
        graph.replay()
        torch.cuda.synchronize()
        return graph, calls

    def _cpu(self, fn, copies: int) -> tuple[float, int]:
        fn(0)
        return _median_us([self._cpu_once(fn, copies) for _ in range(self.replays)]), copies

    @staticmethod
    def _cpu_once(fn, copies: int) -> float:
        t0 = time.perf_counter()
        for i in range(copies):
            fn(i)
        return (time.perf_counter() - t0) / copies


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written.

    The ceiling the kernels are scored against, so it must not be low: the best of
    ``copy_`` (cudaMemcpy) and an elementwise-kernel copy (``torch.add(src, 0,
    out=dst)``), at 1/4, 1/2 and 1 x ``nbytes``.
    """
    best = 0.0
    for size in (nbytes // 4, nbytes // 2, nbytes):
        n = size // 4
        src = torch.empty(n, dtype=torch.float32, device=device).normal_()
        dst = torch.empty_like(src)
        for fn in (lambda i: dst.copy_(src), lambda i: torch.add(src, 0, out=dst)):
            us, _ = timer(fn, 1)
            best = max(best, 2 * size / (us * 1e-6) / 1e9)
        del src, dst
    return best


def _tensors(impl: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """One linear's arguments for ``impl``: (x, w, b) for fp16, (x, w, unit scales, b) for w16,
    (x, q, scales, b) for the others."""
    from w8a16_ops import quantize_per_channel

    x = torch.randn(M, K, dtype=dtype, device=device)                  # [M, K]
    b = torch.randn(N, dtype=dtype, device=device) * 0.1               # [N]
    w = torch.randn(N, K, dtype=dtype, device=device) * K ** -0.5      # [N, K]
    if impl == "fp16":
        return x, w, b
    if impl == W16:
        return x, w, torch.ones(N, device=device), b
    q, s = quantize_per_channel(w)                                     # int8 [N, K], fp32 [N]
    del w
    return x, q, s if impl in ("w8a16", SPLIT) else s.to(dtype), b


def _single_call(impl: str, shape: Shape):
    """``f(tensors)``: one linear of ``shape`` as ``impl`` computes it."""
    if impl in ("w8a16", SPLIT, W16):
        op = torch.ops.w8a16.linear_gelu if shape.gelu else torch.ops.w8a16.linear
        return lambda t: op(*t)
    act = F.gelu if shape.gelu else (lambda y: y)
    if impl == "fp16":
        return lambda t: act(F.linear(*t))

    def dequant(t):
        x, q, s, b = t
        return act(F.linear(x, q.to(x.dtype)) * s + b)
    return dequant


def _contender(impl: str, shape: Shape | FusedShape, M: int, dtype: torch.dtype, device: torch.device,
               copies: int):
    """``fn(i)`` for ``copies`` independent sets of tensors of one contender."""
    sets = [tuple(_tensors(impl, M, p.N, p.K, dtype, device) for p in shape.parts) for _ in range(copies)]
    if isinstance(shape, Shape):
        f = _single_call(impl, shape)
        return lambda i: f(sets[i][0])
    if impl in ("w8a16", W16):  # the fused op
        if shape.summed:
            return lambda i: torch.ops.w8a16.linear_sum(*sets[i][0], *sets[i][1])
        g1, g2 = shape.first.gelu, shape.second.gelu
        return lambda i: torch.ops.w8a16.linear_pair(*sets[i][0], *sets[i][1], g1, g2)
    f1, f2 = _single_call(impl, shape.first), _single_call(impl, shape.second)
    if shape.summed:
        return lambda i: f1(sets[i][0]) + f2(sets[i][1])
    return lambda i: (f1(sets[i][0]), f2(sets[i][1]))


def copies_for(nbytes: int, l2_bytes: int, l2_factor: float, device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return max(2, min(512, math.ceil(l2_factor * l2_bytes / nbytes)))


def run_cases(shapes: list[Shape | FusedShape], ms: list[int], dtype: torch.dtype, device: torch.device, timer: Timer,
              copy_gb_s: float, l2_bytes: int, l2_factor: float, progress: bool = True,
              w16: bool = False) -> list[dict]:
    """Time every contender of every (shape, M); ``w16`` adds the 16-bit-weight contender."""
    from tqdm.auto import tqdm

    act_bytes = torch.finfo(dtype).bits // 8
    rows = []
    cases = [(s, m) for s in shapes for m in ms]
    for shape, M in tqdm(cases, desc="kernels", disable=not progress, leave=False):
        times = {}
        impls = shape.impls + ([W16] if w16 else [])
        for impl in impls:
            nbytes = shape_bytes(shape, impl, M, act_bytes)
            copies = copies_for(nbytes, l2_bytes, l2_factor, device)
            fn = _contender(impl, shape, M, dtype, device, copies)
            us, calls = timer(fn, copies)
            del fn
            times[impl] = us
            flops = 2 * M * sum(p.N * p.K for p in shape.parts)
            gb_s = nbytes / (us * 1e-6) / 1e9
            rows.append(dict(shape=shape.name, op=shape.op, M=M, N=shape.N, K=shape.K, N_parts=shape.N_parts,
                             K_parts=shape.K_parts, impl=impl, us=us, gb_s=gb_s, pct_copy_bw=100 * gb_s / copy_gb_s,
                             tflops=flops / (us * 1e-6) / 1e12, bytes=nbytes, copies=copies, calls_per_graph=calls))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for r in rows[-len(impls):]:
            r["speedup_vs_fp16"] = times["fp16"] / r["us"]
    return rows


def gelu_pairs(ms: list[int], dtype: torch.dtype, device: torch.device, timer: Timer, l2_bytes: int,
               l2_factor: float, progress: bool = True, ops=None) -> list[dict]:
    """``linear_gelu`` against ``linear`` on mlp_up, per M: the same tensors, the two ops' graphs
    replayed in interleaved pairs (``Timer.paired``). ``extra_pct`` is the median over the pairs of
    100 * (gelu time / linear time - 1)."""
    from tqdm.auto import tqdm

    linear, linear_gelu = ops or (torch.ops.w8a16.linear, torch.ops.w8a16.linear_gelu)
    shape = _BY_NAME["mlp_up"]
    act_bytes = torch.finfo(dtype).bits // 8
    out = []
    for M in tqdm(ms, desc="linear_gelu vs linear", disable=not progress, leave=False):
        copies = copies_for(shape_bytes(shape, "w8a16", M, act_bytes), l2_bytes, l2_factor, device)
        sets = [_tensors("w8a16", M, shape.N, shape.K, dtype, device) for _ in range(copies)]
        pairs = timer.paired(lambda i: linear(*sets[i]), lambda i: linear_gelu(*sets[i]), copies)
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.append(dict(M=M, linear_us=_median_us([a for a, _ in pairs]), gelu_us=_median_us([b for _, b in pairs]),
                        extra_pct=100 * (statistics.median(b / a for a, b in pairs) - 1), pairs=len(pairs)))
    return out


def _gbs(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2f}"


def kernel_table(rows: list[dict]) -> str:
    cells = [[r["shape"], r["M"], r.get("N_parts", r["N"]), r.get("K_parts", r["K"]), r["impl"],
              f"{r['us']:.2f}", _gbs(r["gb_s"]), f"{r['pct_copy_bw']:.1f}", f"{r['tflops']:.2f}",
              f"{r['speedup_vs_fp16']:.2f}x"] for r in rows]
    return tabulate(cells, headers=["shape", "M", "N", "K", "impl", "µs", "GB/s", "% copy BW", "TFLOP/s",
                                    "vs fp16"], tablefmt="github", disable_numparse=True)


def bar_summary(rows: list[dict], gelu: list[dict] | None = None) -> list[str]:
    """Issue 2's bars, read off the rows of the single-linear SHAPES (informative; nothing is asserted).

    The GeLU bar reads the interleaved pairs of ``gelu_pairs`` for the M they cover (the table's
    figure is quoted beside it), else the two table rows."""
    names = {s.name for s in SHAPES}
    ours = {(r["shape"], r["M"]): r for r in rows if r["impl"] == "w8a16" and r["shape"] in names}
    out = []

    def check(desc, cases, value, target, fmt):
        cases = [c for c in cases if c in ours]
        if not cases:
            return
        worst = min(cases, key=lambda c: value(ours[c]))
        v = value(ours[worst])
        out.append(f"{'PASS' if v >= target else 'MISS'}  {desc}: worst {fmt(v)} at {worst[0]} M={worst[1]} "
                   f"(bar {fmt(target)})")

    big = ["mlp_up", "mlp_up_gelu", "mlp_down", "lm_head"]
    small = ["qkv", "attn_out"]
    dec = [1, 2, 4, 8]
    pct = lambda v: f"{v:.1f}%"  # noqa: E731
    x = lambda v: f"{v:.2f}x"  # noqa: E731
    check("M 1-8, MLP + LM head, % copy BW", [(s, m) for s in big for m in dec], lambda r: r["pct_copy_bw"], 80, pct)
    check("M 1-8, qkv + attn_out, % copy BW", [(s, m) for s in small for m in dec], lambda r: r["pct_copy_bw"], 60,
          pct)
    check("M 1-8, every shape, speed-up vs fp16", [(s, m) for s in big + small for m in dec],
          lambda r: r["speedup_vs_fp16"], 1.7, x)
    check("M 16, MLP + LM head, speed-up vs fp16", [(s, 16) for s in big], lambda r: r["speedup_vs_fp16"], 1.5, x)
    check("M 2048, every shape, speed vs fp16", [(s, 2048) for s in big + small], lambda r: r["speedup_vs_fp16"],
          0.6, x)
    paired = {p["M"]: p for p in gelu or []}
    for m in sorted({r["M"] for r in rows} | set(paired)):
        a, g = ours.get(("mlp_up", m)), ours.get(("mlp_up_gelu", m))
        table = 100 * (g["us"] / a["us"] - 1) if a and g else None
        if m in paired:
            p = paired[m]
            extra = p["extra_pct"]
            how = f" (median of {p['pairs']} interleaved replay pairs" + (
                f"; table rows {table:+.1f}%)" if table is not None else ")")
        elif table is not None:
            extra, how = table, ""
        else:
            continue
        out.append(f"{'PASS' if extra <= 3 else 'MISS'}  linear_gelu vs linear, mlp_up M={m}: "
                   f"{extra:+.1f}% time{how} (bar <= +3%)")
    return out


def fused_summary(rows: list[dict], ms: tuple[int, ...] = (1, 16)) -> list[str]:
    """For M in ``ms``: each fused op's time against its two separate W8A16 calls (info; no bar)."""
    by = {(r["shape"], r["M"], r["impl"]): r for r in rows}
    out = []
    for s in FUSED_SHAPES:
        for m in ms:
            fused, split = by.get((s.name, m, "w8a16")), by.get((s.name, m, SPLIT))
            if fused and split:
                out.append(f"info  {s.name} ({s.op}: {s.first.name} + {s.second.name}) M={m}: fused "
                           f"{fused['us']:.2f} µs vs {split['us']:.2f} µs for the two separate w8a16 calls "
                           f"({split['us'] / fused['us']:.2f}x, {fused['us'] - split['us']:+.2f} µs)")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench kernels", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--dtype", choices=list(_DTYPES), default="float16", help="activation dtype")
    p.add_argument("--m", default=None, help=f"comma-separated M values (default {','.join(map(str, M_VALUES))})")
    p.add_argument("--shapes", default=None, help=f"comma-separated shapes: {', '.join(s.name for s in ALL_SHAPES)}")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer cases and replays: M in {QUICK_M}, 3 replays")
    p.add_argument("--replays", type=int, default=7, help="graph replays per case (median taken)")
    p.add_argument("--l2_factor", type=float, default=4.0, help="working set per contender, in multiples of L2")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (a smoke test: no graphs, no meaning)")
    p.add_argument("--w16", action="store_true",
                   help="also time the ops with 16-bit weights (impl 'w16': the FP16 decode path of "
                        "Decoder(fuse16=True))")
    p.add_argument("--dry_run", action="store_true", help="list the cases and their byte counts, time nothing")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows and the header as JSON")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    return p


def _int_list(parser, flag, text) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated positive integers, got {text!r}")
    if not values or min(values) <= 0:
        parser.error(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    a = parser.parse_args(argv)
    a.ms = _int_list(parser, "--m", a.m) if a.m else (QUICK_M if a.quick else M_VALUES)
    names = {s.name: s for s in ALL_SHAPES}
    if a.shapes:
        unknown = [n for n in a.shapes.split(",") if n.strip() not in names]
        if unknown:
            parser.error(f"--shapes: unknown shape(s) {unknown}; expected {', '.join(names)}")
        a.shape_list = [names[n.strip()] for n in a.shapes.split(",")]
    else:
        a.shape_list = list(ALL_SHAPES)
    if a.quick and a.replays == 7:
        a.replays = 3
    if a.replays < 1:
        parser.error(f"--replays: must be >= 1, got {a.replays}")
    if a.l2_factor <= 0:
        parser.error(f"--l2_factor: must be > 0, got {a.l2_factor}")
    if not a.dry_run:
        if a.device is None and not torch.cuda.is_available():
            parser.error("no CUDA GPU found: the kernel benchmark times GPU kernels; use --device cpu for a "
                         "smoke test of the benchmark itself, or --dry_run to list the cases")
        try:
            a.device = env.resolve_device(a.device)
        except ValueError as e:
            parser.error(str(e))
    if a.json:
        from pathlib import Path
        if not Path(a.json).expanduser().resolve().parent.is_dir():
            parser.error(f"--json {a.json}: directory does not exist")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    dtype = _DTYPES[a.dtype]
    act_bytes = torch.finfo(dtype).bits // 8
    fused = any(isinstance(s, FusedShape) for s in a.shape_list)
    if a.dry_run:
        impls = (FUSED_IMPLS if fused else IMPLS) + ([W16] if a.w16 else [])
        cells = [[s.name, s.op, M, s.N_parts, s.K_parts]
                 + [shape_bytes(s, i, M, act_bytes) if i in s.impls or i == W16 else "-" for i in impls]
                 for s in a.shape_list for M in a.ms]
        n_fused = len(a.ms) * sum(isinstance(s, FusedShape) for s in a.shape_list)
        n_single = len(cells) - n_fused
        ni, nf = len(IMPLS) + a.w16, len(FUSED_IMPLS) + a.w16
        parts = ([f"{n_single} cases x {ni} contenders"] if n_single else []) + (
            [f"{n_fused} fused cases x {nf} contenders"] if n_fused else [])
        what = " + ".join(parts)
        if n_single and n_fused:
            what += f" ({n_single * ni + n_fused * nf} timings)"
        print(f"# python -m bench kernels --dry_run: {what}, dtype {a.dtype}")
        print(tabulate(cells, headers=["shape", "op", "M", "N", "K"] + [f"bytes {i}" for i in impls],
                       tablefmt="github"))
        if fused:
            print(FUSED_NOTE)
        return 0
    device = a.device
    import w8a16_ops  # noqa: F401  (registers the ops; builds the CUDA kernels on first use)

    command = env.command_line("kernels", argv)
    info = env.environment(device, command)
    print(env.format_header("python -m bench kernels: W8A16 linear vs torch", info), flush=True)
    if device.type == "cpu":
        print("!!! CPU run: the ops run their fp32 pure-torch reference and nothing is graph-captured; "
              "the figures below are a smoke test of the benchmark, not kernel speeds.")
    timer = Timer(device, a.replays)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    copy_gb_s = copy_bandwidth(device, timer, (1 << 30) if device.type == "cuda" else (1 << 26))
    print(f"{'copy bandwidth':>18}: {copy_gb_s:.0f} GB/s (device-to-device copy, read + write, measured now)")
    print(f"{'timing':>18}: median of {a.replays} CUDA-graph replays, working set >= {a.l2_factor:g} x L2 "
          f"({l2 / 2**20:.0f} MB) per contender; dtype {a.dtype}" if device.type == "cuda" else
          f"{'timing':>18}: CPU loop, median of {a.replays}")
    rows = run_cases(a.shape_list, a.ms, dtype, device, timer, copy_gb_s, l2, a.l2_factor, not a.no_progress,
                     w16=a.w16)
    print(kernel_table(rows))
    if fused:
        print(FUSED_NOTE)
    names = {s.name for s in a.shape_list}
    gelu = (gelu_pairs(a.ms, dtype, device, timer, l2, a.l2_factor, not a.no_progress)
            if device.type == "cuda" and {"mlp_up", "mlp_up_gelu"} <= names else [])
    summary = bar_summary(rows, gelu) if device.type == "cuda" else []
    if summary:
        print("\nIssue 2 bars (from the rows above; w8a16 only, single-linear shapes):")
        for line in summary:
            print("  " + line)
    fused_info = fused_summary(rows) if device.type == "cuda" else []
    if fused_info:
        print("\nFused layer ops (informative, no bar):")
        for line in fused_info:
            print("  " + line)
    if a.json:
        report.write_json(a.json, {"environment": info, "copy_gb_s": copy_gb_s, "l2_bytes": l2,
                                   "dtype": a.dtype, "replays": a.replays, "l2_factor": a.l2_factor,
                                   "rows": rows, "gelu_pairs": gelu, "bars": summary, "fused_info": fused_info})
        print(f"JSON written to {a.json}")
    return 0
