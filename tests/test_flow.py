"""The pipeline through real Prefect flow runs (Prefect's test harness), tiny models."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from croco import stage as contract
from croco import stages, storage
from croco.manifest import read_outputs

pytestmark = pytest.mark.slow


#: The stage specs whose runs `calls` counts, by the name of their plain call.
COUNTED = {stages.Prompts: "run_prompts", stages.Generate: "run_generate",
           stages.Score: "run_score", stages.Pairs: "run_pairs"}


@pytest.fixture
def calls(monkeypatch):
    """Counts how often each library stage is entered (a cached task never enters it)."""
    counter: Counter = Counter()
    original = contract.run

    def run(stage, *args, **kwargs):
        name = COUNTED.get(type(stage))
        if name:
            counter[(name, getattr(stage, "lang", "all"))] += 1
        return original(stage, *args, **kwargs)

    monkeypatch.setattr(contract, "run", run)
    return counter


def by_stage(counter: Counter) -> dict[str, int]:
    out: Counter = Counter()
    for (name, _), n in counter.items():
        out[name] += n
    return dict(out)


def test_full_run_writes_contract_tables_and_manifest(prefect_harness, tiny_config, calls):
    from croco.flows.pipeline import croco_pipeline

    cfg = tiny_config()
    result = croco_pipeline(config=cfg, run_id="first")
    assert by_stage(calls) == {"run_prompts": 3, "run_generate": 3, "run_score": 3,
                               "run_pairs": 1}
    gens = storage.read_parquet(result["outputs"].generations["de"])
    assert gens.height == 3 * 4  # limit 3 prompts x k 4
    scores = storage.read_parquet(result["outputs"].scores["de"])
    for col in ["prompt_id", "lang", "sample_idx", "response", "n_tokens", "finish_reason",
                "policy", "reward", "reward_rm", "reward_judge", "reward_lang", "detected_lang",
                "lang_prob"]:
        assert col in scores.columns
    pairs_uri = result["outputs"].pairs
    pairs = storage.read_parquet(storage.join(pairs_uri, "dpo"))
    assert 0 < pairs.height <= 9
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()
    assert (Path(pairs_uri) / "dpo" / "lang=fr" / "data.parquet").exists()
    stats = storage.read_parquet(storage.join(pairs_uri, "stats.parquet"))
    assert stats["lang"].to_list() == ["de", "en", "fr"]
    assert (stats["pairs"] + stats["skipped"]).to_list() == [3, 3, 3]

    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["run_id"] == "first"
    assert manifest["config"]["generation"]["k"] == 4
    assert manifest["outputs"]["generations"]["de"]["rows"] == 12
    assert manifest["outputs"]["pairs"]["key"] == Path(pairs_uri).name
    assert manifest["packages"]["prefect"]


def test_unchanged_rerun_is_served_from_cache(prefect_harness, tiny_config, calls):
    from croco.flows.pipeline import croco_pipeline

    cfg = tiny_config()
    first = croco_pipeline(config=cfg)
    calls.clear()
    second = croco_pipeline(config=cfg)
    assert by_stage(calls) == {}
    assert second["outputs"] == first["outputs"]


def test_changing_only_pairing_repairs_without_regenerating(prefect_harness, tiny_config, calls):
    from croco.flows.pipeline import croco_pipeline

    first = croco_pipeline(config=tiny_config())
    calls.clear()
    second = croco_pipeline(config=tiny_config(**{"pairing.scope": "all_lang",
                                                  "pairing.reject_target": "q1"}))
    assert by_stage(calls) == {"run_pairs": 1}
    assert second["outputs"].scores == first["outputs"].scores
    assert second["outputs"].pairs != first["outputs"].pairs
    pairs = storage.read_parquet(storage.join(second["outputs"].pairs, "dpo"))
    assert set(pairs["scope"]) == {"all_lang"} and set(pairs["reject_target"]) == {"q1"}


def test_adding_a_language_runs_only_that_language(prefect_harness, tiny_config, calls):
    from croco.flows.pipeline import croco_pipeline

    croco_pipeline(config=tiny_config())
    calls.clear()
    croco_pipeline(config=tiny_config(languages=["en", "de", "fr", "es"]))
    assert calls == Counter({("run_prompts", "es"): 1, ("run_generate", "es"): 1,
                             ("run_score", "es"): 1, ("run_pairs", "all"): 1})


def test_a_prompt_file_edited_in_place_is_read_again(prefect_harness, tiny_config, calls,
                                                     tmp_path, prompt_file):
    from croco.flows.pipeline import croco_pipeline

    edited = tmp_path / "prompts.jsonl"
    shutil.copy(prompt_file, edited)
    cfg = tiny_config(**{"prompts.path": str(edited), "prompts.limit": None})
    first = croco_pipeline(config=cfg, stages=["prompts"])
    with edited.open("a") as f:
        for pid in ("q6", "q7"):
            f.write(json.dumps({"prompt_id": pid, "lang": "en", "prompt": f"Question {pid}?",
                                "split": "train", "source": "test"}) + "\n")
    calls.clear()
    second = croco_pipeline(config=cfg, stages=["prompts"])
    assert by_stage(calls) == {"run_prompts": 3}
    assert second["outputs"].prompts["en"] != first["outputs"].prompts["en"]
    en = storage.read_parquet(storage.join(second["outputs"].prompts["en"], "data.parquet"))
    assert sorted(en["prompt_id"]) == ["q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7"]


def test_deleted_outputs_are_recomputed_despite_the_cache(prefect_harness, tiny_config, calls):
    from croco.flows.pipeline import croco_pipeline

    cfg = tiny_config()
    first = croco_pipeline(config=cfg)
    shutil.rmtree(Path(first["outputs"].generations["en"]).parent)
    shutil.rmtree(Path(first["outputs"].pairs))
    calls.clear()
    second = croco_pipeline(config=cfg)
    assert by_stage(calls)["run_generate"] == 3
    assert storage.is_complete(second["outputs"].pairs)


def _parquet_bytes(uri: str) -> list[bytes]:
    """The bytes of an output's parts in order, written or referenced."""
    return [storage.read_bytes(f) for f in storage.parquet_files(uri)]


