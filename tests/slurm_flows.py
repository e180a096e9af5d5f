"""A flow for the Slurm worker's tests (tests/test_slurm.py): it reports what its job saw
and can stay running for a while, so a test can cancel it, let Slurm's time limit hit it,
or fill both GPUs of the test cluster with it."""

from __future__ import annotations

import hashlib
import json
import os
import time

from prefect import flow


@flow(name="croco-slurm-probe", flow_run_name="probe-{tag}", persist_result=False)
def probe(tag: str = "x", seconds: float = 0.0, report: str | None = None,
          secret_names: list[str] | None = None) -> None:
    """Write to `report` (JSON) the job's id and GPUs and the sha256 of each variable in
    `secret_names` as the job's environment has it, then sleep `seconds`."""
    if report:
        seen = {"job_id": os.environ.get("SLURM_JOB_ID"),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "sha256": {n: hashlib.sha256(os.environ.get(n, "").encode()).hexdigest()
                           for n in secret_names or []}}
        with open(report, "w") as f:
            json.dump(seen, f)
    time.sleep(seconds)
