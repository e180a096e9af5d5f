"""The sample and score stores behind a run's generate and score outputs: a run's outputs
reference the stored shards they take whole instead of copying them, a plan reads the
store's index instead of every shard's prompts file, and object-store writes are single
PUTs."""

from __future__ import annotations

import json

import polars as pl
import pytest

from croco import storage
from croco.config import (
    ClassifierScorer,
    GenerationConfig,
    PolicyConfig,
    PromptsConfig,
    RewardConfig,
)
from croco.stages import run_generate, run_prompts, run_score


def _tree_bytes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _prompts(tmp_path, name: str, n: int, lang: str = "de") -> str:
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps({"prompt_id": f"p{i}", "lang": lang,
                                     "prompt": f"Frage {i}?", "split": "train"}) + "\n"
                         for i in range(n)))
    return str(f)


@pytest.fixture
def gen():
    return GenerationConfig(k=3, max_new_tokens=4, batch_size=16, shard_size=4)


def test_a_grown_source_references_the_stored_shards_and_writes_only_the_new_ones(
        tiny_lm, tiny_rm, tmp_path, gen):
    root = tmp_path / "data"
    policy = PolicyConfig(model=tiny_lm)
    reward = RewardConfig(scorers=[ClassifierScorer(name="rm", model=tiny_rm)])

    def run(n: int):
        pcfg = PromptsConfig(path=_prompts(tmp_path, f"src{n}", n), limit=None)
        prompts_uri = run_prompts(pcfg, "de", str(root))
        gens = run_generate(prompts_uri, "de", policy, gen, pcfg, str(root))
        return gens, run_score(gens, prompts_uri, "de", reward, str(root))

    gens8, scores8 = run(8)
    before = _tree_bytes(root)
    gens10, scores10 = run(10)  # two new prompts: one new shard of 2
    after = _tree_bytes(root)
    new = {p: size for p, size in after.items() if p not in before}

    # the outputs hold no part file: every part is a whole stored shard, referenced
    for out in (gens8, scores8, gens10, scores10):
        assert not [n for n in storage.list_dir(out) if n.endswith(".parquet")], out
        assert storage.list_dir(out) == [storage.SUCCESS, storage.REFERENCES]
    assert len(storage.references(gens10)) == 3 and len(storage.references(scores10)) == 3
    # what the second run wrote into the stores is the new shard's samples and scores only
    stored_new = {p: s for p, s in new.items() if p.startswith(("samples/", "scored/"))
                  and not p.rsplit("/", 1)[-1].startswith("_")}
    assert len([p for p in stored_new if p.startswith("samples/")
                and not p.endswith(".prompts.parquet")]) == 1
    assert len([p for p in stored_new if p.startswith("scored/")]) == 1
    view_bytes = sum(s for p, s in new.items() if p.startswith(("generations/", "scores/")))
    data_bytes = sum(s for p, s in stored_new.items() if not p.endswith(".prompts.parquet"))
    assert view_bytes < data_bytes  # a view costs less than the new samples themselves

    # readers see every row, in part order, as if the parts were copies
    rows = storage.read_parquet(gens10)
    assert rows.height == 10 * gen.k
    assert rows.filter(pl.col("prompt_id").is_in([f"p{i}" for i in range(8)])).equals(
        storage.read_parquet(gens8))
    scores = storage.read_parquet(scores10)
    assert scores.select("prompt_id", "sample_idx").equals(rows.select("prompt_id",
                                                                       "sample_idx"))
    info = storage.read_json(storage.join(scores10, storage.SUCCESS))
    assert info["rows"] == 10 * gen.k and info["referenced"] == 3


