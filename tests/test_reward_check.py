from __future__ import annotations

import polars as pl
import pytest

from croco.config import ClassifierScorer, LangIdScorer
from croco.evaluation.reward_check import load_preference_set, ranking_accuracy


def test_demo_preference_set_covers_seven_languages():
    df = load_preference_set("builtin:demo_preferences")
    assert sorted(df["lang"].unique()) == ["da", "de", "en", "es", "fr", "it", "nl"]
    assert df.group_by("lang").len()["len"].min() >= 10


def test_ranking_accuracy_per_language_and_scorer(tiny_rm):
    prefs = pl.DataFrame({
        "pair_id": ["a", "b", "c"], "lang": ["de", "de", "en"],
        "prompt": ["Was ist Regen?", "Nenne eine Farbe.", "Name a colour."],
        "chosen": ["Regen ist Wasser, das aus den Wolken auf die Erde fällt.",
                   "Blau ist eine schöne Farbe.", "Blue is a colour."],
        "rejected": ["Rain is water that falls from the clouds to the ground.",
                     "Blue is a nice colour.", "Blau ist eine Farbe und der Himmel ist blau."],
    })
    # langid alone: chosen is in the prompt's language, rejected is not -> accuracy 1.0
    only_lang = ranking_accuracy(prefs, [LangIdScorer(name="lang", weight=1.0)])
    assert only_lang.select("lang", "pairs", "accuracy").rows() == [("de", 2, 1.0), ("en", 1, 1.0)]
    both = ranking_accuracy(prefs, [ClassifierScorer(name="rm", model=tiny_rm, weight=1.0),
                                    LangIdScorer(name="lang", weight=0.0)])
    assert both.columns == ["lang", "pairs", "accuracy", "accuracy_rm", "accuracy_lang"]
    assert both["accuracy_lang"].to_list() == [1.0, 1.0]
    assert both["accuracy"].to_list() == both["accuracy_rm"].to_list()


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"lang": "en", "prompt": "x", "chosen": "y"}\n')
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        load_preference_set(str(path))
