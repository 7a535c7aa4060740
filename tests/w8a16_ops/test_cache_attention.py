"""Tests of the fused KV-cache decode steps torch.ops.w8a16.cache_attention_full and
torch.ops.w8a16.cache_attention_evict: the CPU reference (w8a16_ops/reference.py) on
hand-checkable states and against the policy oracle (model_patch/h2o_reference.py), the
argument checks, opcheck and torch.compile, and the fused CUDA kernel
(csrc/decode_attention.cu) stepped against the CPU reference."""
from __future__ import annotations

import re
from typing import NamedTuple

import pytest
import torch

from attention_check import check_out

import w8a16_ops  # noqa: F401  (registers the ops; builds the CUDA kernels on a GPU machine)
from w8a16_ops import reference

FULL = torch.ops.w8a16.cache_attention_full
EVICT = torch.ops.w8a16.cache_attention_evict
EVICT_PLAIN = torch.ops.w8a16._cache_attention_evict
EVICT_SCORED = torch.ops.w8a16._cache_attention_evict_scored
FULL_NAME = "w8a16.cache_attention_full"
EVICT_NAME = "w8a16.cache_attention_evict"


class Policy(NamedTuple):
    budget: int
    n_sink: int
    recent: int
    scored: bool


def h2o(heavy: int, recent: int) -> Policy:
    return Policy(heavy + recent, 0, recent, True)


def sink(n_sink: int, window: int) -> Policy:
    return Policy(n_sink + window, n_sink, window, False)


def window(w: int) -> Policy:
    return Policy(w, 0, w, False)


def _seen(n: int, device="cpu") -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int64, device=device)


def _oracle(q, k_cache, v_cache, n, scale):
    """Independent fp64 formula: softmax over the first n slots of every (b, h).

    Returns (out [B, H, D] float64, probs [B, H, S] float64 with zeros past n).
    """
    B, H, S, D = k_cache.shape
    logits = torch.einsum("bhd,bhsd->bhs", q.double(), k_cache[:, :, :n].double()) * scale
    w = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    p = w / w.sum(dim=-1, keepdim=True)
    probs = torch.zeros(B, H, S, dtype=torch.float64, device=q.device)
    probs[..., :n] = p
    return torch.einsum("bhs,bhsd->bhd", p, v_cache[:, :, :n].double()), probs


_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _new_token(B, H, D, dtype, device="cpu", g=None, sharp=1.0):
    """q, k_new, v_new [B, H, D] (generated on the CPU, so a seed gives the same data everywhere)."""
    q, k, v = (torch.randn(B, H, D, generator=g) for _ in range(3))
    return (q * sharp).to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)


def _evict(q, kn, vn, st, seen, scale, pol: Policy):
    """One evicting step on a state dict {k, v, pos, free, scores} (scores None unless pol.scored)."""
    return EVICT(q, kn, vn, st["k"], st["v"], st["pos"], st["free"], seen, scale, pol.budget, pol.n_sink,
                 pol.recent, st["scores"])


def _clone(st: dict, device=None) -> dict:
    return {n: None if t is None else t.detach().to(device or t.device, copy=True) for n, t in st.items()}


def _held_positions(pos_row: torch.Tensor) -> list[int]:
    return sorted(p for p in pos_row.tolist() if p >= 0)


# =======================================================================================
# CPU: reference semantics on hand-checkable states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seen", [0, 4, 8])
def test_full_writes_slot_seen_and_attends_over_seen_plus_one(seen, dtype):
    B, H, S, D = 2, 3, 9, 16
    q, kn, vn = _new_token(B, H, D, dtype)
    k = torch.randn(B, H, S, D).to(dtype)
    v = torch.randn(B, H, S, D).to(dtype)
    # Slots past `seen` are not valid: large junk there must not reach the output.
    k[:, :, seen + 1:] = 1e4
    v[:, :, seen + 1:] = -1e4
    k0, v0 = k.clone(), v.clone()
    scale = D ** -0.5
    out = FULL(q, kn, vn, k, v, _seen(seen), scale)
    assert out.dtype == dtype and out.shape == (B, H, D)
    assert torch.equal(k[:, :, seen], kn) and torch.equal(v[:, :, seen], vn)
    others = torch.arange(S) != seen
    assert torch.equal(k[:, :, others], k0[:, :, others]) and torch.equal(v[:, :, others], v0[:, :, others])
    o64, _ = _oracle(q, k, v, seen + 1, scale)
    torch.testing.assert_close(out.double(), o64, atol=_TOL[dtype], rtol=_TOL[dtype])
    if seen == 0:  # a single token: its probability is exactly 1, out = v_new
        assert torch.equal(out, vn)


@pytest.mark.parametrize("extra", [0, 5])
def test_full_seen_past_the_cache_writes_nothing(extra):
    B, H, S, D = 2, 3, 7, 8
    q, kn, vn = _new_token(B, H, D, torch.float32)
    k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    k0, v0 = k.clone(), v.clone()
    out = FULL(q, kn, vn, k, v, _seen(S + extra), 0.4)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    o64, _ = _oracle(q, k0, v0, S, 0.4)
    torch.testing.assert_close(out.double(), o64, atol=1e-5, rtol=1e-5)


def _hand_state(scores, D=4):
    """B = H = 1, S = 6, budget 5: slots hold positions [6, 2, 9, -, 0, 8], slot 3 is free.
    The new token has position 10."""
    st = dict(k=torch.randn(1, 1, 6, D), v=torch.randn(1, 1, 6, D),
              pos=torch.tensor([[[6, 2, 9, -1, 0, 8]]], dtype=torch.int32),
              free=torch.tensor([[3]], dtype=torch.int64),
              scores=None if scores is None else torch.tensor([[scores]], dtype=torch.float32))
    return st, D


