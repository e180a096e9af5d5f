"""The whole pipeline (prompts to report) with its data root on s3:// against a local S3
server, credentials only in saved Prefect blocks, and Prefect's own result storage on the
same bucket."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from croco import storage

pytestmark = pytest.mark.slow

KEY_ID = "block-key-id-4711"
SECRET = "block-secret-value-0815"


@pytest.fixture
def blocks(prefect_harness, s3_server, monkeypatch):
    """A bucket, and AwsCredentials + S3Bucket blocks for it. The environment has no
    credentials and no endpoint: croco and Prefect find both through the blocks."""
    import boto3
    import fsspec
    from prefect_aws import AwsCredentials, S3Bucket
    from typer.testing import CliRunner

    from croco.flows.cli import app

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL", "CROCO_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # No shared config files either: nothing but the blocks can supply credentials.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    bucket = f"croco-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                 aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
                 ).create_bucket(Bucket=bucket)
    name = f"croco-{uuid.uuid4().hex[:6]}"
    # `croco blocks` saves both blocks from credentials in its environment (only there).
    res = CliRunner().invoke(app, ["blocks", "--bucket", bucket, "--name", name,
                                   "--endpoint-url", s3_server, "--region", "us-east-1"],
                             env={"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET})
    assert res.exit_code == 0, res.output
    assert f"aws-credentials/{name}" in res.output and SECRET not in res.output
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ
    creds = AwsCredentials.load(name)
    assert creds.aws_client_parameters.endpoint_url == s3_server
    assert S3Bucket.load(name).bucket_name == bucket
    fsspec.filesystem("s3").clear_instance_cache()
    yield {"bucket": bucket, "name": name, "endpoint": s3_server}
    storage.set_s3_credentials()
    fsspec.filesystem("s3").clear_instance_cache()


def test_whole_pipeline_on_s3_with_blocks_and_result_storage(blocks, tiny_config):
    import boto3
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

    from croco.flows.pipeline import croco_pipeline

    bucket, name = blocks["bucket"], blocks["name"]
    cfg = tiny_config(**{"data_root": f"s3://{bucket}/croco", "languages": ["en", "de"],
                         "storage_block": f"aws-credentials/{name}",
                         "training.enabled": True, "evaluation.judge.n_bootstrap": 20})
    with temporary_settings({PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: f"s3-bucket/{name}"}):
        result = croco_pipeline(config=cfg, run_id="on-s3")

    outputs = result["outputs"]
    ev = outputs.evaluation
    for stage, uris in (("prompts", outputs.prompts.values()),
                        ("generations", outputs.generations.values()),
                        ("scores", outputs.scores.values()), ("pairs", [outputs.pairs]),
                        ("training", outputs.training_runs().values()),
                        ("heldout", [ev.heldout]), ("judgments", ev.judgments.values())):
        assert uris
        for uri in uris:
            assert uri.startswith(f"s3://{bucket}/croco/"), (stage, uri)
    adapter = storage.join(outputs.training_runs()["dpo"], "adapter", "adapter_config.json")
    assert storage.exists(adapter)
    assert storage.read_parquet(ev.heldout)["model"].unique().sort().to_list() \
        == ["base", "dpo"]
    report = storage.read_bytes(result["report"]).decode()
    assert "dpo" in report

    client = boto3.client("s3", endpoint_url=blocks["endpoint"], region_name="us-east-1",
                          aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    # Prefect's task results (the cache records of every stage) went to the bucket too.
    results = [k for k in keys if k.startswith("prefect-results/")]
    assert len(results) >= 10, results
    # The secret is nowhere: not in the manifest, the report, the results, the artifacts.
    manifest = storage.read_bytes(result["manifest"]).decode()
    assert SECRET not in manifest and KEY_ID not in manifest
    assert json.loads(manifest)["config"]["storage_block"] == f"aws-credentials/{name}"
    for key in results[:20] + [k for k in keys if k.endswith((".json", ".md"))]:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert SECRET.encode() not in body and KEY_ID.encode() not in body, key
    with get_client(sync_client=True) as api:
        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(like_="")))
    assert artifacts
    assert all(SECRET not in json.dumps(a.data, default=str) for a in artifacts)
    assert storage.redact(f"x {SECRET} y") == "x *** y"
