"""Publishing a run on the Hugging Face Hub: its preference sets as one dataset, each
variant's adapter as a model repository, each with a card made from the run's manifest.

`publish(manifest, dataset=...)` checks what it can before it uploads anything: the token
(HF_TOKEN or a saved login), the repository names, and that the token's account may write
there (`whoami`: its user and organisations; a repository under another namespace is
someone else's). Then it writes every file into a staging folder (`stage_dataset`,
`stage_model`; no network) and uploads each repository with `HfApi.upload_folder`, which
leaves out every file whose content the repository already holds: publishing the same run
again commits nothing, and a publish that was interrupted uploads only what is missing.

The dataset: one config per scope, one split per language, Parquet files under
`<config>/<lang>.parquet` declared in the card's YAML `configs:` (the Hub's convention,
so `datasets.load_dataset(repo, "in_lang")` reads it):

- `in_lang`, `all_lang`: DPO pairs (the pair stage's columns) of pools of one prompt in one
  language / over every language, split by the prompt's language; `all_lang` only when
  the run (or one of its variants) paired that way;
- `sft`: the chosen samples of the run's pools, split by language;
- and each sample's reward per scorer next to the combined score
  (`chosen_reward_<scorer>`, `rejected_reward_<scorer>`; `reward_<scorer>` for sft).

A language without rows has no split (the card's statistics still list it).

Each model repository holds the adapter at its root (PEFT's layout), `merged/` when the
run stored merged weights, `curves.png` and `log_history.json` when training recorded
them, and a card: base model, method and hyperparameters, the data (a link to the
dataset), the evaluation per language against the base (the tables of
`croco.evaluation.report.collect`), the curves.

Tokens are never written: not into cards, logs or error messages.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from croco import storage
from croco.errors import UserError
from croco.manifest import StageOutput, read_outputs

SCOPES = ("in_lang", "all_lang")
CONFIGS = ("in_lang", "all_lang", "sft")
#: Folders of a dataset repository that publish owns: a stale file there is removed.
DATASET_FOLDERS = [f"{c}/*" for c in CONFIGS]
#: ... and of a model repository.
MODEL_FOLDERS = ["merged/*"]
#: What each config holds, for the card.
CONFIG_TEXT = {
    "in_lang": "DPO pairs; a pool is one prompt's samples in one language",
    "all_lang": "DPO pairs; a pool is one prompt's samples over every language",
    "sft": "the chosen (highest-reward) sample of each pool, for SFT",
}
CITATION = """\
```bibtex
@misc{croco,
  title         = {CroCo: Cross-Lingual Contrastive Preference Tuning on Self-Generations},
  eprint        = {2605.26293},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2605.26293}
}
```"""
DPO_CITATION = """\
```bibtex
@inproceedings{rafailov2023direct,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning
               and Stefano Ermon and Chelsea Finn},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}
```"""
TRL_CITATION = """\
```bibtex
@misc{vonwerra2020trl,
  title        = {{TRL: Transformer Reinforcement Learning}},
  author       = {Leandro von Werra and Younes Belkada and Lewis Tunstall and Edward Beeching
                  and Tristan Thrush and Nathan Lambert and Shengyi Huang and Kashif Rasul
                  and Quentin Gallou{\\'e}dec},
  year         = {2020},
  publisher    = {GitHub},
  howpublished = {\\url{https://github.com/huggingface/trl}}
}
```"""
#: Training settings a model card lists (the rest are execution only).
HYPERPARAMETERS = ["learning_rate", "sft_learning_rate", "num_train_epochs", "max_steps",
                   "lr_scheduler_type", "warmup_ratio", "weight_decay",
                   "effective_batch_size", "max_length", "beta", "heldout_fraction",
                   "lora_r", "lora_alpha", "lora_dropout", "target_modules", "precision",
                   "seed"]
TRAINING_METRICS = ["pairs_train", "rows_train", "pairs_generated", "steps", "first_loss",
                    "final_loss", "rewards/accuracies", "rewards/margins", "ref_logps"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PublishError(UserError):
    """Publishing cannot start or was refused: no token, a bad repository name, no write
    access. The message names the repository and what to do, never the token."""


# ------------------------------------------------------------------ what a run holds


@dataclass
class PairSet:
    """One scope's DPO pairs: the pairs output, the scores its samples came from and the
    pairing settings that made it."""

    scope: str
    pairs: StageOutput
    scores: dict[str, StageOutput]
    pairing: dict


@dataclass
class ModelRepo:
    """One trained adapter to publish: its repository, the variant (and language, for
    per-language models) and its training output."""

    repo_id: str
    variant: str
    training: StageOutput
    lang: str | None = None
    rounds: int = 1


def pair_sets(manifest: dict) -> dict[str, PairSet]:
    """Scope -> the run's DPO pairs of that scope: the run's own pairing first, then the
    first round of each on-policy variant that pairs another way."""
    outputs = read_outputs(manifest)
    cfg = manifest["config"]
    if outputs.pairs is None:
        raise PublishError(f"run {manifest['run_id']!r} has no pairs (it stopped before the "
                           "pair stage): nothing to publish")
    found = {cfg["pairing"]["scope"]: PairSet(cfg["pairing"]["scope"], outputs.pairs,
                                              outputs.scores, dict(cfg["pairing"]))}
    for variant in cfg.get("experiments", []):
        out = outputs.variants.get(variant["name"])
        if out is None or not out.rounds:
            continue
        pairs = out.rounds[0].pairs
        if pairs is None or variant.get("generation_policy"):
            continue
        pairing = {**cfg["pairing"], **variant.get("pairing", {})}
        found.setdefault(pairing["scope"], PairSet(pairing["scope"], pairs, outputs.scores,
                                                   pairing))
    return {scope: found[scope] for scope in SCOPES if scope in found}


def model_repos(manifest: dict, prefix: str) -> list[ModelRepo]:
    """Each variant's final adapter (per-language variants: one per language) as the
    repository `<prefix>-<variant>[-<lang>]`."""
    outputs = read_outputs(manifest)
    repos = []
    for variant in manifest["config"].get("experiments", []):
        out = outputs.variants.get(variant["name"])
        if out is None or not out.rounds:
            continue
        last = out.rounds[-1]
        if last.training is not None:
            repos.append(ModelRepo(f"{prefix}-{variant['name']}", variant["name"],
                                   last.training, rounds=len(out.rounds)))
        for lang, training in sorted(last.training_by_lang.items()):
            repos.append(ModelRepo(f"{prefix}-{variant['name']}-{lang}", variant["name"],
                                   training, lang=lang, rounds=len(out.rounds)))
    return repos


def _scorer_names(manifest: dict) -> list[str]:
    return [s["name"] for s in manifest["config"]["reward"]["scorers"]]


def _score_columns(scores: dict[str, StageOutput], names: list[str]) -> pl.DataFrame:
    """prompt_id, lang, sample_idx, reward and `reward_<scorer>` of every sample (score
    columns only, never the texts)."""
    cols = ["prompt_id", "lang", "sample_idx", "reward", *[f"reward_{n}" for n in names]]
    frames = []
    for lang, out in sorted(scores.items()):
        for part in storage.parquet_files(out.uri):
            lf = storage.scan_parquet(part)
            schema = lf.collect_schema()
            if "lang" not in schema:
                lf = lf.with_columns(pl.lit(lang).alias("lang"))
            frames.append(lf.select([c for c in cols if c in schema or c == "lang"]).collect())
    if not frames:
        return pl.DataFrame(schema={"prompt_id": pl.String, "lang": pl.String,
                                    "sample_idx": pl.Int64, "reward": pl.Float64})
    return pl.concat(frames, how="diagonal_relaxed").with_columns(
        pl.col("sample_idx").cast(pl.Int64))


def _per_scorer(df: pl.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("reward_")]


def dpo_table(pairs: PairSet, names: list[str]) -> pl.DataFrame:
    """The pairs' DPO rows with each side's reward per scorer (the pool selection,
    `pools.parquet`, says which sample each side is)."""
    dpo = storage.read_parquet(storage.join(pairs.pairs.uri, "dpo"))
    pools = storage.read_parquet(storage.join(pairs.pairs.uri, "pools.parquet")).filter(
        ~pl.col("skipped")).select(
        "prompt_id", "chosen_lang", "rejected_lang",
        pl.col("chosen_sample_idx").cast(pl.Int64), pl.col("rejected_sample_idx").cast(pl.Int64))
    scores = _score_columns(pairs.scores, names)
    out = dpo.join(pools, on=["prompt_id", "chosen_lang", "rejected_lang"], how="left",
                   maintain_order="left")
    for side in ("chosen", "rejected"):
        side_rewards = scores.select(
            "prompt_id", pl.col("lang").alias(f"{side}_lang"),
            pl.col("sample_idx").alias(f"{side}_sample_idx"),
            *[pl.col(c).alias(f"{side}_{c}") for c in _per_scorer(scores)])
        out = out.join(side_rewards, on=["prompt_id", f"{side}_lang", f"{side}_sample_idx"],
                       how="left", maintain_order="left")
    return out.drop("chosen_sample_idx", "rejected_sample_idx")


def sft_table(pairs: StageOutput, scores: dict[str, StageOutput], scope: str,
              names: list[str]) -> pl.DataFrame:
    """The SFT rows with the chosen sample's reward per scorer: the pool's highest raw
    reward, chosen as the pair stage chooses it (`croco.pairing.select_pools`)."""
    from croco.pairing import select_pools

    sft = storage.read_parquet(storage.join(pairs.uri, "sft"))
    table = _score_columns(scores, names)
    chosen = select_pools(table.select("prompt_id", "lang", "sample_idx", "reward"),
                          scope=scope, reject_target="min").select(
        "prompt_id", pl.col("chosen_lang").alias("lang"),
        pl.col("chosen_sample_idx").cast(pl.Int64).alias("sample_idx"))
    chosen = chosen.join(table.select("prompt_id", "lang", "sample_idx", *_per_scorer(table)),
                         on=["prompt_id", "lang", "sample_idx"], how="left")
    return sft.join(chosen.drop("sample_idx"), on=["prompt_id", "lang"], how="left",
                    maintain_order="left")


# ------------------------------------------------------------------ cards


def _md_table(df: pl.DataFrame, floats: int = 3) -> str:
    from croco.evaluation.report import _md_table as table

    return table(df, floats)


def _hub_url(repo_id: str, repo_type: str = "model") -> str:
    from huggingface_hub import constants

    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"{constants.ENDPOINT.rstrip('/')}/{prefix}{repo_id}"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "n>1M"


def _settings(d: dict) -> str:
    return ", ".join(f"`{k}` = {v!r}" if isinstance(v, str) else f"`{k}` = {v}"
                     for k, v in d.items())


def _reward_lines(cfg: dict) -> list[str]:
    lines = ["| scorer | type | model | weight |", "|---|---|---|---|"]
    for s in cfg["reward"]["scorers"]:
        lines.append(f"| {s['name']} | {s['type']} | {s.get('model') or '-'} | {s['weight']} |")
    return lines


def dataset_card(manifest: dict, tables: dict[str, pl.DataFrame], sets: dict[str, PairSet],
                 repo_id: str, license: str, models: list[ModelRepo], data: dict) -> str:
    """The dataset card (YAML metadata as `huggingface_hub.DatasetCard` writes it)."""
    from huggingface_hub import DatasetCardData

    cfg, run_id = manifest["config"], manifest["run_id"]
    langs = list(cfg["languages"])
    configs = []
    for name, df in tables.items():
        lang_col = "prompt_lang" if name in SCOPES else "lang"
        splits = [lang for lang in langs if df.filter(pl.col(lang_col) == lang).height]
        configs.append({"config_name": name, "data_files": [
            {"split": lang, "path": f"{name}/{lang}.parquet"} for lang in splits]})
    total = sum(df.height for df in tables.values())
    meta = DatasetCardData(
        language=langs, license=license, pretty_name=f"CroCo preference pairs, run {run_id}",
        task_categories=["text-generation"], size_categories=[_size_category(total)],
        tags=["croco", "dpo", "preference", "synthetic", "multilingual"], configs=configs)
    gen = cfg["generation"]
    first = next(iter(tables))
    md = [f"# CroCo preference pairs: run `{run_id}`", "",
          f"Preference pairs built by CroCo (cross-lingual contrastive preference tuning on "
          f"self-generations, [arXiv 2605.26293](https://arxiv.org/abs/2605.26293)) from "
          f"`{cfg['policy']['model']}`'s own samples in {len(langs)} languages "
          f"({', '.join(langs)}), scored by the reward below.", "",
          "## Loading", "", "```python", "from datasets import load_dataset", "",
          f'pairs = load_dataset("{repo_id}", "{first}")   # one split per language',
          "```", "",
          "## Configs", "", "| config | rows | " + " | ".join(langs) + " |",
          "|---|---|" + "---|" * len(langs)]
    for name, df in tables.items():
        lang_col = "prompt_lang" if name in SCOPES else "lang"
        counts = {r[lang_col]: r["len"] for r in df.group_by(lang_col).len().to_dicts()}
        md.append(f"| `{name}` | {df.height} | "
                  + " | ".join(str(counts.get(lang, 0)) for lang in langs) + " |")
    md += [""] + [f"- `{name}`: {CONFIG_TEXT[name]}" for name in tables] + [""]
    names = _scorer_names(manifest)
    md += ["Columns of `in_lang` and `all_lang`: `prompt_id`, `prompt_lang`, `prompt`, "
           "`chosen`, `rejected`, `chosen_score`, `rejected_score` (the pairing score: the "
           "combined reward, or its normalised value), `chosen_lang`, `rejected_lang`, "
           "`pool_size`, `scope`, `reject_target`, and each side's reward per scorer: "
           + ", ".join(f"`chosen_reward_{n}`, `rejected_reward_{n}`" for n in names) + ". "
           "Columns of `sft`: `prompt_id`, `lang`, `prompt`, `completion`, `reward`, "
           + ", ".join(f"`reward_{n}`" for n in names) + ".", ""]
    md += ["## Policy and sampling", "",
           f"Policy `{cfg['policy']['model']}`"
           + (f" with adapter `{cfg['policy']['adapter']}`" if cfg["policy"].get("adapter")
              else "")
           + f"; k = {gen['k']} samples per prompt, temperature {gen['temperature']}, "
           f"top-p {gen['top_p']}, at most {gen['max_new_tokens']} new tokens, seed "
           f"{gen['seed']}.", "",
           "## Reward", "", "reward = Σ weight × scorer score", "", *_reward_lines(cfg), ""]
    md += ["## Pairing rule", "",
           "Per pool, chosen = the highest reward (ties: first in (lang, sample_idx) order); "
           "rejected = among the samples with a strictly lower reward, the one closest to "
           "the target (`mean_minus_2sigma`: mean − 2·std of the pool, population std); "
           "pools with fewer than 2 samples or no strictly lower sample give no pair. "
           "`all_lang` pools take the prompt text in the language `prompt_source` names.", ""]
    for scope, s in sets.items():
        md += [f"- `{scope}`: {_settings(s.pairing)} (pairs output `{s.pairs.key}`)"]
    md += [""]
    for scope, s in sets.items():
        stats = storage.read_parquet(storage.join(s.pairs.uri, "stats.parquet"))
        md += [f"## Statistics per language: `{scope}`", "", _md_table(stats), ""]
    if data.get("reward_check") is not None:
        md += ["## Reward check", "",
               "Ranking accuracy of the reward on the preference set "
               f"`{cfg['evaluation'].get('reward_check')}`: the share of its pairs whose "
               "chosen answer the reward scores higher, per language.", "",
               _md_table(data["reward_check"]), ""]
    if models:
        md += ["## Models of this run", ""] + [
            f"- [{m.repo_id}]({_hub_url(m.repo_id)})" for m in models] + [""]
    md += ["## Citation", "", "The method:", "", CITATION, "", "## License", "",
           f"`{license}`. The texts are generations of `{cfg['policy']['model']}`; its "
           "license's terms on outputs apply.", ""]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(md)


def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _num(v, floats: int = 3) -> str:
    return "-" if v is None else f"{v:.{floats}f}" if isinstance(v, float) else str(v)


def evaluation_lines(data: dict, variant: str, langs: list[str]) -> list[str]:
    """The evaluation of `variant` against the base per language, from the report's
    tables (`croco.evaluation.report.collect`); empty when the run evaluated nothing."""
    held, rates, structured = data.get("heldout"), data.get("win_rates"), data.get("structured")

    def cell(df, model_col, model, lang, col):
        if df is None or col not in df.columns:
            return None
        r = df.filter((pl.col(model_col) == model) & (pl.col("lang") == lang))
        return r[col][0] if r.height else None

    has = {"held": held is not None and variant in set(held["model"]),
           "rates": rates is not None and variant in set(rates["variant"]),
           "structured": structured is not None and variant in set(structured["model"])}
    if not any(has.values()):
        return []
    per_lang = (structured.group_by("model", "lang").agg(pl.col("value").mean())
                if has["structured"] else None)
    head, rows = ["language"], []
    if has["held"]:
        head += ["reward (base)", f"reward ({variant})", "in language (base)",
                 f"in language ({variant})"]
    if has["structured"]:
        head += ["structured (base)", f"structured ({variant})"]
    if has["rates"]:
        head += ["win rate vs base [95% CI]", "length-controlled win rate"]
    for lang in langs:
        row = [lang]
        if has["held"]:
            row += [_num(cell(held, "model", "base", lang, "reward_mean")),
                    _num(cell(held, "model", variant, lang, "reward_mean")),
                    _pct(cell(held, "model", "base", lang, "lang_match")),
                    _pct(cell(held, "model", variant, lang, "lang_match"))]
        if has["structured"]:
            row += [_num(cell(per_lang, "model", "base", lang, "value")),
                    _num(cell(per_lang, "model", variant, lang, "value"))]
        if has["rates"]:
            w = cell(rates, "variant", variant, lang, "win_rate")
            lo = cell(rates, "variant", variant, lang, "ci_low")
            hi = cell(rates, "variant", variant, lang, "ci_high")
            row += ["-" if w is None else f"{w:.1f}" if lo is None or hi is None
                    else f"{w:.1f} [{lo:.1f}, {hi:.1f}]",
                    _num(cell(rates, "variant", variant, lang, "lc_win_rate"), 1)]
        rows.append(row)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    notes = []
    if has["held"]:
        notes.append("reward: mean reward of the held-out answers under the run's scorers; "
                     "in language: the share of answers in the prompt's language")
    if has["structured"]:
        notes.append("structured: mean over the language's tasks of each task's score")
    if has["rates"]:
        notes.append("win rate: a judge compares both answers in both orders, ties 0.5, 95% "
                     "bootstrap interval over prompts")
    out = [*md, "", "; ".join(notes) + ".", ""]
    if has["structured"]:
        tasks = (structured.filter(pl.col("model").is_in(["base", variant]))
                 .pivot(on="model", index=["lang", "task", "metric"], values="value",
                        aggregate_function="first")
                 .sort("lang", "task"))
        cols = ["lang", "task", "metric"] + [c for c in ("base", variant) if c in tasks.columns]
        out += ["Structured tasks:", "", _md_table(tasks.select(cols)), ""]
    return out


def model_card(manifest: dict, repo: ModelRepo, *, dataset_repo: str | None,
               dataset_config: str | None, license: str, data: dict,
               has_curves: bool, has_merged: bool) -> str:
    """A model card for one adapter (YAML metadata as `huggingface_hub.ModelCard` writes
    it)."""
    from huggingface_hub import ModelCardData

    cfg, run_id = manifest["config"], manifest["run_id"]
    spec = _read_json(storage.join(repo.training.uri, "training_config.json")) or {}
    metrics = _read_json(storage.join(repo.training.uri, "metrics.json")) or {}
    variant = next(v for v in cfg["experiments"] if v["name"] == repo.variant)
    method = spec.get("method") or variant["method"]
    training = spec.get("training") or {**cfg["training"], **variant.get("training", {})}
    base = cfg["policy"]["model"]
    langs = [repo.lang] if repo.lang else list(cfg["languages"])
    meta = ModelCardData(
        base_model=base if _HUB_ID.match(base) and not os.path.exists(base) else None,
        library_name="peft", license=license, language=langs,
        datasets=[dataset_repo] if dataset_repo and dataset_config else None,
        pipeline_tag="text-generation",
        tags=["croco", "trl", method.replace("_", "-"), "lora", "peft"])
    name = repo.repo_id.split("/")[-1]
    method_text = {"dpo": "DPO", "sft": "SFT", "online_dpo": "online DPO"}[method]
    md = [f"# {name}", "",
          f"A LoRA adapter for `{base}`, trained by croco (CroCo, cross-lingual contrastive "
          f"preference tuning on self-generations, [arXiv 2605.26293]"
          f"(https://arxiv.org/abs/2605.26293)) with {method_text} via "
          "[TRL](https://github.com/huggingface/trl) and "
          "[PEFT](https://github.com/huggingface/peft): variant "
          f"`{repo.variant}` of run `{run_id}`"
          + (f", language `{repo.lang}`" if repo.lang else "")
          + (f", round {repo.rounds} of {repo.rounds}" if repo.rounds > 1 else "") + ".", "",
          "## Quick start", "", "```python",
          "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
          "", f'model = AutoPeftModelForCausalLM.from_pretrained("{repo.repo_id}")',
          f'tokenizer = AutoTokenizer.from_pretrained("{base}")']
    if has_merged:
        md += ["", "# or the merged weights:", "from transformers import AutoModelForCausalLM",
               f'merged = AutoModelForCausalLM.from_pretrained("{repo.repo_id}", '
               'subfolder="merged")']
    md += ["```", "", "## Training data", ""]
    if method == "online_dpo":
        md += ["Online DPO samples two answers per training prompt from the policy as it "
               "trains and ranks them with the run's reward (below); it reads no preference "
               "set.", ""]
    elif dataset_repo and dataset_config:
        split = f", split `{repo.lang}`" if repo.lang else ""
        md += [f"Config `{dataset_config}`{split} of [{dataset_repo}]"
               f"({_hub_url(dataset_repo, 'dataset')}) ({CONFIG_TEXT[dataset_config]}).", ""]
    else:
        pairs_key = storage.key_of(spec["pairs_uri"]) if spec.get("pairs_uri") else "?"
        why = (f"samples of `{variant['generation_policy']}` (off-policy)"
               if variant.get("generation_policy") else
               f"samples of round {repo.rounds - 1}'s adapter" if repo.rounds > 1 else
               "pairs not published with this run")
        md += [f"Pairs output `{pairs_key}` of the run: {why}.", ""]
    md += ["Reward: " + " + ".join(f"{s['weight']} × {s['name']} ({s['type']}"
                                    + (f", `{s['model']}`" if s.get("model") else "") + ")"
                                    for s in cfg["reward"]["scorers"]) + ".", ""]
    md += ["## Training procedure", "", f"Method: {method_text}"
           + ("; the reference is the frozen base (adapter disabled)" if method == "dpo" else "")
           + ".", "", "| hyperparameter | value |", "|---|---|"]
    skip = {"beta"} if method == "sft" else {"sft_learning_rate"}
    skip |= {"learning_rate"} if method == "sft" else set()
    md += [f"| {k} | {training[k]} |" for k in HYPERPARAMETERS if k in training and k not in skip]
    got = [(k, metrics[k]) for k in TRAINING_METRICS if metrics.get(k) is not None]
    if got:
        md += ["", "| training metric | value |", "|---|---|"]
        md += [f"| {k} | {_num(v, 4)} |" for k, v in got]
    md += ["", "## Evaluation", ""]
    ev = [] if repo.lang else evaluation_lines(data, repo.variant, langs)
    if ev:
        md += [f"Against the base `{base}` on held-out prompts, per language:", "", *ev]
    else:
        md += ["Not evaluated against the base in this run"
               + (" (per-language models are not)." if repo.lang else "."), ""]
    md += ["## Training curves", ""]
    md += (["![training curves](curves.png)", "", "The logged values per step are in "
            "`log_history.json`.", ""] if has_curves else
           ["No training curves were recorded for this run.", ""])
    packages = manifest.get("packages") or {}
    versions = [f"- {k}: {packages[k]}" for k in ("croco", "trl", "peft", "transformers",
                                                  "torch") if packages.get(k)]
    if versions:
        md += ["## Framework versions", "", *versions, ""]
    md += ["## Citations", "", "The method:", "", CITATION, ""]
    if method != "sft":
        md += ["DPO:", "", DPO_CITATION, ""]
    md += ["TRL:", "", TRL_CITATION, ""]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(md)


def _read_json(uri: str) -> dict | None:
    return storage.read_json(uri) if storage.exists(uri) else None


# ------------------------------------------------------------------ staging


def _copy_tree(src_uri: str, dst: Path) -> int:
    """Every file under `src_uri` into `dst` (hard links where the source is local);
    returns how many."""
    fs, path = storage.filesystem(src_uri)
    n = 0
    for f in sorted(fs.find(path)):
        rel = f[len(path.rstrip("/")) + 1:]
        if storage.TMP_MARK in rel or rel == storage.SUCCESS:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.exists(f):  # local
            try:
                os.link(f, target)
            except OSError:
                shutil.copyfile(f, target)
        else:
            fs.get(f, str(target))
        n += 1
    return n


def _write_split(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path, compression="zstd", statistics=True)


def stage_dataset(manifest: dict, folder: Path, *, repo_id: str, license: str,
                  models: list[ModelRepo], data: dict) -> dict[str, int]:
    """Write the dataset repository's files into `folder`; returns config -> rows."""
    cfg = manifest["config"]
    names = _scorer_names(manifest)
    sets = pair_sets(manifest)
    outputs = read_outputs(manifest)
    tables = {scope: dpo_table(s, names) for scope, s in sets.items()}
    tables["sft"] = sft_table(outputs.pairs, outputs.scores, cfg["pairing"]["scope"], names)
    tables = {k: v for k, v in tables.items() if v.height}
    if not tables:
        raise PublishError(f"run {manifest['run_id']!r} made no pairs and no SFT rows: "
                           "nothing to publish")
    for name, df in tables.items():
        lang_col = "prompt_lang" if name in SCOPES else "lang"
        for lang in cfg["languages"]:
            part = df.filter(pl.col(lang_col) == lang)
            if part.height:
                _write_split(part, folder / name / f"{lang}.parquet")
    card = dataset_card(manifest, tables, sets, repo_id, license, models, data)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return {k: v.height for k, v in tables.items()}


