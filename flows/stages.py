"""The GPU stages as flows of their own, so each can be deployed on a GPU work pool:

    croco-generate   one language's samples                 (one flow run per language, or
                                                             per shard group of a language)
    croco-score      one language's rewards                 (likewise)
    croco-train      one variant of the experiment grid     (one flow run per variant)
    croco-evaluate   held-out answers, judge, checks        (one flow run per pipeline run)

The pipeline calls them through `Stages`: as cached tasks and subflows in its own process,
or, for the stages named in `orchestration.deployments`, as flow runs of those deployments
(`croco.tasks.remote.trigger_task`). The code that runs is the same either way; inside a stage's
flow run every stage runs in that process, so a GPU worker never waits on another one.
Stage flows persist their (small, JSON) return values so the pipeline can read them.

With `orchestration.shards_per_language` = n > 1, each language's generate and score run as
n shard groups (tasks or flow runs, `generate-{lang}-{group}`) writing into the language's
one output, then a cheap seal task in the pipeline marks it complete, so every later stage
still gets one URI per language.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from croco import storage
from croco.config import (
    CrocoConfig,
    GenerationConfig,
    OrchestrationConfig,
    PairingConfig,
    PolicyConfig,
    PromptsConfig,
    RewardConfig,
    VariantConfig,
    stable_hash,
)
from croco.identity import identity
from croco.manifest import EvaluationOutputs, RoundOutputs, VariantOutputs
from croco.stage import ShardedStage, Stage
from croco.stages import (
    Generate,
    GenerateLanguages,
    Judge,
    Pairs,
    RewardCheck,
    Score,
    ScoreLanguages,
    Structured,
    Train,
)
from croco.training.run import adapter_path
from croco.training.spec import variant_spec
from croco.tasks import heldout_task, stage_task
from croco.tasks.remote import prepare_run, trigger_task
from croco.tasks.stages import with_retries
from croco.flows.engine import adjust_prefect

adjust_prefect()  # flow runs end without waiting on their heartbeat thread

_persist = dict(persist_result=True, result_serializer="json")


class Runtime(BaseModel):
    """What a stage's flow run needs besides its inputs."""

    data_root: str
    storage_block: str | None = None
    gpu_slots: int = 1
    gpu_limit: str = "auto"
    retries: int = OrchestrationConfig().retries
    retry_delay_seconds: float = OrchestrationConfig().retry_delay_seconds

    @classmethod
    def of(cls, config: CrocoConfig) -> "Runtime":
        orch = config.orchestration
        return cls(data_root=storage.normalize_root(config.data_root),
                   storage_block=config.storage_block, gpu_slots=orch.gpu_slots,
                   gpu_limit=orch.gpu_limit, retries=orch.retries,
                   retry_delay_seconds=orch.retry_delay_seconds)

    def retrying(self, task):
        """`task` with this run's retry settings (`orchestration.retries`, ...)."""
        return with_retries(task, self.retries, self.retry_delay_seconds)


def _complete(result: Any) -> bool:
    """Every stage output a result names still exists (a `_SUCCESS`-marked directory)."""
    if isinstance(result, str):
        return storage.is_complete(result)
    if isinstance(result, dict):
        return all(_complete(v) for v in result.values() if v is not None)
    if isinstance(result, list):
        return all(_complete(v) for v in result)
    return True


def _parts_written(result: dict) -> bool:
    """A shard group's files (`{"uri", "parts"}`) all still exist in its stage output."""
    return all(storage.exists(storage.join(result["uri"], p)) for p in result["parts"])


def resolve(task, calls: list[dict], complete=_complete) -> list:
    """Submit one task run per kwargs, wait, and rerun (bypassing Prefect's cache) any whose
    cached output has since disappeared from storage (`complete(result)` is False)."""
    (results,) = resolve_together([(task, calls)], complete)
    return results


def resolve_together(work: list[tuple[Any, list[dict]]], complete=_complete) -> list[list]:
    """`resolve` for several tasks that do not depend on each other: every call is submitted
    before any is waited on (a cached rerun looks them up at once; GPU work still takes
    turns through the GPU slots). Returns one result list per (task, calls)."""
    futures = [[task.submit(**kw) for kw in calls] for task, calls in work]
    out = []
    for (task, calls), futs in zip(work, futures):
        results = [f.result() for f in futs]
        stale = [i for i, r in enumerate(results) if not complete(r)]
        if stale:
            fresh = task.with_options(refresh_cache=True)
            redo = [fresh.submit(**calls[i]) for i in stale]
            for i, f in zip(stale, redo):
                results[i] = f.result()
        out.append(results)
    return out


