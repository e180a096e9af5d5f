"""The A/B harness every benchmark uses: a baseline and croco's way of doing one thing, run
in the same process, interleaved `reps` times (A B, B A, A B ...: each rep is a pair run
back to back, the order swapped every other rep), timed (or measured by the callables
themselves), reported as min and median of each side, the ratio baseline / croco of those,
and the median and range of the per-rep ratios.

Shared, noisy machines make a benchmark that runs each phase once report nonsense (a
slow minute during phase B inverts the ratio); interleaving spreads the noise over both.
The per-rep ratio compares two runs a few seconds apart, so load that comes and goes over
minutes mostly cancels in it; swapping the order cancels what the first of two runs pays
for the second (a warm page cache, a model already in memory) and a steady drift. A case
whose croco side needs its baseline to have run just before (a rerun after a first run)
says `alternate=False` and keeps A before B.

A figure is a `Case`: a name, the unit, and two zero-argument callables. A callable
returns None to be timed by the harness (seconds), or a number it measured itself in the
case's unit (e.g. peak RSS in MB, tokens/s). `higher_is_better` says which way the ratio
reads: the ratio is always "how many times better croco is" (> 1 means croco wins).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace


@dataclass
class Case:
    name: str
    baseline: Callable[[], float | None]
    croco: Callable[[], float | None]
    unit: str = "s"
    higher_is_better: bool = False
    baseline_label: str = "baseline"
    croco_label: str = "croco"
    setup: Callable[[], None] | None = None  # once, before the first rep (e.g. warm-up)
    #: After the last rep: one line for under the table (a check's result, a one-time cost).
    note: Callable[[], str] | None = None
    #: Swap the order (B before A) every other rep; False when B needs A to have run first.
    alternate: bool = True
    #: For a side the harness times (returns None): call it again until this many seconds
    #: have passed and take the mean, as `timeit` does, so a sub-second figure is not at the
    #: mercy of one busy tenth of a second.
    min_seconds: float = 0.0


@dataclass
class Result:
    case: Case
    baseline: list[float] = field(default_factory=list)
    croco: list[float] = field(default_factory=list)
    note: str | None = None  # the case's note, taken after the last rep

    def release(self) -> None:
        """Drop the case's callables, and the models they hold, once the figures are in."""
        self.case = replace(self.case, baseline=_released, croco=_released, setup=None,
                            note=None)

    def _ratio(self, b: float, c: float) -> float:
        if self.case.higher_is_better:
            return c / b if b else float("inf")
        return b / c if c else float("inf")

    @property
    def ratio_min(self) -> float:
        """Best against best."""
        pick = max if self.case.higher_is_better else min
        return self._ratio(pick(self.baseline), pick(self.croco))

    @property
    def ratio_median(self) -> float:
        return self._ratio(statistics.median(self.baseline), statistics.median(self.croco))

    @property
    def ratios(self) -> list[float]:
        """One ratio per rep: the baseline and croco runs of that rep, back to back."""
        return [self._ratio(b, c) for b, c in zip(self.baseline, self.croco)]

    @property
    def ratio_paired(self) -> float:
        """The median of the per-rep ratios: the figure least moved by a busy machine."""
        return statistics.median(self.ratios)

    def row(self) -> dict:
        pick = max if self.case.higher_is_better else min
        return {
            "figure": self.case.name, "unit": self.case.unit, "reps": len(self.croco),
            "baseline": self.case.baseline_label, "croco": self.case.croco_label,
            "baseline_best": pick(self.baseline), "baseline_median": statistics.median(self.baseline),
            "croco_best": pick(self.croco), "croco_median": statistics.median(self.croco),
            "ratio_best": self.ratio_min, "ratio_median": self.ratio_median,
            "ratio_paired": self.ratio_paired, "ratio_paired_low": min(self.ratios),
            "ratio_paired_high": max(self.ratios),
        }


def _released() -> None:
    raise RuntimeError("this case was released after its run; build it again to rerun it")


def _measure(fn: Callable[[], float | None], min_seconds: float = 0.0) -> float:
    """Seconds of one call of `fn` (the mean of as many calls as fill `min_seconds`), or the
    figure `fn` returns itself."""
    calls = 0
    t = time.perf_counter()
    while True:
        value = fn()
        calls += 1
        if value is not None:
            return float(value)
        elapsed = time.perf_counter() - t
        if elapsed >= min_seconds:
            return elapsed / calls


