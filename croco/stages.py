"""The pipeline's stages as plain functions: inputs by URI in, an output URI out.

Each stage's output lives at a content-addressed location,
`<data_root>/<stage>/<key>/...`, where `key` hashes the stage's code version, its
resolved config and the keys of its inputs. A stage whose output carries `_SUCCESS`
returns at once; generation and scoring write numbered shards and skip the ones already
written, so a crash loses at most the shard in progress.

Layout (hive-partitioned by `lang=`):
    prompts/<key>/lang=xx/data.parquet
    generations/<key>/lang=xx/part-00000.parquet ...
    scores/<key>/lang=xx/part-00000.parquet ...
    pairs/<key>/{dpo,sft}/lang=xx/data.parquet, pools.parquet, stats.parquet
    runs/<run_id>/manifest.json
"""

from __future__ import annotations

import logging
import math
import posixpath
import time
import zlib
from collections.abc import Callable

import polars as pl

from croco import storage
from croco.config import (
    GenerationConfig,
    PairingConfig,
    PolicyConfig,
    PromptsConfig,
    RewardConfig,
    TrainingConfig,
    stable_hash,
)

log = logging.getLogger(__name__)

#: Bump a stage's version when its output for the same inputs changes.
STAGE_VERSIONS = {"prompts": 1, "generations": 1, "scores": 1, "pairs": 2}

Progress = Callable[[int, int], None]


def key_of(uri: str) -> str:
    """The content key of a stage output URI (`.../<stage>/<key>[/lang=xx]`)."""
    parts = uri.rstrip("/").replace("\\", "/").split("/")
    return parts[-2] if parts[-1].startswith("lang=") else parts[-1]


def _done_info(uri: str) -> dict:
    try:
        return storage.read_json(storage.join(uri, storage.SUCCESS))
    except Exception:  # noqa: BLE001 - a marker without info is still a marker
        return {}


# --------------------------------------------------------------------------- prompts


def prompts_key(cfg: PromptsConfig) -> str:
    from croco.prompts import source_fingerprint

    return stable_hash({
        "stage": "prompts", "v": STAGE_VERSIONS["prompts"],
        "source": source_fingerprint(cfg.path), "dataset_split": cfg.dataset_split,
        "translate": cfg.translate.model_dump() if cfg.translate else None,
    })


def run_prompts(cfg: PromptsConfig, lang: str, data_root: str, *, device: str = "auto") -> str:
    """Validate the prompt source and write the prompts of one language."""
    from croco.prompts import PromptError, load_prompts, translate_prompts

    t0 = time.perf_counter()
    out = storage.join(data_root, "prompts", prompts_key(cfg), f"lang={lang}")
    if storage.is_complete(out):
        return out
    table = load_prompts(cfg.path, dataset_split=cfg.dataset_split)
    if cfg.translate is not None:
        src = cfg.translate.source_lang
        source = table.filter(pl.col("lang") == src)
        if source.is_empty():
            raise PromptError(f"{cfg.path}: prompts.translate.source_lang is {src!r} but the "
                              f"file has prompts in {sorted(table['lang'].unique())} only")
        if lang == src:
            df = source
        else:
            t = cfg.translate
            df = translate_prompts(source, lang, model=t.model, template=t.template,
                                   max_new_tokens=t.max_new_tokens, batch_size=t.batch_size,
                                   device=device)
    else:
        df = table.filter(pl.col("lang") == lang)
        if df.is_empty():
            raise PromptError(
                f"{cfg.path}: no prompts in language {lang!r} (the source has "
                f"{sorted(table['lang'].unique())}); remove it from `languages` or add "
                "prompts.translate to translate from one language"
            )
    storage.write_parquet(df, storage.join(out, "data.parquet"))
    storage.mark_complete(out, {"rows": df.height, "seconds": round(time.perf_counter() - t0, 3)})
    return out


# ------------------------------------------------------------------------ generation


def generation_key(prompts_uri: str, policy: PolicyConfig, gen: GenerationConfig,
                   prompts_cfg: PromptsConfig) -> str:
    return stable_hash({
        "stage": "generations", "v": STAGE_VERSIONS["generations"],
        "prompts": key_of(prompts_uri), "policy": policy.model_dump(),
        "generation": gen.model_dump(exclude={"batch_size"}),
        "split": prompts_cfg.split, "limit": prompts_cfg.limit,
    })


