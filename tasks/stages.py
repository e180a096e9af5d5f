"""The Prefect side of the stages: one task for any stage, retries, GPU slots, artifacts.

`stage_task(stage, data_root)` runs any stage of `croco.stages` through the library's one
runner (`croco.stage.run`). There is one cache, the stage's output: it lives under the
stage's key (`Stage.key()`: its code version and its identity: config without
execution-only settings, inputs by key, files by content; `croco.identity`) and is
complete once `_SUCCESS` is written. The flows never submit a call whose output is
complete (`croco.flows.stages.Stages.todo`), so an unchanged rerun starts no stage task
at all, a changed batch size or device reruns nothing, an edited prompt file or retrained
local model folder reruns what depends on it, a changed pairing config re-pairs only,
and a new language runs only that language. Prefect's task cache is never read for
stages (`StageRecord` only files each result under the stage's key); a crash or a
deleted output never redoes finished work nor serves a stale result, because
completeness is read from storage. Retries (with backoff) are for transient errors only:
I/O, network, object storage; bad input fails at once.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from croco import stage as contract
from croco import stages, storage
from croco.config import OrchestrationConfig
from croco.errors import UserError
from croco.manifest import RunOutputs, write_manifest
from croco.stage import Stage


GPU_LIMIT = "gpu"

_TRANSIENT = (OSError, ConnectionError, TimeoutError)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, ValueError, TypeError, KeyError)):
        return False  # retrying cannot fix bad input
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return False  # a full disk or quota waits for the user, not for a retry
    if isinstance(exc, _TRANSIENT):
        return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))
    name = type(exc).__module__
    return name.startswith(("botocore", "aiobotocore", "s3fs", "urllib3", "aiohttp"))


def retry_transient(task, task_run, state) -> bool:
    """Retry only I/O, network and object-storage errors, and say so in one log line.
    Prefect asks only while retries remain."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001
        exc = e
    if not (isinstance(exc, BaseException) and _is_transient(exc)):
        return False
    try:
        log = get_run_logger()
    except Exception:  # noqa: BLE001 - called outside a task run (tests, other engines)
        log = logging.getLogger("croco.retry")
    first_line = (str(exc).splitlines() or [""])[0]
    log.warning(
        "transient %s in %s: %s; retrying (attempt %d of %d)", type(exc).__name__,
        task_run.name, storage.redact(first_line), task_run.run_count + 1, task.retries + 1)
    return True


def retry_options(retries: int, retry_delay_seconds: float) -> dict:
    """Task options for `orchestration.retries` retries of a transient error, after
    `retry_delay_seconds` x 1, 2, 4, ... seconds (`retry_transient` decides what is
    transient)."""
    return {"retries": retries,
            "retry_delay_seconds": exponential_backoff(backoff_factor=retry_delay_seconds),
            "retry_condition_fn": retry_transient}


def with_retries(task, retries: int, retry_delay_seconds: float):
    """`task` with a run's retry settings (`retry_options`)."""
    return task.with_options(**retry_options(retries, retry_delay_seconds))


_DEFAULT = OrchestrationConfig()
#: The tasks' own retry settings: the config's defaults; a flow run applies its config's
#: (`with_retries`).
DEFAULT_RETRIES = retry_options(_DEFAULT.retries, _DEFAULT.retry_delay_seconds)

@dataclass
class StageRecord(CachePolicy):
    """The key a stage task's result is recorded under in Prefect's result storage (a
    bucket on a cluster): the stage's output place (`Stage.where`: its key and language)
    and its other inputs (data root, step, shard group). Written, never read
    (`refresh_cache`): the output's `_SUCCESS` is the one cache, and the flows start no
    task for a complete output."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        if not inputs:
            return None
        return hash_objects({k: v.where() if isinstance(v, Stage) else v
                             for k, v in inputs.items() if k != "checked"},
                            raise_on_failure=True)


_common = dict(cache_policy=StageRecord(), refresh_cache=True, persist_result=True,
               **DEFAULT_RETRIES)


# --------------------------------------------------------------------------- GPU slots
#
# GPU work is bounded, and a slot never outlives its holder:
# - A local run (`croco run`: every stage in this process) holds slots of a gate in this
#   process only. The process's death frees them; nothing is asked of the Prefect server,
#   so a run killed at any moment cannot block the next one, and no task waits on a
#   server round trip to start.
# - On a cluster (a stage flow run started from a deployment, i.e. by a worker, where
#   several processes share the GPUs) slots come from the server's global `gpu` limit
#   through leases: the holder renews its lease while it runs, and a holder that dies
#   (kill -9, OOM, power loss) loses its slot when the lease expires (LEASE_SECONDS)
#   and the server's lease service revokes it.
# `orchestration.gpu_limit` forces one or the other. The global limit belongs to the
# operator: a run creates it when it is missing and never resizes it (`croco deploy
# --gpu-slots N` does). A wait for a slot is logged every WAIT_LOG_SECONDS.

WAIT_LOG_SECONDS = 30.0
LEASE_SECONDS = 60.0

_gate_slots = 1
_gate = threading.BoundedSemaphore(1)
_global = False


def configure_gpu_slots(slots: int, mode: str = "auto") -> bool:
    """Set how this process bounds GPU work (see above); returns True when it uses the
    server's global limit. `mode`: auto (global only inside a deployment's flow run),
    local or global."""
    global _gate, _gate_slots, _global
    if slots != _gate_slots:
        _gate, _gate_slots = threading.BoundedSemaphore(slots), slots
    if mode == "auto":
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        _global = bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)
    else:
        _global = mode == "global"
    if _global:
        ensure_gpu_limit(slots)
    return _global


def ensure_gpu_limit(slots: int) -> bool:
    """Create the global `gpu` limit with `slots` slots if it does not exist; an existing
    one is the operator's and is left as it is. Returns True if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
        except ObjectAlreadyExists:  # another run created it first
            return False
    return True


