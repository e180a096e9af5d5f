"""The run manifest: `runs/<run_id>/manifest.json`, the lineage from a number back to the
prompts: the resolved config, each stage's key and URI, row counts and timings (from the
stages' `_SUCCESS` markers), package versions.

Credentials never enter it: croco takes them from the environment, never from the config,
and the manifest is passed through `storage.redact` before it is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from datetime import datetime, timezone

from croco import storage
from croco.stages import completion_info, key_of

PACKAGES = ["croco", "prefect", "torch", "transformers", "trl", "peft", "polars", "pyarrow",
            "s3fs", "vllm", "py3langid"]


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def stage_entry(uri: str) -> dict:
    """Key, URI and what the stage's `_SUCCESS` marker recorded (rows, seconds, and for
    training: method, off_policy, generation_policy)."""
    info = completion_info(uri)
    return {"key": key_of(uri), "uri": uri, **info, "rows": info.get("rows"),
            "seconds": info.get("seconds")}


def write_manifest(data_root: str, run_id: str, config: dict, stages: dict[str, dict[str, str]],
                   *, wall_seconds: float | None = None, extra: dict | None = None) -> str:
    """Write the manifest; `stages` maps stage -> {lang or 'all': uri}. Returns its URI."""
    manifest = {
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(),
        "config": config,
        "stages": {stage: {part: stage_entry(uri) for part, uri in sorted(parts.items())}
                   for stage, parts in stages.items()},
        "packages": package_versions(),
        "python": platform.python_version(),
        "wall_seconds": wall_seconds,
        **(extra or {}),
    }
    uri = storage.join(data_root, "runs", run_id, "manifest.json")
    text = storage.redact(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    storage.write_bytes(uri, text.encode())
    return uri
