"""The pair stage's reading and writing, in memory bounded by a batch of pools, not the set.

A scored set is Parquet shards (`scores/<key>/lang=xx/part-NNNNN.parquet`, or any folder or
glob of files with the score columns). The pair stage first reads each shard's pool keys
(`pool_keys`: its (prompt_id, lang) pairs and their row counts, nothing else) and groups
the shards that share a pool (one pool's samples may lie in several shards; an `all_lang`
pool spans the languages' shards) into batches of at most `BATCH_ROWS` rows (`batches`:
whole groups, so no pool is split). Then, batch by batch, it reads the score columns of
the batch's shards with polars' native reader and column projection (`read_scores`:
prompt_id, lang, sample_idx, reward and, where present, finish_reason / detected_lang),
remembering for each row its shard (`_part`) and row in that shard (`_part_row`); it
selects the batch's pools on those (`croco.pairing.pair_sets`); then it fetches the texts
of the selected rows only, one shard at a time (`shard_texts`), copying them out of the
shard's buffers so that each shard's response column is freed before the next one is
read. Peak memory is one batch's score columns, one shard's responses and the selected
texts of the whole set (3 of every k samples at most): flat in the number of prompts but
for the pairs themselves. The batches' pools, pairs and SFT rows are concatenated in pool
order and the per-language stats added up (`croco.pairing.combine_moments`), so the
outputs are those of one selection over the whole set (the stats up to float rounding).

Three options need every pool at once and select in one batch, holding every score row
as before: `reject_target: random` and `prompt_source: random` (their seeded draws run in
pool order over the whole set) and `normalize: zscore_per_lang` (each language's mean and
standard deviation over the whole set).

`build` is `croco pairs build`: the same stage for a scored set made elsewhere, with every
input checked (columns, types, prompts for every scored language) before anything is
written.
"""

from __future__ import annotations

import re
import time

import polars as pl

from croco import storage
from croco.config import PairingConfig
from croco.pairing import (
    OPTIONAL_SCORE_COLUMNS,
    SCORE_COLUMNS,
    PairSets,
    Texts,
    combine_moments,
    finish_stats,
    pair_sets,
    sample_moments,
)

#: What a scored set must hold; `lang` may come from a hive `lang=xx` folder instead.
REQUIRED = {"prompt_id": "a string", "lang": "a string", "sample_idx": "an integer",
            "reward": "a number", "response": "a string"}


#: Score rows selected on at once: a batch of whole pools (more when one group of shards
#: that share pools is larger). Some 100-200 bytes a row while a batch is selected on
#: (the columns, the sort, the picks), so a few tens of MB.
BATCH_ROWS = 1 << 17


class ScoredSetError(ValueError):
    """A scored set or its prompts cannot be paired; the message names the file and column."""


def _expected(dtype: pl.DataType, kind: str) -> bool:
    if kind == "a string":
        return dtype == pl.String
    if kind == "an integer":
        return dtype.is_integer()
    return dtype.is_numeric()


def _hive_lang(uri: str) -> str | None:
    m = re.search(r"(?:^|/)lang=([^/]+)/", uri.replace("\\", "/"))
    return m.group(1) if m else None


def _check_schema(uri: str, schema: pl.Schema) -> None:
    for col, kind in REQUIRED.items():
        if col not in schema:
            if col == "lang" and _hive_lang(uri):
                continue
            raise ScoredSetError(f"{uri}: no column {col!r}; a scored set needs "
                                 f"{', '.join(REQUIRED)} (lang may be a lang=xx folder)")
        if not _expected(schema[col], kind):
            raise ScoredSetError(f"{uri}: column {col!r} is {schema[col]}, expected {kind}")


def read_scores(parts: list[str]) -> pl.DataFrame:
    """The score columns of every shard in `parts` (never the texts), plus `_part` (index
    into `parts`) and `_part_row` (row in that shard). Checks each shard's columns."""
    frames = []
    for i, uri in enumerate(parts):
        lf = storage.scan_parquet(uri)
        schema = lf.collect_schema()
        _check_schema(uri, schema)
        cols = [c for c in (*SCORE_COLUMNS, *OPTIONAL_SCORE_COLUMNS) if c in schema]
        lf = lf.select(cols).with_row_index("_part_row")
        if "lang" not in schema:
            lf = lf.with_columns(pl.lit(_hive_lang(uri)).alias("lang"))
        frames.append(lf.with_columns(pl.lit(i, pl.UInt32).alias("_part")).collect())
    if not frames:
        return pl.DataFrame(schema={"prompt_id": pl.String, "lang": pl.String,
                                    "sample_idx": pl.Int64, "reward": pl.Float64})
    return pl.concat(frames, how="diagonal_relaxed")


