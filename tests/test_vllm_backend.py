"""The vLLM backend's request building and result mapping, without vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from croco.generation import Completion
from croco.generation.vllm import llm_kwargs, map_outputs, sampling_kwargs


def test_sampling_kwargs_ask_for_k_samples_per_prompt():
    assert sampling_kwargs(k=64, temperature=1.0, top_p=0.9, max_new_tokens=4096, seed=3) == {
        "n": 64, "temperature": 1.0, "top_p": 0.9, "max_tokens": 4096, "seed": 3}


def test_greedy_sampling_drops_top_p():
    assert "top_p" not in sampling_kwargs(k=1, temperature=0.0, top_p=0.9, max_new_tokens=8,
                                          seed=0)


def test_llm_kwargs_enable_lora_only_with_an_adapter():
    base = llm_kwargs("m", dtype="auto", tensor_parallel_size=2, adapter=None, seed=0)
    assert base == {"model": "m", "tensor_parallel_size": 2, "seed": 0, "dtype": "auto"}
    lora = llm_kwargs("m", dtype="bfloat16", tensor_parallel_size=1, adapter="/a", seed=0)
    assert lora["enable_lora"] is True and lora["dtype"] == "bfloat16"


def test_llm_kwargs_pass_a_memory_share_only_when_given():
    shared = llm_kwargs("m", dtype="auto", tensor_parallel_size=1, adapter=None, seed=0,
                        gpu_memory_utilization=0.3)
    assert shared["gpu_memory_utilization"] == 0.3
    assert "gpu_memory_utilization" not in llm_kwargs("m", dtype="auto", tensor_parallel_size=1,
                                                      adapter=None, seed=0)


def test_map_outputs_keeps_sample_order_and_finish_reasons():
    out = lambda i, text, n, reason: SimpleNamespace(index=i, text=text, token_ids=list(range(n)),
                                                      finish_reason=reason)
    requests = [SimpleNamespace(outputs=[out(1, " b ", 4, "length"), out(0, "a", 2, "stop")]),
                SimpleNamespace(outputs=[out(0, "c", 1, "abort")])]
    assert map_outputs(requests) == [
        [Completion("a", 2, "stop"), Completion("b", 4, "length")],
        [Completion("c", 1, "stop")],
    ]


def test_missing_vllm_names_the_install_command():
    try:
        import vllm  # noqa: F401
    except ImportError:
        from croco.generation import make_generator

        with pytest.raises(ImportError, match=r"pip install 'croco\[vllm\]'"):
            make_generator("vllm", "some/model")
    else:
        pytest.skip("vllm is installed: the missing-package error cannot be shown")


def test_vllm_judge_without_vllm_names_the_install_command():
    import polars as pl

    from croco.evaluation.judge import judge_pairs

    try:
        import vllm  # noqa: F401
    except ImportError:
        pairs = pl.DataFrame({"lang": ["en"], "prompt_id": ["a"], "prompt": ["p"],
                              "candidate": ["c"], "baseline": ["b"]})
        with pytest.raises(ImportError, match=r"pip install 'croco\[vllm\]'"):
            judge_pairs(pairs, judge_model="some/judge", mode="generate", backend="vllm")
    else:
        pytest.skip("vllm is installed: the missing-package error cannot be shown")