# (n_sink, recent, scores before the step or None, q = 0 (uniform probabilities), victim slot)
_HAND = [
    # H2O 3/2: evictable = positions <= 8 (slots 0, 1, 4, 5); scores differ by > 1, so the
    # probabilities of this step cannot reorder them. Slot 2 (pos 9) has the smallest score
    # but is protected.
    pytest.param(0, 2, [5.0, 3.0, 1.0, 99.0, 2.0, 7.0], False, 4, id="h2o-smallest-score"),
    # Uniform probabilities (q = 0): slots 0, 1 and 5 tie at 2 + 1/6 -> the oldest (pos 2 in slot 1).
    pytest.param(0, 2, [2.0, 2.0, 1.0, 99.0, 5.0, 2.0], True, 1, id="h2o-tie-oldest-position"),
    # recent = 0: the new token (score = its probability < 1; the junk 99 is reset to 0) is the victim.
    pytest.param(0, 0, [5.0, 3.0, 1.0, 99.0, 2.0, 7.0], False, 3, id="h2o-recent0-new-token"),
    # Scores with sinks: evictable = positions in [3, 8] (slots 0, 5).
    pytest.param(3, 2, [5.0, 3.0, 1.0, 99.0, 2.0, 7.0], False, 0, id="h2o-with-sinks"),
    # Position keys: sink(1, window 2) -> positions in [1, 8]: the oldest is 2 (slot 1).
    pytest.param(1, 2, None, False, 1, id="sink-1-2"),
    # sink(3, 2) -> positions in [3, 8]: 6 (slot 0).
    pytest.param(3, 2, None, False, 0, id="sink-3-2"),
    # window(5) -> positions <= 5: 2 and 0, the oldest is 0 (slot 4).
    pytest.param(0, 5, None, False, 4, id="window-5"),
]


@pytest.mark.parametrize("n_sink,recent,scores,q_zero,victim", _HAND)
def test_evict_hand_checked_victim(n_sink, recent, scores, q_zero, victim):
    st, D = _hand_state(scores)
    before = _clone(st)
    q, kn, vn = _new_token(1, 1, D, torch.float32)
    if q_zero:
        q.zero_()
    scale = D ** -0.5
    out = EVICT(q, kn, vn, st["k"], st["v"], st["pos"], st["free"], _seen(10), scale, 5, n_sink, recent,
                st["scores"])
    # The new token went to slot 3 (K, V, position 10), nothing else of K/V changed.
    assert torch.equal(st["k"][0, 0, 3], kn[0, 0]) and torch.equal(st["v"][0, 0, 3], vn[0, 0])
    keep = torch.arange(6) != 3
    assert torch.equal(st["k"][..., keep, :], before["k"][..., keep, :])
    assert torch.equal(st["v"][..., keep, :], before["v"][..., keep, :])
    expected_pos = [6, 2, 9, 10, 0, 8]
    expected_pos[victim] = -1
    assert st["pos"][0, 0].tolist() == expected_pos
    assert st["free"].tolist() == [[victim]]
    # Attention over all 6 slots (seen + 1 > S), the new token included.
    o64, p64 = _oracle(q, st["k"], st["v"], 6, scale)
    torch.testing.assert_close(out.double(), o64, atol=1e-5, rtol=1e-5)
    if scores is not None:
        old = before["scores"].double()
        old[..., 3] = 0.0  # the new token's score starts at 0
        torch.testing.assert_close(st["scores"].double(), old + p64, atol=1e-6, rtol=1e-6)
        if q_zero:
            assert torch.equal(st["scores"][0, 0, 0], st["scores"][0, 0, 1])  # a genuine tie


@pytest.mark.parametrize("pol", [h2o(3, 3), h2o(6, 0), h2o(0, 6), sink(2, 4), window(6)],
                         ids=["h2o3-3", "h2o6-0", "h2o0-6", "sink2-4", "window6"])
