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


def weighted_reward(scorer_cfgs: list, scorers: list, prompts: list[str], responses: list[str],
                    langs: list[str], *, progress=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`reward` = sum over scorers of weight x score, and each scorer's scores by name.
    Every scorer has one interface: `score(prompts, responses, progress, langs=...)`."""
    total = np.zeros(len(responses), dtype=np.float64)
    each: dict[str, np.ndarray] = {}
    for cfg, scorer in zip(scorer_cfgs, scorers):
        values = np.asarray(scorer.score(prompts, responses, progress, langs=langs),
                            dtype=np.float64)
        each[cfg.name] = values
        total += cfg.weight * values
    return total, each


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

    detected, probs = LanguageIdentifier().detect(responses)
    out = generations.with_columns(
        pl.Series("detected_lang", detected, dtype=pl.String),
        pl.Series("lang_prob", probs, dtype=pl.Float64),
    )
    scorers = [make_scorer(cfg, device=device) for cfg in scorer_cfgs]
    total, each = weighted_reward(scorer_cfgs, scorers, prompt_texts, responses, langs,
                                  progress=progress)
    out = out.with_columns([pl.Series(f"reward_{name}", values, dtype=pl.Float64)
                            for name, values in each.items()])
    return out.with_columns(pl.Series("reward", total, dtype=pl.Float64))
