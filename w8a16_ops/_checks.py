"""Argument checks shared by the CPU implementations and the fake kernels.

The CUDA side (csrc/ops.cpp) makes the same checks in the same order with the
same messages, so a bad call fails identically in eager mode and under
torch.compile (where only the fake kernel runs at trace time). Keep them in step.
"""
from __future__ import annotations

import torch

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}

MIN_CAPABILITY = (8, 0)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _desc(t: torch.Tensor) -> str:
    return f"{dtype_name(t.dtype)} {list(t.shape)}"


def _fail(op: str, msg: str) -> None:
    raise RuntimeError(f"{op}: {msg}")


def _act_dtypes(device: torch.device) -> tuple[tuple[torch.dtype, ...], str]:
    if device.type == "cuda":
        return (torch.float16, torch.bfloat16), "float16 or bfloat16"
    return (torch.float16, torch.bfloat16, torch.float32), "float16, bfloat16 or float32"


def _check_devices(op: str, named: list[tuple[str, torch.Tensor | None]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    devices = {t.device for _, t in present}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in present)
        _fail(op, f"all tensors must be on the same device, got {where}")


def _check_capability(op: str, device: torch.device) -> None:
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        _fail(op, f"requires compute capability >= 8.0, found {major}.{minor}")


def check_linear(op: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None, suffix: str = "") -> None:
    """Validate the arguments of w8a16.linear / w8a16.linear_gelu.

    ``weight`` is int8, or 16-bit weights in x's own dtype (float16 / bfloat16; float32 too on
    CPU): the unquantized form, which runs the same gemv on CUDA up to 32 rows.

    ``suffix`` is appended to the argument names in the messages ("x1", "weight1", ...)
    when one op takes several linears (linear_pair, linear_sum).
    """
    nx, nw, ns, nb = (f"{n}{suffix}" for n in ("x", "weight", "scales", "bias"))
    _check_devices(op, [(nx, x), (nw, weight), (ns, scales), (nb, bias)])
    allowed, allowed_txt = _act_dtypes(x.device)
    if x.dtype not in allowed:
        _fail(op, f"{nx} must be {allowed_txt}, got {dtype_name(x.dtype)}")
    if x.dim() < 1:
        _fail(op, f"{nx} must have shape [..., K], got a 0-d tensor")
    if weight.dtype not in (torch.int8, x.dtype) or weight.dim() != 2:
        _fail(op, f"{nw} must be int8 (or {nx}'s dtype, {dtype_name(x.dtype)}) of shape [N, K], got {_desc(weight)}")
    if not weight.is_contiguous():
        _fail(op, f"{nw} must be contiguous (row-major [N, K]), got strides {list(weight.stride())}")
    N, K = weight.shape
    if x.shape[-1] != K:
        _fail(op, f"K mismatch: {nx} has K={x.shape[-1]} in its last dim, {nw} [N, K] has K={K}")
    if scales.dtype != torch.float32 or scales.dim() != 1 or scales.shape[0] != N:
        _fail(op, f"{ns} must be float32 of shape [{N}], got {_desc(scales)}")
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1 or bias.shape[0] != N):
        _fail(op, f"{nb} must be {dtype_name(x.dtype)} of shape [{N}], got {_desc(bias)}")
    if x.device.type == "cuda":
        _check_capability(op, x.device)
        if K % 16 != 0:
            _fail(op, f"K must be a multiple of 16 on CUDA, got K={K} ({nw})")


def check_linear2(op: str, x1: torch.Tensor, weight1: torch.Tensor, scales1: torch.Tensor,
                  bias1: torch.Tensor | None, x2: torch.Tensor, weight2: torch.Tensor, scales2: torch.Tensor,
                  bias2: torch.Tensor | None, same_n: bool) -> None:
    """Validate the arguments of w8a16.linear_pair (``same_n=False``) / w8a16.linear_sum (``True``):
    each linear as ``check_linear``, then one device, one dtype and the same leading dims for
    x1 and x2, and for linear_sum the same N."""
    _check_devices(op, [("x1", x1), ("weight1", weight1), ("scales1", scales1), ("bias1", bias1),
                        ("x2", x2), ("weight2", weight2), ("scales2", scales2), ("bias2", bias2)])
    if x1.dtype != x2.dtype:  # before the per-linear checks, whose bias messages name x's dtype
        _fail(op, f"x1 and x2 must have the same dtype, got {dtype_name(x1.dtype)} and {dtype_name(x2.dtype)}")
    check_linear(op, x1, weight1, scales1, bias1, suffix="1")
    check_linear(op, x2, weight2, scales2, bias2, suffix="2")
    if weight1.dtype != weight2.dtype:  # one kernel: both int8 or both 16-bit
        _fail(op, f"weight1 and weight2 must have the same dtype, got {dtype_name(weight1.dtype)} and "
                  f"{dtype_name(weight2.dtype)}")
    if x1.shape[:-1] != x2.shape[:-1]:
        _fail(op, f"x1 and x2 must have the same leading dims [...], got {list(x1.shape)} and {list(x2.shape)}")
    if same_n and weight1.shape[0] != weight2.shape[0]:
        _fail(op, f"weight1 and weight2 must have the same N (their outputs are summed), got "
                  f"N={weight1.shape[0]} and N={weight2.shape[0]}")


