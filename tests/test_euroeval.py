"""The EuroEval backend: result mapping, Benchmarker arguments, adapter merging.

EuroEval is optional and not installed in the dev venv, so most tests put a fake
`euroeval` module into sys.modules. It mirrors EuroEval's real API (release 18.3.0,
checked against 16.11.0):
- `Benchmarker.__init__` keyword arguments: euroeval/benchmarker.py, 18.3.0 lines 111-147,
  16.11.0 lines 60-91 (REAL_INIT_PARAMS holds the names common to both);
- `Benchmarker.benchmark(model=...)` returns a list of `BenchmarkResult`;
- `BenchmarkResult` fields: euroeval/data_models.py, 18.3.0 lines 102-133, 16.11.0 lines
  612-632 (dataset, task, languages, model, results, num_model_parameters,
  max_sequence_length, vocabulary_size, merge, generative, generative_type, few_shot,
  validation_split, then optional version fields);
- `results` as built by euroeval/scores.py `log_scores` (both versions): {"raw": one
  score dict per iteration, "total": {"test_<metric>": mean, "test_<metric>_se": 95%
  radius, ... per task metric in order, "num_failed_instances": float}};
- `euroeval.enums.Device` (str enum cpu/mps/cuda) and `euroeval.languages.
  get_all_languages()` (code -> Language).
Where euroeval is installed, the results are built from its real `BenchmarkResult`.
"""

from __future__ import annotations

import enum
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import polars as pl
import pytest

from croco.evaluation.structured import EUROEVAL_HINT, euroeval_rows, evaluate_euroeval

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # euroeval imports litellm

REAL_INIT_PARAMS = {
    "progress_bar", "save_results", "task", "dataset", "language", "device",
    "finetuning_batch_size", "raise_errors", "cache_dir", "api_key", "force", "verbose",
    "trust_remote_code", "clear_model_cache", "evaluate_test_split", "few_shot",
    "num_iterations", "api_base", "api_version", "gpu_memory_utilization",
    "generative_type", "custom_datasets_file", "debug", "run_with_cli",
    "requires_safetensors", "download_only",
}


def _real_euroeval():
    try:
        import euroeval
    except ImportError:
        return None
    return euroeval


REAL = _real_euroeval()


@dataclass
class MirrorBenchmarkResult:
    """EuroEval's `BenchmarkResult` (euroeval/data_models.py), the required fields."""

    dataset: str
    task: str
    languages: list[str]
    model: str
    results: dict
    num_model_parameters: int
    max_sequence_length: int
    vocabulary_size: int
    merge: bool
    generative: bool
    generative_type: str | None
    few_shot: bool | None
    validation_split: bool | None
    euroeval_version: str | None = field(default="18.3.0")


def make_result(dataset, task, languages, scores: dict[str, list[float]], *,
                few_shot=True, model="/models/policy"):
    """A result as EuroEval builds it: `scores` maps each task metric, in the task's
    order, to its per-iteration values; totals as `log_scores` computes them (x100)."""
    import statistics

    iterations = len(next(iter(scores.values())))
    raw = [{f"test_{m}": v[i] for m, v in scores.items()} for i in range(iterations)]
    total = {}
    for m, values in scores.items():
        total[f"test_{m}"] = 100 * statistics.fmean(values)
        total[f"test_{m}_se"] = (100 * 1.96 * statistics.stdev(values) / len(values) ** 0.5
                                 if len(values) > 1 else float("nan"))
    total["num_failed_instances"] = 0.0
    cls = REAL.data_models.BenchmarkResult if REAL is not None else MirrorBenchmarkResult
    return cls(dataset=dataset, task=task, languages=list(languages), model=model,
               results={"raw": raw, "total": total}, num_model_parameters=1000,
               max_sequence_length=4096, vocabulary_size=49152, merge=False,
               generative=True, generative_type="instruction_tuned", few_shot=few_shot,
               validation_split=True)


GERMEVAL = ("germeval", "named-entity-recognition", ["de"],
            {"micro_f1_no_misc": [0.5, 0.7], "micro_f1": [0.4, 0.6]})
SCALA_DE = ("scala-de", "linguistic-acceptability", ["de"],
            {"mcc": [0.1, 0.2], "macro_f1": [0.5, 0.6]})
