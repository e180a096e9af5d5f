"""The vLLM reward-scoring backend: request building and result mapping without vLLM, and
(marked vllm: the real engine, vLLM's CPU build or its CUDA build) its scores against the
transformers scorers on tiny random models, in float32 on the same token ids."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from croco.config import ClassifierScorer, JudgeScorer
from croco.generation.vllm import shutdown
from croco.reward.vllm import (
    in_chunks,
    judge_requests,
    judge_sampling_kwargs,
    map_classify_outputs,
    map_judge_outputs,
    raw_logit_pooling_kwargs,
    scorer_llm_kwargs,
    token_prompts,
)

YES, NO = 11, 22
#: vLLM against transformers in float32 on the same token ids (measured on vLLM's CPU
#: build: classifier within 1.5e-5, judge within 4.6e-5).
FP32_TOLERANCE = 1e-4


def _classified(*values):
    return SimpleNamespace(outputs=SimpleNamespace(probs=list(values)))


def _generated(logprobs_by_token: dict[int, float], sampled: int):
    """A vLLM RequestOutput of one generated token with its first position's log-probs."""
    first = {tok: SimpleNamespace(logprob=lp, rank=1, decoded_token=str(tok))
             for tok, lp in logprobs_by_token.items()}
    return SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[sampled],
                                                    logprobs=[first], finish_reason="length")])


# ------------------------------------------------------------------------- request building


def test_raw_logit_pooling_kwargs_follow_the_installed_spelling():
    assert raw_logit_pooling_kwargs({"use_activation", "dimensions", "task"}) == {
        "use_activation": False}
    assert raw_logit_pooling_kwargs({"activation", "softmax", "normalize"}) == {
        "activation": False}
    with pytest.raises(RuntimeError, match=r"vllm>=0\.10\.1"):
        raw_logit_pooling_kwargs({"dimensions", "task"})


def test_reward_model_runs_on_the_pooling_runner():
    kw = scorer_llm_kwargs("/m", pooling=True, dtype="bfloat16", tensor_parallel_size=2,
                           gpu_memory_utilization=0.4, max_model_len=4096, seed=3,
                           enforce_eager=False, engine_fields={"runner", "convert", "model"})
    assert kw == {"model": "/m", "dtype": "bfloat16", "tensor_parallel_size": 2,
                  "gpu_memory_utilization": 0.4, "max_model_len": 4096, "seed": 3,
                  "enforce_eager": False, "runner": "pooling"}
    with pytest.raises(RuntimeError, match=r"runner='pooling'.*vllm>=0\.10\.1"):
        scorer_llm_kwargs("/m", pooling=True, dtype="auto", tensor_parallel_size=1,
                          gpu_memory_utilization=0.9, max_model_len=8, seed=0,
                          enforce_eager=False, engine_fields={"task", "model"})


def test_judge_runs_on_the_generate_runner_with_prefix_caching():
    kw = scorer_llm_kwargs("/j", pooling=False, dtype="auto", tensor_parallel_size=1,
                           gpu_memory_utilization=0.9, max_model_len=2049, seed=0,
                           enforce_eager=True, engine_fields={"task"})
    assert "runner" not in kw and "task" not in kw
    assert kw["enable_prefix_caching"] is True and kw["max_model_len"] == 2049


def test_token_prompts_pass_the_ids_unchanged_and_unshared():
    ids = [[5, 6, 7], [8]]
    prompts = token_prompts(ids)
    assert prompts == [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8]}]
    prompts[0]["prompt_token_ids"].append(99)
    assert ids[0] == [5, 6, 7]


def test_judge_asks_for_both_token_log_probs_in_one_request_where_vllm_can():
    assert judge_sampling_kwargs(YES, NO, logprob_token_ids=True) == [
        {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": [YES, NO]}]


def test_judge_otherwise_forces_each_answer_token_in_its_own_request():
    assert judge_sampling_kwargs(YES, NO, logprob_token_ids=False) == [
        {"max_tokens": 1, "temperature": 0.0, "logprobs": 0, "allowed_token_ids": [YES]},
        {"max_tokens": 1, "temperature": 0.0, "logprobs": 0, "allowed_token_ids": [NO]},
    ]


def test_judge_requests_keep_a_responses_requests_adjacent():
    prompts, kinds, owners = judge_requests([[1, 2], [3]], n_kinds=2)
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [1, 2]},
                       {"prompt_token_ids": [3]}, {"prompt_token_ids": [3]}]
    assert kinds == [0, 1, 0, 1] and owners == [0, 0, 1, 1]
    prompts[0]["prompt_token_ids"].append(9)
    assert prompts[1]["prompt_token_ids"] == [1, 2]
    assert judge_requests([[1], [2], [3]], n_kinds=1)[2] == [0, 1, 2]