def norm_workspace_numel(n: int) -> int:
    """int32 elements of the workspace w8a16.linear_sum_norm needs for N = ``n`` channels:
    4 arrival counters, then scratch for the per-row partial statistics of every 16 channels."""
    return 4 + 64 * -(-int(n) // 16)


def _check_norms(op: str, norms: list[tuple[str, torch.Tensor]], dtype: torch.dtype, N: int, act: str,
                 eps: float) -> None:
    """Layer-norm weights and biases: [N] in the activation's dtype (the CUDA kernels read them as
    that type, so float32 ones are refused rather than rounded behind the caller's back); eps > 0."""
    for name, t in norms:
        if t.dtype != dtype or t.dim() != 1 or t.shape[0] != N:
            _fail(op, f"{name} must be {dtype_name(dtype)} of shape [{N}] (norm weights and biases take {act}'s "
                      f"dtype), got {_desc(t)}")
    if not eps > 0:  # also refuses nan
        _fail(op, f"eps must be > 0, got {eps}")


def check_linear_sum_norm(op: str, x1: torch.Tensor, weight1: torch.Tensor, scales1: torch.Tensor,
                          bias1: torch.Tensor | None, x2: torch.Tensor, weight2: torch.Tensor,
                          scales2: torch.Tensor, bias2: torch.Tensor | None, residual: torch.Tensor,
                          norm_weight1: torch.Tensor, norm_bias1: torch.Tensor, norm_weight2: torch.Tensor,
                          norm_bias2: torch.Tensor, eps: float, workspace: torch.Tensor) -> None:
    """Validate the arguments of w8a16.linear_sum_norm: the two linears as linear_sum's, then the
    residual ([..., N] in x's dtype), the four norm tensors ([N] in x's dtype: the CUDA kernel
    reads them as x's type, so float32 ones are refused rather than rounded behind the caller's
    back), eps > 0 and the workspace (see ``norm_workspace_numel``)."""
    norms = [("norm_weight1", norm_weight1), ("norm_bias1", norm_bias1), ("norm_weight2", norm_weight2),
             ("norm_bias2", norm_bias2)]
    _check_devices(op, [("x1", x1), ("weight1", weight1), ("scales1", scales1), ("bias1", bias1),
                        ("x2", x2), ("weight2", weight2), ("scales2", scales2), ("bias2", bias2),
                        ("residual", residual), *norms, ("workspace", workspace)])
    check_linear2(op, x1, weight1, scales1, bias1, x2, weight2, scales2, bias2, same_n=True)
    if weight1.dtype != torch.int8:
        _fail(op, f"weight1 and weight2 must be int8 (16-bit weights are not supported by this op), got "
                  f"{dtype_name(weight1.dtype)}")
    N, dt = weight1.shape[0], dtype_name(x1.dtype)
    out = [*x1.shape[:-1], N]
    if residual.dtype != x1.dtype or list(residual.shape) != out:
        _fail(op, f"residual must be {dt} of shape {out} (x's leading dims, then N), got {_desc(residual)}")
    _check_norms(op, norms, x1.dtype, N, "x", eps)
    need = norm_workspace_numel(N)
    if workspace.dtype != torch.int32 or workspace.dim() != 1 or workspace.numel() < need:
        _fail(op, f"workspace must be int32 of shape [n] with n >= {need} (w8a16_ops.norm_workspace({N})), "
                  f"got {_desc(workspace)}")
    if not workspace.is_contiguous():
        _fail(op, f"workspace must be contiguous, got strides {list(workspace.stride())}")


def check_add_norm_pair(op: str, a: torch.Tensor, b: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
                        weight2: torch.Tensor, bias2: torch.Tensor, eps: float) -> None:
    """Validate the arguments of w8a16.add_norm_pair: a [..., N] (an activation dtype, N >= 1),
    b like a, the four norm tensors [N] in a's dtype (the CUDA kernel reads them as a's type),
    eps > 0."""
    norms = [("weight1", weight1), ("bias1", bias1), ("weight2", weight2), ("bias2", bias2)]
    _check_devices(op, [("a", a), ("b", b), *norms])
    allowed, allowed_txt = _act_dtypes(a.device)
    if a.dtype not in allowed:
        _fail(op, f"a must be {allowed_txt}, got {dtype_name(a.dtype)}")
    if a.dim() < 1 or a.shape[-1] < 1:
        _fail(op, f"a must have shape [..., N] with N >= 1, got {_desc(a)}")
    dt, N = dtype_name(a.dtype), a.shape[-1]
    if b.dtype != a.dtype or b.shape != a.shape:
        _fail(op, f"b must be {dt} of shape {list(a.shape)} (like a), got {_desc(b)}")
    _check_norms(op, norms, a.dtype, N, "a", eps)
    _check_capability(op, a.device)


def _check_query(op: str, q: torch.Tensor) -> tuple[int, int, int]:
    allowed, allowed_txt = _act_dtypes(q.device)
    if q.dtype not in allowed:
        _fail(op, f"q must be {allowed_txt}, got {dtype_name(q.dtype)}")
    if q.dim() != 3:
        _fail(op, f"q must have shape [B, H, D], got {_desc(q)}")
    return tuple(q.shape)


def _check_caches(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """k_cache, v_cache: contiguous [B, H, S, D] in q's dtype. Returns S."""
    B, H, D = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype or t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
            _fail(op, f"{name} must be {dtype_name(q.dtype)} of shape [{B}, {H}, S, {D}], got {_desc(t)}")
        if not t.is_contiguous():
            _fail(op, f"{name} must be contiguous, got strides {list(t.stride())}")
    S = k_cache.shape[2]
    if v_cache.shape[2] != S:
        _fail(op, f"v_cache must have S={S} slots like k_cache, got {_desc(v_cache)}")
    return S


def check_decode_attention(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           length: torch.Tensor, scores: torch.Tensor | None) -> None:
    """Validate the arguments of w8a16.decode_attention."""
    _check_devices(op, [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("length", length),
                        ("scores", scores)])
    B, H, D = _check_query(op, q)
    S = _check_caches(op, q, k_cache, v_cache)
    if length.dtype != torch.int32 or length.dim() != 1 or length.shape[0] != B:
        _fail(op, f"length must be int32 of shape [{B}], got {_desc(length)}")
    if scores is not None:
        if scores.dtype != torch.float32 or list(scores.shape) != [B, H, S]:
            _fail(op, f"scores must be float32 of shape [{B}, {H}, {S}], got {_desc(scores)}")
        if not scores.is_contiguous():
            _fail(op, f"scores must be contiguous, got strides {list(scores.stride())}")
    if q.device.type == "cuda":
        _check_capability(op, q.device)
        if D % 8 != 0 or D > 256:
            _fail(op, f"head_dim D must be a multiple of 8 and at most 256 on CUDA, got D={D}")


def check_cache_attention(op: str, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, seen: torch.Tensor,
                          evict: tuple | None = None, cos: torch.Tensor | None = None,
                          sin: torch.Tensor | None = None) -> None:
    """Validate the arguments of w8a16.cache_attention_full / cache_attention_evict.

    ``evict`` is ``(pos, free, scores, budget, n_sink, recent)`` for the evicting op.
    """
    pos, free, scores = evict[:3] if evict is not None else (None, None, None)
    _check_devices(op, [("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache),
                        ("v_cache", v_cache), ("seen", seen), ("pos", pos), ("free", free),
                        ("scores", scores), ("cos", cos), ("sin", sin)])
    B, H, D = _check_query(op, q)
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.dtype != q.dtype or list(t.shape) != [B, H, D]:
            _fail(op, f"{name} must be {dtype_name(q.dtype)} of shape [{B}, {H}, {D}], got {_desc(t)}")
    S = _check_caches(op, q, k_cache, v_cache)
    if S < 1:
        _fail(op, f"the cache must have at least one slot, got S={S}")
    if seen.dtype != torch.int64 or seen.numel() != 1 or seen.dim() != 1:
        _fail(op, f"seen must be int64 of shape [1], got {_desc(seen)}")
    if (cos is None) != (sin is None):
        _fail(op, "cos and sin must be given together (rotary) or both be None")
    if cos is not None:
        R = cos.shape[0] if cos.dim() == 1 else -1
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dtype != q.dtype or t.dim() != 1 or t.shape[0] != R or R % 2 or R > D or not t.is_contiguous():
                _fail(op, f"{name} must be a contiguous {dtype_name(q.dtype)} vector [R] with R even and "
                          f"R <= D={D} (and cos, sin of one length), got {_desc(t)}")
    if evict is not None:
        budget, n_sink, recent = evict[3:]
        if pos.dtype != torch.int32 or list(pos.shape) != [B, H, S] or not pos.is_contiguous():
            _fail(op, f"pos must be contiguous int32 of shape [{B}, {H}, {S}], got {_desc(pos)}")
        if free.dtype != torch.int64 or list(free.shape) != [B, H] or not free.is_contiguous():
            _fail(op, f"free must be contiguous int64 of shape [{B}, {H}], got {_desc(free)}")
        if scores is not None and (scores.dtype != torch.float32 or list(scores.shape) != [B, H, S]
                                   or not scores.is_contiguous()):
            _fail(op, f"scores must be contiguous float32 of shape [{B}, {H}, {S}], got {_desc(scores)}")
        if budget < 1 or n_sink < 0 or recent < 0:
            _fail(op, f"need budget >= 1, n_sink >= 0 and recent >= 0, got budget={budget}, "
                      f"n_sink={n_sink}, recent={recent}")
        if n_sink + recent > budget:
            _fail(op, f"n_sink + recent must not exceed budget (nothing could be evicted), got "
                      f"n_sink={n_sink}, recent={recent}, budget={budget}")
    if q.device.type == "cuda":
        _check_capability(op, q.device)
        if D % 8 != 0 or D > 256:
            _fail(op, f"head_dim D must be a multiple of 8 and at most 256 on CUDA, got D={D}")
