"""The pair stage's reading and writing, in memory bounded by the pairs, not the texts.

A scored set is Parquet shards (`scores/<key>/lang=xx/part-NNNNN.parquet`, or any folder or
glob of files with the score columns). The pair stage reads the score columns of every
shard with polars' native reader and column projection (`read_scores`: prompt_id, lang,
sample_idx, reward and, where present, finish_reason / detected_lang), remembering for each
row its shard (`_part`) and row in that shard (`_part_row`); it selects the pools on those
(`croco.pairing.pair_sets`); then it fetches the texts of the selected rows only, one shard
at a time (`shard_texts`), copying them out of the shard's buffers so that each shard's
response column is freed before the next one is read. Peak memory is the score columns,
one shard's responses and the selected texts (3 of every k samples at most).

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
from croco.pairing import OPTIONAL_SCORE_COLUMNS, SCORE_COLUMNS, PairSets, Texts, pair_sets

#: What a scored set must hold; `lang` may come from a hive `lang=xx` folder instead.
REQUIRED = {"prompt_id": "a string", "lang": "a string", "sample_idx": "an integer",
            "reward": "a number", "response": "a string"}


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


def pair_shards(parts: list[str], prompts: pl.DataFrame, pairing: PairingConfig) -> PairSets:
    """The pair stage on the score shards `parts`: score columns in, texts of the selected
    rows fetched last."""
    scores = read_scores(parts)
    return pair_sets(scores, prompts, texts=shard_texts(parts, scores),
                     **pairing_options(pairing))


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
    scores = read_scores(parts)
    if scores.height == 0:
        raise ScoredSetError(f"{scores_uri}: the scored set is empty (no rows)")
    _check_keys(scores, parts)
    prompts = load_prompts(prompts_source)
    langs = sorted(scores["lang"].unique())
    missing = sorted(set(langs) - set(prompts["lang"]))
    if missing:
        raise ScoredSetError(f"{prompts_source}: no prompt text in scored language(s) "
                             f"{missing}; the prompts must cover every scored language")
    sets = pair_sets(scores, prompts, texts=shard_texts(parts, scores),
                     **pairing_options(pairing))
    info = write_pair_sets(sets, out, langs)
    storage.mark_complete(out, {**info, "seconds": round(time.perf_counter() - t0, 3)})
    return sets

