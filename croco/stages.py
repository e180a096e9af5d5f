"""The pipeline's stages, one spec each (the contract and the runner: `croco.stage`).

Every stage's output lives at `<data_root>/<folder>/<key>[/lang=xx]`, where the key
hashes the stage's code version, its identity (its config without the execution-only
settings, its inputs' keys, files by content: `croco.identity`). `croco.stage.run(stage,
data_root)` returns a complete output at once and otherwise writes it, `_SUCCESS` last
(written by the runner from what `work` returns: no stage marks itself);
generate and score write numbered parts and resume part by part, from the sample and
score stores (`croco.samples`), possibly as several shard groups at once (the grouping
enters no key: a sample's draws depend on the seed, its prompt and its index only).

Layout (hive-partitioned by `lang=`):
    prompts/<key>/lang=xx/data.parquet
    samples/<key>/lang=xx/<shard>.parquet, <shard>.prompts.parquet
    generations/<key>/lang=xx/part-00000.parquet ..., generations/<key>/_plans/lang=xx.json
    scored/<key>/lang=xx/<shard>.parquet
    scores/<key>/lang=xx/part-00000.parquet ...
    pairs/<key>/{dpo,sft}/lang=xx/data.parquet, pools.parquet, stats.parquet
    ref_logps/<key>[/lang=xx]/data.parquet
    training/<key>/adapter/, metrics.json, training_config.json
    judgments/<key>/, structured/<key>/, reward_check/<key>/
    runs/<run_id>/manifest.json, heldout.parquet, report.md

The `run_*` functions at the end are the same stages as plain calls. The specs stay in
one module, a section per family (prompts, generation, scoring, pairing, training,
evaluation), because each is short and together they read as the pipeline's table of
contents; the heavy code each calls lives in its family's package.
"""

from __future__ import annotations

import threading

import polars as pl

from croco import storage
from croco.config import (
    GenerationConfig,
    JudgeEvalConfig,
    PairingConfig,
    PolicyConfig,
    PromptsConfig,
    RewardConfig,
    StructuredEvalConfig,
    TrainingConfig,
)
from croco.identity import STAGE_VERSIONS, identity, path_identity
from croco.samples import (
    StoreSampler,
    make_plan,
    plan_uri,
    prompt_identity,  # noqa: F401 - part of this module's interface
    read_plan,
    sample_store_uri,
    score_shard,
    scored_shard,
    scored_store_uri,
    stored_shards,
)
from croco.stage import (
    LanguagesTogether,
    Parts,
    Progress,
    ShardedStage,
    Stage,
    completion_info,
    part_name,
    run,
    run_once,  # noqa: F401 - part of this module's interface
    seal,
    shard_group,  # noqa: F401 - part of this module's interface
)
from croco.storage import key_of
from croco.training.spec import TrainSpec


def _keys(uris: dict[str, str]) -> dict[str, str]:
    return {k: key_of(u) for k, u in sorted(uris.items())}


def _prompts(uris: dict[str, str], langs) -> pl.DataFrame:
    return pl.concat([storage.read_parquet(storage.join(uris[lang], "data.parquet"))
                      for lang in langs], how="diagonal_relaxed")


# --------------------------------------------------------------------------- prompts


class Prompts(Stage):
    """One language's prompts from the source, validated (translated from
    `translate.source_lang` when `cfg.translate` is set): `data.parquet`."""

    folder = "prompts"
    cfg: PromptsConfig
    lang: str
    device: str = "auto"

    def identity(self) -> dict:
        # which prompts generation takes (`split`, `limit`) is generation's choice
        return {k: v for k, v in identity(self.cfg).items() if k not in ("split", "limit")}

    def label(self) -> str:
        return f"prompts-{self.lang}"

    def uses_gpu(self) -> bool:
        return self.cfg.translate is not None

    def work(self, out: str, progress: Progress | None) -> dict:
        from croco.prompts import PromptError, load_prompts, translate_prompts

        cfg, lang = self.cfg, self.lang
        table = load_prompts(cfg.path, dataset_split=cfg.dataset_split)
        if cfg.translate is not None:
            src = cfg.translate.source_lang
            source = table.filter(pl.col("lang") == src)
            if source.is_empty():
                raise PromptError(f"{cfg.path}: prompts.translate.source_lang is {src!r} but "
                                  f"the file has prompts in {sorted(table['lang'].unique())} only")
            t = cfg.translate
            df = source if lang == src else translate_prompts(
                source, lang, model=t.model, template=t.template,
                max_new_tokens=t.max_new_tokens, batch_size=t.batch_size, device=self.device)
        else:
            df = table.filter(pl.col("lang") == lang)
            if df.is_empty():
                raise PromptError(
                    f"{cfg.path}: no prompts in language {lang!r} (the source has "
                    f"{sorted(table['lang'].unique())}); remove it from `languages` or add "
                    "prompts.translate to translate from one language")
        # kept: the generate stage reads it next, in this process when the flow runs in one
        storage.write_parquet(df, storage.join(out, "data.parquet"), keep=True)
        return {"rows": df.height}


