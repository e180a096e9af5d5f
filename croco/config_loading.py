"""Reading a run configuration: YAML (a file, a URI, or the demo shipped with croco),
`--set key.path=value` overrides, and validation into `croco.config.CrocoConfig`.

Every problem is a `ConfigError` on one line that names the source and the key's dotted
path, e.g. ``invalid config run.yaml: generation.k: Input should be a valid integer``;
a variant's key is named by the variant (``experiments[dpo-big].training.beta``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from croco.config import _UNKNOWN_KEY, ConfigError, CrocoConfig, _KeyPathError


def _key_path(loc: tuple, data: dict | None) -> str:
    """`experiments.0.method` as `experiments[<name>].method` when the variant has a name."""
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    variants = (data or {}).get("experiments")
    if len(loc) > 1 and loc[0] == "experiments" and isinstance(loc[1], int) \
            and isinstance(variants, list) and loc[1] < len(variants) \
            and isinstance(variants[loc[1]], dict) and variants[loc[1]].get("name"):
        parts[:2] = [f"experiments[{variants[loc[1]]['name']}]"]
    return ".".join(parts)


def _format_validation_error(err: ValidationError, source: str,
                             data: dict | None = None) -> str:
    """One line: `invalid config SOURCE: key.path: problem; key.path: problem`."""
    problems = []
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _KeyPathError):
            problems.append(str(cause))
            continue
        path = _key_path(e["loc"], data)
        msg = (_UNKNOWN_KEY if e["type"] == "extra_forbidden"
               else e["msg"].removeprefix("Value error, "))
        problems.append(f"{path or '<root>'}: {msg}")
    return f"invalid config {source}: " + "; ".join(problems)


def _parse_override(item: str) -> tuple[list[str], Any]:
    """(key path, value) of one `--set KEY=VALUE`; the value is parsed as YAML (as text
    when it is not valid YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set generation.k=8")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(part)]
                    continue
                except (ValueError, IndexError):
                    raise ConfigError(f"--set {item!r}: no list index {part!r}") from None
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[: i + 1])} is not a mapping")
        last = path[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (ValueError, IndexError):
                raise ConfigError(f"--set {item!r}: no list index {last!r}") from None
        else:
            node[last] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CrocoConfig:
    """Load a YAML config (None: the demo config shipped with croco) and apply overrides."""
    if path is None:
        source = "builtin:demo"
        text = (Path(__file__).parent / "configs" / "demo.yaml").read_text()
    elif "://" in str(path):
        from croco import storage

        source = str(path)
        try:
            text = storage.read_bytes(source).decode()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {source}") from None
    else:
        source = str(path)
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p} (pass a YAML file, or none for the demo)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            before = e.object[:e.start]
            line, column = before.count(b"\n") + 1, e.start - before.rfind(b"\n")
            raise ConfigError(f"{p} line {line}: not UTF-8 text (byte {e.object[e.start]:#04x} "
                              f"at column {column}); save the config as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, source=source)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and the line it was found on."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def config_from_dict(data: dict, *, source: str = "<dict>") -> CrocoConfig:
    """Validate `data` as a run config; a problem is a `ConfigError` naming `source`."""
    try:
        return CrocoConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, data)) from None


def dump_config(cfg: CrocoConfig) -> str:
    """The config as YAML, every key with its value (defaults filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
