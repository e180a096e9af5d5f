"""`croco run` of a small pipeline: the first run against an unchanged rerun, which finds
every stage task cached, as one A/B case (`benchmarks.ab`), in seconds of wall time of
the command (lower is better), interleaved `--reps` times.

Each rep's first run gets a fresh data root and a fresh PREFECT_HOME (Prefect builds its
database there: part of a first run's cost); its rerun reuses both. Every run is
`python -m croco.flows.cli run` in a subprocess with this checkout first on PYTHONPATH: the demo
config with `--set` overrides, `--stages pair`, on a tiny random 2-layer Llama (hidden
size 32, SmolLM2's tokenizer) written to a temporary folder as policy and judge, so the
figure is croco's and Prefect's own cost, not a model's. A rerun must report every stage
task `Cached`.

    python benchmarks/pipeline_runs.py [--languages en,de] [--prompts 2] [--k 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ab import Case, run_and_print
from benchmarks.tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
#: Sizes: full, and --quick (Prefect's start-up dominates both).
SIZES = {
    False: {"languages": "en,de,fr", "prompts": 4, "k": 8, "max_new_tokens": 16},
    True: {"languages": "en,de", "prompts": 2, "k": 4, "max_new_tokens": 8},
}
_TASK_STATE = re.compile(r"Task run '([^']+)' - Finished in state (\w+)")


def task_states(log: str) -> dict[str, str]:
    """Final state of every task run named in a `croco run` log, e.g. {'score-en': 'Cached'}."""
    return dict(_TASK_STATE.findall(log))


def croco_run(overrides: list[str], data_root: Path, prefect_home: Path) -> str:
    """Run `croco run --stages pair` in a subprocess; its output. Raises with the output's
    end if it fails."""
    # Prefect's temporary server does not start (the run waits, then times out) when
    # PREFECT_HOME's parent folder does not exist.
    prefect_home.mkdir(parents=True, exist_ok=True)
    # Without PREFECT_API_URL each run starts its own temporary server on `prefect_home`.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "croco.flows.cli", "run", "--stages", "pair",
           "--set", f"data_root={data_root}"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {proc.returncode}; "
                           f"its output ends:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


def cases(quick: bool = False, **sizes) -> list[Case]:
    """First run vs cached rerun of `croco run --stages pair` on a tiny model; seconds."""
    size = {**SIZES[quick], **{k: v for k, v in sizes.items() if v is not None}}
    langs = size["languages"].split(",")
    tmp = Path(tempfile.mkdtemp(prefix="croco-bench-runs-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    state: dict = {"rep": 0, "cached": 0}

    def overrides() -> list[str]:
        if "model" not in state:
            state["model"] = tiny_llama(tmp / "tiny-lm")
        model = state["model"]
        return [f"languages=[{', '.join(langs)}]", f"prompts.limit={size['prompts']}",
                f"generation.k={size['k']}", f"generation.max_new_tokens={size['max_new_tokens']}",
                f"policy.model={model}", f"reward.scorers.0.model={model}"]

    def first_run() -> None:
        if state["rep"]:  # the previous rep's folders are no longer needed
            shutil.rmtree(tmp / f"rep-{state['rep']}", ignore_errors=True)
        state["rep"] += 1
        rep = tmp / f"rep-{state['rep']}"
        croco_run(overrides(), rep / "data", rep / "prefect")

    def rerun() -> None:
        rep = tmp / f"rep-{state['rep']}"
        log = croco_run(overrides(), rep / "data", rep / "prefect")
        stages = {t: s for t, s in task_states(log).items() if not t.startswith("manifest")}
        if not stages or any(s != "Cached" for s in stages.values()):
            raise AssertionError(f"the rerun in {rep} was not fully cached: task states "
                                 f"{stages or 'not found in its output'}")
        state["cached"] = len(stages)

    def note() -> str:
        return (f"{len(langs)} languages x {size['prompts']} prompts x k={size['k']}, <= "
                f"{size['max_new_tokens']} new tokens, tiny random model; each rerun: "
                f"{state['cached']} stage tasks Cached")

    return [Case("croco run --stages pair, tiny model", baseline=first_run, croco=rerun,
                 unit="s", baseline_label="first run (fresh data root, PREFECT_HOME)",
                 croco_label="unchanged rerun (all stages cached)", setup=overrides,
                 note=note)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--languages", help="comma-separated, e.g. en,de")
    ap.add_argument("--prompts", type=int, help="prompts per language")
    ap.add_argument("--k", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    a = ap.parse_args()
    run_and_print(cases(
        a.quick, languages=a.languages, prompts=a.prompts, k=a.k,
        max_new_tokens=a.max_new_tokens), reps=a.reps)


if __name__ == "__main__":
    main()
