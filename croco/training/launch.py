"""Run one training stage in its own process, e.g. under `accelerate launch` on a machine
with several GPUs (data parallel; TRL and accelerate handle the ranks).

From a config:

    accelerate launch --config_file infra/accelerate/multi-gpu.yaml -m croco.training.launch \\
        --config configs/paper-eurollm.yaml --variant dpo --pairs-uri s3://bucket/pairs/<key>

or from a spec file written by `run_train_distributed` (what the pipeline's train task
does by itself when it sees more than one GPU):

    accelerate launch --num_processes 8 -m croco.training.launch --spec spec.json

Every rank trains; the outputs it writes are identical and written atomically, so the
last rename wins harmlessly. Prints the training URI on the last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from croco.config import PolicyConfig, TrainingConfig, load_config
from croco.stages import run_train


def write_spec(path: Path, *, pairs_uri: str, variant_name: str, method: str,
               policy: PolicyConfig, training: TrainingConfig, data_root: str,
               lang: str | None = None, generation_policy: str | None = None) -> Path:
    """Everything `run_train` needs, as JSON (configs as plain dicts)."""
    path.write_text(json.dumps({
        "pairs_uri": pairs_uri, "variant_name": variant_name, "method": method,
        "policy": policy.model_dump(), "training": training.model_dump(),
        "data_root": data_root, "lang": lang, "generation_policy": generation_policy,
    }))
    return path


def run_spec(path: str | Path) -> str:
    spec = json.loads(Path(path).read_text())
    return run_train(spec["pairs_uri"], variant_name=spec["variant_name"], method=spec["method"],
                     policy=PolicyConfig.model_validate(spec["policy"]),
                     training=TrainingConfig.model_validate(spec["training"]),
                     data_root=spec["data_root"], lang=spec.get("lang"),
                     generation_policy=spec.get("generation_policy"))


def accelerate_command(spec: Path, num_processes: int, config_file: str | None = None
                       ) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
           str(num_processes)]
    if config_file:
        cmd += ["--config_file", config_file]
    else:
        cmd += ["--multi_gpu"]
    return cmd + ["-m", "croco.training.launch", "--spec", str(spec)]


def torchrun_command(spec: Path, num_processes: int) -> list[str]:
    """The same run under plain torchrun (one node): what runs data parallel on CPUs too
    (the gloo backend), where `accelerate launch` starts a single process."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(num_processes), "-m", "croco.training.launch", "--spec", str(spec)]


def run_train_distributed(num_processes: int, *, launcher: str = "accelerate",
                          **train_kwargs) -> str:
    """Run `run_train` in `num_processes` data-parallel processes (GPUs with `accelerate`,
    any device with `torchrun`); return its URI. The main process writes the outputs.
    DPO and SFT only (online DPO and the reward model train in one process)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_spec(Path(tmp) / "spec.json", **train_kwargs)
        cmd = (torchrun_command(spec, num_processes) if launcher == "torchrun"
               else accelerate_command(spec, num_processes))
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{launcher} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=None, help="a spec written by write_spec")
    ap.add_argument("--config", default=None, help="YAML config (default: the demo)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--variant", default=None)
    ap.add_argument("--pairs-uri", default=None)
    ap.add_argument("--lang", default=None)
    ap.add_argument("--adapter", default=None, help="continue this adapter (iterative rounds)")
    a = ap.parse_args(argv)
    if a.spec:
        uri = run_spec(a.spec)
        print(uri)
        return uri
    if not (a.variant and a.pairs_uri):
        raise SystemExit("give --spec, or --variant and --pairs-uri (with --config)")
    cfg = load_config(a.config, a.overrides)
    variants = {v.name: v for v in cfg.experiments}
    if a.variant not in variants:
        raise SystemExit(f"--variant {a.variant!r}: the config has {sorted(variants)}")
    v = variants[a.variant]
    policy = cfg.policy.model_copy(update={"adapter": a.adapter}) if a.adapter else cfg.policy
    uri = run_train(a.pairs_uri, variant_name=v.name, method=v.method, policy=policy,
                    training=cfg.variant_training(v), data_root=cfg.data_root, lang=a.lang,
                    generation_policy=v.generation_policy)
    print(uri)
    return uri


if __name__ == "__main__":
    main()
