"""A paper-scale dress rehearsal: the real `croco run` at the paper's counts, on tiny random
models, measuring where the time, the bytes, the files and the object-store requests go.

    python benchmarks/rehearsal.py [--n 500] [--languages 11] [--k 64] [--groups 1]
                                   [--root local|s3] [--until pair|train|evaluate]
                                   [--max-new-tokens 4] [--shard-size 64] [--json PATH]

What runs: `python -m croco.flows.cli run CONFIG --set data_root=... --until pair` in a
subprocess (as `benchmarks/pipeline_runs.py` runs it), with this checkout first on
PYTHONPATH, a fresh PREFECT_HOME (its temporary Prefect API and SQLite database) and a
fresh data root. The config is written for the run: the first `--languages` of the
paper's 11 (`croco.config.PAPER_LANGUAGES`), a synthetic prompt file of `--n` train
prompts per language (plus `--heldout` held-out ones, which only evaluation reads), k
samples of at most `--max-new-tokens` tokens, `generation.shard_size` prompts per shard,
`orchestration.shards_per_language` = `--groups`; the reward is the paper's (a classifier
reward model, language identification recorded at weight 0); the policy and the reward
model are seeded random 2-layer Llamas with SmolLM2's tokenizer (`benchmarks.tiny`):
nothing is downloaded, and the model work is small, so what is left is croco's and
Prefect's own cost at paper-shaped counts. `--until train` / `evaluate` go on to DPO
(and the held-out evaluation) on the same tiny models.

Then the "nightly" rerun: 5 % new train prompts per language are appended to the prompt
file and the same command runs again on the same data root and PREFECT_HOME (a new run
id). Only the new prompts are sampled and scored; the benchmark shows what else it
rewrites.

Per run it reports:

- per stage (prompts, generate, score, pair, train, evaluate): outputs and rows; the
  seconds their `_SUCCESS` markers record (`croco.stage.completion_info`, only for
  outputs this run completed); the seconds inside `croco.stage.run`, and inside it the
  model work (sampling, model loading, reward scoring: `croco.generation.generate_frame`
  / `make_generator`, `croco.reward.score_frame`), measured by a probe (below); the
  Prefect task runs and their summed duration (which includes waiting for the GPU slot).
  With `--groups` > 1 the seal that completes a generate or score output records neither
  seconds nor the rows sampled now (`croco.stage.seal`): those columns show 0 or "-"
  there, and the probe's columns are the ones to read;
- per top-level folder of the data root (prompts/, samples/, generations/, scored/,
  scores/, pairs/, runs/ ...): files created, files rewritten, bytes written (the sizes
  of created and rewritten files; on S3 the request bodies the server received), and
  with `--root s3` the object-store requests, by operation;
- for the whole run: the command's wall time and the flow's (the manifest's
  `wall_seconds`), the peak RSS of the command's process tree (psutil, polled every
  0.2 s: the sum over the tree, and its largest process; per stage, the tree's peak
  while one of the stage's Prefect task runs ran, `stage_peaks`), the Prefect task runs and
  flow runs it made (read from the SQLite database under PREFECT_HOME), the size of that
  database and of PREFECT_HOME, the manifest's size, and the wall time of `croco config
  plan` on the same config (run just before the run) and of `croco report RUN_ID` (just
  after; a run stopped before evaluation may have no report to render: its exit status
  is shown).

The nightly rerun's folder figures are shown beside the first run's, with the ratio
rerun / first.

`--root s3`: a moto server in this process on loopback (as the test suite's `s3_server`
fixture starts it), in front of which a WSGI wrapper counts every request it answers
(method, operation, key prefix, body bytes): an exact count at the server, of everything
croco, s3fs and polars' native reader send. croco gets the endpoint and credentials from
the environment (`CROCO_S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).

`--via deployments`: the same runs through deployments, as a cluster runs them. The
benchmark starts a Prefect server on loopback (SQLite under PREFECT_HOME), the
`croco-cpu` and `croco-gpu` process work pools with a worker each (2 and 1 flow runs at
a time) and deploys `infra/prefect.yaml` (`croco deploy`), as the deployment tests do
(`benchmarks.prefect_stack.Stack`), then runs `croco run --deployment
croco-pipeline/scale-out CONFIG ...`: one flow run per language for generation and for
scoring, each in a process of its own. The probe cannot reach those processes, so the
model-work columns are empty; what stands for them is the time inside stages: the union,
over the outputs the run completed, of the intervals their `_SUCCESS` markers record
(written at the end, after `seconds` of work), against the run's wall time
(`stage_busy_seconds`, in both modes). The peak RSS is that of everything the benchmark
started (server, workers and their flow-run processes, the command). The stage table's
"other" row is the pipeline's tasks that start a child flow run and wait for it
(`run_deployment`; named after the flow run), as "subflow calls" is in process.

The probe: by default the command is `python -m benchmarks.rehearsal --croco run ...`,
which wraps five croco functions with timers (by the Prefect task run they run in) and
then runs `croco.flows.cli` exactly as `python -m croco.flows.cli` does; `--no-probe`
runs `python -m croco.flows.cli` itself (no model-work column).

Sizes: the quick size is `--n 500` (11 x 500 x 64 = 352,000 samples), the full size
`--n 2000`. `--json PATH` writes every number; `--keep` keeps the work folder (data
root, PREFECT_HOME, logs) and prints where it is.
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import parse_qs, unquote

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: the repository root is the import root
    sys.path.insert(0, str(ROOT))

from benchmarks.pipeline_runs import stage_outputs

#: The paper's languages (`croco.config.PAPER_LANGUAGES`; a test checks the copy), copied
#: so that this process, which measures the command, imports no more than it needs.
PAPER_LANGUAGES = ["en", "da", "nl", "fr", "de", "it", "es", "gl", "cy", "mt", "ga"]
STAGES = ["prompts", "generate", "score", "pair", "ref-logps", "train", "evaluate",
          "manifest", "subflow calls"]
#: Which stage wrote a top-level folder of the data root (generations/ also holds the
#: evaluation's held-out answers, scores/ their rewards).
FOLDER_STAGE = {"prompts": "prompts", "samples": "generate", "generations": "generate",
                "scored": "score", "scores": "score", "pairs": "pair", "ref_logps": "ref-logps",
                "training": "train",
                "judgments": "evaluate", "structured": "evaluate", "reward_check": "evaluate",
                "runs": "manifest"}
BUCKET = "croco-rehearsal"
PREFIX = "croco"  # the data root on S3: s3://BUCKET/PREFIX
MB = 1024 * 1024

_WORDS = ["river", "light", "stone", "market", "winter", "garden", "letter", "window", "music",
          "bread", "travel", "school", "history", "language", "question", "answer",
          "friend", "mountain", "city", "forest", "paper", "story", "money", "health",
          "kitchen", "morning", "evening", "simple", "careful", "quick", "honest",
          "ancient", "modern", "small", "large", "explain", "describe", "compare",
          "suggest", "imagine", "remember", "write", "list", "plan", "teach", "learn",
          "build", "change", "keep"]


# ------------------------------------------------------------------------- inputs

def prompt_rows(langs: list[str], start: int, count: int, split: str, seed: int = 0):
    """`count` synthetic prompts per language, ids `p{start:06d}` on (they sort in file
    order, as croco sorts them), 12-40 words each."""
    for lang in langs:
        for i in range(start, start + count):
            rng = random.Random(f"{seed}-{lang}-{i}")
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(12, 40)))
            yield {"prompt_id": f"p{i:06d}", "lang": lang,
                   "prompt": f"({lang} {i}) Please {words}.", "split": split,
                   "source": "rehearsal"}


def write_prompts(path: Path, langs: list[str], n: int, heldout: int) -> None:
    with path.open("w") as f:
        for row in prompt_rows(langs, 0, n, "train"):
            f.write(json.dumps(row) + "\n")
        for row in prompt_rows(langs, 10**5, heldout, "heldout"):
            f.write(json.dumps(row) + "\n")


def append_prompts(path: Path, langs: list[str], start: int, count: int) -> None:
    with path.open("a") as f:
        for row in prompt_rows(langs, start, count, "train"):
            f.write(json.dumps(row) + "\n")


def config(a, prompts: Path, policy: str, rm: str) -> dict:
    """The run's config: the paper's reward and pairing, tiny models, the sizes asked for."""
    return {
        "run_name": "rehearsal",
        "languages": PAPER_LANGUAGES[:a.languages],
        "prompts": {"path": str(prompts), "split": "train"},
        "policy": {"model": policy},
        "generation": {"backend": "transformers", "k": a.k, "temperature": 1.0, "top_p": 1.0,
                       "max_new_tokens": a.max_new_tokens, "seed": 0,
                       "batch_size": a.batch_size, "shard_size": a.shard_size},
        "reward": {"scorers": [
            {"type": "classifier", "name": "rm", "model": rm, "weight": 1.0,
             "batch_size": a.score_batch_size},
            {"type": "langid", "name": "lang", "weight": 0.0}]},
        "pairing": {"scope": "in_lang", "reject_target": "mean_minus_2sigma",
                    "prompt_source": "chosen"},
        "training": {"enabled": True, "effective_batch_size": 64, "per_device_batch_size": 16,
                     "max_length": 256, "heldout_fraction": 0.01, "save_steps": 1000,
                     "max_steps": a.train_steps},
        "experiments": [{"name": "dpo", "method": "dpo"}],
        "evaluation": {"enabled": True, "split": "heldout", "k": 1, "temperature": 0.0,
                       "max_new_tokens": a.max_new_tokens,
                       "judge": {"model": policy, "mode": "logprob", "n_bootstrap": 100},
                       "structured": {"enabled": False}},
        "orchestration": {"shards_per_language": a.groups},
    }


def make_models(work: Path) -> dict:
    """The tiny policy and reward model, and the machine line, made in a subprocess (this
    process stays free of torch while it measures)."""
    code = ("import json, sys; from benchmarks.tiny import tiny_llama; "
            "from benchmarks.ab import machine; w = sys.argv[1]; "
            "print(json.dumps({'policy': tiny_llama(w + '/policy'), "
            "'rm': tiny_llama(w + '/rm', classifier=True, seed=1), 'machine': machine()}))")
    out = subprocess.run([sys.executable, "-c", code, str(work)], check=True, cwd=ROOT,
                         env=_env(), capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine_info() -> dict:
    info = {"cpu_count": os.cpu_count(), "cpu_model": "", "memory_gib": None,
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                   / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# ------------------------------------------------------------------ the S3 server

class RequestLog:
    """Every request the S3 server answered: (method, operation, folder, body bytes)."""

    def __init__(self, prefix: str):
        self.prefix = prefix.strip("/") + "/"
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str, int]] = []
        self.times: list[float] = []  # when each request arrived (seconds since the epoch)
        self.keys: list[str] = []  # the key (or listing prefix) of each request

    def folder(self, key: str) -> str:
        if not key.startswith(self.prefix):
            return "(outside the data root)" if key else "(bucket)"
        rest = key[len(self.prefix):]
        return rest.split("/", 1)[0] if "/" in rest else (rest or "(data root)")

    def record(self, environ: dict) -> None:
        method = environ.get("REQUEST_METHOD", "")
        parts = unquote(environ.get("PATH_INFO", "")).lstrip("/").split("/", 1)
        key = parts[1] if len(parts) > 1 else ""
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        size = int(environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH")
                   or environ.get("CONTENT_LENGTH") or 0)
        if method == "POST" and "delete" in query and not key:
            # DeleteObjects (s3fs's rm, the second half of every rename): the keys are in
            # the body; the first names the folder
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            found = re.search(rb"<Key>([^<]*)</Key>", body)
            key = found.group(1).decode() if found else ""
        if method == "GET" and not key:
            op = "list" if ("list-type" in query or "prefix" in query
                            or "delimiter" in query or not query) else "bucket-get"
            key = query.get("prefix", [""])[0]
        elif method == "GET":
            op = "get"
        elif method == "HEAD":
            op = "head" if key else "head-bucket"
        elif method == "PUT":
            op = ("copy" if environ.get("HTTP_X_AMZ_COPY_SOURCE") else
                  "upload-part" if "uploadId" in query else "put")
        elif method == "POST":
            op = ("delete-many" if "delete" in query else "multipart-start"
                  if "uploads" in query else "multipart-complete" if "uploadId" in query
                  else "post")
        elif method == "DELETE":
            op = "delete"
        else:
            op = method.lower()
        if op in ("copy", "delete-many"):
            size = 0 if op == "copy" else size  # no object bytes written by the client
        with self.lock:
            self.requests.append((method, op, self.folder(key), size))
            self.times.append(time.time())
            self.keys.append(key)

    def mark(self) -> int:
        with self.lock:
            return len(self.requests)

    def mark_at(self, when: float, start: int, end: int) -> int:
        """The mark of the first request between `start` and `end` that arrived at or
        after `when`."""
        with self.lock:
            return next((i for i in range(start, end) if self.times[i] >= when), end)

    def since(self, mark: int, until: int | None = None) -> dict:
        """Requests between two marks: total, by operation, by folder (with the bytes
        written: PUT and upload-part bodies)."""
        with self.lock:
            part = self.requests[mark:until]
        by_folder: dict[str, dict] = defaultdict(lambda: {"requests": 0, "by_op": Counter(),
                                                          "bytes_put": 0})
        for _, op, folder, size in part:
            f = by_folder[folder]
            f["requests"] += 1
            f["by_op"][op] += 1
            if op in ("put", "upload-part"):
                f["bytes_put"] += size
        return {"total": len(part), "by_op": dict(Counter(op for _, op, _, _ in part)),
                "by_folder": {k: {**v, "by_op": dict(v["by_op"])}
                              for k, v in sorted(by_folder.items())}}


class CountingS3:
    """moto's S3 in server mode (what `moto.server.ThreadedMotoServer` runs) on loopback,
    each request recorded in `log` before moto answers it."""

    def __init__(self):
        self.log = RequestLog(PREFIX)
        self.server = None

    def start(self) -> str:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        moto_app = DomainDispatcherApplication(create_backend_app)
        log = self.log

        def app(environ, start_response):
            log.record(environ)
            return moto_app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, app, True,
                                  request_handler=MotoRequestHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="rehearsal-key-id",
                        aws_secret_access_key="rehearsal-secret-key")


# ------------------------------------------------------------ what the data root holds

def snapshot_local(root: Path) -> dict[str, tuple]:
    """relative path -> (size, mtime_ns, inode) of every file under `root`."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            found[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def snapshot_s3(client) -> dict[str, tuple]:
    """key below the data root -> (size, ETag, LastModified) of every object."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                 Prefix=PREFIX + "/"):
        for o in page.get("Contents", []):
            found[o["Key"][len(PREFIX) + 1:]] = (o["Size"], o["ETag"], str(o["LastModified"]))
    return found


FOLDER_FIGURES = ("files_created", "files_rewritten", "files_deleted", "bytes_written",
                  "files_after", "bytes_after")
STAGE_FIGURES = ("outputs", "rows", "success_seconds", "generated_rows", "task_runs",
                 "task_seconds")


def folder_of(rel: str) -> str:
    return rel.split("/", 1)[0] if "/" in rel else "(data root)"


def diff(before: dict, after: dict) -> dict:
    """Per top-level folder: files created, rewritten (same name, new content or a new
    inode: written again) and deleted, the bytes of the created and rewritten files, and
    what the folder holds afterwards."""
    out: dict[str, dict] = defaultdict(lambda: dict.fromkeys(FOLDER_FIGURES, 0))
    for rel, meta in after.items():
        f = out[folder_of(rel)]
        f["files_after"] += 1
        f["bytes_after"] += meta[0]
        if rel not in before:
            f["files_created"] += 1
            f["bytes_written"] += meta[0]
        elif before[rel] != meta:
            f["files_rewritten"] += 1
            f["bytes_written"] += meta[0]
    for rel in before.keys() - after.keys():
        out[folder_of(rel)]["files_deleted"] += 1
    return {k: out[k] for k in sorted(out)}


def written_markers(before: dict, after: dict) -> list[str]:
    """The `_SUCCESS` markers created or rewritten between two snapshots."""
    return sorted(rel for rel, meta in after.items()
                  if rel.endswith("_SUCCESS") and before.get(rel) != meta)


#: The folders the generate and score stages write: the stores and the run's views.
SAMPLE_FOLDERS = ("samples", "generations", "scored", "scores")
#: The folders a nightly rerun should touch in proportion to its new prompts only (pairs,
#: training and evaluation rerun on the whole set on purpose).
UPSTREAM_FOLDERS = ("prompts", *SAMPLE_FOLDERS)


def new_store_data(before: dict, after: dict) -> int:
    """The bytes of the samples and scores a run added to the stores: shard files created
    under samples/ and scored/ (not their prompts files or the store indexes)."""
    total = 0
    for rel, meta in after.items():
        name = rel.rsplit("/", 1)[-1]
        if (rel not in before and folder_of(rel) in ("samples", "scored")
                and name.endswith(".parquet") and not name.startswith("_")
                and not name.endswith(".prompts.parquet")):
            total += meta[0]
    return total


def nightly_checks(first: dict, nightly: dict) -> dict:
    """The nightly rerun against the first run, as the ratios that should stay small when
    only a few prompts are new: model work (rows sampled), bytes written and object-store
    requests of the stages upstream of pairs, and what the generate and score stages wrote
    against the bytes of the new samples and scores themselves."""
    def folder_sum(run: dict, names, key: str) -> int:
        return sum((run["folders"].get(f) or {}).get(key, 0) for f in names)

    def ratio(a, b):
        return round(a / b, 4) if b else None

    gen = (first["stages"].get("generate") or {}).get("generated_rows") or 0
    gen_n = (nightly["stages"].get("generate") or {}).get("generated_rows") or 0
    out = {
        "generated_rows": [gen, gen_n], "model_work": ratio(gen_n, gen),
        "upstream_bytes_written": [folder_sum(first, UPSTREAM_FOLDERS, "bytes_written"),
                                   folder_sum(nightly, UPSTREAM_FOLDERS, "bytes_written")],
        "sample_stages_bytes_written": folder_sum(nightly, SAMPLE_FOLDERS, "bytes_written"),
        "new_store_data_bytes": nightly["new_store_data_bytes"],
    }
    out["upstream_bytes"] = ratio(out["upstream_bytes_written"][1],
                                  out["upstream_bytes_written"][0])
    out["sample_stages_over_new_data"] = ratio(out["sample_stages_bytes_written"],
                                               out["new_store_data_bytes"])
    if first.get("requests_before_pairs") is not None:
        out["upstream_requests"] = [first["requests_before_pairs"]["total"],
                                    nightly["requests_before_pairs"]["total"]]
        out["upstream_request_ratio"] = ratio(out["upstream_requests"][1],
                                              out["upstream_requests"][0])
    return out


def checks_table(c: dict) -> str:
    lines = ["| nightly rerun against the first run | value |", "|---|---|",
             f"| rows sampled (model work) | {c['generated_rows'][1]:,} of "
             f"{c['generated_rows'][0]:,} = " + (f"{c['model_work']:.1%} |" if c[
                 "model_work"] is not None else "not recorded |"),
             f"| bytes written, prompts to scores | {_fmt_bytes(c['upstream_bytes_written'][1])}"
             f" of {_fmt_bytes(c['upstream_bytes_written'][0])} = {c['upstream_bytes']:.1%} |",
             f"| bytes written by generate and score / the new samples and scores | "
             f"{_fmt_bytes(c['sample_stages_bytes_written'])} / "
             f"{_fmt_bytes(c['new_store_data_bytes'])} = "
             f"{_fmt(c['sample_stages_over_new_data'], 2)}x |"]
    if "upstream_requests" in c:
        lines.append(f"| object-store requests before pairing began | "
                     f"{c['upstream_requests'][1]:,} of {c['upstream_requests'][0]:,} = "
                     f"{c['upstream_request_ratio']:.1%} |")
    return "\n".join(lines)


# ------------------------------------------------------------------- the commands

def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra or {})
    return env


def run_measured(cmd: list[str], env: dict, log: Path, also: list[int] = ()) -> dict:
    """Run `cmd` with its output to `log`; its wall time, exit status and the peak RSS of
    its process tree (polled every 0.2 s: the tree's sum, and its largest process), and
    the polls themselves (`timeline`: [epoch seconds, tree RSS in bytes]), from which
    `stage_peaks` takes each stage's peak. `also`: more process trees counted in the RSS
    (the Prefect server and workers of `--via deployments`)."""
    import psutil

    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak_tree = peak_one = 0
        timeline: list[list[float]] = []
        try:
            parent = psutil.Process(proc.pid)
            others = []
            for pid in also:
                try:
                    others.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass
            while proc.poll() is None:
                try:
                    procs = [parent, *parent.children(recursive=True)]
                except psutil.NoSuchProcess:
                    break
                for other in others:
                    try:
                        procs += [other, *other.children(recursive=True)]
                    except psutil.NoSuchProcess:
                        pass
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak_tree, peak_one = max(peak_tree, sum(rss)), max(peak_one, max(rss or [0]))
                timeline.append([time.time(), sum(rss)])
                time.sleep(0.2)
        except BaseException:  # stopped (Ctrl-C, SIGTERM): stop the command as Ctrl-C does
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            rc = proc.wait()
    return {"seconds": round(time.perf_counter() - t0, 2), "rc": rc,
            "peak_rss_tree_mb": round(peak_tree / MB), "peak_rss_process_mb": round(peak_one / MB),
            "timeline": timeline}


def stage_busy_seconds(markers: list[tuple[float, float]]) -> float:
    """The time some stage was working: the union of the intervals [end - seconds, end] of
    the `_SUCCESS` markers a run wrote (`end`: when the marker was written; `seconds`: the
    work it records). Parallel stages count once, and what is outside every interval
    (Prefect's scheduling, flow-run processes starting, waits) is the orchestration."""
    total, last = 0.0, float("-inf")
    for start, end in sorted((end - seconds, end) for end, seconds in markers if seconds):
        if end <= last:
            continue
        total += end - max(start, last)
        last = end
    return round(total, 2)


def stage_peaks(timeline: list[list[float]], tasks: dict, langs: set[str]) -> dict:
    """Each stage's peak RSS (MB, the process tree's sum): the largest poll taken while one
    of its Prefect task runs ran (from its start to its end in Prefect's database). Stages
    whose tasks overlap in time (languages run side by side) share those polls, so a
    stage's figure is the peak of the whole tree while it ran: an upper bound on its own.
    Subflow-call task runs (which span their subflow) are left out."""
    peaks: dict[str, float] = {}
    times = [t for t, _ in timeline]
    for t in tasks.values():
        stage = task_stage(t["name"], langs)
        if stage == "subflow calls" or not t.get("start") or not t.get("end"):
            continue
        lo = bisect.bisect_left(times, t["start"])
        hi = bisect.bisect_right(times, t["end"])
        # the poll just before the start too: a task shorter than a poll has none inside
        window = [rss for _, rss in timeline[max(lo - 1, 0):max(hi, lo)]]
        if window:
            peaks[stage] = max(peaks.get(stage, 0), max(window))
    return {stage: round(v / MB) for stage, v in peaks.items()}


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# ----------------------------------------------------------- Prefect's database

def prefect_db(home: Path) -> dict:
    """Task runs and flow runs (ids, names, states, durations) in PREFECT_HOME's database."""
    db = home / "prefect.db"
    if not db.exists():
        return {"task_runs": {}, "flow_runs": {}, "db_bytes": 0}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        def rows(table: str) -> dict:
            cur = con.execute(f"SELECT id, name, state_name, start_time, end_time FROM {table}")
            return {r[0]: {"name": r[1], "state": r[2], "seconds": _seconds(r[3], r[4]),
                           "start": _epoch(r[3]), "end": _epoch(r[4])}
                    for r in cur.fetchall()}
        tasks, flows = rows("task_run"), rows("flow_run")
    finally:
        con.close()
    size = sum(p.stat().st_size for p in home.glob("prefect.db*"))
    return {"task_runs": tasks, "flow_runs": flows, "db_bytes": size}


def _epoch(value) -> float | None:
    """A database timestamp as seconds since the epoch."""
    from datetime import datetime, timezone

    if not value:
        return None
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _seconds(start, end) -> float | None:
    from datetime import datetime

    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))
                ).total_seconds()
    except ValueError:
        return None


