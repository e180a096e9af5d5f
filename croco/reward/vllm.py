"""The vLLM reward-scoring backend (optional: `croco[vllm]` on a CUDA host, or vLLM's CPU
build beside croco with `bash infra/setup-vllm.sh`).

Both scorers tokenize exactly as their transformers counterparts do (same chat rendering,
same left truncation, see `pair_token_ids` / `question_token_ids`) and hand vLLM the token
ids, so the two backends score identical inputs; they differ only by numerics (vLLM's
kernels; in bf16 expect differences of a few hundredths, as between batch sizes).

- Classifier: the reward model runs on vLLM's pooling runner (`LLM(runner="pooling")`,
  auto-converted from `*ForSequenceClassification`), scored with `LLM.classify`. For a
  one-label model vLLM's classify head applies a sigmoid by default; the request asks for
  `PoolingParams(use_activation=False)` (vLLM 0.10.1-0.10.x spell it `activation=False`),
  so the score is the raw logit, as with transformers.
- Judge: log P(yes) - log P(no) of the first answer token, from one generated token with
  `SamplingParams(max_tokens=1, temperature=0)`. Where `SamplingParams` has
  `logprob_token_ids` (recent vLLM) one request per response asks for exactly the yes and
  no log-probs. Otherwise each response becomes two requests whose only allowed token is
  the yes (resp. the no) token, with `logprobs=0` (the sampled token's log-prob): vLLM
  computes returned log-probs from the raw logits before `allowed_token_ids` masks them
  (`logprobs_mode="raw_logprobs"`, the default), so both are exact full-vocabulary
  log-softmax values; adjacent, the second can reuse the first's prompt through prefix
  caching. Not top-N `logprobs` (yes or no may fall outside the top N) and not
  `prompt_logprobs` (log-softmax over every prompt position, and no prefix cache).

API followed: vLLM 0.33.0 (`vllm/entrypoints/llm.py`, `vllm/entrypoints/pooling/offline.py`,
`vllm/pooling_params.py`, `vllm/sampling_params.py`, `vllm/v1/sample/sampler.py`), checked
against 0.10.1.1 for the older spellings; vLLM 0.10.0 has no per-request switch for the
classifier activation and is refused with a clear message.

`batch_size` does not apply: vLLM schedules its own batches; prompts go to it in chunks of
`chunk_size` so progress can be reported. Request building and result mapping are plain
functions so they can be tested without vLLM installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from croco.generation.vllm import (
    eager_default,
    engine_dtype,
    parallel_size,
    platform_kwargs,
    prepare_engine_start,
    require_vllm,
)

MIN_VERSION_HINT = "croco's vllm reward scoring needs vllm>=0.10.1"


def struct_fields(cls) -> set[str]:
    """Field names of a vLLM parameter class (msgspec Struct or dataclass)."""
    fields = getattr(cls, "__struct_fields__", None)
    if fields is not None:
        return set(fields)
    return {f.name for f in dataclasses.fields(cls)}


def raw_logit_pooling_kwargs(pooling_fields: set[str]) -> dict[str, Any]:
    """Keyword arguments for `vllm.PoolingParams` that switch the classifier activation off."""
    if "use_activation" in pooling_fields:
        return {"use_activation": False}
    if "activation" in pooling_fields:
        return {"activation": False}
    raise RuntimeError(f"this vLLM's PoolingParams cannot return raw classifier logits (no "
                       f"use_activation or activation field); {MIN_VERSION_HINT}")


def scorer_llm_kwargs(model_path: str, *, pooling: bool, dtype: str, tensor_parallel_size: int,
                      gpu_memory_utilization: float, max_model_len: int, seed: int,
                      enforce_eager: bool | None, engine_fields: set[str], cpu: bool = False,
                      environ=os.environ) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`: the pooling runner for a reward model, the default
    (generate) runner with prefix caching for a judge. dtype, memory and eager mode follow
    the generation engine's rules (`croco.generation.vllm`): `auto` is croco's precision
    rule, and on vLLM's CPU build the KV cache is sized instead of `gpu_memory_utilization`
    (which on a CPU means a share of the machine's memory)."""
    kwargs: dict[str, Any] = {
        "model": model_path, "dtype": engine_dtype(dtype, cpu=cpu),
        "tensor_parallel_size": parallel_size(tensor_parallel_size, cpu=cpu),
        "gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len,
        "seed": seed,
        "enforce_eager": eager_default(cpu) if enforce_eager is None else enforce_eager,
    }
    if cpu:
        del kwargs["gpu_memory_utilization"]
        kwargs.update(platform_kwargs(cpu=cpu, environ=environ))
    if pooling:
        if "runner" not in engine_fields:
            raise RuntimeError(f"this vLLM has no pooling runner option (runner='pooling'); "
                               f"{MIN_VERSION_HINT}")
        kwargs["runner"] = "pooling"
    else:
        kwargs["enable_prefix_caching"] = True
    return kwargs