def dataset_config_of(manifest: dict, repo: ModelRepo) -> str | None:
    """The dataset config a model was trained on, when the dataset holds it."""
    spec = _read_json(storage.join(repo.training.uri, "training_config.json")) or {}
    pairs_uri = spec.get("pairs_uri")
    if not pairs_uri or repo.rounds > 1:
        return None
    key = storage.key_of(pairs_uri)
    if spec.get("method") == "sft":
        outputs = read_outputs(manifest)
        return "sft" if outputs.pairs is not None and outputs.pairs.key == key else None
    return next((scope for scope, s in pair_sets(manifest).items() if s.pairs.key == key),
                None)


def stage_model(manifest: dict, repo: ModelRepo, folder: Path, *, dataset_repo: str | None,
                license: str, data: dict) -> list[str]:
    """Write one model repository's files into `folder`; returns what it holds."""
    uri = repo.training.uri
    adapter = storage.join(uri, "adapter")
    if not storage.exists(adapter):
        raise PublishError(f"{uri}: the training output of {repo.variant!r} has no adapter/; "
                           "rerun the run to complete it")
    _copy_tree(adapter, folder)
    held = ["adapter"]
    has_merged = storage.exists(storage.join(uri, "merged"))
    if has_merged:
        _copy_tree(storage.join(uri, "merged"), folder / "merged")
        held.append("merged/")
    has_curves = storage.exists(storage.join(uri, "curves.png"))
    for name in ("curves.png", "log_history.json"):
        if storage.exists(storage.join(uri, name)):
            (folder / name).write_bytes(storage.read_bytes(storage.join(uri, name)))
            held.append(name)
    card = model_card(manifest, repo, dataset_repo=dataset_repo,
                      dataset_config=dataset_config_of(manifest, repo), license=license,
                      data=data, has_curves=has_curves, has_merged=has_merged)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return held


