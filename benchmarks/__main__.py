"""Every benchmark as an A/B pair, interleaved in one process, in one table.

    python -m benchmarks [--quick] [--reps N] [--only NAME ...] [--markdown FILE]
                         [--json FILE] [--compare EARLIER.json]

Run from the repository root. Each module of `benchmarks.MODULES` (or of `--only`) gives
its cases (`cases(quick)`); each case runs baseline and croco alternately `--reps` times
(`benchmarks.ab.run_case`). A module that cannot be imported is reported as not
available and skipped; a case that fails is reported with its error and the others still
run (exit status 1). `--quick` runs every case at a small size (seconds to a minute or
two each), for checking that the benchmarks work, not for recording figures.
`--json FILE` keeps the rows (figures, ratios) and the machine line; `--compare` reads
such a file from an earlier run and adds a table of how far each ratio moved (best-of and
per-rep median, held to +-25 %).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shlex
import sys
import time
import traceback

import benchmarks
from benchmarks import ab


def load(name: str):
    """The benchmark module `benchmarks.<name>`, or the reason it is not available."""
    if not name.isidentifier():
        return None, f"{name!r} is not a module name (e.g. {benchmarks.MODULES[0]})"
    try:
        return importlib.import_module(f"benchmarks.{name}"), None
    except ImportError as e:  # the module is not written yet, or needs a missing package
        return None, str(e)


def run_module(name: str, mod, *, quick: bool, reps: int, log) -> tuple[list, list[str]]:
    """(results, failures) of one module's cases; a failing case does not stop the rest."""
    results, failures = [], []
    try:
        cases = mod.cases(quick=quick)
    except Exception as e:  # noqa: BLE001 - reported, and the other modules still run
        traceback.print_exc()
        return [], [f"{name}: building its cases failed: {type(e).__name__}: {e}"]
    for case in cases:
        log(f"{name}: {case.name}")
        t = time.perf_counter()
        try:
            results.append(ab.run_case(case, reps=reps, log=log))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            failures.append(f"{case.name}: {type(e).__name__}: {e}")
        log(f"  ({time.perf_counter() - t:.0f} s)")
    return results, failures


def set_threads(n: int) -> None:
    """n threads for torch and for polars, here and in the subprocesses a benchmark starts.
    Polars sizes its pool once, at its import: this runs before any benchmark imports it."""
    if "polars" in sys.modules:
        raise RuntimeError("polars was imported before --threads could cap its pool")
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    os.environ["POLARS_MAX_THREADS"] = str(n)
    torch.set_num_threads(n)


def release_models() -> None:
    """Free one module's models before the next module loads its own."""
    gc.collect()
    try:
        from croco.models import clear_model_cache
    except ImportError:
        return
    clear_model_cache()
    gc.collect()


def report(results: list, unavailable: list[str], failures: list[str]) -> str:
    """The table, its notes, what did not run and the machine line, as Markdown."""
    parts = [ab.table(results) if results else "(no results)"]
    parts += [f"- {line}" for line in ab.notes(results)]
    parts += [f"- not available: {line}" for line in unavailable]
    parts += [f"- FAILED {line}" for line in failures]
    parts.append(f"\nmachine: {ab.machine()}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the benchmarks "
                    "run; not figures to record")
    ap.add_argument("--reps", type=int, default=3, help="A/B repetitions per case (>= 3)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help=f"these modules only (of {', '.join(benchmarks.MODULES)})")
    ap.add_argument("--threads", type=int, help="torch's and polars' threads, here and in "
                    "the subprocesses (OMP_NUM_THREADS, POLARS_MAX_THREADS); default: theirs. "
                    "On a machine busy with other work, 1 avoids threads spinning against "
                    "each other")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table, the command and "
                    "the machine line to FILE")
    ap.add_argument("--json", metavar="FILE", help="also write the rows and the machine line "
                    "to FILE, for a later --compare")
    ap.add_argument("--compare", metavar="EARLIER", help="the --json file of an earlier run: "
                    "add how far each figure's ratios moved since (within +-25 %%?)")
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error("--reps must be at least 1 (3 or more for a figure worth recording)")
    earlier = None
    if a.compare:  # read it now: a wrong path should not wait for the benchmarks to end
        try:
            with open(a.compare) as f:
                earlier = json.load(f)["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--compare {a.compare}: not the --json file of a run ({e})")
    if a.threads:
        set_threads(a.threads)
    t0 = time.perf_counter()
    results, unavailable, failures = [], [], []
    for name in a.only or benchmarks.MODULES:
        mod, why = load(name)
        if mod is None:
            print(f"{name}: not available ({why}); skipped", flush=True)
            unavailable.append(f"{name} ({why})")
            continue
        got, failed = run_module(name, mod, quick=a.quick, reps=a.reps,
                                 log=lambda s: print(s, flush=True))
        results += got
        failures += failed
        for r in got:
            r.release()
        release_models()
    text = report(results, unavailable, failures)
    if earlier is not None:
        moved, steady = ab.compare([r.row() for r in results], earlier)
        text += (f"\n\nagainst {a.compare}:\n\n{moved}\n\n"
                 + ("every figure held within +-25 %" if steady
                    else "some figures moved more than 25 % (NO above)"))
    print(f"\n{text}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": [r.row() for r in results], "machine": ab.machine(),
                       "unavailable": unavailable, "failures": failures}, f, indent=1)
    if a.markdown:
        command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
        with open(a.markdown, "w") as f:
            f.write(f"```\n{command.strip()}    # {time.perf_counter() - t0:.0f} s\n```\n\n"
                    f"{text}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