def resize_gpu_limit(slots: int) -> None:
    """The operator's explicit act: create or resize the global `gpu` limit."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)


_holders: list[str] = []  # what holds this process's slots now, for the wait messages
_last_wait_log = [0.0]


def _log_wait(what: str, holder: str, since: float, *, level: int = logging.INFO) -> None:
    """One line per WAIT_LOG_SECONDS per process, however many tasks queue."""
    now = time.monotonic()
    if now - _last_wait_log[0] < WAIT_LOG_SECONDS * 0.9:
        return
    _last_wait_log[0] = now
    logging.getLogger("croco").log(level, "%s: waiting for %s (%.0f s so far)", what, holder,
                                   now - since)


def _local_holder() -> str:
    held = ", ".join(_holders) or "nothing (releasing)"
    return (f"one of this process's {_gate_slots} GPU slot(s) (orchestration.gpu_slots), "
            f"held by {held}")


def _global_holder() -> str:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            lim = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        taken = f"{lim.active_slots} of {lim.limit} taken"
    except Exception:  # noqa: BLE001 - the message is only informative
        taken = "state unknown"
    return (f"a slot of the global '{GPU_LIMIT}' concurrency limit ({taken}; a dead "
            f"holder's slot frees when its {LEASE_SECONDS:.0f} s lease expires)")


@contextmanager
def gpu_slot(what: str = "GPU stage"):
    """Hold one GPU slot for the duration of the block (see the notes above)."""
    gate, since = _gate, time.monotonic()
    while not gate.acquire(timeout=WAIT_LOG_SECONDS):
        _log_wait(what, _local_holder(), since)
    _holders.append(what)
    try:
        if not _global:
            yield
            return
        while True:
            entered = False
            try:
                with concurrency(GPU_LIMIT, occupy=1, timeout_seconds=WAIT_LOG_SECONDS,
                                 strict=True, lease_duration=LEASE_SECONDS):
                    entered = True
                    yield
                return
            except TimeoutError:
                if entered:
                    raise
                _log_wait(what, _global_holder(), since, level=logging.WARNING)
    finally:
        _holders.remove(what)
        gate.release()


class _ProgressArtifact:
    """Reports (done, total) to a Prefect progress artifact, at most every 5%."""

    def __init__(self, key: str, description: str):
        self.key, self.description = key, description
        self.id = None  # made at the first report: a stage with nothing to do has none
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if self.id is None:
            self.id = create_progress_artifact(0.0, key=self.key, description=self.description)
        if pct - self.last >= 5.0 or done == total:
            update_progress_artifact(self.id, pct)
            self.last = pct


def _stage_run_name() -> str:
    """`generate-en`; `generate-en-2` for shard group 2; `plan-generate-en`, `seal-...`."""
    from prefect.runtime import task_run

    params = task_run.parameters
    label = params["stage"].label()
    step, group = params.get("step", "run"), params.get("group")
    if step in ("plan", "seal"):
        return f"{step}-{label}"
    return label if group is None else f"{label}-{group}"


@task(name="stage", task_run_name=_stage_run_name, **_common)
def stage_task(stage: Stage, data_root: str, step: str = "run", group: int | None = None,
               groups: int = 1, checked: bool = False) -> Any:
    """Run any stage (`croco.stage.run`): with a GPU slot when it uses one, a progress
    artifact for a sharded one (a training: progress and curves artifacts updated as it
    runs, `croco.tasks.training`), its summary line in the log and its table as an
    artifact.

    Returns the stage's result (its output URI; lang -> URI for a stage with one output per
    language). A sharded stage (generate, score) can also run in steps, for shard groups
    on several workers: `step="plan"` fixes what every group must agree on (the
    generation plan; no GPU) and returns its URI; `group` (0-based, of `groups`) writes
    that group's parts (`croco.stage.shard_group`) and returns `{"uri", "parts"}`, so the
    caller can check they still exist (the output is complete only when sealed);
    `step="seal"` marks the output complete once every group is done (no GPU).
    `checked`: the flow has just found the output incomplete, so the first attempt does
    not ask the store again (a retry does: the attempt before may have finished it)."""
    log = get_run_logger()
    label = stage.label()
    if step == "plan":
        uri = stage.prepare(data_root)
        log.info("%s: %d parts planned -> %s", label, stage.n_parts(data_root), uri)
        return uri
    if step == "seal":
        uri = contract.seal(stage, data_root)
        log.info("%s: %s rows -> %s", label, contract.completion_info(uri).get("rows"), uri)
        return uri
    if step != "run":
        raise ValueError(f"step must be run, plan or seal, not {step!r}")
    if group is not None:
        n = stage.n_parts(data_root)
        shards = contract.shard_group(n, group, groups)
        uri = stage.output(data_root)
        if shards:
            t0 = time.perf_counter()
            with gpu_slot(f"{label}-{group}"):
                contract.run(stage, data_root, shards=shards)
            log.info("%s: shards %d..%d of %d in %.1fs -> %s", label, shards.start,
                     shards.stop - 1, n, time.perf_counter() - t0, uri)
        return {"uri": uri, "parts": contract.part_files(stage, data_root, shards)}
    progress = (_ProgressArtifact(label, f"{label} progress")
                if isinstance(stage, contract.ShardedStage) else None)
    if isinstance(stage, stages.Train):
        from croco.tasks.training import TrainingArtifacts

        lang = stage.spec.lang
        progress = TrainingArtifacts(f"{label}-{lang}" if lang else label)
    if checked:
        from prefect.runtime import task_run as current

        checked = (current.run_count or 1) <= 1
    with gpu_slot(label) if stage.uses_gpu() else nullcontext():
        result = contract.run(stage, data_root, progress=progress, checked=checked)
    line = stage.summary(result)
    if line:
        log.info("%s", line)
    table = stage.artifact(result)
    if table is not None:
        from prefect.artifacts import create_table_artifact

        key, description, rows = table
        create_table_artifact(rows, key=key, description=description)
    return result


@task(name="manifest", **DEFAULT_RETRIES)
def manifest_task(data_root: str, run_id: str, config: dict, outputs: RunOutputs[str],
                  wall_seconds: float | None = None) -> str:
    return write_manifest(data_root, run_id, config, outputs, wall_seconds=wall_seconds)


logging.getLogger("croco").setLevel(logging.INFO)


@task(name="heldout-summary", **_common)
def heldout_task(score_uris: dict[str, dict[str, str]], data_root: str, run_id: str) -> str:
    """Per language and model: mean reward and share of answers in the prompt's language."""
    from prefect.artifacts import create_table_artifact

    table = stages.run_heldout_summary(score_uris, data_root, run_id)
    create_table_artifact(storage.read_parquet(table).to_dicts(), key="heldout-comparison",
                          description=f"held-out answers, base vs variants, run {run_id}")
    return table


