"""Running stages as flow runs of Prefect deployments, and what every flow run sets up first.

`trigger_task` starts one flow run of a deployment (`run_deployment`, linked to the calling
flow run as its child), waits for it, checks its final state and returns its result. A
child that failed, crashed or was cancelled fails the task with the child's name, state,
message and id; a child still running after `orchestration.deployment_timeout` seconds
fails it too. The child's return value is read from its persisted result, so on a cluster
the workers' result storage must be shared (`PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`, e.g.
an `s3-bucket/...` block; see the README's "Scaling out").
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS
from prefect.context import TaskRunContext

from croco import storage
from croco.tasks.stages import DEFAULT_RETRIES


class StageRunFailed(RuntimeError):
    """A stage's flow run on a deployment did not complete."""


def load_storage_block(slug: str) -> None:
    """Take the S3 credentials for this process from a saved Prefect block:
    `aws-credentials/<name>` or `s3-bucket/<name>` (its credentials). They stay in memory."""
    from prefect.blocks.core import Block

    if "/" not in slug:
        raise ValueError(f"storage_block: {slug!r} is not a block slug; write "
                         "'aws-credentials/<name>' or 's3-bucket/<name>'")
    try:
        block = Block.load(slug)
    except ValueError as e:
        raise ValueError(f"storage_block: cannot load {slug!r} ({e}); create it first, e.g. "
                         "with prefect-aws's AwsCredentials(...).save(name)") from None
    creds = getattr(block, "credentials", block)
    secret = getattr(creds, "aws_secret_access_key", None)
    params = getattr(creds, "aws_client_parameters", None)
    storage.set_s3_credentials(
        key=getattr(creds, "aws_access_key_id", None),
        secret=secret.get_secret_value() if secret is not None else None,
        token=getattr(creds, "aws_session_token", None),
        endpoint_url=getattr(params, "endpoint_url", None) if params else None,
        region=getattr(creds, "region_name", None),
    )


def prepare_run(storage_block: str | None, gpu_slots: int, gpu_limit: str = "auto") -> None:
    """What every croco flow run does first: storage credentials, how GPU work is bounded
    (`croco.tasks.stages.configure_gpu_slots`)."""
    from croco.tasks.stages import configure_gpu_slots

    if storage_block:
        load_storage_block(storage_block)
    if configure_gpu_slots(gpu_slots, gpu_limit):
        get_run_logger().info("GPU work bounded by the server's global 'gpu' limit (leases)")


def _check_final(flow_run, deployment: str, label: str, timeout: float | None) -> None:
    state = flow_run.state
    where = f"{label}: flow run {flow_run.name!r} ({flow_run.id}) of deployment {deployment!r}"
    if state is None or not state.is_final():
        raise StageRunFailed(f"{where} is still {state.type.value if state else 'unscheduled'} "
                             f"after {timeout}s (orchestration.deployment_timeout); is a "
                             "worker polling that deployment's work pool?")
    if not state.is_completed():
        raise StageRunFailed(f"{where} ended {state.type.value}: "
                             f"{storage.redact(state.message or 'no message')}")


def run_stage_deployment(deployment: str, parameters: dict[str, Any], label: str,
                         timeout: float | None = None) -> Any:
    """Start one flow run of `deployment`, wait for it, and return its result."""
    from prefect.deployments import run_deployment

    ctx = TaskRunContext.get()
    # A transient retry of the calling task re-attaches to the same child flow run.
    key = f"croco-{ctx.task_run.id}" if ctx else None
    # Named after the stage from the start (`generate-de-1`), so the infrastructure a worker
    # creates for it before the flow renames itself (a Slurm job, a pod) says what runs.
    flow_run = run_deployment(deployment, parameters=parameters, timeout=timeout,
                              idempotency_key=key, poll_interval=2, flow_run_name=label)
    _check_final(flow_run, deployment, label, timeout)
    try:
        return flow_run.state.result()
    except Exception as e:  # noqa: BLE001
        raise StageRunFailed(
            f"{label}: flow run {flow_run.name!r} completed but its result cannot be read "
            f"here ({type(e).__name__}: {storage.redact(str(e))}); give every worker and the "
            "pipeline the same result storage (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK)") from None


@task(name="run-deployment", task_run_name="{label}",
      cache_policy=INPUTS - "label" - "timeout" - "parameters", **DEFAULT_RETRIES)
def trigger_task(deployment: str, parameters: dict[str, Any], label: str, identity: str,
                 timeout: float | None = None) -> Any:
    """A stage's flow run on a deployment; cached on the deployment and `identity` (the
    stage identity of its parameters, `croco.identity`, and the data root), so an unchanged
    rerun, or one that changes only execution-only settings, starts nothing (the caller
    checks the outputs still exist). Stages whose outputs belong to one run (evaluation)
    use it with `cache_policy=NO_CACHE`."""
    get_run_logger().info("%s -> deployment %s", label, deployment)
    return run_stage_deployment(deployment, parameters, label, timeout)