def test_shard_groups_give_the_tables_and_pairs_of_one_task_per_language(
        prefect_harness, tiny_config, tmp_path, calls):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from croco.flows.pipeline import croco_pipeline

    common = {"languages": ["en", "de"], "generation.shard_size": 1}  # 3 shards a language
    one = croco_pipeline(config=tiny_config(data_root=str(tmp_path / "one"), **common),
                         stages=["prompts", "generate", "score", "pair"])
    calls.clear()
    three = croco_pipeline(config=tiny_config(data_root=str(tmp_path / "three"), **common,
                                              **{"orchestration.shards_per_language": 3}),
                           stages=["prompts", "generate", "score", "pair"])
    # one call per (language, shard group), each group one shard
    assert calls == Counter({("run_prompts", "en"): 1, ("run_prompts", "de"): 1,
                             ("run_generate", "en"): 3, ("run_generate", "de"): 3,
                             ("run_score", "en"): 3, ("run_score", "de"): 3,
                             ("run_pairs", "all"): 1})
    for stage in ("generations", "scores"):
        for lang in ("en", "de"):
            a, b = getattr(one["outputs"], stage)[lang], getattr(three["outputs"], stage)[lang]
            assert Path(a).relative_to(tmp_path / "one") == Path(b).relative_to(
                tmp_path / "three")  # same content key
            assert storage.is_complete(b)
            parts = _parquet_bytes(b)
            assert len(parts) == 3
            assert parts == _parquet_bytes(a)
            assert storage.read_json(storage.join(b, storage.SUCCESS))["rows"] == 3 * 4
    a, b = one["outputs"].pairs, three["outputs"].pairs
    assert Path(a).name == Path(b).name
    for table in ("dpo", "sft"):
        assert storage.read_parquet(storage.join(b, table)).equals(
            storage.read_parquet(storage.join(a, table)))
    wanted = {"generate-en-0", "generate-en-2", "generate-de-1", "seal-generate-de",
              "score-en-1", "score-de-2", "seal-score-en"}
    # ask by name: the harness's database holds every earlier test's task runs, and an
    # unfiltered read returns only the server's first page of them
    with get_client(sync_client=True) as client:
        names = {t.name for t in client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=sorted(wanted))))}
    assert wanted <= names


