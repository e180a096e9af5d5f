"""vLLM's CPU build against croco's transformers paths, on this machine's CPU. Needs vLLM's
CPU build (`bash infra/setup-vllm.sh`, then run with `.venv-vllm/bin/python`); where vLLM
is missing or a CUDA GPU is present (there `vllm_backends` measures), importing this module
raises ImportError with the reason, so `python -m benchmarks` lists it as not available.

The workload is the demo's sampling: the embedded SmolLM2-135M-Instruct, 7 languages x 7
demo prompts x k = 8 (392 sequences), <= 40 new tokens, T = 1.0, bf16 (float32 on a CPU
without bf16 instructions), one call per language as the pipeline makes them.

- generation: croco's transformers loop (batch 64) against `VLLMGenerator` (new tokens/s);
- overhead: a bare `LLM.chat` with `SamplingParams(n=k, seed)` against `VLLMGenerator`
  on the same engine and prompts (seconds; croco builds one request per conversation with
  its own seed and maps the outputs);
- LoRA: an r = 8 adapter on all linear projections served with `LoRARequest`
  (`vllm_adapter: lora`) against the same adapter merged into the weights (the default),
  new tokens/s;
- judge scoring: croco's transformers judge against `VLLMJudgeScorer` over the responses
  vLLM wrote (seconds, and the largest score difference).

    .venv-vllm/bin/python benchmarks/vllm_cpu.py [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

if torch.cuda.is_available():
    raise ImportError("a CUDA GPU is present: benchmarks/vllm_backends.py measures vLLM there")
try:
    import vllm  # noqa: F401
except ImportError:
    raise ImportError("needs vLLM's CPU build: bash infra/setup-vllm.sh, then run with "
                      ".venv-vllm/bin/python") from None

from benchmarks.ab import Case, run_and_print
from croco.config import EMBEDDED_POLICY, JudgeScorer

LANGS = ["en", "da", "nl", "fr", "de", "it", "es"]
SIZES = {False: {"prompts": 7, "k": 8, "max_new_tokens": 40},
         True: {"prompts": 2, "k": 4, "max_new_tokens": 16}}


def demo_conversations(per_lang: int) -> dict[str, list[list[dict]]]:
    import polars as pl

    from croco.generation import conversations_for
    from croco.prompts import load_prompts

    df = load_prompts("builtin:demo").filter(pl.col("split") == "train")
    return {lang: conversations_for(df.filter(pl.col("lang") == lang).head(per_lang),
                                    respond_in_language=False, instruction_template="")
            for lang in LANGS}


def random_adapter(model_path: str, out: Path) -> str:
    """An r = 8 LoRA adapter on every linear projection, with nonzero weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                           init_lora_weights=False))
    peft.save_pretrained(out)
    return str(out)


