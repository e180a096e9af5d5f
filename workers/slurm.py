"""A Prefect worker type `slurm`: every flow run of its work pool becomes one `sbatch` job
whose body is `prefect flow-run execute`.

    prefect worker start --pool croco-slurm --type slurm

It drives Slurm through its commands only (`sbatch`, `squeue`, `scancel`, `sacct`,
`scontrol`; Slurm 22.05 and later, no slurmrestd), so it runs on a login node.

The contract, for one flow run:

1. Submission. The job template's variables (partition, account, qos, time limit, nodes,
   GPUs, CPUs, memory, constraint, exclusive, extra `#SBATCH` options, a prelude, a
   container wrapper, the log folder) are validated, then passed to `sbatch` as separate
   arguments, never through a shell. The job script holds fixed text, the prelude, and the
   quoted command; nothing from a flow run's parameters (they reach the job only as the
   flow run's name, which is sanitised into the job name). A job already in the queue for
   the same flow run (its `--comment` is `prefect-flow-run:<id>`) is adopted, not
   submitted again. `sbatch`'s refusal fails the submission with Slurm's own one-line
   reason in the flow run's Crashed state.
2. Environment. The job gets the worker's environment plus the flow run's (Prefect's
   settings, `PREFECT__FLOW_RUN_ID`, the job template's `env`) through `sbatch
   --export=ALL`: values travel from this process's environment to slurmctld, never
   through the script or a file, so a secret (S3 keys, `HF_TOKEN`) is in neither the job
   script nor its log. Variables named `SLURM_*`/`SBATCH_*`/`SALLOC_*` of the worker's
   own environment are dropped, so a worker that itself runs inside a Slurm job does not
   pass that job's settings on.
3. Identity. The job id is the flow run's `infrastructure_pid` and the flow run's labels
   `slurm.job-id`, `slurm.job-name` and `slurm.log` (the job's output file).
4. Reconciliation. `run()` returns once the job is queued; a loop (every
   `CROCO_SLURM_RECONCILE_SECONDS`, default 10 s) compares the pool's unfinished flow runs
   with `squeue` and, for jobs that left the queue, `sacct` (or `scontrol` when
   accounting is off). A job that ended while its flow run had not (scancel, time limit,
   OOM, node failure, preemption) marks the flow run Crashed with Slurm's state, reason
   and exit code, and the last lines of the job's output go to the flow run's logs. A
   flow run the job's own engine already marked Crashed on SIGTERM gets Slurm's state
   added to its message. The loop reads everything from the Prefect API and Slurm, so a
   restarted worker picks up every job it had submitted.
5. Cancellation. A flow run cancelled while its job is queued: the job is `scancel`led
   (`kill_infrastructure`, and the loop as a fallback) and the run marked Cancelled. While
   the job runs, the engine inside it sees the cancellation and ends the run; a job still
   there `CANCEL_GRACE_SECONDS` later is `scancel`led.
6. Runs left without a job. Prefect's worker marks a flow run Pending before `run()`
   submits it; a worker killed in between leaves it Pending with no job, which no worker
   picks up again. The loop (of any worker of the pool) looks at the pool's flow runs
   that have no job id: one with a job in `squeue` whose comment names it (the worker
   died after `sbatch`) is adopted (job id and labels written, then followed as above).
   One Pending for longer than `CROCO_SLURM_UNSUBMITTED_SECONDS` (default 300 s, well
   above the time `run()` may take: two Slurm commands of at most 60 s each) with no such
   job was never submitted: it is put back to Scheduled, so a worker submits it as any
   new run (the server lets only one worker move it to Pending), and the pipeline waiting
   on it carries on. It is resubmitted once: stuck a second time, it is marked Crashed
   (the pipeline fails naming the stage; its rerun submits a new run). A run Cancelling
   with no job is marked Cancelled after the same time.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import anyio
import anyio.abc
from pydantic import BaseModel, Field, field_validator, model_validator

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import InfrastructureNotFound
from prefect.states import Cancelled, Crashed, Scheduled
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse
    from uuid import UUID

# Job states in which Slurm still holds the job (squeue's long names).
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
    "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
    "RESV_DEL_HOLD", "SPECIAL_EXIT",
})
COMMENT_PREFIX = "prefect-flow-run:"
CANCEL_GRACE_SECONDS = 30.0
CRASHED_LOOKBACK_SECONDS = 900.0
LOG_TAIL_LINES = 30
# A flow run of the pool Pending this long without a job was never submitted.
UNSUBMITTED_SECONDS = 300.0
MAX_RESUBMISSIONS = 1
RESUBMISSIONS_LABEL = "slurm.resubmissions"

# Slurm names: partitions (a comma list), accounts, QOS, reservations.
_NAMES = r"^[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*$"
# minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]
_TIME = r"^(UNLIMITED|INFINITE|\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2})$"
_MEM = r"^\d+[KMGT]?$"
_GRES = r"^[A-Za-z0-9_.:,-]+$"
_CONSTRAINT = r"^[A-Za-z0-9_.,|&*\[\]():!-]+$"
_BIND = r"^[^\s,:]+(:[^\s,:]+)?(:(ro|rw))?$"
_OPTION = r"^--?[A-Za-z][A-Za-z0-9-]*(=[^\r\n\x00]*)?$"
_JOB_ID = re.compile(r"^\d+(_\d+)?$")
# Options the worker sets itself; an extra option may not override them.
_RESERVED = {"wrap", "export", "parsable", "output", "o", "error", "e", "comment", "chdir",
             "D", "job-name", "J"}


class SlurmError(RuntimeError):
    """A Slurm command failed; the message is its own first error line."""


class SlurmTimeout(SlurmError):
    """A Slurm command did not answer in time; what it was asked may have been done."""


def _no_control(value: str, field: str) -> str:
    if any(c in value for c in "\r\n\x00"):
        raise ValueError(f"{field}: line breaks and NUL are not allowed")
    return value


def job_name(name: str | None) -> str:
    """A Slurm job name from a flow run's name (which may come from its parameters):
    letters, digits, `.`, `_` and `-`, each run of other characters becoming one `-`, at
    most 100 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "").strip("-.")
    return (cleaned or "prefect-flow-run")[:100]