def token_prompts(token_ids: list[list[int]]) -> list[dict[str, list[int]]]:
    """vLLM `TokensPrompt`s: the ids are used as they are (no special tokens added)."""
    return [{"prompt_token_ids": list(ids)} for ids in token_ids]


def map_classify_outputs(outputs) -> list[float]:
    """vLLM `ClassificationRequestOutput`s (in request order) -> one raw logit each."""
    scores = []
    for i, out in enumerate(outputs):
        values = list(out.outputs.probs)
        if len(values) != 1:
            raise ValueError(f"vLLM returned {len(values)} class values for request {i}; a "
                             "reward model has exactly one label")
        scores.append(float(values[0]))
    return scores


def judge_sampling_kwargs(yes_id: int, no_id: int, *,
                          logprob_token_ids: bool) -> list[dict[str, Any]]:
    """Keyword arguments for each kind of `vllm.SamplingParams` request a response needs:
    one asking for both log-probs, or one per answer token with only that token allowed."""
    if logprob_token_ids:
        return [{"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": [yes_id, no_id]}]
    return [{"max_tokens": 1, "temperature": 0.0, "logprobs": 0, "allowed_token_ids": [tok]}
            for tok in (yes_id, no_id)]


def judge_requests(token_ids: list[list[int]],
                   n_kinds: int) -> tuple[list[dict[str, list[int]]], list[int], list[int]]:
    """Requests for `n_kinds` requests per response, adjacent so they share their prefix.
    Returns (prompts, kind of each request, response index of each request)."""
    prompts, kinds, owners = [], [], []
    for i, ids in enumerate(token_ids):
        for kind in range(n_kinds):
            prompts.append({"prompt_token_ids": list(ids)})
            kinds.append(kind)
            owners.append(i)
    return prompts, kinds, owners


def map_judge_outputs(request_outputs, owners: list[int], n_items: int, yes_id: int,
                      no_id: int) -> list[float]:
    """vLLM `RequestOutput`s (in request order; `owners[j]` is request j's response) ->
    log P(yes) - log P(no) of each response's first answer token."""
    request_outputs = list(request_outputs)
    if len(request_outputs) != len(owners):
        raise RuntimeError(f"vLLM returned {len(request_outputs)} outputs for "
                           f"{len(owners)} judge requests")
    found: list[dict[int, float]] = [{} for _ in range(n_items)]
    for j, (req, item) in enumerate(zip(request_outputs, owners)):
        logprobs = req.outputs[0].logprobs
        if not logprobs:
            raise RuntimeError(f"vLLM returned no log-probabilities for judge request {j}")
        first = logprobs[0]
        for tok in (yes_id, no_id):
            if tok in first:
                found[item][tok] = float(first[tok].logprob)
    scores = []
    for i, lp in enumerate(found):
        for tok, name in ((yes_id, "yes"), (no_id, "no")):
            if tok not in lp:
                raise RuntimeError(f"vLLM returned no log-probability for the judge's {name} "
                                   f"token (id {tok}) of response {i}")
        if lp[yes_id] == 0.0 and lp[no_id] == 0.0:
            raise RuntimeError("vLLM gave both answer tokens log-probability 0: it returned "
                               "log-probs after the allowed-token mask, not raw ones; start "
                               "it with logprobs_mode='raw_logprobs'")
        scores.append(lp[yes_id] - lp[no_id])
    return scores


def in_chunks(items: list, run: Callable[[list], list[float]], chunk_size: int,
              progress=None) -> list[float]:
    """`run` over consecutive chunks of `items`, one result per item, in order."""
    out: list[float] = []
    for start in range(0, len(items), chunk_size):
        chunk = items[start:start + chunk_size]
        values = run(chunk)
        if len(values) != len(chunk):
            raise RuntimeError(f"vLLM scored {len(values)} of {len(chunk)} sequences")
        out.extend(values)
        if progress is not None:
            progress(len(out), len(items))
    return out


def _engine_fields(vllm) -> set[str]:
    return {f.name for f in dataclasses.fields(vllm.EngineArgs)}


def _start_engine(vllm, **kwargs):
    """A scorer's `vllm.LLM` (`scorer_llm_kwargs`), on the platform vLLM runs on."""
    cpu = prepare_engine_start()
    return vllm.LLM(**scorer_llm_kwargs(**kwargs, engine_fields=_engine_fields(vllm), cpu=cpu))


