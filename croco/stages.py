"""The pipeline's stages as plain functions: inputs by URI in, an output URI out.

Each stage's output lives at a content-addressed location,
`<data_root>/<stage>/<key>/...`, where `key` hashes the stage's code version, its
resolved config and the keys of its inputs. A stage whose output carries `_SUCCESS`
returns at once; generation and scoring write numbered shards and skip the ones already
written, so a crash loses at most the shard in progress.

Sample store (incremental reruns): samples are kept per (policy, generation settings,
language), whatever run or prompt set asked for them, in `samples/<key>/lang=xx/`, as
shards named by the hash of the (prompt_id, prompt content) list they hold and sampled
with a seed derived from that name; `<shard>.prompts.parquet` beside each holds its
prompts (written last: it marks the shard complete). A run's generations output is a
per-run view: its plan (`generations/<key>/_plans/lang=xx.json`, made once) says which
stored shard each part comes from. Prompts the store holds reuse their samples; new or
edited prompts (a new content hash) are cut into new shards of `generation.shard_size`;
a removed prompt is in no part. Part i is the stored shard's rows of the plan's prompts.
Scoring works the same way: `scored/<key>/lang=xx/<shard>.parquet` holds the rewards of a
whole stored shard under one reward config, and a run's score part i is its rows of the
plan's prompts. So a grown prompt source samples and scores only the new prompts, and
pairs and everything after rerun on the whole set. A prompt's samples are those drawn
when it first appeared: an incremental result can differ from a from-scratch run of the
same final prompt set only in the random draws (another shard, so another seed), never in
which prompts, policy or settings they come from.

Shard groups: `run_generate` / `run_score` may be given `shards` (a contiguous range of
part indices, `shard_group`), so several workers fill one language's output at once; the
plan is made before they start and each stored shard's seed comes from its name, so the
output does not depend on the grouping, and the grouping enters no key. Whichever call
writes the last part marks the output complete; `seal_generations` / `seal_scores` do it
after every group ended (and name the parts still missing when one did not).

Layout (hive-partitioned by `lang=`):
    prompts/<key>/lang=xx/data.parquet
    samples/<key>/lang=xx/<shard>.parquet, <shard>.prompts.parquet
    generations/<key>/lang=xx/part-00000.parquet ..., generations/<key>/_plans/lang=xx.json
    scored/<key>/lang=xx/<shard>.parquet
    scores/<key>/lang=xx/part-00000.parquet ...
    pairs/<key>/{dpo,sft}/lang=xx/data.parquet, pools.parquet, stats.parquet
    runs/<run_id>/manifest.json
"""

from __future__ import annotations

import logging
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
    stable_hash,
)
from croco.identity import STAGE_VERSIONS, identity, path_identity
from croco.storage import key_of

log = logging.getLogger(__name__)


Progress = Callable[[int, int], None]


def _done_info(uri: str) -> dict:
    try:
        return storage.read_json(storage.join(uri, storage.SUCCESS))
    except Exception:  # noqa: BLE001 - a marker without info is still a marker
        return {}


def run_once(out: str, work: Callable[[], dict]) -> str:
    """The stage runner: `out` as it is when complete; otherwise `work()` writes the
    stage's files under `out` (each atomically) and returns what `_SUCCESS` records (rows,
    ...), which is written last, with the seconds the work took. Sharded stages
    (generation, scoring) resume shard by shard and seal themselves (`_seal`)."""
    if storage.is_complete(out):
        return out
    t0 = time.perf_counter()
    info = work()
    storage.mark_complete(out, {**info, "seconds": round(time.perf_counter() - t0, 3)})
    return out


# --------------------------------------------------------------------------- prompts


def prompts_key(cfg: PromptsConfig) -> str:
    """The source by content, its split and translation; not which prompts a stage takes
    (`split`, `limit`: generation's choice)."""
    ident = identity(cfg)
    return stable_hash({"stage": "prompts", "v": STAGE_VERSIONS["prompts"],
                        **{k: v for k, v in ident.items() if k not in ("split", "limit")}})


def run_prompts(cfg: PromptsConfig, lang: str, data_root: str, *, device: str = "auto") -> str:
    """Validate the prompt source and write the prompts of one language."""
    out = storage.join(data_root, "prompts", prompts_key(cfg), f"lang={lang}")
    return run_once(out, lambda: _write_prompts(cfg, lang, out, device))


