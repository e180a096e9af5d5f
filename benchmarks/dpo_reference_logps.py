"""DPO step time with stored reference log-probs (croco) against TRL's reference forward
in every step, as one A/B case (`benchmarks.ab`), in s/step (lower is better).

Both sides train the same LoRA adapter on the same pairs in this process, interleaved
`--reps` times, each in a fresh output folder. The stored side reads reference log-probs
that a first run (the case's set-up, not timed in the table) computed once, as every
later croco variant on the same pairs does; it must run zero reference forwards. s/step
is TRL's `train_runtime` / steps: model loading and trainer set-up are outside it.

    python benchmarks/dpo_reference_logps.py [--model embedded:smollm2-135m-instruct]
        [--pairs 32] [--steps 6] [--batch 4] [--max-length 256] [--reps 3] [--quick]

--quick trains a tiny random Llama (hidden size 32, SmolLM2's tokenizer) on 8 pairs: a
check that the benchmark runs, where set-up costs, not the model, dominate a step.

On a GPU host (bf16 chosen automatically) the note also gives model FLOP utilisation,
e.g. for a ~0.5B model: --model Qwen/Qwen2.5-0.5B-Instruct --batch 16 --max-length 512.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl
import torch

from benchmarks.ab import Case, run_and_print
from benchmarks.tiny import tiny_llama
from croco import storage
from croco.config import EMBEDDED_POLICY

#: Sizes: full, and --quick (few pairs, few steps, short sequences, a tiny random model).
SIZES = {
    False: {"pairs": 32, "steps": 6, "batch": 4, "max_length": 256},
    True: {"pairs": 8, "steps": 4, "batch": 2, "max_length": 64},
}
TINY = "a tiny random 2-layer Llama (hidden 32)"


def make_pairs(n: int) -> pl.DataFrame:
    chosen = ("Keep the herbs upright in a glass of water in the fridge, loosely covered with "
              "a plastic bag, and change the water every two days so they stay fresh. ") * 2
    rejected = ("Herbs are plants. Some people like herbs and others do not, and the fridge "
                "is a place in the kitchen where many things are kept cold for a while. ") * 2
    return pl.DataFrame({
        "prompt_id": [f"p{i}" for i in range(n)], "prompt_lang": ["en"] * n,
        "prompt": [f"How do I keep fresh herbs from wilting? Variant {i}." for i in range(n)],
        "chosen": [chosen] * n, "rejected": [rejected] * n,
    })


def reference_stage(tmp: str, pairs: pl.DataFrame, model: str, cfg) -> str:
    """The reference log-probs stage (`croco.stages.RefLogps`) on `pairs` written as a pairs
    output under `tmp`; its output URI."""
    from croco.config import PolicyConfig
    from croco.stage import run
    from croco.stages import RefLogps

    pairs_uri = f"{tmp}/pairs/bench"
    storage.write_parquet(pairs, storage.join(pairs_uri, "dpo", "lang=en", "data.parquet"))
    storage.mark_complete(pairs_uri)
    return run(RefLogps(pairs_uri=pairs_uri, policy=PolicyConfig(model=model), training=cfg),
               tmp)


#: Dense bf16 peak FLOP/s by card (vendor datasheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def mfu(params: int, tokens_per_second: float) -> tuple[float, str] | None:
    """Model FLOP utilisation by the 6 x params x tokens convention, on a known GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak is None:
        return None
    return 6 * params * tokens_per_second / peak, name


def _mfu_note(model: str, tokens_per_second: float) -> str:
    if not torch.cuda.is_available():
        return ""
    from transformers import AutoConfig, AutoModelForCausalLM

    from croco.models import resolve_model

    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(resolve_model(model))).parameters())
    m = mfu(n, tokens_per_second)
    return (f"; MFU (6 x {n / 1e9:.2f}B params x tokens/s / bf16 peak of {m[1]}) {m[0]:.1%}"
            if m else "")


def cases(quick: bool = False, *, model: str | None = None, **sizes) -> list[Case]:
    """Stored reference log-probs vs a reference forward every step; s/step. `model`:
    default SmolLM2-135M-Instruct, with `quick` a tiny random Llama. `sizes` overrides
    `SIZES[quick]` (pairs, steps, batch, max_length)."""
    from croco.config import TrainingConfig
    from croco.training.dpo import train_dpo

    size = {**SIZES[quick], **{k: v for k, v in sizes.items() if v is not None}}
    steps = size["steps"]
    cfg = TrainingConfig(max_steps=steps, effective_batch_size=size["batch"],
                         per_device_batch_size=size["batch"], max_length=size["max_length"],
                         heldout_fraction=0.0, learning_rate=1e-4, save_steps=10_000)
    pairs = make_pairs(size["pairs"])
    tmp = tempfile.mkdtemp(prefix="croco-bench-dpo-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    label = model or (TINY if quick else EMBEDDED_POLICY)
    state: dict = {"runs": 0, "tokens_per_second": {"per_step": [], "stored": []}}

    def train(**kw) -> dict:
        state["runs"] += 1
        out = f"{tmp}/run-{state['runs']}"
        try:
            return train_dpo(pairs, policy=state["model"], adapter=None, cfg=cfg, out_uri=out,
                             **kw)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def first_run() -> None:
        state["model"] = model or (tiny_llama(Path(tmp) / "tiny-lm") if quick
                                   else EMBEDDED_POLICY)
        t = time.perf_counter()
        state["ref"] = reference_stage(tmp, pairs, state["model"], cfg)
        m = train(ref_uri=state["ref"])
        state["first"] = (time.perf_counter() - t,
                          storage.read_json(storage.join(state["ref"], storage.SUCCESS)))

    def per_step() -> float:
        m = train(reference="per_step")  # TRL's inline reference forward in every step
        state["tokens_per_second"]["per_step"].append(m["tokens_per_second"])
        return m["train_runtime"] / steps

    def stored() -> float:
        m = train(ref_uri=state["ref"])
        if m["ref_forward_batches"] or m["ref_logps"] != "stored":
            raise AssertionError(f"the stored run computed reference log-probs "
                                 f"({m['ref_forward_batches']} forwards, {m['ref_logps']}): "
                                 f"{state['ref']} was not reused")
        state["tokens_per_second"]["stored"].append(m["tokens_per_second"])
        return m["train_runtime"] / steps

    def note() -> str:
        wall, ref = state["first"]
        tps = {k: statistics.median(v) for k, v in state["tokens_per_second"].items()}
        return (f"{label}, LoRA, batch {size['batch']} pairs, <= {size['max_length']} tokens, "
                f"{steps} steps; median tokens/s {tps['per_step']:.0f} (per step) vs "
                f"{tps['stored']:.0f} (stored, 0 reference forwards); the one-time reference "
                f"stage: {ref.get('rows')} pairs in {ref.get('seconds')} s, {wall:.1f} s wall "
                f"with the first run"
                + _mfu_note(state["model"], tps["stored"]))

    return [Case(f"DPO step, {steps} steps x {size['batch']} pairs", baseline=per_step,
                 croco=stored, unit="s/step", baseline_label="reference forward every step",
                 croco_label="stored reference log-probs", setup=first_run, note=note)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="default: SmolLM2-135M-Instruct; with --quick a tiny "
                    "random Llama")
    ap.add_argument("--pairs", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, a tiny random model")
    a = ap.parse_args()
    run_and_print(cases(
        a.quick, model=a.model, pairs=a.pairs, steps=a.steps, batch=a.batch,
        max_length=a.max_length), reps=a.reps)


if __name__ == "__main__":
    main()
