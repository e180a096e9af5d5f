"""Sequence-classification reward model (e.g. Skywork/Skywork-Reward-V2-Qwen3-8B).

Each (prompt, response) is rendered as a two-turn chat with the model's chat template;
the score is the raw logit of the single output label.
"""

from __future__ import annotations

from croco.models import load_model
from croco.reward.batching import forward_last, tokenize_left_truncated


def render_pair(tokenizer, prompt: str, response: str) -> str:
    """The text a reward model scores: (prompt, response) as a two-turn chat."""
    conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(conv, tokenize=False)
    return f"User: {prompt}\n\nAssistant: {response}"


def pair_token_ids(tokenizer, prompts: list[str], responses: list[str],
                   max_length: int) -> list[list[int]]:
    """The token ids every backend scores (left-truncated to `max_length`)."""
    texts = [render_pair(tokenizer, p, r) for p, r in zip(prompts, responses)]
    return tokenize_left_truncated(tokenizer, texts, max_length)


class ClassifierRewardModel:
    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 16, max_length: int = 4096):
        self.model, self.tokenizer = load_model(model, kind="classifier", device=device,
                                                dtype=dtype)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {model!r} has {self.model.config.num_labels} labels; "
                             "a reward model has exactly one")
        self.batch_size = batch_size
        self.max_length = max_length

    def render(self, prompt: str, response: str) -> str:
        return render_pair(self.tokenizer, prompt, response)

    def score(self, prompts: list[str], responses: list[str], progress=None, *,
              langs: list[str] | None = None) -> list[float]:
        ids = pair_token_ids(self.tokenizer, prompts, responses, self.max_length)
        return forward_last(self.model, ids, pad_id=self.model.config.pad_token_id,
                            batch_size=self.batch_size, select=lambda logits: logits[:, 0],
                            progress=progress)