def _write_prompts(cfg: PromptsConfig, lang: str, out: str, device: str) -> dict:
    from croco.prompts import PromptError, load_prompts, translate_prompts

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
    return {"rows": df.height}


# ------------------------------------------------------------------------ generation


def generation_key(prompts_uri: str, policy: PolicyConfig, gen: GenerationConfig,
                   prompts_cfg: PromptsConfig) -> str:
    return stable_hash({
        "stage": "generations", "v": STAGE_VERSIONS["generations"],
        "prompts": key_of(prompts_uri), "policy": identity(policy),
        "generation": identity(gen),
        "split": prompts_cfg.split, "limit": prompts_cfg.limit,
        "samples": STAGE_VERSIONS["samples"],
    })


def _shard_seed(seed: int, lang: str, shard: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(lang.encode()) + shard) % (2**31)


# ---------------------------------------------------------------------- sample store


def sample_store_uri(policy: PolicyConfig, gen: GenerationConfig, lang: str,
                     data_root: str) -> str:
    """The samples of one (policy, generation settings, language), whatever run or prompt
    set asked for them: `samples/<key>/lang=xx/<shard>.parquet`. How prompts are grouped
    into shards (`shard_size`) and batched is left out: a shard names its own prompts."""
    key = stable_hash({"stage": "samples", "v": STAGE_VERSIONS["samples"],
                       "policy": identity(policy),
                       "generation": {k: v for k, v in identity(gen).items()
                                      if k != "shard_size"}})
    return storage.join(data_root, "samples", key, f"lang={lang}")


def prompt_identity(prompts: pl.DataFrame) -> list[list[str]]:
    """`[prompt_id, hash of its text or messages]` per row, in order: what decides a
    prompt's samples besides the policy and the generation settings."""
    cols = [c for c in ("prompt", "messages") if c in prompts.columns]
    return [[row["prompt_id"], stable_hash({c: row[c] for c in cols})]
            for row in prompts.select("prompt_id", *cols).to_dicts()]


def _content_seed(seed: int, shard: str) -> int:
    """A stored shard's sampling seed, from its name (the hash of its prompts)."""
    return (seed * 1_000_003 + int(shard, 16)) % (2**31)


def _store_index(store: str) -> dict[tuple[str, str], str]:
    """(prompt_id, content hash) -> the stored shard holding its samples. A shard counts
    once its prompts file (written after its samples) is there."""
    index: dict[tuple[str, str], str] = {}
    for name in storage.list_dir(store):
        if name.endswith(".prompts.parquet"):
            shard = name.removesuffix(".prompts.parquet")
            for pid, h in prompt_identity(storage.read_parquet(storage.join(store, name))):
                index.setdefault((pid, h), shard)
    return index


def plan_uri(generations_uri: str) -> str:
    """Where a run's generations output keeps its plan: next to the `lang=` folders, so the
    folder itself holds only its parts."""
    head, lang_dir = posixpath.split(generations_uri.rstrip("/"))
    return storage.join(head, "_plans", f"{lang_dir}.json")


def generation_plan(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                    prompts_cfg: PromptsConfig, data_root: str) -> dict:
    """Which stored shard each part of a run's generations comes from:
    `{"store": URI, "parts": [{"shard": name, "prompt_ids": [...]}, ...]}`.

    Made once per output (then read back, so every shard group sees the same numbering):
    prompts whose (id, content) the store already holds reuse those samples, one part per
    stored shard, in the prompts' order; the others are cut into new shards of
    `gen.shard_size`, each named by the hash of its prompts. A prompt removed from the
    source is in no part; an edited one is new."""
    out = generation_uri(prompts_uri, lang, policy, gen, prompts_cfg, data_root)
    where = plan_uri(out)
    if storage.exists(where):
        return storage.read_json(where)
    store = sample_store_uri(policy, gen, lang, data_root)
    index = _store_index(store)
    reused: dict[str, list[str]] = {}
    new: list[list[str]] = []
    for pid, h in prompt_identity(_generation_prompts(prompts_uri, lang, prompts_cfg)):
        shard = index.get((pid, h))
        if shard is None:
            new.append([pid, h])
        else:
            reused.setdefault(shard, []).append(pid)
    parts = [{"shard": shard, "prompt_ids": ids} for shard, ids in reused.items()]
    for i in range(0, len(new), gen.shard_size):
        chunk = new[i:i + gen.shard_size]
        parts.append({"shard": stable_hash(chunk), "prompt_ids": [pid for pid, _ in chunk]})
    plan = {"store": store, "parts": parts}
    storage.write_json(where, plan)
    return plan


