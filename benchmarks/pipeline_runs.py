"""`croco run` of a small pipeline: the first run against an unchanged rerun, which finds
every stage output complete, as one A/B case (`benchmarks.ab`), in seconds of wall time of
the command (lower is better), interleaved `--reps` times.

Each rep's first run gets a fresh data root and a fresh PREFECT_HOME (Prefect builds its
database there: part of a first run's cost); its rerun reuses both. Every run is
`python -m croco.flows.cli run` in a subprocess with this checkout first on PYTHONPATH: the demo
config with `--set` overrides, `--stages pair`, on a tiny random 2-layer Llama (hidden
size 32, SmolLM2's tokenizer) written to a temporary folder as policy and judge, so the
figure is croco's and Prefect's own cost, not a model's. A rerun must find every stage
output complete and start no stage task.

A second case measures orchestration's share of a first run: each rep runs a first run
(fresh data root and PREFECT_HOME, the same pipeline) and reports, as the baseline side,
the command's wall time and, as the croco side, the stage work in it: the seconds the
stages recorded in their outputs' `_SUCCESS` markers (the run's manifest `outputs`, and
any other output completed under its fresh data root). The ratio is wall / work; the note gives the share, (wall - work) / wall, of
the command and of the flow alone (the manifest's `wall_seconds`). On this tiny model
the stages do little work, so the share is an upper bound of a real run's.

    python benchmarks/pipeline_runs.py [--languages en,de] [--prompts 2] [--k 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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
#: The run's own tasks (not stages), which every run starts.
_RUN_TASKS = ("manifest", "heldout-summary", "report")
#: A stage group's log line when its outputs are complete (`Stages.todo`).
_READ_BACK = re.compile(r": (\d+) of \d+ complete, read back")
_MANIFEST = re.compile(r"^manifest:\s+(\S+)", re.MULTILINE)


def task_states(log: str) -> dict[str, str]:
    """Final state of every task run named in a `croco run` log, e.g. {'score-en': 'Cached'}."""
    return dict(_TASK_STATE.findall(log))


def manifest_of(log: str) -> dict:
    """The manifest of the run whose `croco run` output is `log`."""
    found = _MANIFEST.findall(log)
    if not found:
        raise AssertionError("no 'manifest:' line in the run's output")
    return json.loads(Path(found[-1]).read_text())


def stage_outputs(node) -> list[dict]:
    """Every stage output described in a manifest's `outputs` (dicts with key and uri)."""
    if isinstance(node, dict):
        if "key" in node and "uri" in node:
            return [node]
        return [o for v in node.values() for o in stage_outputs(v)]
    if isinstance(node, list):
        return [o for v in node for o in stage_outputs(v)]
    return []


def stage_work_seconds(manifest: dict, data_root: Path | None = None) -> float:
    """The seconds of stage work a run recorded: the `_SUCCESS` seconds of each output its
    manifest lists and, with `data_root` (a run's own fresh data root), of every other
    output marked complete there (the held-out generations, which the manifest does not
    list). Each output once (the run's pairs appear again under the variant that trains
    on them), and a pass that wrote several language folders of one output at once
    (held-out generations and scores: one `seconds` in each folder) counted once."""
    found = {o["uri"]: (o["key"], o.get("seconds")) for o in stage_outputs(manifest["outputs"])}
    for marker in sorted(data_root.rglob("_SUCCESS")) if data_root else []:
        uri = str(marker.parent)
        if uri in found:
            continue
        try:
            seconds = json.loads(marker.read_text() or "{}").get("seconds")
        except (ValueError, AttributeError):
            continue
        parts = marker.parent.relative_to(data_root).parts  # <stage>/<key>[/lang=..]
        found[uri] = (parts[1] if len(parts) > 1 else parts[0], seconds)
    work = {(key, seconds) for key, seconds in found.values() if seconds is not None}
    return sum(seconds for _, seconds in work)


def share(wall: float, work: float) -> float:
    """Orchestration's share of `wall`: the time that was not stage work."""
    return (wall - work) / wall if wall else 0.0


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
        stages = {t: s for t, s in task_states(log).items() if not t.startswith(_RUN_TASKS)}
        read_back = sum(int(n) for n in _READ_BACK.findall(log))
        if stages or not read_back:
            raise AssertionError(f"the rerun in {rep} started stage tasks {stages} (it "
                                 f"should find every output complete and start none)")
        state["cached"] = read_back

    def sizes() -> str:
        return (f"{len(langs)} languages x {size['prompts']} prompts x k={size['k']}, <= "
                f"{size['max_new_tokens']} new tokens, tiny random model")

    def note() -> str:
        return (f"{sizes()}; each rerun: {state['cached']} stage outputs complete, read "
                f"back, no stage task started")

    shares: dict[str, list] = {"wall": [], "work": [], "flow": []}

    def timed_first_run() -> float:
        """A first run (its own fresh folders); its command's wall time, in seconds."""
        rep = tmp / f"share-{len(shares['wall']) + 1}"
        t = time.perf_counter()
        log = croco_run(overrides(), rep / "data", rep / "prefect")
        wall = time.perf_counter() - t
        manifest = manifest_of(log)
        shares["wall"].append(wall)
        shares["work"].append(stage_work_seconds(manifest, rep / "data"))
        shares["flow"].append(manifest.get("wall_seconds") or 0.0)
        shutil.rmtree(rep, ignore_errors=True)
        return wall

    def stage_work() -> float:
        """The stage work recorded in the manifest of the first run just timed."""
        return shares["work"][-1]

    def share_note() -> str:
        run = [share(w, s) for w, s in zip(shares["wall"], shares["work"])]
        flow = [share(f, s) for f, s in zip(shares["flow"], shares["work"])]
        return (f"orchestration share of a first run, (wall - stage work) / wall: median "
                f"{statistics.median(run):.0%} of the command (min {min(run):.0%}), median "
                f"{statistics.median(flow):.0%} of the flow alone (min {min(flow):.0%}; "
                f"manifest wall_seconds); stage work = the `_SUCCESS` seconds of the "
                f"outputs under the run's fresh data root. Computed on this tiny-model "
                f"pipeline ({sizes()}, --stages pair), whose stages do almost no work: an "
                f"upper bound of the share in a run of real models")

    return [Case("croco run --stages pair, tiny model", baseline=first_run, croco=rerun,
                 unit="s", baseline_label="first run (fresh data root, PREFECT_HOME)",
                 croco_label="unchanged rerun (all stages cached)", setup=overrides,
                 note=note, alternate=False),
            Case("first run: wall time vs stage work, tiny model", baseline=timed_first_run,
                 croco=stage_work, unit="s",
                 baseline_label="first run, wall time of the command",
                 croco_label="stage work in it (its outputs' _SUCCESS seconds)",
                 setup=overrides, note=share_note, alternate=False)]


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
