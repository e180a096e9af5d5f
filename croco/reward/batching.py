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
        ids, mask = _left_padded([token_ids[i] for i in idx], pad_id)
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


def split_shared_prefixes(token_ids: list[list[int]], groups: list) -> list[int]:
    """Per sequence, the length of the token prefix it shares with every other sequence of
    its group (`groups[i]`: any hashable label, e.g. the prompt); at least one token of each
    sequence is left after it. A group of one shares nothing (0)."""
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    shared = [0] * len(token_ids)
    for idx in members.values():
        if len(idx) < 2:
            continue
        first = token_ids[idx[0]]
        n = min(len(token_ids[i]) for i in idx) - 1
        for i in idx[1:]:
            seq = token_ids[i]
            j = 0
            while j < n and seq[j] == first[j]:
                j += 1
            n = j
        for i in idx:
            shared[i] = max(n, 0)
    return shared


def _left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


@torch.inference_mode()
def forward_last_grouped(model, token_ids: list[list[int]], groups: list, *, pad_id: int,
                         batch_size: int, select: Callable[[torch.Tensor], torch.Tensor],
                         progress=None) -> list:
    """`forward_last` for a causal LM, running the token prefix that the sequences of a
    group share (e.g. the judge's template and prompt, the same for the k responses of a
    prompt) once per batch instead of once per sequence: the prefixes fill a KV cache,
    which is repeated for each sequence of the group, then each sequence's own tokens run
    on it. Padding between a prefix and a sequence's own tokens is masked and the positions
    continue the prefix's, so every sequence sees what it would alone (as in
    `forward_last`, to float rounding). `batch_size` counts sequences. Groups whose
    sequences share nothing run as in `forward_last`."""
    from transformers import DynamicCache

    from croco.generation.transformers import cache_kwarg

    shared = split_shared_prefixes(token_ids, groups)
    if not any(shared):
        return forward_last(model, token_ids, pad_id=pad_id, batch_size=batch_size,
                            select=select, progress=progress, logits_to_keep=1)
    device = next(model.parameters()).device
    cache_kw = cache_kwarg(model)
    order = sorted(range(len(token_ids)),
                   key=lambda i: (shared[i], str(groups[i]), len(token_ids[i])))
    values: list = [0.0] * len(token_ids)
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        prefixes: dict[tuple, int] = {}
        row_prefix = []
        for i in idx:
            key = tuple(token_ids[i][:shared[i]])
            row_prefix.append(prefixes.setdefault(key, len(prefixes)))
        suffixes = [token_ids[i][shared[i]:] for i in idx]
        s_ids, s_mask = _left_padded(suffixes, pad_id)
        cache, kwargs = None, {}
        if any(len(p) for p in prefixes):
            p_ids, p_mask = _left_padded([list(p) for p in prefixes], pad_id)
            p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache(config=model.config)
            model(input_ids=p_ids.to(device), attention_mask=p_mask.to(device),
                  position_ids=p_pos.to(device), use_cache=True, logits_to_keep=1,
                  **{cache_kw: cache})
            rows = torch.tensor(row_prefix, dtype=torch.long)
            cache.batch_select_indices(rows.to(device))
            p_mask = p_mask[rows]
            offset = p_mask.sum(-1, keepdim=True)
            mask = torch.cat([p_mask, s_mask], dim=1)
            kwargs = {cache_kw: cache, "use_cache": True}
        else:
            offset = torch.zeros((len(idx), 1), dtype=torch.long)
            mask = s_mask
        positions = ((s_mask.cumsum(-1) - 1).clamp(min=0) + offset)
        out = model(input_ids=s_ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), logits_to_keep=1, **kwargs)
        result = select(out.logits).float().cpu().tolist()
        for row, i in enumerate(idx):
            values[i] = result[row]
        done += len(idx)
        if progress is not None:
            progress(done, len(order))
    return values
