"""What every trainer shares: device-dependent precision, LoRA, batch arithmetic, the
held-out split, checkpoints mirrored to the run's storage, where the logs go
(`training.report_to`, TensorBoard's event files), metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import polars as pl
import torch

from croco import storage
from croco.config import TrainingConfig

log = logging.getLogger(__name__)


def precision_args(cfg: TrainingConfig, device: torch.device) -> dict:
    """`auto`: bf16 where the hardware multiplies it natively (a GPU with bf16, a CPU with
    AVX512-BF16 or AMX: `croco.models.bf16_native`), else fp32; gradient checkpointing on
    a GPU only (TRL's defaults, bf16 + checkpointing, make a step on a CPU without bf16
    ~10x slower)."""
    from croco.models import bf16_native

    if cfg.precision == "auto":
        bf16 = bf16_native(device)
        fp16 = False
    else:
        bf16, fp16 = cfg.precision == "bf16", cfg.precision == "fp16"
    if cfg.gradient_checkpointing == "auto":
        checkpointing = device.type == "cuda"
    else:
        checkpointing = cfg.gradient_checkpointing == "on"
    return {"bf16": bf16, "fp16": fp16, "gradient_checkpointing": checkpointing,
            "use_cpu": device.type == "cpu"}


def lora_config(cfg: TrainingConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type=task_type, bias="none")


def world_size() -> int:
    """Processes training together (set by `accelerate launch` / torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only the main process of a distributed run writes outputs (adapter, metrics,
    reference log-probs, markers); the others train and return."""
    return int(os.environ.get("RANK", "0")) == 0


def batch_args(cfg: TrainingConfig) -> dict:
    world = world_size()
    per_device = min(cfg.per_device_batch_size, cfg.effective_batch_size)
    accum = max(1, cfg.effective_batch_size // (per_device * world))
    return {"per_device_train_batch_size": per_device, "per_device_eval_batch_size": per_device,
            "gradient_accumulation_steps": accum}


def _warmup_arg(ratio: float) -> dict:
    """transformers 5 takes a float in [0, 1) as a ratio in `warmup_steps`; 4.x had
    `warmup_ratio`."""
    import inspect

    from transformers import TrainingArguments

    if "warmup_ratio" in inspect.signature(TrainingArguments.__init__).parameters:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": float(ratio) if ratio < 1 else 0.999}


def schedule_args(cfg: TrainingConfig, lr: float) -> dict:
    return {"learning_rate": lr, "num_train_epochs": cfg.num_train_epochs,
            "max_steps": cfg.max_steps, "lr_scheduler_type": cfg.lr_scheduler_type,
            **_warmup_arg(cfg.warmup_ratio), "weight_decay": cfg.weight_decay,
            "seed": cfg.seed, "logging_steps": cfg.logging_steps, "save_steps": cfg.save_steps,
            "save_strategy": "steps", "save_total_limit": 2, "report_to": report_to(cfg),
            "disable_tqdm": False, "remove_unused_columns": False}


def report_to(cfg: TrainingConfig) -> list[str]:
    """What the Trainer reports to itself (`training.report_to`, resolved by
    `croco.training.reporting.resolve`): every integration but TensorBoard, whose callback
    croco adds with its own folder (`trainer_callbacks`)."""
    from croco.training.reporting import resolve

    return [n for n in resolve(cfg.report_to) if n != "tensorboard"]


def logs_dir(workdir: Path) -> Path:
    """Where TensorBoard's event files are written: `runs/` beside `adapter/` (the output
    folder itself on local storage; uploaded with the adapter otherwise)."""
    return workdir.parent / "runs"


def tensorboard_callback(log_dir: Path):
    """transformers' TensorBoard callback writing to `log_dir`, every writer it opens
    (training, then a final evaluation) included."""
    from transformers.integrations import TensorBoardCallback

    class TensorBoardInFolder(TensorBoardCallback):
        def _init_summary_writer(self, args, log_dir_arg=None):
            self.tb_writer = self._SummaryWriter(log_dir=str(log_dir))

    return TensorBoardInFolder()


def trainer_callbacks(cfg: TrainingConfig, workdir: Path, out_uri: str,
                      callbacks: list | None, *, mirror: bool = True) -> list:
    """The callbacks a trainer gets: checkpoints mirrored to storage (`mirror`: for the
    trainers that resume from them), TensorBoard when `training.report_to` resolves to
    it, then the caller's."""
    from croco.training.reporting import resolve

    out = [checkpoint_mirror(out_uri)] if mirror else []
    if "tensorboard" in resolve(cfg.report_to):
        out.append(tensorboard_callback(logs_dir(workdir)))
    return [*out, *(callbacks or [])]


def history_recorder():
    """A TrainerCallback that keeps the trainer's log history (`.log_history`: every
    logged step, evaluation and the closing summary, restored from the checkpoint on a
    resume), for `log_history.json`."""
    from transformers import TrainerCallback

    class HistoryRecorder(TrainerCallback):
        def __init__(self):
            self.state = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.state = state

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.state = state

        @property
        def log_history(self) -> list[dict]:
            return list(self.state.log_history) if self.state is not None else []

    return HistoryRecorder()


def heldout_mask(ids: list[str], fraction: float) -> list[bool]:
    """A stable split: a row is held out when the hash of its id falls below `fraction`."""
    out = []
    for i in ids:
        h = int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        out.append(h < fraction)
    return out


def split_heldout(df: pl.DataFrame, id_col: str, fraction: float) -> tuple[pl.DataFrame,
                                                                           pl.DataFrame]:
    mask = pl.Series(heldout_mask(df[id_col].to_list(), fraction))
    return df.filter(~mask), df.filter(mask)


