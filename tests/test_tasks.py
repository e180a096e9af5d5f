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