# --------------------------------------------------------------------------- result mapping


def test_classify_outputs_are_raw_logits_in_request_order():
    scores = map_classify_outputs([_classified(2.5), _classified(-3.25), _classified(0.0)])
    assert scores == [2.5, -3.25, 0.0]


def test_classify_output_with_several_labels_is_refused():
    with pytest.raises(ValueError, match="2 class values for request 1.*exactly one label"):
        map_classify_outputs([_classified(0.1), _classified(0.3, 0.7)])


def test_judge_score_is_yes_minus_no_from_paired_requests():
    owners = [0, 0, 1, 1]
    outputs = [_generated({YES: -0.25}, YES), _generated({NO: -1.75}, NO),
               _generated({YES: -3.0}, YES), _generated({NO: -0.5}, NO)]
    assert map_judge_outputs(outputs, owners, 2, YES, NO) == [1.5, -2.5]


def test_judge_score_from_one_request_per_response_ignores_other_tokens():
    outputs = [_generated({7: -0.01, YES: -4.0, NO: -6.5}, 7),
               _generated({YES: -0.1, NO: -2.4}, YES)]
    assert map_judge_outputs(outputs, [0, 1], 2, YES, NO) == pytest.approx([2.5, 2.3])


def test_judge_mapping_follows_the_owner_of_each_request():
    owners = [1, 0, 1, 0]
    outputs = [_generated({YES: -1.0}, YES), _generated({YES: -2.0}, YES),
               _generated({NO: -4.0}, NO), _generated({NO: -8.0}, NO)]
    assert map_judge_outputs(outputs, owners, 2, YES, NO) == [6.0, 3.0]


def test_judge_missing_answer_token_names_token_and_response():
    outputs = [_generated({YES: -0.5, NO: -1.0}, YES), _generated({YES: -0.5, 5: -0.1}, 5)]
    with pytest.raises(RuntimeError, match=rf"no token \(id {NO}\) of response 1"):
        map_judge_outputs(outputs, [0, 1], 2, YES, NO)


def test_judge_refuses_masked_log_probs():
    outputs = [_generated({YES: 0.0}, YES), _generated({NO: 0.0}, NO)]
    with pytest.raises(RuntimeError, match="raw_logprobs"):
        map_judge_outputs(outputs, [0, 0], 1, YES, NO)


def test_judge_refuses_outputs_without_log_probs_or_of_the_wrong_count():
    bare = SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[YES], logprobs=None)])
    with pytest.raises(RuntimeError, match="no log-probabilities for judge request 0"):
        map_judge_outputs([bare], [0], 1, YES, NO)
    with pytest.raises(RuntimeError, match="1 outputs for 2 judge requests"):
        map_judge_outputs([_generated({YES: -1.0, NO: -2.0}, YES)], [0, 1], 2, YES, NO)


def test_chunks_keep_order_and_report_progress():
    seen, calls = [], []
    out = in_chunks(list(range(5)), lambda chunk: (calls.append(list(chunk)) or
                                                   [10.0 * x for x in chunk]),
                    chunk_size=2, progress=lambda done, total: seen.append((done, total)))
    assert out == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert calls == [[0, 1], [2, 3], [4]]
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert in_chunks([], lambda chunk: [], chunk_size=4) == []
    with pytest.raises(RuntimeError, match="scored 1 of 2"):
        in_chunks([1, 2], lambda chunk: [0.0], chunk_size=2)


# ------------------------------------------------------------------ config and dispatching


def test_scorer_backend_config():
    assert ClassifierScorer().backend == "transformers"
    judge = JudgeScorer(backend="vllm", tensor_parallel_size=2, gpu_memory_utilization=0.45)
    assert (judge.backend, judge.tensor_parallel_size, judge.gpu_memory_utilization) == (
        "vllm", 2, 0.45)
    for bad in ({"backend": "sglang"}, {"tensor_parallel_size": -1},
                {"gpu_memory_utilization": 1.5}):
        with pytest.raises(ValueError):
            ClassifierScorer(**bad)


