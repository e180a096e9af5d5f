"""A run killed or interrupted at any moment loses no finished work and never blocks the
next one.

Each trial starts `croco run` (tiny models, 3 languages, through training) as a process
group of its own, waits until a seeded choice of stage has started (prompts, generate,
score, pair or train) plus a seeded delay, and then
- kills the whole group with SIGKILL (power loss, OOM killer), or
- sends SIGINT to the group (Ctrl-C in a terminal) or SIGTERM to the main process,
  which must stop it within 20 s with exit code 130 / 143.
Then no process of the run is left (its temporary Prefect API included), and a plain
rerun of the same command exits 0 within a bound with scores, pairs and adapter equal
to an uninterrupted run's, no duplicate rows and no temporary file read as data.

`pytest tests/reliability/test_signals.py --trials N` runs N SIGKILL trials (default 6).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import polars as pl
import psutil
import pytest

from tests.reliability.conftest import Process, croco_env, start_croco

pytestmark = pytest.mark.slow

STAGE_MARKERS = {  # stage -> a line the run logs when that stage has started
    "prompts": "Task run 'prompts-",
    "generate": "generate ",
    "score": "score ",
    "pair": "Task run 'pair-",
    "train": "train-dpo",
}
STOP_BOUND_S = 20.0
RERUN_BOUND_S = 600.0
SEED = 20261130


def _config(tiny_config_maker, root: Path) -> str:
    import yaml

    cfg = tiny_config_maker(**{"data_root": str(root / "data"), "training.enabled": True,
                         "generation.shard_size": 1})
    path = root / "croco.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def _start(config: str, env: dict, log_dir: Path, name: str) -> Process:
    return start_croco(["run", config, "--until", "train"], env, log_dir, name)


def _run(config: str, env: dict, log_dir: Path, name: str) -> float:
    """The plain command to its end; returns its wall time (fails the test unless exit 0)."""
    done = _start(config, env, log_dir, name).wait(RERUN_BOUND_S)
    assert done.rc == 0 and not done.timed_out, done.output[-3000:]
    return done.seconds


def _wait_for(proc: Process, marker: str, timeout: float = 300) -> bool:
    """Until `marker` is in the run's output (True) or the run ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(marker in p.read_text(errors="replace") for p in (proc.out_path, proc.err_path)):
            return True
        if proc.proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def _leftovers(pgid: int, prefect_home: Path) -> list[str]:
    """Processes of the run still alive: its group, or anything using its Prefect home
    (the temporary API runs in a session of its own)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.pid) == pgid or p.environ().get("PREFECT_HOME") == str(prefect_home):
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(" ".join(p.info["cmdline"] or [])[:120])
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def _wait_gone(pgid: int, prefect_home: Path, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _leftovers(pgid, prefect_home)
        if not left:
            return []
        time.sleep(0.2)
    return _leftovers(pgid, prefect_home)


def _outputs(data: Path) -> dict:
    """Scores and pairs as sorted tables, the adapter's tensors, and duplicate counts."""
    from safetensors.torch import load_file

    def table(stage: str) -> pl.DataFrame:
        from croco import storage

        (key,) = [d for d in (data / stage).iterdir() if d.is_dir()]
        # every part, written or referenced in the stores (temporary files left out)
        return storage.read_parquet(str(key))

    scores = table("scores").sort("lang", "prompt_id", "sample_idx")
    pairs = table("pairs").sort(pl.all())
    (train_key,) = [d for d in (data / "training").iterdir() if (d / "_SUCCESS").exists()]
    adapter = load_file(str(train_key / "adapter" / "adapter_model.safetensors"))
    dupes = scores.height - scores.unique(["lang", "prompt_id", "sample_idx"]).height
    return {"scores": scores, "pairs": pairs, "adapter": adapter, "dupes": dupes}


def _assert_same(got: dict, ref: dict) -> None:
    import torch

    assert got["dupes"] == 0
    assert got["scores"].equals(ref["scores"])
    assert got["pairs"].equals(ref["pairs"])
    assert set(got["adapter"]) == set(ref["adapter"])
    for name, tensor in ref["adapter"].items():
        assert torch.equal(got["adapter"][name], tensor), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config_maker):
    """One uninterrupted run: the outputs every interrupted run must end up with."""
    root = tmp_path_factory.mktemp("reference")
    _run(_config(tiny_config_maker, root), croco_env(root / "prefect"), root, "reference")
    return _outputs(root / "data")


def _interrupt_trial(tmp_path, tiny_config_maker, reference, trial: int, how: str) -> dict:
    rng = random.Random(f"{SEED}-{how}-{trial}")
    stage = list(STAGE_MARKERS)[trial % len(STAGE_MARKERS)]
    delay = rng.uniform(0.0, 2.0)
    config = _config(tiny_config_maker, tmp_path)
    prefect_home = tmp_path / "prefect"
    env = croco_env(prefect_home)
    proc = _start(config, env, tmp_path, "interrupted")
    reached = _wait_for(proc, STAGE_MARKERS[stage])
    time.sleep(delay)
    t0 = time.monotonic()
    if proc.proc.poll() is not None:  # it finished before the chosen moment: nothing to stop
        pass
    elif how == "SIGKILL":
        proc.signal(signal.SIGKILL)
    elif how == "SIGINT":
        proc.signal(signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    # Not reaped: whatever of the run outlives it must be found below, not killed here.
    stopped = proc.wait(STOP_BOUND_S, reap=False)
    assert not stopped.timed_out, f"{how} during {stage}: still running after {STOP_BOUND_S:.0f} s"
    rc = stopped.rc
    stopped_in = time.monotonic() - t0
    left = _wait_gone(proc.pid, prefect_home)
    assert not left, f"{how} during {stage}: processes left behind: {left}"
    rerun_s = _run(config, env, tmp_path, "rerun")
    _assert_same(_outputs(tmp_path / "data"), reference)
    return {"stage": stage, "reached": reached, "rc": rc, "stopped_in": stopped_in,
            "rerun_s": rerun_s}


def pytest_generate_tests(metafunc):
    if "kill_trial" in metafunc.fixturenames:
        n = metafunc.config.getoption("--trials")
        metafunc.parametrize("kill_trial", range(n), ids=[f"trial{i}" for i in range(n)])


def test_kill_9_at_any_stage_then_a_plain_rerun_completes_with_identical_outputs(
        tmp_path, tiny_config_maker, reference, kill_trial):
    r = _interrupt_trial(tmp_path, tiny_config_maker, reference, kill_trial, "SIGKILL")
    assert r["rc"] == -signal.SIGKILL
    print(f"SIGKILL trial {kill_trial} during {r['stage']} (reached: {r['reached']}): "
          f"rerun {r['rerun_s']:.1f} s")


@pytest.mark.parametrize("how,trial", [("SIGINT", 1), ("SIGTERM", 2), ("SIGINT", 4)],
                         ids=["ctrl-c-generate", "sigterm-score", "ctrl-c-train"])
def test_ctrl_c_or_sigterm_stops_within_20_s_and_the_rerun_completes(
        tmp_path, tiny_config_maker, reference, how, trial):
    r = _interrupt_trial(tmp_path, tiny_config_maker, reference, trial, how)
    expected = 130 if how == "SIGINT" else 143
    if r["reached"]:
        assert r["rc"] == expected, r
    assert r["stopped_in"] < STOP_BOUND_S
    print(f"{how} during {r['stage']}: stopped in {r['stopped_in']:.1f} s (exit {r['rc']}), "
          f"rerun {r['rerun_s']:.1f} s")
