"""Fixtures for the evaluation tests: the tiny random Llama, the demo tokenizer, the data dir."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import demo_tokenizer, tiny_llama

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "arc" / "arc_easy_test.jsonl").is_file():
        pytest.skip(f"offline benchmark data not found in {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a random 2-layer Llama; scores are meaningless, their shape is not."""
    return tiny_llama(seed=0), demo_tokenizer()
