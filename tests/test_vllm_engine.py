"""croco's vLLM paths on the real engine (marked vllm): vLLM's CPU build here (made by
`bash infra/setup-vllm.sh`; run with `.venv-vllm/bin/python -m pytest -m vllm`), its CUDA
build on a GPU host. Everything in float32, so both backends can be held to equality.

Engines start slowly (~25 s each on 2 cores), so the tests are ordered to share them: the
embedded SmolLM2 first (greedy and sampled generation), then a croco-trained LoRA adapter
on a tiny model, then the pairwise judge and lm-eval's vllm model.
"""

from __future__ import annotations

import importlib.metadata

import polars as pl
import pytest

from croco.config import EMBEDDED_POLICY

pytestmark = pytest.mark.vllm

PROMPTS = ["Hi", "Name a fruit.", "Nenne eine Frucht.", "Cite un fruit.",
           "Nombra una fruta.", "Noem een vrucht.", "What is 2 + 2?"]


def conversations(texts=PROMPTS) -> list[list[dict]]:
    return [[{"role": "user", "content": t}] for t in texts]


@pytest.fixture(scope="module")
def smol(vllm_installed):
    from croco.generation.vllm import VLLMGenerator

    # a third of a GPU (on a GPU host) leaves room for the scorers' engines of the session
    return VLLMGenerator(EMBEDDED_POLICY, dtype="float32", seed=0, gpu_memory_utilization=0.3)


@pytest.fixture(scope="module")
def smol_transformers():
    from croco.generation.transformers import TransformersGenerator

    return TransformersGenerator(EMBEDDED_POLICY, device="cpu", dtype="float32")


def test_greedy_answers_equal_the_transformers_backend_token_for_token(smol,
                                                                      smol_transformers):
    convs = conversations()
    got = smol.generate(convs, k=1, temperature=0.0, max_new_tokens=24)
    expected = smol_transformers.generate(convs, k=1, temperature=0.0, max_new_tokens=24)
    assert got == expected
    # both ends occur: answers that stopped (stop token counted) and answers cut at 24
    reasons = {c.finish_reason for sample in got for c in sample}
    assert reasons == {"stop", "length"}


def test_sampled_answers_have_k_samples_their_lengths_and_finish_reasons(smol):
    out = smol.generate(conversations(), k=4, temperature=1.0, max_new_tokens=16, seed=3)
    assert [len(samples) for samples in out] == [4] * len(PROMPTS)
    for samples in out:
        for c in samples:
            assert c.finish_reason in ("stop", "length") and 1 <= c.n_tokens <= 16
            if c.finish_reason == "length":
                assert c.n_tokens == 16
    assert len({c.text for c in out[1]}) > 1  # four draws, not one answer four times


def test_a_seed_reproduces_the_samples_whatever_else_is_in_the_call(smol):
    convs = conversations()
    first = smol.generate(convs, k=3, temperature=1.0, max_new_tokens=12, seed=7)
    assert smol.generate(convs, k=3, temperature=1.0, max_new_tokens=12, seed=7) == first
    alone = smol.generate(convs[2:3], k=3, temperature=1.0, max_new_tokens=12, seed=7)
    assert alone == first[2:3]
    other = smol.generate(convs, k=3, temperature=1.0, max_new_tokens=12, seed=8)
    assert other != first


def test_the_cpu_build_is_found_under_the_vllm_distribution_name(smol):
    from croco.manifest import package_versions

    version = package_versions()["vllm"]
    assert version is not None
    assert importlib.metadata.version("vllm").startswith(version)


# ------------------------------------------------------------------ a croco-trained LoRA

NICE = [f"Say something nice, number {i}." for i in range(8)]


