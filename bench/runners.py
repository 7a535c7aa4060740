"""Teacher-forced decode runs: our Decoder and the two Hugging Face peers.

Every runner does the same work on the same tokens. ``seqs`` is int64 [B, P + D + 1]:
the prefill consumes tokens ``[0, P)``, then decode step ``i`` (``0 <= i < D``) feeds
the true token ``P + i`` and scores the true token ``P + i + 1``. The perplexity is
taken over those ``B x D`` decode-step predictions, pooled (``exp`` of the mean NLL),
the protocol of ``bench.h2o_quality``; the prefill's own prediction of token
``P`` is not counted.

Timing (``run_teacher_forced``):

1. compile / warm-up: prefill + ``warmup_steps`` decode steps (torch.compile,
   CUDA-graph recording, cuBLAS and allocator warm-up all happen here), synchronized;
2. ``reset()``, then the measured run: prefill (timed), then ``D`` decode steps timed
   as one span from the first launch to a final synchronize. Nothing inside the
   loop synchronizes with the host: the target log-probs are copied into a
   preallocated device buffer and read once at the end.

Peers:

* ``DecoderPeer``: ``model_patch.decoder.Decoder`` (eager prefill, compiled
  CUDA-graph decode step) over an FP16 or a W8A16 model, with any KV policy.
* ``HFEagerPeer``: what the reference study ran: ``model(...)`` in eager mode with a
  ``DynamicCache``, one forward per token, ``logits_to_keep=1`` at prefill as
  ``generate`` does.
* ``HFCompilePeer``: what ``model.generate(cache_implementation="static")`` does on a
  GPU, made teacher-forced: a ``StaticCache`` of ``P + D`` slots, an eager prefill,
  then every decode step through ``torch.compile(model.__call__, mode="reduce-overhead")``
  with ``generate``'s default ``CompileConfig`` (fullgraph=False, dynamic=None,
  inductor), which replays as a CUDA graph. No attention mask is passed (no
  padding), so the causal mask and the positions are built inside the compiled
  graph from the cache's length tensor; ``generate`` builds the mask eagerly
  outside, so this is if anything slightly kinder to the peer. As in ``generate``,
  the next-token logits are read from the graph output in fp32 outside the graph
  (here: one log-softmax + gather instead of the greedy argmax).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class DecodeRun:
    """Result of one teacher-forced run. ``logprobs`` is fp32 [B, D] on the CPU."""

    logprobs: torch.Tensor
    prefill_s: float
    decode_s: float
    compile_s: float
    kv_bytes: int | None

    @property
    def n_tokens(self) -> int:
        return self.logprobs.numel()

    @property
    def nll(self) -> float:
        return float(-self.logprobs.double().sum())

    @property
    def ppl(self) -> float:
        """Pooled perplexity over every decode-step prediction (inf when any log-prob is -inf)."""
        return float(torch.exp(-self.logprobs.double().mean()))

    def ppl_per_sequence(self) -> list[float]:
        return torch.exp(-self.logprobs.double().mean(dim=1)).tolist()


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[b, targets[b]] in fp32. logits [B, V], targets int64 [B] -> fp32 [B]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bar(total: int, desc: str, enabled: bool):
    import sys

    # In a log (not a terminal) redraw rarely, so that the progress does not bury the table.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, mininterval=interval, dynamic_ncols=True)


class DecoderPeer:
    """Our ``model_patch.decoder.Decoder`` (any model, any KV policy)."""

    def __init__(self, model, batch_size: int, max_len: int, kv="full", compile=None):
        from model_patch.decoder import Decoder

        self.decoder = Decoder(model, batch_size=batch_size, max_len=max_len, kv=kv, compile=compile)
        self.compiled = self.decoder.compiled
        self.cuda_graphs = self.decoder.compiled and self.decoder.device.type == "cuda"

    def reset(self) -> None:
        self.decoder.reset()

    def prefill(self, input_ids: torch.Tensor) -> None:
        self.decoder.prefill(input_ids)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_step(tokens, targets)[1]

    def kv_bytes(self) -> int | None:
        return int(self.decoder.memory_bytes())


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class HFEagerPeer:
    """HF eager forward with a DynamicCache, one token per call (the reference study's loop)."""

    compiled = False
    cuda_graphs = False

    def __init__(self, model):
        self.model = model
        self.cache = None

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def prefill(self, input_ids: torch.Tensor) -> None:
        self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], past_key_values=self.cache, use_cache=True)
        return target_logprobs(out.logits[:, -1], targets)

    def kv_bytes(self) -> int | None:
        return _cache_bytes(self.cache)


