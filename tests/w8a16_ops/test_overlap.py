"""overlap=True of w8a16.linear_pair, linear_sum and the cache_attention ops (programmatic
dependent launch): a scheduling hint that must never change a result.

With it the CUDA kernel may start before the kernel launched just before it has finished, and
reads its weights (linear_sum: also x2; the cache ops: the cache, pos, scores, seen and free)
early; everything else only after that kernel is done. The CUDA tests make the previous kernel
a long copy that writes the late-read inputs last, so a kernel that read them early would see
their old values. On GPUs older than sm_90 the flag is ignored and the tests still hold.

Without the flag a gemv launch on sm_90 is still a programmatic dependent launch, one that may
read nothing before its wait: the same kind of test checks that with the weights written last.
W8A16_PDL=0 turns every such launch into an ordinary one.
"""
from __future__ import annotations

import pytest
import torch

from linear_oracle import child_outputs, make_pair
from pdl_helpers import late_copies as _late

import w8a16_ops  # noqa: F401  (registers the ops; builds the CUDA kernels on a GPU machine)

PAIR, SUM = torch.ops.w8a16.linear_pair, torch.ops.w8a16.linear_sum
FULL, EVICT = torch.ops.w8a16.cache_attention_full, torch.ops.w8a16.cache_attention_evict
cuda = pytest.mark.cuda


# ----------------------------------------------------------------------------- CPU

def test_cpu_overlap_is_accepted_and_changes_nothing():
    pair = make_pair((3,), 48, 64, 32, 32, torch.bfloat16, "cpu")
    sum_ = make_pair((3,), 32, 64, 32, 96, torch.bfloat16, "cpu")
    for a, b in zip(PAIR(*pair, gelu2=True), PAIR(*pair, gelu2=True, overlap=True)):
        assert torch.equal(a, b)
    assert torch.equal(SUM(*sum_), SUM(*sum_, overlap=True))
    torch.library.opcheck(PAIR, pair, {"gelu2": True, "overlap": True})
    torch.library.opcheck(SUM, sum_, {"overlap": True})


def _cache_state(B, H, S, D, dtype, device, seen, budget=None, g=None):
    g = g or torch.Generator().manual_seed(0)
    q, kn, vn = (torch.randn(B, H, D, generator=g).to(dtype).to(device) for _ in range(3))
    k, v = (torch.randn(B, H, S, D, generator=g).to(dtype).to(device) for _ in range(2))
    st = dict(k=k, v=v, seen=torch.tensor([seen], dtype=torch.int64, device=device))
    if budget is not None:  # a full evicting cache: slots hold positions [seen - budget, seen), one slot free
        pos = torch.full((B, H, S), -1, dtype=torch.int32)
        perm = torch.rand(B, H, S, generator=g).argsort(-1)
        pos.scatter_(2, perm[..., :budget], torch.arange(seen - budget, seen, dtype=torch.int32).expand(B, H, -1))
        st.update(pos=pos.to(device), free=perm[..., budget].contiguous().to(device),
                  scores=(4 * torch.rand(B, H, S, generator=g)).to(device))
    cos, sin = (torch.randn(D // 2, generator=g).to(dtype).to(device) for _ in range(2))
    return (q, kn, vn), st, (cos, sin)


def _run_cache(kind, new, st, rot, budget, recent, overlap):
    q, kn, vn = new
    scale = q.shape[-1] ** -0.5
    if kind == "full":
        return FULL(q, kn, vn, st["k"], st["v"], st["seen"], scale, *rot, overlap=overlap)
    return EVICT(q, kn, vn, st["k"], st["v"], st["pos"], st["free"], st["seen"], scale, budget, 0, recent,
                 st["scores"], *rot, overlap=overlap)


@pytest.mark.parametrize("kind", ["full", "h2o"])
def test_cpu_cache_ops_accept_overlap(kind):
    budget = 6 if kind == "h2o" else None
    new, st, rot = _cache_state(2, 3, 8, 16, torch.float32, "cpu", seen=7, budget=budget)
    a_st = {n: t.clone() for n, t in st.items()}
    a = _run_cache(kind, new, a_st, rot, budget, 3, overlap=False)
    b = _run_cache(kind, new, st, rot, budget, 3, overlap=True)
    assert torch.equal(a, b)
    assert all(torch.equal(a_st[n], st[n]) for n in st)


# ----------------------------------------------------------------------------- CUDA

def _pair_args(M, dtype, device="cuda"):
    """linear_pair's 8 arguments (a list) for the CUDA tests: N 1024 + 2048, K 512."""
    return list(make_pair((M,), 1024, 512, 2048, 512, dtype, device))


def _sum_args(M, dtype, device="cuda"):
    """linear_sum's 8 arguments (a list): N 512, K 512 + 8192. K2 = 8192 with N = 512 takes the
    two-block cluster split at 9-16 rows on sm_90."""
    return list(make_pair((M,), 512, 512, 512, 8192, dtype, device))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 4, 12, 16, 32])
def test_cuda_linear2_overlap_reads_late_inputs_after_the_previous_kernel(M, dtype):
    # pair: x1 and x2 are written by the previous kernel; sum: x1 is (x2 may be read early).
    pair, sum_ = _pair_args(M, dtype), _sum_args(M, dtype)
    for _ in range(2):
        new = [torch.randn(M, 512, device="cuda").to(dtype) for _ in range(3)]
        (px1, px2), rw_pair = _late([pair[0], pair[4]])
        (sx1,), rw_sum = _late([sum_[0]])
        rw_pair(new[:2])
        y1, y2 = PAIR(px1, *pair[1:4], px2, *pair[5:], gelu2=True, overlap=True)
        rw_sum(new[2:])
        ys = SUM(sx1, *sum_[1:], overlap=True)
        torch.cuda.synchronize()
        z1, z2 = PAIR(new[0], *pair[1:4], new[1], *pair[5:], gelu2=True)
        assert torch.equal(y1, z1) and torch.equal(y2, z2)
        assert torch.equal(ys, SUM(new[2], *sum_[1:]))