def _shard_seed(seed: int, lang: str, shard: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(lang.encode()) + shard) % (2**31)


def run_generate(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                 prompts_cfg: PromptsConfig, data_root: str, *, progress: Progress | None = None,
                 on_shard: Callable[[int], None] | None = None) -> str:
    """k samples for each selected prompt of one language, written shard by shard."""
    from croco.generation import generate_frame, make_generator, policy_label
    from croco.progress import progress_bar
    from croco.prompts import select_for_generation

    t0 = time.perf_counter()
    out = storage.join(data_root, "generations",
                       generation_key(prompts_uri, policy, gen, prompts_cfg), f"lang={lang}")
    if storage.is_complete(out):
        return out
    prompts = select_for_generation(storage.read_parquet(storage.join(prompts_uri, "data.parquet")),
                                    split=prompts_cfg.split, limit=prompts_cfg.limit)
    if prompts.is_empty():
        raise ValueError(f"no {prompts_cfg.split!r} prompts for language {lang!r} in "
                         f"{prompts_uri}; check prompts.split")
    n_shards = math.ceil(prompts.height / gen.shard_size)
    existing = set(storage.list_dir(out))
    todo = [i for i in range(n_shards) if f"part-{i:05d}.parquet" not in existing]
    label = policy_label(policy.model, policy.adapter)
    generator = None
    bar = progress_bar(n_shards, f"generate {lang}", unit="shard", initial=n_shards - len(todo))
    for i in todo:
        if generator is None:
            generator = make_generator(gen.backend, policy.model, adapter=policy.adapter,
                                       device=policy.device, dtype=policy.dtype,
                                       tensor_parallel_size=gen.tensor_parallel_size,
                                       seed=gen.seed)
        shard = prompts.slice(i * gen.shard_size, gen.shard_size)
        df = generate_frame(
            generator, shard, k=gen.k, temperature=gen.temperature, top_p=gen.top_p,
            max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
            seed=_shard_seed(gen.seed, lang, i), policy=label,
            respond_in_language=gen.respond_in_language,
            instruction_template=gen.instruction_template,
        )
        storage.write_parquet(df, storage.join(out, f"part-{i:05d}.parquet"))
        bar.update(1)
        if progress:
            progress(n_shards - len(todo) + todo.index(i) + 1, n_shards)
        if on_shard:
            on_shard(i)
    bar.close()
    total = storage.read_parquet(out).height
    storage.mark_complete(out, {"rows": total, "shards": n_shards,
                                "seconds": round(time.perf_counter() - t0, 3)})
    return out


def languages_generation_key(prompts_uris: dict[str, str], policy: PolicyConfig,
                             gen: GenerationConfig, prompts_cfg: PromptsConfig) -> str:
    """One key for every language: sampled together, each depends on the whole batch."""
    return stable_hash({
        "stage": "generations", "v": STAGE_VERSIONS["generations"], "languages_together": True,
        "prompts": {lang: key_of(u) for lang, u in sorted(prompts_uris.items())},
        "policy": policy.model_dump(), "generation": gen.model_dump(exclude={"batch_size"}),
        "split": prompts_cfg.split, "limit": prompts_cfg.limit,
    })