class HFCompilePeer:
    """HF StaticCache + ``torch.compile(model.__call__, mode="reduce-overhead")`` (see the module doc).

    ``backend`` is ``inductor`` (what ``generate`` uses); on CPU the study passes
    ``eager`` (dynamo tracing only) to keep smoke tests fast, and says so.
    """

    def __init__(self, model, max_len: int, backend: str = "inductor"):
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        kwargs = dict(fullgraph=False, dynamic=None, backend=backend)
        if backend == "inductor":
            kwargs["mode"] = "reduce-overhead"
        self.forward = torch.compile(model.__call__, **kwargs)
        self.compiled = True
        self.cuda_graphs = backend == "inductor" and next(model.parameters()).is_cuda

    def reset(self) -> None:
        self.cache.reset()

    def prefill(self, input_ids: torch.Tensor) -> None:
        # generate's prefill runs uncompiled
        self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous replay are consumed
        out = self.forward(input_ids=tokens[:, None], past_key_values=self.cache, use_cache=True)
        return target_logprobs(out.logits[:, -1], targets)

    def kv_bytes(self) -> int | None:
        return _cache_bytes(self.cache)


@torch.no_grad()
def run_teacher_forced(peer, seqs: torch.Tensor, prefill_len: int, warmup_steps: int = 3,
                       progress: bool = True, desc: str = "") -> DecodeRun:
    """Warm up, then time one teacher-forced prefill + decode of ``seqs`` (int64 [B, P + D + 1])."""
    device = seqs.device
    B, L = seqs.shape
    P = prefill_len
    D = L - P - 1
    if P < 1 or D < 1:
        raise ValueError(f"run_teacher_forced: need prefill_len >= 1 and at least one decode step, "
                         f"got sequences of {L} tokens with prefill_len {P}")
    prompt = seqs[:, :P].contiguous()            # [B, P]
    stream = seqs[:, P:].t().contiguous()        # [D + 1, B]: stream[i] is fed, stream[i + 1] is scored
    logprobs = torch.empty(D, B, dtype=torch.float32, device=device)
    warm = min(warmup_steps, D)
    prefix = f"{desc} " if desc else ""

    with _bar(1 + warm, prefix + "compile/warm-up", progress) as bar:
        _sync(device)
        t0 = time.perf_counter()
        peer.reset()
        peer.prefill(prompt)
        bar.update(1)
        for i in range(warm):
            peer.step(stream[i], stream[i + 1])
            bar.update(1)
        _sync(device)
        compile_s = time.perf_counter() - t0

    peer.reset()
    _sync(device)
    with _bar(1, prefix + "prefill", progress) as bar:
        t0 = time.perf_counter()
        peer.prefill(prompt)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        bar.update(1)

    with _bar(D, prefix + "decode", progress) as bar:
        t0 = time.perf_counter()
        for i in range(D):
            lp = peer.step(stream[i], stream[i + 1])
            logprobs[i].copy_(lp)  # the peer may overwrite lp at the next step (CUDA-graph output)
            bar.update(1)
        _sync(device)
        decode_s = time.perf_counter() - t0

    return DecodeRun(logprobs.t().cpu(), prefill_s, decode_s, compile_s, peer.kv_bytes())
