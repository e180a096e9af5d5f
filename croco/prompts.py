"""Prompts: load per-language prompt sets, validate them, optionally translate.

Accepted sources (`prompts.path`):
- a JSONL or Parquet file with `prompt_id`, `lang` and `prompt` (or chat `messages`);
  optional `split` (`train`/`heldout`, default `train`) and `source`;
- a folder of such files: `lang` may come from a hive `lang=xx/` folder or from a file
  named `xx.jsonl` / `xx.parquet` when the rows lack it;
- `builtin:demo`: the parallel demo set shipped with croco (24 prompts x 7 languages);
- `hf:<dataset id>` (`datasets.load_dataset`) or a folder written by `save_to_disk`.

Every row is checked; an error names the file, the row (1-based line for JSONL) and the
field, and nothing is written.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import polars as pl

from croco.errors import UserError
from croco.languages import check_language, language_name

BUILTIN = {"builtin:demo": Path(__file__).parent / "data" / "demo_prompts.jsonl"}
PROMPT_COLUMNS = ["prompt_id", "lang", "prompt", "messages", "split", "source"]
SPLITS = ("train", "heldout")


class PromptError(UserError, ValueError):
    """Bad prompt input; the message names the file, row and field."""


MESSAGES_DTYPE = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet") and p.is_file()
        )
        if not files:
            raise PromptError(f"{path}: no .jsonl or .parquet prompt files found in this folder")
        return files
    if not path.exists():
        raise PromptError(f"{path}: prompt file not found (set prompts.path)")
    if path.suffix not in (".jsonl", ".parquet"):
        raise PromptError(f"{path}: unsupported prompt file type; use .jsonl or .parquet")
    return [path]


def _lang_from_path(path: Path) -> str | None:
    for part in reversed(path.parts[:-1]):
        if part.startswith("lang="):
            return part.split("=", 1)[1]
    stem = path.stem
    return stem if len(stem) == 2 and stem.isalpha() else None


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    """One line of a JSONL file as text; a byte that is not UTF-8 names the line and column."""
    if lineno == 1:
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is still UTF-8
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(
            f"{path} line {lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
            f"{e.start + 1}); save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    # Bytes, decoded line by line: a bad byte is reported with its line, not as a codec error.
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        line = _decode_line(path, lineno, raw)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise PromptError(f"{path} line {lineno}: expected a JSON object per line")
        rows.append((f"{path} line {lineno}", obj))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        df = pl.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file here
        raise PromptError(f"{path}: cannot read as Parquet ({e})") from None
    return [(f"{path} row {i + 1}", row) for i, row in enumerate(df.iter_rows(named=True))]


def _check_type(where: str, field: str, value, types: tuple[type, ...]) -> None:
    """`value` (when given) is one of `types`; bools are not numbers here."""
    if value is None:
        return
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join("a string" if t is str else f"an {t.__name__}" for t in types)
        raise PromptError(f"{where}: field '{field}' must be {wanted}, got "
                          f"{type(value).__name__}")


def _normalize_row(where: str, row: dict, default_lang: str | None) -> dict:
    prompt_id = row.get("prompt_id", row.get("id"))
    _check_type(where, "prompt_id", prompt_id, (str, int))
    if prompt_id is None or str(prompt_id).strip() == "":
        raise PromptError(f"{where}: missing field 'prompt_id'")
    for field in ("lang", "prompt", "split", "source"):
        _check_type(where, field, row.get(field), (str,))
    lang = row.get("lang", row.get("language")) or default_lang
    if lang is None:
        raise PromptError(
            f"{where}: missing field 'lang' (add it, or name the file <lang>.jsonl "
            "or put it under a lang=<code>/ folder)"
        )
    try:
        check_language(str(lang), where=f"{where}: field 'lang'")
    except ValueError as e:
        raise PromptError(str(e)) from None
    messages = row.get("messages")
    prompt = row.get("prompt")
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        ):
            raise PromptError(
                f"{where}: field 'messages' must be a list of {{role, content}} objects "
                "with string values"
            )
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        if prompt is None:
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise PromptError(f"{where}: field 'messages' has no user turn")
            prompt = users[0]
    if prompt is None or not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"{where}: missing or empty field 'prompt' (or give 'messages')")
    if messages is None:
        messages = [{"role": "user", "content": prompt}]
    split = row.get("split") or "train"
    if split not in SPLITS:
        raise PromptError(f"{where}: field 'split' is {split!r}; use 'train' or 'heldout'")
    return {
        "prompt_id": str(prompt_id),
        "lang": str(lang),
        "prompt": prompt,
        "messages": messages,
        "split": split,
        "source": str(row.get("source") or ""),
    }


def _frame(rows: list[dict]) -> pl.DataFrame:
    schema = {
        "prompt_id": pl.String,
        "lang": pl.String,
        "prompt": pl.String,
        "messages": MESSAGES_DTYPE,
        "split": pl.String,
        "source": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


_loaded: dict[tuple, pl.DataFrame] = {}
_loaded_lock = threading.Lock()


def load_prompts(path: str, *, dataset_split: str = "train") -> pl.DataFrame:
    """Read and validate a prompt source into the prompts table (every language in it).

    A local or built-in source is read once per process while its content is unchanged
    (its fingerprint, `croco.identity.path_identity`, which stats the files only): the
    run's check before any model loads and every language's prompts task share one read.
    Other sources (`hf:` datasets) are read on every call."""
    from croco.identity import path_identity

    ident = path_identity(path)
    if not isinstance(ident, dict) or "content" not in ident:
        return _load_prompts(path, dataset_split)
    key = (path, dataset_split, ident["content"])
    with _loaded_lock:  # tasks in threads wait for the first read instead of repeating it
        if key not in _loaded:
            table = _load_prompts(path, dataset_split)
            if len(_loaded) >= 2:
                _loaded.pop(next(iter(_loaded)))
            _loaded[key] = table
        return _loaded[key]


def _load_prompts(path: str, dataset_split: str) -> pl.DataFrame:
    rows: list[dict] = []
    if path in BUILTIN:
        files = [BUILTIN[path]]
    elif path.startswith("builtin:"):
        raise PromptError(f"prompts.path: unknown built-in set {path!r}; known: {sorted(BUILTIN)}")
    elif path.startswith("hf:") or (
        Path(path).is_dir() and (Path(path) / "dataset_info.json").exists()
    ):
        return _load_hf(path, dataset_split)
    else:
        files = _files(Path(path))
    for f in files:
        default_lang = _lang_from_path(f)
        raw = _read_jsonl(f) if f.suffix == ".jsonl" else _read_parquet(f)
        for where, row in raw:
            rows.append(_normalize_row(where, row, default_lang))
    if not rows:
        raise PromptError(f"{path}: no prompts found")
    df = _frame(rows)
    dup = df.group_by("prompt_id", "lang").len().filter(pl.col("len") > 1)
    if dup.height:
        first = dup.row(0, named=True)
        raise PromptError(
            f"{path}: prompt_id {first['prompt_id']!r} appears {first['len']} times for "
            f"lang {first['lang']!r}; each (prompt_id, lang) must be unique"
        )
    return df.sort("lang", "prompt_id")


def check_coverage(prompts: pl.DataFrame, languages: list[str], *, path: str,
                   splits: dict[str, str], translate_from: str | None = None) -> None:
    """Every configured language has prompts (or, when translating, the source language
    has them), in every split the run uses (`splits`: the setting that picks it -> split)."""
    have = sorted(prompts["lang"].unique())
    needed = [translate_from] if translate_from else languages
    for lang in needed:
        rows = prompts.filter(pl.col("lang") == lang)
        if rows.is_empty():
            if translate_from:
                raise PromptError(f"{path}: prompts.translate.source_lang is {lang!r} but the "
                                  f"file has prompts in {have} only")
            raise PromptError(
                f"{path}: no prompts in language {lang!r} (the source has {have}); remove it "
                "from `languages` or add prompts.translate to translate from one language")
        for setting, split in splits.items():
            if split != "all" and rows.filter(pl.col("split") == split).is_empty():
                raise PromptError(
                    f"{path}: language {lang!r} has no prompts with split {split!r} "
                    f"({setting}); add some, or set {setting} to another split")


def _load_hf(path: str, dataset_split: str) -> pl.DataFrame:
    try:
        import datasets
    except ImportError:
        raise PromptError("loading a Hugging Face dataset needs: pip install datasets") from None
    if path.startswith("hf:"):
        ds = datasets.load_dataset(path[3:], split=dataset_split)
    else:
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[dataset_split]
    rows = [_normalize_row(f"{path} row {i + 1}", r, None) for i, r in enumerate(ds)]
    return _frame(rows).sort("lang", "prompt_id")


def select_for_generation(
    prompts: pl.DataFrame, *, split: str = "train", limit: int | None = None
) -> pl.DataFrame:
    """The prompts of one split (or all), the first `limit` prompt ids per language."""
    df = prompts if split == "all" else prompts.filter(pl.col("split") == split)
    df = df.sort("lang", "prompt_id")
    if limit is not None:
        df = df.group_by("lang", maintain_order=True).head(limit)
    return df


def with_language_instruction(prompt: str, lang: str, template: str) -> str:
    """Append the 'respond in <language>' instruction to a user prompt."""
    return f"{prompt}\n\n{template.format(language=language_name(lang), lang=lang)}"


def translate_prompts(
    source: pl.DataFrame,
    target_lang: str,
    *,
    model: str,
    template: str,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    device: str = "auto",
) -> pl.DataFrame:
    """Translate a one-language prompt set into `target_lang` with greedy decoding.

    `prompt_id`, `split` and `source` are kept, so the result is parallel to the input.
    """
    from croco.generation.transformers import TransformersGenerator

    src_lang = source["lang"][0]
    gen = TransformersGenerator(model, device=device)
    conversations = [
        [
            {
                "role": "user",
                "content": template.format(
                    source_language=language_name(src_lang),
                    target_language=language_name(target_lang),
                    text=text,
                ),
            }
        ]
        for text in source["prompt"].to_list()
    ]
    outs = gen.generate(
        conversations,
        k=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=0,
    )
    texts = [o[0].text.strip() or src for o, src in zip(outs, source["prompt"].to_list())]
    return _frame(
        [
            {
                "prompt_id": pid,
                "lang": target_lang,
                "prompt": t,
                "messages": [{"role": "user", "content": t}],
                "split": split,
                "source": f"{src}|translated:{src_lang}->{target_lang}",
            }
            for pid, t, split, src in zip(
                source["prompt_id"], texts, source["split"], source["source"]
            )
        ]
    )
