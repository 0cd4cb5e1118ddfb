"""Recovery percentages, including lower-is-better metrics and undefined cases."""
from __future__ import annotations

import math

import pytest

from compression.evaluation.recovery import (AVERAGE, headline, primary_metric, recovery, recovery_level, recovery_table,
                                  warnings)
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


def test_the_table_has_a_row_per_metric_and_an_average_over_the_accuracy_tasks_only():
    rows = recovery_table(BASELINE, COMPRESSED)
    body, avg = rows[:-1], rows[-1]
    assert [(r["task"], r["metric"]) for r in body] == [
        ("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("piqa", "acc"), ("piqa", "acc_norm"),
        ("wikitext", "word_perplexity")]
    wiki = body[-1]
    assert wiki["recovery_pct"] == pytest.approx(80.0) and wiki["higher_is_better"] is False
    assert wiki["kind"] == "perplexity" and body[0]["kind"] == "accuracy"
    assert [r["primary"] for r in body] == [False, True, False, True, True]
    # the perplexity is shown but never averaged with accuracies
    assert avg["task"] == AVERAGE and avg["rows"] == 2
    assert avg["recovery_pct"] == pytest.approx((0.44 / 0.45 * 100 + 0.69 / 0.70 * 100) / 2)
    assert avg["baseline"] == pytest.approx((0.45 + 0.70) / 2)
    assert avg["compressed"] == pytest.approx((0.44 + 0.69) / 2)
    assert avg["metric"].startswith("mean accuracy")


def test_rows_carry_stderr_documents_and_whether_the_difference_is_inside_the_noise():
    rows = recovery_table(BASELINE, COMPRESSED)
    arc = rows[1]
    assert arc["baseline_stderr"] == arc["compressed_stderr"] == 0.01 and arc["samples"] == 20
    assert arc["noise"] == pytest.approx(1.96 * math.sqrt(2) * 0.01)
    assert arc["within_noise"] is True and arc["level"] == "ok"  # 0.45 -> 0.44 is noise
    big = recovery_table(
        {"tasks": {"piqa": {"samples": 500, "metrics": {"acc": {"value": 0.8, "stderr": 0.005}}}}},
        {"tasks": {"piqa": {"samples": 500, "metrics": {"acc": {"value": 0.6, "stderr": 0.005}}}}})
    assert big[0]["within_noise"] is False and big[0]["level"] == "poor"
    assert big[-1]["level"] == "poor" and warnings(big)
    assert "poor recovery" in warnings(big)[0]


@pytest.mark.parametrize("pct, noise, level", [
    (99.0, None, "ok"), (95.0, None, "warn"), (85.0, None, "poor"), (85.0, True, "ok"), (None, None, "unknown")])
def test_recovery_levels(pct, noise, level):
    assert recovery_level(pct, noise) == level


def test_perplexity_only_has_no_average_and_its_headline_says_perplexity():
    base = {"tasks": {"wikitext2_ppl": {"metrics": {"perplexity": {"value": 10.0, "higher_is_better": False}}}}}
    comp = {"tasks": {"wikitext2_ppl": {"metrics": {"perplexity": {"value": 12.5, "higher_is_better": False}}}}}
    rows = recovery_table(base, comp)
    assert [r["task"] for r in rows] == ["wikitext2_ppl"]
    head = headline(rows)
    assert head["kind"] == "perplexity" and head["recovery_pct"] == pytest.approx(80.0)
    assert head["level"] == "poor" and rows[0]["within_noise"] is None  # no stderr: noise unknown


def test_undefined_rows_stay_in_the_table_but_out_of_the_average():
    base = {"tasks": {"gsm8k": {"metrics": {"exact_match,strict-match": {"value": 0.0, "higher_is_better": True}}},
                      "piqa": {"metrics": {"acc": {"value": 0.5, "higher_is_better": True}}}}}
    comp = {"tasks": {"gsm8k": {"metrics": {"exact_match,strict-match": {"value": 0.0, "higher_is_better": True}}},
                      "piqa": {"metrics": {"acc": {"value": 0.45, "higher_is_better": True}}}}}
    rows = recovery_table(base, comp)
    assert rows[0]["recovery_pct"] is None and "baseline scored 0" in rows[0]["note"]
    assert rows[-1]["rows"] == 1 and rows[-1]["recovery_pct"] == pytest.approx(90.0)


def test_no_usable_score_gives_no_number_and_says_why():
    base = {"tasks": {"piqa": {"metrics": {"acc": {"value": None, "higher_is_better": True}}}}}
    comp = {"tasks": {"piqa": {"metrics": {"acc": {"value": 0.5, "higher_is_better": True}}}}}
    rows = recovery_table(base, comp)
    assert rows[0]["recovery_pct"] is None and rows[0]["level"] == "unknown"
    assert rows[-1]["recovery_pct"] is None and "no accuracy task produced a usable score" in rows[-1]["note"]
    assert any("no usable score" in w for w in warnings(rows))


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
