"""GPU slots: a local run holds them in its own process only; on a cluster they come from
the server's global `gpu` limit through leases, and that limit is the operator's."""

from __future__ import annotations

import logging
import threading
import time

import pytest

import croco.tasks.stages as ts


def _read_limit():
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(ts.GPU_LIMIT)


def _delete_limit():
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(ts.GPU_LIMIT)
        except ObjectNotFound:
            pass


@pytest.fixture
def clean_limit(prefect_harness):
    _delete_limit()
    yield
    _delete_limit()
    ts.configure_gpu_slots(1, "local")


def test_local_slots_never_touch_the_server(clean_limit):
    from prefect.exceptions import ObjectNotFound

    assert ts.configure_gpu_slots(2, "local") is False
    with ts.gpu_slot("generate-en"), ts.gpu_slot("generate-de"):
        pass
    with pytest.raises(ObjectNotFound):
        _read_limit()


def test_local_gate_admits_as_many_holders_as_slots(clean_limit):
    ts.configure_gpu_slots(2, "local")
    inside, peak, lock = [0], [0], threading.Lock()

    def work():
        with ts.gpu_slot("work"):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.2)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2


def test_a_wait_for_a_slot_is_logged(clean_limit, monkeypatch, caplog):
    ts.configure_gpu_slots(1, "local")
    monkeypatch.setattr(ts, "WAIT_LOG_SECONDS", 0.1)
    release = threading.Event()

    def holder():
        with ts.gpu_slot("train-dpo"):
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.05)
    monkeypatch.setattr(ts, "_last_wait_log", [0.0])
    with caplog.at_level(logging.INFO, logger="croco"):
        threading.Timer(0.35, release.set).start()
        with ts.gpu_slot("score-en"):
            pass
    t.join()
    waits = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waits and waits[0].startswith("score-en: waiting for one of this process's 1 GPU slot")
    assert "held by train-dpo" in waits[0]


def test_many_waiting_tasks_log_one_line_per_interval(clean_limit, monkeypatch, caplog):
    ts.configure_gpu_slots(1, "local")
    monkeypatch.setattr(ts, "WAIT_LOG_SECONDS", 0.2)
    monkeypatch.setattr(ts, "_last_wait_log", [0.0])
    release = threading.Event()

    def holder():
        with ts.gpu_slot("generate-en"):
            release.wait(5)

    def waiter(name):
        with ts.gpu_slot(name):
            pass

    threads = [threading.Thread(target=holder)] + [
        threading.Thread(target=waiter, args=(f"generate-{lang}",)) for lang in ("de", "fr", "nl")]
    with caplog.at_level(logging.INFO, logger="croco"):
        threads[0].start()
        time.sleep(0.05)
        for t in threads[1:]:
            t.start()
        time.sleep(0.5)  # two intervals and a half
        release.set()
        for t in threads:
            t.join()
    waits = [r for r in caplog.records if "waiting for" in r.getMessage()]
    assert 1 <= len(waits) <= 3  # not one per waiting task per interval (that would be ~6)


def test_a_failure_inside_the_slot_releases_it(clean_limit):
    ts.configure_gpu_slots(1, "local")
    with pytest.raises(RuntimeError):
        with ts.gpu_slot("generate-en"):
            raise RuntimeError("out of memory")
    acquired = ts._gate.acquire(timeout=1)
    assert acquired
    ts._gate.release()


def test_global_mode_creates_a_missing_limit_with_the_configured_size(clean_limit):
    assert ts.configure_gpu_slots(3, "global") is True
    assert _read_limit().limit == 3


def test_a_run_never_resizes_the_operators_limit(clean_limit):
    ts.resize_gpu_limit(8)
    ts.configure_gpu_slots(1, "global")
    assert _read_limit().limit == 8
    assert ts.ensure_gpu_limit(2) is False
    assert _read_limit().limit == 8


def test_a_global_slot_is_held_while_working_and_released_after(clean_limit):
    ts.configure_gpu_slots(2, "global")
    with ts.gpu_slot("generate-en"):
        assert _read_limit().active_slots == 1
    assert _read_limit().active_slots == 0


def test_auto_mode_is_local_outside_a_deployment(clean_limit):
    from prefect import flow

    @flow
    def probe() -> bool:
        return ts.configure_gpu_slots(1, "auto")

    assert probe() is False
