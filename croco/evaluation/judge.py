"""The pairwise judge: any causal LM compares the candidate's and the baseline's answers to
the same held-out prompt, in both orders.

`mode="generate"` (the paper's protocol) samples the judge's reasoning and verdict at the
configured temperature (0.7) and parses the verdict from its final line.
`mode="logprob"` is for small judges that rarely follow the output format: the judge's
turn is started with "[[" and the verdict is the most likely of "1", "2" and "T"; the
recorded output is then just that final line. Small judges tend to prefer one position
whatever the answers say; with `calibrate=True` (the default in this mode) each label's
log-probability is taken relative to its mean over all games of the call (contextual
calibration, Zhao et al., 2021), which removes a constant position or label preference.
"""

from __future__ import annotations

import polars as pl
import torch

from croco.evaluation.winrate import JUDGE_TEMPLATE, parse_verdict

JUDGMENT_SCHEMA = {"lang": pl.String, "prompt_id": pl.String, "candidate_first": pl.Boolean,
                   "verdict": pl.String, "candidate_len": pl.Int64, "baseline_len": pl.Int64,
                   "judge_output": pl.String}


def _conversations(rows: list[dict], template: str) -> list[list[dict]]:
    convs = []
    for r in rows:
        first, second = ((r["candidate"], r["baseline"]) if r["candidate_first"]
                         else (r["baseline"], r["candidate"]))
        convs.append([{"role": "user", "content": template.format(
            prompt=r["prompt"], output_1=first, output_2=second)}])
    return convs


VERDICTS = ("1", "2", "T")


@torch.inference_mode()
def _logprob_verdicts(model, tok, convs: list[list[dict]], batch_size: int,
                      calibrate: bool, groups: list | None = None) -> list[str]:
    """`groups`: a label per game (its prompt): the games of a prompt share the start of
    the judge's input, which then runs once per batch (`forward_last_grouped`)."""
    from croco.reward.batching import forward_last_grouped

    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) + "[["
             for c in convs]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    choice_ids = torch.tensor([tok(v, add_special_tokens=False)["input_ids"][0]
                               for v in VERDICTS])
    rows = forward_last_grouped(
        model, ids, groups if groups is not None else list(range(len(ids))),
        pad_id=tok.pad_token_id, batch_size=batch_size,
        select=lambda logits: logits[:, -1, :].float().log_softmax(-1)[:, choice_ids])
    return choose_verdicts(torch.tensor(rows), calibrate=calibrate)


def choose_verdicts(logp: torch.Tensor, *, calibrate: bool) -> list[str]:
    """Verdicts from a (games x [1, 2, T]) log-probability matrix; with `calibrate`, each
    label is scored relative to its mean over the games."""
    if calibrate and logp.shape[0] > 1:
        logp = logp - logp.mean(dim=0, keepdim=True)
    return [VERDICTS[int(i)] for i in logp.argmax(-1)]


def judge_pairs(pairs: pl.DataFrame, *, judge_model: str, template: str = JUDGE_TEMPLATE,
                mode: str = "generate", temperature: float = 0.7, max_new_tokens: int = 512,
                batch_size: int = 8, seed: int = 0, device: str = "auto",
                calibrate: bool = True, backend: str = "transformers") -> pl.DataFrame:
    """`pairs`: lang, prompt_id, prompt, candidate, baseline (one row per prompt). Returns one
    judgment per prompt and order (JUDGMENT_SCHEMA); lengths are in characters.
    `backend="vllm"` serves a generating judge with vLLM."""
    from croco.generation import make_generator

    rows = []
    for r in pairs.iter_rows(named=True):
        for first in (True, False):
            rows.append({**r, "candidate_first": first})
    convs = _conversations(rows, template)
    if mode == "logprob":
        gen = make_generator("transformers", judge_model, device=device)
        verdicts = _logprob_verdicts(gen.model, gen.tokenizer, convs, batch_size, calibrate,
                                     groups=[(r["lang"], r["prompt_id"]) for r in rows])
        outputs = [f"[[{v}]]" for v in verdicts]
    elif mode == "generate":
        gen = make_generator(backend, judge_model, device=device, seed=seed)
        outs = gen.generate(convs, k=1, temperature=temperature, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, seed=seed)
        outputs = [o[0].text for o in outs]
        verdicts = [parse_verdict(t) for t in outputs]
    else:
        raise ValueError(f"judge mode {mode!r}: use generate or logprob")
    return pl.DataFrame([{
        "lang": r["lang"], "prompt_id": r["prompt_id"], "candidate_first": r["candidate_first"],
        "verdict": v, "candidate_len": len(r["candidate"]), "baseline_len": len(r["baseline"]),
        "judge_output": o,
    } for r, v, o in zip(rows, verdicts, outputs)], schema=JUDGMENT_SCHEMA)
