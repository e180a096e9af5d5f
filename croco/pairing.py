"""Controlled-contrast preference pairs from scored self-generations (the CroCo rule).

For each pool (`in_lang`: the samples of one prompt_id in one lang; `all_lang`: all samples
of one prompt_id over every language), ordered by (lang, sample_idx):

1. chosen = the highest reward; ties go to the first in pool order.
2. target = mean - 2 std (population std) for `mean_minus_2sigma` (default); the 25th
   percentile (linear interpolation) for `q1`; the minimum for `min`.
3. rejected = among the samples strictly below chosen, the one closest to the target;
   ties go to the first in pool order.
4. A pool of fewer than 2 samples, or with no strictly lower sample, gives no pair (skipped).
5. `all_lang` takes the prompt text in the chosen sample's language (`prompt_source=chosen`),
   the rejected one's (`rejected`) or a seeded random language of the pool (`random`).
6. SFT sets keep the chosen sample only.

Options beyond the paper (defaults keep the paper's behaviour): targets
`mean_minus_sigma`, `percentile:<p>`, `max_min` (= `min`), `random` (a seeded uniform draw
among the strictly lower samples); `min_gap` (rejected must be at least this far below
chosen); `drop_truncated` / `drop_wrong_lang` filters before pooling; `normalize=
"zscore_per_lang"` z-scores rewards within each language before pooling (the pair scores
are then the normalized values).

Everything is vectorised with polars; there is no Python loop over pools.
"""

from __future__ import annotations

import numpy as np
import polars as pl

SCOPES = ("in_lang", "all_lang")
PROMPT_SOURCES = ("chosen", "rejected", "random")

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


def parse_reject_target(name: str) -> tuple[str, float | None]:
    """('kind', parameter) for a reject target name; raises ValueError for unknown ones."""
    simple = {"mean_minus_2sigma", "mean_minus_sigma", "q1", "min", "max_min", "random"}
    if name in simple:
        return name, None
    if name.startswith("percentile:"):
        try:
            p = float(name.split(":", 1)[1])
        except ValueError:
            p = -1.0
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"reject_target {name!r}: the percentile must be a number in 0..100")
        return "percentile", p
    raise ValueError(
        f"unknown reject_target {name!r}; use one of {sorted(simple)} or percentile:<p>"
    )


def _prepare(scores: pl.DataFrame, *, drop_truncated: bool, drop_wrong_lang: bool,
             normalize: str) -> pl.DataFrame:
    needed = {"prompt_id", "lang", "sample_idx", "response", "reward"}
    missing = needed - set(scores.columns)
    if missing:
        raise ValueError(f"scores table lacks column(s) {sorted(missing)}")
    df = scores
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
    return df.with_columns(score.alias("_score"))


def _target_expr(kind: str, param: float | None, pool: list[str]) -> pl.Expr:
    s = pl.col("_score")
    if kind == "mean_minus_2sigma":
        return s.mean().over(pool) - 2.0 * s.std(ddof=0).over(pool)
    if kind == "mean_minus_sigma":
        return s.mean().over(pool) - s.std(ddof=0).over(pool)
    if kind == "q1":
        return s.quantile(0.25, interpolation="linear").over(pool)
    if kind == "percentile":
        return s.quantile(param / 100.0, interpolation="linear").over(pool)
    if kind in ("min", "max_min"):
        return s.min().over(pool)
    if kind == "random":
        return pl.lit(None, dtype=pl.Float64)
    raise ValueError(kind)


