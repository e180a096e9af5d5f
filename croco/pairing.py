"""Controlled-contrast preference pairs from scored self-generations (the CroCo rule).

For each pool (`in_lang`: the samples of one prompt_id in one lang; `all_lang`: all samples
of one prompt_id over every language), ordered by (lang, sample_idx):

1. chosen = the highest reward; ties go to the first in pool order.
2. target = mean - 2 std (population std) for `mean_minus_2sigma` (default); the 25th
   percentile (linear interpolation) for `q1`; the minimum for `min`.
3. rejected = among the samples strictly below chosen, the one closest to the target;
   ties go to the first in pool order. Distances equal up to float rounding are ties:
   with d_min the smallest distance d = |reward - target| among the candidates, every
   candidate with d - d_min <= 1e-9 * max(d, |target|) counts as closest (relative to the
   scale the distance was rounded at). The 25th percentile of three samples is the
   midpoint of two of them; which of the two is nearer must not depend on how the target
   was rounded.
4. A pool of fewer than 2 samples, or with no strictly lower sample, gives no pair (skipped).
5. `all_lang` takes the prompt text in the chosen sample's language (`prompt_source=chosen`),
   the rejected one's (`rejected`) or a seeded random language of the pool (`random`: one
   uniform draw per prompt_id, in prompt_id order, over the sorted languages it has after
   the filters).
6. SFT sets keep the chosen sample only, chosen by rule 1 on the raw reward of every
   sample of the pool (the filters and `normalize` below shape the DPO pairs only).

Options beyond the paper (defaults keep the paper's behaviour): targets
`mean_minus_sigma`, `percentile:<p>`, `max_min` (= `min`), `random` (a seeded uniform draw
among the strictly lower samples: one draw per candidate in (pool, pool order) order, the
smallest draw wins); `min_gap` (rejected must be at least this far below chosen);
`drop_truncated` / `drop_wrong_lang` filters before pooling; `normalize=
"zscore_per_lang"` z-scores rewards within each language before pooling (the pair scores
are then the normalized values). A sample with a null reward counts in `pool_size` and is
never chosen or rejected.

How it is computed: the texts play no part in the rule, so pools are selected on the score
columns alone (`SCORE_COLUMNS`) and each sample is named by its row number in that table;
the chosen and rejected texts are fetched afterwards for the selected rows only
(`texts` callables; `croco.pairs_io` reads them shard by shard). The selection sorts once
by (prompt_id, lang, sample_idx), aggregates each pool once (size, max, target) and picks
chosen and rejected with segment reductions (`numpy.minimum.reduceat`) over the sorted
rows: linear after the sort, no Python loop over pools and no window over the whole table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from croco.config import parse_reject_target

SCOPES = ("in_lang", "all_lang")
PROMPT_SOURCES = ("chosen", "rejected", "random")
#: The columns pairing reads; `finish_reason` / `detected_lang` too where present (filters,
#: stats). Never the response texts.
SCORE_COLUMNS = ("prompt_id", "lang", "sample_idx", "reward")
OPTIONAL_SCORE_COLUMNS = ("finish_reason", "detected_lang")
#: Relative tolerance under which two distances to the target are a tie (rule 3).
TIE_RTOL = 1e-9

#: Fetch texts by row number of the scores table: rows (UInt32/Int64, no nulls) -> texts.
Texts = Callable[[pl.Series], pl.Series]

DPO_SCHEMA = {
    "prompt_id": pl.String,
    "prompt_lang": pl.String,
    "prompt": pl.String,
    "chosen": pl.String,
    "rejected": pl.String,
    "chosen_score": pl.Float64,
    "rejected_score": pl.Float64,
    "chosen_lang": pl.String,
    "rejected_lang": pl.String,
    "pool_size": pl.Int32,
    "scope": pl.String,
    "reject_target": pl.String,
}
SFT_SCHEMA = {
    "prompt_id": pl.String,
    "lang": pl.String,
    "prompt": pl.String,
    "completion": pl.String,
    "reward": pl.Float64,
}


@dataclass
class PairSets:
    """The pair stage's tables: pool selection (no texts), DPO pairs, SFT rows, stats."""

    pools: pl.DataFrame
    dpo: pl.DataFrame
    sft: pl.DataFrame
    stats: pl.DataFrame


