from __future__ import annotations

import polars as pl
import pytest

from croco import storage
from croco.config import PromptsConfig
from croco.stages import run_prompts


def test_local_write_is_atomic_and_marked(tmp_path):
    uri = str(tmp_path / "out")
    df = pl.DataFrame({"a": [1, 2]})
    storage.write_parquet(df, storage.join(uri, "lang=en", "data.parquet"))
    assert not storage.is_complete(uri)
    storage.mark_complete(uri, {"rows": 2})
    assert storage.is_complete(uri)
    assert storage.read_parquet(uri).to_dict(as_series=False) == {"a": [1, 2]}
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_temporary_files_are_never_read(tmp_path):
    (tmp_path / "x").mkdir()
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "x" / "part-00000.parquet")
    (tmp_path / "x" / "part-00001.parquet.tmp-abcd1234").write_bytes(b"half a file")
    assert storage.read_parquet(str(tmp_path / "x")).height == 1


def test_s3_round_trip(s3_bucket):
    root = f"s3://{s3_bucket}/runs"
    df = pl.DataFrame({"prompt_id": ["a", "b"], "reward": [0.5, -1.0]})
    storage.write_parquet(df, storage.join(root, "t", "lang=en", "part-00000.parquet"))
    storage.mark_complete(storage.join(root, "t", "lang=en"), {"rows": 2})
    assert storage.is_complete(storage.join(root, "t", "lang=en"))
    assert storage.read_parquet(storage.join(root, "t")).equals(df)
    assert storage.list_dir(storage.join(root, "t", "lang=en")) == ["_SUCCESS",
                                                                    "part-00000.parquet"]


def test_writing_to_a_missing_bucket_fails_and_creates_no_bucket(s3_bucket, s3_server):
    import boto3

    missing = f"{s3_bucket}-misspelt"
    with pytest.raises(FileNotFoundError, match=f"cannot write s3://{missing}/data/x.json"):
        storage.write_bytes(f"s3://{missing}/data/x.json", b"{}")
    buckets = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").list_buckets()
    assert missing not in [b["Name"] for b in buckets["Buckets"]]


def test_prompts_stage_on_s3(s3_bucket, prompt_file):
    uri = run_prompts(PromptsConfig(path=str(prompt_file)), "de", f"s3://{s3_bucket}/data")
    assert uri.startswith(f"s3://{s3_bucket}/data/prompts/")
    assert storage.is_complete(uri)
    df = storage.read_parquet(storage.join(uri, "data.parquet"))
    assert set(df["lang"]) == {"de"} and df.height == 6


def test_redact_hides_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    assert storage.redact("failed with key very-secret-value") == "failed with key ***"


@pytest.mark.parametrize("uri,expected", [("s3://b/p/", "s3://b/p"), ("rel/dir", None)])
def test_normalize_root(uri, expected, tmp_path):
    out = storage.normalize_root(uri)
    if expected:
        assert out == expected
    else:
        assert out.endswith("rel/dir") and out.startswith("/")


