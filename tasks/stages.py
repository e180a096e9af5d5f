"""Prefect tasks around the library stages.

Caching: `StageInputs + TASK_SOURCE`: the task's inputs as stage identities
(`croco.identity`: config objects without their execution-only settings, inputs named by
a path by their content), with the stage's code version (`croco.stages.STAGE_VERSIONS`)
among them. So an unchanged rerun is served from Prefect's cache, a changed batch size or
device reruns nothing, an edited prompt file or retrained local model folder reruns what
depends on it, a changed pairing config re-pairs only, and a new language runs only that
language.
The library stage also skips any output that is already complete, so a deleted cache or a
crash never redoes finished work. Retries (with backoff) are for transient errors only:
I/O, network, object storage; bad input fails at once.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from croco import stages, storage
from croco.config import (
    GenerationConfig,
    JudgeEvalConfig,
    PairingConfig,
    PolicyConfig,
    PromptsConfig,
    RewardConfig,
    StructuredEvalConfig,
)
from croco.errors import UserError
from croco.identity import identity, path_identity
from croco.manifest import RunOutputs, write_manifest
from croco.training.spec import TrainSpec


@dataclass
class StageInputs(CachePolicy):
    """Prefect's input cache policy with every input taken by its stage identity; the
    plain-string parameters named in `path_inputs` name files, taken by their content
    (`croco.identity.path_identity`). Not a subclass of Prefect's `Inputs`, which a
    compound policy would replace by a plain one."""

    path_inputs: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        if not inputs:
            return None
        return hash_objects({k: path_identity(v) if k in self.path_inputs else identity(v)
                             for k, v in inputs.items()}, raise_on_failure=True)


STAGE_CACHE = StageInputs() + TASK_SOURCE
GPU_LIMIT = "gpu"

_TRANSIENT = (OSError, ConnectionError, TimeoutError)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, ValueError, TypeError, KeyError)):
        return False  # retrying cannot fix bad input
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


_common = dict(
    cache_policy=STAGE_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=retry_transient,
)


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
        self.id = create_progress_artifact(0.0, key=key, description=description)
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if pct - self.last >= 5.0 or done == total:
            update_progress_artifact(self.id, pct)
            self.last = pct


@task(name="prompts", task_run_name="prompts-{lang}", **_common)
def prompts_task(cfg: PromptsConfig, lang: str, data_root: str, code_version: int) -> str:
    """One language's prompts; an edited prompt file is a new input (`cfg.path` enters
    the cache key by its content)."""
    with gpu_slot(f"prompts-{lang}") if cfg.translate else nullcontext():
        return stages.run_prompts(cfg, lang, data_root)


@task(name="generate", task_run_name="generate-{lang}", **_common)
def generate_task(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                  prompts_cfg: PromptsConfig, data_root: str, code_version: int) -> str:
    log = get_run_logger()
    progress = _ProgressArtifact(f"generate-{lang}", f"generation progress, {lang}")
    with gpu_slot(f"generate-{lang}"):
        uri = stages.run_generate(prompts_uri, lang, policy, gen, prompts_cfg, data_root,
                                  progress=progress)
    info = stages.completion_info(uri)
    log.info("%s samples for %s (%s sampled now, the others from the sample store) in %ss -> %s",
             info.get("rows"), lang, info.get("generated_rows"), info.get("seconds"), uri)
    return uri


@task(name="score", task_run_name="score-{lang}", **_common)
def score_task(generations_uri: str, prompts_uri: str, lang: str, reward: RewardConfig,
               data_root: str, code_version: int) -> str:
    log = get_run_logger()
    with gpu_slot(f"score-{lang}"):
        uri = stages.run_score(generations_uri, prompts_uri, lang, reward, data_root)
    info = stages.completion_info(uri)
    log.info("scored %s samples for %s in %ss -> %s", info.get("rows"), lang,
             info.get("seconds"), uri)
    return uri


def _group_result(uri: str, parts: list[str]) -> dict:
    """What a shard group returns: the stage output it writes into and its shard files, so
    the caller can check they still exist (the output itself is complete only when sealed)."""
    return {"uri": uri, "parts": parts}


@task(name="generate-group", task_run_name="generate-{lang}-{group}", **_common)
def generate_group_task(prompts_uri: str, lang: str, policy: PolicyConfig,
                        gen: GenerationConfig, prompts_cfg: PromptsConfig, data_root: str,
                        code_version: int, group: int, groups: int) -> dict:
    """Shard group `group` of `groups` of one language's generation (contiguous shard
    indices, `croco.stages.shard_group`), written into the language's output;
    `seal_generate_task` completes it. Returns `{"uri", "parts"}`."""
    n_shards = stages.generation_shard_count(prompts_uri, lang, policy, gen, prompts_cfg,
                                             data_root)
    shards = stages.shard_group(n_shards, group, groups)
    uri = stages.generation_uri(prompts_uri, lang, policy, gen, prompts_cfg, data_root)
    if shards:
        t0 = time.perf_counter()
        with gpu_slot(f"generate-{lang}-{group}"):
            uri = stages.run_generate(prompts_uri, lang, policy, gen, prompts_cfg, data_root,
                                      shards=shards)
        get_run_logger().info("generated shards %d..%d of %d for %s in %.1fs -> %s",
                              shards.start, shards.stop - 1, n_shards, lang,
                              time.perf_counter() - t0, uri)
    return _group_result(uri, [stages.part_name(i) for i in shards])


@task(name="plan-generate", task_run_name="plan-generate-{lang}", **_common)
def plan_generate_task(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                       prompts_cfg: PromptsConfig, data_root: str, code_version: int) -> str:
    """Fix which stored shard each part of one language's generations comes from, before
    its shard groups start (no GPU; `croco.stages.generation_plan`). Returns the plan's URI."""
    plan = stages.generation_plan(prompts_uri, lang, policy, gen, prompts_cfg, data_root)
    get_run_logger().info("%s: %d parts from the sample store %s", lang, len(plan["parts"]),
                          plan["store"])
    return stages.plan_uri(stages.generation_uri(prompts_uri, lang, policy, gen, prompts_cfg,
                                                 data_root))


