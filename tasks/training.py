"""A training's live view in the Prefect UI: a progress artifact (steps done of total) and
a markdown artifact of its curves (a table of the latest values and the curves figure),
both updated while the trainer runs.

`TrainingArtifacts` is a transformers `TrainerCallback`: the stage task hands it to the
train stage as its progress (`croco.stages.Train`), and the trainer calls it. Artifacts
are written at most every `min_interval` seconds (default 5) and once more when training
ends, so a run of a few quick steps makes two or three API calls, not one per step; the
figure, whose drawing costs about 0.3 s of CPU, is redrawn at most every
`figure_interval` seconds (default 30) and at the end. A keyed markdown artifact is versioned by Prefect (the UI shows the latest, with its
history); the figure travels inside the markdown as a `data:image/png;base64` image,
which the UI's markdown view renders (its HTML sanitizer, DOMPurify, keeps data URIs on
images), so nothing needs to be served from elsewhere.
"""

from __future__ import annotations

import base64
import logging
import time

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from transformers import TrainerCallback

from croco.evaluation.curves import latest_values, plot_training_curves

log = logging.getLogger("croco")


class TrainingArtifacts(TrainerCallback):
    """Keys: `<name>-progress` (progress artifact) and `<name>-curves` (markdown), `name`
    being the run's label (`train-dpo`, `train-per-lang-de`)."""

    def __init__(self, name: str, *, min_interval: float = 5.0, figure_interval: float = 30.0,
                 figure: bool = True):
        self.name, self.min_interval, self.figure = name, min_interval, figure
        self.figure_interval = figure_interval
        self.progress_id = None
        self.last_update = self.last_figure = float("-inf")
        self.png: bytes | None = None  # the figure last drawn
        self.updates = 0

    def _progress(self, state) -> None:
        total = max(int(state.max_steps or 0), 1)
        done = min(int(state.global_step), total)
        pct = 100.0 * done / total
        description = f"{self.name}: step {done} of {total}"
        if self.progress_id is None:
            self.progress_id = create_progress_artifact(
                pct, key=f"{self.name}-progress", description=description)
        else:
            update_progress_artifact(self.progress_id, pct, description=description)

    def markdown(self, state, *, redraw: bool = True) -> str:
        """The curves artifact's text: the latest values, then the figure (`redraw`: drawn
        anew, else the one last drawn)."""
        values = latest_values(state.log_history)
        total = int(state.max_steps or 0)
        lines = [f"## {self.name}", "",
                 f"Step {int(state.global_step)} of {total}.", "",
                 "| metric | latest |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in values.items() if k not in ("step",)]
        if self.figure and state.log_history and (redraw or self.png is None):
            self.png = plot_training_curves(state.log_history, title=self.name)
        if self.figure and self.png is not None:
            lines += ["", f"![{self.name} curves](data:image/png;base64,"
                      f"{base64.b64encode(self.png).decode()})"]
        return "\n".join(lines)

    def update(self, state, *, force: bool = False) -> bool:
        """Write both artifacts unless the last write is under `min_interval` seconds old
        (`force`: write anyway). A failed write is logged, never raised: the UI's view
        must not stop a training."""
        if not state.is_world_process_zero:
            return False
        now = time.monotonic()
        if not force and now - self.last_update < self.min_interval:
            return False
        self.last_update = now
        redraw = force or now - self.last_figure >= self.figure_interval
        if redraw:
            self.last_figure = now
        try:
            self._progress(state)
            create_markdown_artifact(self.markdown(state, redraw=redraw),
                                     key=f"{self.name}-curves",
                                     description=f"training curves, {self.name}")
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("%s: could not update the training artifacts: %s", self.name, e)
            return False
        self.updates += 1
        return True

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.progress_id is None:
            try:
                self._progress(state)
            except Exception as e:  # noqa: BLE001
                log.warning("%s: could not create the progress artifact: %s", self.name, e)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.update(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.update(state, force=True)
