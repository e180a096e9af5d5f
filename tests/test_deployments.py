"""A real Prefect server on loopback (SQLite), real process work pools and workers, the
deployments of infra/prefect.yaml, and runs triggered from the command line.

Everything this module starts (server, workers) runs in its own process group and is
stopped at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import pytest
import yaml

from benchmarks.prefect_stack import PY, REPO, Stack  # noqa: F401 (test_slurm imports them)

pytestmark = pytest.mark.slow


KEY_ID = "cluster-key-id-2718"
SECRET = "cluster-secret-value-3141"
BLOCK = "croco-cluster"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server):
    """Server, pools, deployments, blocks for the bucket, workers. The workers' environment
    holds no S3 credentials: flow runs get them from the `aws-credentials` block, and
    Prefect's results go to the bucket through the `s3-bucket` block, as on a cluster."""
    import boto3

    from tests.conftest import _free_port

    home = tmp_path_factory.mktemp("prefect-home")
    s = Stack(home, _free_port())
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL", "CROCO_S3_ENDPOINT_URL"):
        s.env.pop(var, None)
    s.env.update(AWS_DEFAULT_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                 AWS_CONFIG_FILE="/nonexistent")
    s.bucket = f"cluster-{os.getpid()}"
    s.s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                        aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    s.s3.create_bucket(Bucket=s.bucket)
    try:
        s.boot()
        s.env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
        s.cli(PY, "-m", "croco.flows.cli", "blocks", "--bucket", s.bucket, "--name", BLOCK,
              "--endpoint-url", s3_server)
        del s.env["AWS_ACCESS_KEY_ID"], s.env["AWS_SECRET_ACCESS_KEY"]
        s.env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = f"s3-bucket/{BLOCK}"
        # A CPU worker for the pipeline; one GPU-pool worker running one flow run at a time.
        s.start_workers()
        yield s
    finally:
        s.stop()


def _flow_runs(stack: Stack) -> list[dict]:
    return stack.request("POST", "/flow_runs/filter", {})


def _flow_names(stack: Stack) -> dict[str, str]:
    return {f["id"]: f["name"] for f in stack.request("POST", "/flows/filter", {})}


@pytest.fixture
def tiny_yaml(tmp_path, tiny_config, stack):
    """The tiny pipeline as a YAML file: two languages, training and evaluation on, its data
    in the bucket, its credentials in the block."""
    cfg = tiny_config(**{"languages": ["en", "de"], "training.enabled": True,
                         "evaluation.judge.enabled": False,
                         "data_root": f"s3://{stack.bucket}/{tmp_path.name}",
                         "storage_block": f"aws-credentials/{BLOCK}"})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path, cfg


def test_deployments_in_the_yaml_exist_on_the_server(stack):
    res = stack.cli(PY, "-m", "prefect", "deployment", "ls")
    listed = res.stdout
    for name in ("croco-pipeline/default", "croco-pipeline/scale-out", "croco-generate/gpu",
                 "croco-score/gpu", "croco-train/gpu", "croco-evaluate/gpu",
                 "croco-publish/default"):
        flow, dep = name.split("/")
        assert flow in listed and dep in listed, listed
    # `croco deploy` created the global `gpu` limit (1 slot without --gpu-slots), so runs
    # that start together never race to create it.
    res = stack.cli(PY, "-m", "prefect", "gcl", "inspect", "gpu", "--output", "json")
    assert json.loads(res.stdout)["limit"] == 1, res.stdout


