"""Recovery percentages, including lower-is-better metrics and undefined cases."""
from __future__ import annotations

import math

import pytest

from compression.recovery import AVERAGE, primary_metric, recovery, recovery_table
from tests.eval.facts import BASELINE, COMPRESSED


@pytest.mark.parametrize("baseline, compressed, hib, expected", [
    (0.80, 0.76, True, 95.0),
    (0.50, 0.55, True, 110.0),  # compressed can beat the baseline
    (10.0, 12.5, False, 80.0),  # perplexity rose 10 -> 12.5
    (20.0, 16.0, False, 125.0),  # perplexity fell
])
def test_recovery_is_the_ratio_in_the_right_direction(baseline, compressed, hib, expected):
    assert recovery(baseline, compressed, hib) == pytest.approx(expected)


@pytest.mark.parametrize("baseline, compressed, hib", [
    (0.0, 0.3, True), (None, 0.3, True), (0.3, None, True), (math.nan, 0.3, True), (0.3, math.inf, True),
    (10.0, 0.0, False), (0.0, 5.0, False), (-1.0, 5.0, False), ("abc", 1.0, True), (True, 1.0, True),
])
def test_recovery_is_none_when_undefined(baseline, compressed, hib):
    assert recovery(baseline, compressed, hib) is None


def test_a_zero_compressed_score_is_zero_recovery():
    assert recovery(0.4, 0.0) == 0.0


def test_the_table_has_a_row_per_metric_and_an_average_over_one_metric_per_task():
    rows = recovery_table(BASELINE, COMPRESSED)
    body, avg = rows[:-1], rows[-1]
    assert [(r["task"], r["metric"]) for r in body] == [
        ("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("piqa", "acc"), ("piqa", "acc_norm"),
        ("wikitext", "word_perplexity")]
    wiki = body[-1]
    assert wiki["recovery_pct"] == pytest.approx(80.0) and wiki["higher_is_better"] is False
    assert [r["primary"] for r in body] == [False, True, False, True, True]
    assert avg["task"] == AVERAGE and avg["rows"] == 3
    assert avg["recovery_pct"] == pytest.approx((0.44 / 0.45 * 100 + 0.69 / 0.70 * 100 + 80.0) / 3)
    # baseline/compressed averages only mix scores of one kind (not perplexities)
    assert avg["baseline"] == pytest.approx((0.45 + 0.70) / 2)
    assert avg["compressed"] == pytest.approx((0.44 + 0.69) / 2)


def test_undefined_rows_stay_in_the_table_but_out_of_the_average():
    base = {"tasks": {"gsm8k": {"metrics": {"exact_match,strict-match": {"value": 0.0, "higher_is_better": True}}},
                      "piqa": {"metrics": {"acc": {"value": 0.5, "higher_is_better": True}}}}}
    comp = {"tasks": {"gsm8k": {"metrics": {"exact_match,strict-match": {"value": 0.0, "higher_is_better": True}}},
                      "piqa": {"metrics": {"acc": {"value": 0.45, "higher_is_better": True}}}}}
    rows = recovery_table(base, comp)
    assert rows[0]["recovery_pct"] is None
    assert rows[-1]["rows"] == 1 and rows[-1]["recovery_pct"] == pytest.approx(90.0)


def test_tasks_missing_from_the_compressed_result_are_skipped_and_empty_results_give_no_rows():
    comp = {"tasks": {"arc_easy": COMPRESSED["tasks"]["arc_easy"]}}
    assert {r["task"] for r in recovery_table(BASELINE, comp)} == {"arc_easy", AVERAGE}
    assert recovery_table({"tasks": {}}, comp) == []


def test_primary_metric_prefers_normalised_accuracy():
    assert primary_metric({"acc": {}, "acc_norm": {}}) == "acc_norm"
    assert primary_metric({"bits_per_byte": {}, "word_perplexity": {}}) == "word_perplexity"
    assert primary_metric({"exact_match,flexible-extract": {}, "exact_match,strict-match": {}}) == \
        "exact_match,strict-match"
    assert primary_metric({}) is None
