"""DPO step time with stored reference log-probs against TRL's per-step reference forward.

Both runs train the same LoRA adapter on the same pairs in this process; the stored run
reads reference log-probs that a first pass computed once (as every later croco variant on
the same pairs does). Prints both step times, the ratio, tokens/s and the machine.

    python benchmarks/dpo_reference_logps.py [--model embedded:smollm2-135m-instruct]
        [--pairs 32] [--steps 6] [--batch 4] [--max-length 256]

On a GPU host (bf16 chosen automatically) it also prints model FLOP utilisation, e.g.
for a ~0.5B model: --model Qwen/Qwen2.5-0.5B-Instruct --batch 16 --max-length 512.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import polars as pl
import torch

from croco.config import TrainingConfig
from croco.training.dpo import ref_logps_uri, train_dpo


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args()
    cfg = TrainingConfig(max_steps=a.steps, effective_batch_size=a.batch,
                         per_device_batch_size=a.batch, max_length=a.max_length,
                         heldout_fraction=0.0, learning_rate=1e-4, save_steps=10_000)
    pairs = make_pairs(a.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        ref = ref_logps_uri(f"{tmp}/pairs/bench", a.model, None, a.max_length)
        t = time.perf_counter()
        first = train_dpo(pairs, policy=a.model, adapter=None, cfg=cfg, out_uri=f"{tmp}/first",
                          ref_uri=ref)
        first_wall = time.perf_counter() - t
        per_step = train_dpo(pairs, policy=a.model, adapter=None, cfg=cfg,
                             out_uri=f"{tmp}/per-step", reference="per_step")
        stored = train_dpo(pairs, policy=a.model, adapter=None, cfg=cfg, out_uri=f"{tmp}/stored",
                           ref_uri=ref)
    assert stored["ref_forward_batches"] == 0, stored
    s_per = per_step["train_runtime"] / a.steps
    s_sto = stored["train_runtime"] / a.steps
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"machine: {device}; torch {torch.__version__}; model {a.model}; "
          f"batch {a.batch} pairs, <= {a.max_length} tokens, {a.steps} steps")
    print(f"reference forward every step : {s_per:.3f} s/step, "
          f"{per_step['tokens_per_second']:.0f} tokens/s")
    print(f"stored reference log-probs   : {s_sto:.3f} s/step, "
          f"{stored['tokens_per_second']:.0f} tokens/s (0 reference forwards)")
    print(f"one-time reference pass      : {first_wall:.1f} s wall for the first variant "
          f"({first['ref_forward_batches']} reference batches)")
    print(f"ratio per-step / stored      : {s_per / s_sto:.2f}x")
    if torch.cuda.is_available():
        from transformers import AutoConfig, AutoModelForCausalLM

        from croco.models import resolve_model

        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(resolve_model(a.model))).parameters())
        m = mfu(n, stored["tokens_per_second"])
        if m:
            print(f"MFU (6 x {n / 1e9:.2f}B params x tokens/s / bf16 peak of {m[1]}): "
                  f"{m[0]:.1%}")


if __name__ == "__main__":
    main()
