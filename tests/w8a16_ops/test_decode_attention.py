"""Tests of torch.ops.w8a16.decode_attention: the CPU reference, argument checks, and the
CUDA kernel (csrc/decode_attention.cu) against an independent fp64 formula."""
from __future__ import annotations

import re

import pytest
import torch

from attention_check import check_out

import w8a16_ops  # noqa: F401  (registers the ops; builds the CUDA kernels on a GPU machine)
from w8a16_ops import reference

OP = torch.ops.w8a16.decode_attention
NAME = "w8a16.decode_attention"


def _oracle(q, k, v, length, scale):
    """Independent fp64 formula: for every row b, softmax over the first length[b] slots only.

    Returns (out [B, H, D] float64, probs [B, H, S] float64 with zeros past length[b]).
    """
    B, H, S, D = k.shape
    out = torch.zeros(B, H, D, dtype=torch.float64, device=q.device)
    probs = torch.zeros(B, H, S, dtype=torch.float64, device=q.device)
    for b, n in enumerate(length.tolist()):
        logits = torch.einsum("hd,hsd->hs", q[b].double(), k[b, :, :n].double()) * scale  # [H, n]
        w = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        p = w / w.sum(dim=-1, keepdim=True)
        probs[b, :, :n] = p
        out[b] = torch.einsum("hs,hsd->hd", p, v[b, :, :n].double())
    return out, probs


def _lengths(B: int, S: int, device) -> torch.Tensor:
    """Per-row lengths in [1, S]: row 0 full, the last row (B > 1) a single slot, others random."""
    g = torch.Generator().manual_seed(1000 * B + S)
    n = torch.randint(1, S + 1, (B,), generator=g)
    if B == 1:
        n[0] = max(1, S - 3)
    else:
        n[0] = S
        n[-1] = 1
    return n.to(torch.int32).to(device)


def _inputs(B, H, S, D, dtype, device, poison_tail=False):
    q = torch.randn(B, H, D, device=device).to(dtype)
    k = torch.randn(B, H, S, D, device=device).to(dtype)
    v = torch.randn(B, H, S, D, device=device).to(dtype)
    length = _lengths(B, S, device)
    if poison_tail:
        # Slots past length must not influence anything (and need not be read at all).
        for b, n in enumerate(length.tolist()):
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("nan")
    return q, k, v, length


def _check_scores(new, old, probs, length):
    """new = old + probs on valid slots (fp32 tolerance), bit-identical past length."""
    S = new.shape[-1]
    valid = torch.arange(S, device=new.device)[None, :] < length.long()[:, None]  # [B, S]
    valid = valid[:, None, :].expand_as(new)
    torch.testing.assert_close(new[valid].double(), old[valid].double() + probs[valid],
                               atol=1e-5, rtol=1e-4)
    assert torch.equal(new[~valid], old[~valid]), "scores changed past length"


# ---------------------------------------------------------------------------------------
# CPU: the reference implementation and the argument checks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,S,D", [(1, 1, 1, 8), (3, 4, 7, 16), (2, 3, 33, 80)])
def test_cpu_matches_fp64_formula(B, H, S, D, dtype):
    q, k, v, length = _inputs(B, H, S, D, dtype, "cpu")
    scale = D ** -0.5
    o64, p64 = _oracle(q, k, v, length, scale)
    scores = torch.rand(B, H, S)
    old = scores.clone()
    out = OP(q, k, v, length, scale, scores)
    assert out.dtype == dtype and out.shape == (B, H, D)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), o64, atol=tol, rtol=tol)
    _check_scores(scores, old, p64, length)