def _jsonable(params: dict) -> dict:
    return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
            for k, v in params.items()}


class Stages:
    """Runs stages for one pipeline run: locally, or on the configured deployments."""

    def __init__(self, config: CrocoConfig, *, local: bool = False):
        self.config = config
        self.runtime = Runtime.of(config)
        orch = config.orchestration
        self.deployments = {} if local else dict(orch.deployments)
        self.timeout = orch.deployment_timeout
        self.stage_task = self.runtime.retrying(stage_task)
        self.trigger_task = self.runtime.retrying(trigger_task)

    @property
    def root(self) -> str:
        return self.runtime.data_root

    def _remote(self, stage: str, calls: list[dict], labels: list[str],
                cached: bool = True, complete=_complete) -> list:
        triggers = [dict(deployment=self.deployments[stage], label=label, timeout=self.timeout,
                         parameters=_jsonable(dict(call, runtime=self.runtime)),
                         identity=stable_hash({"call": identity(call), "root": self.root}))
                    for call, label in zip(calls, labels)]
        if cached:
            return resolve(self.trigger_task, triggers, complete)
        uncached = self.trigger_task.with_options(cache_policy=NO_CACHE)
        return [f.result() for f in [uncached.submit(**t) for t in triggers]]

    def _per_language(self, stage: str, work: list[ShardedStage]) -> list[str]:
        """One sharded stage (generate or score) for every language: one task or flow run
        per language, or, with `shards_per_language` n > 1, a plan per language (if the
        stage has one), n shard groups per language, then a seal per language. Returns one
        output URI per stage."""
        root = self.root
        n = self.config.orchestration.shards_per_language
        remote = stage in self.deployments
        if n == 1:
            if remote:
                return self._remote(stage, [_call(s, root) for s in work],
                                    [s.label() for s in work])
            return resolve(self.stage_task, [dict(stage=s, data_root=root) for s in work])
        if any(s.planned for s in work):  # every group must number the parts alike
            resolve(self.stage_task, [dict(stage=s, data_root=root, step="plan") for s in work],
                    complete=storage.exists)
        if remote:
            self._remote(stage, [dict(_call(s, root), group=g, groups=n)
                                 for s in work for g in range(n)],
                         [f"{s.label()}-{g}" for s in work for g in range(n)],
                         complete=_parts_written)
        else:
            resolve(self.stage_task, [dict(stage=s, data_root=root, group=g, groups=n)
                                 for s in work for g in range(n)], complete=_parts_written)
        return resolve(self.stage_task, [dict(stage=s, data_root=root, step="seal") for s in work])

    def generate_and_score(self, prompt_uris: list[str],
                           policy: PolicyConfig | dict[str, PolicyConfig],
                           gen: GenerationConfig | None = None,
                           prompts_cfg: PromptsConfig | None = None,
                           score: bool = True) -> tuple[dict, dict]:
        """Sample and score every language; `policy` is one model for all of them, or
        lang -> model (the rounds of per-language models)."""
        config = self.config
        langs = config.languages
        policies = policy if isinstance(policy, dict) else {lang: policy for lang in langs}
        gen_uris = self._per_language("generate", [
            Generate(prompts_uri=p, lang=lang, policy=policies[lang],
                     gen=gen or config.generation, prompts_cfg=prompts_cfg or config.prompts)
            for lang, p in zip(langs, prompt_uris)])
        if not score:
            return dict(zip(langs, gen_uris)), {}
        score_uris = self._per_language("score", [
            Score(generations_uri=g, prompts_uri=p, lang=lang, reward=config.reward)
            for lang, g, p in zip(langs, gen_uris, prompt_uris)])
        return dict(zip(langs, gen_uris)), dict(zip(langs, score_uris))

    def pair(self, score_uris: dict, prompt_uris: dict, pairing: PairingConfig) -> str:
        (uri,) = resolve(self.stage_task, [dict(stage=Pairs(
            score_uris=score_uris, prompts_uris=prompt_uris, pairing=pairing),
            data_root=self.root)])
        return uri

    def train(self, variant: VariantConfig, prompt_uris: list,
              scores: dict) -> VariantOutputs[str]:
        """One variant: a `croco-train` subflow, or a flow run of the train deployment."""
        if "train" in self.deployments:
            (out,) = self._remote("train", [dict(config=self.config, variant=variant,
                                                 prompt_uris=prompt_uris, scores=scores)],
                                  [f"train-{variant.name}"])
        else:
            out = croco_train(config=self.config, variant=variant, prompt_uris=prompt_uris,
                              scores=scores, runtime=self.runtime)
        return VariantOutputs[str].model_validate(out)

    def evaluate(self, prompt_uris: list, finals: dict, run_id: str) -> EvaluationOutputs[str]:
        if "evaluate" in self.deployments:
            (out,) = self._remote("evaluate", [dict(config=self.config, prompt_uris=prompt_uris,
                                                    finals=finals, run_id=run_id)],
                                  [f"evaluate-{run_id}"], cached=False)
        else:
            out = croco_evaluate(config=self.config, prompt_uris=prompt_uris, finals=finals,
                                 run_id=run_id, runtime=self.runtime)
        return EvaluationOutputs[str].model_validate(out)


