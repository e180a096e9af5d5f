"""Prefect tasks: one task for any stage of `croco.stages` (`stage_task`: retries,
GPU slots, artifacts, logging), and the run's manifest,
held-out summary, report and publishing on the Hub. A stage task returns its stage's result: an output URI,
lang -> URI, or for a shard group `{"uri", "parts"}` (the part files it wrote)."""

from croco.tasks.stages import (  # noqa: F401
    configure_gpu_slots,
    ensure_gpu_limit,
    heldout_task,
    manifest_task,
    publish_task,
    report_task,
    stage_task,
)