ALLOCINE = ("allocine", "sentiment-classification", ["fr"],
            {"mcc": [0.3, 0.5], "macro_f1": [0.6, 0.7]})
NORNE = ("norne-nb", "named-entity-recognition", ["nb", "no"],
         {"micro_f1_no_misc": [0.2, 0.4], "micro_f1": [0.1, 0.3]})


# ------------------------------------------------------------------- result mapping


def test_one_row_per_dataset_with_its_primary_metric_and_iterations():
    results = [make_result(*GERMEVAL), make_result(*SCALA_DE), make_result(*ALLOCINE)]
    df = euroeval_rows(results, ["de", "fr"])
    assert df.columns == ["lang", "task", "metric", "value", "n"]
    assert df.to_dicts() == [
        {"lang": "de", "task": "germeval", "metric": "micro_f1_no_misc",
         "value": pytest.approx(60.0), "n": 2},
        {"lang": "de", "task": "scala-de", "metric": "mcc", "value": pytest.approx(15.0),
         "n": 2},
        {"lang": "fr", "task": "allocine", "metric": "mcc", "value": pytest.approx(40.0),
         "n": 2},
    ]


def test_dataset_language_is_the_run_language_or_else_its_own_codes():
    results = [make_result(*NORNE)]
    assert euroeval_rows(results, ["de", "nb"])["lang"].to_list() == ["nb"]
    # no run language or several of them among the dataset's: its codes
    assert euroeval_rows(results, ["de"])["lang"].to_list() == ["nb,no"]
    assert euroeval_rows(results, ["nb", "no"])["lang"].to_list() == ["nb,no"]


def test_canary_and_speed_entries_are_left_out():
    canary = make_result("contamination-canary", "contamination-detection", ["de", "fr"],
                         {"collection_success": [1.0]})
    speed = make_result("speed", "speed", ["de"], {"speed": [1500.0], "speed_short": [90.0]})
    df = euroeval_rows([canary, make_result(*SCALA_DE), speed], ["de", "fr"])
    assert df["task"].to_list() == ["scala-de"]


def test_a_dataset_scored_twice_is_an_error():
    few = make_result(*SCALA_DE, few_shot=True)
    zero = make_result(*SCALA_DE, few_shot=False)
    with pytest.raises(ValueError, match=r"several results for dataset\(s\) \['scala-de'\]"):
        euroeval_rows([few, zero], ["de"])


def test_a_result_without_a_test_score_is_an_error():
    bad = make_result(*SCALA_DE)
    bad.results = {"raw": [], "total": {"num_failed_instances": 0.0}}
    with pytest.raises(ValueError, match="'scala-de' has no test score"):
        euroeval_rows([bad], ["de"])

# ------------------------------------------------------------- Benchmarker arguments


class FakeBenchmarker:
    """Records what croco passes; returns the results it was given."""

    calls: ClassVar[list[dict]] = []
    results: ClassVar[list] = []
    on_benchmark: ClassVar[Callable[[str], None] | None] = None

    def __init__(self, **kwargs):
        unknown = set(kwargs) - REAL_INIT_PARAMS
        if unknown:
            raise TypeError(f"Benchmarker got unexpected keyword arguments {unknown}")
        self.kwargs = kwargs
        self.results_path = None

    def benchmark(self, model):
        FakeBenchmarker.calls.append({"init": self.kwargs, "model": model,
                                      "results_path": self.results_path})
        if FakeBenchmarker.on_benchmark:
            FakeBenchmarker.on_benchmark(model)
        return list(FakeBenchmarker.results)


class Device(str, enum.Enum):
    CPU = "cpu"
    MPS = "mps"
    CUDA = "cuda"


@pytest.fixture
def fake_euroeval(monkeypatch, tmp_path):
    """A fake `euroeval` package in sys.modules and the croco cache in tmp_path."""
    monkeypatch.setenv("CROCO_CACHE", str(tmp_path / "cache"))
    pkg = types.ModuleType("euroeval")
    pkg.__version__ = "18.3.0"
    pkg.Benchmarker = FakeBenchmarker
    enums = types.ModuleType("euroeval.enums")
    enums.Device = Device
    languages = types.ModuleType("euroeval.languages")
    languages.get_all_languages = lambda: {c: object() for c in
                                           ("da", "de", "en", "fr", "nb", "nn", "no")}
    for name, mod in (("euroeval", pkg), ("euroeval.enums", enums),
                      ("euroeval.languages", languages)):
        monkeypatch.setitem(sys.modules, name, mod)
    FakeBenchmarker.calls = []
    FakeBenchmarker.results = [make_result(*SCALA_DE), make_result(*ALLOCINE)]
    FakeBenchmarker.on_benchmark = None
    return FakeBenchmarker


