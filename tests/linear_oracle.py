"""Helpers of the W8A16 linear tests (tests/w8a16_ops/test_linear*.py): the fp32 oracle, the
same-precision torch peer and the relative error the bars compare, the random quantized inputs
of the two-linear ops, the eager-vs-compiled checks (same error, same outputs), the check
that reduce-overhead really recorded a CUDA graph and the run of ops in a child process (for
switches the extension reads once per process). Importable because pyproject's pytest options
put tests/ on the path."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F


def oracle(x, w, s, b, gelu=False):
    """fp32 reference from the dequantized weights."""
    y = x.float() @ (w.float() * s[:, None]).t()
    if b is not None:
        y = y + b.float()
    return F.gelu(y) if gelu else y


def torch_same_precision(x, w, s, b, gelu=False):
    """What a user would write in torch at the activation precision."""
    y = F.linear(x, w.to(x.dtype)) * s
    if b is not None:
        y = y + b
    y = y.to(x.dtype)
    return F.gelu(y) if gelu else y


def rel_err(a, ref):
    return ((a.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_within_2x_torch(ours, ref, peer, what):
    e_ours, e_peer = rel_err(ours, ref), rel_err(peer, ref)
    # 2x the same-precision torch error, plus a floor for the (rare) exact peer
    assert e_ours <= 2 * e_peer + 1e-6, f"{what}: ours {e_ours:.3e} vs torch {e_peer:.3e}"


def make_weights(N, K, dtype, device, bias=True):
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    s = (torch.rand(N, device=device) * 2e-3 + 1e-4).float()
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return w, s, b


def make_linear(lead, N, K, dtype, device, bias=True, x_scale=1.0):
    """(x [*lead, K], weight int8 [N, K], scales fp32 [N], bias [N] or None)."""
    x = (torch.randn(*lead, K, device=device) * x_scale).to(dtype)
    return (x, *make_weights(N, K, dtype, device, bias))


def make_pair(lead, N1, K1, N2, K2, dtype, device, bias=(True, True), x_scale=1.0):
    """The 8 tensor arguments (x1, weight1, scales1, bias1, x2, weight2, scales2, bias2)."""
    return (*make_linear(lead, N1, K1, dtype, device, bias[0], x_scale),
            *make_linear(lead, N2, K2, dtype, device, bias[1], x_scale))


def assert_same_error_eager_and_compiled(op, args, msg):
    pattern = re.escape(msg)
    with pytest.raises(RuntimeError, match=pattern):
        op(*args)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=pattern):
        torch.compile(lambda *a: op(*a), fullgraph=True)(*args)


def assert_compiled_equals_eager(module, input_sets):
    """torch.compile(module, fullgraph=True) returns exactly the eager outputs for every tuple of
    inputs in input_sets (a fresh dynamo state; later shapes may recompile)."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    for inputs in input_sets:
        for a, b in zip(compiled(*inputs), module(*inputs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def reset_compile_counters():
    """A fresh dynamo state and zeroed counters, before the calls assert_cuda_graph_recorded checks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def assert_cuda_graph_recorded(device):
    """After torch.compile(mode="reduce-overhead") calls: inductor skipped no CUDA graph (so a
    "skipping cudagraphs" fallback fails the test) and recorded at least one on ``device``."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor skipped CUDA graphs"
    mgr = cudagraph_trees.get_container(device.index).tree_manager
    assert mgr is not None and len(mgr.roots) > 0, "no CUDA graph was recorded"


def child_outputs(tmp_path, script: str, payload, name: str, **env) -> list:
    """Run `script` in a child Python with `env` added to the environment (switches the CUDA
    extension reads once per process): it gets the path of `payload` (saved with torch.save)
    as argv[1] and saves its list of outputs to argv[2], which is loaded and returned."""
    args, out = tmp_path / f"{name}-in.pt", tmp_path / f"{name}-out.pt"
    torch.save(payload, args)
    subprocess.run([sys.executable, "-c", script, str(args), str(out)], env=dict(os.environ, **env),
                   check=True, timeout=300)
    return torch.load(out)

