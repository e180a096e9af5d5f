"""Structured (multiple-choice) evaluation through lm-evaluation-harness.

`simple_evaluate` with the `hf` model (base weights plus an optional PEFT adapter) or
`vllm`, on any lm-eval task names (e.g. `belebele_deu_Latn`, `global_mmlu_de`,
`xnli_de`, `include_base_44_german`) or on local JSONL files turned into task YAMLs.
`builtin:demo_mc` is the 20-item x 7-language set shipped with croco. EuroEval, the
paper's harness, is the optional `euroeval` backend (pip install euroeval): its scores
are mapped onto the same table, one row per EuroEval dataset.

Needs the eval extra: pip install 'croco[eval]'.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import polars as pl

log = logging.getLogger(__name__)

DEMO_MC = Path(__file__).resolve().parent.parent / "data" / "demo_mc.jsonl"
INSTALL_HINT = "structured evaluation needs lm-evaluation-harness: pip install 'croco[eval]'"

TASK_TEMPLATE = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return lm_eval


def write_local_tasks(jsonl: str | Path, langs: list[str], folder: Path) -> dict[str, str]:
    """One lm-eval task per language over a multiple-choice JSONL (`lang`, `question`,
    `choices`, `answer` = 0-based index). Returns lang -> task name."""
    df = pl.read_ndjson(jsonl)
    missing = {"lang", "question", "choices", "answer"} - set(df.columns)
    if missing:
        raise ValueError(f"{jsonl}: missing column(s) {sorted(missing)}")
    tasks = {}
    for lang in langs:
        rows = df.filter(pl.col("lang") == lang)
        if rows.is_empty():
            raise ValueError(f"{jsonl}: no items in language {lang!r}")
        data = folder / f"mc_{lang}.jsonl"
        with data.open("w", encoding="utf-8") as f:
            for r in rows.iter_rows(named=True):
                f.write(json.dumps({"question": r["question"], "choices": r["choices"],
                                    "answer": int(r["answer"])}, ensure_ascii=False) + "\n")
        name = f"croco_mc_{lang}"
        (folder / f"{name}.yaml").write_text(TASK_TEMPLATE.format(task=name, data=data))
        tasks[lang] = name
    return tasks


def evaluate_structured(model_path: str, *, adapter: str | None, tasks: dict[str, list[str]],
                        local_mc: str | None = None, langs: list[str] | None = None,
                        backend: str = "hf", batch_size: int = 8, limit: int | None = None,
                        device: str = "cpu", dtype: str = "float32",
                        loaded: tuple | None = None) -> pl.DataFrame:
    """Accuracy per language and task: columns lang, task, metric, value, n.

    `loaded`: the (model, tokenizer) already in memory (adapter merged) for the `hf`
    backend; lm-eval then scores that instance instead of loading `model_path` again."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        by_task: dict[str, str] = {}
        for lang, names in tasks.items():
            for n in names:
                by_task[n] = lang
        if local_mc:
            path = DEMO_MC if local_mc == "builtin:demo_mc" else Path(local_mc)
            for lang, name in write_local_tasks(path, langs or [], folder).items():
                by_task[name] = lang
        if not by_task:
            return pl.DataFrame(schema={"lang": pl.String, "task": pl.String,
                                        "metric": pl.String, "value": pl.Float64,
                                        "n": pl.Int64})
        if loaded is not None and backend == "hf":
            from lm_eval.models.huggingface import HFLM

            model, args = HFLM(pretrained=loaded[0], tokenizer=loaded[1],
                               batch_size=batch_size), None
        elif backend == "vllm":
            from lm_eval.api.registry import get_model

            from croco.generation.vllm import lm_eval_model_args

            # built here, not by name, so its engine is shut down when scoring ends
            # (`finally` below) rather than whenever it is collected, or at exit
            model, args = get_model("vllm").create_from_arg_string(
                lm_eval_model_args(model_path, adapter=adapter, dtype=dtype),
                {"batch_size": batch_size}), None
        else:
            model, args = backend, f"pretrained={model_path},dtype={dtype}"
            if adapter:
                args += f",peft={adapter}"
            if backend == "hf":
                args += f",device={device}"
        try:
            results = lm_eval.simple_evaluate(
                model=model, model_args=args, tasks=list(by_task), batch_size=batch_size,
                limit=limit,
                # lm-eval's own task index (thousands of YAML files) only when its tasks
                # are named
                task_manager=TaskManager(include_path=str(folder),
                                         include_defaults=any(tasks.values())),
                log_samples=False,
            )
        finally:
            if backend == "vllm":
                from croco.generation.vllm import shutdown

                shutdown(model.model)
    rows = []
    for name, res in results["results"].items():
        if name not in by_task:
            continue
        metric = "acc,none" if "acc,none" in res else next(
            k for k in res if k.endswith(",none") and "stderr" not in k)
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        rows.append({"lang": by_task[name], "task": name, "metric": metric.split(",")[0],
                     "value": float(res[metric]), "n": n})
    return pl.DataFrame(rows, schema={"lang": pl.String, "task": pl.String, "metric": pl.String,
                                      "value": pl.Float64, "n": pl.Int64}).sort("lang", "task")


# ---------------------------------------------------------------------------- EuroEval
#
# Written against EuroEval 18.3.0 (the newest release, Python >= 3.12) and checked
# against 16.11.0 (the newest for Python 3.11): `euroeval/benchmarker.py`
# (`Benchmarker.__init__`, `.benchmark`), `euroeval/data_models.py` (`BenchmarkResult`),
# `euroeval/scores.py` (`log_scores`), `euroeval/benchmark_config_factory.py`
# (`prepare_device`, `prepare_dataset_configs`), `euroeval/result_cache.py`.

EUROEVAL_HINT = (
    "the euroeval backend needs EuroEval: pip install euroeval (a generative policy "
    "also needs EuroEval's vLLM extra and a CUDA GPU: pip install 'euroeval[generative]')"
)
#: EuroEval entries that are no score of the model on a dataset: the contamination
#: canary that EuroEval >= 18 adds to runs without a dataset filter, and throughput.
EUROEVAL_NON_SCORES = frozenset({"contamination-detection", "speed"})
STRUCTURED_SCHEMA = {"lang": pl.String, "task": pl.String, "metric": pl.String,
                     "value": pl.Float64, "n": pl.Int64}


def require_euroeval():
    try:
        import euroeval
    except ImportError:
        raise ImportError(EUROEVAL_HINT) from None
    return euroeval


def euroeval_rows(results, langs: list[str]) -> pl.DataFrame:
    """EuroEval's benchmark results as the structured results table (lang, task, metric,
    value, n): one row per dataset.

    task is the EuroEval dataset name; metric is the dataset's primary metric, the first
    metric of its task, whose total EuroEval stores first as `test_<metric>` (then
    `test_<metric>_se`, the 95% interval radius); value is that total, the mean over the
    bootstrap iterations on EuroEval's scale (most metrics in percent, MCC from -100 to
    100); n is the number of iterations. EuroEval scores a dataset as a whole, not per
    language, so lang is the one run language among the dataset's languages, or else the
    dataset's language codes joined by commas. The contamination canary and the speed
    benchmark carry no such score and are left out.
    """
    rows = []
    for result in results:
        task = result.task
        dataset = result.dataset
        if task in EUROEVAL_NON_SCORES:
            continue
        scores = result.results
        total, raw = scores.get("total", {}), scores.get("raw")  # raw: one dict per iteration
        metrics = [k for k in total if k.startswith("test_") and not k.endswith("_se")]
        if not metrics:
            raise ValueError(f"EuroEval result for dataset {dataset!r} has no test score "
                             f"in its totals ({sorted(total)})")
        codes = list(result.languages)
        matched = [lang for lang in langs if lang in codes]
        rows.append({"lang": matched[0] if len(matched) == 1 else ",".join(codes),
                     "task": dataset, "metric": metrics[0].removeprefix("test_"),
                     "value": float(total[metrics[0]]),
                     "n": len(raw) if isinstance(raw, list) and raw else None})
    df = pl.DataFrame(rows, schema=STRUCTURED_SCHEMA)
    dupes = df.filter(pl.struct("lang", "task").is_duplicated())
    if dupes.height:
        raise ValueError("EuroEval returned several results for dataset(s) "
                         f"{sorted(set(dupes['task']))} (several shot modes?); croco keeps "
                         "one score per dataset and language")
    return df.sort("lang", "task")