def part_name(shard: int) -> str:
    """The file name of shard `shard` of a generation or score output."""
    return f"part-{shard:05d}.parquet"


def shard_group(n_shards: int, group: int, groups: int) -> range:
    """The contiguous shard indices that group `group` (0-based) of `groups` covers: sizes
    differ by at most one, earlier groups first (7 shards in 3 groups: 0-2, 3-4, 5-6); a
    group past the last shard is empty."""
    if not 0 <= group < groups:
        raise ValueError(f"shard group {group} does not exist: groups are 0..{groups - 1}")
    size, extra = divmod(n_shards, groups)
    start = group * size + min(group, extra)
    return range(start, start + size + (group < extra))


def _missing_parts(out: str, n_shards: int) -> list[str]:
    existing = set(storage.list_dir(out))
    return [part_name(i) for i in range(n_shards) if part_name(i) not in existing]


def _seal(out: str, n_shards: int, info: dict) -> None:
    """Mark a sharded output complete with its total row count (every shard is present)."""
    storage.mark_complete(out, {"rows": storage.read_parquet(out).height, "shards": n_shards,
                                **info})


def generation_uri(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                   prompts_cfg: PromptsConfig, data_root: str) -> str:
    """Where `run_generate` writes one language's samples."""
    return storage.join(data_root, "generations",
                        generation_key(prompts_uri, policy, gen, prompts_cfg), f"lang={lang}")


def _generation_prompts(prompts_uri: str, lang: str, prompts_cfg: PromptsConfig) -> pl.DataFrame:
    from croco.prompts import select_for_generation

    prompts = select_for_generation(storage.read_parquet(storage.join(prompts_uri, "data.parquet")),
                                    split=prompts_cfg.split, limit=prompts_cfg.limit)
    if prompts.is_empty():
        raise ValueError(f"no {prompts_cfg.split!r} prompts for language {lang!r} in "
                         f"{prompts_uri}; check prompts.split")
    return prompts


def generation_shard_count(prompts_uri: str, lang: str, policy: PolicyConfig,
                           gen: GenerationConfig, prompts_cfg: PromptsConfig,
                           data_root: str) -> int:
    """How many parts one language's generations output has (its plan's; made if missing)."""
    return len(generation_plan(prompts_uri, lang, policy, gen, prompts_cfg, data_root)["parts"])


def run_generate(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                 prompts_cfg: PromptsConfig, data_root: str, *, progress: Progress | None = None,
                 on_shard: Callable[[int], None] | None = None,
                 shards: range | None = None) -> str:
    """k samples for each selected prompt of one language, written part by part.

    Part i holds the samples of the prompts of the plan's part i (`generation_plan`),
    read from the sample store, or generated into it first when the store lacks them
    (seeded by the stored shard's name, so a shard's samples do not depend on the run,
    its grouping or its position). `shards`: only these part indices (a shard group, see
    `shard_group`); several calls with different groups may run at once on one output.
    `_SUCCESS` is written once every part is present (by whichever call writes the last
    one, or by `seal_generations`)."""
    from croco.progress import progress_bar

    t0 = time.perf_counter()
    out = generation_uri(prompts_uri, lang, policy, gen, prompts_cfg, data_root)
    if storage.is_complete(out):
        return out
    plan = generation_plan(prompts_uri, lang, policy, gen, prompts_cfg, data_root)
    n_shards = len(plan["parts"])
    wanted = range(n_shards) if shards is None else shards
    if wanted and (wanted.start < 0 or wanted.stop > n_shards):
        raise ValueError(f"{out}: shards {wanted.start}..{wanted.stop - 1} asked for, but the "
                         f"language has shards 0..{n_shards - 1}")
    existing = set(storage.list_dir(out))
    todo = [i for i in wanted if part_name(i) not in existing]
    sampler = _StoreSampler(plan["store"], plan_uri(out), prompts_uri, lang, policy, gen,
                            prompts_cfg)
    bar = progress_bar(len(wanted), f"generate {lang}", unit="shard",
                       initial=len(wanted) - len(todo))
    for n, i in enumerate(todo, len(wanted) - len(todo) + 1):
        entry = plan["parts"][i]
        df = sampler.samples(entry["shard"], entry["prompt_ids"])
        storage.write_parquet(df.filter(pl.col("prompt_id").is_in(entry["prompt_ids"])),
                              storage.join(out, part_name(i)))
        bar.update(1)
        if progress:
            progress(n, len(wanted))
        if on_shard:
            on_shard(i)
    bar.close()
    if shards is None:
        _seal(out, n_shards, {"seconds": round(time.perf_counter() - t0, 3),
                              "generated_rows": sampler.generated_rows})
    elif not _missing_parts(out, n_shards):
        _seal(out, n_shards, {})  # the last group to finish; its own time is not the stage's
    return out


