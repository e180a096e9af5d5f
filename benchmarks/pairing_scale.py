"""The pair stage at paper scale: pairing compute (vectorised vs a plain Python loop of the
same rule) and the whole stage (today's reference, which reads every column, vs
`croco.stages.run_pairs`) in wall time and peak RSS, through the A/B harness.

    python benchmarks/pairing_scale.py [--quick] [--reps 3] [--sizes-gb 1,2,6] [--tmp /tmp]
    python benchmarks/pairing_scale.py --flat    # memory at N = 500 and 2,000, in batches

Figures:
- pairing compute at 1e5, 1e6 and 5e6 rows (quick: 1e5): `croco.pairing.select_pools` plus
  the prompt language of rule 5 against `loop_pools`, the rule as a plain loop over pools;
  both from the same in-memory score columns to the same pool table.
- pair stage wall time and peak RSS on synthesized paper-shaped scored sets (7 languages x
  N prompts x 64 samples of ~2.3 KB, shards of `scores/<key>/lang=xx/part-NNNNN.parquet`
  as the score stage writes them) of 1, 2 and 6 GB of text (quick: 0.2 GB): `old_run_pairs`
  (a copy of the stage as it was: every column read, texts carried through the selection)
  against `run_pairs`. Each measurement is a fresh subprocess (peak RSS = its VmHWM), run
  A, B, A, B ...; one subprocess gives both the wall time and the RSS figure.

The synthesized sets live in a temporary folder (under --tmp) and are deleted afterwards.
This module also holds the references the tests compare against: `loop_pools` and the
`old_*` functions (the pairing code before the bounded-memory stage), kept here and not in
the library.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.ab import Case, machine, run_case, table
from croco.pairing import (
    DPO_SCHEMA,
    PROMPT_SOURCES,
    SCOPES,
    SFT_SCHEMA,
    TIE_RTOL,
    _prompt_langs,
    pair_stats,
    parse_reject_target,
    select_pools,
)

LANGS = ["da", "de", "en", "es", "fr", "it", "nl"]
K = 64
TEXT_BYTES = 2300


# ------------------------------------------------------------------ the rule as a plain loop


def loop_pools(scores: pl.DataFrame, *, scope: str = "in_lang",
               reject_target: str = "mean_minus_2sigma", prompt_source: str = "chosen",
               seed: int = 42, min_gap: float = 0.0, drop_truncated: bool = False,
               drop_wrong_lang: bool = False, normalize: str = "none") -> pl.DataFrame:
    """The numbered rules of `croco.pairing`, one pool at a time in plain Python: one row
    per pool with the chosen / rejected sample and the prompt language (null when skipped).
    Rewards must not be null."""
    kind, param = parse_reject_target(reject_target)
    cols = scores.columns
    rows = list(zip(*(scores[c].to_list() for c in cols)))
    at = {c: i for i, c in enumerate(cols)}
    P, L, S, R = at["prompt_id"], at["lang"], at["sample_idx"], at["reward"]
    if drop_truncated and "finish_reason" in at:
        rows = [r for r in rows if r[at["finish_reason"]] != "length"]
    if drop_wrong_lang and "detected_lang" in at:
        rows = [r for r in rows if r[at["detected_lang"]] == r[L]]
    present: dict[str, set] = {}
    for r in rows:
        present.setdefault(r[P], set()).add(r[L])
    score = {id(r): float(r[R]) for r in rows}
    if normalize == "zscore_per_lang":
        by_lang: dict[str, list[float]] = {}
        for r in rows:
            by_lang.setdefault(r[L], []).append(float(r[R]))
        moments = {}
        for lang, xs in by_lang.items():
            mean = sum(xs) / len(xs)
            moments[lang] = (mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)))
        for r in rows:
            mean, std = moments[r[L]]
            score[id(r)] = (float(r[R]) - mean) / std if std > 0 else 0.0
    rows.sort(key=lambda r: (r[P], r[L], r[S]))
    pools: dict[tuple, list] = {}
    for r in rows:
        pools.setdefault((r[P], r[L]) if scope == "in_lang" else (r[P], None), []).append(r)
    picked = []
    for key, pool in pools.items():
        xs = [score[id(r)] for r in pool]
        best = max(xs)
        chosen = xs.index(best)
        cands = [i for i, x in enumerate(xs) if x < best and best - x >= min_gap]
        picked.append((key, pool, xs, chosen, cands, _loop_target(kind, param, xs)))
    draws = iter(np.random.default_rng(seed).random(sum(len(p[4]) for p in picked)))
    out = []
    for (pid, pool_lang), pool, xs, chosen, cands, target in picked:
        if kind == "random":
            keys = {i: next(draws) for i in cands}
            rejected = min(cands, key=lambda i: (keys[i], i)) if cands else None
        elif cands:
            dist = {i: abs(xs[i] - target) for i in cands}
            closest = min(dist.values())
            rejected = next(i for i in cands
                            if dist[i] - closest <= TIE_RTOL * max(dist[i], abs(target)))
        else:
            rejected = None
        c = pool[chosen]
        j = pool[rejected] if rejected is not None else None
        out.append({
            "prompt_id": pid, "pool_lang": pool_lang, "pool_size": len(pool), "target": target,
            "chosen_lang": c[L], "chosen_sample_idx": c[S], "chosen_score": xs[chosen],
            "rejected_lang": j[L] if j else None, "rejected_sample_idx": j[S] if j else None,
            "rejected_score": xs[rejected] if j else None, "skipped": j is None})
    _loop_prompt_langs(out, present, scope, prompt_source, seed)
    return pl.DataFrame(out, schema_overrides={"pool_size": pl.Int32, "target": pl.Float64,
                                               "chosen_score": pl.Float64,
                                               "rejected_score": pl.Float64,
                                               "pool_lang": pl.String,
                                               "rejected_lang": pl.String,
                                               "prompt_lang": pl.String},
                        infer_schema_length=None)


def _loop_target(kind: str, param: float | None, xs: list[float]) -> float | None:
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
    if kind == "mean_minus_2sigma":
        return mean - 2 * std
    if kind == "mean_minus_sigma":
        return mean - std
    if kind in ("q1", "percentile"):
        q = 0.25 if kind == "q1" else param / 100.0
        s = sorted(xs)
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (pos - lo) * (s[hi] - s[lo])
    if kind in ("min", "max_min"):
        return min(xs)
    return None


def _loop_prompt_langs(out: list[dict], present: dict[str, set], scope: str,
                       prompt_source: str, seed: int) -> None:
    if prompt_source == "random" and scope == "all_lang":
        ids = sorted(present)
        draws = np.random.default_rng(seed).random(len(ids))
        pick = {}
        for pid, u in zip(ids, draws):
            langs = sorted(present[pid])
            pick[pid] = langs[math.floor(u * len(langs))]
    for row in out:
        if row["skipped"]:
            row["prompt_lang"] = None
        elif scope == "in_lang" or prompt_source == "chosen":
            row["prompt_lang"] = row["chosen_lang"]
        elif prompt_source == "rejected":
            row["prompt_lang"] = row["rejected_lang"]
        else:
            row["prompt_lang"] = pick[row["prompt_id"]]


def vectorised_pools(scores: pl.DataFrame, *, prompt_source: str = "chosen",
                     **opts) -> pl.DataFrame:
    """croco's selection in `loop_pools`' shape: `select_pools` plus rule 5's prompt
    language (null for skipped pools)."""
    pools = select_pools(scores, **opts)
    with_lang = _prompt_langs(pools.filter(~pl.col("skipped")), scores,
                              scope=opts.get("scope", "in_lang"), prompt_source=prompt_source,
                              seed=opts.get("seed", 42),
                              drop_truncated=opts.get("drop_truncated", False),
                              drop_wrong_lang=opts.get("drop_wrong_lang", False))
    return pl.concat([with_lang, pools.filter(pl.col("skipped"))
                      .with_columns(pl.lit(None, pl.String).alias("prompt_lang"))]).sort(
        "prompt_id", "pool_lang", nulls_last=True, maintain_order=True)


# ------------------------------------------- the pairing code before the bounded-memory stage

def old_prepare(scores: pl.DataFrame, *, drop_truncated: bool, drop_wrong_lang: bool,
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


def old_target_expr(kind: str, param: float | None, pool: list[str]) -> pl.Expr:
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


def old_select_pools(scores: pl.DataFrame, *, scope: str = "in_lang",
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
    df = old_prepare(scores, drop_truncated=drop_truncated, drop_wrong_lang=drop_wrong_lang,
                  normalize=normalize)
    pool = ["prompt_id", "lang"] if scope == "in_lang" else ["prompt_id"]
    df = df.sort([*pool, "lang", "sample_idx"] if scope == "all_lang" else [*pool, "sample_idx"])
    df = df.with_columns(
        pl.int_range(pl.len()).over(pool).alias("_pos"),
        pl.len().over(pool).cast(pl.Int32).alias("pool_size"),
        pl.col("_score").max().over(pool).alias("_max"),
        old_target_expr(kind, param, pool).alias("target"),
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


def old_attach_prompt(pairs: pl.DataFrame, prompts: pl.DataFrame, lang_col: str) -> pl.DataFrame:
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


def old_build_pairs(scores: pl.DataFrame, prompts: pl.DataFrame, *, scope: str = "in_lang",
                reject_target: str = "mean_minus_2sigma", prompt_source: str = "chosen",
                seed: int = 42, min_gap: float = 0.0, drop_truncated: bool = False,
                drop_wrong_lang: bool = False, normalize: str = "none") -> pl.DataFrame:
    """DPO pairs (the columns of docs/architecture.md), one per pool that has a strictly lower sample."""
    if prompt_source not in PROMPT_SOURCES:
        raise ValueError(f"prompt_source {prompt_source!r}: use one of {PROMPT_SOURCES}")
    pools = old_select_pools(scores, scope=scope, reject_target=reject_target, seed=seed,
                         min_gap=min_gap, drop_truncated=drop_truncated,
                         drop_wrong_lang=drop_wrong_lang, normalize=normalize)
    pairs = pools.filter(~pl.col("skipped"))
    if scope == "in_lang" or prompt_source == "chosen":
        pairs = pairs.with_columns(pl.col("chosen_lang").alias("prompt_lang"))
    elif prompt_source == "rejected":
        pairs = pairs.with_columns(pl.col("rejected_lang").alias("prompt_lang"))
    else:
        present = (
            old_prepare(scores, drop_truncated=drop_truncated, drop_wrong_lang=drop_wrong_lang,
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
    pairs = old_attach_prompt(pairs, prompts, "prompt_lang")
    return pairs.with_columns(
        pl.lit(scope).alias("scope"), pl.lit(reject_target).alias("reject_target"),
    ).select([pl.col(c).cast(t) for c, t in DPO_SCHEMA.items()])


def old_build_sft(scores: pl.DataFrame, prompts: pl.DataFrame, *,
              scope: str = "in_lang") -> pl.DataFrame:
    """SFT rows: the chosen (highest-reward) sample of each pool, prompt in its language."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: use one of {SCOPES}")
    df = old_prepare(scores, drop_truncated=False, drop_wrong_lang=False, normalize="none")
    pool = ["prompt_id", "lang"] if scope == "in_lang" else ["prompt_id"]
    best = (
        df.sort(["prompt_id", "lang", "sample_idx"])
        .filter(pl.col("_score") == pl.col("_score").max().over(pool))
        .group_by(pool, maintain_order=True)
        .agg(pl.all().first())
    )
    sft = best.select("prompt_id", "lang", pl.col("response").alias("completion"),
                      pl.col("reward").cast(pl.Float64))
    sft = old_attach_prompt(sft, prompts, "lang")
    return sft.select([pl.col(c).cast(t) for c, t in SFT_SCHEMA.items()]).sort("prompt_id", "lang")