# ------------------------------------------------------------------------ generation


#: Generation prompts read in this process, by (prompts file, split, limit).
_PROMPTS: dict[tuple, pl.DataFrame] = {}
_PROMPTS_LOCK = threading.Lock()


class Generate(ShardedStage):
    """k samples for each selected prompt of one language, part by part. Part i holds the
    samples of the prompts of the plan's part i (`croco.samples.make_plan`), read from the
    sample store, or sampled into it first (seeded by the stored shard's name, so a
    shard's samples do not depend on the run, its grouping or its position)."""

    folder = "generations"
    planned = True
    prompts_uri: str
    lang: str
    policy: PolicyConfig
    gen: GenerationConfig
    prompts_cfg: PromptsConfig

    def identity(self) -> dict:
        return {"prompts": key_of(self.prompts_uri), "policy": identity(self.policy),
                "generation": identity(self.gen), "split": self.prompts_cfg.split,
                "limit": self.prompts_cfg.limit, "samples": STAGE_VERSIONS["samples"]}

    def label(self) -> str:
        return f"generate-{self.lang}"

    def prompts(self) -> pl.DataFrame:
        """The prompts this output samples. Read once per process for a prompts output (its
        key names its content, so the file never changes) and selection: the plan and the
        sampler both ask."""
        from croco.prompts import select_for_generation

        cfg = self.prompts_cfg
        uri = storage.join(self.prompts_uri, "data.parquet")
        memo = (uri, cfg.split, cfg.limit)
        with _PROMPTS_LOCK:
            prompts = _PROMPTS.get(memo)
        if prompts is None:
            prompts = select_for_generation(storage.read_parquet(uri), split=cfg.split,
                                            limit=cfg.limit)
            with _PROMPTS_LOCK:
                _PROMPTS[memo] = prompts
                while len(_PROMPTS) > 64:
                    _PROMPTS.pop(next(iter(_PROMPTS)))
        if prompts.is_empty():
            raise ValueError(f"no {cfg.split!r} prompts for language {self.lang!r} in "
                             f"{self.prompts_uri}; check prompts.split")
        return prompts

    def plan(self, data_root: str, listed: dict | None = None) -> dict:
        """Which stored shard each part comes from (made once, then read back; the
        prompts are read only to make it). `listed`: see `croco.samples.make_plan`."""
        store = sample_store_uri(self.policy, self.gen, self.lang, data_root)
        return make_plan(self.output(data_root), self.prompts, store, self.gen.shard_size,
                         listed)

    def prepare(self, data_root: str) -> str:
        self.plan(data_root)
        return plan_uri(self.output(data_root))

    def n_parts(self, data_root: str) -> int:
        return len(self.plan(data_root)["parts"])

    def parts(self, data_root: str) -> Parts:
        return _GenerateParts(self, data_root)

    def summary(self, result: str) -> str:
        info = completion_info(result)
        return (f"{info.get('rows')} samples for {self.lang} ({info.get('generated_rows')} "
                f"sampled now, the others from the sample store) in {info.get('seconds')}s "
                f"-> {result}")


