"""The pairing rule of docs/architecture.md, as a specification."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from croco.pairing import (
    build_pairs,
    build_sft,
    pair_sets,
    pair_stats,
    parse_reject_target,
    select_pools,
)


def scores_of(pools: dict[tuple[str, str], list[float]], **extra_cols) -> pl.DataFrame:
    rows = []
    for (pid, lang), rewards in pools.items():
        for i, r in enumerate(rewards):
            row = {"prompt_id": pid, "lang": lang, "sample_idx": i,
                   "response": f"{pid}/{lang}/{i}", "reward": float(r),
                   "finish_reason": "stop", "detected_lang": lang}
            for col, fn in extra_cols.items():
                row[col] = fn(pid, lang, i)
            rows.append(row)
    return pl.DataFrame(rows)


def prompts_of(pids, langs) -> pl.DataFrame:
    return pl.DataFrame([{"prompt_id": p, "lang": lang, "prompt": f"{p} in {lang}"}
                         for p in pids for lang in langs])


PROMPTS = prompts_of(["p1", "p2", "p3"], ["en", "de", "fr"])


def test_chosen_is_max_and_rejected_is_closest_to_mean_minus_2sigma():
    # rewards 1 5 3 2: mean 2.75, std 1.479 -> target -0.208; closest strictly-lower is 1.
    pairs = build_pairs(scores_of({("p1", "en"): [1, 5, 3, 2]}), PROMPTS)
    assert pairs.height == 1
    row = pairs.row(0, named=True)
    assert (row["chosen"], row["rejected"]) == ("p1/en/1", "p1/en/0")
    assert (row["chosen_score"], row["rejected_score"]) == (5.0, 1.0)
    assert row["pool_size"] == 4
    assert row["prompt"] == "p1 in en" and row["prompt_lang"] == "en"
    assert row["scope"] == "in_lang" and row["reject_target"] == "mean_minus_2sigma"


def test_target_value_uses_population_std():
    pools = select_pools(scores_of({("p1", "en"): [1, 5, 3, 2]}))
    assert pools["target"][0] == pytest.approx(2.75 - 2 * (2.1875 ** 0.5))


def test_rejected_is_not_always_the_minimum():
    # -4, -2, twenty 0s, 3: mean -0.130, std 1.116 -> target -2.36: closest is -2, not -4.
    scores = scores_of({("p1", "en"): [-4, -2] + [0] * 20 + [3]})
    pairs = build_pairs(scores, PROMPTS)
    assert (pairs["chosen"][0], pairs["rejected"][0]) == ("p1/en/22", "p1/en/1")
    assert build_pairs(scores, PROMPTS, reject_target="min")["rejected"][0] == "p1/en/0"


def test_q1_target_tie_goes_to_first_in_pool_order():
    # sorted 1 2 8 8 8 8 9: q1 = 2 + 0.5 * 6 = 5; |8-5| = |2-5| = 3 -> the first 8 (idx 1).
    scores = scores_of({("p1", "en"): [9, 8, 8, 8, 8, 2, 1]})
    assert build_pairs(scores, PROMPTS, reject_target="q1")["rejected"][0] == "p1/en/1"


def test_ties_for_chosen_go_to_the_first_in_pool_order():
    pairs = build_pairs(scores_of({("p1", "en"): [3, 9, 9, 1]}), PROMPTS)
    assert pairs["chosen"][0] == "p1/en/1"


def test_a_tie_at_the_top_is_not_a_rejected_candidate():
    # 4 4 0: the second 4 is not strictly below chosen; rejected must be 0.
    pairs = build_pairs(scores_of({("p1", "de"): [4, 4, 0]}), PROMPTS)
    assert (pairs["chosen"][0], pairs["rejected"][0]) == ("p1/de/0", "p1/de/2")


def test_ties_for_rejected_go_to_the_first_in_pool_order():
    # 10 4 4 0 with min target: 0 only; with q1 (25th pct of [10,4,4,0] = 3): |4-3|=1 = |... 
    # choose rewards 10 2 4 3 3: min target = 2 -> sample 1; percentile target 3 -> 3 and 3
    scores = scores_of({("p1", "en"): [10, 2, 4, 3, 3]})
    assert build_pairs(scores, PROMPTS, reject_target="min")["rejected"][0] == "p1/en/1"
    # 25th percentile of [10,2,4,3,3] (sorted 2,3,3,4,10) is 3 -> two exact hits: idx 3 first.
    assert build_pairs(scores, PROMPTS, reject_target="q1")["rejected"][0] == "p1/en/3"


def test_q1_uses_linear_interpolation():
    # sorted 1 2 4 8: position 0.25*3 = 0.75 -> 1 + 0.75*(2-1) = 1.75
    pools = select_pools(scores_of({("p1", "en"): [8, 1, 4, 2]}), reject_target="q1")
    assert pools["target"][0] == pytest.approx(1.75)
    # closest to 1.75 among strictly lower (1, 4, 2): 2 (|0.25|)
    pairs = build_pairs(scores_of({("p1", "en"): [8, 1, 4, 2]}), PROMPTS, reject_target="q1")
    assert pairs["rejected"][0] == "p1/en/3"


def test_pool_of_one_is_skipped():
    scores = scores_of({("p1", "en"): [3.0], ("p2", "en"): [1, 2]})
    pools = select_pools(scores)
    assert pools.filter(pl.col("prompt_id") == "p1")["skipped"].to_list() == [True]
    assert build_pairs(scores, PROMPTS)["prompt_id"].to_list() == ["p2"]


def test_pool_without_a_strictly_lower_sample_is_skipped():
    scores = scores_of({("p1", "en"): [2, 2, 2]})
    assert build_pairs(scores, PROMPTS).height == 0
    assert select_pools(scores)["skipped"].to_list() == [True]


def test_in_lang_makes_one_pool_per_prompt_and_language():
    scores = scores_of({("p1", "en"): [1, 2], ("p1", "de"): [5, 3], ("p2", "en"): [0, 1]})
    pairs = build_pairs(scores, PROMPTS).sort("prompt_id", "prompt_lang")
    assert pairs.select("prompt_id", "prompt_lang", "chosen", "rejected").rows() == [
        ("p1", "de", "p1/de/0", "p1/de/1"),
        ("p1", "en", "p1/en/1", "p1/en/0"),
        ("p2", "en", "p2/en/1", "p2/en/0"),
    ]
    assert (pairs["chosen_lang"] == pairs["prompt_lang"]).all()


ALL = {("p1", "de"): [4, 4, 0], ("p1", "en"): [1, 5, 3, 2], ("p1", "fr"): [2]}


def test_all_lang_pools_every_language_of_a_prompt():
    # pool order (lang, sample_idx): de 4 4 0, en 1 5 3 2, fr 2 -> chosen en/1 (5);
    # mean 21/8 = 2.625, std = 1.654 -> target -0.683: closest strictly lower is de/2 (0).
    pairs = build_pairs(scores_of(ALL), PROMPTS, scope="all_lang")
    row = pairs.row(0, named=True)
    assert row["pool_size"] == 8
    assert (row["chosen"], row["rejected"]) == ("p1/en/1", "p1/de/2")
    assert (row["chosen_lang"], row["rejected_lang"]) == ("en", "de")
    assert row["scope"] == "all_lang"


def test_all_lang_prompt_source_chosen_and_rejected():
    chosen = build_pairs(scores_of(ALL), PROMPTS, scope="all_lang", prompt_source="chosen")
    rejected = build_pairs(scores_of(ALL), PROMPTS, scope="all_lang", prompt_source="rejected")
    assert (chosen["prompt_lang"][0], chosen["prompt"][0]) == ("en", "p1 in en")
    assert (rejected["prompt_lang"][0], rejected["prompt"][0]) == ("de", "p1 in de")


def test_all_lang_prompt_source_random_is_seeded_and_among_present_languages():
    many = {(f"p{i}", lang): [1, 2, 3] for i in range(1, 4) for lang in ["en", "de", "fr"]}
    a = build_pairs(scores_of(many), PROMPTS, scope="all_lang", prompt_source="random", seed=7)
    b = build_pairs(scores_of(many), PROMPTS, scope="all_lang", prompt_source="random", seed=7)
    assert a["prompt_lang"].to_list() == b["prompt_lang"].to_list()
    assert set(a["prompt_lang"]) <= {"en", "de", "fr"}
    for row in a.to_dicts():
        assert row["prompt"] == f"{row['prompt_id']} in {row['prompt_lang']}"
    langs_by_seed = {tuple(build_pairs(scores_of(many), PROMPTS, scope="all_lang",
                                       prompt_source="random", seed=s)["prompt_lang"])
                     for s in range(20)}
    assert len(langs_by_seed) > 1


def test_pool_order_breaks_ties_across_languages_in_all_lang():
    pairs = build_pairs(scores_of({("p1", "fr"): [9, 0], ("p1", "de"): [9, 1]}), PROMPTS,
                        scope="all_lang", reject_target="min")
    assert pairs["chosen"][0] == "p1/de/0"  # de sorts before fr


def test_min_gap_excludes_close_samples():
    scores = scores_of({("p1", "en"): [5, 4.9, 4.8]})
    assert build_pairs(scores, PROMPTS, min_gap=0.5).height == 0
    assert build_pairs(scores, PROMPTS, min_gap=0.15)["rejected"][0] == "p1/en/2"


def test_drop_truncated_and_wrong_language_filters():
    scores = scores_of({("p1", "en"): [9, 1, 5]}).with_columns(
        pl.Series("finish_reason", ["length", "stop", "stop"]),
        pl.Series("detected_lang", ["en", "de", "en"]),
    )
    assert build_pairs(scores, PROMPTS)["chosen"][0] == "p1/en/0"
    assert build_pairs(scores, PROMPTS, drop_truncated=True)["chosen"][0] == "p1/en/2"
    assert build_pairs(scores, PROMPTS, drop_wrong_lang=True)["rejected"][0] == "p1/en/2"


def test_zscore_per_lang_normalizes_before_all_lang_pooling():
    # de rewards are on a larger scale; after z-scoring, en's best (z=1.22) beats de's (1.0).
    scores = scores_of({("p1", "en"): [0, 1, 2, 10], ("p1", "de"): [100, 0]})
    raw = build_pairs(scores, PROMPTS, scope="all_lang")
    norm = build_pairs(scores, PROMPTS, scope="all_lang", normalize="zscore_per_lang")
    assert raw["chosen"][0] == "p1/de/0"
    assert norm["chosen"][0] == "p1/en/3"


def test_random_target_is_seeded():
    scores = scores_of({(f"p{i}", "en"): [9, 1, 2, 3, 4, 5] for i in range(1, 4)})
    a = build_pairs(scores, PROMPTS, reject_target="random", seed=1)["rejected"].to_list()
    b = build_pairs(scores, PROMPTS, reject_target="random", seed=1)["rejected"].to_list()
    assert a == b
    assert all(not r.endswith("/0") for r in a)


def test_unknown_reject_target_is_an_error():
    with pytest.raises(ValueError, match="unknown reject_target"):
        parse_reject_target("median")
    assert parse_reject_target("percentile:10") == ("percentile", 10.0)


def test_sft_keeps_the_chosen_sample_per_pool():
    scores = scores_of(ALL)
    in_lang = build_sft(scores, PROMPTS)
    assert in_lang.select("lang", "completion", "reward").sort("lang").rows() == [
        ("de", "p1/de/0", 4.0), ("en", "p1/en/1", 5.0), ("fr", "p1/fr/0", 2.0)]
    all_lang = build_sft(scores, PROMPTS, scope="all_lang")
    assert all_lang.select("lang", "prompt", "completion").rows() == [
        ("en", "p1 in en", "p1/en/1")]


def test_output_columns_are_the_contract():
    pairs = build_pairs(scores_of(ALL), PROMPTS)
    assert pairs.columns == ["prompt_id", "prompt_lang", "prompt", "chosen", "rejected",
                             "chosen_score", "rejected_score", "chosen_lang", "rejected_lang",
                             "pool_size", "scope", "reject_target"]
    assert build_sft(scores_of(ALL), PROMPTS).columns == [
        "prompt_id", "lang", "prompt", "completion", "reward"]


def test_stats_count_pairs_and_skipped_per_language():
    scores = scores_of(ALL)
    pools = select_pools(scores)
    stats = pair_stats(scores, pools, build_pairs(scores, PROMPTS)).sort("lang")
    assert stats.select("lang", "prompts", "samples", "pairs", "skipped").rows() == [
        ("de", 1, 3, 1, 0), ("en", 1, 4, 1, 0), ("fr", 1, 1, 0, 1)]
    assert stats.filter(pl.col("lang") == "en")["gap_mean"][0] == pytest.approx(4.0)
    assert stats["lang_match"].to_list() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------- rule 3: ties up to rounding


def test_equidistant_candidates_go_to_the_first_in_pool_order():
    # 1 2 3 with q1: sorted position 0.25 * 2 = 0.5 -> target 1.5; |1 - 1.5| = |2 - 1.5| = 0.5.
    pairs = build_pairs(scores_of({("p1", "en"): [1.0, 2.0, 3.0],
                                   ("p2", "en"): [2.0, 1.0, 3.0]}), PROMPTS, reject_target="q1")
    assert pairs.select("prompt_id", "chosen", "rejected").rows() == [
        ("p1", "p1/en/2", "p1/en/0"), ("p2", "p2/en/2", "p2/en/0")]


def test_distances_equal_up_to_rounding_are_ties():
    # 0.1 0.2 0.3 with q1: target 0.1 + 0.5 * (0.2 - 0.1), which rounds to 0.15000000000000002,
    # so the raw distances are 0.05000000000000002 (0.1) and 0.04999999999999999 (0.2): the
    # later sample is "closer" only by rounding. Both are 0.05: the first in pool order wins.
    target = 0.1 + 0.5 * (0.2 - 0.1)
    assert abs(0.1 - target) > abs(0.2 - target)
    scores = scores_of({("p1", "en"): [0.1, 0.2, 0.3]})
    assert select_pools(scores, reject_target="q1")["target"][0] == target
    assert build_pairs(scores, PROMPTS, reject_target="q1")["rejected"][0] == "p1/en/0"


def test_a_tie_is_relative_to_the_target_scale():
    # target 2.0 (percentile 0 = the minimum): 2.0000000000000004 is 4.4e-16 from it, 2.0 is
    # on it; 4.4e-16 <= 1e-9 * max(4.4e-16, 2.0): a tie, so the first in pool order wins.
    scores = scores_of({("p1", "en"): [2.0000000000000004, 2.0, 5.0]})
    assert build_pairs(scores, PROMPTS, reject_target="percentile:0")["rejected"][0] == (
        "p1/en/0")
    # 1.000001 is 1e-6 from the target 1.0, beyond 1e-9 * 1.0: not a tie, 1.0 wins.
    scores = scores_of({("p1", "en"): [1.000001, 1.0, 5.0]})
    assert build_pairs(scores, PROMPTS, reject_target="percentile:0")["rejected"][0] == (
        "p1/en/1")


# ---------------------------------------------- the selection reads the score columns only


def test_pools_are_selected_without_texts():
    scores = scores_of(ALL).drop("response")
    pools = select_pools(scores, scope="all_lang")
    assert pools.columns == ["prompt_id", "pool_lang", "pool_size", "target", "chosen_lang",
                             "chosen_sample_idx", "chosen_score", "rejected_lang",
                             "rejected_sample_idx", "rejected_score", "skipped"]
    assert pools.select("chosen_lang", "chosen_sample_idx", "rejected_lang",
                        "rejected_sample_idx").row(0) == ("en", 1, "de", 2)


def test_pair_sets_fetch_texts_of_the_selected_rows_only():
    scores = scores_of(ALL)
    asked = []

    def texts(rows):
        asked.extend(rows.to_list())
        return scores["response"].gather(rows)

    sets = pair_sets(scores.drop("response"), PROMPTS, texts=texts)
    # rows: de 0..2, en 3..6, fr 7. DPO: de 3 (row 0) vs 0 (row 2), en 5 (row 4) vs 1 (row 3);
    # SFT: the chosen of each pool, fr's pool of one included (row 7).
    assert sorted(set(asked)) == [0, 2, 3, 4, 7]
    assert sets.dpo.equals(build_pairs(scores, PROMPTS))
    assert sets.sft.equals(build_sft(scores, PROMPTS))
    assert sets.stats.equals(pair_stats(scores, select_pools(scores), build_pairs(scores, PROMPTS)))


# ------------------------------- the references: the old pairing code and a plain loop of the rule

OPTIONS = [
    {},
    {"scope": "all_lang"},
    {"reject_target": "q1"},
    {"reject_target": "mean_minus_sigma", "scope": "all_lang"},
    {"reject_target": "percentile:30"},
    {"reject_target": "min", "scope": "all_lang"},
    {"reject_target": "max_min"},
    {"reject_target": "random", "seed": 3},
    {"reject_target": "random", "seed": 4, "scope": "all_lang"},
    {"min_gap": 1.0},
    {"drop_truncated": True},
    {"drop_wrong_lang": True, "scope": "all_lang"},
    {"normalize": "zscore_per_lang", "scope": "all_lang"},
    {"scope": "all_lang", "prompt_source": "rejected"},
    {"scope": "all_lang", "prompt_source": "random", "seed": 9},
    {"scope": "all_lang", "prompt_source": "random", "seed": 1, "drop_truncated": True,
     "drop_wrong_lang": True, "normalize": "zscore_per_lang", "min_gap": 0.3,
     "reject_target": "random"},
]


def _with_texts(scores: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    scores = scores.with_columns(
        response=pl.format("{}/{}/{}", "prompt_id", "lang", "sample_idx"))
    prompts = scores.select("prompt_id", "lang").unique().with_columns(
        prompt=pl.format("{} in {}", "prompt_id", "lang"))
    return scores, prompts


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "default")
def test_outputs_equal_the_old_pairing_code(opts):
    # Continuous rewards: no ties, where the old code and rule 3's tolerance could differ.
    from benchmarks.pairing_scale import (
        old_build_pairs,
        old_build_sft,
        old_select_pools,
        synth_scores,
    )

    scores, prompts = _with_texts(synth_scores(6000, k=9, seed=5))
    select_opts = {k: v for k, v in opts.items() if k != "prompt_source"}
    sets = pair_sets(scores.drop("response"), prompts,
                     texts=lambda rows: scores["response"].gather(rows), **opts)
    old_pairs = old_build_pairs(scores, prompts, **opts)
    old_pools = old_select_pools(scores, **select_opts)
    assert sets.dpo.height > 50
    assert_frame_equal(sets.dpo, old_pairs)
    assert_frame_equal(build_pairs(scores, prompts, **opts), old_pairs)
    assert_frame_equal(sets.sft, old_build_sft(scores, prompts, scope=opts.get("scope",
                                                                               "in_lang")))
    assert_frame_equal(sets.stats, pair_stats(scores, old_pools, old_pairs))
    assert_frame_equal(sets.pools, old_pools.select(sets.pools.columns))


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "continuous"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "default")
def test_vectorised_selection_equals_the_plain_loop(opts, ties):
    # Pools of 7: the 25th percentile is a midpoint; rewards on a 0.5 grid tie often.
    from benchmarks.pairing_scale import loop_pools, synth_scores, vectorised_pools

    scores = synth_scores(5000, k=7, seed=11, ties=ties)
    loop = loop_pools(scores, **opts)
    vec = vectorised_pools(scores, **opts).select(loop.columns)
    assert loop.height == vec.height > 50
    assert loop["skipped"].sum() < loop.height
    assert_frame_equal(vec.drop("target"), loop.drop("target"), check_dtypes=False)
    # The targets are the same statistics summed in another order: equal to rounding.
    assert_frame_equal(vec.select("target"), loop.select("target"), check_exact=False,
                       rel_tol=1e-12)
