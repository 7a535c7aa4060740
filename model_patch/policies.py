"""KV-cache policy specs: parse a policy name and build its cache.

Accepted spellings (the same strings the decoder, the patching API and the
benchmark take)::

    full                 keep every token
    h2o                  H2O with 252 heavy hitters + 252 recent tokens (the reference study)
    h2o:HEAVY,RECENT     H2O, e.g. h2o:25,231
    sink:N_SINK,WINDOW   StreamingLLM: the first N_SINK tokens + the WINDOW newest, e.g. sink:4,500
    window:W             the W newest tokens

The budget (tokens held between steps) is HEAVY + RECENT, N_SINK + WINDOW or W.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

H2O_DEFAULT = (252, 252)

_FORMS = "full, h2o, h2o:HEAVY,RECENT, sink:N_SINK,WINDOW or window:W"


@dataclass(frozen=True)
class PolicySpec:
    """A KV-cache policy and its parameters.

    ``name`` is one of ``full``, ``h2o``, ``sink``, ``window``. Only the fields of
    that policy are used: ``heavy``/``recent`` (h2o), ``n_sink``/``window`` (sink),
    ``window`` (window).
    """

    name: str
    heavy: int = 0
    recent: int = 0
    n_sink: int = 0
    window: int = 0

    def __post_init__(self):
        fields = {"full": (), "h2o": ("heavy", "recent"), "sink": ("n_sink", "window"), "window": ("window",)}
        if self.name not in fields:
            raise ValueError(f"unknown KV-cache policy {self.name!r}; expected {_FORMS}")
        for f in fields[self.name]:
            if getattr(self, f) < 0:
                raise ValueError(f"{self.name} policy: {f} must be >= 0, got {getattr(self, f)}")
        if self.name == "sink" and self.window < 1:
            # the window holds the current token, which always attends to itself
            raise ValueError(f"sink policy: window must be >= 1, got {self.window}")
        if self.name != "full" and self.budget < 1:
            raise ValueError(f"{self.name} policy: the budget must be >= 1 token, got {self.budget} ({self})")

    @property
    def budget(self) -> int | None:
        """Tokens held between decode steps; None for ``full``."""
        return {"full": None, "h2o": self.heavy + self.recent, "sink": self.n_sink + self.window,
                "window": self.window}[self.name]

    def __str__(self) -> str:
        return {"full": "full", "h2o": f"h2o:{self.heavy},{self.recent}", "sink": f"sink:{self.n_sink},{self.window}",
                "window": f"window:{self.window}"}[self.name]


def parse_policy(text: str | PolicySpec) -> PolicySpec:
    """Parse ``full`` | ``h2o`` | ``h2o:HEAVY,RECENT`` | ``sink:N_SINK,WINDOW`` | ``window:W``."""
    if isinstance(text, PolicySpec):
        return text
    name, _, args = text.strip().lower().partition(":")
    arity = {"full": 0, "h2o": 2, "sink": 2, "window": 1}
    if name not in arity:
        raise ValueError(f"unknown KV-cache policy {text!r}; expected {_FORMS}")
    if not args:
        if name == "h2o":
            return PolicySpec("h2o", heavy=H2O_DEFAULT[0], recent=H2O_DEFAULT[1])
        if arity[name]:
            raise ValueError(f"KV-cache policy {text!r} needs parameters; expected {_FORMS}")
        return PolicySpec(name)
    if arity[name] == 0:
        raise ValueError(f"KV-cache policy 'full' takes no parameters, got {text!r}")
    parts = [p.strip() for p in args.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"KV-cache policy {text!r}: parameters must be integers; expected {_FORMS}") from None
    if len(values) != arity[name]:
        raise ValueError(f"KV-cache policy {text!r}: {name} takes {arity[name]} integer parameter(s), "
                         f"got {len(values)}; expected {_FORMS}")
    if name == "h2o":
        return PolicySpec("h2o", heavy=values[0], recent=values[1])
    if name == "sink":
        return PolicySpec("sink", n_sink=values[0], window=values[1])
    return PolicySpec("window", window=values[0])


def make_cache(spec: str | PolicySpec, n_layers: int, batch_size: int, n_heads: int, head_dim: int,
               max_len: int, dtype: torch.dtype, device: torch.device | str):
    """Build the static-shape cache of a policy (see ``model_patch.kv_cache``).

    ``max_len`` is the longest sequence (prompt + generated tokens) the cache will
    see. ``full`` allocates ``max_len`` slots; the evicting policies allocate
    ``min(budget + 1, max_len)`` slots, so their memory does not grow with the
    decode length, and a budget >= the sequence length simply never evicts.
    """
    from .kv_cache import FullCache, H2OCache, SinkCache, WindowCache

    spec = parse_policy(spec)
    shape = (n_layers, batch_size, n_heads, head_dim, max_len, dtype, device)
    if spec.name == "full":
        return FullCache(*shape)
    if spec.name == "h2o":
        return H2OCache(*shape, heavy=spec.heavy, recent=spec.recent)
    if spec.name == "sink":
        return SinkCache(*shape, n_sink=spec.n_sink, window=spec.window)
    return WindowCache(*shape, window=spec.window)
