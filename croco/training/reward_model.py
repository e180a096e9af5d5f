"""Reward-model training: TRL's `RewardTrainer` on English preference pairs (`prompt`,
`chosen`, `rejected`) atop a multilingual base, as a one-label sequence classifier. The
result is a plain transformers folder that the `classifier` scorer loads."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from croco.config import TrainingConfig
from croco.training.common import (
    batch_args,
    local_workdir,
    precision_args,
    publish,
    schedule_args,
    summarize_log,
)


def load_preferences(path: str) -> pl.DataFrame:
    """A JSONL/Parquet preference file with `prompt`, `chosen`, `rejected` (strings)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: preference file not found")
    df = pl.read_parquet(p) if p.suffix == ".parquet" else pl.read_ndjson(p)
    missing = {"prompt", "chosen", "rejected"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected prompt, "
                         "chosen, rejected")
    return df


def pairwise_accuracy(model_dir: str, prefs: pl.DataFrame, *, device: str = "auto") -> float:
    """Share of pairs where the model scores chosen above rejected."""
    from croco.reward.classifier import ClassifierRewardModel

    rm = ClassifierRewardModel(model_dir, device=device, batch_size=16, max_length=1024)
    prompts = prefs["prompt"].to_list()
    c = rm.score(prompts, prefs["chosen"].to_list())
    r = rm.score(prompts, prefs["rejected"].to_list())
    return sum(a > b for a, b in zip(c, r)) / max(len(c), 1)


def train_reward_model(prefs: pl.DataFrame, *, base: str, cfg: TrainingConfig, out_uri: str,
                       full: bool = True) -> dict:
    """Train a one-label reward model; writes `model/` (full weights, or LoRA merged)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from croco.models import load_tokenizer, pick_device, resolve_model
    from croco.training.common import lora_config

    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    workdir = local_workdir(out_uri)
    workdir.mkdir(parents=True, exist_ok=True)
    prec = precision_args(cfg, device)
    tok = load_tokenizer(base, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(base), num_labels=1,
        dtype=torch.bfloat16 if prec["bf16"] else torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p in prefs["prompt"].to_list()],
        "chosen": [[{"role": "assistant", "content": c}] for c in prefs["chosen"].to_list()],
        "rejected": [[{"role": "assistant", "content": r}] for r in prefs["rejected"].to_list()],
    })
    args = RewardConfig(output_dir=str(workdir), max_length=cfg.max_length,
                        **batch_args(cfg), **schedule_args(cfg, cfg.learning_rate), **prec)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                            peft_config=None if full else lora_config(cfg, "SEQ_CLS"))
    trainer.train()
    out_model = trainer.model
    if not full:
        out_model = out_model.merge_and_unload()
    model_dir = workdir.parent / "model"
    out_model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    publish(model_dir, out_uri, "model")
    return {"method": "reward_model", "pairs": prefs.height,
            "wall_seconds": round(time.perf_counter() - t0, 2),
            **summarize_log(trainer.state.log_history)}
