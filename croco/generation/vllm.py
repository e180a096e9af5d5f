"""The vLLM generation backend (optional: `pip install 'croco[vllm]'` on a CUDA host, or
vLLM's CPU build beside croco with `bash infra/setup-vllm.sh`).

One `LLM.chat` call with `SamplingParams(n=k)` per conversation: vLLM shares the prompt's
prefill across the k samples itself. Each conversation's request carries its own seed,
derived from the stage's seed and the conversation's content (`request_seed`), so a
prompt's samples do not depend on which other prompts share the call; vLLM gives sample i
of a request the seed `seed + i` (`croco.generation.conversation_seed`, which the
transformers backend follows too).

A tuned policy (`adapter`) is sampled from its merged weights by default
(`adapter_mode="merge"`: the adapter is merged once into a folder under the croco cache,
which is what croco's transformers backend samples too); `adapter_mode="lora"` serves it
with `LoRARequest` on the base weights instead (`max_lora_rank` sized to the adapter). On
vLLM's CPU build, LoRA decoding of a small adapter ran 5x slower than the base model
(README, "vLLM"), and merged weights decode at the base model's speed.

Engine settings croco chooses (`engine_kwargs`), each because of something measured:
- dtype `auto` follows croco's precision rule (`croco.models.pick_dtype`: bf16 where the
  device multiplies it natively, else float32), not vLLM's (which would run a float32
  checkpoint in float16 or bf16);
- on vLLM's CPU build: a KV cache of `CPU_KV_CACHE_GIB` per engine
  (`kv_cache_memory_bytes`; `VLLM_CPU_KVCACHE_SPACE`, vLLM's own knob, wins when set),
  since vLLM's default takes 0.92 of the machine's memory and refuses to start beside
  anything else; chunked prefill off, since a partial prefill with a seeded request
  kills the CPU engine (`RuntimeError: CPU Generator does not use offset`); every core
  (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`: the calling process waits while the engine works);
  and `VLLM_USE_AOT_COMPILE=0`, because the CPU build cannot load its own AOT artifacts
  ("'function' object has no attribute 'finalize_loading'") and compiled every start
  again, where the plain compile cache loads. Variables the user set are left alone.

Request building and result mapping are plain functions, tested with stand-ins; the
engine paths are tested against the real CPU build (tests marked `vllm`).
"""

from __future__ import annotations

import atexit
import gc
import importlib.abc
import importlib.metadata
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from croco.generation.contract import Completion, conversation_seed

INSTALL_HINT = ("the vllm backend needs vLLM: pip install 'croco[vllm]' on a CUDA host, or "
                "bash infra/setup-vllm.sh for vLLM's CPU build (in .venv-vllm)")

#: vLLM's allowed `max_lora_rank` values (`vllm.config.lora.MaxLoRARanks`).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: KV cache per engine on vLLM's CPU build, GiB (VLLM_CPU_KVCACHE_SPACE overrides).
CPU_KV_CACHE_GIB = 2
ADAPTER_MODES = ("merge", "lora")


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    _alias_cpu_distribution()
    return vllm


class _CPUBuild(importlib.metadata.Distribution):
    """The `vllm-cpu` distribution as `vllm` at version `<version>+cpu`: what vLLM itself
    makes of it when it detects its platform (`vllm.platforms.vllm_version_matches_substr`)."""

    def __init__(self, dist: importlib.metadata.Distribution):
        self._dist = dist

    def read_text(self, filename):
        text = self._dist.read_text(filename)
        if filename in ("METADATA", "PKG-INFO") and text:
            lines = ["Name: vllm" if line.startswith("Name:") else
                     f"{line}+cpu" if line.startswith("Version:") else line
                     for line in text.splitlines()]
            text = "\n".join(lines) + "\n"
        return text

    def locate_file(self, path):
        return self._dist.locate_file(path)