class _GenerateParts(Parts):
    """Part i: the plan's stored shard, referenced when the part is all of it (sampled
    into the store first when missing), else its rows of the part's prompts."""

    def __init__(self, stage: Generate, data_root: str):
        listed: dict = {}
        self.plan = stage.plan(data_root, listed)
        # made just now: the shards its listing found stored (taken by the first `stored`)
        self.stored_at_planning = listed.get("stored")
        self.count = len(self.plan["parts"])
        self.k = stage.gen.k
        self.sampler = StoreSampler(self.plan["store"], plan_uri(stage.output(data_root)),
                                    stage.prompts, stage.lang, stage.policy, stage.gen)

    def rows(self, i: int) -> pl.DataFrame:
        entry = self.plan["parts"][i]
        df = self.sampler.samples(entry["shard"], entry["prompt_ids"])
        return df.filter(pl.col("prompt_id").is_in(entry["prompt_ids"]))

    def reference(self, i: int) -> str | None:
        entry = self.plan["parts"][i]
        return (storage.join(self.plan["store"], f"{entry['shard']}.parquet")
                if entry.get("whole") else None)

    def stored(self) -> set[int]:
        # the plan's own listing when this object has just made it (one listing, not two)
        have, self.stored_at_planning = self.stored_at_planning, None
        if have is None:
            have = stored_shards(self.plan["store"])
        return {i for i, e in enumerate(self.plan["parts"])
                if e.get("whole") and e["shard"] in have}

    def store(self, i: int) -> None:
        entry = self.plan["parts"][i]
        self.sampler.make(entry["shard"], entry["prompt_ids"])

    def total_rows(self) -> int:
        return self.k * sum(len(e["prompt_ids"]) for e in self.plan["parts"])  # k a prompt

    def info(self) -> dict:
        return {"generated_rows": self.sampler.generated_rows}


class GenerateLanguages(LanguagesTogether):
    """Held-out answers: k samples for the selected prompts of every language, generated
    together (one model load, full batches however few prompts a language has); the
    `Generate` layout, one part and `_SUCCESS` per language. All or nothing: the sets it
    is meant for are small. `name`: the model's name in the run (a label)."""

    folder = "generations"
    versioned_as = "heldout_generations"
    prompts_uris: dict[str, str]
    policy: PolicyConfig
    gen: GenerationConfig
    prompts_cfg: PromptsConfig
    name: str = ""

    def identity(self) -> dict:
        return {"languages_together": True, "prompts": _keys(self.prompts_uris),
                "policy": identity(self.policy), "generation": identity(self.gen),
                "split": self.prompts_cfg.split, "limit": self.prompts_cfg.limit}

    def label(self) -> str:
        return f"generate-{self.name}"

    def languages(self) -> list[str]:
        return list(self.prompts_uris)

    def work(self, out: str, progress: Progress | None) -> dict[str, dict]:
        from croco.generation import (generate_frame, make_generator, policy_label,
                                      vllm_options)
        from croco.prompts import select_for_generation

        policy, gen, cfg = self.policy, self.gen, self.prompts_cfg
        prompts = pl.concat([
            select_for_generation(storage.read_parquet(storage.join(uri, "data.parquet")),
                                  split=cfg.split, limit=cfg.limit)
            for _, uri in sorted(self.prompts_uris.items())], how="diagonal_relaxed")
        for lang in sorted(self.prompts_uris):
            if prompts.filter(pl.col("lang") == lang).is_empty():
                raise ValueError(f"no {cfg.split!r} prompts for language {lang!r} in "
                                 f"{self.prompts_uris[lang]}; check prompts.split")
        generator = make_generator(gen.backend, policy.model, adapter=policy.adapter,
                                   device=policy.device, dtype=policy.dtype,
                                   tensor_parallel_size=gen.tensor_parallel_size, seed=gen.seed,
                                   work_tokens=prompts.height * gen.k * gen.max_new_tokens,
                                   **vllm_options(gen))
        df = generate_frame(
            generator, prompts, k=gen.k, temperature=gen.temperature, top_p=gen.top_p,
            max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
            seed=gen.seed, policy=policy_label(policy.model, policy.adapter),
            respond_in_language=gen.respond_in_language,
            instruction_template=gen.instruction_template)
        return _write_by_language(df, self.folders(out))


def _write_by_language(df: pl.DataFrame, outs: dict[str, str]) -> dict[str, dict]:
    """Each language's rows as the one part of its folder; lang -> what its `_SUCCESS`
    records."""
    infos = {}
    for lang, uri in outs.items():
        part = df.filter(pl.col("lang") == lang)
        storage.write_parquet(part, storage.join(uri, part_name(0)))
        infos[lang] = {"rows": part.height, "shards": 1}
    return infos


