"""The wheel installs `croco` only: `flows/` and `tasks/` (folders of the repository)
ship as `croco.flows` and `croco.tasks`, and the `croco` command points into them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_one_top_level_package(tmp_path):
    # Built from a copy, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "croco-data",
        ".pytest_cache"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("croco-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"croco"}, sorted(top)
    for module in ("croco/flows/pipeline.py", "croco/flows/cli.py", "croco/tasks/stages.py",
                   "croco/plan.py", "croco/data/demo_prompts.jsonl",
                   "croco/workers/slurm.py"):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "croco = croco.flows.cli:app" in text, text
    assert "[prefect.collections]\ncroco_workers = croco.workers" in text, text


def test_the_repository_folders_are_the_packages():
    """`croco/flows` and `croco/tasks` are the repository's `flows/` and `tasks/`."""
    import croco.flows.pipeline
    import croco.tasks.stages

    assert Path(croco.flows.pipeline.__file__).resolve() == ROOT / "flows" / "pipeline.py"
    assert Path(croco.tasks.stages.__file__).resolve() == ROOT / "tasks" / "stages.py"