@task(name="seal-generate", task_run_name="seal-generate-{lang}", **_common)
def seal_generate_task(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                       prompts_cfg: PromptsConfig, data_root: str, code_version: int) -> str:
    """Mark one language's generations complete after its shard groups (no GPU)."""
    uri = stages.seal_generations(prompts_uri, lang, policy, gen, prompts_cfg, data_root)
    get_run_logger().info("%s samples for %s -> %s", stages.completion_info(uri).get("rows"),
                          lang, uri)
    return uri


@task(name="score-group", task_run_name="score-{lang}-{group}", **_common)
def score_group_task(generations_uri: str, prompts_uri: str, lang: str, reward: RewardConfig,
                     data_root: str, code_version: int, group: int, groups: int) -> dict:
    """Shard group `group` of `groups` of one language's scoring (the generation shards at
    those positions); `seal_score_task` completes it. Returns `{"uri", "parts"}`."""
    parts = stages.generation_parts(generations_uri)
    shards = stages.shard_group(len(parts), group, groups)
    uri = stages.score_uri(generations_uri, lang, reward, data_root)
    if shards:
        t0 = time.perf_counter()
        with gpu_slot(f"score-{lang}-{group}"):
            uri = stages.run_score(generations_uri, prompts_uri, lang, reward, data_root,
                                   shards=shards)
        get_run_logger().info("scored shards %d..%d of %d for %s in %.1fs -> %s",
                              shards.start, shards.stop - 1, len(parts), lang,
                              time.perf_counter() - t0, uri)
    return _group_result(uri, parts[shards.start:shards.stop])


@task(name="seal-score", task_run_name="seal-score-{lang}", **_common)
def seal_score_task(generations_uri: str, prompts_uri: str, lang: str, reward: RewardConfig,
                    data_root: str, code_version: int) -> str:
    """Mark one language's scores complete after its shard groups (no GPU)."""
    uri = stages.seal_scores(generations_uri, lang, reward, data_root)
    get_run_logger().info("%s scored samples for %s -> %s",
                          stages.completion_info(uri).get("rows"), lang, uri)
    return uri


@task(name="generate-languages", task_run_name="generate-{model_name}", **_common)
def generate_languages_task(prompts_uris: dict[str, str], policy: PolicyConfig,
                            gen: GenerationConfig, prompts_cfg: PromptsConfig, data_root: str,
                            model_name: str, code_version: int) -> dict[str, str]:
    """Held-out answers of one model, every language in one batched pass."""
    with gpu_slot(f"generate-{model_name}"):
        return stages.run_generate_languages(prompts_uris, policy, gen, prompts_cfg, data_root)


@task(name="score-languages", task_run_name="score-{model_name}", **_common)
def score_languages_task(generations_uris: dict[str, str], prompts_uris: dict[str, str],
                         reward: RewardConfig, data_root: str, model_name: str,
                         code_version: int) -> dict[str, str]:
    """Rewards of one model's held-out answers, every language together."""
    with gpu_slot(f"score-{model_name}"):
        return stages.run_score_languages(generations_uris, prompts_uris, reward, data_root)


@task(name="pair", task_run_name="pair-{pairing.scope}", **_common)
def pairs_task(score_uris: dict[str, str], prompts_uris: dict[str, str], pairing: PairingConfig,
               data_root: str, code_version: int) -> str:
    uri = stages.run_pairs(score_uris, prompts_uris, pairing, data_root)
    info = stages.completion_info(uri)
    get_run_logger().info("%s pairs (%s pools skipped) -> %s", info.get("rows"),
                          info.get("skipped"), uri)
    return uri


