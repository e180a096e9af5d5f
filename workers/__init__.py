"""Prefect worker types that croco ships (`croco.workers`), registered with Prefect through
the `prefect.collections` entry point, so `prefect worker start --type slurm` finds them."""

from croco.workers.slurm import SlurmWorker

__all__ = ["SlurmWorker"]
