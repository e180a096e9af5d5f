"""The pair stage on shards: `run_pairs` writes what the stage wrote before it read only the
score columns, and `croco pairs build` runs it on a scored set made elsewhere."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from croco import storage
from croco.config import PairingConfig
from croco.pairing import build_pairs, build_sft
from croco.flows.cli import app

runner = CliRunner()


# ------------------------------------------------------- run_pairs against the old stage


@pytest.mark.parametrize("pairing", [
    PairingConfig(),
    # Not q1: its target is often the midpoint of two samples, where rule 3's tie now decides
    # by pool order and the old code by rounding. The 20th percentile never is.
    PairingConfig(scope="all_lang", reject_target="percentile:20", prompt_source="random", seed=3,
                  drop_truncated=True, normalize="zscore_per_lang"),
], ids=["default", "all_lang-options"])
def test_run_pairs_writes_what_the_old_stage_wrote(tmp_path, pairing):
    from benchmarks.pairing_scale import old_run_pairs, write_scored_set
    from croco.stages import run_pairs

    # 3 languages x 10 prompts x 8 samples of ~300 characters, shards of 3 prompts.
    score_uris, prompts_uris = write_scored_set(
        str(tmp_path / "set"), 10 * 3 * 8 * 300 / 1e9, langs=["de", "en", "fr"], k=8,
        text_bytes=300, shard_prompts=3, corpus_words=20_000)
    assert len(list((tmp_path / "set" / "scores").rglob("part-*.parquet"))) == 12
    new = Path(run_pairs(score_uris, prompts_uris, pairing, str(tmp_path / "data")))
    old = Path(old_run_pairs(score_uris, prompts_uris, pairing, str(tmp_path / "old")))
    assert (new / "_SUCCESS").exists()
    for sub in ("dpo", "sft"):
        for lang in ("de", "en", "fr"):
            got = pl.read_parquet(new / sub / f"lang={lang}" / "data.parquet")
            want = pl.read_parquet(old / sub / f"lang={lang}" / "data.parquet")
            assert_frame_equal(got, want)
    assert pl.read_parquet(new / "dpo", hive_partitioning=False).height > 5
    assert_frame_equal(pl.read_parquet(new / "stats.parquet"),
                       pl.read_parquet(old / "stats.parquet"))
    pools = pl.read_parquet(new / "pools.parquet")
    assert "chosen" not in pools.columns and "rejected" not in pools.columns
    assert_frame_equal(pools, pl.read_parquet(old / "pools.parquet").select(pools.columns))


# ----------------------------------------------------- the pair stage in batches of pools


def _split_set(root: Path) -> list[str]:
    """3 languages x 7 prompts x 5 samples, the languages' shards cut at different prompts,
    one pool's samples split across two shards of en, and a shard of de that holds two
    prompts' samples out of order: the batches must follow the pools, not the shards."""
    import numpy as np

    rng = np.random.default_rng(7)
    cuts = {"de": [["p0", "p3"], ["p1", "p2", "p4"], ["p5", "p6"]],
            "en": [["p0", "p1", "p2"], ["p3", "p4"], ["p5", "p6"]],
            "fr": [["p0"], ["p1", "p2", "p3", "p4", "p5", "p6"]]}
    parts = []
    for lang, shards in cuts.items():
        frames = []
        for pids in shards:
            n = 5 * len(pids)
            frames.append(pl.DataFrame({
                "prompt_id": [p for p in pids for _ in range(5)], "lang": [lang] * n,
                "sample_idx": [i for _ in pids for i in range(5)],
                "response": [f"{p}/{lang}/{i}" for p in pids for i in range(5)],
                "reward": rng.normal(0, 1, n).round(1),  # ties too
                "finish_reason": rng.choice(["stop", "length"], n, p=[0.8, 0.2]).tolist(),
                "detected_lang": rng.choice([lang, "xx"], n, p=[0.9, 0.1]).tolist()}))
        if lang == "en":  # p4's samples 3 and 4 move to a shard of their own
            p4 = frames[1].filter((pl.col("prompt_id") == "p4") & (pl.col("sample_idx") >= 3))
            frames[1] = frames[1].filter(~((pl.col("prompt_id") == "p4")
                                           & (pl.col("sample_idx") >= 3)))
            frames.append(p4)
        for i, frame in enumerate(frames):
            uri = str(root / f"lang={lang}" / f"part-{i:05d}.parquet")
            storage.write_parquet(frame, uri)
            parts.append(uri)
    return parts