class SlurmFields(BaseModel):
    """The job template's variables for a Slurm job. Every field but `prelude` and
    `command` is validated here and reaches `sbatch` as an argument of its own."""

    partition: Optional[str] = Field(None, pattern=_NAMES, description="--partition")
    account: Optional[str] = Field(None, pattern=_NAMES, description="--account")
    qos: Optional[str] = Field(None, pattern=_NAMES, description="--qos")
    reservation: Optional[str] = Field(None, pattern=_NAMES, description="--reservation")
    time_limit: Optional[str] = Field(
        None, pattern=_TIME, title="Time limit",
        description="--time: minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]; Slurm counts whole "
                    "minutes")
    nodes: int = Field(1, ge=1, description="--nodes")
    gpus_per_node: int = Field(
        0, ge=0, title="GPUs per node", description="--gpus-per-node (0: no GPU request)")
    gres: Optional[str] = Field(
        None, pattern=_GRES,
        description="--gres instead of gpus_per_node, e.g. gpu:a100:2 (for clusters that "
                    "need a GPU type)")
    cpus_per_task: Optional[int] = Field(None, ge=1, description="--cpus-per-task")
    mem: Optional[str] = Field(None, pattern=_MEM, description="--mem per node, e.g. 64G")
    constraint: Optional[str] = Field(None, pattern=_CONSTRAINT, description="--constraint")
    exclusive: bool = Field(False, description="--exclusive (whole nodes)")
    signal_seconds: Optional[int] = Field(
        120, ge=0, le=65535, title="Signal before the time limit",
        description="--signal=B:TERM@N: SIGTERM to the job's engine N seconds before the "
                    "time limit, so the flow run ends Crashed (and is rerunnable) before "
                    "Slurm kills it; None: Slurm's own SIGTERM at the limit")
    extra_sbatch_options: list[str] = Field(
        default_factory=list, title="Extra sbatch options",
        description="more #SBATCH options, one per item, e.g. --mail-type=END")
    prelude: str = Field(
        "", description="shell lines run in the job before the flow run: modules, venv "
                        "activation, exports (e.g. `module load cuda; source /shared/croco/"
                        ".venv/bin/activate`). Code, like the command: editable only by "
                        "those who may run code on the cluster")
    gpu_env: Literal["auto", "cuda", "rocm"] = Field(
        "auto", title="GPU environment",
        description="rocm: HIP_VISIBLE_DEVICES from Slurm's ROCR_VISIBLE_DEVICES, which is "
                    "then unset (as ROCm clusters need for torch and vLLM); cuda: Slurm's "
                    "CUDA_VISIBLE_DEVICES as is; auto: rocm on nodes with /dev/kfd")
    container_image: Optional[str] = Field(
        None, description="an Apptainer/Singularity image (.sif) to run the command in")
    container_runtime: Literal["apptainer", "singularity"] = "apptainer"
    container_gpu_flag: Literal["--nv", "--rocm", ""] = Field(
        "--nv", description="--nv (NVIDIA), --rocm (AMD) or none")
    container_binds: list[str] = Field(
        default_factory=list, description="--bind mounts, src[:dst[:ro|rw]] each")
    container_options: list[str] = Field(
        default_factory=list, description="more options of `apptainer exec`")
    working_dir: Optional[str] = Field(
        None, description="--chdir (default: the worker's working directory)")
    log_dir: str = Field(
        "~/croco-slurm-logs", description="folder for the jobs' output files "
                                         "(<job name>-<job id>.log); on a filesystem the "
                                         "login node shares with the compute nodes")

    @field_validator("container_image", "working_dir", "log_dir")
    @classmethod
    def _one_line(cls, v: str | None, info) -> str | None:
        return v if v is None else _no_control(v, info.field_name)

    @field_validator("extra_sbatch_options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for opt in v:
            if not re.match(_OPTION, opt):
                raise ValueError(f"extra_sbatch_options: {opt!r} is not one option such "
                                 "as --mail-type=END")
            if opt.lstrip("-").split("=", 1)[0] in _RESERVED:
                raise ValueError(f"extra_sbatch_options: {opt!r} is set by the worker")
        return v

    @field_validator("container_binds")
    @classmethod
    def _binds(cls, v: list[str]) -> list[str]:
        for b in v:
            if not re.match(_BIND, b):
                raise ValueError(f"container_binds: {b!r} is not src[:dst[:ro|rw]]")
        return v

    @field_validator("container_options")
    @classmethod
    def _container_options(cls, v: list[str]) -> list[str]:
        for opt in v:
            _no_control(opt, "container_options")
        return v

    @model_validator(mode="after")
    def _one_gpu_request(self):
        if self.gres and self.gpus_per_node:
            raise ValueError("gres and gpus_per_node: set one of them, not both")
        return self


class SlurmJobConfiguration(BaseJobConfiguration, SlurmFields):
    """A flow run's Slurm job: `sbatch_args()` and `script()` are what is submitted."""

    _flow_run_id: str = ""

    def prepare_for_flow_run(self, flow_run: "FlowRun",
                             deployment: "DeploymentResponse | None" = None,
                             flow: "APIFlow | None" = None, work_pool: "WorkPool | None" = None,
                             worker_name: str | None = None,
                             worker_id: "UUID | None" = None) -> None:
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name,
                                     worker_id=worker_id)
        self._flow_run_id = str(flow_run.id)
        self.name = job_name(self.name)

    @property
    def log_path_pattern(self) -> str:
        """The job's output file, with Slurm's `%j` for the job id."""
        return str(Path(os.path.expanduser(self.log_dir)) / f"{self.name}-%j.log")

    def sbatch_args(self) -> list[str]:
        """`sbatch`'s arguments, one option each; the script comes on standard input."""
        args = ["--parsable", f"--job-name={self.name}", f"--output={self.log_path_pattern}",
                "--export=ALL", f"--comment={COMMENT_PREFIX}{self._flow_run_id}"]
        for option, value in (("partition", self.partition), ("account", self.account),
                              ("qos", self.qos), ("reservation", self.reservation),
                              ("time", self.time_limit), ("gres", self.gres),
                              ("cpus-per-task", self.cpus_per_task), ("mem", self.mem),
                              ("constraint", self.constraint), ("chdir", self.working_dir)):
            if value is not None:
                args.append(f"--{option}={value}")
        args.append(f"--nodes={self.nodes}")
        if self.gpus_per_node:
            args.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.exclusive:
            args.append("--exclusive")
        if self.signal_seconds:
            args.append(f"--signal=B:TERM@{self.signal_seconds}")
        return args + list(self.extra_sbatch_options)

    def command_argv(self) -> list[str]:
        """The flow run's command, inside the container when there is one."""
        argv = shlex.split(self.command or "prefect flow-run execute")
        if not self.container_image:
            return argv
        wrap = [self.container_runtime, "exec"]
        if self.container_gpu_flag:
            wrap.append(self.container_gpu_flag)
        if self.container_binds:
            wrap += ["--bind", ",".join(self.container_binds)]
        return wrap + list(self.container_options) + [self.container_image] + argv

    def script(self) -> str:
        """The job script: GPU environment, prelude, then `exec` of the command (so Slurm's
        signals reach the flow run's engine directly)."""
        rocm = ('export HIP_VISIBLE_DEVICES="$ROCR_VISIBLE_DEVICES"; '
                'unset ROCR_VISIBLE_DEVICES')
        gpu = {"cuda": "",
               "rocm": f'if [ -n "${{ROCR_VISIBLE_DEVICES:-}}" ]; then {rocm}; fi',
               "auto": f'if [ -e /dev/kfd ] && [ -n "${{ROCR_VISIBLE_DEVICES:-}}" ]; then '
                       f'{rocm}; fi'}[self.gpu_env]
        lines = ["#!/bin/bash",
                 f"# Prefect flow run {self._flow_run_id}, submitted by croco's slurm worker",
                 "set -eo pipefail"]
        if gpu:
            lines.append(gpu)
        lines += ['echo "slurm job $SLURM_JOB_ID on $(hostname): GPUs '
                  '${CUDA_VISIBLE_DEVICES:-none}"']
        if self.prelude.strip():
            lines += ["# prelude", self.prelude.rstrip("\n")]
        lines.append("exec " + shlex.join(self.command_argv()))
        return "\n".join(lines) + "\n"

    def submit_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment `sbatch` runs in, which `--export=ALL` gives the job."""
        base = dict(os.environ if base is None else base)
        env = {k: v for k, v in base.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_"))}
        env.update({k: v for k, v in (self.env or {}).items() if v is not None})
        return env


class SlurmVariables(BaseVariables, SlurmFields):
    """The variables a work pool of type `slurm` offers, per pool and per deployment."""


class SlurmWorkerResult(BaseWorkerResult):
    """The job id (`identifier`); `status_code` 0 once it is queued."""


# ------------------------------------------------------------------------- Slurm commands


def _slurm(args: list[str], *, input: str | None = None, env: dict | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, input=input, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} not found: run the worker where Slurm's commands are "
                         "on the PATH (a login node)") from None
    except subprocess.TimeoutExpired:
        raise SlurmTimeout(f"{args[0]} did not answer within {timeout:.0f}s (slurmctld "
                           "busy or unreachable)") from None


def first_error_line(stderr: str) -> str:
    """Slurm's reason, e.g. 'sbatch: error: Batch job submission failed: Invalid partition
    name specified' (the last `error:` line; sbatch prints the specific one last)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no message"])[-1]


