"""Prefect flows: the DAG. Wiring only; the work is in `croco` and `tasks`."""
