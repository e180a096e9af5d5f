"""Credentials in the environment of a run go to the object store and nowhere else: not to
the logs, the bucket, Prefect's database, results or artifacts, nor into an error message.

The run is the whole tiny pipeline (to a trained adapter) with its data root and Prefect's
result storage in a bucket of the local S3 server; its requests pass through a recording
proxy, which shows that the planted credentials are the ones the calls were signed with.
"""

from __future__ import annotations

import base64
import subprocess
import uuid

import pytest

from tests.reliability.conftest import (
    PY,
    REPO,
    TO_TRAIN,
    TRAIN_ON,
    TcpProxy,
    bucket_objects,
    croco_env,
    files_under,
    run_croco,
)

pytestmark = pytest.mark.slow

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIARELIAB4711PLANTED",
    "AWS_SECRET_ACCESS_KEY": "planted-secret-3f9c27e1b5d84a06",
    "AWS_SESSION_TOKEN": "planted-session-token-8d1e6b0c94a7",
    "HF_TOKEN": "hf_plantedReliabToken52c1e9",
}

SAVE_RESULT_BLOCK = """
import sys
from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters

# No key in the block: boto3 takes the credentials from the environment.
creds = AwsCredentials(region_name="us-east-1",
                       aws_client_parameters=AwsClientParameters(endpoint_url=sys.argv[2]))
S3Bucket(bucket_name=sys.argv[1], bucket_folder="prefect-results",
         credentials=creds).save("results", overwrite=True)
"""


def needles(secret: str) -> list[bytes]:
    """The secret's bytes and its base64 forms (standard and URL-safe) at each of the three
    alignments it can take inside longer base64-encoded data."""
    raw = secret.encode()
    out = [raw]
    for i in range(3):
        aligned = raw[i:i + 3 * ((len(raw) - i) // 3)]
        out += [base64.b64encode(aligned), base64.urlsafe_b64encode(aligned)]
    return out


def leaks(blobs: dict[str, bytes]) -> list[tuple[str, str]]:
    """(where, which variable) for every secret found in any blob."""
    return [(where, var) for where, blob in blobs.items() for var, secret in SECRETS.items()
            if any(n in blob for n in needles(secret))]


@pytest.fixture
def planted(s3_server, tmp_path):
    """A bucket behind a recording proxy; the environment of a croco run holding the
    planted credentials, the proxy as endpoint, and Prefect's results in the bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id="setup", aws_secret_access_key="setup")
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    proxy = TcpProxy(int(s3_server.rsplit(":", 1)[1]), record=True)
    home = tmp_path / "prefect-home"
    env = croco_env(home, CROCO_S3_ENDPOINT_URL=proxy.url, **SECRETS)
    # The result-storage block is saved first, in the same Prefect home (its database).
    subprocess.run([PY, "-c", SAVE_RESULT_BLOCK, bucket, proxy.url], env=env, cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = "s3-bucket/results"
    env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
    yield {"bucket": bucket, "client": client, "env": env, "home": home, "proxy": proxy}
    proxy.close()


def test_planted_credentials_appear_nowhere_but_in_the_requests(planted, tiny_yaml, tmp_path):
    """After a whole run on s3:// and a run that fails on a missing bucket, none of the
    planted values (nor their base64) is in the runs' stdout/stderr, in any object of the
    bucket (manifest, parquet, adapter, Prefect results) or in any file of the Prefect home
    (its SQLite database with logs, artifacts and flow-run parameters, included); the failed
    run's error names the bucket and no secret. The requests themselves carried the key id
    and session token: the run used exactly these credentials."""
    bucket, env = planted["bucket"], planted["env"]
    config = tiny_yaml(data_root=f"s3://{bucket}/croco", **TRAIN_ON)
    done = run_croco(["run", str(config), "--run-id", "planted", *TO_TRAIN], env,
                     tmp_path / "logs", name="planted", timeout=400)
    assert done.rc == 0, done.output[-4000:]

    missing = tiny_yaml(tmp_path / "missing.yaml", data_root="s3://no-such-bucket-4711/croco",
                        **TRAIN_ON)
    failed = run_croco(["run", str(missing), "--run-id", "missing", *TO_TRAIN], env,
                       tmp_path / "logs", name="missing", timeout=400)
    assert failed.rc != 0 and not failed.timed_out
    assert "no-such-bucket-4711" in failed.error_message(), failed.output[-3000:]

    objects = bucket_objects(planted["client"], bucket)
    assert any(k.startswith("croco/runs/planted/") for k in objects)
    assert any(k.startswith("prefect-results/") for k in objects), sorted(objects)[:20]
    assert any(k.endswith("adapter_model.safetensors") for k in objects)
    blobs = {f"bucket:{k}": v for k, v in objects.items()}
    home_files = files_under(planted["home"])
    assert any(p.endswith(".db") for p in home_files), sorted(home_files)
    blobs.update({f"home:{p}": f.read_bytes() for p, f in home_files.items()})
    for name, run in (("run", done), ("failed run", failed)):
        blobs[f"{name} stdout"] = run.stdout.encode()
        blobs[f"{name} stderr"] = run.stderr.encode()
    assert leaks(blobs) == []

    # The scan finds what is there: the signed requests carry the key id and the token.
    wire = {"requests": bytes(planted["proxy"].sent)}
    assert {var for _, var in leaks(wire)} >= {"AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"}
    print(f"planted run {done.seconds:.1f} s, failing run {failed.seconds:.1f} s, "
          f"{len(objects)} objects and {len(home_files)} Prefect-home files scanned")
