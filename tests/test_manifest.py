"""The run manifest: the typed record of a run's outputs, described and read back."""

from __future__ import annotations

import json
from functools import partial

from croco import storage
from croco.manifest import (
    EvaluationOutputs,
    RoundOutputs,
    RunOutputs,
    StageOutput,
    VariantOutputs,
    read_outputs,
    write_manifest,
)


def _output(root, stage: str, key: str, lang: str | None = None, **info) -> str:
    uri = storage.join(str(root), stage, key, *([f"lang={lang}"] if lang else []))
    storage.mark_complete(uri, {"rows": 3, "seconds": 0.5, **info})
    return uri


def _keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_the_manifest_stores_the_run_outputs_described_and_reads_them_back(tmp_path):
    o = partial(_output, tmp_path)
    outputs = RunOutputs[str](
        prompts={"en": o("prompts", "p1", "en")}, scores={"en": o("scores", "s1", "en")},
        pairs=o("pairs", "a1"),
        variants={
            "offp": VariantOutputs[str](
                scores={"en": o("scores", "s2", "en")},
                rounds=[RoundOutputs[str](pairs=o("pairs", "a2"), training=o(
                    "training", "t1", method="dpo", off_policy=True,
                    generation_policy="other/model"))]),
            "iter": VariantOutputs[str](rounds=[
                RoundOutputs[str](pairs=o("pairs", "a1"), training=o("training", "t2")),
                RoundOutputs[str](scores={"en": o("scores", "s3", "en")},
                                  pairs=o("pairs", "a3"), training=o("training", "t3"))]),
            "pl": VariantOutputs[str](rounds=[RoundOutputs[str](
                pairs=o("pairs", "a1"), training_by_lang={"en": o("training", "t4")})])},
        evaluation=EvaluationOutputs[str](
            scores={"base": {"en": o("scores", "e1", "en")}}, heldout=o("runs", "h"),
            judgments={"offp": o("judgments", "j1", first_position_share=0.5)}))
    uri = write_manifest(str(tmp_path), "r1", {"languages": ["en"]}, outputs)
    manifest = json.loads(storage.read_bytes(uri))
    # where an output belongs is its place in the record: no composite names to split
    assert not [k for k in _keys(manifest["outputs"]) if ":" in k]

    back = read_outputs(manifest)
    assert isinstance(back.pairs, StageOutput) and back.pairs.key == "a1"
    assert back.scores["en"].rows == 3 and back.scores["en"].seconds == 0.5
    assert back.scores["en"].uri == outputs.scores["en"]
    runs = back.training_runs()
    assert {k: v.key for k, v in runs.items()} == {
        "offp": "t1", "iter:round1": "t2", "iter:round2": "t3", "pl:en": "t4"}
    assert runs["offp"].off_policy is True and runs["offp"].generation_policy == "other/model"
    assert back.variants["iter"].final.key == "t3" and back.variants["pl"].final is None
    assert back.variants["iter"].rounds[1].scores["en"].key == "s3"
    assert back.variants["offp"].scores["en"].key == "s2"
    assert back.evaluation.judgments["offp"].first_position_share == 0.5
    assert back.evaluation.scores["base"]["en"].key == "e1"
