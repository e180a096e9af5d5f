from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from croco import storage
from croco.config import GenerationConfig, PolicyConfig, PromptsConfig
from croco.generation import GENERATION_SCHEMA, conversations_for, generate_frame
from croco.generation.transformers import TransformersGenerator
from croco.prompts import load_prompts
from croco.stages import run_generate, run_prompts


def test_samples_share_one_prefill_and_match_plain_generate(tiny_lm):
    gen = TransformersGenerator(tiny_lm)
    convs = [[{"role": "user", "content": "Name a fruit."}],
             [{"role": "user", "content": "Warum ist der Himmel blau? Bitte kurz."}]]
    shared = gen.generate(convs, k=3, temperature=0.0, max_new_tokens=8)
    enc = gen._encode(convs)
    plain = gen.model.generate(**enc, do_sample=False, max_new_tokens=8,
                               pad_token_id=gen.tokenizer.pad_token_id)
    width = enc["input_ids"].shape[1]
    for samples, ref in zip(shared, plain):
        expected = gen.tokenizer.decode(ref[width:], skip_special_tokens=True).strip()
        assert [s.text for s in samples] == [expected] * 3


def test_sampling_is_seeded(tiny_lm):
    gen = TransformersGenerator(tiny_lm)
    convs = [[{"role": "user", "content": "Name a fruit."}]]
    a = gen.generate(convs, k=4, temperature=1.0, max_new_tokens=6, seed=3)
    b = gen.generate(convs, k=4, temperature=1.0, max_new_tokens=6, seed=3)
    c = gen.generate(convs, k=4, temperature=1.0, max_new_tokens=6, seed=4)
    assert a == b
    assert a != c
    assert len({s.text for s in a[0]}) > 1


def test_generation_table_has_the_contract_columns(tiny_lm, prompt_file):
    prompts = load_prompts(str(prompt_file)).filter(pl.col("lang") == "fr").head(2)
    df = generate_frame(TransformersGenerator(tiny_lm), prompts, k=3, temperature=1.0, top_p=1.0,
                        max_new_tokens=5, batch_size=4, seed=0, policy="tiny")
    assert df.schema == pl.Schema(GENERATION_SCHEMA)
    assert df.height == 6
    assert df["sample_idx"].to_list() == [0, 1, 2, 0, 1, 2]
    assert set(df["finish_reason"]) <= {"stop", "length"}
    assert df.filter(pl.col("finish_reason") == "length")["n_tokens"].to_list() == [5] * df.filter(
        pl.col("finish_reason") == "length").height


def test_respond_in_language_instruction(prompt_file):
    prompts = load_prompts(str(prompt_file)).filter(pl.col("lang") == "de").head(1)
    convs = conversations_for(prompts, respond_in_language=True,
                              instruction_template="Respond in {language}.")
    assert convs[0][-1]["content"].endswith("\n\nRespond in German.")


def test_crash_mid_generation_resumes_at_the_next_shard(tiny_lm, prompt_file, tmp_path):
    root = str(tmp_path)
    pcfg = PromptsConfig(path=str(prompt_file), limit=4)
    prompts_uri = run_prompts(pcfg, "en", root)
    policy = PolicyConfig(model=tiny_lm)
    gen = GenerationConfig(k=2, max_new_tokens=4, batch_size=4, shard_size=1)

    class Crash(RuntimeError):
        pass

    def crash_after_two(i):
        if i == 1:
            raise Crash()

    with pytest.raises(Crash):
        run_generate(prompts_uri, "en", policy, gen, pcfg, root, on_shard=crash_after_two)
    # every part is a whole stored shard: the two made before the crash are in the store
    # (samples + prompts file), and the output folder holds nothing yet
    gens = storage.join(root, "generations")
    (key,) = storage.list_dir(gens)
    out = storage.join(gens, key, "lang=en")
    assert storage.list_dir(out) == []
    assert not storage.is_complete(out)
    (skey,) = storage.list_dir(storage.join(root, "samples"))
    store = tmp_path / "samples" / skey / "lang=en"
    stored = sorted(p.name for p in store.glob("*.parquet") if not p.name.startswith("_"))
    assert len(stored) == 2 * 2
    before = {p: (store / p).stat().st_mtime_ns for p in stored}

    done = []
    uri = run_generate(prompts_uri, "en", policy, gen, pcfg, root, on_shard=done.append)
    assert uri == out
    assert done == [2, 3]  # only the missing shards ran
    for p, mtime in before.items():
        assert (store / p).stat().st_mtime_ns == mtime
    # the output references the four stored shards instead of copying them
    assert sorted(storage.list_dir(out)) == ["_SUCCESS", storage.REFERENCES]
    assert len(storage.references(out)) == 4
    df = storage.read_parquet(uri)
    assert df.height == 4 * 2
    assert sorted(df["prompt_id"].unique()) == ["q0", "q1", "q2", "q3"]
    assert storage.is_complete(uri)


