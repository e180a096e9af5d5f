"""Where croco relies on another library's private internals, and the one rule for it.

Each place checks, when it is applied, that the internal is there in the form croco was
written against, and otherwise stops with `InternalChanged`, naming the library, its
installed version and the internal, instead of quietly doing nothing. pyproject.toml
bounds each of these libraries to the major versions they were tested with, and
tests/test_internals.py applies every one against the installed versions.

The places (`PLACES`, one line each: what, and why no public API does it):
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable

#: (library, internal, where croco uses it and why).
PLACES = (
    ("prefect", "prefect.flow_engine._send_heartbeats(engine, join_on_exit)",
     "flows/engine.py: a synchronous flow run ends without joining its heartbeat thread "
     "(up to 1 s per flow run otherwise)"),
    ("prefect", "AioSqliteConfiguration.begin_transaction(session, with_for_update)",
     "flows/apiserver.py: the temporary API's SQLite transactions begin IMMEDIATE"),
    ("prefect", "create_app reads PREFECT__SERVER_EPHEMERAL and PREFECT__SERVER_FINAL",
     "flows/local.py: the temporary API is started as Prefect's ephemeral server is"),
    ("prefect", "prefect.server.api.server._memoize_block_auto_registration",
     "flows/local.py: block registration is skipped when its inputs are unchanged"),
    ("trl", "DPOTrainer._precompute_ref_logps(dataset, name, batch_size)",
     "croco/training/dpo.py: stored reference log-probs are reused, and computed in "
     "memory on several processes"),
    ("gguf", "gguf.GGUFReader and gguf.get_tensor_name_map, looked up at call time",
     "croco/models.py: an embedded GGUF model's file is parsed once per conversion"),
)

__doc__ += "\n".join(f"- {lib}: `{what}` ({why})" for lib, what, why in PLACES) + "\n"


class InternalChanged(RuntimeError):
    """A library no longer has the private internal croco relies on."""


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def require(condition: bool, package: str, internal: str) -> None:
    """Stop with `InternalChanged` unless `condition` (the internal is as croco expects)."""
    if not condition:
        raise InternalChanged(
            f"{package} {version(package)} no longer has {internal}, which croco relies on "
            f"(croco.internals lists why); install a {package} release within croco's "
            "bounds in pyproject.toml, or a croco release that supports this one")


def has_parameters(fn: Callable | None, *names: str) -> bool:
    """`fn` is callable and takes every one of `names`."""
    if not callable(fn):
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)
