"""The run report: Markdown with PNG plots, rendered from a run's manifest.

Sections: per-variant verdict lines ("matches or exceeds base in N of M languages"),
open-ended win rates against the base with 95% intervals and length-controlled rates,
held-out mean reward and language fidelity per language and model, training metrics,
each training run's curves (`croco.evaluation.curves`: the figure, the pairs per language
it trained on, and a warning line when a curve shows a problem; "too few steps to judge"
for a short run, "no curves recorded" for an output written before training kept its log
history), and the pair statistics. Plots: win rate per language with intervals, held-out reward
distributions of base and variants, the reward gap (chosen - rejected) of the pairs,
language fidelity.
"""

from __future__ import annotations

import io
import json

import polars as pl

from croco import storage
from croco.manifest import read_outputs


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _md_table(df: pl.DataFrame, floats: int = 3) -> str:
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.iter_rows():
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(f"{v:.{floats}f}")
            else:
                cells.append("-" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_run(data_root: str, run_id: str) -> dict:
    uri = storage.join(storage.normalize_root(data_root), "runs", run_id, "manifest.json")
    if not storage.exists(uri):
        raise FileNotFoundError(f"no run {run_id!r}: {uri} does not exist")
    return json.loads(storage.read_bytes(uri))


def collect(manifest: dict) -> dict:
    """The tables a report shows, read from the stage outputs the manifest lists."""
    outputs = read_outputs(manifest)
    out: dict = {}
    if outputs.pairs is not None:
        out["pair_stats"] = storage.read_parquet(storage.join(outputs.pairs.uri, "stats.parquet"))
        dpo = storage.read_parquet(storage.join(outputs.pairs.uri, "dpo"))
        out["gaps"] = (dpo["chosen_score"] - dpo["rejected_score"]).to_list()
    out["training"] = {name: storage.read_json(storage.join(e.uri, "metrics.json"))
                       for name, e in outputs.training_runs().items()}
    out["curves"] = {name: training_curves(e.uri, out["training"][name])
                     for name, e in outputs.training_runs().items()}
    ev = outputs.evaluation
    out["judge_bias"] = {}
    if ev is None:
        return out
    if ev.heldout is not None:
        out["heldout"] = storage.read_parquet(ev.heldout.uri)
    out["heldout_rewards"] = {
        model: pl.concat([storage.read_parquet(e.uri) for e in by_lang.values()])
        for model, by_lang in ev.scores.items()}
    if ev.reward_check is not None:
        out["reward_check"] = storage.read_parquet(
            storage.join(ev.reward_check.uri, "accuracy.parquet"))
    structured = []
    for name, e in ev.structured.items():
        r = storage.read_parquet(storage.join(e.uri, "results.parquet"))
        structured.append(r.with_columns(pl.lit(name).alias("model")))
    if structured:
        out["structured"] = pl.concat(structured, how="diagonal_relaxed")
    rates = []
    for name, e in ev.judgments.items():
        r = storage.read_parquet(storage.join(e.uri, "win_rates.parquet"))
        rates.append(r.with_columns(pl.lit(name).alias("variant")))
        info = storage.read_json(storage.join(e.uri, storage.SUCCESS))
        out["judge_bias"][name] = (info.get("first_position_share"), info.get("invalid"))
    if rates:
        out["win_rates"] = pl.concat(rates)
    return out


def training_curves(training_uri: str, metrics: dict) -> dict:
    """What the report shows of one training run's curves: its log history (None when the
    output has none), its curves figure (PNG bytes, None without a history), its method
    and the rows it trained on per language (`trained_on`; `counted`: read off its pairs,
    held-out pairs included, for an output that did not record them)."""
    from croco.evaluation.curves import plot_training_curves

    history_uri = storage.join(training_uri, "log_history.json")
    history = storage.read_json(history_uri) if storage.exists(history_uri) else None
    png = None
    if history is not None:
        png_uri = storage.join(training_uri, "curves.png")
        png = (storage.read_bytes(png_uri) if storage.exists(png_uri)
               else plot_training_curves(history))
    trained_on, counted = metrics.get("train_by_lang"), False
    if trained_on is None:
        trained_on, counted = _count_by_lang(metrics), True
    return {"history": history, "png": png, "method": metrics.get("method"),
            "trained_on": trained_on or {}, "counted": counted}


def _count_by_lang(metrics: dict) -> dict[str, int] | None:
    """Rows per language of the pairs a training output names (`pairs_uri`, narrowed to
    its `lang`); None when they cannot be read."""
    uri, method = metrics.get("pairs_uri"), metrics.get("method")
    if not uri:
        return None
    table, column = {"dpo": ("dpo", "prompt_lang"), "sft": ("sft", "lang")}.get(
        method, (None, "prompt_lang"))
    try:
        df = storage.read_parquet(storage.join(uri, table) if table else uri)
    except (OSError, pl.exceptions.PolarsError):  # moved or deleted since
        return None
    if column not in df.columns:
        return None
    if metrics.get("lang"):
        df = df.filter(pl.col(column) == metrics["lang"])
    counts = df.group_by(column).len().sort(column)
    return dict(zip(counts[column].to_list(), counts["len"].to_list()))


def curves_section(curves: dict[str, dict]) -> tuple[list[str], dict[str, bytes]]:
    """The report's training-curves section (Markdown lines) and its images by file name:
    a table of the rows each run trained on per language, then per run its verdict lines
    (`croco.evaluation.curves.curve_verdict`) and figure."""
    from croco.evaluation.curves import MIN_POINTS, curve_verdict

    if not curves:
        return [], {}
    langs = sorted({lang for c in curves.values() for lang in c["trained_on"]})
    rows = []
    for name, c in curves.items():
        row = {"run": name, "method": c["method"]}
        row.update({lang: c["trained_on"].get(lang) for lang in langs})
        row["total"] = sum(c["trained_on"].values()) if c["trained_on"] else None
        rows.append(row)
    md = ["## Training curves",
          "Loss, DPO rewards and margins, reward accuracy and log-probabilities per logged "
          f"step. Checked once a run has logged {MIN_POINTS} steps: loss not decreasing "
          "(last quarter's mean >= first quarter's), reward accuracy at chance (last "
          "quarter within 0.05 of 0.5), margins collapsing (last margin < 0 or < 10% of "
          "its peak).", "",
          "Trained on, per language (DPO and online DPO: pairs; SFT: chosen samples):", "",
          _md_table(pl.DataFrame(rows, strict=False)), ""]
    counted = sorted(n for n, c in curves.items() if c["counted"] and c["trained_on"])
    if counted:
        md += [f"Counted from the pairs each names, held-out pairs included (the output "
               f"records no per-language count): {', '.join(counted)}.", ""]
    images = {}
    for name, c in curves.items():
        md += [f"### {name}", ""]
        md += [f"- {line}" for line in curve_verdict(c["history"], c["method"] or "")]
        md.append("")
        if c["png"] is not None:
            file = "curves-" + "".join(ch if ch.isalnum() or ch in "-_" else "-"
                                       for ch in name) + ".png"
            images[file] = c["png"]
            md += [f"![{name} curves]({file})", ""]
    return md, images


def verdict_lines(data: dict) -> list[str]:
    lines = []
    rates = data.get("win_rates")
    held = data.get("heldout")
    variants = sorted(set(rates["variant"]) if rates is not None else
                      (set(held["model"]) - {"base"} if held is not None else set()))
    structured = data.get("structured")
    if structured is not None:
        variants = sorted(set(variants) | (set(structured["model"]) - {"base"}))
    for v in variants:
        parts = []
        if structured is not None and v in set(structured["model"]):
            per_lang = structured.group_by("model", "lang").agg(pl.col("value").mean())
            base = per_lang.filter(pl.col("model") == "base").select(
                "lang", pl.col("value").alias("base"))
            mine = per_lang.filter(pl.col("model") == v).join(base, on="lang")
            parts.append(f"structured tasks match or exceed base in "
                         f"{int((mine['value'] >= mine['base']).sum())} of {mine.height} languages")
        if rates is not None and v in set(rates["variant"]):
            r = rates.filter(pl.col("variant") == v)
            parts.append(f"open-ended win rate vs base >= 50 in "
                         f"{int((r['win_rate'] >= 50).sum())} of {r.height} languages")
        if held is not None and v in set(held["model"]):
            base = held.filter(pl.col("model") == "base").select("lang", pl.col("reward_mean")
                                                                  .alias("base"))
            mine = held.filter(pl.col("model") == v).join(base, on="lang")
            parts.append(f"held-out reward matches or exceeds base in "
                         f"{int((mine['reward_mean'] >= mine['base']).sum())} of {mine.height} "
                         "languages")
        lines.append(f"- **{v}**: " + "; ".join(parts))
    return lines


def plots(data: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    rates = data.get("win_rates")
    if rates is not None and rates.height:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        variants = sorted(set(rates["variant"]))
        langs = sorted(set(rates["lang"]))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            r = rates.filter(pl.col("variant") == v).sort("lang")
            xs = [langs.index(lang) + i * width for lang in r["lang"]]
            err = [[w - lo for w, lo in zip(r["win_rate"], r["ci_low"])],
                   [hi - w for w, hi in zip(r["win_rate"], r["ci_high"])]]
            ax.bar(xs, r["win_rate"].to_list(), width, yerr=err, capsize=3, label=v)
        ax.axhline(50, color="grey", lw=1, ls="--")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(langs))], langs)
        ax.set_ylabel("win rate vs base (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        out["win_rates.png"] = _png(fig)
    rewards = data.get("heldout_rewards") or {}
    if rewards:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, df in sorted(rewards.items()):
            ax.hist(df["reward"].to_list(), bins=20, alpha=0.5, label=name)
        ax.set_xlabel("reward of held-out answers")
        ax.set_ylabel("answers")
        ax.legend(fontsize=8)
        out["heldout_rewards.png"] = _png(fig)
    if data.get("gaps"):
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.hist(data["gaps"], bins=20, color="tab:purple")
        ax.set_xlabel("reward gap, chosen - rejected")
        ax.set_ylabel("pairs")
        out["pair_gaps.png"] = _png(fig)
    held = data.get("heldout")
    if held is not None and held.height:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        models = ["base"] + sorted(set(held["model"]) - {"base"})
        langs = sorted(set(held["lang"]))
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            h = held.filter(pl.col("model") == m).sort("lang")
            ax.bar([langs.index(lang) + i * width for lang in h["lang"]],
                   (h["lang_match"] * 100).to_list(), width, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(langs))], langs)
        ax.set_ylabel("answers in the prompt's language (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8)
        out["language_fidelity.png"] = _png(fig)
    return out


def render(manifest: dict, data_root: str) -> str:
    """Write `runs/<run_id>/report.md` and its PNGs; return the report's URI."""
    run_id = manifest["run_id"]
    run_uri = storage.join(storage.normalize_root(data_root), "runs", run_id)
    data = collect(manifest)
    images = plots(data)
    for name, blob in images.items():
        storage.write_bytes(storage.join(run_uri, name), blob)
    cfg = manifest["config"]
    md = [f"# croco report: run {run_id}", "",
          f"Policy `{cfg['policy']['model']}`; languages {', '.join(cfg['languages'])}; "
          f"k = {cfg['generation']['k']} samples per prompt; pairing "
          f"{cfg['pairing']['scope']} / {cfg['pairing']['reject_target']}; reward = "
          + " + ".join(f"{s['weight']} x {s['name']}" for s in cfg["reward"]["scorers"]) + ".",
          ""]
    lines = verdict_lines(data)
    if lines:
        md += ["## Against the base", "", *lines, ""]
    if "structured" in data:
        wide = (data["structured"].group_by("lang", "model").agg(pl.col("value").mean())
                .pivot(on="model", index="lang", values="value").sort("lang"))
        cols = ["lang", "base"] + sorted(c for c in wide.columns if c not in ("lang", "base"))
        md += ["## Structured tasks",
               "Per language, the mean over its tasks of each task's score: accuracy (0-1) "
               "for lm-evaluation-harness tasks, the primary metric (percent) for EuroEval "
               "datasets.", "",
               _md_table(wide.select([c for c in cols if c in wide.columns])), ""]
    if "win_rates" in data:
        md += ["## Open-ended win rate against the base",
               "Judge: both orders, ties 0.5; 95% bootstrap interval over prompts; "
               "lc = length-controlled.", "",
               _md_table(data["win_rates"].select("variant", "lang", "win_rate", "ci_low",
                                                  "ci_high", "lc_win_rate", "n_prompts"), 1), ""]
        for name, (first, invalid) in sorted(data["judge_bias"].items()):
            if first is not None:
                md += [f"Judge on {name}: {first:.0%} of valid verdicts chose the answer shown "
                       f"first ({invalid} unparseable). Far from 50% means a position bias, "
                       "which the two orders cancel into ties.", ""]
        if "win_rates.png" in images:
            md += ["![win rates](win_rates.png)", ""]
    if "heldout" in data:
        md += ["## Held-out answers: mean reward and language fidelity", "",
               _md_table(data["heldout"]), ""]
        for name in ("heldout_rewards.png", "language_fidelity.png"):
            if name in images:
                md += [f"![{name[:-4]}]({name})", ""]
    if "reward_check" in data:
        md += ["## Reward check: ranking accuracy on the preference set", "",
               _md_table(data["reward_check"]), ""]
    if data["training"]:
        keys = ["method", "pairs_train", "rows_train", "steps", "first_loss", "final_loss",
                "rewards/accuracies", "rewards/margins", "tokens_per_second", "ref_logps",
                "off_policy"]
        rows = [{"variant": n, **{k: m.get(k) for k in keys}}
                for n, m in data["training"].items()]
        md += ["## Training", "", _md_table(pl.DataFrame(rows, strict=False)), ""]
    curve_lines, curve_images = curves_section(data.get("curves", {}))
    for name, blob in curve_images.items():
        storage.write_bytes(storage.join(run_uri, name), blob)
    md += curve_lines
    if "pair_stats" in data:
        md += ["## Pairs", "", _md_table(data["pair_stats"]), ""]
        if "pair_gaps.png" in images:
            md += ["![pair gaps](pair_gaps.png)", ""]
    text = "\n".join(md)
    uri = storage.join(run_uri, "report.md")
    storage.write_bytes(uri, text.encode())
    return uri