def test_a_part_that_takes_some_of_a_shard_is_written_and_the_others_referenced(
        tiny_lm, tmp_path, gen):
    root = str(tmp_path / "data")
    policy = PolicyConfig(model=tiny_lm)
    src = _prompts(tmp_path, "src", 8)
    full = PromptsConfig(path=src, limit=None)
    run_generate(run_prompts(full, "de", root), "de", policy, gen, full, root)
    fewer = PromptsConfig(path=src, limit=6)  # all of shard 1, half of shard 2
    gens = run_generate(run_prompts(fewer, "de", root), "de", policy, gen, fewer, root)
    assert [n for n in storage.list_dir(gens) if n.endswith(".parquet")] == [
        "part-00001.parquet"]
    assert list(storage.references(gens)) == ["part-00000.parquet"]
    files = storage.parquet_files(gens)
    assert files[0] == storage.references(gens)["part-00000.parquet"]
    assert files[1] == storage.join(gens, "part-00001.parquet")
    rows = storage.read_parquet(gens)
    assert sorted(rows["prompt_id"].unique()) == [f"p{i}" for i in range(6)]


def test_a_plan_reads_the_store_index_not_every_shards_prompts_file(
        tiny_lm, tmp_path, gen, monkeypatch):
    from croco.samples import STORE_INDEX, _store_index, stored_shards
    from croco.stages import generation_plan

    root = str(tmp_path / "data")
    policy = PolicyConfig(model=tiny_lm)
    src = _prompts(tmp_path, "src", 12)
    pcfg = PromptsConfig(path=src, limit=None)
    prompts_uri = run_prompts(pcfg, "de", root)
    gens = run_generate(prompts_uri, "de", policy, gen, pcfg, root)
    store = json.loads(storage.read_bytes(
        storage.join(gens, "..", "_plans", "lang=de.json")))["store"]
    assert len(stored_shards(store)) == 3

    read = []
    real = storage.read_parquet
    monkeypatch.setattr(storage, "read_parquet", lambda uri: read.append(uri) or real(uri))
    # the plan that made the shards indexed them: the next plan reads no prompts file
    index = real(storage.join(store, STORE_INDEX))
    assert index.height == 12 and index["shard"].n_unique() == 3
    generation_plan(prompts_uri, "de", policy, gen, PromptsConfig(path=src, limit=10), root)
    assert not [u for u in read if u.endswith(".prompts.parquet")]
    # a store without an index (made before there was one): the first plan over it reads
    # the shards' prompts files once and indexes them
    storage.remove(storage.join(store, STORE_INDEX))
    read.clear()
    generation_plan(prompts_uri, "de", policy, gen, PromptsConfig(path=src, limit=9), root)
    assert len([u for u in read if u.endswith(".prompts.parquet")]) == 3
    index = real(storage.join(store, STORE_INDEX))
    assert index.height == 12 and index["shard"].n_unique() == 3
    # later plans read the index only
    read.clear()
    plan = generation_plan(prompts_uri, "de", policy, gen, PromptsConfig(path=src, limit=8),
                           root)
    assert [p["whole"] for p in plan["parts"]] == [True, True]
    assert not [u for u in read if u.endswith(".prompts.parquet")]

    # a plan indexes the shards it adds before they are sampled; until they are, they are
    # not in the store for any other plan
    bigger = _prompts(tmp_path, "bigger", 16)
    planned = generation_plan(prompts_uri, "de", policy, gen, PromptsConfig(path=src, limit=None),
                              root)
    assert len(planned["parts"]) == 3  # the same 12 prompts: nothing new
    new_uri = run_prompts(PromptsConfig(path=bigger, limit=None), "de", root)
    planned = generation_plan(new_uri, "de", policy, gen, PromptsConfig(path=bigger, limit=None),
                              root)
    new_shards = {p["shard"] for p in planned["parts"]} - set(stored_shards(store))
    assert new_shards
    assert new_shards <= set(real(storage.join(store, STORE_INDEX))["shard"])
    assert not new_shards & set(_store_index(store)["shard"])

    # the prompts files are the truth: a shard gone from the store is not reused, whatever
    # the index says
    shard = plan["parts"][0]["shard"]
    storage.remove(storage.join(store, f"{shard}.prompts.parquet"))
    assert shard in real(storage.join(store, STORE_INDEX))["shard"].to_list()
    assert shard not in _store_index(store)["shard"].to_list()


