"""The benchmark harness (`benchmarks.ab`) and its entry point (`python -m benchmarks`):
interleaving, ratios, the table, and skipping a benchmark module that is not there.
No model is loaded; every case here takes milliseconds, except the one marked slow, which
runs the paper-scale rehearsal (`benchmarks/rehearsal.py`) end to end at a tiny size."""

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


# ------------------------------------------------------- benchmarks/rehearsal.py

def _environ(method: str, path: str, query: str = "", body: bytes = b"", **headers) -> dict:
    import io

    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
           "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    env.update({f"HTTP_{k.upper()}": v for k, v in headers.items()})
    return env


def test_rehearsal_counts_s3_requests_by_operation_and_folder_at_the_server():
    from benchmarks.rehearsal import RequestLog

    log = RequestLog("croco")
    log.record(_environ("PUT", "/b/croco/samples/k/lang%3Den/s.parquet.tmp-1", body=b"x" * 100))
    log.record(_environ("PUT", "/b/croco/samples/k/lang=en/s.parquet",
                        x_amz_copy_source="/b/croco/samples/k/lang=en/s.parquet.tmp-1"))
    body = b"<Delete><Object><Key>croco/samples/k/lang=en/s.parquet.tmp-1</Key></Object></Delete>"
    env = _environ("POST", "/b", "delete", body)
    log.record(env)
    assert env["wsgi.input"].read() == body  # moto still reads the whole body
    mark = log.mark()
    log.record(_environ("GET", "/b", "list-type=2&prefix=croco%2Fscores%2Fk%2F"))
    log.record(_environ("HEAD", "/b/croco/scores/k/lang=en/_SUCCESS"))
    log.record(_environ("GET", "/b/croco/runs/r/manifest.json"))
    log.record(_environ("HEAD", "/b"))
    log.record(_environ("PUT", "/b/croco/scores/k/lang=en/part-00000.parquet", body=b"y" * 7,
                        x_amz_decoded_content_length="5"))
    first = log.since(0, mark)
    assert first["total"] == 3
    assert first["by_op"] == {"put": 1, "copy": 1, "delete-many": 1}
    assert first["by_folder"] == {"samples": {"requests": 3, "bytes_put": 100, "by_op": {
        "put": 1, "copy": 1, "delete-many": 1}}}
    later = log.since(mark)
    assert later["by_op"] == {"list": 1, "head": 1, "get": 1, "head-bucket": 1, "put": 1}
    assert later["by_folder"]["scores"] == {"requests": 3, "bytes_put": 5, "by_op": {
        "list": 1, "head": 1, "put": 1}}
    assert later["by_folder"]["runs"]["requests"] == 1
    assert later["by_folder"]["(bucket)"]["by_op"] == {"head-bucket": 1}


def test_rehearsal_tells_created_rewritten_and_deleted_files_apart_per_folder():
    from benchmarks.rehearsal import diff, written_markers

    before = {"samples/k/lang=en/a.parquet": (10, 1, 1), "generations/g/lang=en/_SUCCESS": (2, 1, 2),
              "scores/s/lang=en/part-00000.parquet": (5, 1, 3)}
    after = {"samples/k/lang=en/a.parquet": (10, 1, 1),  # untouched
             "samples/k/lang=en/b.parquet": (7, 2, 4),  # new
             "generations/g/lang=en/_SUCCESS": (3, 2, 5),  # written again
             "generations/h/lang=en/_SUCCESS": (4, 2, 6)}  # new; scores/ part deleted
    folders = diff(before, after)
    assert folders["samples"] == {"files_created": 1, "files_rewritten": 0, "files_deleted": 0,
                                  "bytes_written": 7, "files_after": 2, "bytes_after": 17}
    assert folders["generations"]["files_created"] == 1
    assert folders["generations"]["files_rewritten"] == 1
    assert folders["generations"]["bytes_written"] == 7
    assert folders["scores"]["files_deleted"] == 1
    assert written_markers(before, after) == ["generations/g/lang=en/_SUCCESS",
                                              "generations/h/lang=en/_SUCCESS"]


def test_rehearsal_puts_task_runs_and_probe_records_under_their_stage():
    from benchmarks.rehearsal import probe_by_stage, task_stage

    langs = {"en", "de"}
    names = {"prompts-en": "prompts", "generate-de": "generate", "generate-en-3": "generate",
             "plan-generate-en": "generate", "seal-score-de": "score", "score-en-0": "score",
             "pair-in_lang": "pair", "ref-logps": "ref-logps", "ref-logps-de": "ref-logps",
             "train-dpo": "train", "generate-base": "evaluate",
             "score-dpo": "evaluate", "judge-dpo": "evaluate", "heldout-summary-5ec": "evaluate",
             "report-730": "evaluate", "manifest-7b7": "manifest",
             "croco-train-0": "subflow calls"}
    assert {n: task_stage(n, langs) for n in names} == names
    probe = {"generate-en": {"make_generator": [1, 4.0], "generate_frame": [2, 10.0],
                             "run": [1, 15.0]},
             "score-en-1": {"make_scorer": [2, 1.0], "score_frame": [1, 6.0], "run": [1, 7.5]}}
    assert probe_by_stage(probe, langs) == {
        "generate": {"stage_run_seconds": 15.0, "load_seconds": 4.0, "model_seconds": 10.0,
                     "model_calls": 2},
        # make_scorer runs inside score_frame: load 1 s, model work 6 - 1 s
        "score": {"stage_run_seconds": 7.5, "load_seconds": 1.0, "model_seconds": 5.0,
                  "model_calls": 1}}


def test_rehearsal_takes_each_stages_peak_memory_from_the_polls_while_its_tasks_ran():
    from benchmarks.rehearsal import MB, stage_peaks

    timeline = [[t, mb * MB] for t, mb in
                ((0.0, 100), (1.0, 300), (2.0, 250), (3.0, 900), (4.0, 400), (5.0, 200))]
    tasks = {"a": {"name": "generate-en", "start": 0.9, "end": 2.1},
             "b": {"name": "score-en", "start": 3.5, "end": 3.6},  # shorter than a poll
             "c": {"name": "croco-generate-0", "start": 0.0, "end": 5.0},  # a subflow call
             "d": {"name": "pair-in_lang", "start": 4.2, "end": None}}  # never ended
    assert stage_peaks(timeline, tasks, {"en"}) == {"generate": 300, "score": 900}


def test_rehearsal_counts_time_inside_stages_once_where_they_overlap():
    from benchmarks.rehearsal import stage_busy_seconds

    # (end, seconds): [0, 10] and [5, 12] overlap, [20, 25] apart, a marker without seconds
    assert stage_busy_seconds([(10.0, 10.0), (12.0, 7.0), (25.0, 5.0), (30.0, 0)]) == 17.0
    assert stage_busy_seconds([(10.0, 10.0), (9.0, 2.0)]) == 10.0  # inside another
    assert stage_busy_seconds([]) == 0


def test_rehearsal_prompt_file_has_the_counts_asked_for_and_grows_at_the_end(tmp_path):
    from benchmarks.rehearsal import PAPER_LANGUAGES, append_prompts, write_prompts
    from croco.config import PAPER_LANGUAGES as CROCO_PAPER_LANGUAGES
    from croco.prompts import load_prompts

    assert PAPER_LANGUAGES == CROCO_PAPER_LANGUAGES
    path = tmp_path / "prompts.jsonl"
    write_prompts(path, ["en", "ga"], 12, heldout=2)
    table = load_prompts(str(path))
    counts = {(r["lang"], r["split"]): r["len"] for r in
              table.group_by("lang", "split").len().to_dicts()}
    assert counts == {("en", "train"): 12, ("ga", "train"): 12, ("en", "heldout"): 2,
                      ("ga", "heldout"): 2}
    before = table.filter(table["split"] == "train")
    append_prompts(path, ["en", "ga"], 12, 1)
    grown = load_prompts(str(path))
    train = grown.filter(grown["split"] == "train")
    assert train.height == 26
    # croco sorts by id: the new prompt comes after the old ones, which are unchanged
    en = train.filter(train["lang"] == "en")["prompt_id"].to_list()
    assert en[-1] == "p000012" and en[:-1] == sorted(en[:-1])
    assert before.filter(before["lang"] == "en")["prompt"].to_list() == \
        train.filter(train["lang"] == "en")["prompt"].to_list()[:-1]


def _rehearsal_run(run_id: str, scale: float, s3: bool) -> dict:
    folders = {"samples": {"files_created": int(8 * scale), "files_rewritten": 0,
                           "files_deleted": 0, "bytes_written": int(1000 * scale),
                           "files_after": 8, "bytes_after": 1000},
               "generations": {"files_created": 10, "files_rewritten": 0, "files_deleted": 0,
                               "bytes_written": 900, "files_after": 10, "bytes_after": 900}}
    requests = None
    if s3:
        for f in folders.values():
            f["requests"] = 40
        requests = {"total": 80, "by_op": {"put": 30, "head": 50}, "by_folder": {}}
    stage = {"outputs": 2, "rows": 100, "success_seconds": 3.0, "generated_rows": 100,
             "task_runs": 2, "task_seconds": 5.0, "stage_run_seconds": 3.1,
             "load_seconds": 1.0, "model_seconds": 1.5, "model_calls": 2}
    return {"run_id": run_id, "wall_seconds": 20.0 * scale, "flow_wall_seconds": 15.0,
            "stage_busy_seconds": 18.0 * scale, "outside_stages_share": 0.1,
            "peak_rss_tree_mb": 1500, "peak_rss_process_mb": 1100,
            "stages": {"generate": stage}, "folders": folders, "requests": requests,
            "task_runs": 8, "flow_runs": 1, "prefect_db_bytes": 5_800_000,
            "prefect_home_bytes": 5_900_000, "manifest_bytes": 5600,
            "files_written": 18, "bytes_written": 1900, "plan_seconds": 0.6, "plan_rc": 0,
            "plan_requests": {"total": 12} if s3 else None, "report_seconds": 1.6,
            "report_rc": 0, "report_requests": {"total": 30} if s3 else None,
            "report_log": "r.log"}


@pytest.mark.parametrize("s3", [False, True])
def test_rehearsal_report_shows_every_table_and_the_nightly_ratios(s3):
    from benchmarks.rehearsal import report

    result = {"machine": {"cpu_count": 2, "cpu_model": "Test CPU", "memory_gib": 24},
              "libraries": "torch x", "benchmark_seconds": 50.0,
              "sizes": {"languages": 2, "n": 128, "k": 64, "samples": 16384,
                        "max_new_tokens": 4, "shard_size": 64, "groups": 1, "batch_size": 256,
                        "root": "s3" if s3 else "local", "until": "pair", "nightly_new": 7},
              "runs": {"first": _rehearsal_run("first", 1.0, s3),
                       "nightly": _rehearsal_run("nightly", 0.5, s3)}}
    text = report(result)
    json.dumps(result)  # what --json writes
    assert "2 CPUs (Test CPU), 24 GiB" in text
    assert "| `croco run` wall time | 20.0 s | 10.0 s | 0.50 |" in text
    assert ("| outside every stage (orchestration, waits), share of the wall time | 10.0 % "
            "| 10.0 % | 1.00 |") in text
    assert "| samples | 8 / 4 (0.50) | 0 / 0 (-) | 1.0 kB / 500 B (0.50) |" in text
    # the per-stage table: model load and work and the rest of croco.stage.run
    assert "| generate | 2 | 100 | 100 | 3.0 | 3.1 | 1.0 | 1.5 | 0.6 | 2 | 5.0 |" in text
    assert ("Object-store requests by operation" in text) is s3
    assert ("| object-store requests, the run | 80 | 80 | 1.00 |" in text) is s3


@pytest.mark.slow
def test_rehearsal_runs_croco_end_to_end_at_a_tiny_size(tmp_path):
    """The real `croco run` twice (first, nightly) on 2 languages x 4 prompts x k=2."""
    import subprocess

    out = tmp_path / "rehearsal.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/rehearsal.py", "--n", "4", "--languages", "2", "--k", "2",
         "--heldout", "1", "--nightly", "0.25", "--workdir", str(tmp_path / "work"),
         "--json", str(out)],
        check=False, cwd=Path(benchmarks.__file__).parents[1], capture_output=True, text=True,
        timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "### Per folder of the data root" in proc.stdout
    result = json.loads(out.read_text())
    first, nightly = result["runs"]["first"], result["runs"]["nightly"]
    assert first["stages"]["generate"]["rows"] == 2 * 4 * 2
    assert first["stages"]["generate"]["generated_rows"] == 16
    assert nightly["stages"]["generate"]["rows"] == 2 * 5 * 2
    assert nightly["stages"]["generate"]["generated_rows"] == 4  # only the new prompts
    assert first["stages"]["generate"]["model_seconds"] > 0
    for run in (first, nightly):
        assert run["task_runs"] >= 8 and run["flow_runs"] == 1
        assert run["manifest_bytes"] > 0 and run["prefect_db_bytes"] > 0
        assert run["plan_rc"] == 0 and run["report_rc"] == 0
        assert {"prompts", "samples", "generations", "scored", "scores", "pairs",
                "runs"} <= set(run["folders"])
    # per language: a new shard and its prompts file; the store's index (written by the
    # first run's plan) now covers the new shard too
    assert nightly["folders"]["samples"]["files_created"] == 2 * 2
    assert nightly["folders"]["samples"]["files_rewritten"] == 2
    assert result["nightly_over_first"]["bytes_written"] > 0


@pytest.mark.slow
def test_a_nightly_rerun_costs_in_proportion_to_its_new_prompts_and_memory_is_flat_in_n(
        tmp_path):
    """The rehearsal at a CI size through the real `croco run` (first run, then 5% new
    prompts per language), on a local root and at two N on `s3://`: the ratios that must
    hold at any size. The nightly rerun samples only its new prompts, writes for
    generation and scoring little more than the new samples and scores themselves, and
    makes as many object-store requests before pairing whatever the store holds; the peak
    memory does not grow with N."""
    import subprocess

    def rehearse(name: str, n: int, root: str) -> dict:
        out = tmp_path / f"{name}.json"
        proc = subprocess.run(
            [sys.executable, "benchmarks/rehearsal.py", "--n", str(n), "--languages", "2",
             "--k", "8", "--shard-size", "8", "--heldout", "1", "--nightly", "0.05",
             "--root", root, "--workdir", str(tmp_path / name), "--json", str(out)],
            check=False, cwd=Path(benchmarks.__file__).parents[1], capture_output=True,
            text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())

    local, small, large = (rehearse("local", 40, "local"), rehearse("small", 40, "s3"),
                           rehearse("large", 80, "s3"))
    for result in (local, small, large):
        c = result["nightly_checks"]
        first, nightly = result["runs"]["first"], result["runs"]["nightly"]
        # model work: the new prompts' samples only (2 of 40, 4 of 80 prompts a language)
        assert c["model_work"] == pytest.approx(0.05, abs=0.001), c
        # generation and scoring write the new shards and a few small files per language
        assert c["sample_stages_over_new_data"] <= 3, c
        # the views reference the stored shards: their bytes are a small part of the new data
        views = sum(nightly["folders"][f]["bytes_written"] for f in ("generations", "scores"))
        assert views <= 0.5 * c["new_store_data_bytes"], (views, c)
        assert first["stages"]["generate"]["rows"] > nightly["stages"]["generate"][
            "generated_rows"] > 0
    # object-store requests follow the shards a run adds, not the store's size: with twice
    # the prompts stored, the first run makes more requests, the nightly rerun (one new
    # shard a language either way) about as many
    first_a, nightly_a = small["nightly_checks"]["upstream_requests"]
    first_b, nightly_b = large["nightly_checks"]["upstream_requests"]
    assert first_b > 1.2 * first_a, (first_a, first_b)
    assert nightly_b <= 1.15 * nightly_a, (nightly_a, nightly_b)
    # memory: twice the prompts, about the same peak (within 20%)
    a, b = (r["runs"]["first"]["peak_rss_tree_mb"] for r in (small, large))
    assert b <= 1.2 * a, (a, b)
    # and stage by stage (the tree's peak while the stage's task runs ran), the report too
    for stage in ("prompts", "generate", "score", "pair"):
        a, b = (r["runs"]["first"]["stages"][stage]["peak_rss_mb"] for r in (small, large))
        assert 0 < b <= 1.2 * a, (stage, a, b)
    a, b = (r["runs"]["first"]["report_peak_rss_mb"] for r in (small, large))
    assert 0 < b <= 1.2 * a, ("report", a, b)


@pytest.mark.slow
def test_training_scale_measures_both_stages_at_two_sizes_in_fresh_processes(tmp_path):
    """`benchmarks/training_scale.py` at a tiny size: the reference log-probs stage and a
    DPO run on its stored log-probs (checked inside), at two N, peak RSS and wall time of
    each in a fresh process."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "benchmarks/training_scale.py", "--sizes", "2,4", "--reps", "1",
         "--steps", "1", "--tmp", str(tmp_path)],
        check=False, cwd=Path(benchmarks.__file__).parents[1], capture_output=True, text=True,
        timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "N = 2: 22 pairs" in proc.stdout and "N = 4: 44 pairs" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")
            and "N = 2 | N = 4" in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| reference log-probs stage wall", "| reference log-probs stage peak RSS",
        "| DPO, 1 steps wall", "| DPO, 1 steps peak RSS"]
    for row in rows:  # a positive figure on both sides
        a, b = (float(cell.split(" / ")[0]) for cell in row.split(" | ")[3:5])
        assert a > 0 and b > 0, row
    assert list(tmp_path.iterdir()) == []  # the synthesized sets are gone