def test_benchmarker_arguments_by_default(fake_euroeval, tmp_path):
    df = evaluate_euroeval("/models/policy", adapter=None, langs=["de", "fr"])
    (call,) = fake_euroeval.calls
    assert call["model"] == "/models/policy"
    assert call["init"] == {
        "language": ["de", "fr"], "device": Device.CPU, "few_shot": True,
        "evaluate_test_split": False, "save_results": False, "force": True,
        "raise_errors": True, "cache_dir": str(tmp_path / "cache" / "euroeval"),
    }
    assert call["results_path"].name == "euroeval_benchmark_results.jsonl"
    assert not call["results_path"].parent.exists()  # a temporary folder, gone now
    assert df["task"].to_list() == ["scala-de", "allocine"]


def test_benchmarker_arguments_from_the_config(fake_euroeval):
    evaluate_euroeval("/models/policy", adapter=None, langs=["de"],
                      datasets=["scala-de", "germeval"], few_shot=False, iterations=3,
                      test_split=True, device="cuda:1")
    init = fake_euroeval.calls[0]["init"]
    assert init["dataset"] == ["scala-de", "germeval"] and "task" not in init
    assert (init["few_shot"], init["num_iterations"], init["evaluate_test_split"],
            init["device"]) == (False, 3, True, Device.CUDA)
    evaluate_euroeval("/models/policy", adapter=None, langs=["de"],
                      tasks=["sentiment-classification"])
    init = fake_euroeval.calls[1]["init"]
    assert init["task"] == ["sentiment-classification"] and "dataset" not in init


def test_datasets_and_tasks_together_are_an_error(fake_euroeval):
    with pytest.raises(ValueError, match="euroeval_datasets or euroeval_tasks, not both"):
        evaluate_euroeval("/m", adapter=None, langs=["de"], datasets=["scala-de"],
                          tasks=["linguistic-acceptability"])
    assert fake_euroeval.calls == []


def test_languages_euroeval_lacks_are_dropped_or_an_error(fake_euroeval, caplog):
    evaluate_euroeval("/m", adapter=None, langs=["de", "ja", "fr"])
    assert fake_euroeval.calls[0]["init"]["language"] == ["de", "fr"]
    assert "EuroEval has no language ['ja']" in caplog.text
    with pytest.raises(ValueError, match=r"EuroEval has no language among \['ja', 'zh'\]"):
        evaluate_euroeval("/m", adapter=None, langs=["ja", "zh"])


def test_an_unknown_dataset_name_is_a_clear_error(fake_euroeval, monkeypatch):
    def exits(**kwargs):  # EuroEval logs the closest name and calls sys.exit(1)
        raise SystemExit(1)

    monkeypatch.setattr(sys.modules["euroeval"], "Benchmarker", exits)
    with pytest.raises(ValueError, match=r"EuroEval knows no dataset in \['scala-xx'\]"):
        evaluate_euroeval("/m", adapter=None, langs=["de"], datasets=["scala-xx"])


def test_no_scores_at_all_is_an_error(fake_euroeval):
    fake_euroeval.results = []
    with pytest.raises(ValueError, match=r"no scores for /m in \['de'\] on \['germeval'\]"):
        evaluate_euroeval("/m", adapter=None, langs=["de"], datasets=["germeval"])


def test_missing_euroeval_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "euroeval", None)  # import euroeval -> ImportError
    with pytest.raises(ImportError, match=r"pip install euroeval") as err:
        evaluate_euroeval("/m", adapter=None, langs=["de"])
    assert str(err.value) == EUROEVAL_HINT


# ------------------------------------------------------------------ adapter merging