def test_evict_fills_then_evicts_one_per_step(pol):
    B, H, D = 2, 3, 8
    S = pol.budget + 1
    scale = D ** -0.5
    st = dict(k=torch.full((B, H, S, D), 7.0), v=torch.full((B, H, S, D), -7.0),
              pos=torch.full((B, H, S), -1, dtype=torch.int32), free=torch.zeros(B, H, dtype=torch.int64),
              scores=torch.full((B, H, S), 55.0) if pol.scored else None)
    acc = torch.zeros(B, H, S, dtype=torch.float64)  # fp64 accumulated probabilities per slot
    g = torch.Generator().manual_seed(3)
    for seen in range(pol.budget + 4):
        q, kn, vn = _new_token(B, H, D, torch.float32, g=g, sharp=3.0)
        slot = st["free"].clone()
        out = _evict(q, kn, vn, st, _seen(seen), scale, pol)
        n = min(seen + 1, S)
        assert torch.equal(st["k"].gather(2, slot[..., None, None].expand(B, H, 1, D))[:, :, 0], kn)
        assert torch.equal(st["v"].gather(2, slot[..., None, None].expand(B, H, 1, D))[:, :, 0], vn)
        o64, p64 = _oracle(q, st["k"], st["v"], n, scale)
        torch.testing.assert_close(out.double(), o64, atol=1e-5, rtol=1e-5)
        acc.scatter_(2, slot[..., None], 0.0)
        acc += p64
        if pol.scored:
            torch.testing.assert_close(st["scores"][..., :n].double(), acc[..., :n], atol=1e-5, rtol=1e-5)
            assert (st["scores"][..., n:] == 55.0).all(), "scores past the valid slots changed"
        held = st["pos"] >= 0
        if seen < pol.budget:
            # Nothing evicted: slot i holds position i, the next free slot is seen + 1.
            assert torch.equal(st["pos"][..., :seen + 1], torch.arange(seen + 1, dtype=torch.int32).expand(B, H, -1))
            assert (st["pos"][..., seen + 1:] == -1).all()
            assert (st["free"] == seen + 1).all()
            continue
        # One token evicted: budget tokens held, the freed slot is the next one to fill.
        assert (held.sum(-1) == pol.budget).all()
        assert (st["pos"].gather(2, st["free"][..., None]) == -1).all()
        for b in range(B):
            for h in range(H):
                kept = _held_positions(st["pos"][b, h])
                gone = sorted(set(range(seen + 1)) - set(kept))
                protected = set(range(min(pol.n_sink, seen + 1))) | set(range(max(0, seen - pol.recent + 1), seen + 1))
                assert protected <= set(kept), f"protected token evicted at step {seen}"
                if not pol.scored:  # position key: the oldest evictable tokens go first
                    expected = [p for p in range(seen + 1) if p >= pol.n_sink][:seen + 1 - pol.budget]
                    assert gone == expected, f"(b={b}, h={h}) step {seen}: evicted {gone}"
        if pol.scored:
            # This step's victim (slot `free`, held until now): the smallest fp64 score among
            # the evictable slots, up to fp32 rounding.
            victim = st["free"][..., None]
            pos_now = st["pos"].long()
            evictable = (pos_now >= pol.n_sink) & (pos_now <= seen - pol.recent) & (pos_now >= 0)
            evictable.scatter_(2, victim, True)
            smallest = acc.masked_fill(~evictable, float("inf")).amin(-1)
            assert (acc.gather(2, victim)[..., 0] <= smallest + 1e-6).all()


# =======================================================================================
# CPU: a random multi-step stream against the policy oracle (model_patch.h2o_reference)


@pytest.mark.parametrize("policy", ["h2o:3,3", "h2o:0,4", "h2o:5,0", "h2o:2,5", "sink:2,4", "sink:0,3", "window:5"])
def test_evict_stream_matches_policy_oracle(policy):
    from model_patch.h2o_reference import ReferenceCache
    from model_patch.policies import parse_policy

    spec = parse_policy(policy)
    pol = {"h2o": lambda: h2o(spec.heavy, spec.recent), "sink": lambda: sink(spec.n_sink, spec.window),
           "window": lambda: window(spec.window)}[spec.name]()
    B, H, D, N = 2, 3, 16, 30
    S = pol.budget + 1
    T = min(3, pol.budget)  # prompt: no eviction at prefill
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, N, D, generator=g) * s for s in (3.0, 1.0, 1.0))
    ref = ReferenceCache(spec, 1, N)
    ref.prefill(0, q[:, :, :T], k[:, :, :T], v[:, :, :T])
    ref.advance(T)
    # The op's state after that prefill: slot i holds position i.
    st = dict(k=torch.zeros(B, H, S, D), v=torch.zeros(B, H, S, D),
              pos=torch.full((B, H, S), -1, dtype=torch.int32), free=torch.full((B, H), T, dtype=torch.int64),
              scores=torch.zeros(B, H, S) if pol.scored else None)
    st["k"][:, :, :T], st["v"][:, :, :T] = k[:, :, :T], v[:, :, :T]
    st["pos"][..., :T] = torch.arange(T, dtype=torch.int32)
    if pol.scored:
        st["scores"][..., :T] = ref.score[0][..., :T]
    for t in range(T, N):
        out = _evict(q[:, :, t], k[:, :, t], v[:, :, t], st, _seen(t), D ** -0.5, pol)
        ref_out = ref.decode(0, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])[:, :, 0]
        ref.advance(1)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        held = st["pos"] >= 0
        mask = torch.zeros(B, H, t + 2, dtype=torch.bool).scatter_(-1, torch.where(held, st["pos"].long(), t + 1),
                                                                    True)[..., :t + 1]
        assert torch.equal(mask, ref.held[0][..., :t + 1]), f"{policy}: held tokens differ after step {t}"
        assert (held.sum(-1) == min(t + 1, pol.budget)).all()
        assert mask[..., max(0, t - pol.recent + 1):].all(), "a recent token was evicted"
        assert mask[..., :min(pol.n_sink, t + 1)].all(), "a sink token was evicted"
        if pol.scored:  # every held token's score matches the oracle's, slot by slot
            ref_scores = ref.score[0].gather(-1, st["pos"].clamp(min=0).long())
            torch.testing.assert_close(st["scores"][held], ref_scores[held], atol=1e-5, rtol=1e-5)
    assert not mask.all(), "nothing was evicted"


# =======================================================================================
# CPU: opcheck and torch.compile


def _full_args(seen, B=2, H=3, S=8, D=16, dtype=torch.float32, device="cpu"):
    q, kn, vn = _new_token(B, H, D, dtype, device)
    k = torch.randn(B, H, S, D).to(dtype).to(device)
    v = torch.randn(B, H, S, D).to(dtype).to(device)
    return (q, kn, vn, k, v, _seen(seen, device), D ** -0.5)


def _random_cache(B, H, S, D, dtype, g: torch.Generator, device="cpu"):
    """Random K and V [B, H, S, D]; drawn on the device itself (seeded from g): large caches
    would take seconds with the CPU generator."""
    dg = torch.Generator(device).manual_seed(int(torch.randint(1 << 30, (1,), generator=g)))
    return tuple(torch.randn(B, H, S, D, generator=dg, device=device).to(dtype) for _ in range(2))


