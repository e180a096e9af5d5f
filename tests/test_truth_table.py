"""The cache truth table: every leaf field of the config model, changed, reruns exactly the
stages whose declarations (croco.plan.STAGES) depend on it, by the stages' own identities;
execution-only fields rerun nothing; inputs named by a path count by their content; the
table in docs/ is the one the code computes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from croco import plan, storage
from croco.flows.cli import app
from croco.identity import BUILTIN_FILES

ROOT = Path(__file__).resolve().parent.parent

#: Rows where a change cannot show in the walked config, with the reason. Every other
#: non-execution-only field must rerun every stage that declares it.
SHADOWED = {
    # The walked variant overrides beta and pairing.seed: the run's own values reach only
    # the run's pair set (pairing.seed) or nothing the variant trains on (beta).
    "training.beta": set(),
    "pairing.seed": {"pair"},
}


@pytest.fixture(scope="module")
def rows():
    return plan.truth_table()


def test_every_leaf_field_of_the_config_model_is_walked(rows):
    from croco.config import (
        ClassifierScorer,
        CrocoConfig,
        JudgeEvalConfig,
        StructuredEvalConfig,
        TrainingConfig,
    )

    fields = {r["field"] for r in rows}
    # Top-level and nested sections, from the schema, not a hand list.
    for name in CrocoConfig.model_fields:
        assert any(f == name or f.startswith(f"{name}.") for f in fields), name
    for cls, prefix in ((TrainingConfig, "training."), (JudgeEvalConfig, "evaluation.judge."),
                        (StructuredEvalConfig, "evaluation.structured.")):
        assert {prefix + n for n in cls.model_fields} <= fields
    scorer_fields = {f.split(".", 3)[3] for f in fields if f.startswith("reward.scorers.2.")}
    assert scorer_fields == set(ClassifierScorer.model_fields) - {"type"}


def test_every_stage_spec_is_declared_once_in_the_plan():
    """A new stage is one spec class in croco.stages plus its line in plan.STAGES: a
    spec the plan does not declare would escape the truth table."""
    import inspect

    from croco import stage as contract
    from croco import stages

    specs = {name: cls for name, cls in vars(stages).items()
             if inspect.isclass(cls) and issubclass(cls, contract.Stage)
             and cls.__module__ == stages.__name__}
    declared = [d.spec for d in plan.STAGES]
    assert sorted(declared) == sorted(specs)  # each spec exactly once
    for d in plan.STAGES:
        assert specs[d.spec].folder == d.folder, d.name


def test_execution_only_fields_rerun_nothing(rows):
    exec_rows = [r for r in rows if r["execution_only"]]
    assert {r["field"] for r in exec_rows} >= {
        "generation.batch_size", "policy.device", "reward.scorers.0.batch_size",
        "reward.scorers.2.gpu_memory_utilization", "reward.scorers.2.tensor_parallel_size",
        "training.per_device_batch_size", "evaluation.judge.batch_size",
        "evaluation.structured.batch_size", "orchestration.shards_per_language",
        "generation.tensor_parallel_size"}
    for r in exec_rows:
        assert r["reruns"] == [] and r["stops"] == [], r


def test_each_change_reruns_what_its_stages_declare_and_nothing_else(rows):
    for r in rows:
        if r["execution_only"]:
            continue
        got = set(r["reruns"])
        if r["field"].endswith(".enabled"):
            assert got == set(), r  # a switch: stages come or go (see below), none rerun
            continue
        declared = plan.declared_stages(r["field"])
        assert declared, f"{r['field']}: no stage declares it; declare it or mark it " \
                         "execution only"
        # Nothing reruns that does not depend on the field, directly or through an input.
        assert got <= plan.downstream(declared), r
        if r["field"] == "experiments.0.per_language":
            continue  # one model per language, none evaluated (its stops are checked below)
        expected = SHADOWED.get(r["field"], declared)
        assert expected <= got, f"{r['field']}: declared by {sorted(declared)}, but only " \
                                f"{sorted(got)} get a new identity"


def test_switches_turn_their_stages_off(rows):
    by_field = {r["field"]: r for r in rows}
    assert by_field["evaluation.judge.enabled"]["stops"] == ["judge"]
    assert by_field["evaluation.structured.enabled"]["stops"] == ["structured"]
    assert set(by_field["evaluation.enabled"]["stops"]) == {
        "heldout-generate", "heldout-score", "judge", "structured", "reward-check"}
    # training off ends a run after its pairs (as `croco run` always did): nothing is
    # evaluated, the base included
    assert by_field["training.enabled"]["stops"] == [
        "ref-logps", "train", "heldout-generate", "heldout-score", "judge", "structured",
        "reward-check"]
    assert by_field["experiments.0.per_language"]["stops"] == ["judge"]


def test_the_table_in_docs_is_the_one_the_code_computes(rows):
    doc = ROOT / "docs" / "what-a-change-reruns.md"
    assert doc.read_text(encoding="utf-8") == plan.render_markdown(rows), \
        "docs/what-a-change-reruns.md is stale: run python -m croco.plan --write " \
        "docs/what-a-change-reruns.md"


@pytest.mark.parametrize("field", ["prompts.path", "policy.model", "evaluation.reward_check",
                                   "evaluation.structured.local_mc",
                                   "reward.scorers.0.model"])
def test_a_file_or_folder_edited_in_place_reruns_what_depends_on_it(field, tmp_path):
    """Same path, new content: the stages that declare the field get new identities."""
    cfg = plan.walk_config()
    if field == "policy.model" or field.endswith(".model"):
        target = tmp_path / "model"
        target.mkdir()
        (target / "config.json").write_text('{"hidden_size": 32}')
        (target / "model.safetensors").write_bytes(b"\0" * 64)
    else:
        source = BUILTIN_FILES[{"prompts.path": "builtin:demo",
                                "evaluation.reward_check": "builtin:demo_preferences",
                                "evaluation.structured.local_mc": "builtin:demo_mc"}[field]]
        target = tmp_path / source.name
        shutil.copy(source, target)
    data = cfg.model_dump(mode="json")
    node = data
    *head, last = field.split(".")
    for part in head:
        node = node[int(part)] if part.isdigit() else node[part]
    node[last] = str(target)
    from croco.config_loading import config_from_dict

    cfg = config_from_dict(data)
    before = plan.run_identities(cfg)
    assert plan.run_identities(cfg) == before  # stable while nothing changes
    if target.is_dir():
        (target / "model.safetensors").write_bytes(b"\1" * 64)  # retrained in place
    else:
        with target.open("a", encoding="utf-8") as f:
            f.write(target.read_text(encoding="utf-8").splitlines()[0] + "\n")
    got = plan.reruns(before, plan.run_identities(cfg))
    assert got == plan.downstream(plan.declared_stages(field)) & {
        s for s, ids in before.items() if ids}, field


def test_large_files_count_by_size_and_mtime_and_hidden_files_not_at_all(tmp_path,
                                                                         monkeypatch):
    import os

    from croco import identity

    monkeypatch.setattr(identity, "HASH_LIMIT", 10)
    model = tmp_path / "m"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"x" * 100)
    first = identity.fingerprint(model)
    (model / ".cache").mkdir()
    (model / ".cache" / "download.lock").write_text("busy")
    assert identity.fingerprint(model) == first
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert identity.fingerprint(model) != first


# --------------------------------------------------------------- through the pipeline

#: Output folders (under data_root) that hold stage outputs by key.
FOLDERS = sorted({s.folder for s in plan.STAGES})


def on_disk(root: Path) -> dict[str, set[str]]:
    """Folder -> its complete stage outputs: `key/lang` for a per-language one (`lang=xx`
    folders, each with its `_SUCCESS`), `key` otherwise."""
    out: dict[str, set[str]] = {f: set() for f in FOLDERS}
    for folder in FOLDERS:
        base = root / folder
        for d in (base.iterdir() if base.exists() else []):
            langs = [x.name.removeprefix("lang=") for x in d.iterdir()
                     if x.name.startswith("lang=") and (x / "_SUCCESS").exists()]
            if langs:
                out[folder].update(f"{d.name}/{lang}" for lang in langs)
            elif (d / "_SUCCESS").exists():
                out[folder].add(d.name)
    return out


def by_folder(ids: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {f: set() for f in FOLDERS}
    for stage, keys in ids.items():
        out[plan.BY_NAME[stage].folder].update(keys)
    return out


def _edit_model_in_place(path: Path) -> None:
    """Retrain a local model folder in place: new weights under the same path."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(path)


