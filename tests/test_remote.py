"""Stage runs on deployments, without a server: the final-state checks, the parameters a
child gets, the pull step, the deploy command line, the config."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from uuid import uuid4

import pytest
from prefect.states import Cancelled, Completed, Crashed, Failed, Running

from croco.config import ConfigError
from croco.config_loading import config_from_dict
from croco.tasks import remote
from tests.conftest import FakeTask


def _flow_run(state):
    return SimpleNamespace(id=uuid4(), name="brave-otter", state=state)


@pytest.fixture
def fake_run_deployment(monkeypatch):
    calls = []

    def install(state):
        def run_deployment(name, *, parameters, timeout, idempotency_key, poll_interval,
                           flow_run_name=None):
            calls.append(dict(name=name, parameters=parameters, timeout=timeout,
                              idempotency_key=idempotency_key, flow_run_name=flow_run_name))
            return _flow_run(state)

        import prefect.deployments

        monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
        return calls

    return install


@pytest.mark.parametrize("state,word", [(Failed(message="CUDA out of memory"), "FAILED"),
                                        (Crashed(message="worker lost"), "CRASHED"),
                                        (Cancelled(), "CANCELLED")])
def test_a_child_that_did_not_complete_fails_with_its_name_and_state(fake_run_deployment,
                                                                     state, word):
    calls = fake_run_deployment(state)
    with pytest.raises(remote.StageRunFailed) as e:
        remote.run_stage_deployment("croco-generate/gpu", {"lang": "de"}, "generate-de")
    msg = str(e.value)
    assert msg.startswith("generate-de: flow run 'brave-otter'")
    assert "croco-generate/gpu" in msg and word in msg
    if state.message:
        assert state.message in msg
    assert calls[0]["parameters"] == {"lang": "de"}


def test_a_child_is_created_with_its_stage_name(fake_run_deployment):
    calls = fake_run_deployment(Completed(data="s3://b/generations/k/lang=de"))
    remote.run_stage_deployment("croco-generate/slurm", {"lang": "de"}, "generate-de-1")
    assert calls[0]["flow_run_name"] == "generate-de-1"


def test_a_child_still_running_after_the_timeout_fails(fake_run_deployment):
    fake_run_deployment(Running())
    with pytest.raises(remote.StageRunFailed, match=r"still RUNNING after 30.0s .*worker"):
        remote.run_stage_deployment("croco-score/gpu", {}, "score-en", timeout=30.0)


def test_a_completed_child_returns_its_result(fake_run_deployment):
    fake_run_deployment(Completed(data="s3://b/scores/k/lang=en"))
    assert remote.run_stage_deployment("croco-score/gpu", {}, "score-en") \
        == "s3://b/scores/k/lang=en"


def test_a_failure_message_never_shows_a_secret(fake_run_deployment, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    fake_run_deployment(Failed(message="denied for s3cr3t-value"))
    with pytest.raises(remote.StageRunFailed) as e:
        remote.run_stage_deployment("croco-train/gpu", {}, "train-dpo")
    assert "s3cr3t-value" not in str(e.value) and "***" in str(e.value)


def test_deployments_config_names_stages_and_rejects_unknown_ones():
    cfg = config_from_dict({"orchestration": {"deployments": {"generate": "croco-generate/gpu"},
                                              "deployment_timeout": 600}})
    assert cfg.orchestration.deployments == {"generate": "croco-generate/gpu"}
    with pytest.raises(ConfigError, match="orchestration.deployments"):
        config_from_dict({"orchestration": {"deployments": {"pair": "x/y"}}})


def _sample_calls(cfg, prompt_uris: list[str]) -> dict:
    """lang -> the run's generate call of that language on the given prompts output."""
    from croco.stages import Generate

    return {lang: Generate(prompts_uri=p, lang=lang, policy=cfg.policy, gen=cfg.generation,
                           prompts_cfg=cfg.prompts)
            for lang, p in zip(cfg.languages, prompt_uris)}


