"""The stages of a run, declared once, and their identities computed from a config alone.

`STAGES` declares every stage of the pipeline: the folder its outputs live in, the stages
it reads, and the config fields it depends on. `build_plan(cfg)` is the one wiring of a
run: every stage call as data (`Plan`), each call's inputs the outputs of the calls before
it, so every key is known before anything runs. The flows execute that plan
(`flows/pipeline.py`, `flows/stages.py`); `run_identities(cfg)` reads the key of every
output off it, without running anything, so it answers "what would this change rerun?"
in milliseconds. A stage reruns exactly when one of its identities is new:
`reruns(before, after)`.

The cache truth table (`truth_table`, written to docs/what-a-change-reruns.md by
`python -m croco.plan --write`) walks every leaf field of the config model, changes it,
and lists the stages whose identities change; tests/test_truth_table.py checks each row
against the declarations below, and that the pipeline's manifest holds these keys.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from croco import storage
from croco.config import CrocoConfig, PolicyConfig, VariantConfig
from croco.identity import field_marks


@dataclass(frozen=True)
class StageDecl:
    """One stage: its output folder, the stages whose outputs it reads, and the config
    fields (dotted paths; a section stands for every field in it; `experiments.X` for that
    field of any variant) its identity holds directly."""

    name: str
    folder: str
    after: tuple[str, ...]
    config: tuple[str, ...]
    doc: str
    spec: str  # the stage's class in croco.stages


#: The held-out answers use the run's generation settings except these, which
#: `evaluation` sets (k, temperature, max_new_tokens when given) or which are fixed.
_EVAL_GENERATION = ("generation.backend", "generation.top_p", "generation.seed",
                    "generation.respond_in_language", "generation.instruction_template",
                    "generation.max_new_tokens")

STAGES: tuple[StageDecl, ...] = (
    StageDecl("prompts", "prompts", (), (
        "languages", "prompts.path", "prompts.dataset_split", "prompts.translate"),
        "one language's prompts (translated when prompts.translate is set)", "Prompts"),
    StageDecl("generate", "generations", ("prompts",), (
        "languages", "policy", "generation", "prompts.split", "prompts.limit",
        "experiments.generation_policy", "experiments.rounds"),
        "k samples per prompt of one language (from the sample store)", "Generate"),
    StageDecl("score", "scores", ("generate",), ("reward",),
              "the reward scorers' scores of one language's samples", "Score"),
    StageDecl("pair", "pairs", ("score", "prompts"), (
        "pairing", "experiments.pairing"),
        "DPO pairs and SFT rows of a variant's scores", "Pairs"),
    StageDecl("ref-logps", "ref_logps", ("pair",), (
        "policy", "training.max_length", "training.precision",
        "experiments.training.max_length", "experiments.training.precision",
        "experiments.per_language"),
        "the reference model's log-probs of a DPO variant's pairs (shared by variants)",
        "RefLogps"),
    StageDecl("train", "training", ("pair", "ref-logps"), (
        "policy", "training", "experiments.method",
        "experiments.training", "experiments.generation_policy", "experiments.per_language"),
        "one variant's adapter (per round, per language)", "Train"),
    StageDecl("heldout-generate", "generations", ("prompts", "train"), (
        "policy", *_EVAL_GENERATION, "evaluation.split", "evaluation.limit", "evaluation.k",
        "evaluation.temperature", "evaluation.max_new_tokens"),
        "held-out answers of the base and of each variant", "GenerateLanguages"),
    StageDecl("heldout-score", "scores", ("heldout-generate",), ("reward",),
              "the held-out answers' scores", "ScoreLanguages"),
    StageDecl("judge", "judgments", ("heldout-score",), ("evaluation.judge",),
              "pairwise judge verdicts and win rates, variant vs base", "Judge"),
    StageDecl("structured", "structured", ("train",), (
        "languages", "policy", "evaluation.structured"),
        "multiple-choice accuracy of the base and each variant", "Structured"),
    StageDecl("reward-check", "reward_check", (), (
        "languages", "reward", "evaluation.reward_check"),
        "the reward's ranking accuracy on a preference set", "RewardCheck"),
)
BY_NAME = {s.name: s for s in STAGES}
BY_SPEC = {s.spec: s for s in STAGES}


def downstream(names: set[str]) -> set[str]:
    """`names` and every stage that reads one of them, transitively."""
    out = set(names)
    changed = True
    while changed:
        changed = False
        for s in STAGES:
            if s.name not in out and out.intersection(s.after):
                out.add(s.name)
                changed = True
    return out


def declared_stages(field: str) -> set[str]:
    """The stages whose declarations name `field` (or a section holding it)."""
    general = _general(field)
    return {s.name for s in STAGES
            if any(general == c or general.startswith(c + ".") for c in s.config)}


def _general(field: str) -> str:
    """`experiments.0.training` -> `experiments.training`; `reward.scorers.1.weight` ->
    `reward.scorers.weight`."""
    return ".".join(p for p in field.split(".") if not p.isdigit())


# ------------------------------------------------------------------------------ the plan

#: The steps of a run in order: the one vocabulary of `croco run --until`, the pipeline
#: and the pre-run checks.
RUN_STAGES = ("prompts", "generate", "score", "pair", "train", "evaluate")


def check_stages(stages: list[str] | None) -> None:
    """`--until` (or `--stages`) names known steps only."""
    from croco.errors import UserError

    unknown = sorted(set(stages or []) - set(RUN_STAGES))
    if unknown:
        raise UserError(f"--until: unknown stage {', '.join(unknown)}; choose from "
                        f"{', '.join(RUN_STAGES)}")


def last_stage(cfg: CrocoConfig, stages: list[str] | None = None) -> str:
    """The last step a run of `cfg` reaches: the latest of `stages` (None: all of them),
    and no further than `pair` while training is off."""
    check_stages(stages)
    last = max(RUN_STAGES.index(s) for s in (stages or RUN_STAGES))
    if not cfg.training.enabled:
        last = min(last, RUN_STAGES.index("pair"))
    return RUN_STAGES[last]


def reaches(last: str, step: str) -> bool:
    """Whether a run whose last step is `last` runs `step`."""
    return RUN_STAGES.index(last) >= RUN_STAGES.index(step)


@dataclass
class RoundPlan:
    """One training round of a variant: round r > 1 of DPO/SFT samples (`generate`,
    `score`, lang -> call) from adapter r-1; `pairs` is what it trains on (none for online
    DPO); `ref_logps`: DPO's reference log-probs of them, and `train`, the training run:
    one call each, or lang -> call for per-language models (key None: one)."""

    generate: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    pairs: Any = None
    ref_logps: dict[str | None, Any] = field(default_factory=dict)
    train: dict[str | None, Any] = field(default_factory=dict)

    def stages(self) -> list:
        return [*self.generate.values(), *self.score.values(),
                *([self.pairs] if self.pairs else []), *self.ref_logps.values(),
                *self.train.values()]


@dataclass
class VariantPlan:
    """One variant of the experiment grid: the off-policy model's samples and scores
    (`generate`, `score`, lang -> call) when it has `generation_policy`, then its rounds."""

    variant: VariantConfig
    generate: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    rounds: list[RoundPlan] = field(default_factory=list)

    def stages(self) -> list:
        return [*self.generate.values(), *self.score.values(),
                *(s for r in self.rounds for s in r.stages())]

    @property
    def final(self):
        """The training call the evaluation uses: the last round's (none for per-language
        models, which are not evaluated against the base)."""
        if self.variant.per_language or not self.rounds:
            return None
        return self.rounds[-1].train[None]

    def outputs(self, root: str):
        """What the variant's calls write under `root`, as the run's record holds it
        (`croco.manifest.VariantOutputs`)."""
        from croco.manifest import RoundOutputs, VariantOutputs

        out = VariantOutputs[str](scores=_results(self.score, root))
        per_language = self.variant.per_language
        for r in self.rounds:
            trained, ref = _results(r.train, root), _results(r.ref_logps, root)
            out.rounds.append(RoundOutputs[str](
                scores=_results(r.score, root), pairs=r.pairs.result(root) if r.pairs else None,
                ref_logps=None if per_language else ref.get(None),
                ref_logps_by_lang=ref if per_language else {},
                training=None if per_language else trained[None],
                training_by_lang=trained if per_language else {}))
        return out


@dataclass
class EvaluationPlan:
    """Held-out answers (`generate`) and their scores (`score`) of each model (model name
    -> call: `base` and each variant's final model), the reward check, the structured
    tasks of each model and the pairwise judge of each variant against the base."""

    generate: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    reward_check: Any = None
    structured: dict[str, Any] = field(default_factory=dict)
    judgments: dict[str, Any] = field(default_factory=dict)

    def stages(self) -> list:
        return [*self.generate.values(), *self.score.values(),
                *([self.reward_check] if self.reward_check else []),
                *self.structured.values(), *self.judgments.values()]

    def outputs(self, root: str):
        """What the evaluation's calls write under `root` (`croco.manifest.
        EvaluationOutputs`; the run's own held-out summary, `heldout`, is the pipeline's to
        add)."""
        from croco.manifest import EvaluationOutputs

        return EvaluationOutputs[str](
            generations=_results(self.generate, root), scores=_results(self.score, root),
            reward_check=self.reward_check.result(root) if self.reward_check else None,
            structured=_results(self.structured, root),
            judgments=_results(self.judgments, root))


def _results(calls: dict, root: str) -> dict:
    return {name: stage.result(root) for name, stage in calls.items()}


@dataclass
class Plan:
    """Every stage call of one run, as data: each a stage spec (`croco.stages`) whose
    inputs are the outputs of the calls before it, so each call's key, and so its output,
    is known before anything runs. The flows execute it (flows/pipeline.py); the
    identities, the truth table and `croco config plan` read it. `root`: the data root;
    `last`: the last step the run reaches (`RUN_STAGES`)."""

    root: str
    last: str
    prompts: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    pairs: Any = None
    variants: dict[str, VariantPlan] = field(default_factory=dict)
    evaluation: EvaluationPlan | None = None

    def stages(self) -> list:
        """Every call, in an order that runs each after the calls it reads."""
        return [*self.prompts.values(), *self.generate.values(), *self.score.values(),
                *([self.pairs] if self.pairs else []),
                *(s for v in self.variants.values() for s in v.stages()),
                *(self.evaluation.stages() if self.evaluation else [])]

    def uri(self, stage) -> Any:
        """A call's result: its output URI (lang -> URI for one that writes one per
        language)."""
        return stage.result(self.root)


def adapter_of(training_uri: str) -> str:
    """The adapter a training run writes (`<training output>/adapter`), as the policy of
    the calls that sample from it or continue it."""
    return storage.join(training_uri, "adapter")


def build_plan(cfg: CrocoConfig, stages: list[str] | None = None,
               root: str | None = None) -> Plan:
    """The plan of a run of `cfg` up to the last of `stages` (`last_stage`), its outputs
    under `root` (default: the config's data root). Reads no stage output; reads the
    prompt and model files a key fingerprints."""
    from croco import stages as st

    root = storage.normalize_root(root or cfg.data_root)
    plan = Plan(root=root, last=last_stage(cfg, stages))
    langs = cfg.languages
    plan.prompts = {lang: st.Prompts(cfg=cfg.prompts, lang=lang) for lang in langs}
    prompts = {lang: plan.uri(s) for lang, s in plan.prompts.items()}

    def generate_and_score(policies: dict[str, PolicyConfig], score: bool = True):
        gens = {lang: st.Generate(prompts_uri=prompts[lang], lang=lang, policy=policies[lang],
                                  gen=cfg.generation, prompts_cfg=cfg.prompts)
                for lang in langs}
        scores = {lang: st.Score(generations_uri=plan.uri(g), prompts_uri=prompts[lang],
                                 lang=lang, reward=cfg.reward)
                  for lang, g in gens.items()} if score else {}
        return gens, scores

    if not reaches(plan.last, "generate"):
        return plan
    plan.generate, plan.score = generate_and_score(
        {lang: cfg.policy for lang in langs}, score=reaches(plan.last, "score"))
    if not reaches(plan.last, "pair"):
        return plan
    scores = {lang: plan.uri(s) for lang, s in plan.score.items()}
    plan.pairs = st.Pairs(score_uris=scores, prompts_uris=prompts, pairing=cfg.pairing)
    if reaches(plan.last, "train"):
        for variant in cfg.experiments:
            plan.variants[variant.name] = _variant_plan(cfg, variant, scores, prompts,
                                                        generate_and_score, plan)
    if reaches(plan.last, "evaluate") and cfg.evaluation.enabled:
        plan.evaluation = _evaluation_plan(cfg, prompts, plan)
    return plan


def _variant_plan(cfg: CrocoConfig, variant: VariantConfig, scores: dict[str, str],
                  prompts: dict[str, str], generate_and_score, plan: Plan) -> VariantPlan:
    """A variant's calls, round by round: round r starts from adapter r-1. DPO and SFT train
    on pairs from the round's scores (round r > 1 samples, scores and pairs anew from
    adapter r-1); online DPO samples its own pairs while it trains, so it reads the
    training prompts in every round and nothing is generated, scored or paired for it.
    Per-language models go through the rounds side by side: language L's round r samples
    from (and continues) L's adapter r-1."""
    from croco import stages as st
    from croco.training.spec import variant_spec

    out = VariantPlan(variant=variant)
    pairing = cfg.variant_pairing(variant)
    online = variant.method == "online_dpo"
    models = cfg.languages if variant.per_language else [None]
    if variant.generation_policy:
        gen_policy = PolicyConfig(model=variant.generation_policy, device=cfg.policy.device)
        out.generate, out.score = generate_and_score({lang: gen_policy
                                                      for lang in cfg.languages})
        scores = {lang: plan.uri(s) for lang, s in out.score.items()}
    policies = {model: cfg.policy for model in models}  # each model's starting point
    for rnd in range(1, variant.rounds + 1):
        this = RoundPlan()
        if rnd > 1:
            policies = {model: cfg.policy.model_copy(update={
                "adapter": adapter_of(plan.uri(train))})
                for model, train in out.rounds[-1].train.items()}
        if not online:
            if rnd > 1:  # round r samples from the policy with adapter r-1: new on-policy data
                this.generate, this.score = generate_and_score(
                    {lang: policies[lang if variant.per_language else None]
                     for lang in cfg.languages})
                scores = {lang: plan.uri(s) for lang, s in this.score.items()}
            this.pairs = st.Pairs(score_uris=scores, prompts_uris=prompts, pairing=pairing)
        pairs_uri = plan.uri(this.pairs) if this.pairs else None
        if variant.method == "dpo":  # the reference is the round's starting policy
            this.ref_logps = {model: st.RefLogps(
                pairs_uri=pairs_uri, policy=policies[model],
                training=cfg.variant_training(variant), lang=model) for model in models}
        this.train = {model: st.Train(spec=variant_spec(
            cfg, variant, policy=policies[model], pairs_uri=pairs_uri, prompts_uris=prompts,
            lang=model, ref_logps_uri=(plan.uri(this.ref_logps[model])
                                       if this.ref_logps else None)))
            for model in models}
        out.rounds.append(this)
    return out


def _evaluation_plan(cfg: CrocoConfig, prompts: dict[str, str], plan: Plan) -> EvaluationPlan:
    """The evaluation of the base and each variant's final model."""
    from croco import stages as st

    ev = cfg.evaluation
    out = EvaluationPlan()
    eval_prompts = cfg.prompts.model_copy(update={"split": ev.split, "limit": ev.limit})
    # Held-out sets are small: every language of a model is sampled in one batched pass.
    eval_gen = cfg.generation.model_copy(update={
        "k": ev.k, "temperature": ev.temperature, "shard_size": 256,
        "max_new_tokens": ev.max_new_tokens or cfg.generation.max_new_tokens})
    finals = {name: v.final for name, v in plan.variants.items() if v.final is not None}
    models = {"base": cfg.policy}
    models.update({name: cfg.policy.model_copy(update={"adapter": adapter_of(plan.uri(t))})
                   for name, t in finals.items()})
    for name, policy in models.items():
        out.generate[name] = st.GenerateLanguages(
            prompts_uris=prompts, policy=policy, gen=eval_gen, prompts_cfg=eval_prompts,
            name=name)
        out.score[name] = st.ScoreLanguages(
            generations_uris=plan.uri(out.generate[name]), prompts_uris=prompts,
            reward=cfg.reward, name=name)
    if ev.reward_check:
        out.reward_check = st.RewardCheck(path=ev.reward_check, reward=cfg.reward,
                                          langs=cfg.languages)
    sc = ev.structured
    if sc.enabled and (sc.local_mc or sc.tasks or sc.backend == "euroeval"):
        out.structured = {name: st.Structured(policy=policy, structured=sc,
                                              langs=cfg.languages, name=name)
                          for name, policy in models.items()}
    if ev.judge.enabled and finals:
        out.judgments = {name: st.Judge(candidate_scores=plan.uri(out.score[name]),
                                        baseline_scores=plan.uri(out.score["base"]),
                                        prompts_uris=prompts, judge=ev.judge, name=name)
                         for name in finals}
    return out


# ------------------------------------------------------------------ deployments


#: The stages `orchestration.deployments` can send to a deployment, each flow run of one
#: running that part of the plan (flows/stages.py `Stages`).
DEPLOYED = ("generate", "score", "train", "evaluate")


def flow_runs(plan: Plan, complete: Callable[[Any], bool], groups: int = 1) -> dict[str, int]:
    """The flow runs a run of `plan` starts with every stage of `DEPLOYED` on a deployment,
    `complete(call)` saying whether a call's output is there: one per language whose
    generate (or score) output is missing (x `groups` shard groups), one per variant with
    any call missing (its own samples, pairs, reference log-probs and training run inside
    it), one for the evaluation when any of its calls is. The pipeline starts exactly
    these (`Stages.todo`); the truth table lists them per field."""
    def missing(calls) -> list:
        return [s for s in calls if not complete(s)]

    return {"generate": groups * len(missing(plan.generate.values())),
            "score": groups * len(missing(plan.score.values())),
            "train": sum(1 for v in plan.variants.values() if missing(v.stages())),
            "evaluate": int(bool(plan.evaluation and missing(plan.evaluation.stages())))}


# ------------------------------------------------------------------------- identities


def run_identities(cfg: CrocoConfig) -> dict[str, set[str]]:
    """Stage name (`STAGES`) -> the outputs a full run of `cfg` produces: `key/lang` for
    each language of a per-language output, `key` otherwise (a stage the config turns off
    has none). Read off `build_plan`."""
    ids: dict[str, set[str]] = {s.name: set() for s in STAGES}
    for stage in build_plan(cfg, root="/plan").stages():
        key = stage.key()
        langs = (stage.languages() if hasattr(stage, "languages")
                 else [stage.lang] if getattr(stage, "lang", None) else [])
        ids[BY_SPEC[type(stage).__name__].name].update(
            [f"{key}/{lang}" for lang in langs] if langs else [key])
    return ids


def output_uris(cfg: CrocoConfig) -> list[tuple[str, str]]:
    """(stage, URI under `cfg.data_root`) of every output a full run of `cfg` produces."""
    root = storage.normalize_root(cfg.data_root)
    ids = run_identities(cfg)
    out = []
    for s in STAGES:
        for ident in sorted(ids[s.name]):
            key, _, lang = ident.partition("/")
            out.append((s.name, storage.join(root, s.folder, key,
                                             *([f"lang={lang}"] if lang else []))))
    return out


def reruns(before: dict[str, set[str]], after: dict[str, set[str]]) -> set[str]:
    """The stages with an output `after` that `before` did not produce."""
    return {name for name in after if after[name] - before.get(name, set())}


# ---------------------------------------------------------------------- truth table


def leaf_fields(obj: BaseModel, prefix: str = "") -> list[tuple[str, str | None]]:
    """Every leaf field of a config object as (dotted path, why it is in no identity:
    "execution only", "a label" or None), walked from the model's schema
    (`model_fields`): nested models and lists of models by position."""
    out = []
    cls = type(obj)
    for name in cls.model_fields:
        value = getattr(obj, name)
        path = f"{prefix}{name}"
        marks = field_marks(cls, name)
        exec_only = ("execution only" if marks.get("execution_only")
                     else "a label" if marks.get("label") else None)
        if len(_literal_choices(cls.model_fields[name].annotation)) == 1:
            continue  # a union's tag (a scorer's `type`): another type is another scorer
        if isinstance(value, BaseModel):
            out += [(p, exec_only or e) for p, e in leaf_fields(value, f"{path}.")]
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, v in enumerate(value):
                out += [(p, exec_only or e) for p, e in leaf_fields(v, f"{path}.{i}.")]
        else:
            out.append((path, exec_only))
    return out


def walk_config() -> CrocoConfig:
    """The config the table is computed on: the demo, with every optional part on (a
    classifier scorer beside the demo's judge and language id, a translated prompt set, a
    variant with overrides) so every field has something to change."""
    from croco.config_loading import load_config

    return load_config(None, [
        ("reward.scorers=[{type: judge, name: judge, model: embedded:smollm2-135m-instruct},"
         " {type: langid, name: lang, weight: 2.0},"
         " {type: classifier, name: rm, model: some-org/some-reward-model}]"),
        "prompts.translate={source_lang: en}",
        "experiments=[{name: dpo, method: dpo, pairing: {seed: 1}, training: {beta: 0.2}}]",
    ])


def changed_value(cfg: CrocoConfig, path: str) -> Any:
    """Another valid value for the field at `path` (validated by `with_change`)."""
    owner, name = _owner(cfg, path)
    value = getattr(owner, name)
    info = type(owner).model_fields[name]
    special = _SPECIAL.get(_general(path))
    if special is not None:
        return special
    ann = info.annotation
    choices = [a for a in _literal_choices(ann) if a != value]
    if choices:
        return choices[0]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return value + " (changed)"
    if value is None:
        return _none_replacement(ann)
    if isinstance(value, dict):
        return {**value, "changed": 1}
    raise TypeError(f"{path}: no rule to change a {type(value).__name__}")


#: Fields whose values are checked (or paths to things): a valid other value to try.
_SPECIAL: dict[str, Any] = {
    "pairing.reject_target": "q1",
    "training.report_to": "none",
    "experiments.pairing": {"seed": 2},
    "experiments.training": {"beta": 0.3},
    "experiments.name": "dpo-renamed",
    "experiments.generation_policy": "some-org/another-model",
    "experiments.rounds": 2,
    "evaluation.structured.tasks": {"de": ["some_lm_eval_task"]},
    "evaluation.structured.euroeval_datasets": ["scala-de"],
    "evaluation.structured.euroeval_tasks": ["sentiment-classification"],
    "policy.adapter": "/plan/training/0123456789abcdef/adapter",
    "evaluation.reward_check": "builtin:demo_mc",
    "evaluation.structured.local_mc": "builtin:demo_preferences",
    "prompts.path": "builtin:demo_mc",
    "prompts.translate.source_lang": "de",
    "storage_block": "aws-credentials/other",
    "orchestration.deployments": {"generate": "croco-generate/gpu"},
}


def _none_replacement(ann) -> Any:
    for arg in get_args(ann):
        if arg is int:
            return 2
        if arg is float:
            return 0.5
        if arg is str:
            return "some-value"
    raise TypeError(f"no rule to replace None in {ann}")


def _literal_choices(ann) -> list:
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    for arg in get_args(ann):
        if get_origin(arg) is Literal:
            return list(get_args(arg))
    return []


def _owner(cfg: BaseModel, path: str) -> tuple[BaseModel, str]:
    node: Any = cfg
    *head, last = path.split(".")
    for part in head:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node, last


def with_change(cfg: CrocoConfig, path: str) -> CrocoConfig:
    """`cfg` with the field at `path` changed (a full re-validation)."""
    from croco.config_loading import config_from_dict

    data = cfg.model_dump(mode="json")
    node = data
    *head, last = path.split(".")
    for part in head:
        node = node[int(part)] if part.isdigit() else node[part]
    if path == "languages":
        node[last] = [*node[last], "pt"]
    else:
        new = changed_value(cfg, path)
        node[last] = new.model_dump(mode="json") if isinstance(new, BaseModel) else new
    return config_from_dict(data, source=f"changed {path}")


def truth_table(cfg: CrocoConfig | None = None) -> list[dict]:
    """One row per leaf field: its path, whether it is execution only, the stages its
    change reruns (by identity)."""
    cfg = cfg or walk_config()
    before = run_identities(cfg)
    there = {s.where() for s in build_plan(cfg, root="/plan").stages()}
    rows = []
    for path, exec_only in leaf_fields(cfg):
        changed = with_change(cfg, path)
        after = run_identities(changed)
        runs = flow_runs(build_plan(changed, root="/plan"), lambda s: s.where() in there)
        rows.append({"field": path, "execution_only": exec_only,
                     "reruns": [s.name for s in STAGES if s.name in reruns(before, after)],
                     "stops": [s.name for s in STAGES if before[s.name] and not after[s.name]],
                     "flow_runs": runs})
    return rows


def render_markdown(rows: list[dict]) -> str:
    lines = [
        "# What a change reruns",
        "",
        "Generated by `python -m croco.plan --write docs/what-a-change-reruns.md` from the",
        "stage identities (`croco/plan.py`, `croco/identity.py`); tests/test_truth_table.py",
        "fails when this file and the code disagree. Each row changes one field of the demo",
        "config (with every optional part on) and lists the stages that get a new output;",
        "every other stage's outputs are read back. A stage that reads a rerun stage's",
        "output reruns too. Execution-only fields rerun nothing. Variant fields are shown",
        "for the first variant (`experiments.0`); a scorer's for each scorer type.",
        "The last column is the flow runs a rerun starts on a cluster when every GPU stage",
        "runs on a deployment (`orchestration.deployments`: generate, score, train and",
        "evaluate; one shard group per language): one per language, variant or evaluation",
        "whose outputs are not all there (`croco.plan.flow_runs`).",
        "",
        "Stages:",
        "",
    ]
    lines += [f"- `{s.name}` (`{s.folder}/`): {s.doc}" for s in STAGES]
    lines += ["", "| field | reruns | flow runs on deployments |", "|---|---|---|"]
    for r in rows:
        if r["execution_only"]:
            what = f"nothing ({r['execution_only']})"
        else:
            what = ", ".join(r["reruns"]) or "nothing"
            if r["stops"]:
                what += f"; turns off {', '.join(r['stops'])}"
        runs = ", ".join(f"{n} {k}" for k, n in r["flow_runs"].items() if n) or "none"
        lines.append(f"| `{r['field']}` | {what} | {runs} |")
    lines += ["", "Inputs named by a path (model folders, prompt files and folders, the",
              "multiple-choice file, the preference set) are identified by their content,",
              "so editing one in place reruns what the row of its field says.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The cache truth table: what each config "
                                 "field's change reruns.")
    ap.add_argument("--write", metavar="FILE", help="write the Markdown table to FILE")
    a = ap.parse_args(argv)
    text = render_markdown(truth_table())
    if a.write:
        with open(a.write, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