def test_adapter_identity_is_the_training_key_wherever_the_adapter_lives(tmp_path, monkeypatch):
    from croco.identity import path_identity, training_key_of_adapter

    monkeypatch.setenv("CROCO_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "adapters"
    assert training_key_of_adapter("/data/training/abc123/adapter") == "abc123"
    assert training_key_of_adapter(str(cache / "abc123")) == "abc123"
    assert training_key_of_adapter(f"{cache}/def456/") == "def456"
    assert path_identity("s3://bucket/training/abc123/adapter") == {"training": "abc123"}
    # Any other adapter folder is itself: by its content when it exists, else by name.
    assert training_key_of_adapter("/somewhere/adapters/my-lora") is None
    assert path_identity("/somewhere/my-lora") == "/somewhere/my-lora"
    mine = tmp_path / "my-lora"
    mine.mkdir()
    (mine / "adapter_config.json").write_text("{}")
    first = path_identity(str(mine))
    assert first["path"] == str(mine)
    (mine / "adapter_config.json").write_text('{"r": 8}')
    assert path_identity(str(mine)) != first


def _disk_fills_after(monkeypatch, n_bytes: int, code: int):
    """Local writes fail with `code` (ENOSPC, EDQUOT) once `n_bytes` are on disk, as a full
    filesystem fails them: part of the file is written first."""
    import os

    from fsspec.implementations.local import LocalFileOpener

    real_write = LocalFileOpener.write

    def write(self, data):
        real_write(self, bytes(data)[:n_bytes])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(LocalFileOpener, "write", write)


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_fails_in_one_line_naming_the_file_and_leaves_nothing(
        tmp_path, monkeypatch, code):
    import errno

    from croco.errors import UserError
    from croco.tasks.stages import _is_transient

    _disk_fills_after(monkeypatch, 100, getattr(errno, code))
    uri = str(tmp_path / "pairs" / "k1" / "data.parquet")
    with pytest.raises(storage.StorageFullError) as info:
        storage.write_parquet(pl.DataFrame({"a": list(range(10_000))}), uri)
    message = str(info.value)
    assert message.startswith(f"cannot write {uri}: ")
    assert "free space there (or raise the quota), then rerun" in message
    assert isinstance(info.value, UserError)  # exit 2, never retried
    assert not _is_transient(info.value)
    assert not _is_transient(OSError(getattr(errno, code), "raw"))  # raised elsewhere
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_stage_sweeps_temporary_files_a_killed_writer_left(tmp_path, prompt_file):
    import os
    import time

    from croco.stages import Prompts

    root = str(tmp_path)
    stage = Prompts(cfg=PromptsConfig(path=str(prompt_file)), lang="en")
    out = tmp_path / stage.where()
    out.mkdir(parents=True)
    stale = out / "data.parquet.tmp-dead0001"
    stale.write_bytes(b"half a file")
    hour_ago = time.time() - storage.STALE_TMP_SECONDS - 60
    os.utime(stale, (hour_ago, hour_ago))
    live = out / "other.parquet.tmp-live0001"  # a writer still at work
    live.write_bytes(b"being written")
    run_prompts(PromptsConfig(path=str(prompt_file)), "en", root)
    assert storage.is_complete(str(out))
    assert not stale.exists() and live.exists()


def test_a_view_this_process_wrote_is_resolved_without_a_request(s3_bucket, monkeypatch):
    """The `_SUCCESS` markers and `_parts.json` files this process wrote are read back from
    memory (the score stage reading the generations view the generate stage just made);
    removing the folder forgets them."""
    root = f"s3://{s3_bucket}/memo"
    shard = storage.join(root, "samples", "k", "lang=en", "s1.parquet")
    storage.write_parquet(pl.DataFrame({"x": [1, 2]}), shard)
    view = storage.join(root, "generations", "k", "lang=en")
    storage.write_references(view, {"part-00000.parquet": shard})
    storage.mark_complete(view, {"rows": 2, "shards": 1, "referenced": 1})

    reads: list[str] = []
    real = storage._cat
    monkeypatch.setattr(storage, "_cat", lambda fs, path: reads.append(path) or real(fs, path))
    assert storage.references(view) == {"part-00000.parquet": shard}
    assert storage.marker_info(view)["rows"] == 2
    assert reads == []
    assert storage.parquet_files(view) == [shard]  # a listing, no read of _parts.json
    assert reads == []

    storage.remove(view)
    assert storage.references(view) == {}
    assert reads == [f"{s3_bucket}/memo/generations/k/lang=en/_parts.json"]
    with pytest.raises(FileNotFoundError):
        storage.marker_info(view)


def test_a_kept_file_this_process_wrote_is_read_back_without_a_request(
        s3_bucket, tmp_path, monkeypatch):
    """`keep=True` (files that never change once written): read back from memory on an
    object store, never for a local file, not past the size limits, forgotten on
    `remove`."""
    root = f"s3://{s3_bucket}/kept"
    table = storage.join(root, "prompts", "k", "lang=en", "data.parquet")
    plan = storage.join(root, "generations", "g", "_plans", "lang=en.json")
    plain = storage.join(root, "other.json")
    storage.write_parquet(pl.DataFrame({"x": [1, 2]}), table, keep=True)
    storage.write_json(plan, {"parts": [1]}, keep=True)
    storage.write_json(plain, {"a": 1})
    local = str(tmp_path / "local.json")
    storage.write_json(local, {"b": 2}, keep=True)

    reads: list[str] = []
    real = storage._cat
    monkeypatch.setattr(storage, "_cat", lambda fs, path: reads.append(path) or real(fs, path))
    assert storage.read_parquet(table)["x"].to_list() == [1, 2]
    assert storage.read_json(plan) == {"parts": [1]}
    assert storage.is_file(plan)
    assert reads == []
    assert storage.read_json(plain) == {"a": 1}  # not kept: read
    assert storage.read_json(local) == {"b": 2}  # local: read from disk
    assert reads == [f"{s3_bucket}/kept/other.json", local]

    storage.remove(storage.join(root, "generations", "g"))
    reads.clear()
    with pytest.raises(FileNotFoundError):
        storage.read_json(plan)
    assert not storage.is_file(plan)
    assert storage.read_parquet(table)["x"].to_list() == [1, 2]  # the other one kept
    assert reads == [f"{s3_bucket}/kept/generations/g/_plans/lang=en.json"]

    # a file over the per-file limit is not kept; the oldest go past the total
    monkeypatch.setattr(storage, "KEEP_FILE_BYTES", 40)
    storage.write_bytes(storage.join(root, "big"), b"x" * 41, keep=True)
    monkeypatch.setattr(storage, "KEEP_BYTES", 50)
    for name in ("a", "b"):
        storage.write_bytes(storage.join(root, name), b"y" * 30, keep=True)
    reads.clear()
    for name in ("big", "a", "b"):
        storage.read_bytes(storage.join(root, name))
    assert reads == [f"{s3_bucket}/kept/big", f"{s3_bucket}/kept/a"]


def test_the_language_folders_of_an_output_are_asked_for_with_one_listing(
        s3_bucket, tmp_path, monkeypatch, s3_requests):
    """`complete_among`: on an object store, two or more language folders of one output
    cost one LIST (no HEAD each); a lone folder one HEAD; a marker this process wrote no
    request. The listing then says which files are not there (`absent_when_listed`) until
    this process writes them or it grows old."""
    root = f"s3://{s3_bucket}/among"
    out = storage.join(root, "generations", "g")
    de, fr, it = (storage.join(out, f"lang={x}") for x in ("de", "fr", "it"))
    for uri in (de, fr):
        storage.mark_complete(uri, {"rows": 1})
    storage.write_json(storage.join(out, "_plans", "lang=de.json"), {"parts": []})
    lone = storage.join(root, "pairs", "p")
    storage.mark_complete(lone)
    storage._forget_kept(root)  # as another process would: nothing in memory

    def requests() -> list[str]:
        return sorted(method for method, _ in s3_requests())

    requests()
    assert storage.complete_among([de, fr, it, lone]) == {de, fr, lone}
    assert requests() == ["HEAD", "LIST"]

    plan_it = storage.join(out, "_plans", "lang=it.json")
    assert storage.absent_when_listed(plan_it)
    assert not storage.absent_when_listed(storage.join(out, "_plans", "lang=de.json"))
    assert not storage.absent_when_listed(storage.join(root, "pairs", "p", "x.json"))
    assert not storage.absent_when_listed(str(tmp_path / "local.json"))
    assert requests() == []
    storage.write_json(plan_it, {"parts": [1]})  # written since the listing
    assert not storage.absent_when_listed(plan_it)
    monkeypatch.setattr(storage, "LISTED_SECONDS", 0.0)  # too old to go by
    assert not storage.absent_when_listed(storage.join(out, "_plans", "lang=fr.json"))

    requests()
    storage.mark_complete(it)  # this process wrote it: known without asking
    assert storage.complete_among([it]) == {it}
    assert requests() == ["PUT"]

    # a local root: each folder asked on disk
    local = [str(tmp_path / "o" / f"lang={x}") for x in ("de", "fr")]
    storage.mark_complete(local[0])
    assert storage.complete_among(local) == {local[0]}
