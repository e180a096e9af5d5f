"""A corpus of user mistakes, each run through the real `croco run` command in a subprocess.

Every mistake must be caught before any model work: exit code 2, the last line on stderr
is the one `error: ...` line naming what is wrong and where, no traceback anywhere, in
under 10 seconds (a bound for "found before Prefect or a model starts", generous on a
2-core machine), and nothing written under the data root. Two more runs check what
happens when a failure comes from inside the pipeline: a model that vanishes after the
checks (one `error:` line, no retry) and a bug (exit 1, the traceback only with --debug).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIME_LIMIT_S = 10.0
GOOD_PROMPTS = [
    {"prompt_id": f"q{i}", "lang": lang, "prompt": f"{text} {i}?",
     "split": "train" if i < 2 else "heldout"}
    for lang, text in (("en", "What is"), ("de", "Was ist"), ("fr", "Qu'est-ce que"))
    for i in range(3)
]


def croco_command() -> list[str]:
    """The installed `croco` script next to this Python, else the same app as a module."""
    script = Path(sys.executable).parent / "croco"
    return [str(script)] if script.exists() else [sys.executable, "-m", "croco.flows.cli"]


class Workspace:
    """A tmp folder with a valid tiny config (local files only, no real model: every case
    must fail before a model would load) that each case spoils in one place."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.data = tmp_path / "data"
        self.model = tmp_path / "model"
        self.model.mkdir()
        (self.model / "config.json").write_text("{}")
        self.prompts = self.write_prompts("prompts.jsonl", GOOD_PROMPTS)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AWS_", "CROCO_S3", "CROCO_DEBUG", "PREFECT_"))}
        self.env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect-home"),
                        HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        self.base = {
            "run_name": "bad-input", "data_root": str(self.data), "languages": ["en", "de", "fr"],
            "prompts": {"path": self.prompts}, "policy": {"model": str(self.model)},
            "generation": {"k": 2, "max_new_tokens": 4},
            "reward": {"scorers": [{"type": "langid", "name": "lang", "weight": 1.0}]},
            "evaluation": {"judge": {"model": str(self.model)}},
        }

    def write_prompts(self, name: str, rows: list) -> str:
        path = self.tmp / name
        path.write_bytes(b"".join(r if isinstance(r, bytes) else
                                  (json.dumps(r, ensure_ascii=False) + "\n").encode()
                                  for r in rows))
        return str(path)

    def config(self, **changes) -> str:
        """The base config with `changes` (dotted keys replace values), as a YAML file."""
        data = json.loads(json.dumps(self.base))
        for key, value in changes.items():
            node, parts = data, key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        path = self.tmp / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _s3_env(w: Workspace, endpoint: str) -> None:
    w.env.update(AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY="bad-input-secret-99",
                 AWS_DEFAULT_REGION="us-east-1", CROCO_S3_ENDPOINT_URL=endpoint)


def _row(**fields) -> dict:
    return {"prompt_id": "q9", "lang": "en", "prompt": "Hello?", **fields}