def cases(quick: bool = False) -> list[Case]:
    import tempfile

    from croco.generation.transformers import TransformersGenerator
    from croco.generation.vllm import VLLMGenerator, engine_dtype, merged_model
    from croco.models import resolve_model

    size = SIZES[quick]
    k, max_new = size["k"], size["max_new_tokens"]
    convs = demo_conversations(size["prompts"])
    flat = [c for lang in LANGS for c in convs[lang]]
    dtype = engine_dtype("auto", cpu=True)
    state: dict = {}

    def tokens(out) -> int:
        return sum(c.n_tokens for sample in out for c in sample)

    def per_second(gen) -> float:
        t = time.perf_counter()
        n = sum(tokens(gen.generate(convs[lang], k=k, temperature=1.0, max_new_tokens=max_new,
                                    batch_size=64, seed=0)) for lang in LANGS)
        return n / (time.perf_counter() - t)

    def hf():
        if "hf" not in state:
            state["hf"] = TransformersGenerator(EMBEDDED_POLICY, device="cpu", dtype=dtype)
        return state["hf"]

    def engine():
        if "vllm" not in state:
            t = time.perf_counter()
            state["vllm"] = VLLMGenerator(EMBEDDED_POLICY, dtype=dtype)
            state["vllm_start"] = time.perf_counter() - t
        return state["vllm"]

    def bare():
        from vllm import SamplingParams

        params = SamplingParams(n=k, temperature=1.0, top_p=1.0, max_tokens=max_new, seed=0)
        engine().llm.chat(flat, params, use_tqdm=False)

    def wrapped():
        engine().generate(flat, k=k, temperature=1.0, max_new_tokens=max_new, seed=0)

    def lora_engines():
        if "lora" not in state:
            import vllm as v

            from croco.generation.vllm import lora_rank, platform_kwargs, prepare_engine_start

            prepare_engine_start()
            folder = Path(tempfile.mkdtemp(prefix="croco-bench-lora-"))
            adapter = random_adapter(resolve_model(EMBEDDED_POLICY), folder / "adapter")
            from vllm.lora.request import LoRARequest

            common = {"dtype": dtype, "enforce_eager": True, "seed": 0,
                      **platform_kwargs(cpu=True)}
            state["lora"] = (v.LLM(model=resolve_model(EMBEDDED_POLICY), enable_lora=True,
                                   max_lora_rank=lora_rank(adapter), **common),
                             LoRARequest("bench", 1, adapter))
            state["merged"] = v.LLM(model=merged_model(EMBEDDED_POLICY, adapter), **common)
        return state["lora"], state["merged"]

    def lora_rate(served: bool) -> float:
        from vllm import SamplingParams

        (lora, request), merged = lora_engines()
        params = SamplingParams(n=k, temperature=1.0, max_tokens=max_new, seed=0)
        t = time.perf_counter()
        outs = (lora.chat(flat, params, lora_request=request, use_tqdm=False) if served
                else merged.chat(flat, params, use_tqdm=False))
        n = sum(len(o.token_ids) for r in outs for o in r.outputs)
        return n / (time.perf_counter() - t)

    def judges():
        if "judge_hf" not in state:
            from croco.reward.judge import JudgeRewardModel
            from croco.reward.vllm import VLLMJudgeScorer

            template = JudgeScorer().template
            out = engine().generate(flat, k=2, temperature=1.0, max_new_tokens=max_new, seed=1)
            state["pairs"] = ([c[0]["content"] for c in flat for _ in range(2)],
                              [s.text for sample in out for s in sample])
            state["judge_hf"] = JudgeRewardModel(EMBEDDED_POLICY, template=template,
                                                 device="cpu", dtype=dtype, batch_size=32)
            state["judge_vllm"] = VLLMJudgeScorer(EMBEDDED_POLICY, template=template,
                                                  dtype=dtype, max_length=1024)
            state["max_diff"] = 0.0
        return state

    def score(kind: str) -> None:
        s = judges()
        scores = s[f"judge_{kind}"].score(*s["pairs"])
        s[f"scores_{kind}"] = scores
        if "scores_hf" in s and "scores_vllm" in s:
            s["max_diff"] = max(s["max_diff"], max(abs(a - b) for a, b in
                                                   zip(s["scores_hf"], s["scores_vllm"])))

    workload = (f"SmolLM2-135M, {len(LANGS)} langs x {size['prompts']} prompts x k={k}, "
                f"<= {max_new} new tokens, {dtype}")
    return [
        Case(f"vLLM CPU: generation new tokens/s ({workload})", baseline=lambda: per_second(hf()),
             croco=lambda: per_second(engine()), unit="tok/s", higher_is_better=True,
             baseline_label="croco transformers loop", croco_label="VLLMGenerator",
             setup=lambda: (per_second(hf()), per_second(engine())),
             note=lambda: f"vLLM engine start {state['vllm_start']:.1f} s (eager)"),
        Case("vLLM CPU: VLLMGenerator overhead over a bare LLM.chat (s)", baseline=bare,
             croco=wrapped, baseline_label="LLM.chat(n=k)", croco_label="VLLMGenerator",
             setup=bare),
        Case("vLLM CPU: sampling a tuned policy, new tokens/s (r=8 adapter)",
             baseline=lambda: lora_rate(True), croco=lambda: lora_rate(False), unit="tok/s",
             higher_is_better=True, baseline_label="LoRARequest", croco_label="merged weights",
             setup=lambda: (lora_rate(True), lora_rate(False))),
        Case("vLLM CPU: judge scoring (s)", baseline=lambda: score("hf"),
             croco=lambda: score("vllm"), baseline_label="transformers judge",
             croco_label="VLLMJudgeScorer", setup=lambda: (score("hf"), score("vllm")),
             note=lambda: f"largest score difference {state['max_diff']:.4f} ({dtype})"),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="", help="comma-separated words: run only the cases "
                   "whose name holds one (e.g. LoRA,judge)")
    a = p.parse_args(argv)
    chosen = [c for c in cases(a.quick)
              if not a.only or any(w.lower() in c.name.lower() for w in a.only.split(","))]
    run_and_print(chosen, reps=a.reps)


if __name__ == "__main__":
    main()
