"""Training with tiny random models: DPO, stored reference log-probs, resume, SFT, reward
model."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from croco import storage
from croco.config import PolicyConfig, TrainingConfig
from croco.training.dpo import train_dpo
from croco.training.run import run_train
from croco.training.spec import DPOSpec, OnlineDPOSpec, SFTSpec

FAST = dict(learning_rate=5e-3, effective_batch_size=4, per_device_batch_size=4, max_length=64,
            heldout_fraction=0.0, warmup_ratio=0.0, lora_r=8, lora_alpha=16, lora_dropout=0.0)


def separable_pairs(n: int = 8) -> pl.DataFrame:
    return pl.DataFrame({
        "prompt_id": [f"p{i}" for i in range(n)], "prompt_lang": ["en"] * n,
        "prompt": [f"Say something nice, number {i}." for i in range(n)],
        "chosen": ["Yes, gladly, here it is."] * n, "rejected": ["zq xv kw jj qq"] * n,
        "chosen_score": [1.0] * n, "rejected_score": [0.0] * n,
        "chosen_lang": ["en"] * n, "rejected_lang": ["en"] * n, "pool_size": [4] * n,
        "scope": ["in_lang"] * n, "reject_target": ["mean_minus_2sigma"] * n,
    })


def write_pairs(root: Path, pairs: pl.DataFrame) -> str:
    uri = str(root / "pairs" / "abc123")
    storage.write_parquet(pairs, storage.join(uri, "dpo", "lang=en", "data.parquet"))
    sft = pairs.select("prompt_id", pl.col("prompt_lang").alias("lang"), "prompt",
                       pl.col("chosen").alias("completion"),
                       pl.col("chosen_score").alias("reward"))
    storage.write_parquet(sft, storage.join(uri, "sft", "lang=en", "data.parquet"))
    storage.mark_complete(uri)
    return uri


def test_dpo_lowers_its_loss_on_separable_pairs(tiny_lm, tmp_path):
    cfg = TrainingConfig(num_train_epochs=3, **FAST)
    m = train_dpo(separable_pairs(), policy=tiny_lm, adapter=None, cfg=cfg,
                  out_uri=str(tmp_path / "run"))
    assert m["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at the start
    assert m["final_loss"] < 0.9 * m["first_loss"]
    assert m["rewards/accuracies"] == 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


def _ref_logps(pairs_uri: str, model: str, cfg: TrainingConfig, root) -> str:
    """The reference log-probs stage on a pairs output; its output URI."""
    from croco.stage import run
    from croco.stages import RefLogps

    return run(RefLogps(pairs_uri=pairs_uri, policy=PolicyConfig(model=model), training=cfg),
               str(root))


def test_second_variant_on_the_same_pairs_runs_no_reference_forward(tiny_lm, tmp_path):
    """The reference log-probs are a stage of their own, computed once as training would
    compute them; every variant on the same pairs reads them and runs no reference model."""
    pairs = separable_pairs()
    cfg = TrainingConfig(max_steps=2, **FAST)
    ref = _ref_logps(write_pairs(tmp_path, pairs), tiny_lm, cfg, tmp_path)
    assert storage.is_complete(ref)
    stored = storage.read_parquet(storage.join(ref, "data.parquet"))
    assert stored.height == 8 and stored["ref_chosen_logps"].null_count() == 0

    first = train_dpo(pairs, policy=tiny_lm, adapter=None, cfg=cfg,
                      out_uri=str(tmp_path / "a"))  # given none: computes its own
    assert first["ref_logps"] == "computed"
    assert first["ref_forward_batches"] == 2  # 8 pairs / batch 4, once
    own = storage.read_parquet(str(tmp_path / "a" / "ref_logps.parquet")).sort("pair_id")
    assert own["pair_id"].to_list() == stored.sort("pair_id")["pair_id"].to_list()
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        assert (own[col] - stored.sort("pair_id")[col]).abs().max() < 1e-5, col

    second = train_dpo(pairs, policy=tiny_lm, adapter=None,
                       cfg=TrainingConfig(max_steps=2, beta=0.3, **FAST),
                       out_uri=str(tmp_path / "b"), ref_uri=ref)
    assert second["ref_logps"] == "stored"
    assert second["ref_forward_batches"] == 0


def test_reference_logps_are_keyed_by_pairs_policy_length_and_precision():
    from croco.stages import RefLogps

    def uri(pairs="/d/pairs/k1", model="m", **training) -> str:
        return RefLogps(pairs_uri=pairs, policy=PolicyConfig(model=model),
                        training=TrainingConfig(**{"max_length": 64, **training})).output("/d")

    a = uri()
    assert a == uri()
    assert a == uri(beta=0.3, learning_rate=1e-3, per_device_batch_size=2)  # not the reference's
    assert a != uri(precision="bf16")
    assert a != uri(pairs="/d/pairs/k2")
    assert a != uri(model="m2")
    assert a != uri(max_length=128)
    assert a.startswith("/d/ref_logps/")


def test_a_checkpoint_killed_mid_save_is_passed_over_and_removed(tmp_path):
    from croco.training.common import last_complete_checkpoint

    work = tmp_path / "work"
    for step, done in ((1, True), (2, True), (3, False), (10, False)):
        folder = work / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        if done:  # the trainer writes its state last
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(work) == str(work / "checkpoint-2")
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_interrupted_training_resumes_from_the_last_checkpoint(tiny_lm, tmp_path):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    cfg = TrainingConfig(max_steps=4, save_steps=1, **FAST)
    pairs_uri = write_pairs(tmp_path, separable_pairs())
    policy = PolicyConfig(model=tiny_lm)
    with pytest.raises(KeyboardInterrupt):
        run_train(DPOSpec(pairs_uri=pairs_uri, variant_name="dpo", policy=policy, training=cfg,
                          data_root=str(tmp_path)), callbacks=[Interrupt()])
    (key,) = storage.list_dir(str(tmp_path / "training"))
    work = tmp_path / "training" / key / "work"
    assert (work / "checkpoint-2").exists()
    assert not storage.is_complete(str(tmp_path / "training" / key))

    class CountSteps(TrainerCallback):
        steps: list = []

        def on_step_end(self, args, state, control, **kwargs):
            CountSteps.steps.append(state.global_step)

    uri = run_train(DPOSpec(pairs_uri=pairs_uri, variant_name="dpo", policy=policy, training=cfg,
                            data_root=str(tmp_path)), callbacks=[CountSteps()])
    metrics = json.loads((Path(uri) / "metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-2"
    assert CountSteps.steps == [3, 4]  # only the steps after the checkpoint ran again
    assert metrics["steps"] == 4
    assert storage.is_complete(uri)
    # the log history goes back to step 1: the checkpoint carried the steps before it
    history = json.loads((Path(uri) / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]


def _is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


def _tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_training_run_writes_its_log_history_curves_and_tensorboard_events(tiny_lm,
                                                                             tmp_path):
    import importlib.util

    pairs_uri = write_pairs(tmp_path, separable_pairs())
    uri = run_train(DPOSpec(pairs_uri=pairs_uri, variant_name="dpo",
                            policy=PolicyConfig(model=tiny_lm),
                            training=TrainingConfig(max_steps=3, **FAST),
                            data_root=str(tmp_path)))
    out = Path(uri)
    history = json.loads((out / "log_history.json").read_text())
    steps = [r for r in history if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # logging_steps 1: every step a point
    assert all({"rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(r)
               for r in steps)
    assert any("train_runtime" in r for r in history)  # the closing summary too
    assert _is_png((out / "curves.png").read_bytes())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_by_lang"] == {"en": 8}
    if importlib.util.find_spec("tensorboard") is None:
        assert not (out / "runs").exists()
        pytest.skip("tensorboard is not installed: no event files to check "
                    "(pip install tensorboard)")
    events = [p.name for p in (out / "runs").iterdir()]
    assert events and all(n.startswith("events.out.tfevents") for n in events)
    scalars = _tensorboard_scalars(out / "runs")
    assert scalars["train/loss"] == pytest.approx([r["loss"] for r in steps])
    assert len(scalars["train/rewards/margins"]) == 3


def test_report_to_none_writes_no_event_files(tiny_lm, tmp_path):
    pairs_uri = write_pairs(tmp_path, separable_pairs())
    uri = run_train(SFTSpec(pairs_uri=pairs_uri, variant_name="sft",
                            policy=PolicyConfig(model=tiny_lm),
                            training=TrainingConfig(max_steps=2, report_to="none", **FAST),
                            data_root=str(tmp_path)))
    assert not (Path(uri) / "runs").exists()
    history = json.loads((Path(uri) / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2]
    assert _is_png((Path(uri) / "curves.png").read_bytes())


def test_a_missing_report_to_package_fails_before_any_model_loads(tmp_path, monkeypatch):
    from croco.errors import MissingPackageError
    from croco.training import reporting

    monkeypatch.setattr(reporting, "_installed", lambda module: module != "wandb")
    pairs_uri = write_pairs(tmp_path, separable_pairs())
    # the policy does not exist: loading it first would raise ModelNotFoundError instead
    spec = DPOSpec(pairs_uri=pairs_uri, variant_name="dpo",
                   policy=PolicyConfig(model=str(tmp_path / "no-such-model")),
                   training=TrainingConfig(max_steps=1, report_to="wandb", **FAST),
                   data_root=str(tmp_path))
    with pytest.raises(MissingPackageError, match=r"^training\.report_to: wandb needs the "
                                                  r"wandb package, .*: pip install wandb"):
        run_train(spec)
    assert not storage.is_complete(spec.uri())


def test_sft_trains_on_the_chosen_completions(tiny_lm, tmp_path):
    pairs_uri = write_pairs(tmp_path, separable_pairs())
    cfg = TrainingConfig(num_train_epochs=3, sft_learning_rate=5e-3,
                         **{k: v for k, v in FAST.items() if k != "learning_rate"})
    uri = run_train(SFTSpec(pairs_uri=pairs_uri, variant_name="sft",
                            policy=PolicyConfig(model=tiny_lm), training=cfg,
                            data_root=str(tmp_path)))
    m = json.loads((Path(uri) / "metrics.json").read_text())
    assert m["method"] == "sft" and m["rows_train"] == 8
    assert m["final_loss"] < m["first_loss"]
    assert (Path(uri) / "adapter" / "adapter_config.json").exists()


def test_off_policy_training_is_recorded(tiny_lm, tmp_path):
    pairs_uri = write_pairs(tmp_path, separable_pairs())
    uri = run_train(DPOSpec(pairs_uri=pairs_uri, variant_name="offp",
                            policy=PolicyConfig(model=tiny_lm),
                            training=TrainingConfig(max_steps=1, **FAST),
                            data_root=str(tmp_path), generation_policy="another/model"))
    m = json.loads((Path(uri) / "metrics.json").read_text())
    assert m["off_policy"] is True and m["generation_policy"] == "another/model"


def test_merge_exports_full_weights(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    pairs_uri = write_pairs(tmp_path, separable_pairs())
    uri = run_train(DPOSpec(pairs_uri=pairs_uri, variant_name="dpo",
                            policy=PolicyConfig(model=tiny_lm),
                            training=TrainingConfig(max_steps=1, merge=True, **FAST),
                            data_root=str(tmp_path)))
    merged = AutoModelForCausalLM.from_pretrained(Path(uri) / "merged")
    assert merged.config.num_hidden_layers == 2


def test_reward_model_training_raises_pairwise_accuracy(tiny_lm, tmp_path):
    from croco.training.reward_model import pairwise_accuracy, train_reward_model

    prefs = pl.DataFrame({
        "prompt": [f"Question {i}?" for i in range(16)],
        "chosen": ["A clear, helpful and correct answer."] * 16,
        "rejected": ["qq zx vv kk jj ww"] * 16,
    })
    cfg = TrainingConfig(num_train_epochs=4, learning_rate=2e-3, effective_batch_size=8,
                         per_device_batch_size=8, max_length=64, warmup_ratio=0.0)
    out = str(tmp_path / "rm")
    from croco.models import load_model

    base_dir = tmp_path / "base-rm"
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=1)
    base.config.pad_token_id = load_model(tiny_lm)[1].pad_token_id
    base.save_pretrained(base_dir)
    load_model(tiny_lm)[1].save_pretrained(base_dir)
    before = pairwise_accuracy(str(base_dir), prefs)
    m = train_reward_model(prefs, base=tiny_lm, cfg=cfg, out_uri=out)
    after = pairwise_accuracy(str(Path(out) / "model"), prefs)
    assert m["final_loss"] < m["first_loss"]
    assert after == 1.0
    assert after > before or before == 1.0


def test_online_dpo_persists_the_pairs_it_generated(tiny_lm, tiny_rm, prompt_file, tmp_path):
    from croco.config import ClassifierScorer, LangIdScorer, PromptsConfig, RewardConfig
    from croco.pairing import DPO_SCHEMA
    from croco.stages import run_prompts

    pcfg = PromptsConfig(path=str(prompt_file), limit=2)
    prompts_uris = {lang: run_prompts(pcfg, lang, str(tmp_path)) for lang in ["en", "de"]}
    reward = RewardConfig(scorers=[ClassifierScorer(name="rm", model=tiny_rm),
                                   LangIdScorer(weight=0.5)])
    uri = run_train(OnlineDPOSpec(variant_name="online", policy=PolicyConfig(model=tiny_lm),
                                  training=TrainingConfig(max_steps=2, **FAST),
                                  data_root=str(tmp_path), reward=reward,
                                  prompts_uris=prompts_uris, prompts_split=pcfg.split,
                                  prompts_limit=pcfg.limit, max_new_tokens=4))
    m = json.loads((Path(uri) / "metrics.json").read_text())
    assert m["method"] == "online_dpo" and m["steps"] == 2
    pairs = storage.read_parquet(storage.join(uri, "online_pairs"))
    assert pairs.schema == pl.Schema(DPO_SCHEMA)
    assert pairs.height == 2 * 4  # 2 steps x batch of 4 prompts
    assert (pairs["chosen_score"] >= pairs["rejected_score"]).all()
    assert set(pairs["prompt_id"]) <= {"q0", "q1"} and set(pairs["scope"]) == {"online"}
    assert (Path(uri) / "adapter" / "adapter_config.json").exists()


def test_checkpoints_on_object_storage_survive_a_lost_local_disk(tiny_lm, tmp_path, s3_bucket,
                                                                 monkeypatch):
    """With the data root on S3, checkpoints are mirrored to the bucket; a resume on a machine
    that lost its local work folder fetches the last checkpoint from there."""
    import shutil

    from transformers import TrainerCallback

    monkeypatch.setenv("CROCO_CACHE", str(tmp_path / "cache"))

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    root = f"s3://{s3_bucket}/croco"
    pairs_uri = storage.join(root, "pairs", "k1")
    storage.write_parquet(separable_pairs(), storage.join(pairs_uri, "dpo", "lang=en",
                                                          "data.parquet"))
    cfg = TrainingConfig(max_steps=3, save_steps=1, **FAST)
    policy = PolicyConfig(model=tiny_lm)
    with pytest.raises(KeyboardInterrupt):
        run_train(DPOSpec(pairs_uri=pairs_uri, variant_name="dpo", policy=policy, training=cfg,
                          data_root=root), callbacks=[Interrupt()])
    (key,) = storage.list_dir(storage.join(root, "training"))
    out = storage.join(root, "training", key)
    assert "checkpoint-2" in storage.list_dir(storage.join(out, "checkpoints"))
    shutil.rmtree(tmp_path / "cache" / "training")  # the local work folder is gone

    uri = run_train(DPOSpec(pairs_uri=pairs_uri, variant_name="dpo", policy=policy, training=cfg,
                            data_root=root))
    metrics = storage.read_json(storage.join(uri, "metrics.json"))
    assert metrics["resumed_from"] == "checkpoint-2"
    assert "adapter_config.json" in storage.list_dir(storage.join(uri, "adapter"))
    assert storage.is_complete(uri)
    # the log history and its figure are in the bucket; TensorBoard's events too, uploaded
    # from the local work folder with the adapter
    history = json.loads(storage.read_bytes(storage.join(uri, "log_history.json")))
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]
    assert storage.read_bytes(storage.join(uri, "curves.png")).startswith(b"\x89PNG")
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        assert any(n.startswith("events.out.tfevents")
                   for n in storage.list_dir(storage.join(uri, "runs")))


def test_distributed_launch_spec_round_trips_and_builds_the_accelerate_command(tmp_path,
                                                                              monkeypatch):
    from croco.training import launch

    written = DPOSpec(pairs_uri="/d/pairs/k", variant_name="dpo",
                      policy=PolicyConfig(model="m", adapter="/a"),
                      training=TrainingConfig(beta=0.3), data_root="/d", lang="de")
    spec = launch.write_spec(tmp_path / "spec.json", written)
    seen = {}
    monkeypatch.setattr(launch, "run_train", lambda s: seen.update(spec=s) or "/d/t/x")
    result = tmp_path / "result.json"
    assert launch.main(["--spec", str(spec), "--result", str(result)]) == "/d/t/x"
    assert json.loads(result.read_text()) == {"uri": "/d/t/x"}
    assert seen["spec"] == written and isinstance(seen["spec"], DPOSpec)
    assert seen["spec"].lang == "de" and seen["spec"].policy.adapter == "/a"
    assert seen["spec"].training.beta == 0.3
    cmd = launch.accelerate_command(spec, 4, result=result)
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "4"]
    assert "--multi_gpu" in cmd
    assert cmd[-6:] == ["-m", "croco.training.launch", "--spec", str(spec), "--result",
                        str(result)]
    with_file = launch.accelerate_command(spec, 8, "infra/accelerate/multi-gpu.yaml")
    assert "--multi_gpu" not in with_file
    assert with_file[5:7] == ["--config_file", "infra/accelerate/multi-gpu.yaml"]


@pytest.mark.slow
def test_two_process_data_parallel_dpo_matches_one_process_reference(tiny_lm, tmp_path):
    """DPO in two data-parallel processes (torchrun, gloo on CPU: the code path of a
    multi-GPU run): the main process alone writes the outputs, and the reference log-probs
    gathered from both processes equal those of a one-process run, pair for pair."""
    from croco.training import launch

    pairs = separable_pairs(12)
    cfg = TrainingConfig(max_steps=2, save_steps=1, **{**FAST, "per_device_batch_size": 2})
    uri = launch.run_train_distributed(
        2, DPOSpec(pairs_uri=write_pairs(tmp_path, pairs), variant_name="dpo",
                   policy=PolicyConfig(model=tiny_lm), training=cfg, data_root=str(tmp_path)),
        launcher="torchrun")
    assert storage.is_complete(uri)
    metrics = storage.read_json(storage.join(uri, "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["ref_logps"] == "computed"
    assert "adapter_config.json" in storage.list_dir(storage.join(uri, "adapter"))
    two = storage.read_parquet(storage.join(uri, "ref_logps.parquet")).sort("pair_id")
    assert two.height == 12

    single = _ref_logps(write_pairs(tmp_path / "single", pairs), tiny_lm,
                        TrainingConfig(max_steps=1, **FAST), tmp_path / "single")
    one = storage.read_parquet(storage.join(single, "data.parquet")).sort("pair_id")
    assert one["pair_id"].to_list() == two["pair_id"].to_list()
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        assert (one[col] - two[col]).abs().max() < 1e-4, col


def test_push_to_hub_creates_a_private_repo_and_uploads_the_adapter(tiny_lm, tmp_path,
                                                                     fake_hub):
    """`training.push_to_hub` against a loopback stand-in for the Hub's HTTP API."""
    root = str(tmp_path / "data")
    pairs_uri = write_pairs(tmp_path / "data", separable_pairs(4))
    cfg = TrainingConfig(max_steps=1, push_to_hub="team/croco-dpo", **FAST)
    uri = run_train(DPOSpec(pairs_uri=pairs_uri, variant_name="dpo",
                            policy=PolicyConfig(model=tiny_lm), training=cfg, data_root=root))
    metrics = storage.read_json(storage.join(uri, "metrics.json"))
    assert metrics["pushed_to"] == "team/croco-dpo"
    assert fake_hub["repos"]["team/croco-dpo"]["visibility"] == "private"
    adapter = Path(uri) / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert fake_hub["files"][("team/croco-dpo", name)] == (adapter / name).read_bytes()
    assert fake_hub["commits"] == [("team/croco-dpo",
                                    f"croco adapter, training run {Path(uri).name}")]
    assert "hf_fake_token_1234" not in json.dumps(metrics)