# ---------------------------------------------------------------------------- scoring


def generation_parts(generations_uri: str) -> list[str]:
    """The part files of a complete generations output (URIs, referenced parts included),
    in part order."""
    try:
        info = storage.marker_info(generations_uri)
    except FileNotFoundError:
        raise RuntimeError(f"generations at {generations_uri} are incomplete; rerun "
                           "generation") from None
    if info.get("shards") and info.get("referenced") == info["shards"]:
        # every part references a stored shard: `_parts.json` names them all, no listing
        refs = storage.references(generations_uri)
        if len(refs) == info["shards"]:
            return [refs[name] for name in sorted(refs)]
    return storage.parquet_files(generations_uri)


class Score(ShardedStage):
    """The configured scorers' rewards of one language's generations, part by part (part i
    scores generation part i; from the scored copy of its stored shard when the
    generations came from the sample store)."""

    folder = "scores"
    generations_uri: str
    prompts_uri: str
    lang: str
    reward: RewardConfig

    def identity(self) -> dict:
        return {"generations": key_of(self.generations_uri), "reward": identity(self.reward)}

    def label(self) -> str:
        return f"score-{self.lang}"

    def n_parts(self, data_root: str) -> int:
        return len(generation_parts(self.generations_uri))

    def parts(self, data_root: str) -> Parts:
        return _ScoreParts(self, data_root)

    def summary(self, result: str) -> str:
        info = completion_info(result)
        return (f"scored {info.get('rows')} samples for {self.lang} in "
                f"{info.get('seconds')}s -> {result}")


class _ScoreParts(Parts):
    """Part i: the scores of generation part i. From a planned generations output, the
    scored copy of its stored shard (kept in the score store), referenced when the part is
    all of it; otherwise scored here."""

    def __init__(self, stage: Score, data_root: str):
        self.stage, self.data_root = stage, data_root
        self.files = generation_parts(stage.generations_uri)
        self.count = len(self.files)
        self.plan = read_plan(plan_uri(stage.generations_uri))
        self.scored = (scored_store_uri(self.plan["store"], stage.lang, stage.reward,
                                        data_root) if self.plan is not None else None)
        self.prompts = None

    def reference(self, i: int) -> str | None:
        if self.plan is None or not self.plan["parts"][i].get("whole"):
            return None
        return storage.join(self.scored, f"{self.plan['parts'][i]['shard']}.parquet")

    def stored(self) -> set[int]:
        if self.plan is None:
            return set()
        have = set(storage.list_dir(self.scored))
        return {i for i, e in enumerate(self.plan["parts"])
                if e.get("whole") and f"{e['shard']}.parquet" in have}

    def store(self, i: int) -> None:
        s = self.stage
        score_shard(self.plan["store"], self.plan["parts"][i]["shard"], s.reward,
                    self.reference(i))

    def total_rows(self) -> int | None:
        return completion_info(self.stage.generations_uri).get("rows")  # a score a sample

    def rows(self, i: int) -> pl.DataFrame:
        from croco.reward import score_frame

        s = self.stage
        if self.plan is not None:  # from the scored copy of its stored shard
            entry = self.plan["parts"][i]
            scored = scored_shard(self.plan["store"], entry["shard"], s.lang, s.reward,
                                  self.data_root)
            return scored.filter(pl.col("prompt_id").is_in(entry["prompt_ids"]))
        if self.prompts is None:
            self.prompts = storage.read_parquet(storage.join(s.prompts_uri, "data.parquet"))
        gens = storage.read_parquet(self.files[i])
        return score_frame(gens, self.prompts, s.reward.scorers, device=s.reward.device)


class ScoreLanguages(LanguagesTogether):
    """The rewards of every language's held-out answers, scored together (full batches,
    each scorer loaded once); the `Score` layout, one part and `_SUCCESS` per language."""

    folder = "scores"
    versioned_as = "heldout_scores"
    generations_uris: dict[str, str]
    prompts_uris: dict[str, str]
    reward: RewardConfig
    name: str = ""

    def identity(self) -> dict:
        return {"languages_together": True, "generations": _keys(self.generations_uris),
                "reward": identity(self.reward)}

    def label(self) -> str:
        return f"score-{self.name}"

    def languages(self) -> list[str]:
        return list(self.generations_uris)

    def work(self, out: str, progress: Progress | None) -> dict[str, dict]:
        from croco.reward import score_frame

        langs = sorted(self.generations_uris)
        for uri in self.generations_uris.values():
            if not storage.is_complete(uri):
                raise RuntimeError(f"generations at {uri} are incomplete; rerun generation")
        gens = pl.concat([storage.read_parquet(self.generations_uris[lang]) for lang in langs],
                         how="diagonal_relaxed")
        scored = score_frame(gens, _prompts(self.prompts_uris, langs), self.reward.scorers,
                             device=self.reward.device)
        return _write_by_language(scored, self.folders(out))


