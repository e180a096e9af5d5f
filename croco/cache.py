"""Where croco keeps what it derives from models on this machine: embedded models converted
to safetensors, adapters merged into weights, local copies of adapters, training work
folders. `$CROCO_CACHE`, default `~/.cache/croco`. Everything in it can be made again."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("CROCO_CACHE", Path.home() / ".cache" / "croco"))