def test_held_out_answers_of_every_language_are_generated_and_scored_together(
        tiny_lm, tiny_rm, prompt_file, tmp_path, monkeypatch):
    from croco.config import RewardConfig
    from croco.stages import run_generate_languages, run_score_languages

    root = str(tmp_path)
    pcfg = PromptsConfig(path=str(prompt_file), split="heldout", limit=2)
    prompts = {lang: run_prompts(pcfg, lang, root) for lang in ("en", "de", "fr")}
    policy = PolicyConfig(model=tiny_lm)
    gen = GenerationConfig(k=1, temperature=0.0, max_new_tokens=4, batch_size=32)
    gens = run_generate_languages(prompts, policy, gen, pcfg, root)
    assert sorted(gens) == ["de", "en", "fr"]
    for lang, uri in gens.items():
        assert uri.endswith(f"lang={lang}") and storage.is_complete(uri)
        df = storage.read_parquet(uri)
        assert sorted(df["prompt_id"]) == ["q4", "q5"] and set(df["lang"]) == {lang}
    reward = RewardConfig(scorers=[{"type": "classifier", "name": "rm", "model": tiny_rm}])
    scores = run_score_languages(gens, prompts, reward, root)
    for lang, uri in scores.items():
        df = storage.read_parquet(uri)
        assert df.height == 2 and set(df["lang"]) == {lang}
        assert df["reward"].to_list() == df["reward_rm"].to_list()

    # Complete outputs are returned as they are: no model is loaded again.
    def no_model(*args, **kwargs):
        raise AssertionError("a complete output was computed again")

    monkeypatch.setattr("croco.generation.make_generator", no_model)
    monkeypatch.setattr("croco.reward.score_frame", no_model)
    assert run_generate_languages(prompts, policy, gen, pcfg, root) == gens
    assert run_score_languages(gens, prompts, reward, root) == scores


def test_shard_groups_are_contiguous_and_cover_every_shard_once():
    from croco.stages import shard_group

    assert [shard_group(7, g, 3) for g in range(3)] == [range(3), range(3, 5), range(5, 7)]
    assert [shard_group(6, g, 3) for g in range(3)] == [range(2), range(2, 4), range(4, 6)]
    # more groups than shards: the last groups are empty
    assert [list(shard_group(2, g, 3)) for g in range(3)] == [[0], [1], []]
    with pytest.raises(ValueError, match="groups are 0..2"):
        shard_group(7, 3, 3)