def test_an_object_store_write_is_one_put(s3_bucket, monkeypatch):
    import s3fs

    calls = []
    real = s3fs.S3FileSystem._call_s3

    async def record(self, method, *args, **kwargs):
        calls.append(method if isinstance(method, str) else method.__name__)
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", record)
    uri = f"s3://{s3_bucket}/data/x/part-00000.parquet"
    storage.write_parquet(pl.DataFrame({"a": [1, 2, 3]}), uri)
    assert calls == ["put_object"]
    assert storage.read_parquet(uri)["a"].to_list() == [1, 2, 3]
    assert storage.list_dir(f"s3://{s3_bucket}/data/x") == ["part-00000.parquet"]


def test_references_resolve_on_an_object_store_and_survive_a_moved_root(s3_bucket, tmp_path):
    for root in (f"s3://{s3_bucket}/a", str(tmp_path / "a")):
        stored = storage.join(root, "samples", "k", "lang=de", "s1.parquet")
        storage.write_parquet(pl.DataFrame({"x": [1, 2]}), stored)
        view = storage.join(root, "generations", "g", "lang=de")
        storage.write_parquet(pl.DataFrame({"x": [3]}), storage.join(view, "part-00001.parquet"))
        storage.write_references(view, {"part-00000.parquet": stored})
        assert storage.parquet_files(view) == [stored, storage.join(view, "part-00001.parquet")]
        assert storage.read_parquet(view)["x"].to_list() == [1, 2, 3]
        assert storage.read_parquet(storage.join(root, "generations"))["x"].to_list() == [1, 2, 3]
        assert storage.parquet_rows(storage.parquet_files(view)) == 3
        raw = json.loads(storage.read_bytes(storage.join(view, storage.REFERENCES)))
        assert raw["files"] == {"part-00000.parquet": "../../../samples/k/lang=de/s1.parquet"}
    # a local root copied elsewhere keeps its references
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = storage.join(str(tmp_path / "b"), "generations", "g", "lang=de")
    assert storage.parquet_files(moved)[0] == str(tmp_path / "b" / "samples" / "k" /
                                                  "lang=de" / "s1.parquet")


def test_one_process_reads_back_what_it_just_wrote_without_a_request(
        tiny_lm, tiny_rm, tmp_path, gen, s3_bucket, monkeypatch):
    """Prompts, generate and score of a grown source in one process on an object store:
    the generate stage reads no prompts file back and lists the store once (its plan's
    listing), the score stage reads neither the plan nor the new shard's prompts file
    back; each is still read by a process that did not write it."""
    import s3fs

    from croco.samples import plan_uri

    root = f"s3://{s3_bucket}/data"
    policy = PolicyConfig(model=tiny_lm)
    reward = RewardConfig(scorers=[ClassifierScorer(name="rm", model=tiny_rm)])
    calls: list[tuple[str, str]] = []
    real = s3fs.S3FileSystem._call_s3

    async def record(self, method, *args, **kwargs):
        name = method if isinstance(method, str) else method.__name__
        calls.append((name, kwargs.get("Key") or kwargs.get("Prefix") or ""))
        return await real(self, method, *args, **kwargs)

    def run(n: int):
        pcfg = PromptsConfig(path=_prompts(tmp_path, f"src{n}", n), limit=None)
        prompts_uri = run_prompts(pcfg, "de", root)
        gens = run_generate(prompts_uri, "de", policy, gen, pcfg, root)
        return prompts_uri, gens, run_score(gens, prompts_uri, "de", reward, root)

    run(8)
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", record)
    prompts_uri, gens, scores = run(10)  # one new shard of 2
    gets = [key for name, key in calls if name == "get_object"]
    assert not [k for k in gets if k.endswith("/data.parquet") and "/prompts/" in k]
    assert not [k for k in gets if k.endswith(".prompts.parquet")]
    # the plan: looked for once (not there yet), written, never read back
    plan_calls = [name for name, k in calls if "/_plans/" in k]
    assert plan_calls == ["get_object", "put_object"]
    store = json.loads(storage.read_bytes(
        plan_uri(gens)))["store"]
    store_key = store.split("://", 1)[1].split("/", 1)[1]
    listings = [k for name, k in calls if name == "list_objects_v2"
                and k.rstrip("/") == store_key]
    assert len(listings) == 1
    assert storage.read_parquet(scores).height == 10 * gen.k

    # another process has none of them in memory: it reads them
    storage._forget_kept(root)
    calls.clear()
    assert storage.read_parquet(storage.join(prompts_uri, "data.parquet")).height == 10
    storage.read_json(plan_uri(gens))
    assert [name for name, _ in calls] == ["get_object", "get_object"]


