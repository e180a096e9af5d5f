"""The sample and score stores behind the generate and score stages.

Samples are kept per (policy, generation settings, language), whatever run or prompt set
asked for them, in `samples/<key>/lang=xx/`, as shards named by the hash of the
(prompt_id, prompt content) list they hold and sampled with a seed derived from that name;
`<shard>.prompts.parquet` beside each holds its prompts (written last: it marks the shard
complete; `_index.parquet` indexes them, so a plan reads one file). A run's generations
output is a per-run view: its plan (`generations/<key>/_plans/lang=xx.json`, made once)
says which stored shard each part comes from, and a part that is a whole stored shard
(the usual case) is referenced (`_parts.json`, `croco.storage.REFERENCES`), not copied:
only a part that takes some of a shard's prompts (a prompt removed, another `limit`) is
written as a file. Prompts the store holds reuse their samples; new or edited prompts (a new
content hash) are cut into new shards of `generation.shard_size`; a removed prompt is in
no part. Part i is the stored shard's rows of the plan's prompts.

Scoring works the same way: `scored/<key>/lang=xx/<shard>.parquet` holds the rewards of a
whole stored shard under one reward config, and a run's score part i is its rows of the
plan's prompts (again referenced when whole). So a grown prompt source samples and scores only the new prompts, and
pairs and everything after rerun on the whole set. A sample's draws depend only on the
generation seed, its prompt and its index (`croco.generation.conversation_seed`), not on
the shard or batch it was sampled in, so an incremental result equals a from-scratch run
of the same final prompt set (up to a draw that float rounding of the logits moves across
a token boundary, rare; see `croco.generation.transformers`).
"""

from __future__ import annotations

import posixpath

import polars as pl

from croco import storage
from croco.config import GenerationConfig, PolicyConfig, RewardConfig, stable_hash
from croco.identity import STAGE_VERSIONS, identity
from croco.storage import key_of


def sample_store_uri(policy: PolicyConfig, gen: GenerationConfig, lang: str,
                     data_root: str) -> str:
    """The samples of one (policy, generation settings, language): `samples/<key>/lang=xx/`.
    How prompts are grouped into shards (`shard_size`) and batched is left out: a shard
    names its own prompts."""
    key = stable_hash({"stage": "samples", "v": STAGE_VERSIONS["samples"],
                       "policy": identity(policy),
                       "generation": {k: v for k, v in identity(gen).items()
                                      if k != "shard_size"}})
    return storage.join(data_root, "samples", key, f"lang={lang}")


def prompt_identity(prompts: pl.DataFrame) -> list[list[str]]:
    """`[prompt_id, hash of its text or messages]` per row, in order: what decides a
    prompt's samples besides the policy and the generation settings."""
    cols = [c for c in ("prompt", "messages") if c in prompts.columns]
    return [[row["prompt_id"], stable_hash({c: row[c] for c in cols})]
            for row in prompts.select("prompt_id", *cols).to_dicts()]


#: The store's index of its shards' prompts: (shard, prompt_id, hash) rows, so that a plan
#: reads one file, not every shard's prompts file (one request each on an object store).
STORE_INDEX = "_index.parquet"
_SIDECAR = ".prompts.parquet"


def stored_shards(store: str) -> set[str]:
    """The complete shards of a store (one listing): those whose prompts file, written
    after their samples, is there."""
    return _complete_shards(storage.list_dir(store))


def _complete_shards(names: list[str]) -> set[str]:
    return {name.removesuffix(_SIDECAR) for name in names if name.endswith(_SIDECAR)}


