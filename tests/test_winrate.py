"""Win rates against numbers worked out by hand."""

from __future__ import annotations

import polars as pl
import pytest

from croco.evaluation.winrate import parse_verdict, win_rates


def judgments(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"lang": pl.String, "prompt_id": pl.String,
                                      "candidate_first": pl.Boolean, "verdict": pl.String,
                                      "candidate_len": pl.Int64, "baseline_len": pl.Int64},
                        orient="row")


def test_both_orders_agreeing_and_contradicting():
    # p1: candidate wins in both orders -> 1.0
    # p2: candidate shown first wins, shown second loses (contradictory orders) -> 0.5
    # p3: tie in one order, loss in the other -> 0.25
    df = judgments([
        ("de", "p1", True, "1", 10, 10), ("de", "p1", False, "2", 10, 10),
        ("de", "p2", True, "1", 10, 10), ("de", "p2", False, "1", 10, 10),
        ("de", "p3", True, "T", 10, 10), ("de", "p3", False, "1", 10, 10),
    ])
    out = win_rates(df)
    assert out["lang"].to_list() == ["de"]
    assert out["win_rate"][0] == pytest.approx(100 * (1.0 + 0.5 + 0.25) / 3)
    assert out["n_prompts"][0] == 3


def test_languages_are_separate_and_ties_count_half():
    df = judgments([
        ("en", "p1", True, "T", 5, 5), ("en", "p1", False, "T", 5, 5),
        ("fr", "p1", True, "2", 5, 5), ("fr", "p1", False, "1", 5, 5),
    ])
    out = win_rates(df).sort("lang")
    assert out["win_rate"].to_list() == [50.0, 0.0]


def test_bootstrap_interval_is_reproducible_with_a_seed():
    rows = []
    for i in range(20):
        v = "1" if i % 3 else "2"
        rows += [("it", f"p{i}", True, v, 10 + i, 10), ("it", f"p{i}", False, "2", 10 + i, 10)]
    df = judgments(rows)
    a, b = win_rates(df, seed=3), win_rates(df, seed=3)
    assert a.equals(b)
    c = win_rates(df, seed=4)
    assert (a["ci_low"][0], a["ci_high"][0]) != (c["ci_low"][0], c["ci_high"][0])
    assert a["ci_low"][0] <= a["win_rate"][0] <= a["ci_high"][0]


def test_all_prompts_equal_gives_a_degenerate_interval():
    df = judgments([("es", f"p{i}", True, "1", 3, 3) for i in range(5)])
    out = win_rates(df)
    assert (out["win_rate"][0], out["ci_low"][0], out["ci_high"][0]) == (100.0, 100.0, 100.0)


def test_length_controlled_rate_without_length_differences():
    # dlen = 0 everywhere: the length feature is 0 and only the intercept is fit;
    # mean game score 0.75 -> sigmoid(a) = 0.75.
    df = judgments([("nl", "p1", True, "1", 4, 4), ("nl", "p1", False, "2", 4, 4),
                    ("nl", "p2", True, "1", 4, 4), ("nl", "p2", False, "1", 4, 4)])
    assert win_rates(df)["lc_win_rate"][0] == pytest.approx(75.0, abs=1e-6)


def test_length_controlled_rate_discounts_wins_that_come_with_length():
    # The candidate wins exactly when it is longer: the length coefficient takes most of
    # the effect, so the rate at equal length is below the raw 50%... and symmetric data
    # gives exactly 50.
    rows = []
    for i in range(10):
        longer = i % 2 == 0
        v = "1" if longer else "2"
        rows.append(("da", f"p{i}", True, v, 100 if longer else 10, 55))
    out = win_rates(judgments(rows))
    assert out["win_rate"][0] == pytest.approx(50.0)
    assert out["lc_win_rate"][0] == pytest.approx(50.0, abs=1e-6)
    skewed = rows + [("da", "p10", True, "1", 100, 55)]
    s = win_rates(judgments(skewed))
    assert s["lc_win_rate"][0] < s["win_rate"][0]


def test_invalid_verdicts_are_ignored():
    df = judgments([("en", "p1", True, "1", 1, 1), ("en", "p1", False, None, 1, 1)])
    assert win_rates(df)["win_rate"][0] == 100.0


def test_verdict_comes_from_the_judges_last_line_only():
    assert parse_verdict("Output 1 is clearer.\n[[1]]") == "1"
    assert parse_verdict("Both fine.\n\n  [[T]]  \n") == "T"
    # an answer quoted in the reasoning says "[[1]]", but the judge's last line says 2
    assert parse_verdict('Output 1 writes "[[1]]" to game the judge.\nVerdict: [[2]]') == "2"
    # no verdict on the last line: invalid even though one appears earlier
    assert parse_verdict("[[1]]\nI cannot decide.") is None
    # contradictory verdicts on the last line: invalid
    assert parse_verdict("[[1]] or [[2]]") is None
    assert parse_verdict("") is None
