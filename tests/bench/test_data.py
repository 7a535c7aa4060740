"""bench.data: local text loaders (byte-exact), directory rules, the wikitext fallback, slicing."""
from __future__ import annotations

import json
import lzma
import subprocess
import sys

import pytest
import torch

from bench import data
from bench.data import Corpus, DataError, concat_sequences, document_sequences, load_corpus


class CharTokenizer:
    """One token per character (its code point): makes slicing checks exact."""

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def test_raw_keeps_crlf_byte_exact(tmp_path):
    raw = "first line\r\n = Title = \r\nünïcode\r\n".encode("utf-8")
    p = tmp_path / "x.raw"
    p.write_bytes(raw)
    corpus = load_corpus(str(p))
    assert corpus.docs == [raw.decode("utf-8")]
    assert "\r\n" in corpus.docs[0]


def test_shared_wikitext_read_byte_exact(wikitext_path):
    text = load_corpus(str(wikitext_path)).docs[0]
    assert len(text.encode("utf-8")) == wikitext_path.stat().st_size == 1_290_547
    assert text.count("\r\n") == 2891


def test_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\nline two\n")
    assert load_corpus(str(tmp_path / "a.txt")).docs == ["line one\nline two\n"]
    rows = [{"text": "doc A\r\nmore"}, {"text": "doc B", "title": "t"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_corpus(str(tmp_path / "b.jsonl")).docs == ["doc A\r\nmore", "doc B"]
    with lzma.open(tmp_path / "c.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "xz doc"}) + "\n")
    assert load_corpus(str(tmp_path / "c.jsonl.xz")).docs == ["xz doc"]


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\nnot json\n', r"b.jsonl:2: not valid JSON"),
    ('{"title": "no text"}\n', r"b.jsonl:1: expected a JSON object with a string 'text' field"),
    ('\n\n', r"no documents found"),
])
def test_bad_jsonl(tmp_path, content, match):
    (tmp_path / "b.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_corpus(str(tmp_path / "b.jsonl"))


def test_directory_rules(tmp_path):
    (tmp_path / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "a.raw").write_text("A", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_corpus(str(tmp_path)).docs == ["A", "B"]  # name order, unsupported files skipped
    (tmp_path / "wiki.test.raw").write_text("T", encoding="utf-8")
    (tmp_path / "wiki.valid.raw").write_text("V", encoding="utf-8")
    assert load_corpus(str(tmp_path)).docs == ["T"]  # a folder with a test split: only the test split
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .raw/.txt/.jsonl"):
        load_corpus(str(empty))


def test_shared_wikitext_directory_reads_the_test_split(wikitext_path):
    corpus = load_corpus(str(wikitext_path.parent))
    assert corpus.docs == [data.read_text_file(wikitext_path)]


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_corpus(str(tmp_path / "x.csv"))


def test_wikitext_falls_back_to_local_copy(monkeypatch, wikitext_path):
    def offline():
        raise ConnectionError("offline")
    monkeypatch.setattr(data, "_load_hf_wikitext", offline)
    monkeypatch.setattr(data, "WIKITEXT_FALLBACK", wikitext_path)
    corpus = load_corpus("wikitext")
    assert corpus.source == str(wikitext_path)
    assert corpus.docs == [data.read_text_file(wikitext_path)]
    assert any("could not be loaded" in n and "ConnectionError: offline" in n for n in corpus.notes)


def test_wikitext_without_fallback_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_load_hf_wikitext", lambda: (_ for _ in ()).throw(ImportError("no datasets")))
    monkeypatch.setattr(data, "WIKITEXT_FALLBACK", tmp_path / "missing.raw")
    with pytest.raises(DataError, match=r"no local copy at .*missing.raw; pass --dataset PATH"):
        load_corpus("wikitext")


def test_local_files_never_import_datasets(tmp_path):
    (tmp_path / "a.raw").write_bytes(b"x\r\ny\r\n")
    code = ("import sys; sys.modules['datasets'] = None\n"  # any `import datasets` now raises
            "from bench.data import load_corpus\n"
            f"print(repr(load_corpus({str(tmp_path)!r}).docs[0]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr("x\r\ny\r\n")


def test_concat_sequences_are_consecutive_slices():
    corpus = Corpus(["abcdefghij", "KLMN"], "test")
    ids = concat_sequences(CharTokenizer(), corpus, n_seqs=3, seq_len=4)
    text = "abcdefghij\n\nKLMN"
    assert ids.dtype == torch.int64 and ids.shape == (3, 4)
    assert ids.tolist() == [[ord(c) for c in text[i * 4:(i + 1) * 4]] for i in range(3)]
    with pytest.raises(DataError, match=r"has 16 tokens, fewer than batch 5 x 4"):
        concat_sequences(CharTokenizer(), corpus, n_seqs=5, seq_len=4)


def test_document_sequences_follow_the_h2o_protocol():
    corpus = Corpus(["0123456789" * 3, "abcdefghijklmnopqrstuvwxyz", "unused"], "test")
    ids = document_sequences(CharTokenizer(), corpus, n_seqs=2, seq_len=5, char_start=10, char_end=20)
    assert ids.tolist() == [[ord(c) for c in "01234"], [ord(c) for c in "klmno"]]
    with pytest.raises(DataError, match="fewer than 4"):
        document_sequences(CharTokenizer(), corpus, n_seqs=4, seq_len=5)
    with pytest.raises(DataError, match=r"document 0 .* has 10 tokens in characters \[10:20\], fewer than 11"):
        document_sequences(CharTokenizer(), corpus, n_seqs=1, seq_len=11, char_start=10, char_end=20)