# ---------------------------------------------------------------------------- pairing


class Pairs(Stage):
    """DPO pairs and SFT rows from the scores of every language, plus per-language stats.
    Reads the score columns of every part, selects the pools once, then fetches only the
    chosen and rejected texts part by part (`croco.pairs_io`)."""

    folder = "pairs"
    gpu = False
    score_uris: dict[str, str]
    prompts_uris: dict[str, str]
    pairing: PairingConfig

    def identity(self) -> dict:
        return {"scores": _keys(self.score_uris), "prompts": _keys(self.prompts_uris),
                "pairing": identity(self.pairing)}

    def label(self) -> str:
        return f"pair-{self.pairing.scope}"

    def work(self, out: str, progress: Progress | None) -> dict:
        from croco import pairs_io

        langs = sorted(self.score_uris)
        parts = [p for lang in langs for p in storage.parquet_files(self.score_uris[lang])]
        sets = pairs_io.pair_shards(parts, _prompts(self.prompts_uris, langs), self.pairing)
        return pairs_io.write_pair_sets(sets, out, langs)

    def summary(self, result: str) -> str:
        info = completion_info(result)
        return f"{info.get('rows')} pairs ({info.get('skipped')} pools skipped) -> {result}"


# --------------------------------------------------------------------------- training


class RefLogps(Stage):
    """The reference model's log-probs of a pairs output's DPO pairs (`lang`: one
    language's only, for a per-language model), computed once and read by every DPO
    variant trained on those pairs from that starting policy
    (`croco.training.dpo.reference_logps`): `data.parquet` (pair_id, ref_chosen_logps,
    ref_rejected_logps). Keyed by the pairs, the reference (`policy`, its adapter when a
    round continues one), the max length and the precision setting; `_SUCCESS` records
    whether they were computed in bf16 (`precision: auto` decides on the machine)."""

    folder = "ref_logps"
    pairs_uri: str
    policy: PolicyConfig
    training: TrainingConfig
    lang: str | None = None

    def identity(self) -> dict:
        return {"pairs": key_of(self.pairs_uri), "policy": identity(self.policy),
                "max_length": self.training.max_length, "precision": self.training.precision}

    def label(self) -> str:
        return "ref-logps" + (f"-{self.lang}" if self.lang else "")

    def work(self, out: str, progress: Progress | None) -> dict:
        from croco.models import local_adapter
        from croco.training.dpo import reference_logps

        pairs = storage.read_parquet(storage.join(self.pairs_uri, "dpo"))
        if self.lang:
            pairs = pairs.filter(pl.col("prompt_lang") == self.lang)
        table, bf16 = reference_logps(pairs, policy=self.policy.model,
                                      adapter=local_adapter(self.policy.adapter),
                                      cfg=self.training)
        storage.write_parquet(table, storage.join(out, "data.parquet"))
        return {"rows": table.height, "bf16": bf16}


