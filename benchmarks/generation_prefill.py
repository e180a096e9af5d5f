"""k samples per prompt: one shared prefill (croco's transformers backend) against
transformers' `num_return_sequences=k` (which prefills k copies of every prompt), and
against sampling one sequence at a time. Same model, prompts, k and token budget, in one
process; prints tokens/s of each, the ratios and the machine.

    python benchmarks/generation_prefill.py [--model embedded:smollm2-135m-instruct]
        [--prompts 4] [--k 8] [--max-new-tokens 32] [--prompt-words 200]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from croco.generation.transformers import TransformersGenerator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=200,
                    help="long prompts make the prefill matter, as with real chat prompts")
    a = ap.parse_args()
    gen = TransformersGenerator(a.model)
    filler = " ".join(["The committee reviewed the annual report on water quality."] *
                      (a.prompt_words // 9))
    convs = [[{"role": "user", "content": f"{filler}\nQuestion {i}: summarise this in one "
                                          "sentence."}] for i in range(a.prompts)]
    enc = gen._encode(convs)
    prompt_tokens = int(enc["attention_mask"].sum())

    def timed(fn):
        t = time.perf_counter()
        n = fn()
        return n, time.perf_counter() - t

    def shared():
        out = gen.generate(convs, k=a.k, temperature=1.0, max_new_tokens=a.max_new_tokens,
                           batch_size=a.k * a.prompts, seed=0)
        return sum(c.n_tokens for s in out for c in s)

    def num_return_sequences():
        torch.manual_seed(0)
        with torch.inference_mode():
            out = gen.model.generate(**enc, do_sample=True, temperature=1.0, top_k=0,
                                     max_new_tokens=a.max_new_tokens, num_return_sequences=a.k,
                                     pad_token_id=gen.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return int((new != gen.tokenizer.pad_token_id).sum()) or new.numel()

    def one_at_a_time():
        total = 0
        for conv in convs:
            for j in range(a.k):
                out = gen.generate([conv], k=1, temperature=1.0, max_new_tokens=a.max_new_tokens,
                                   batch_size=1, seed=j)
                total += out[0][0].n_tokens
        return total

    shared()  # warm-up
    n_s, t_s = timed(shared)
    n_n, t_n = timed(num_return_sequences)
    n_o, t_o = timed(one_at_a_time)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"machine: {device}; torch {torch.__version__}; model {a.model}")
    print(f"{a.prompts} prompts x k={a.k}, {prompt_tokens // a.prompts} prompt tokens each, "
          f"<= {a.max_new_tokens} new tokens")
    print(f"shared prefill (croco)       : {t_s:6.2f} s, {n_s / t_s:7.1f} new tokens/s")
    print(f"num_return_sequences=k       : {t_n:6.2f} s, {n_n / t_n:7.1f} new tokens/s")
    print(f"one sequence at a time       : {t_o:6.2f} s, {n_o / t_o:7.1f} new tokens/s")
    print(f"ratio num_return_sequences / shared: {t_n / t_s:.2f}x time; "
          f"one-at-a-time / shared: {t_o / t_s:.2f}x time")


if __name__ == "__main__":
    main()
