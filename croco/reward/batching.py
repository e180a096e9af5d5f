"""Length-sorted, left-padded batches whose results do not depend on the batch.

Sequences are sorted by length so each batch pads little; padding goes on the left with
explicit position ids, so every sequence ends at the last position and sees the same
positions as it would alone. In float32 a score is then independent of its batch mates
to ~1e-5; in bf16, expect differences of a few hundredths (README, "Models and
backends").
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tokenize_left_truncated(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text; too-long texts lose their beginning (their end decides the score)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [seq[-max_length:] for seq in ids]


@torch.inference_mode()
def forward_last(model, token_ids: list[list[int]], *, pad_id: int, batch_size: int,
                 select: Callable[[torch.Tensor], torch.Tensor], progress=None,
                 **model_kwargs) -> list:
    """Run `model` over sequences in length-sorted batches; `select(logits)` maps the
    model's output logits to one value (a float, or a list for a 2-D result) per sequence.
    Returns the values in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    values: list = [0.0] * len(token_ids)
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(token_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = token_ids[i]
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), **model_kwargs)
        result = select(out.logits).float().cpu().tolist()
        for row, i in enumerate(idx):
            values[i] = result[row]
        done += len(idx)
        if progress is not None:
            progress(done, len(order))
    return values
