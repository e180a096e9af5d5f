"""Structured evaluation through lm-evaluation-harness, on a local task, tiny model."""

from __future__ import annotations

import json

import polars as pl
import pytest

from croco.evaluation.structured import DEMO_MC, write_local_tasks

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")


def test_demo_mc_set_is_parallel_in_seven_languages():
    df = pl.read_ndjson(DEMO_MC)
    per_item = df.group_by("item_id").agg(pl.col("lang").n_unique(), pl.col("answer").n_unique())
    assert per_item.height >= 20
    assert per_item["lang"].to_list() == [7] * per_item.height
    assert per_item["answer"].to_list() == [1] * per_item.height


def test_local_task_yaml_per_language(tmp_path):
    tasks = write_local_tasks(DEMO_MC, ["de", "fr"], tmp_path)
    assert tasks == {"de": "croco_mc_de", "fr": "croco_mc_fr"}
    rows = [json.loads(x) for x in (tmp_path / "mc_de.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and set(rows[0]) == {"question", "choices", "answer"}
    assert "output_type: multiple_choice" in (tmp_path / "croco_mc_de.yaml").read_text()


def test_local_mc_without_a_language_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no items in language 'fi'"):
        write_local_tasks(DEMO_MC, ["fi"], tmp_path)


def test_lm_eval_scores_a_tiny_model_on_the_local_task(tiny_lm):
    from croco.evaluation.structured import evaluate_structured

    out = evaluate_structured(tiny_lm, adapter=None, tasks={}, local_mc="builtin:demo_mc",
                              langs=["en", "de"], batch_size=8, limit=5)
    assert out["lang"].to_list() == ["de", "en"]
    assert out["task"].to_list() == ["croco_mc_de", "croco_mc_en"]
    assert out["metric"].to_list() == ["acc", "acc"]
    assert all(0.0 <= v <= 1.0 for v in out["value"])
    assert out["n"].to_list() == [5, 5]


def test_a_model_in_memory_scores_as_the_same_model_loaded_by_lm_eval(tiny_lm):
    """The pipeline hands lm-eval the model croco already loaded: the same accuracies, to
    the item, as lm-eval loading the path itself."""
    from croco.evaluation.structured import evaluate_structured
    from croco.models import load_model

    kw = dict(adapter=None, tasks={}, local_mc="builtin:demo_mc", langs=["en", "fr"],
              batch_size=8, limit=10)
    by_path = evaluate_structured(tiny_lm, **kw)
    in_memory = evaluate_structured(tiny_lm, **kw, loaded=load_model(tiny_lm, device="cpu"))
    assert in_memory.equals(by_path)
    assert in_memory["n"].to_list() == [10, 10]