def old_run_pairs(score_uris: dict[str, str], prompts_uris: dict[str, str], pairing,
                  out: str) -> str:
    """The pair stage as it was: every column of every shard read and concatenated, the
    selection run twice (pools, and again inside the pairs), SFT re-sorted, pools with texts."""
    from croco import storage

    langs = sorted(score_uris)
    scores = pl.concat([storage.read_parquet(score_uris[lang]) for lang in langs],
                       how="diagonal_relaxed")
    prompts = pl.concat([storage.read_parquet(storage.join(prompts_uris[lang], "data.parquet"))
                         for lang in langs], how="diagonal_relaxed")
    opts = dict(scope=pairing.scope, reject_target=pairing.reject_target, seed=pairing.seed,
                min_gap=pairing.min_gap, drop_truncated=pairing.drop_truncated,
                drop_wrong_lang=pairing.drop_wrong_lang, normalize=pairing.normalize)
    pools = old_select_pools(scores, **opts)
    dpo = old_build_pairs(scores, prompts, prompt_source=pairing.prompt_source, **opts)
    sft = old_build_sft(scores, prompts, scope=pairing.scope)
    stats = pair_stats(scores, pools, dpo)
    for df, sub, col in ((dpo, "dpo", "prompt_lang"), (sft, "sft", "lang")):
        for lang in langs:
            storage.write_parquet(df.filter(pl.col(col) == lang),
                                  storage.join(out, sub, f"lang={lang}", "data.parquet"))
    storage.write_parquet(pools, storage.join(out, "pools.parquet"))
    storage.write_parquet(stats, storage.join(out, "stats.parquet"))
    storage.mark_complete(out, {"rows": dpo.height})
    return out