# ------------------------------------------------------------------ the hub


def _scrub(text: str, token: str | None) -> str:
    text = storage.redact(text)
    return text.replace(token, "***") if token and len(token) >= 4 else text


def check_token() -> str:
    """The token uploads use: HF_TOKEN, else a saved login."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN to a token with write access "
                           "(https://huggingface.co/settings/tokens) or log in with "
                           "`hf auth login`; nothing was uploaded")
    return token


def check_repo_id(repo_id: str, what: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        first = str(e).splitlines()[0]
        raise PublishError(f"{what} {repo_id!r} is not a valid repository id: {first}") from None


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _refused(err: Exception, repo_id: str, repo_type: str, token: str) -> PublishError:
    code = _status(err)
    kind = "dataset" if repo_type == "dataset" else "model"
    if code == 401:
        return PublishError(f"{kind} repo {repo_id}: the Hub refused the token (401): set "
                            "HF_TOKEN to a valid token with write access")
    if code == 403:
        return PublishError(f"{kind} repo {repo_id}: no permission to write (403): it belongs "
                            "to another account or the token cannot write there; publish "
                            "under your own namespace or an organisation you can write to, "
                            "with a write token")
    first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return PublishError(f"{kind} repo {repo_id}: the Hub answered {code}: {_scrub(first, token)}")


@dataclass
class Account:
    """Who the token belongs to: the user, the organisations and whether it may write."""

    name: str
    orgs: list[str]
    role: str | None

    def namespaces(self) -> list[str]:
        return [self.name, *self.orgs]


def account(api, token: str, repo_id: str) -> Account:
    """The token's account (`whoami`); a refused token ends the publish of `repo_id`."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = api.whoami(token=token)
    except HfHubHTTPError as e:
        if _status(e) == 401:
            raise PublishError(f"dataset repo {repo_id}: the Hub refused the token (401): set "
                               "HF_TOKEN to a valid token with write access; nothing was "
                               "uploaded") from None
        raise _refused(e, repo_id, "dataset", token) from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    return Account(info["name"], [o["name"] for o in info.get("orgs") or []], role)