def _drop_last_line(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-1]), encoding="utf-8")


@pytest.mark.slow
def test_the_pipeline_writes_exactly_what_the_identities_say(
        prefect_harness, tiny_config, tiny_lm, prompt_file, tmp_path):
    """The tiny pipeline (training and every evaluation on) writes exactly the outputs
    `plan.run_identities` names; then, one change at a time (a field of every config
    section, and each kind of input edited in place under the same path), a rerun writes
    new outputs for exactly the stages the identities say and reads every other back."""
    from croco.flows.pipeline import croco_pipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_lm, model)
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(prompt_file, prompts)
    prefs = tmp_path / "prefs.jsonl"
    shutil.copy(BUILTIN_FILES["builtin:demo_preferences"], prefs)
    mc = tmp_path / "mc.jsonl"
    shutil.copy(BUILTIN_FILES["builtin:demo_mc"], mc)
    settings = {
        "languages": ["en", "de"], "prompts.path": str(prompts), "prompts.limit": 2,
        "policy.model": str(model), "generation.k": 2, "training.enabled": True,
        "training.max_steps": 1, "evaluation.reward_check": str(prefs),
        "evaluation.structured.local_mc": str(mc), "evaluation.structured.limit": 2,
    }
    root = tmp_path / "data"

    cfg = tiny_config(**settings)
    croco_pipeline(config=cfg, run_id="t0")
    ids = plan.run_identities(cfg)
    assert on_disk(root) == by_folder(ids)  # every output the plan names, and no other
    assert all(storage.is_complete(uri) for _, uri in plan.output_uris(cfg))
    # `croco config plan` says the same: every output complete, nothing to compute.
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["config", "plan", str(yaml_file)])
    assert result.exit_code == 0, result.output
    rows = [line.strip("│ ").split("│") for line in result.output.splitlines()
            if line.startswith("│")]
    assert {r[0].strip() for r in rows} == {s.name for s in plan.STAGES}
    assert [int(r[3]) for r in rows] == [0] * len(rows), result.output

    scorers = cfg.model_dump(mode="json")["reward"]["scorers"]
    steps = [
        # (what changes, config overrides, an in-place edit); one or more per section
        ("reward: a scorer's batch size (execution only)",
         {"reward.scorers": [dict(s, batch_size=3) if "batch_size" in s else s
                             for s in scorers]}, None),
        ("orchestration: shard groups (execution only)",
         {"orchestration.shards_per_language": 2}, None),
        ("generation: the batch size (execution only)", {"generation.batch_size": 3}, None),
        ("evaluation: judge bootstrap", {"evaluation.judge.n_bootstrap": 60}, None),
        ("evaluation: the multiple-choice file, edited", {}, lambda: _drop_last_line(mc)),
        ("evaluation: the preference set, edited", {}, lambda: _drop_last_line(prefs)),
        # lm-eval is the slowest stage of the tiny pipeline: off for the rest (a switch:
        # nothing new is written, and the identities say so).
        ("evaluation: multiple choice off (a switch)",
         {"evaluation.structured.enabled": False}, None),
        ("pairing", {"pairing.min_gap": 0.001}, None),
        ("training", {"training.learning_rate": 4e-3}, None),
        ("experiments", {"experiments": [{"name": "dpo", "training": {"beta": 0.3}}]}, None),
        ("policy: the model folder, retrained in place", {}, lambda: _edit_model_in_place(model)),
        ("prompts: the prompt file, edited", {}, lambda: _drop_last_line(prompts)),
    ]
    for i, (what, overrides, edit) in enumerate(steps, 1):
        settings.update(overrides)
        new_cfg = tiny_config(**settings)
        before_disk = on_disk(root)
        if edit:
            edit()
        new_ids = plan.run_identities(new_cfg)
        expected = {f: keys - before_disk[f] for f, keys in by_folder(new_ids).items()}
        t0 = time.perf_counter()
        croco_pipeline(config=new_cfg, run_id=f"t{i}")
        print(f"step {i} ({what}): {time.perf_counter() - t0:.1f} s")  # shown with -s
        after_disk = on_disk(root)
        written = {f: after_disk[f] - before_disk[f] for f in FOLDERS}
        assert written == expected, what
        rerun = plan.reruns(ids, new_ids)
        assert {plan.BY_NAME[s].folder for s in rerun} == {f for f, k in written.items() if k}, \
            what
        if "execution only" in what or "a switch" in what:
            assert rerun == set(), what
        else:
            assert rerun, what
        ids = new_ids


