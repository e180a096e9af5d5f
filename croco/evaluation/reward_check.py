"""Reward-model check: within-language ranking accuracy, the share of preference pairs
whose chosen response outscores the rejected one, per language and per scorer.

Input: JSONL/Parquet with `lang`, `prompt`, `chosen`, `rejected` (M-RewardBench's fields;
an optional `pair_id` or `id`). `builtin:demo_preferences` is the small 7-language set
shipped with croco.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

DEMO_PREFERENCES = Path(__file__).resolve().parent.parent / "data" / "demo_preferences.jsonl"


def preference_set_path(path: str) -> Path:
    """The file behind a preference-set name (`builtin:demo_preferences` or a path)."""
    return DEMO_PREFERENCES if path == "builtin:demo_preferences" else Path(path)


def load_preference_set(path: str) -> pl.DataFrame:
    p = preference_set_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: preference set not found")
    df = pl.read_parquet(p) if p.suffix == ".parquet" else pl.read_ndjson(p)
    missing = {"lang", "prompt", "chosen", "rejected"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected lang, prompt, "
                         "chosen, rejected")
    id_col = "pair_id" if "pair_id" in df.columns else ("id" if "id" in df.columns else None)
    ids = df[id_col].cast(pl.String) if id_col else pl.Series([str(i) for i in range(df.height)])
    return df.with_columns(ids.alias("pair_id")).select("pair_id", "lang", "prompt", "chosen",
                                                        "rejected")


def ranking_accuracy(prefs: pl.DataFrame, scorer_cfgs: list, *,
                     device: str = "auto") -> pl.DataFrame:
    """Per language: pairs, accuracy of the combined reward, and of each scorer."""
    from croco.reward import score_frame

    gens = pl.concat([
        prefs.select(pl.col("pair_id").alias("prompt_id"), "lang",
                     pl.lit(i, pl.Int32).alias("sample_idx"), pl.col(col).alias("response"))
        for i, col in enumerate(("chosen", "rejected"))
    ])
    prompts = prefs.select(pl.col("pair_id").alias("prompt_id"), "lang", "prompt")
    scored = score_frame(gens, prompts, scorer_cfgs, device=device)
    cols = ["reward"] + [f"reward_{c.name}" for c in scorer_cfgs]
    wide = scored.filter(pl.col("sample_idx") == 0).select("prompt_id", "lang", *cols).join(
        scored.filter(pl.col("sample_idx") == 1).select("prompt_id", "lang", *cols),
        on=["prompt_id", "lang"], suffix="_rejected")
    return wide.group_by("lang").agg(
        pl.len().alias("pairs"),
        *[(pl.col(c) > pl.col(f"{c}_rejected")).mean().alias(
            "accuracy" if c == "reward" else f"accuracy_{c[len('reward_'):]}") for c in cols],
    ).sort("lang")
