"""Shared fixtures and helpers of the reliability tests.

- `tiny_yaml`: the tiny 3-language pipeline of tests/conftest.py as a YAML file.
- `croco_env`, `start_croco`, `run_croco`: `croco` as a subprocess in its own process
  group (its own Prefect home and croco cache), with a timeout that kills the whole group;
  `Process.signal` reaches the group, `Finished` holds exit status, output and wall time.
- `reference_run`: one uninterrupted run, made once per session, and `assert_same_outputs`
  to compare any run of the same config against it (stage keys, scores, pairs, adapter).
- `TcpProxy`: a loopback TCP proxy that can be cut and restored (an object store outage).

The models, prompts and S3 server come from tests/conftest.py (tiny random models, moto).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CROCO = [PY, "-m", "croco.flows.cli"]

# The local S3 server logs every request; the tests read the bucket instead.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


PREFECT_LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")


@dataclass
class Finished:
    """How a subprocess ended: exit status, its output, and its wall time in seconds."""

    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def last_line(self) -> str:
        """The last non-empty line the process printed that is not a Prefect log record
        (Prefect logs the shutdown of its ephemeral server after croco's last word); stderr
        first: errors end there."""
        for text in (self.stderr, self.stdout):
            lines = [ln for ln in text.splitlines()
                     if ln.strip() and not PREFECT_LOG_RECORD.match(ln)]
            if lines:
                return lines[-1]
        return ""

    def error_message(self) -> str:
        """croco's closing `error: ...` message as one line (the console wraps it at 120
        columns when not on a terminal); without one, the last line."""
        lines = [ln for ln in self.stderr.splitlines() if not PREFECT_LOG_RECORD.match(ln)]
        starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
        if not starts:
            return self.last_line()
        return " ".join(ln.strip() for ln in lines[starts[-1]:] if ln.strip())


class Process:
    """A command started in its own session (process group), its output in files, so that
    a signal or a kill reaches every process it started (Prefect's ephemeral server too)."""

    def __init__(self, args: list[str], env: dict, log_dir: Path, name: str = "croco",
                 cwd: Path = REPO):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path = log_dir / f"{name}.stdout"
        self.err_path = log_dir / f"{name}.stderr"
        self.t0 = time.perf_counter()
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole process group (no error if it is already gone)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def group_alive(self) -> bool:
        """Whether any process of the group (the command or anything it started) runs."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float, reap: bool = True) -> Finished:
        """Wait up to `timeout` seconds; past it, SIGKILL the group and report timed_out.
        With `reap`, whatever of the group outlives the command (an ephemeral server) is
        killed too; without, it is left for the caller to inspect (`group_alive`)."""
        timed_out = False
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.signal(signal.SIGKILL)
            rc = self.proc.wait(timeout=30)
        seconds = time.perf_counter() - self.t0
        if reap:
            self.signal(signal.SIGKILL)
        return Finished(rc, self.out_path.read_text(errors="replace"),
                        self.err_path.read_text(errors="replace"), seconds, timed_out)


def croco_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a `croco` subprocess: this checkout first on the path, its own
    Prefect home (ephemeral API) and croco cache (next to that home), offline, no S3
    credentials unless given in `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "AWS_")) and k not in (
               "CROCO_S3_ENDPOINT_URL", "HF_TOKEN")}
    env.update({
        # Its own model/checkpoint cache: runs on remote data roots resume training from
        # checkpoints there, which must not come from another test's run.
        "CROCO_CACHE": str(prefect_home.parent / "croco-cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    env.update(extra)
    return env


def start_croco(args: list[str], env: dict, log_dir: Path, name: str = "croco") -> Process:
    """Start `croco ARGS` (e.g. ["run", cfg, "--run-id", "r1"]) in its own process group."""
    return Process(CROCO + list(args), env, log_dir, name)


def run_croco(args: list[str], env: dict, log_dir: Path, timeout: float = 300,
              name: str = "croco") -> Finished:
    """Run `croco ARGS` to its end (at most `timeout` seconds; then the group is killed)."""
    return start_croco(args, env, log_dir, name).wait(timeout)


# The runs these tests compare: pairs and a trained adapter (two DPO steps), no evaluation.
TRAIN_ON = {"training.enabled": True, "evaluation.judge.enabled": False}
TO_TRAIN = ["--stages", "train"]


@pytest.fixture
def tiny_yaml(tmp_path, tiny_config):
    """Writes the tiny pipeline (en, de, fr; 3 prompts x k 4; three scorers) as a YAML file:
    `tiny_yaml(path, **overrides)` with tiny_config's dotted overrides; returns the path."""

    def write(path: Path | None = None, **overrides) -> Path:
        cfg = tiny_config(**overrides)
        path = path or tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        return path

    return write


def files_under(root: Path) -> dict[str, Path]:
    """Every file below `root`, by its path relative to `root`."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def read_manifest(data_root: str, run_id: str) -> dict:
    from croco import storage

    return storage.read_json(storage.join(data_root, "runs", run_id, "manifest.json"))


def stage_outputs(manifest: dict, stage: str) -> dict:
    """A run's outputs of one stage, by label, from its manifest: `generations` and
    `scores` by language, `pairs` (the run's as `all`, each variant round's as
    `<variant>:<round>`), `training` by variant (`RunOutputs.training_runs`)."""
    from croco.manifest import read_outputs

    outputs = read_outputs(manifest)
    if stage == "training":
        return outputs.training_runs()
    if stage == "pairs":
        return {"all": outputs.pairs, **{
            f"{name}:{r}": rnd.pairs for name, variant in outputs.variants.items()
            for r, rnd in enumerate(variant.rounds, 1) if rnd.pairs is not None}}
    return getattr(outputs, stage)


def stage_table(manifest: dict, stage: str) -> pl.DataFrame:
    """All rows a run's stage wrote (every language), columns sorted: `scores`, `pairs`
    (the DPO pairs), `generations`..., read from the URIs in the run's manifest."""
    from croco import storage

    uris = sorted({entry.uri for entry in stage_outputs(manifest, stage).values()})
    frames = [storage.read_parquet(storage.join(u, "dpo") if stage == "pairs" else u)
              for u in uris]
    df = pl.concat(frames, how="diagonal_relaxed")
    return df.select(sorted(df.columns))


def adapter_bytes(manifest: dict, variant: str = "dpo") -> bytes:
    from croco import storage

    uri = stage_outputs(manifest, "training")[variant].uri
    return storage.read_bytes(storage.join(uri, "adapter", "adapter_model.safetensors"))


SAMPLE_KEY = ["prompt_id", "lang", "sample_idx"]
PAIR_KEY = ["prompt_id", "prompt_lang"]


def assert_same_outputs(ours: dict, reference: dict) -> None:
    """Two runs' manifests name the same stage keys, and their scores, pairs and adapter
    weights are equal (rows compared in (prompt_id, lang, sample_idx) order)."""
    for stage in ("generations", "scores", "pairs", "training"):
        keys = {k: v.key for k, v in stage_outputs(ours, stage).items()}
        assert keys == {k: v.key for k, v in stage_outputs(reference, stage).items()}, stage
    scores = stage_table(ours, "scores")
    assert not scores.select(SAMPLE_KEY).is_duplicated().any()
    assert scores.sort(SAMPLE_KEY).equals(stage_table(reference, "scores").sort(SAMPLE_KEY))
    assert stage_table(ours, "pairs").sort(PAIR_KEY).equals(
        stage_table(reference, "pairs").sort(PAIR_KEY))
    assert adapter_bytes(ours) == adapter_bytes(reference)


@pytest.fixture(scope="session")
def _reference_cache() -> dict:
    return {}


@pytest.fixture
def reference_run(_reference_cache, tiny_yaml, tmp_path_factory) -> dict:
    """The manifest of one uninterrupted `croco run` of the tiny config (TRAIN_ON, up to
    training) on a local data root; made once per session, shared by the tests that compare
    against it. Stage keys do not depend on the data root, so any run of the same config
    elsewhere (another folder, a bucket) must produce the same keys and rows."""
    if "manifest" not in _reference_cache:
        base = tmp_path_factory.mktemp("reference")
        config = tiny_yaml(base / "reference.yaml", data_root=str(base / "data"), **TRAIN_ON)
        done = run_croco(["run", str(config), "--run-id", "reference", *TO_TRAIN],
                         croco_env(base / "prefect-home"), base / "logs", name="reference")
        assert done.rc == 0, done.output[-4000:]
        _reference_cache["manifest"] = read_manifest(str(base / "data"), "reference")
        _reference_cache["seconds"] = done.seconds
    return _reference_cache["manifest"]


class TcpProxy:
    """A TCP proxy on loopback in front of `target_port`, served by threads, that can be cut
    (every open connection closed; every new one reset as soon as it is accepted, and
    counted in `refused`) and restored. With `record`, it keeps what clients sent (up to
    64 MiB), to check what went over the wire."""

    def __init__(self, target_port: int, record: bool = False):
        self.target = ("127.0.0.1", target_port)
        self.record = record
        self.sent = bytearray()
        self.down = False
        self.refused = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Close every open connection and reset every new one, until `restore`."""
        self.down = True
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            _close(c)

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            if self.down:
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # a reset, not an orderly close
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, self.record),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record and len(self.sent) < 64 << 20:
                    self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def bucket_objects(client, bucket: str) -> dict[str, bytes]:
    """Every object of `bucket`, key -> content (read with a boto3 client)."""
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
