"""Training curves: the figure, the warning rules, `training.report_to`, and the report's
training-curves section. No model is loaded here."""

from __future__ import annotations

import json

import polars as pl
import pytest

from croco import storage
from croco.config import TrainingConfig
from croco.errors import MissingPackageError
from croco.evaluation.curves import (
    MIN_POINTS,
    curve_verdict,
    curve_warnings,
    judgeable,
    plot_training_curves,
)
from croco.training import reporting

PNG = b"\x89PNG\r\n\x1a\n"


def dpo_history(n: int = 16, *, loss=None, acc=None, margins=None) -> list[dict]:
    """A DPO log history of `n` steps; by default a healthy run (loss falls, accuracy
    rises to 1, margins grow), with a closing summary record as the Trainer writes it."""
    rows = []
    for i in range(n):
        m = margins(i) if margins else 0.05 * i
        rows.append({"step": i + 1, "epoch": (i + 1) / n,
                     "loss": loss(i) if loss else 0.693 - 0.02 * i,
                     "rewards/accuracies": acc(i) if acc else min(1.0, 0.5 + 0.1 * i),
                     "rewards/margins": m, "rewards/chosen": m / 2,
                     "rewards/rejected": -m / 2, "logps/chosen": -100 + i,
                     "logps/rejected": -100 - i})
    rows.append({"step": n, "train_runtime": 1.0, "train_loss": 0.5})
    return rows


def test_a_healthy_dpo_run_gets_no_warning():
    assert curve_warnings(dpo_history(), "dpo") == []
    assert curve_verdict(dpo_history(), "dpo") == ["no problem flagged over 16 logged steps"]


def test_loss_not_decreasing_is_flagged():
    (w,) = curve_warnings(dpo_history(loss=lambda i: 0.69 + 0.001 * (i % 3)), "dpo")
    assert w.startswith("loss not decreasing")
    # SFT is held to the loss rule too
    sft = [{"step": i + 1, "loss": 2.0 + 0.01 * i} for i in range(12)]
    assert [w[:19] for w in curve_warnings(sft, "sft")] == ["loss not decreasing"]


def test_reward_accuracy_at_chance_is_flagged():
    warnings = curve_warnings(dpo_history(acc=lambda i: 0.52), "dpo")
    assert warnings == ["reward accuracy at chance: 0.52 over the last quarter"]
    # 0.6 is not chance
    assert curve_warnings(dpo_history(acc=lambda i: 0.6), "dpo") == []


def test_margins_collapsing_is_flagged_when_negative_or_below_a_tenth_of_the_peak():
    negative = curve_warnings(dpo_history(margins=lambda i: 0.3 - 0.03 * i), "dpo")
    assert negative == ["margins collapsing: the last reward margin is negative (-0.15)"]
    peaked = curve_warnings(dpo_history(margins=lambda i: 1.0 if i == 5 else 0.05), "dpo")
    assert peaked == ["margins collapsing: the last reward margin 0.05 is below 10% of its "
                      "peak 1"]
    # SFT logs no margins or accuracies: only the loss rule applies
    assert curve_warnings(dpo_history(margins=lambda i: -1.0), "sft") == []


def test_a_short_run_is_too_short_to_judge_not_warned_about():
    short = dpo_history(MIN_POINTS - 1, loss=lambda i: 0.7 + 0.1 * i, acc=lambda i: 0.5,
                        margins=lambda i: -1.0)
    assert not judgeable(short) and curve_warnings(short, "dpo") == []
    assert curve_verdict(short, "dpo") == [
        f"too few steps to judge ({MIN_POINTS - 1} logged; the checks need {MIN_POINTS})"]
    assert curve_verdict(None, "dpo") == ["no curves recorded"]
    bad = dpo_history(MIN_POINTS, loss=lambda i: 0.7 + 0.1 * i)
    assert curve_verdict(bad, "dpo")[0].startswith("warning: loss not decreasing")


