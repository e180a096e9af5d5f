"""The `croco-pipeline` flow: prompts -> generate -> score -> pair, one task per language.

    prompts-{lang} -> generate-{lang} -> score-{lang} --\\
                                                          >-- pair -> manifest
    (every configured language, fanned out)           --/
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from croco import storage
from croco.config import CrocoConfig
from croco.stages import STAGE_VERSIONS
from tasks import ensure_gpu_limit, generate_task, manifest_task, pairs_task, prompts_task, score_task

STAGES = ("prompts", "generate", "score", "pair")


def _resolve(task, calls: list[dict]) -> list[str]:
    """Submit one task run per kwargs, wait, and rerun (bypassing Prefect's cache) any whose
    cached output has since disappeared from storage."""
    futures = [task.submit(**kw) for kw in calls]
    uris = [f.result() for f in futures]
    stale = [i for i, u in enumerate(uris) if not storage.is_complete(u)]
    if stale:
        fresh = task.with_options(refresh_cache=True)
        redo = [fresh.submit(**calls[i]) for i in stale]
        for i, f in zip(stale, redo):
            uris[i] = f.result()
    return uris


@flow(name="croco-pipeline", log_prints=True)
def croco_pipeline(config: CrocoConfig, stages: list[str] | None = None,
                   run_id: str | None = None) -> dict:
    """Run CroCo's data stages for every configured language and return the stage URIs."""
    t0 = time.perf_counter()
    log = get_run_logger()
    wanted = list(stages or STAGES)
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise ValueError(f"stages: unknown {sorted(unknown)}; choose from {list(STAGES)}")
    last = max(STAGES.index(s) for s in wanted)
    run_id = run_id or f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    root = storage.normalize_root(config.data_root)
    langs = config.languages
    ensure_gpu_limit(config.orchestration.gpu_slots)
    out: dict[str, dict[str, str]] = {}

    prompt_uris = _resolve(prompts_task, [
        dict(cfg=config.prompts, lang=lang, data_root=root,
             code_version=STAGE_VERSIONS["prompts"]) for lang in langs
    ])
    out["prompts"] = dict(zip(langs, prompt_uris))
    if last >= 1:
        gen_uris = _resolve(generate_task, [
            dict(prompts_uri=p, lang=lang, policy=config.policy, gen=config.generation,
                 prompts_cfg=config.prompts, data_root=root,
                 code_version=STAGE_VERSIONS["generations"])
            for lang, p in zip(langs, prompt_uris)
        ])
        out["generations"] = dict(zip(langs, gen_uris))
    if last >= 2:
        score_uris = _resolve(score_task, [
            dict(generations_uri=g, prompts_uri=p, lang=lang, reward=config.reward,
                 data_root=root, code_version=STAGE_VERSIONS["scores"])
            for lang, g, p in zip(langs, gen_uris, prompt_uris)
        ])
        out["scores"] = dict(zip(langs, score_uris))
    if last >= 3:
        (pairs_uri,) = _resolve(pairs_task, [
            dict(score_uris=out["scores"], prompts_uris=out["prompts"], pairing=config.pairing,
                 data_root=root, code_version=STAGE_VERSIONS["pairs"])
        ])
        out["pairs"] = {"all": pairs_uri}
        stats = storage.read_parquet(storage.join(pairs_uri, "stats.parquet"))
        create_table_artifact(
            stats.to_dicts(), key="pair-stats",
            description=f"per-language pair statistics, run {run_id}",
        )
    manifest_uri = manifest_task(root, run_id, config.model_dump(mode="json"), out,
                                 wall_seconds=round(time.perf_counter() - t0, 2))
    log.info("manifest: %s", manifest_uri)
    return {"run_id": run_id, "manifest": manifest_uri, "stages": out}