def test_cpu_scores_accumulate_probabilities():
    B, H, S, D = 3, 2, 9, 16
    q, k, v, length = _inputs(B, H, S, D, torch.float32, "cpu")
    scores = torch.rand(B, H, S)
    old = scores.clone()
    OP(q, k, v, length, 0.3, scores)
    OP(q, k, v, length, 0.3, scores)
    _, p64 = _oracle(q, k, v, length, 0.3)
    _check_scores(scores, old, 2 * p64, length)
    # Each call adds one full distribution per (b, h).
    torch.testing.assert_close((scores - old).sum(-1).double(), torch.full((B, H), 2.0, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_cpu_ignores_slots_past_length():
    B, H, S, D = 2, 3, 12, 8
    q, k, v, length = _inputs(B, H, S, D, torch.float32, "cpu")
    length = torch.tensor([5, 12], dtype=torch.int32)
    out = OP(q, k, v, length, 0.5)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 5:] = 1e4 * torch.randn_like(k2[0, :, 5:])
    v2[0, :, 5:] = 1e4 * torch.randn_like(v2[0, :, 5:])
    assert torch.equal(OP(q, k2, v2, length, 0.5), out)
    assert not torch.equal(OP(q, k2, v2, torch.tensor([6, 12], dtype=torch.int32), 0.5), out)


@pytest.mark.parametrize("with_scores", [False, True])
def test_cpu_opcheck(with_scores):
    B, H, S, D = 2, 3, 10, 16
    q, k, v, length = _inputs(B, H, S, D, torch.float32, "cpu")
    scores = torch.rand(B, H, S) if with_scores else None
    torch.library.opcheck(OP, (q, k, v, length, D ** -0.5, scores))


def _bad_cases():
    B, H, S, D = 2, 3, 5, 8

    def base():
        return dict(q=torch.randn(B, H, D), k=torch.randn(B, H, S, D), v=torch.randn(B, H, S, D),
                    length=torch.full((B,), S, dtype=torch.int32), scores=torch.zeros(B, H, S))

    cases = []

    def case(msg, **override):
        args = base()
        args.update(override)
        cases.append(pytest.param(args, msg, id=msg[:40]))

    case("q must be float16, bfloat16 or float32, got int32", q=torch.ones(B, H, D, dtype=torch.int32))
    case("q must have shape [B, H, D], got float32 [2, 3]", q=torch.randn(B, H))
    case("k_cache must be float32 of shape [2, 3, S, 8], got float16 [2, 3, 5, 8]",
         k=torch.randn(B, H, S, D).half())
    case("k_cache must be float32 of shape [2, 3, S, 8], got float32 [2, 4, 5, 8]",
         k=torch.randn(B, 4, S, D))
    case("k_cache must be contiguous, got strides [120, 40, 1, 5]",
         k=torch.randn(B, H, D, S).transpose(2, 3))
    case("v_cache must be float32 of shape [2, 3, S, 8], got float32 [2, 3, 5, 16]",
         v=torch.randn(B, H, S, 16))
    case("v_cache must have S=5 slots like k_cache, got float32 [2, 3, 6, 8]", v=torch.randn(B, H, 6, D))
    case("length must be int32 of shape [2], got int64 [2]", length=torch.full((B,), S))
    case("length must be int32 of shape [2], got int32 [3]", length=torch.full((3,), S, dtype=torch.int32))
    case("scores must be float32 of shape [2, 3, 5], got float16 [2, 3, 5]",
         scores=torch.zeros(B, H, S, dtype=torch.float16))
    case("scores must be float32 of shape [2, 3, 5], got float32 [2, 3, 6]", scores=torch.zeros(B, H, 6))
    case("scores must be contiguous, got strides [1, 2, 6]", scores=torch.zeros(S, H, B).permute(2, 1, 0))
    return cases


@pytest.mark.parametrize("args,msg", _bad_cases())
def test_bad_inputs_raise(args, msg):
    with pytest.raises(RuntimeError, match=re.escape(f"{NAME}: {msg}")):
        OP(args["q"], args["k"], args["v"], args["length"], 0.5, args["scores"])


@pytest.mark.parametrize("args,msg", _bad_cases()[:3])
def test_fake_kernel_raises_the_same(args, msg):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(t) for n, t in args.items()}
        with pytest.raises(RuntimeError, match=re.escape(f"{NAME}: {msg}")):
            OP(fake["q"], fake["k"], fake["v"], fake["length"], 0.5, fake["scores"])


# ---------------------------------------------------------------------------------------
# CUDA kernel


def _poison_allocator(*nbytes: int) -> None:
    """Fill soon-to-be-reused cached blocks with 0xFF (NaN in fp16, bf16 and fp32), so that an
    output element or workspace word the kernel forgets to write shows up as NaN."""
    bufs = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in nbytes]
    del bufs