class _StoreSampler:
    """Reads a stored shard, or samples it into the store first (loading the model once,
    only if some shard is missing)."""

    def __init__(self, store: str, plan: str, prompts_uri: str, lang: str,
                 policy: PolicyConfig, gen: GenerationConfig, prompts_cfg: PromptsConfig):
        self.store, self.plan, self.lang, self.policy, self.gen = store, plan, lang, policy, gen
        self.prompts_uri, self.prompts_cfg = prompts_uri, prompts_cfg
        self.generator = None
        self.generated_rows = 0

    def samples(self, shard: str, prompt_ids: list[str]) -> pl.DataFrame:
        uri = storage.join(self.store, f"{shard}.parquet")
        if not storage.exists(storage.join(self.store, f"{shard}.prompts.parquet")):
            self._sample(shard, prompt_ids, uri)
        return storage.read_parquet(uri)

    def _sample(self, shard: str, prompt_ids: list[str], uri: str) -> None:
        from croco.generation import generate_frame, make_generator, policy_label

        gen, policy = self.gen, self.policy
        prompts = _generation_prompts(self.prompts_uri, self.lang, self.prompts_cfg)
        prompts = prompts.filter(pl.col("prompt_id").is_in(prompt_ids))
        if stable_hash(prompt_identity(prompts)) != shard:
            # a reused shard deleted from the store: its other prompts are not in this run
            raise RuntimeError(
                f"{self.store}: stored shard {shard}, which this output's plan reuses for "
                f"prompts {', '.join(prompt_ids[:5])}, is gone; delete {self.plan} and rerun "
                "(the prompts are planned again and sampled anew)")
        if self.generator is None:
            self.generator = make_generator(gen.backend, policy.model, adapter=policy.adapter,
                                            device=policy.device, dtype=policy.dtype,
                                            tensor_parallel_size=gen.tensor_parallel_size,
                                            seed=gen.seed)
        df = generate_frame(
            self.generator, prompts, k=gen.k, temperature=gen.temperature, top_p=gen.top_p,
            max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
            seed=_content_seed(gen.seed, shard),
            policy=policy_label(policy.model, policy.adapter),
            respond_in_language=gen.respond_in_language,
            instruction_template=gen.instruction_template,
        )
        storage.write_parquet(df, uri)
        # the prompts file last: its presence says the shard is complete
        storage.write_parquet(prompts, storage.join(self.store, f"{shard}.prompts.parquet"))
        self.generated_rows += df.height


def seal_generations(prompts_uri: str, lang: str, policy: PolicyConfig, gen: GenerationConfig,
                     prompts_cfg: PromptsConfig, data_root: str) -> str:
    """Mark one language's generations complete once every shard group has written its
    shards (cheap: lists the folder, counts rows). Missing shards fail with their names."""
    out = generation_uri(prompts_uri, lang, policy, gen, prompts_cfg, data_root)
    if storage.is_complete(out):
        return out
    n_shards = generation_shard_count(prompts_uri, lang, policy, gen, prompts_cfg, data_root)
    missing = _missing_parts(out, n_shards)
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} of {n_shards} shards are missing "
                           f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                           "rerun generation, which writes only the missing shards")
    _seal(out, n_shards, {})
    return out


def languages_generation_key(prompts_uris: dict[str, str], policy: PolicyConfig,
                             gen: GenerationConfig, prompts_cfg: PromptsConfig) -> str:
    """One key for every language: sampled together, each depends on the whole batch."""
    return stable_hash({
        "stage": "generations", "v": STAGE_VERSIONS["generations"], "languages_together": True,
        "prompts": {lang: key_of(u) for lang, u in sorted(prompts_uris.items())},
        "policy": identity(policy), "generation": identity(gen),
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
        "reward": identity(reward),
    })


def score_uri(generations_uri: str, lang: str, reward: RewardConfig, data_root: str) -> str:
    """Where `run_score` writes one language's scores."""
    return storage.join(data_root, "scores", score_key(generations_uri, reward), f"lang={lang}")


