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


def test_a_checked_stage_task_asks_the_store_again_only_on_a_retry(prefect_harness, tmp_path):
    """The flow found the output incomplete (`checked=True`): the first attempt does not ask
    again; a retry does, and finds what the attempt before it finished."""
    import uuid

    from prefect import flow

    from croco.config import CrocoConfig
    from croco.flows.stages import Stages
    from croco.stage import Stage

    asked: list[str] = []
    works: list[str] = []

    class Once(Stage):
        folder = "prompts"
        gpu = False
        tag: str

        def identity(self) -> dict:
            return {"tag": self.tag}

        def label(self) -> str:
            return "once"

        def complete(self, data_root: str) -> bool:
            asked.append(self.tag)
            return super().complete(data_root)

        def work(self, out, progress):
            works.append(self.tag)
            return {"rows": 0}

    cfg = CrocoConfig(data_root=str(tmp_path), orchestration={
        "retries": 1, "retry_delay_seconds": 0})
    stages = Stages(cfg)
    first = Once(tag=uuid.uuid4().hex)

    @flow
    def checked_once():
        return stages.stage_task(stage=first, data_root=str(tmp_path), checked=True)

    checked_once()
    assert asked == [] and works == [first.tag]  # the flow's check stands

    # a retry: the first attempt finished the output, then failed on the way out
    second = Once(tag=uuid.uuid4().hex)
    from croco import stage as contract

    real_run, attempts = contract.run, []

    def failing_once(*args, **kwargs):
        attempts.append(kwargs.get("checked"))
        out = real_run(*args, **kwargs)
        if len(attempts) == 1:
            raise ConnectionResetError("peer reset after the work")
        return out

    @flow
    def retried():
        return stages.stage_task(stage=second, data_root=str(tmp_path), checked=True)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(contract, "run", failing_once)
        assert retried().endswith(second.key())
    assert attempts == [True, False]
    assert works.count(second.tag) == 1  # the retry found it complete
    assert asked == [second.tag]


# ------------------------------------------------------------------ training artifacts


def _artifact_versions(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_the_train_task_shows_progress_and_curves_while_it_trains(prefect_harness, tiny_lm,
                                                                  tmp_path, monkeypatch):
    """The stage task gives a training its live artifacts: a progress artifact created
    once and updated to 100% (steps done of total), and a markdown artifact of the curves,
    a new version per update."""
    import uuid

    from prefect import flow
    from prefect.artifacts import Artifact

    from croco import storage
    from croco.config import PolicyConfig, TrainingConfig
    from croco.stages import Train
    from croco.tasks import training
    from croco.tasks.stages import stage_task
    from croco.training.spec import DPOSpec
    from tests.test_training import FAST, separable_pairs, write_pairs

    made = []
    monkeypatch.setattr(training.TrainingArtifacts, "__init__", _recording_init(made))
    name = f"curves-{uuid.uuid4().hex[:8]}"
    pairs_uri = write_pairs(tmp_path, separable_pairs())
    stage = Train(spec=DPOSpec(pairs_uri=pairs_uri, variant_name=name,
                               policy=PolicyConfig(model=tiny_lm),
                               training=TrainingConfig(max_steps=3, report_to="none", **FAST),
                               data_root=str(tmp_path)))

    @flow
    def one():
        return stage_task(stage=stage, data_root=str(tmp_path))

    uri = one()
    assert storage.is_complete(uri)
    (cb,) = made
    progress = Artifact.get(f"train-{name}-progress")
    assert progress.id == cb.progress_id and progress.type == "progress"
    assert progress.data == 100.0 and progress.description == f"train-{name}: step 3 of 3"
    assert len(_artifact_versions(f"train-{name}-progress")) == 1  # updated, not re-made
    curves = _artifact_versions(f"train-{name}-curves")
    assert len(curves) >= 3  # no interval here: a version per logged step at least
    latest = Artifact.get(f"train-{name}-curves")
    assert latest.type == "markdown" and "Step 3 of 3." in latest.data
    assert "| loss |" in latest.data and "| rewards/margins |" in latest.data
    assert "](data:image/png;base64,iVBORw0KGgo" in latest.data  # the figure, inline


def _recording_init(made: list):
    from croco.tasks.training import TrainingArtifacts

    original = TrainingArtifacts.__init__

    def init(self, name, **kwargs):
        original(self, name, **{**kwargs, "progress_interval": 0.0, "curves_interval": 0.0})
        made.append(self)

    return init


def test_training_artifacts_are_throttled_but_always_written_at_the_end(prefect_harness,
                                                                        monkeypatch):
    import uuid

    from transformers import TrainerState

    from croco.tasks import training

    drawn = []
    monkeypatch.setattr(training, "plot_training_curves",
                        lambda history, title=None: drawn.append(len(history)) or b"png")
    name = f"train-throttle-{uuid.uuid4().hex[:8]}"
    cb = training.TrainingArtifacts(name, progress_interval=0, curves_interval=3600)
    state = TrainerState(max_steps=10)
    cb.on_train_begin(None, state, None)
    for step in range(1, 11):
        state.global_step = step
        state.log_history.append({"step": step, "loss": 1.0 / step})
        cb.on_log(None, state, None)
    assert cb.progress_updates == 10  # no interval for the progress here
    assert cb.curves_updates == 1 and drawn == [1]  # the first log; then within the hour
    cb.on_train_end(None, state, None)
    assert cb.curves_updates == 2 and drawn == [1, 10]  # always at the end
    versions = _artifact_versions(f"{name}-curves")
    assert len(versions) == 2 and all("data:image/png;base64," in v.data for v in versions)
    progress = _artifact_versions(f"{name}-progress")
    assert len(progress) == 1 and progress[0].data == 100.0

    slow = training.TrainingArtifacts(f"{name}-slow", progress_interval=3600)
    slow.on_train_begin(None, state, None)
    for _ in range(3):
        slow.on_log(None, state, None)
    assert slow.progress_updates == 1
