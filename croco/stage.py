"""The stage contract: what every stage of the pipeline is, and the one runner for all.

A stage is a small typed spec (`Stage`, a frozen pydantic model): its inputs by URI and
the config sections it depends on are its fields, and it declares

- `folder`: where its outputs live, `<data_root>/<folder>/<key>[/lang=xx]`; its code
  version is `STAGE_VERSIONS[folder]` (`croco.identity`, beside the marks that say which
  config fields enter an identity);
- `identity()`: what its key hashes besides the folder and version (input URIs by their
  keys, config sections by `croco.identity.identity`, files by their content); the key
  is `stable_hash({"stage": folder, "v": version, **identity()})`;
- `work(out, progress)`: write its files under `out` (each atomically, `croco.storage`)
  and return what `_SUCCESS` records (rows, ...);
- `label()`: its name in logs and task runs (`generate-en`); `uses_gpu()`; a `summary`
  log line and an `artifact` table for the UI, both optional.

`run(stage, data_root)` is the runner: if the output is complete (`_SUCCESS`) it returns
at once; otherwise the stage works and `_SUCCESS` is written last, with the seconds the
work took. A `ShardedStage` (generate, score) writes numbered parts instead: `run`
writes the missing ones (a crash loses at most the part in progress), for one shard group
(`shards`) or all, and whichever call writes the last part seals the output; `seal`
completes an output after its shard groups ran elsewhere. A part can be a stored file
that the output references instead of copying (`Parts.reference`).

The Prefect side is one generic task, `croco.tasks.stages.stage_task`, which runs any
stage with retries, a GPU slot when it uses one and a cache keyed on the stage's key. A
new stage is one spec class and its `work`; declare it in `croco.plan.STAGES` too, so
the truth table (docs/what-a-change-reruns.md) covers it. See docs/architecture.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

import polars as pl
from pydantic import BaseModel, ConfigDict

from croco import storage
from croco.config import stable_hash
from croco.identity import STAGE_VERSIONS

Progress = Callable[[int, int], None]


class Stage(BaseModel):
    """One stage call: its inputs (URIs, config sections) as fields. Subclasses set
    `folder` and implement `identity`, `work` and `label`."""

    model_config = ConfigDict(frozen=True)

    folder: ClassVar[str]
    #: Its entry in `STAGE_VERSIONS` when it shares its folder with another stage (the
    #: held-out answers and scores): each stage's code has its own version.
    versioned_as: ClassVar[str | None] = None
    gpu: ClassVar[bool] = True

    @property
    def version(self) -> int:
        return STAGE_VERSIONS[self.versioned_as or self.folder]

    def identity(self) -> dict:
        raise NotImplementedError

    def key(self) -> str:
        return stable_hash({"stage": self.folder, "v": self.version, **self.identity()})

    def where(self) -> str:
        """The output's place under the data root, `<folder>/<key>[/lang=xx]`: what tells
        two calls apart (a stage's key leaves out the language its output is filed under)."""
        lang = getattr(self, "lang", None)
        return "/".join([self.folder, self.key(), *([f"lang={lang}"] if lang else [])])

    def output(self, data_root: str) -> str:
        return storage.join(data_root, self.where())

    def label(self) -> str:
        raise NotImplementedError

    def uses_gpu(self) -> bool:
        return self.gpu

    def work(self, out: str, progress: Progress | None) -> dict:
        """Write the output under `out` (each file atomically, `croco.storage`); return what
        `_SUCCESS` records (rows, ...). The runner writes the marker, never the stage."""
        raise NotImplementedError

    def markers(self, data_root: str) -> list[str]:
        """The folders whose `_SUCCESS` markers together make this call complete."""
        return [self.output(data_root)]

    def complete(self, data_root: str) -> bool:
        return all(storage.is_complete(u) for u in self.markers(data_root))

    def result(self, data_root: str) -> Any:
        """What running the stage returns: its output URI (a stage with several outputs:
        lang -> URI)."""
        return self.output(data_root)

    def summary(self, result: Any) -> str | None:
        """One log line on a finished output."""
        return None

    def artifact(self, result: Any) -> tuple[str, str, list[dict]] | None:
        """(key, description, rows) of a table to show in the UI, or None."""
        return None


def part_name(shard: int) -> str:
    """The file name of shard `shard` of a generation or score output."""
    return f"part-{shard:05d}.parquet"


def shard_group(n_shards: int, group: int, groups: int) -> range:
    """The contiguous shard indices that group `group` (0-based) of `groups` covers: sizes
    differ by at most one, earlier groups first (7 shards in 3 groups: 0-2, 3-4, 5-6); a
    group past the last shard is empty."""
    if not 0 <= group < groups:
        raise ValueError(f"shard group {group} does not exist: groups are 0..{groups - 1}")
    size, extra = divmod(n_shards, groups)
    start = group * size + min(group, extra)
    return range(start, start + size + (group < extra))


class LanguagesTogether(Stage):
    """A stage that runs every language at once (held-out sets are small) and writes one
    `lang=xx/` folder with its own `_SUCCESS` per language, the layout of the per-language
    stages: its result maps language -> folder, complete when every folder is. Its `work`
    writes every folder and returns language -> what that folder's `_SUCCESS` records.
    `languages()`: the run's languages (the keys of the stage's per-language inputs)."""

    def languages(self) -> list[str]:
        raise NotImplementedError

    def folders(self, out: str) -> dict[str, str]:
        """language -> its folder under the output `out`."""
        return {lang: storage.join(out, f"lang={lang}") for lang in sorted(self.languages())}

    def result(self, data_root: str) -> dict[str, str]:
        return self.folders(self.output(data_root))

    def markers(self, data_root: str) -> list[str]:
        return list(self.result(data_root).values())


class Parts:
    """How a sharded stage makes its parts: `count`, `rows(i)` (part i's table) and
    `info()` (extra `_SUCCESS` fields, e.g. rows sampled now).

    A part can also be a file kept elsewhere, whole: `reference(i)` names it (a stored
    shard of the sample or score store), `stored()` says which referenced parts exist
    already (one listing) and `store(i)` makes one. Such a part is written nowhere in the
    output: the sealed output's `_parts.json` (`croco.storage.REFERENCES`) names it, so a
    run's view of the stores costs no copy."""

    count: int

    def rows(self, i: int) -> pl.DataFrame:
        raise NotImplementedError

    def reference(self, i: int) -> str | None:
        """The URI of the stored file that is part i entire; None: part i is written."""
        return None

    def stored(self) -> set[int]:
        """The parts with a reference whose file exists now."""
        return set()

    def store(self, i: int) -> None:
        """Make the file `reference(i)` names."""
        raise NotImplementedError

    def total_rows(self) -> int | None:
        """The rows of all parts together when known without reading them (None: counted
        from the files' footers, a request or two per part on an object store)."""
        return None

    def info(self) -> dict:
        return {}


class ShardedStage(Stage):
    """A stage whose output is numbered parts (`part-00000.parquet` ...), written and
    resumed one by one, possibly by several shard groups at once. `planned`: the stage
    fixes its parts in `prepare` before shard groups start."""

    planned: ClassVar[bool] = False

    def parts(self, data_root: str) -> Parts:
        raise NotImplementedError

    def n_parts(self, data_root: str) -> int:
        raise NotImplementedError

    def prepare(self, data_root: str) -> str | None:
        """Fix anything every shard group must agree on before they start (the
        generation plan); returns its URI, None when there is nothing to fix."""
        return None


def _missing(out: str, parts: Parts, wanted: range) -> list[int]:
    """The parts of `wanted` not made yet: a written part without its file in `out`, a
    referenced one without its stored file (a listing of each, where needed)."""
    referenced = {i for i in wanted if parts.reference(i)}
    # each listing only when some part is of its kind (a run's view of the stores is
    # usually references only)
    existing = set(storage.list_dir(out)) if len(referenced) < len(wanted) else set()
    stored = parts.stored() if referenced else set()
    return [i for i in wanted
            if (i not in stored if i in referenced else part_name(i) not in existing)]


def _seal(out: str, parts: Parts, info: dict) -> None:
    """Mark a sharded output complete (every part is made): `_parts.json` names the
    referenced parts, then `_SUCCESS` records the rows (read from the files' footers)."""
    refs = {part_name(i): ref for i in range(parts.count) if (ref := parts.reference(i))}
    if refs:
        storage.write_references(out, refs)
    rows = parts.total_rows()
    if rows is None:
        rows = storage.parquet_rows([refs.get(part_name(i)) or storage.join(out, part_name(i))
                                     for i in range(parts.count)])
    storage.mark_complete(out, {"rows": rows, "shards": parts.count,
                                "referenced": len(refs), **info})


def run_once(out: str, work: Callable[[], dict], *, checked: bool = False) -> str:
    """`out` as it is when complete; otherwise `work()` writes it and returns what
    `_SUCCESS` records, which is written last with the seconds the work took. `checked`:
    the caller has just found `out` incomplete (no second request to ask again)."""
    if not checked and storage.is_complete(out):
        return out
    storage.sweep_temporary(out)  # what a writer killed here earlier left
    t0 = time.perf_counter()
    info = work()
    storage.mark_complete(out, {**info, "seconds": round(time.perf_counter() - t0, 3)})
    return out


def _run_languages(stage: LanguagesTogether, data_root: str, progress: Progress | None) -> None:
    """Every language's folder written by one `work`, then each marked complete."""
    folders = stage.result(data_root)
    for uri in folders.values():
        storage.sweep_temporary(uri)
    t0 = time.perf_counter()
    infos = stage.work(stage.output(data_root), progress)
    seconds = round(time.perf_counter() - t0, 3)
    missing = sorted(set(folders) - set(infos))
    if missing:
        raise RuntimeError(f"{stage.label()}: wrote nothing for {', '.join(missing)}")
    for lang, uri in folders.items():
        storage.mark_complete(uri, {**infos[lang], "seconds": seconds})


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


#: glibc's `mallopt` parameter for the number of malloc arenas.
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas for this process at `arenas` (its default is 8 a core),
    unless `MALLOC_ARENA_MAX` is set in the environment (then that rules). Every thread
    that allocates gets an arena of its own up to that cap, and freed memory stays in the
    arena that held it: a run whose stage tasks run in threads (shard groups in one
    process) otherwise keeps a few hundred MB more resident. Measured with 4 shard groups
    a language (3 languages, N = 500, benchmarks/RESULTS.md): peak RSS 1,568 MB against
    1,407 MB with 2 arenas, 1,373 MB with one group; wall time unchanged. Call it before
    the threads start: `croco`'s flows do when imported."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    lib = _libc()
    if lib is not None and hasattr(lib, "mallopt"):
        lib.mallopt(_M_ARENA_MAX, arenas)


def release_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`; nothing
    elsewhere). Run after every stage that did work: a process that runs stage after stage
    (the in-process run, a Slurm job, a worker's flow run) otherwise keeps each stage's
    peak as its resident size, and the next stage's peak lands on top of it. Well under a
    millisecond; no `gc.collect()`, which takes ~0.17 s in a process with torch loaded (this
    machine), a second per few stages of a nightly rerun."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def run(stage: Stage, data_root: str, *, progress: Progress | None = None,
        shards: range | None = None, on_shard: Callable[[int], None] | None = None,
        checked: bool = False) -> Any:
    """Run `stage` unless its output is complete; returns `stage.result(data_root)`.
    `shards` (a `ShardedStage` only): write only these parts (a shard group); `on_shard(i)`
    is called after part i is written; `checked`: the caller has just found the output
    incomplete (no second request to ask again). The memory the work freed is handed back
    after it (`release_memory`)."""
    if not checked and stage.complete(data_root):
        return stage.result(data_root)
    try:
        return _run(stage, data_root, progress, shards, on_shard)
    finally:
        release_memory()


def _run(stage: Stage, data_root: str, progress: Progress | None, shards: range | None,
         on_shard: Callable[[int], None] | None) -> Any:
    if isinstance(stage, ShardedStage):
        _run_parts(stage, data_root, progress, shards, on_shard)
        return stage.result(data_root)
    if shards is not None:
        raise ValueError(f"{stage.label()}: only a sharded stage takes shards")
    if isinstance(stage, LanguagesTogether):
        _run_languages(stage, data_root, progress)
        return stage.result(data_root)
    out = stage.output(data_root)
    run_once(out, lambda: stage.work(out, progress), checked=True)
    return stage.result(data_root)


def _run_parts(stage: ShardedStage, data_root: str, progress: Progress | None,
               shards: range | None, on_shard: Callable[[int], None] | None) -> None:
    from croco.progress import progress_bar

    t0 = time.perf_counter()
    out = stage.output(data_root)
    parts = stage.parts(data_root)
    n = parts.count
    wanted = range(n) if shards is None else shards
    if wanted and (wanted.start < 0 or wanted.stop > n):
        raise ValueError(f"{out}: shards {wanted.start}..{wanted.stop - 1} asked for, but the "
                         f"output has shards 0..{n - 1}")
    storage.sweep_temporary(out)
    todo = _missing(out, parts, wanted)
    done = len(wanted) - len(todo)
    # titled like "generate en" (the stage, then the language or model)
    bar = progress_bar(len(wanted), stage.label().replace("-", " ", 1), unit="shard",
                       initial=done)
    for i in todo:
        if parts.reference(i):
            parts.store(i)
        else:
            storage.write_parquet(parts.rows(i), storage.join(out, part_name(i)))
        done += 1
        bar.update(1)
        if progress:
            progress(done, len(wanted))
        if on_shard:
            on_shard(i)
    bar.close()
    info = {"seconds": round(time.perf_counter() - t0, 3), **parts.info()}
    if shards is None:
        _seal(out, parts, info)
        return
    if todo:  # what this group did, for whichever call seals the output
        storage.write_json(storage.join(out, GROUPS, f"{wanted.start:05d}-{wanted.stop - 1:05d}"
                                        ".json"), info, keep=True)
    if not _missing(out, parts, range(n)):
        _seal(out, parts, _groups_info(out))  # the last group to finish


#: A sharded output's records of what each shard group did (`_groups/00000-00007.json`:
#: its seconds and the stage's own counts, e.g. the rows it sampled), written by a group
#: that made parts, summed into `_SUCCESS` by whichever call seals the output.
GROUPS = "_groups"


def _groups_info(out: str) -> dict:
    """What the shard groups of `out` did together: their counts summed, `seconds` the
    longest group's (they run side by side), `groups` how many recorded. A group that made
    no part (all there already) recorded nothing; a group run again replaces its record."""
    folder = storage.join(out, GROUPS)
    total: dict = {}
    names = [n for n in storage.list_dir(folder) if n.endswith(".json")]
    for name in names:
        for key, value in storage.read_json(storage.join(folder, name)).items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            total[key] = (max if key == "seconds" else sum)((total.get(key, 0), value))
    return {**total, "groups": len(names)} if names else {}


def part_files(stage: ShardedStage, data_root: str, shards: range) -> list[str]:
    """The URIs of the files that are these parts of the stage's output: a part written
    there, or the stored file it references."""
    parts, out = stage.parts(data_root), stage.output(data_root)
    return [parts.reference(i) or storage.join(out, part_name(i)) for i in shards]


def seal(stage: ShardedStage, data_root: str) -> str:
    """Mark a sharded output complete once every shard group has written its parts
    (cheap: lists the folder, counts rows). Missing parts fail with their names."""
    out = stage.output(data_root)
    if storage.is_complete(out):
        return out
    parts = stage.parts(data_root)
    n = parts.count
    missing = [part_name(i) for i in _missing(out, parts, range(n))]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} of {n} shards are missing "
                           f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                           f"rerun {stage.label()}, which writes only the missing shards")
    _seal(out, parts, _groups_info(out))
    return out


def incomplete(stages: list[Stage], data_root: str) -> list[Stage]:
    """The calls of `stages` whose output is not complete, asked together
    (`croco.storage.complete_among`: on an object store, one listing for the language
    folders of an output instead of a request each)."""
    markers = [s.markers(data_root) for s in stages]
    done = storage.complete_among([m for ms in markers for m in ms])
    return [s for s, ms in zip(stages, markers) if not all(m in done for m in ms)]


def completion_info(uri: str) -> dict:
    """What a stage output's `_SUCCESS` marker recorded (rows, seconds, ...)."""
    try:
        return storage.marker_info(uri)
    except Exception:  # noqa: BLE001 - a marker without info is still a marker
        return {}