class _DistributionAlias(importlib.abc.MetaPathFinder):
    """Answers `importlib.metadata` lookups of the distribution `vllm` with `vllm-cpu`.
    vLLM's CPU build installs the `vllm` module under the distribution name `vllm-cpu`,
    and code that asks for `importlib.metadata.version("vllm")` (lm-eval's vLLM model
    does so at import) fails without this. Registered last on `sys.meta_path`, so a real
    `vllm` distribution is always found first; finds no modules."""

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=None):
        if context is None or context.name != "vllm":
            return iter(())
        try:
            return iter([_CPUBuild(importlib.metadata.distribution("vllm-cpu"))])
        except importlib.metadata.PackageNotFoundError:
            return iter(())


def _alias_cpu_distribution() -> None:
    if any(isinstance(f, _DistributionAlias) for f in sys.meta_path):
        return
    try:
        importlib.metadata.distribution("vllm")
        return  # the CUDA build (or another that names itself vllm): nothing to alias
    except importlib.metadata.PackageNotFoundError:
        pass
    sys.meta_path.append(_DistributionAlias())


def on_cpu() -> bool:
    """Whether the installed vLLM runs on the CPU (its CPU build)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def prepare_cpu_environment() -> None:
    """vLLM CPU-build variables croco sets unless the user did (see the module docstring);
    read by the engine processes vLLM starts, so set before the first `LLM`."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


def engine_dtype(dtype: str, *, cpu: bool) -> str:
    """`auto` -> croco's choice for the device (bf16 where native, else float32)."""
    if dtype != "auto":
        return dtype
    import torch

    if not cpu and not torch.cuda.is_available():
        return "auto"  # a platform croco has no rule for: vLLM's own choice

    from croco.models import dtype_name, pick_dtype

    return dtype_name(pick_dtype("auto", torch.device("cpu" if cpu else "cuda")))


def platform_kwargs(*, cpu: bool, environ=os.environ) -> dict[str, Any]:
    """`vllm.LLM` arguments that only a CPU engine needs (see the module docstring)."""
    if not cpu:
        return {}
    kwargs: dict[str, Any] = {"enable_chunked_prefill": False}
    if not environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB * 2**30
    return kwargs


def eager_default(cpu: bool) -> bool:
    """Eager on vLLM's CPU build: compiling the model took 19-90 s at every new engine and
    decoded no faster (SmolLM2-135M, 392 sequences, bf16, 2 cores: ~200 new tokens/s both
    ways); on a GPU, vLLM's compiled graphs are its speed."""
    return cpu


def parallel_size(tensor_parallel_size: int, *, cpu: bool) -> int:
    """`tensor_parallel_size` 0 -> every GPU this process sees (CUDA_VISIBLE_DEVICES, which
    Slurm, Kubernetes or a worker set; on ROCm torch reports HIP's devices the same way);
    1 on vLLM's CPU build."""
    if tensor_parallel_size > 0:
        return tensor_parallel_size
    if cpu:
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def lora_rank(adapter: str) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds the adapter's rank (its `r`, or
    the largest of its `rank_pattern`): a larger one pads every LoRA matmul."""
    path = Path(adapter) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    rank = max([int(cfg.get("r") or 8), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())])
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"{path}: LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]}); "
                     "use adapter_mode merge")


def sampling_kwargs(*, k: int, temperature: float, top_p: float, max_new_tokens: int,
                    seed: int) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (temperature 0 means greedy)."""
    kwargs: dict[str, Any] = dict(n=k, temperature=temperature, max_tokens=max_new_tokens,
                                  seed=seed)
    if temperature > 0:
        kwargs["top_p"] = top_p
    return kwargs