def _complete_once_sent(sent: list):
    """`storage.is_complete` for the fakes: nothing is complete before a flow run is sent
    (so each one is sent), everything is after (so its result is taken)."""
    return lambda uri: bool(sent)


def test_stages_send_one_call_per_language_with_the_runtime(monkeypatch, tmp_path):
    """The parameters each generate child gets: its language's inputs, JSON-ready, with the
    runtime (data root, storage block, GPU slots)."""
    from croco.flows import stages as flow_stages

    sent = []
    monkeypatch.setattr(flow_stages, "trigger_task", FakeTask(sent, lambda kw: (
        f"{tmp_path}/generations/k/lang={kw['parameters']['lang']}")))
    monkeypatch.setattr(flow_stages.storage, "is_complete", _complete_once_sent(sent))
    cfg = config_from_dict({"data_root": str(tmp_path), "languages": ["en", "da"],
                            "storage_block": "aws-credentials/team",
                            "orchestration": {"gpu_slots": 4, "deployments": {
                                "generate": "croco-generate/gpu"}}})
    run = flow_stages.Stages(cfg)
    calls = _sample_calls(cfg, ["p-en", "p-da"])
    gens, scores = run.generate_and_score(calls, {})
    assert gens == {lang: call.output(str(tmp_path)) for lang, call in calls.items()}
    assert [s["label"] for s in sent] == ["generate-en", "generate-da"]
    p = sent[1]["parameters"]
    assert p["prompts_uri"] == "p-da" and p["lang"] == "da"
    assert p["policy"]["model"] == cfg.policy.model  # a plain dict: JSON for the API
    assert p["runtime"] == {"data_root": str(tmp_path), "storage_block": "aws-credentials/team",
                            "gpu_slots": 4, "gpu_limit": "auto", "retries": 2,
                            "retry_delay_seconds": 5}
    # Inside a stage's own flow run everything runs locally: no deployment is named.
    assert flow_stages.Stages(cfg, local=True).deployments == {}

    # A trigger is cached on its call's stage identity and the data root: execution-only
    # settings leave it as it is (no flow run is started again), another data root not.
    def identities(**changes) -> list[str]:
        sent.clear()
        data = cfg.model_dump(mode="json")
        for key, value in changes.items():
            section, field = key.split(".")
            data[section][field] = value
        c = config_from_dict(data)
        flow_stages.Stages(c).generate_and_score(_sample_calls(c, ["p-en", "p-da"]), {})
        return [s["identity"] for s in sent]

    first = identities()
    assert len(set(first)) == 2
    assert identities(**{"generation.batch_size": 7, "orchestration.gpu_slots": 8,
                         "policy.device": "cpu"}) == first
    assert identities(**{"generation.seed": 5}) != first
    sent.clear()
    other = config_from_dict(dict(cfg.model_dump(mode="json"), data_root=str(tmp_path / "b")))
    flow_stages.Stages(other).generate_and_score(_sample_calls(other, ["p-en", "p-da"]), {})
    assert [s["identity"] for s in sent] != first