def run_generate_languages(prompts_uris: dict[str, str], policy: PolicyConfig,
                           gen: GenerationConfig, prompts_cfg: PromptsConfig,
                           data_root: str) -> dict[str, str]:
    """k samples for the selected prompts of every language, generated together: one model
    load and full batches however few prompts a language has (held-out answers: a handful
    per language, which alone make small, slow batches). Writes the layout of
    `run_generate` (`generations/<key>/lang=xx/part-00000.parquet`, a `_SUCCESS` per
    language) and returns lang -> URI. All or nothing: the sets it is meant for are small."""
    from croco.generation import generate_frame, make_generator, policy_label
    from croco.prompts import select_for_generation

    t0 = time.perf_counter()
    root = storage.join(data_root, "generations",
                        languages_generation_key(prompts_uris, policy, gen, prompts_cfg))
    outs = {lang: storage.join(root, f"lang={lang}") for lang in sorted(prompts_uris)}
    if all(storage.is_complete(u) for u in outs.values()):
        return outs
    prompts = pl.concat([
        select_for_generation(storage.read_parquet(storage.join(uri, "data.parquet")),
                              split=prompts_cfg.split, limit=prompts_cfg.limit)
        for _, uri in sorted(prompts_uris.items())], how="diagonal_relaxed")
    for lang in outs:
        if prompts.filter(pl.col("lang") == lang).is_empty():
            raise ValueError(f"no {prompts_cfg.split!r} prompts for language {lang!r} in "
                             f"{prompts_uris[lang]}; check prompts.split")
    generator = make_generator(gen.backend, policy.model, adapter=policy.adapter,
                               device=policy.device, dtype=policy.dtype,
                               tensor_parallel_size=gen.tensor_parallel_size, seed=gen.seed)
    df = generate_frame(
        generator, prompts, k=gen.k, temperature=gen.temperature, top_p=gen.top_p,
        max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
        seed=_shard_seed(gen.seed, "*", 0), policy=policy_label(policy.model, policy.adapter),
        respond_in_language=gen.respond_in_language,
        instruction_template=gen.instruction_template)
    seconds = round(time.perf_counter() - t0, 3)
    for lang, uri in outs.items():
        part = df.filter(pl.col("lang") == lang)
        storage.write_parquet(part, storage.join(uri, "part-00000.parquet"))
        storage.mark_complete(uri, {"rows": part.height, "shards": 1, "seconds": seconds})
    return outs


# ---------------------------------------------------------------------------- scoring


def score_key(generations_uri: str, reward: RewardConfig) -> str:
    return stable_hash({
        "stage": "scores", "v": STAGE_VERSIONS["scores"], "generations": key_of(generations_uri),
        "reward": [_scorer_identity(s) for s in reward.scorers],
    })


_EXECUTION_ONLY = {"batch_size", "tensor_parallel_size", "gpu_memory_utilization"}


def _scorer_identity(scorer) -> dict:
    """What decides a scorer's numbers: not how it is batched or sharded. The default
    (transformers) backend is left out so keys written before backends existed still hold."""
    data = scorer.model_dump(exclude=_EXECUTION_ONLY)
    if data.get("backend") == "transformers":
        del data["backend"]
    return data


def run_score(generations_uri: str, prompts_uri: str, lang: str, reward: RewardConfig,
              data_root: str, *, progress: Progress | None = None) -> str:
    """Score every generation shard of one language with the configured scorers."""
    from croco.progress import progress_bar
    from croco.reward import score_frame

    t0 = time.perf_counter()
    out = storage.join(data_root, "scores", score_key(generations_uri, reward), f"lang={lang}")
    if storage.is_complete(out):
        return out
    if not storage.is_complete(generations_uri):
        raise RuntimeError(f"generations at {generations_uri} are incomplete; rerun generation")
    prompts = storage.read_parquet(storage.join(prompts_uri, "data.parquet"))
    parts = [p for p in storage.list_dir(generations_uri) if p.endswith(".parquet")]
    existing = set(storage.list_dir(out))
    bar = progress_bar(len(parts), f"score {lang}", unit="shard",
                       initial=sum(p in existing for p in parts))
    for n, part in enumerate(parts, 1):
        if part in existing:
            continue
        gens = storage.read_parquet(storage.join(generations_uri, part))
        scored = score_frame(gens, prompts, reward.scorers, device=reward.device)
        storage.write_parquet(scored, storage.join(out, part))
        bar.update(1)
        if progress:
            progress(n, len(parts))
    bar.close()
    total = storage.read_parquet(out).height
    storage.mark_complete(out, {"rows": total, "seconds": round(time.perf_counter() - t0, 3)})
    return out