def _steady_state(B, H, S, D, dtype, pol: Policy, seen0: int, g: torch.Generator, device="cpu") -> dict:
    """A state an evicting cache could be in before the step of position seen0.

    seen0 < budget: slots [0, seen0) hold positions [0, seen0), free = seen0.
    seen0 >= budget: budget tokens (the sinks, the `recent` newest, random others) in
    randomly permuted slots and one free slot. Unused slots hold finite junk (K/V,
    scores); H2O scores are uniform in [0, 4).
    """
    k, v = _random_cache(B, H, S, D, torch.float32, g, device)
    pos = torch.full((B, H, S), -1, dtype=torch.int32)
    if seen0 < pol.budget:
        pos[..., :seen0] = torch.arange(seen0, dtype=torch.int32)
        free = torch.full((B, H), seen0, dtype=torch.int64)
    else:
        n_mid = pol.budget - pol.n_sink - pol.recent
        lo, hi = pol.n_sink, seen0 - pol.recent
        mid = torch.rand(B, H, hi - lo, generator=g).argsort(-1)[..., :n_mid] + lo
        held = torch.cat([torch.arange(pol.n_sink).expand(B, H, -1), mid,
                          torch.arange(seen0 - pol.recent, seen0).expand(B, H, -1)], dim=-1)
        perm = torch.rand(B, H, S, generator=g).argsort(-1)
        pos.scatter_(2, perm[..., :pol.budget], held.to(torch.int32))
        free = perm[..., pol.budget].contiguous()
    pos, free = pos.to(device), free.to(device)
    held_mask = pos >= 0
    k[~held_mask] *= 30.0
    v[~held_mask] *= 30.0
    scores = None
    if pol.scored:
        scores = torch.where(held_mask.cpu(), 4 * torch.rand(B, H, S, generator=g), 123.0).to(device)
    return dict(k=k.to(dtype), v=v.to(dtype), pos=pos, free=free, scores=scores)


@pytest.mark.parametrize("seen", [3, 7, 8, 11])
def test_cpu_opcheck_full(seen):
    torch.library.opcheck(FULL, _full_args(seen))


@pytest.mark.parametrize("op", ["public", "internal"])
@pytest.mark.parametrize("scored", [False, True])
@pytest.mark.parametrize("seen0", [3, 9])
def test_cpu_opcheck_evict(seen0, scored, op):
    B, H, D = 2, 3, 16
    pol = h2o(3, 3) if scored else sink(2, 4)
    S = pol.budget + 1
    st = _steady_state(B, H, S, D, torch.float32, pol, seen0, torch.Generator().manual_seed(seen0))
    q, kn, vn = _new_token(B, H, D, torch.float32)
    args = (q, kn, vn, st["k"], st["v"], st["pos"], st["free"], _seen(seen0), D ** -0.5, pol.budget,
            pol.n_sink, pol.recent)
    if op == "public":
        torch.library.opcheck(EVICT, (*args, st["scores"]))
    else:
        torch.library.opcheck(EVICT_SCORED if scored else EVICT_PLAIN, (*args, st["scores"]) if scored else args)


def _three_ops_step(scale, pol_h2o: Policy, pol_sink: Policy):
    """A decode step of three caches, one per op: full, H2O (scores) and sink (no scores)."""
    def step(q, kn, vn, seen, full, sc, ps):
        o1 = FULL(q, kn, vn, full["k"], full["v"], seen, scale)
        o2 = _evict(q, kn, vn, sc, seen, scale, pol_h2o)
        o3 = _evict(q, kn, vn, ps, seen, scale, pol_sink)
        return o1 * 2 + o2, o3.float() * 3
    return step


def _compile_matches_eager(device, dtype, B, H, D, S_full, pol_h2o, pol_sink, seens, backend="inductor"):
    g = torch.Generator().manual_seed(5)
    scale = D ** -0.5
    full = dict(zip("kv", _random_cache(B, H, S_full, D, dtype, g, device)))
    sc = _steady_state(B, H, pol_h2o.budget + 1, D, dtype, pol_h2o, seens[0], g, device)
    ps = _steady_state(B, H, pol_sink.budget + 1, D, dtype, pol_sink, seens[0], g, device)
    eager_state = [_clone(x) for x in (full, sc, ps)]
    step = _three_ops_step(scale, pol_h2o, pol_sink)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for seen in seens:
        q, kn, vn = _new_token(B, H, D, dtype, device, g)
        s = _seen(seen, device)
        out_c = compiled(q, kn, vn, s, full, sc, ps)
        out_e = step(q, kn, vn, s, *eager_state)
        for a, b in zip(out_c, out_e):
            assert torch.equal(a, b), f"output differs at seen={seen}"
        for mine, theirs in zip((full, sc, ps), eager_state):
            for name, t in mine.items():
                if t is not None:
                    assert torch.equal(t, theirs[name]), f"{name} differs at seen={seen}"


def test_cpu_compile_fullgraph_matches_eager():
    # full: S = 12, written up to and past its end; H2O 3/3 and sink 2/4: fill, then evict.
    _compile_matches_eager("cpu", torch.float32, 2, 3, 16, 12, h2o(3, 3), sink(2, 4), [4, 5, 6, 7, 12, 13])


# =======================================================================================
# CPU: argument checks (eager, fake kernel, compile)


