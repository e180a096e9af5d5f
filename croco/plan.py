"""The stages of a run, declared once, and their identities computed from a config alone.

`STAGES` declares every stage of the pipeline: the folder its outputs live in, the stages
it reads, and the config fields it depends on. `run_identities(cfg)` computes the key of
every output a run of `cfg` would produce, by the same key functions the stages use
(`croco.stages`), wiring them the way the flows do (`flows/pipeline.py`,
`flows/stages.py`) — without running anything, so it answers "what would this change
rerun?" in milliseconds. A stage reruns exactly when one of its identities is new:
`reruns(before, after)`.

The cache truth table (`truth_table`, written to docs/what-a-change-reruns.md by
`python -m croco.plan --write`) walks every leaf field of the config model, changes it,
and lists the stages whose identities change; tests/test_truth_table.py checks each row
against the declarations below, and that the pipeline's manifest holds these keys.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
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
    StageDecl("generations", "generations", ("prompts",), (
        "languages", "policy", "generation", "prompts.split", "prompts.limit",
        "experiments.generation_policy", "experiments.rounds"),
        "k samples per prompt of one language (from the sample store)", "Generate"),
    StageDecl("scores", "scores", ("generations",), ("reward",),
              "the reward scorers' scores of one language's samples", "Score"),
    StageDecl("pairs", "pairs", ("scores", "prompts"), (
        "pairing", "experiments.pairing"),
        "DPO pairs and SFT rows of a variant's scores", "Pairs"),
    StageDecl("training", "training", ("pairs",), (
        "policy", "training", "experiments.method",
        "experiments.training", "experiments.generation_policy", "experiments.per_language"),
        "one variant's adapter (per round, per language)", "Train"),
    StageDecl("heldout-generations", "generations", ("prompts", "training"), (
        "policy", *_EVAL_GENERATION, "evaluation.split", "evaluation.limit", "evaluation.k",
        "evaluation.temperature", "evaluation.max_new_tokens"),
        "held-out answers of the base and of each variant", "GenerateLanguages"),
    StageDecl("heldout-scores", "scores", ("heldout-generations",), ("reward",),
              "the held-out answers' scores", "ScoreLanguages"),
    StageDecl("judgments", "judgments", ("heldout-scores",), ("evaluation.judge",),
              "pairwise judge verdicts and win rates, variant vs base", "Judge"),
    StageDecl("structured", "structured", ("training",), (
        "languages", "policy", "evaluation.structured"),
        "multiple-choice accuracy of the base and each variant", "Structured"),
    StageDecl("reward-check", "reward_check", (), (
        "languages", "reward", "evaluation.reward_check"),
        "the reward's ranking accuracy on a preference set", "RewardCheck"),
)
BY_NAME = {s.name: s for s in STAGES}


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


# ------------------------------------------------------------------------- identities


def run_identities(cfg: CrocoConfig) -> dict[str, set[str]]:
    """Stage name -> the outputs a full run of `cfg` produces: `key/lang` for each language
    of a per-language output, `key` otherwise (a stage the config turns off has none)."""
    from croco import stages as st

    root = "/plan"
    ids: dict[str, set[str]] = {s.name: set() for s in STAGES}

    def uri(folder: str, key: str, lang: str | None = None) -> str:
        return storage.join(root, folder, key, *([f"lang={lang}"] if lang else []))

    langs = cfg.languages
    pkey = st.Prompts(cfg=cfg.prompts, lang="-").key()
    prompts = {lang: uri("prompts", pkey, lang) for lang in langs}
    ids["prompts"] = {f"{pkey}/{lang}" for lang in langs}

    def generate_and_score(policy) -> dict[str, str]:
        """`policy`: one for every language, or lang -> policy (as the flow takes it)."""
        scores = {}
        for lang in langs:
            p = policy[lang] if isinstance(policy, dict) else policy
            g = st.Generate(prompts_uri=prompts[lang], lang=lang, policy=p, gen=cfg.generation,
                            prompts_cfg=cfg.prompts).key()
            ids["generations"].add(f"{g}/{lang}")
            s = st.Score(generations_uri=uri("generations", g, lang), prompts_uri=prompts[lang],
                         lang=lang, reward=cfg.reward).key()
            ids["scores"].add(f"{s}/{lang}")
            scores[lang] = uri("scores", s, lang)
        return scores

    scores = generate_and_score(cfg.policy)
    ids["pairs"].add(st.Pairs(score_uris=scores, prompts_uris=prompts,
                              pairing=cfg.pairing).key())
    finals: dict[str, str] = {}
    if cfg.training.enabled:
        for variant in cfg.experiments:
            final = _variant(cfg, variant, scores, prompts, generate_and_score, ids, uri)
            if final:
                finals[variant.name] = final
    if cfg.evaluation.enabled:
        _evaluation(cfg, prompts, finals, ids, uri)
    return ids


def _variant(cfg, variant: VariantConfig, scores, prompts, generate_and_score, ids, uri):
    """The identities `croco.flows.stages._train_variant` produces for one variant."""
    from croco import stages as st
    from croco.training.spec import variant_spec

    pairing = cfg.variant_pairing(variant)
    online = variant.method == "online_dpo"
    langs = cfg.languages if variant.per_language else [None]
    if variant.generation_policy:
        scores = generate_and_score(PolicyConfig(model=variant.generation_policy,
                                                 device=cfg.policy.device))
    policies = {lang: cfg.policy for lang in langs}
    runs: dict = {}
    for rnd in range(1, variant.rounds + 1):
        if rnd > 1:
            policies = {lang: cfg.policy.model_copy(update={
                "adapter": storage.join(u, "adapter")}) for lang, u in runs.items()}
        pairs = None
        if not online:
            if rnd > 1:
                scores = generate_and_score(policies if variant.per_language
                                            else policies[None])
            pairs = uri("pairs", st.Pairs(score_uris=scores, prompts_uris=prompts,
                                          pairing=pairing).key())
            ids["pairs"].add(storage.key_of(pairs))
        runs = {lang: uri("training", variant_spec(
            cfg, variant, policy=policies[lang], pairs_uri=pairs, prompts_uris=prompts,
            lang=lang).key()) for lang in langs}
        ids["training"].update(storage.key_of(u) for u in runs.values())
    return None if variant.per_language else runs[None]


def _evaluation(cfg: CrocoConfig, prompts, finals, ids, uri) -> None:
    """The identities `croco.flows.stages.croco_evaluate` produces."""
    from croco import stages as st

    ev = cfg.evaluation
    eval_prompts = cfg.prompts.model_copy(update={"split": ev.split, "limit": ev.limit})
    eval_gen = cfg.generation.model_copy(update={
        "k": ev.k, "temperature": ev.temperature, "shard_size": 256,
        "max_new_tokens": ev.max_new_tokens or cfg.generation.max_new_tokens})
    models = {"base": cfg.policy}
    models.update({name: cfg.policy.model_copy(update={"adapter": storage.join(u, "adapter")})
                   for name, u in finals.items()})
    eval_scores = {}
    for name, policy in models.items():
        g = st.GenerateLanguages(prompts_uris=prompts, policy=policy, gen=eval_gen,
                                 prompts_cfg=eval_prompts).key()
        ids["heldout-generations"].update(f"{g}/{lang}" for lang in prompts)
        gens = {lang: uri("generations", g, lang) for lang in sorted(prompts)}
        s = st.ScoreLanguages(generations_uris=gens, prompts_uris=prompts,
                              reward=cfg.reward).key()
        ids["heldout-scores"].update(f"{s}/{lang}" for lang in prompts)
        eval_scores[name] = {lang: uri("scores", s, lang) for lang in sorted(prompts)}
    if ev.reward_check:
        ids["reward-check"].add(st.RewardCheck(path=ev.reward_check, reward=cfg.reward,
                                               langs=cfg.languages).key())
    sc = ev.structured
    if sc.enabled and (sc.local_mc or sc.tasks or sc.backend == "euroeval"):
        ids["structured"].update(st.Structured(policy=p, structured=sc,
                                               langs=cfg.languages).key()
                                 for p in models.values())
    if ev.judge.enabled and finals:
        ids["judgments"].update(st.Judge(candidate_scores=eval_scores[name],
                                         baseline_scores=eval_scores["base"],
                                         prompts_uris=prompts, judge=ev.judge).key()
                                for name in finals)


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
    from croco.config import load_config

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
    from croco.config import config_from_dict

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
    rows = []
    for path, exec_only in leaf_fields(cfg):
        after = run_identities(with_change(cfg, path))
        rows.append({"field": path, "execution_only": exec_only,
                     "reruns": [s.name for s in STAGES if s.name in reruns(before, after)],
                     "stops": [s.name for s in STAGES if before[s.name] and not after[s.name]]})
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
        "",
        "Stages:",
        "",
    ]
    lines += [f"- `{s.name}` (`{s.folder}/`): {s.doc}" for s in STAGES]
    lines += ["", "| field | reruns |", "|---|---|"]
    for r in rows:
        if r["execution_only"]:
            what = f"nothing ({r['execution_only']})"
        else:
            what = ", ".join(r["reruns"]) or "nothing"
            if r["stops"]:
                what += f"; turns off {', '.join(r['stops'])}"
        lines.append(f"| `{r['field']}` | {what} |")
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