def _store_index(store: str) -> pl.DataFrame:
    """(shard, prompt_id, hash) of every complete shard of the store. Read from the store's
    index, plus the prompts files of shards the index does not cover yet (then the index is
    rewritten to cover them). The prompts files are the truth: an index row of a shard not
    stored (gone, or planned and not sampled yet: `make_plan` adds the shards it plans) is
    ignored, and two planners that rewrite the index at once each write a true one."""
    names = storage.list_dir(store)
    shards = _complete_shards(names)
    schema = {"shard": pl.String, "prompt_id": pl.String, "hash": pl.String}
    where = storage.join(store, STORE_INDEX)
    index = pl.DataFrame(schema=schema)
    if STORE_INDEX in names:  # the listing says whether there is one: no request for nothing
        try:
            index = storage.read_parquet(where).filter(pl.col("shard").is_in(sorted(shards)))
        except FileNotFoundError:
            pass
    new = sorted(shards - set(index["shard"]))
    if new:
        rows = [{"shard": shard, "prompt_id": pid, "hash": h} for shard in new
                for pid, h in prompt_identity(storage.read_parquet(
                    storage.join(store, f"{shard}{_SIDECAR}")))]
        index = pl.concat([index, pl.DataFrame(rows, schema=schema)])
        storage.write_parquet(index, where)
    return index


def plan_uri(generations_uri: str) -> str:
    """Where a run's generations output keeps its plan: next to the `lang=` folders, so the
    folder itself holds only its parts."""
    head, lang_dir = posixpath.split(generations_uri.rstrip("/"))
    return storage.join(head, "_plans", f"{lang_dir}.json")


def read_plan(where: str) -> dict | None:
    """The plan at `where` (`plan_uri`), None when there is none yet (or when the flow's
    completion check has just listed the output and found none there: no request)."""
    if storage.absent_when_listed(where):
        return None
    try:
        return storage.read_json(where)
    except FileNotFoundError:
        return None


def make_plan(out: str, prompts, store: str, shard_size: int,
              listed: dict | None = None) -> dict:
    """Which stored shard each part of the generations output `out` comes from:
    `{"store": URI, "parts": [{"shard": name, "prompt_ids": [...]}, ...]}`.

    Made once per output (then read back, so every shard group sees the same numbering):
    prompts whose (id, content) the store already holds reuse those samples, one part per
    stored shard, in the prompts' order; the others are cut into new shards of
    `shard_size`, each named by the hash of its prompts. A prompt removed from the source
    is in no part; an edited one is new. `whole`: the part is its stored shard entire (the
    usual case), so the output references the stored file instead of copying it; plans
    made before parts could be references lack it and are read as copies. `prompts`: the
    output's prompts, or a callable that reads them (only when the plan is made).
    `listed`: when this call makes the plan, `listed["stored"]` gets the stored shards it
    reuses (found by the store's listing just now; the shards it adds are not stored
    yet), so a caller about to ask which parts exist need not list the store again."""
    where = plan_uri(out)
    plan = read_plan(where)
    if plan is not None:
        return plan
    table = _store_index(store)
    index: dict[tuple[str, str], str] = {}
    for shard, pid, h in table.iter_rows():
        index.setdefault((pid, h), shard)
    size = dict(table.group_by("shard").len().iter_rows())
    reused: dict[str, list[str]] = {}
    new: list[list[str]] = []
    for pid, h in prompt_identity(prompts() if callable(prompts) else prompts):
        shard = index.get((pid, h))
        if shard is None:
            new.append([pid, h])
        else:
            reused.setdefault(shard, []).append(pid)
    parts = [{"shard": shard, "prompt_ids": ids, "whole": len(ids) == size[shard]}
             for shard, ids in reused.items()]
    for i in range(0, len(new), shard_size):
        chunk = new[i:i + shard_size]
        parts.append({"shard": stable_hash(chunk), "prompt_ids": [pid for pid, _ in chunk],
                      "whole": True})
    plan = {"store": store, "parts": parts}
    if new:
        # The index gets the shards this plan adds now, before they are sampled: it is
        # read through the store's listing (a row whose shard is not stored yet is left
        # out), so the next plan finds them in it instead of reading their prompts files.
        rows = [{"shard": stable_hash(new[i:i + shard_size]), "prompt_id": pid, "hash": h}
                for i in range(0, len(new), shard_size) for pid, h in new[i:i + shard_size]]
        storage.write_parquet(pl.concat([table, pl.DataFrame(rows, schema=table.schema)]),
                              storage.join(store, STORE_INDEX))
    storage.write_json(where, plan, keep=True)  # the score stage reads it back
    if listed is not None:
        listed["stored"] = frozenset(reused)
    return plan