def _bad_cases():
    B, H, S, D = 2, 3, 5, 8

    def base():
        return dict(q=torch.randn(B, H, D), k_new=torch.randn(B, H, D), v_new=torch.randn(B, H, D),
                    k=torch.randn(B, H, S, D), v=torch.randn(B, H, S, D), seen=_seen(2),
                    pos=torch.full((B, H, S), -1, dtype=torch.int32), free=torch.zeros(B, H, dtype=torch.int64),
                    scores=torch.zeros(B, H, S), budget=4, n_sink=1, recent=2)

    cases = []

    def case(ops, msg, **override):
        args = base()
        args.update(override)
        for op in ops:
            cases.append(pytest.param(op, args, msg, id=f"{op}-{msg[:48]}"))

    both, evict = ("full", "evict"), ("evict",)
    case(both, "q must be float16, bfloat16 or float32, got int32", q=torch.ones(B, H, D, dtype=torch.int32))
    case(both, "q must have shape [B, H, D], got float32 [2, 3]", q=torch.randn(B, H))
    case(both, "k_new must be float32 of shape [2, 3, 8], got float16 [2, 3, 8]", k_new=torch.randn(B, H, D).half())
    case(both, "v_new must be float32 of shape [2, 3, 8], got float32 [2, 3, 1, 8]", v_new=torch.randn(B, H, 1, D))
    case(both, "k_cache must be float32 of shape [2, 3, S, 8], got bfloat16 [2, 3, 5, 8]",
         k=torch.randn(B, H, S, D).bfloat16())
    case(both, "k_cache must be contiguous, got strides [120, 40, 1, 5]", k=torch.randn(B, H, D, S).transpose(2, 3))
    case(both, "v_cache must have S=5 slots like k_cache, got float32 [2, 3, 6, 8]", v=torch.randn(B, H, 6, D))
    case(both, "the cache must have at least one slot, got S=0",
         k=torch.randn(B, H, 0, D), v=torch.randn(B, H, 0, D), pos=torch.zeros(B, H, 0, dtype=torch.int32),
         scores=torch.zeros(B, H, 0))
    case(both, "seen must be int64 of shape [1], got int32 [1]", seen=torch.tensor([2], dtype=torch.int32))
    case(both, "seen must be int64 of shape [1], got int64 []", seen=torch.tensor(2))
    case(both, "seen must be int64 of shape [1], got int64 [2]", seen=torch.tensor([2, 2]))
    case(evict, "pos must be contiguous int32 of shape [2, 3, 5], got int64 [2, 3, 5]",
         pos=torch.full((B, H, S), -1))
    case(evict, "pos must be contiguous int32 of shape [2, 3, 5], got int32 [2, 3, 6]",
         pos=torch.full((B, H, 6), -1, dtype=torch.int32))
    case(evict, "pos must be contiguous int32 of shape [2, 3, 5], got int32 [2, 3, 5]",
         pos=torch.full((S, H, B), -1, dtype=torch.int32).permute(2, 1, 0))
    case(evict, "free must be contiguous int64 of shape [2, 3], got int32 [2, 3]",
         free=torch.zeros(B, H, dtype=torch.int32))
    case(evict, "free must be contiguous int64 of shape [2, 3], got int64 [2]", free=torch.zeros(B, dtype=torch.int64))
    case(evict, "free must be contiguous int64 of shape [2, 3], got int64 [2, 3]",
         free=torch.zeros(H, B, dtype=torch.int64).t())
    case(evict, "scores must be contiguous float32 of shape [2, 3, 5], got float16 [2, 3, 5]",
         scores=torch.zeros(B, H, S).half())
    case(evict, "scores must be contiguous float32 of shape [2, 3, 5], got float32 [2, 5]", scores=torch.zeros(B, S))
    case(evict, "need budget >= 1, n_sink >= 0 and recent >= 0, got budget=0, n_sink=0, recent=0",
         budget=0, n_sink=0, recent=0)
    case(evict, "need budget >= 1, n_sink >= 0 and recent >= 0, got budget=4, n_sink=-1, recent=2", n_sink=-1)
    case(evict, "need budget >= 1, n_sink >= 0 and recent >= 0, got budget=4, n_sink=1, recent=-3", recent=-3)
    case(evict, "n_sink + recent must not exceed budget (nothing could be evicted), got n_sink=2, recent=3, budget=4",
         n_sink=2, recent=3)
    return cases


def _call(op, a, scores=True):
    if op == "full":
        return FULL(a["q"], a["k_new"], a["v_new"], a["k"], a["v"], a["seen"], 0.5)
    return EVICT(a["q"], a["k_new"], a["v_new"], a["k"], a["v"], a["pos"], a["free"], a["seen"], 0.5, a["budget"],
                 a["n_sink"], a["recent"], a["scores"] if scores else None)


def _name(op):
    return FULL_NAME if op == "full" else EVICT_NAME


@pytest.mark.parametrize("op,args,msg", _bad_cases())
def test_bad_inputs_raise(op, args, msg):
    with pytest.raises(RuntimeError, match=re.escape(f"{_name(op)}: {msg}")):
        _call(op, args)
    if op == "evict" and "scores" not in msg:  # the unscored internal op checks the same
        with pytest.raises(RuntimeError, match=re.escape(f"{_name(op)}: {msg}")):
            _call(op, args, scores=False)


@pytest.mark.parametrize("op,args,msg", _bad_cases())
def test_fake_kernel_raises_the_same(op, args, msg):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for n, t in args.items()}
        with pytest.raises(RuntimeError, match=re.escape(f"{_name(op)}: {msg}")):
            _call(op, fake)