class VLLMClassifierScorer:
    """A one-label sequence-classification reward model on vLLM; the score is its raw logit."""

    def __init__(self, model: str, *, dtype: str = "auto", max_length: int = 4096,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 seed: int = 0, enforce_eager: bool | None = None, chunk_size: int = 1024):
        vllm = require_vllm()
        from transformers import AutoConfig

        from croco.models import load_tokenizer, resolve_model

        path = resolve_model(model)
        num_labels = AutoConfig.from_pretrained(path).num_labels
        if num_labels != 1:
            raise ValueError(f"reward model {model!r} has {num_labels} labels; a reward model "
                             "has exactly one")
        self.params = vllm.PoolingParams(
            **raw_logit_pooling_kwargs(struct_fields(vllm.PoolingParams)))
        self.tokenizer = load_tokenizer(model)
        self.max_length = max_length
        self.chunk_size = chunk_size
        self.llm = _start_engine(
            vllm, model_path=path, pooling=True, dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_length, seed=seed,
            enforce_eager=enforce_eager)

    def score(self, prompts: list[str], responses: list[str], progress=None, *,
              langs: list[str] | None = None) -> list[float]:
        from croco.reward.classifier import pair_token_ids

        ids = pair_token_ids(self.tokenizer, prompts, responses, self.max_length)

        def run(chunk: list[list[int]]) -> list[float]:
            outputs = self.llm.classify(token_prompts(chunk), pooling_params=self.params,
                                        use_tqdm=False)
            return map_classify_outputs(outputs)

        return in_chunks(ids, run, self.chunk_size, progress)


class VLLMJudgeScorer:
    """A causal LM judge on vLLM; the score is log P(yes) - log P(no) of its first token."""

    def __init__(self, model: str, *, template: str, yes_token: str = "Yes",
                 no_token: str = "No", dtype: str = "auto", max_length: int = 2048,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 seed: int = 0, enforce_eager: bool | None = None, chunk_size: int = 1024):
        vllm = require_vllm()
        from croco.models import load_tokenizer, resolve_model
        from croco.reward.judge import answer_token_ids

        self.tokenizer = load_tokenizer(model)
        self.template = template
        self.yes_id, self.no_id = answer_token_ids(self.tokenizer, yes_token, no_token)
        self.max_length = max_length
        self.chunk_size = chunk_size
        by_ids = "logprob_token_ids" in struct_fields(vllm.SamplingParams)
        self.params = [vllm.SamplingParams(**kw) for kw in judge_sampling_kwargs(
            self.yes_id, self.no_id, logprob_token_ids=by_ids)]
        # One more position than the longest prompt: the answer token.
        self.llm = _start_engine(
            vllm, model_path=resolve_model(model), pooling=False, dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_length + 1,
            seed=seed, enforce_eager=enforce_eager)

    def score(self, prompts: list[str], responses: list[str], progress=None, *,
              langs: list[str] | None = None) -> list[float]:
        from croco.reward.judge import question_token_ids

        ids = question_token_ids(self.tokenizer, self.template, prompts, responses,
                                 self.max_length)

        def run(chunk: list[list[int]]) -> list[float]:
            requests, kinds, owners = judge_requests(chunk, len(self.params))
            outputs = self.llm.generate(requests, [self.params[k] for k in kinds],
                                        use_tqdm=False)
            return map_judge_outputs(outputs, owners, len(chunk), self.yes_id, self.no_id)

        return in_chunks(ids, run, self.chunk_size, progress)


_SCORERS: dict[str, Any] = {}


def vllm_scorer(cfg):
    """The vLLM scorer of a `ClassifierScorer` / `JudgeScorer` config, built once per process
    (an engine holds its GPU memory until the process ends, and scoring runs once per shard)."""
    from croco.config import ClassifierScorer, JudgeScorer

    key = json.dumps(cfg.model_dump(exclude={"name", "weight", "batch_size"}), sort_keys=True)
    if key in _SCORERS:
        return _SCORERS[key]
    common = {"dtype": cfg.dtype, "max_length": cfg.max_length,
              "tensor_parallel_size": cfg.tensor_parallel_size,
              "gpu_memory_utilization": cfg.gpu_memory_utilization}
    if isinstance(cfg, ClassifierScorer):
        scorer = VLLMClassifierScorer(cfg.model, **common)
    elif isinstance(cfg, JudgeScorer):
        scorer = VLLMJudgeScorer(cfg.model, template=cfg.template, yes_token=cfg.yes_token,
                                 no_token=cfg.no_token, **common)
    else:
        raise TypeError(f"no vllm backend for scorer config {cfg!r}")
    _SCORERS[key] = scorer
    return scorer


def release_scorers() -> None:
    """Shut down every vLLM scorer engine this process started (`vllm_scorer`)."""
    from croco.generation.vllm import shutdown

    for scorer in _SCORERS.values():
        shutdown(scorer.llm)
    _SCORERS.clear()