# Each case: id, setup(workspace, s3_endpoint) -> croco arguments, words the error must hold.
CASES = [
    # ----------------------------------------------------------------------- config
    ("config-unknown-top-key", lambda w, s3: ["run", w.config(generaton={"k": 2})],
     ["run.yaml", "generaton: unknown key", "check the spelling"]),
    ("config-unknown-nested-key", lambda w, s3: ["run", w.config(**{"generation.temprature": 1})],
     ["generation.temprature: unknown key"]),
    ("config-wrong-type", lambda w, s3: ["run", w.config(**{"generation.k": "many"})],
     ["generation.k: Input should be a valid integer"]),
    ("config-bad-language", lambda w, s3: ["run", w.config(languages=["en", "zz"])],
     ["'zz' is not an ISO 639-1 language code", "two-letter codes"]),
    ("config-variant-training-typo", lambda w, s3: ["run", w.config(experiments=[
        {"name": "dpo-big", "training": {"lerning_rate": 1e-5}}])],
     ["experiments[dpo-big].training.lerning_rate: unknown key"]),
    ("config-variant-pairing-typo", lambda w, s3: ["run", w.config(experiments=[
        {"name": "dpo-all", "pairing": {"scoop": "all_lang"}}])],
     ["experiments[dpo-all].pairing.scoop: unknown key"]),
    ("config-variant-bad-value", lambda w, s3: ["run", w.config(experiments=[
        {"name": "b", "training": {"beta": -1}}])],
     ["experiments[b].training.beta: Input should be greater than 0"]),
    ("config-k1-with-dpo", lambda w, s3: ["run", w.config(**{"generation.k": 1})],
     ["experiments[dpo]: method dpo needs pairs", "generation.k is 1",
      "set generation.k to 2 or more"]),
    ("config-online-dpo-off-policy", lambda w, s3: ["run", w.config(experiments=[
        {"name": "o", "method": "online_dpo", "generation_policy": "org/other"}])],
     ["experiments[o]: online_dpo samples its own pairs", "remove generation_policy"]),
    ("config-bad-reject-target", lambda w, s3: ["run", w.config(
        **{"pairing.reject_target": "median"})],
     ["pairing.reject_target: unknown reject_target 'median'", "mean_minus_2sigma"]),
    ("config-unknown-method", lambda w, s3: ["run", w.config(experiments=[
        {"name": "p", "method": "ppo"}])],
     ["experiments[p].method: Input should be 'dpo', 'sft' or 'online_dpo'"]),
    ("config-file-missing", lambda w, s3: ["run", str(w.tmp / "nope.yaml")],
     ["config file not found", "nope.yaml"]),
    ("config-not-yaml", lambda w, s3: ["run", _write(w.tmp / "run.yaml", "generation:\n  k: [4\n")],
     ["run.yaml: not valid YAML", "(line 3, column 1)"]),
    ("config-not-utf8", lambda w, s3: ["run", _write(w.tmp / "run.yaml", b"run_name: caf\xe9\n")],
     ["run.yaml line 1: not UTF-8 text (byte 0xe9 at column 14)"]),
    ("cli-set-without-value", lambda w, s3: ["run", w.config(), "--set", "generation.k"],
     ["--set 'generation.k': expected KEY=VALUE"]),
    ("cli-set-bad-list-index", lambda w, s3: ["run", w.config(), "--set",
                                              "reward.scorers.7.weight=2"],
     ["--set 'reward.scorers.7.weight=2': no list index '7'"]),
    ("cli-unknown-stage", lambda w, s3: ["run", w.config(), "--until", "bogus"],
     ["--until: unknown stage bogus", "choose from prompts, generate"]),
    ("cli-unknown-stage-in-list", lambda w, s3: ["run", w.config(), "--stages", "prompts,bogus"],
     ["--until: unknown stage bogus", "choose from prompts, generate"]),
    # ---------------------------------------------------------------------- prompts
    ("prompts-missing-file", lambda w, s3: ["run", w.config(
        **{"prompts.path": str(w.tmp / "missing.jsonl")})],
     ["missing.jsonl: prompt file not found (set prompts.path)"]),
    ("prompts-malformed-json", lambda w, s3: ["run", w.config(**{"prompts.path": w.write_prompts(
        "p.jsonl", GOOD_PROMPTS[:1] + [b'{"prompt_id": "b", \n'])})],
     ["p.jsonl line 2: not valid JSON"]),
    ("prompts-prompt-is-a-number", lambda w, s3: ["run", w.config(**{"prompts.path": w.write_prompts(
        "p.jsonl", GOOD_PROMPTS + [_row(prompt=42)])})],
     ["p.jsonl line 10: field 'prompt' must be a string, got int"]),
    ("prompts-not-utf8", lambda w, s3: ["run", w.config(**{"prompts.path": w.write_prompts(
        "p.jsonl", GOOD_PROMPTS[:3] + [b'{"prompt_id": "z", "lang": "fr", "prompt": "caf\xe9"}\n'])})],
     ["p.jsonl line 4: not valid UTF-8 (byte 0xe9 at column 48)", "save the file as UTF-8"]),
    ("prompts-missing-prompt-id", lambda w, s3: ["run", w.config(**{"prompts.path": w.write_prompts(
        "p.jsonl", [{"lang": "en", "prompt": "Hi?"}] + GOOD_PROMPTS)})],
     ["p.jsonl line 1: missing field 'prompt_id'"]),
    ("prompts-empty-prompt", lambda w, s3: ["run", w.config(**{"prompts.path": w.write_prompts(
        "p.jsonl", GOOD_PROMPTS + [_row(prompt="  ")])})],
     ["p.jsonl line 10: missing or empty field 'prompt'"]),
    ("prompts-bad-language-code", lambda w, s3: ["run", w.config(**{"prompts.path": w.write_prompts(
        "p.jsonl", GOOD_PROMPTS + [_row(lang="eng")])})],
     ["p.jsonl line 10: field 'lang': 'eng' is not an ISO 639-1 language code"]),
    ("prompts-duplicate-id", lambda w, s3: ["run", w.config(**{"prompts.path": w.write_prompts(
        "p.jsonl", GOOD_PROMPTS + [GOOD_PROMPTS[0]])})],
     ["prompt_id 'q0' appears 2 times for lang 'en'"]),
    ("prompts-language-without-prompts", lambda w, s3: ["run", w.config(
        languages=["en", "de", "fr", "it"])],
     ["no prompts in language 'it'", "remove it from `languages` or add prompts.translate"]),
    ("prompts-no-heldout-split", lambda w, s3: ["run", w.config(**{"prompts.path": w.write_prompts(
        "p.jsonl", [r for r in GOOD_PROMPTS if not (r["lang"] == "de" and r["split"] == "heldout")])})],
     ["language 'de' has no prompts with split 'heldout' (evaluation.split)"]),
    ("prompts-unsupported-extension", lambda w, s3: ["run", w.config(
        **{"prompts.path": _write(w.tmp / "prompts.csv", "prompt_id,lang,prompt\n")})],
     ["prompts.csv: unsupported prompt file type; use .jsonl or .parquet"]),
    ("prompts-empty-folder", lambda w, s3: ["run", w.config(**{"prompts.path": _mkdir(w.tmp / "pdir")})],
     ["pdir: no .jsonl or .parquet prompt files found in this folder"]),
    ("prompts-unknown-builtin", lambda w, s3: ["run", w.config(**{"prompts.path": "builtin:demo2"})],
     ["unknown built-in set 'builtin:demo2'"]),
    # ----------------------------------------------------------------------- models
    ("model-missing-policy-path", lambda w, s3: ["run", w.config(
        **{"policy.model": str(w.tmp / "no-model")})],
     ["run.yaml: policy.model: local model path", "no-model does not exist"]),
    ("model-folder-without-config", lambda w, s3: ["run", w.config(
        **{"policy.model": _mkdir(w.tmp / "empty-model")})],
     ["policy.model:", "empty-model is not a model folder (no config.json in it)"]),
    ("model-missing-adapter", lambda w, s3: ["run", w.config(
        **{"policy.adapter": str(w.tmp / "no-adapter")})],
     ["policy.adapter: local adapter path", "no-adapter does not exist"]),
    ("model-adapter-without-adapter-config", lambda w, s3: ["run", w.config(
        **{"policy.adapter": str(w.model)})],
     ["policy.adapter:", "is not a adapter folder (no adapter_config.json in it)"]),
    ("model-missing-scorer", lambda w, s3: ["run", w.config(**{"reward.scorers": [
        {"type": "classifier", "name": "rm", "model": str(w.tmp / "no-rm")}]})],
     ["reward.scorers[rm].model: local model path", "no-rm does not exist"]),
    ("model-missing-judge", lambda w, s3: ["run", w.config(
        **{"evaluation.judge.model": str(w.tmp / "no-judge")})],
     ["evaluation.judge.model: local model path"]),
    ("model-missing-generation-policy", lambda w, s3: ["run", w.config(experiments=[
        {"name": "off", "generation_policy": str(w.tmp / "no-other")}])],
     ["experiments[off].generation_policy: local model path"]),
    ("model-unknown-embedded", lambda w, s3: ["run", w.config(
        **{"policy.model": "embedded:smollm3"})],
     ["policy.model: unknown embedded model 'embedded:smollm3'",
      "embedded:smollm2-135m-instruct"]),
    ("model-hub-id-not-cached-offline", lambda w, s3: ["run", w.config(
        **{"policy.model": "croco-test-org/never-downloaded"})],
     ["policy.model: croco-test-org/never-downloaded is not in the local Hugging Face cache",
      "HF_HUB_OFFLINE=1"]),
    # ---------------------------------------------------------------------- storage
    ("storage-data-root-under-a-file", lambda w, s3: ["run", w.config(
        data_root=str(Path(_write(w.tmp / "a-file", "x")) / "data"))],
     ["data_root", "a-file is a file, not a folder"]),
    ("storage-s3-endpoint-unreachable", lambda w, s3: _s3_case(
        w, f"http://127.0.0.1:{_closed_port()}", "s3://croco/data"),
     ["data_root s3://croco/data at http://127.0.0.1:", "endpoint unreachable"]),
    ("storage-s3-no-such-bucket", lambda w, s3: _s3_case(w, s3, "s3://no-such-bucket/data"),
     ["data_root s3://no-such-bucket/data at http://127.0.0.1:",
      "no such bucket 'no-such-bucket'"]),
]