def sbatch(configuration: SlurmJobConfiguration) -> str:
    """Submit the job; returns its id. Raises SlurmError with Slurm's reason."""
    res = _slurm(["sbatch", *configuration.sbatch_args()], input=configuration.script(),
                 env=configuration.submit_env())
    if res.returncode != 0:
        raise SlurmError(first_error_line(res.stderr))
    job_id = res.stdout.strip().split(";")[0]
    if not _JOB_ID.match(job_id):
        raise SlurmError(f"sbatch printed no job id: {res.stdout.strip()!r}")
    return job_id


def parse_tagged(text: str) -> dict[str, str]:
    """`squeue -o '%i|%T|%k'` lines: flow run id -> the id of the job whose comment names
    it, a job Slurm still holds before one that ended, the newest first."""
    out: dict[str, tuple[bool, int, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) < 3 or not parts[2].strip().startswith(COMMENT_PREFIX):
            continue
        job_id, state, comment = (p.strip() for p in parts)
        run_id = comment[len(COMMENT_PREFIX):]
        rank = (JobStatus(job_id, state or "UNKNOWN").active,
                int(job_id.split("_")[0]) if _JOB_ID.match(job_id) else -1, job_id)
        if run_id not in out or rank > out[run_id]:
            out[run_id] = rank
    return {run_id: rank[2] for run_id, rank in out.items()}


def tagged_jobs(include_ended: bool = False) -> dict[str, str]:
    """This user's jobs that Slurm still knows, by the flow run their comment names: only
    those still in the queue unless `include_ended` (ended ones for `MinJobAge` seconds)."""
    args = ["squeue", "-h", "--me", "-o", "%i|%T|%k"] + (["-t", "all"] if include_ended
                                                         else [])
    res = _slurm(args)
    if res.returncode != 0:
        raise SlurmError(first_error_line(res.stderr))
    return parse_tagged(res.stdout)


def queued_job_for(flow_run_id: str) -> str | None:
    """The id of this user's job still in the queue for the flow run, if any."""
    return tagged_jobs().get(flow_run_id)


@dataclass
class JobStatus:
    job_id: str
    state: str          # e.g. RUNNING, TIMEOUT, "CANCELLED by 0"; UNKNOWN when forgotten
    reason: str = ""
    exit_code: str = ""

    @property
    def active(self) -> bool:
        return self.state.split()[0] in ACTIVE_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code in ("", "0:0")

    def describe(self) -> str:
        """`TIMEOUT (reason TimeLimit, exit 0:15)`."""
        extra = []
        if self.reason and self.reason != "None":
            extra.append(f"reason {self.reason}")
        if self.exit_code:
            extra.append(f"exit {self.exit_code}")
        return self.state + (f" ({', '.join(extra)})" if extra else "")


def parse_squeue(text: str) -> dict[str, JobStatus]:
    """`squeue -o '%i|%T|%r'` lines."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[0]:
            out[parts[0]] = JobStatus(parts[0], parts[1], parts[2])
    return out


def parse_sacct(text: str) -> dict[str, JobStatus]:
    """`sacct -X -n -P -o JobIDRaw,State,ExitCode,Reason` lines."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4 and parts[0]:
            out[parts[0]] = JobStatus(parts[0], parts[1], parts[3], parts[2])
    return out


def parse_scontrol(text: str) -> JobStatus | None:
    """One job of `scontrol -o show job`."""
    fields = dict(re.findall(r"(\w+)=(\S*)", text))
    if "JobId" not in fields:
        return None
    return JobStatus(fields["JobId"], fields.get("JobState", "UNKNOWN"),
                     fields.get("Reason", ""), fields.get("ExitCode", ""))


def job_statuses(job_ids: list[str]) -> dict[str, JobStatus]:
    """Each job's state: from squeue while Slurm holds it, then sacct, then scontrol (which
    knows ended jobs for MinJobAge seconds when accounting is off)."""
    if not job_ids:
        return {}
    res = _slurm(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
    if res.returncode != 0 and "Invalid job id" not in res.stderr:
        raise SlurmError(first_error_line(res.stderr))
    found = parse_squeue(res.stdout) if res.returncode == 0 else {}
    out = {j: s for j, s in found.items() if j in job_ids and s.active}
    ended = [j for j in job_ids if j not in out]
    if ended:
        res = _slurm(["sacct", "-X", "-n", "-P", "-j", ",".join(ended),
                      "-o", "JobIDRaw,State,ExitCode,Reason"])
        if res.returncode == 0:
            out.update({j: s for j, s in parse_sacct(res.stdout).items() if j in ended})
    for j in ended:
        if j in out:
            continue
        if j in found:
            out[j] = found[j]
            continue
        res = _slurm(["scontrol", "-o", "show", "job", j])
        if res.returncode != 0 and "Invalid job id" not in res.stderr:
            # slurmctld did not answer: not a reason to think the job ended.
            raise SlurmError(first_error_line(res.stderr))
        st = parse_scontrol(res.stdout) if res.returncode == 0 else None
        out[j] = st or JobStatus(j, "UNKNOWN", "no longer known to squeue, sacct or scontrol")
    return out


def job_output(job_id: str) -> str | None:
    """The job's output file (`StdOut` of `scontrol show job`), while Slurm knows the job."""
    res = _slurm(["scontrol", "-o", "show", "job", job_id])
    fields = dict(re.findall(r"(\w+)=(\S*)", res.stdout)) if res.returncode == 0 else {}
    return fields.get("StdOut") or None


def scancel(job_id: str) -> bool:
    """Cancel the job; False when Slurm no longer knows it."""
    res = _slurm(["scancel", job_id])
    if res.returncode != 0:
        if "Invalid job id" in res.stderr or "already completing" in res.stderr:
            return False
        raise SlurmError(first_error_line(res.stderr))
    return True


def log_tail(path: str | None, lines: int = LOG_TAIL_LINES) -> str:
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def crash_message(job_id: str, name: str, status: JobStatus, log: str | None) -> str:
    """What a Crashed flow run says when its job ended under it."""
    where = f"; its output: {log}" if log else ""
    return (f"Slurm job {job_id} ({name}) ended {status.describe()} before its flow run "
            f"finished{where}")


def run_job_id(run: "FlowRun") -> str | None:
    """The flow run's Slurm job id: its `infrastructure_pid`, else its `slurm.job-id` label
    (the worker records both; either write may have failed)."""
    for value in (run.infrastructure_pid, (run.labels or {}).get("slurm.job-id")):
        if value is not None and _JOB_ID.match(str(value)):
            return str(value)
    return None


def unsubmitted_action(run: "FlowRun", now: datetime.datetime,
                       bound_seconds: float) -> Literal["resubmit", "crash", "cancel"] | None:
    """What to do with a flow run of the pool that has no Slurm job (and none in the queue
    names it): nothing until its state is `bound_seconds` old; then a Pending run is
    resubmitted (`MAX_RESUBMISSIONS` times, then crashed) and a Cancelling one cancelled.
    A Running run has its engine, which reports its end itself."""
    state = run.state
    if state is None or run_job_id(run) or state.type not in (StateType.PENDING,
                                                               StateType.CANCELLING):
        return None
    if (now - state.timestamp).total_seconds() < bound_seconds:
        return None
    if state.type == StateType.CANCELLING:
        return "cancel"
    resubmitted = int((run.labels or {}).get(RESUBMISSIONS_LABEL, 0))
    return "resubmit" if resubmitted < MAX_RESUBMISSIONS else "crash"


# ------------------------------------------------------------------------------- worker


class SlurmWorker(BaseWorker[SlurmJobConfiguration, SlurmVariables, SlurmWorkerResult]):
    type = "slurm"
    job_configuration = SlurmJobConfiguration
    job_configuration_variables = SlurmVariables
    _description = ("Runs each flow run as a Slurm batch job (sbatch) that executes "
                    "`prefect flow-run execute`; cancels and reconciles through squeue, "
                    "scancel and sacct.")
    _display_name = "Slurm"
    _documentation_url = "https://slurm.schedmd.com/sbatch.html"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reconcile_seconds = float(os.environ.get("CROCO_SLURM_RECONCILE_SECONDS", "10"))
        self.unsubmitted_seconds = float(os.environ.get("CROCO_SLURM_UNSUBMITTED_SECONDS",
                                                        str(UNSUBMITTED_SECONDS)))
        self._reconcile_scope: anyio.CancelScope | None = None

    async def setup(self) -> None:
        await super().setup()
        self._reconcile_scope = anyio.CancelScope()
        self._runs_task_group.start_soon(self._reconcile_loop, self._reconcile_scope)

    async def teardown(self, *exc_info: Any) -> None:
        if self._reconcile_scope is not None:
            self._reconcile_scope.cancel()
        await super().teardown(*exc_info)

    async def run(self, flow_run: "FlowRun", configuration: SlurmJobConfiguration,
                  task_status: Optional[anyio.abc.TaskStatus] = None) -> SlurmWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        job_id = await anyio.to_thread.run_sync(queued_job_for, str(flow_run.id))
        if job_id:
            logger.info("Slurm job %s is already queued for this flow run: not submitting "
                        "again", job_id)
        else:
            Path(os.path.expanduser(configuration.log_dir)).mkdir(parents=True, exist_ok=True)
            try:
                job_id = await anyio.to_thread.run_sync(sbatch, configuration)
            except SlurmTimeout:
                # slurmctld may have queued it before sbatch gave up waiting for the answer.
                job_id = await anyio.to_thread.run_sync(queued_job_for, str(flow_run.id))
                if not job_id:
                    raise
        log = configuration.log_path_pattern.replace("%j", job_id)
        try:
            await self.client.update_flow_run_labels(flow_run.id, {
                "slurm.job-id": job_id, "slurm.job-name": configuration.name,
                "slurm.log": log})
        except Exception as e:  # noqa: BLE001 - the job is queued: report it all the same
            logger.warning("Could not label the flow run with its Slurm job %s (%s: %s)",
                           job_id, type(e).__name__, e)
        logger.info("Slurm job %s (%s) submitted; its output: %s", job_id, configuration.name,
                    log)
        if task_status is not None:
            task_status.started(job_id)
        return SlurmWorkerResult(identifier=job_id, status_code=0)

    async def kill_infrastructure(self, infrastructure_pid: str,
                                  configuration: SlurmJobConfiguration,
                                  grace_seconds: int = 30) -> None:
        """Cancel a queued flow run's job and wait (up to `grace_seconds`) until it left."""
        if not _JOB_ID.match(infrastructure_pid or ""):
            raise InfrastructureNotFound(f"{infrastructure_pid!r} is not a Slurm job id")
        if not await anyio.to_thread.run_sync(scancel, infrastructure_pid):
            raise InfrastructureNotFound(f"Slurm job {infrastructure_pid} is not known")
        with anyio.move_on_after(grace_seconds):
            while True:
                st = (await anyio.to_thread.run_sync(
                    job_statuses, [infrastructure_pid]))[infrastructure_pid]
                if not st.active:
                    return
                await anyio.sleep(1)

    # ---------------------------------------------------------------- reconciliation

    async def _reconcile_loop(self, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await self.reconcile()
                except Exception as e:  # noqa: BLE001 - the loop must outlive an API blip
                    self._logger.warning("Slurm reconciliation failed (%s: %s); retrying",
                                         type(e).__name__, e)
                await anyio.sleep(self.reconcile_seconds)

    async def _read_all(self, flow_run_filter: FlowRunFilter) -> list["FlowRun"]:
        pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[self._work_pool_name]))
        runs: list = []
        while True:  # the API serves at most 200 a page
            page = await self.client.read_flow_runs(
                work_pool_filter=pool, flow_run_filter=flow_run_filter, limit=200,
                offset=len(runs))
            runs += page
            if len(page) < 200:
                return runs

    async def _pool_runs(self) -> tuple[list["FlowRun"], list["FlowRun"]]:
        """The pool's unfinished flow runs, and those crashed in the last
        `CRASHED_LOOKBACK_SECONDS`."""
        live = await self._read_all(FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[
                StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]))))
        since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
            seconds=CRASHED_LOOKBACK_SECONDS)
        crashed = await self._read_all(FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
            end_time=FlowRunFilterEndTime(after_=since)))
        return live, crashed

    async def reconcile(self) -> None:
        """One pass: every unfinished (or just crashed) flow run of the pool against its
        job, and the runs that have no job (6. in the module's docstring)."""
        live, crashed = await self._pool_runs()
        jobless = [r for r in live if not run_job_id(r)]
        if jobless:
            await self._reconcile_jobless(jobless)
        runs = [r for r in live + crashed if run_job_id(r)]
        if not runs:
            return
        statuses = await anyio.to_thread.run_sync(
            job_statuses, sorted({run_job_id(r) for r in runs}))
        for run in runs:
            status = statuses.get(run_job_id(run))
            if status is not None:
                await self._reconcile_one(run, status)

    async def _reconcile_jobless(self, runs: list["FlowRun"]) -> None:
        """Adopt the job a flow run has in Slurm's queue; resubmit (or crash, or cancel) a
        run that has had none for longer than `unsubmitted_seconds`."""
        now = datetime.datetime.now(datetime.timezone.utc)
        tagged = await anyio.to_thread.run_sync(tagged_jobs, True)
        for run in runs:
            job_id = tagged.get(str(run.id))
            if job_id:
                await self._adopt(run, job_id)
                continue
            action = unsubmitted_action(run, now, self.unsubmitted_seconds)
            if action is None:
                continue
            # The latest word: a worker may have submitted it since it was read.
            run = await self.client.read_flow_run(run.id)
            if (run_job_id(run) or unsubmitted_action(run, now, self.unsubmitted_seconds)
                    != action or str(run.id) in await anyio.to_thread.run_sync(
                        tagged_jobs, True)):
                continue
            await self._act_on_unsubmitted(run, action, now)

    async def _adopt(self, run: "FlowRun", job_id: str) -> None:
        log = await anyio.to_thread.run_sync(job_output, job_id)
        labels = {"slurm.job-id": job_id, "slurm.job-name": job_name(run.name)}
        if log:
            labels["slurm.log"] = log
        await self.client.update_flow_run(run.id, infrastructure_pid=job_id)
        await self.client.update_flow_run_labels(run.id, labels)
        self.get_flow_run_logger(run).info(
            "Slurm job %s runs this flow run (its worker stopped before recording it): "
            "following it", job_id)

    async def _act_on_unsubmitted(self, run: "FlowRun", action: str,
                                  now: datetime.datetime) -> None:
        logger = self.get_flow_run_logger(run)
        waited = (now - run.state.timestamp).total_seconds()
        if action == "cancel":
            await self.client.set_flow_run_state(run.id, Cancelled(
                message="Cancelled: it had no Slurm job"), force=True)
            logger.info("Flow run cancelled: no Slurm job after %.0fs", waited)
        elif action == "resubmit":
            count = int((run.labels or {}).get(RESUBMISSIONS_LABEL, 0)) + 1
            await self.client.update_flow_run_labels(run.id, {RESUBMISSIONS_LABEL: count})
            await self.client.set_flow_run_state(run.id, Scheduled(
                scheduled_time=now, name="Resubmitting",
                message=f"No Slurm job {waited:.0f}s after it was marked {run.state.name}: "
                        "its worker stopped before sbatch; scheduled again"), force=True)
            logger.warning("No Slurm job %.0fs after this flow run was marked %s (its worker "
                           "stopped before sbatch): scheduled again, to be submitted once",
                           waited, run.state.name)
        else:
            await self._propose_crashed_state(run, (
                f"No Slurm job {waited:.0f}s after the flow run was marked {run.state.name}, "
                f"and it was resubmitted {MAX_RESUBMISSIONS} time(s) already: the worker "
                "that took it stopped before sbatch. Rerun the pipeline to submit it again"))

    async def _reconcile_one(self, run: "FlowRun", status: JobStatus) -> None:
        job_id = run_job_id(run)
        labels = run.labels or {}
        name, log = labels.get("slurm.job-name", run.name), labels.get("slurm.log")
        state = run.state
        if state is None:
            return
        if status.active:
            if state.type == StateType.CANCELLING:
                waited = (datetime.datetime.now(datetime.timezone.utc)
                          - state.timestamp).total_seconds()
                if status.state == "PENDING" or waited > CANCEL_GRACE_SECONDS:
                    self.get_flow_run_logger(run).info(
                        "Cancelling Slurm job %s (%s, flow run cancelling for %.0fs)",
                        job_id, status.state, waited)
                    await anyio.to_thread.run_sync(scancel, job_id)
            return
        run = await self.client.read_flow_run(run.id)  # the job ended: the latest word
        state = run.state
        message = crash_message(job_id, name, status, log)
        if state.type == StateType.CANCELLING:
            await self.client.set_flow_run_state(
                run.id, Cancelled(message=f"Slurm job {job_id} ended {status.describe()}"),
                force=True)
        elif state.type == StateType.CRASHED:
            if not status.succeeded and not (state.message or "").startswith("Slurm job"):
                # The engine saw SIGTERM (scancel, time limit) and said so; add Slurm's why.
                await self.client.set_flow_run_state(
                    run.id, Crashed(message=f"{message}. {state.message or ''}".strip()),
                    force=True)
                self._log_tail(run, log)
        elif not state.is_final():
            await self._propose_crashed_state(run, message)
            self._log_tail(run, log)

    def _log_tail(self, run: "FlowRun", log: str | None) -> None:
        tail = log_tail(log)
        if tail:
            self.get_flow_run_logger(run).error("Last lines of the Slurm job's output "
                                                "(%s):\n%s", log, tail)
