"""Errors the user caused and can fix.

A `UserError`'s message is the one line the `croco` command shows: it names the file, row,
field or key at fault and says what to do. Tasks never retry a `UserError` (retrying cannot
fix a typo), and the command ends with exit code 2 and no traceback (`--debug` shows it).
Anything else that escapes is a bug: exit code 1.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config key, a prompt row, a model path, a storage location."""


class ModelNotFoundError(UserError):
    """A configured model (local path, embedded name or uncached hub id) is not there."""


class StorageUnreachableError(UserError):
    """The data root cannot be reached or written: endpoint, bucket, credentials, folder."""


class MissingPackageError(UserError):
    """The config asks for an optional backend whose package is not installed."""


def root_user_error(exc: BaseException | None) -> UserError | None:
    """The first `UserError` in `exc`'s chain (itself, its cause, its context), if any.

    Prefect re-raises a failed task's own exception from the flow, sometimes wrapped;
    walking `__cause__` / `__context__` finds the user's mistake behind it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_NETWORK_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3")


def root_outage(exc: BaseException | None) -> BaseException | None:
    """The first network or object-store connection error in `exc`'s chain: what is left
    when an outage outlasted the retries (not the user's mistake, nor a bug)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if isinstance(exc, ConnectionError) or (
                type(exc).__module__.startswith(_NETWORK_MODULES)
                and ("Connect" in name or "Timeout" in name or "Endpoint" in name)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