def test_shard_groups_write_the_same_bytes_as_one_call_and_seal_when_all_are_there(
        tiny_lm, prompt_file, tmp_path):
    from croco.stages import seal_generations, shard_group

    pcfg = PromptsConfig(path=str(prompt_file), limit=4)
    policy = PolicyConfig(model=tiny_lm)
    gen = GenerationConfig(k=2, max_new_tokens=4, batch_size=4, shard_size=1)
    whole_root, grouped_root = str(tmp_path / "whole"), str(tmp_path / "grouped")
    whole = run_generate(run_prompts(pcfg, "de", whole_root), "de", policy, gen, pcfg,
                         whole_root)
    prompts_uri = run_prompts(pcfg, "de", grouped_root)
    # groups run in any order; the output is complete only once the last shard is written
    out = run_generate(prompts_uri, "de", policy, gen, pcfg, grouped_root,
                       shards=shard_group(4, 2, 3))
    # each part is a whole stored shard: group 2 sampled one into the store, wrote nothing
    # into the output but the record of what it did
    assert storage.list_dir(out) == ["_groups"] and not storage.is_complete(out)
    assert storage.read_json(storage.join(out, "_groups", "00003-00003.json"))[
        "generated_rows"] == 2
    (skey,) = storage.list_dir(storage.join(grouped_root, "samples"))
    assert len([n for n in storage.list_dir(storage.join(grouped_root, "samples", skey,
                                                         "lang=de"))
                if n.endswith(".prompts.parquet")]) == 1
    with pytest.raises(RuntimeError, match=r"3 of 4 shards are missing \(part-00000.parquet, "
                                           r"part-00001.parquet, part-00002.parquet\)"):
        seal_generations(prompts_uri, "de", policy, gen, pcfg, grouped_root)
    run_generate(prompts_uri, "de", policy, gen, pcfg, grouped_root, shards=shard_group(4, 0, 3))
    assert not storage.is_complete(out)
    run_generate(prompts_uri, "de", policy, gen, pcfg, grouped_root, shards=shard_group(4, 1, 3))
    assert storage.is_complete(out)  # the last group to finish sealed it
    assert seal_generations(prompts_uri, "de", policy, gen, pcfg, grouped_root) == out
    assert out.removeprefix(grouped_root) == whole.removeprefix(whole_root)  # same key
    files, whole_files = storage.parquet_files(out), storage.parquet_files(whole)
    assert len(files) == len(whole_files) == 4
    for a, b in zip(files, whole_files, strict=True):
        assert a.removeprefix(grouped_root) == b.removeprefix(whole_root)
        assert storage.read_bytes(a) == storage.read_bytes(b), a
    done = storage.read_json(storage.join(out, storage.SUCCESS))
    assert done["rows"] == 4 * 2
    # what the three groups did, summed by the one that sealed: every sample was drawn now
    assert done["generated_rows"] == 4 * 2 and done["groups"] == 3 and done["seconds"] > 0


def test_a_reused_shard_deleted_from_the_store_fails_naming_the_plan_to_delete(
        tiny_lm, prompt_file, tmp_path):
    from croco.stages import generation_plan, generation_uri, plan_uri

    root = str(tmp_path)
    pcfg = PromptsConfig(path=str(prompt_file), limit=4)
    policy = PolicyConfig(model=tiny_lm)
    gen = GenerationConfig(k=2, max_new_tokens=4, batch_size=4, shard_size=2)
    prompts_uri = run_prompts(pcfg, "fr", root)
    run_generate(prompts_uri, "fr", policy, gen, pcfg, root)
    # a second prompt set that keeps q0 only of the first shard (q0, q1)
    fewer = PromptsConfig(path=str(prompt_file), limit=1)
    plan = generation_plan(prompts_uri, "fr", policy, gen, fewer, root)
    (part,) = plan["parts"]
    assert part["prompt_ids"] == ["q0"]
    storage.remove(storage.join(plan["store"], f"{part['shard']}.prompts.parquet"))
    out = generation_uri(prompts_uri, "fr", policy, gen, fewer, root)
    with pytest.raises(RuntimeError, match=r"stored shard .* prompts q0, is gone; delete "
                                           + re.escape(plan_uri(out))):
        run_generate(prompts_uri, "fr", policy, gen, fewer, root)