class Train(Stage):
    """One training run (`croco.training.run.train`, the spec's method); on a machine
    with several GPUs, DPO and SFT train data parallel on all of them. Its key is the
    spec's (`TrainSpec.key`). `progress`, in one process: a (steps done, total) callable,
    or a transformers `TrainerCallback` given to the trainer as it is (the Prefect task's
    live artifacts, `croco.tasks.training`)."""

    folder = "training"
    spec: TrainSpec

    def identity(self) -> dict:
        return {k: v for k, v in self.spec.identity().items() if k not in ("stage", "v")}

    def label(self) -> str:
        return f"train-{self.spec.variant_name}"

    def work(self, out: str, progress: Progress | None) -> dict:
        from croco.training.run import train

        spec = self.spec
        if spec.uri() != out:  # the spec's data root is the runner's
            spec = spec.model_copy(update={"data_root": out.rsplit("/training/", 1)[0]})
        n_gpus = _gpu_count()
        if n_gpus > 1 and spec.method in ("dpo", "sft"):
            from croco.training.launch import run_train_distributed

            run_train_distributed(n_gpus, spec)  # its main process marks the output
            return {k: v for k, v in completion_info(out).items() if k != "seconds"}
        return train(spec, out, callbacks=progress_callbacks(progress))

    def summary(self, result: str) -> str:
        m = storage.read_json(storage.join(result, "metrics.json"))
        return f"trained {self.spec.variant_name}: loss {m.get('first_loss')} -> " \
               f"{m.get('final_loss')} -> {result}"

    def artifact(self, result: str):
        m = storage.read_json(storage.join(result, "metrics.json"))
        keys = ["method", "pairs_train", "rows_train", "steps", "first_loss", "final_loss",
                "rewards/accuracies", "rewards/margins", "eval_loss", "tokens_per_second",
                "ref_logps", "ref_forward_batches", "off_policy", "train_runtime",
                "pairs_generated"]
        lang = self.spec.lang
        return (f"train-metrics-{self.spec.variant_name}{'-' + lang if lang else ''}",
                f"training metrics, variant {self.spec.variant_name}",
                [{"metric": k, "value": str(m.get(k))} for k in keys if k in m])


def progress_callbacks(progress: Progress | None) -> list:
    """The trainer callbacks that report a training's `progress`: a `TrainerCallback`
    itself, or one calling `progress(step, max_steps)` after every step."""
    if progress is None:
        return []
    from transformers import TrainerCallback

    if isinstance(progress, TrainerCallback):
        return [progress]

    class StepProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress(state.global_step, state.max_steps)

    return [StepProgress()]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ------------------------------------------------------------------- evaluation


class Judge(Stage):
    """The candidate's held-out answers judged against the baseline's, both orders:
    `judgments.parquet` and `win_rates.parquet` (see croco.evaluation.winrate)."""

    folder = "judgments"
    candidate_scores: dict[str, str]
    baseline_scores: dict[str, str]
    prompts_uris: dict[str, str]
    judge: JudgeEvalConfig
    name: str = ""
    device: str = "auto"

    def identity(self) -> dict:
        return {"candidate": _keys(self.candidate_scores),
                "baseline": _keys(self.baseline_scores), "judge": identity(self.judge)}

    def label(self) -> str:
        return f"judge-{self.name}"

    def work(self, out: str, progress: Progress | None) -> dict:
        from croco.evaluation.judge import judge_pairs
        from croco.evaluation.winrate import JUDGE_TEMPLATE, win_rates

        langs, judge = sorted(self.candidate_scores), self.judge

        def answers(uris: dict[str, str], name: str) -> pl.DataFrame:
            df = pl.concat([storage.read_parquet(uris[lang]) for lang in langs])
            return df.filter(pl.col("sample_idx") == 0).select(
                "prompt_id", "lang", pl.col("response").alias(name))

        prompts = _prompts(self.prompts_uris, langs).select("prompt_id", "lang", "prompt")
        pairs = (answers(self.candidate_scores, "candidate")
                 .join(answers(self.baseline_scores, "baseline"), on=["prompt_id", "lang"])
                 .join(prompts, on=["prompt_id", "lang"]).sort("lang", "prompt_id"))
        judgments = judge_pairs(
            pairs, judge_model=judge.model, template=judge.template or JUDGE_TEMPLATE,
            mode=judge.mode, temperature=judge.temperature, max_new_tokens=judge.max_new_tokens,
            batch_size=judge.batch_size, seed=judge.seed, device=self.device,
            calibrate=judge.calibrate, backend=judge.backend)
        rates = win_rates(judgments, n_bootstrap=judge.n_bootstrap, seed=judge.seed)
        storage.write_parquet(judgments, storage.join(out, "judgments.parquet"))
        storage.write_parquet(rates, storage.join(out, "win_rates.parquet"))
        valid = judgments.filter(pl.col("verdict").is_not_null())
        return {"rows": judgments.height, "invalid": int(judgments["verdict"].null_count()),
                # share of verdicts for whichever answer was shown first: far from 0.5
                # means the judge has a position bias
                "first_position_share": (float((valid["verdict"] == "1").mean())
                                         if valid.height else None)}

    def artifact(self, result: str):
        rates = storage.read_parquet(storage.join(result, "win_rates.parquet"))
        return (f"win-rates-{self.name}",
                f"win rate of {self.name} against the base, per language", rates.to_dicts())


