"""Pairwise win rates against the base, as in the paper's open-ended evaluation.

A judge sees both answers in both orders. A game scores 1 when the candidate's side wins,
0.5 for a tie, 0 otherwise; a prompt scores the mean of its games; the win rate is the
mean over prompts (x100), with a bootstrap 95% interval over prompts. The length-controlled
win rate fits a logistic model of the game score on tanh(dlen / sigma) (dlen = candidate
length - baseline length, sigma its population standard deviation within the language)
with an L2 penalty of 1 on the length coefficient (loss = sum of cross-entropies +
0.5 * b^2, the intercept unpenalised, as scikit-learn's C=1), and reads it at dlen = 0:
100 * sigmoid(intercept).

Verdicts are parsed from the judge's own final line only (`parse_verdict`), so an answer
that contains verdict strings cannot decide its own game.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

VERDICT = re.compile(r"\[\[(1|2|T)\]\]")

JUDGE_TEMPLATE = (
    "You are comparing two answers to a user's request. Judge which answer is more helpful, "
    "correct and written in the language of the request.\n\n"
    "Request:\n{prompt}\n\n[Output 1]\n{output_1}\n[End of output 1]\n\n"
    "[Output 2]\n{output_2}\n[End of output 2]\n\n"
    "Explain briefly, then end with a final line that is exactly [[1]] if output 1 is "
    "better, [[2]] if output 2 is better, or [[T]] for a tie."
)


def parse_verdict(judge_output: str) -> str | None:
    """"1", "2" or "T" from the judge's last non-empty line; None if that line holds no
    verdict or contradictory ones."""
    lines = [ln.strip() for ln in judge_output.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    found = set(VERDICT.findall(lines[-1]))
    return found.pop() if len(found) == 1 else None


def game_scores(judgments: pl.DataFrame) -> pl.DataFrame:
    """Adds `score`: 1 candidate win, 0.5 tie, 0 loss (rows with a null verdict dropped)."""
    df = judgments.filter(pl.col("verdict").is_in(["1", "2", "T"]))
    cand_side = pl.when(pl.col("candidate_first")).then(pl.lit("1")).otherwise(pl.lit("2"))
    return df.with_columns(
        pl.when(pl.col("verdict") == "T").then(0.5)
        .when(pl.col("verdict") == cand_side).then(1.0)
        .otherwise(0.0).alias("score")
    )


def _length_controlled(scores: np.ndarray, dlen: np.ndarray, iters: int = 100) -> float:
    sigma = dlen.std()
    x = np.tanh(dlen / sigma) if sigma > 0 else np.zeros_like(dlen, dtype=float)
    a, b = 0.0, 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a + b * x)))
        w = p * (1 - p)
        grad = np.array([np.sum(p - scores), np.sum((p - scores) * x) + b])
        hess = np.array([[np.sum(w) + 1e-12, np.sum(w * x)],
                         [np.sum(w * x), np.sum(w * x * x) + 1.0]])
        step = np.linalg.solve(hess, grad)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(100.0 / (1.0 + np.exp(-a)))


def win_rates(judgments: pl.DataFrame, *, n_bootstrap: int = 1000, seed: int = 0) -> pl.DataFrame:
    """Per `lang`: win_rate, ci_low, ci_high, lc_win_rate (all 0-100) and n_prompts.

    `judgments` columns: lang, prompt_id, candidate_first (bool), verdict ("1"/"2"/"T"),
    candidate_len, baseline_len. Rows without a valid verdict are ignored."""
    games = game_scores(judgments)
    rng = np.random.default_rng(seed)
    rows = []
    for lang in sorted(games["lang"].unique().to_list()):
        g = games.filter(pl.col("lang") == lang)
        per_prompt = g.group_by("prompt_id").agg(pl.col("score").mean()).sort("prompt_id")
        s = per_prompt["score"].to_numpy()
        n = len(s)
        idx = rng.integers(0, n, size=(n_bootstrap, n))
        boot = s[idx].mean(axis=1) * 100.0
        dlen = (g["candidate_len"] - g["baseline_len"]).cast(pl.Float64).to_numpy()
        rows.append({
            "lang": lang,
            "win_rate": float(s.mean() * 100.0),
            "ci_low": float(np.percentile(boot, 2.5)),
            "ci_high": float(np.percentile(boot, 97.5)),
            "lc_win_rate": _length_controlled(g["score"].to_numpy(), dlen),
            "n_prompts": n,
        })
    schema = {"lang": pl.String, "win_rate": pl.Float64, "ci_low": pl.Float64,
              "ci_high": pl.Float64, "lc_win_rate": pl.Float64, "n_prompts": pl.Int64}
    return pl.DataFrame(rows, schema=schema)
