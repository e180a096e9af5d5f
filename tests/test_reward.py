from __future__ import annotations

import polars as pl
import pytest

from croco.config import ClassifierScorer, JudgeScorer, LangIdScorer
from croco.reward import score_frame
from croco.reward.classifier import ClassifierRewardModel
from croco.reward.judge import JudgeRewardModel
from croco.reward.langid import LanguageIdentifier

PROMPTS = ["Name a fruit.", "Warum ist der Himmel blau?", "Cite un fruit.", "Hi"]
RESPONSES = ["An apple.", "Wegen der Rayleigh-Streuung des Sonnenlichts in der Atmosphäre, "
             "die kurze Wellenlängen stärker streut.", "Une pomme, une poire ou une banane.", ""]


def test_classifier_scores_do_not_depend_on_batch_mates(tiny_rm):
    rm = ClassifierRewardModel(tiny_rm, batch_size=4)
    batched = rm.score(PROMPTS, RESPONSES)
    alone = [ClassifierRewardModel(tiny_rm, batch_size=1).score([p], [r])[0]
             for p, r in zip(PROMPTS, RESPONSES)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(v, 6) for v in batched)) == 4


def test_classifier_pooling_matches_an_unpadded_forward(tiny_rm):
    import torch

    rm = ClassifierRewardModel(tiny_rm, batch_size=4)
    text = rm.render(PROMPTS[1], RESPONSES[1])
    ids = rm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = rm.model(input_ids=ids).logits[0, 0].item()
    assert rm.score(PROMPTS, RESPONSES)[1] == pytest.approx(ref, abs=1e-5)


def test_judge_scores_do_not_depend_on_batch_mates(tiny_lm):
    judge = JudgeRewardModel(tiny_lm, template=JudgeScorer().template, batch_size=4)
    batched = judge.score(PROMPTS, RESPONSES)
    alone = [judge.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_judge_shared_prompt_prefix_matches_scoring_each_alone(tiny_lm):
    """Responses to one prompt share the start of the judge's input, which runs once per
    batch: the scores equal each question scored alone, across batch boundaries, with an
    empty response and with prompts of one response."""
    from croco.reward.batching import split_shared_prefixes

    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 4 + [PROMPTS[2]]
    responses = ["An apple.", "A pear, or a plum.", "", "Wegen der Streuung.",
                 "Rayleigh.", "Weil Licht streut.", "Wegen der Rayleigh-Streuung.", "Une pomme."]
    judge = JudgeRewardModel(tiny_lm, template=JudgeScorer().template, batch_size=3)
    ids = [judge.tokenizer(judge.render(p, r), add_special_tokens=False)["input_ids"]
           for p, r in zip(prompts, responses)]
    shared = split_shared_prefixes(ids, prompts)
    assert shared[0] > 0 and shared[3] > shared[0] and shared[7] == 0
    assert all(0 < len(seq) - n for seq, n in zip(ids, shared))
    grouped = judge.score(prompts, responses)
    alone = [judge.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert grouped == pytest.approx(alone, abs=1e-5)


def test_judge_score_is_yes_minus_no_log_probability(tiny_lm):
    import torch

    judge = JudgeRewardModel(tiny_lm, template=JudgeScorer().template)
    text = judge.render(PROMPTS[0], RESPONSES[0])
    ids = judge.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = judge.model(input_ids=ids).logits[0, -1].log_softmax(-1)
    expected = (logp[judge.yes_id] - logp[judge.no_id]).item()
    assert judge.score(PROMPTS[:1], RESPONSES[:1])[0] == pytest.approx(expected, abs=1e-5)


def test_language_identification_offline():
    lid = LanguageIdentifier()
    langs, probs = lid.detect(["Das ist ein schöner Tag und die Sonne scheint.",
                               "C'est une belle journée et le soleil brille.", ""])
    assert langs == ["de", "fr", "und"]
    assert probs[0] > 0.5 and probs[2] == 0.0
    p = lid.prob_of(["Das ist ein schöner Tag und die Sonne scheint."] * 2, ["de", "fr"])
    assert p[0] > 0.5 > p[1]


def test_score_frame_combines_weighted_scores(tiny_lm, tiny_rm):
    gens = pl.DataFrame({
        "prompt_id": ["a", "a", "b"], "lang": ["en", "en", "de"], "sample_idx": [0, 1, 0],
        "response": ["An apple.", "Pear", "Ein Apfel ist eine Frucht, die an Bäumen wächst."],
        "n_tokens": [3, 2, 9], "finish_reason": ["stop"] * 3, "policy": ["t"] * 3,
    })
    prompts = pl.DataFrame({"prompt_id": ["a", "b"], "lang": ["en", "de"],
                            "prompt": ["Name a fruit.", "Nenne eine Frucht."]})
    scorers = [ClassifierScorer(name="rm", model=tiny_rm, weight=1.0),
               JudgeScorer(name="judge", model=tiny_lm, weight=0.5),
               LangIdScorer(name="lang", weight=2.0)]
    out = score_frame(gens, prompts, scorers)
    assert out.columns == [*gens.columns, "detected_lang", "lang_prob", "reward_rm",
                           "reward_judge", "reward_lang", "reward"]
    expected = out["reward_rm"] + 0.5 * out["reward_judge"] + 2.0 * out["reward_lang"]
    assert out["reward"].to_list() == pytest.approx(expected.to_list())
    assert out["reward"].dtype == pl.Float64
    assert out["detected_lang"][2] == "de"


def test_generation_without_a_prompt_is_an_error(tiny_rm):
    gens = pl.DataFrame({"prompt_id": ["zz"], "lang": ["en"], "sample_idx": [0],
                         "response": ["x"]})
    prompts = pl.DataFrame({"prompt_id": ["a"], "lang": ["en"], "prompt": ["p"]})
    with pytest.raises(ValueError, match="prompt_id 'zz' lang 'en' has no prompt"):
        score_frame(gens, prompts, [LangIdScorer()])


def test_reward_model_with_several_labels_is_rejected(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      num_labels=3, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has 3 labels"):
        ClassifierRewardModel(str(tmp_path))