def test_shard_groups_send_one_call_per_language_and_group_then_seal_here(monkeypatch,
                                                                          tmp_path):
    """With shards_per_language 3, each language's generate is 3 flow runs of the
    deployment (group 0..2 of 3, labelled generate-<lang>-<group>); the plan before them and
    the seal after them run in the pipeline's process, which gets one URI per language."""
    from croco.flows import stages as flow_stages

    sent = []
    out = f"{tmp_path}/generations/k"
    monkeypatch.setattr(flow_stages, "trigger_task", FakeTask(sent, lambda kw: {
        "uri": f"{out}/lang={kw['parameters']['lang']}", "parts": []}))
    staged: list[dict] = []
    monkeypatch.setattr(flow_stages, "stage_task", FakeTask(staged, lambda kw: (
        f"{out}/_plans/lang={kw['stage'].lang}.json" if kw.get("step") == "plan"
        else f"{out}/lang={kw['stage'].lang}")))
    monkeypatch.setattr(flow_stages.storage, "is_complete", _complete_once_sent(sent))
    monkeypatch.setattr(flow_stages.storage, "exists", lambda uri: True)
    cfg = config_from_dict({"data_root": str(tmp_path), "languages": ["en", "da"],
                            "orchestration": {"shards_per_language": 3, "deployments": {
                                "generate": "croco-generate/gpu"}}})
    gens, _ = flow_stages.Stages(cfg).generate_and_score(_sample_calls(cfg, ["p-en", "p-da"]),
                                                         {})
    assert gens == {"en": f"{out}/lang=en", "da": f"{out}/lang=da"}
    assert [s["label"] for s in sent] == ["generate-en-0", "generate-en-1", "generate-en-2",
                                          "generate-da-0", "generate-da-1", "generate-da-2"]
    assert [(s["parameters"]["group"], s["parameters"]["groups"]) for s in sent] == \
        [(0, 3), (1, 3), (2, 3)] * 2
    # the parts are planned once per language before any group starts (in this process)
    assert [c.get("step") for c in staged] == ["plan", "plan", "seal", "seal"]
    planned, sealed = staged[:2], staged[2:]
    assert [c["stage"].lang for c in planned] == ["en", "da"]
    assert [(c["stage"].lang, c["stage"].prompts_uri) for c in sealed] == \
        [("en", "p-en"), ("da", "p-da")]
    assert "group" not in sealed[0]


def test_pull_step_moves_into_the_project(tmp_path, monkeypatch):
    from croco.flows.deploy import PROJECT_DIR, use_project_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CROCO_WORKDIR", raising=False)
    assert use_project_dir() == {"directory": str(PROJECT_DIR)}
    assert os.getcwd() == str(PROJECT_DIR)
    with pytest.raises(FileNotFoundError, match="CROCO_WORKDIR"):
        monkeypatch.setattr("croco.flows.deploy.PROJECT_DIR", tmp_path)
        monkeypatch.chdir(tmp_path)
        use_project_dir(str(tmp_path / "nowhere"))


def test_deploy_command_deploys_all_or_the_named():
    from croco.flows.deploy import deploy_command

    assert deploy_command()[1:] == ["-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
                                    "infra/prefect.yaml", "--all"]
    assert deploy_command(names=["croco-pipeline/default"])[-2:] == \
        ["--name", "croco-pipeline/default"]
    assert deploy_command()[0] == sys.executable


def test_prefect_yaml_declares_every_stage_deployment():
    import yaml

    from croco.flows.deploy import PROJECT_DIR

    spec = yaml.safe_load((PROJECT_DIR / "infra" / "prefect.yaml").read_text())
    entry = {(d["entrypoint"], d["name"]): d for d in spec["deployments"]}
    for fn in ("croco_generate", "croco_score", "croco_train", "croco_evaluate"):
        d = entry[(f"flows/stages.py:{fn}", "gpu")]
        assert d["work_pool"]["name"] == "croco-gpu"
    for name in ("default", "scale-out"):
        d = entry[("flows/pipeline.py:croco_pipeline", name)]
        assert d["work_pool"]["name"] == "croco-cpu"
        assert (PROJECT_DIR / d["parameters"]["config_file"]).is_file()
    publish = entry[("flows/publish.py:croco_publish", "default")]
    assert publish["work_pool"]["name"] == "croco-cpu" and "parameters" not in publish
    scale = entry[("flows/pipeline.py:croco_pipeline", "scale-out")]["parameters"]
    cfg = config_from_dict({})
    from croco.config_loading import apply_overrides

    resolved = config_from_dict(apply_overrides(cfg.model_dump(mode="json"),
                                                scale["overrides"]))
    assert resolved.orchestration.deployments == {
        "generate": "croco-generate/gpu", "score": "croco-score/gpu",
        "train": "croco-train/gpu", "evaluate": "croco-evaluate/gpu"}
    assert spec["pull"] == [{"croco.flows.deploy.use_project_dir": {}}]