@task(name="report", **DEFAULT_RETRIES)
def report_task(data_root: str, run_id: str) -> str:
    """Render the run report and publish it as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from croco.evaluation.report import load_run, render

    uri = render(load_run(data_root, run_id), data_root)
    create_markdown_artifact(storage.read_bytes(uri).decode(), key="croco-report",
                             description=f"croco report, run {run_id}")
    return uri


@task(name="publish", **DEFAULT_RETRIES)
def publish_task(data_root: str, run_id: str, dataset: str, models: str | None = None,
                 private: bool = True, license: str = "unknown") -> dict:
    """Publish a finished run on the Hugging Face Hub (`croco.publish`); a markdown
    artifact lists what went where."""
    from prefect.artifacts import create_markdown_artifact

    from croco.publish import load_manifest, publish

    done = publish(load_manifest(data_root, run_id), dataset=dataset, models=models,
                   private=private, license=license, log=get_run_logger().info)
    lines = [f"- dataset `{done.dataset}`: " + ", ".join(
        f"`{name}` {rows} rows" for name, rows in done.configs.items())]
    lines += [f"- model `{repo}`" for repo in done.models]
    create_markdown_artifact("\n".join(lines), key="croco-published",
                             description=f"croco run {run_id} on the Hub")
    return {"dataset": done.dataset, "configs": done.configs, "models": done.models,
            "commits": done.commits}