def test_fake_kernel_output():
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, H, S, D = 2, 3, 5, 8
    with FakeTensorMode():
        q = torch.empty(B, 1, H, 3 * D).transpose(1, 2)[:, :, 0, :D]  # a strided q, like GPT-NeoX's qkv
        k, v = torch.empty(B, H, S, D), torch.empty(B, H, S, D)
        out = FULL(q, q, q, k, v, _seen(1), 0.5)
        assert out.shape == (B, H, D) and out.dtype == torch.float32 and out.is_contiguous()
        pos, free = torch.empty(B, H, S, dtype=torch.int32), torch.empty(B, H, dtype=torch.int64)
        out = EVICT(q, q, q, k, v, pos, free, _seen(1), 0.5, 4, 0, 2, torch.empty(B, H, S))
        assert out.shape == (B, H, D) and out.is_contiguous()


@pytest.mark.parametrize("op,prefix", [("full", "seen must be int64"), ("evict", "free must be contiguous"),
                                       ("evict", "n_sink + recent must not exceed")])
def test_compile_raises_the_same(op, prefix):
    (args, msg), = [p.values[1:] for p in _bad_cases() if p.values[0] == op and p.values[2].startswith(prefix)][:1]

    def f(a):
        return _call(op, a)

    torch._dynamo.reset()
    with pytest.raises(Exception, match=re.escape(f"{_name(op)}: {msg}")):
        torch.compile(f, fullgraph=True, backend="aot_eager")(args)


# =======================================================================================
# CUDA kernel: stepped against the CPU reference


def _ref_step(pol, q, kn, vn, st, seen, scale):
    """The CPU reference (w8a16_ops.reference) on a CPU state dict; pol None = full."""
    s = _seen(seen)
    if pol is None:
        return reference.cache_attention_full(q, kn, vn, st["k"], st["v"], s, scale)
    return reference.cache_attention_evict(q, kn, vn, st["k"], st["v"], st["pos"], st["free"], s, scale,
                                           pol.budget, pol.n_sink, pol.recent, st["scores"])


