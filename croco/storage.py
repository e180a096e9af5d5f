"""Storage behind one small module: any fsspec URI, atomic writes, completion markers.

A plain path or `file://` is local; `s3://bucket/prefix` goes through s3fs with the
endpoint and credentials taken from the environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` / `CROCO_S3_ENDPOINT_URL`). Credentials are
never logged and never written anywhere by croco.

Local writes go to a temporary name and are renamed into place when complete; on an
object store a write is one PUT (or one multipart upload), which the store makes visible
whole or not at all. A stage's output directory counts as complete only once its
`_SUCCESS` marker exists, so a crash never leaves something a rerun trusts.

A folder may also stand for files kept elsewhere: its `_parts.json` (`REFERENCES`) maps
names in the folder to files stored beside it under the same root (a per-run view of
stored samples, `croco.samples`). `parquet_files` and `read_parquet` list a folder's
referenced files with its own, under their names in the folder, so readers see one set.
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import fsspec

from croco.errors import UserError

if TYPE_CHECKING:  # polars and pyarrow load on first use: `croco --help` stays quick
    import polars as pl

SUCCESS = "_SUCCESS"


_s3_credentials: dict[str, Any] = {}


def set_s3_credentials(*, key: str | None = None, secret: str | None = None,
                       token: str | None = None, endpoint_url: str | None = None,
                       region: str | None = None) -> None:
    """Use these credentials (e.g. from a saved Prefect block) for `s3://` in this process
    instead of the environment's. Kept in memory only; `redact` hides them."""
    creds: dict[str, Any] = {}
    if key:
        creds["key"] = key
    if secret:
        creds["secret"] = secret
    if token:
        creds["token"] = token
    if endpoint_url:
        creds["endpoint_url"] = endpoint_url
    if region:
        creds["client_kwargs"] = {"region_name": region}
    _s3_credentials.clear()
    _s3_credentials.update(creds)


