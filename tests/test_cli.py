from __future__ import annotations

import polars as pl
from typer.testing import CliRunner

from croco import storage
from croco.flows.cli import app

runner = CliRunner()


def test_config_plan_lists_what_a_run_would_compute(tmp_path):
    result = runner.invoke(app, ["config", "plan", "--set", f"data_root={tmp_path}"])
    assert result.exit_code == 0, result.output
    rows = {r[0].strip(): [int(x) for x in r[1:]] for r in (
        line.strip("│ ").split("│") for line in result.output.splitlines()
        if line.startswith("│"))}
    # The demo: 7 languages; nothing is there yet, so everything is to compute.
    assert rows["prompts"] == [7, 0, 7] and rows["generate"] == [7, 0, 7]
    assert rows["pair"] == [1, 0, 1] and rows["structured"] == [2, 0, 2]
    assert not list(tmp_path.iterdir())  # a plan writes nothing


def test_config_show_prints_the_resolved_config():
    result = runner.invoke(app, ["config", "show", "--set", "generation.k=5"])
    assert result.exit_code == 0
    assert "k: 5" in result.stdout
    assert "reject_target: mean_minus_2sigma" in result.stdout


def test_unknown_key_exits_non_zero_with_the_key_path():
    result = runner.invoke(app, ["config", "show", "--set", "pairing.scoop=all_lang"])
    assert result.exit_code == 2
    assert "pairing.scoop: unknown key" in result.output


def test_run_with_unknown_language_fails_before_any_work(tmp_path):
    result = runner.invoke(app, ["run", "--set", "languages=[en, zz]",
                                 "--set", f"data_root={tmp_path / 'data'}"])
    assert result.exit_code == 2
    assert "'zz' is not an ISO 639-1 language code" in result.output
    assert not (tmp_path / "data").exists()


def test_pairs_show_prints_pairs_and_stats(tmp_path):
    root = tmp_path / "pairs" / "abc"
    pairs = pl.DataFrame({
        "prompt_id": ["p1"], "prompt_lang": ["de"], "prompt": ["Was ist Regen?"],
        "chosen": ["Wasser, das fällt."], "rejected": ["Bla."], "chosen_score": [1.5],
        "rejected_score": [-0.5], "chosen_lang": ["de"], "rejected_lang": ["de"],
        "pool_size": [8], "scope": ["in_lang"], "reject_target": ["mean_minus_2sigma"]})
    storage.write_parquet(pairs, str(root / "dpo" / "lang=de" / "data.parquet"))
    stats = pl.DataFrame({"lang": ["de"], "prompts": [1], "samples": [8], "reward_mean": [0.1],
                          "reward_std": [0.7], "pairs": [1], "skipped": [0], "gap_mean": [2.0],
                          "gap_median": [2.0], "gap_min": [2.0], "gap_max": [2.0],
                          "lang_match": [0.75]})
    storage.write_parquet(stats, str(root / "stats.parquet"))
    result = runner.invoke(app, ["pairs", "show", str(root)])
    assert result.exit_code == 0, result.output
    assert "Wasser, das fällt." in result.output and "Bla." in result.output
    assert "75%" in result.output


def test_pairs_show_on_an_empty_folder_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["pairs", "show", str(tmp_path)])
    assert result.exit_code == 2
    assert "no pairs found" in result.output


def _write_config(path, cfg) -> str:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


import pytest  # noqa: E402


@pytest.mark.slow
def test_croco_run_trains_and_prints_the_heldout_comparison(prefect_harness, tiny_config,
                                                            tmp_path):
    cfg = tiny_config(**{"training.enabled": True})
    path = _write_config(tmp_path / "c.yaml", cfg)
    result = runner.invoke(app, ["run", path, "--run-id", "cli-run"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "pairs (in_lang, mean_minus_2sigma)" in out
    assert "trained dpo (dpo" in out
    assert "held-out answers" in out and "dpo reward" in out
    assert (tmp_path / "data" / "runs" / "cli-run" / "manifest.json").exists()
    assert (tmp_path / "data" / "runs" / "cli-run" / "heldout.parquet").exists()

    report = runner.invoke(app, ["report", "cli-run", "--data-root", str(tmp_path / "data")])
    assert report.exit_code == 0, report.output
    assert "croco report: run cli-run" in report.output
    assert "Held-out answers" in report.output
    missing = runner.invoke(app, ["report", "nope", "--data-root", str(tmp_path / "data")])
    assert missing.exit_code == 2 and "no run 'nope'" in missing.output


def test_train_rm_command(tiny_lm, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(
        f'{{"prompt": "Q{i}?", "chosen": "A good answer.", "rejected": "zz qq"}}\n'
        for i in range(8)))
    result = runner.invoke(app, ["train-rm", str(prefs), "--base", tiny_lm, "--out",
                                 str(tmp_path / "rm"), "--set", "training.max_steps=2",
                                 "--set", "training.effective_batch_size=4",
                                 "--set", "training.per_device_batch_size=4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rm" / "model" / "config.json").exists()
    from croco.reward.classifier import ClassifierRewardModel

    rm = ClassifierRewardModel(str(tmp_path / "rm" / "model"))
    assert len(rm.score(["Q?"], ["A good answer."])) == 1
    bad = runner.invoke(app, ["train-rm", str(tmp_path / "none.jsonl"), "--base", tiny_lm,
                              "--out", str(tmp_path / "rm2")])
    assert bad.exit_code == 1 and "preference file not found" in bad.output


def test_training_launcher_runs_one_variant(tiny_config, tmp_path, monkeypatch):
    from croco.training import launch

    seen = {}
    monkeypatch.setattr(launch, "run_train", lambda spec: seen.update(spec=spec) or "uri")
    cfg = tiny_config(experiments=[{"name": "b2", "method": "dpo", "training": {"beta": 0.2}}])
    path = _write_config(tmp_path / "c.yaml", cfg)
    assert launch.main(["--config", path, "--variant", "b2", "--pairs-uri", "/p/k"]) == "uri"
    spec = seen["spec"]
    assert spec.training.beta == 0.2 and spec.pairs_uri == "/p/k"
    assert spec.method == "dpo" and spec.variant_name == "b2"
    with pytest.raises(SystemExit, match="the config has"):
        launch.main(["--config", path, "--variant", "nope", "--pairs-uri", "/p/k"])
