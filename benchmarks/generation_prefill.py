"""k samples per prompt: croco's transformers backend (one shared prefill, then its own
decoding loop, which draws a token with one uniform number per sequence) against
transformers' `generate(num_return_sequences=k)` (which prefills k copies of every prompt
and samples with `torch.multinomial`), and against croco sampling one sequence at a time.
Both run the same model in the same dtype (`dtype: auto`: bf16 on a CPU with bf16
instructions). Same model, prompts, k and token budget, in one
process, as two A/B cases (`benchmarks.ab`): croco vs num_return_sequences, croco vs one
at a time, interleaved `--reps` times.

The figure is new tokens per second (higher is better): the three ways stop at different
end-of-sequence tokens, so they do not produce the same number of tokens. Every way
counts a sequence's new tokens as croco does: up to and including its first
end-of-sequence token, else all `max_new_tokens`.

    python benchmarks/generation_prefill.py [--model embedded:smollm2-135m-instruct]
        [--prompts 4] [--k 8] [--max-new-tokens 32] [--prompt-words 200] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.ab import Case, run_and_print
from croco.config import EMBEDDED_POLICY

#: Sizes (prompts, k, new tokens, words per prompt): full, and --quick (seconds per rep).
SIZES = {
    False: {"prompts": 4, "k": 8, "max_new_tokens": 32, "prompt_words": 200},
    True: {"prompts": 2, "k": 4, "max_new_tokens": 8, "prompt_words": 90},
}


def conversations(n: int, prompt_words: int) -> list[list[dict]]:
    """n chat prompts of about `prompt_words` words: long prompts make the prefill matter,
    as with real chat prompts."""
    filler = " ".join(["The committee reviewed the annual report on water quality."] *
                      max(1, prompt_words // 9))
    return [[{"role": "user", "content": f"{filler}\nQuestion {i}: summarise this in one "
                                         "sentence."}] for i in range(n)]


def count_new_tokens(rows: list[list[int]], eos_ids: set[int]) -> int:
    """New tokens of decoded rows as croco counts them: up to and including the first
    end-of-sequence token, else the whole row."""
    total = 0
    for tokens in rows:
        stop = next((j for j, t in enumerate(tokens) if t in eos_ids), None)
        total += len(tokens) if stop is None else stop + 1
    return total


def cases(quick: bool = False, *, model: str = EMBEDDED_POLICY, **sizes) -> list[Case]:
    """croco's shared prefill vs num_return_sequences=k, and vs one sequence at a time;
    new tokens/s. `sizes` overrides `SIZES[quick]` (prompts, k, max_new_tokens,
    prompt_words)."""
    size = {**SIZES[quick], **{k: v for k, v in sizes.items() if v is not None}}
    k, max_new = size["k"], size["max_new_tokens"]
    convs = conversations(size["prompts"], size["prompt_words"])
    state: dict = {}

    def generator():
        if "gen" not in state:
            from croco.generation.transformers import TransformersGenerator

            state["gen"] = TransformersGenerator(model)
            enc = state["gen"]._encode(convs)
            state["prompt_tokens"] = int(enc["attention_mask"].sum()) // len(convs)
        return state["gen"]

    def per_second(fn) -> float:
        t = time.perf_counter()
        n = fn()
        return n / (time.perf_counter() - t)

    def shared() -> float:
        gen = generator()
        return per_second(lambda: sum(
            c.n_tokens for s in gen.generate(convs, k=k, temperature=1.0, max_new_tokens=max_new,
                                             batch_size=k * len(convs), seed=0) for c in s))

    def num_return_sequences() -> float:
        gen = generator()

        def run():
            enc = gen._encode(convs)
            torch.manual_seed(0)
            with torch.inference_mode():
                out = gen.model.generate(**enc, do_sample=True, temperature=1.0, top_k=0,
                                         max_new_tokens=max_new, num_return_sequences=k,
                                         pad_token_id=gen.tokenizer.pad_token_id)
            return count_new_tokens(out[:, enc["input_ids"].shape[1]:].tolist(), gen.eos_ids)

        return per_second(run)

    def one_at_a_time() -> float:
        gen = generator()
        return per_second(lambda: sum(
            gen.generate([conv], k=1, temperature=1.0, max_new_tokens=max_new, batch_size=1,
                         seed=j)[0][0].n_tokens for conv in convs for j in range(k)))

    def warm_up() -> None:
        shared()

    def note() -> str:
        return (f"{model}, {len(convs)} prompts of {state['prompt_tokens']} tokens x k={k}, "
                f"<= {max_new} new tokens, T=1.0, {str(state['gen'].model.dtype)[6:]}")

    what = f"generation, {len(convs)} prompts x k={k}"
    common = {"unit": "new tokens/s", "higher_is_better": True,
              "croco_label": "croco (shared prefill)", "setup": warm_up, "croco": shared}
    return [
        Case(f"{what}: shared prefill vs num_return_sequences", baseline=num_return_sequences,
             baseline_label="num_return_sequences=k", note=note, **common),
        Case(f"{what}: shared prefill vs one at a time", baseline=one_at_a_time,
             baseline_label="one sequence at a time", **common),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=EMBEDDED_POLICY)
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--prompt-words", type=int)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes (defaults of --quick)")
    a = ap.parse_args()
    run_and_print(cases(
        a.quick, model=a.model, prompts=a.prompts, k=a.k, max_new_tokens=a.max_new_tokens,
        prompt_words=a.prompt_words), reps=a.reps)


if __name__ == "__main__":
    main()
