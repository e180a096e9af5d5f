"""On a cluster, a GPU slot never outlives its holder: a worker process killed with
kill -9 while holding a slot of the server's global `gpu` limit loses it when its lease
expires, and the next holder gets it, logging what it waits for meanwhile.

A real `prefect server start` on loopback (SQLite; its lease service checks every 2 s),
two plain processes in global mode; the server's minimum lease is 60 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

HOLD = """
import sys, time
import croco.tasks.stages as ts
ts.WAIT_LOG_SECONDS = float(sys.argv[1])
ts.configure_gpu_slots(1, "global")
t0 = time.monotonic()
with ts.gpu_slot("generate-en"):
    print(f"held after {time.monotonic() - t0:.1f}", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": api,
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(1)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_holders_slot_frees_when_its_lease_expires(server):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "30", "3600"], env=server,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().startswith("held after"), "the first holder got no slot"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    t0 = time.monotonic()
    nxt = subprocess.run([sys.executable, "-c", HOLD, "5", "0"], env=server,
                         capture_output=True, text=True, timeout=180)
    waited = time.monotonic() - t0
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    assert "held after" in nxt.stdout
    # It waited for the dead holder's lease (60 s at least), and said so while waiting.
    assert waited >= 30
    assert "generate-en: waiting for a slot of the global 'gpu' concurrency limit (1 of 1 taken" \
        in nxt.stderr