# ------------------------------------------------------------------ synthesized scored sets


def synth_scores(n_rows: int, *, langs: list[str] = LANGS, k: int = K, seed: int = 0,
                 ties: bool = False) -> pl.DataFrame:
    """Score columns (no texts) of about `n_rows` samples: prompts x langs x k."""
    rng = np.random.default_rng(seed)
    n_prompts = max(1, n_rows // (len(langs) * k))
    pid = np.repeat(np.arange(n_prompts), len(langs) * k)
    lang = np.tile(np.repeat(np.arange(len(langs)), k), n_prompts)
    idx = np.tile(np.arange(k), n_prompts * len(langs))
    n = pid.size
    reward = (rng.integers(0, 8, n) / 2.0) if ties else rng.normal(0.0, 1.0, n)
    lang_names = np.array(langs)
    wrong = rng.random(n) < 0.05
    return pl.DataFrame({
        "prompt_id": [f"p{p:07d}" for p in pid],
        "lang": lang_names[lang],
        "sample_idx": idx.astype(np.int64),
        "reward": reward,
        "finish_reason": np.where(rng.random(n) < 0.1, "length", "stop"),
        "detected_lang": np.where(wrong, "en", lang_names[lang]),
    })


def write_scored_set(root: str, text_gb: float, *, langs: list[str] = LANGS, k: int = K,
                     text_bytes: int = TEXT_BYTES, shard_prompts: int = 64,
                     corpus_words: int = 4_000_000,
                     seed: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """A paper-shaped scored set of about `text_gb` GB of response text under `root`, laid out
    as the prompts and score stages write it; returns (score_uris, prompts_uris) by language."""
    from croco import storage

    rng = np.random.default_rng(seed)
    words = [("".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))))
             for _ in range(4000)]
    corpus = " ".join(words[i] for i in rng.integers(0, len(words), corpus_words))
    n_prompts = max(1, int(text_gb * 1e9 / (len(langs) * k * text_bytes)))
    score_uris, prompts_uris = {}, {}
    for lang in langs:
        s_dir = os.path.join(root, "scores", "synthkey", f"lang={lang}")
        p_dir = os.path.join(root, "prompts", "synthkey", f"lang={lang}")
        ids = [f"p{i:07d}" for i in range(n_prompts)]
        storage.write_parquet(pl.DataFrame({
            "prompt_id": ids, "lang": [lang] * n_prompts,
            "prompt": [f"Question {i} in {lang}?" for i in range(n_prompts)],
            "split": ["train"] * n_prompts, "source": ["synthetic"] * n_prompts,
        }), os.path.join(p_dir, "data.parquet"))
        for shard, start in enumerate(range(0, n_prompts, shard_prompts)):
            pids = ids[start:start + shard_prompts]
            n = len(pids) * k
            offs = rng.integers(0, len(corpus) - 2 * text_bytes, n)
            lens = rng.integers(text_bytes // 2, text_bytes * 3 // 2, n)
            reward = rng.normal(0.0, 1.0, n)
            storage.write_parquet(pl.DataFrame({
                "prompt_id": np.repeat(pids, k), "lang": [lang] * n,
                "sample_idx": np.tile(np.arange(k), len(pids)),
                "response": [corpus[o:o + m] for o, m in zip(offs, lens)],
                "n_tokens": (lens // 4).astype(np.int64),
                "finish_reason": np.where(rng.random(n) < 0.1, "length", "stop"),
                "policy": ["synthetic/policy"] * n,
                "reward": reward, "reward_judge": reward,
                "detected_lang": [lang] * n, "lang_prob": rng.random(n),
            }), os.path.join(s_dir, f"part-{shard:05d}.parquet"))
        storage.mark_complete(s_dir)
        storage.mark_complete(p_dir)
        score_uris[lang], prompts_uris[lang] = s_dir, p_dir
    return score_uris, prompts_uris


# ------------------------------------------------------------------------------ the figures


def _compute_case(n_rows: int) -> Case:
    data: dict[str, pl.DataFrame] = {}

    def setup() -> None:
        data["scores"] = synth_scores(n_rows, seed=1)
        vectorised_pools(data["scores"])  # polars' first call (thread pool, plans): not timed

    def loop() -> None:
        loop_pools(data["scores"])

    def vectorised() -> None:
        vectorised_pools(data["scores"])

    return Case(f"pairing compute, {n_rows:.0e} rows", setup=setup, baseline=loop,
                croco=vectorised, min_seconds=2.0,
                baseline_label="plain Python loop", croco_label="vectorised select_pools")


def stage_child(which: str, score_uris: dict, prompts_uris: dict, out: str) -> dict:
    """Run one pair stage in this (fresh) process: wall seconds and peak RSS in MB."""
    from croco.config import PairingConfig
    from croco.stages import run_pairs

    t = time.perf_counter()
    if which == "old":
        old_run_pairs(score_uris, prompts_uris, PairingConfig(), out)
    elif which == "whole":  # today's stage in one batch: the selection over every score row
        from croco import pairs_io

        pairs_io.BATCH_ROWS = 1 << 62
        run_pairs(score_uris, prompts_uris, PairingConfig(), out)
    else:
        run_pairs(score_uris, prompts_uris, PairingConfig(), out)
    seconds = time.perf_counter() - t
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line.split()[1] for line in status.splitlines()
                      if line.startswith("VmHWM:")))
    return {"seconds": seconds, "peak_mb": hwm_kb / 1024}