def test_a_killed_shard_group_keeps_the_other_shards_and_the_rerun_writes_the_missing(
        prefect_harness, tiny_config, calls, monkeypatch, tmp_path):
    from croco.flows.pipeline import croco_pipeline

    cfg = tiny_config(**{"languages": ["en", "de"], "generation.shard_size": 1,
                         "orchestration.shards_per_language": 2})  # groups: shards 0-1, 2

    class Crash(RuntimeError):
        pass

    def crash_after_first(i):
        raise Crash(f"killed after shard {i}")

    run = contract.run
    written: list[tuple[str, int]] = []

    def run_generate(stage, *args, shards=None, **kwargs):
        if not isinstance(stage, stages.Generate):
            return run(stage, *args, shards=shards, **kwargs)
        crash = crashing and stage.lang == "en" and shards == range(2)
        hook = crash_after_first if crash else (lambda i: written.append((stage.lang, i)))
        return run(stage, *args, shards=shards, on_shard=hook, **kwargs)

    monkeypatch.setattr(contract, "run", run_generate)
    crashing = True
    with pytest.raises(Crash, match="killed after shard 0"):
        croco_pipeline(config=cfg)
    assert not list(Path(cfg.data_root, "generations").glob("*/lang=en/_SUCCESS"))
    # each part is a whole stored shard: parts 0 and 2 were sampled into the store
    (store,) = Path(cfg.data_root, "samples").glob("*/lang=en")
    stored = sorted(store.glob("*.prompts.parquet"))
    assert len(stored) == 2
    before = {p: p.stat().st_mtime_ns for p in store.iterdir()}

    crashing, written[:] = False, []
    result = croco_pipeline(config=cfg)
    assert written == [("en", 1)]  # only the shard the killed group had not written
    assert {p: p.stat().st_mtime_ns for p in before} == before
    en = result["outputs"].generations["en"]
    assert storage.is_complete(en) and len(storage.references(en)) == 3
    assert storage.read_parquet(en).height == 3 * 4
    assert storage.is_complete(result["outputs"].pairs)


@pytest.fixture
def sampled(monkeypatch):
    """Rows sampled from the policy and rows scored, per (what, lang): the model work done
    (rows read back from the sample and score stores are not counted)."""
    import croco.generation
    import croco.reward

    counter: Counter = Counter()

    def counting(what, original):
        def wrapper(frame, *args, **kwargs):
            out = original(frame, *args, **kwargs)
            counter.update((what, lang) for lang in out["lang"].to_list())
            return out
        return wrapper

    monkeypatch.setattr(croco.generation, "generate_frame",
                        counting("generated", croco.generation.generate_frame))
    # score_frame(generations, ...): counted by the generation rows it scores
    monkeypatch.setattr(croco.reward, "score_frame", counting("scored", croco.reward.score_frame))
    return counter


def _rows(uri: str) -> pl.DataFrame:
    return storage.read_parquet(uri).sort("prompt_id", "sample_idx")