def run_score_languages(generations_uris: dict[str, str], prompts_uris: dict[str, str],
                        reward: RewardConfig, data_root: str) -> dict[str, str]:
    """Score the generations of every language together (full batches, each scorer loaded
    once); the `run_score` layout, one part and `_SUCCESS` per language; lang -> URI."""
    from croco.reward import score_frame

    t0 = time.perf_counter()
    key = stable_hash({"stage": "scores", "v": STAGE_VERSIONS["scores"],
                       "languages_together": True,
                       "generations": {lang: key_of(u)
                                       for lang, u in sorted(generations_uris.items())},
                       "reward": [_scorer_identity(s) for s in reward.scorers]})
    outs = {lang: storage.join(data_root, "scores", key, f"lang={lang}")
            for lang in sorted(generations_uris)}
    if all(storage.is_complete(u) for u in outs.values()):
        return outs
    for uri in generations_uris.values():
        if not storage.is_complete(uri):
            raise RuntimeError(f"generations at {uri} are incomplete; rerun generation")
    gens = pl.concat([storage.read_parquet(generations_uris[lang]) for lang in outs],
                     how="diagonal_relaxed")
    prompts = pl.concat([storage.read_parquet(storage.join(prompts_uris[lang], "data.parquet"))
                         for lang in outs], how="diagonal_relaxed")
    scored = score_frame(gens, prompts, reward.scorers, device=reward.device)
    seconds = round(time.perf_counter() - t0, 3)
    for lang, uri in outs.items():
        part = scored.filter(pl.col("lang") == lang)
        storage.write_parquet(part, storage.join(uri, "part-00000.parquet"))
        storage.mark_complete(uri, {"rows": part.height, "seconds": seconds})
    return outs


# ---------------------------------------------------------------------------- pairing


def pairs_key(score_uris: dict[str, str], prompts_uris: dict[str, str],
              pairing: PairingConfig) -> str:
    return stable_hash({
        "stage": "pairs", "v": STAGE_VERSIONS["pairs"],
        "scores": {lang: key_of(u) for lang, u in sorted(score_uris.items())},
        "prompts": {lang: key_of(u) for lang, u in sorted(prompts_uris.items())},
        "pairing": pairing.model_dump(),
    })


def run_pairs(score_uris: dict[str, str], prompts_uris: dict[str, str], pairing: PairingConfig,
              data_root: str) -> str:
    """DPO pairs and SFT rows from the scores of every language, plus per-language stats.

    Reads the score columns of every shard, selects the pools once, then fetches only the
    chosen and rejected texts shard by shard (`croco.pairs_io`)."""
    from croco import pairs_io

    t0 = time.perf_counter()
    out = storage.join(data_root, "pairs", pairs_key(score_uris, prompts_uris, pairing))
    if storage.is_complete(out):
        return out
    langs = sorted(score_uris)
    parts = [p for lang in langs for p in storage.parquet_files(score_uris[lang])]
    prompts = pl.concat([storage.read_parquet(storage.join(prompts_uris[lang], "data.parquet"))
                         for lang in langs], how="diagonal_relaxed")
    sets = pairs_io.pair_shards(parts, prompts, pairing)
    pairs_io.write_pair_sets(sets, out, langs, time.perf_counter() - t0)
    return out


def completion_info(uri: str) -> dict:
    """What a stage output's `_SUCCESS` marker recorded (rows, seconds, ...)."""
    return _done_info(uri)


# --------------------------------------------------------------------------- training

STAGE_VERSIONS["training"] = 1


def training_key(pairs_uri: str, variant_name: str, method: str, policy: PolicyConfig,
                 training: TrainingConfig, lang: str | None, off_policy: bool) -> str:
    return stable_hash({
        "stage": "training", "v": STAGE_VERSIONS["training"], "pairs": key_of(pairs_uri),
        "method": method, "policy": policy.model_dump(), "lang": lang,
        "training": training.model_dump(exclude={"save_steps", "logging_steps", "device"}),
        "off_policy": off_policy,
    })


