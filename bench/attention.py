"""Decode-attention kernel benchmark: ``torch.ops.w8a16.decode_attention`` against PyTorch.

Every case is one decode step of attention at Pythia-2.8B head shapes (H = 32, D = 80):
a single query per (b, h) over ``S`` cached tokens, optionally adding the probabilities
into H2O's ``scores``. Calls are captured in a CUDA graph and timed with CUDA events
(median over replays). Small cases rotate over several copies of the cache so that the
numbers are HBM numbers, not L2 ones.

Bytes counted per call: K and V of the valid slots, q and out, and (with scores) one
read and one write of the valid part of ``scores``. ``% copy`` compares that with a
device-to-device copy measured in the same run (bytes read + written).

Peers, in the same run and the same graphs:
* without scores: ``F.scaled_dot_product_attention`` over the valid slice;
* with scores: the plain PyTorch path (matmul, fp32 softmax, ``scores.add_``, matmul).

Run: ``python -m bench.attention [--iters N] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys

import torch
import torch.nn.functional as F

DEFAULT_CASES = [
    dict(B=B, H=32, D=80, S=S, scores=scores)
    for B in (1, 16)
    for S in (504, 2176)
    for scores in (False, True)
]
_ROTATE_BYTES = 256 << 20  # touch at least this much per graph replay (several times the L2)
_MAX_SETS = 32
_MIN_CALLS = 8             # calls per captured graph, so that the launch of the replay is amortised


def _graph_time_per_call(calls, iters: int, warmup: int = 5) -> float:
    """Median seconds per call of ``calls`` (a list of thunks) captured back to back in one graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up: lazy init, one-time kernel setup
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(warmup):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    del graph
    return ms * 1e-3 / len(calls)


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = _graph_time_per_call([lambda: dst.copy_(src)], iters)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / t


def _case_bytes(B, H, D, S, scores, elem) -> dict:
    kv = 2 * B * H * S * D * elem
    io = 2 * B * H * D * elem
    sc = 2 * B * H * S * 4 if scores else 0
    return dict(kv=kv, total=kv + io + sc)


def _bench_case(case: dict, iters: int, copy_bw: float) -> dict:
    B, H, D, S = case["B"], case["H"], case["D"], case["S"]
    S_cache = case.get("S_cache", S)
    with_scores = bool(case.get("scores", False))
    dtype = getattr(torch, case.get("dtype", "float16"))
    elem = torch.tensor([], dtype=dtype).element_size()
    scale = D ** -0.5
    nbytes = _case_bytes(B, H, D, S, with_scores, elem)
    n_sets = max(1, min(_MAX_SETS, math.ceil(_ROTATE_BYTES / nbytes["total"])))

    sets = []
    for _ in range(n_sets):
        sets.append(dict(
            q=torch.randn(B, H, D, device="cuda").to(dtype),
            k=torch.randn(B, H, S_cache, D, device="cuda").to(dtype),
            v=torch.randn(B, H, S_cache, D, device="cuda").to(dtype),
            scores=torch.rand(B, H, S_cache, device="cuda") if with_scores else None,
        ))
    length = torch.full((B,), S, dtype=torch.int32, device="cuda")
    op = torch.ops.w8a16.decode_attention

    def ours(t):
        return lambda: op(t["q"], t["k"], t["v"], length, scale, t["scores"])

    def sdpa(t):
        q4 = t["q"][:, :, None, :]  # [B, H, 1, D]
        k, v = t["k"][:, :, :S], t["v"][:, :, :S]
        return lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale)

    def torch_scores(t):
        q4 = t["q"][:, :, None, :]
        k, v, sc = t["k"][:, :, :S], t["v"][:, :, :S], t["scores"]

        def fn():
            p = torch.softmax((q4 @ k.transpose(-1, -2)).float() * scale, dim=-1)  # [B, H, 1, S]
            sc[:, :, :S].add_(p[:, :, 0])
            return p.to(dtype) @ v
        return fn

    reps = max(1, math.ceil(_MIN_CALLS / n_sets))
    t_ours = _graph_time_per_call([ours(t) for t in sets] * reps, iters)
    peer_name = "torch matmul+softmax" if with_scores else "torch SDPA"
    peer = torch_scores if with_scores else sdpa
    t_peer = _graph_time_per_call([peer(t) for t in sets] * reps, iters)
    del sets
    torch.cuda.empty_cache()

    gbs = nbytes["total"] / t_ours / 1e9
    return dict(
        B=B, H=H, D=D, S=S, S_cache=S_cache, scores=with_scores, dtype=str(dtype).replace("torch.", ""),
        us=t_ours * 1e6, GBps=gbs, kv_GBps=nbytes["kv"] / t_ours / 1e9,
        pct_copy=100 * gbs * 1e9 / copy_bw, bytes=nbytes["total"], cache_sets=n_sets,
        peer=peer_name, peer_us=t_peer * 1e6, speedup=t_peer / t_ours,
    )


def run_attention_bench(cases: list[dict] | None = None, iters: int = 100,
                        json_path: str | None = None) -> list[dict]:
    """Times the decode-attention op per case and prints a table; returns one dict per case.

    Args:
        cases: dicts with B, H, D, S (valid cached tokens), scores (bool), and optionally
            S_cache (slots in the cache, default S) and dtype ("float16" | "bfloat16").
            Default: B in {1, 16}, H = 32, D = 80, S in {504, 2176}, scores off / on.
        iters: timed graph replays per measurement (the median is reported).
        json_path: also write the environment, the copy bandwidth and the rows there.
    """
    from tabulate import tabulate

    import w8a16_ops

    from .env import environment, format_header

    if not torch.cuda.is_available() or not w8a16_ops.extension_loaded():
        print("bench attention: needs a CUDA GPU with the w8a16 kernels built; nothing to time.")
        return []
    device = torch.device("cuda", torch.cuda.current_device())
    info = environment(device, " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1]] + sys.argv))
    print(format_header("decode attention (torch.ops.w8a16.decode_attention)", info))

    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)\n")
    rows = [_bench_case(c, iters, copy_bw) for c in (cases or DEFAULT_CASES)]

    table = [[r["B"], r["H"], r["D"], r["S"], "on" if r["scores"] else "off", f"{r['us']:.1f}",
              f"{r['GBps']:.0f}", f"{r['kv_GBps']:.0f}", f"{r['pct_copy']:.0f}%",
              r["peer"], f"{r['peer_us']:.1f}", f"{r['speedup']:.2f}x"] for r in rows]
    print(tabulate(table, headers=["B", "H", "D", "S", "scores", "µs", "GB/s", "K+V GB/s", "% copy",
                                   "peer", "peer µs", "vs peer"], disable_numparse=True))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(env=info, copy_GBps=copy_bw / 1e9, rows=rows), f, indent=2)
        print(f"\nwrote {json_path}")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=100, help="timed graph replays per case (median)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    run_attention_bench(iters=args.iters, json_path=args.json)


if __name__ == "__main__":
    main()
