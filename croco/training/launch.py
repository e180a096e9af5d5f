"""Run one training stage in its own process, e.g. under `accelerate launch` on a machine
with several GPUs (data parallel; TRL and accelerate handle the ranks):

    accelerate launch --config_file infra/accelerate/multi-gpu.yaml -m croco.training.launch \\
        --config configs/paper-eurollm.yaml --variant dpo --pairs-uri s3://bucket/pairs/<key>

Every rank trains; the outputs it writes are identical and written atomically, so the
last rename wins harmlessly. Prints the training URI on the last line.
"""

from __future__ import annotations

import argparse

from croco.config import load_config
from croco.stages import run_train


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="YAML config (default: the demo)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--pairs-uri", required=True)
    ap.add_argument("--lang", default=None)
    ap.add_argument("--adapter", default=None, help="continue this adapter (iterative rounds)")
    a = ap.parse_args(argv)
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