def run_train(pairs_uri: str, *, variant_name: str, method: str, policy: PolicyConfig,
              training: TrainingConfig, data_root: str, lang: str | None = None,
              generation_policy: str | None = None, callbacks: list | None = None,
              reward: RewardConfig | None = None, prompts_uris: dict[str, str] | None = None,
              prompts_cfg: PromptsConfig | None = None, max_new_tokens: int = 64) -> str:
    """Train one variant (DPO on `dpo/`, SFT on `sft/`) and write
    `<data_root>/training/<key>/{adapter/, metrics.json, training_config.json}`.

    `policy.adapter`, when set, is continued (iterative rounds); `lang` restricts the
    training data to one language (per-language models); `generation_policy` records that
    the pairs came from another model's samples (off-policy)."""
    from croco.training.dpo import ref_logps_uri, train_dpo
    from croco.training.sft import train_sft

    t0 = time.perf_counter()
    off_policy = generation_policy is not None and generation_policy != policy.model
    key = training_key(pairs_uri, variant_name, method, policy, training, lang, off_policy)
    if method == "online_dpo":
        key = stable_hash({"base": key, "reward": reward.model_dump() if reward else None,
                           "prompts": sorted(key_of(u) for u in (prompts_uris or {}).values()),
                           "split": prompts_cfg.split if prompts_cfg else None,
                           "limit": prompts_cfg.limit if prompts_cfg else None,
                           "max_new_tokens": max_new_tokens})
    out = storage.join(data_root, "training", key)
    if storage.is_complete(out):
        return out
    if method == "dpo":
        data = storage.read_parquet(storage.join(pairs_uri, "dpo"))
        if lang:
            data = data.filter(pl.col("prompt_lang") == lang)
        ref_uri = ref_logps_uri(pairs_uri, policy.model, policy.adapter, training.max_length)
        metrics = train_dpo(data, policy=policy.model, adapter=policy.adapter, cfg=training,
                            out_uri=out, ref_uri=ref_uri, callbacks=callbacks)
    elif method == "online_dpo":
        from croco.training.online import train_online_dpo

        from croco.prompts import select_for_generation

        if reward is None or not prompts_uris:
            raise ValueError(f"variant {variant_name!r}: online_dpo needs the reward scorers "
                             "and the training prompts")
        prompts = pl.concat([storage.read_parquet(storage.join(u, "data.parquet"))
                             for lang_, u in sorted(prompts_uris.items())
                             if lang is None or lang_ == lang])
        if prompts_cfg is not None:
            prompts = select_for_generation(prompts, split=prompts_cfg.split,
                                            limit=prompts_cfg.limit)
        metrics = train_online_dpo(prompts, policy=policy.model, scorer_cfgs=reward.scorers,
                                   cfg=training, out_uri=out, max_new_tokens=max_new_tokens)
    elif method == "sft":
        data = storage.read_parquet(storage.join(pairs_uri, "sft"))
        if lang:
            data = data.filter(pl.col("lang") == lang)
        metrics = train_sft(data, policy=policy.model, adapter=policy.adapter, cfg=training,
                            out_uri=out, callbacks=callbacks)
    else:
        raise ValueError(f"variant {variant_name!r}: unknown method {method!r}")
    metrics.update({"variant": variant_name, "lang": lang,
                    "pairs_uri": (storage.join(out, "online_pairs") if method == "online_dpo"
                                  else pairs_uri),
                    "policy": policy.model, "init_adapter": policy.adapter,
                    "generation_policy": generation_policy or policy.model,
                    "off_policy": off_policy})
    from croco.training.common import is_main_process

    if not is_main_process():
        return out  # a distributed run's other processes: the main one writes the outputs
    if training.merge:
        metrics["merged"] = export_merged(out, policy.model)
    if training.push_to_hub:
        metrics["pushed_to"] = push_adapter(out, training.push_to_hub)
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    storage.write_json(storage.join(out, "training_config.json"),
                       {"variant": variant_name, "method": method, "lang": lang,
                        "policy": policy.model_dump(), "training": training.model_dump(),
                        "pairs_uri": pairs_uri, "off_policy": off_policy})
    storage.mark_complete(out, {"rows": metrics.get("pairs_train", metrics.get(
        "rows_train", metrics.get("pairs_generated"))), "method": method,
                                "off_policy": off_policy,
                                "generation_policy": generation_policy or policy.model,
                                "seconds": round(time.perf_counter() - t0, 3)})
    return out


