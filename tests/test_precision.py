"""`auto` dtypes: bf16 on a CPU with bf16 instructions (CROCO_CPU_BF16 overrides the
detection; the suite runs with 0, these tests with 1), float32 elsewhere."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from croco.config import TrainingConfig
from croco.models import clear_model_cache, pick_dtype
from croco.training.common import precision_args

CPU = torch.device("cpu")


@pytest.mark.parametrize("flag,dtype", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_dtype_and_precision_follow_the_cpu_bf16_switch(monkeypatch, flag, dtype):
    monkeypatch.setenv("CROCO_CPU_BF16", flag)
    assert pick_dtype("auto", CPU) == dtype
    assert pick_dtype("float32", CPU) == torch.float32  # an explicit dtype is kept
    assert precision_args(TrainingConfig(), CPU)["bf16"] is (flag == "1")
    assert precision_args(TrainingConfig(precision="fp32"), CPU)["bf16"] is False


def test_bf16_generation_scoring_and_dpo_run_on_the_cpu(monkeypatch, tiny_lm, tmp_path):
    from croco.generation.transformers import TransformersGenerator
    from croco.reward.judge import JudgeRewardModel
    from croco.training.dpo import train_dpo

    monkeypatch.setenv("CROCO_CPU_BF16", "1")
    clear_model_cache()
    try:
        gen = TransformersGenerator(tiny_lm)
        assert gen.model.dtype == torch.bfloat16
        out = gen.generate([[{"role": "user", "content": "Name a fruit."}]], k=3,
                           temperature=1.0, max_new_tokens=5)
        assert len(out[0]) == 3 and all(0 < c.n_tokens <= 5 for c in out[0])
        judge = JudgeRewardModel(tiny_lm, template="{prompt} {response} Yes or No?")
        scores = judge.score(["a", "b"], ["x", "y"])
        assert len(scores) == 2 and all(s == s and abs(s) < 100 for s in scores)
    finally:
        clear_model_cache()
    pairs = pl.DataFrame({"prompt_id": ["p1", "p2"], "prompt_lang": ["en", "en"],
                          "prompt": ["Say yes.", "Say no."], "chosen": ["yes", "no"],
                          "rejected": ["maybe", "perhaps"]})
    cfg = TrainingConfig(max_steps=1, effective_batch_size=2, per_device_batch_size=2,
                         max_length=128, heldout_fraction=0.0, lora_r=4, lora_alpha=8)
    m = train_dpo(pairs, policy=tiny_lm, adapter=None, cfg=cfg, out_uri=str(tmp_path / "run"),
                  ref_uri=str(tmp_path / "ref"))
    assert m["steps"] == 1 and m["first_loss"] == pytest.approx(0.6931, abs=0.01)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