def local_workdir(out_uri: str) -> Path:
    """Where the trainer writes: the output folder itself when storage is local, else a
    local cache folder whose checkpoints are mirrored to storage."""
    fs, path = storage.filesystem(out_uri)
    if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
        return Path(path) / "work"
    import hashlib

    from croco.models import cache_dir

    # Per output URI, not per key alone: runs of one key on two buckets must not resume
    # from each other's checkpoints (each resumes from what its own storage mirrors).
    where = hashlib.sha256(out_uri.encode()).hexdigest()[:8]
    return cache_dir() / "training" / f"{Path(path).name}-{where}" / "work"


def last_checkpoint(workdir: Path, out_uri: str) -> str | None:
    """The newest checkpoint, fetched from storage first when storage is remote."""
    remote = storage.join(out_uri, "checkpoints")
    fs, rpath = storage.filesystem(remote)
    if "file" not in fs.protocol and fs.exists(rpath):
        names = sorted((n for n in storage.list_dir(remote) if n.startswith("checkpoint-")),
                       key=lambda n: int(n.split("-")[1]))
        if names and not (workdir / names[-1]).exists():
            workdir.mkdir(parents=True, exist_ok=True)
            fs.get(f"{rpath}/{names[-1]}", str(workdir / names[-1]), recursive=True)
    return last_complete_checkpoint(workdir)


def last_complete_checkpoint(workdir: Path) -> str | None:
    """The newest `checkpoint-N` folder the trainer finished saving, None if there is none.
    transformers' Trainer writes `trainer_state.json` last (after the weights, optimizer
    and RNG state); a folder without it was being saved when its process was killed
    (kill -9, OOM): it is removed, so neither this run nor the trainer's own checkpoint
    rotation resumes from half a checkpoint."""
    if not workdir.exists():
        return None
    found = sorted((p for p in workdir.iterdir() if p.is_dir() and p.name.startswith(
        "checkpoint-") and p.name.split("-", 1)[1].isdigit()),
        key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)
    for folder in found:
        if (folder / "trainer_state.json").is_file():
            return str(folder)
        log.warning("removing %s: its save did not finish (no trainer_state.json)", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return None


def checkpoint_mirror(out_uri: str):
    """A TrainerCallback that copies every saved checkpoint to remote storage."""
    from transformers import TrainerCallback

    class MirrorCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not is_main_process():
                return
            fs, rpath = storage.filesystem(storage.join(out_uri, "checkpoints"))
            if "file" in fs.protocol:
                return
            name = f"checkpoint-{state.global_step}"
            src = Path(args.output_dir) / name
            if src.exists():
                fs.put(str(src), f"{rpath}/{name}", recursive=True)

    return MirrorCheckpoints()


def publish(local_dir: Path, out_uri: str, name: str) -> str:
    """Copy a finished local folder (adapter, merged model) into storage."""
    target = storage.join(out_uri, name)
    fs, rpath = storage.filesystem(target)
    if "file" in fs.protocol:
        if Path(rpath) != local_dir:
            if Path(rpath).exists():
                shutil.rmtree(rpath)
            shutil.copytree(local_dir, rpath)
    else:
        fs.put(str(local_dir), rpath, recursive=True)
    return target


def rows_by_lang(df: pl.DataFrame, column: str) -> dict[str, int]:
    """Rows per language of a training table (`column`: its language column)."""
    counts = df.group_by(column).len().sort(column)
    return dict(zip(counts[column].to_list(), counts["len"].to_list()))


def summarize_log(log_history: list[dict]) -> dict:
    """Final and first values of the logged training metrics."""
    train = [r for r in log_history if "loss" in r and "eval_loss" not in r]
    evals = [r for r in log_history if "eval_loss" in r]
    out: dict = {"steps": len(train)}
    if train:
        first, last = train[0], train[-1]
        out["first_loss"] = first["loss"]
        out["final_loss"] = last["loss"]
        for k, v in last.items():
            if k.startswith("rewards/") or k.startswith("logps/"):
                out[k] = v
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")})
    summary = [r for r in log_history if "train_runtime" in r]
    if summary:
        out["train_runtime"] = summary[-1]["train_runtime"]
        out["train_samples_per_second"] = summary[-1].get("train_samples_per_second")
    return out


def write_json_local(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def load_policy_for_training(policy: str, adapter: str | None, cfg: TrainingConfig, prec: dict,
                             *, padding_side: str = "right"):
    """(model, tokenizer, peft_config): the policy in the training precision; a given adapter
    is continued (trainable), otherwise a new LoRA is described by `peft_config`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from croco.models import load_tokenizer, local_adapter, resolve_model

    tok = load_tokenizer(policy, padding_side=padding_side)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(policy), dtype=torch.bfloat16 if prec["bf16"] else torch.float32)
    if adapter:
        return (PeftModel.from_pretrained(model, local_adapter(adapter), is_trainable=True),
                tok, None)
    return model, tok, lora_config(cfg)


def save_adapter(trainer, tokenizer, workdir: Path, out_uri: str) -> None:
    """Save the trained adapter (and tokenizer) next to the work folder and publish it to
    `<out_uri>/adapter`, TensorBoard's event files (when written) to `<out_uri>/runs`."""
    adapter_dir = workdir.parent / "adapter"
    trainer.save_model(str(adapter_dir))  # the main process saves; every process waits
    if is_main_process():
        tokenizer.save_pretrained(str(adapter_dir))
        publish(adapter_dir, out_uri, "adapter")
        if logs_dir(workdir).is_dir():
            publish(logs_dir(workdir), out_uri, "runs")
    trainer.accelerator.wait_for_everyone()