def adapter_path(training_uri: str) -> str:
    """A local path to a trained adapter (downloaded from remote storage once)."""
    uri = storage.join(training_uri, "adapter")
    fs, path = storage.filesystem(uri)
    if "file" in fs.protocol:
        return path
    from croco.models import cache_dir

    local = cache_dir() / "adapters" / key_of(training_uri)
    if not (local / "adapter_config.json").exists():
        fs.get(path, str(local), recursive=True)
    return str(local)


def adapter_identity(adapter: str) -> str:
    """The training key behind an adapter path: `<root>/training/<key>/adapter` locally,
    `<cache>/adapters/<key>` when fetched from remote storage; any other path as given."""
    path = adapter.rstrip("/")
    head, name = posixpath.split(path)
    if name == "adapter":
        return posixpath.basename(head)
    if posixpath.basename(head) == "adapters":
        return name
    return path


def export_merged(training_uri: str, policy: str) -> str:
    """Merge the adapter into the base weights and store them under `merged/`."""
    import tempfile
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from croco.models import load_tokenizer, resolve_model
    from croco.training.common import publish

    base = AutoModelForCausalLM.from_pretrained(resolve_model(policy))
    merged = PeftModel.from_pretrained(base, adapter_path(training_uri)).merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(policy).save_pretrained(tmp)
        return publish(Path(tmp), training_uri, "merged")