def test_batches_keep_every_pool_whole():
    from croco.pairs_io import batches

    keys = [pl.DataFrame({"prompt_id": pids, "lang": [lang] * len(pids),
                          "len": [4] * len(pids)}, schema_overrides={"len": pl.UInt32})
            for lang, pids in (("en", ["a", "b"]), ("de", ["a"]), ("en", ["c"]),
                               ("en", ["b", "d"]), ("de", ["d"]))]
    # in_lang: en's a/b shard shares b with the 4th; everything else stands alone
    assert batches(keys, "in_lang", max_rows=1) == [[0, 3], [1], [2], [4]]
    # all_lang: a joins shards 0 and 1, b joins 0 and 3, d joins 3 and 4
    assert batches(keys, "all_lang", max_rows=1) == [[0, 1, 3, 4], [2]]
    # whole groups are packed up to the row budget, in order of their first shard
    assert batches(keys, "in_lang", max_rows=12) == [[0, 3], [1, 2, 4]]
    assert batches(keys, "in_lang", max_rows=10**9) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("pairing", [
    PairingConfig(),
    PairingConfig(scope="all_lang"),
    PairingConfig(reject_target="q1", min_gap=0.3, drop_truncated=True),
    PairingConfig(scope="all_lang", reject_target="percentile:30", prompt_source="rejected",
                  drop_wrong_lang=True),
    PairingConfig(scope="all_lang", reject_target="min", drop_truncated=True),
    # the options that need every pool at once run in one batch whatever the budget
    PairingConfig(reject_target="random", seed=5),
    PairingConfig(scope="all_lang", prompt_source="random", seed=2),
    PairingConfig(normalize="zscore_per_lang", scope="all_lang"),
], ids=["default", "all_lang", "q1-filters", "all_lang-percentile", "all_lang-min",
        "random", "random-prompt", "zscore"])
def test_the_pair_stage_in_batches_writes_what_one_selection_over_the_set_writes(
        tmp_path, pairing):
    from croco.pairing import pair_sets
    from croco.pairs_io import pair_shards, pool_keys, read_scores

    parts = _split_set(tmp_path)
    scores = read_scores(parts)
    prompts = scores.select("prompt_id", "lang").unique().with_columns(
        prompt=pl.format("{} in {}", "prompt_id", "lang"))
    whole = pair_sets(scores.drop("_part", "_part_row"), prompts,
                      texts=lambda rows: pl.read_parquet(parts)["response"].gather(rows),
                      **pairing.model_dump())
    batched = pair_shards(parts, prompts, pairing, max_rows=1)
    assert whole.dpo.height >= 5
    assert_frame_equal(batched.dpo, whole.dpo)
    assert_frame_equal(batched.sft, whole.sft)
    assert_frame_equal(batched.pools, whole.pools)
    # the stats add up batch by batch: equal to rounding
    assert_frame_equal(batched.stats, whole.stats, check_exact=False, rel_tol=1e-12)
    assert_frame_equal(pair_shards(parts, prompts, pairing).dpo, whole.dpo)
    if pairing.model_dump() == PairingConfig().model_dump():
        from croco.pairs_io import batches
        assert len(batches(pool_keys(parts), "in_lang", max_rows=1)) == 8


# --------------------------------------------------------------------- croco pairs build


