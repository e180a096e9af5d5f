"""Training curves from a Trainer's log history (`training/<key>/log_history.json`, the
list of dicts TRL's `trainer.state.log_history` holds): one figure, and the warnings a
practitioner would raise on reading it.

`plot_training_curves(log_history)` draws, against the optimizer step, the panels the
history has: loss (training, and held-out loss where logged), the DPO rewards of chosen
and rejected answers with their margin, the reward accuracy, and the log-probabilities of
chosen and rejected answers (SFT, which has no rewards: loss and token accuracy). It returns PNG bytes; the
report, the Prefect artifact of a running training and any publisher draw the same.

`curve_warnings(log_history, method)` applies these rules, each only once at least
`MIN_POINTS` (8) training steps are logged; with fewer, `judgeable` is False and readers
say "too few steps to judge" rather than warn (a tiny run's handful of noisy points says
nothing either way). With n logged points, a quarter is max(1, n // 4) points:

- loss not decreasing: the mean loss of the last quarter is >= that of the first quarter;
- reward accuracy at chance (DPO, online DPO): the mean `rewards/accuracies` of the last
  quarter is within 0.05 of 0.5;
- margins collapsing (DPO, online DPO): the last `rewards/margins` is below 0, or below
  10% of the highest margin logged (when that peak is above 0).
"""

from __future__ import annotations

import io
import math

#: Logged training steps needed before a curve is judged.
MIN_POINTS = 8

#: (panel title, keys drawn in it); a panel is drawn when the history has one of its keys.
PANELS = [
    ("loss", ["loss", "eval_loss"]),
    ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("reward accuracy", ["rewards/accuracies"]),
    ("log-probabilities", ["logps/chosen", "logps/rejected"]),
    ("token accuracy", ["mean_token_accuracy"]),
]


def train_rows(log_history: list[dict]) -> list[dict]:
    """The per-step training records: those with a `loss` (not the evaluation records, nor
    the run's closing summary)."""
    return [r for r in log_history if isinstance(r, dict) and _number(r.get("loss")) is not None
            and "train_runtime" not in r]


def series(log_history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the history, skipping records without a finite value."""
    xs, ys = [], []
    for i, r in enumerate(log_history):
        if not isinstance(r, dict) or "train_runtime" in r:
            continue
        v = _number(r.get(key))
        if v is None:
            continue
        xs.append(float(r.get("step", i + 1)))
        ys.append(v)
    return xs, ys


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def judgeable(log_history: list[dict]) -> bool:
    """Enough training steps are logged to judge the curves (`MIN_POINTS`)."""
    return len(train_rows(log_history)) >= MIN_POINTS


def _quarters(values: list[float]) -> tuple[float, float]:
    q = max(1, len(values) // 4)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def curve_warnings(log_history: list[dict], method: str) -> list[str]:
    """One line per problem the curves show (see the module docstring for the rules);
    none when fewer than `MIN_POINTS` steps are logged."""
    if not judgeable(log_history):
        return []
    rows = train_rows(log_history)
    out = []
    losses = [float(r["loss"]) for r in rows]
    first, last = _quarters(losses)
    if last >= first:
        out.append(f"loss not decreasing: mean of the last quarter {last:.4g} >= mean of the "
                   f"first quarter {first:.4g}")
    if method in ("dpo", "online_dpo"):
        acc = [v for v in (_number(r.get("rewards/accuracies")) for r in rows) if v is not None]
        if len(acc) >= MIN_POINTS:
            _, late = _quarters(acc)
            if abs(late - 0.5) <= 0.05:
                out.append(f"reward accuracy at chance: {late:.2f} over the last quarter")
        margins = [v for v in (_number(r.get("rewards/margins")) for r in rows) if v is not None]
        if len(margins) >= MIN_POINTS:
            peak, final = max(margins), margins[-1]
            if final < 0:
                out.append(f"margins collapsing: the last reward margin is negative "
                           f"({final:.4g})")
            elif peak > 0 and final < 0.1 * peak:
                out.append(f"margins collapsing: the last reward margin {final:.4g} is below "
                           f"10% of its peak {peak:.4g}")
    return out


def curve_verdict(log_history: list[dict] | None, method: str) -> list[str]:
    """What a reader is told about a run's curves, as lines: "no curves recorded" (no log
    history), "too few steps to judge" (under `MIN_POINTS`), each warning prefixed
    "warning:", or that no rule fired."""
    if log_history is None:
        return ["no curves recorded"]
    n = len(train_rows(log_history))
    if n < MIN_POINTS:
        return [f"too few steps to judge ({n} logged; the checks need {MIN_POINTS})"]
    warnings = curve_warnings(log_history, method)
    if not warnings:
        return [f"no problem flagged over {n} logged steps"]
    return [f"warning: {w}" for w in warnings]


def latest_values(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of every key the panels draw, plus `step` and `epoch`."""
    out: dict[str, float] = {}
    for r in log_history:
        if not isinstance(r, dict) or "train_runtime" in r:
            continue
        for key in ["step", "epoch", *(k for _, keys in PANELS for k in keys)]:
            v = _number(r.get(key))
            if v is not None:
                out[key] = v
    return out


def plot_training_curves(log_history: list[dict], title: str | None = None) -> bytes:
    """The curves figure of a log history, as PNG bytes (a figure saying "no training
    steps logged" when there are none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, keys) for name, keys in PANELS
              if any(series(log_history, k)[1] for k in keys)]
    if any(name == "rewards" for name, _ in panels):  # DPO: token accuracy is a side metric
        panels = [(name, keys) for name, keys in panels if name != "token accuracy"]
    if not panels:
        fig, ax = plt.subplots(figsize=(5, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, "no training steps logged", ha="center", va="center")
    else:
        cols = min(2, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.8 * rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, (name, keys) in zip(axes.flat, panels):
            for key in keys:
                xs, ys = series(log_history, key)
                if ys:
                    ax.plot(xs, ys, marker="o" if len(ys) < 30 else None, ms=3, label=key)
            if name == "reward accuracy":
                ax.axhline(0.5, color="grey", lw=1, ls="--")
                ax.set_ylim(-0.05, 1.05)
            if name == "rewards":
                ax.axhline(0.0, color="grey", lw=1, ls="--")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
