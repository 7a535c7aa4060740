"""`python -m bench.h2o_quality`: model sources and errors (the full table takes minutes; this
runs a few tokens)."""
from __future__ import annotations

import pytest

from bench import h2o_quality


def test_random_preset_with_tokenizer_runs(gutenberg_path, neox_tokenizer_path, capsys):
    h2o_quality.main(["--model", "random:pythia-14m", "--tokenizer", str(neox_tokenizer_path),
                      "--data", str(gutenberg_path), "--books", "1", "--prefill", "8", "--decode", "8",
                      "--policies", "full", "h2o:4,4"])
    out = capsys.readouterr().out
    assert out.startswith("# random:pythia-14m, 1 books x (prefill 8 + decode 8)")
    assert "| h2o:4,4 |" in out and "| full |" in out


def test_random_preset_without_tokenizer_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        h2o_quality.main(["--model", "random:pythia-14m"])
    assert info.value.code == 2
    assert "comes without a tokenizer: pass --tokenizer" in capsys.readouterr().err


def test_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        h2o_quality.main(["--model", "random:pythia-3b"])
    assert info.value.code == 2
    assert "unknown preset 'random:pythia-3b'" in capsys.readouterr().err
