from __future__ import annotations

import pytest

from croco.config import ConfigError, CrocoConfig
from croco.config_loading import apply_overrides, load_config


def test_defaults_are_the_papers():
    cfg = CrocoConfig()
    assert cfg.generation.k == 64
    assert cfg.generation.temperature == 1.0
    assert cfg.generation.max_new_tokens == 4096
    assert cfg.pairing.reject_target == "mean_minus_2sigma"
    assert cfg.pairing.prompt_source == "chosen"
    assert cfg.pairing.scope == "in_lang"
    assert cfg.reward.scorers[0].model == "Skywork/Skywork-Reward-V2-Qwen3-8B"


def test_demo_config_loads_with_the_embedded_policy():
    cfg = load_config()
    assert cfg.policy.model == "embedded:smollm2-135m-instruct"
    assert cfg.languages == ["en", "da", "nl", "fr", "de", "it", "es"]
    assert cfg.data_root == "./croco-data"
    assert cfg.prompts.path == "builtin:demo"


def test_unknown_key_fails_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generation:\n  k: 4\n  temprature: 0.7\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "generation.temprature: unknown key" in str(e.value)
    assert str(path) in str(e.value)


def test_wrong_type_fails_with_its_path():
    with pytest.raises(ConfigError, match=r"generation\.k: Input should be a valid integer"):
        load_config(None, ["generation.k=many"])


def test_unknown_language_code_is_rejected():
    with pytest.raises(ConfigError, match=r"languages: .*'xx' is not an ISO 639-1"):
        load_config(None, ["languages=[en, xx]"])


def test_overrides_set_nested_values_parsed_as_yaml():
    cfg = load_config(None, ["generation.k=3", "pairing.scope=all_lang", "languages=[en, de]",
                             "prompts.limit=null"])
    assert cfg.generation.k == 3
    assert cfg.pairing.scope == "all_lang"
    assert cfg.languages == ["en", "de"]
    assert cfg.prompts.limit is None


def test_override_into_a_list_by_index():
    data = apply_overrides({"reward": {"scorers": [{"weight": 1}]}}, ["reward.scorers.0.weight=2"])
    assert data["reward"]["scorers"][0]["weight"] == 2


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["generation.k"])


def test_bad_reject_target_is_rejected():
    with pytest.raises(ConfigError, match="pairing.reject_target"):
        load_config(None, ["pairing.reject_target=median"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["demo.yaml", "paper-eurollm.yaml", "paper-tiny-aya.yaml"])
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "configs" / name)
    assert cfg.languages[0] == "en"
