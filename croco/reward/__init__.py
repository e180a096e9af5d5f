"""Reward scoring: every generated response gets one score per scorer and a combined
`reward` = sum of weight x score.

Scorers: a sequence-classification reward model (`classifier`, raw logit), a generative
judge scored by token log-probabilities (`judge`) and language identification (`langid`).
The first two run on transformers or, with `backend: vllm`, on vLLM (`croco.reward.vllm`).
`detected_lang` and `lang_prob` are always filled (langid runs even when it has no weight).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from croco.config import ClassifierScorer, JudgeScorer, LangIdScorer


def make_scorer(cfg, *, device: str = "auto"):
    """The scorer of one scorer config. `backend: vllm` scorers run where vLLM puts them
    (`device` does not apply) and are built once per process."""
    if isinstance(cfg, (ClassifierScorer, JudgeScorer)) and cfg.backend == "vllm":
        from croco.reward.vllm import vllm_scorer

        return vllm_scorer(cfg)
    if isinstance(cfg, ClassifierScorer):
        from croco.reward.classifier import ClassifierRewardModel

        return ClassifierRewardModel(cfg.model, device=device, dtype=cfg.dtype,
                                     batch_size=cfg.batch_size, max_length=cfg.max_length)
    if isinstance(cfg, JudgeScorer):
        from croco.reward.judge import JudgeRewardModel

        return JudgeRewardModel(cfg.model, template=cfg.template, yes_token=cfg.yes_token,
                                no_token=cfg.no_token, device=device, dtype=cfg.dtype,
                                batch_size=cfg.batch_size, max_length=cfg.max_length)
    if isinstance(cfg, LangIdScorer):
        from croco.reward.langid import LanguageIdentifier

        return LanguageIdentifier()
    raise TypeError(f"unknown scorer config {cfg!r}")


def score_frame(generations: pl.DataFrame, prompts: pl.DataFrame, scorer_cfgs: list, *,
                device: str = "auto", progress=None) -> pl.DataFrame:
    """The scores table: generation columns + reward + reward_<name> + detected_lang, lang_prob.

    `prompts` supplies the prompt text of each (prompt_id, lang).
    """
    from croco.reward.langid import LanguageIdentifier

    joined = generations.join(prompts.select("prompt_id", "lang", "prompt"),
                              on=["prompt_id", "lang"], how="left")
    missing = joined.filter(pl.col("prompt").is_null())
    if missing.height:
        r = missing.row(0, named=True)
        raise ValueError(f"generation for prompt_id {r['prompt_id']!r} lang {r['lang']!r} "
                         "has no prompt in the prompts table")
    prompt_texts = joined["prompt"].to_list()
    responses = joined["response"].to_list()
    langs = joined["lang"].to_list()

    lid = LanguageIdentifier()
    detected, probs = lid.detect(responses)
    out = generations.with_columns(
        pl.Series("detected_lang", detected, dtype=pl.String),
        pl.Series("lang_prob", probs, dtype=pl.Float64),
    )
    total = np.zeros(len(responses), dtype=np.float64)
    for cfg in scorer_cfgs:
        scorer = lid if isinstance(cfg, LangIdScorer) else make_scorer(cfg, device=device)
        if isinstance(cfg, LangIdScorer):
            values = np.asarray(scorer.prob_of(responses, langs), dtype=np.float64)
        else:
            values = np.asarray(scorer.score(prompt_texts, responses, progress=progress),
                                dtype=np.float64)
        out = out.with_columns(pl.Series(f"reward_{cfg.name}", values, dtype=pl.Float64))
        total += cfg.weight * values
    return out.with_columns(pl.Series("reward", total, dtype=pl.Float64))
