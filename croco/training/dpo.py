"""Offline DPO on CroCo pairs: TRL's `DPOTrainer` with a PEFT LoRA adapter.

The reference is the frozen starting point (the base with the adapter disabled; when a
previous round's adapter is continued, TRL keeps an initial copy of it as the reference).

Reference log-probabilities are a stage of their own (`croco.stages.RefLogps`, run before
any DPO variant trains): `reference_logps` computes them exactly as training would (TRL's
trainer built over the pairs precomputes them, nothing is trained), into
`<data_root>/ref_logps/<key>/data.parquet`, keyed by the pairs, the reference model (policy
and adapter), the max length and the precision setting; every variant on the same pairs
(another beta, another learning rate) reads them instead of running the reference model
again. A run given none (or ones computed in another precision, as `precision: auto` may
resolve differently on another machine) computes its own and records them in its output
(`ref_logps.parquet`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import polars as pl

from croco import storage
from croco.config import TrainingConfig
from croco.training.common import (
    batch_args,
    is_main_process,
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
    world_size,
)

log = logging.getLogger(__name__)

REF_COLUMNS = ["pair_id", "ref_chosen_logps", "ref_rejected_logps"]


def pair_ids(pairs: pl.DataFrame) -> pl.Series:
    return pl.concat_str([pl.col("prompt_id"), pl.col("prompt_lang")], separator="|")


def to_conversational(pairs: pl.DataFrame):
    """Pairs -> a `datasets.Dataset` in TRL's conversational preference format."""
    from datasets import Dataset

    df = pairs.with_columns(pair_ids(pairs).alias("pair_id"))
    rows = {
        "pair_id": df["pair_id"].to_list(),
        "prompt": [[{"role": "user", "content": p}] for p in df["prompt"].to_list()],
        "chosen": [[{"role": "assistant", "content": c}] for c in df["chosen"].to_list()],
        "rejected": [[{"role": "assistant", "content": r}] for r in df["rejected"].to_list()],
    }
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        if col in df.columns:
            rows[col] = df[col].to_list()
    return Dataset.from_dict(rows)