def _prepare(scores: pl.DataFrame, *, drop_truncated: bool, drop_wrong_lang: bool,
             normalize: str) -> pl.DataFrame:
    """The score columns plus `_row` (row number in `scores`) and `_score`, after the
    filters, sorted in pool order."""
    missing = set(SCORE_COLUMNS) - set(scores.columns)
    if missing:
        raise ValueError(f"scores table lacks column(s) {sorted(missing)}")
    cols = [c for c in (*SCORE_COLUMNS, *OPTIONAL_SCORE_COLUMNS) if c in scores.columns]
    df = scores.select(cols).with_row_index("_row")
    if drop_truncated and "finish_reason" in df.columns:
        df = df.filter(pl.col("finish_reason") != "length")
    if drop_wrong_lang and "detected_lang" in df.columns:
        df = df.filter(pl.col("detected_lang") == pl.col("lang"))
    score = pl.col("reward").cast(pl.Float64)
    if normalize == "zscore_per_lang":
        std = score.std(ddof=0).over("lang")
        score = pl.when(std > 0).then((score - score.mean().over("lang")) / std).otherwise(0.0)
    elif normalize != "none":
        raise ValueError(f"normalize {normalize!r}: use 'none' or 'zscore_per_lang'")
    # (prompt_id, lang, sample_idx) is pool order for both scopes, and it keeps the rows of
    # every in_lang and all_lang pool contiguous.
    return df.with_columns(score.alias("_score")).sort("prompt_id", "lang", "sample_idx",
                                                       maintain_order=True)


def _target_expr(kind: str, param: float | None) -> pl.Expr:
    s = pl.col("_score")
    if kind == "mean_minus_2sigma":
        return s.mean() - 2.0 * s.std(ddof=0)
    if kind == "mean_minus_sigma":
        return s.mean() - s.std(ddof=0)
    if kind == "q1":
        return s.quantile(0.25, interpolation="linear")
    if kind == "percentile":
        return s.quantile(param / 100.0, interpolation="linear")
    if kind in ("min", "max_min"):
        return s.min()
    if kind == "random":
        return pl.lit(None, dtype=pl.Float64)
    raise ValueError(kind)