def _run_child(which: str, score_uris: dict, prompts_uris: dict, work: str) -> dict:
    out = tempfile.mkdtemp(dir=work, prefix=f"out-{which}-")
    code = ("import json, sys; from benchmarks.pairing_scale import stage_child; "
            "a = json.loads(sys.argv[1]); print('RESULT ' + json.dumps(stage_child(*a)))")
    arg = json.dumps([which, score_uris, prompts_uris, out])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), check=False)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"{which} stage failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


_SETS: list[str] = []  # synthesized sets still on disk


def _drop_sets(keep: str | None = None) -> None:
    for work in [w for w in _SETS if w != keep]:
        shutil.rmtree(work, ignore_errors=True)
        _SETS.remove(work)


atexit.register(_drop_sets)


def _stage_cases(gb: float, tmp: str, *, prompts: int | None = None,
                 baseline: str = "old") -> list[Case]:
    """Wall time and peak RSS of the old (`baseline`) and the new stage on one synthesized
    set; one subprocess per measurement gives both (the RSS case reads what the wall case
    measured, in the same A, B order, and measures afresh when run on its own). The set is
    made by the first case's setup, which deletes the sets of other sizes; all are deleted
    at exit. `prompts`: instead of `gb`, the paper's counts with the rehearsal's short
    responses (11 languages x `prompts` x 64 samples of ~40 bytes, shards of 64 prompts)."""
    state: dict = {"work": None, "rss": {baseline: [], "new": []}}
    size = f"{gb:g} GB text" if prompts is None else f"11 x {prompts} x 64"

    def setup() -> None:
        if state["work"] not in _SETS:
            state["work"] = tempfile.mkdtemp(dir=tmp, prefix="croco-pairing-scale-")
            _drop_sets()
            _SETS.append(state["work"])
            t = time.perf_counter()
            if prompts is None:
                state["uris"] = write_scored_set(state["work"], gb)
            else:
                from croco.config import PAPER_LANGUAGES

                state["uris"] = write_scored_set(
                    state["work"], prompts * len(PAPER_LANGUAGES) * 64 * 40 / 1e9,
                    langs=PAPER_LANGUAGES, k=64, text_bytes=40, corpus_words=200_000)
            print(f"  synthesized {size} under {state['work']} in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)

    def wall(which: str):
        def run() -> float:
            got = _run_child(which, *state["uris"], state["work"])
            state["rss"][which].append(got["peak_mb"])
            return got["seconds"]
        return run

    def rss(which: str):
        def run() -> float:
            if state["rss"][which]:
                return state["rss"][which].pop(0)
            return _run_child(which, *state["uris"], state["work"])["peak_mb"]
        return run

    labels = {"baseline_label": {"old": "old stage (all columns)",
                                 "whole": "one batch (every score row)"}[baseline],
              "croco_label": "run_pairs"}
    return [
        Case(f"pair stage wall, {size}", wall(baseline), wall("new"), setup=setup, **labels),
        Case(f"pair stage peak RSS, {size}", rss(baseline), rss("new"), unit="MB",
             setup=setup, **labels),
    ]


def cases(quick: bool = False, tmp: str = "/tmp", sizes_gb: list[float] | None = None,
          flat: bool = False) -> list[Case]:
    """The figures: pairing compute (1e5 rows; + 1e6, 5e6 unless quick) and the pair stage
    (0.2 GB of text when quick, else 1, 2 and 6 GB). `flat`: instead, the stage in batches
    against one batch at the paper's counts, N = 500 and 2,000 prompts a language (is its
    memory flat in N?)."""
    if flat:
        return [c for n in (500, 2000) for c in _stage_cases(0, tmp, prompts=n,
                                                              baseline="whole")]
    rows = [100_000] if quick else [100_000, 1_000_000, 5_000_000]
    sizes = sizes_gb or ([0.2] if quick else [1.0, 2.0, 6.0])
    out = [_compute_case(n) for n in rows]
    for gb in sizes:
        out += _stage_cases(gb, tmp)
    return out


def main() -> None:
    # `kill` stops it as Ctrl-C does: subprocess.run kills the running child on the way out
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes-gb", help="comma-separated GB of text, e.g. 1,2,6")
    ap.add_argument("--tmp", default="/tmp", help="where the synthesized sets go")
    ap.add_argument("--flat", action="store_true",
                    help="the stage's memory at N = 500 and 2,000 prompts a language (11 "
                         "languages, k = 64): in batches against one batch")
    a = ap.parse_args()
    sizes = [float(x) for x in a.sizes_gb.split(",")] if a.sizes_gb else None
    results = []
    for case in cases(a.quick, a.tmp, sizes, flat=a.flat):
        print(f"{case.name} ...", flush=True)
        results.append(run_case(case, reps=a.reps))
    _drop_sets()
    print(table(results))
    print(machine())


if __name__ == "__main__":
    main()
