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
from croco.config import CrocoConfig, apply_overrides, config_from_dict, load_config
from croco.manifest import RunOutputs
from croco.preflight import STAGES
from croco.stages import Prompts
from croco.flows.stages import Stages, resolve
from croco.tasks import manifest_task, report_task
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
    evaluation ran.

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
    wanted = list(stages or STAGES)
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise ValueError(f"stages: unknown {sorted(unknown)}; choose from {list(STAGES)}")
    last = max(STAGES.index(s) for s in wanted)
    if not config.training.enabled:
        last = min(last, STAGES.index("pair"))
    if not run_id:  # a scheduled or UI run: the id its flow run is named after
        from prefect.runtime import flow_run

        run_id = flow_run.name.removeprefix("croco-")
    run = Stages(config)
    root = run.root
    langs = config.languages
    prepare_run(config.storage_block, config.orchestration.gpu_slots,
                config.orchestration.gpu_limit)
    if run.deployments:
        log.info("stages on deployments: %s", ", ".join(
            f"{stage} -> {name}" for stage, name in run.deployments.items()))
        if "://" not in root:
            log.warning("data_root %s is a local path: every worker running a stage must "
                        "see it (a shared filesystem); on a cluster use s3://...", root)
    out = RunOutputs[str]()

    prompt_uris = resolve(run.stage_task, [
        dict(stage=Prompts(cfg=config.prompts, lang=lang), data_root=root) for lang in langs])
    out.prompts = dict(zip(langs, prompt_uris))
    if last >= STAGES.index("generate"):
        out.generations, out.scores = run.generate_and_score(
            prompt_uris, config.policy, score=last >= STAGES.index("score"))
    if last >= STAGES.index("pair"):
        out.pairs = run.pair(out.scores, out.prompts, config.pairing)
        stats = storage.read_parquet(storage.join(out.pairs, "stats.parquet"))
        create_table_artifact(stats.to_dicts(), key="pair-stats",
                              description=f"per-language pair statistics, run {run_id}")
    if last >= STAGES.index("train"):
        for variant in config.experiments:
            out.variants[variant.name] = run.train(variant, prompt_uris, out.scores)
    if last >= STAGES.index("evaluate") and config.evaluation.enabled:
        finals = {name: v.final for name, v in out.variants.items() if v.final}
        out.evaluation = run.evaluate(prompt_uris, finals, run_id)
    manifest_uri = run.runtime.retrying(manifest_task)(
        root, run_id, config.model_dump(mode="json"), out,
        wall_seconds=round(time.perf_counter() - t0, 2))
    log.info("manifest: %s", manifest_uri)
    result = {"run_id": run_id, "manifest": manifest_uri, "outputs": out}
    if out.evaluation is not None:
        result["report"] = run.runtime.retrying(report_task)(root, run_id)
        log.info("report: %s", result["report"])
    return result