class StoreSampler:
    """Reads a stored shard, or samples it into the store first (loading the model once,
    only if some shard is missing). `prompts`: the output's prompts (a callable, read only
    when a shard must be sampled)."""

    def __init__(self, store: str, plan: str, prompts, lang: str, policy: PolicyConfig,
                 gen: GenerationConfig):
        self.store, self.plan, self.lang, self.policy, self.gen = store, plan, lang, policy, gen
        self.prompts = prompts
        self.generator = None
        self.generated_rows = 0

    def samples(self, shard: str, prompt_ids: list[str]) -> pl.DataFrame:
        uri = storage.join(self.store, f"{shard}.parquet")
        if not storage.is_file(storage.join(self.store, f"{shard}{_SIDECAR}")):
            self._sample(shard, prompt_ids, uri)
        return storage.read_parquet(uri)

    def make(self, shard: str, prompt_ids: list[str]) -> None:
        """Sample a shard into the store (the caller knows it is not there)."""
        self._sample(shard, prompt_ids, storage.join(self.store, f"{shard}.parquet"))

    def _sample(self, shard: str, prompt_ids: list[str], uri: str) -> None:
        from croco.generation import (generate_frame, make_generator, policy_label,
                                      vllm_options)

        gen, policy = self.gen, self.policy
        prompts = self.prompts().filter(pl.col("prompt_id").is_in(prompt_ids))
        if stable_hash(prompt_identity(prompts)) != shard:
            # a reused shard deleted from the store: its other prompts are not in this run
            raise RuntimeError(
                f"{self.store}: stored shard {shard}, which this output's plan reuses for "
                f"prompts {', '.join(prompt_ids[:5])}, is gone; delete {self.plan} and rerun "
                "(the prompts are planned again and sampled anew)")
        if self.generator is None:
            self.generator = make_generator(gen.backend, policy.model, adapter=policy.adapter,
                                            device=policy.device, dtype=policy.dtype,
                                            tensor_parallel_size=gen.tensor_parallel_size,
                                            seed=gen.seed, **vllm_options(gen),
                                            work_tokens=prompts.height * gen.k
                                            * gen.max_new_tokens)
        df = generate_frame(
            self.generator, prompts, k=gen.k, temperature=gen.temperature, top_p=gen.top_p,
            max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
            seed=gen.seed,
            policy=policy_label(policy.model, policy.adapter),
            respond_in_language=gen.respond_in_language,
            instruction_template=gen.instruction_template,
        )
        storage.write_parquet(df, uri)
        # the prompts file last: its presence says the shard is complete
        storage.write_parquet(prompts, storage.join(self.store, f"{shard}{_SIDECAR}"),
                              keep=True)  # named by its content; the score stage reads it
        self.generated_rows += df.height


def scored_store_uri(store: str, lang: str, reward: RewardConfig, data_root: str) -> str:
    """The rewards of a sample store's shards under one reward config:
    `scored/<key>/lang=xx/<shard>.parquet`, each the scores of the whole stored shard."""
    key = stable_hash({"stage": "scores", "v": STAGE_VERSIONS["scores"],
                       "samples": key_of(store),
                       "reward": identity(reward)})
    return storage.join(data_root, "scored", key, f"lang={lang}")


def scored_shard(store: str, shard: str, lang: str, reward: RewardConfig,
                 data_root: str) -> pl.DataFrame:
    """The scores of one stored generation shard, scored (with the prompts stored beside
    it) and kept the first time any run asks for them."""
    uri = storage.join(scored_store_uri(store, lang, reward, data_root), f"{shard}.parquet")
    if not storage.is_file(uri):
        score_shard(store, shard, reward, uri)
    return storage.read_parquet(uri)


def score_shard(store: str, shard: str, reward: RewardConfig, uri: str) -> None:
    """Score a stored generation shard (with the prompts stored beside it) into `uri`."""
    from croco.reward import score_frame

    gens = storage.read_parquet(storage.join(store, f"{shard}.parquet"))
    prompts = storage.read_parquet(storage.join(store, f"{shard}{_SIDECAR}"))
    storage.write_parquet(score_frame(gens, prompts, reward.scorers, device=reward.device), uri)
