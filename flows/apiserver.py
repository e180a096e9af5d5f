"""`python -m croco.flows.apiserver UVICORN_ARGS...`: the temporary Prefect API of
`croco run` (`croco.flows.local.TemporaryAPI`): Prefect's server app under uvicorn, as
`python -m uvicorn --factory prefect.server.api.server:create_app ...` runs it, with one
change for its SQLite database: every transaction the API begins takes the write lock at
its start (`BEGIN IMMEDIATE`, Prefect's own mode for its `with_for_update`
transactions) instead of at its first write.

Why: Prefect begins most transactions DEFERRED. When one reads and then writes while the
server's own services commit in between (they record task-run states from events as the
run goes), SQLite cannot upgrade its stale snapshot, fails at once with "database is
locked" instead of waiting, and the API answers 503; Prefect's client then retries after
about 2 s. Creating a subflow's task run right after a task finishes meets this in most
runs, a few seconds of a cached rerun. Begun IMMEDIATE, a transaction waits for the lock
(SQLite's busy timeout, which Prefect sets to 60 s) and never meets a stale snapshot.
The database, its schema and what the API answers are unchanged.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager

from croco.internals import has_parameters, require


def immediate_sqlite_transactions() -> None:
    """Begin every SQLite transaction of Prefect's API IMMEDIATE (see above)."""
    from prefect.server.database import configurations

    config = configurations.AioSqliteConfiguration
    begin = getattr(config, "begin_transaction", None)
    if getattr(begin, "croco_original", None) is not None:
        return
    require(has_parameters(begin, "session", "with_for_update"), "prefect",
            "AioSqliteConfiguration.begin_transaction(session, with_for_update)")

    @asynccontextmanager
    async def begin_transaction(self, session, with_for_update: bool = False):
        async with begin(self, session, with_for_update=True) as transaction:
            yield transaction

    begin_transaction.croco_original = begin
    config.begin_transaction = begin_transaction


def check_ephemeral_server() -> None:
    """What `croco.flows.local.TemporaryAPI` relies on to start Prefect's server as
    Prefect's own ephemeral mode does: `create_app` reads the private variables
    PREFECT__SERVER_EPHEMERAL and PREFECT__SERVER_FINAL, and block registration is
    memoized (`_memoize_block_auto_registration`) on the inputs `BlockRegistration`
    hashes."""
    import inspect

    from prefect.server.api import server

    source = inspect.getsource(server.create_app)
    require("PREFECT__SERVER_EPHEMERAL" in source and "PREFECT__SERVER_FINAL" in source,
            "prefect", "create_app reads PREFECT__SERVER_EPHEMERAL and PREFECT__SERVER_FINAL")
    require(callable(getattr(server, "_memoize_block_auto_registration", None)), "prefect",
            "prefect.server.api.server._memoize_block_auto_registration")


def main(argv: list[str]) -> None:
    check_ephemeral_server()
    immediate_sqlite_transactions()
    from uvicorn.main import main as uvicorn

    uvicorn(argv, prog_name="uvicorn")


if __name__ == "__main__":
    main(sys.argv[1:])
