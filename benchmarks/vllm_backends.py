"""vLLM against transformers on one GPU: generation (new tokens/s) and judge reward
scoring (seconds, and the scores compared). Needs CUDA and the `croco[vllm]` extra; where
either is missing, importing this module raises ImportError with the reason, so
`python -m benchmarks` lists it as not available and runs the others.

- generation: the same chat prompts, k samples each, T=1.0, the same token budget, bf16:
  transformers' `generate(num_return_sequences=k)` against croco's vLLM backend
  (`VLLMGenerator`, one `LLM.chat` call with `n=k`). New tokens are counted as croco
  counts them (up to and including the first end-of-sequence token).
- judge scoring: SmolLM2-135M-Instruct as judge (log P(Yes) - log P(No)) over
  responses the vLLM generator wrote, bf16: croco's transformers judge (length-sorted
  batches of 16, shared prompt prefixes) against `VLLMJudgeScorer`. The two must agree
  within `BF16_TOLERANCE` on every response (both read the same token ids; bf16 kernels
  differ), else the case fails.

Each engine takes `GPU_SHARE` of the GPU's memory, so both engines and the transformers
models fit on one card (an engine keeps its memory until the process ends).

    python benchmarks/vllm_backends.py [--prompts 32] [--k 8] [--max-new-tokens 256]
        [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

if not torch.cuda.is_available():
    raise ImportError("needs a CUDA GPU (torch.cuda.is_available() is False)")
try:
    import vllm  # noqa: F401
except ImportError:
    raise ImportError("needs vllm: pip install 'croco[vllm]' (GPU hosts only)") from None

from benchmarks.ab import Case, run_and_print
from benchmarks.generation_prefill import conversations, count_new_tokens
from croco.config import EMBEDDED_POLICY, JudgeScorer

#: A judge score is a log-odds; bf16 on two different kernel sets moves it by hundredths.
BF16_TOLERANCE = 0.1
GPU_SHARE = 0.3
SIZES = {
    False: {"prompts": 32, "k": 8, "max_new_tokens": 256, "prompt_words": 200},
    True: {"prompts": 4, "k": 4, "max_new_tokens": 32, "prompt_words": 90},
}


def cases(quick: bool = False, *, model: str = EMBEDDED_POLICY, **sizes) -> list[Case]:
    size = {**SIZES[quick], **{k: v for k, v in sizes.items() if v is not None}}
    k, max_new = size["k"], size["max_new_tokens"]
    convs = conversations(size["prompts"], size["prompt_words"])
    state: dict = {"tps": {"transformers": [], "vllm": []}, "max_diff": 0.0}

    def engines():
        if "vllm" not in state:
            from croco.generation.transformers import TransformersGenerator
            from croco.generation.vllm import VLLMGenerator

            state["vllm"] = VLLMGenerator(model, dtype="bfloat16",
                                          gpu_memory_utilization=GPU_SHARE)
            state["hf"] = TransformersGenerator(model, device="cuda", dtype="bfloat16")
        return state["hf"], state["vllm"]

    def per_second(fn) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = fn()
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    def hf_generate() -> float:
        hf, _ = engines()

        def run():
            enc = hf._encode(convs)
            torch.manual_seed(0)
            with torch.inference_mode():
                out = hf.model.generate(**enc, do_sample=True, temperature=1.0, top_k=0,
                                        max_new_tokens=max_new, num_return_sequences=k,
                                        pad_token_id=hf.tokenizer.pad_token_id)
            return count_new_tokens(out[:, enc["input_ids"].shape[1]:].tolist(), hf.eos_ids)

        return per_second(run)

    def vllm_generate() -> float:
        _, v = engines()

        def run():
            out = v.generate(convs, k=k, temperature=1.0, max_new_tokens=max_new, seed=0)
            state["responses"] = [c.text for s in out for c in s]
            return sum(c.n_tokens for s in out for c in s)

        return per_second(run)

    def gen_warm_up() -> None:
        hf_generate()
        vllm_generate()

    def gen_note() -> str:
        return (f"{model}, {len(convs)} prompts x k={k}, <= {max_new} new tokens, T=1.0, "
                f"bf16; vLLM engine at gpu_memory_utilization {GPU_SHARE}")

    def judges():
        if "judge_hf" not in state:
            from croco.reward.judge import JudgeRewardModel
            from croco.reward.vllm import VLLMJudgeScorer

            template = JudgeScorer().template
            state["judge_hf"] = JudgeRewardModel(model, template=template, device="cuda",
                                                 dtype="bfloat16", batch_size=16)
            state["judge_vllm"] = VLLMJudgeScorer(model, template=template, dtype="bfloat16",
                                                  gpu_memory_utilization=GPU_SHARE)
            if "responses" not in state:
                vllm_generate()
            texts = [c[-1]["content"] for c in convs]
            state["items"] = ([texts[i // k] for i in range(len(state["responses"]))],
                              state["responses"])
        return state["judge_hf"], state["judge_vllm"], state["items"]

    def timed(fn) -> tuple[float, list[float]]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        got = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t, got

    def hf_judge() -> float:
        hf, _, (prompts, responses) = judges()
        seconds, state["hf_scores"] = timed(lambda: hf.score(prompts, responses))
        return seconds

    def vllm_judge() -> float:
        _, v, (prompts, responses) = judges()
        seconds, got = timed(lambda: v.score(prompts, responses))
        if "hf_scores" not in state:
            hf_judge()
        diff = max(abs(a - b) for a, b in zip(got, state["hf_scores"]))
        state["max_diff"] = max(state["max_diff"], diff)
        if not diff <= BF16_TOLERANCE:
            raise AssertionError(f"vLLM and transformers judge scores differ by up to "
                                 f"{diff:.3g} (> {BF16_TOLERANCE}, bf16)")
        return seconds

    def judge_warm_up() -> None:
        hf_judge()
        vllm_judge()

    def judge_note() -> str:
        scores = state["hf_scores"]
        return (f"{model} as judge, {len(scores)} responses of the vLLM generator, bf16; "
                f"max |vLLM - transformers| = {state['max_diff']:.3g} (tolerance "
                f"{BF16_TOLERANCE}); scores' spread (stdev) {statistics.pstdev(scores):.3g}")

    return [
        Case(f"generation on GPU, {len(convs)} prompts x k={k}: vLLM vs transformers",
             baseline=hf_generate, croco=vllm_generate, unit="new tokens/s",
             higher_is_better=True, baseline_label="transformers generate(num_return_sequences=k)",
             croco_label="croco's vLLM backend", setup=gen_warm_up, note=gen_note),
        Case(f"judge scoring on GPU, {len(convs) * k} responses: vLLM vs transformers",
             baseline=hf_judge, croco=vllm_judge, unit="s",
             baseline_label="croco's transformers judge (batches of 16)",
             croco_label="croco's vLLM judge", setup=judge_warm_up, note=judge_note),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=EMBEDDED_POLICY)
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    run_and_print(cases(a.quick, model=a.model, prompts=a.prompts, k=a.k,
                        max_new_tokens=a.max_new_tokens), reps=a.reps)


if __name__ == "__main__":
    main()
