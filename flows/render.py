"""The tables the `croco` command prints: pure functions from what a run wrote (polars
frames of pair stats, held-out summaries, structured results, win rates; the plan's
output counts) to `rich.table.Table`s. Nothing here reads storage or prints."""

from __future__ import annotations

from rich.table import Table


def fmt(v) -> str:
    """A table cell: `-` for None, a float to 3 decimals, anything else as text."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def stats_table(stats, title: str) -> Table:
    """Per language: a pair set's prompts, samples, reward, pairs and language match."""
    table = Table(title=title, title_justify="left")
    cols = [("lang", "lang"), ("prompts", "prompts"), ("samples", "samples"),
            ("reward_mean", "reward mean"), ("reward_std", "reward std"), ("pairs", "pairs"),
            ("skipped", "skipped"), ("gap_mean", "gap mean"), ("lang_match", "in prompt's lang")]
    for _, label in cols:
        table.add_column(label, justify="left" if label == "lang" else "right")
    for row in stats.to_dicts():
        table.add_row(*[(f"{row[c]:.0%}" if c == "lang_match" and row[c] is not None
                         else fmt(row[c])) for c, _ in cols])
    return table


def heldout_table(summary) -> Table:
    """Per language: each model's mean reward and share of answers in the prompt's language."""
    models = ["base"] + sorted(m for m in summary["model"].unique() if m != "base")
    table = Table(title="held-out answers: mean reward / share in the prompt's language",
                  title_justify="left")
    table.add_column("lang")
    for m in models:
        table.add_column(f"{m} reward", justify="right")
        table.add_column(f"{m} in lang", justify="right")
    rows = {(r["model"], r["lang"]): r for r in summary.to_dicts()}
    langs = sorted(summary["lang"].unique())
    for lang in langs + ["mean"]:
        cells = [lang]
        for m in models:
            if lang == "mean":
                sub = summary.filter(summary["model"] == m)
                rew, match = sub["reward_mean"].mean(), sub["lang_match"].mean()
            else:
                r = rows.get((m, lang), {})
                rew, match = r.get("reward_mean"), r.get("lang_match")
            cells += [fmt(rew), f"{match:.0%}" if match is not None else "-"]
        table.add_row(*cells)
    return table


def structured_table(results) -> Table:
    """Per language: each model's mean score over the structured tasks (base first)."""
    import polars as pl

    wide = (results.group_by("lang", "model").agg(pl.col("value").mean())
            .pivot(on="model", index="lang", values="value").sort("lang"))
    models = ["base"] + sorted(c for c in wide.columns if c not in ("lang", "base"))
    table = Table(title="structured tasks (score)", title_justify="left")
    table.add_column("lang")
    for m in models:
        table.add_column(m, justify="right")
    for r in wide.to_dicts():
        table.add_row(r["lang"], *[fmt(r.get(m)) for m in models])
    return table


def winrate_table(rates, variant: str) -> Table:
    """Per language: a variant's open-ended win rate against the base, with its 95% CI and
    the length-controlled rate; the caption counts the languages at 50 or more."""
    table = Table(title=f"{variant} vs base: open-ended win rate (judge, both orders)",
                  title_justify="left")
    for col in ("lang", "win rate", "95% CI", "length-controlled", "prompts"):
        table.add_column(col, justify="left" if col == "lang" else "right")
    for r in rates.to_dicts():
        table.add_row(r["lang"], f"{r['win_rate']:.1f}",
                      f"{r['ci_low']:.1f}-{r['ci_high']:.1f}", f"{r['lc_win_rate']:.1f}",
                      str(r["n_prompts"]))
    n = sum(1 for r in rates.to_dicts() if r["win_rate"] >= 50)
    table.caption = f"win rate >= 50 in {n} of {rates.height} languages"
    return table


def plan_table(by_stage: dict[str, list[bool]], stages: list[str], data_root: str) -> Table:
    """Per stage, in `stages` order: its outputs, how many are complete and how many are
    to compute (`by_stage`: stage -> one complete-or-not per output; stages without
    outputs are left out)."""
    table = Table(title=f"croco run plan ({data_root})", title_justify="left")
    for col in ("stage", "outputs", "complete", "to compute"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name in stages:
        done = by_stage.get(name, [])
        if done:
            table.add_row(name, str(len(done)), str(sum(done)), str(len(done) - sum(done)))
    return table