def test_the_figure_is_a_png_for_dpo_sft_and_an_empty_history():
    import io

    from PIL import Image

    for history in (dpo_history(), [{"step": 1, "loss": 2.0, "mean_token_accuracy": 0.1}], []):
        png = plot_training_curves(history, title="run")
        assert png.startswith(PNG)
        assert Image.open(io.BytesIO(png)).size[0] > 300
    # four panels (loss, rewards, accuracy, log-probs) make a taller figure than one
    tall = Image.open(io.BytesIO(plot_training_curves(dpo_history()))).size[1]
    short = Image.open(io.BytesIO(plot_training_curves([{"step": 1, "loss": 1.0}]))).size[1]
    assert tall > short


# ------------------------------------------------------------------------ report_to


def test_report_to_accepts_known_names_and_rejects_others():
    assert TrainingConfig(report_to="none").report_to == "none"
    assert reporting.normalize(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]
    assert reporting.normalize("none") == [] and reporting.normalize(None) is None
    with pytest.raises(ValueError, match="unknown logging integration 'tensorbord'"):
        TrainingConfig(report_to="tensorbord")


def test_report_to_unset_is_tensorboard_only_when_it_is_installed(monkeypatch):
    monkeypatch.setattr(reporting, "_installed", lambda module: module == "tensorboard")
    assert reporting.resolve(None) == ["tensorboard"]
    monkeypatch.setattr(reporting, "_installed", lambda module: False)
    assert reporting.resolve(None) == []
    assert reporting.resolve("wandb") == ["wandb"]  # an explicit name is kept as given


def test_a_missing_integration_package_names_the_field_and_the_pip_install(monkeypatch):
    monkeypatch.setattr(reporting, "_installed", lambda module: module != "mlflow")
    reporting.check_report_to(["tensorboard"])
    with pytest.raises(MissingPackageError) as e:
        reporting.check_report_to(["tensorboard", "mlflow"])
    assert str(e.value) == ("training.report_to: mlflow needs the mlflow package, which is "
                            "not installed: pip install mlflow (or set training.report_to: "
                            "none)")


def test_preflight_checks_report_to_of_the_run_and_of_each_variant(tmp_path, prompt_file,
                                                                   monkeypatch):
    from croco import preflight
    from croco.config_loading import config_from_dict

    monkeypatch.setattr(reporting, "_installed", lambda module: module != "wandb")
    model = tmp_path / "policy"
    model.mkdir()
    (model / "config.json").write_text("{}")
    base = {"data_root": str(tmp_path / "data"), "languages": ["en"],
            "prompts": {"path": str(prompt_file)}, "policy": {"model": str(model)},
            "reward": {"scorers": [{"type": "langid", "name": "lang", "weight": 1.0}]},
            "evaluation": {"enabled": False}}
    with pytest.raises(MissingPackageError, match=r"^training\.report_to: wandb needs"):
        preflight.check(config_from_dict({**base, "training": {"report_to": "wandb"}}))
    variant = config_from_dict({**base, "experiments": [
        {"name": "dpo", "method": "dpo", "training": {"report_to": ["wandb"]}}]})
    with pytest.raises(MissingPackageError,
                       match=r"^experiments\[dpo\]\.training\.report_to: wandb needs"):
        preflight.check(variant)
    # a run that stops before training does not need it
    preflight.check(config_from_dict({**base, "training": {"report_to": "wandb"}}),
                    stages=["pair"])


