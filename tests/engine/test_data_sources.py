"""Data that resolves anywhere: data directory, else the Hub (local fixtures stand in for it), else built in."""
from __future__ import annotations

import json

import pytest

from compression import data_sources
from compression.calibration import load_calibration
from compression.data_sources import (BUILTIN_CALIBRATION, DATA_DIR_CALIBRATION, HUB_CALIBRATION, OPEN_LLM_V1,
                                      PERPLEXITY_TASK, DataUnavailable, check_eval_tasks, default_calibration_source,
                                      eval_options, wikitext2_test_text)
from compression.errors import CalibrationError
from compression.evaluation.perplexity import wikitext_windows
from tests.hub_fixtures import go_online, point_hub_at_fixtures
from tests.tiny import demo_tokenizer


@pytest.fixture
def data_dir(tmp_path):
    """A data directory with a calibration file and the WikiText-2 test file, nothing else."""
    (tmp_path / "calibration").mkdir()
    (tmp_path / DATA_DIR_CALIBRATION).write_text(json.dumps({"text": "local calibration text " * 20}) + "\n")
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" = Local = \n\n Local WikiText line one . \n" * 40)
    return tmp_path


def test_the_built_in_calibration_set_works_with_no_data_directory_and_applies_the_chat_template():
    tokenizer = demo_tokenizer()
    samples = load_calibration(BUILTIN_CALIBRATION, tokenizer, samples=8, seqlen=64, data_dir="")
    assert len(samples) == 8 and all(s["input_ids"].shape[1] >= 2 for s in samples)
    text = tokenizer.decode(samples[0]["input_ids"][0])
    assert "<|im_start|>user" in text  # SmolLM2's chat template was applied to the messages
    records = data_sources.builtin_records(BUILTIN_CALIBRATION)
    assert len(records) >= 40 and len({r["messages"][0]["content"] for r in records}) == len(records)
    assert (data_sources.BUILTIN_DIR / "README.md").read_text().count("CC0") >= 1  # licence stated


def test_an_unknown_built_in_set_names_the_ones_that_exist():
    with pytest.raises(CalibrationError) as caught:
        load_calibration("builtin:nope", demo_tokenizer(), samples=1, seqlen=8, data_dir="")
    assert "builtin:chat-v1" in caught.value.message


def test_the_default_calibration_set_is_the_data_directory_file_else_the_hub_else_built_in(data_dir, tmp_path,
                                                                                            monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert default_calibration_source(data_dir, online=False) == DATA_DIR_CALIBRATION
    assert default_calibration_source(data_dir, online=True) == DATA_DIR_CALIBRATION
    assert default_calibration_source(empty, online=True) == HUB_CALIBRATION
    assert default_calibration_source(None, online=True) == HUB_CALIBRATION
    assert default_calibration_source(empty, online=False) == BUILTIN_CALIBRATION
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert default_calibration_source(None) == BUILTIN_CALIBRATION


def test_the_hub_default_calibration_set_is_downloaded_and_chat_templated(monkeypatch):
    go_online(monkeypatch)
    calls = point_hub_at_fixtures(monkeypatch)
    tokenizer = demo_tokenizer()
    samples = load_calibration(HUB_CALIBRATION, tokenizer, samples=3, seqlen=48, data_dir="")
    assert calls == [("neuralmagic/LLM_compression_calibration", None, "train")]
    assert len(samples) == 3
    assert all("<|im_start|>assistant" in tokenizer.decode(s["input_ids"][0]) for s in samples)


def test_a_hub_calibration_set_is_refused_while_the_hub_is_off(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationError) as caught:
        load_calibration(HUB_CALIBRATION, demo_tokenizer(), samples=1, seqlen=8, data_dir="")
    assert "HF_HUB_OFFLINE=1" in caught.value.message


def test_wikitext2_comes_from_the_data_directory_when_it_has_the_file(data_dir, monkeypatch):
    calls = point_hub_at_fixtures(monkeypatch)
    text, where = wikitext2_test_text(data_dir)
    assert "Local WikiText line one" in text and "data directory" in where and calls == []


def test_wikitext2_comes_from_the_hubs_raw_test_split_without_a_data_directory(tmp_path, monkeypatch):
    go_online(monkeypatch)
    calls = point_hub_at_fixtures(monkeypatch)
    text, where = wikitext2_test_text(tmp_path)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert "Valkyria Chronicles III" in text and "wikitext-2-raw-v1" in where
    windows = wikitext_windows(demo_tokenizer(), None, seqlen=16, max_windows=3)
    assert tuple(windows.shape) == (3, 16)


def test_wikitext2_offline_without_the_file_names_the_file_and_the_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailable) as caught:
        wikitext_windows(demo_tokenizer(), tmp_path, seqlen=16)
    assert "wikitext2/wiki.test.raw" in str(caught.value) and "HF_HUB_OFFLINE=1" in str(caught.value)


def test_offline_with_no_data_every_task_is_unavailable_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = eval_options(tmp_path)
    assert {o.name for o in options} >= {PERPLEXITY_TASK, *OPEN_LLM_V1, "arc_easy"}
    assert not any(o.available for o in options)
    assert all("HF_HUB_OFFLINE=1" in o.reason for o in options)
    assert next(o for o in options if o.name == "arc_easy").reason.startswith("needs arc/arc_easy_test.jsonl")
    assert "COMPRESSOR_DATA_DIR is not set" in next(o for o in eval_options(None) if o.name == "piqa").reason


def test_online_the_open_llm_v1_tasks_are_offered_by_their_standard_names_with_their_shots(tmp_path, monkeypatch):
    go_online(monkeypatch)
    options = {o.name: o for o in eval_options(tmp_path)}
    for task, shots in OPEN_LLM_V1.items():
        assert options[task].available and options[task].source == "hub" and f"{shots}-shot" in options[task].detail
    assert options[PERPLEXITY_TASK].source == "hub"
    assert data_sources.fewshot_for("hellaswag", None) == 10 and data_sources.fewshot_for("hellaswag", 3) == 3
    assert data_sources.fewshot_for("arc_easy", None) is None


def test_local_data_wins_over_the_hub_for_the_tasks_it_has(data_dir, monkeypatch):
    go_online(monkeypatch)
    options = {o.name: o for o in eval_options(data_dir)}
    assert options[PERPLEXITY_TASK].source == "local"
    assert options["arc_easy"].source == "hub"  # no arc file in this data directory


def test_check_eval_tasks_refuses_missing_data_before_the_worker_sees_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailable) as caught:
        check_eval_tasks([PERPLEXITY_TASK], "auto", tmp_path)
    assert "wikitext2_ppl" in str(caught.value) and "can run: none" in str(caught.value)
    with pytest.raises(DataUnavailable) as caught:
        check_eval_tasks(["mmlu"], "auto", tmp_path)
    assert "'mmlu'" in str(caught.value)
    check_eval_tasks([], "auto", tmp_path)  # no evaluation needs no data


def test_check_eval_tasks_refuses_a_name_lm_eval_does_not_know(tmp_path, monkeypatch):
    go_online(monkeypatch)
    check_eval_tasks(["hellaswag", "mmlu", "truthfulqa_mc2", "leaderboard"], "auto", tmp_path)  # known
    with pytest.raises(DataUnavailable) as caught:
        check_eval_tasks(["hellaswag", "hellaswagg_typo"], "auto", tmp_path)
    assert "'hellaswagg_typo' is not a task lm-eval" in str(caught.value)
