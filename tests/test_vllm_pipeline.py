"""Whole runs through `croco run` with vLLM backends (marked vllm and slow): the tiny
pipeline with every vLLM path (generation, both scorers, the pairwise judge in generate
mode, lm-eval's vllm model) against the same pipeline on transformers, and the demo config
with `--set generation.backend=vllm`. vLLM's CPU build here (`bash infra/setup-vllm.sh`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def croco_run(args: list[str], home: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "croco.flows.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def sections(run_dir: Path) -> list[str]:
    return re.findall(r"^## (.+)$", (run_dir / "report.md").read_text(), flags=re.M)


def tiny_pipeline(vllm_lm: str, vllm_rm: str, data_root: Path, backend: str) -> dict:
    """2 languages x 3 prompts x k 4, DPO, evaluation with every part on `backend`."""
    engine = {"backend": backend, "dtype": "float32", "max_length": 256}
    return {
        "run_name": f"tiny-{backend}", "data_root": str(data_root), "languages": ["en", "de"],
        "prompts": {"path": "builtin:demo", "limit": 3},
        "policy": {"model": vllm_lm, "dtype": "float32"},
        "generation": {"backend": backend, "k": 4, "max_new_tokens": 6, "shard_size": 2},
        "reward": {"scorers": [
            {"type": "classifier", "name": "rm", "model": vllm_rm, "weight": 1.0, **engine},
            {"type": "judge", "name": "judge", "model": vllm_lm, "weight": 0.5, **engine},
            {"type": "langid", "name": "lang", "weight": 0.1}]},
        "training": {"max_steps": 2, "learning_rate": 5e-3, "effective_batch_size": 4,
                     "per_device_batch_size": 4, "max_length": 64, "heldout_fraction": 0.0,
                     "lora_r": 4, "lora_alpha": 8, "save_steps": 1},
        "evaluation": {
            "limit": 2, "max_new_tokens": 4,
            "judge": {"model": vllm_lm, "mode": "generate", "max_new_tokens": 8,
                      "n_bootstrap": 50,
                      "backend": "vllm" if backend == "vllm" else "transformers"},
            "structured": {"backend": "vllm" if backend == "vllm" else "hf",
                           "local_mc": "builtin:demo_mc", "limit": 4}},
    }


def test_the_tiny_pipeline_on_every_vllm_backend_completes_with_the_same_report(
        vllm_installed, vllm_lm, vllm_rm, tmp_path):
    runs = {}
    for backend in ("vllm", "transformers"):
        cfg = tmp_path / f"{backend}.yaml"
        cfg.write_text(yaml.safe_dump(tiny_pipeline(vllm_lm, vllm_rm, tmp_path / backend,
                                                    backend)))
        croco_run(["run", str(cfg), "--run-id", backend], tmp_path / f"home-{backend}")
        runs[backend] = tmp_path / backend / "runs" / backend
    manifest = json.loads((runs["vllm"] / "manifest.json").read_text())
    config = manifest["config"]
    assert config["generation"]["backend"] == "vllm"
    assert [s.get("backend") for s in config["reward"]["scorers"]] == ["vllm", "vllm", None]
    assert config["evaluation"]["structured"]["backend"] == "vllm"
    assert manifest["packages"]["vllm"] is not None
    assert sections(runs["vllm"]) == sections(runs["transformers"])
    assert "Structured tasks" in sections(runs["vllm"])


def test_the_demo_runs_with_vllm_generation(vllm_installed, tmp_path):
    # two of its seven languages: the whole demo on vLLM took 7 min here, beyond CI's share
    croco_run(["run", "configs/demo.yaml", "--set", "generation.backend=vllm",
               "--set", "languages=[en, de]",
               "--set", f"data_root={tmp_path / 'data'}", "--run-id", "demo-vllm"],
              tmp_path / "home", timeout=1500)
    run = tmp_path / "data" / "runs" / "demo-vllm"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["generation"]["backend"] == "vllm"
    assert sections(run) == ["Against the base", "Structured tasks",
                             "Open-ended win rate against the base",
                             "Held-out answers: mean reward and language fidelity",
                             "Reward check: ranking accuracy on the preference set",
                             "Training", "Training curves", "Pairs"]
