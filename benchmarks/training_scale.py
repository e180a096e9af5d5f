"""The training-data stages at the paper's counts: the reference log-probs stage
(`croco.stages.RefLogps`) and a DPO training run on stored reference log-probs
(`croco.stages.Train`), each in a fresh process, at N = 500 and N = 2,000 prompts a
language: is their peak memory flat in N?

    python benchmarks/training_scale.py [--reps 3] [--steps 10] [--sizes 500,2000] [--tmp /tmp]

The pairs are the real pair stage's output (`croco.stages.run_pairs`, the paper's
pairing) over a synthesized scored set of the rehearsal's shape (11 languages x N
prompts x k = 64 samples of ~40 bytes, shards of 64 prompts; `benchmarks.pairing_scale`),
so 11 x N DPO pairs. The model is a tiny random Llama (`benchmarks.tiny`), as in the
rehearsal: what grows with N is the data (the pairs read, tokenized, their log-probs),
not the model. The DPO run takes `--steps` optimizer steps (TRL tokenizes every pair
first, so its memory still sees the whole set).

Each figure is an A/B case of the `benchmarks.ab` harness with N = 500 as A and N =
2,000 as B, interleaved; a measurement is a fresh subprocess (peak RSS = its VmHWM),
which gives both its wall time and its peak RSS. The ratio (N = 500 / N = 2,000) near 1
means flat in N; the wall time grows with the pairs (the reference stage reads all of
them).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.ab import Case, machine, run_case, table

SIZES = (500, 2000)


def _training(steps: int):
    from croco.config import TrainingConfig

    return TrainingConfig(max_steps=steps, effective_batch_size=8, per_device_batch_size=8,
                          max_length=256, heldout_fraction=0.0, save_steps=10_000,
                          report_to="none")


def _peak_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) / 1024


def stage_child(which: str, pairs_uri: str, model: str, ref_uri: str | None, steps: int,
                data_root: str) -> dict:
    """Run one stage in this (fresh) process, writing under `data_root`: wall seconds,
    peak RSS in MB, and the rows it handled."""
    from croco import storage
    from croco.config import PolicyConfig
    from croco.stage import run
    from croco.stages import RefLogps, Train
    from croco.training.spec import DPOSpec

    cfg, policy = _training(steps), PolicyConfig(model=model)
    t = time.perf_counter()
    if which == "ref":
        out = run(RefLogps(pairs_uri=pairs_uri, policy=policy, training=cfg), data_root)
        rows = storage.marker_info(out)["rows"]
    else:
        spec = DPOSpec(variant_name="bench", policy=policy, training=cfg, data_root=data_root,
                       pairs_uri=pairs_uri, ref_logps_uri=ref_uri)
        out = run(Train(spec=spec), data_root)
        m = storage.read_json(storage.join(out, "metrics.json"))
        if m.get("ref_logps") != "stored":
            raise AssertionError(f"the DPO run did not read the stored reference log-probs: "
                                 f"{m.get('ref_logps')}")
        rows = m.get("pairs_train")
    return {"seconds": time.perf_counter() - t, "peak_mb": _peak_mb(), "rows": rows}


def _run_child(*args) -> dict:
    code = ("import json, sys; from benchmarks.training_scale import stage_child; "
            "a = json.loads(sys.argv[1]); print('RESULT ' + json.dumps(stage_child(*a)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), check=False)
    if proc.returncode:
        raise RuntimeError(f"{args[0]} stage failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def cases(tmp: str = "/tmp", steps: int = 10, sizes: tuple[int, int] = SIZES) -> list[Case]:
    """Wall time and peak RSS of the reference stage and of a DPO run, N = 500 against
    2,000. The sets and the tiny model are made by the first case's setup; the reference
    log-probs the DPO runs read are computed there once per N (as the pipeline does).
    `sizes`: the two N (A, B)."""
    small, large = sizes
    work = tempfile.mkdtemp(dir=tmp, prefix="croco-training-scale-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    state: dict = {"ready": False, "rows": {}, "rss": {}}

    def setup() -> None:
        if state["ready"]:
            return
        from benchmarks.pairing_scale import write_scored_set
        from benchmarks.tiny import tiny_llama
        from croco.config import PAPER_LANGUAGES, PairingConfig, PolicyConfig
        from croco.stages import RefLogps, run_pairs

        state["model"] = tiny_llama(Path(work) / "tiny-lm")
        for n in sizes:
            t = time.perf_counter()
            root = os.path.join(work, f"n{n}")
            uris = write_scored_set(root, n * len(PAPER_LANGUAGES) * 64 * 40 / 1e9,
                                    langs=PAPER_LANGUAGES, k=64, text_bytes=40,
                                    corpus_words=200_000)
            pairs = run_pairs(*uris, PairingConfig(), root)
            ref = _run_child("ref", pairs, state["model"], None, steps, root)
            state[n] = {"pairs": pairs, "ref": RefLogps(
                pairs_uri=pairs, policy=PolicyConfig(model=state["model"]),
                training=_training(steps)).output(root)}
            state["rows"][n] = ref["rows"]
            print(f"  N = {n}: {ref['rows']} pairs, synthesized and paired, reference "
                  f"log-probs in {time.perf_counter() - t:.0f} s", flush=True)
        state["ready"] = True

    def measure(which: str, n: int):
        def go() -> dict:
            root = tempfile.mkdtemp(dir=work, prefix=f"run-{which}-{n}-")
            try:
                return _run_child(which, state[n]["pairs"], state["model"], state[n]["ref"],
                                  steps, root)
            finally:
                shutil.rmtree(root, ignore_errors=True)
        return go

    def wall(which: str, n: int):
        run = measure(which, n)

        def go() -> float:
            got = run()
            state["rss"].setdefault((which, n), []).append(got["peak_mb"])
            return got["seconds"]
        return go

    def rss(which: str, n: int):
        run = measure(which, n)

        def go() -> float:
            kept = state["rss"].get((which, n))
            return kept.pop(0) if kept else run()["peak_mb"]
        return go

    def note() -> str:
        return (f"pairs: {state['rows'].get(small)} at N = {small:,}, "
                f"{state['rows'].get(large)} at N = {large:,}; tiny random Llama, LoRA, batch 8, <= 256 tokens, DPO {steps} "
                "steps on stored reference log-probs")

    labels = {"baseline_label": f"N = {small:,}", "croco_label": f"N = {large:,}"}
    out = []
    for which, name in (("ref", "reference log-probs stage"), ("train", f"DPO, {steps} steps")):
        out += [Case(f"{name} wall", wall(which, small), wall(which, large), setup=setup,
                     **labels),
                Case(f"{name} peak RSS", rss(which, small), rss(which, large), unit="MB",
                     setup=setup, note=note, **labels)]
    return out


def main() -> None:
    # `kill` stops it as Ctrl-C does: subprocess.run kills the running child on the way out
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="DPO optimizer steps")
    ap.add_argument("--tmp", default="/tmp", help="where the synthesized sets go")
    ap.add_argument("--sizes", default="500,2000",
                    help="the two N, prompts a language (a quick check: 20,80)")
    a = ap.parse_args()
    sizes = tuple(int(x) for x in a.sizes.split(","))
    if len(sizes) != 2:
        ap.error("--sizes takes two numbers, e.g. 500,2000")
    results = []
    for case in cases(a.tmp, a.steps, sizes):
        print(f"{case.name} ...", flush=True)
        results.append(run_case(case, reps=a.reps))
    print(table(results))
    print(machine())


if __name__ == "__main__":
    main()