def test_croco_run_with_a_missing_report_to_package_ends_with_one_error_line(tmp_path,
                                                                            monkeypatch):
    from typer.testing import CliRunner

    from croco.flows.cli import app

    monkeypatch.setattr(reporting, "_installed", lambda module: module != "trackio")
    result = CliRunner().invoke(app, ["run", "--set", "training.report_to=[trackio]",
                                      "--set", f"data_root={tmp_path / 'data'}"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: training.report_to: trackio needs the trackio package, which is not "
        "installed: pip install trackio (or set training.report_to: none)"]
    assert not (tmp_path / "data").exists()  # stopped before any work


def test_report_to_is_in_no_training_key():
    from croco.config import PolicyConfig
    from croco.training.spec import DPOSpec

    def key(**training):
        return DPOSpec(variant_name="v", policy=PolicyConfig(model="m"), data_root="/d",
                       pairs_uri="/d/pairs/k", training=TrainingConfig(**training)).key()

    assert key() == key(report_to="none") == key(report_to=["tensorboard", "wandb"])
    assert key() != key(beta=0.2)  # while a setting that changes the adapter moves it


# ------------------------------------------------------------------------ the report


def _training_output(root, key: str, metrics: dict, history: list[dict] | None) -> str:
    uri = storage.join(str(root), "training", key)
    storage.write_json(storage.join(uri, "metrics.json"), metrics)
    if history is not None:
        storage.write_bytes(storage.join(uri, "log_history.json"), json.dumps(history).encode())
        storage.write_bytes(storage.join(uri, "curves.png"), plot_training_curves(history))
    storage.mark_complete(uri, {"rows": 1})
    return uri


def test_the_report_shows_curves_pairs_per_language_and_warnings(tmp_path):
    from croco.config import CrocoConfig
    from croco.evaluation.report import load_run, render
    from croco.manifest import RoundOutputs, RunOutputs, VariantOutputs, write_manifest

    root = str(tmp_path)
    pairs = storage.join(root, "pairs", "p1")
    storage.write_parquet(pl.DataFrame({"prompt_lang": ["de", "de", "en", "fr"],
                                        "chosen_score": [1.0] * 4,
                                        "rejected_score": [0.0] * 4}),
                          storage.join(pairs, "dpo", "data.parquet"))
    storage.write_parquet(pl.DataFrame({"lang": ["de"], "pairs": [2]}),
                          storage.join(pairs, "stats.parquet"))
    storage.mark_complete(pairs, {"rows": 4})
    good = _training_output(tmp_path, "t1", {"method": "dpo", "pairs_uri": pairs,
                                             "train_by_lang": {"de": 2, "en": 1, "fr": 1}},
                            dpo_history())
    flat = _training_output(tmp_path, "t2", {"method": "dpo", "pairs_uri": pairs},
                            dpo_history(loss=lambda i: 0.69))
    short = _training_output(tmp_path, "t3", {"method": "dpo", "pairs_uri": pairs,
                                              "train_by_lang": {"de": 2}}, dpo_history(3))
    old = _training_output(tmp_path, "t4", {"method": "dpo", "pairs_uri": pairs,
                                            "lang": "de"}, None)
    outputs = RunOutputs[str](pairs=pairs, variants={
        "dpo": VariantOutputs[str](rounds=[RoundOutputs[str](pairs=pairs, training=good)]),
        "flat": VariantOutputs[str](rounds=[RoundOutputs[str](pairs=pairs, training=flat)]),
        "short": VariantOutputs[str](rounds=[RoundOutputs[str](pairs=pairs, training=short)]),
        "per-lang": VariantOutputs[str](rounds=[RoundOutputs[str](
            pairs=pairs, training_by_lang={"de": old})]),
    })
    write_manifest(root, "r1", CrocoConfig().model_dump(mode="json"), outputs)
    report_uri = render(load_run(root, "r1"), root)
    text = storage.read_bytes(report_uri).decode()
    section = text.split("## Training curves", 1)[1]

    assert "| run | method | de | en | fr | total |" in section
    assert "| dpo | dpo | 2 | 1 | 1 | 4 |" in section
    assert "| flat | dpo | 2 | 1 | 1 | 4 |" in section  # counted from its pairs
    assert "| per-lang:de | dpo | 2 | - | - | 2 |" in section
    assert "Counted from the pairs each names, held-out pairs included" in section
    assert "per-lang:de, flat" not in section and "flat, per-lang:de" in section

    def block(name: str) -> str:
        return section.split(f"### {name}\n", 1)[1].split("###", 1)[0]

    assert "- no problem flagged over 16 logged steps" in block("dpo")
    assert "- warning: loss not decreasing" in block("flat")
    assert "- too few steps to judge (3 logged; the checks need 8)" in block("short")
    assert "- no curves recorded" in block("per-lang:de")
    assert "warning" not in block("short") + block("dpo")
    run_dir = tmp_path / "runs" / "r1"
    for name in ("dpo", "flat", "short"):
        assert f"![{name} curves](curves-{name}.png)" in block(name)
        assert (run_dir / f"curves-{name}.png").read_bytes().startswith(PNG)
    assert "![" not in block("per-lang:de")
    assert not (run_dir / "curves-per-lang-de.png").exists()