def pool_keys(parts: list[str]) -> list[pl.DataFrame]:
    """Per shard in `parts`: its (prompt_id, lang) pairs with their row counts (`len`),
    read from the prompt_id and lang columns only. Checks each shard's columns."""
    out = []
    for uri in parts:
        lf = storage.scan_parquet(uri)
        schema = lf.collect_schema()
        _check_schema(uri, schema)
        if "lang" not in schema:
            lf = lf.with_columns(pl.lit(_hive_lang(uri)).alias("lang"))
        out.append(lf.group_by("prompt_id", "lang").len().collect())
    return out


def batches(keys: list[pl.DataFrame], scope: str, max_rows: int = BATCH_ROWS) -> list[list[int]]:
    """Shard indexes in batches of at most `max_rows` rows that split no pool: shards that
    share a pool key ((prompt_id, lang) for `in_lang`, prompt_id for `all_lang`) are in
    the same batch. Batches in order of their first shard."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict = {}
    cols = ["prompt_id", "lang"] if scope == "in_lang" else ["prompt_id"]
    for i, frame in enumerate(keys):
        for key in frame.select(cols).unique().iter_rows():
            j = owner.setdefault(key, i)
            if j != i:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(keys)):
        groups.setdefault(root(i), []).append(i)
    out: list[list[int]] = []
    rows = 0
    for group in groups.values():  # in order of first shard: roots are the smallest index
        n = sum(int(keys[i]["len"].sum()) for i in group)
        if out and rows + n <= max_rows:
            out[-1].extend(group)
            rows += n
        else:
            out.append(list(group))
            rows = n
    return [sorted(b) for b in out]


def _whole_set(pairing: PairingConfig) -> bool:
    """The options whose selection needs every pool at once (module docstring)."""
    return (pairing.reject_target == "random" or pairing.normalize != "none"
            or (pairing.scope == "all_lang" and pairing.prompt_source == "random"))


def _copied(texts: pl.Series) -> pl.Series:
    """`texts` in buffers of their own: a filtered string column still points into the
    whole shard's buffers, which would keep every shard's texts alive."""
    return pl.Series(texts.name, texts.to_arrow(compat_level=pl.CompatLevel.oldest()))


def shard_texts(parts: list[str], scores: pl.DataFrame) -> Texts:
    """A `Texts` callable for `scores` as `read_scores` returned it: the response of each
    asked row, read shard by shard (only the shards and rows asked for)."""

    def fetch(rows: pl.Series) -> pl.Series:
        where = pl.DataFrame({"_part": scores["_part"].gather(rows),
                              "_part_row": scores["_part_row"].gather(rows)})
        need = where.unique().sort("_part", "_part_row")
        found = []
        for (part,), wanted in need.partition_by("_part", as_dict=True,
                                                 maintain_order=True).items():
            got = (storage.scan_parquet(parts[part]).select("response")
                   .with_row_index("_part_row")
                   .filter(pl.col("_part_row").is_in(wanted["_part_row"].implode()))
                   .collect())
            found.append(pl.DataFrame({
                "_part": pl.Series([part] * got.height, dtype=pl.UInt32),
                "_part_row": got["_part_row"], "response": _copied(got["response"])}))
            del got
        table = pl.concat(found)
        return where.join(table, on=["_part", "_part_row"], how="left",
                          maintain_order="left")["response"]

    return fetch


def _write_partitioned(df: pl.DataFrame, uri: str, lang_col: str, langs: list[str]) -> None:
    for lang in langs:
        part = df.filter(pl.col(lang_col) == lang)
        storage.write_parquet(part, storage.join(uri, f"lang={lang}", "data.parquet"))


def write_pair_sets(sets: PairSets, out: str, langs: list[str]) -> dict:
    """The pair stage's layout under `out`: dpo/ and sft/ per language (one file for every
    language in `langs`, empty where it has no rows), pools.parquet, stats.parquet. Returns
    what its `_SUCCESS` marker records (the caller writes it, last)."""
    _write_partitioned(sets.dpo, storage.join(out, "dpo"), "prompt_lang", langs)
    _write_partitioned(sets.sft, storage.join(out, "sft"), "lang", langs)
    storage.write_parquet(sets.pools, storage.join(out, "pools.parquet"))
    storage.write_parquet(sets.stats, storage.join(out, "stats.parquet"))
    return {"rows": sets.dpo.height, "sft_rows": sets.sft.height,
            "skipped": int(sets.pools["skipped"].sum())}


def pairing_options(pairing: PairingConfig) -> dict:
    """`pair_sets` keyword arguments from the config section."""
    return pairing.model_dump()


def pair_shards(parts: list[str], prompts: pl.DataFrame, pairing: PairingConfig, *,
                keys: list[pl.DataFrame] | None = None, check: bool = False,
                max_rows: int | None = None) -> PairSets:
    """The pair stage on the score shards `parts`, batch by batch (module docstring): score
    columns in, texts of the selected rows fetched last. `keys`: `pool_keys(parts)` when
    the caller has them; `check`: refuse null keys and duplicate samples (`croco pairs
    build`); `max_rows`: the batch budget (default `BATCH_ROWS`)."""
    opts = pairing_options(pairing)
    keys = pool_keys(parts) if keys is None else keys
    groups = ([list(range(len(parts)))] if _whole_set(pairing) or len(parts) <= 1
              else batches(keys, pairing.scope, max_rows or BATCH_ROWS))
    pools, dpo, sft, moments = [], [], [], []
    for group in groups:
        batch = [parts[i] for i in group]
        scores = read_scores(batch)
        if check:
            _check_keys(scores, batch)
        sets = pair_sets(scores, prompts, texts=shard_texts(batch, scores), **opts)
        if len(groups) == 1:
            return sets
        moments.append(sample_moments(scores))
        del scores
        pools.append(sets.pools)
        dpo.append(sets.dpo)
        sft.append(sets.sft)
    pools_df = pl.concat(pools).sort("prompt_id", "pool_lang", maintain_order=True)
    dpo_df = pl.concat(dpo).sort("prompt_id", "prompt_lang", maintain_order=True)
    sft_df = pl.concat(sft).sort("prompt_id", "lang", maintain_order=True)
    return PairSets(pools=pools_df, dpo=dpo_df, sft=sft_df,
                    stats=finish_stats(combine_moments(moments), pools_df, dpo_df))


def _check_keys(scores: pl.DataFrame, parts: list[str]) -> None:
    for col in ("prompt_id", "lang", "sample_idx"):
        nulls = scores.filter(pl.col(col).is_null())
        if nulls.height:
            r = nulls.row(0, named=True)
            raise ScoredSetError(f"{parts[r['_part']]} row {r['_part_row'] + 1}: {col} is "
                                 "null; every sample needs prompt_id, lang and sample_idx")
    dup = scores.group_by("prompt_id", "lang", "sample_idx").len().filter(pl.col("len") > 1)
    if dup.height:
        r = dup.row(0, named=True)
        raise ScoredSetError(f"prompt_id {r['prompt_id']!r}, lang {r['lang']!r}, sample_idx "
                             f"{r['sample_idx']} appears {r['len']} times in the scored set; "
                             "each sample must be unique")


def build(scores_uri: str, prompts_source: str, pairing: PairingConfig, out: str) -> PairSets:
    """Pair a scored set (a folder or glob of Parquet shards) against a prompt source
    (`croco.prompts.load_prompts`) and write the pair stage's layout under `out`. Every
    check runs and every text is fetched before the first file is written; `out` must be
    empty or absent."""
    from croco.prompts import load_prompts

    t0 = time.perf_counter()
    if storage.list_dir(out):
        raise ScoredSetError(f"--out {out} is not empty; give a new folder")
    parts = storage.parquet_files(scores_uri)
    if not parts:
        raise ScoredSetError(f"{scores_uri}: no Parquet files found")
    keys = pool_keys(parts)
    if not any(k.height for k in keys):
        raise ScoredSetError(f"{scores_uri}: the scored set is empty (no rows)")
    prompts = load_prompts(prompts_source)
    langs = sorted({lang for k in keys for lang in k["lang"].drop_nulls()})
    missing = sorted(set(langs) - set(prompts["lang"]))
    if missing:
        raise ScoredSetError(f"{prompts_source}: no prompt text in scored language(s) "
                             f"{missing}; the prompts must cover every scored language")
    sets = pair_shards(parts, prompts, pairing, keys=keys, check=True)
    info = write_pair_sets(sets, out, langs)
    storage.mark_complete(out, {**info, "seconds": round(time.perf_counter() - t0, 3)})
    return sets