def llm_kwargs(model_path: str, *, dtype: str, tensor_parallel_size: int,
               lora_rank: int | None, seed: int, gpu_memory_utilization: float | None = None,
               enforce_eager: bool | None = None, cpu: bool = False,
               environ=os.environ) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`. `gpu_memory_utilization` None keeps vLLM's default
    (0.9 of the GPU; on a CPU the KV cache is sized by `platform_kwargs` instead); lower it
    when another engine or model shares the GPU. `lora_rank`: serve LoRA adapters of up
    to that rank (None: no LoRA). `enforce_eager` None: `eager_default`."""
    kwargs: dict[str, Any] = {
        "model": model_path, "seed": seed,
        "tensor_parallel_size": parallel_size(tensor_parallel_size, cpu=cpu),
        "dtype": engine_dtype(dtype, cpu=cpu),
        "enforce_eager": eager_default(cpu) if enforce_eager is None else enforce_eager,
    }
    if gpu_memory_utilization is not None and not cpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank)
    kwargs.update(platform_kwargs(cpu=cpu, environ=environ))
    return kwargs


def map_outputs(request_outputs) -> list[list[Completion]]:
    """vLLM `RequestOutput`s (one per conversation, in order) -> k `Completion`s each.
    `n_tokens` counts the generated ids vLLM returns (the stop token included, as in the
    transformers backend)."""
    results = []
    for req in request_outputs:
        samples = []
        for out in sorted(req.outputs, key=lambda o: o.index):
            reason = "length" if out.finish_reason == "length" else "stop"
            samples.append(Completion(text=out.text.strip(), n_tokens=len(out.token_ids),
                                      finish_reason=reason))
        results.append(samples)
    return results


# ------------------------------------------------------------------------------ engines

_lock = threading.RLock()

#: The reaper: a small process that outlives this one by a moment. It notes this process's
#: vLLM engine processes every second, and when this process ends (its stdin pipe closes:
#: any exit, kill -9 included) kills those still running. vLLM's engine core does not watch
#: the process that started it: after a kill -9 it ran on, orphaned (seen here).
_REAPER_CODE = r"""
import sys, threading, psutil
parent = psutil.Process(int(sys.argv[1]))
seen, ended = {}, threading.Event()
threading.Thread(target=lambda: (sys.stdin.buffer.read(), ended.set()), daemon=True).start()
while not ended.wait(1.0):
    try:
        children = parent.children(recursive=True)
    except psutil.Error:
        break
    for p in children:
        try:
            if p.name().startswith("VLLM") or " ".join(p.cmdline()[:1]).startswith("VLLM"):
                seen[p.pid] = p
        except psutil.Error:
            pass
for p in seen.values():
    try:
        if p.is_running():  # the same process (start time checked), not a reused pid
            p.kill()
    except psutil.Error:
        pass
"""
_reaper = None


def prepare_engine_start() -> bool:
    """What every engine start needs first: the CPU build's variables (on a CPU), the
    reaper, and `release_all` at exit. Returns whether vLLM runs on the CPU."""
    global _release_registered
    cpu = on_cpu()
    if cpu:
        prepare_cpu_environment()
    guard_engine_processes()
    with _lock:
        if not _release_registered:
            atexit.register(release_all)
            _release_registered = True
    return cpu


_release_registered = False


def release_all() -> None:
    """Shut down every engine this process started: the generation engine and the scorers'
    (`croco.reward.vllm`, if it was imported). `croco run` calls it when the run ends, and
    it runs at exit (registered with the first engine), so engines stop while the
    interpreter is whole rather than from finalizers during its teardown."""
    release_engines()
    scorers = sys.modules.get("croco.reward.vllm")
    if scorers is not None:
        scorers.release_scorers()


def guard_engine_processes() -> None:
    """Start this process's reaper (`_REAPER_CODE`) once, before its first vLLM engine."""
    global _reaper
    with _lock:
        if _reaper is not None and _reaper.poll() is None:
            return
        import subprocess

        _reaper = subprocess.Popen([sys.executable, "-c", _REAPER_CODE, str(os.getpid())],
                                   stdin=subprocess.PIPE, start_new_session=True)


_engine: dict[str, Any] = {}  # at most one generation engine per process: kwargs -> LLM


def engine(kwargs: dict[str, Any]):
    """The process's generation engine for `kwargs`, started once. Starting one with other
    arguments (another model, adapter or dtype) first shuts the previous one down: an
    engine holds its GPU memory (or its CPU KV cache) until it is released, and
    generation engines are used one after another, never alternately."""
    vllm = require_vllm()
    key = json.dumps(kwargs, sort_keys=True)
    with _lock:
        if key in _engine:
            return _engine[key]
        release_engines()
        prepare_engine_start()
        _engine[key] = vllm.LLM(**kwargs)
        return _engine[key]


def shutdown(llm) -> None:
    """Stop a `vllm.LLM`'s engine processes now, rather than whenever it is collected."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def release_engines() -> None:
    """Shut down the process's generation engine, if any (its worker processes end)."""
    with _lock:
        for llm in _engine.values():
            shutdown(llm)
        _engine.clear()
    gc.collect()


def merged_model(model: str, adapter: str) -> str:
    """`model` with `adapter` merged into its weights, in a folder of the croco cache named
    by both (`merged/<hash>`), made once (atomically) and reused."""
    from croco.config import stable_hash
    from croco.identity import path_identity
    from croco.models import cache_dir, merge_adapter, resolve_model

    name = stable_hash({"model": path_identity(model), "adapter": path_identity(adapter)})
    target = cache_dir() / "merged" / name
    if (target / "config.json").exists():
        return str(target)
    resolve_model(model)
    tmp = target.parent / f".{name}.tmp-{os.getpid()}-{threading.get_ident()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    merge_adapter(model, adapter, tmp, device="cpu")
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def lm_eval_model_args(model_path: str, *, adapter: str | None, dtype: str) -> str:
    """lm-eval's `vllm` model arguments with croco's engine settings (`llm_kwargs`): the
    adapter merged (lm-eval's own LoRA path would pad it to rank 16), and on the CPU build
    the KV cache sized and chunked prefill off. The process's generation engine is
    released first: lm-eval starts its own."""
    require_vllm()
    release_engines()
    cpu = prepare_engine_start()
    path = merged_model(model_path, adapter) if adapter else model_path
    kwargs = llm_kwargs(path, dtype=dtype, tensor_parallel_size=1, lora_rank=None, seed=1234,
                        cpu=cpu)
    del kwargs["model"], kwargs["seed"]
    return ",".join([f"pretrained={path}"] + [f"{k}={v}" for k, v in kwargs.items()])


class VLLMGenerator:
    """Samples with vLLM. `adapter_mode`: `merge` (default; sample the merged weights) or
    `lora` (`LoRARequest` on the base weights)."""

    def __init__(self, model: str, *, adapter: str | None = None, dtype: str = "auto",
                 tensor_parallel_size: int = 1, seed: int = 0,
                 gpu_memory_utilization: float | None = None,
                 enforce_eager: bool | None = None, adapter_mode: str = "merge"):
        require_vllm()
        from croco.models import resolve_model

        if adapter_mode not in ADAPTER_MODES:
            raise ValueError(f"adapter_mode {adapter_mode!r}: use merge or lora")
        self.lora = None
        path = resolve_model(model)
        rank = None
        if adapter and adapter_mode == "merge":
            path = merged_model(model, adapter)
        elif adapter:
            from croco.models import check_model, local_adapter

            adapter = local_adapter(adapter)
            check_model(adapter, field="adapter", kind="adapter")
            from vllm.lora.request import LoRARequest

            rank = lora_rank(adapter)
            self.lora = LoRARequest("croco-adapter", 1, adapter)
        self.llm = engine(llm_kwargs(path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                     lora_rank=rank, seed=seed,
                                     gpu_memory_utilization=gpu_memory_utilization,
                                     enforce_eager=enforce_eager, cpu=on_cpu()))

    def generate(self, conversations: list[list[dict]], *, k: int, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 64,
                 seed: int = 0) -> list[list[Completion]]:
        """k completions per conversation; `batch_size` does not apply (vLLM schedules)."""
        from vllm import SamplingParams

        params = [SamplingParams(**sampling_kwargs(
            k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            seed=conversation_seed(seed, conv))) for conv in conversations]
        outputs = self.llm.chat(conversations, params, lora_request=self.lora, use_tqdm=True)
        return map_outputs(outputs)
