"""The Slurm worker without a cluster: what it submits (arguments, script, environment),
what it refuses, and how it reads Slurm's answers. tests/test_slurm.py runs it for real."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import pytest
from prefect.states import Cancelling, Pending, Running
from pydantic import ValidationError

from croco.workers.slurm import (
    JobStatus,
    SlurmJobConfiguration,
    crash_message,
    first_error_line,
    job_name,
    parse_sacct,
    parse_scontrol,
    parse_squeue,
    parse_tagged,
    run_job_id,
    unsubmitted_action,
)

REPO = Path(__file__).resolve().parents[1]


def _config(**fields) -> SlurmJobConfiguration:
    cfg = SlurmJobConfiguration(**fields)
    cfg._flow_run_id = "0b5c3c2e-0000-4000-8000-000000000001"
    cfg.name = job_name(cfg.name or "generate-en-0")
    return cfg


def test_every_resource_is_one_sbatch_argument():
    cfg = _config(partition="gpu", account="proj_465", qos="normal", time_limit="1-00:00:00",
                  nodes=2, gpus_per_node=8, cpus_per_task=32, mem="480G",
                  constraint="mi250x|a100", exclusive=True, signal_seconds=300,
                  extra_sbatch_options=["--mail-type=END"], log_dir="/scratch/logs")
    assert cfg.sbatch_args() == [
        "--parsable", "--job-name=generate-en-0", "--output=/scratch/logs/generate-en-0-%j.log",
        "--export=ALL", "--comment=prefect-flow-run:0b5c3c2e-0000-4000-8000-000000000001",
        "--partition=gpu", "--account=proj_465", "--qos=normal", "--time=1-00:00:00",
        "--cpus-per-task=32", "--mem=480G", "--constraint=mi250x|a100", "--nodes=2",
        "--gpus-per-node=8", "--exclusive", "--signal=B:TERM@300", "--mail-type=END"]


def test_a_gres_request_replaces_gpus_per_node():
    args = _config(gres="gpu:a100:2", signal_seconds=0).sbatch_args()
    assert "--gres=gpu:a100:2" in args
    assert not [a for a in args if a.startswith(("--gpus-per-node", "--signal"))]


@pytest.mark.parametrize("field,value", [
    ("partition", "debug; touch /tmp/x"),
    ("partition", "debug\n#SBATCH --uid=0"),
    ("account", "$(id)"),
    ("qos", "a b"),
    ("time_limit", "1h"),
    ("mem", "64G --uid=0"),
    ("constraint", "a;b"),
    ("gres", "gpu:1 --x"),
    ("log_dir", "/tmp/logs\nrm -rf /"),
])
def test_a_value_with_shell_or_option_syntax_is_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        SlurmJobConfiguration(**{field: value})


@pytest.mark.parametrize("option", ["--export=NONE", "--wrap=id", "-o/tmp/x", "mail-type=END",
                                    "--mail-type=END\n--uid=0"])
def test_an_extra_option_that_the_worker_sets_or_that_is_not_one_option_is_refused(option):
    with pytest.raises(ValidationError, match="extra_sbatch_options"):
        SlurmJobConfiguration(extra_sbatch_options=[option])


def test_gres_and_gpus_per_node_together_are_refused():
    with pytest.raises(ValidationError, match="gres and gpus_per_node"):
        SlurmJobConfiguration(gres="gpu:2", gpus_per_node=2)


@pytest.mark.parametrize("name,expected", [
    ("generate-de-1", "generate-de-1"),
    ("probe-$(touch /tmp/x);rm", "probe--touch-tmp-x-rm"),  # each run of others: one -
    ("a\nb", "a-b"),
    ("", "prefect-flow-run"),
])
def test_job_names_keep_only_safe_characters(name, expected):
    assert job_name(name) == expected


def test_the_command_is_quoted_and_wrapped_in_the_container():
    cfg = _config(command="prefect flow-run execute", container_image="/shared/croco.sif",
                  container_gpu_flag="--rocm", container_binds=["/scratch", "/data:/data:ro"])
    assert cfg.script().splitlines()[-1] == (
        "exec apptainer exec --rocm --bind /scratch,/data:/data:ro /shared/croco.sif "
        "prefect flow-run execute")


def test_the_script_runs_the_prelude_then_execs_the_command(tmp_path):
    cfg = _config(prelude='export HF_HOME=/scratch/hf', command="bash -c 'echo $HF_HOME'")
    out = subprocess.run(["bash", "-c", cfg.script()], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "/scratch/hf"


@pytest.mark.parametrize("gpu_env,expected", [
    ("rocm", "HIP=2,3 ROCR= CUDA=2,3"),
    ("cuda", "HIP= ROCR=2,3 CUDA=2,3"),
])
def test_rocm_jobs_see_slurms_gpus_as_hip_visible_devices(gpu_env, expected):
    cfg = _config(gpu_env=gpu_env, command="bash -c 'echo HIP=${HIP_VISIBLE_DEVICES:-} "
                  "ROCR=${ROCR_VISIBLE_DEVICES:-} CUDA=${CUDA_VISIBLE_DEVICES:-}'")
    out = subprocess.run(["bash", "-c", cfg.script()], capture_output=True, text=True, env={
        "PATH": "/usr/bin:/bin", "ROCR_VISIBLE_DEVICES": "2,3", "CUDA_VISIBLE_DEVICES": "2,3"})
    assert out.stdout.splitlines()[-1] == expected, out.stderr


def test_secrets_travel_in_the_environment_not_the_script():
    cfg = _config(env={"PREFECT__FLOW_RUN_ID": "abc", "HF_TOKEN": "hf-very-secret"})
    env = cfg.submit_env({"AWS_SECRET_ACCESS_KEY": "aws-very-secret", "SLURM_JOB_ID": "9",
                          "SBATCH_PARTITION": "other", "PATH": "/bin"})
    assert env == {"AWS_SECRET_ACCESS_KEY": "aws-very-secret", "PATH": "/bin",
                   "PREFECT__FLOW_RUN_ID": "abc", "HF_TOKEN": "hf-very-secret"}
    text = cfg.script() + " ".join(cfg.sbatch_args())
    assert "very-secret" not in text


def test_squeue_sacct_and_scontrol_answers_are_read():
    assert parse_squeue("12|RUNNING|None\n13|PENDING|Resources\n") == {
        "12": JobStatus("12", "RUNNING", "None"), "13": JobStatus("13", "PENDING", "Resources")}
    assert parse_sacct("14|TIMEOUT|0:0|None\n15|CANCELLED by 0|0:15|None\n") == {
        "14": JobStatus("14", "TIMEOUT", "None", "0:0"),
        "15": JobStatus("15", "CANCELLED by 0", "None", "0:15")}
    assert parse_scontrol("JobId=16 JobName=score-en-0 JobState=OUT_OF_MEMORY "
                          "Reason=OutOfMemory Dependency=(null) ExitCode=0:125") == \
        JobStatus("16", "OUT_OF_MEMORY", "OutOfMemory", "0:125")


def test_which_job_states_are_still_in_slurms_hands():
    assert [s for s in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "COMPLETED", "TIMEOUT",
                        "CANCELLED by 0", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
            if JobStatus("1", s).active] == ["PENDING", "RUNNING", "COMPLETING", "REQUEUED"]


def test_a_crash_message_gives_slurms_state_reason_exit_and_the_log():
    status = JobStatus("14", "NODE_FAIL", "NodeDown", "0:0")
    assert crash_message("14", "train-dpo", status, "/logs/train-dpo-14.log") == (
        "Slurm job 14 (train-dpo) ended NODE_FAIL (reason NodeDown, exit 0:0) before its "
        "flow run finished; its output: /logs/train-dpo-14.log")


def test_sbatchs_reason_is_its_last_error_line():
    stderr = ("sbatch: error: invalid partition specified: nope\n"
              "sbatch: error: Batch job submission failed: Invalid partition name specified\n")
    assert first_error_line(stderr) == \
        "sbatch: error: Batch job submission failed: Invalid partition name specified"


def test_the_pools_template_builds_a_job_with_the_stage_deployments_resources():
    import yaml

    template = json.loads((REPO / "infra/work-pools/slurm.json").read_text())
    spec = yaml.safe_load((REPO / "infra/prefect.yaml").read_text())
    stages = [d for d in spec["deployments"] if d["work_pool"]["name"] == "croco-slurm"]
    assert sorted(d["entrypoint"].split(":")[1] for d in stages) == [
        "croco_evaluate", "croco_generate", "croco_score", "croco_train"]
    import anyio

    for dep in stages:
        cfg = anyio.run(lambda: SlurmJobConfiguration.from_template_and_values(
            template, dep["work_pool"]["job_variables"], client=object()))
        assert cfg.gpus_per_node == 1 and cfg.time_limit, dep["name"]


def test_the_slurm_pipeline_names_the_slurm_stage_deployments():
    import yaml

    spec = yaml.safe_load((REPO / "infra/prefect.yaml").read_text())
    (pipeline,) = [d for d in spec["deployments"] if d["name"] == "slurm"
                   and d["entrypoint"].endswith("croco_pipeline")]
    deployed = {f"{d['entrypoint'].split(':')[1].replace('_', '-')}/{d['name']}"
                for d in spec["deployments"]}
    overrides = " ".join(pipeline["parameters"]["overrides"])
    for stage in ("generate", "score", "train", "evaluate"):
        assert f"{stage}: croco-{stage}/slurm" in overrides
        assert f"croco-{stage}/slurm" in deployed
    assert "orchestration.gpu_limit=local" in pipeline["parameters"]["overrides"]


def test_the_worker_type_is_registered_with_prefect():
    from prefect.workers.base import BaseWorker

    worker = BaseWorker.get_worker_class_from_type("slurm")
    assert worker is not None and worker.__module__ == "croco.workers.slurm"


def test_a_job_is_found_by_the_flow_run_its_comment_names_the_queued_one_first():
    text = ("30|COMPLETED|prefect-flow-run:run-a\n"
            "31|PENDING|prefect-flow-run:run-a\n"
            "32|FAILED|prefect-flow-run:run-b\n"
            "33|RUNNING|someone else's job\n")
    assert parse_tagged(text) == {"run-a": "31", "run-b": "32"}


def _run(state, age_seconds: float, labels=None, infrastructure_pid=None):
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun

    state.timestamp = NOW - datetime.timedelta(seconds=age_seconds)
    return FlowRun(flow_id=uuid4(), state=state, labels=labels or {},
                   infrastructure_pid=infrastructure_pid)


NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize("state,age,labels,pid,expected", [
    (Pending(), 301, {}, None, "resubmit"),
    (Pending(name="Submitting"), 301, {}, None, "resubmit"),
    (Pending(), 299, {}, None, None),                           # still within the bound
    (Pending(), 301, {"slurm.job-id": "41"}, None, None),       # submitted: labelled
    (Pending(), 301, {}, "41", None),                           # submitted: its pid
    (Pending(), 301, {"slurm.resubmissions": 1}, None, "crash"),  # stuck a second time
    (Running(), 3600, {}, None, None),                          # its engine reports
    (Cancelling(), 301, {}, None, "cancel"),
])
def test_a_pool_run_without_a_job_is_resubmitted_once_after_the_bound(state, age, labels,
                                                                       pid, expected):
    assert unsubmitted_action(_run(state, age, labels, pid), NOW, 300) == expected


def test_a_run_is_followed_by_its_job_id_label_when_its_pid_was_not_recorded():
    assert run_job_id(_run(Running(), 0, {"slurm.job-id": "42"})) == "42"
    assert run_job_id(_run(Running(), 0, {}, "43")) == "43"
    assert run_job_id(_run(Running(), 0, {}, "1234-not-slurm")) is None


def test_a_job_is_not_taken_for_ended_when_slurmctld_does_not_answer(monkeypatch):
    import croco.workers.slurm as slurm

    def fake(args, **_):
        if args[0] == "squeue":
            return subprocess.CompletedProcess(args, 1, "", "slurm_load_jobs error: "
                                               "Invalid job id specified")
        if args[0] == "sacct":
            return subprocess.CompletedProcess(args, 1, "", "sacct: error: slurmdbd: "
                                               "Connection refused")
        return subprocess.CompletedProcess(args, 1, "", "slurm_load_jobs error: Socket "
                                           "timed out on send/recv operation")

    monkeypatch.setattr(slurm, "_slurm", fake)
    with pytest.raises(slurm.SlurmError, match="Socket timed out"):
        slurm.job_statuses(["44"])


def test_a_job_unknown_to_squeue_sacct_and_scontrol_has_ended(monkeypatch):
    import croco.workers.slurm as slurm

    def fake(args, **_):
        return subprocess.CompletedProcess(args, 1, "", "slurm_load_jobs error: Invalid job "
                                           "id specified")

    monkeypatch.setattr(slurm, "_slurm", fake)
    assert slurm.job_statuses(["45"])["45"].state == "UNKNOWN"
