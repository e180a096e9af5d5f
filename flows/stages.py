"""The GPU stages as flows of their own, so each can be deployed on a GPU work pool:

    croco-generate   one language's samples                 (one flow run per language, or
                                                             per shard group of a language)
    croco-score      one language's rewards                 (likewise)
    croco-train      one variant of the experiment grid     (one flow run per variant)
    croco-evaluate   held-out answers, judge, checks        (one flow run per pipeline run)

`Stages` executes the calls of the run's plan (`croco.plan.build_plan`, the one wiring of
a run): as cached tasks and subflows in the pipeline's process, or, for the stages named
in `orchestration.deployments`, as flow runs of those deployments
(`croco.tasks.remote.trigger_task`); a language, a variant or the evaluation whose outputs
are complete starts no flow run. The code that runs is the same either way; inside a
stage's flow run every stage runs in that process, so a GPU worker never waits on another
one. `croco-train` and `croco-evaluate` build the same plan from the config and run their
part of it. Stage flows persist their (small, JSON) return values.

With `orchestration.shards_per_language` = n > 1, each language's generate and score run as
n shard groups (tasks or flow runs, `generate-{lang}-{group}`) writing into the language's
one output, then a cheap seal task in the pipeline marks it complete, so every later stage
still gets one URI per language.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel

from croco import storage
from croco.config import (
    CrocoConfig,
    GenerationConfig,
    OrchestrationConfig,
    PolicyConfig,
    PromptsConfig,
    RewardConfig,
    VariantConfig,
    stable_hash,
)
from croco.manifest import EvaluationOutputs, VariantOutputs
from croco.plan import EvaluationPlan, VariantPlan, build_plan
from croco.stage import ShardedStage, Stage, incomplete
from croco.stages import Generate, Score
from croco.tasks import stage_task
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
    """A shard group's files (`{"uri", "parts"}`: the URIs of its parts, written in the
    output or stored and referenced; a bare part name, from a result cached by an earlier
    release, is a file in the output) all still exist."""
    return all(storage.is_file(p if "/" in p or "\\" in p else storage.join(result["uri"], p))
               for p in result["parts"])


def run_together(work: list[tuple[Any, list[dict]]]) -> list[list]:
    """Submit one task run per kwargs of every (task, calls), all before any is waited on
    (GPU work still takes turns through the GPU slots); one result list per (task, calls).
    For stage tasks, which read no cache: what they return is what they just wrote."""
    futures = [[task.submit(**kw) for kw in calls] for task, calls in work]
    return [[f.result() for f in futs] for futs in futures]


def resolve(task, calls: list[dict], complete=_complete) -> list:
    """For a task served from Prefect's cache (a deployment's trigger): submit one run per
    kwargs, wait, and rerun (bypassing the cache) any whose cached output has since
    disappeared from storage (`complete(result)` is False)."""
    (results,) = run_together([(task, calls)])
    stale = [i for i, r in enumerate(results) if not complete(r)]
    if stale:
        fresh = task.with_options(refresh_cache=True)
        redo = [fresh.submit(**calls[i]) for i in stale]
        for i, f in zip(stale, redo):
            results[i] = f.result()
    return results


def _jsonable(params: dict) -> dict:
    return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
            for k, v in params.items()}


def _log():
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow run (tests, plain calls)
        import logging

        return logging.getLogger("croco")


def _names(stages: list[Stage]) -> str:
    """`generate-en, generate-de, ...` shortened for a log line."""
    labels = [s.label() for s in stages]
    return ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")


class Stages:
    """Executes the calls of a plan (`croco.plan.build_plan`) for one pipeline run: as
    cached tasks in this process, or, for the stages named in
    `orchestration.deployments`, as flow runs of those deployments. A call whose output is
    complete starts no flow run at all; its result is read off the plan."""

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

    def calls(self, stages, **extra) -> list[dict]:
        return [dict(stage=s, data_root=self.root, **extra) for s in stages]

    def todo(self, stages: list[Stage]) -> list[Stage]:
        """The calls whose output is not complete (`_SUCCESS` under their key): the only
        ones started, as a task or a flow run; the others' results are read off the plan.
        Logs how many were complete."""
        todo = incomplete(stages, self.root)
        done = len(stages) - len(todo)
        if done:
            _log().info("%s: %d of %d complete, read back", _names(stages), done, len(stages))
        return todo

    def each(self, calls: dict[Any, Stage]) -> dict:
        """Run independent calls as tasks in this process (those not complete); name ->
        result."""
        todo = self.todo(list(calls.values()))
        (results,) = run_together([(self.stage_task, self.calls(todo, checked=True))])
        ran = dict(zip(map(id, todo), results))
        return {name: ran[id(s)] if id(s) in ran else s.result(self.root)
                for name, s in calls.items()}

    def one(self, stage: Stage) -> Any:
        """Run one call as a task in this process, unless it is complete; its result."""
        return self.each({None: stage})[None]

    def _remote(self, stage: str, calls: list[dict], labels: list[str],
                identities: list[str], complete=_complete) -> list:
        """Flow runs of the `stage` deployment, one per call, cached on each call's
        `identity` (the keys of the stage calls it runs, and the data root)."""
        triggers = [dict(deployment=self.deployments[stage], label=label, timeout=self.timeout,
                         parameters=_jsonable(dict(call, runtime=self.runtime)),
                         identity=stable_hash({"calls": ident, "root": self.root}))
                    for call, label, ident in zip(calls, labels, identities)]
        return resolve(self.trigger_task, triggers, complete)

    def _per_language(self, stage: str, work: list[ShardedStage]) -> list[str]:
        """One sharded stage (generate or score) for every language: one task or flow run
        per language, or, with `shards_per_language` n > 1, a plan per language (if the
        stage has one), n shard groups per language, then a seal per language. Returns one
        output URI per stage. On a deployment, a language whose output is complete starts
        no flow run."""
        root = self.root
        n = self.config.orchestration.shards_per_language
        todo = self.todo(work)
        ran: dict[int, Any] = {}  # id(call) -> what its task returned
        if todo and n == 1:
            if stage in self.deployments:
                self._remote(stage, [_call(s, root) for s in todo], [s.label() for s in todo],
                             [s.key() for s in todo])
            else:
                (results,) = run_together([(self.stage_task, self.calls(todo, checked=True))])
                ran = dict(zip(map(id, todo), results))
        elif todo:
            ran = self._in_groups(stage, todo, n)
        return [ran.get(id(s)) or s.result(root) for s in work]

    def _in_groups(self, stage: str, todo: list[ShardedStage], n: int) -> dict[int, Any]:
        """`todo` as n shard groups each (tasks or flow runs), then sealed here."""
        root = self.root
        if any(s.planned for s in todo):  # every group must number the parts alike
            run_together([(self.stage_task, self.calls(todo, step="plan"))])
        if stage in self.deployments:
            self._remote(stage, [dict(_call(s, root), group=g, groups=n)
                                 for s in todo for g in range(n)],
                         [f"{s.label()}-{g}" for s in todo for g in range(n)],
                         [f"{s.key()}-{g}-{n}" for s in todo for g in range(n)],
                         complete=_parts_written)
        else:
            run_together([(self.stage_task, [dict(c, group=g, groups=n)
                                             for c in self.calls(todo) for g in range(n)])])
        (sealed,) = run_together([(self.stage_task, self.calls(todo, step="seal"))])
        return dict(zip(map(id, todo), sealed))

    def generate_and_score(self, generate: dict[str, ShardedStage],
                           score: dict[str, ShardedStage]) -> tuple[dict, dict]:
        """Sample (lang -> `Generate` call), then score (lang -> `Score` call; none:
        sampling only) every language; lang -> URI each."""
        gens = dict(zip(generate, self._per_language("generate", list(generate.values()))))
        if not score:
            return gens, {}
        return gens, dict(zip(score, self._per_language("score", list(score.values()))))

    def train(self, variant: VariantPlan) -> VariantOutputs[str]:
        """One variant: a `croco-train` subflow, or a flow run of the train deployment
        unless every call of the variant is complete."""
        name = variant.variant.name
        if not self.todo(variant.stages()):
            return variant.outputs(self.root)  # every output is there: nothing starts
        if "train" in self.deployments:
            self._remote("train", [dict(config=self.config, variant=variant.variant)],
                         [f"train-{name}"], [[s.key() for s in variant.stages()]])
        else:
            croco_train(config=self.config, variant=variant.variant, runtime=self.runtime)
        return variant.outputs(self.root)

    def evaluate(self, evaluation: EvaluationPlan, run_id: str) -> EvaluationOutputs[str]:
        """The evaluation: a `croco-evaluate` subflow, or a flow run of the evaluate
        deployment unless every call of it is complete."""
        if not self.todo(evaluation.stages()):
            return evaluation.outputs(self.root)  # every output is there: nothing starts
        if "evaluate" in self.deployments:
            self._remote("evaluate", [dict(config=self.config, run_id=run_id)],
                         [f"evaluate-{run_id}"], [[s.key() for s in evaluation.stages()]])
        else:
            croco_evaluate(config=self.config, run_id=run_id, runtime=self.runtime)
        return evaluation.outputs(self.root)


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
        ((uri,),) = run_together([(task, [dict(stage=stage, data_root=data_root)])])
        return uri
    ((done,),) = run_together([(task, [dict(stage=stage, data_root=data_root, group=group,
                                            groups=groups)])])
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
def croco_train(config: CrocoConfig, variant: VariantConfig,
                runtime: Runtime | None = None) -> dict:
    """One variant of the experiment grid (`croco.plan.VariantPlan`): its off-policy
    samples, then round by round its samples, pairs and training run(s). Returns its
    `VariantOutputs` (URIs) as JSON."""
    _runtime(runtime, config.data_root)
    stages = Stages(config, local=True)
    plan = build_plan(config).variants[variant.name]
    if plan.generate:
        stages.generate_and_score(plan.generate, plan.score)
    for rnd in plan.rounds:  # round r samples from (and continues) adapter r-1
        if rnd.generate:
            stages.generate_and_score(rnd.generate, rnd.score)
        if rnd.pairs:
            stages.one(rnd.pairs)
        stages.each(rnd.ref_logps)
        stages.each(rnd.train)
    return plan.outputs(stages.root).model_dump(mode="json")


@flow(name="croco-evaluate", flow_run_name="evaluate-{run_id}", **_persist)
def croco_evaluate(config: CrocoConfig, run_id: str, runtime: Runtime | None = None) -> dict:
    """Held-out answers of the base and each variant (generated and scored), the reward
    check, structured tasks and the pairwise judge (`croco.plan.EvaluationPlan`). Returns
    its `EvaluationOutputs` (URIs) as JSON."""
    _runtime(runtime, config.data_root)
    stages = Stages(config, local=True)
    plan = build_plan(config).evaluation
    stages.each(plan.generate)
    stages.each(plan.score)
    # The checks below depend on the held-out scores only, not on each other.
    checks = [stages.todo(c) for c in ([plan.reward_check] if plan.reward_check else [],
                                       list(plan.structured.values()),
                                       list(plan.judgments.values()))]
    run_together([(stages.stage_task, stages.calls(c, checked=True)) for c in checks if c])
    return plan.outputs(stages.root).model_dump(mode="json")
