"""Deployments: the pull step that every croco deployment runs, and `croco deploy`.

`infra/prefect.yaml` declares the deployments (the pipeline on a CPU pool, the GPU stages
on a GPU pool); `croco deploy` runs `prefect --no-prompt deploy --all` on it from the
project directory. A worker running a croco flow first runs `use_project_dir`, which
moves into the croco project (the directory holding `flows/pipeline.py`) so the
deployments' entrypoints resolve on any machine: a checkout on a GPU host, or the image's
`/opt/croco`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_FILE = "infra/prefect.yaml"
MARKER = Path("flows") / "pipeline.py"


def use_project_dir(directory: str | None = None) -> dict[str, str]:
    """Pull step: `chdir` into the croco project. Tried in order: `directory`, the worker's
    `CROCO_WORKDIR`, the project this package was installed from, the current directory."""
    candidates = [directory, os.environ.get("CROCO_WORKDIR"), str(PROJECT_DIR), os.getcwd()]
    for cand in candidates:
        if cand and (Path(cand) / MARKER).is_file():
            os.chdir(cand)
            return {"directory": str(Path(cand).resolve())}
    tried = ", ".join(c for c in candidates if c)
    raise FileNotFoundError(f"no croco project ({MARKER}) in any of: {tried}; set "
                            "CROCO_WORKDIR in the worker's environment to the croco checkout")


def deploy_command(prefect_file: str = PREFECT_FILE, names: list[str] | None = None) -> list[str]:
    """The `prefect deploy` command line for the deployments of `prefect_file`."""
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy",
           "--prefect-file", prefect_file]
    if names:
        for n in names:
            cmd += ["--name", n]
    else:
        cmd.append("--all")
    return cmd


def work_pools(prefect_file: str = PREFECT_FILE, names: list[str] | None = None) -> set[str]:
    """The work pools the deployments of `prefect_file` (those of `names`, `flow/name`
    or `name`, if given) run on."""
    import yaml

    spec = yaml.safe_load((PROJECT_DIR / prefect_file).read_text())
    pools = set()
    for dep in spec.get("deployments") or []:
        flow = dep.get("entrypoint", "").rsplit(":", 1)[-1].replace("_", "-")
        if names and not ({dep.get("name"), f"{flow}/{dep.get('name')}"} & set(names)):
            continue
        if (dep.get("work_pool") or {}).get("name"):
            pools.add(dep["work_pool"]["name"])
    return pools


def missing_work_pools(pools: set[str]) -> list[str]:
    """Those of `pools` that the current Prefect API does not have."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    missing = []
    with get_client(sync_client=True) as client:
        for pool in sorted(pools):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                missing.append(pool)
    return missing


def deploy(prefect_file: str = PREFECT_FILE, names: list[str] | None = None) -> int:
    """Create or update the deployments against the current Prefect API."""
    return subprocess.call(deploy_command(prefect_file, names), cwd=PROJECT_DIR)


def create_storage_blocks(name: str, bucket: str, *, endpoint_url: str | None = None,
                          region: str | None = None, results_folder: str = "prefect-results",
                          key: str | None = None, secret: str | None = None) -> dict[str, str]:
    """Save the blocks a cluster needs on the current Prefect API: `aws-credentials/<name>`
    (croco's `storage_block`) and `s3-bucket/<name>` on `bucket`/`results_folder` (for
    `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`). Key and secret default to the environment's
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; they go to the server only. Returns the slugs."""
    try:
        from prefect_aws import AwsCredentials, S3Bucket
        from prefect_aws.client_parameters import AwsClientParameters
    except ImportError:
        raise ImportError("storage blocks need prefect-aws: pip install 'croco[aws]'") from None

    key = key or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = secret or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise ValueError("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") \
        or os.environ.get("CROCO_S3_ENDPOINT_URL")
    creds = AwsCredentials(
        aws_access_key_id=key, aws_secret_access_key=secret,
        region_name=region or os.environ.get("AWS_DEFAULT_REGION"),
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint_url))
    creds.save(name, overwrite=True)
    S3Bucket(bucket_name=bucket, bucket_folder=results_folder,
             credentials=creds).save(name, overwrite=True)
    return {"storage_block": f"aws-credentials/{name}", "result_storage": f"s3-bucket/{name}"}
