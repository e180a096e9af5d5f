"""The SFT baseline: TRL's `SFTTrainer` on the chosen samples (`in_lang_sft` /
`all_lang_sft`), LoRA, loss on the completion only, the paper's SFT learning rate (2e-4)."""

from __future__ import annotations

import time

import polars as pl

from croco.config import TrainingConfig
from croco.training.common import (
    batch_args,
    last_checkpoint,
    load_policy_for_training,
    local_workdir,
    precision_args,
    rows_by_lang,
    save_adapter,
    schedule_args,
    split_heldout,
    summarize_log,
    trainer_callbacks,
)


def to_prompt_completion(rows: pl.DataFrame):
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p in rows["prompt"].to_list()],
        "completion": [[{"role": "assistant", "content": c}] for c in rows["completion"].to_list()],
    })


def train_sft(rows: pl.DataFrame, *, policy: str, adapter: str | None, cfg: TrainingConfig,
              out_uri: str, callbacks: list | None = None) -> dict:
    """Train a LoRA adapter on the chosen samples; write `adapter/` under `out_uri`."""
    from trl import SFTConfig, SFTTrainer

    from croco.models import pick_device

    if rows.is_empty():
        raise ValueError("no SFT rows to train on")
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    rows = rows.with_columns(pl.concat_str(["prompt_id", "lang"], separator="|").alias("_id"))
    train_df, eval_df = split_heldout(rows, "_id", cfg.heldout_fraction)
    if train_df.is_empty():
        train_df, eval_df = rows, rows.head(0)
    workdir = local_workdir(out_uri)
    workdir.mkdir(parents=True, exist_ok=True)
    prec = precision_args(cfg, device)
    args = SFTConfig(output_dir=str(workdir), max_length=cfg.max_length,
                     completion_only_loss=True, eval_strategy="no",
                     **batch_args(cfg), **schedule_args(cfg, cfg.sft_learning_rate), **prec)
    model, tok, peft_config = load_policy_for_training(policy, adapter, cfg, prec)
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_prompt_completion(train_df),
                         eval_dataset=to_prompt_completion(eval_df) if eval_df.height else None,
                         processing_class=tok, peft_config=peft_config,
                         callbacks=trainer_callbacks(cfg, workdir, out_uri, callbacks))
    resume = last_checkpoint(workdir, out_uri)
    result = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate() if eval_df.height else {}
    save_adapter(trainer, tok, workdir, out_uri)
    runtime = result.metrics.get("train_runtime")
    n_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) * cfg.num_train_epochs
    metrics = {"method": "sft", "rows_train": train_df.height, "rows_heldout": eval_df.height,
               "train_by_lang": rows_by_lang(train_df, "lang"),
               "resumed_from": resume.rsplit("/", 1)[-1] if resume else None,
               "train_runtime": runtime,
               "tokens_per_second": n_tokens / runtime if runtime else None,
               "wall_seconds": round(time.perf_counter() - t0, 2),
               **summarize_log(trainer.state.log_history), **eval_metrics}
    return metrics
