"""A training's live view in the Prefect UI: a progress artifact (steps done of total) and
a markdown artifact of its curves (a table of the latest values and the curves figure),
both updated while the trainer runs.

`TrainingArtifacts` is a transformers `TrainerCallback`: the stage task hands it to the
train stage as its progress (`croco.stages.Train`), and the trainer calls it on every log.
The progress artifact is updated in place at most every `progress_interval` seconds
(default 5); the curves artifact, whose figure costs about 0.3 s of CPU to draw and some
70 kB to store per version, at most every `curves_interval` seconds (default 60); both
once more when training ends. A run of a few quick steps so makes a handful of API calls,
not one per step, and a day-long run stores about 1,400 versions of its curves.

A keyed markdown artifact is versioned by Prefect (the UI shows the latest, with its
history); the figure travels inside the markdown as a `data:image/png;base64` image,
which the UI's markdown view (prefect-design's PMarkdownRenderer, in the UI bundle Prefect
3.9 ships) turns into an `<img>` with that source as written, so nothing needs to be
served from elsewhere.
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

    def __init__(self, name: str, *, progress_interval: float = 5.0,
                 curves_interval: float = 60.0, figure: bool = True):
        self.name, self.figure = name, figure
        self.progress_interval, self.curves_interval = progress_interval, curves_interval
        self.progress_id = None
        self.last_progress = self.last_curves = float("-inf")
        self.progress_updates = self.curves_updates = 0

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

    def markdown(self, state) -> str:
        """The curves artifact's text: the latest values, then the figure."""
        values = latest_values(state.log_history)
        total = int(state.max_steps or 0)
        lines = [f"## {self.name}", "",
                 f"Step {int(state.global_step)} of {total}.", "",
                 "| metric | latest |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in values.items() if k != "step"]
        if self.figure and state.log_history:
            png = plot_training_curves(state.log_history, title=self.name)
            lines += ["", f"![{self.name} curves](data:image/png;base64,"
                      f"{base64.b64encode(png).decode()})"]
        return "\n".join(lines)

    def update(self, state, *, force: bool = False) -> None:
        """Update the progress and curves artifacts whose interval has passed (`force`:
        both). A failed write is logged, never raised: the UI's view must not stop a
        training."""
        if not state.is_world_process_zero:
            return
        now = time.monotonic()
        try:
            if force or now - self.last_progress >= self.progress_interval:
                self.last_progress = now
                self._progress(state)
                self.progress_updates += 1
            if force or now - self.last_curves >= self.curves_interval:
                self.last_curves = now
                create_markdown_artifact(self.markdown(state), key=f"{self.name}-curves",
                                         description=f"training curves, {self.name}")
                self.curves_updates += 1
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("%s: could not update the training artifacts: %s", self.name, e)

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