def _scored(pid: str, lang: str, rewards: list[float], **extra) -> pl.DataFrame:
    n = len(rewards)
    return pl.DataFrame({
        "prompt_id": [pid] * n, "lang": [lang] * n, "sample_idx": list(range(n)),
        "response": [f"{pid}/{lang}/{i}" for i in range(n)], "reward": rewards,
        "finish_reason": ["stop"] * n, "detected_lang": [lang] * n, **extra})


@pytest.fixture
def scored_set(tmp_path) -> Path:
    """en and de, prompts q0..q2, four samples each, in two shards per language."""
    root = tmp_path / "scored"
    for lang in ("en", "de"):
        for part, pids in enumerate((["q0", "q1"], ["q2"])):
            df = pl.concat([_scored(p, lang, [1.0, 4.0 + i, 2.0, 0.5]) for i, p in
                            enumerate(pids)])
            storage.write_parquet(df, str(root / f"lang={lang}" / f"part-{part:05d}.parquet"))
    return root


def _build(scores, prompts, out, *extra) -> object:
    return runner.invoke(app, ["pairs", "build", "--scores", str(scores), "--prompts",
                               str(prompts), "--out", str(out), *extra])


def test_pairs_build_writes_the_pipeline_layout_and_prints_stats(tmp_path, scored_set,
                                                                   prompt_file):
    out = tmp_path / "pairs"
    result = _build(scored_set, prompt_file, out)
    assert result.exit_code == 0, result.output
    assert "6 pairs (in_lang, mean_minus_2sigma)" in result.output
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == {
        "dpo/lang=de/data.parquet", "dpo/lang=en/data.parquet", "sft/lang=de/data.parquet",
        "sft/lang=en/data.parquet", "pools.parquet", "stats.parquet", "_SUCCESS"}
    # Pools 1, 4+i, 2, 0.5: chosen sample 1; mean - 2 std is below 0.5, so rejected is 3.
    scores = pl.read_parquet(scored_set, hive_partitioning=False)
    prompts = pl.read_ndjson(prompt_file)
    dpo = pl.read_parquet(out / "dpo" / "lang=en" / "data.parquet")
    assert dpo.select("prompt_id", "prompt", "chosen", "rejected").rows() == [
        ("q0", "Name a fruit.", "q0/en/1", "q0/en/3"),
        ("q1", "What is rain?", "q1/en/1", "q1/en/3"),
        ("q2", "Give a tip for sleep.", "q2/en/1", "q2/en/3")]
    assert_frame_equal(pl.read_parquet(out / "dpo", hive_partitioning=False).sort("prompt_id", "prompt_lang"),
                       build_pairs(scores, prompts).sort("prompt_id", "prompt_lang"))
    assert_frame_equal(pl.read_parquet(out / "sft", hive_partitioning=False).sort("prompt_id", "lang"),
                       build_sft(scores, prompts).sort("prompt_id", "lang"))
    assert storage.read_json(str(out / "_SUCCESS"))["rows"] == 6


def test_pairs_build_takes_pairing_settings_a_glob_and_lang_folders(tmp_path, scored_set,
                                                                     prompt_file):
    # The shards without a lang column: the language comes from the lang=xx folder.
    bare = tmp_path / "bare"
    for f in scored_set.rglob("*.parquet"):
        target = bare / f.relative_to(scored_set)
        storage.write_parquet(pl.read_parquet(f).drop("lang"), str(target))
    out = tmp_path / "pairs"
    result = _build(f"{bare}/lang=*/part-*.parquet", prompt_file, out,
                    "--set", "pairing.scope=all_lang", "--set", "pairing.reject_target=min")
    assert result.exit_code == 0, result.output
    assert "3 pairs (all_lang, min)" in result.output
    dpo = pl.read_parquet(out / "dpo", hive_partitioning=False)
    # all_lang pools of 8: de and en tie at 4+i; de sorts first, so chosen is de's sample 1.
    assert dpo.select("prompt_id", "chosen", "rejected").sort("prompt_id").rows() == [
        ("q0", "q0/de/1", "q0/de/3"), ("q1", "q1/de/1", "q1/de/3"),
        ("q2", "q2/de/1", "q2/de/3")]
    assert set(dpo["pool_size"]) == {8}


