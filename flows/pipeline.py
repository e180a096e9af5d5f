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
from croco.config import CrocoConfig, PairingConfig, PolicyConfig, PromptsConfig, VariantConfig
from croco.stages import STAGE_VERSIONS, adapter_path
from tasks import (
    ensure_gpu_limit,
    generate_task,
    heldout_task,
    judge_task,
    manifest_task,
    report_task,
    reward_check_task,
    pairs_task,
    prompts_task,
    score_task,
    structured_task,
    train_task,
)

STAGES = ("prompts", "generate", "score", "pair", "train", "evaluate")


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


def _generate_and_score(config: CrocoConfig, root: str, prompt_uris: list[str],
                        policy: PolicyConfig, gen=None, prompts_cfg: PromptsConfig | None = None,
                        score: bool = True) -> tuple[dict, dict]:
    langs = config.languages
    gen_uris = _resolve(generate_task, [
        dict(prompts_uri=p, lang=lang, policy=policy, gen=gen or config.generation,
             prompts_cfg=prompts_cfg or config.prompts, data_root=root,
             code_version=STAGE_VERSIONS["generations"])
        for lang, p in zip(langs, prompt_uris)
    ])
    if not score:
        return dict(zip(langs, gen_uris)), {}
    score_uris = _resolve(score_task, [
        dict(generations_uri=g, prompts_uri=p, lang=lang, reward=config.reward,
             data_root=root, code_version=STAGE_VERSIONS["scores"])
        for lang, g, p in zip(langs, gen_uris, prompt_uris)
    ])
    return dict(zip(langs, gen_uris)), dict(zip(langs, score_uris))


def _pair(score_uris: dict, prompt_uris: dict, pairing: PairingConfig, root: str) -> str:
    (uri,) = _resolve(pairs_task, [dict(score_uris=score_uris, prompts_uris=prompt_uris,
                                        pairing=pairing, data_root=root,
                                        code_version=STAGE_VERSIONS["pairs"])])
    return uri


@flow(name="croco-train", flow_run_name="train-{variant.name}")
def croco_train(config: CrocoConfig, variant: VariantConfig, root: str, prompt_uris: list,
                scores: dict) -> dict:
    """One variant of the experiment grid, as its own flow run: its pairs (re-paired,
    off-policy or per round), its training run(s). Returns the URIs it produced, and under
    `final` the training URI whose adapter is evaluated (none for per-language models)."""
    out: dict = {}
    out["final"] = _train_variant(config, variant, root, prompt_uris, scores, out)
    return out


def _train_variant(config: CrocoConfig, variant: VariantConfig, root: str, prompt_uris: list,
                   scores: dict, out: dict) -> str | None:
    """Run one variant (all its rounds); returns its final training URI (None if per-language
    models were trained: those are listed in `out`)."""
    pairing = config.variant_pairing(variant)
    training = config.variant_training(variant)
    prompts_by_lang = dict(zip(config.languages, prompt_uris))
    if variant.generation_policy:
        gen_policy = PolicyConfig(model=variant.generation_policy, device=config.policy.device)
        _, scores = _generate_and_score(config, root, prompt_uris, gen_policy)
        out[f"scores:{variant.name}"] = scores
    policy = config.policy
    last = None
    for rnd in range(1, variant.rounds + 1):
        if rnd > 1:
            # Round r samples from the policy with adapter r-1: new on-policy data.
            policy = config.policy.model_copy(update={"adapter": adapter_path(last)})
            _, scores = _generate_and_score(config, root, prompt_uris, policy)
            out[f"scores:{variant.name}:round{rnd}"] = scores
        pairs_uri = _pair(scores, prompts_by_lang, pairing, root)
        out.setdefault("pairs", {})[f"{variant.name}:round{rnd}" if variant.rounds > 1
                                    else variant.name] = pairs_uri
        common = dict(pairs_uri=pairs_uri, variant_name=variant.name, method=variant.method,
                      policy=policy, training=training, data_root=root,
                      code_version=STAGE_VERSIONS["training"],
                      generation_policy=variant.generation_policy)
        if variant.method == "online_dpo":
            common.update(reward=config.reward, prompts_uris=prompts_by_lang,
                          prompts_cfg=config.prompts,
                          max_new_tokens=config.generation.max_new_tokens)
        if variant.per_language:
            uris = _resolve(train_task, [dict(common, lang=lang) for lang in config.languages])
            for lang, u in zip(config.languages, uris):
                out.setdefault("training", {})[f"{variant.name}:{lang}"] = u
            return None
        (last,) = _resolve(train_task, [common])
        name = f"{variant.name}:round{rnd}" if variant.rounds > 1 else variant.name
        out.setdefault("training", {})[name] = last
    return last