def test_runs_of_one_key_on_two_buckets_keep_separate_local_work_folders(tmp_path, monkeypatch):
    from croco.training.common import local_workdir

    monkeypatch.setenv("CROCO_CACHE", str(tmp_path))
    a = local_workdir("s3://team-a/croco/training/5f3a")
    b = local_workdir("s3://team-b/croco/training/5f3a")
    assert a != b
    assert a.name == b.name == "work"
    assert a.parent.name.startswith("5f3a-") and a.parent.parent == tmp_path / "training"
    assert local_workdir(str(tmp_path / "root" / "training" / "5f3a")) == (
        tmp_path / "root" / "training" / "5f3a" / "work")


def test_online_dpo_round_two_continues_round_one_adapter(tiny_lm, tiny_rm, prompt_file,
                                                          tmp_path):
    """Round 2 loads round 1's adapter and trains it on (with a learning rate too small to
    move it, it ends where round 1 ended; a fresh LoRA would start with zero `lora_B`)."""
    from safetensors.torch import load_file

    from croco.config import ClassifierScorer, PromptsConfig, RewardConfig
    from croco.stages import run_prompts
    from croco.training.run import adapter_path

    pcfg = PromptsConfig(path=str(prompt_file), limit=2)
    first = OnlineDPOSpec(
        variant_name="online", policy=PolicyConfig(model=tiny_lm),
        training=TrainingConfig(max_steps=2, **FAST), data_root=str(tmp_path),
        reward=RewardConfig(scorers=[ClassifierScorer(name="rm", model=tiny_rm)]),
        prompts_uris={"en": run_prompts(pcfg, "en", str(tmp_path))}, prompts_limit=2,
        max_new_tokens=4)
    uri1 = run_train(first)
    second = first.model_copy(update={
        "policy": PolicyConfig(model=tiny_lm, adapter=adapter_path(uri1)),
        "training": TrainingConfig(max_steps=1, **{**FAST, "learning_rate": 1e-12})})
    uri2 = run_train(second)
    assert second.key() != first.key() and uri2 != uri1
    m = storage.read_json(storage.join(uri2, "metrics.json"))
    assert m["init_adapter"] == adapter_path(uri1)
    recorded = storage.read_json(storage.join(uri2, "training_config.json"))
    assert recorded["policy"]["adapter"] == adapter_path(uri1)
    w1 = load_file(str(Path(uri1) / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(Path(uri2) / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    lora_b = [k for k in w1 if "lora_B" in k]
    assert lora_b and max(w1[k].abs().max().item() for k in lora_b) > 1e-4  # round 1 trained
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-6, k


def _dpo_spec(**changes) -> DPOSpec:
    spec = DPOSpec(pairs_uri="/d/pairs/k1", variant_name="dpo",
                   policy=PolicyConfig(model="m"), training=TrainingConfig(), data_root="/d")
    return spec.model_copy(update=changes)


def test_training_key_hashes_what_decides_the_adapter():
    from croco.config import stable_hash
    from croco.identity import identity

    spec = _dpo_spec()
    # The content of the key since before specs existed, by the identity rules
    # (croco.identity: no execution-only settings, path inputs by content).
    assert spec.key() == stable_hash({
        "stage": "training", "v": 1, "pairs": "k1", "method": "dpo",
        "policy": identity(PolicyConfig(model="m")), "lang": None,
        "training": identity(TrainingConfig()), "off_policy": False})
    assert spec.uri() == f"/d/training/{spec.key()}"
    same = [_dpo_spec(variant_name="other", data_root="/elsewhere"),
            _dpo_spec(generation_policy="m"),  # its own samples: on-policy
            _dpo_spec(training=TrainingConfig(save_steps=7, logging_steps=3, device="cpu",
                                              per_device_batch_size=2,
                                              gradient_checkpointing="on"))]
    for s in same:
        assert s.key() == spec.key(), s
    different = [_dpo_spec(pairs_uri="/d/pairs/k2"), _dpo_spec(lang="de"),
                 _dpo_spec(generation_policy="other/model"),
                 _dpo_spec(policy=PolicyConfig(model="m", adapter="/a")),
                 _dpo_spec(training=TrainingConfig(effective_batch_size=32)),
                 _dpo_spec(training=TrainingConfig(beta=0.3)),
                 SFTSpec(**_dpo_spec().model_dump(exclude={"method", "ref_logps_uri"}))]
    assert len({s.key() for s in different} | {spec.key()}) == len(different) + 1


def test_a_spec_validates_back_from_its_json_as_its_method():
    from croco.config import RewardConfig
    from croco.training.spec import TrainSpecAdapter

    online = OnlineDPOSpec(variant_name="o", policy=PolicyConfig(model="m"),
                           training=TrainingConfig(), data_root="/d", reward=RewardConfig(),
                           prompts_uris={"en": "/d/prompts/p/lang=en"})
    for spec in (_dpo_spec(lang="de"), SFTSpec(**_dpo_spec().model_dump(exclude={"method", "ref_logps_uri"})),
                 online):
        back = TrainSpecAdapter.validate_json(spec.model_dump_json())
        assert type(back) is type(spec) and back == spec and back.key() == spec.key()
    with pytest.raises(ValueError, match="pairs_uri"):
        TrainSpecAdapter.validate_python({**online.model_dump(), "method": "dpo"})


@pytest.mark.parametrize("bf16", ["0", "1"])
def test_reference_logps_on_the_cpu_equal_trl_own(tiny_lm, tmp_path, monkeypatch, bf16):
    """croco's reference pass (the vocabulary only at completion positions) gives TRL's
    numbers, in float32 and with bf16 autocast."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from croco.training.common import load_policy_for_training, precision_args
    from croco.training.dpo import _trainer_class, to_conversational

    monkeypatch.setenv("CROCO_CPU_BF16", bf16)
    cfg = TrainingConfig(max_steps=1, **FAST)
    prec = precision_args(cfg, torch.device("cpu"))
    assert prec["bf16"] is (bf16 == "1")
    model, tok, peft_config = load_policy_for_training(tiny_lm, None, cfg, prec)
    args = DPOConfig(output_dir=str(tmp_path), max_length=64, precompute_ref_log_probs=False,
                     per_device_train_batch_size=4, report_to=[], **prec)
    trainer = _trainer_class()(model=model, args=args, processing_class=tok,
                               train_dataset=to_conversational(separable_pairs(4)),
                               peft_config=peft_config)
    assert trainer._lora_base_on_cpu(trainer.model) is not None  # croco's pass is taken
    batch = next(iter(trainer.get_train_dataloader()))
    ours = trainer.compute_ref_log_probs(trainer.model, batch)
    theirs = DPOTrainer.compute_ref_log_probs(trainer, trainer.model, batch)
    tol = 2e-2 if bf16 == "1" else 1e-4
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (4,)
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=1e-3), (a, b)


def test_the_train_stage_files_its_output_where_the_spec_says():
    """The train stage takes the spec's key as is (no override of the contract's key or
    place): training outputs keep the keys they had."""
    from croco.config import stable_hash
    from croco.identity import STAGE_VERSIONS
    from croco.stages import Train

    spec = _dpo_spec(lang="de")
    stage = Train(spec=spec)
    assert stage.key() == spec.key() == stable_hash(spec.identity())
    assert spec.identity()["stage"] == "training"
    assert spec.identity()["v"] == STAGE_VERSIONS["training"]
    assert stage.output(spec.data_root) == spec.uri()
