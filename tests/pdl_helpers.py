"""Helper of the overlap tests (programmatic dependent launch): inputs that the kernel launched
just before the op under test writes last. Importable because pyproject's pytest options put
tests/ on the path."""
from __future__ import annotations

import torch


def late_copies(tensors, tail_of: int = 1 << 25):
    """Copies of `tensors` that live at the end of one large buffer, and a function that rewrites
    the whole buffer with a single copy kernel (the tensors' new values last) from given values."""
    sizes = [t.numel() for t in tensors]
    dtype = tensors[0].dtype
    buf = torch.full((tail_of + sum(sizes),), 7.0, dtype=dtype, device="cuda")  # old values: 7
    views, o = [], tail_of
    for t, n in zip(tensors, sizes):
        views.append(buf[o:o + n].view(t.shape))
        o += n
    src = torch.randn(buf.numel(), dtype=torch.float32, device="cuda").to(dtype)

    def rewrite(values):
        o = tail_of
        for v, n in zip(values, sizes):
            src[o:o + n].copy_(v.reshape(-1))
            o += n
        buf.copy_(src)  # the kernel just before the op under test
    return views, rewrite