def test_make_scorer_builds_each_vllm_scorer_once(monkeypatch):
    import croco.reward.vllm as vllm_backend
    from croco.reward import make_scorer

    built = []

    def recorder(kind):
        def build(model, **kwargs):
            built.append((kind, model, kwargs))
            return SimpleNamespace(kind=kind)
        return build

    monkeypatch.setattr(vllm_backend, "_SCORERS", {})
    monkeypatch.setattr(vllm_backend, "VLLMClassifierScorer", recorder("classifier"))
    monkeypatch.setattr(vllm_backend, "VLLMJudgeScorer", recorder("judge"))
    rm = ClassifierScorer(model="org/rm", backend="vllm", tensor_parallel_size=2,
                          gpu_memory_utilization=0.4, max_length=1024, dtype="bfloat16")
    first = make_scorer(rm)
    assert make_scorer(rm.model_copy(update={"weight": 3.0, "batch_size": 2})) is first
    judge = make_scorer(JudgeScorer(model="org/j", backend="vllm", yes_token="Ja",
                                    no_token="Nein"))
    assert (first.kind, judge.kind) == ("classifier", "judge")
    assert built[0] == ("classifier", "org/rm", {
        "dtype": "bfloat16", "max_length": 1024, "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.4})
    assert built[1][:2] == ("judge", "org/j")
    assert built[1][2]["yes_token"] == "Ja" and built[1][2]["no_token"] == "Nein"
    assert built[1][2]["template"] == JudgeScorer().template
    assert len(built) == 2
    make_scorer(rm.model_copy(update={"max_length": 512}))
    assert len(built) == 3


def test_vllm_scorer_without_vllm_names_the_install_command(monkeypatch):
    from croco.reward import make_scorer

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    for cfg in (ClassifierScorer(model="some/rm", backend="vllm"),
                JudgeScorer(model="some/judge", backend="vllm")):
        with pytest.raises(ImportError, match=r"pip install 'croco\[vllm\]'.*setup-vllm\.sh"):
            make_scorer(cfg)


# ------------------------------------------- with vLLM (its CPU build here, CUDA on a GPU)

PROMPTS = ["Name a fruit.", "Warum ist der Himmel blau?", "Cite un fruit.", "Hi",
           "Explain in detail how bread rises. " * 12]
RESPONSES = ["An apple.", "Wegen der Rayleigh-Streuung des Sonnenlichts.",
             "Une pomme, une poire ou une banane.", "",
             "Yeast ferments sugar into carbon dioxide, which the gluten traps. " * 10]


@pytest.fixture(scope="module")
def vllm_classifier(vllm_installed, vllm_rm):
    from croco.reward.vllm import VLLMClassifierScorer

    path = vllm_rm
    scorer = VLLMClassifierScorer(path, dtype="float32", max_length=256,
                                  gpu_memory_utilization=0.25, enforce_eager=True, chunk_size=3)
    yield path, scorer
    shutdown(scorer.llm)


@pytest.fixture(scope="module")
def vllm_judge(vllm_installed, vllm_lm):
    from croco.reward.vllm import VLLMJudgeScorer

    path = vllm_lm
    scorer = VLLMJudgeScorer(path, template=JudgeScorer().template, dtype="float32",
                             max_length=96, gpu_memory_utilization=0.25, enforce_eager=True,
                             chunk_size=3)
    yield path, scorer
    shutdown(scorer.llm)


@pytest.mark.vllm
def test_vllm_classifier_matches_transformers(vllm_classifier):
    from croco.reward.classifier import ClassifierRewardModel

    path, scorer = vllm_classifier
    ref = ClassifierRewardModel(path, device="cpu", dtype="float32", max_length=256)
    expected = ref.score(PROMPTS, RESPONSES)
    progress = []
    got = scorer.score(PROMPTS, RESPONSES, progress=lambda d, t: progress.append((d, t)))
    assert max(abs(v) for v in expected) > 1.0  # raw logits, outside a sigmoid's range
    assert len({round(v, 3) for v in expected}) == len(PROMPTS)
    assert got == pytest.approx(expected, rel=FP32_TOLERANCE, abs=FP32_TOLERANCE)
    assert progress == [(3, 5), (5, 5)]


@pytest.mark.vllm
def test_vllm_judge_matches_transformers(vllm_judge):
    from vllm import SamplingParams

    from croco.reward.judge import JudgeRewardModel
    from croco.reward.vllm import judge_sampling_kwargs, struct_fields

    path, scorer = vllm_judge
    ref = JudgeRewardModel(path, template=JudgeScorer().template, device="cpu",
                           dtype="float32", max_length=96)
    expected = ref.score(PROMPTS, RESPONSES)
    assert len({round(v, 4) for v in expected}) > 1
    assert scorer.score(PROMPTS, RESPONSES) == pytest.approx(expected, rel=FP32_TOLERANCE, abs=FP32_TOLERANCE)
    if "logprob_token_ids" in struct_fields(SamplingParams):
        # This vLLM took one request per response above; the fallback of two requests
        # with one allowed token each must give the same scores.
        scorer.params = [SamplingParams(**kw) for kw in judge_sampling_kwargs(
            scorer.yes_id, scorer.no_id, logprob_token_ids=False)]
        assert len(scorer.params) == 2
        assert scorer.score(PROMPTS, RESPONSES) == pytest.approx(expected, rel=FP32_TOLERANCE,
                                                                 abs=FP32_TOLERANCE)
