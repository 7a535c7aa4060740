"""Shared fixtures: seeds, the `cuda` marker, and paths into ../shared (offline data)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("W8A16_SHARED", REPO.parent / "shared"))
TINY_NEOX = SHARED / "models" / "tiny-neox-a"
WIKITEXT_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
GUTENBERG = SHARED / "data" / "gutenberg-en" / "gutenberg_en_valid.jsonl.xz"
NEOX_TOKENIZER = SHARED / "data" / "gpt-neox-20b" / "tokenizer.json"


def _cuda_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def pytest_collection_modifyitems(config, items):
    if _cuda_ok():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with compute capability >= 8.0")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"offline data not found: {path} (set W8A16_SHARED to the shared/ folder)")
    return path


@pytest.fixture
def tiny_neox_path() -> Path:
    return _need(TINY_NEOX)


@pytest.fixture
def wikitext_path() -> Path:
    return _need(WIKITEXT_TEST)


@pytest.fixture
def gutenberg_path() -> Path:
    return _need(GUTENBERG)


@pytest.fixture
def neox_tokenizer_path() -> Path:
    return _need(NEOX_TOKENIZER)