def generation_parts(generations_uri: str) -> list[str]:
    """The shard files of a complete generations output, in shard order."""
    if not storage.is_complete(generations_uri):
        raise RuntimeError(f"generations at {generations_uri} are incomplete; rerun generation")
    return [p for p in storage.list_dir(generations_uri) if p.endswith(".parquet")]


def run_score(generations_uri: str, prompts_uri: str, lang: str, reward: RewardConfig,
              data_root: str, *, progress: Progress | None = None,
              shards: range | None = None) -> str:
    """Score every generation shard of one language with the configured scorers.

    `shards`: only the generation shards at these positions (a shard group); each score
    shard has its generation shard's name. `_SUCCESS` is written once every generation
    shard has its score shard (see `run_generate`, `seal_scores`)."""
    from croco.progress import progress_bar
    from croco.reward import score_frame

    t0 = time.perf_counter()
    out = score_uri(generations_uri, lang, reward, data_root)
    if storage.is_complete(out):
        return out
    parts = generation_parts(generations_uri)
    wanted = parts if shards is None else parts[shards.start:shards.stop]
    if shards is not None and shards and shards.stop > len(parts):
        raise ValueError(f"{out}: shards {shards.start}..{shards.stop - 1} asked for, but "
                         f"{generations_uri} has {len(parts)} shards")
    plan = (storage.read_json(plan_uri(generations_uri))
            if storage.exists(plan_uri(generations_uri)) else None)
    prompts = None
    existing = set(storage.list_dir(out))
    bar = progress_bar(len(wanted), f"score {lang}", unit="shard",
                       initial=sum(p in existing for p in wanted))
    for n, part in enumerate(wanted, 1):
        if part in existing:
            continue
        if plan is not None:  # from the scored copy of its stored shard
            entry = plan["parts"][parts.index(part)]
            scored = _scored_shard(plan["store"], entry["shard"], lang, reward, data_root)
            scored = scored.filter(pl.col("prompt_id").is_in(entry["prompt_ids"]))
        else:
            if prompts is None:
                prompts = storage.read_parquet(storage.join(prompts_uri, "data.parquet"))
            gens = storage.read_parquet(storage.join(generations_uri, part))
            scored = score_frame(gens, prompts, reward.scorers, device=reward.device)
        storage.write_parquet(scored, storage.join(out, part))
        bar.update(1)
        if progress:
            progress(n, len(wanted))
    bar.close()
    if shards is None:
        _seal(out, len(parts), {"seconds": round(time.perf_counter() - t0, 3)})
    elif not set(parts) - set(storage.list_dir(out)):
        _seal(out, len(parts), {})
    return out


def scored_store_uri(store: str, lang: str, reward: RewardConfig, data_root: str) -> str:
    """The rewards of a sample store's shards under one reward config:
    `scored/<key>/lang=xx/<shard>.parquet`, each the scores of the whole stored shard."""
    key = stable_hash({"stage": "scores", "v": STAGE_VERSIONS["scores"],
                       "samples": key_of(store),
                       "reward": identity(reward)})
    return storage.join(data_root, "scored", key, f"lang={lang}")


def _scored_shard(store: str, shard: str, lang: str, reward: RewardConfig,
                  data_root: str) -> pl.DataFrame:
    """The scores of one stored generation shard, scored (with the prompts stored beside
    it) and kept the first time any run asks for them."""
    from croco.reward import score_frame

    uri = storage.join(scored_store_uri(store, lang, reward, data_root), f"{shard}.parquet")
    if not storage.exists(uri):
        gens = storage.read_parquet(storage.join(store, f"{shard}.parquet"))
        prompts = storage.read_parquet(storage.join(store, f"{shard}.prompts.parquet"))
        storage.write_parquet(score_frame(gens, prompts, reward.scorers, device=reward.device),
                              uri)
    return storage.read_parquet(uri)


def seal_scores(generations_uri: str, lang: str, reward: RewardConfig, data_root: str) -> str:
    """Mark one language's scores complete once every generation shard has been scored by
    its shard group. Missing shards fail with their names."""
    out = score_uri(generations_uri, lang, reward, data_root)
    if storage.is_complete(out):
        return out
    parts = generation_parts(generations_uri)
    missing = sorted(set(parts) - set(storage.list_dir(out)))
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} of {len(parts)} shards are not scored "
                           f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                           "rerun scoring, which scores only the missing shards")
    _seal(out, len(parts), {})
    return out