# ---------------------------------------------------------------------------------------------
# Stage flows. `runtime` is filled by the pipeline; a run started by hand may leave it out
# and gets local storage credentials from the environment and one GPU slot.


def _runtime(runtime: Runtime | None, data_root: str) -> Runtime:
    runtime = runtime or Runtime(data_root=data_root)
    prepare_run(runtime.storage_block, runtime.gpu_slots, runtime.gpu_limit)
    return runtime


def _stage_run_name(stage: str):
    """`generate-en`, or `generate-en-2` for shard group 2 of a language."""
    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters
        group = params.get("group")
        return f"{stage}-{params.get('lang')}" + ("" if group is None else f"-{group}")

    return name


def _call(stage: Stage, data_root: str) -> dict:
    """A stage's fields (and the data root) as the parameters of its stage flow."""
    return {name: getattr(stage, name) for name in type(stage).model_fields} | {
        "data_root": data_root}


def _one(stage: ShardedStage, runtime: Runtime, data_root: str, group: int | None,
         groups: int) -> str | dict:
    task = runtime.retrying(stage_task)
    if group is None:
        (uri,) = resolve(task, [dict(stage=stage, data_root=data_root)])
        return uri
    (done,) = resolve(task, [dict(stage=stage, data_root=data_root, group=group,
                                  groups=groups)], complete=_parts_written)
    return done


@flow(name="croco-generate", flow_run_name=_stage_run_name("generate"), **_persist)
def croco_generate(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                   prompts_cfg: PromptsConfig, data_root: str, runtime: Runtime | None = None,
                   group: int | None = None, groups: int = 1) -> str | dict:
    """Sample `gen.k` answers per prompt of one language (the generations table). With
    `group` (0-based, of `groups`): only that shard group's shards, returning `{"uri",
    "parts"}`; the pipeline seals the language's output once every group is done."""
    runtime = _runtime(runtime, data_root)
    return _one(Generate(prompts_uri=prompts_uri, lang=lang, policy=policy, gen=gen,
                         prompts_cfg=prompts_cfg), runtime, data_root, group, groups)


@flow(name="croco-score", flow_run_name=_stage_run_name("score"), **_persist)
def croco_score(generations_uri: str, prompts_uri: str, lang: str, reward: RewardConfig,
                data_root: str, runtime: Runtime | None = None,
                group: int | None = None, groups: int = 1) -> str | dict:
    """Score one language's generations with the configured reward scorers; `group` as in
    `croco_generate` (the generation shards at those positions)."""
    runtime = _runtime(runtime, data_root)
    return _one(Score(generations_uri=generations_uri, prompts_uri=prompts_uri, lang=lang,
                      reward=reward), runtime, data_root, group, groups)


@flow(name="croco-train", flow_run_name="train-{variant.name}", **_persist)
def croco_train(config: CrocoConfig, variant: VariantConfig, prompt_uris: list, scores: dict,
                runtime: Runtime | None = None) -> dict:
    """One variant of the experiment grid: its pairs (re-paired, off-policy or per round) and
    its training run(s). Returns its `VariantOutputs` (URIs) as JSON."""
    _runtime(runtime, config.data_root)
    stages = Stages(config, local=True)
    return _train_variant(stages, variant, prompt_uris, scores).model_dump(mode="json")


