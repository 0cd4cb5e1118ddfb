"""The Hugging Face Hub replaced by local files (tests/fixtures/hub): the one mock the tests allow.

`point_hub_at_fixtures(monkeypatch)` makes `compression.data_sources.hub_load_dataset` read the
fixture file of a (repo, config, split) with the real `datasets` JSON loader, and records each call.
"""
from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hub"
HUB_FILES = {
    ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"): "wikitext-2-raw-v1-test.jsonl",
    ("neuralmagic/LLM_compression_calibration", None, "train"): "llm_compression_calibration-train.jsonl",
}


def point_hub_at_fixtures(monkeypatch) -> list[tuple]:
    from datasets import load_dataset

    from compression import data_sources

    calls: list[tuple] = []
    real = data_sources.hub_load_dataset

    def from_fixtures(path, name=None, *, split):
        calls.append((path, name, split))
        if not data_sources.hub_online():  # keep the real function's refusal when the Hub is off
            return real(path, name, split=split)
        file = HUB_FILES.get((path, name, split))
        if file is None:
            raise FileNotFoundError(f"Couldn't find dataset {path!r} on the Hugging Face Hub")
        return load_dataset("json", data_files=str(FIXTURES / file), split="train")

    monkeypatch.setattr(data_sources, "hub_load_dataset", from_fixtures)
    return calls


def go_online(monkeypatch) -> None:
    """The worker is online (the Hub variables unset); downloads still go to the fixtures."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


LM_EVAL_HUB = {  # lm-eval dataset_path -> {split: fixture file}
    "Rowan/hellaswag": {"train": "hellaswag-train.jsonl", "validation": "hellaswag-validation.jsonl"},
}


def point_lm_eval_at_fixtures(monkeypatch) -> list[str]:
    """lm-eval's built-in (Hub) tasks load their data with `datasets.load_dataset(path=...)`: for the
    datasets in LM_EVAL_HUB that call reads the fixture files (real `datasets` JSON loader) instead."""
    import datasets

    real = datasets.load_dataset
    calls: list[str] = []

    def load_dataset(path=None, name=None, *args, **kwargs):
        if path in LM_EVAL_HUB:
            calls.append(path)
            files = {split: str(FIXTURES / file) for split, file in LM_EVAL_HUB[path].items()}
            return real("json", data_files=files)
        return real(path, name, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls
