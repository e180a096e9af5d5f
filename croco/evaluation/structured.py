"""Structured (multiple-choice) evaluation through lm-evaluation-harness.

`simple_evaluate` with the `hf` model (base weights plus an optional PEFT adapter) or
`vllm`, on any lm-eval task names (e.g. `belebele_deu_Latn`, `global_mmlu_de`,
`xnli_de`, `include_base_44_german`) or on local JSONL files turned into task YAMLs.
`builtin:demo_mc` is the 20-item x 7-language set shipped with croco. EuroEval, the
paper's harness, is the optional `euroeval` backend.

Needs the eval extra: pip install 'croco[eval]'.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import polars as pl

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
                        device: str = "cpu", dtype: str = "float32") -> pl.DataFrame:
    """Accuracy per language and task: columns lang, task, metric, value, n."""
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
        args = f"pretrained={model_path},dtype={dtype}"
        if adapter:
            args += f",peft={adapter}"
        if backend == "hf":
            args += f",device={device}"
        results = lm_eval.simple_evaluate(
            model=backend, model_args=args, tasks=list(by_task), batch_size=batch_size,
            limit=limit, task_manager=TaskManager(include_path=str(folder)),
            log_samples=False,
        )
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


def evaluate_euroeval(model_path: str, *, langs: list[str], device: str = "cpu"):
    """EuroEval (the paper's harness), when installed: pip install euroeval."""
    try:
        from euroeval import Benchmarker
    except ImportError:
        raise ImportError("the euroeval backend needs: pip install euroeval") from None
    bench = Benchmarker(language=langs, device=device)
    return bench.benchmark(model=model_path)