def _write(path: Path, content) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def _mkdir(path: Path) -> str:
    path.mkdir()
    return str(path)


def _s3_case(w: Workspace, endpoint: str, root: str) -> list[str]:
    _s3_env(w, endpoint)
    return ["run", w.config(data_root=root)]


def run_croco(args: list[str], env: dict, cwd: Path,
              timeout: float = 120) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(croco_command() + args, env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("setup, words", [pytest.param(s, w, id=i) for i, s, w in CASES])
def test_bad_input_fails_fast_with_one_error_line(setup, words, tmp_path, s3_server):
    w = Workspace(tmp_path)
    args = setup(w, s3_server)
    rc, out, err, seconds = run_croco(args, w.env, tmp_path)
    line = last_line(err)
    assert rc == 2, (rc, out, err)
    assert line.startswith("error: "), err
    for word in words:
        assert word in line, (word, line)
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [line]
    assert "Traceback" not in out + err
    assert "bad-input-secret-99" not in out + err
    assert seconds < TIME_LIMIT_S, f"took {seconds:.1f} s: {line}"
    assert not w.data.exists() or list(w.data.iterdir()) == []
    print(f"time-to-fail {seconds:.2f} s")


def test_corpus_is_large_and_unique():
    ids = [i for i, _, _ in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


def test_s3_no_such_bucket_creates_no_bucket(tmp_path, s3_server):
    import boto3

    w = Workspace(tmp_path)
    rc, _, err, _ = run_croco(_s3_case(w, s3_server, "s3://still-missing/data"), w.env,
                              tmp_path)
    assert rc == 2 and "no such bucket 'still-missing'" in err
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id="k", aws_secret_access_key="s")
    assert "still-missing" not in [b["Name"] for b in client.list_buckets()["Buckets"]]


VANISHING_MODEL = """
import shutil, sys
from croco import preflight
from croco.flows.cli import app

checked = preflight.check

def check_then_delete(cfg, **kwargs):
    checked(cfg, **kwargs)
    shutil.rmtree(cfg.policy.model)  # the model disappears after the checks passed

preflight.check = check_then_delete
sys.argv = ["croco", "run", sys.argv[1], "--stages", "generate"]
app()
"""


def test_model_gone_at_run_time_ends_in_one_error_line_without_retries(tmp_path):
    w = Workspace(tmp_path)
    config = w.config(languages=["en"])
    proc = subprocess.run([sys.executable, "-c", VANISHING_MODEL, config], env=w.env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert last_line(proc.stderr) == (f"error: model: local model path {w.model} does not "
                                      "exist; fix the path (a Hugging Face model id has the "
                                      "form org/name)")
    assert "Traceback" not in out
    assert "retrying" not in out and "Retry 1/" not in out
    # One attempt: the generate task failed once, with the user's error, and was not retried.
    failed = [ln for ln in out.splitlines()
              if "Task run 'generate-en'" in ln and "ModelNotFoundError" in ln]
    assert len(failed) == 1, out


def test_a_bug_is_one_line_with_exit_1_and_debug_shows_the_traceback(tmp_path):
    w = Workspace(tmp_path)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "data.parquet").write_bytes(b"not parquet at all")
    rc, out, err, _ = run_croco(["pairs", "show", str(pairs)], w.env, tmp_path)
    assert rc == 1, (out, err)
    assert last_line(err).startswith("error: ArrowInvalid: ")
    assert last_line(err).endswith("(run with --debug for the traceback)")
    assert "Traceback" not in out + err
    rc, out, err, _ = run_croco(["--debug", "pairs", "show", str(pairs)], w.env, tmp_path)
    assert rc == 1 and "Traceback" in out + err
    rc, out, err, _ = run_croco(["pairs", "show", str(pairs)], dict(w.env, CROCO_DEBUG="1"),
                                tmp_path)
    assert rc == 1 and "Traceback" in out + err
