"""The object store goes away in the middle of a run.

One long-lived local S3 server (moto keeps its objects in memory, so it cannot restart)
sits behind a TCP proxy on loopback; the run's endpoint is the proxy. Cutting the proxy
closes every open connection and refuses new ones; restoring it listens again on the same
port. The test itself reads the bucket directly from the server.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.reliability.conftest import (
    TO_TRAIN,
    TRAIN_ON,
    TcpProxy,
    assert_same_outputs,
    bucket_objects,
    croco_env,
    read_manifest,
    start_croco,
)

pytestmark = pytest.mark.slow

KEY_ID = "outage-key-id-1618"
SECRET = "outage-secret-value-0577"


@pytest.fixture
def outage(s3_server, tmp_path, tiny_yaml, monkeypatch):
    """A bucket behind a proxy, the tiny config on it, the environment of a run that reaches
    the bucket only through the proxy; this process reads the bucket directly."""
    import boto3
    import fsspec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("CROCO_S3_ENDPOINT_URL", s3_server)
    fsspec.filesystem("s3").clear_instance_cache()
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    proxy = TcpProxy(int(s3_server.rsplit(":", 1)[1]))
    env = croco_env(tmp_path / "prefect-home", CROCO_S3_ENDPOINT_URL=proxy.url,
                    AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
    config = tiny_yaml(data_root=f"s3://{bucket}/croco", **TRAIN_ON)
    yield {"bucket": bucket, "client": client, "proxy": proxy, "env": env,
           "args": ["run", str(config), *TO_TRAIN], "root": f"s3://{bucket}/croco",
           "logs": tmp_path / "logs"}
    proxy.cut()
    fsspec.filesystem("s3").clear_instance_cache()


def _first_shard(client, bucket: str, run, timeout: float = 300) -> str:
    """Poll the bucket until a generation shard is committed; its key."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        page = client.list_objects_v2(Bucket=bucket, Prefix="croco/generations/")
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".parquet"):
                return obj["Key"]
        assert run.proc.poll() is None, "the run ended before writing a generation shard"
        time.sleep(0.1)
    raise AssertionError(f"no generation shard after {timeout}s")


def _committed(client, bucket: str) -> dict[str, tuple]:
    """Every object but temporary ones: key -> (content, last modified)."""
    return {k: (v, client.head_object(Bucket=bucket, Key=k)["LastModified"])
            for k, v in bucket_objects(client, bucket).items() if ".tmp-" not in k}


def test_a_short_outage_is_ridden_out_by_retries(outage, reference_run):
    """Cut for 3 s right after the first generation shard is committed, then restored: the
    run completes (exit 0) and its outputs equal an uninterrupted run's."""
    run = start_croco(outage["args"] + ["--run-id", "short"], outage["env"], outage["logs"],
                      name="short")
    _first_shard(outage["client"], outage["bucket"], run)
    outage["proxy"].cut()
    time.sleep(3)
    outage["proxy"].restore()
    done = run.wait(timeout=400)
    assert done.rc == 0, done.output[-5000:]
    assert_same_outputs(read_manifest(outage["root"], "short"), reference_run)
    print(f"short outage: run took {done.seconds:.1f} s")


def test_a_lasting_outage_fails_clearly_and_a_rerun_continues(outage, reference_run):
    """Cut for good after the first generation shard: the run fails after its retries with
    a last line naming the endpoint and no secret, and keeps what it committed; once the
    store is back, a rerun completes without rewriting those objects, and its outputs
    equal an uninterrupted run's."""
    client, bucket, proxy = outage["client"], outage["bucket"], outage["proxy"]
    run = start_croco(outage["args"] + ["--run-id", "lasting"], outage["env"], outage["logs"],
                      name="lasting")
    _first_shard(client, bucket, run)
    proxy.cut()
    before = _committed(client, bucket)
    failed = run.wait(timeout=400)
    assert failed.rc != 0 and not failed.timed_out, failed.output[-5000:]
    assert f"127.0.0.1:{proxy.port}" in failed.last_line(), failed.output[-5000:]
    assert SECRET not in failed.output and KEY_ID not in failed.output
    assert _committed(client, bucket) == before

    proxy.restore()
    rerun = start_croco(outage["args"] + ["--run-id", "lasting"], outage["env"],
                        outage["logs"], name="rerun").wait(timeout=400)
    assert rerun.rc == 0, rerun.output[-5000:]
    after = _committed(client, bucket)
    shards = [k for k in before if "/generations/" in k and k.endswith(".parquet")]
    assert shards and all(after[k] == before[k] for k in shards)
    assert_same_outputs(read_manifest(outage["root"], "lasting"), reference_run)
    print(f"lasting outage: failed after {failed.seconds:.1f} s, rerun {rerun.seconds:.1f} s; "
          f"last line: {failed.last_line()}")