@pytest.fixture(scope="module")
def trained_adapter(vllm_lm, tmp_path_factory) -> str:
    from croco.config import TrainingConfig
    from croco.training.dpo import train_dpo

    n = len(NICE)
    pairs = pl.DataFrame({
        "prompt_id": [f"p{i}" for i in range(n)], "prompt_lang": ["en"] * n, "prompt": NICE,
        "chosen": ["Yes, gladly, here it is."] * n, "rejected": ["zq xv kw jj qq"] * n,
        "chosen_score": [1.0] * n, "rejected_score": [0.0] * n,
        "chosen_lang": ["en"] * n, "rejected_lang": ["en"] * n, "pool_size": [4] * n,
        "scope": ["in_lang"] * n, "reject_target": ["mean_minus_2sigma"] * n,
    })
    cfg = TrainingConfig(num_train_epochs=3, learning_rate=5e-2, effective_batch_size=4,
                         per_device_batch_size=4, max_length=64, heldout_fraction=0.0,
                         warmup_ratio=0.0, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    out = tmp_path_factory.mktemp("vllm-dpo")
    train_dpo(pairs, policy=vllm_lm, adapter=None, cfg=cfg, out_uri=str(out))
    return str(out / "adapter")


def test_a_lora_adapter_through_lora_request_answers_as_the_merged_model(
        vllm_installed, vllm_lm, trained_adapter):
    from croco.generation.transformers import TransformersGenerator
    from croco.generation.vllm import VLLMGenerator

    convs = conversations(NICE + PROMPTS)
    greedy = {"k": 1, "temperature": 0.0, "max_new_tokens": 12}
    base = TransformersGenerator(vllm_lm, device="cpu", dtype="float32").generate(convs, **greedy)
    merged = TransformersGenerator(vllm_lm, adapter=trained_adapter, device="cpu",
                                   dtype="float32").generate(convs, **greedy)
    assert merged != base  # the adapter moved the answers: the comparison below means something
    lora = VLLMGenerator(vllm_lm, adapter=trained_adapter, adapter_mode="lora", dtype="float32",
                         gpu_memory_utilization=0.3)
    assert lora.llm.llm_engine.vllm_config.lora_config.max_lora_rank == 8  # sized to r = 8
    assert lora.generate(convs, **greedy) == merged
    on_merged = VLLMGenerator(vllm_lm, adapter=trained_adapter, dtype="float32",
                              gpu_memory_utilization=0.3)
    assert on_merged.lora is None
    assert on_merged.generate(convs, **greedy) == merged


# ------------------------------------------------------------ judge and lm-eval on vLLM


def test_pairwise_judge_in_generate_mode_on_vllm_matches_transformers_greedy(vllm_installed,
                                                                           vllm_lm):
    from croco.evaluation.judge import judge_pairs

    pairs = pl.DataFrame({
        "lang": ["en", "de", "fr"], "prompt_id": ["a", "b", "c"],
        "prompt": ["Name a fruit.", "Nenne eine Frucht.", "Cite un fruit."],
        "candidate": ["An apple.", "Ein Apfel.", "Une pomme."],
        "baseline": ["Rocks.", "Steine.", "Des cailloux."]})
    common = {"judge_model": vllm_lm, "mode": "generate", "max_new_tokens": 8, "seed": 0}
    on_vllm = judge_pairs(pairs, backend="vllm", temperature=0.0, **common)
    on_hf = judge_pairs(pairs, backend="transformers", temperature=0.0, device="cpu",
                        **common)
    assert on_vllm.height == 6  # both orders of each prompt
    assert on_vllm["judge_output"].to_list() == on_hf["judge_output"].to_list()
    # the paper's protocol samples at 0.7: a seed reproduces the verdicts
    sampled = judge_pairs(pairs, backend="vllm", temperature=0.7, **common)
    assert sampled.equals(judge_pairs(pairs, backend="vllm", temperature=0.7, **common))


def test_lm_eval_vllm_model_gives_the_hf_model_accuracies(vllm_installed, vllm_lm):
    from croco.evaluation.structured import evaluate_structured

    common = {"adapter": None, "tasks": {}, "local_mc": "builtin:demo_mc",
              "langs": ["en", "de"], "dtype": "float32"}
    on_vllm = evaluate_structured(vllm_lm, backend="vllm", **common)
    on_hf = evaluate_structured(vllm_lm, backend="hf", device="cpu", **common)
    assert on_vllm["n"].to_list() == [20, 20]
    assert on_vllm.equals(on_hf)


def test_engine_processes_end_with_a_croco_process_killed_with_sigkill(vllm_installed,
                                                                     vllm_lm, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    code = ("from croco.generation.vllm import VLLMGenerator\n"
            f"g = VLLMGenerator({vllm_lm!r}, dtype='float32')\n"
            "print('READY', flush=True)\n"
            "import time; time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # vLLM logs to stdout before the script prints READY
        assert any(line.strip() == "READY" for line in iter(proc.stdout.readline, ""))
        time.sleep(1.5)  # the reaper notes the engine's processes once a second
        engines = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.name().startswith("VLLM")]
        assert engines  # vLLM's engine core runs in a process of its own
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _, alive = psutil.wait_procs(engines, timeout=15)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