def evaluate_euroeval(model_path: str, *, adapter: str | None, langs: list[str],
                      datasets: list[str] | None = None, tasks: list[str] | None = None,
                      few_shot: bool = True, iterations: int | None = None,
                      test_split: bool = False, device: str = "cpu",
                      dtype: str = "float32") -> pl.DataFrame:
    """EuroEval (the paper's harness) on one model: columns lang, task, metric, value, n
    (see `euroeval_rows`).

    EuroEval loads a model folder (or hub id), so a policy with a PEFT adapter is first
    merged into full weights in a temporary folder under the croco cache. The run
    evaluates the official EuroEval datasets in `langs` (narrowed to `datasets` or
    `tasks`, EuroEval's names), `iterations` bootstrap iterations each (None: EuroEval's
    10), few-shot or zero-shot, on the validation split unless `test_split`. It always
    evaluates afresh (`force`) and writes no results file of its own: croco caches the
    table. Errors raise instead of skipping a dataset. Follows EuroEval's API as of
    release 18.3.0; 16.11.0 (the newest for Python 3.11) takes the same arguments.
    """
    euroeval = require_euroeval()
    from euroeval.enums import Device
    from euroeval.languages import get_all_languages

    from croco.models import cache_dir, merge_adapter

    if datasets and tasks:
        raise ValueError("set euroeval_datasets or euroeval_tasks, not both: EuroEval "
                         "selects by dataset or by task")
    known = get_all_languages()
    supported = [lang for lang in langs if lang in known]
    if not supported:
        raise ValueError(f"EuroEval has no language among {langs}; its languages: "
                         f"{sorted(known)}")
    if len(supported) < len(langs):
        log.warning("EuroEval has no language %s; evaluating %s",
                    sorted(set(langs) - set(supported)), supported)
    kwargs = {"language": supported, "device": Device(device.split(":", 1)[0]),
              "few_shot": few_shot, "evaluate_test_split": test_split,
              "save_results": False, "force": True, "raise_errors": True,
              "cache_dir": str(cache_dir() / "euroeval")}
    if datasets:
        kwargs["dataset"] = list(datasets)
    if tasks:
        kwargs["task"] = list(tasks)
    if iterations is not None:
        kwargs["num_iterations"] = iterations
    try:
        bench = euroeval.Benchmarker(**kwargs)
    except SystemExit:  # EuroEval exits on a dataset or task name it does not know
        raise ValueError(
            f"EuroEval knows no dataset in {datasets} or task in {tasks} (its log above "
            "names the closest match); use the names listed on https://euroeval.com"
        ) from None
    folder = Path(kwargs["cache_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    log.info("EuroEval %s on %s%s", getattr(euroeval, "__version__", "?"), model_path,
             f" + adapter {adapter}" if adapter else "")
    with tempfile.TemporaryDirectory(prefix="run-", dir=folder) as tmp:
        bench.results_path = Path(tmp) / "euroeval_benchmark_results.jsonl"  # not the cwd's
        model = (merge_adapter(model_path, adapter, Path(tmp) / "model", device=device,
                               dtype=dtype) if adapter else model_path)
        results = bench.benchmark(model=model)
    df = euroeval_rows(results, supported)
    if df.is_empty():
        raise ValueError(f"EuroEval returned no scores for {model_path} in {supported}"
                         + (f" on {datasets or tasks}" if datasets or tasks else ""))
    return df
