"""Two identical `croco run` processes at once on one local data root and one Prefect home
(each with its own ephemeral Prefect server on the shared SQLite database), as two users of
one machine would start them."""

from __future__ import annotations

import pytest

from tests.reliability.conftest import (
    TO_TRAIN,
    TRAIN_ON,
    assert_same_outputs,
    croco_env,
    files_under,
    read_manifest,
    start_croco,
)

pytestmark = pytest.mark.slow


def test_two_identical_runs_at_once_agree_with_one_run(tmp_path, tiny_yaml, reference_run):
    """Both runs exit 0, and the data root holds one run's outputs: the same stage keys as a
    run made alone, scores and pairs equal to its row for row, no duplicate
    (prompt_id, lang, sample_idx) rows, the same adapter weights, no temporary file left."""
    data = tmp_path / "data"
    config = tiny_yaml(data_root=str(data), **TRAIN_ON)
    env = croco_env(tmp_path / "prefect-home")
    runs = [start_croco(["run", str(config), "--run-id", f"user{i}", *TO_TRAIN], env,
                        tmp_path / "logs", name=f"user{i}") for i in (1, 2)]
    done = [r.wait(timeout=400) for r in runs]
    for d in done:
        assert d.rc == 0 and not d.timed_out, d.output[-4000:]

    for run_id in ("user1", "user2"):
        manifest = read_manifest(str(data), run_id)
        assert manifest["outputs"]["scores"]["de"]["rows"] == 3 * 4  # 3 prompts x k 4
        assert_same_outputs(manifest, reference_run)
    # Exactly one output per stage key: both runs wrote the same folders.
    assert len(list((data / "scores").iterdir())) == 1
    assert len(list((data / "training").iterdir())) == 1
    assert [p for p in files_under(data) if ".tmp-" in p] == []
    print(f"two runs at once: {done[0].seconds:.1f} s and {done[1].seconds:.1f} s")