def tree_bytes(path: Path) -> int:
    return sum(meta[0] for meta in snapshot_local(path).values()) if path.exists() else 0


def task_stage(name: str, langs: set[str]) -> str:
    """The stage a task run (or a probe record) belongs to, from its name: prompts-en,
    generate-en[-2], plan-/seal-generate-en, score-en, pair-in_lang, ref-logps[-en],
    train-dpo; the
    evaluation's generate-base, score-dpo, judge-dpo ... count as evaluate."""
    if name.startswith("croco-"):
        return "subflow calls"  # the task run of a subflow: the time of the tasks inside
    for step in ("plan-", "seal-"):
        name = name.removeprefix(step)
    if name.startswith("ref-logps"):
        return "ref-logps"
    head, _, rest = name.partition("-")
    if head in ("generate", "score"):
        return head if rest.split("-")[0] in langs else "evaluate"
    if head in ("prompts", "pair", "train", "manifest"):
        return head
    if head in ("judge", "structured", "reward", "heldout", "report"):
        return "evaluate"
    return "other"


# ------------------------------------------------------------------------ the probe

def _probe_main(argv: list[str]) -> None:
    """`python -m benchmarks.rehearsal --croco ARGS`: `croco ARGS` with timers around the
    model work and the stage runner, by Prefect task run, written to $CROCO_REHEARSAL_PROBE
    after every call."""
    import functools
    import runpy

    import croco.generation
    import croco.reward
    import croco.stage

    out = os.environ["CROCO_REHEARSAL_PROBE"]
    lock = threading.Lock()
    totals: dict[str, dict[str, list[float]]] = defaultdict(dict)

    def task_name() -> str:
        try:
            from prefect.context import TaskRunContext

            ctx = TaskRunContext.get()
            return ctx.task_run.name if ctx else "(no task)"
        except Exception:  # noqa: BLE001 - a figure, never a failure
            return "(no task)"

    def wrap(module, name: str) -> None:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                try:
                    with lock:
                        rec = totals[task_name()].setdefault(name, [0, 0.0])
                        rec[0] += 1
                        rec[1] += dt
                        Path(out + ".tmp").write_text(json.dumps(totals))
                        os.replace(out + ".tmp", out)
                except Exception as e:  # noqa: BLE001 - a figure, never the run's failure
                    print(f"rehearsal probe: {e!r}", file=sys.stderr)

        setattr(module, name, timed)

    # Every caller imports these by name at call time (`from croco.generation import
    # generate_frame` inside a function): the module attributes are what they get.
    for module, name in ((croco.generation, "generate_frame"), (croco.generation, "make_generator"),
                         (croco.reward, "score_frame"), (croco.reward, "make_scorer"),
                         (croco.stage, "run")):
        wrap(module, name)
    sys.argv = ["croco", *argv]
    runpy.run_module("croco.flows.cli", run_name="__main__")