def _compare_evict_bookkeeping(pol, seen, gpu, ref):
    """pos/free identical; where the victims differ (H2O only), the GPU's victim must be a valid
    evictable slot whose score is within 1e-5 of the reference's minimum. Returns #differing rows."""
    pos_g, free_g = gpu["pos"].cpu(), gpu["free"].cpu()
    if pol.scored:
        torch.testing.assert_close(gpu["scores"].cpu(), ref["scores"], atol=1e-5, rtol=1e-4)
    differ = free_g != ref["free"]
    if not differ.any():
        assert torch.equal(pos_g, ref["pos"]), f"pos differs at seen={seen}"
        return 0
    assert pol.scored and seen >= pol.budget, f"free differs at seen={seen} (no near-tie possible)"
    assert torch.equal(pos_g[~differ], ref["pos"][~differ]), f"pos differs at seen={seen}"
    assert int(differ.sum()) <= max(2, differ.numel() // 100), "too many victim mismatches for near-ties"
    for b, h in differ.nonzero().tolist():
        vg, vr = int(free_g[b, h]), int(ref["free"][b, h])
        pg, pr, sr = pos_g[b, h], ref["pos"][b, h], ref["scores"][b, h]
        assert pg[vg] == -1 and pr[vr] == -1 and pr[vg] >= 0 and pg[vr] >= 0
        same = torch.ones_like(pg, dtype=torch.bool)
        same[[vg, vr]] = False
        assert torch.equal(pg[same], pr[same])
        p = int(pr[vg])
        assert pol.n_sink <= p <= seen - pol.recent, f"GPU evicted a protected position {p}"
        assert abs(float(sr[vg]) - float(sr[vr])) <= 1e-5, \
            f"(b={b}, h={h}) seen={seen}: GPU victim score {float(sr[vg])} vs minimum {float(sr[vr])}"
    return int(differ.sum())


def _cuda_steps(pol, B, H, S, D, dtype, seen0, seens, g):
    """Runs the CUDA op over `seens` from a generated state, each step checked against the CPU
    reference run on a copy of the GPU state taken just before the step."""
    scale = D ** -0.5
    if pol is None:
        st = dict(zip("kv", _random_cache(B, H, S, D, dtype, g, "cuda")))
    else:
        st = _steady_state(B, H, S, D, dtype, pol, seen0, g, "cuda")
    for seen in seens:
        ref = _clone(st, "cpu")
        q, kn, vn = _new_token(B, H, D, dtype, "cpu", g)
        out = EVICT(q.cuda(), kn.cuda(), vn.cuda(), st["k"], st["v"], st["pos"], st["free"], _seen(seen, "cuda"),
                    scale, pol.budget, pol.n_sink, pol.recent, st["scores"]) if pol is not None else \
            FULL(q.cuda(), kn.cuda(), vn.cuda(), st["k"], st["v"], _seen(seen, "cuda"), scale)
        out_ref = _ref_step(pol, q, kn, vn, ref, seen, scale)
        torch.cuda.synchronize()
        assert torch.equal(st["k"].cpu(), ref["k"]) and torch.equal(st["v"].cpu(), ref["v"]), \
            f"K/V cache differs at seen={seen}"
        if pol is not None:
            _compare_evict_bookkeeping(pol, seen, st, ref)
            held = (st["pos"] >= 0).sum(-1)
            assert (held == min(seen + 1, pol.budget)).all(), f"wrong number of held tokens at seen={seen}"
        o64, _ = _oracle(q.cuda(), st["k"], st["v"], min(seen + 1, S), scale)
        check_out(out.cpu(), out_ref, o64.cpu(), dtype)


def _policies(S):
    budget = S - 1
    return {"h2o": h2o(budget - budget // 2, budget // 2), "sink": sink(4, budget - 4), "window": window(budget)}


def _step_cases():
    shapes = [((16, 32, 505), "unsplit-16x32x505"), ((1, 32, 505), "split-1x32x505"),
              ((1, 32, 2176), "split-1x32x2176"), ((3, 5, 37), "odd-3x5x37"), ((3, 5, 600), "odd-3x5x600")]
    cases = []
    for dtype, dname in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for D in (64, 80, 128):
            for (B, H, S), sname in shapes:
                for policy in ("full", "h2o", "sink", "window"):
                    # The CPU reference is slow on the B=16 shape: its position-keyed policies
                    # (same kernel path as H2O minus the scores) run at Pythia's D = 80 only.
                    if B == 16 and policy in ("sink", "window") and D != 80:
                        continue
                    cases.append(pytest.param(dtype, D, B, H, S, policy, id=f"{dname}-{D}-{sname}-{policy}"))
    return cases


@pytest.mark.cuda
@pytest.mark.parametrize("n_sink,recent,scores,q_zero,victim", _HAND)
def test_cuda_evict_hand_checked_victim(n_sink, recent, scores, q_zero, victim):
    # The kernel's victim search (per-thread fold, then warp and block minimums) on the
    # hand-checked states, exact ties included: the same victim, positions and free slot.
    st, D = _hand_state(scores, D=8)  # the CUDA kernel takes D % 8 == 0
    st = {n: None if t is None else (t.half() if t.is_floating_point() and n in ("k", "v") else t).cuda()
          for n, t in st.items()}
    q, kn, vn = _new_token(1, 1, D, torch.float16, "cuda")
    if q_zero:
        q.zero_()
    EVICT(q, kn, vn, st["k"], st["v"], st["pos"], st["free"], _seen(10, "cuda"), D ** -0.5, 5, n_sink,
          recent, st["scores"])
    expected_pos = [6, 2, 9, 10, 0, 8]
    expected_pos[victim] = -1
    assert st["pos"][0, 0].tolist() == expected_pos
    assert st["free"].tolist() == [[victim]]
    if q_zero:
        assert torch.equal(st["scores"][0, 0, 0], st["scores"][0, 0, 1])  # a genuine tie


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,D,B,H,S,policy", _step_cases())
def test_cuda_steps_match_reference(dtype, D, B, H, S, policy):
    g = torch.Generator().manual_seed(1000 * S + 10 * B + D)
    big = B * H * S * D > (1 << 22)  # fewer steps where the CPU reference is slow
    if policy == "full":
        # Short and long prefixes (the new token lands in the first or the last split), then
        # past the end of the cache (nothing written, attention over all S slots).
        seens = [S // 3, S - 1, S] if big else [S // 3, S // 3 + 1, S - 2, S - 1, S, S + 3]
        _cuda_steps(None, B, H, S, D, dtype, 0, seens, g)
        return
    pol = _policies(S)[policy]
    # Up to and past the budget (slot i = position i, then the first evictions) ...
    first = pol.budget - (1 if big else 2)
    _cuda_steps(pol, B, H, S, D, dtype, first, range(first, pol.budget + 2), g)
    # ... and from a steady state with permuted slots (the new token goes anywhere).
    seen0 = pol.budget + 40
    _cuda_steps(pol, B, H, S, D, dtype, seen0, range(seen0, seen0 + (2 if big else 3)), g)


def _shifted(t: torch.Tensor) -> torch.Tensor:
    """A copy of t at an odd element offset of a fresh buffer: not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.cuda
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("policy", ["full", "h2o", "sink"])
@pytest.mark.parametrize("B,S", [(1, 2176), (16, 505), (3, 37)])
@pytest.mark.parametrize("D", [64, 80])
def test_cuda_strided_qkv_views(D, B, S, policy, misaligned):
    # GPT-NeoX's fused projection: [B, 1, H, 3D] -> [B, H, 1, 3D] -> chunk -> [:, :, 0].
    # The strided views must give bit-identical results to contiguous copies (misaligned: both
    # at an odd offset, so both take the element-wise path), and match the CPU reference.
    H, dtype = 32, torch.float16
    g = torch.Generator().manual_seed(S + D)
    pol = None if policy == "full" else _policies(S)[policy]
    scale = D ** -0.5
    seen = S - 2 if pol is None else pol.budget + 17
    views = (_steady_state(B, H, S, D, dtype, pol, seen, g, "cuda") if pol is not None else
             dict(zip("kv", _random_cache(B, H, S, D, dtype, g, "cuda"))))
    for step in range(2):
        qkv = torch.randn(B, 1, H, 3 * D, generator=g).to(dtype).cuda()
        if misaligned:
            qkv = _shifted(qkv)
        q, kn, vn = (t[:, :, 0] for t in qkv.view(B, 1, H, 3 * D).transpose(1, 2).chunk(3, dim=-1))
        assert not q.is_contiguous() and q.stride() == (3 * H * D, 3 * D, 1)
        dense_qkv = [t.contiguous() for t in (q, kn, vn)]
        if misaligned:
            dense_qkv = [_shifted(t) for t in dense_qkv]
        dense, ref = _clone(views), _clone(views, "cpu")
        s = seen + step

        def run(st, q, kn, vn):
            if pol is None:
                return FULL(q, kn, vn, st["k"], st["v"], _seen(s, "cuda"), scale)
            return _evict(q, kn, vn, st, _seen(s, "cuda"), scale, pol)

        out_d = run(dense, *dense_qkv)
        out_v = run(views, q, kn, vn)
        assert torch.equal(out_v, out_d)
        for name, t in views.items():
            if t is not None:
                assert torch.equal(t, dense[name]), f"{name} differs"
        out_ref = _ref_step(pol, q.cpu(), kn.cpu(), vn.cpu(), ref, s, scale)
        assert torch.equal(views["k"].cpu(), ref["k"]) and torch.equal(views["v"].cpu(), ref["v"])
        if pol is not None:
            _compare_evict_bookkeeping(pol, s, views, ref)
        o64, _ = _oracle(q, views["k"], views["v"], min(s + 1, S), scale)
        check_out(out_v.cpu(), out_ref, o64.cpu(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("extra", [0, 7])
@pytest.mark.parametrize("B,S", [(1, 2176), (16, 505), (3, 37)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_full_seen_past_the_cache(dtype, B, S, extra):
    H, D = 32, 80
    g = torch.Generator().manual_seed(S)
    q, kn, vn = _new_token(B, H, D, dtype, "cuda", g)
    k, v = _random_cache(B, H, S, D, dtype, g, "cuda")
    k0, v0 = k.clone(), v.clone()
    out = FULL(q, kn, vn, k, v, _seen(S + extra, "cuda"), D ** -0.5)
    torch.cuda.synchronize()
    assert torch.equal(k, k0) and torch.equal(v, v0), "a token was written past the cache"
    ref = reference.cache_attention_full(q.cpu(), kn.cpu(), vn.cpu(), k0.cpu(), v0.cpu(), _seen(S + extra), D ** -0.5)
    o64, _ = _oracle(q, k0, v0, S, D ** -0.5)
    check_out(out.cpu(), ref, o64.cpu(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["h2o", "sink", "full"])
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_graph_replay_matches_eager(B, policy):
    H, S, D, dtype = 32, 505, 80, torch.float16
    scale = D ** -0.5
    g = torch.Generator().manual_seed(B)
    pol = None if policy == "full" else _policies(S)[policy]
    seen0 = S - 6 if pol is None else pol.budget - 2  # crosses the budget / the end of the cache
    if pol is None:
        static = dict(zip("kv", _random_cache(B, H, S, D, dtype, g, "cuda")))
    else:
        static = _steady_state(B, H, S, D, dtype, pol, seen0, g, "cuda")
    eager = _clone(static)
    q, kn, vn = _new_token(B, H, D, dtype, "cuda", g)
    seen = _seen(seen0, "cuda")

    def step(st):
        if pol is None:
            return FULL(q, kn, vn, st["k"], st["v"], seen, scale)
        return _evict(q, kn, vn, st, seen, scale, pol)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (one-time host setup) outside the capture, on a scratch state
        step(_clone(static))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static)
    torch.cuda.synchronize()

    for i in range(8):
        new = _new_token(B, H, D, dtype, "cuda", g)
        for dst, src in zip((q, kn, vn), new):
            dst.copy_(src)
        seen.fill_(seen0 + i)
        graph.replay()
        out_e = step(eager)
        torch.cuda.synchronize()
        assert torch.equal(out, out_e), f"replay {i}: output differs"
        for name, t in static.items():
            if t is not None:
                assert torch.equal(t, eager[name]), f"replay {i}: {name} differs"
    if pol is not None:
        assert (static["pos"] >= 0).sum(-1).eq(pol.budget).all()


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_compile_fullgraph_matches_eager(B):
    _compile_matches_eager("cuda", torch.bfloat16, B, 32, 80, 600, h2o(300, 200), sink(4, 400),
                           [499, 500, 501, 502, 599, 600])


@pytest.mark.cuda
@pytest.mark.parametrize("scored", [False, True])
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_opcheck(B, scored):
    H, D = 32, 80
    pol = h2o(300, 300) if scored else window(600)
    st = _steady_state(B, H, 601, D, torch.float16, pol, 650, torch.Generator().manual_seed(B), "cuda")
    q, kn, vn = _new_token(B, H, D, torch.float16, "cuda")
    args = (q, kn, vn, st["k"], st["v"], st["pos"], st["free"], _seen(650, "cuda"), D ** -0.5, pol.budget,
            pol.n_sink, pol.recent, st["scores"])
    torch.library.opcheck(EVICT, args)
    torch.library.opcheck(FULL, _full_args(300, B, H, 601, D, torch.float16, "cuda"))


@pytest.mark.cuda
def test_cuda_bad_inputs_raise():
    q, kn, vn, k, v, seen, _ = _full_args(2, 2, 3, 5, 16, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match=re.escape(f"{FULL_NAME}: q must be float16 or bfloat16, got float32")):
        FULL(q, kn, vn, k, v, seen, 0.5)
    for D in (12, 264):
        q, kn, vn, k, v, seen, _ = _full_args(2, 2, 3, 5, D, torch.float16, "cuda")
        msg = f"head_dim D must be a multiple of 8 and at most 256 on CUDA, got D={D}"
        with pytest.raises(RuntimeError, match=re.escape(f"{FULL_NAME}: {msg}")):
            FULL(q, kn, vn, k, v, seen, 0.5)
        pos = torch.full((2, 3, 5), -1, dtype=torch.int32, device="cuda")
        free = torch.zeros(2, 3, dtype=torch.int64, device="cuda")
        with pytest.raises(RuntimeError, match=re.escape(f"{EVICT_NAME}: {msg}")):
            EVICT(q, kn, vn, k, v, pos, free, seen, 0.5, 4, 0, 2)
    q, kn, vn, k, v, seen, _ = _full_args(2, 2, 3, 5, 16, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match=re.escape(f"{FULL_NAME}: all tensors must be on the same device")):
        FULL(q, kn, vn, k, v, seen.cpu(), 0.5)
