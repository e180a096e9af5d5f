"""Run one training stage in its own process, e.g. under `accelerate launch` on a machine
with several GPUs (data parallel; TRL and accelerate handle the ranks).

From a config:

    accelerate launch --config_file infra/accelerate/multi-gpu.yaml -m croco.training.launch \\
        --config configs/paper-eurollm.yaml --variant dpo --pairs-uri s3://bucket/pairs/<key>

or from a spec file written by `run_train_distributed` (what the pipeline's train task
does by itself when it sees more than one GPU): the run's `TrainSpec` as JSON.

    accelerate launch --num_processes 8 -m croco.training.launch --spec spec.json \\
        --result result.json

Every rank trains; the main process writes the outputs and, with `--result`, a JSON file
`{"uri": <training URI>}`: the answer the caller reads (a process's stdout also carries
whatever the libraries print, so it is no channel for results).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from croco.config_loading import load_config
from croco.training.run import run_train
from croco.training.spec import TrainSpec, TrainSpecAdapter, variant_spec


def write_spec(path: Path, spec: TrainSpec) -> Path:
    """The spec as JSON, for `--spec`."""
    path.write_text(spec.model_dump_json())
    return path


def read_spec(path: str | Path) -> TrainSpec:
    """A spec file written by `write_spec`, validated back into its method's spec."""
    return TrainSpecAdapter.validate_json(Path(path).read_text())


def accelerate_command(spec: Path, num_processes: int, config_file: str | None = None,
                       result: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
           str(num_processes)]
    if config_file:
        cmd += ["--config_file", config_file]
    else:
        cmd += ["--multi_gpu"]
    return cmd + _launch_args(spec, result)


def torchrun_command(spec: Path, num_processes: int, result: Path | None = None) -> list[str]:
    """The same run under plain torchrun (one node): what runs data parallel on CPUs too
    (the gloo backend), where `accelerate launch` starts a single process."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(num_processes), *_launch_args(spec, result)]


def _launch_args(spec: Path, result: Path | None) -> list[str]:
    args = ["-m", "croco.training.launch", "--spec", str(spec)]
    return args + (["--result", str(result)] if result else [])


def run_train_distributed(num_processes: int, spec: TrainSpec, *,
                          launcher: str = "accelerate") -> str:
    """Run `run_train(spec)` in `num_processes` data-parallel processes (GPUs with
    `accelerate`, any device with `torchrun`); return its URI, read from the result file
    the main process writes. DPO and SFT only (online DPO and the reward model train in
    one process)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = write_spec(Path(tmp) / "spec.json", spec)
        result = Path(tmp) / "result.json"
        cmd = (torchrun_command(spec_file, num_processes, result) if launcher == "torchrun"
               else accelerate_command(spec_file, num_processes, result=result))
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{launcher} failed (exit {done.returncode}):\n"
                               f"{done.stderr[-4000:]}")
        if not result.exists():
            raise RuntimeError(f"{launcher} exited 0 but its main process wrote no result "
                               f"file:\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())["uri"]


def main(argv: list[str] | None = None) -> str:
    from croco.training.common import is_main_process

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=None, help="a spec written by write_spec")
    ap.add_argument("--result", default=None,
                    help='write {"uri": <training URI>} to this JSON file (main process)')
    ap.add_argument("--config", default=None, help="YAML config (default: the demo)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--variant", default=None)
    ap.add_argument("--pairs-uri", default=None)
    ap.add_argument("--lang", default=None)
    ap.add_argument("--adapter", default=None, help="continue this adapter (iterative rounds)")
    a = ap.parse_args(argv)
    if a.spec:
        spec = read_spec(a.spec)
    else:
        spec = _config_spec(a)
    uri = run_train(spec)
    if a.result and is_main_process():
        Path(a.result).write_text(json.dumps({"uri": uri}))
    print(uri)
    return uri


def _config_spec(a: argparse.Namespace) -> TrainSpec:
    """The spec of `--variant` of `--config` on `--pairs-uri` (DPO and SFT variants)."""
    if not (a.variant and a.pairs_uri):
        raise SystemExit("give --spec, or --variant and --pairs-uri (with --config)")
    cfg = load_config(a.config, a.overrides)
    variants = {v.name: v for v in cfg.experiments}
    if a.variant not in variants:
        raise SystemExit(f"--variant {a.variant!r}: the config has {sorted(variants)}")
    v = variants[a.variant]
    if v.method == "online_dpo":
        raise SystemExit(f"--variant {a.variant!r} is online_dpo: it trains on the run's "
                         "prompts, not on pairs; give a --spec (or run the pipeline)")
    policy = cfg.policy.model_copy(update={"adapter": a.adapter}) if a.adapter else cfg.policy
    return variant_spec(cfg, v, policy=policy, pairs_uri=a.pairs_uri, lang=a.lang)


if __name__ == "__main__":
    main()