class Structured(Stage):
    """Multiple-choice accuracy of one model per language and task (lm-eval, or
    EuroEval): `results.parquet` (lang, task, metric, value, n)."""

    folder = "structured"
    policy: PolicyConfig
    structured: StructuredEvalConfig
    langs: list[str]
    name: str = ""

    def identity(self) -> dict:
        return {"policy": identity(self.policy), "langs": sorted(self.langs),
                "cfg": identity(self.structured)}

    def label(self) -> str:
        return f"structured-{self.name}"

    def work(self, out: str, progress: Progress | None) -> dict:
        from croco.evaluation.structured import evaluate_euroeval, evaluate_structured
        from croco.models import (dtype_name, load_model, local_adapter, pick_device,
                                  pick_dtype, resolve_model)

        policy, st, langs = self.policy, self.structured, self.langs
        policy = policy.model_copy(update={"adapter": local_adapter(policy.adapter)})
        device = pick_device(policy.device)
        dtype = dtype_name(pick_dtype(policy.dtype, device))
        if st.backend == "euroeval":
            df = evaluate_euroeval(
                resolve_model(policy.model), adapter=policy.adapter, langs=langs,
                datasets=st.euroeval_datasets, tasks=st.euroeval_tasks,
                few_shot=st.euroeval_few_shot, iterations=st.euroeval_iterations,
                test_split=st.euroeval_test_split, device=str(device), dtype=dtype)
        else:
            # The hf backend scores the model croco has in memory (the held-out answers
            # loaded it, adapter merged) rather than loading it again with the adapter apart.
            loaded = (load_model(policy.model, adapter=policy.adapter, device=policy.device,
                                 dtype=policy.dtype) if st.backend == "hf" else None)
            df = evaluate_structured(
                resolve_model(policy.model), adapter=policy.adapter,
                tasks={lang: t for lang, t in st.tasks.items() if lang in langs},
                local_mc=st.local_mc, langs=langs, backend=st.backend,
                batch_size=st.batch_size, limit=st.limit, device=str(device), dtype=dtype,
                loaded=loaded)
        storage.write_parquet(df, storage.join(out, "results.parquet"))
        return {"rows": df.height}

    def artifact(self, result: str):
        rows = storage.read_parquet(storage.join(result, "results.parquet")).to_dicts()
        return (f"structured-{self.name}",
                f"structured task scores per language, {self.name}", rows)


class RewardCheck(Stage):
    """The run's reward's ranking accuracy per language on the preference set `path`
    (by content: an edited set is a new input): `accuracy.parquet`."""

    folder = "reward_check"
    path: str
    reward: RewardConfig
    langs: list[str]

    def identity(self) -> dict:
        return {"set": path_identity(self.path), "langs": sorted(self.langs),
                "reward": identity(self.reward)}

    def label(self) -> str:
        return "reward-check"

    def work(self, out: str, progress: Progress | None) -> dict:
        from croco.evaluation.reward_check import load_preference_set, ranking_accuracy

        prefs = load_preference_set(self.path).filter(pl.col("lang").is_in(self.langs))
        table = ranking_accuracy(prefs, self.reward.scorers, device=self.reward.device)
        storage.write_parquet(table, storage.join(out, "accuracy.parquet"))
        return {"rows": table.height}

    def artifact(self, result: str):
        rows = storage.read_parquet(storage.join(result, "accuracy.parquet")).to_dicts()
        return "reward-check", "reward ranking accuracy per language", rows


# ------------------------------------------------------------------ held-out summary