@cuda
@pytest.mark.parametrize("M", [1, 16])
def test_cuda_linear2_overlap_in_a_cuda_graph(M):
    dtype = torch.float16
    pair, sum_ = _pair_args(M, dtype), _sum_args(M, dtype)
    (px1, px2, sx1), rewrite = _late([pair[0], pair[4], sum_[0]])
    vals = [torch.randn(M, 512, device="cuda").to(dtype) for _ in range(3)]

    def step():
        rewrite(vals)
        y1, y2 = PAIR(px1, *pair[1:4], px2, *pair[5:], gelu2=True, overlap=True)
        rewrite([v + 1 for v in vals])  # x1 of the sum: written just before it
        return y1, y2, SUM(sx1, *sum_[1:], overlap=True)
    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for _ in range(3):
        for v in vals:
            v.copy_(torch.randn_like(v))
        g.replay()
        torch.cuda.synchronize()
        z1, z2 = PAIR(vals[0], *pair[1:4], vals[1], *pair[5:], gelu2=True)
        zs = SUM(vals[2] + 1, *sum_[1:])
        assert torch.equal(out[0], z1) and torch.equal(out[1], z2) and torch.equal(out[2], zs)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind,B,S,budget", [("full", 16, 600, None), ("full", 1, 2176, None),
                                              ("h2o", 16, 505, 504), ("h2o", 1, 505, 504)])
def test_cuda_cache_ops_overlap_equal_plain(kind, B, S, budget, dtype):
    # q, k_new, v_new, cos and sin are written by the kernel just before the op; the op's early
    # reads (cache, pos, scores, seen, free) are not. Every output and buffer must match the
    # plain launch bit for bit.
    H, D = 32, 80
    seen = S - 1 if kind == "full" else 900
    new, st, rot = _cache_state(B, H, S, D, dtype, "cuda", seen, budget)
    ref_st = {n: t.clone() for n, t in st.items()}
    ref = _run_cache(kind, new, ref_st, rot, budget, 252, overlap=False)
    late, rewrite = _late([*new, *rot])
    rewrite([*new, *rot])
    out = _run_cache(kind, late[:3], st, tuple(late[3:]), budget, 252, overlap=True)
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    for n in st:
        assert torch.equal(st[n], ref_st[n]), n


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 4, 12, 16, 32])
def test_cuda_gemv_without_overlap_sees_weights_the_previous_kernel_writes(M, dtype):
    # On sm_90 a gemv launch (M <= 32) without overlap is a programmatic dependent launch (but
    # at 9-16 rows in 4-warp blocks) that must read nothing before it waits for the previous
    # kernel. The previous kernel here writes the weights last (old values: 7), so a kernel
    # that read them before its wait would return the old weights' product.
    # linear's K = 8192 with N = 512 takes the two-block cluster split at 9-16 rows on sm_90.
    lin = list(make_pair((M,), 512, 8192, 2560, 2560, dtype, "cuda"))
    pair, sum_ = _pair_args(M, dtype), _sum_args(M, dtype)
    news = [torch.randint(-127, 128, t.shape, dtype=torch.int8, device="cuda")
            for t in (lin[1], lin[5], pair[1], pair[5], sum_[1], sum_[5])]
    late, rewrite = _late([lin[1], lin[5], pair[1], pair[5], sum_[1], sum_[5]])
    calls = [
        lambda w: [torch.ops.w8a16.linear(lin[0], w[0], *lin[2:4])],
        lambda w: [torch.ops.w8a16.linear_gelu(lin[4], w[1], *lin[6:8])],
        lambda w: PAIR(pair[0], w[2], *pair[2:5], w[3], *pair[6:], gelu2=True),
        lambda w: [SUM(sum_[0], w[4], *sum_[2:5], w[5], *sum_[6:])],
    ]
    for call in calls:
        rewrite(news)
        got = call(late)
        torch.cuda.synchronize()
        for a, b in zip(got, call(news), strict=True):
            assert torch.equal(a, b)


_NO_PDL_SCRIPT = """
import sys, torch, w8a16_ops
args = torch.load(sys.argv[1])
out = [torch.ops.w8a16.linear(*args["lin"]),
       *torch.ops.w8a16.linear_pair(*args["pair"], gelu2=True, overlap=True),
       torch.ops.w8a16.linear_sum(*args["sum"], overlap=True)]
torch.save([t.cpu() for t in out], sys.argv[2])
"""


@cuda
def test_cuda_w8a16_pdl_0_launches_plainly_with_the_same_results(tmp_path):
    # The switch is read once per process, hence the child process.
    torch.manual_seed(0)
    args = dict(lin=make_pair((3,), 512, 8192, 8, 16, torch.float16, "cuda")[:4],
                pair=_pair_args(12, torch.float16), sum=_sum_args(16, torch.float16))
    got = child_outputs(tmp_path, _NO_PDL_SCRIPT, args, "no-pdl", W8A16_PDL="0")
    want = [torch.ops.w8a16.linear(*args["lin"]), *PAIR(*args["pair"], gelu2=True, overlap=True),
            SUM(*args["sum"], overlap=True)]
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert torch.equal(a, b.cpu())
