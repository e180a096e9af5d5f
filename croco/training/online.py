"""Online DPO through TRL's `OnlineDPOTrainer` (trl.experimental) with croco's reward.

Each step samples two completions per prompt from the current policy, scores both with
the run's reward scorers (the same weighted sum as the offline pipeline), and takes a DPO
step on (higher, lower). Every pair the trainer generated is recorded and written in the
DPO pairs schema (`scope = "online"`), so online and offline runs can be compared on the
same footing.
"""

from __future__ import annotations

import time

import polars as pl

from croco import storage
from croco.config import TrainingConfig
from croco.pairing import DPO_SCHEMA
from croco.training.common import (
    batch_args,
    load_policy_for_training,
    local_workdir,
    precision_args,
    rows_by_lang,
    save_adapter,
    schedule_args,
    summarize_log,
    trainer_callbacks,
)


class CrocoReward:
    """A TRL reward function: croco's weighted scorers, recording the pairs it judged.

    TRL calls it with `prompts` and `completions` of length 2B (the two samples of prompt i
    are at i and i + B) plus the dataset's extra columns (`prompt_id`, `lang`) repeated."""

    def __init__(self, scorer_cfgs: list, device: str = "auto"):
        from croco.reward import make_scorer
        from croco.reward.langid import LanguageIdentifier

        self.__name__ = "croco_reward"
        self.cfgs = scorer_cfgs
        self.lid = LanguageIdentifier()
        self.scorers = [make_scorer(c, device=device) for c in scorer_cfgs]
        self.pairs: list[dict] = []

    @staticmethod
    def _text(x) -> str:
        return x[-1]["content"] if isinstance(x, list) else str(x)

    def __call__(self, prompts, completions, prompt_id=None, lang=None, **kwargs) -> list[float]:
        from croco.reward import weighted_reward

        texts = [self._text(p) for p in prompts]
        answers = [self._text(c) for c in completions]
        langs = list(lang) if lang is not None else ["en"] * len(texts)
        total, _ = weighted_reward(self.cfgs, self.scorers, texts, answers, langs)
        detected, _ = self.lid.detect(answers)
        b = len(texts) // 2
        for i in range(b):
            a, c = i, i + b
            first_wins = total[a] >= total[c]  # TRL's rule: ties go to the first sample
            ch, rj = (a, c) if first_wins else (c, a)
            self.pairs.append({
                "prompt_id": prompt_id[i] if prompt_id is not None else str(len(self.pairs)),
                "prompt_lang": langs[i], "prompt": texts[i], "chosen": answers[ch],
                "rejected": answers[rj], "chosen_score": float(total[ch]),
                "rejected_score": float(total[rj]), "chosen_lang": detected[ch],
                "rejected_lang": detected[rj], "pool_size": 2, "scope": "online",
                "reject_target": "online_pair",
            })
        return total.tolist()


def train_online_dpo(prompts: pl.DataFrame, *, policy: str, adapter: str | None = None,
                     scorer_cfgs: list, cfg: TrainingConfig, out_uri: str,
                     max_new_tokens: int = 64, temperature: float = 0.9,
                     callbacks: list | None = None) -> dict:
    """Online DPO on the prompts table; writes `adapter/` and `online_pairs/data.parquet`.

    `adapter`, when given, is continued (round r of an iterative variant goes on from
    round r-1's adapter) and, as in offline DPO, TRL keeps a frozen copy of it as the
    reference; otherwise a new LoRA is trained against the base."""
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from croco.models import pick_device

    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    prec = precision_args(cfg, device)
    workdir = local_workdir(out_uri)
    workdir.mkdir(parents=True, exist_ok=True)
    model, tok, peft_config = load_policy_for_training(policy, adapter, cfg, prec,
                                                       padding_side="left")
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p in prompts["prompt"].to_list()],
        "prompt_id": prompts["prompt_id"].to_list(), "lang": prompts["lang"].to_list(),
    })
    reward = CrocoReward(scorer_cfgs, device=cfg.device)
    args = OnlineDPOConfig(output_dir=str(workdir), beta=cfg.beta, max_new_tokens=max_new_tokens,
                           temperature=temperature, max_length=cfg.max_length,
                           **batch_args(cfg), **schedule_args(cfg, cfg.learning_rate), **prec)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                               processing_class=tok, peft_config=peft_config,
                               callbacks=trainer_callbacks(cfg, workdir, out_uri, callbacks,
                                                           mirror=False))
    trainer.train()
    save_adapter(trainer, tok, workdir, out_uri)
    pairs = pl.DataFrame(reward.pairs, schema=DPO_SCHEMA)
    storage.write_parquet(pairs, storage.join(out_uri, "online_pairs", "data.parquet"))
    return {"method": "online_dpo", "pairs_generated": pairs.height,
            "train_by_lang": rows_by_lang(pairs, "prompt_lang"),
            "wall_seconds": round(time.perf_counter() - t0, 2),
            **summarize_log(trainer.state.log_history)}