def _pick(score: np.ndarray, sizes: np.ndarray, pool_max: np.ndarray, target: np.ndarray, *,
          random: bool, seed: int, min_gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in the sorted rows) of each pool's chosen and rejected sample; len(score)
    where a pool has none. Pools are consecutive runs of `sizes` rows, in pool order."""
    n = score.size
    starts = np.cumsum(sizes) - sizes
    pos = np.arange(n)
    best = np.repeat(pool_max, sizes)
    with np.errstate(invalid="ignore"):  # null rewards are NaN here and compare False
        chosen = np.minimum.reduceat(np.where(score == best, pos, n), starts)
        cand = (score < best) & ((best - score) >= min_gap)
    if random:
        key = np.full(n, np.inf)
        key[cand] = np.random.default_rng(seed).random(int(cand.sum()))
        tol = np.zeros(n)  # random draws are exact keys
    else:
        t = np.repeat(target, sizes)
        key = np.where(cand, np.abs(score - t), np.inf)
        tol = TIE_RTOL * np.maximum(key, np.abs(t))
    closest = np.repeat(np.minimum.reduceat(key, starts), sizes)
    with np.errstate(invalid="ignore"):  # inf - inf where a pool has no candidate
        near = cand & (key - closest <= tol)
    rejected = np.minimum.reduceat(np.where(near, pos, n), starts)
    return chosen, rejected


def _gather(series: pl.Series, idx: np.ndarray, valid: np.ndarray) -> pl.Series:
    """series[idx], null where `valid` is False."""
    at = pl.Series(idx, dtype=pl.Int64).scatter(np.flatnonzero(~valid), None)
    return series.gather(at)


def _select(scores: pl.DataFrame, *, scope: str = "in_lang",
            reject_target: str = "mean_minus_2sigma", seed: int = 42, min_gap: float = 0.0,
            drop_truncated: bool = False, drop_wrong_lang: bool = False,
            normalize: str = "none") -> pl.DataFrame:
    """`select_pools` plus `_chosen_row` / `_rejected_row`: the row numbers in `scores`."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: use one of {SCOPES}")
    kind, param = parse_reject_target(reject_target)
    df = _prepare(scores, drop_truncated=drop_truncated, drop_wrong_lang=drop_wrong_lang,
                  normalize=normalize)
    pool = ["prompt_id", "lang"] if scope == "in_lang" else ["prompt_id"]
    agg = df.group_by(pool, maintain_order=True).agg(
        pl.len().cast(pl.Int32).alias("pool_size"),
        pl.col("_score").max().alias("_max"),
        _target_expr(kind, param).cast(pl.Float64).alias("target"),
    )
    sizes = agg["pool_size"].to_numpy().astype(np.int64)
    if df.height:
        chosen, rejected = _pick(df["_score"].to_numpy(), sizes, agg["_max"].to_numpy(),
                                 agg["target"].to_numpy(), random=kind == "random", seed=seed,
                                 min_gap=min_gap)
    else:
        chosen = rejected = np.zeros(0, dtype=np.int64)
    has_chosen, has_rejected = chosen < df.height, rejected < df.height
    picked = {}
    for side, idx, valid in (("chosen", chosen, has_chosen), ("rejected", rejected, has_rejected)):
        for col, name in (("lang", "lang"), ("sample_idx", "sample_idx"), ("_score", "score"),
                          ("_row", "row")):
            out_name = f"_{side}_row" if name == "row" else f"{side}_{name}"
            picked[out_name] = _gather(df[col], idx, valid)
    out = agg.select(
        "prompt_id",
        (pl.col("lang") if scope == "in_lang" else pl.lit(None, pl.String)).alias("pool_lang"),
        "pool_size", "target",
    ).with_columns(**picked)
    # A pool of one sample has no strictly lower sample, so it is skipped by rule 4 as well.
    # A pool whose rewards are all null has no chosen sample and no row at all.
    out = out.with_columns(pl.col("_rejected_row").is_null().alias("skipped"))
    return out.filter(pl.Series(has_chosen)).select(
        "prompt_id", "pool_lang", "pool_size", "target",
        "chosen_lang", "chosen_sample_idx", "chosen_score",
        "rejected_lang", "rejected_sample_idx", "rejected_score", "skipped",
        "_chosen_row", "_rejected_row",
    )


def select_pools(scores: pl.DataFrame, *, scope: str = "in_lang",
                 reject_target: str = "mean_minus_2sigma", seed: int = 42, min_gap: float = 0.0,
                 drop_truncated: bool = False, drop_wrong_lang: bool = False,
                 normalize: str = "none") -> pl.DataFrame:
    """One row per pool, in (prompt_id, pool_lang) order: the chosen and the rejected sample
    (null when skipped), without texts.

    Columns: prompt_id, pool_lang (the language for in_lang, null for all_lang), pool_size,
    target, chosen_*/rejected_* (lang, sample_idx, score) and `skipped`. Reads only
    `SCORE_COLUMNS` (and `OPTIONAL_SCORE_COLUMNS` for the filters)."""
    return _select(scores, scope=scope, reject_target=reject_target, seed=seed,
                   min_gap=min_gap, drop_truncated=drop_truncated,
                   drop_wrong_lang=drop_wrong_lang, normalize=normalize).drop(
        "_chosen_row", "_rejected_row")


def _attach_prompt(pairs: pl.DataFrame, prompts: pl.DataFrame, lang_col: str) -> pl.DataFrame:
    texts = prompts.select("prompt_id", pl.col("lang").alias(lang_col), "prompt").unique(
        subset=["prompt_id", lang_col], keep="first", maintain_order=True
    )
    out = pairs.join(texts, on=["prompt_id", lang_col], how="left", maintain_order="left")
    missing = out.filter(pl.col("prompt").is_null())
    if missing.height:
        r = missing.row(0, named=True)
        raise ValueError(f"no prompt text for prompt_id {r['prompt_id']!r} in lang "
                         f"{r[lang_col]!r}; the prompts table must cover every scored language")
    return out


