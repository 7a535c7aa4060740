"""The rotary embedding fused into the cache decode ops (the optional ``cos, sin``):
rotating inside the op equals rotating first, on CPU and on CUDA."""
from __future__ import annotations

import pytest
import torch

import w8a16_ops  # noqa: F401
from model_patch.attention import apply_rotary, rotary_cos_sin
from w8a16_ops import reference

FULL = torch.ops.w8a16.cache_attention_full
EVICT = torch.ops.w8a16.cache_attention_evict


def _tables(R: int, position: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    cos, sin = rotary_cos_sin(inv_freq, torch.tensor([position]), 1.0, dtype)  # [1, 1, R]
    return cos.reshape(-1), sin.reshape(-1)


def _state(B, H, S, D, dtype, seen, device, g):
    """A cache of `seen` held tokens plus an H2O-style slot state (free = seen or a victim)."""
    k = torch.randn(B, H, S, D, generator=g).to(dtype)
    v = torch.randn(B, H, S, D, generator=g).to(dtype)
    pos = torch.full((B, H, S), -1, dtype=torch.int32)
    n = min(seen, S)
    pos[..., :n] = torch.arange(n, dtype=torch.int32)
    free = torch.full((B, H), min(seen, S - 1), dtype=torch.int64)
    if seen >= S:  # a full cache: every row freed a different victim last step
        free = torch.randint(0, S, (B, H), generator=g)
        pos.scatter_(2, free[..., None], -1)
    scores = torch.rand(B, H, S, generator=g)
    st = dict(k=k, v=v, pos=pos, free=free, scores=scores)
    return {name: t.to(device) for name, t in st.items()}


def _run(op, st, q, kn, vn, seen, cos, sin, budget):
    if op == "full":
        return FULL(q, kn, vn, st["k"], st["v"], seen, 0.125, cos, sin)
    return EVICT(q, kn, vn, st["k"], st["v"], st["pos"], st["free"], seen, 0.125, budget, 0, budget // 2,
                 st["scores"], cos, sin)


def test_reference_rotate_matches_the_decoders_rotary():
    g = torch.Generator().manual_seed(0)
    B, H, D, R = 2, 3, 16, 8
    q, k = (torch.randn(B, H, 1, D, generator=g) for _ in range(2))
    cos, sin = _tables(R, 37, torch.float32)
    q_ref, k_ref = apply_rotary(q, k, cos[None, None], sin[None, None])
    torch.testing.assert_close(reference.rotate(q[:, :, 0], cos, sin), q_ref[:, :, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reference.rotate(k[:, :, 0], cos, sin), k_ref[:, :, 0], rtol=1e-6, atol=1e-6)
    assert torch.equal(reference.rotate(q[:, :, 0, R:], None, None), q[:, :, 0, R:])


@pytest.mark.parametrize("op", ["full", "evict"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_rotating_inside_equals_rotating_first(op, dtype):
    g = torch.Generator().manual_seed(1)
    B, H, S, D, R, seen = 2, 3, 9, 16, 8, 8
    q, kn, vn = (torch.randn(B, H, D, generator=g).to(dtype) for _ in range(3))
    cos, sin = _tables(R, seen, dtype)
    a = _state(B, H, S, D, dtype, seen, "cpu", torch.Generator().manual_seed(2))
    b = {name: t.clone() for name, t in a.items()}
    seen_t = torch.tensor([seen])
    out_a = _run(op, a, q, kn, vn, seen_t, cos, sin, budget=S - 1)
    out_b = _run(op, b, reference.rotate(q, cos, sin), reference.rotate(kn, cos, sin), vn, seen_t, None, None,
                 budget=S - 1)
    assert torch.equal(out_a, out_b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("bad,msg", [
    ("cos_only", "cos and sin must be given together"),
    ("odd", "R even"),
    ("too_long", "R <= D"),
    ("dtype", "must be a contiguous"),
])
def test_bad_rotary_tables(bad, msg):
    B, H, S, D = 1, 2, 4, 8
    q = kn = vn = torch.randn(B, H, D)
    st = _state(B, H, S, D, torch.float32, 2, "cpu", torch.Generator().manual_seed(0))
    cos, sin = _tables(4, 2, torch.float32)
    if bad == "cos_only":
        sin = None
    elif bad == "odd":
        cos, sin = cos[:3].contiguous(), sin[:3].contiguous()
    elif bad == "too_long":
        cos, sin = torch.ones(10), torch.zeros(10)
    else:
        cos, sin = cos.half(), sin.half()
    for op in ("full", "evict"):
        with pytest.raises(RuntimeError, match=msg):
            _run(op, st, q, kn, vn, torch.tensor([2]), cos, sin, budget=3)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["full", "evict"])
@pytest.mark.parametrize("B,S", [(1, 2176), (16, 505), (3, 37)])
@pytest.mark.parametrize("D,R", [(80, 20), (64, 16), (128, 32), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_rotary_matches_reference(dtype, D, R, B, S, op):
    g = torch.Generator().manual_seed(3)
    H, seen = 4, S - 1 if op == "full" else S + 3
    q, kn, vn = (torch.randn(B, H, D, generator=g).to(dtype) for _ in range(3))
    cos, sin = _tables(R, seen, dtype)
    cpu = _state(B, H, S, D, dtype, seen, "cpu", torch.Generator().manual_seed(4))
    gpu = {name: t.cuda() for name, t in cpu.items()}
    seen_t = torch.tensor([seen])
    out_ref = _run(op, cpu, q, kn, vn, seen_t, cos, sin, budget=S - 1)
    out = _run(op, gpu, q.cuda(), kn.cuda(), vn.cuda(), seen_t.cuda(), cos.cuda(), sin.cuda(), budget=S - 1)
    # The kernel rotates in fp32 with fused multiply-adds: the stored key may differ from the
    # reference by one unit in the last place of the dtype, never more.
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    torch.testing.assert_close(gpu["k"].cpu().float(), cpu["k"].float(), rtol=ulp, atol=1e-6)
    assert torch.equal(gpu["v"].cpu(), cpu["v"])
    torch.testing.assert_close(out.cpu().float(), out_ref.float(), rtol=0, atol=4e-3 if dtype == torch.float16 else 2e-2)
    if op == "evict":
        assert torch.equal(gpu["pos"].cpu(), cpu["pos"]) and torch.equal(gpu["free"].cpu(), cpu["free"])
        torch.testing.assert_close(gpu["scores"].cpu(), cpu["scores"], rtol=1e-4, atol=1e-5)
