"""The object store goes away in the middle of a run.

One long-lived local S3 server (moto keeps its objects in memory, so it cannot restart)
sits behind a TCP proxy on loopback; the run's endpoint is the proxy. Cutting the proxy
closes every open connection and refuses new ones; restoring it listens again on the same
port. The test itself reads the bucket directly from the server.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

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


def _setup(s3_server: str, base: Path, tiny_yaml, **env) -> dict:
    """A bucket behind a proxy, the tiny config on it, and the environment of a run that
    reaches the bucket only through the proxy."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    proxy = TcpProxy(int(s3_server.rsplit(":", 1)[1]))
    config = tiny_yaml(base / "outage.yaml", data_root=f"s3://{bucket}/croco", **TRAIN_ON)
    return {"bucket": bucket, "client": client, "proxy": proxy, "logs": base / "logs",
            "env": croco_env(base / "prefect-home", CROCO_S3_ENDPOINT_URL=proxy.url,
                             AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, **env),
            "args": ["run", str(config), *TO_TRAIN], "root": f"s3://{bucket}/croco"}


@pytest.fixture
def direct(s3_server, monkeypatch):
    """This process reads the bucket straight from the server (not through the proxy)."""
    import fsspec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("CROCO_S3_ENDPOINT_URL", s3_server)
    fsspec.filesystem("s3").clear_instance_cache()
    yield
    fsspec.filesystem("s3").clear_instance_cache()


@pytest.fixture
def outage(s3_server, tmp_path, tiny_yaml, direct):
    setup = _setup(s3_server, tmp_path, tiny_yaml)
    yield setup
    setup["proxy"].close()


def _first_shard(client, bucket: str, run, timeout: float = 300) -> str:
    """Poll the bucket until a generation shard is committed (sampled into the sample
    store, its prompts file last); its key."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        page = client.list_objects_v2(Bucket=bucket, Prefix="croco/samples/")
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".prompts.parquet"):
                return obj["Key"]
        assert run.proc.poll() is None, "the run ended before writing a generation shard"
        time.sleep(0.1)
    raise AssertionError(f"no generation shard after {timeout}s")


def _committed(client, bucket: str) -> dict[str, tuple]:
    """Every object but temporary ones: key -> (content, last modified)."""
    return {k: (v, client.head_object(Bucket=bucket, Key=k)["LastModified"])
            for k, v in bucket_objects(client, bucket).items() if ".tmp-" not in k}


def test_a_short_outage_is_ridden_out_by_retries(outage, reference_run):
    """Cut right after the first generation shard is committed, restored 3 s after the run
    first finds it cut: the run completes (exit 0) and its outputs equal an uninterrupted
    run's."""
    run = start_croco(outage["args"] + ["--run-id", "short"], outage["env"], outage["logs"],
                      name="short")
    _first_shard(outage["client"], outage["bucket"], run)
    proxy = outage["proxy"]
    proxy.cut()
    deadline = time.time() + 120
    while proxy.refused == 0 and run.proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proxy.refused > 0, "the run did not try the store while it was cut"
    time.sleep(3)
    proxy.restore()
    done = run.wait(timeout=400)
    assert done.rc == 0, done.output[-5000:]
    assert_same_outputs(read_manifest(outage["root"], "short"), reference_run)
    print(f"short outage: run took {done.seconds:.1f} s, {proxy.refused} connections "
          "reset while cut")


@pytest.fixture(scope="module")
def _lasting_cache():
    cache: dict = {}
    yield cache
    if "proxy" in cache:
        cache["proxy"].close()


@pytest.fixture
def lasting_outage(_lasting_cache, s3_server, tiny_yaml, tmp_path_factory, direct) -> dict:
    """A run cut off for good right after its first generation shard, made once for the
    tests below: the setup, what the bucket held at the cut, and how the run ended. The
    SDK's own retries are off (AWS_MAX_ATTEMPTS=1) so that croco's retries alone decide
    when it gives up; with botocore's defaults the same run gave up about 2 minutes after
    the cut."""
    cache = _lasting_cache
    if "failed" not in cache:
        base = tmp_path_factory.mktemp("lasting-outage")
        cache.update(_setup(s3_server, base, tiny_yaml, AWS_MAX_ATTEMPTS="1"))
        run = start_croco(cache["args"] + ["--run-id", "lasting"], cache["env"],
                          cache["logs"], name="lasting")
        _first_shard(cache["client"], cache["bucket"], run)
        cache["proxy"].cut()
        cache["before"] = _committed(cache["client"], cache["bucket"])
        cache["failed"] = run.wait(timeout=400)
    return cache


def test_a_lasting_outage_ends_with_one_clear_message(lasting_outage):
    """After its retries the run exits non-zero, its last word one `error:` message that
    names the endpoint and no secret."""
    failed, proxy = lasting_outage["failed"], lasting_outage["proxy"]
    assert failed.rc != 0 and not failed.timed_out
    assert SECRET not in failed.output and KEY_ID not in failed.output
    message = failed.error_message()
    assert message.startswith("error:") and f"127.0.0.1:{proxy.port}" in message, message
    assert "unreachable" in message and "committed is kept" in message, message
    # It is croco's last word (Prefect's own log records, tracebacks included, may precede it).
    assert message.endswith(failed.last_line().strip())


def test_a_lasting_outage_keeps_what_was_committed_and_a_rerun_continues(lasting_outage,
                                                                       reference_run):
    """The cut-off run fails (non-zero exit, after retrying: connections were attempted
    while cut, no secret in its output) and leaves the committed objects as they were;
    once the store is back, a rerun completes without rewriting the committed generation
    shards, and its outputs equal an uninterrupted run's."""
    setup = lasting_outage
    client, bucket, proxy, failed = (setup["client"], setup["bucket"], setup["proxy"],
                                     setup["failed"])
    assert failed.rc != 0 and not failed.timed_out, failed.output[-5000:]
    assert proxy.refused >= 3  # the first try and croco's two retries at least
    assert SECRET not in failed.output and KEY_ID not in failed.output
    before = setup["before"]
    assert _committed(client, bucket) == before

    proxy.restore()
    rerun = start_croco(setup["args"] + ["--run-id", "lasting"], setup["env"], setup["logs"],
                        name="rerun").wait(timeout=400)
    assert rerun.rc == 0, rerun.output[-5000:]
    after = _committed(client, bucket)
    shards = [k for k in before if "/samples/" in k and k.endswith(".parquet")]
    assert shards and all(after[k] == before[k] for k in shards)
    assert_same_outputs(read_manifest(setup["root"], "lasting"), reference_run)
    print(f"lasting outage: failed after {failed.seconds:.1f} s ({proxy.refused} connections "
          f"reset), rerun {rerun.seconds:.1f} s; message: {failed.error_message()}")