def test_scale_out_run_from_the_cli_fans_out_on_the_gpu_pool(stack, tiny_yaml):
    path, cfg = tiny_yaml
    params = {"config_file": str(path), "run_id": "served"}
    res = stack.cli(PY, "-m", "prefect", "deployment", "run", "croco-pipeline/scale-out",
                    "--params", json.dumps(params), "--watch", "--watch-timeout", "900",
                    timeout=960, check=False)
    runs = _flow_runs(stack)
    names = _flow_names(stack)
    by_flow: dict[str, list[dict]] = {}
    for r in runs:
        by_flow.setdefault(names[r["flow_id"]], []).append(r)
    states = {f: sorted(r["state_type"] for r in rs) for f, rs in by_flow.items()}
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-2000:]}\n{states}\n" \
                                f"{stack.tail()}"
    # One generate and one score flow run per language; one train run per variant; one
    # evaluate run (which answers the held-out prompts in its own process).
    assert states["croco-pipeline"] == ["COMPLETED"]
    assert states["croco-generate"] == ["COMPLETED"] * 2
    assert states["croco-score"] == ["COMPLETED"] * 2
    assert states["croco-train"] == ["COMPLETED"]
    assert states["croco-evaluate"] == ["COMPLETED"]
    # The stage runs are children of the pipeline run (linked by run_deployment).
    pipeline_id = by_flow["croco-pipeline"][0]["id"]
    assert all(r["parent_task_run_id"] for f in ("croco-generate", "croco-score", "croco-train",
                                                "croco-evaluate") for r in by_flow[f])
    # Outputs are in the bucket; so are Prefect's results, which carried each child's
    # return value back to the pipeline.
    prefix = cfg.data_root.split(f"s3://{stack.bucket}/", 1)[1]
    keys = [o["Key"] for page in stack.s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack.bucket) for o in page.get("Contents", [])]
    manifest = json.loads(stack.s3.get_object(
        Bucket=stack.bucket, Key=f"{prefix}/runs/served/manifest.json")["Body"].read())
    assert set(manifest["outputs"]["generations"]) == {"en", "de"}
    from croco.manifest import read_outputs

    training = read_outputs(manifest).training_runs()["dpo"].uri
    assert f"{training.split(stack.bucket + '/', 1)[1]}/adapter/adapter_config.json" in keys
    assert f"{prefix}/runs/served/report.md" in keys
    assert any(k.startswith("prefect-results/") for k in keys)
    assert SECRET not in json.dumps(manifest)
    assert pipeline_id


def _child_runs(stack: Stack) -> dict[str, int]:
    names = _flow_names(stack)
    counts: dict[str, int] = {}
    for r in _flow_runs(stack):
        counts[names[r["flow_id"]]] = counts.get(names[r["flow_id"]], 0) + 1
    return {f: counts.get(f, 0) for f in ("croco-generate", "croco-score", "croco-train",
                                          "croco-evaluate")}


def test_a_rerun_starts_flow_runs_only_for_outputs_it_lacks(stack, tiny_yaml):
    """Once a run is complete, an unchanged rerun on the deployments starts no GPU flow run
    at all, and a change that reaches only the evaluation starts the evaluate run only (no
    train run for an unchanged variant)."""
    path, _ = tiny_yaml

    def rerun(run_id: str, *overrides: str) -> None:
        res = stack.cli(PY, "-m", "croco.flows.cli", "run", "--deployment",
                        "croco-pipeline/scale-out", *[f"--set={o}" for o in overrides],
                        str(path), "--run-id", run_id, timeout=900, check=False)
        assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-2000:]}\n" \
                                    f"{stack.tail()}"

    rerun("complete")  # whatever earlier tests left, every output is there now
    before = _child_runs(stack)
    rerun("unchanged")
    assert _child_runs(stack) == before
    rerun("evaluation-only", "evaluation.max_new_tokens=3")
    after = _child_runs(stack)
    assert {f: after[f] - before[f] for f in after} == {
        "croco-generate": 0, "croco-score": 0, "croco-train": 0, "croco-evaluate": 1}


