"""What one training run is: a typed spec per method, the one place its parameters are listed.

The pipeline builds a spec once per run (`variant_spec`), the Prefect train task takes it
as it is, the distributed launcher writes it as JSON and the launched processes validate
it back (`TrainSpecAdapter`), and `croco.training.run.run_train` trains from it. Each
method's spec has exactly the fields that method reads: DPO and SFT train on a pairs
output, online DPO on the training prompts with the run's reward.

`TrainSpec.key()` is the run's identity: its output lives at `<data_root>/training/<key>/`.
The reward-model trainer (`croco.training.reward_model`, `croco train-rm`) is no pipeline
stage: it writes to an output the user names, so it has no spec here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from croco import storage
from croco.config import (
    CrocoConfig,
    PolicyConfig,
    RewardConfig,
    TrainingConfig,
    VariantConfig,
    stable_hash,
)
from croco.identity import LABEL, STAGE_VERSIONS, identity

#: The training settings that change how a run executes, not what it computes, are marked
#: execution only in `croco.config.TrainingConfig` and so stay out of its key (the one rule
#: of `croco.identity`): checkpoint and logging cadence, the device, and how the effective
#: batch is split into per-device batches and gradient accumulation
#: (`per_device_batch_size`) or recomputed activations (`gradient_checkpointing`). The
#: optimizer sees batches of `effective_batch_size` either way (per-device batch x
#: accumulation steps x processes; a per-device batch that does not divide it is rounded
#: down by `croco.training.common.batch_args`, a misconfiguration the key does not track),
#: so a run resumed or rerun with another split reuses the same output. Changing them may
#: still move the numbers within floating-point noise.


class _Spec(BaseModel):
    """What every method shares: the variant it belongs to, the starting policy (with
    `policy.adapter` continued when set: iterative rounds), the training settings, where
    outputs go and, for per-language models, the one language trained on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant_name: str = Field(**LABEL)
    policy: PolicyConfig
    training: TrainingConfig
    data_root: str
    lang: str | None = None

    @property
    def off_policy(self) -> bool:
        """Trained on another model's samples (offline methods only)."""
        return False

    def identity(self) -> dict:
        return {"stage": "training", "v": STAGE_VERSIONS["training"], "method": self.method,
                "policy": identity(self.policy), "lang": self.lang,
                "training": identity(self.training)}

    def key(self) -> str:
        """The training key: a hash of what decides the trained adapter, not the variant's
        name, the data root or the execution-only settings (see above), with the policy's
        model and adapter by identity (`croco.identity.path_identity`)."""
        return stable_hash(self.identity())

    def uri(self) -> str:
        """Where the run writes `adapter/`, `metrics.json` and `training_config.json`."""
        return storage.join(self.data_root, "training", self.key())


class _PairsSpec(_Spec):
    """Offline training on a pairs output; `generation_policy` names the model the pairs'
    samples came from when it is not `policy.model` (off-policy)."""

    pairs_uri: str
    generation_policy: str | None = None

    @property
    def off_policy(self) -> bool:
        return self.generation_policy is not None and self.generation_policy != self.policy.model

    def identity(self) -> dict:
        return {**super().identity(), "pairs": storage.key_of(self.pairs_uri),
                "off_policy": self.off_policy}


class DPOSpec(_PairsSpec):
    """DPO on the pairs output's `dpo/` table; `ref_logps_uri`: the reference log-probs of
    those pairs (the `RefLogps` stage's output; none: computed while training). Not in the
    key: they follow from what is (the pairs, the policy, the training settings)."""

    method: Literal["dpo"] = "dpo"
    ref_logps_uri: str | None = None


class SFTSpec(_PairsSpec):
    """SFT on the pairs output's `sft/` table (the chosen samples)."""

    method: Literal["sft"] = "sft"


class OnlineDPOSpec(_Spec):
    """Online DPO: samples two answers per training prompt from the policy being trained,
    scores them with `reward`, and takes a DPO step on them. `prompts_uris` (lang -> the
    prompts output) narrowed by `prompts_split` / `prompts_limit` (the run's prompt
    selection) are its data; `max_new_tokens` bounds each sampled answer. No pairs, so
    never off-policy, and no pairs in its key (keys from before the specs hashed the pairs
    output the pipeline made for it, unread; such runs train again once)."""

    method: Literal["online_dpo"] = "online_dpo"
    reward: RewardConfig
    prompts_uris: dict[str, str] = Field(min_length=1)
    prompts_split: Literal["train", "heldout", "all"] = "train"
    prompts_limit: int | None = None
    max_new_tokens: int = Field(64, ge=1)

    def identity(self) -> dict:
        return {**super().identity(), "reward": identity(self.reward),
                "prompts": sorted(storage.key_of(u) for u in self.prompts_uris.values()),
                "split": self.prompts_split, "limit": self.prompts_limit,
                "max_new_tokens": self.max_new_tokens}


TrainSpec = Annotated[DPOSpec | SFTSpec | OnlineDPOSpec, Field(discriminator="method")]

#: Validates any method's spec from a dict or JSON (`TrainSpecAdapter.validate_json(text)`).
TrainSpecAdapter: TypeAdapter[TrainSpec] = TypeAdapter(TrainSpec)


def variant_spec(config: CrocoConfig, variant: VariantConfig, *, policy: PolicyConfig,
                 pairs_uri: str | None = None, prompts_uris: dict[str, str] | None = None,
                 lang: str | None = None, ref_logps_uri: str | None = None) -> TrainSpec:
    """The spec of one training run of `variant`: the run's settings with the variant's
    overrides, starting from `policy` (the config's, or with a previous round's adapter).
    DPO and SFT need `pairs_uri`, online DPO `prompts_uris`; DPO reads `ref_logps_uri`."""
    common = {"variant_name": variant.name, "policy": policy,
              "training": config.variant_training(variant),
              "data_root": storage.normalize_root(config.data_root), "lang": lang}
    if variant.method == "online_dpo":
        return OnlineDPOSpec(**common, reward=config.reward, prompts_uris=prompts_uris or {},
                             prompts_split=config.prompts.split,
                             prompts_limit=config.prompts.limit,
                             max_new_tokens=config.generation.max_new_tokens)
    if variant.method == "dpo":
        return DPOSpec(**common, pairs_uri=pairs_uri, ref_logps_uri=ref_logps_uri,
                       generation_policy=variant.generation_policy)
    return SFTSpec(**common, pairs_uri=pairs_uri, generation_policy=variant.generation_policy)