def completion_logps(causal_lm, inputs: dict):
    """Summed log-probabilities of the completion tokens of a collated DPO batch (chosen
    rows, then rejected rows), as TRL's `compute_ref_log_probs` defines them, with the
    vocabulary projected only at completion positions, in float32."""
    import torch

    model_kwargs = {k: v for k, v in inputs.items()
                    if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    hidden = causal_lm.base_model(**model_kwargs, use_cache=False).last_hidden_state
    mask = inputs["completion_mask"][:, 1:].bool()  # position t predicts token t + 1
    targets = inputs["input_ids"][:, 1:][mask]
    head = causal_lm.get_output_embeddings()
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(
            hidden[:, :-1][mask].float(), head.weight.float(),
            None if head.bias is None else head.bias.float())
        token_logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    sums = token_logps.new_zeros(mask.shape[0]).index_add_(0, rows, token_logps)
    return sums.chunk(2, dim=0)


def _trainer_class():
    import torch
    from trl import DPOTrainer

    from croco.internals import has_parameters, require

    # overridden below: with another signature the override would silently never run
    require(has_parameters(getattr(DPOTrainer, "_precompute_ref_logps", None),
                           "dataset", "name", "batch_size"),
            "trl", "DPOTrainer._precompute_ref_logps(dataset, name, batch_size)")
    require(has_parameters(getattr(DPOTrainer, "compute_ref_log_probs", None),
                           "model", "inputs"),
            "trl", "DPOTrainer.compute_ref_log_probs(model, inputs)")

    class CrocoDPOTrainer(DPOTrainer):
        """DPOTrainer that reuses reference log-probs already present in the dataset and
        counts the reference forward passes it does run."""

        ref_forward_batches = 0

        def compute_ref_log_probs(self, model, inputs):
            type(self).ref_forward_batches += 1
            causal_lm = self._lora_base_on_cpu(model)
            if causal_lm is None:
                return super().compute_ref_log_probs(model, inputs)
            peft_model = self.accelerator.unwrap_model(self.model)
            with torch.no_grad(), peft_model.disable_adapter(), self.accelerator.autocast():
                return completion_logps(causal_lm, inputs)

        def _lora_base_on_cpu(self, model):
            """The LoRA policy's causal LM when the reference is that model with its
            adapter off, on the CPU without gradient checkpointing, with plain
            log-probabilities (no length weighting, no logit scaling); else None. TRL's fused head scores every position on the CPU
            (prompt and padding too, with entropy and accuracy), only the completion
            positions on a GPU."""
            from accelerate.utils import is_peft_model

            peft_model = self.accelerator.unwrap_model(self.model)
            if (self.accelerator.device.type != "cpu"
                    or getattr(self, "ld_alpha", None) is not None
                    or self.args.gradient_checkpointing
                    or self.ref_model is not None or model is not self.model
                    or not is_peft_model(peft_model) or "ref" in peft_model.peft_config
                    or peft_model.active_peft_config.is_prompt_learning):
                return None
            causal_lm = peft_model.get_base_model()
            text = causal_lm.config.get_text_config()
            if any(getattr(text, name, None) is not None for name in (
                    "final_logit_softcapping", "logit_scale", "output_multiplier",
                    "lm_head_multiplier", "logits_scaling")):
                return None
            return causal_lm

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
                return dataset
            if self.accelerator.num_processes == 1:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            return self._precompute_ref_logps_distributed(dataset, name, batch_size)

        def _precompute_ref_logps_distributed(self, dataset, name, batch_size):
            """Every process computes its share, gathers all of it and adds the columns in
            memory. TRL's own version has the main process write a cache file next to the
            dataset for the others to read; an in-memory dataset has no such shared place
            (each process caches in its own temporary folder)."""
            import torch
            from torch.utils.data import DataLoader

            loader = self.accelerator.prepare(DataLoader(
                dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                num_workers=self.args.dataloader_num_workers))
            if self.ref_model is None and self.is_deepspeed_enabled:
                from trl.models import prepare_deepspeed

                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                model = self._precompute_engine
            else:
                model = self.ref_model or self.model
            chosen, rejected = [], []
            for batch in loader:
                c, r = self.compute_ref_log_probs(model, batch)
                c, r = self.accelerator.gather_for_metrics((c, r))
                chosen.append(c.cpu())
                rejected.append(r.cpu())
            chosen_t, rejected_t = torch.cat(chosen), torch.cat(rejected)
            if len(chosen_t) != len(dataset):
                raise RuntimeError(f"reference log-probs for the {name} set: gathered "
                                   f"{len(chosen_t)} rows for {len(dataset)} pairs")
            dataset = dataset.add_column("ref_chosen_logps", chosen_t.tolist())
            return dataset.add_column("ref_rejected_logps", rejected_t.tolist())

    return CrocoDPOTrainer


def train_dpo(pairs: pl.DataFrame, *, policy: str, adapter: str | None, cfg: TrainingConfig,
              out_uri: str, ref_uri: str | None = None, callbacks: list | None = None,
              reference: str = "precomputed") -> dict:
    """Train a LoRA adapter with DPO; write `adapter/` under `out_uri`; return the metrics.

    `reference="precomputed"` (default) runs the reference model once over the pairs (or
    reads the stored result from `ref_uri`); `"per_step"` is TRL's plain mode, a reference
    forward in every step (kept for the benchmark)."""
    from croco.models import pick_device

    if pairs.is_empty():
        raise ValueError("no pairs to train on: every pool was skipped (see the pair stats)")
    device = pick_device(cfg.device)
    t0 = time.perf_counter()
    pairs = pairs.with_columns(pair_ids(pairs).alias("pair_id"))
    stored = None
    precompute = reference == "precomputed"
    prec = precision_args(cfg, device)
    if precompute and ref_uri:
        stored = _stored_ref_logps(ref_uri, prec["bf16"])
    if stored is not None:
        pairs = pairs.join(stored, on="pair_id", how="left")
        if pairs["ref_chosen_logps"].null_count():
            log.warning("the reference log-probs at %s do not cover every pair; computing "
                        "them here", ref_uri)
            pairs = pairs.drop("ref_chosen_logps", "ref_rejected_logps")
            stored = None
    train_df, eval_df = split_heldout(pairs, "pair_id", cfg.heldout_fraction)
    if train_df.is_empty():
        train_df, eval_df = pairs, pairs.head(0)

    workdir = local_workdir(out_uri)
    workdir.mkdir(parents=True, exist_ok=True)
    trainer = _dpo_trainer(train_df, eval_df, policy=policy, adapter=adapter, cfg=cfg,
                           prec=prec, output_dir=workdir, precompute=precompute,
                           callbacks=trainer_callbacks(cfg, workdir, out_uri, callbacks))
    trainer_cls = type(trainer)
    args = trainer.args
    ref_batches_precompute = trainer_cls.ref_forward_batches
    if precompute and stored is None and is_main_process():  # a record of what it used
        storage.write_parquet(_ref_table(trainer), storage.join(out_uri, "ref_logps.parquet"))
    resume = last_checkpoint(workdir, out_uri)
    if resume:
        log.info("resuming DPO from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate() if eval_df.height else {}

    save_adapter(trainer, trainer.processing_class, workdir, out_uri)
    tokens_per_pair = _count_tokens(trainer.train_dataset) / max(len(trainer.train_dataset), 1)
    steps_run = trainer.state.global_step - (int(Path(resume).name.split("-")[1]) if resume else 0)
    n_tokens = tokens_per_pair * steps_run * args.per_device_train_batch_size * \
        args.gradient_accumulation_steps * world_size()
    metrics = {
        "method": "dpo", "pairs_train": train_df.height, "pairs_heldout": eval_df.height,
        "train_by_lang": rows_by_lang(train_df, "prompt_lang"),
        "ref_logps": "stored" if stored is not None else "computed",
        "ref_forward_batches": trainer_cls.ref_forward_batches,
        "ref_forward_batches_precompute": ref_batches_precompute,
        "resumed_from": Path(resume).name if resume else None,
        "train_runtime": result.metrics.get("train_runtime"),
        "tokens_per_second": (n_tokens / result.metrics["train_runtime"]
                              if result.metrics.get("train_runtime") else None),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "world_size": world_size(),
        **summarize_log(trainer.state.log_history),
        **eval_metrics,
    }
    return metrics


def _count_tokens(dataset) -> int:
    cols = set(dataset.column_names)
    total = 0
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if key in cols:
            total += sum(len(x) for x in dataset[key])
    return total


def _ref_table(trainer) -> pl.DataFrame:
    """The reference log-probs a trainer precomputed, train and eval sets (REF_COLUMNS)."""
    sets = [trainer.train_dataset] + ([trainer.eval_dataset]
                                      if trainer.eval_dataset is not None else [])
    return pl.concat([pl.DataFrame({c: d[c] for c in REF_COLUMNS}) for d in sets])


def _stored_ref_logps(ref_uri: str, bf16: bool) -> pl.DataFrame | None:
    """The reference log-probs at `ref_uri` if complete and computed in the precision this
    run trains in (bf16 or not); else None."""
    if not storage.is_complete(ref_uri):
        log.warning("no reference log-probs at %s; computing them here", ref_uri)
        return None
    made_in = storage.read_json(storage.join(ref_uri, storage.SUCCESS)).get("bf16")
    if made_in is not None and bool(made_in) != bf16:
        log.warning("the reference log-probs at %s were computed %s bf16, this run trains "
                    "%s it; computing them here", ref_uri, "in" if made_in else "without",
                    "in" if bf16 else "without")
        return None
    return storage.read_parquet(storage.join(ref_uri, "data.parquet"))


def reference_logps(pairs: pl.DataFrame, *, policy: str, adapter: str | None,
                    cfg: TrainingConfig) -> tuple[pl.DataFrame, bool]:
    """The reference model's log-probs of every pair (`REF_COLUMNS`, `pair_id` as
    `pair_ids` makes it), computed as DPO training computes them: TRL's trainer, built over
    all the pairs with the training settings, precomputes them when it is made; nothing is
    trained. Returns the table and whether it was computed in bf16."""
    import tempfile

    from croco.models import pick_device

    if pairs.is_empty():
        raise ValueError("no pairs to train on: every pool was skipped (see the pair stats)")
    device = pick_device(cfg.device)
    prec = precision_args(cfg, device)
    pairs = pairs.with_columns(pair_ids(pairs).alias("pair_id"))
    with tempfile.TemporaryDirectory(prefix="croco-ref-") as tmp:
        trainer = _dpo_trainer(pairs, pairs.head(0), policy=policy, adapter=adapter, cfg=cfg,
                               prec=prec, output_dir=tmp, precompute=True)
        return _ref_table(trainer), bool(prec["bf16"])


def _dpo_trainer(train_df: pl.DataFrame, eval_df: pl.DataFrame, *, policy: str,
                 adapter: str | None, cfg: TrainingConfig, prec: dict, output_dir,
                 precompute: bool, callbacks: list | None = None):
    """The DPO trainer of `train_df` (and `eval_df` when it has rows) with the training
    settings, its reference forward counter reset; with `precompute` it has computed the
    reference log-probs the datasets lack once it is made. Training and the reference
    stage both build it here, so both compute the reference alike."""
    from trl import DPOConfig

    args = DPOConfig(
        output_dir=str(output_dir), beta=cfg.beta, max_length=cfg.max_length,
        precompute_ref_log_probs=precompute, eval_strategy="no",
        **batch_args(cfg), **schedule_args(cfg, cfg.learning_rate), **prec,
    )
    model, tok, peft_config = load_policy_for_training(policy, adapter, cfg, prec)
    trainer_cls = _trainer_class()
    trainer_cls.ref_forward_batches = 0
    return trainer_cls(
        model=model, args=args, train_dataset=to_conversational(train_df),
        eval_dataset=to_conversational(eval_df) if eval_df.height else None,
        processing_class=tok, peft_config=peft_config, callbacks=callbacks,
    )