def languages_score_key(generations_uris: dict[str, str], reward: RewardConfig) -> str:
    return stable_hash({"stage": "scores", "v": STAGE_VERSIONS["scores"],
                        "languages_together": True,
                        "generations": {lang: key_of(u)
                                        for lang, u in sorted(generations_uris.items())},
                        "reward": identity(reward)})


def run_score_languages(generations_uris: dict[str, str], prompts_uris: dict[str, str],
                        reward: RewardConfig, data_root: str) -> dict[str, str]:
    """Score the generations of every language together (full batches, each scorer loaded
    once); the `run_score` layout, one part and `_SUCCESS` per language; lang -> URI."""
    from croco.reward import score_frame

    t0 = time.perf_counter()
    key = languages_score_key(generations_uris, reward)
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
        "pairing": identity(pairing),
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

# The training stage lives in croco.training.run (a spec in, `training/<key>/` out).


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

def judge_key(candidate: dict[str, str], baseline: dict[str, str], judge) -> str:
    return stable_hash({
        "stage": "judgments", "v": STAGE_VERSIONS["judgments"],
        "candidate": {k: key_of(u) for k, u in sorted(candidate.items())},
        "baseline": {k: key_of(u) for k, u in sorted(baseline.items())},
        "judge": identity(judge),
    })


def run_judge(candidate_scores: dict[str, str], baseline_scores: dict[str, str],
              prompts_uris: dict[str, str], judge, data_root: str, *,
              device: str = "auto") -> str:
    """Judge the candidate's held-out answers against the baseline's, both orders; write
    `judgments.parquet` and `win_rates.parquet` (see croco.evaluation.winrate)."""
    out = storage.join(data_root, "judgments", judge_key(candidate_scores, baseline_scores, judge))
    return run_once(out, lambda: _judge(candidate_scores, baseline_scores, prompts_uris, judge,
                                        out, device))


def _judge(candidate_scores: dict[str, str], baseline_scores: dict[str, str],
           prompts_uris: dict[str, str], judge, out: str, device: str) -> dict:
    from croco.evaluation.judge import judge_pairs
    from croco.evaluation.winrate import JUDGE_TEMPLATE, win_rates

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
    return {"rows": judgments.height, "invalid": int(judgments["verdict"].null_count()),
            # share of verdicts for whichever answer was shown first: far from 0.5 means
            # the judge has a position bias
            "first_position_share": (float((valid["verdict"] == "1").mean())
                                     if valid.height else None)}


# ------------------------------------------------------------------ structured tasks

def structured_key(policy: PolicyConfig, structured, langs: list[str]) -> str:
    return stable_hash({"stage": "structured", "v": STAGE_VERSIONS["structured"],
                        "policy": identity(policy), "langs": sorted(langs),
                        "cfg": identity(structured)})


def run_structured(policy: PolicyConfig, structured, langs: list[str], data_root: str) -> str:
    """Multiple-choice accuracy of one model per language and task (lm-eval);
    writes `results.parquet` (lang, task, metric, value, n)."""
    out = storage.join(data_root, "structured", structured_key(policy, structured, langs))
    return run_once(out, lambda: _structured(policy, structured, langs, out))


def _structured(policy: PolicyConfig, structured, langs: list[str], out: str) -> dict:
    from croco.evaluation.structured import evaluate_euroeval, evaluate_structured
    from croco.models import pick_device, resolve_model

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
    return {"rows": df.height}


# ----------------------------------------------------------------------- reward check

def reward_check_key(path: str, reward: RewardConfig, langs: list[str]) -> str:
    return stable_hash({"stage": "reward_check", "v": STAGE_VERSIONS["reward_check"],
                        "set": path_identity(path), "langs": sorted(langs),
                        "reward": identity(reward)})


def run_reward_check(path: str, reward: RewardConfig, langs: list[str], data_root: str) -> str:
    """Ranking accuracy of the run's reward per language; writes `accuracy.parquet`."""
    from croco.evaluation.reward_check import load_preference_set, ranking_accuracy

    out = storage.join(data_root, "reward_check", reward_check_key(path, reward, langs))

    def work() -> dict:
        prefs = load_preference_set(path).filter(pl.col("lang").is_in(langs))
        table = ranking_accuracy(prefs, reward.scorers, device=reward.device)
        storage.write_parquet(table, storage.join(out, "accuracy.parquet"))
        return {"rows": table.height}

    return run_once(out, work)
