"""Benchmark text: load documents, tokenize them, cut teacher-forcing sequences.

Sources (``--dataset``):

* ``wikitext``: the WikiText-2 raw test split through HF ``datasets``
  (``wikitext``, ``wikitext-2-raw-v1``, split ``test``; rows joined as they are, each
  row already ends with its newline). When ``datasets`` or the data cannot be had
  (offline, not cached) it falls back to ``../shared/data/wikitext-2-raw/wiki.test.raw``
  and says so.
* a file: ``.raw`` / ``.txt`` (read byte-exact, ``newline=''``, so CRLF stays CRLF),
  ``.jsonl`` or ``.jsonl.xz`` (one JSON object per line with a ``text`` field, one
  document per line).
* a directory: its ``.raw`` / ``.txt`` / ``.jsonl`` / ``.jsonl.xz`` files in name
  order; when some of their names contain ``test`` (e.g. a WikiText-2 raw folder),
  only those, since the study measures the test split.

Local files never import ``datasets`` (the GPU image does not have it).
"""
from __future__ import annotations

import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("W8A16_SHARED", REPO.parent / "shared"))
WIKITEXT_FALLBACK = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
NEOX_TOKENIZER = SHARED / "data" / "gpt-neox-20b" / "tokenizer.json"

TEXT_SUFFIXES = (".raw", ".txt")
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz")


class DataError(ValueError):
    """A dataset that cannot be read or is too short; the message says what to do."""


@dataclass
class Corpus:
    """Documents read from one source, with a line describing where they came from."""

    docs: list[str]
    source: str
    notes: list[str] = field(default_factory=list)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in JSONL_SUFFIXES[::-1] + TEXT_SUFFIXES:  # .jsonl.xz before .jsonl
        if name.endswith(s):
            return s
    return path.suffix.lower()


def read_text_file(path: str | os.PathLike) -> str:
    """The file's exact text: UTF-8, no newline translation (CRLF is kept)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def read_jsonl(path: str | os.PathLike) -> list[str]:
    """The ``text`` field of every line of a ``.jsonl`` or ``.jsonl.xz`` file."""
    path = Path(path)
    opener = lzma.open if path.name.lower().endswith(".xz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
            docs.append(obj["text"])
    if not docs:
        raise DataError(f"{path}: no documents found")
    return docs


def read_file(path: Path) -> list[str]:
    suffix = _suffix(path)
    if suffix in TEXT_SUFFIXES:
        return [read_text_file(path)]
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    raise DataError(f"--dataset {path}: unsupported file type {suffix!r}; expected "
                    f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} or a directory of them")


def dataset_files(directory: Path) -> list[Path]:
    """The files of a dataset directory that the benchmark reads (see the module doc)."""
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and _suffix(p) in TEXT_SUFFIXES + JSONL_SUFFIXES)
    test = [p for p in files if "test" in p.name.lower()]
    return test or files


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the HF endpoint, so that an offline machine does not sit through
    ``datasets``' retries (about 30 s) before the local fallback."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hf_wikitext() -> list[str]:
    import datasets  # only here: local files must work without it

    if not _hub_reachable():
        datasets.config.HF_HUB_OFFLINE = True  # the local HF cache only; fails at once when not cached
    rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return ["".join(rows["text"])]


def load_corpus(spec: str) -> Corpus:
    """Read ``--dataset``: ``wikitext``, a file or a directory (see the module doc)."""
    if spec == "wikitext":
        try:
            return Corpus(_load_hf_wikitext(), "HF datasets wikitext/wikitext-2-raw-v1, split test")
        except Exception as e:  # ImportError, offline, not cached, ...
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if WIKITEXT_FALLBACK.exists():
                note = (f"HF datasets wikitext could not be loaded ({reason}); using the local copy "
                        f"{WIKITEXT_FALLBACK} (same test split, blank lines dropped, CRLF line ends)")
                return Corpus([read_text_file(WIKITEXT_FALLBACK)], str(WIKITEXT_FALLBACK), [note])
            raise DataError(f"--dataset wikitext: HF datasets could not load wikitext-2-raw-v1 ({reason}) "
                            f"and no local copy at {WIKITEXT_FALLBACK}; pass --dataset PATH to a "
                            ".raw/.txt/.jsonl file or a directory") from None
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"--dataset {spec}: no such file or directory (expected 'wikitext', a "
                        ".raw/.txt/.jsonl/.jsonl.xz file or a directory of them)")
    if path.is_dir():
        files = dataset_files(path)
        if not files:
            raise DataError(f"--dataset {spec}: the directory holds no .raw/.txt/.jsonl/.jsonl.xz file")
        docs = [d for p in files for d in read_file(p)]
        return Corpus(docs, ", ".join(str(p) for p in files))
    return Corpus(read_file(path), str(path))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (Pythia's tokenizer adds none anyway)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def concat_sequences(tokenizer, corpus: Corpus, n_seqs: int, seq_len: int) -> torch.Tensor:
    """The study's workload: ``n_seqs`` different contiguous slices of the tokenized text.

    The documents are joined with a blank line (a single document, such as WikiText-2's
    test split, is used as is), tokenized once, and cut into consecutive
    non-overlapping slices ``[i * seq_len, (i + 1) * seq_len)``.

    Returns:
        int64 [n_seqs, seq_len].
    """
    ids = encode(tokenizer, "\n\n".join(corpus.docs))
    need = n_seqs * seq_len
    if len(ids) < need:
        raise DataError(f"the dataset ({corpus.source}) has {len(ids)} tokens, fewer than batch {n_seqs} x "
                        f"{seq_len} (prefill + decode + 1) = {need}; use a larger dataset or shorter lengths")
    return torch.tensor(ids[:need], dtype=torch.int64).view(n_seqs, seq_len)


def document_sequences(tokenizer, corpus: Corpus, n_seqs: int, seq_len: int,
                       char_start: int = 10000, char_end: int = 400000) -> torch.Tensor:
    """The H2O issue's quality protocol: one sequence per document.

    For each of the first ``n_seqs`` documents in file order: characters
    ``text[char_start:char_end]``, tokenized without special tokens, first
    ``seq_len`` tokens.

    Returns:
        int64 [n_seqs, seq_len].
    """
    if len(corpus.docs) < n_seqs:
        raise DataError(f"the dataset ({corpus.source}) has {len(corpus.docs)} documents, fewer than {n_seqs}")
    rows = []
    for i, doc in enumerate(corpus.docs[:n_seqs]):
        ids = encode(tokenizer, doc[char_start:char_end])
        if len(ids) < seq_len:
            raise DataError(f"document {i} of {corpus.source} has {len(ids)} tokens in characters "
                            f"[{char_start}:{char_end}], fewer than {seq_len}")
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.int64)