def _train_variant(stages: Stages, variant: VariantConfig, prompt_uris: list,
                   scores: dict) -> VariantOutputs[str]:
    """The variant's training runs, round by round: round r starts from adapter r-1. DPO and
    SFT train on pairs from the round's scores (round r > 1 samples, scores and pairs anew
    from adapter r-1); online DPO samples its own pairs while it trains, so it reads the
    training prompts in every round and nothing is generated, scored or paired for it.
    Per-language models go through the rounds side by side: language L's round r samples
    from (and continues) L's adapter r-1."""
    config = stages.config
    pairing = config.variant_pairing(variant)
    prompts_by_lang = dict(zip(config.languages, prompt_uris))
    online = variant.method == "online_dpo"
    langs = config.languages if variant.per_language else [None]
    out = VariantOutputs[str]()
    if variant.generation_policy:
        gen_policy = PolicyConfig(model=variant.generation_policy, device=config.policy.device)
        _, scores = stages.generate_and_score(prompt_uris, gen_policy)
        out.scores = scores
    policies = {lang: config.policy for lang in langs}  # each model's starting point
    for rnd in range(1, variant.rounds + 1):
        if rnd > 1:
            last = out.rounds[-1]
            runs = last.training_by_lang if variant.per_language else {None: last.training}
            policies = {lang: config.policy.model_copy(update={"adapter": adapter_path(u)})
                        for lang, u in runs.items()}
        this = RoundOutputs[str]()
        out.rounds.append(this)
        if not online:
            if rnd > 1:
                # Round r samples from the policy with adapter r-1: new on-policy data.
                _, scores = stages.generate_and_score(
                    prompt_uris, policies if variant.per_language else policies[None])
                this.scores = scores
            this.pairs = stages.pair(scores, prompts_by_lang, pairing)
        uris = resolve(stages.stage_task, [dict(stage=Train(spec=variant_spec(
            config, variant, policy=policies[lang], pairs_uri=this.pairs,
            prompts_uris=prompts_by_lang, lang=lang)), data_root=stages.root) for lang in langs])
        if variant.per_language:
            this.training_by_lang = dict(zip(langs, uris))
        else:
            (this.training,) = uris
    return out


@flow(name="croco-evaluate", flow_run_name="evaluate-{run_id}", **_persist)
def croco_evaluate(config: CrocoConfig, prompt_uris: list, finals: dict, run_id: str,
                   runtime: Runtime | None = None) -> dict:
    """Held-out answers of the base and each variant (generated and scored), their summary,
    the reward check, structured tasks and the pairwise judge. Returns its
    `EvaluationOutputs` (URIs) as JSON."""
    _runtime(runtime, config.data_root)
    stages = Stages(config, local=True)
    root, langs, ev = stages.root, config.languages, config.evaluation
    out = EvaluationOutputs[str]()
    eval_prompts = config.prompts.model_copy(update={"split": ev.split, "limit": ev.limit})
    # Held-out sets are small: every language of a model is sampled in one batched pass.
    eval_gen = config.generation.model_copy(update={
        "k": ev.k, "temperature": ev.temperature, "shard_size": 256,
        "max_new_tokens": ev.max_new_tokens or config.generation.max_new_tokens})
    models = {"base": config.policy}
    models.update({name: config.policy.model_copy(update={"adapter": adapter_path(uri)})
                   for name, uri in finals.items()})
    prompts_by_lang = dict(zip(langs, prompt_uris))
    names = list(models)
    gens = resolve(stages.stage_task, [dict(stage=GenerateLanguages(
        prompts_uris=prompts_by_lang, policy=models[name], gen=eval_gen,
        prompts_cfg=eval_prompts, name=name), data_root=root) for name in names])
    scores = resolve(stages.stage_task, [dict(stage=ScoreLanguages(
        generations_uris=g, prompts_uris=prompts_by_lang, reward=config.reward, name=name),
        data_root=root) for name, g in zip(names, gens)])
    out.generations = dict(zip(names, gens))
    out.scores = dict(zip(names, scores))
    # The checks below depend on the held-out scores only, not on each other.
    work: dict[str, list[Stage]] = {}
    if ev.reward_check:
        work["reward_check"] = [RewardCheck(path=ev.reward_check, reward=config.reward,
                                            langs=langs)]
    st = ev.structured
    if st.enabled and (st.local_mc or st.tasks or st.backend == "euroeval"):
        work["structured"] = [Structured(policy=policy, structured=st, langs=langs, name=name)
                              for name, policy in models.items()]
    if ev.judge.enabled and finals:
        work["judgments"] = [Judge(candidate_scores=out.scores[name],
                                   baseline_scores=out.scores["base"],
                                   prompts_uris=prompts_by_lang, judge=ev.judge, name=name)
                             for name in finals]
    out.heldout = stages.runtime.retrying(heldout_task)(out.scores, root, run_id)
    done = dict(zip(work, resolve_together([
        (stages.stage_task, [dict(stage=s, data_root=root) for s in stages_])
        for stages_ in work.values()])))
    if "reward_check" in done:
        (out.reward_check,) = done["reward_check"]
    if "structured" in done:
        out.structured = dict(zip(models, done["structured"]))
    if "judgments" in done:
        out.judgments = dict(zip(finals, done["judgments"]))
    return out.model_dump(mode="json")