def _prompt_langs(pairs: pl.DataFrame, scores: pl.DataFrame, *, scope: str,
                  prompt_source: str, seed: int, drop_truncated: bool,
                  drop_wrong_lang: bool) -> pl.DataFrame:
    """`pairs` with `prompt_lang` by rule 5."""
    if prompt_source not in PROMPT_SOURCES:
        raise ValueError(f"prompt_source {prompt_source!r}: use one of {PROMPT_SOURCES}")
    if scope == "in_lang" or prompt_source == "chosen":
        return pairs.with_columns(pl.col("chosen_lang").alias("prompt_lang"))
    if prompt_source == "rejected":
        return pairs.with_columns(pl.col("rejected_lang").alias("prompt_lang"))
    present = (
        _prepare(scores, drop_truncated=drop_truncated, drop_wrong_lang=drop_wrong_lang,
                 normalize="none")
        .group_by("prompt_id").agg(pl.col("lang").unique().sort().alias("_langs"))
        .sort("prompt_id")
    )
    u = pl.Series("_u", np.random.default_rng(seed).random(present.height))
    present = present.with_columns(u).select(
        "prompt_id",
        pl.col("_langs").list.get((pl.col("_u") * pl.col("_langs").list.len())
                                  .floor().cast(pl.Int64)).alias("prompt_lang"),
    )
    return pairs.join(present, on="prompt_id", how="left", maintain_order="left")


def _dpo_rows(pools: pl.DataFrame, scores: pl.DataFrame, prompts: pl.DataFrame, *,
              scope: str, reject_target: str, prompt_source: str, seed: int,
              drop_truncated: bool, drop_wrong_lang: bool) -> pl.DataFrame:
    """The DPO pairs without their texts (`_chosen_row` / `_rejected_row` instead)."""
    pairs = _prompt_langs(pools.filter(~pl.col("skipped")), scores, scope=scope,
                          prompt_source=prompt_source, seed=seed,
                          drop_truncated=drop_truncated, drop_wrong_lang=drop_wrong_lang)
    pairs = _attach_prompt(pairs, prompts, "prompt_lang")
    return pairs.with_columns(pl.lit(scope).alias("scope"),
                              pl.lit(reject_target).alias("reject_target"))


def _sft_rows(pools: pl.DataFrame, scores: pl.DataFrame, prompts: pl.DataFrame, *,
              scope: str, raw: bool) -> pl.DataFrame:
    """SFT rows without the completion text (`_chosen_row` instead). `raw`: the pools were
    selected on every sample's raw reward, so their chosen samples are rule 6's."""
    if not raw:
        pools = _select(scores, scope=scope, reject_target="min")
    sft = pools.select("prompt_id", pl.col("chosen_lang").alias("lang"), "_chosen_row")
    sft = sft.with_columns(scores["reward"].gather(sft["_chosen_row"]).cast(pl.Float64)
                           .alias("reward"))
    return _attach_prompt(sft, prompts, "lang").sort("prompt_id", "lang", maintain_order=True)


def _with_texts(frames: list[tuple[pl.DataFrame, dict[str, str]]],
                texts: Texts) -> list[pl.DataFrame]:
    """Each frame with text columns {name: row column} filled by one `texts` call."""
    rows = [f[col] for f, cols in frames for col in cols.values()]
    got = texts(pl.concat(rows).cast(pl.Int64)) if sum(len(r) for r in rows) else None
    out, offset = [], 0
    for frame, cols in frames:
        for name in cols:
            part = (got.slice(offset, frame.height) if got is not None
                    else pl.Series(name, [], dtype=pl.String))
            frame = frame.with_columns(part.alias(name))
            offset += frame.height
        out.append(frame)
    return out


def _texts_of(scores: pl.DataFrame) -> Texts:
    if "response" not in scores.columns:
        raise ValueError("scores table lacks column(s) ['response']")
    return lambda rows: scores["response"].gather(rows)


