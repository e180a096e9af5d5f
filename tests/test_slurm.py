"""The `slurm` worker on a real Slurm cluster: one node on localhost with two fake GPUs
(infra/slurm/start-cluster.sh, run by this module as root), a real Prefect server on
loopback, a process worker for the pipeline and a slurm worker for the GPU stages.

One cluster, one server and one pipeline run are shared by the module. The pipeline run
(2 languages x 2 shard groups, training and evaluation) has its Slurm worker killed with
SIGKILL while stage jobs are queued or running, and a new one started; several tests read
that run. The others use a small probe flow (tests/slurm_flows.py) on the same pool.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
import yaml

from tests.test_deployments import PY, REPO, Stack
from tests.test_deployments import _reference_stages as reference_stages

pytestmark = pytest.mark.slow

# The worker's bound for a Pending run without a job. A resubmitted run is Pending again
# while its worker calls sbatch; with a bound of 20 s, a loaded 2-core machine (load
# average above 4) once crashed the resubmitted run as stuck a second time.
UNSUBMITTED_SECONDS = 45
SECRETS = {"HF_TOKEN": "hf-secret-token-27182818", "AWS_SECRET_ACCESS_KEY": "aws-secret-31415926"}


def _cluster_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster needs root (it installs Debian packages and starts daemons)"
    if not shutil.which("apt-get") and not shutil.which("sbatch"):
        return "no apt-get and no Slurm: cannot bring up the test cluster"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _cluster_unavailable()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "SLURM_FAKE_GPUS": "2",
           "SLURM_NODE_CPUS": "8", "SLURM_CLEAN": "1"}
    t0 = time.time()
    res = subprocess.run(["bash", str(REPO / "infra/slurm/start-cluster.sh")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"cluster up in {time.time() - t0:.1f}s")
    yield
    subprocess.run(["scancel", "--me"], capture_output=True)


def _api(stack: Stack, method: str, path: str, body: dict | None = None):
    return stack.request(method, path, body)


def _flow_run(stack: Stack, run_id: str) -> dict:
    return _api(stack, "GET", f"/flow_runs/{run_id}")


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _squeue() -> dict[str, dict]:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%j|%k|%r"], capture_output=True,
                         text=True).stdout
    jobs = {}
    for line in out.splitlines():
        i, st, name, comment, reason = line.split("|")
        jobs[i] = {"state": st, "name": name, "comment": comment, "reason": reason}
    return jobs


def _sacct(job_ids: list[str] | None = None, since: str = "now-2hours",
           submitted_since: str | None = None) -> list[dict]:
    """Jobs from accounting; the cluster's database outlives a test session (`since`), and
    job ids start again at 1 with each clean cluster, so a job of an earlier session may
    have the id of one of this session: `submitted_since` (sacct's local time) tells them
    apart."""
    args = ["sacct", "-X", "-n", "-P", "-a", "-S", since,
            "-o", "JobIDRaw,JobName,State,AllocTRES,Submit"]
    if job_ids:
        args += ["-j", ",".join(job_ids)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    jobs = [dict(zip(("id", "name", "state", "tres", "submit"), ln.split("|")))
            for ln in out.splitlines() if ln]
    return [j for j in jobs if submitted_since is None or j["submit"] >= submitted_since]


def _start_slurm_worker(stack: Stack, name: str) -> subprocess.Popen:
    return stack.start(name, [PY, "-m", "prefect", "worker", "start", "--pool", "croco-slurm",
                              "--type", "slurm", "--name", name])


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    from tests.conftest import _free_port

    home = tmp_path_factory.mktemp("prefect-home")
    s = Stack(home, _free_port())
    s.env["PATH"] = f"{Path(PY).parent}:{s.env['PATH']}"  # jobs run `prefect flow-run execute`
    s.env["CROCO_SLURM_RECONCILE_SECONDS"] = "2"
    s.env["CROCO_SLURM_UNSUBMITTED_SECONDS"] = str(UNSUBMITTED_SECONDS)
    s.env.update(SECRETS)
    s.logdir = home / "slurm-logs"
    try:
        s.start("server", [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                           "--port", str(s.port)])
        s.wait_healthy()
        for pool in ("croco-cpu", "croco-gpu"):  # `croco deploy` deploys to them too
            s.cli(PY, "-m", "prefect", "work-pool", "create", pool, "--type", "process",
                  "--overwrite")
        # The pool's template for this machine: logs in the test's home, 1 CPU per job.
        template = json.loads((REPO / "infra/work-pools/slurm.json").read_text())
        template["variables"]["properties"]["log_dir"]["default"] = str(s.logdir)
        (home / "slurm.json").write_text(json.dumps(template))
        s.cli(PY, "-m", "prefect", "work-pool", "create", "croco-slurm", "--type", "slurm",
              "--base-job-template", str(home / "slurm.json"), "--overwrite")
        res = s.cli(PY, "-m", "croco.flows.cli", "deploy", timeout=600)
        assert "croco-pipeline/slurm" in res.stdout + res.stderr
        s.cli(PY, "-c", "from tests.slurm_flows import probe; probe.from_source("
              f"source={str(REPO)!r}, entrypoint='tests/slurm_flows.py:probe').deploy("
              "name='probe', work_pool_name='croco-slurm')", timeout=300)
        s.probe_id = _api(s, "GET", "/deployments/name/croco-slurm-probe/probe")["id"]
        s.start("worker-cpu", [PY, "-m", "prefect", "worker", "start", "--pool", "croco-cpu",
                               "--type", "process", "--limit", "4"])
        s.slurm_worker = _start_slurm_worker(s, "slurm-1")
        yield s
    finally:
        s.stop()


def _probe(stack: Stack, tag: str, job_variables: dict | None = None, *,
           state: dict | None = None, labels: dict | None = None, **params) -> str:
    """A probe flow run named `probe-<tag>` from the start (its Slurm job's name too)."""
    body = {"name": f"probe-{tag}", "parameters": {"tag": tag, **params},
            "job_variables": job_variables or {}, "labels": labels or {},
            # a retried request (503) must not make a second run
            "idempotency_key": f"probe-{tag}-{uuid.uuid4()}"}
    if state:
        body["state"] = state
    return _api(stack, "POST", f"/deployments/{stack.probe_id}/create_flow_run", body)["id"]


def _job_of(stack: Stack, run_id: str, timeout: float = 60) -> str:
    return _wait(lambda: (_flow_run(stack, run_id).get("labels") or {}).get("slurm.job-id"),
                 timeout, f"a Slurm job for flow run {run_id}")


@pytest.fixture(scope="module")
def time_limited(stack):
    """A probe that outlives its 1-minute time limit (Slurm's smallest), started early so
    the wait overlaps the other tests."""
    return _probe(stack, "time-limit", {"time_limit": "1", "signal_seconds": 0},
                  seconds=600)


@pytest.fixture(scope="module")
def unsubmitted(stack):
    """Probe flow runs as a worker killed between marking them Pending and sbatch leaves
    them: one never submitted, one never submitted a second time, one whose job was queued
    (its comment names the run) but not recorded. Started early, so the worker's bound
    (UNSUBMITTED_SECONDS) passes while other tests run."""
    pending = {"type": "PENDING", "name": "Submitting"}
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    runs = {"never": _probe(stack, "never-submitted", state=pending, seconds=1),
            "again": _probe(stack, "stuck-again", state=pending, seconds=1,
                            labels={"slurm.resubmissions": 1}),
            "unrecorded": _probe(stack, "unrecorded", state=pending, seconds=15)}
    env = {**stack.env, "PREFECT__FLOW_RUN_ID": runs["unrecorded"]}
    stack.logdir.mkdir(exist_ok=True)  # Slurm fails a job whose output it cannot open
    res = subprocess.run(
        ["sbatch", "--parsable", "--job-name=probe-unrecorded", "--export=ALL",
         f"--output={stack.logdir}/probe-unrecorded-%j.log",
         f"--comment=prefect-flow-run:{runs['unrecorded']}",
         "--wrap=exec prefect flow-run execute"],
        env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return {**runs, "unrecorded-job": res.stdout.strip(), "since": since}


# ------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def pipeline(stack, time_limited, unsubmitted, tiny_config_maker, tmp_path_factory):
    """`croco-pipeline/slurm`: 2 languages x 2 shard groups, train and evaluate. Once its
    first stage job is in Slurm's queue the slurm worker is SIGKILLed and a new one starts."""
    base = tmp_path_factory.mktemp("slurm-run")
    cfg = tiny_config_maker(**{"data_root": str(base / "data"), "languages": ["en", "de"],
                               "training.enabled": True, "evaluation.judge.enabled": False})
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    def stage_jobs():  # the probes of other tests run meanwhile
        return {i for i, j in _squeue().items() if not j["name"].startswith("probe-")}

    before = stage_jobs()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    proc = subprocess.Popen(
        [PY, "-m", "croco.flows.cli", "run", "--deployment", "croco-pipeline/slurm",
         "--set", "orchestration.shards_per_language=2", str(path), "--run-id", "on-slurm"],
        env=stack.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(lambda: stage_jobs() - before, 300, "the first stage job")
    os.killpg(stack.slurm_worker.pid, signal.SIGKILL)
    stack.slurm_worker.wait()
    stack.slurm_worker = _start_slurm_worker(stack, "slurm-2")
    out, _ = proc.communicate(timeout=900)
    return {"rc": proc.returncode, "out": out, "cfg": cfg, "base": base, "started": started}


def _stage_runs(stack: Stack) -> list[dict]:
    names = {f["id"]: f["name"] for f in _api(stack, "POST", "/flows/filter", {})}
    return [dict(r, flow=names[r["flow_id"]]) for r in _api(stack, "POST", "/flow_runs/filter", {})
            if names[r["flow_id"]] in ("croco-generate", "croco-score", "croco-train",
                                       "croco-evaluate")
            and (r.get("labels") or {}).get("prefect.work-pool.name") == "croco-slurm"]


def test_the_pipeline_completes_with_its_gpu_stages_on_slurm(stack, pipeline):
    assert pipeline["rc"] == 0, pipeline["out"][-4000:] + stack.tail()
    runs = _stage_runs(stack)
    counts = {}
    for r in runs:
        counts[r["flow"]] = counts.get(r["flow"], 0) + 1
    # 2 languages x 2 shard groups for generate and score, one variant, one evaluation.
    assert counts == {"croco-generate": 4, "croco-score": 4, "croco-train": 1,
                      "croco-evaluate": 1}, counts
    assert {r["state_type"] for r in runs} == {"COMPLETED"}


def test_every_gpu_stage_run_was_its_own_slurm_job_with_a_gpu(stack, pipeline):
    runs = _stage_runs(stack)
    jobs = {r["name"]: r["labels"]["slurm.job-id"] for r in runs}
    assert len(set(jobs.values())) == len(runs) == 10, jobs
    accounted = {j["id"]: j for j in _sacct(list(jobs.values()))}
    for name, job_id in jobs.items():
        assert accounted[job_id]["name"] == name, accounted[job_id]
        assert accounted[job_id]["state"] == "COMPLETED", accounted[job_id]
        assert "gres/gpu=1" in accounted[job_id]["tres"], accounted[job_id]


def test_a_worker_killed_mid_run_submits_no_job_twice(stack, pipeline):
    runs = _stage_runs(stack)
    names = [j["name"] for j in _sacct(since=pipeline["started"]) if j["name"].startswith(
        ("generate-", "score-", "train-", "evaluate-"))]
    assert sorted(names) == sorted(r["name"] for r in runs), names
    assert len(names) == len(set(names)) == 10, names


def test_scores_and_pairs_on_slurm_equal_the_in_process_run(pipeline):
    from croco import storage

    cfg, base = pipeline["cfg"], pipeline["base"]
    manifest = json.loads((Path(cfg.data_root) / "runs/on-slurm/manifest.json").read_text())
    local = cfg.model_copy(update={"data_root": str(base / "local")})
    ref = reference_stages(local, local.data_root)
    for lang in ("en", "de"):
        entry = manifest["outputs"]["scores"][lang]
        got = Path(cfg.data_root) / "scores" / entry["key"] / f"lang={lang}"
        parts = storage.parquet_files(str(got))  # written or referenced, in part order
        want = storage.parquet_files(ref["scores"][lang])
        assert len(parts) == len(want) == 2, parts
        for part, other in zip(parts, want, strict=True):
            assert storage.read_bytes(part) == storage.read_bytes(other), (lang, part)
    pairs = manifest["outputs"]["pairs"]
    assert pairs["key"] == Path(ref["pairs"]).name
    for table in ("dpo/lang=en", "dpo/lang=de"):
        assert (Path(cfg.data_root) / "pairs" / pairs["key"] / table / "data.parquet"
                ).read_bytes() == storage.read_bytes(storage.join(ref["pairs"], table,
                                                                  "data.parquet")), table


# ------------------------------------------------------------------ cancel and crash


def test_cancel_of_a_running_job_ends_it_and_the_run_is_cancelled(stack):
    run_id = _probe(stack, "cancel-running", {"gpus_per_node": 1}, seconds=300)
    job = _job_of(stack, run_id)
    _wait(lambda: _flow_run(stack, run_id)["state_type"] == "RUNNING", 120, "RUNNING")
    t0 = time.time()
    _api(stack, "POST", f"/flow_runs/{run_id}/set_state",
         {"state": {"type": "CANCELLING"}, "force": True})
    _wait(lambda: job not in _squeue(), 30, f"job {job} to leave the queue")
    print(f"cancel of a running job: gone after {time.time() - t0:.1f}s")
    _wait(lambda: _flow_run(stack, run_id)["state_type"] == "CANCELLED", 30, "CANCELLED")


def test_cancel_of_a_queued_job_removes_it(stack):
    holders = [_probe(stack, f"hold-{i}", {"gpus_per_node": 1}, seconds=300) for i in (0, 1)]
    held = [_job_of(stack, h) for h in holders]
    _wait(lambda: all(_squeue().get(j, {}).get("state") == "RUNNING" for j in held), 60,
          "both GPUs taken")
    queued = _probe(stack, "queued", {"gpus_per_node": 1}, seconds=1)
    job = _job_of(stack, queued)
    assert _squeue()[job]["state"] == "PENDING"
    _api(stack, "POST", f"/flow_runs/{queued}/set_state",
         {"state": {"type": "CANCELLING"}, "force": True})
    _wait(lambda: job not in _squeue(), 30, f"queued job {job} removed")
    _wait(lambda: _flow_run(stack, queued)["state_type"] == "CANCELLED", 30, "CANCELLED")
    assert _sacct([job])[0]["state"].startswith("CANCELLED")
    for h in holders:
        _api(stack, "POST", f"/flow_runs/{h}/set_state",
             {"state": {"type": "CANCELLING"}, "force": True})


def test_a_scancelled_stage_job_crashes_its_run_and_the_rerun_completes(stack, pipeline,
                                                                          tmp_path):
    cfg = pipeline["cfg"].model_copy(update={"data_root": str(tmp_path / "data")})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [PY, "-m", "croco.flows.cli", "run", "--deployment", "croco-pipeline/slurm",
           "--set", "orchestration.shards_per_language=2", "--set", "languages=[en]",
           str(path), "--stages", "prompts,generate,score"]
    proc = subprocess.Popen(cmd, env=stack.env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    victim = _wait(lambda: next((i for i, j in _squeue().items()
                                 if j["name"].startswith("score-en") and j["state"] == "RUNNING"),
                                None), 300, "a running score job")
    subprocess.run(["scancel", victim], check=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    crashed = [r for r in _stage_runs(stack) if r["labels"].get("slurm.job-id") == victim]
    assert "score-en" in out and "CRASHED" in out, out[-3000:]
    message = _wait(lambda: _slurm_message(stack, crashed[0]["id"]), 30, "Slurm's reason")
    assert f"Slurm job {victim}" in message and "CANCELLED" in message, message
    # The failed pipeline leaves its other stage jobs running; the rerun reuses their shards.
    _wait(lambda: not [j for j in _squeue().values()
                       if j["name"].startswith(("generate-", "score-"))], 120,
          "the first run's other stage jobs to end")
    rerun_started = time.strftime("%Y-%m-%dT%H:%M:%S")
    rerun = subprocess.run(cmd, env=stack.env, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    new = [j for j in _sacct(submitted_since=rerun_started)
           if j["name"].startswith(("generate-", "score-"))]
    # Only the killed shard group runs again: generate and the other score group were done.
    assert [j["name"] for j in new] == [_flow_run(stack, crashed[0]["id"])["name"]], new


def _slurm_message(stack: Stack, run_id: str) -> str | None:
    """The flow run's message once it is Crashed with Slurm's account of its job."""
    run = _flow_run(stack, run_id)
    msg = run["state"]["message"] or ""
    return msg if run["state_type"] == "CRASHED" and "Slurm job" in msg else None


def test_a_job_killed_by_its_time_limit_crashes_its_run_with_the_reason(stack, time_limited):
    message = _wait(lambda: _slurm_message(stack, time_limited), 240, "the time limit")
    assert "TIMEOUT" in message, message


# ------------------------------------------------------------ submission and security


def _crash_message(stack: Stack, run_id: str) -> str:
    def done():
        run = _flow_run(stack, run_id)
        return run["state"]["message"] if run["state_type"] == "CRASHED" else None
    return _wait(done, 60, f"flow run {run_id} to crash")


def test_an_unknown_partition_fails_at_submission_with_slurms_reason(stack):
    message = _crash_message(stack, _probe(stack, "bad-partition", {"partition": "nope"}))
    assert "Invalid partition name specified" in message, message


def test_more_gpus_than_the_node_has_fail_at_submission_with_slurms_reason(stack):
    message = _crash_message(stack, _probe(stack, "three-gpus", {"gpus_per_node": 3}))
    assert "Requested node configuration is not available" in message, message


def test_a_partition_with_shell_code_submits_nothing_and_runs_nothing(stack, tmp_path):
    marker = tmp_path / "injected"
    bad = {"partition": f"debug; touch {marker}"}
    try:
        run_id = _probe(stack, "inject", bad)
    except urllib.error.HTTPError as e:  # the server checks the pool's schema first
        assert e.code in (409, 422), e
        run_id = None
    if run_id:
        assert "partition" in _crash_message(stack, run_id)
    jobs = _sacct(since="now-10minutes") + [dict(name=j["name"]) for j in _squeue().values()]
    assert not [j for j in jobs if j["name"] == "probe-inject"], jobs
    if run_id:
        assert "slurm.job-id" not in (_flow_run(stack, run_id).get("labels") or {})
    time.sleep(2)
    assert not marker.exists()


def test_shell_code_in_a_parameter_reaches_the_job_only_as_a_safe_name(stack, tmp_path):
    marker = tmp_path / "injected"
    run_id = _probe(stack, f"$(touch {marker});touch {marker}", report=str(tmp_path / "r.json"))
    _wait(lambda: _flow_run(stack, run_id)["state_type"] == "COMPLETED", 120, "COMPLETED")
    assert not marker.exists()
    assert (tmp_path / "r.json").exists()
    name = _flow_run(stack, run_id)["labels"]["slurm.job-name"]
    assert name.startswith("probe--touch-") and set(name) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"), name


def test_secrets_reach_the_job_but_not_its_script_or_log(stack, tmp_path):
    import hashlib

    report = tmp_path / "seen.json"
    run_id = _probe(stack, "secrets", report=str(report), secret_names=sorted(SECRETS))
    job = _job_of(stack, run_id)
    _wait(lambda: _flow_run(stack, run_id)["state_type"] == "COMPLETED", 120, "COMPLETED")
    seen = json.loads(report.read_text())
    assert seen["sha256"] == {k: hashlib.sha256(v.encode()).hexdigest()
                              for k, v in sorted(SECRETS.items())}
    script = subprocess.run(["scontrol", "write", "batch_script", job, "-"],
                            capture_output=True, text=True, check=True).stdout
    log = Path(_flow_run(stack, run_id)["labels"]["slurm.log"]).read_text()
    assert "prefect flow-run execute" in script and "slurm job" in log
    for value in SECRETS.values():
        assert value not in script and value not in log


# ------------------------------------------------- runs a killed worker left without a job


def _final(stack: Stack, run_id: str, timeout: float) -> dict:
    return _wait(lambda: (lambda r: r if r["state_type"] in (
        "COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None)(_flow_run(stack, run_id)),
        timeout, f"flow run {run_id} to finish")


def test_a_pending_run_never_submitted_is_submitted_once_and_completes(stack, unsubmitted):
    run = _final(stack, unsubmitted["never"], UNSUBMITTED_SECONDS + 120)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["labels"]["slurm.resubmissions"] == 1, run["labels"]
    jobs = [j for j in _sacct(submitted_since=unsubmitted["since"])
            if j["name"] == "probe-never-submitted"]
    assert [j["id"] for j in jobs] == [run["labels"]["slurm.job-id"]], jobs


def test_a_pending_run_stuck_after_its_resubmission_is_crashed(stack, unsubmitted):
    run = _final(stack, unsubmitted["again"], UNSUBMITTED_SECONDS + 60)
    assert run["state_type"] == "CRASHED", run["state"]
    assert run["state"]["message"].startswith("No Slurm job "), run["state"]["message"]
    assert "slurm.job-id" not in run["labels"], run["labels"]


def test_a_job_queued_but_not_recorded_is_adopted_not_submitted_again(stack, unsubmitted):
    run = _final(stack, unsubmitted["unrecorded"], 180)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["labels"]["slurm.job-id"] == unsubmitted["unrecorded-job"], run["labels"]
    assert "slurm.resubmissions" not in run["labels"], run["labels"]
    jobs = [j for j in _sacct(submitted_since=unsubmitted["since"])
            if j["name"] == "probe-unrecorded"]
    assert [j["id"] for j in jobs] == [unsubmitted["unrecorded-job"]], jobs