def test_next_tokens_draws_from_the_tempered_distribution():
    import torch

    from croco.generation.transformers import next_tokens

    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.9]])
    logits = probs.log()  # -inf where the probability is 0
    torch.manual_seed(0)
    n = 20000
    draws = next_tokens(logits.repeat(n, 1), temperature=1.0).view(n, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=4).float() / n
        assert torch.allclose(freq, probs[row], atol=0.015), (row, freq)
        assert freq[probs[row] == 0].sum() == 0  # impossible tokens are never drawn
    # temperature 2 flattens: p ~ sqrt(p0)
    hot = next_tokens(logits[:1].repeat(n, 1), temperature=2.0)
    want = probs[0].sqrt() / probs[0].sqrt().sum()
    assert torch.allclose(torch.bincount(hot, minlength=4).float() / n, want, atol=0.015)
    assert next_tokens(logits, temperature=0.0).tolist() == [0, 3]  # greedy


def test_next_tokens_top_p_keeps_the_nucleus_of_transformers_top_p():
    import torch
    from transformers import TopPLogitsWarper

    torch.manual_seed(1)
    logits = torch.randn(3, 12) * 2
    n = 6000
    for top_p in (0.5, 0.8, 0.95):
        kept = TopPLogitsWarper(top_p)(None, logits.clone()).isfinite()
        want = torch.softmax(logits.masked_fill(~kept, float("-inf")), -1)
        from croco.generation.transformers import next_tokens

        draws = next_tokens(logits.repeat(n, 1), temperature=1.0, top_p=top_p).view(n, 3)
        for row in range(3):
            freq = torch.bincount(draws[:, row], minlength=12).float() / n
            assert freq[~kept[row]].sum() == 0, (top_p, row)
            assert torch.allclose(freq, want[row], atol=0.025), (top_p, row)


# ------------------------------------------------- draws independent of batching

FOUR = [[{"role": "user", "content": text}] for text in
        ("Name a fruit.", "Was ist Regen?", "Cite une couleur, s'il te plaît.", "Why?")]


def test_a_sample_is_the_same_whatever_the_batch_size(tiny_lm):
    gen = TransformersGenerator(tiny_lm)
    runs = {bs: gen.generate(FOUR, k=4, temperature=1.0, max_new_tokens=6, seed=0,
                             batch_size=bs) for bs in (1, 7, 16, 64)}
    assert runs[1] == runs[7] == runs[16] == runs[64]
    assert len({s.text for samples in runs[1] for s in samples}) > 4  # real draws


def test_a_sample_is_the_same_whatever_other_prompts_share_the_call(tiny_lm):
    gen = TransformersGenerator(tiny_lm)
    together = gen.generate(FOUR, k=3, temperature=1.0, max_new_tokens=6, seed=5)
    alone = [gen.generate([conv], k=3, temperature=1.0, max_new_tokens=6,
                          seed=5)[0] for conv in reversed(FOUR)]
    assert together == alone[::-1]


def test_nucleus_draws_keep_their_samples_whatever_other_prompts_share_the_call(tiny_lm):
    # With top_p < 1 a draw can still change when two tokens tie, within float rounding
    # of the batch's shape, at the nucleus's edge: on the random tiny model's flat
    # distribution, 2 of 216 samples did on an AMD EPYC (9 when the draw went in rank
    # order). A seed that depended on the call would change all of them.
    gen = TransformersGenerator(tiny_lm)
    together = gen.generate(FOUR, k=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=5)
    alone = [gen.generate([conv], k=3, temperature=1.0, top_p=0.9, max_new_tokens=6,
                          seed=5)[0] for conv in FOUR]
    same = sum(a == b for t, o in zip(together, alone) for a, b in zip(t, o))
    assert same >= 10, (same, together, alone)


