"""The `croco-pipeline` flow.

    prompts-{lang} -> generate-{lang} -> score-{lang} --\\
                                                          >-- pair --> train-{variant} ...
    (every configured language, fanned out)           --/              |
                                                                       v
        heldout answers of base and each variant: generate-{lang} -> score-{lang} -> summary

Variants (config `experiments:`): DPO or SFT on the run's pairs, other pairing options
(re-paired from the same scores), off-policy (pairs from `generation_policy`'s samples),
iterative on-policy rounds (round r samples from adapter r-1) and per-language models.
Every stage is a cached task; see tasks/stages.py.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from croco import storage
from croco.config import CrocoConfig
from croco.config_loading import apply_overrides, config_from_dict, load_config
from croco.manifest import RunOutputs
from croco.plan import build_plan
from croco.flows.stages import Stages
from croco.tasks import heldout_task, manifest_task, publish_task, report_task
from croco.tasks.remote import prepare_run


def new_run_id() -> str:
    """A run id: UTC time and a random suffix, e.g. 20261130-141500-3fa2c1."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _flow_run_name() -> str:
    """`croco-<run_id>`, so the UI lists runs by the id their outputs are filed under."""
    from prefect.runtime import flow_run

    return f"croco-{flow_run.parameters.get('run_id') or new_run_id()}"


@flow(name="croco-pipeline", flow_run_name=_flow_run_name)
def croco_pipeline(config: CrocoConfig | None = None, config_file: str | None = None,
                   overrides: list[str] | None = None, stages: list[str] | None = None,
                   run_id: str | None = None) -> dict:
    """Run CroCo for every configured language; returns the run id, the manifest's URI and
    the run's outputs (`croco.manifest.RunOutputs`, URIs), plus the report's URI when the
    evaluation ran and, with `publish.dataset` set, what was published on the Hub
    (`published`).

    The config is `config`, or the YAML file `config_file` (a path relative to the flow's
    working directory, or a URI such as s3://bucket/croco.yaml), with `overrides`
    (`key.path=value`, values parsed as YAML) applied. Neither: the demo config.
    """
    t0 = time.perf_counter()
    log = get_run_logger()
    if config is not None and config_file:
        raise ValueError("give either config or config_file, not both")
    if config is None:
        config = load_config(config_file, overrides or [])
    elif overrides:
        config = config_from_dict(apply_overrides(config.model_dump(mode="json"), overrides),
                                  source="config parameter")
    if not run_id:  # a scheduled or UI run: the id its flow run is named after
        from prefect.runtime import flow_run

        run_id = flow_run.name.removeprefix("croco-")
    run = Stages(config)
    root = run.root
    prepare_run(config.storage_block, config.orchestration.gpu_slots,
                config.orchestration.gpu_limit)
    plan = build_plan(config, stages)  # every stage call of the run, wired once
    if run.deployments:
        log.info("stages on deployments: %s", ", ".join(
            f"{stage} -> {name}" for stage, name in run.deployments.items()))
        if "://" not in root:
            log.warning("data_root %s is a local path: every worker running a stage must "
                        "see it (a shared filesystem); on a cluster use s3://...", root)
    out = RunOutputs[str]()
    out.prompts = run.each(plan.prompts)
    if plan.generate:
        out.generations, out.scores = run.generate_and_score(plan.generate, plan.score)
    if plan.pairs:
        out.pairs = run.one(plan.pairs)
        stats = storage.read_parquet(storage.join(out.pairs, "stats.parquet"))
        create_table_artifact(stats.to_dicts(), key="pair-stats",
                              description=f"per-language pair statistics, run {run_id}")
    for name, variant in plan.variants.items():
        out.variants[name] = run.train(variant)
    if plan.evaluation:
        out.evaluation = run.evaluate(plan.evaluation, run_id)
        out.evaluation.heldout = run.runtime.retrying(heldout_task)(
            out.evaluation.scores, root, run_id)
    manifest_uri = run.runtime.retrying(manifest_task)(
        root, run_id, config.model_dump(mode="json"), out,
        wall_seconds=round(time.perf_counter() - t0, 2))
    log.info("manifest: %s", manifest_uri)
    result = {"run_id": run_id, "manifest": manifest_uri, "outputs": out}
    if out.evaluation is not None:
        result["report"] = run.runtime.retrying(report_task)(root, run_id)
        log.info("report: %s", result["report"])
    hub = config.publish
    if hub.dataset and plan.pairs:
        result["published"] = run.runtime.retrying(publish_task)(
            root, run_id, hub.dataset, models=hub.models, private=hub.private,
            license=hub.license)
    return result