def _options(scope: str, reject_target: str, seed: int, min_gap: float,
             drop_truncated: bool, drop_wrong_lang: bool, normalize: str) -> dict:
    return {"scope": scope, "reject_target": reject_target, "seed": seed, "min_gap": min_gap,
            "drop_truncated": drop_truncated, "drop_wrong_lang": drop_wrong_lang,
            "normalize": normalize}


def pair_sets(scores: pl.DataFrame, prompts: pl.DataFrame, *, texts: Texts | None = None,
              scope: str = "in_lang", reject_target: str = "mean_minus_2sigma",
              prompt_source: str = "chosen", seed: int = 42, min_gap: float = 0.0,
              drop_truncated: bool = False, drop_wrong_lang: bool = False,
              normalize: str = "none") -> PairSets:
    """Everything the pair stage writes, from one pool selection.

    `scores` needs `SCORE_COLUMNS` only; `texts` fetches the response of rows of `scores`
    (default: its `response` column). Texts are fetched once, for the selected rows only,
    after every prompt text was found."""
    opts = _options(scope, reject_target, seed, min_gap, drop_truncated, drop_wrong_lang,
                    normalize)
    texts = texts or _texts_of(scores)
    pools = _select(scores, **opts)
    dpo = _dpo_rows(pools, scores, prompts, scope=scope, reject_target=reject_target,
                    prompt_source=prompt_source, seed=seed, drop_truncated=drop_truncated,
                    drop_wrong_lang=drop_wrong_lang)
    raw = not drop_truncated and not drop_wrong_lang and normalize == "none"
    sft = _sft_rows(pools, scores, prompts, scope=scope, raw=raw)
    dpo, sft = _with_texts([(dpo, {"chosen": "_chosen_row", "rejected": "_rejected_row"}),
                            (sft, {"completion": "_chosen_row"})], texts)
    dpo = dpo.select([pl.col(c).cast(t) for c, t in DPO_SCHEMA.items()])
    sft = sft.select([pl.col(c).cast(t) for c, t in SFT_SCHEMA.items()])
    pools = pools.drop("_chosen_row", "_rejected_row")
    return PairSets(pools=pools, dpo=dpo, sft=sft, stats=pair_stats(scores, pools, dpo))


def build_pairs(scores: pl.DataFrame, prompts: pl.DataFrame, *, scope: str = "in_lang",
                reject_target: str = "mean_minus_2sigma", prompt_source: str = "chosen",
                seed: int = 42, min_gap: float = 0.0, drop_truncated: bool = False,
                drop_wrong_lang: bool = False, normalize: str = "none") -> pl.DataFrame:
    """DPO pairs (the columns of docs/architecture.md), one per pool that has a strictly lower sample."""
    opts = _options(scope, reject_target, seed, min_gap, drop_truncated, drop_wrong_lang,
                    normalize)
    texts = _texts_of(scores)
    pools = _select(scores, **opts)
    dpo = _dpo_rows(pools, scores, prompts, scope=scope, reject_target=reject_target,
                    prompt_source=prompt_source, seed=seed, drop_truncated=drop_truncated,
                    drop_wrong_lang=drop_wrong_lang)
    [dpo] = _with_texts([(dpo, {"chosen": "_chosen_row", "rejected": "_rejected_row"})], texts)
    return dpo.select([pl.col(c).cast(t) for c, t in DPO_SCHEMA.items()])


def build_sft(scores: pl.DataFrame, prompts: pl.DataFrame, *,
              scope: str = "in_lang") -> pl.DataFrame:
    """SFT rows: the chosen (highest-reward) sample of each pool, prompt in its language."""
    texts = _texts_of(scores)
    sft = _sft_rows(_select(scores, scope=scope, reject_target="min"), scores, prompts,
                    scope=scope, raw=True)
    [sft] = _with_texts([(sft, {"completion": "_chosen_row"})], texts)
    return sft.select([pl.col(c).cast(t) for c, t in SFT_SCHEMA.items()])


