"""The `croco-publish` flow: a finished run on the Hugging Face Hub, as `croco publish`
does it (`croco.publish`), for a deployment or a schedule. The pipeline itself publishes
at its end when its config sets `publish.dataset`."""

from __future__ import annotations

from prefect import flow

from croco.tasks import publish_task
from croco.tasks.remote import load_storage_block


@flow(name="croco-publish", flow_run_name="publish-{run_id}")
def croco_publish(run_id: str, dataset: str, data_root: str = "./croco-data",
                  models: str | None = None, private: bool = True, license: str = "unknown",
                  storage_block: str | None = None) -> dict:
    """Publish run `run_id` of `data_root`: its preference sets as the dataset `dataset`,
    each variant's adapter as `<models>-<variant>` (default prefix: the dataset's id).
    `storage_block`: a saved block whose credentials reach an s3:// data root. Needs
    HF_TOKEN on the worker."""
    if storage_block:
        load_storage_block(storage_block)
    return publish_task(data_root, run_id, dataset, models=models, private=private,
                        license=license)