def probe_by_stage(probe: dict, langs: set[str]) -> dict:
    """Probe totals summed by stage: seconds in croco.stage.run, in loading models
    (`make_generator`, `make_scorer`: the first call also imports torch and transformers)
    and in the model work itself (`generate_frame`, `score_frame` less its `make_scorer`)."""
    out: dict[str, dict] = defaultdict(lambda: {"stage_run_seconds": 0.0, "load_seconds": 0.0,
                                                "model_seconds": 0.0, "model_calls": 0})
    for task, funcs in probe.items():
        s = out[task_stage(task, langs)]
        for name, (calls, seconds) in funcs.items():
            if name == "run":
                s["stage_run_seconds"] += seconds
            elif name in ("make_generator", "make_scorer"):
                s["load_seconds"] += seconds
                if name == "make_scorer":  # called inside score_frame
                    s["model_seconds"] -= seconds
            else:
                s["model_seconds"] += seconds
                s["model_calls"] += calls
    return {k: {kk: round(vv, 2) if isinstance(vv, float) else vv for kk, vv in v.items()}
            for k, v in out.items()}


def _written_at(meta: tuple) -> float | None:
    """When a file of a snapshot was last written (epoch seconds): its mtime on a local
    root, its LastModified on S3 (whole seconds)."""
    if isinstance(meta[1], int):
        return meta[1] / 1e9
    return _epoch(meta[2])


