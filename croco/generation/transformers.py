"""The transformers generation backend.

Prompts are batched with left padding through the model's chat template. The k samples of
a prompt share one prefill: the prompt is run once, its KV cache is repeated k times, and
decoding continues from there (the usual `num_return_sequences` would prefill k copies).
Decoding is croco's own loop over the model's forward pass (`next_tokens` picks each
token): transformers' `generate` samples with `torch.multinomial`, which on the CPU costs
as much as a quarter of the step.

Random draws are counter-based: the uniform number that picks token t of a sample is a
hash of (the sample's seed, t) (`uniforms`), where the sample's seed is its
conversation's seed plus its index (`croco.generation.conversation_seed`). No generator
state is shared between sequences, so a sample's draws are the same whatever the batch
size, the shard or the other prompts of the call. What can still move is the logits they
are applied to: a batch's shape (its padding, the kernels' blocking) changes how the
model's sums round, by about 1e-7 in float32 on some CPUs (measured on an AMD EPYC) and
more in bf16, and a draw whose uniform number falls within
that of a token boundary picks the neighbouring token. The draw inverts the distribution
in vocabulary order, also within the top-p nucleus, so a rounding moves each token's
interval by a rounding; only two tokens tied at the nucleus's edge can still trade
places. Measured on the tests' random tiny model (a flat distribution, the worst case)
on an AMD EPYC: 0 of 216 samples changed between batch configurations at top_p 1, 2 of
216 at top_p 0.9.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from croco.generation.contract import Completion, conversation_seed
from croco.models import load_model


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea and Flood 2014): a bijection of uint64 whose
    outputs pass BigCrush for consecutive inputs."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seeds: np.ndarray, step: int) -> np.ndarray:
    """One uniform number in [0, 1) per sequence for decoding step `step` (0-based), a pure
    function of (the sequence's seed, step): the counter-based generator behind sampling."""
    with np.errstate(over="ignore"):
        x = _mix64(_mix64(seeds.astype(np.uint64) * _GOLDEN) + np.uint64(step + 1) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def next_tokens(logits: torch.Tensor, *, temperature: float, top_p: float = 1.0,
                u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `logits` (rows x vocabulary): the most likely one when
    `temperature` is 0, else a draw from softmax(logits / temperature), restricted to the
    smallest set of most likely tokens whose probability reaches `top_p` (nucleus
    sampling, as transformers' `TopPLogitsWarper`). The draw inverts the cumulative
    distribution with one uniform number per row; `torch.multinomial` draws an
    exponential number per row and token (on the CPU, a quarter of a decoding step of
    SmolLM2-135M at 56 rows). `u`: the rows' uniform numbers in [0, 1) (`uniforms`);
    None draws them from torch's global generator."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        ranked, order = probs.sort(dim=-1, descending=True)
        before = ranked.cumsum(-1) - ranked  # the mass of the more likely tokens
        # the nucleus, back in vocabulary order (the most likely token always stays)
        drop = torch.empty_like(before, dtype=torch.bool).scatter_(-1, order, before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
    # The draw inverts the cumulative distribution in vocabulary order, not in rank order:
    # logits that move by a rounding error (another batch shape) then move every token's
    # interval by about that much, where in rank order two nearly equal probabilities
    # that swap ranks would hand the same uniform number to another token.
    cdf = probs.cumsum(-1)
    if u is None:
        u = torch.rand(cdf.shape[0], device=cdf.device)
    # float32 rounds a u just below 1 up to 1, which would pick past the last token
    u = u.to(device=cdf.device, dtype=cdf.dtype).clamp(max=1 - 2**-24).view(-1, 1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
    # A token of probability 0 is never picked: searchsorted lands past equal cdf values.
    return picked.squeeze(-1)


def cache_kwarg(model) -> str:
    """`cache` in recent transformers, `past_key_values` before it."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TransformersGenerator:
    def __init__(self, model: str, *, adapter: str | None = None, device: str = "auto",
                 dtype: str = "auto"):
        self.model_name = model
        self.model, self.tokenizer = load_model(model, adapter=adapter, device=device, dtype=dtype)
        self.tokenizer.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self._cache_kw = cache_kwarg(self.model)
        # Only the last position's logits are wanted, not the vocabulary at every position.
        self._keep = ({"logits_to_keep": 1} if "logits_to_keep" in
                      inspect.signature(self.model.forward).parameters else {})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, conversations: list[list[dict]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, padding=True, return_tensors="pt",
            return_dict=True,
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def _forward(self, ids, mask, positions, cache, **extra):
        """One forward pass that fills `cache`; the logits of the last position only."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self._cache_kw: cache}, **self._keep, **extra)
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def _sample_batch(self, conversations, *, k, temperature, top_p, max_new_tokens, seed):
        from transformers import DynamicCache

        enc = self._encode(conversations)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        pad_id = self.tokenizer.pad_token_id
        # One prefill of every prompt, then its cache and last logits repeated k times.
        cache = DynamicCache(config=self.model.config)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, mask, positions, cache)
        if k > 1:
            cache.batch_repeat_interleave(k)
            logits = logits.repeat_interleave(k, 0)
            mask, positions = mask.repeat_interleave(k, 0), positions.repeat_interleave(k, 0)
        n = logits.shape[0]
        position = positions[:, -1:]
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        # sample j of conversation i is row i * k + j; its seed: the conversation's + j
        seeds = np.repeat(np.array([conversation_seed(seed, c) for c in conversations],
                                   dtype=np.int64), k) + np.tile(np.arange(k), len(conversations))
        steps = []
        for step in range(max_new_tokens):
            u = (torch.from_numpy(uniforms(seeds, step)) if temperature > 0 else None)
            token = next_tokens(logits, temperature=temperature, top_p=top_p, u=u)
            token = token.masked_fill(done, pad_id)  # a finished sequence only pads
            steps.append(token)
            done |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            position = position + 1
            logits = self._forward(token[:, None], mask, position, cache)
        new = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(n)]
        results = []
        for i in range(len(conversations)):
            samples = []
            for tokens in new[i * k:(i + 1) * k]:
                stop = next((j for j, t in enumerate(tokens) if t in self.eos_ids), None)
                if stop is None:
                    kept, n_tokens, finish = tokens, len(tokens), "length"
                else:
                    kept, n_tokens, finish = tokens[:stop], stop + 1, "stop"
                text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
                samples.append(Completion(text=text, n_tokens=n_tokens, finish_reason=finish))
            results.append(samples)
        return results

    def generate(self, conversations: list[list[dict]], *, k: int, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 64,
                 seed: int = 0) -> list[list[Completion]]:
        """k completions per conversation. `batch_size` counts decoded sequences; it
        changes how fast, not what is drawn (see the module docstring)."""
        prompts_per_batch = max(1, batch_size // k)
        results: list[list[Completion]] = []
        for start in range(0, len(conversations), prompts_per_batch):
            results.extend(self._sample_batch(
                conversations[start:start + prompts_per_batch], k=k, temperature=temperature,
                top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
            ))
        return results
