"""Prefect flows: the DAG. Wiring only; the work is in `croco` and `tasks`.

Importing them caps glibc's malloc arenas for the process (`croco.stage.limit_malloc_arenas`):
every process that runs croco's flows (`croco run`, a worker's flow run, a Slurm job)
imports them before its stage threads start."""

from croco.stage import limit_malloc_arenas

limit_malloc_arenas()