def _full_id(repo_id: str, who: Account) -> str:
    return repo_id if "/" in repo_id else f"{who.name}/{repo_id}"


def check_access(api, who: Account, repo_id: str, repo_type: str) -> None:
    """A repository the token's account may write to: under its user or one of its
    organisations. One elsewhere that exists is someone else's."""
    from huggingface_hub.errors import HfHubHTTPError

    kind = "dataset" if repo_type == "dataset" else "model"
    if who.role == "read":
        raise PublishError(f"{kind} repo {repo_id}: the token is read-only; set HF_TOKEN to a "
                           "token with write access; nothing was uploaded")
    namespace = repo_id.split("/")[0]
    if namespace in who.namespaces():
        return
    try:
        exists = api.repo_exists(repo_id, repo_type=repo_type)
    except HfHubHTTPError:
        exists = False
    yours = ", ".join(who.namespaces())
    if exists:
        raise PublishError(f"{kind} repo {repo_id} exists and belongs to {namespace!r}, not to "
                           f"the token's account ({yours}): choose a repository under "
                           f"{who.name}/ or one of its organisations; nothing was uploaded")
    raise PublishError(f"{kind} repo {repo_id}: {namespace!r} is not the token's user or one "
                       f"of its organisations ({yours}); nothing was uploaded")


