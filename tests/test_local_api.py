"""`croco run`'s own process: the temporary API's start-up shortcut (block registration)
and the flow engine adjustment (flow runs end without waiting on their heartbeat thread)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from croco.flows import local
from croco.flows.local import BlockRegistration, TemporaryAPI


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "prefect-home"
    home.mkdir()
    for var in ("PREFECT_MEMO_STORE_PATH", "PREFECT_SERVER_MEMO_STORE_PATH",
                "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    return home


def test_block_registration_is_skipped_only_after_a_recorded_start_with_the_same_inputs(
        home, monkeypatch):
    blocks = BlockRegistration()
    assert not blocks.skip()
    blocks.done()  # no memo store: Prefect never registered the block types here
    assert not (home / BlockRegistration.MARKER).exists()
    assert not BlockRegistration().skip()

    (home / "memo_store.toml").write_text('block_auto_registration = "abc"\n')
    BlockRegistration().done()
    assert BlockRegistration().skip()

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")  # each run's own port
    assert BlockRegistration().skip()
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:///x.db")
    assert not BlockRegistration().skip()  # another setting: register as Prefect decides
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL")
    assert BlockRegistration().skip()

    (home / "profiles.toml").write_text('active = "x"\n')
    assert not BlockRegistration().skip()
    (home / "profiles.toml").unlink()
    assert BlockRegistration().skip()

    monkeypatch.setenv("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "true")
    BlockRegistration().done()
    assert not BlockRegistration().skip()  # the user's choice: Prefect decides
    monkeypatch.delenv("PREFECT_SERVER_REGISTER_BLOCKS_ON_START")
    assert not BlockRegistration().skip()  # recorded under other settings
    BlockRegistration().done()
    assert BlockRegistration().skip()

    (home / "memo_store.toml").write_text('block_auto_registration = "def"\n')
    assert not BlockRegistration().skip()  # Prefect's memo changed: its check runs again
    (home / "memo_store.toml").unlink()
    assert not BlockRegistration().skip()


def test_the_temporary_api_tells_its_server_to_skip_registration_only_when_recorded(
        home, monkeypatch):
    started: list[dict] = []

    class FakePopen:
        def __init__(self, args, env, **kwargs):
            started.append(env)
            self.pid, self.returncode = 0, None

        def poll(self):
            return None

    monkeypatch.setattr(local.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    skip = {"PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
            "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"}

    TemporaryAPI().start()
    assert not skip.items() & started[-1].items()

    (home / "memo_store.toml").write_text('block_auto_registration = "abc"\n')
    monkeypatch.delenv("PREFECT_API_URL")
    api = TemporaryAPI().start()
    assert not skip.items() & started[-1].items()
    api._blocks.done()  # what wait_ready does once the server answers

    monkeypatch.delenv("PREFECT_API_URL")
    api = TemporaryAPI().start()
    assert skip.items() <= started[-1].items()
    api.start()  # a retried start keeps the first start's decision
    assert skip.items() <= started[-1].items()


class _Engine:
    """What Prefect's heartbeat context reads of a flow run engine."""

    heartbeat_seconds = 30
    flow_run = None
    logger = logging.getLogger("test-heartbeats")

    def __init__(self):
        self.beats = 0

    def _build_heartbeat_event_template(self):
        return None, None

    def _emit_flow_run_heartbeat(self, resource, related):
        self.beats += 1


def test_a_flow_run_ends_without_waiting_for_its_heartbeat_thread():
    from prefect import flow_engine

    import croco.flows.stages  # noqa: F401 - applies the adjustment

    assert hasattr(flow_engine._send_heartbeats, "croco_original")
    engine = _Engine()
    before = set(threading.enumerate())
    with flow_engine._send_heartbeats(engine):
        time.sleep(0.2)  # inside its first one-second sleep
        (beat_thread,) = set(threading.enumerate()) - before
    t = time.perf_counter()
    with flow_engine._send_heartbeats(engine):
        pass
    assert time.perf_counter() - t < 0.5
    assert engine.beats >= 1
    beat_thread.join(timeout=3)  # told to stop: it ends at its next step, beating no more
    assert not beat_thread.is_alive()


def test_a_stopped_run_marks_its_flow_run_cancelled_within_the_bound(prefect_harness):
    import uuid

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    @flow
    def stopped():
        pass

    name = f"croco-stopped-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(stopped, name=name)
        local._cancel_flow_run(PREFECT_API_URL.value(), name, "stopped by SIGINT")
        state = client.read_flow_run(run.id).state
    assert state.type.value == "CANCELLED" and state.message == "stopped by SIGINT"
    # an API that is already gone costs at most the bound
    t0 = time.monotonic()
    local._cancel_flow_run("http://127.0.0.1:9/api", name, "stopped by SIGTERM", timeout=1.0)
    assert time.monotonic() - t0 < 3.0