def test_deployments_start_flow_runs_only_for_what_a_change_reaches(rows):
    """On a cluster (every GPU stage on a deployment) a change starts flow runs only for
    the languages, variants and evaluation it reaches: an execution-only change or a
    switch none, a judge change the evaluate run only (no train run for the unchanged
    variant)."""
    none = {"generate": 0, "score": 0, "train": 0, "evaluate": 0}
    for r in rows:
        if r["execution_only"] or r["field"].endswith(".enabled"):
            assert r["flow_runs"] == none, r
        if r["field"].startswith("evaluation.judge.") and not r["execution_only"] \
                and not r["field"].endswith(".enabled"):
            assert r["flow_runs"] == dict(none, evaluate=1), r
    by_field = {r["field"]: r for r in rows}
    assert by_field["languages"]["flow_runs"] == {"generate": 1, "score": 1, "train": 1,
                                                  "evaluate": 1}


@pytest.mark.parametrize("field", [None, "generation.batch_size", "evaluation.judge.model",
                                   "pairing.min_gap", "languages", "generation.k",
                                   "experiments.0.training"])
def test_the_pipeline_starts_the_flow_runs_the_table_says(field, monkeypatch):
    """The executor (`flows/stages.py` `Stages`, walked as the pipeline walks the plan)
    with every GPU stage on a deployment, after a complete run of the walk config, starts
    exactly the flow runs `plan.flow_runs` (the table's last column) names."""
    from croco.flows import stages as flow_stages
    from tests.conftest import FakeTask

    before = plan.walk_config()
    after = plan.with_change(before, field) if field else before
    deployments = {s: f"croco-{s}/gpu" for s in plan.DEPLOYED}
    after = after.model_copy(update={"orchestration": after.orchestration.model_copy(
        update={"deployments": deployments})})
    there = {s.where() for s in plan.build_plan(before, root="/plan").stages()}
    # the executor asks for every call's markers at once; a marker is under its call's place
    def under(uri: str, where: str) -> bool:
        return uri == f"/plan/{where}" or uri.startswith(f"/plan/{where}/")

    monkeypatch.setattr(flow_stages.storage, "complete_among",
                        lambda uris: {u for u in uris if any(under(u, w) for w in there)})
    monkeypatch.setattr(flow_stages.storage, "is_complete", lambda uri: True)
    sent: list[dict] = []
    monkeypatch.setattr(flow_stages, "trigger_task", FakeTask(sent, lambda kw: "/plan/x"))
    monkeypatch.setattr(flow_stages, "stage_task",
                        FakeTask([], lambda kw: kw["stage"].result("/plan")))
    run = flow_stages.Stages(after.model_copy(update={"data_root": "/plan"}))
    p = plan.build_plan(after, root="/plan")
    run.each(p.prompts)
    run.generate_and_score(p.generate, p.score)
    run.one(p.pairs)
    for variant in p.variants.values():
        run.train(variant)
    run.evaluate(p.evaluation, "r")
    started = [kw["deployment"].split("/")[0].removeprefix("croco-") for kw in sent]
    expected = plan.flow_runs(p, lambda s: s.where() in there)
    assert {k: started.count(k) for k in plan.DEPLOYED} == expected
    if field in (None, "generation.batch_size"):
        assert started == []  # nothing queued on any pool