def upload(api, folder: Path, repo_id: str, repo_type: str, *, private: bool,
           owned: list[str], message: str, token: str) -> tuple[str, bool]:
    """Create the repository if needed (with the visibility asked for; an existing one is
    set to it), then upload `folder`: unchanged files are left out, files under `owned`
    folders that the folder no longer has are removed. Returns the URL of the repository's
    last commit and whether this upload made one."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        before = api.repo_info(repo_id, repo_type=repo_type)
        if before.private != private:
            api.update_repo_settings(repo_id, repo_type=repo_type, private=private)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                                 commit_message=message, delete_patterns=owned)
    except HfHubHTTPError as e:
        raise _refused(e, repo_id, repo_type, token) from None
    return info.commit_url, info.oid != before.sha


@dataclass
class Published:
    """What a publish did: the dataset (config -> rows), the model repositories and the
    commit of each repository (unchanged when nothing was new)."""

    dataset: str
    configs: dict[str, int]
    models: list[str]
    commits: dict[str, str]
    changed: dict[str, bool]


def publish(manifest: dict, *, dataset: str, models: str | None = None, private: bool = True,
            license: str = "unknown", workdir: str | None = None,
            log: Callable[[str], None] = lambda _: None) -> Published:
    """Publish a run (its manifest): the preference sets as the dataset `dataset`, each
    variant's adapter as `<models>-<variant>` (`models` defaults to `dataset`).

    Checks the token, the names and the access before anything is built or uploaded."""
    from huggingface_hub import HfApi

    prefix = models or dataset
    check_repo_id(dataset, "--dataset")
    repos = model_repos(manifest, prefix)
    for r in repos:
        check_repo_id(r.repo_id, "model repository")
    pair_sets(manifest)  # a run without pairs fails here, before the network
    token = check_token()
    api = HfApi(token=token)
    who = account(api, token, dataset)
    dataset = _full_id(dataset, who)
    for r in repos:
        r.repo_id = _full_id(r.repo_id, who)
    check_access(api, who, dataset, "dataset")
    for r in repos:
        check_access(api, who, r.repo_id, "model")
    from croco.evaluation.report import collect

    data = collect(manifest)
    run_id = manifest["run_id"]
    commits: dict[str, str] = {}
    changed: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="croco-publish-") as tmp:
        folder = Path(tmp) / "dataset"
        folder.mkdir()
        configs = stage_dataset(manifest, folder, repo_id=dataset, license=license,
                                models=repos, data=data)
        log(f"dataset {dataset}: " + ", ".join(f"{k} {v} rows" for k, v in configs.items()))
        commits[dataset], changed[dataset] = upload(
            api, folder, dataset, "dataset", private=private, owned=DATASET_FOLDERS,
            token=token, message=f"croco preference pairs, run {run_id}")
        log(f"dataset {dataset}: {_what(changed[dataset])} {commits[dataset]}")
        for r in repos:
            folder = Path(tmp) / "models" / r.repo_id.replace("/", "__")
            folder.mkdir(parents=True)
            held = stage_model(manifest, r, folder, dataset_repo=dataset, license=license,
                               data=data)
            commits[r.repo_id], changed[r.repo_id] = upload(
                api, folder, r.repo_id, "model", private=private, owned=MODEL_FOLDERS,
                token=token, message=f"croco {r.variant} adapter, run {run_id}, training run "
                                     f"{r.training.key}")
            log(f"model {r.repo_id} ({', '.join(held)}): {_what(changed[r.repo_id])} "
                f"{commits[r.repo_id]}")
    return Published(dataset, configs, [r.repo_id for r in repos], commits, changed)


def _what(changed: bool) -> str:
    return "committed" if changed else "unchanged, at"


def load_manifest(data_root: str, run_id: str) -> dict:
    """A run's manifest from the data root; a missing run is the user's mistake."""
    from croco.evaluation.report import load_run

    try:
        return load_run(data_root, run_id)
    except FileNotFoundError as e:
        raise PublishError(str(e)) from None