def _run_and_check(B, H, S, D, dtype, with_scores, poison_tail=True, q_k_v_length=None):
    q, k, v, length = q_k_v_length or _inputs(B, H, S, D, dtype, "cuda", poison_tail=poison_tail)
    scale = D ** -0.5
    o64, p64 = _oracle(q, k, v, length, scale)
    clean_k = torch.where(torch.isnan(k), 0, k)
    clean_v = torch.where(torch.isnan(v), 0, v)
    ref32 = reference.decode_attention(q, clean_k, clean_v, length, scale)
    scores = torch.rand(B, H, S, device="cuda") if with_scores else None
    old = scores.clone() if with_scores else None
    _poison_allocator(B * H * D * 2, B * H * S * 8 + (1 << 20), 64 << 20)
    out = OP(q, k, v, length, scale, scores)
    torch.cuda.synchronize()
    check_out(out, ref32, o64, dtype)
    if with_scores:
        _check_scores(scores, old, p64, length)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("with_scores", [False, True], ids=["out", "scores"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("S", [1, 7, 504, 2177])
@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("D", [32, 64, 80, 128, 256])
def test_cuda_matches_reference(D, B, S, dtype, with_scores):
    # Few (b, h) pairs: S is split across blocks and merged by the combine kernel.
    _run_and_check(B, 4, S, D, dtype, with_scores)


@pytest.mark.cuda
@pytest.mark.parametrize("with_scores", [False, True], ids=["out", "scores"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 256])
def test_cuda_one_block_per_row(D, dtype, with_scores):
    # B*H = 1280 pairs: more than half the resident blocks of any config on a 132-SM H100
    # (at most 12 * 132 = 1584), so one split per (b, h) and no combine kernel.
    _run_and_check(40, 32, 300, D, dtype, with_scores)


@pytest.mark.cuda
@pytest.mark.parametrize("with_scores", [False, True], ids=["out", "scores"])
@pytest.mark.parametrize("S", [505, 2177])
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_pythia_shapes(B, S, with_scores):
    _run_and_check(B, 32, S, 80, torch.float16, with_scores)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [8, 40, 48, 112, 200, 248])
def test_cuda_other_head_dims(D, dtype):
    # Head dims without a specialised kernel run the runtime-VEC one.
    _run_and_check(3, 4, 300, D, dtype, True)
    _run_and_check(40, 32, 70, D, dtype, True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("B,H", [(2, 4), (40, 32)])
def test_cuda_misaligned_views(B, H, D, dtype):
    # Contiguous views at an odd element offset: not 16-byte aligned, element-wise fallback.
    S = 131

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view

    q, k, v, length = _inputs(B, H, S, D, dtype, "cuda", poison_tail=True)
    _run_and_check(B, H, S, D, dtype, True, q_k_v_length=(shifted(q), shifted(k), shifted(v), length))


@pytest.mark.cuda
@pytest.mark.parametrize("B,H,S", [(1, 32, 2177), (16, 32, 505)])
def test_cuda_deterministic(B, H, S):
    # No atomics and no races: the same inputs give bit-identical results, run after run.
    q, k, v, length = _inputs(B, H, S, 80, torch.float16, "cuda")
    base = torch.rand(B, H, S, device="cuda")
    scores = [base.clone() for _ in range(3)]
    outs = [OP(q, k, v, length, 0.1, s) for s in scores]
    for o, s in zip(outs[1:], scores[1:]):
        assert torch.equal(o, outs[0]) and torch.equal(s, scores[0])


@pytest.mark.cuda
@pytest.mark.parametrize("with_scores", [False, True])
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_opcheck(B, with_scores):
    H, S, D = 32, 77, 80
    q, k, v, length = _inputs(B, H, S, D, torch.float16, "cuda")
    scores = torch.rand(B, H, S, device="cuda") if with_scores else None
    torch.library.opcheck(OP, (q, k, v, length, D ** -0.5, scores))


@pytest.mark.cuda
def test_cuda_bad_inputs_raise():
    q, k, v, length = _inputs(2, 3, 5, 16, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match=re.escape(f"{NAME}: q must be float16 or bfloat16, got float32")):
        OP(q.float(), k.float(), v.float(), length, 0.5)
    for D in (12, 264):
        q, k, v, length = _inputs(2, 3, 5, D, torch.float16, "cuda")
        msg = f"{NAME}: head_dim D must be a multiple of 8 and at most 256 on CUDA, got D={D}"
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            OP(q, k, v, length, 0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_compile_fullgraph_matches_eager(B):
    H, S, D = 32, 300, 80
    q, k, v, length = _inputs(B, H, S, D, torch.bfloat16, "cuda")

    def f(q, k, v, length, scores):
        return OP(q, k, v, length, D ** -0.5, scores) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    s_eager = torch.rand(B, H, S, device="cuda")
    s_comp = s_eager.clone()
    out_eager = f(q, k, v, length, s_eager)
    out_comp = compiled(q, k, v, length, s_comp)
    assert torch.equal(out_comp, out_eager)
    assert torch.equal(s_comp, s_eager)
    assert torch.equal(compiled(q, k, v, length, None), f(q, k, v, length, None))


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_graph_replay_reads_new_length(B):
    H, S, D = 32, 600, 80
    scale = D ** -0.5
    q, k, v, _ = _inputs(B, H, S, D, torch.float16, "cuda")
    length = torch.full((B,), 100, dtype=torch.int32, device="cuda")
    scores = torch.rand(B, H, S, device="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (one-time host setup) outside the capture
        OP(q, k, v, length, scale, scores.clone())
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP(q, k, v, length, scale, scores)

    g = torch.Generator().manual_seed(7)
    for step in range(4):
        new_len = torch.randint(1, S + 1, (B,), generator=g).to(torch.int32)
        if step == 3:
            new_len.fill_(S)
        length.copy_(new_len)
        q.copy_(torch.randn_like(q, dtype=torch.float32).to(q.dtype))
        old = scores.clone()
        graph.replay()
        torch.cuda.synchronize()
        o64, p64 = _oracle(q, k, v, length, scale)
        ref32 = reference.decode_attention(q, k, v, length, scale)
        check_out(out, ref32, o64, torch.float16)
        _check_scores(scores, old, p64, length)


def _recorded_cudagraphs() -> int:
    """Number of CUDA graphs recorded by inductor's cudagraph trees on the current device."""
    from torch._inductor import cudagraph_trees

    mgr = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    if mgr is None or mgr.roots is None:
        return 0

    def count(nodes):
        return sum(1 + sum(count(c) for c in n.children.values()) for n in nodes)

    return sum(count(nodes) for nodes in mgr.roots.values())


def _reduce_overhead_run(static_scores: bool) -> int:
    """Runs a reduce-overhead compiled step that mutates `scores`; checks every step's result.
    Returns the number of 'skipping cudagraphs' events inductor reported."""
    from torch._dynamo.utils import counters

    B, H, S, D = 2, 32, 333, 80
    scale = D ** -0.5
    _, k, v, _ = _inputs(B, H, S, D, torch.float16, "cuda")
    length = torch.tensor([200, 333], dtype=torch.int32, device="cuda")
    scores = torch.rand(B, H, S, device="cuda")
    if static_scores:
        for t in (k, v, length, scores):
            torch._dynamo.mark_static_address(t)

    def step(q, k, v, length, scores):
        return OP(q, k, v, length, scale, scores).float() * 3

    torch._dynamo.reset()
    counters.clear()
    graphs_before = _recorded_cudagraphs()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        q = torch.randn(B, H, D, device="cuda").half()
        old = scores.clone()
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(q, k, v, length, scores).clone()
        torch.cuda.synchronize()
        o64, p64 = _oracle(q, k, v, length, scale)
        torch.testing.assert_close(out.double(), 3 * o64, atol=1e-2, rtol=1e-2)
        _check_scores(scores, old, p64, length)
    skips = counters["inductor"]["cudagraph_skips"]
    if static_scores:
        assert _recorded_cudagraphs() > graphs_before, "no CUDA graph was recorded"
    return skips


@pytest.mark.cuda
def test_cuda_reduce_overhead_captures_a_graph():
    assert _reduce_overhead_run(static_scores=True) == 0, "inductor logged 'skipping cudagraphs'"


@pytest.mark.cuda
@pytest.mark.parametrize("scored", [False, True])
def test_cuda_expanded_length(scored):
    # The caches pass length as (seen + 1).expand(B): a stride-0 view. Every row must
    # see its own (identical) length, not memory past the single element.
    B, H, S, D = 5, 4, 64, 80
    q, k, v, _ = _inputs(B, H, S, D, torch.float16, "cuda")
    one = torch.tensor([37], dtype=torch.int32, device="cuda")
    expanded, dense = one.expand(B), one.repeat(B)
    s1 = torch.zeros(B, H, S, device="cuda") if scored else None
    s2 = torch.zeros(B, H, S, device="cuda") if scored else None
    torch.testing.assert_close(OP(q, k, v, expanded, D ** -0.5, s1), OP(q, k, v, dense, D ** -0.5, s2),
                               rtol=0, atol=0)
    if scored:
        assert torch.equal(s1, s2)
