"""Task-level policy: which failures are retried."""

from __future__ import annotations

import pytest

from croco.prompts import PromptError
from croco.tasks.stages import _is_transient


@pytest.mark.parametrize("exc,expected", [
    (ConnectionError("reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (OSError("I/O error"), True),
    (FileNotFoundError("no such file"), False),
    (PermissionError("denied"), False),
    (PromptError("p.jsonl line 2: not valid JSON"), False),
    (ValueError("bad config"), False),
    (KeyError("column"), False),
    (RuntimeError("CUDA error"), False),
])
def test_only_transient_errors_are_retried(exc, expected):
    assert _is_transient(exc) is expected


def test_object_storage_errors_are_retried():
    from botocore.exceptions import EndpointConnectionError

    assert _is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")) is True


def test_orchestration_retries_drive_the_stage_tasks(prefect_harness, tmp_path):
    """`orchestration.retries` transient failures are retried, one more is not."""
    import uuid

    from prefect import flow

    from croco.config import CrocoConfig
    from croco.flows.stages import Stages
    from croco.stage import Stage

    calls: dict[str, int] = {}

    class Flaky(Stage):
        folder = "prompts"
        gpu = False
        tag: str
        fails: int

        def identity(self) -> dict:
            return {"tag": self.tag}

        def label(self) -> str:
            return f"flaky-{self.fails}"

        def work(self, out, progress):
            calls[self.tag] = calls.get(self.tag, 0) + 1
            if calls[self.tag] <= self.fails:
                raise ConnectionResetError("peer reset")
            return {"rows": 0}

    def run(retries: int, fails: int):
        cfg = CrocoConfig(data_root=str(tmp_path), orchestration={
            "retries": retries, "retry_delay_seconds": 0})
        stage = Flaky(tag=uuid.uuid4().hex, fails=fails)

        @flow
        def one():
            return Stages(cfg).stage_task(stage=stage, data_root=str(tmp_path))

        return stage.tag, one

    tag, one = run(retries=3, fails=3)
    assert one().endswith(f"prompts/{Flaky(tag=tag, fails=3).key()}")
    assert calls[tag] == 4  # three retries
    tag, one = run(retries=1, fails=2)
    with pytest.raises(ConnectionResetError):
        one()
    assert calls[tag] == 2  # one retry, then the failure stands
