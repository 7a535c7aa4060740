"""The kernel switches read from the environment: bad values are an error, not a silent default."""
from __future__ import annotations

import re

import pytest

from w8a16_ops._build import ENV_SWITCHES, check_env


@pytest.mark.parametrize("name", sorted(ENV_SWITCHES))
def test_accepted_values_and_unset_pass(name, monkeypatch):
    for value in ENV_SWITCHES[name] + ("",):
        monkeypatch.setenv(name, value)
        check_env()
    monkeypatch.delenv(name)
    check_env()


@pytest.mark.parametrize("name,bad", [("W8A16_PDL", "off"), ("W8A16_PDL", "2"), ("W8A16_PDL", " 1"),
                                      ("W8A16_GEMM_KTILE", "16"), ("W8A16_GEMM_KTILE", "64 ")])
def test_bad_values_name_the_variable(name, bad, monkeypatch):
    monkeypatch.setenv(name, bad)
    allowed = ", ".join(ENV_SWITCHES[name])
    with pytest.raises(ValueError, match=re.escape(f"{name} must be one of {allowed} (or unset), got {bad!r}")):
        check_env()