def _storage_options(protocol: str) -> dict[str, Any]:
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("CROCO_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {}
        if endpoint:
            opts["endpoint_url"] = endpoint
        opts.update(_s3_credentials)
        return opts
    return {}


def _split(uri: str) -> tuple[str, str]:
    if "://" in uri:
        protocol, rest = uri.split("://", 1)
        return protocol, rest
    return "file", uri


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it."""
    protocol, rest = _split(uri)
    if protocol == "file":
        return fsspec.filesystem("file"), os.path.abspath(rest)
    fs = fsspec.filesystem(protocol, **_storage_options(protocol))
    return fs, rest


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def normalize_root(uri: str) -> str:
    """A canonical form of a data root: absolute local path or `proto://bucket/prefix`."""
    protocol, rest = _split(uri)
    if protocol == "file":
        return os.path.abspath(rest)
    return f"{protocol}://{rest.rstrip('/')}"


def join(uri: str, *parts: str) -> str:
    protocol, rest = _split(uri)
    if protocol == "file" and "://" not in uri:
        return os.path.join(uri, *parts)
    joined = posixpath.join(rest, *parts)
    return f"{protocol}://{joined}"


def key_of(uri: str) -> str:
    """The content key of a stage output URI (`.../<stage>/<key>[/lang=xx]`)."""
    parts = uri.rstrip("/").replace("\\", "/").split("/")
    return parts[-2] if parts[-1].startswith("lang=") else parts[-1]


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_file(uri: str) -> bool:
    """True when the file `uri` exists: one HEAD request on an object store (`exists` asks
    again whether a missing key is a folder, a second request)."""
    if _kept(uri) is not None:
        return True
    fs, path = filesystem(uri)
    if _is_local(fs) or not hasattr(fs, "call_s3"):
        return fs.isfile(path)
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return False
    return True


def is_complete(uri: str) -> bool:
    """True when the directory `uri` carries its `_SUCCESS` marker."""
    return is_file(join(uri, SUCCESS))


def complete_among(uris: list[str]) -> set[str]:
    """Which of the folders `uris` carry their `_SUCCESS` marker (`is_complete` each).
    On an object store, the language folders of one output (`<folder>/<key>/lang=xx`, two
    or more of them asked at once) are answered by one listing of the output (a LIST,
    paged every 1,000 files) instead of a HEAD each: what a run asks for every language of
    a stage. That listing is kept a while for `absent_when_listed`. A marker this process
    wrote is known without a request."""
    done: set[str] = set()
    by_output: dict[str, list[str]] = {}
    for uri in dict.fromkeys(uris):
        if _kept(join(uri, SUCCESS)) is not None:
            done.add(uri)
            continue
        head, tail = posixpath.split(uri.rstrip("/"))
        by_output.setdefault(head if tail.startswith("lang=") else uri, []).append(uri)
    for head, group in by_output.items():
        fs, path = filesystem(head)
        if len(group) < 2 or _is_local(fs) or not hasattr(fs, "call_s3"):  # s3fs only
            done.update(u for u in group if is_complete(u))
            continue
        names = _list_below(fs, head, path)
        done.update(u for u in group
                    if posixpath.join(posixpath.basename(u.rstrip("/")), SUCCESS) in names)
    return done


#: Listings of an output's folder this process made (`complete_among`), by `_ref_key`:
#: (when, the paths below it then, plus what this process wrote there since). Read by
#: `absent_when_listed` for `LISTED_SECONDS`.
_LISTED: dict[str, tuple[float, set[str]]] = {}
LISTED_SECONDS = 600.0


def _list_below(fs: fsspec.AbstractFileSystem, uri: str, path: str) -> set[str]:
    """The paths of every file below the folder `path` (relative to it; one paged LIST,
    no cache), remembered in `_LISTED`."""
    from fsspec.asyn import sync

    base = path.rstrip("/")
    try:
        found = sync(fs.loop, fs._lsdir, base, delimiter="", refresh=True)
    except FileNotFoundError:
        found = []
    names = {e["name"][len(base) + 1:] for e in found
             if e.get("type") != "directory" and e["name"].startswith(base + "/")}
    with _KEPT_LOCK:
        _LISTED[_ref_key(_split(uri)[0], base)] = (time.monotonic(), set(names))
        while len(_LISTED) > 64:
            _LISTED.pop(next(iter(_LISTED)))
    return names


def absent_when_listed(uri: str) -> bool:
    """True when a listing this process made in the last `LISTED_SECONDS` of a folder
    above `uri` (`complete_among`) had no file there and this process has not written it
    since: the caller may skip asking the store (a GET that would find nothing). False
    when nothing is known. Another process may have written it since the listing; callers
    use this only where that would be the same race as asking an instant earlier (a
    generation plan, made once per output, when the output was just found incomplete)."""
    if not _LISTED:
        return False
    protocol, path = _split(uri)
    if protocol == "file":
        return False
    key = _ref_key(protocol, path)
    with _KEPT_LOCK:
        for folder, (when, names) in _LISTED.items():
            if key.startswith(folder + "/") and time.monotonic() - when < LISTED_SECONDS:
                return key[len(folder) + 1:] not in names
    return False


def _note_written(key: str) -> None:
    """A file this process wrote is no longer absent in the listings above it."""
    with _KEPT_LOCK:
        for folder, (_, names) in _LISTED.items():
            if key.startswith(folder + "/"):
                names.add(key[len(folder) + 1:])


def mark_complete(uri: str, info: dict | None = None) -> None:
    # kept: a task's summary line and the next stage (the score stage asking for the rows
    # of the generations it just made) read it back without a request
    write_bytes(join(uri, SUCCESS), json.dumps(info or {}, sort_keys=True).encode(),
                keep=True)


def marker_info(uri: str) -> dict:
    """What the `_SUCCESS` marker of `uri` records: from memory when this process wrote it
    on an object store (`write_bytes(..., keep=True)`), else read (FileNotFoundError when
    there is none)."""
    data = read_bytes(join(uri, SUCCESS))
    try:
        info = json.loads(data) if data.strip() else {}
    except ValueError:
        return {}  # a marker without readable info is still a marker
    return info if isinstance(info, dict) else {}


#: Small files this process wrote with `keep=True`, on an object store, by `_ref_key`: read
#: back (`read_bytes`, `read_parquet`, `is_file`, `marker_info`, a view's references)
#: without a request. Only for files that never change once written (`_SUCCESS` markers,
#: `_parts.json`, a content-keyed output's own files, a stored shard's prompts file);
#: `remove` forgets them. At most `KEEP_FILE_BYTES` a file and `KEEP_BYTES` in all
#: (the oldest go first). Local files are not kept: reading one back costs no request.
_KEPT: dict[str, bytes] = {}
_KEPT_TOTAL = 0  # the bytes in `_KEPT`
_KEPT_LOCK = threading.Lock()
KEEP_FILE_BYTES = 4 << 20
KEEP_BYTES = 32 << 20


def _keep(key: str, data: bytes) -> None:
    global _KEPT_TOTAL
    with _KEPT_LOCK:
        _KEPT_TOTAL += len(data) - len(_KEPT.pop(key, b""))
        _KEPT[key] = data
        while _KEPT_TOTAL > KEEP_BYTES:
            _KEPT_TOTAL -= len(_KEPT.pop(next(iter(_KEPT))))


def _forget_kept(folder_key: str) -> None:
    """Forget the kept files at or below `folder_key` (a `_ref_key`)."""
    global _KEPT_TOTAL
    with _KEPT_LOCK:
        for key in [k for k in _KEPT if k == folder_key or k.startswith(folder_key + "/")]:
            _KEPT_TOTAL -= len(_KEPT.pop(key))


def _kept(uri: str) -> bytes | None:
    if not _KEPT:
        return None
    protocol, path = _split(uri)
    return None if protocol == "file" else _KEPT.get(_ref_key(protocol, path))


def write_bytes(uri: str, data: bytes, keep: bool = False) -> None:
    """Write `data` to `uri` atomically: a temporary sibling, then a rename (one PUT on an
    object store). `keep`: the file never changes once written, so this process reads it
    back from memory (object stores only; see `_KEPT`)."""
    fs, path = filesystem(uri)
    local = _is_local(fs)
    if local:
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    # Object stores need no folders, and s3fs's makedirs creates a missing bucket: a
    # misspelt data_root would silently start a new bucket instead of failing.
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        if local:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        else:
            # One PUT (a multipart upload for large data): the object appears whole or not
            # at all, so no temporary name, copy and delete (three requests for one).
            fs.pipe_file(path, data)
            if keep and len(data) <= KEEP_FILE_BYTES:
                _keep(_ref_key(_split(uri)[0], path), data)
            if _LISTED:
                _note_written(_ref_key(_split(uri)[0], path))
    except BaseException as e:
        if local:
            _remove_quietly(fs, tmp)  # a failed write leaves nothing behind
        if isinstance(e, OSError) and e.errno in _FULL:
            raise StorageFullError(
                f"cannot write {uri}: {os.strerror(e.errno).lower()} on the data root's "
                "filesystem; free space there (or raise the quota), then rerun the same "
                "command: finished work is kept") from e
        if isinstance(e, FileNotFoundError):
            # s3fs says no more than "The specified bucket does not exist".
            raise FileNotFoundError(f"cannot write {uri}: {e}; check that the bucket exists "
                                    "(data_root)") from e
        raise


#: Temporary files are named `<file>.tmp-<random>` beside the file they become.
TMP_MARK = ".tmp-"
#: A temporary file untouched this long belongs to a writer that died (kill -9, power
#: loss): `sweep_temporary` removes it. A live writer's file is younger (written in one go).
STALE_TMP_SECONDS = 3600.0
#: A full disk or quota: no retry helps, the user must act.
_FULL = {errno.ENOSPC, errno.EDQUOT}


class StorageFullError(UserError):
    """The data root's filesystem is full or over quota."""


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def sweep_temporary(uri: str, older_than: float = STALE_TMP_SECONDS) -> int:
    """Remove temporary files (`TMP_MARK`) anywhere under `uri` older than `older_than`
    seconds: what writers killed mid-write left. Returns how many were removed."""
    fs, path = filesystem(uri)
    if not _is_local(fs):
        return 0  # object-store writes use no temporary names (one PUT each)
    try:
        entries = fs.find(path, detail=True).values()
    except FileNotFoundError:
        return 0
    now, removed = time.time(), 0
    for entry in entries:
        name = posixpath.basename(entry["name"].rstrip("/"))
        if TMP_MARK not in name or entry.get("type") == "directory":
            continue
        modified = _modified(entry)
        if modified is not None and now - modified > older_than:
            _remove_quietly(fs, entry["name"])
            removed += 1
    return removed


def _modified(entry: dict) -> float | None:
    """An fsspec listing entry's modification time (seconds since the epoch)."""
    value = entry.get("mtime", entry.get("LastModified", entry.get("created")))
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def _cat(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole file in one GET on an object store. s3fs asks for the size first (a HEAD,
    and for a missing key a listing too) to split a large read into concurrent ranges;
    croco's files are read whole and are at most tens of MB, so it reads them in one
    stream."""
    if _is_local(fs) or not hasattr(fs, "call_s3"):
        return fs.cat_file(path)
    return fs.cat_file(path, max_concurrency=1)


def read_bytes(uri: str) -> bytes:
    """The whole file: one GET on an object store (no HEAD first), none when this process
    wrote it with `keep`."""
    kept = _kept(uri)
    if kept is not None:
        return kept
    fs, path = filesystem(uri)
    return _cat(fs, path)


def write_json(uri: str, obj: Any, keep: bool = False) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(),
                keep=keep)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_parquet(df: pl.DataFrame, uri: str, keep: bool = False) -> None:
    """Write one Parquet file atomically (`keep`: see `write_bytes`)."""
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd")
    write_bytes(uri, buf.getvalue(), keep=keep)


def read_parquet(uri: str) -> pl.DataFrame:
    """Read a Parquet file, or every `*.parquet` below a directory (hive `lang=` aware)."""
    import polars as pl
    import pyarrow.parquet as pq

    kept = _kept(uri)
    if kept is not None:
        return pl.from_arrow(pq.read_table(io.BytesIO(kept)))
    fs, path = filesystem(uri)
    if path.endswith(".parquet"):  # a file, read in one GET; else a folder so named
        try:
            return pl.from_arrow(pq.read_table(io.BytesIO(_cat(fs, path))))
        except (FileNotFoundError, IsADirectoryError):
            if not fs.isdir(path):
                raise
    if fs.isdir(path):
        files = _folder_files(uri, fs, path)
        if not files:
            raise FileNotFoundError(f"no Parquet files under {uri}")
        frames = [pl.from_arrow(pq.read_table(io.BytesIO(read_bytes(f)))) for f in files]
        return pl.concat(frames, how="diagonal_relaxed")
    with fs.open(path, "rb") as fh:
        return pl.from_arrow(pq.read_table(fh))


#: A folder's references to files stored elsewhere under the same root:
#: `{"files": {name in the folder: path relative to the folder}}`.
REFERENCES = "_parts.json"


def _uri(protocol: str, path: str) -> str:
    return path if protocol == "file" else f"{protocol}://{path}"


def write_references(folder: str, files: dict[str, str]) -> None:
    """Record that `folder/<name>` is the file `files[name]` (a URI under the same root),
    without copying it. Paths are kept relative to the folder, so a data root that moves
    (another mount point, a copied bucket) keeps its references."""
    protocol, base = _split(folder)
    rel = {}
    for name, target in sorted(files.items()):
        t_protocol, t_path = _split(target)
        if t_protocol != protocol:
            raise ValueError(f"{folder}: a reference must stay on the same storage, not "
                             f"{target}")
        if protocol == "file":
            rel[name] = os.path.relpath(os.path.abspath(t_path), os.path.abspath(base))
        else:
            rel[name] = posixpath.relpath(t_path, base.rstrip("/"))
    # kept: a view is keyed by what it holds, so its references never change once written;
    # the score stage reads the generations view it just made without a request
    write_json(join(folder, REFERENCES), {"files": rel}, keep=True)


def _ref_key(protocol: str, folder_path: str) -> str:
    return (os.path.abspath(folder_path) if protocol == "file"
            else f"{protocol}://{folder_path.rstrip('/')}")


def _resolve(protocol: str, folder_path: str, rel: str) -> str:
    if protocol == "file":
        return os.path.normpath(os.path.join(folder_path, rel))
    return _uri(protocol, posixpath.normpath(posixpath.join(folder_path, rel)))


def _read_references(fs: fsspec.AbstractFileSystem, protocol: str,
                     folder_path: str) -> dict[str, str]:
    """name -> URI of what the folder's `_parts.json` references (FileNotFoundError when
    it has none)."""
    folder_path = folder_path.rstrip("/")
    where = f"{folder_path}/{REFERENCES}"
    data = _kept(_uri(protocol, where))
    rel = json.loads(data if data is not None else _cat(fs, where))["files"]
    return {name: _resolve(protocol, folder_path, r) for name, r in rel.items()}


def references(folder: str) -> dict[str, str]:
    """name -> URI of the files `folder` references (empty when it references none)."""
    fs, path = filesystem(folder)
    try:
        return _read_references(fs, _split(folder)[0], path)
    except FileNotFoundError:
        return {}


def _folder_files(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Every `*.parquet` below the folder (temporary files and names starting with `_`,
    such as a store's index, left out) and every file a
    `_parts.json` below it references, as URIs, in the order of their names in the
    folder."""
    protocol, _ = _split(uri)
    named: dict[str, str] = {}
    for p in fs.find(path):
        name = posixpath.basename(p)
        if p.endswith(".parquet") and TMP_MARK not in name and not name.startswith("_"):
            named[p] = _uri(protocol, p)
        elif name == REFERENCES:
            folder = posixpath.dirname(p)
            for ref_name, target in _read_references(fs, protocol, folder).items():
                named.setdefault(posixpath.join(folder, ref_name), target)
    return [named[k] for k in sorted(named)]


def parquet_files(uri: str) -> list[str]:
    """The Parquet files `uri` names, as full URIs: the file itself, every `*.parquet`
    below a folder (temporary files left out) with the files its `_parts.json` references
    (in the order of their names in the folder), or the matches of a glob (`*`, `?`, `[`),
    sorted. Empty when nothing matches."""
    protocol, _ = _split(uri)
    fs, path = filesystem(uri)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    else:
        files = _folder_files(uri, fs, path)  # one listing; a file lists as itself
        if files or not path.endswith(".parquet"):
            return files
        found = [path] if fs.exists(path) else []
    files = sorted(p for p in found if p.endswith(".parquet") and TMP_MARK not in p)
    return [_uri(protocol, p) for p in files]


def parquet_rows(uris: list[str]) -> int:
    """The rows of these Parquet files together, from their footers (no data is read)."""
    import pyarrow.parquet as pq

    total = 0
    for u in uris:
        fs, path = filesystem(u)
        with fs.open(path, "rb") as fh:
            total += pq.read_metadata(fh).num_rows
    return total


def polars_storage_options(uri: str) -> dict[str, str] | None:
    """croco's endpoint and credentials for `uri` in the form polars' native readers
    (`pl.scan_parquet`) take; None for local paths. Whatever is not set here polars takes
    from the environment (AWS_*)."""
    protocol, _ = _split(uri)
    if protocol == "file":
        return None
    opts = _storage_options(protocol)
    names = {"endpoint_url": "aws_endpoint_url", "key": "aws_access_key_id",
             "secret": "aws_secret_access_key", "token": "aws_session_token"}
    out = {names[k]: v for k, v in opts.items() if k in names}
    region = (opts.get("client_kwargs") or {}).get("region_name")
    if region:
        out["aws_region"] = region
    if out.get("aws_endpoint_url", "").startswith("http://"):
        out["aws_allow_http"] = "true"
    return out


def scan_parquet(uri: str) -> pl.LazyFrame:
    """A lazy scan of one Parquet file (local or object storage) with polars' native reader,
    so that `select` reads only the projected columns."""
    import polars as pl

    protocol, _ = _split(uri)
    path = os.path.abspath(_split(uri)[1]) if protocol == "file" else uri
    return pl.scan_parquet(path, storage_options=polars_storage_options(uri),
                           hive_partitioning=False)


def list_dir(uri: str) -> list[str]:
    """Names (not paths) directly under `uri`; empty if it does not exist."""
    fs, path = filesystem(uri)
    try:
        if _is_local(fs):
            found = fs.ls(path, detail=False) if fs.isdir(path) else []
        elif hasattr(fs, "_lsdir"):
            # one listing (paged): `ls` lists the parent too when the folder is empty
            from fsspec.asyn import sync

            found = [e["name"] for e in sync(fs.loop, fs._lsdir, path, refresh=True)]
        else:
            found = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in found)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    _forget_kept(_ref_key(_split(uri)[0], path))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def redact(text: str) -> str:
    """Remove any credential present in the environment from `text` before it is shown."""
    secrets = [os.environ.get(var) for var in
               ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN")]
    secrets += [_s3_credentials.get(k) for k in ("key", "secret", "token")]
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
