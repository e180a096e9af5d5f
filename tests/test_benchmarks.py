"""The benchmark harness (`benchmarks.ab`) and its entry point (`python -m benchmarks`):
interleaving, ratios, the table, and skipping a benchmark module that is not there.
No model is loaded; every case here takes milliseconds."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest

import benchmarks
from benchmarks import __main__ as entry
from benchmarks import ab


def quiet(_line: str) -> None:
    pass


def test_a_croco_side_that_sleeps_less_gets_a_ratio_above_one():
    case = ab.Case("sleep", baseline=lambda: time.sleep(0.03), croco=lambda: time.sleep(0.005))
    res = ab.run_case(case, reps=3, log=quiet)
    assert len(res.baseline) == len(res.croco) == 3
    assert min(res.baseline) >= 0.03
    assert res.ratio_min > 1
    assert res.ratio_median > 1


def test_the_ratio_is_baseline_over_croco_for_times_and_croco_over_baseline_when_higher_is_better():
    # The callables return their own measurement: 10 for the baseline, 20 for croco.
    as_time = ab.run_case(ab.Case("t", baseline=lambda: 10.0, croco=lambda: 20.0), reps=3,
                          log=quiet)
    as_rate = ab.run_case(ab.Case("r", baseline=lambda: 10.0, croco=lambda: 20.0,
                                  higher_is_better=True), reps=3, log=quiet)
    assert as_time.ratio_min == as_time.ratio_median == 0.5
    assert as_rate.ratio_min == as_rate.ratio_median == 2.0


def test_best_is_the_minimum_for_times_and_the_maximum_for_rates():
    values = iter([4.0, 1.0, 2.0, 2.0, 3.0, 4.0])  # baseline 4, 2, 3; croco 1, 2, 4
    rate = ab.run_case(ab.Case("r", baseline=lambda: next(values), croco=lambda: next(values),
                               higher_is_better=True), reps=3, log=quiet)
    assert rate.row()["baseline_best"] == 4.0
    assert rate.row()["croco_best"] == 4.0
    assert rate.ratio_min == 1.0  # best 4 against best 4
    assert rate.ratio_median == 2.0 / 3.0  # median 2 against median 3


def test_the_sides_run_in_pairs_the_order_swapped_every_other_rep_after_one_setup():
    calls = []
    case = ab.Case("order", baseline=lambda: calls.append("A"), croco=lambda: calls.append("B"),
                   setup=lambda: calls.append("setup"))
    ab.run_case(case, reps=4, log=quiet)
    assert calls == ["setup", "A", "B", "B", "A", "A", "B", "B", "A"]


def test_a_case_whose_croco_side_needs_its_baseline_first_keeps_the_order():
    calls = []
    case = ab.Case("rerun", baseline=lambda: calls.append("A"), croco=lambda: calls.append("B"),
                   alternate=False)
    ab.run_case(case, reps=3, log=quiet)
    assert calls == ["A", "B"] * 3


def test_per_rep_ratios_pair_the_two_runs_of_each_rep_whatever_ran_first():
    # Rep 1: baseline 10 then croco 5; rep 2 (swapped): croco 30 then baseline 90 (a busy
    # minute slows both); rep 3: baseline 8 then croco 4.
    values = iter([10.0, 5.0, 30.0, 90.0, 8.0, 4.0])
    res = ab.run_case(ab.Case("busy", baseline=lambda: next(values),
                              croco=lambda: next(values)), reps=3, log=quiet)
    assert res.baseline == [10.0, 90.0, 8.0]
    assert res.croco == [5.0, 30.0, 4.0]
    assert res.ratios == [2.0, 3.0, 2.0]
    assert res.ratio_paired == 2.0
    assert res.ratio_median == 2.0  # median 10 against median 5
    assert res.ratio_min == 2.0  # best 8 against best 4
    row = res.row()
    assert (row["ratio_paired_low"], row["ratio_paired_high"]) == (2.0, 3.0)
    assert "| 2.00x (2.00-3.00) | 3 |" in ab.table([res])


def test_each_rep_is_logged():
    lines = []
    ab.run_case(ab.Case("logged", baseline=lambda: 2.0, croco=lambda: 1.0), reps=3,
                log=lines.append)
    assert lines == [f"  logged rep {i}/3: baseline 2 s, croco 1 s" for i in (1, 2, 3)]


def test_the_table_has_a_header_and_one_row_per_case():
    results = [ab.run_case(ab.Case(name, baseline=lambda: 3.0, croco=lambda: 1.5), reps=3,
                           log=quiet) for name in ("first figure", "second figure")]
    lines = ab.table(results).splitlines()
    assert len(lines) == 2 + 2
    assert lines[2].startswith("| first figure | baseline | croco |")
    assert "**2.00x** / 2.00x | 2.00x (2.00-2.00) |" in lines[2]
    assert lines[3].startswith("| second figure |")


def test_a_note_is_taken_after_the_last_rep_and_survives_release():
    runs = []
    case = ab.Case("noted", baseline=lambda: runs.append(1), croco=lambda: 1.0,
                   note=lambda: f"{len(runs)} baseline runs")
    res = ab.run_case(case, reps=3, log=quiet)
    res.release()
    assert ab.notes([res]) == ["noted: 3 baseline runs"]
    with pytest.raises(RuntimeError, match="released"):
        res.case.croco()


def fake_module(calls: list) -> types.ModuleType:
    mod = types.ModuleType("benchmarks.fake_bench")

    def cases(quick: bool = False):
        calls.append(quick)
        return [ab.Case("fake figure", baseline=lambda: 4.0, croco=lambda: 2.0)]

    mod.cases = cases
    return mod


def test_the_entry_point_skips_a_missing_module_and_runs_the_others(monkeypatch, capsys,
                                                                     tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "benchmarks.fake_bench", fake_module(calls))
    monkeypatch.setattr(benchmarks, "MODULES", ["no_such_bench", "fake_bench"])
    out_md = tmp_path / "table.md"
    rc = entry.main(["--quick", "--reps", "3", "--markdown", str(out_md)])
    out = capsys.readouterr().out
    assert rc == 0
    assert calls == [True]  # --quick reaches the module
    assert "no_such_bench: not available" in out
    assert ("| fake figure | baseline | croco | 4 / 4 s | 2 / 2 s | **2.00x** / 2.00x "
            "| 2.00x (2.00-2.00) | 3 |") in out
    assert "machine: " in out
    written = out_md.read_text()
    assert "python -m benchmarks --quick --reps 3 --markdown" in written
    assert "| fake figure |" in written
    assert "- not available: no_such_bench" in written


def row(figure: str, best: float, paired: float) -> dict:
    return {"figure": figure, "ratio_best": best, "ratio_paired": paired}


def test_compare_holds_each_figure_to_25_percent_in_both_ratios():
    earlier = [row("steady", 2.0, 2.0), row("best moved", 2.0, 2.0), row("paired moved", 4.0, 4.0)]
    now = [row("steady", 2.4, 1.6), row("best moved", 2.6, 2.0), row("paired moved", 4.0, 2.9),
           row("new figure", 1.0, 1.0)]
    text, steady = ab.compare(now, earlier)
    assert not steady
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert lines["steady"].endswith("| yes (moved 20%) |")
    assert lines["best moved"].endswith("| NO (moved 30%) |")
    assert lines["paired moved"].endswith("| NO (moved 28%) |")
    assert "not in the earlier run" in lines["new figure"]
    assert ab.compare(now[:1], earlier)[1]


def test_json_of_one_run_is_compared_by_the_next(monkeypatch, capsys, tmp_path):
    ratio = {"croco": 2.0}
    mod = types.ModuleType("benchmarks.fake_bench")
    mod.cases = lambda quick=False: [ab.Case("fake figure", baseline=lambda: 4.0,
                                             croco=lambda: ratio["croco"])]
    monkeypatch.setitem(sys.modules, "benchmarks.fake_bench", mod)
    first = tmp_path / "first.json"
    assert entry.main(["--only", "fake_bench", "--json", str(first)]) == 0
    kept = json.loads(first.read_text())
    assert kept["rows"][0]["figure"] == "fake figure"
    assert kept["rows"][0]["ratio_paired"] == 2.0
    assert kept["machine"]
    capsys.readouterr()
    ratio["croco"] = 3.0  # croco slower: 4 / 3 = 1.33x against 2x, moved 33 %
    md = tmp_path / "second.md"
    assert entry.main(["--only", "fake_bench", "--compare", str(first), "--markdown",
                       str(md)]) == 0
    out = capsys.readouterr().out
    assert "| fake figure | 2.00x -> 1.33x | 2.00x -> 1.33x | NO (moved 33%) |" in out
    assert "some figures moved more than 25 %" in out
    assert "NO (moved 33%)" in md.read_text()


def test_compare_with_a_file_that_is_not_a_run_fails_before_any_benchmark(monkeypatch, capsys,
                                                                         tmp_path):
    ran = []
    mod = types.ModuleType("benchmarks.fake_bench")
    mod.cases = lambda quick=False: ran.append(1) or []
    monkeypatch.setitem(sys.modules, "benchmarks.fake_bench", mod)
    bad = tmp_path / "table.md"
    bad.write_text("| not json |")
    with pytest.raises(SystemExit) as e:
        entry.main(["--only", "fake_bench", "--compare", str(bad)])
    assert e.value.code == 2
    assert f"--compare {bad}: not the --json file of a run" in capsys.readouterr().err
    assert ran == []


def test_only_with_an_unknown_name_reports_it_and_does_not_crash(capsys):
    rc = entry.main(["--only", "no_such_bench", "--reps", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "no_such_bench: not available" in out
    assert "(no results)" in out


def test_a_failing_case_is_reported_and_sets_the_exit_status(monkeypatch, capsys):
    mod = types.ModuleType("benchmarks.broken_bench")

    def boom():
        raise AssertionError("scores differ")

    mod.cases = lambda quick=False: [ab.Case("broken", baseline=lambda: 1.0, croco=boom)]
    monkeypatch.setitem(sys.modules, "benchmarks.broken_bench", mod)
    rc = entry.main(["--only", "broken_bench", "--reps", "3"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "- FAILED broken: AssertionError: scores differ" in out


def test_stage_work_counts_each_output_once_and_a_multi_language_pass_once(tmp_path):
    from benchmarks.pipeline_runs import manifest_of, share, stage_work_seconds

    def out(key, lang, seconds):
        return {"key": key, "uri": f"/d/{key}/lang={lang}", "rows": 1, "seconds": seconds}

    pairs = {"key": "p", "uri": "/d/pairs/p", "rows": 3, "seconds": 0.5}
    manifest = {"outputs": {
        "generations": {"en": out("g", "en", 2.0), "de": out("g", "de", 3.0)},
        "pairs": pairs,
        "variants": {"dpo": {"rounds": [{"pairs": pairs, "training": out("t", "x", 10.0)}]}},
        "evaluation": {"scores": {"base": {"en": out("s", "en", 4.0),
                                           "de": out("s", "de", 4.0)}},
                       "heldout": {"key": "h", "uri": "/d/h", "seconds": None}},
    }}
    # generations 2 + 3, pairs once 0.5, training 10, held-out scores' one pass 4
    assert stage_work_seconds(manifest) == 19.5
    # Under a data root: outputs the manifest does not list count too (held-out answers,
    # one pass for two languages), the listed ones once.
    root = tmp_path / "data"
    for lang in ("en", "de"):
        (root / "generations" / "hg" / f"lang={lang}").mkdir(parents=True)
        (root / "generations" / "hg" / f"lang={lang}" / "_SUCCESS").write_text(
            '{"rows": 2, "seconds": 6.0}')
    (root / "pairs" / "p" / "ref_logps" / "r").mkdir(parents=True)
    (root / "pairs" / "p" / "ref_logps" / "r" / "_SUCCESS").write_text('{"rows": 2}')
    listed = root / "g" / "lang=en"
    listed.mkdir(parents=True)
    (listed / "_SUCCESS").write_text('{"seconds": 2.0}')
    manifest["outputs"]["generations"]["en"]["uri"] = str(listed)
    assert stage_work_seconds(manifest, root) == 25.5
    assert share(20.0, 19.5) == 0.025
    log = "croco run ...\nmanifest:  /nowhere/manifest.json\nreport: x\n"
    with pytest.raises(FileNotFoundError):
        manifest_of(log)
    with pytest.raises(AssertionError):
        manifest_of("no manifest line")


def test_the_vllm_benchmark_is_listed_and_named_not_available_without_a_gpu(monkeypatch):
    import torch

    assert "vllm_backends" in benchmarks.MODULES
    monkeypatch.delitem(sys.modules, "benchmarks.vllm_backends", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mod, why = entry.load("vllm_backends")
    assert mod is None
    assert why == "needs a CUDA GPU (torch.cuda.is_available() is False)"


def test_the_vllm_cpu_benchmark_is_listed_and_names_the_setup_script_without_vllm(monkeypatch):
    import torch

    assert "vllm_cpu" in benchmarks.MODULES
    monkeypatch.delitem(sys.modules, "benchmarks.vllm_cpu", raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mod, why = entry.load("vllm_cpu")
    assert mod is None
    assert why == ("needs vLLM's CPU build: bash infra/setup-vllm.sh, then run with "
                   ".venv-vllm/bin/python")


def test_threads_caps_torch_and_polars_here_and_in_subprocesses():
    import subprocess

    code = ("import os, sys; from benchmarks import __main__ as m; m.set_threads(1); "
            "import polars, torch; print(polars.thread_pool_size(), torch.get_num_threads(), "
            "os.environ['POLARS_MAX_THREADS'], os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=Path(benchmarks.__file__).parents[1]).stdout
    assert out.split() == ["1", "1", "1", "1"]


def test_threads_refuses_once_polars_has_sized_its_pool():
    import polars  # noqa: F401  (already imported by the suite; sized at import)

    with pytest.raises(RuntimeError, match="polars was imported before --threads"):
        entry.set_threads(1)


def test_min_seconds_repeats_a_timed_side_and_takes_the_mean_but_not_a_measured_one():
    calls = {"timed": 0, "measured": 0}

    def timed():
        calls["timed"] += 1
        time.sleep(0.01)

    def measured():
        calls["measured"] += 1
        return 5.0

    res = ab.run_case(ab.Case("short", baseline=timed, croco=measured, min_seconds=0.1),
                      reps=3, log=quiet)
    assert calls["measured"] == 3  # a side that measures itself runs once per rep
    assert calls["timed"] >= 3 * 9  # >= 0.1 s of 10-ms calls per rep
    assert all(0.01 <= b < 0.05 for b in res.baseline)  # seconds per call, not per rep
    assert res.croco == [5.0, 5.0, 5.0]