def _assert_failed_cleanly(result, out: Path, *fragments: str) -> None:
    assert result.exit_code != 0
    assert "error:" in result.output
    flat = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in flat, result.output
    assert not out.exists() or not any(out.iterdir())


def test_a_missing_column_names_the_file_and_the_column(tmp_path, scored_set, prompt_file):
    bad = scored_set / "lang=de" / "part-00001.parquet"
    storage.write_parquet(pl.read_parquet(bad).drop("reward"), str(bad))
    out = tmp_path / "pairs"
    _assert_failed_cleanly(_build(scored_set, prompt_file, out), out,
                           "part-00001.parquet: no column 'reward'")


def test_a_reward_of_strings_is_a_type_error(tmp_path, scored_set, prompt_file):
    bad = scored_set / "lang=en" / "part-00000.parquet"
    storage.write_parquet(pl.read_parquet(bad).with_columns(pl.col("reward").cast(pl.String)),
                          str(bad))
    out = tmp_path / "pairs"
    _assert_failed_cleanly(_build(scored_set, prompt_file, out), out,
                           "part-00000.parquet: column 'reward' is String, expected a number")


def test_an_empty_scored_set_is_an_error(tmp_path, prompt_file):
    empty = tmp_path / "empty"
    storage.write_parquet(_scored("q0", "en", [1.0]).clear(),
                          str(empty / "lang=en" / "part-00000.parquet"))
    out = tmp_path / "pairs"
    _assert_failed_cleanly(_build(empty, prompt_file, out), out, "the scored set is empty")
    _assert_failed_cleanly(_build(tmp_path / "nowhere", prompt_file, out), out,
                           "no Parquet files found")


def test_a_scored_language_without_prompts_is_an_error(tmp_path, prompt_file):
    scores = tmp_path / "scored"
    storage.write_parquet(_scored("q0", "it", [1.0, 2.0]),
                          str(scores / "lang=it" / "part-00000.parquet"))
    out = tmp_path / "pairs"
    _assert_failed_cleanly(_build(scores, prompt_file, out), out,
                           "no prompt text in scored language(s) ['it']")


def test_a_non_empty_out_and_non_pairing_settings_are_refused(tmp_path, scored_set,
                                                              prompt_file):
    out = tmp_path / "pairs"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _build(scored_set, prompt_file, out)
    assert result.exit_code != 0 and "is not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = _build(scored_set, prompt_file, tmp_path / "other", "--set", "generation.k=2")
    assert result.exit_code != 0 and "pairing.* settings only" in result.output
    assert not (tmp_path / "other").exists()


def test_pairs_build_on_s3(s3_bucket, scored_set, prompt_file):
    root = f"s3://{s3_bucket}"
    for f in sorted(scored_set.rglob("*.parquet")):
        storage.write_bytes(f"{root}/scored/{f.relative_to(scored_set).as_posix()}",
                            f.read_bytes())
    result = _build(f"{root}/scored", prompt_file, f"{root}/pairs")
    assert result.exit_code == 0, result.output
    assert storage.is_complete(f"{root}/pairs")
    dpo = storage.read_parquet(f"{root}/pairs/dpo").sort("prompt_id", "prompt_lang")
    assert dpo.height == 6
    assert dpo.row(0, named=True)["chosen"] == "q0/de/1"


def test_polars_reads_projected_columns_on_s3(s3_bucket):
    uri = f"s3://{s3_bucket}/t/part-00000.parquet"
    storage.write_parquet(pl.DataFrame({"a": [1, 2], "b": ["x", "y"]}), uri)
    assert storage.parquet_files(f"s3://{s3_bucket}/t") == [uri]
    assert storage.scan_parquet(uri).select("b").collect()["b"].to_list() == ["x", "y"]
