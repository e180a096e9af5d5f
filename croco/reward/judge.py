"""A generative judge: any causal LM, a question about the response, scored by
token log-probabilities.

The judge sees the template filled with the prompt and the response as a user turn, then
the start of its own answer; the score is log P(yes_token) - log P(no_token) for its
first answer token (in nats; positive means the judge leans towards "yes").
"""

from __future__ import annotations

from croco.models import load_model
from croco.reward.batching import forward_last_grouped, tokenize_left_truncated


def render_question(tokenizer, template: str, prompt: str, response: str) -> str:
    """The judge's input: the filled template as a user turn, then the start of its answer."""
    question = template.format(prompt=prompt, response=response)
    conv = [{"role": "user", "content": question}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    return f"{question}\nAnswer:"


def question_token_ids(tokenizer, template: str, prompts: list[str], responses: list[str],
                       max_length: int) -> list[list[int]]:
    """The token ids every backend scores (left-truncated to `max_length`)."""
    texts = [render_question(tokenizer, template, p, r) for p, r in zip(prompts, responses)]
    return tokenize_left_truncated(tokenizer, texts, max_length)


def answer_token_ids(tokenizer, yes_token: str, no_token: str) -> tuple[int, int]:
    """The first token of the yes and of the no answer; they must differ."""
    ids = []
    for text, field in ((yes_token, "yes_token"), (no_token, "no_token")):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not encoded:
            raise ValueError(f"judge.{field}: {text!r} encodes to no token")
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise ValueError(f"judge: yes_token {yes_token!r} and no_token {no_token!r} "
                         "start with the same token")
    return ids[0], ids[1]


class JudgeRewardModel:
    def __init__(self, model: str, *, template: str, yes_token: str = "Yes", no_token: str = "No",
                 device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 max_length: int = 2048):
        self.model, self.tokenizer = load_model(model, device=device, dtype=dtype)
        self.template = template
        self.yes_id, self.no_id = answer_token_ids(self.tokenizer, yes_token, no_token)
        self.batch_size = batch_size
        self.max_length = max_length

    def render(self, prompt: str, response: str) -> str:
        return render_question(self.tokenizer, self.template, prompt, response)

    def score(self, prompts: list[str], responses: list[str], progress=None, *,
              langs: list[str] | None = None) -> list[float]:
        ids = question_token_ids(self.tokenizer, self.template, prompts, responses,
                                 self.max_length)
        yes, no = self.yes_id, self.no_id

        def select(logits):
            last = logits[:, -1, :].float().log_softmax(-1)
            return last[:, yes] - last[:, no]

        # The questions about one prompt's responses share their start (template and
        # prompt): it runs once per batch (`forward_last_grouped`).
        return forward_last_grouped(self.model, ids, prompts,
                                    pad_id=self.tokenizer.pad_token_id,
                                    batch_size=self.batch_size, select=select,
                                    progress=progress)
