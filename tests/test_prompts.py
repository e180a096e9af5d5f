from __future__ import annotations

import json

import polars as pl
import pytest

from croco import storage
from croco.config import PromptsConfig
from croco.prompts import PromptError, load_prompts, select_for_generation
from croco.stages import Prompts, run_prompts


def prompts_key(cfg: PromptsConfig) -> str:
    return Prompts(cfg=cfg, lang="en").key()


def test_builtin_demo_set_is_parallel_in_seven_languages():
    df = load_prompts("builtin:demo")
    langs = ["da", "de", "en", "es", "fr", "it", "nl"]
    assert sorted(df["lang"].unique()) == langs
    per_id = df.group_by("prompt_id").agg(pl.col("lang").sort())
    assert per_id.height >= 24
    assert all(v == langs for v in per_id["lang"].to_list())
    assert set(df["split"].unique()) == {"train", "heldout"}


def test_messages_are_filled_from_prompt(prompt_file):
    df = load_prompts(str(prompt_file))
    row = df.filter((pl.col("prompt_id") == "q0") & (pl.col("lang") == "de")).row(0, named=True)
    assert row["messages"] == [{"role": "user", "content": "Nenne eine Frucht."}]


def test_chat_messages_give_the_prompt(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt_id": "a", "lang": "en", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}) + "\n")
    df = load_prompts(str(path))
    assert df["prompt"].to_list() == ["Hi?"]
    assert df["split"].to_list() == ["train"]


def test_lang_from_file_name_and_hive_folder(tmp_path):
    (tmp_path / "de.jsonl").write_text(json.dumps({"prompt_id": "a", "prompt": "Hallo?"}) + "\n")
    (tmp_path / "lang=fr").mkdir()
    pl.DataFrame({"prompt_id": ["a"], "prompt": ["Salut ?"]}).write_parquet(
        tmp_path / "lang=fr" / "part.parquet")
    df = load_prompts(str(tmp_path))
    assert df.select("lang", "prompt").rows() == [("de", "Hallo?"), ("fr", "Salut ?")]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_id": "a", "lang": "en", "prompt": "ok"}\n{"prompt_id": "b", \n')
    with pytest.raises(PromptError, match=r"bad\.jsonl line 2: not valid JSON"):
        load_prompts(str(path))


def test_missing_field_names_row_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt_id": "a", "lang": "en"}) + "\n")
    with pytest.raises(PromptError, match=r"p\.jsonl line 1: missing or empty field 'prompt'"):
        load_prompts(str(path))


def test_unknown_language_code_in_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt_id": "a", "lang": "eng", "prompt": "x"}) + "\n")
    with pytest.raises(PromptError, match=r"line 1: field 'lang': 'eng' is not an ISO 639-1"):
        load_prompts(str(path))


def test_duplicate_prompt_id_in_a_language(tmp_path):
    path = tmp_path / "p.jsonl"
    row = json.dumps({"prompt_id": "a", "lang": "en", "prompt": "x"})
    path.write_text(row + "\n" + row + "\n")
    with pytest.raises(PromptError, match="appears 2 times"):
        load_prompts(str(path))


def test_bad_input_writes_nothing_final(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt_id": "a", "lang": "en", "prompt": "x"}\nnot json\n')
    root = str(tmp_path / "data")
    with pytest.raises(PromptError):
        run_prompts(PromptsConfig(path=str(path)), "en", root)
    out = storage.join(root, "prompts", prompts_key(PromptsConfig(path=str(path))), "lang=en")
    assert not storage.exists(out)


def test_language_absent_from_source_is_a_clear_error(prompt_file, tmp_path):
    with pytest.raises(PromptError, match=r"no prompts in language 'it'"):
        run_prompts(PromptsConfig(path=str(prompt_file)), "it", str(tmp_path))


def test_select_for_generation_takes_split_and_limit(prompt_file):
    df = select_for_generation(load_prompts(str(prompt_file)), split="train", limit=2)
    assert df.filter(pl.col("lang") == "en")["prompt_id"].to_list() == ["q0", "q1"]
    assert df.height == 2 * 4
    held = select_for_generation(load_prompts(str(prompt_file)), split="heldout")
    assert sorted(held["prompt_id"].unique()) == ["q4", "q5"]


def test_prompt_key_follows_file_content(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt_id": "a", "lang": "en", "prompt": "x"}) + "\n")
    k1 = prompts_key(PromptsConfig(path=str(path)))
    path.write_text(json.dumps({"prompt_id": "a", "lang": "en", "prompt": "y"}) + "\n")
    assert prompts_key(PromptsConfig(path=str(path))) != k1


def test_translate_stage_writes_a_parallel_set(tiny_lm, prompt_file, tmp_path):
    cfg = PromptsConfig(path=str(prompt_file),
                        translate={"model": tiny_lm, "source_lang": "en", "max_new_tokens": 4})
    uri = run_prompts(cfg, "it", str(tmp_path))
    df = storage.read_parquet(storage.join(uri, "data.parquet"))
    src = load_prompts(str(prompt_file)).filter(pl.col("lang") == "en")
    assert df["prompt_id"].to_list() == src["prompt_id"].to_list()
    assert set(df["lang"]) == {"it"}
    assert df["split"].to_list() == src["split"].to_list()
    assert all("translated:en->it" in s for s in df["source"])