def test_a_failed_stage_run_fails_the_pipeline_and_says_which(stack, tiny_yaml, tmp_path):
    path, cfg = tiny_yaml
    params = {"config_file": str(path), "stages": ["prompts", "generate"],
              "overrides": [f"policy.model={tmp_path / 'no-such-model'}", "languages=[en]"]}
    res = stack.cli(PY, "-m", "croco.flows.cli", "run", "--deployment", "croco-pipeline/scale-out",
                    *[f"--set={o}" for o in params["overrides"]], str(path),
                    "--stages", "prompts,generate", timeout=600, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "ended FAILED" in out, out
    runs = _flow_runs(stack)
    names = _flow_names(stack)
    failed = [r for r in runs if r["state_type"] == "FAILED"]
    assert {names[r["flow_id"]] for r in failed} == {"croco-pipeline", "croco-generate"}
    pipeline = next(r for r in failed if names[r["flow_id"]] == "croco-pipeline")
    message = pipeline["state"]["message"]
    assert "generate-en" in message and "croco-generate/gpu" in message and "FAILED" in message


def _reference_stages(cfg, root: str) -> dict:
    """The same stages in this process, one call per language: what the cluster must match."""
    from croco import stages

    out: dict = {"prompts": {}, "scores": {}}
    for lang in cfg.languages:
        p = out["prompts"][lang] = stages.run_prompts(cfg.prompts, lang, root)
        g = stages.run_generate(p, lang, cfg.policy, cfg.generation, cfg.prompts, root)
        out["scores"][lang] = stages.run_score(g, p, lang, cfg.reward, root)
    out["pairs"] = stages.run_pairs(out["scores"], out["prompts"], cfg.pairing, root)
    return out


def test_shard_groups_on_the_cluster_match_one_run_per_language(stack, tiny_yaml, tmp_path):
    """2 languages x 3 shard groups as flow runs of the stage deployments: the same score
    shards (byte for byte) and pairs as one call per language in this process."""
    from croco import storage

    path, cfg = tiny_yaml
    res = stack.cli(PY, "-m", "croco.flows.cli", "run", "--deployment", "croco-pipeline/scale-out",
                    "--set", "generation.shard_size=1",  # 3 shards a language, one a group
                    "--set", "orchestration.shards_per_language=3", str(path),
                    "--stages", "prompts,generate,score,pair", "--run-id", "sharded",
                    timeout=900, check=False)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-2000:]}\n{stack.tail()}"
    names = _flow_names(stack)
    runs = {r["name"]: r for r in _flow_runs(stack)
            if names[r["flow_id"]] in ("croco-generate", "croco-score")}
    groups = {f"{stage}-{lang}-{g}" for stage in ("generate", "score") for lang in ("en", "de")
              for g in range(3)}
    assert groups <= set(runs), sorted(runs)
    assert {runs[n]["state_type"] for n in groups} == {"COMPLETED"}

    prefix = cfg.data_root.split(f"s3://{stack.bucket}/", 1)[1]

    def s3_bytes(key: str) -> bytes:
        return stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read()

    manifest = json.loads(s3_bytes(f"{prefix}/runs/sharded/manifest.json"))
    local = cfg.model_copy(update={"data_root": str(tmp_path / "local"), "generation":
                                   cfg.generation.model_copy(update={"shard_size": 1})})
    ref = _reference_stages(local, local.data_root)
    for lang in ("en", "de"):
        entry = manifest["outputs"]["scores"][lang]
        assert entry["key"] == Path(ref["scores"][lang]).parent.name and entry["rows"] == 3 * 4
        folder = f"{prefix}/scores/{entry['key']}/lang={lang}"
        refs = json.loads(s3_bytes(f"{folder}/{storage.REFERENCES}"))["files"]
        want = storage.parquet_files(ref["scores"][lang])
        assert len(want) == 3
        for i, other in enumerate(want):  # each part written, or referenced in the store
            part = f"part-{i:05d}.parquet"
            key = (posixpath.normpath(posixpath.join(folder, refs[part])) if part in refs
                   else f"{folder}/{part}")
            assert s3_bytes(key) == storage.read_bytes(other), (lang, part)
    pairs = manifest["outputs"]["pairs"]
    assert pairs["key"] == Path(ref["pairs"]).name
    for table in ("dpo/lang=en", "dpo/lang=de", "sft/lang=en", "sft/lang=de"):
        assert s3_bytes(f"{prefix}/pairs/{pairs['key']}/{table}/data.parquet") == \
            storage.read_bytes(storage.join(ref["pairs"], table, "data.parquet")), table
