"""A generative judge: any causal LM, a question about the response, scored by
token log-probabilities.

The judge sees the template filled with the prompt and the response as a user turn, then
the start of its own answer; the score is log P(yes_token) - log P(no_token) for its
first answer token (in nats; positive means the judge leans towards "yes").
"""

from __future__ import annotations

from croco.models import load_model
from croco.reward.batching import forward_last, tokenize_left_truncated


class JudgeRewardModel:
    def __init__(self, model: str, *, template: str, yes_token: str = "Yes", no_token: str = "No",
                 device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 max_length: int = 2048):
        self.model, self.tokenizer = load_model(model, device=device, dtype=dtype)
        self.template = template
        self.yes_id = self._first_token(yes_token, "yes_token")
        self.no_id = self._first_token(no_token, "no_token")
        if self.yes_id == self.no_id:
            raise ValueError(f"judge: yes_token {yes_token!r} and no_token {no_token!r} "
                             "start with the same token")
        self.batch_size = batch_size
        self.max_length = max_length

    def _first_token(self, text: str, field: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"judge.{field}: {text!r} encodes to no token")
        return ids[0]

    def render(self, prompt: str, response: str) -> str:
        question = self.template.format(prompt=prompt, response=response)
        conv = [{"role": "user", "content": question}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(conv, tokenize=False,
                                                      add_generation_prompt=True)
        return f"{question}\nAnswer:"

    def score(self, prompts: list[str], responses: list[str], progress=None) -> list[float]:
        texts = [self.render(p, r) for p, r in zip(prompts, responses)]
        ids = tokenize_left_truncated(self.tokenizer, texts, self.max_length)
        yes, no = self.yes_id, self.no_id

        def select(logits):
            last = logits[:, -1, :].float().log_softmax(-1)
            return last[:, yes] - last[:, no]

        return forward_last(self.model, ids, pad_id=self.tokenizer.pad_token_id,
                            batch_size=self.batch_size, select=select, progress=progress,
                            logits_to_keep=1)