@task(name="manifest", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=retry_transient)
def manifest_task(data_root: str, run_id: str, config: dict, outputs: RunOutputs[str],
                  wall_seconds: float | None = None) -> str:
    return write_manifest(data_root, run_id, config, outputs, wall_seconds=wall_seconds)


logging.getLogger("croco").setLevel(logging.INFO)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@task(name="train", task_run_name="train-{spec.variant_name}", **_common)
def train_task(spec: TrainSpec, code_version: int) -> str:
    """One training run (`croco.training.run.run_train`); on a machine with several GPUs,
    DPO and SFT train data parallel on all of them."""
    from prefect.artifacts import create_table_artifact

    from croco.training.run import run_train

    log = get_run_logger()
    n_gpus = _gpu_count()
    variant_name, lang = spec.variant_name, spec.lang
    with gpu_slot(f"train-{variant_name}"):
        if n_gpus > 1 and spec.method in ("dpo", "sft"):
            # Every GPU of this machine, data parallel, through accelerate.
            from croco.training.launch import run_train_distributed

            log.info("training %s on %d GPUs with accelerate", variant_name, n_gpus)
            uri = run_train_distributed(n_gpus, spec)
        else:
            uri = run_train(spec)
    metrics = storage.read_json(storage.join(uri, "metrics.json"))
    keys = ["method", "pairs_train", "rows_train", "steps", "first_loss", "final_loss",
            "rewards/accuracies", "rewards/margins", "eval_loss", "tokens_per_second",
            "ref_logps", "ref_forward_batches", "off_policy", "train_runtime", "pairs_generated"]
    create_table_artifact([{"metric": k, "value": str(metrics.get(k))} for k in keys
                           if k in metrics],
                          key=f"train-metrics-{variant_name}{'-' + lang if lang else ''}",
                          description=f"training metrics, variant {variant_name}")
    log.info("trained %s: loss %s -> %s -> %s", variant_name, metrics.get("first_loss"),
             metrics.get("final_loss"), uri)
    return uri


@task(name="heldout-summary", **_common)
def heldout_task(score_uris: dict[str, dict[str, str]], data_root: str, run_id: str,
                 code_version: int) -> str:
    """Per language and model: mean reward and share of answers in the prompt's language."""
    from prefect.artifacts import create_table_artifact

    table = stages.run_heldout_summary(score_uris, data_root, run_id)
    create_table_artifact(storage.read_parquet(table).to_dicts(), key="heldout-comparison",
                          description=f"held-out answers, base vs variants, run {run_id}")
    return table


@task(name="judge", task_run_name="judge-{variant_name}", **_common)
def judge_task(candidate_scores: dict[str, str], baseline_scores: dict[str, str],
               prompts_uris: dict[str, str], judge: JudgeEvalConfig, data_root: str,
               variant_name: str, code_version: int) -> str:
    from prefect.artifacts import create_table_artifact

    with gpu_slot(f"judge-{variant_name}"):
        uri = stages.run_judge(candidate_scores, baseline_scores, prompts_uris, judge, data_root)
    rates = storage.read_parquet(storage.join(uri, "win_rates.parquet"))
    create_table_artifact(rates.to_dicts(), key=f"win-rates-{variant_name}",
                          description=f"win rate of {variant_name} against the base, per language")
    return uri


@task(name="report", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=retry_transient)
def report_task(data_root: str, run_id: str) -> str:
    """Render the run report and publish it as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from croco.evaluation.report import load_run, render

    uri = render(load_run(data_root, run_id), data_root)
    create_markdown_artifact(storage.read_bytes(uri).decode(), key="croco-report",
                             description=f"croco report, run {run_id}")
    return uri


@task(name="structured", task_run_name="structured-{model_name}", **_common)
def structured_task(policy: PolicyConfig, structured: StructuredEvalConfig, langs: list[str],
                    data_root: str, model_name: str, code_version: int) -> str:
    from prefect.artifacts import create_table_artifact

    with gpu_slot(f"structured-{model_name}"):
        uri = stages.run_structured(policy, structured, langs, data_root)
    results = storage.read_parquet(storage.join(uri, "results.parquet"))
    create_table_artifact(results.to_dicts(), key=f"structured-{model_name}",
                          description=f"structured task scores per language, {model_name}")
    return uri


@task(name="reward-check",
      **dict(_common, cache_policy=StageInputs(path_inputs=("path",)) + TASK_SOURCE))
def reward_check_task(path: str, reward: RewardConfig, langs: list[str], data_root: str,
                      code_version: int) -> str:
    """The reward's ranking accuracy on the preference set `path` (an edited set is a new
    input to the cache: `path` enters its key by content)."""
    from prefect.artifacts import create_table_artifact

    with gpu_slot("reward-check"):
        uri = stages.run_reward_check(path, reward, langs, data_root)
    create_table_artifact(storage.read_parquet(storage.join(uri, "accuracy.parquet")).to_dicts(),
                          key="reward-check", description="reward ranking accuracy per language")
    return uri