@flow(name="croco-pipeline")
def croco_pipeline(config: CrocoConfig, stages: list[str] | None = None,
                   run_id: str | None = None) -> dict:
    """Run CroCo for every configured language and return the stage URIs."""
    t0 = time.perf_counter()
    log = get_run_logger()
    wanted = list(stages or STAGES)
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise ValueError(f"stages: unknown {sorted(unknown)}; choose from {list(STAGES)}")
    last = max(STAGES.index(s) for s in wanted)
    if not config.training.enabled:
        last = min(last, STAGES.index("pair"))
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
    if last >= STAGES.index("generate"):
        gens, scores = _generate_and_score(config, root, prompt_uris, config.policy,
                                           score=last >= STAGES.index("score"))
        out["generations"] = gens
        if scores:
            out["scores"] = scores
    if last >= STAGES.index("pair"):
        pairs_uri = _pair(out["scores"], out["prompts"], config.pairing, root)
        out["pairs"] = {"all": pairs_uri}
        stats = storage.read_parquet(storage.join(pairs_uri, "stats.parquet"))
        create_table_artifact(stats.to_dicts(), key="pair-stats",
                              description=f"per-language pair statistics, run {run_id}")
    finals: dict[str, str] = {}
    if last >= STAGES.index("train"):
        for variant in config.experiments:
            produced = croco_train(config, variant, root, prompt_uris, out["scores"])
            final = produced.pop("final")
            for stage, entries in produced.items():
                if isinstance(entries, dict) and stage in ("pairs", "training"):
                    out.setdefault(stage, {}).update(entries)
                else:
                    out[stage] = entries
            if final:
                finals[variant.name] = final
    if last >= STAGES.index("evaluate") and config.evaluation.enabled:
        ev = config.evaluation
        eval_prompts = config.prompts.model_copy(update={"split": ev.split, "limit": ev.limit})
        # One shard per language: held-out sets are small, and one batch decodes fastest.
        eval_gen = config.generation.model_copy(update={
            "k": ev.k, "temperature": ev.temperature, "shard_size": 256,
            "max_new_tokens": ev.max_new_tokens or config.generation.max_new_tokens})
        eval_scores = {}
        models = {"base": config.policy}
        models.update({name: config.policy.model_copy(update={"adapter": adapter_path(uri)})
                       for name, uri in finals.items()})
        for name, policy in models.items():
            gens, scores = _generate_and_score(config, root, prompt_uris, policy, gen=eval_gen,
                                               prompts_cfg=eval_prompts)
            eval_scores[name] = scores
            out[f"eval-scores:{name}"] = scores
        out["heldout"] = {"all": heldout_task(eval_scores, root, run_id,
                                              STAGE_VERSIONS["scores"])}
        if ev.reward_check:
            (out.setdefault("reward_check", {})["all"],) = _resolve(reward_check_task, [
                dict(path=ev.reward_check, reward=config.reward, langs=langs, data_root=root,
                     code_version=STAGE_VERSIONS["reward_check"])])
        st = ev.structured
        if st.enabled and (st.local_mc or st.tasks or st.backend == "euroeval"):
            done = _resolve(structured_task, [
                dict(policy=policy, structured=st, langs=langs, data_root=root, model_name=name,
                     code_version=STAGE_VERSIONS["structured"])
                for name, policy in models.items()
            ])
            out["structured"] = dict(zip(models, done))
        if ev.judge.enabled and finals:
            judged = _resolve(judge_task, [
                dict(candidate_scores=eval_scores[name], baseline_scores=eval_scores["base"],
                     prompts_uris=out["prompts"], judge=ev.judge, data_root=root,
                     variant_name=name, code_version=STAGE_VERSIONS["judgments"])
                for name in finals
            ])
            out["judgments"] = dict(zip(finals, judged))
    manifest_uri = manifest_task(root, run_id, config.model_dump(mode="json"), out,
                                 wall_seconds=round(time.perf_counter() - t0, 2))
    log.info("manifest: %s", manifest_uri)
    result = {"run_id": run_id, "manifest": manifest_uri, "stages": out}
    if "heldout" in out:
        result["report"] = report_task(root, run_id)
        log.info("report: %s", result["report"])
    return result