def push_adapter(training_uri: str, repo_id: str) -> str:
    """Push the adapter to the Hugging Face hub (needs network and HF_TOKEN; HF_ENDPOINT
    for another hub). A repository that does not exist yet is created private."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
    api.upload_folder(folder_path=adapter_path(training_uri), repo_id=repo_id,
                      repo_type="model",
                      commit_message=f"croco adapter, training run {key_of(training_uri)}")
    return repo_id


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
    """`score_uris`: model name -> lang -> scores URI. Writes the summary table."""
    scores = {model: pl.concat([storage.read_parquet(u) for u in by_lang.values()],
                               how="diagonal_relaxed")
              for model, by_lang in score_uris.items()}
    table = heldout_summary(scores)
    uri = storage.join(data_root, "runs", run_id, "heldout.parquet")
    storage.write_parquet(table, uri)
    return uri


# --------------------------------------------------------------------- judge win rates

STAGE_VERSIONS["judgments"] = 1


def judge_key(candidate: dict[str, str], baseline: dict[str, str], judge) -> str:
    return stable_hash({
        "stage": "judgments", "v": STAGE_VERSIONS["judgments"],
        "candidate": {k: key_of(u) for k, u in sorted(candidate.items())},
        "baseline": {k: key_of(u) for k, u in sorted(baseline.items())},
        "judge": judge.model_dump(exclude={"batch_size"}),
    })


def run_judge(candidate_scores: dict[str, str], baseline_scores: dict[str, str],
              prompts_uris: dict[str, str], judge, data_root: str, *,
              device: str = "auto") -> str:
    """Judge the candidate's held-out answers against the baseline's, both orders; write
    `judgments.parquet` and `win_rates.parquet` (see croco.evaluation.winrate)."""
    from croco.evaluation.judge import judge_pairs
    from croco.evaluation.winrate import JUDGE_TEMPLATE, win_rates

    t0 = time.perf_counter()
    out = storage.join(data_root, "judgments", judge_key(candidate_scores, baseline_scores, judge))
    if storage.is_complete(out):
        return out
    langs = sorted(candidate_scores)

    def answers(uris: dict[str, str], name: str) -> pl.DataFrame:
        df = pl.concat([storage.read_parquet(uris[lang]) for lang in langs])
        return df.filter(pl.col("sample_idx") == 0).select("prompt_id", "lang",
                                                           pl.col("response").alias(name))

    prompts = pl.concat([storage.read_parquet(storage.join(prompts_uris[lang], "data.parquet"))
                         for lang in langs]).select("prompt_id", "lang", "prompt")
    pairs = (answers(candidate_scores, "candidate")
             .join(answers(baseline_scores, "baseline"), on=["prompt_id", "lang"])
             .join(prompts, on=["prompt_id", "lang"]).sort("lang", "prompt_id"))
    judgments = judge_pairs(pairs, judge_model=judge.model, template=judge.template or
                            JUDGE_TEMPLATE, mode=judge.mode, temperature=judge.temperature,
                            max_new_tokens=judge.max_new_tokens, batch_size=judge.batch_size,
                            seed=judge.seed, device=device, calibrate=judge.calibrate,
                            backend=judge.backend)
    rates = win_rates(judgments, n_bootstrap=judge.n_bootstrap, seed=judge.seed)
    storage.write_parquet(judgments, storage.join(out, "judgments.parquet"))
    storage.write_parquet(rates, storage.join(out, "win_rates.parquet"))
    valid = judgments.filter(pl.col("verdict").is_not_null())
    storage.mark_complete(out, {"rows": judgments.height,
                                "invalid": int(judgments["verdict"].null_count()),
                                # share of verdicts for whichever answer was shown first:
                                # far from 0.5 means the judge has a position bias
                                "first_position_share": (float((valid["verdict"] == "1").mean())
                                                         if valid.height else None),
                                "seconds": round(time.perf_counter() - t0, 3)})
    return out


# ------------------------------------------------------------------ structured tasks

STAGE_VERSIONS["structured"] = 1


def run_structured(policy: PolicyConfig, structured, langs: list[str], data_root: str) -> str:
    """Multiple-choice accuracy of one model per language and task (lm-eval);
    writes `results.parquet` (lang, task, metric, value, n)."""
    from croco.evaluation.structured import evaluate_euroeval, evaluate_structured
    from croco.models import pick_device, resolve_model

    t0 = time.perf_counter()
    adapter_key = adapter_identity(policy.adapter) if policy.adapter else None
    key = stable_hash({"stage": "structured", "v": STAGE_VERSIONS["structured"],
                       "model": policy.model, "adapter": adapter_key, "langs": sorted(langs),
                       "cfg": structured.model_dump(exclude={"batch_size"})})
    out = storage.join(data_root, "structured", key)
    if storage.is_complete(out):
        return out
    device = pick_device(policy.device)
    if structured.backend == "euroeval":
        df = evaluate_euroeval(
            resolve_model(policy.model), adapter=policy.adapter, langs=langs,
            datasets=structured.euroeval_datasets, tasks=structured.euroeval_tasks,
            few_shot=structured.euroeval_few_shot, iterations=structured.euroeval_iterations,
            test_split=structured.euroeval_test_split, device=str(device),
            dtype="bfloat16" if device.type == "cuda" else "float32")
    else:
        df = evaluate_structured(
            resolve_model(policy.model), adapter=policy.adapter,
            tasks={lang: t for lang, t in structured.tasks.items() if lang in langs},
            local_mc=structured.local_mc, langs=langs, backend=structured.backend,
            batch_size=structured.batch_size, limit=structured.limit, device=str(device),
            dtype="bfloat16" if device.type == "cuda" else "float32")
    storage.write_parquet(df, storage.join(out, "results.parquet"))
    storage.mark_complete(out, {"rows": df.height, "seconds": round(time.perf_counter() - t0, 3)})
    return out


# ----------------------------------------------------------------------- reward check

STAGE_VERSIONS["reward_check"] = 1


def preference_set_fingerprint(path: str) -> str:
    """A hash of a preference set's content."""
    from croco.evaluation.reward_check import preference_set_path

    return stable_hash(preference_set_path(path).read_bytes().decode("utf-8", "replace"))


def run_reward_check(path: str, reward: RewardConfig, langs: list[str], data_root: str) -> str:
    """Ranking accuracy of the run's reward per language; writes `accuracy.parquet`."""
    from croco.evaluation.reward_check import load_preference_set, ranking_accuracy

    key = stable_hash({"stage": "reward_check", "v": STAGE_VERSIONS["reward_check"],
                       "set": preference_set_fingerprint(path), "langs": sorted(langs),
                       "reward": [s.model_dump(exclude={"batch_size"}) for s in reward.scorers]})
    out = storage.join(data_root, "reward_check", key)
    if storage.is_complete(out):
        return out
    prefs = load_preference_set(path).filter(pl.col("lang").is_in(langs))
    table = ranking_accuracy(prefs, reward.scorers, device=reward.device)
    storage.write_parquet(table, storage.join(out, "accuracy.parquet"))
    storage.mark_complete(out, {"rows": table.height})
    return out
