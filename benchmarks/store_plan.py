"""A generation plan over a large sample store on `s3://`: the store's index against
reading every shard's prompts file.

    python benchmarks/store_plan.py [--shards 1000] [--prompts-per-shard 16] [--reps 3]

A store of `--shards` complete shards (each a prompts file of `--prompts-per-shard`
prompts; the samples files are not read by a plan, so none are written) is put in a bucket
on a moto server in this process on loopback, behind the rehearsal's request counter
(`benchmarks.rehearsal.CountingS3`). Then, `--reps` times, interleaved:

- baseline: the plan as it was made before the store had an index: `_index.parquet`
  removed, so `croco.samples.make_plan` reads every shard's prompts file (and writes the
  index);
- croco: the same plan with the index in place (a listing, the index, nothing else).

Each side plans the store's prompts plus 5% new ones (the nightly case) into a fresh
output, and reports the wall time and the requests the server answered. Prints the
machine, min/median of each side and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.rehearsal import BUCKET, PREFIX, CountingS3, s3_client  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--prompts-per-shard", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)

    server = CountingS3()
    endpoint = server.start()
    os.environ.update(CROCO_S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="rehearsal-key-id",
                      AWS_SECRET_ACCESS_KEY="rehearsal-secret-key",
                      AWS_DEFAULT_REGION="us-east-1")
    import polars as pl

    from croco import storage
    from croco.config import stable_hash
    from croco.samples import STORE_INDEX, make_plan, plan_uri, prompt_identity

    client = s3_client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    store = f"s3://{BUCKET}/{PREFIX}/samples/store/lang=de"
    t0 = time.perf_counter()
    frames = []
    for s in range(a.shards):
        df = pl.DataFrame({"prompt_id": [f"p{s}-{i}" for i in range(a.prompts_per_shard)],
                           "lang": "de", "split": "train",
                           "prompt": [f"Frage {s}-{i}?" for i in range(a.prompts_per_shard)]})
        storage.write_parquet(df, storage.join(store, f"{stable_hash(prompt_identity(df))}"
                                               ".prompts.parquet"))
        frames.append(df)
    extra = max(1, len(frames) * a.prompts_per_shard // 20)
    frames.append(pl.DataFrame({"prompt_id": [f"new-{i}" for i in range(extra)],
                                "lang": "de", "split": "train",
                                "prompt": [f"Neu {i}?" for i in range(extra)]}))
    prompts = pl.concat(frames)
    print(f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
          f"store: {a.shards} shards x {a.prompts_per_shard} prompts on moto S3, written in "
          f"{time.perf_counter() - t0:.0f} s; plan: {prompts.height} prompts "
          f"({extra} new)", flush=True)

    def plan(side: str, rep: int) -> tuple[float, int, int]:
        if side == "baseline":
            storage.remove(storage.join(store, STORE_INDEX))
        out = f"s3://{BUCKET}/{PREFIX}/generations/{side}-{rep}/lang=de"
        mark = server.log.mark()
        t = time.perf_counter()
        p = make_plan(out, prompts, store, 64)
        seconds = time.perf_counter() - t
        requests = server.log.since(mark)["total"]
        storage.remove(plan_uri(out))
        return seconds, requests, len(p["parts"])

    make_plan(f"s3://{BUCKET}/{PREFIX}/generations/warm/lang=de", prompts, store, 64)
    res: dict[str, list] = {"baseline": [], "croco": []}
    for rep in range(a.reps):
        order = ("baseline", "croco") if rep % 2 == 0 else ("croco", "baseline")
        for side in order:
            seconds, requests, parts = plan(side, rep)
            res[side].append((seconds, requests))
            print(f"  rep {rep + 1}/{a.reps} {side}: {seconds:.2f} s, {requests} requests, "
                  f"{parts} parts", flush=True)
    server.stop()
    summary = {}
    for side, vals in res.items():
        secs = [v[0] for v in vals]
        summary[side] = {"min_s": min(secs), "median_s": statistics.median(secs),
                         "requests": vals[0][1]}
    ratio = summary["baseline"]["median_s"] / summary["croco"]["median_s"]
    print(f"baseline (every prompts file): min {summary['baseline']['min_s']:.2f} s, median "
          f"{summary['baseline']['median_s']:.2f} s, {summary['baseline']['requests']} "
          "requests")
    print(f"croco (the store's index):     min {summary['croco']['min_s']:.2f} s, median "
          f"{summary['croco']['median_s']:.2f} s, {summary['croco']['requests']} requests")
    print(f"ratio (median baseline / median croco): {ratio:.1f}x")
    return summary


if __name__ == "__main__":
    main()
