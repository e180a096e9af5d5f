"""The transformers generation backend.

Prompts are batched with left padding through the model's chat template. The k samples of
a prompt share one prefill: the prompt is run once, its KV cache is repeated k times, and
decoding continues from there (the usual `num_return_sequences` would prefill k copies).
"""

from __future__ import annotations

import inspect

import torch

from croco.generation import Completion
from croco.models import load_model


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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, conversations: list[list[dict]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, padding=True, return_tensors="pt",
            return_dict=True,
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def _sample_batch(self, conversations, *, k, temperature, top_p, max_new_tokens):
        from transformers import DynamicCache

        enc = self._encode(conversations)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        pad_id = self.tokenizer.pad_token_id
        sampling = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            do_sample=temperature > 0,
        )
        if temperature > 0:
            sampling.update(temperature=temperature, top_p=top_p, top_k=0)
        if ids.shape[1] > 1:
            # One prefill of every prompt but its last token, then repeat the cache k times.
            cache = DynamicCache(config=self.model.config)
            cache_kw = cache_kwarg(self.model)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            # Only the cache is wanted: no logits over the vocabulary for every position.
            keep = ({"logits_to_keep": 1} if "logits_to_keep" in
                    inspect.signature(self.model.forward).parameters else {})
            self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                       position_ids=positions[:, :-1], use_cache=True, **{cache_kw: cache},
                       **keep)
            if k > 1:
                cache.batch_repeat_interleave(k)
            out = self.model.generate(
                input_ids=ids.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0),
                **{cache_kw: cache}, **sampling,
            )
        else:
            out = self.model.generate(
                input_ids=ids.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0),
                **sampling,
            )
        new = out[:, ids.shape[1]:].tolist()
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
        """k completions per conversation. `batch_size` counts decoded sequences."""
        torch.manual_seed(seed)
        prompts_per_batch = max(1, batch_size // k)
        results: list[list[Completion]] = []
        for start in range(0, len(conversations), prompts_per_batch):
            results.extend(self._sample_batch(
                conversations[start:start + prompts_per_batch], k=k, temperature=temperature,
                top_p=top_p, max_new_tokens=max_new_tokens,
            ))
        return results