def test_a_grown_or_edited_prompt_file_samples_and_scores_only_the_new_prompts(
        prefect_harness, tiny_config, tmp_path, prompt_file, sampled):
    from croco.flows.pipeline import croco_pipeline

    source = tmp_path / "prompts.jsonl"
    shutil.copy(prompt_file, source)
    cfg = tiny_config(**{"prompts.path": str(source), "prompts.limit": None,
                         "languages": ["en", "de"]})  # 4 train prompts a language, k 4
    upto = ["prompts", "generate", "score", "pair"]
    first = croco_pipeline(config=cfg, stages=upto)
    assert sampled == Counter({("generated", "en"): 16, ("generated", "de"): 16,
                               ("scored", "en"): 16, ("scored", "de"): 16})
    with source.open("a") as f:
        for pid in ("q6", "q7"):
            f.write(json.dumps({"prompt_id": pid, "lang": "en", "prompt": f"Question {pid}?",
                                "split": "train", "source": "test"}) + "\n")
    sampled.clear()
    second = croco_pipeline(config=cfg, stages=upto)
    assert sampled == Counter({("generated", "en"): 2 * 4, ("scored", "en"): 2 * 4})
    for stage in ("generations", "scores"):  # views of the stores: nothing copied
        for lang in ("en", "de"):
            out = getattr(second["outputs"], stage)[lang]
            assert not [n for n in storage.list_dir(out) if n.endswith(".parquet")], out
    for stage in ("generations", "scores"):
        before, after = (_rows(getattr(r["outputs"], stage)["en"]) for r in (first, second))
        assert after["prompt_id"].unique().sort().to_list() == [
            "q0", "q1", "q2", "q3", "q6", "q7"]
        assert after.filter(pl.col("prompt_id").is_in(["q0", "q1", "q2", "q3"])).equals(before)
        assert _rows(getattr(second["outputs"], stage)["de"]).equals(_rows(getattr(first["outputs"], stage)["de"]))
    stats = storage.read_parquet(storage.join(second["outputs"].pairs, "stats.parquet"))
    assert (stats["pairs"] + stats["skipped"]).to_list() == [4, 6]  # de, en pools

    # a removed prompt is in no table, and nothing is sampled or scored
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rows = [r for r in rows if (r["lang"], r["prompt_id"]) != ("en", "q1")]
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    sampled.clear()
    third = croco_pipeline(config=cfg, stages=upto)
    assert sampled == Counter()
    kept = ["q0", "q2", "q3", "q6", "q7"]
    for stage in ("generations", "scores"):
        after = _rows(getattr(third["outputs"], stage)["en"])
        assert after["prompt_id"].unique().sort().to_list() == kept
        assert after.equals(_rows(getattr(second["outputs"], stage)["en"]).filter(
            pl.col("prompt_id").is_in(kept)))
    pairs = storage.read_parquet(storage.join(third["outputs"].pairs, "dpo"))
    assert "q1" not in pairs.filter(pl.col("prompt_lang") == "en")["prompt_id"].to_list()
    stats = storage.read_parquet(storage.join(third["outputs"].pairs, "stats.parquet"))
    assert (stats["pairs"] + stats["skipped"]).to_list() == [4, 5]

    # an edited prompt is a new one: sampled and scored again, the others read back
    for r in rows:
        if (r["lang"], r["prompt_id"]) == ("en", "q2"):
            r["prompt"] = "Give two tips for sleep."
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    sampled.clear()
    fourth = croco_pipeline(config=cfg, stages=upto)
    assert sampled == Counter({("generated", "en"): 4, ("scored", "en"): 4})
    gens, before = (_rows(r["outputs"].generations["en"]) for r in (fourth, third))
    same = ["q0", "q3", "q6", "q7"]
    assert gens.filter(pl.col("prompt_id").is_in(same)).equals(
        before.filter(pl.col("prompt_id").is_in(same)))
    assert gens.filter(pl.col("prompt_id") == "q2")["response"].to_list() != \
        before.filter(pl.col("prompt_id") == "q2")["response"].to_list()


def test_stages_option_stops_early(prefect_harness, tiny_config, calls):
    from croco.flows.pipeline import croco_pipeline

    result = croco_pipeline(config=tiny_config(), stages=["prompts", "generate"])
    filled = {name for name, value in result["outputs"] if value}
    assert filled == {"prompts", "generations"}
    assert by_stage(calls) == {"run_prompts": 3, "run_generate": 3}


def test_bad_prompt_file_fails_the_run_and_writes_nothing(prefect_harness, tiny_config,
                                                          tmp_path):
    from croco.flows.pipeline import croco_pipeline
    from croco.prompts import PromptError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": "a", "lang": "en", "prompt": "x"}\n{oops\n')
    cfg = tiny_config(**{"prompts.path": str(bad)})
    with pytest.raises(PromptError, match=r"bad\.jsonl line 2"):
        croco_pipeline(config=cfg)
    assert not (Path(cfg.data_root) / "prompts").exists() or not list(
        (Path(cfg.data_root) / "prompts").rglob("_SUCCESS"))
    assert not (Path(cfg.data_root) / "generations").exists()


def test_pipeline_on_s3(prefect_harness, tiny_config, s3_bucket):
    from croco.flows.pipeline import croco_pipeline

    cfg = tiny_config(data_root=f"s3://{s3_bucket}/croco", languages=["en", "de"])
    result = croco_pipeline(config=cfg)
    pairs_uri = result["outputs"].pairs
    assert pairs_uri.startswith(f"s3://{s3_bucket}/croco/pairs/")
    assert storage.read_parquet(storage.join(pairs_uri, "stats.parquet")).height == 2
    manifest = storage.read_bytes(result["manifest"]).decode()
    assert "testing-secret-value-123" not in manifest
    assert "testing-key-id" not in manifest
    assert pl.DataFrame(json.loads(manifest)["outputs"]["scores"]).width == 2