def test_shard_groups_of_a_plan_made_beforehand_write_and_seal_every_part(
        tiny_lm, tmp_path, gen):
    """The plan is made once before the shard groups start (`prepare`, where the flow
    runs); the groups and the seal read it back and ask the store which parts exist: none
    takes the listing of a plan it did not make (the seal would find the parts the groups
    wrote elsewhere missing)."""
    from croco.stage import run, seal
    from croco.stages import Generate

    root = str(tmp_path / "data")
    pcfg = PromptsConfig(path=_prompts(tmp_path, "src", 12), limit=None)
    prompts_uri = run_prompts(pcfg, "de", root)
    stage = Generate(prompts_uri=prompts_uri, lang="de", policy=PolicyConfig(model=tiny_lm),
                     gen=gen, prompts_cfg=pcfg)
    stage.prepare(root)
    parts = stage.parts(root)
    assert parts.count == 3 and parts.stored_at_planning is None  # read back: lists
    for shards in (range(0, 2), range(2, 3)):
        run(stage, root, shards=shards)
    out = seal(stage, root)
    done = storage.marker_info(out)
    assert done["rows"] == 12 * gen.k
    assert done["generated_rows"] == 12 * gen.k and done["groups"] == 2
    assert storage.read_parquet(out).height == 12 * gen.k


def test_a_flow_asks_for_every_language_at_once_and_looks_for_no_plan_the_listing_lacks(
        tiny_lm, tmp_path, gen, s3_bucket, s3_requests):
    """What the flow does on an object store (`croco.stage.incomplete`, then each call run
    as checked): one listing for the generate outputs of both languages, no HEAD each; the
    language without a plan makes one without first asking for it, the language whose plan
    an interrupted run left reads and keeps that plan."""
    from croco.samples import plan_uri
    from croco.stage import incomplete, run
    from croco.stages import Generate

    root = f"s3://{s3_bucket}/flow"
    policy = PolicyConfig(model=tiny_lm)
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"prompt_id": f"p{i}", "lang": lang, "prompt": f"Q {i}?",
                                       "split": "train"}) + "\n"
                           for lang in ("de", "fr") for i in range(6)))
    pcfg = PromptsConfig(path=str(src), limit=None)
    stages = [Generate(prompts_uri=run_prompts(pcfg, lang, root), lang=lang, policy=policy,
                       gen=gen, prompts_cfg=pcfg) for lang in ("de", "fr")]
    de, fr = stages
    de.prepare(root)  # an earlier run planned de, then stopped
    planned = storage.read_json(plan_uri(de.output(root)))
    storage._forget_kept(root)  # that run's process is gone

    s3_requests()
    assert incomplete(stages, root) == stages
    for stage in stages:
        run(stage, root, checked=True)
    seen = s3_requests()
    gen_key = de.output(root).split("://", 1)[1].split("/", 1)[1].rsplit("/", 1)[0]
    output_requests = [(m, p) for m, p in seen if gen_key in p]
    assert [m for m, p in output_requests if m == "LIST"] == ["LIST"]  # one listing
    assert not [p for m, p in output_requests if m == "HEAD"]
    plans = [(m, p.rsplit("/", 1)[-1]) for m, p in output_requests if "/_plans/" in p]
    assert sorted(plans) == [("GET", "lang=de.json"), ("PUT", "lang=fr.json")]
    assert storage.read_json(plan_uri(de.output(root))) == planned
    for stage in stages:
        assert storage.is_complete(stage.output(root))
        assert storage.read_parquet(stage.output(root)).height == 6 * gen.k
