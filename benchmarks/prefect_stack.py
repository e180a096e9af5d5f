"""A Prefect server on loopback (SQLite), croco's work pools, its deployments and process
workers, as subprocesses sharing one PREFECT_HOME: the stack a cluster runs `croco run
--deployment` against. Used by the deployment, Slurm and Postgres tests and by
`benchmarks/rehearsal.py --via deployments`. Every process runs in a process group of its
own; `stop` ends them all (SIGINT, 15 s, then SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RETRY_CODES = (429, 502, 503)  # what Prefect's client retries
RETRIES = 6


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """A Prefect server and workers, as subprocesses sharing one PREFECT_HOME."""

    def __init__(self, home: Path, port: int, base_env: dict | None = None):
        self.home = home
        self.api = f"http://127.0.0.1:{port}/api"
        self.port = port
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.env = {
            **(os.environ if base_env is None else base_env),
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_API_DATABASE_CONNECTION_URL":
                f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "CROCO_WORKDIR": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs.append(log)
        proc = subprocess.Popen(args, env=self.env, cwd=REPO, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 300, check: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(list(args), env=self.env, cwd=cwd or REPO, capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {res.returncode}:\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 20):
        """One call of the server's REST API, JSON in and out. Retried on 429, 502 and 503
        as Prefect's own client retries them (`PrefectHttpxAsyncClient`): the server answers
        503 when SQLite is locked by a concurrent writer, and the transaction was rolled back."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(RETRIES + 1):
            req = urllib.request.Request(f"{self.api}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    text = r.read()
                return json.loads(text) if text else None
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_CODES or attempt == RETRIES:
                    raise
            time.sleep(min(2 ** attempt, 10))

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"prefect server not healthy after {timeout}s:\n{self.tail()}")

    def boot(self, gpu_slots: int | None = None) -> None:
        """The server, the `croco-cpu` and `croco-gpu` process pools, and `croco deploy`
        (with `--gpu-slots` when given)."""
        self.start("server", [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                              "--port", str(self.port)])
        self.wait_healthy()
        for pool in ("croco-cpu", "croco-gpu"):
            self.cli(PY, "-m", "prefect", "work-pool", "create", pool, "--type", "process",
                     "--overwrite")
        # `croco deploy` deploys the Slurm stage deployments too (tests/test_slurm.py runs them).
        self.cli(PY, "-m", "prefect", "work-pool", "create", "croco-slurm", "--type", "slurm",
                 "--base-job-template", str(REPO / "infra/work-pools/slurm.json"), "--overwrite")
        res = self.cli(PY, "-m", "croco.flows.cli", "deploy",
                       *(["--gpu-slots", str(gpu_slots)] if gpu_slots else []), timeout=600)
        assert "croco-pipeline/scale-out" in res.stdout + res.stderr

    def start_workers(self) -> None:
        """A `croco-cpu` worker for the pipelines (2 flow runs at a time) and a `croco-gpu`
        worker running one flow run at a time."""
        self.start("worker-cpu", [PY, "-m", "prefect", "worker", "start", "--pool", "croco-cpu",
                                  "--type", "process", "--limit", "2"])
        self.start("worker-gpu", [PY, "-m", "prefect", "worker", "start", "--pool", "croco-gpu",
                                  "--type", "process", "--limit", "1"])

    def pids(self) -> list[int]:
        """The processes this stack started that are still running."""
        return [proc.pid for proc in self.procs if proc.poll() is None]

    def tail(self, n: int = 60) -> str:
        out = []
        for log in self.logs:
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def _signal_running(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """SIGINT to every process group, 15 s to finish, then SIGKILL."""
        self._signal_running(signal.SIGINT)
        deadline = time.time() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        self._signal_running(signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)
