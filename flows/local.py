"""How `croco run` runs the pipeline in its own process, and how it stops.

- **A temporary Prefect API that dies with the run.** Without `PREFECT_API_URL`, croco
  starts Prefect's API server (the same app Prefect's ephemeral mode runs, on the same
  database under PREFECT_HOME) as a child process in a session of its own, and asks the
  kernel to send it SIGTERM when the run's process dies for any reason
  (`PR_SET_PDEATHSIG`): kill -9 or the OOM killer leave no server behind. It boots
  while the CLI imports the pipeline, instead of after. On start, Prefect's server
  imports every installed Prefect collection (prefect-aws, -docker, -kubernetes: about
  a second) only to hash the block types and find them registered already (its memo
  store); when nothing that hash depends on changed since a start that registered them
  (Prefect's version, the collections' versions, the Prefect settings in the
  environment and profiles, Prefect's memo store), the server is told to skip that
  step (`BlockRegistration`). Its SQLite transactions take the write lock when they
  begin, so an API write waits for the server's own services instead of failing with
  "database is locked" and a 2 s client retry (`croco.flows.apiserver`).
- **The pipeline runs in a worker thread; the main thread owns the signals.** Prefect
  installs its own SIGTERM handler only in the main thread, where it turns the signal
  into a slow, graceful teardown. Here Ctrl-C (SIGINT) or SIGTERM stop the run at
  once: the flow run is marked cancelled (best effort, 2 s), every child process (the
  API server, distributed-training workers) is terminated, and the process exits with
  130 or 143. Nothing is lost: every finished shard and stage output is committed
  atomically with its `_SUCCESS` marker, the work in progress was only ever written
  under temporary names, and GPU slots of a local run live in this process only
  (tasks/stages.py). The next plain rerun continues where this one stopped.
"""

from __future__ import annotations

import contextvars
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180))
STOP_GRACE_SECONDS = 3.0
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # not Linux: stopped by the run's own cleanup
            return
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)
    return preexec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()


class BlockRegistration:
    """Whether a temporary server may skip block registration: `skip()` is True when a
    previous start on this PREFECT_HOME registered the block types (or found them
    registered) with the same Prefect, collections, settings and memo store; `done()`
    records a start that did not skip, once its server answers."""

    MARKER = "croco-block-registration"
    #: Settings that choose registration: set anywhere, Prefect decides as it would.
    SETTINGS = ("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "PREFECT_API_BLOCKS_REGISTER_ON_START",
                "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION",
                "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION")

    def __init__(self) -> None:
        home = _prefect_home()
        self.marker = home / self.MARKER
        self.memo = Path(os.environ.get("PREFECT_SERVER_MEMO_STORE_PATH")
                         or os.environ.get("PREFECT_MEMO_STORE_PATH")
                         or home / "memo_store.toml").expanduser()
        self.profiles = Path(os.environ.get("PREFECT_PROFILES_PATH",
                                            home / "profiles.toml")).expanduser()

    def key(self) -> str | None:
        """What Prefect's registration hash depends on, hashed; None without a memo store."""
        import hashlib
        import importlib.metadata as md
        import json

        try:
            memo = self.memo.read_text()
        except OSError:
            return None
        try:
            profiles = self.profiles.read_text()
        except OSError:
            profiles = ""
        collections = sorted((ep.value, ep.dist.name if ep.dist else "",
                              ep.dist.version if ep.dist else "")
                             for ep in md.entry_points(group="prefect.collections"))
        settings = sorted((k, v) for k, v in os.environ.items()
                          if k.startswith("PREFECT_") and k != "PREFECT_API_URL")
        blob = json.dumps([md.version("prefect"), collections, settings, profiles, memo])
        return hashlib.sha256(blob.encode()).hexdigest()

    def skip(self) -> bool:
        try:
            recorded = self.marker.read_text().strip()
            profiles = self.profiles.read_text() if self.profiles.exists() else ""
        except OSError:
            return False
        if any(name in os.environ or name in profiles for name in self.SETTINGS):
            return False
        return bool(recorded) and recorded == self.key()

    def done(self) -> None:
        key = self.key()
        if key is None:
            return
        try:
            tmp = self.marker.with_name(f"{self.marker.name}.{os.getpid()}.tmp")
            tmp.write_text(key)
            os.replace(tmp, self.marker)
        except OSError:  # only a missed shortcut next time
            pass


