"""The training stage: one spec in (`croco.training.spec`), one training output out.

`train(spec, out)` writes `adapter/`, `metrics.json`, `training_config.json`,
`log_history.json` (the Trainer's log history: one record per logged step, held-out
evaluations, the closing summary), `curves.png` (`croco.evaluation.curves`) and, when
`training.report_to` resolves to TensorBoard, its event files in `runs/` (plus `merged/`
and a hub upload when asked) under `out` and returns what the output's `_SUCCESS`
records; the stage runner (`croco.stage.run_once`) writes that marker, last.
`run_train(spec)` is the two together at `<data_root>/training/<key>/`, for callers
outside the pipeline (the distributed launcher, tests); an output already complete is
returned at once. This module sits below `croco.stages` and the flows: it reads the stage
outputs it trains on by URI and needs nothing of the other stages.
"""

from __future__ import annotations

import polars as pl

from croco import storage
from croco.stage import run_once
from croco.training.spec import DPOSpec, OnlineDPOSpec, SFTSpec, TrainSpec


def run_train(spec: TrainSpec, *, callbacks: list | None = None) -> str:
    """Train the run `spec` describes unless its output is complete; its output URI.
    In a distributed run every process trains; only the main one writes the outputs and
    the marker."""
    from croco.training.common import is_main_process

    out = spec.uri()
    if storage.is_complete(out):
        return out
    if not is_main_process():
        train(spec, out, callbacks=callbacks)
        return out
    return run_once(out, lambda: train(spec, out, callbacks=callbacks))


def train(spec: TrainSpec, out: str, *, callbacks: list | None = None) -> dict:
    """Train into `out`: the run `spec` describes, `spec.policy.adapter` continued when set
    (iterative rounds, for every method), `spec.lang` restricting the data to one language
    (per-language models). Returns what `_SUCCESS` records (rows, method, ...); writes no
    marker. In a distributed run only the main process writes files."""
    from croco.training.common import history_recorder, is_main_process
    from croco.training.reporting import check_report_to

    check_report_to(spec.training.report_to)  # before any model loads
    recorder = history_recorder()
    metrics = _train(spec, out, [recorder, *(callbacks or [])])
    generation_policy = (spec.generation_policy if isinstance(spec, (DPOSpec, SFTSpec))
                         else None) or spec.policy.model
    metrics.update({"variant": spec.variant_name, "lang": spec.lang,
                    "pairs_uri": (storage.join(out, "online_pairs")
                                  if isinstance(spec, OnlineDPOSpec) else spec.pairs_uri),
                    "policy": spec.policy.model, "init_adapter": spec.policy.adapter,
                    "generation_policy": generation_policy, "off_policy": spec.off_policy})
    info = {"rows": metrics.get("pairs_train", metrics.get(
        "rows_train", metrics.get("pairs_generated"))), "method": spec.method,
            "off_policy": spec.off_policy, "generation_policy": generation_policy}
    if not is_main_process():
        return info  # a distributed run's other processes: the main one writes the outputs
    if spec.training.merge:
        metrics["merged"] = export_merged(out, spec.policy.model)
    if spec.training.push_to_hub:
        metrics["pushed_to"] = push_adapter(out, spec.training.push_to_hub)
    write_curves(out, recorder.log_history, title=_curves_title(spec))
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    # The spec itself, so the run can be told apart and redone (TrainSpecAdapter reads it).
    storage.write_json(storage.join(out, "training_config.json"), spec.model_dump(mode="json"))
    return info


def _train(spec: TrainSpec, out: str, callbacks: list | None) -> dict:
    """Run the method's trainer into `out`; its metrics."""
    policy, training = spec.policy, spec.training
    if isinstance(spec, DPOSpec):
        from croco.training.dpo import train_dpo

        data = storage.read_parquet(storage.join(spec.pairs_uri, "dpo"))
        if spec.lang:
            data = data.filter(pl.col("prompt_lang") == spec.lang)
        return train_dpo(data, policy=policy.model, adapter=policy.adapter, cfg=training,
                         out_uri=out, ref_uri=spec.ref_logps_uri, callbacks=callbacks)
    if isinstance(spec, SFTSpec):
        from croco.training.sft import train_sft

        data = storage.read_parquet(storage.join(spec.pairs_uri, "sft"))
        if spec.lang:
            data = data.filter(pl.col("lang") == spec.lang)
        return train_sft(data, policy=policy.model, adapter=policy.adapter, cfg=training,
                         out_uri=out, callbacks=callbacks)
    from croco.prompts import select_for_generation
    from croco.training.online import train_online_dpo

    prompts = pl.concat([storage.read_parquet(storage.join(u, "data.parquet"))
                         for lang, u in sorted(spec.prompts_uris.items())
                         if spec.lang is None or lang == spec.lang])
    prompts = select_for_generation(prompts, split=spec.prompts_split, limit=spec.prompts_limit)
    return train_online_dpo(prompts, policy=policy.model, adapter=policy.adapter,
                            scorer_cfgs=spec.reward.scorers, cfg=training, out_uri=out,
                            max_new_tokens=spec.max_new_tokens, callbacks=callbacks)


def write_curves(out: str, log_history: list[dict], *, title: str | None = None) -> None:
    """`log_history.json` and its figure, `curves.png`, under the training output `out`."""
    import json

    from croco.evaluation.curves import plot_training_curves

    storage.write_bytes(storage.join(out, "log_history.json"),
                        json.dumps(log_history, indent=1, default=str).encode())
    storage.write_bytes(storage.join(out, "curves.png"),
                        plot_training_curves(log_history, title=title))


def _curves_title(spec: TrainSpec) -> str:
    """`dpo`, `dpo-all (dpo)`, `per-lang (dpo, de)`: the variant, its method when its name
    is not the method's, its language."""
    details = [m for m in (spec.method if spec.method != spec.variant_name else None,
                           spec.lang) if m]
    return spec.variant_name + (f" ({', '.join(details)})" if details else "")


def adapter_path(training_uri: str) -> str:
    """A local path to a trained adapter (downloaded from remote storage once)."""
    from croco.models import local_adapter

    return local_adapter(storage.join(training_uri, "adapter"))


def export_merged(training_uri: str, policy: str) -> str:
    """Merge the adapter into the base weights (`croco.models.merge_adapter`, on the CPU, in
    the checkpoint's dtype) and store them under `merged/`."""
    import tempfile
    from pathlib import Path

    from croco.models import merge_adapter
    from croco.training.common import publish

    with tempfile.TemporaryDirectory() as tmp:
        merge_adapter(policy, adapter_path(training_uri), tmp)
        return publish(Path(tmp), training_uri, "merged")


def push_adapter(training_uri: str, repo_id: str) -> str:
    """Push the adapter to the Hugging Face hub (needs network and HF_TOKEN; HF_ENDPOINT
    for another hub). A repository that does not exist yet is created private."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
    api.upload_folder(folder_path=adapter_path(training_uri), repo_id=repo_id,
                      repo_type="model",
                      commit_message=f"croco adapter, training run {storage.key_of(training_uri)}")
    return repo_id