def test_a_nucleus_draw_moves_with_the_logits_by_no_more_than_their_rounding():
    # Logits that differ by float32 rounding (another batch shape) pick the same tokens:
    # the draw inverts the nucleus's distribution in vocabulary order. In rank order, two
    # nearly equal probabilities that swap ranks hand the uniform number to another
    # token: 0.8 % of these draws changed that way, 0.1 % now.
    import torch

    from croco.generation.transformers import next_tokens, uniforms

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 49152, generator=g) * 0.3  # flat, as a random model's
    moved = logits + torch.randn(logits.shape, generator=g) * 2e-7
    u = torch.from_numpy(uniforms(np.arange(1000), 0))
    for top_p in (1.0, 0.9):
        a = next_tokens(logits, temperature=1.0, top_p=top_p, u=u)
        b = next_tokens(moved, temperature=1.0, top_p=top_p, u=u)
        assert (a != b).float().mean().item() <= 0.004, top_p
        assert len(set(a.tolist())) > 900  # real draws over a flat distribution


def test_top_p_below_1_moved_the_sample_keys_and_top_p_1_did_not():
    from croco.identity import identity
    from croco.samples import sample_store_uri

    policy = PolicyConfig(model="m")
    full, nucleus = GenerationConfig(k=2, top_p=1.0), GenerationConfig(k=2, top_p=0.9)
    assert "nucleus_draw" not in identity(full)
    assert identity(nucleus)["nucleus_draw"] == 2
    # the keys these settings had before the nucleus draw changed
    assert sample_store_uri(policy, full, "de", "/r") == "/r/samples/37f11cff51bb94d2/lang=de"
    assert sample_store_uri(policy, nucleus, "de", "/r") != "/r/samples/df6cb4887bbf3f9b/lang=de"


def test_sample_i_draws_with_its_conversation_seed_plus_i(tiny_lm):
    # vLLM's rule for a request of n samples: a k = 3 call's sample 1 is a k = 1 call's
    # sample 0 whose conversation seed is one higher
    from croco.generation.transformers import uniforms

    assert (uniforms(np.array([7, 8]), 3)[1] == uniforms(np.array([8]), 3)[0])
    draws = uniforms(np.arange(20_000), 0)
    assert 0.0 <= draws.min() and draws.max() < 1.0
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 1 / 12) < 0.005
    assert np.corrcoef(uniforms(np.arange(20_000), 1), draws)[0, 1] < 0.03


def _generations(uri: str) -> list[dict]:
    return storage.read_parquet(uri).sort("prompt_id", "sample_idx").drop("policy").to_dicts()


def test_shard_groups_and_a_resume_with_another_batch_size_give_the_one_call_samples(
        tiny_lm, prompt_file, tmp_path):
    from croco.stages import shard_group

    pcfg = PromptsConfig(path=str(prompt_file), limit=4)
    policy = PolicyConfig(model=tiny_lm)

    def gen(batch_size: int) -> GenerationConfig:
        return GenerationConfig(k=3, max_new_tokens=5, batch_size=batch_size, shard_size=1)

    def root(name: str) -> tuple[str, str]:
        r = str(tmp_path / name)
        return r, run_prompts(pcfg, "en", r)

    whole_root, p = root("whole")
    whole = _generations(run_generate(p, "en", policy, gen(64), pcfg, whole_root))
    # three shard groups, each on a worker with another batch size
    grouped_root, p = root("grouped")
    for g, bs in zip(range(3), (1, 7, 64)):
        out = run_generate(p, "en", policy, gen(bs), pcfg, grouped_root,
                           shards=shard_group(4, g, 3))
    assert storage.is_complete(out) and _generations(out) == whole
    # killed after two shards at batch size 1, resumed at batch size 7
    resumed_root, p = root("resumed")

    class Killed(RuntimeError):
        pass

    def kill_after_two(i):
        if i == 1:
            raise Killed()

    with pytest.raises(Killed):
        run_generate(p, "en", policy, gen(1), pcfg, resumed_root, on_shard=kill_after_two)
    out = run_generate(p, "en", policy, gen(7), pcfg, resumed_root)
    assert _generations(out) == whole
    assert len({r["response"] for r in whole}) > 4