@pytest.fixture(scope="module")
def lora_adapter(tiny_lm, tmp_path_factory) -> str:
    """A LoRA adapter on tiny_lm with non-zero B matrices, so merging changes weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(out)
    return str(out)


def _q_proj(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return model.model.layers[0].self_attn.q_proj.weight.detach().clone()


def test_an_adapter_is_merged_and_the_merged_folder_evaluated(fake_euroeval, tiny_lm,
                                                              lora_adapter, tmp_path):
    import os as _os

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = {}

    def inspect(model):  # while EuroEval runs, the merged folder exists
        seen["files"] = sorted(_os.listdir(model))
        seen["q_proj"] = _q_proj(model)

    fake_euroeval.on_benchmark = inspect
    evaluate_euroeval(tiny_lm, adapter=lora_adapter, langs=["de"])
    model = fake_euroeval.calls[0]["model"]
    assert model != tiny_lm and model.startswith(str(tmp_path / "cache" / "euroeval"))
    assert not _os.path.exists(model)  # temporary: removed after the run
    assert "config.json" in seen["files"] and "tokenizer.json" in seen["files"]
    assert "adapter_config.json" not in seen["files"]  # EuroEval sees a full model
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm),
                                         lora_adapter).merge_and_unload()
    expected_q = expected.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.allclose(seen["q_proj"], expected_q, atol=1e-6)
    assert not torch.allclose(seen["q_proj"], _q_proj(tiny_lm), atol=1e-4)


def test_structured_stage_with_the_euroeval_backend(fake_euroeval, tiny_lm, lora_adapter,
                                                    tmp_path):
    from croco import storage
    from croco.config import PolicyConfig, StructuredEvalConfig
    from croco.stages import run_structured

    policy = PolicyConfig(model=tiny_lm, adapter=lora_adapter, device="cpu")
    cfg = StructuredEvalConfig(backend="euroeval", euroeval_datasets=["scala-de"],
                               euroeval_iterations=2)
    fake_euroeval.results = [make_result(*SCALA_DE)]
    root = str(tmp_path / "data")
    uri = run_structured(policy, cfg, ["de"], root)
    table = storage.read_parquet(storage.join(uri, "results.parquet"))
    assert table.schema == pl.Schema({"lang": pl.String, "task": pl.String,
                                      "metric": pl.String, "value": pl.Float64,
                                      "n": pl.Int64})
    assert table.select("lang", "task", "metric", "n").rows() == [("de", "scala-de", "mcc", 2)]
    (call,) = fake_euroeval.calls
    assert call["model"] != tiny_lm  # the merged folder, not the base
    assert call["init"]["dataset"] == ["scala-de"] and call["init"]["num_iterations"] == 2
    assert run_structured(policy, cfg, ["de"], root) == uri  # cached
    assert len(fake_euroeval.calls) == 1
    other = cfg.model_copy(update={"euroeval_few_shot": False})
    assert run_structured(policy, other, ["de"], root) != uri  # the key has the fields
    assert fake_euroeval.calls[1]["init"]["few_shot"] is False


# ------------------------------------------------------------- the real EuroEval


def test_real_euroeval_accepts_the_arguments_and_results(monkeypatch, tmp_path):
    """With EuroEval installed: croco's arguments build a real Benchmarker (its dataset
    lookup included) and its real results map. Scoring a generative model needs EuroEval's
    vLLM extra and a GPU, so `benchmark` itself is replaced here."""
    euroeval = REAL
    if euroeval is None:
        pytest.skip("euroeval not installed (optional backend)")
    monkeypatch.setenv("CROCO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    built = []

    class Recording(euroeval.Benchmarker):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            built.append(self)

        def benchmark(self, model, **kwargs):
            return [make_result(*SCALA_DE)]

    monkeypatch.setattr(euroeval, "Benchmarker", Recording)
    df = evaluate_euroeval("/models/policy", adapter=None, langs=["de"],
                           datasets=["scala-de"], iterations=2)
    (bench,) = built
    assert [d.name for d in bench.benchmark_config.datasets] == ["scala-de"]
    assert bench.benchmark_config.num_iterations == 2
    assert bench.benchmark_config.force and not bench.benchmark_config.save_results
    assert df.select("lang", "task", "metric", "n").rows() == [("de", "scala-de", "mcc", 2)]
    assert not (tmp_path / "euroeval_benchmark_results.jsonl").exists()