def sample_moments(scores: pl.DataFrame) -> pl.DataFrame:
    """Per language, what `pair_stats` needs of the samples, in a form that adds up over
    disjoint sets of pools (`combine_moments`): prompts, samples, the count, mean and sum
    of squared deviations (`_m2`) of the non-null rewards, and the language matches."""
    reward = pl.col("reward").cast(pl.Float64)
    match = ((pl.col("detected_lang") == pl.col("lang")) if "detected_lang" in scores.columns
             else pl.lit(None, pl.Boolean))
    return scores.group_by("lang").agg(
        pl.col("prompt_id").n_unique().cast(pl.Int64).alias("prompts"),
        pl.len().cast(pl.Int64).alias("samples"),
        reward.count().cast(pl.Int64).alias("_n"),
        reward.mean().alias("reward_mean"),
        (reward.std(ddof=0).pow(2) * reward.count()).alias("_m2"),
        match.cast(pl.Int64).sum().alias("_match"),
        match.count().cast(pl.Int64).alias("_match_n"),
    )


def combine_moments(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """`sample_moments` of disjoint sets of pools, as one (Chan's pairwise update for the
    mean and the squared deviations: equal to the whole table's up to float rounding). A
    prompt's samples of one language are all in one set, so the prompt counts add up."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, dict] = {}
    for part in parts:
        for r in part.iter_rows(named=True):
            a = out.get(r["lang"])
            if a is None:
                out[r["lang"]] = dict(r)
                continue
            n = a["_n"] + r["_n"]
            if r["_n"]:
                if a["_n"]:
                    delta = r["reward_mean"] - a["reward_mean"]
                    a["_m2"] = a["_m2"] + r["_m2"] + delta * delta * a["_n"] * r["_n"] / n
                    a["reward_mean"] = a["reward_mean"] + delta * r["_n"] / n
                else:
                    a["reward_mean"], a["_m2"] = r["reward_mean"], r["_m2"]
            a["_n"] = n
            for col in ("prompts", "samples", "_match", "_match_n"):
                a[col] += r[col]
    return pl.DataFrame(list(out.values()), schema=parts[0].schema)


def finish_stats(moments: pl.DataFrame, pools: pl.DataFrame,
                 pairs: pl.DataFrame) -> pl.DataFrame:
    """The stats table from the samples' moments and the pools and pairs."""
    base = moments.select(
        "lang", pl.col("prompts").cast(pl.UInt32), pl.col("samples").cast(pl.UInt32),
        "reward_mean",
        pl.when(pl.col("_n") > 0).then((pl.col("_m2") / pl.col("_n")).sqrt())
        .alias("reward_std"),
        pl.when(pl.col("_match_n") > 0).then(pl.col("_match") / pl.col("_match_n"))
        .cast(pl.Float64).alias("lang_match"),
    )
    gaps = pairs.with_columns((pl.col("chosen_score") - pl.col("rejected_score")).alias("gap"))
    per_pair = gaps.group_by(pl.col("prompt_lang").alias("lang")).agg(
        pl.len().alias("pairs"),
        pl.col("gap").mean().alias("gap_mean"),
        pl.col("gap").median().alias("gap_median"),
        pl.col("gap").min().alias("gap_min"),
        pl.col("gap").max().alias("gap_max"),
    )
    skipped = (
        pools.filter(pl.col("pool_lang").is_not_null())
        .group_by(pl.col("pool_lang").alias("lang"))
        .agg(pl.col("skipped").sum().cast(pl.Int64).alias("skipped"))
    )
    out = base.join(per_pair, on="lang", how="left").join(skipped, on="lang", how="left")
    return out.with_columns(pl.col("pairs").fill_null(0)).select(
        "lang", "prompts", "samples", "reward_mean", "reward_std", "pairs", "skipped",
        "gap_mean", "gap_median", "gap_min", "gap_max", "lang_match",
    ).sort("lang")


def pair_stats(scores: pl.DataFrame, pools: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """Per-language stats: prompts, samples, reward mean/std, pairs, skipped pools,
    reward gap (chosen - rejected) distribution and the share of responses in the prompt's
    language (`lang_match`, null when no language was detected)."""
    return finish_stats(sample_moments(scores), pools, pairs)