def run_case(case: Case, reps: int = 3, log: Callable[[str], None] = print) -> Result:
    """`reps` pairs, back to back: A B, then B A, A B ... (A B every time when the case
    says `alternate=False`); `reps` >= 3 for a figure worth recording."""
    if case.setup:
        case.setup()
    res = Result(case)
    for i in range(reps):
        if case.alternate and i % 2:
            c = _measure(case.croco, case.min_seconds)
            b = _measure(case.baseline, case.min_seconds)
        else:
            b = _measure(case.baseline, case.min_seconds)
            c = _measure(case.croco, case.min_seconds)
        res.baseline.append(b)
        res.croco.append(c)
        log(f"  {case.name} rep {i + 1}/{reps}: baseline {res.baseline[-1]:.4g} {case.unit}, "
            f"croco {res.croco[-1]:.4g} {case.unit}")
    if case.note:
        res.note = case.note()
    return res


def notes(results: list[Result]) -> list[str]:
    """The notes of the cases that have one, each as "figure: note"."""
    return [f"{r.case.name}: {r.note}" for r in results if r.note]


def run_and_print(cases: list[Case], reps: int = 3) -> list[Result]:
    """A benchmark script's main: run every case A/B interleaved, then print the table, the
    notes and the machine."""
    results = [run_case(c, reps=reps) for c in cases]
    print(table(results))
    for line in notes(results):
        print(f"- {line}")
    print(f"machine: {machine()}")
    return results


def machine() -> str:
    """One line: CPU or GPU, cores, memory, and the library versions that matter."""
    import torch

    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
        try:
            import polars

            where += f" ({polars.thread_pool_size()} for polars)"
        except ImportError:
            pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        where += f", {mem:.0f} GiB"
    except (ValueError, OSError):
        pass
    versions = []
    for mod in ("torch", "transformers", "trl", "polars", "prefect"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return f"{where}; {', '.join(versions)}; python {platform.python_version()}"


def table(results: list[Result]) -> str:
    """A Markdown table: figure, baseline and croco (best / median), ratio (best / median),
    per-rep ratio (median, low-high)."""
    lines = [("| figure | baseline | croco | baseline best / median | croco best / median "
             "| ratio best / median | per-rep ratio median (low-high) | reps |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = r.row()
        lines.append(
            f"| {d['figure']} | {d['baseline']} | {d['croco']} "
            f"| {d['baseline_best']:.4g} / {d['baseline_median']:.4g} {d['unit']} "
            f"| {d['croco_best']:.4g} / {d['croco_median']:.4g} {d['unit']} "
            f"| **{d['ratio_best']:.2f}x** / {d['ratio_median']:.2f}x "
            f"| {d['ratio_paired']:.2f}x ({d['ratio_paired_low']:.2f}-"
            f"{d['ratio_paired_high']:.2f}) | {d['reps']} |")
    return "\n".join(lines)


def compare(rows: list[dict], earlier: list[dict], tolerance: float = 0.25) -> tuple[str, bool]:
    """A Markdown table of each figure's ratios now against an earlier run's (`row()`
    dicts, e.g. read back from `--json`), and whether every figure both runs have moved by
    at most `tolerance` (a fraction) in its best-of ratio and in its per-rep median ratio
    (the median of medians is shown in the main table but not held to this: one slow rep
    of one side moves it)."""
    before = {r["figure"]: r for r in earlier}
    lines = [(f"| figure | ratio best: earlier -> now | per-rep median: earlier -> now "
              f"| within ±{tolerance:.0%} |"),
             "|---|---|---|---|"]
    steady = True
    for d in rows:
        e = before.get(d["figure"])
        if e is None:
            lines.append(f"| {d['figure']} | (not in the earlier run) | | |")
            continue
        moves = [abs(d[k] / e[k] - 1) if e[k] else float("inf")
                 for k in ("ratio_best", "ratio_paired") if k in e]
        held = max(moves) <= tolerance
        steady &= held
        paired = (f"{e['ratio_paired']:.2f}x -> {d['ratio_paired']:.2f}x"
                  if "ratio_paired" in e else f"- -> {d['ratio_paired']:.2f}x")
        lines.append(f"| {d['figure']} | {e['ratio_best']:.2f}x -> {d['ratio_best']:.2f}x "
                     f"| {paired} | {'yes' if held else 'NO'} (moved {max(moves):.0%}) |")
    return "\n".join(lines), steady