class TemporaryAPI:
    """Prefect's API server for one run, on loopback, bound to this process's life."""

    #: Start-up attempts: two runs starting at once on a fresh Prefect home migrate the same
    #: database together, and one server's start-up can fail; a second try finds it migrated.
    ATTEMPTS = 3

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.port = 0
        self.attempts = 0
        self._log = tempfile.TemporaryFile()
        self._blocks = BlockRegistration()
        self._skip_blocks = False

    def start(self) -> "TemporaryAPI":
        """Start the server and point this process's Prefect at it (PREFECT_API_URL, to be
        set before Prefect is imported); returns at once, `wait_ready` waits for it."""
        self.port = self.port or _free_port()
        self.url = os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{self.port}/api"
        if not self.attempts:  # before the environment holds this run's settings below
            self._skip_blocks = self._blocks.skip()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        if self._skip_blocks:
            env.update(PREFECT_SERVER_REGISTER_BLOCKS_ON_START="false",
                       PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION="false")
        self.attempts += 1
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "croco.flows.apiserver", "--factory",
             "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error",
             "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with(os.getpid()))
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self.attempts < self.ATTEMPTS:  # same port: Prefect already points at it
                    time.sleep(1.0)
                    self.start()
                    continue
                raise RuntimeError(f"the temporary Prefect API exited with code "
                                   f"{self.proc.returncode}: {self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    ready = r.status == 200
            except OSError:
                ready = False
            if ready:
                if not self._skip_blocks:
                    self._blocks.done()
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the temporary Prefect API did not answer within {timeout:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def _tail(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace").strip()

    def stop(self) -> None:
        """Send Prefect's buffered logs and events, then end the server."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if "prefect.logging.handlers" in sys.modules:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for worker in (APILogWorker, EventsWorker):
                worker.drain_all(timeout=5)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def wants_temporary_api() -> bool:
    """True when `croco run` should start its own temporary API: no Prefect API is
    configured (PREFECT_API_URL, or the active profile's in PREFECT_HOME/profiles.toml)
    and Prefect is not imported yet. Read without importing Prefect, since the URL must
    be in the environment before Prefect loads its settings; a process that has
    imported Prefect already (an embedding program, a test harness) keeps its own."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return False
    import tomllib
    from pathlib import Path

    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return True
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    return not (profiles.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL")


def _terminate_children() -> None:
    """SIGTERM every descendant process, SIGKILL those still alive after a grace."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=STOP_GRACE_SECONDS)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


def _cancel_flow_run(api_url: str, flow_run_name: str | None, reason: str,
                     timeout: float = 2.0) -> None:
    """Mark the run's flow run cancelled in the API (Prefect's client, a forced state), so
    the UI does not show it running. Best effort, at most `timeout` seconds: the process
    is stopping."""
    if not (api_url and flow_run_name):
        return

    def cancel() -> None:
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
        from prefect.states import Cancelled

        try:
            with SyncPrefectClient(api_url, httpx_settings={"timeout": timeout}) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    name=FlowRunFilterName(any_=[flow_run_name])), limit=5)
                for run in runs:
                    client.set_flow_run_state(run.id, Cancelled(message=reason), force=True)
        except Exception:  # noqa: BLE001 - the API may already be gone
            pass

    worker = threading.Thread(target=cancel, name="croco-cancel", daemon=True)
    worker.start()
    worker.join(timeout)


def run_until_stopped(fn: Callable[[], Any], *, on_stop: Callable[[str], None],
                      api_url: str = "", flow_run_name: str | None = None) -> Any:
    """Run `fn` in a worker thread and return its result (or raise its exception). On
    SIGINT/SIGTERM: `on_stop(signal name)`, cancel the flow run `flow_run_name`, end
    every child process and exit 128 + signal (130, 143) at once."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            result["error"] = e

    def stop(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        on_stop(name)
        _cancel_flow_run(api_url, flow_run_name, f"stopped by {name}")
        _terminate_children()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    # The caller's context (e.g. Prefect settings entered by an embedding program) goes along.
    worker = threading.Thread(target=contextvars.copy_context().run, args=(target,),
                              name="croco-pipeline", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.5)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if "error" in result:
        raise result["error"]
    return result.get("value")