def heldout_summary(scores: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """One row per (model, lang): answers, mean reward, share in the prompt's language."""
    frames = []
    for model, df in scores.items():
        frames.append(df.group_by("lang").agg(
            pl.len().alias("answers"),
            pl.col("reward").mean().alias("reward_mean"),
            (pl.col("detected_lang") == pl.col("lang")).mean().alias("lang_match"),
            pl.col("n_tokens").mean().alias("mean_tokens"),
        ).with_columns(pl.lit(model).alias("model")))
    out = pl.concat(frames).select("model", "lang", "answers", "reward_mean", "lang_match",
                                   "mean_tokens")
    return out.sort("model", "lang")


def run_heldout_summary(score_uris: dict[str, dict[str, str]], data_root: str,
                        run_id: str) -> str:
    """`score_uris`: model name -> lang -> scores URI. Writes the run's summary table
    (a view of the run, in `runs/<run_id>/`, not a stage output)."""
    scores = {model: pl.concat([storage.read_parquet(u) for u in by_lang.values()],
                               how="diagonal_relaxed")
              for model, by_lang in score_uris.items()}
    uri = storage.join(data_root, "runs", run_id, "heldout.parquet")
    storage.write_parquet(heldout_summary(scores), uri)
    return uri


# ------------------------------------------------------------ the stages as plain calls


def run_prompts(cfg: PromptsConfig, lang: str, data_root: str, *, device: str = "auto") -> str:
    return run(Prompts(cfg=cfg, lang=lang, device=device), data_root)


def run_generate(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                 prompts_cfg: PromptsConfig, data_root: str, *, progress: Progress | None = None,
                 on_shard=None, shards: range | None = None) -> str:
    stage = Generate(prompts_uri=prompts_uri, lang=lang, policy=policy, gen=gen,
                     prompts_cfg=prompts_cfg)
    return run(stage, data_root, progress=progress, shards=shards, on_shard=on_shard)


def generation_uri(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                   prompts_cfg: PromptsConfig, data_root: str) -> str:
    return Generate(prompts_uri=prompts_uri, lang=lang, policy=policy, gen=gen,
                    prompts_cfg=prompts_cfg).output(data_root)


def generation_plan(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                    prompts_cfg: PromptsConfig, data_root: str) -> dict:
    return Generate(prompts_uri=prompts_uri, lang=lang, policy=policy, gen=gen,
                    prompts_cfg=prompts_cfg).plan(data_root)


def seal_generations(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                     prompts_cfg: PromptsConfig, data_root: str) -> str:
    return seal(Generate(prompts_uri=prompts_uri, lang=lang, policy=policy, gen=gen,
                         prompts_cfg=prompts_cfg), data_root)


def run_generate_languages(prompts_uris: dict[str, str], policy: PolicyConfig,
                           gen: GenerationConfig, prompts_cfg: PromptsConfig,
                           data_root: str) -> dict[str, str]:
    return run(GenerateLanguages(prompts_uris=prompts_uris, policy=policy, gen=gen,
                                 prompts_cfg=prompts_cfg), data_root)


def run_score(generations_uri: str, prompts_uri: str, lang: str, reward: RewardConfig,
              data_root: str, *, progress: Progress | None = None,
              shards: range | None = None) -> str:
    stage = Score(generations_uri=generations_uri, prompts_uri=prompts_uri, lang=lang,
                  reward=reward)
    return run(stage, data_root, progress=progress, shards=shards)


def run_score_languages(generations_uris: dict[str, str], prompts_uris: dict[str, str],
                        reward: RewardConfig, data_root: str) -> dict[str, str]:
    return run(ScoreLanguages(generations_uris=generations_uris, prompts_uris=prompts_uris,
                              reward=reward), data_root)


def run_pairs(score_uris: dict[str, str], prompts_uris: dict[str, str], pairing: PairingConfig,
              data_root: str) -> str:
    return run(Pairs(score_uris=score_uris, prompts_uris=prompts_uris, pairing=pairing),
               data_root)


def run_judge(candidate_scores: dict[str, str], baseline_scores: dict[str, str],
              prompts_uris: dict[str, str], judge: JudgeEvalConfig, data_root: str, *,
              device: str = "auto") -> str:
    return run(Judge(candidate_scores=candidate_scores, baseline_scores=baseline_scores,
                     prompts_uris=prompts_uris, judge=judge, device=device), data_root)


def run_structured(policy: PolicyConfig, structured: StructuredEvalConfig, langs: list[str],
                   data_root: str) -> str:
    return run(Structured(policy=policy, structured=structured, langs=langs), data_root)


def run_reward_check(path: str, reward: RewardConfig, langs: list[str], data_root: str) -> str:
    return run(RewardCheck(path=path, reward=reward, langs=langs), data_root)
