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
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psutil
import pytest

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


def _croco() -> str:
    return str(Path(sys.executable).with_name("croco"))


def _config(tiny_config_maker, root: Path) -> str:
    import yaml

    cfg = tiny_config_maker(**{"data_root": str(root / "data"), "training.enabled": True,
                         "generation.shard_size": 1})
    path = root / "croco.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def _env(prefect_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return env


def _start(config: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([_croco(), "run", config, "--until", "train"], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _run(config: str, env: dict, log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    proc = _start(config, env, log)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"croco run did not finish within {timeout:.0f} s; log: {log.read_text()[-3000:]}")
    return rc, time.monotonic() - t0


def _wait_for(proc: subprocess.Popen, log: Path, marker: str, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in log.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
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
        (key,) = [d for d in (data / stage).iterdir() if d.is_dir()]
        files = sorted(p for p in key.rglob("*.parquet") if ".tmp-" not in p.name)
        return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")

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
    config = _config(tiny_config_maker, root)
    rc, _ = _run(config, _env(root / "prefect"), root / "log.txt", RERUN_BOUND_S)
    assert rc == 0, (root / "log.txt").read_text()[-3000:]
    return _outputs(root / "data")


def _interrupt_trial(tmp_path, tiny_config_maker, reference, trial: int, how: str) -> dict:
    rng = random.Random(f"{SEED}-{how}-{trial}")
    stage = list(STAGE_MARKERS)[trial % len(STAGE_MARKERS)]
    delay = rng.uniform(0.0, 2.0)
    config = _config(tiny_config_maker, tmp_path)
    prefect_home = tmp_path / "prefect"
    env = _env(prefect_home)
    log = tmp_path / "interrupted.txt"
    proc = _start(config, env, log)
    reached = _wait_for(proc, log, STAGE_MARKERS[stage])
    time.sleep(delay)
    t0 = time.monotonic()
    if proc.poll() is not None:  # it finished before the chosen moment: nothing to stop
        pass
    elif how == "SIGKILL":
        os.killpg(proc.pid, signal.SIGKILL)
    elif how == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        rc = proc.wait(STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{how} during {stage}: still running after {STOP_BOUND_S:.0f} s")
    stopped_in = time.monotonic() - t0
    left = _wait_gone(proc.pid, prefect_home)
    assert not left, f"{how} during {stage}: processes left behind: {left}"
    rc2, rerun_s = _run(config, env, tmp_path / "rerun.txt", RERUN_BOUND_S)
    assert rc2 == 0, (tmp_path / "rerun.txt").read_text()[-3000:]
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