def test_training_variants_and_heldout_comparison(prefect_harness, tiny_config, tiny_lm_other,
                                                  calls):
    from croco.flows.pipeline import croco_pipeline

    cfg = tiny_config(**{
        "training.enabled": True,
        "experiments": [
            {"name": "dpo", "method": "dpo"},
            {"name": "dpo-all", "method": "dpo", "pairing": {"scope": "all_lang"},
             "training": {"beta": 0.2}},
            {"name": "sft", "method": "sft"},
            {"name": "offp", "method": "dpo", "generation_policy": tiny_lm_other},
            {"name": "iter", "method": "dpo", "rounds": 2},
        ],
    })
    result = croco_pipeline(config=cfg, run_id="variants")
    outputs = result["outputs"]
    training = outputs.training_runs()
    assert set(training) == {"dpo", "dpo-all", "sft", "offp", "iter:round1", "iter:round2"}
    metrics = {k: storage.read_json(storage.join(u, "metrics.json")) for k, u in training.items()}
    assert metrics["sft"]["method"] == "sft"
    assert metrics["offp"]["off_policy"] is True
    assert metrics["dpo"]["off_policy"] is False
    # dpo and iter round 1 train on the same pairs with the same settings: one cached run.
    assert training["iter:round1"] == training["dpo"]
    # round 2 continues round 1's adapter on pairs sampled from it.
    assert metrics["iter:round2"]["init_adapter"].endswith("adapter")
    assert outputs.variants["iter"].rounds[1].pairs != outputs.pairs
    # dpo-all: same pairs key family? no: all_lang pairs, stored ref log-probs of its own.
    pairs_all = storage.read_parquet(storage.join(outputs.variants["dpo-all"].rounds[0].pairs, "dpo"))
    assert set(pairs_all["scope"]) == {"all_lang"}
    # off-policy pairs come from the other model's samples
    gens = storage.read_parquet(result["outputs"].generations["en"])
    off_scores = storage.read_parquet(outputs.variants["offp"].scores["en"])
    assert set(off_scores["policy"]) == {tiny_lm_other} and set(gens["policy"]) != {tiny_lm_other}

    manifest = json.loads(Path(result["manifest"]).read_text())
    described = read_outputs(manifest).training_runs()
    assert described["offp"].off_policy is True
    assert described["offp"].generation_policy == tiny_lm_other
    assert described["dpo"].off_policy is False
    # the held-out answers are in the record with their rows and seconds, like their scores
    heldout_gens = read_outputs(manifest).evaluation.generations
    assert set(heldout_gens) == {"base", "dpo", "dpo-all", "sft", "offp", "iter"}
    assert heldout_gens["base"]["en"].rows == 1 and heldout_gens["base"]["en"].seconds >= 0
    assert storage.read_parquet(heldout_gens["dpo"]["de"].uri)["lang"].to_list() == ["de"]

    summary = storage.read_parquet(outputs.evaluation.heldout)
    assert set(summary["model"]) == {"base", "dpo", "dpo-all", "sft", "offp", "iter"}
    assert summary.filter(pl.col("model") == "base")["answers"].to_list() == [1, 1, 1]

    judged = outputs.evaluation.judgments
    assert set(judged) == {"dpo", "dpo-all", "sft", "offp", "iter"}
    judgments = storage.read_parquet(storage.join(judged["dpo"], "judgments.parquet"))
    assert judgments.height == 3 * 2  # one held-out prompt per language, both orders
    assert set(judgments["verdict"]) <= {"1", "2", "T"}
    rates = storage.read_parquet(storage.join(judged["dpo"], "win_rates.parquet"))
    assert rates["lang"].to_list() == ["de", "en", "fr"]
    assert all(0 <= w <= 100 for w in rates["win_rate"])

    report = Path(result["report"]).read_text()
    assert "# croco report: run variants" in report
    assert "**dpo**: open-ended win rate vs base >= 50 in" in report
    for png in ("win_rates.png", "heldout_rewards.png", "pair_gaps.png",
                "language_fidelity.png"):
        assert (Path(result["report"]).parent / png).stat().st_size > 1000
    # every training run's curves, with the rows it trained on per language
    curves = report.split("## Training curves", 1)[1].split("\n## ", 1)[0]
    assert "| run | method | de | en | fr | total |" in curves
    for name in training:
        block = curves.split(f"### {name}\n", 1)[1].split("###", 1)[0]
        assert "- too few steps to judge (2 logged" in block  # max_steps 2: no warning
        file = "curves-" + name.replace(":", "-") + ".png"
        assert f"]({file})" in block
        assert (Path(result["report"]).parent / file).read_bytes().startswith(b"\x89PNG")
    sft_rows = metrics["sft"]["train_by_lang"]
    assert f"| sft | sft | {sft_rows['de']} | {sft_rows['en']} | {sft_rows['fr']} |" in curves

    calls.clear()
    again = croco_pipeline(config=cfg)
    assert by_stage(calls) == {}
    assert again["outputs"].training_runs() == training


