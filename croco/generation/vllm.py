"""The vLLM generation backend (GPU, optional extra `croco[vllm]`).

One `LLM.chat` call with `SamplingParams(n=k)` per batch: vLLM shares the prompt's
prefill across the k samples itself. A LoRA adapter is served with `LoRARequest`.
Request building and result mapping are plain functions so they can be tested without
vLLM installed.
"""

from __future__ import annotations

from typing import Any

from croco.generation import Completion

INSTALL_HINT = "the vllm backend needs the vllm extra: pip install 'croco[vllm]' (GPU hosts only)"


def require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return vllm


def sampling_kwargs(*, k: int, temperature: float, top_p: float, max_new_tokens: int,
                    seed: int) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (temperature 0 means greedy)."""
    kwargs: dict[str, Any] = dict(n=k, temperature=temperature, max_tokens=max_new_tokens,
                                  seed=seed)
    if temperature > 0:
        kwargs["top_p"] = top_p
    return kwargs


def llm_kwargs(model_path: str, *, dtype: str, tensor_parallel_size: int, adapter: str | None,
               seed: int, gpu_memory_utilization: float | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`. `gpu_memory_utilization` None keeps vLLM's default
    (0.9 of the GPU); lower it when another engine or model shares the GPU."""
    kwargs: dict[str, Any] = dict(
        model=model_path, tensor_parallel_size=tensor_parallel_size, seed=seed,
        dtype="auto" if dtype == "auto" else dtype,
    )
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if adapter:
        kwargs.update(enable_lora=True, max_lora_rank=64)
    return kwargs


def map_outputs(request_outputs) -> list[list[Completion]]:
    """vLLM `RequestOutput`s (one per conversation, in order) -> k `Completion`s each."""
    results = []
    for req in request_outputs:
        samples = []
        for out in sorted(req.outputs, key=lambda o: o.index):
            reason = "length" if out.finish_reason == "length" else "stop"
            samples.append(Completion(text=out.text.strip(), n_tokens=len(out.token_ids),
                                      finish_reason=reason))
        results.append(samples)
    return results


class VLLMGenerator:
    def __init__(self, model: str, *, adapter: str | None = None, dtype: str = "auto",
                 tensor_parallel_size: int = 1, seed: int = 0,
                 gpu_memory_utilization: float | None = None):
        vllm = require_vllm()
        from croco.models import resolve_model

        self.adapter = adapter
        self.llm = vllm.LLM(**llm_kwargs(resolve_model(model), dtype=dtype,
                                         tensor_parallel_size=tensor_parallel_size,
                                         adapter=adapter, seed=seed,
                                         gpu_memory_utilization=gpu_memory_utilization))

    def generate(self, conversations: list[list[dict]], *, k: int, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 64,
                 seed: int = 0) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(**sampling_kwargs(k=k, temperature=temperature, top_p=top_p,
                                                  max_new_tokens=max_new_tokens, seed=seed))
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("croco-adapter", 1, self.adapter)
        outputs = self.llm.chat(conversations, params, lora_request=lora, use_tqdm=True)
        return map_outputs(outputs)
