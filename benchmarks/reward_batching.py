"""Reward scoring in croco's length-sorted batches (`croco.reward.batching`) against one
response at a time, for the judge scorer and the classifier scorer, as two A/B cases
(`benchmarks.ab`): seconds to score one generated frame with `score_frame` (lower is
better), interleaved `--reps` times.

The frame is generated once by the embedded SmolLM2-135M-Instruct (demo prompts in en,
de, fr). The judge is SmolLM2-135M-Instruct itself; the classifier is SmolLM2-135M with
a randomly initialised one-label sequence-classification head (seeded), or in --quick a
tiny random 2-layer Llama classifier (hidden size 32, SmolLM2's tokenizer). Both score
in float32, where a score does not depend on its batch mates: every croco rep checks
that its scores equal batch size 1's within 1e-4 and the note gives the largest
difference seen.

    python benchmarks/reward_batching.py [--prompts 8] [--k 8] [--max-new-tokens 48]
        [--batch-size 16] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import polars as pl

from benchmarks.ab import Case, run_and_print
from benchmarks.tiny import tiny_llama
from croco.config import EMBEDDED_POLICY

#: Sizes (prompts per language, k, new tokens): full, and --quick.
SIZES = {
    False: {"prompts": 8, "k": 8, "max_new_tokens": 48},
    True: {"prompts": 1, "k": 4, "max_new_tokens": 16},
}
LANGS = ["en", "de", "fr"]
#: Largest allowed |batched - batch size 1| score difference in float32.
TOLERANCE = 1e-4


def generated_frame(prompts_per_lang: int, k: int, max_new_tokens: int) -> tuple[pl.DataFrame,
                                                                                  pl.DataFrame]:
    """(generations, prompts): k samples of SmolLM2 per demo training prompt."""
    from croco.generation import generate_frame
    from croco.generation.transformers import TransformersGenerator
    from croco.prompts import load_prompts, select_for_generation

    prompts = select_for_generation(load_prompts("builtin:demo").filter(
        pl.col("lang").is_in(LANGS)), split="train", limit=prompts_per_lang)
    gens = generate_frame(TransformersGenerator(EMBEDDED_POLICY), prompts, k=k, temperature=1.0,
                          top_p=1.0, max_new_tokens=max_new_tokens, batch_size=64, seed=0,
                          policy=EMBEDDED_POLICY)
    return gens, prompts


def random_classifier(out: Path, *, tiny: bool) -> str:
    """A one-label sequence classifier with a seeded random head, saved to `out`: SmolLM2
    with a new head, or (tiny) a random 2-layer Llama with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from croco.models import resolve_model

    if tiny:
        return tiny_llama(out, classifier=True)
    path = resolve_model(EMBEDDED_POLICY)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(
        path, num_labels=1, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def cases(quick: bool = False, *, batch_size: int | None = None, **sizes) -> list[Case]:
    """Judge and classifier: croco's batches (`batch_size`, default the scorer's own) vs
    batch size 1, on one generated frame; seconds per frame."""
    from croco.config import ClassifierScorer, JudgeScorer

    size = {**SIZES[quick], **{k: v for k, v in sizes.items() if v is not None}}
    tmp = tempfile.mkdtemp(prefix="croco-bench-rm-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    state: dict = {}

    def frame():
        if "frame" not in state:
            state["frame"] = generated_frame(size["prompts"], size["k"], size["max_new_tokens"])
        return state["frame"]

    def scorer_case(what: str, cls, model_kwargs, model_label: str) -> Case:
        """`cls`: the scorer config class; `model_kwargs()`: its model fields (may build
        the model, so called at the case's set-up)."""
        croco_batch = batch_size or cls.model_fields["batch_size"].default
        col = f"reward_{cls.model_fields['name'].default}"
        seen = {"max_diff": 0.0}

        def score(batch: int) -> tuple[float, np.ndarray]:
            from croco.reward import score_frame

            gens, prompts = frame()
            cfg = cls(**model_kwargs(), batch_size=batch, dtype="float32")
            t = time.perf_counter()
            out = score_frame(gens, prompts, [cfg])
            return time.perf_counter() - t, out[col].to_numpy()

        def baseline() -> float:
            seconds, seen["one"] = score(1)
            return seconds

        def croco() -> float:
            seconds, values = score(croco_batch)
            diff = float(np.max(np.abs(values - seen["one"])))
            seen["max_diff"] = max(seen["max_diff"], diff)
            if not diff <= TOLERANCE:
                raise AssertionError(f"{what}: batch size {croco_batch} scores differ from "
                                     f"batch size 1 by up to {diff:.3g} (> {TOLERANCE})")
            return seconds

        def warm_up() -> None:  # loads the model and the frame, outside the timed reps
            score(croco_batch)

        def note() -> str:
            gens = frame()[0]
            return (f"{model_label}; {gens.height} responses ({len(LANGS)} languages x "
                    f"{size['prompts']} prompt(s) x k={size['k']}, <= {size['max_new_tokens']} "
                    f"new tokens), float32; max |batched - batch 1| = {seen['max_diff']:.2g}")

        return Case(f"reward scoring, {what}", baseline=baseline, croco=croco, unit="s",
                    baseline_label="batch size 1",
                    croco_label=f"length-sorted batches of {croco_batch}", setup=warm_up,
                    note=note)

    def classifier_model() -> dict:
        if "rm" not in state:
            state["rm"] = random_classifier(Path(tmp) / "rm", tiny=quick)
        return {"model": state["rm"]}

    rm_label = ("a tiny random 2-layer Llama classifier (hidden 32, SmolLM2's tokenizer)" if quick
                else "SmolLM2-135M with a random one-label classification head")
    return [
        scorer_case("judge", JudgeScorer, lambda: {"model": EMBEDDED_POLICY},
                    "SmolLM2-135M-Instruct as judge (log P(Yes) - log P(No))"),
        scorer_case("classifier", ClassifierScorer, classifier_model, rm_label),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, help="prompts per language")
    ap.add_argument("--k", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--batch-size", type=int, help="croco's batch size (default: the scorer's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, tiny classifier")
    a = ap.parse_args()
    run_and_print(cases(
        a.quick, batch_size=a.batch_size, prompts=a.prompts, k=a.k,
        max_new_tokens=a.max_new_tokens), reps=a.reps)


if __name__ == "__main__":
    main()