# ------------------------------------------------------------------------- one run

class Rehearsal:
    def __init__(self, a, work: Path):
        self.a, self.work = a, work
        self.langs = PAPER_LANGUAGES[:a.languages]
        self.home = work / "prefect"
        self.home.mkdir(parents=True, exist_ok=True)
        self.prompts = work / "prompts.jsonl"
        self.config = work / "config.yaml"
        self.s3 = None
        self.extra_env: dict = {}
        if a.root == "s3":
            self.s3 = CountingS3()
            endpoint = self.s3.start()
            self.client = s3_client(endpoint)
            self.client.create_bucket(Bucket=BUCKET)
            self.data_root = f"s3://{BUCKET}/{PREFIX}"
            self.extra_env = {"AWS_ACCESS_KEY_ID": "rehearsal-key-id",
                              "AWS_SECRET_ACCESS_KEY": "rehearsal-secret-key",
                              "AWS_DEFAULT_REGION": "us-east-1",
                              "CROCO_S3_ENDPOINT_URL": endpoint,
                              "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                              "AWS_CONFIG_FILE": "/nonexistent"}
        else:
            self.data_root = str(work / "data")
            (work / "data").mkdir(exist_ok=True)
        self.env = _env({"PREFECT_HOME": str(self.home), **self.extra_env})
        self.stack = None
        if a.via == "deployments":
            from benchmarks.prefect_stack import Stack, free_port

            self.stack = Stack(self.home, free_port(), base_env=self.env)
            self.env = self.stack.env
            try:
                self.stack.boot()  # server, pools, `croco deploy`
                self.stack.start_workers()
            except BaseException:
                self.close()
                raise

    def snapshot(self) -> dict:
        return snapshot_s3(self.client) if self.s3 else snapshot_local(Path(self.data_root))

    def mark(self) -> int | None:
        return self.s3.log.mark() if self.s3 else None

    def requests(self, start: int | None, end: int | None = None) -> dict | None:
        return self.s3.log.since(start, end) if self.s3 else None

    def croco(self, *args: str, probe: str | None = None) -> list[str]:
        if probe and self.a.probe:
            return [sys.executable, "-m", "benchmarks.rehearsal", "--croco", *args]
        return [sys.executable, "-m", "croco.flows.cli", *args]

    def timed(self, name: str, args: list[str]) -> dict:
        """A short command (plan, report): wall time, exit status, requests."""
        m = self.mark()
        res = run_measured(self.croco(*args), self.env, self.work / f"{name}.log")
        del res["timeline"]
        res["requests"] = self.requests(m)
        res["log"] = str(self.work / f"{name}.log")
        return res

    def run(self, run_id: str) -> dict:
        sets = ["--set", f"data_root={self.data_root}"]
        plan = self.timed(f"plan-{run_id}", ["config", "plan", str(self.config), *sets])
        db_before = prefect_db(self.home)
        before = self.snapshot()
        probe = self.work / f"probe-{run_id}.json"
        env = {**self.env, "CROCO_REHEARSAL_PROBE": str(probe)}
        m = self.mark()
        log = self.work / f"run-{run_id}.log"
        via = (["--deployment", "croco-pipeline/scale-out"] if self.stack else [])
        cmd = self.croco("run", str(self.config), *sets, "--until", self.a.until,
                         "--run-id", run_id, *via, probe=None if self.stack else "yes")
        print(f"  {run_id}: {' '.join(cmd[1:])}", flush=True)
        res = run_measured(cmd, env, log, also=self.stack.pids() if self.stack else [])
        m_end = self.mark()
        if res["rc"]:
            raise RuntimeError(f"croco run failed (exit status {res['rc']}); the end of "
                               f"{log}:\n{tail(log)}")
        after = self.snapshot()
        db_after = prefect_db(self.home)
        report = self.timed(f"report-{run_id}", ["report", run_id, "--data-root",
                                                 self.data_root])
        folders = diff(before, after)
        new_data = new_store_data(before, after)
        reqs = self.requests(m, m_end)
        if reqs is not None:
            for folder, r in reqs["by_folder"].items():
                f = folders.setdefault(folder, dict.fromkeys(FOLDER_FIGURES, 0))
                f["requests"] = r["requests"]
                f["requests_by_op"] = r["by_op"]
                f["bytes_written"] = r["bytes_put"]  # what the server received: exact
        manifest_rel = f"runs/{run_id}/manifest.json"
        manifest = json.loads(self.read(manifest_rel))
        probe_data = json.loads(probe.read_text()) if probe.exists() else {}
        new_tasks = {k: v for k, v in db_after["task_runs"].items()
                     if k not in db_before["task_runs"]}
        new_flows = {k: v for k, v in db_after["flow_runs"].items()
                     if k not in db_before["flow_runs"]}
        # the markers this run wrote, read once: what they record
        markers = {rel: json.loads(self.read(rel) or b"{}")
                   for rel in written_markers(before, after)}
        stages = self.stages(markers, new_tasks, probe_data, manifest)
        busy = [(end, info["seconds"]) for rel, info in markers.items()
                if info.get("seconds") and (end := _written_at(after[rel])) is not None]
        for stage, mb in stage_peaks(res["timeline"], new_tasks, set(self.langs)).items():
            stages.setdefault(stage, dict.fromkeys(STAGE_FIGURES, 0))["peak_rss_mb"] = mb
        # the requests before pairing began: prompts, generation and scoring (pairs,
        # training and evaluation read the whole set again on purpose)
        upstream = None
        if reqs is not None:
            starts = [t["start"] for t in new_tasks.values()
                      if t["name"].startswith("pair") and t["start"]]
            cut = self.s3.log.mark_at(min(starts), m, m_end) if starts else m_end
            upstream = self.requests(m, cut)
        return {
            "run_id": run_id, "command": " ".join(cmd[1:]), "log": str(log),
            "wall_seconds": res["seconds"], "flow_wall_seconds": manifest.get("wall_seconds"),
            "via": self.a.via, "stage_busy_seconds": stage_busy_seconds(busy),
            "outside_stages_share": round(1 - stage_busy_seconds(busy) / res["seconds"], 3)
            if res["seconds"] else None,
            "peak_rss_tree_mb": res["peak_rss_tree_mb"],
            "peak_rss_process_mb": res["peak_rss_process_mb"],
            "stages": stages, "folders": folders, "requests": reqs,
            "task_runs": len(new_tasks),
            "task_runs_by_state": dict(Counter(t["state"] for t in new_tasks.values())),
            "flow_runs": len(new_flows),
            "prefect_db_bytes": db_after["db_bytes"], "prefect_home_bytes": tree_bytes(self.home),
            "manifest_bytes": after.get(manifest_rel, (0,))[0],
            "plan_seconds": plan["seconds"], "plan_rc": plan["rc"],
            "plan_requests": plan["requests"],
            "report_seconds": report["seconds"], "report_rc": report["rc"],
            "report_peak_rss_mb": report["peak_rss_tree_mb"],
            "plan_peak_rss_mb": plan["peak_rss_tree_mb"],
            "report_requests": report["requests"], "report_log": report["log"],
            "new_store_data_bytes": new_data, "requests_before_pairs": upstream,
            "files_written": sum(f["files_created"] + f["files_rewritten"]
                                 for f in folders.values()),
            "bytes_written": sum(f["bytes_written"] for f in folders.values()),
            "probe": probe_data,
        }

    def relative(self, uri: str) -> str:
        """A URI under the data root, relative to it."""
        root = self.data_root.rstrip("/") + "/"
        uri = uri.removeprefix("file://")
        return uri[len(root):].rstrip("/") if uri.startswith(root) else uri

    def read(self, rel: str) -> bytes:
        if self.s3:
            return self.client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}")["Body"].read()
        return (Path(self.data_root) / rel).read_bytes()

    def stages(self, markers: dict, tasks: dict, probe: dict, manifest: dict) -> dict:
        """Per stage: outputs this run completed (`markers`: the `_SUCCESS` markers written
        now, by path, and what they record), their rows and recorded seconds, Prefect task
        runs and time, and the probe's."""
        langs = set(self.langs)
        # the run's own generations and scores (the held-out ones share their folders)
        run_outputs = {self.relative(o["uri"]) for section in ("generations", "scores")
                       for o in stage_outputs(manifest["outputs"].get(section))}
        out: dict[str, dict] = defaultdict(lambda: dict.fromkeys(STAGE_FIGURES, 0))
        for stage in STAGES:  # in this order in the table
            out[stage]
        seen_passes = set()
        for rel, info in markers.items():
            parts = rel.split("/")
            folder = parts[0]
            stage = FOLDER_STAGE.get(folder, "other")
            if folder in ("generations", "scores") and "/".join(parts[:-1]) not in run_outputs:
                stage = "evaluate"  # the held-out answers and their rewards
            if "ref_logps" in parts:
                stage = "train"  # the reference log-probs, stored beside the pairs
            s = out[stage]
            s["outputs"] += 1
            s["rows"] += info.get("rows") or 0
            s["generated_rows"] += info.get("generated_rows") or 0
            # a pass that wrote several language folders at once (held-out answers)
            # records its seconds in each: counted once
            pass_id = (folder, parts[1], info.get("seconds"))
            if info.get("seconds") is not None and (
                    stage != "evaluate" or pass_id not in seen_passes):
                s["success_seconds"] += info["seconds"]
                seen_passes.add(pass_id)
        for t in tasks.values():
            s = out[task_stage(t["name"], langs)]
            s["task_runs"] += 1
            s["task_seconds"] += t["seconds"] or 0.0
        for stage, p in probe_by_stage(probe, langs).items():
            out[stage].update(p)
        return {k: {kk: round(vv, 2) if isinstance(vv, float) else vv for kk, vv in v.items()}
                for k, v in out.items() if any(v.values())}

    def close(self) -> None:
        if self.stack:
            self.stack.stop()
        if self.s3:
            self.s3.stop()


