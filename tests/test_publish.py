"""Publishing a run on the Hub: against a loopback stand-in for the Hub's HTTP API
(`fake_hub`), the dataset read back with `datasets` from the files the stand-in received."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from croco import storage
from croco.manifest import EvaluationOutputs, RoundOutputs, RunOutputs, VariantOutputs
from croco.pairing import pair_sets
from croco.pairs_io import write_pair_sets

from conftest import HUB_TOKEN

LANGS = ["en", "de"]
PNG = b"\x89PNG\r\n\x1a\n" + b"curves" * 10


def _scores(k: int = 4) -> pl.DataFrame:
    rows = []
    for lang in LANGS:
        for p in range(3):
            for i in range(k):
                rm = float((p * 7 + i * 3 + (lang == "de")) % 5) - 1.0
                lid = 0.9 if i % 2 == 0 else 0.2
                rows.append({"prompt_id": f"q{p}", "lang": lang, "sample_idx": i,
                             "response": f"{lang} answer {p}.{i}", "n_tokens": 3,
                             "finish_reason": "stop", "reward_rm": rm, "reward_lang": lid,
                             "reward": rm + 0.5 * lid, "detected_lang": lang,
                             "lang_prob": lid})
    return pl.DataFrame(rows)


def _prompts() -> pl.DataFrame:
    return pl.DataFrame([{"prompt_id": f"q{p}", "lang": lang, "prompt": f"{lang} prompt {p}?"}
                         for lang in LANGS for p in range(3)])


def _done(uri: str, **info) -> str:
    storage.mark_complete(uri, {"rows": 1, "seconds": 0.1, **info})
    return uri


def _training(root: Path, key: str, *, method: str, pairs_uri: str, curves: bool,
              merged: bool = False) -> str:
    out = root / "training" / key
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "org/base-model", "peft_type": "LORA", "r": 4}))
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights-" + key.encode() * 50)
    if merged:
        (out / "merged").mkdir()
        (out / "merged" / "config.json").write_text('{"model_type": "llama"}')
        (out / "merged" / "model.safetensors").write_bytes(b"merged-weights" * 20)
    if curves:
        (out / "curves.png").write_bytes(PNG)
        (out / "log_history.json").write_text(json.dumps([{"step": 1, "loss": 0.69}]))
    training = {"learning_rate": 5e-6, "sft_learning_rate": 2e-4, "num_train_epochs": 1.0,
                "beta": 0.1, "lora_r": 4, "lora_alpha": 8, "effective_batch_size": 4}
    storage.write_json(str(out / "training_config.json"),
                       {"method": method, "training": training, "pairs_uri": pairs_uri,
                        "variant_name": key, "lang": None})
    storage.write_json(str(out / "metrics.json"),
                       {"method": method, "steps": 2, "first_loss": 0.6931, "final_loss": 0.61,
                        "pairs_train": 6, "merged": str(out / "merged") if merged else None})
    return _done(str(out), method=method)


@pytest.fixture
def run(tmp_path):
    """A hand-built run: in_lang pairs (the run's), all_lang pairs (variant dpo-all), an
    SFT variant, a DPO variant with curves and merged weights, and an evaluation."""
    from croco.config_loading import config_from_dict
    from croco.manifest import write_manifest

    root = tmp_path / "data"
    scores = _scores()
    score_uris = {}
    for lang in LANGS:
        uri = str(root / "scores" / "s1" / f"lang={lang}")
        storage.write_parquet(scores.filter(pl.col("lang") == lang),
                              storage.join(uri, "part-00000.parquet"))
        score_uris[lang] = _done(uri)
    pairs = {}
    for key, scope in (("pin", "in_lang"), ("pall", "all_lang")):
        uri = str(root / "pairs" / key)
        sets = pair_sets(scores, _prompts(), scope=scope)
        pairs[scope] = _done(uri, **write_pair_sets(sets, uri, LANGS))
    t_dpo = _training(root, "tdpo", method="dpo", pairs_uri=pairs["in_lang"], curves=True,
                      merged=True)
    t_all = _training(root, "tall", method="dpo", pairs_uri=pairs["all_lang"], curves=True)
    t_sft = _training(root, "tsft", method="sft", pairs_uri=pairs["in_lang"], curves=False)

    heldout = str(root / "runs" / "r1" / "heldout.parquet")
    storage.write_parquet(pl.DataFrame({
        "model": ["base", "base", "dpo", "dpo", "sft", "sft"], "lang": LANGS * 3,
        "answers": [2] * 6, "reward_mean": [1.0, 0.5, 1.25, 0.75, 0.9, 0.4],
        "lang_match": [0.5, 0.5, 1.0, 0.5, 0.5, 0.0], "mean_tokens": [3.0] * 6}), heldout)
    ev_scores = {}
    for model in ("base", "dpo"):
        ev_scores[model] = {}
        for lang in LANGS:
            uri = str(root / "scores" / f"h-{model}" / f"lang={lang}")
            storage.write_parquet(scores.filter(pl.col("lang") == lang).head(2),
                                  storage.join(uri, "part-00000.parquet"))
            ev_scores[model][lang] = _done(uri)
    structured = {}
    for model, acc in (("base", 0.4), ("dpo", 0.55)):
        uri = str(root / "structured" / f"x-{model}")
        storage.write_parquet(pl.DataFrame({"lang": LANGS, "task": ["mc_en", "mc_de"],
                                            "metric": ["acc", "acc"], "value": [acc, acc + 0.1],
                                            "n": [20, 20]}),
                              storage.join(uri, "results.parquet"))
        structured[model] = _done(uri)
    judge = str(root / "judgments" / "j1")
    storage.write_parquet(pl.DataFrame({"lang": LANGS, "win_rate": [62.5, 45.0],
                                        "ci_low": [40.0, 20.0], "ci_high": [80.0, 70.0],
                                        "lc_win_rate": [60.0, 47.5], "n_prompts": [2, 2]}),
                          storage.join(judge, "win_rates.parquet"))
    _done(judge, first_position_share=0.5, invalid=0)
    check = str(root / "reward_check" / "rc")
    storage.write_parquet(pl.DataFrame({"lang": LANGS, "pairs": [20, 20],
                                        "accuracy": [0.8, 0.7], "accuracy_rm": [0.75, 0.7]}),
                          storage.join(check, "accuracy.parquet"))
    _done(check)

    cfg = config_from_dict({
        "run_name": "pub", "languages": LANGS, "data_root": str(root),
        "policy": {"model": "org/base-model"},
        "generation": {"k": 4, "max_new_tokens": 8},
        "reward": {"scorers": [{"type": "classifier", "name": "rm", "model": "org/rm",
                                "weight": 1.0},
                               {"type": "langid", "name": "lang", "weight": 0.5}]},
        "experiments": [{"name": "dpo", "method": "dpo"},
                        {"name": "dpo-all", "method": "dpo", "pairing": {"scope": "all_lang"}},
                        {"name": "sft", "method": "sft"}],
        "evaluation": {"reward_check": "builtin:demo_preferences"}})
    outputs = RunOutputs[str](
        scores=score_uris, pairs=pairs["in_lang"],
        variants={"dpo": VariantOutputs[str](rounds=[RoundOutputs[str](
                      pairs=pairs["in_lang"], training=t_dpo)]),
                  "dpo-all": VariantOutputs[str](rounds=[RoundOutputs[str](
                      pairs=pairs["all_lang"], training=t_all)]),
                  "sft": VariantOutputs[str](rounds=[RoundOutputs[str](
                      pairs=pairs["in_lang"], training=t_sft)])},
        evaluation=EvaluationOutputs[str](scores=ev_scores, heldout=heldout,
                                          structured=structured, judgments={"dpo": judge},
                                          reward_check=check))
    write_manifest(str(root), "r1", cfg.model_dump(mode="json"), outputs)
    return {"root": str(root), "scores": scores, "pairs": pairs, "tmp": tmp_path}


def _repo_folder(hub: dict, repo: str, where: Path) -> Path:
    """The files the stand-in holds for `repo`, as a folder."""
    for (r, path), data in hub["files"].items():
        if r == repo:
            target = where / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return where


def _publish(run, **kw):
    from croco.publish import load_manifest, publish

    return publish(load_manifest(run["root"], "r1"), dataset="team/croco-pairs",
                   models="team/croco", **kw)


def test_a_published_run_reads_back_with_datasets(run, fake_hub, tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import DatasetCard, ModelCard

    done = _publish(run)
    assert done.dataset == "team/croco-pairs"
    assert done.models == ["team/croco-dpo", "team/croco-dpo-all", "team/croco-sft"]
    assert fake_hub["repos"]["team/croco-pairs"]["type"] == "dataset"
    assert fake_hub["repos"]["team/croco-pairs"]["visibility"] == "private"

    folder = _repo_folder(fake_hub, "team/croco-pairs", tmp_path / "hub-dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cache = str(tmp_path / "ds-cache")
    in_lang = datasets.load_dataset(str(folder), "in_lang", cache_dir=cache)
    expected = storage.read_parquet(storage.join(run["pairs"]["in_lang"], "dpo"))
    assert sorted(in_lang) == sorted(LANGS)
    for lang in LANGS:
        want = expected.filter(pl.col("prompt_lang") == lang)
        got = in_lang[lang].to_polars()
        assert got.height == want.height > 0
        assert got.select(want.columns).equals(want)
    # each side's reward per scorer is that sample's, found by its text
    scores = run["scores"]
    for row in in_lang["de"].to_list():
        for side in ("chosen", "rejected"):
            sample = scores.filter(pl.col("response") == row[side]).row(0, named=True)
            assert row[f"{side}_reward_rm"] == sample["reward_rm"]
            assert row[f"{side}_reward_lang"] == sample["reward_lang"]
            assert row[f"{side}_score"] == sample["reward"]
    all_lang = datasets.load_dataset(str(folder), "all_lang", cache_dir=cache)
    assert set(all_lang["en"]["scope"]) == {"all_lang"}
    assert sum(len(s) for s in all_lang.values()) == storage.read_parquet(
        storage.join(run["pairs"]["all_lang"], "dpo")).height
    sft = datasets.load_dataset(str(folder), "sft", cache_dir=cache)
    for row in sft["en"].to_list():
        sample = scores.filter(pl.col("response") == row["completion"]).row(0, named=True)
        assert row["reward_rm"] == sample["reward_rm"] and row["reward"] == sample["reward"]

    card = DatasetCard.load(folder / "README.md")
    assert card.data.license == "unknown" and card.data.language == LANGS
    assert [c["config_name"] for c in card.data.configs] == ["in_lang", "all_lang", "sft"]
    text = card.text
    assert "reject_target" in text and "mean_minus_2sigma" in text  # the pairing settings
    assert "| lang | prompts | samples |" in text  # the stats table per language
    assert "## Reward check" in text and "0.800" in text
    assert "| rm | classifier | org/rm | 1.0 |" in text
    assert "2605.26293" in text and "@misc{croco" in text

    # the models: adapter at the root, merged/ when the run made it, the curves
    adapter = Path(run["root"]) / "training" / "tdpo" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert fake_hub["files"][("team/croco-dpo", name)] == (adapter / name).read_bytes()
    assert fake_hub["files"][("team/croco-dpo", "merged/model.safetensors")] == \
        b"merged-weights" * 20
    assert fake_hub["files"][("team/croco-dpo", "curves.png")] == PNG
    assert ("team/croco-sft", "merged/model.safetensors") not in fake_hub["files"]
    assert ("team/croco-sft", "curves.png") not in fake_hub["files"]
    dpo = ModelCard(fake_hub["files"][("team/croco-dpo", "README.md")].decode())
    assert dpo.data.base_model == "org/base-model" and dpo.data.library_name == "peft"
    assert dpo.data.datasets == ["team/croco-pairs"]
    assert "![training curves](curves.png)" in dpo.text
    assert "Config `in_lang` of [team/croco-pairs]" in dpo.text
    # the evaluation against the base, per language, from the report's tables
    assert "| en | 1.000 | 1.250 | 50% | 100% | 0.400 | 0.550 | 62.5 [40.0, 80.0] | 60.0 |" \
        in dpo.text
    assert "| beta | 0.1 |" in dpo.text and 'subfolder="merged"' in dpo.text
    sft_card = fake_hub["files"][("team/croco-sft", "README.md")].decode()
    assert "No training curves were recorded" in sft_card
    assert "Config `sft` of [team/croco-pairs]" in sft_card
    assert "| beta |" not in sft_card and "| sft_learning_rate | 0.0002 |" in sft_card
    assert "Config `all_lang`" in fake_hub["files"][("team/croco-dpo-all", "README.md")].decode()
    # the token is nowhere: not in a file, not in a commit message
    assert not [k for k, v in fake_hub["files"].items() if HUB_TOKEN.encode() in v]
    assert HUB_TOKEN not in json.dumps(fake_hub["commits"])


def test_publishing_again_changes_nothing_and_an_interrupted_one_resumes(run, fake_hub):
    first = _publish(run)
    assert all(first.changed.values())
    commits = list(fake_hub["commits"])
    second = _publish(run)
    assert not any(second.changed.values())
    assert fake_hub["commits"] == commits  # no commit at all
    assert second.commits == first.commits

    # a publish that stopped part way: what the hub lacks is uploaded, nothing else
    del fake_hub["files"][("team/croco-pairs", "in_lang/de.parquet")]
    del fake_hub["files"][("team/croco-dpo", "curves.png")]
    fake_hub["files"][("team/croco-pairs", "in_lang/xx.parquet")] = b"stale"
    third = _publish(run)
    assert {r for r, c in third.changed.items() if c} == {"team/croco-pairs", "team/croco-dpo"}
    assert fake_hub["changes"][-2:] == [
        ("team/croco-pairs", ["+in_lang/de.parquet", "-in_lang/xx.parquet"]),
        ("team/croco-dpo", ["+curves.png"])]


def test_the_visibility_follows_the_option(run, fake_hub):
    _publish(run)
    assert fake_hub["repos"]["team/croco-dpo"]["visibility"] == "private"
    _publish(run, private=False)
    assert fake_hub["repos"]["team/croco-dpo"]["visibility"] == "public"
    assert fake_hub["repos"]["team/croco-pairs"]["visibility"] == "public"


runner = CliRunner()


def _cli(run, *args):
    from croco.flows.cli import app

    return runner.invoke(app, ["publish", "r1", "--data-root", run["root"], *args])


def _writes(hub) -> list:
    return [r for r in hub["requests"] if r[0] in ("POST", "PUT")
            and not r[1].startswith("/api/agent")]


def test_croco_publish_prints_what_it_published(run, fake_hub):
    result = _cli(run, "--dataset", "team/croco-pairs", "--models", "team/croco")
    assert result.exit_code == 0, result.output
    assert "team/croco-pairs" in result.output and "team/croco-dpo-all" in result.output
    assert "in_lang 6 rows" in result.output
    assert "3 model repositories; 4 committed, 0 unchanged" in result.output
    again = _cli(run, "--dataset", "team/croco-pairs", "--models", "team/croco")
    assert again.exit_code == 0, again.output
    assert "3 model repositories; 0 committed, 4 unchanged" in again.output
    assert HUB_TOKEN not in result.output + again.output


def test_without_a_token_publish_fails_before_anything_is_sent(run, fake_hub, monkeypatch,
                                                               tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    result = _cli(run, "--dataset", "team/croco-pairs")
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "HF_TOKEN" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not [r for r in fake_hub["requests"] if not r[1].startswith("/api/agent")]


def test_a_refused_token_is_one_error_line_without_the_token(run, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_5678")
    result = _cli(run, "--dataset", "team/croco-pairs")
    assert result.exit_code == 2
    assert result.output.startswith("error: dataset repo team/croco-pairs:")
    assert "401" in result.output and "HF_TOKEN" in result.output
    assert "hf_wrong_token_5678" not in result.output
    assert not _writes(fake_hub)


def test_a_repository_of_someone_else_is_refused_before_any_upload(run, fake_hub):
    fake_hub["foreign"]["someone/pairs"] = "dataset"
    result = _cli(run, "--dataset", "someone/pairs", "--models", "team/croco")
    assert result.exit_code == 2
    assert "someone/pairs exists and belongs to 'someone'" in result.output
    assert not _writes(fake_hub)
    result = _cli(run, "--dataset", "team/croco-pairs", "--models", "elsewhere/croco")
    assert result.exit_code == 2
    assert "model repo elsewhere/croco-dpo" in result.output and "'elsewhere'" in result.output
    assert not _writes(fake_hub)


def test_no_permission_to_write_names_the_repo(run, fake_hub):
    fake_hub["read_only"].add("team")
    result = _cli(run, "--dataset", "team/croco-pairs")
    assert result.exit_code == 2
    errors = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and result.output.strip().splitlines()[-1] == errors[0]
    assert "team/croco-pairs" in errors[0] and "403" in errors[0]
    assert not fake_hub["files"]
    assert HUB_TOKEN not in result.output


def test_bad_names_and_missing_runs_are_refused_before_the_network(run, fake_hub):
    result = _cli(run, "--dataset", "team/bad name!")
    assert result.exit_code == 2 and "not a valid repository id" in result.output
    from croco.flows.cli import app

    missing = runner.invoke(app, ["publish", "nope", "--dataset", "team/x",
                                  "--data-root", run["root"]])
    assert missing.exit_code == 2 and "no run 'nope'" in missing.output
    assert not [r for r in fake_hub["requests"] if not r[1].startswith("/api/agent")]


def _no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


def test_a_run_that_publishes_checks_the_token_before_it_starts(monkeypatch, tmp_path):
    from croco import preflight
    from croco.config_loading import config_from_dict
    from croco.errors import UserError

    _no_token(monkeypatch, tmp_path)
    cfg = config_from_dict({"languages": LANGS, "publish": {"dataset": "team/croco-pairs"}})
    last = preflight._last_stage(cfg, None)
    with pytest.raises(UserError, match="publish.dataset is set: no Hugging Face token.*HF_TOKEN"):
        preflight.check_publish(cfg, last)
    bad = config_from_dict({"languages": LANGS, "publish": {"dataset": "team/a b"}})
    with pytest.raises(UserError, match="publish.dataset 'team/a b' is not a valid"):
        preflight.check_publish(bad, last)
    preflight.check_publish(config_from_dict({"languages": LANGS}), last)  # off: no check
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    preflight.check_publish(cfg, last)


@pytest.mark.slow
def test_the_pipeline_publishes_at_its_end_and_the_flow_again_changes_nothing(
        prefect_harness, tiny_config, fake_hub, tmp_path, monkeypatch):
    """The tiny pipeline with training and evaluation, `publish.dataset` set; then the
    `croco-publish` flow on the same run uploads nothing new."""
    import datasets

    from croco.flows.pipeline import croco_pipeline
    from croco.flows.publish import croco_publish

    cfg = tiny_config(**{"languages": ["en", "de"], "training.enabled": True,
                         "evaluation.judge.enabled": True,
                         "publish": {"dataset": "team/tiny-pairs", "models": "team/tiny"}})
    result = croco_pipeline(config=cfg, run_id="pub")
    assert result["published"]["models"] == ["team/tiny-dpo"]
    files = {p for (r, p) in fake_hub["files"] if r == "team/tiny-pairs"}
    assert "README.md" in files and any(p.startswith("in_lang/") for p in files)
    card = fake_hub["files"][("team/tiny-dpo", "README.md")].decode()
    assert "win rate vs base [95% CI]" in card and "| en |" in card
    assert ("team/tiny-dpo", "adapter_model.safetensors") in fake_hub["files"]

    folder = _repo_folder(fake_hub, "team/tiny-pairs", tmp_path / "hub-dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pairs = datasets.load_dataset(str(folder), "in_lang", cache_dir=str(tmp_path / "cache"))
    dpo = storage.read_parquet(storage.join(result["outputs"].pairs, "dpo"))
    assert sum(len(s) for s in pairs.values()) == dpo.height > 0
    assert {"chosen_reward_rm", "rejected_reward_judge"} <= set(pairs["en"].column_names)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    commits = list(fake_hub["commits"])
    again = croco_publish(run_id="pub", dataset="team/tiny-pairs", models="team/tiny",
                          data_root=cfg.data_root)
    assert again["commits"] == result["published"]["commits"]
    assert fake_hub["commits"] == commits


def test_each_variant_is_one_repository_named_by_the_prefix(run, tmp_path):
    """Per-language variants give one repository per language; iterative ones their last
    round, whose pairs (sampled from the round before) are not in the dataset."""
    from croco.config_loading import config_from_dict
    from croco.manifest import read_outputs, write_manifest
    from croco.publish import dataset_config_of, load_manifest, model_repos, pair_sets

    root = Path(run["root"])
    manifest = load_manifest(str(root), "r1")
    pairs = run["pairs"]["in_lang"]
    t_en = _training(root, "ten", method="dpo", pairs_uri=pairs, curves=False)
    t_de = _training(root, "tde", method="dpo", pairs_uri=pairs, curves=False)
    later = str(root / "pairs" / "p2")
    _done(later)
    t_r1 = _training(root, "tr1", method="dpo", pairs_uri=pairs, curves=False)
    t_r2 = _training(root, "tr2", method="dpo", pairs_uri=later, curves=False)
    cfg = config_from_dict({**manifest["config"], "experiments": [
        {"name": "per-lang", "method": "dpo", "per_language": True},
        {"name": "iter", "method": "dpo", "rounds": 2}]})
    outputs = RunOutputs[str](
        scores={lang: o.uri for lang, o in read_outputs(manifest).scores.items()},
        pairs=pairs,
        variants={"per-lang": VariantOutputs[str](rounds=[RoundOutputs[str](
                      pairs=pairs, training_by_lang={"en": t_en, "de": t_de})]),
                  "iter": VariantOutputs[str](rounds=[
                      RoundOutputs[str](pairs=pairs, training=t_r1),
                      RoundOutputs[str](pairs=later, training=t_r2)])})
    write_manifest(str(root), "r2", cfg.model_dump(mode="json"), outputs)
    m2 = load_manifest(str(root), "r2")
    repos = model_repos(m2, "me/x")
    assert [(r.repo_id, r.lang, r.training.key) for r in repos] == [
        ("me/x-per-lang-de", "de", "tde"), ("me/x-per-lang-en", "en", "ten"),
        ("me/x-iter", None, "tr2")]
    assert [dataset_config_of(m2, r) for r in repos] == ["in_lang", "in_lang", None]
    assert list(pair_sets(m2)) == ["in_lang"]