def select_pools(scores: pl.DataFrame, *, scope: str = "in_lang",
                 reject_target: str = "mean_minus_2sigma", seed: int = 42, min_gap: float = 0.0,
                 drop_truncated: bool = False, drop_wrong_lang: bool = False,
                 normalize: str = "none") -> pl.DataFrame:
    """One row per pool: the chosen sample and the rejected one (null when skipped).

    Columns: prompt_id, pool_lang (the language for in_lang, null for all_lang), pool_size,
    target, chosen_*/rejected_* (lang, response, score, sample_idx) and `skipped`.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: use one of {SCOPES}")
    kind, param = parse_reject_target(reject_target)
    df = _prepare(scores, drop_truncated=drop_truncated, drop_wrong_lang=drop_wrong_lang,
                  normalize=normalize)
    pool = ["prompt_id", "lang"] if scope == "in_lang" else ["prompt_id"]
    df = df.sort([*pool, "lang", "sample_idx"] if scope == "all_lang" else [*pool, "sample_idx"])
    df = df.with_columns(
        pl.int_range(pl.len()).over(pool).alias("_pos"),
        pl.len().over(pool).cast(pl.Int32).alias("pool_size"),
        pl.col("_score").max().over(pool).alias("_max"),
        _target_expr(kind, param, pool).alias("target"),
    )
    chosen = (
        df.filter(pl.col("_score") == pl.col("_max"))
        .sort([*pool, "_pos"])
        .group_by(pool, maintain_order=True)
        .agg(
            pl.col("pool_size").first(),
            pl.col("target").first(),
            pl.col("lang").first().alias("chosen_lang"),
            pl.col("response").first().alias("chosen"),
            pl.col("_score").first().alias("chosen_score"),
            pl.col("sample_idx").first().alias("chosen_sample_idx"),
        )
    )
    cands = df.filter((pl.col("_score") < pl.col("_max"))
                      & ((pl.col("_max") - pl.col("_score")) >= min_gap))
    if kind == "random":
        rng = np.random.default_rng(seed)
        cands = cands.with_columns(pl.Series("_key", rng.random(cands.height)))
    else:
        cands = cands.with_columns((pl.col("_score") - pl.col("target")).abs().alias("_key"))
    rejected = (
        cands.sort([*pool, "_key", "_pos"])
        .group_by(pool, maintain_order=True)
        .agg(
            pl.col("lang").first().alias("rejected_lang"),
            pl.col("response").first().alias("rejected"),
            pl.col("_score").first().alias("rejected_score"),
            pl.col("sample_idx").first().alias("rejected_sample_idx"),
        )
    )
    out = chosen.join(rejected, on=pool, how="left")
    out = out.with_columns(
        (pl.col("lang") if scope == "in_lang" else pl.lit(None, pl.String)).alias("pool_lang")
    )
    if scope == "in_lang":
        out = out.drop("lang")
    # A pool of one sample has no strictly lower sample, so it is skipped by rule 4 as well.
    return out.with_columns(pl.col("rejected").is_null().alias("skipped")).sort(
        "prompt_id", "pool_lang", nulls_last=True
    )


def _attach_prompt(pairs: pl.DataFrame, prompts: pl.DataFrame, lang_col: str) -> pl.DataFrame:
    texts = prompts.select("prompt_id", pl.col("lang").alias(lang_col), "prompt").unique(
        subset=["prompt_id", lang_col], keep="first"
    )
    out = pairs.join(texts, on=["prompt_id", lang_col], how="left")
    missing = out.filter(pl.col("prompt").is_null())
    if missing.height:
        r = missing.row(0, named=True)
        raise ValueError(f"no prompt text for prompt_id {r['prompt_id']!r} in lang "
                         f"{r[lang_col]!r}; the prompts table must cover every scored language")
    return out


def build_pairs(scores: pl.DataFrame, prompts: pl.DataFrame, *, scope: str = "in_lang",
                reject_target: str = "mean_minus_2sigma", prompt_source: str = "chosen",
                seed: int = 42, min_gap: float = 0.0, drop_truncated: bool = False,
                drop_wrong_lang: bool = False, normalize: str = "none") -> pl.DataFrame:
    """DPO pairs (DESIGN.md columns), one per pool that has a strictly lower sample."""
    if prompt_source not in PROMPT_SOURCES:
        raise ValueError(f"prompt_source {prompt_source!r}: use one of {PROMPT_SOURCES}")
    pools = select_pools(scores, scope=scope, reject_target=reject_target, seed=seed,
                         min_gap=min_gap, drop_truncated=drop_truncated,
                         drop_wrong_lang=drop_wrong_lang, normalize=normalize)
    pairs = pools.filter(~pl.col("skipped"))
    if scope == "in_lang" or prompt_source == "chosen":
        pairs = pairs.with_columns(pl.col("chosen_lang").alias("prompt_lang"))
    elif prompt_source == "rejected":
        pairs = pairs.with_columns(pl.col("rejected_lang").alias("prompt_lang"))
    else:
        present = (
            _prepare(scores, drop_truncated=drop_truncated, drop_wrong_lang=drop_wrong_lang,
                     normalize="none")
            .group_by("prompt_id").agg(pl.col("lang").unique().sort().alias("_langs"))
            .sort("prompt_id")
        )
        rng = np.random.default_rng(seed)
        present = present.with_columns(pl.Series("_u", rng.random(present.height)))
        present = present.with_columns(
            pl.col("_langs").list.get(
                (pl.col("_u") * pl.col("_langs").list.len()).floor().cast(pl.Int64)
            ).alias("prompt_lang")
        ).select("prompt_id", "prompt_lang")
        pairs = pairs.join(present, on="prompt_id", how="left")
    pairs = _attach_prompt(pairs, prompts, "prompt_lang")
    return pairs.with_columns(
        pl.lit(scope).alias("scope"), pl.lit(reject_target).alias("reject_target"),
    ).select([pl.col(c).cast(t) for c, t in DPO_SCHEMA.items()])


def build_sft(scores: pl.DataFrame, prompts: pl.DataFrame, *,
              scope: str = "in_lang") -> pl.DataFrame:
    """SFT rows: the chosen (highest-reward) sample of each pool, prompt in its language."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: use one of {SCOPES}")
    df = _prepare(scores, drop_truncated=False, drop_wrong_lang=False, normalize="none")
    pool = ["prompt_id", "lang"] if scope == "in_lang" else ["prompt_id"]
    best = (
        df.sort(["prompt_id", "lang", "sample_idx"])
        .filter(pl.col("_score") == pl.col("_score").max().over(pool))
        .group_by(pool, maintain_order=True)
        .agg(pl.all().first())
    )
    sft = best.select("prompt_id", "lang", pl.col("response").alias("completion"),
                      pl.col("reward").cast(pl.Float64))
    sft = _attach_prompt(sft, prompts, "lang")
    return sft.select([pl.col(c).cast(t) for c, t in SFT_SCHEMA.items()]).sort("prompt_id", "lang")


def pair_stats(scores: pl.DataFrame, pools: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """Per-language stats: prompts, samples, reward mean/std, pairs, skipped pools,
    reward gap (chosen - rejected) distribution and the share of responses in the prompt's
    language (`lang_match`, null when no language was detected)."""
    base = scores.group_by("lang").agg(
        pl.col("prompt_id").n_unique().alias("prompts"),
        pl.len().alias("samples"),
        pl.col("reward").mean().alias("reward_mean"),
        pl.col("reward").std(ddof=0).alias("reward_std"),
        ((pl.col("detected_lang") == pl.col("lang")).mean().alias("lang_match")
         if "detected_lang" in scores.columns else pl.lit(None, pl.Float64).alias("lang_match")),
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