# ------------------------------------------------------------------------ printing

def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ratio(new, old) -> str:
    if not old:
        return "-" if not new else "new"
    return f"{new / old:.2f}"


def stage_table(run: dict) -> str:
    lines = [("| stage | outputs | rows | sampled now | _SUCCESS s | in croco.stage.run s "
              "| model load s | model work s | rest s | task runs | task time s (incl. waits) "
              "| peak RSS MB (tree, while it ran) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage, s in run["stages"].items():
        model, load = s.get("model_seconds"), s.get("load_seconds")
        inside = s.get("stage_run_seconds")
        rest = (round(inside - model - load, 2)
                if None not in (inside, model, load) else None)
        lines.append(
            f"| {stage} | {s['outputs']} | {s['rows']} | {s['generated_rows'] or '-'} "
            f"| {_fmt(s['success_seconds'])} | {_fmt(inside)} | {_fmt(load)} | {_fmt(model)} "
            f"| {_fmt(rest)} | {s['task_runs']} | {_fmt(s['task_seconds'])} "
            f"| {_fmt(s.get('peak_rss_mb'))} |")
    return "\n".join(lines)


def folder_table(first: dict, rerun: dict | None, s3: bool) -> str:
    head = ["folder", "files created", "files rewritten", "bytes written"]
    if s3:
        head.append("requests")
    cols = head[1:]
    keys = ["files_created", "files_rewritten", "bytes_written"] + (["requests"] if s3 else [])
    if rerun is not None:
        header = ["folder", *[f"{c}: first / nightly (ratio)" for c in cols],
                  "held after nightly"]
    else:
        header = [*head, "held after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = sorted(set(first["folders"]) | set((rerun or {}).get("folders", {})))
    total_a: Counter = Counter()
    total_b: Counter = Counter()
    for name in names:
        fa = first["folders"].get(name, {})
        fb = (rerun or {}).get("folders", {}).get(name, {})
        cells = [name]
        for k in keys:
            va, vb = fa.get(k, 0) or 0, fb.get(k, 0) or 0
            total_a[k] += va
            total_b[k] += vb
            show = _fmt_bytes if k == "bytes_written" else str
            cells.append(f"{show(va)} / {show(vb)} ({_ratio(vb, va)})" if rerun is not None
                         else show(va))
        last = fb if rerun is not None else fa
        cells.append(f"{last.get('files_after', 0)} files, {_fmt_bytes(last.get('bytes_after', 0))}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**all**"]
    for k in keys:
        show = _fmt_bytes if k == "bytes_written" else str
        va, vb = total_a[k], total_b[k]
        cells.append(f"{show(va)} / {show(vb)} ({_ratio(vb, va)})" if rerun is not None
                     else show(va))
    cells.append("")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_table(first: dict, rerun: dict | None) -> str:
    rows = [
        ("`croco run` wall time", "wall_seconds", "s"),
        ("flow wall time (manifest wall_seconds)", "flow_wall_seconds", "s"),
        ("time inside stages (union of their _SUCCESS intervals)", "stage_busy_seconds", "s"),
        ("outside every stage (orchestration, waits), share of the wall time",
         "outside_stages_share", "%"),
        ("peak RSS, process tree (sum)", "peak_rss_tree_mb", "MB"),
        ("peak RSS, largest process", "peak_rss_process_mb", "MB"),
        ("Prefect task runs", "task_runs", ""),
        ("Prefect flow runs", "flow_runs", ""),
        ("Prefect database after the run", "prefect_db_bytes", "bytes"),
        ("PREFECT_HOME after the run", "prefect_home_bytes", "bytes"),
        ("manifest.json", "manifest_bytes", "bytes"),
        ("files written (created + rewritten)", "files_written", ""),
        ("bytes written", "bytes_written", "bytes"),
        ("`croco config plan` just before (wall)", "plan_seconds", "s"),
        ("`croco report RUN_ID` just after (wall)", "report_seconds", "s"),
        ("peak RSS of `croco config plan`", "plan_peak_rss_mb", "MB"),
        ("peak RSS of `croco report RUN_ID`", "report_peak_rss_mb", "MB"),
    ]
    header = ("| figure | first run | nightly rerun | nightly / first |\n|---|---|---|---|"
              if rerun else "| figure | first run |\n|---|---|")
    lines = [header]
    for label, key, unit in rows:
        a, b = first.get(key), (rerun or {}).get(key)
        show = (_fmt_bytes if unit == "bytes" else
                (lambda v: "-" if v is None else f"{100 * v:.1f} %") if unit == "%" else
                (lambda v, u=unit: "-" if v is None else f"{_fmt(v)} {u}".strip()))
        line = f"| {label} | {show(a)}"
        if rerun:
            line += f" | {show(b)} | {_ratio(b, a) if a is not None and b is not None else '-'}"
        lines.append(line + " |")
    if first.get("requests") is not None:
        for label, key in (("object-store requests, the run", "requests"),
                           ("object-store requests, config plan", "plan_requests"),
                           ("object-store requests, report", "report_requests")):
            a = (first.get(key) or {}).get("total")
            b = ((rerun or {}).get(key) or {}).get("total")
            line = f"| {label} | {a}"
            if rerun:
                line += f" | {b} | {_ratio(b, a) if a and b is not None else '-'}"
            lines.append(line + " |")
    notes = []
    for run in (first, rerun):
        if run and run.get("report_rc"):
            notes.append(f"`croco report {run['run_id']}` exited {run['report_rc']} "
                         f"(see {run['report_log']})")
        if run and run.get("plan_rc"):
            notes.append(f"`croco config plan` before {run['run_id']} exited {run['plan_rc']}")
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def ops_table(first: dict, rerun: dict | None) -> str:
    ops = sorted(set((first["requests"] or {}).get("by_op", {}))
                 | set(((rerun or {}).get("requests") or {}).get("by_op", {})))
    lines = ["| operation | first run | nightly rerun |", "|---|---|---|"]
    for op in ops:
        lines.append(f"| {op} | {first['requests']['by_op'].get(op, 0)} "
                     f"| {((rerun or {}).get('requests') or {}).get('by_op', {}).get(op, 0)} |")
    return "\n".join(lines)


def report(result: dict) -> str:
    m, sz = result["machine"], result["sizes"]
    first, rerun = result["runs"]["first"], result["runs"].get("nightly")
    out = [
        (f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, "
         f"load average at start {m.get('load_average')}; {result.get('libraries', '')}"),
        (f"sizes: {sz['languages']} languages x {sz['n']} train prompts x k={sz['k']} "
         f"(= {sz['samples']:,} samples), <= {sz['max_new_tokens']} new tokens, shard_size "
         f"{sz['shard_size']}, shards_per_language {sz['groups']}, batch {sz['batch_size']}, "
         f"root {sz['root']}, --until {sz['until']}, via {sz.get('via', 'process')}; "
         f"nightly: +{sz['nightly_new']} prompts per language"),
        "",
        "### The whole run",
        "",
        run_table(first, rerun),
        *(["", "### The nightly rerun's share", "", checks_table(result["nightly_checks"])]
          if result.get("nightly_checks") else []),
        "",
        "### Per stage, first run",
        "",
        stage_table(first),
    ]
    if rerun:
        out += ["", "### Per stage, nightly rerun", "", stage_table(rerun)]
    out += ["", "### Per folder of the data root" + (": first / nightly (ratio)" if rerun
                                                      else ""), "",
            folder_table(first, rerun, first.get("requests") is not None)]
    if first.get("requests") is not None:
        out += ["", "### Object-store requests by operation", "", ops_table(first, rerun)]
    out += ["", f"total wall time of the benchmark: {result['benchmark_seconds']:.0f} s"]
    return "\n".join(out)


# ---------------------------------------------------------------------------- main

def parse(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="train prompts per language (500 "
                    "quick, 2000 full)")
    ap.add_argument("--languages", type=int, default=11, choices=range(1, 12),
                    metavar="1..11", help="the first N of the paper's 11 languages")
    ap.add_argument("--k", type=int, default=64, help="samples per prompt")
    ap.add_argument("--groups", type=int, default=1,
                    help="orchestration.shards_per_language (1 or 4)")
    ap.add_argument("--root", choices=("local", "s3"), default="local",
                    help="data root: a temporary folder, or a bucket on a local moto server")
    ap.add_argument("--until", choices=("pair", "train", "evaluate"), default="pair",
                    help="the last stage (train/evaluate: DPO and evaluation on the tiny models)")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=64, help="generation.shard_size")
    ap.add_argument("--batch-size", type=int, default=256, help="generation.batch_size "
                    "(sequences decoded together; the paper config's 256)")
    ap.add_argument("--score-batch-size", type=int, default=32,
                    help="the reward model's batch size (the paper config's 32)")
    ap.add_argument("--heldout", type=int, default=10,
                    help="held-out prompts per language (read by evaluation only)")
    ap.add_argument("--train-steps", type=int, default=-1,
                    help="training.max_steps with --until train/evaluate (-1: one epoch)")
    ap.add_argument("--nightly", type=float, default=0.05,
                    help="share of new prompts per language for the rerun (0: no rerun)")
    ap.add_argument("--via", choices=("process", "deployments"), default="process",
                    help="process: `croco run` in one process (Prefect's temporary API); "
                    "deployments: a Prefect server, process workers and "
                    "`croco run --deployment croco-pipeline/scale-out`")
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="run `python -m croco.flows.cli` itself, without the model-work timers")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--requests-log", help="with --root s3: write every request the server "
                    "answered here, a line each (seconds since the start, operation, key)")
    ap.add_argument("--workdir", help="work here (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    return ap.parse_args(argv)


def _exit_on_sigterm() -> None:
    """SIGTERM (`kill`) ends the benchmark as Ctrl-C does: the command it runs and the
    Prefect server and workers it started are stopped, not left running."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    if threading.current_thread() is threading.main_thread():
        _exit_on_sigterm()
    t_start = time.perf_counter()
    machine = machine_info()
    print(f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
          f"{machine['memory_gib']} GiB, load average {machine.get('load_average')}", flush=True)
    if a.workdir:
        work = Path(a.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="croco-rehearsal-"))
    if not a.keep and not a.workdir:
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    models = make_models(work / "models")
    print(f"libraries: {models['machine']}", flush=True)
    r = Rehearsal(a, work)
    try:
        write_prompts(r.prompts, r.langs, a.n, a.heldout)
        import yaml

        cfg = config(a, r.prompts, models["policy"], models["rm"])
        r.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        new = math.ceil(a.n * a.nightly) if a.nightly > 0 else 0
        sizes = {"n": a.n, "languages": len(r.langs), "k": a.k, "groups": a.groups,
                 "root": a.root, "until": a.until, "max_new_tokens": a.max_new_tokens,
                 "shard_size": a.shard_size, "batch_size": a.batch_size,
                 "score_batch_size": a.score_batch_size, "heldout": a.heldout,
                 "samples": len(r.langs) * a.n * a.k, "nightly_new": new, "via": a.via}
        print(f"sizes: {sizes}", flush=True)
        runs = {"first": r.run("first")}
        print(f"  first run: {runs['first']['wall_seconds']:.0f} s", flush=True)
        if new:
            append_prompts(r.prompts, r.langs, a.n, new)
            runs["nightly"] = r.run("nightly")
            print(f"  nightly rerun: {runs['nightly']['wall_seconds']:.0f} s", flush=True)
    finally:
        r.close()
        if a.requests_log and r.s3:
            log = r.s3.log
            t0 = log.times[0] if log.times else 0.0
            Path(a.requests_log).write_text("".join(
                f"{t - t0:.3f} {req[1]} {key}\n"
                for t, req, key in zip(log.times, log.requests, log.keys, strict=True)))
    result = {"command": "python benchmarks/rehearsal.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": machine, "libraries": models["machine"], "sizes": sizes,
              "config": cfg, "runs": runs,
              "benchmark_seconds": round(time.perf_counter() - t_start, 1)}
    if "nightly" in runs:
        f, n = runs["first"], runs["nightly"]
        result["nightly_over_first"] = {
            k: round(n[k] / f[k], 3) if f.get(k) else None
            for k in ("wall_seconds", "files_written", "bytes_written", "task_runs")}
        if f.get("requests"):
            result["nightly_over_first"]["requests"] = round(
                n["requests"]["total"] / f["requests"]["total"], 3)
        result["nightly_checks"] = nightly_checks(f, n)
    if a.json:  # first: the numbers survive a report that fails
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))
    print()
    print(report(result))
    if a.keep or a.workdir:
        print(f"work folder (data root, PREFECT_HOME, logs): {work}")
    if a.json:
        print(f"numbers: {a.json}")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--croco"]:
        _probe_main(sys.argv[2:])
    else:
        main()