def test_online_dpo_rounds_continue_the_adapter_without_sampling_between_rounds(
        prefect_harness, tiny_config, calls):
    """Online DPO samples as it trains: round 2 continues round 1's adapter on the training
    prompts, and the pipeline generates, scores and pairs nothing for either round."""
    from croco.training.run import adapter_path
    from croco.flows.pipeline import croco_pipeline

    cfg = tiny_config(**{"training.enabled": True, "evaluation.enabled": False,
                         "experiments": [{"name": "on", "method": "online_dpo", "rounds": 2}]})
    result = croco_pipeline(config=cfg)
    # the run's own samples, scores and pairs only: none for the rounds
    assert by_stage(calls) == {"run_prompts": 3, "run_generate": 3, "run_score": 3,
                               "run_pairs": 1}
    training = result["outputs"].training_runs()
    assert set(training) == {"on:round1", "on:round2"}
    assert [r.pairs for r in result["outputs"].variants["on"].rounds] == [None, None]
    assert training["on:round1"] != training["on:round2"]
    m1, m2 = (storage.read_json(storage.join(training[r], "metrics.json"))
              for r in ("on:round1", "on:round2"))
    assert m1["init_adapter"] is None
    assert m2["init_adapter"] == adapter_path(training["on:round1"])
    assert m1["method"] == m2["method"] == "online_dpo"


def test_per_language_models_go_through_their_own_rounds(prefect_harness, tiny_config,
                                                          calls):
    """per_language with rounds 2: round 2 samples each language from that language's
    round-1 adapter (one new generate and score per language), pairs the new scores once,
    and trains each language's model on from its own adapter."""
    from croco.flows.pipeline import croco_pipeline
    from croco.training.run import adapter_path

    cfg = tiny_config(**{"training.enabled": True, "evaluation.enabled": False,
                         "languages": ["en", "de"],
                         "experiments": [{"name": "pl", "method": "dpo", "per_language": True,
                                          "rounds": 2}]})
    result = croco_pipeline(config=cfg)
    rounds = result["outputs"].variants["pl"].rounds
    assert len(rounds) == 2
    first, second = rounds[0].training_by_lang, rounds[1].training_by_lang
    assert set(first) == set(second) == {"en", "de"}
    assert by_stage(calls) == {"run_prompts": 2, "run_generate": 4, "run_score": 4,
                               "run_pairs": 2}
    for lang in ("en", "de"):
        m = storage.read_json(storage.join(second[lang], "metrics.json"))
        assert m["init_adapter"] == adapter_path(first[lang]), lang
        assert m["lang"] == lang
        assert list(m["train_by_lang"]) == [lang]  # one language's pairs only
        samples = storage.read_parquet(rounds[1].scores[lang])
        assert set(samples["policy"]) == {f"{cfg.policy.model}+{adapter_path(first[lang])}"}
    assert first["en"] != first["de"] and second["en"] != second["de"]
    assert result["outputs"].variants["pl"].final is None  # not evaluated against the base
    # croco.plan names exactly these training runs without running anything.
    from croco import plan

    assert plan.run_identities(cfg)["train"] == {
        Path(u).name for r in rounds for u in r.training_by_lang.values()}


def test_second_dpo_variant_reuses_stored_reference_logps(prefect_harness, tiny_config):
    from croco.flows.pipeline import croco_pipeline

    cfg = tiny_config(**{"training.enabled": True, "evaluation.enabled": False,
                         "experiments": [{"name": "beta1", "method": "dpo"},
                                      {"name": "beta2", "method": "dpo",
                                       "training": {"beta": 0.5, "learning_rate": 1e-3}}]})
    result = croco_pipeline(config=cfg)
    m1 = storage.read_json(storage.join(result["outputs"].training_runs()["beta1"], "metrics.json"))
    m2 = storage.read_json(storage.join(result["outputs"].training_runs()["beta2"], "metrics.json"))
    # the reference log-probs are one stage output, computed once before either trains
    (r1,), (r2,) = (v.rounds for v in result["outputs"].variants.values())
    assert r1.ref_logps == r2.ref_logps and storage.is_complete(r1.ref_logps)
    assert m1["ref_logps"] == "stored" and m1["ref_forward_batches"] == 0
    assert m2["ref_logps"] == "stored" and m2["ref_forward_batches"] == 0
